"""The documentation's links resolve (files and their headings), and the README names the test command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[tuple[str, str]]:
    """(file, anchor) of each markdown link or image in `text` that names a file of the repository or a heading of
    this page (no URL), outside fenced code blocks; file "" is this page, anchor "" none."""
    targets = LINK.findall(FENCE.sub("", text))
    return [tuple(target.partition("#")[::2]) for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown page: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_relative_links_are_found_outside_code_without_urls() -> None:
    text = "[a](docs/a.md#x) ![b](b.png) [c](https://e.org/c.md) [d](#d) [e](mailto:x@y)\n```\n[f](f.md)\n```\n"
    assert relative_links(text) == [("docs/a.md", "x"), ("b.png", ""), ("", "d")]
    assert anchors("# A page\n## Evaluation: metrics.json and report\n### What `add` does\n```\n# not one\n```\n") == {
        "a-page", "evaluation-metricsjson-and-report", "what-add-does"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for file, anchor in relative_links(page.read_text()):
        target = page.parent / file if file else page
        if not target.exists():
            broken.append(f"{file}: no such file")
        elif anchor and anchor not in anchors(target.read_text()):
            broken.append(f"{file}#{anchor}: no such heading")
    assert not broken, f"{page.relative_to(REPO)} has broken links: {broken}"


def test_the_readme_names_the_test_command_ci_runs() -> None:
    assert "make test\n" in (REPO / ".ci" / "run").read_text()
    assert "    make test " in (REPO / "README.md").read_text()
