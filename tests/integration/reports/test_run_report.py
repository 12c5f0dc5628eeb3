"""The run report and the drift alarm end to end: a real fit and nights on a local Ray, the page in headless Chromium.

One line is fitted per module (30 normal images, 9 held out for calibration). A night of 12 held-out
normal images must raise no alarm; the same 12 with a noise square pasted on each (plus one
truncated file) must: exit 5 with --fail-on-drift, and without it a warning line and exit 3 (some
images failed). The defective night's page is opened in Debian's chromium through chromedriver;
the screenshot is kept at test-output/run_report.png and each section is checked in it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade_batch import cli
from spade_batch.exit_codes import ExitCode
from spade_batch.reports.run_report import TOP_N
from tests.integration.nights import Line, defective_night, make_line

pytestmark = pytest.mark.usefixtures("ray_local")

REPO = Path(__file__).resolve().parents[3]
SCREENSHOT = REPO / "test-output" / "run_report.png"
SECTIONS = ("counts", "drift", "decisions", "histogram", "anomalies", "failures", "throughput")
WIDTH = 1200


@dataclass(frozen=True)
class Night:
    images: Path
    out: Path
    exit_code: int
    stderr: str

    @property
    def run(self) -> dict:
        return json.loads((self.out / "run.json").read_text())

    @property
    def page(self) -> str:
        return (self.out / "report.html").read_text()


def score(model: Path, images: Path, out: Path, *flags: str) -> Night:
    """`spade-batch score` in this process (on the session's Ray), its stderr captured."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(["score", "--model", str(model), "--images", str(images), "--out", str(out), "--device", "cpu", *flags])
    return Night(images, out, code, stderr.getvalue())


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Line:
    return make_line(tmp_path_factory.mktemp("line"))


@pytest.fixture(scope="module")
def alarmed(line: Line, tmp_path_factory: pytest.TempPathFactory) -> Night:
    """The defective night (12 images with noise squares, one truncated file) scored with --fail-on-drift."""
    folder = defective_night(line, tmp_path_factory.mktemp("defects") / "night")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    return score(line.model, folder, tmp_path_factory.mktemp("out") / "defects", "--fail-on-drift")


def scored_rows(out: Path) -> list[dict]:
    return [row for row in pq.read_table(out / "scores").to_pylist() if row["error"] is None]


# ---------------------------------------------------------------- drift alarm and exit codes


def test_a_normal_night_raises_no_alarm(line: Line, tmp_path: Path) -> None:
    night = score(line.model, line.normal_night, tmp_path / "out", "--fail-on-drift")
    assert night.exit_code == ExitCode.OK, night.stderr
    drift = night.run["drift"]
    assert drift["alarm"] is False and "drift" not in night.stderr
    assert drift["band"]["low"] <= night.run["anomalous"] <= drift["band"]["high"]


def test_a_night_with_injected_defects_above_the_band_exits_with_the_drift_code(alarmed: Night) -> None:
    assert alarmed.exit_code == ExitCode.DRIFT == 5, alarmed.stderr
    assert alarmed.run["anomalous"] > alarmed.run["drift"]["band"]["high"]
    assert sum(row["is_anomalous"] for row in scored_rows(alarmed.out)) == alarmed.run["anomalous"]
    assert "warning: drift: anomaly rate" in alarmed.stderr


def test_without_fail_on_drift_the_alarm_is_a_warning_line_and_the_failed_image_sets_the_code(alarmed: Night) -> None:
    rerun = score(Path(alarmed.run["model_uri"]), alarmed.images, alarmed.out)  # resumes: nothing is scored again
    assert rerun.exit_code == ExitCode.IMAGES_FAILED == 3
    assert rerun.run["resumed"] == rerun.run["images"]
    assert [line for line in rerun.stderr.splitlines() if "drift" in line] == [
        line for line in alarmed.stderr.splitlines() if "drift" in line
    ]


@pytest.fixture(scope="module")
def uncalibrated(line: Line, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The line's model fitted again in process without calibration images: no thresholds, no band, no calibration scores."""
    from spade_batch.formats.images import decode_image
    from spade_batch.method import detector
    from tests.integration.nights import SETTINGS

    pictures = sorted(line.train.glob("*.png"))
    model = detector.fit([decode_image(p.read_bytes(), str(p)) for p in pictures], SETTINGS.replace(calibration_images="held_out", calibration_fraction=0.0),
                         ids=[p.name for p in pictures])
    path = tmp_path_factory.mktemp("uncalibrated") / "model"
    model.save(str(path))
    return path


def test_fail_on_drift_with_a_model_without_calibration_says_drift_is_unknown_and_does_not_vouch_for_the_night(
    line: Line, uncalibrated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    night = score(uncalibrated, line.normal_night, tmp_path / "out", "--fail-on-drift")
    assert night.exit_code == ExitCode.DRIFT, night.stderr
    assert re.search(r"\ndrift\s+unknown: the model has no calibration to compare tonight with", capsys.readouterr().out)
    assert "warning: drift unknown: the model has no calibration" in night.stderr and "--fail-on-drift vouches only" in night.stderr
    assert (night.run["drift"]["alarm"], night.run["drift"]["checked"]) == (False, False)
    assert "Drift unknown: the model has no calibration" in Page(night.page).sections["drift"]

    rerun = score(uncalibrated, line.normal_night, tmp_path / "out")  # without the flag the run exits by its scoring
    assert rerun.exit_code == ExitCode.OK and "warning: drift" not in rerun.stderr
    assert re.search(r"\ndrift\s+unknown: ", capsys.readouterr().out), "never 'none'"


# ---------------------------------------------------------------- the page's content


class Page(HTMLParser):
    """Sections by id (their text), and every src/href of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, str] = {}
        self.sources: list[str] = []
        self._open: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self._open = values["id"]
            self.sections[self._open] = ""
        self.sources += [value for key, value in attrs if key in ("src", "href") and value]

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.sections[self._open] += data + " "


def test_the_page_is_self_contained_with_every_section(alarmed: Night) -> None:
    page = Page(alarmed.page)
    assert list(page.sections) == list(SECTIONS)
    assert page.sources and all(source.startswith("data:image/png;base64,") for source in page.sources)


def test_the_page_shows_the_counts_and_top_anomalies_of_the_scores_table(alarmed: Night) -> None:
    page = Page(alarmed.page)
    rows = scored_rows(alarmed.out)
    top = sorted((row for row in rows if row["is_anomalous"]), key=lambda row: (-row["image_score"], row["id"]))[:TOP_N]
    anomalies = page.sections["anomalies"]
    assert f"Top {len(top)} anomalies" in anomalies
    positions = [anomalies.index(row["id"]) for row in top]
    assert positions == sorted(positions)  # highest score first
    counts = " ".join(page.sections["counts"].split())
    run = alarmed.run
    assert f"images {run['images']}" in counts and f"anomalous {run['anomalous']}" in counts and f"failed (bad input) {run['failed']}" in counts
    assert "DRIFT: anomaly rate" in page.sections["drift"]
    calibration = json.loads((Path(run["model_uri"]) / "spade.json").read_text())["calibration"]
    assert f"calibration images {calibration['count']}" in " ".join(page.sections["drift"].split())


def test_failures_are_grouped_by_reason_without_the_image_name(alarmed: Night) -> None:
    failures = " ".join(Page(alarmed.page).sections["failures"].split())
    assert "cannot decode <image>" in failures and "truncated.png" in failures  # the reason, then the example id


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by chromedriver (both installed by `make test`); skipped only when absent."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no chromium/chromedriver found: `make test` installs them (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--force-device-scale-factor=1", "--hide-scrollbars", f"--window-size={WIDTH},800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, page: Path) -> np.ndarray:
    """The whole page, H x W x 3 uint8, also saved to SCREENSHOT."""
    driver.get(page.as_uri())
    driver.set_window_size(WIDTH, driver.execute_script("return document.documentElement.scrollHeight") + 200)
    png = driver.get_screenshot_as_png()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def crop(shot: np.ndarray, rect: dict) -> np.ndarray:
    top, left = round(rect["y"]), round(rect["x"])
    return shot[top : top + round(rect["height"]), left : left + round(rect["width"])]


def test_the_report_renders_in_headless_chromium_with_every_section_in_the_screenshot(browser, alarmed: Night) -> None:
    from selenium.webdriver.common.by import By

    shot = screenshot(browser, alarmed.out / "report.html")
    tops = []
    for section in SECTIONS:
        element = browser.find_element(By.ID, section)
        rect = element.rect
        assert element.is_displayed() and rect["height"] > 20, section
        assert rect["y"] + rect["height"] <= shot.shape[0], f"{section} lies outside the screenshot"
        region = crop(shot, rect)
        assert region.std() > 5, f"section {section} is blank in the screenshot"
        tops.append(rect["y"])
    assert tops == sorted(tops)  # in the documented order, one below the other

    # Every embedded figure decoded, and what the screenshot shows there is that figure.
    for image in browser.find_elements(By.TAG_NAME, "img"):
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
        source = image.get_attribute("src").split(",", 1)[1]
        figure = np.asarray(Image.open(io.BytesIO(base64.b64decode(source))).convert("RGB")).astype(np.int16)
        shown = crop(shot, image.rect).astype(np.int16)
        assert shown.shape == figure.shape, "figures are shown at their own size"
        assert np.abs(shown - figure).mean() < 2.0

    # The alarm is the red banner: its pixels in the screenshot are the stylesheet's colour.
    verdict = crop(shot, browser.find_element(By.CSS_SELECTOR, "#drift .verdict.alarm").rect)
    assert np.median(verdict.reshape(-1, 3), axis=0).tolist() == [0xF7, 0xC6, 0xC6]


def test_the_report_of_a_run_on_s3_is_written_there_with_the_same_sections(alarmed: Night, s3, s3_bucket: str) -> None:
    from spade_batch.config import Settings
    from spade_batch.formats import storage
    from spade_batch.reports.run_report import write_run_report

    settings = Settings(storage_options=s3.storage_options)
    fs, bucket = storage.filesystem(s3_bucket, settings.fsspec_options())
    fs.put(str(alarmed.out), f"{bucket}/night", recursive=True)
    summary = {**alarmed.run, "out_uri": f"{s3_bucket}/night"}

    report = write_run_report(summary, settings)

    uri = report.uri
    assert uri == f"{s3_bucket}/night/report.html" and report.drift.drifted and report.undrawn == []
    remote, local = Page(storage.read_text(uri, settings.fsspec_options())), Page(alarmed.page)
    for section in ("counts", "drift", "histogram", "anomalies", "failures"):  # the anomalies' masks named where they now are
        assert remote.sections[section] == local.sections[section].replace(str(alarmed.out), f"{s3_bucket}/night"), section
    assert json.loads(storage.read_text(f"{s3_bucket}/night/run.json", settings.fsspec_options()))["drift"]["alarm"] is True
