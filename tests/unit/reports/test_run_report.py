"""run_report.py in process: how the plan's page links each line's run report. Pages of real runs are in
tests/integration/reports/test_run_report.py."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from spade_batch.reports.run_report import is_safe_href, render_plan_report, report_link


class Links(HTMLParser):
    """The href of every <a> of a page."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [value or "" for name, value in attrs if tag == "a" and name == "href"]


def test_a_local_report_is_linked_by_a_percent_encoded_relative_path_never_a_scheme() -> None:
    assert report_link("/r/plan/report.html", "/r/javascript:alert(1)/report.html") == "../javascript%3Aalert%281%29/report.html"
    assert report_link("/r/report.html", "/r/javascript:alert(1)/report.html") == "javascript%3Aalert%281%29/report.html"
    assert report_link("/r/report.html", "s3://b/line/report.html") == "s3://b/line/report.html"


@pytest.mark.parametrize("href", [
    "javascript:alert(1)/report.html", "JaVaScRiPt:alert(1)", "java\tscript:alert(1)", " javascript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==", "vbscript:msgbox(1)", "s3://bucket/line/report.html",
])
def test_an_href_that_is_no_web_file_or_relative_url_is_shown_as_text(href: str) -> None:
    page = render_plan_report("plan", [{"line": "x"}], {"x": href})
    assert not is_safe_href(href) and Links(page).hrefs == []


@pytest.mark.parametrize("href", ["https://factory/results/line3/report.html", "file:///r/line3/report.html",
                                  "../results/line3/report.html", "javascript%3Aalert%281%29/report.html"])
def test_web_file_and_relative_urls_are_linked(href: str) -> None:
    assert Links(render_plan_report("plan", [{"line": "x"}], {"x": href})).hrefs == [href]


def test_names_and_hrefs_are_escaped() -> None:
    page = render_plan_report("plan", [{"line": "<b>"}], {"<script>alert(1)</script>": 's3://b/"><script>alert(2)</script>'})
    assert "<script>" not in page and "&lt;script&gt;alert(1)" in page and "&quot;&gt;&lt;script&gt;alert(2)" in page
