"""The compare report's HTML page in Chromium: one file, every figure drawn, no request anywhere.

Uses the browser set-up of ``test_browser`` (Debian chromium through Playwright; skipped without it,
failed under CI).
"""

from __future__ import annotations

from pathlib import Path

import torch
from _planted_pairs import planted_pair
from playwright.sync_api import Browser
from test_browser import _ALL_DRAWN_JS, _FIGURES_JS, _Watch, browser  # noqa: F401 - browser is a fixture

from saematch_core.compare import CompareConfig, compare
from saematch_core.report_html import write_html_report


def test_report_page_draws_every_figure_offline(tmp_path: Path, browser: Browser) -> None:  # noqa: F811
    p = planted_pair()
    acts = torch.randn(1500, 16, generator=torch.Generator().manual_seed(0)) * 2
    rep = compare(p.a, p.b, CompareConfig(others=("cosine", "greedy")), activations=(acts, acts))
    (tmp_path / "page").mkdir()
    page_path = write_html_report(rep, tmp_path / "page" / "report.html")
    assert [f.name for f in page_path.parent.iterdir()] == ["report.html"]  # one self-contained file
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    try:
        page = ctx.new_page()
        page.on("request", lambda r: requests.append(r.url))
        watch = _Watch(page, "file://")
        page.goto(page_path.as_uri(), wait_until="load")
        page.wait_for_function(_ALL_DRAWN_JS, timeout=30_000)
        figures = page.evaluate(_FIGURES_JS)
        assert len(figures) == 5  # costs vs chance, cost vs margin, best matches, matchers, agreement
        for fig in figures:
            assert fig["svg"] >= 1 and fig["traces"] >= 1 and fig["data"] >= 1, fig
        assert not watch.foreign and not watch.problems, (watch.foreign, watch.problems)
        assert requests == [page_path.as_uri()]  # the page itself, nothing else
        assert "Families (1)" in page.inner_text("body")
    finally:
        ctx.close()
