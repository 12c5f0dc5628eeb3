"""The review page end to end: a real run (the shared fitted model, copied) over the demo category's test images plus
copies of defective ones under hostile names, written by `nightly --review-top` and `review`, on disk and on S3; then
in headless Chromium, keyboard only: two images marked normal and one defect, the sheet downloaded, added with
`add --verdicts`, the images scored again: the two are no longer flagged, and `show --verdicts` counts them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spade_batch import cli
from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.card import load_card
from spade_batch.formats.images import decode_image
from spade_batch.formats.model import SpadeModel
from spade_batch.formats.review import read_cell
from spade_batch.formats.versions import resolve
from spade_batch.method.extractor import Extractor
from spade_batch.method.scorer import Scorer
from spade_batch.reports.review_page import SHEET_NAME, write_review_page

pytestmark = pytest.mark.usefixtures("ray_local")

FLAGS = ["--device", "cpu"]
"""Each run adds --image-threshold: the median calibration score of the fixture's model (its tiny random backbone flags
few images at its own threshold; the page and the verdicts need several)."""
HOSTILE = {"hostile/=cmd|' calc'!A0.png": "crack", "hostile/x<script>alert(1)<": "spot", "hostile/quote\"'s.png": "scratch"}
"""Hostile name (a folder when it holds no extension) -> the defect folder whose first image it copies."""


def run_cli(*argv: str) -> tuple[int, str]:
    """cli.main in this process; its exit code and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def night(category: str, model_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The model copied; the test images and hostile copies scored by `nightly --review-top 4`."""
    root = tmp_path_factory.mktemp("review")
    model, images = root / "model", root / "images"
    shutil.copytree(model_uri, model)
    shutil.copytree(Path(category) / "test", images)
    for name, defect in HOSTILE.items():
        target = images / (name if name.endswith(".png") else f"{name}/script>.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sorted((images / defect).glob("*.png"))[0], target)
    out = root / "out"
    threshold = ["--image-threshold", repr(float(np.median(load_card(str(model)).calibration.image_scores)))]
    code, printed = run_cli("nightly", "--train", str(root / "unused"), "--model", str(model), "--images", str(images),
                            "--out", str(out), "--review-top", "4", *FLAGS, *threshold)
    assert code == 3, printed  # the broken test image failed; the rest scored
    return {"root": root, "model": model, "images": images, "out": out, "printed": printed, "threshold": threshold}


def flagged(out: Path) -> dict[str, bool]:
    return {row["id"]: row["is_anomalous"] for row in pq.read_table(out / "scores").to_pylist() if row["error"] is None}


def test_nightly_writes_the_page_of_its_top_flagged_images_and_the_run_report_links_it(night: dict) -> None:
    out = night["out"]
    page, report = (out / "review.html").read_text(), (out / "report.html").read_text()
    assert page.count('<article class="card"') == 4 and "review page" in night["printed"]
    assert '<a href="review.html">review page</a>' in report
    scores = flagged(out)
    assert sum(scores.values()) > 4  # more flagged than the page shows: --top holds it to 4


def page_state(page: str) -> dict:
    return json.loads(page.split('id="review-state">', 1)[1].split("</script>", 1)[0])


def test_each_card_names_for_its_most_anomalous_cell_the_normal_image_and_cell_a_direct_search_finds(night: dict) -> None:
    cards = page_state((night["out"] / "review.html").read_text())["cards"]  # written by nightly --review-top
    run = json.loads((night["out"] / "run.json").read_text())
    model = SpadeModel.load(resolve(str(night["model"]), run["model_version"]).uri)
    settings = model.card.settings_for(Settings(device="cpu"))
    scorer = Scorer(model, Extractor(settings, preprocessing=model.card.preprocessing))
    rows = {row["id"]: row for row in pq.read_table(night["out"] / "scores").to_pylist()}
    assert len(cards) == 4 and all(card["match"] for card in cards)
    for card in cards:
        row, match = rows[card["id"]], card["match"]
        image = decode_image(Path(row["uri"]).read_bytes(), row["uri"])
        found = scorer.nearest_normal(scorer.extractor.forward(scorer.extractor.prepare(image)[None]), [row["neighbour_ids"]])[0]
        top = int(found.distances[0][:, 0].argmax())
        height, width = match["grid"]
        assert (height, width, match["step"]) == (16, 16, 1)  # layer1 of a 64 px image: one cell a block
        assert match["top"] == top
        assert match["ids"][match["cells"][2 * top]] == row["neighbour_ids"][found.sources[0][top, 0]]
        assert match["cells"][2 * top + 1] == found.cells[0][top, 0]
        assert match["ids"][:3] == row["neighbour_ids"][:3] and all(size is not None for size in match["sizes"][:3])


def test_review_writes_every_flagged_image_highest_first_reading_each_image_once(night: dict, monkeypatch) -> None:
    reads: list[str] = []
    read_bytes = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *args, **kw: reads.append(uri) or read_bytes(uri, *args, **kw))
    code, printed = run_cli("review", str(night["out"]), "--all-flagged")
    assert code == 0, printed

    page = (night["out"] / "review.html").read_text()
    rows = sorted(((score, i) for i, score in ((r["id"], r["image_score"]) for r in pq.read_table(night["out"] / "scores").to_pylist()
                                               if r["is_anomalous"])), reverse=True)
    state = page_state(page)
    assert [card["id"] for card in state["cards"]] == [i for _, i in rows]
    images = [uri for uri in reads if uri.endswith(".png") and not uri.startswith(str(night["out"]))]  # not masks, not tables
    assert len(images) == len(set(images)) and len(images) > len(rows)  # each image and retrieved normal image read once
    assert all(f"<h2 id=\"title-{n}\">#{n + 1}" in page for n in range(len(rows)))
    assert len(page) < 3_000_000


def test_the_page_of_a_run_on_s3_is_written_there_with_the_same_cards(night: dict, s3, s3_bucket: str) -> None:
    settings = Settings(storage_options=s3.storage_options)
    fs, bucket = storage.filesystem(s3_bucket, settings.fsspec_options())
    fs.put(str(night["out"]), f"{bucket}/night", recursive=True)
    run = json.loads((night["out"] / "run.json").read_text())
    storage.write_text(f"{s3_bucket}/night/run.json", json.dumps({**run, "out_uri": f"{s3_bucket}/night"}), settings.fsspec_options())

    page = write_review_page(f"{s3_bucket}/night", settings, top_n=3)

    assert page.uri == f"{s3_bucket}/night/review.html" and page.cards == 3 and page.undrawn == []
    remote = storage.read_text(page.uri, settings.fsspec_options())
    local = write_review_page(str(night["out"]), Settings(), top_n=3, page_uri=str(night["root"] / "local.html"))
    assert local.cards == 3
    cards = lambda text: [part.split("</h2>")[0] for part in text.split('<h2 id="title-')[1:]]  # noqa: E731
    assert cards(remote) == cards((night["root"] / "local.html").read_text())
    assert remote.count("data:image/jpeg;base64,") == (night["root"] / "local.html").read_text().count("data:image/jpeg;base64,") > 3


def test_a_run_whose_model_is_gone_still_gets_its_page_naming_the_neighbours_without_pictures(night: dict, tmp_path: Path) -> None:
    moved = tmp_path / "out"
    shutil.copytree(night["out"], moved)
    run = json.loads((moved / "run.json").read_text())
    (moved / "run.json").write_text(json.dumps({**run, "out_uri": str(moved), "model_uri": str(tmp_path / "gone")}))

    page = write_review_page(str(moved), Settings(), top_n=2)

    assert page.cards == 2 and [(note.id, note.picture) for note in page.undrawn] == [(str(tmp_path / "gone"), "model")]
    text = (moved / "review.html").read_text()
    assert text.count("nearest normal image 1: ") == 2 and text.count(": could not be read</p>") >= 2


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian chromium (as the run report's test drives it), downloading into a folder of its own."""
    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no chromium/chromedriver found: `make test` installs them (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    downloads = tmp_path_factory.mktemp("downloads")
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def keys(driver, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(text).perform()


def test_keyboard_verdicts_downloaded_and_added_stop_the_false_alarms_and_are_counted(night: dict, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    out, model = night["out"], night["model"]
    assert run_cli("review", str(out))[0] == 0
    browser.get((out / "review.html").as_uri())
    state = browser.execute_script("return JSON.parse(document.getElementById('review-state').textContent)")
    ids = [card["id"] for card in state["cards"]]
    assert len(ids) >= 3 and {"hostile/=cmd|' calc'!A0.png", "hostile/x<script>alert(1)</script>.png"} <= set(flagged(out))
    # Hostile names are text: the <script> id is shown as its characters, and no script of its ran.
    names = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "h2 .name")]
    assert names == ids
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
               for image in browser.find_elements(By.CSS_SELECTOR, "img:not([hidden])"))

    # Where a pixel's nearest normal pixel is: the most anomalous region's by default, the top-left one's once clicked.
    card, match = browser.find_element(By.ID, "card-0"), state["cards"][0]["match"]
    line = card.find_element(By.CSS_SELECTOR, "p.match")
    assert line.text.startswith("nearest normal: ") and line.text.endswith(", for the most anomalous region")
    picture = card.find_element(By.CSS_SELECTOR, "figure.subject img.mask")  # over the image: a click lands on it
    ActionChains(browser).move_to_element_with_offset(picture, 1 - picture.size["width"] // 2, 1 - picture.size["height"] // 2).click().perform()
    which, cell = match["cells"][:2]
    (height, width), (image_width, image_height) = match["grid"], match["sizes"][which]
    x, y = int((cell % width + 0.5) / width * image_width), int((cell // width + 0.5) / height * image_height)
    assert which < 3, "the top-left cell of the first card matched a retrieved image not shown"
    assert line.text == (f"nearest normal: {match['ids'][which]} at ({x}, {y}) (marked on nearest normal image {which + 1})"
                         + (", for the most anomalous region" if match["top"] == 0 else ", for the pixel clicked"))
    markers = card.find_elements(By.CSS_SELECTOR, "figure.neighbour .marker")
    assert [marker.is_displayed() for marker in markers] == [n == which for n in range(len(markers))]
    box = browser.execute_script("var r = arguments[0].getBoundingClientRect(), i = arguments[0].parentNode.querySelector('img')"
                                 ".getBoundingClientRect(); return [(r.left - i.left) / i.width, (r.top - i.top) / i.height]",
                                 markers[which])
    assert box == pytest.approx([(cell % width) / width, (cell // width) / height], abs=0.02)

    keys(browser, "nnd")  # the first two normal, the third a defect; each mark moves on to the next card
    assert browser.find_element(By.ID, "progress").text == f"3 of {len(ids)} reviewed: 2 normal, 1 defect, 0 skipped"
    labels = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".verdict-text")][:4]
    assert labels == ["NORMAL (A FALSE ALARM)", "NORMAL (A FALSE ALARM)", "DEFECT", "NOT REVIEWED"]  # words, not colour alone
    keys(browser, "kk")
    assert browser.switch_to.active_element.get_attribute("id") == "card-1"

    browser.refresh()  # verdicts survive a reload
    assert browser.find_element(By.ID, "progress").text.startswith("3 of")
    Select(browser.find_element(By.ID, "filter")).select_by_value("unreviewed")
    assert len([card for card in browser.find_elements(By.CSS_SELECTOR, "article.card") if card.is_displayed()]) == len(ids) - 3
    browser.find_element(By.ID, "download").send_keys(Keys.ENTER)
    sheet = browser.downloads / SHEET_NAME
    for _ in range(100):
        if sheet.exists():
            break
        time.sleep(0.1)
    rows = list(csv.DictReader(io.StringIO(sheet.read_text())))
    assert [read_cell(row["id"]) for row in rows] == ids
    assert [row["verdict"] for row in rows] == ["normal", "normal", "defect"] + [""] * (len(ids) - 3)
    assert all(not row["id"].startswith("=") for row in rows)  # formula-like names quoted, as show --format csv writes them

    # The sheet loaded back into a page that has forgotten its verdicts (another browser) restores them.
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    assert browser.find_element(By.ID, "progress").text.startswith("0 of")
    browser.find_element(By.ID, "load").send_keys(str(sheet))
    for _ in range(50):
        if browser.find_element(By.ID, "message").text:
            break
        time.sleep(0.1)
    assert browser.find_element(By.ID, "message").text == "Loaded 3 verdicts."
    assert browser.find_element(By.ID, "progress").text == f"3 of {len(ids)} reviewed: 2 normal, 1 defect, 0 skipped"
    assert browser.execute_script("return document.scripts.length") == 3  # the page's own: no name became a script

    code, printed = run_cli("show", str(out), "--verdicts", str(sheet), "--json")
    judged = json.loads(printed)
    assert code == 0 and (judged["reviewed"], judged["confirmed_defects"], judged["false_alarms"]) == (3, 1, 2)
    assert run_cli("add", "--model", str(model), "--verdicts", str(sheet), *FLAGS)[0] == 0
    again = night["root"] / "again"
    assert run_cli("score", "--model", str(model), "--images", str(night["images"]), "--out", str(again), *FLAGS, *night["threshold"])[0] == 3
    decisions = flagged(again)
    assert (decisions[ids[0]], decisions[ids[1]]) == (False, False), "the two marked normal are no longer flagged"
