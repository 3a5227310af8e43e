"""The smoke-profile book in a real browser (Debian chromium via Playwright), fully offline.

The built HTML is served on 127.0.0.1; every request to any other host is aborted and counted as
a failure. Every page must load without console errors or failed requests, every plotly figure
must render an SVG with traces, and the explorer's dropdown and hover must change what is shown.
Screenshots of two pages are written to ``$SAEMATCH_SCREENSHOTS`` (default ``build/screenshots``
in the repository) for CI to keep as artefacts. Without ``/usr/bin/chromium`` the tests skip, except
under CI (``$CI`` set), where they fail.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _bookbuild import REPO, smoke_book
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    Response,
    Route,
    sync_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXPLORER = "notebooks/09_explorer.html"

# A figure is drawn when plotly made its SVG and at least one trace group inside it.
_FIGURES_JS = """
() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(gd => ({
    id: gd.id,
    svg: gd.querySelectorAll('svg.main-svg').length,
    traces: gd.querySelectorAll('g.trace, g.hm, g.table').length,
    data: (gd.data || []).length,
}))
"""


_ALL_DRAWN_JS = """
() => Array.from(document.querySelectorAll('.plotly-graph-div')).every(gd => gd.querySelector('svg.main-svg'))
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # `format` is the stdlib signature
        pass


@pytest.fixture(scope="module")
def site(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """``(base_url, html_dir)`` of the smoke book served on 127.0.0.1 in a thread."""
    _, result = smoke_book(request)
    assert result.html_dir is not None
    handler = functools.partial(_QuietHandler, directory=str(result.html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", result.html_dir
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM}: Debian chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run this test, never skip it
        pytest.skip(message)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class _Watch:
    """Everything that went wrong on one page: console errors, page errors, failed or foreign requests."""

    def __init__(self, page: Page, base: str) -> None:
        self.problems: list[str] = []
        self.foreign: list[str] = []
        host = urlsplit(base).netloc
        page.route("**/*", lambda route: self._route(route, host))
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _route(self, route: Route, host: str) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc != host:
            self.foreign.append(url)
            route.abort()
        else:
            route.continue_()

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.problems.append(f"console error: {msg.text}")

    def _failed(self, request: Request) -> None:
        self.problems.append(f"request failed: {request.url} ({request.failure})")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")


def _pages(html_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(html_dir).as_posix()
        for p in html_dir.rglob("*.html")
        if not p.relative_to(html_dir).parts[0].startswith("_")
    )


def _screenshot_dir() -> Path:
    folder = Path(os.environ.get("SAEMATCH_SCREENSHOTS", "") or REPO / "build" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """One browser context per test; its HTTP cache spares re-reading plotly.js on every page."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield ctx
    finally:
        ctx.close()


def _open(context: BrowserContext, base: str, rel: str) -> tuple[Page, _Watch]:
    page = context.new_page()
    watch = _Watch(page, base)
    page.goto(f"{base}/{rel}", wait_until="load")
    # plotly draws from inline scripts once plotly.js has loaded; wait for every figure's SVG.
    page.wait_for_function(_ALL_DRAWN_JS, timeout=30_000)
    return page, watch


def test_every_page_loads_offline_and_every_figure_renders(
    site: tuple[str, Path], context: BrowserContext
) -> None:
    base, html_dir = site
    pages = _pages(html_dir)
    assert EXPLORER in pages and "book/intro.html" in pages and "index.html" in pages
    n_figures = 0
    for rel in pages:
        page, watch = _open(context, base, rel)
        try:
            figures = page.evaluate(_FIGURES_JS)
            for fig in figures:
                assert fig["svg"] >= 1 and fig["traces"] >= 1 and fig["data"] >= 1, (
                    f"{rel}: figure not drawn {fig}"
                )
            n_figures += len(figures)
            assert not watch.foreign, f"{rel}: requests to other hosts {watch.foreign}"
            assert not watch.problems, f"{rel}: {watch.problems}"
        finally:
            page.close()
    assert n_figures >= 3, f"expected the book's figures, found {n_figures}"


def test_intro_math_is_typeset_by_local_mathjax(site: tuple[str, Path], context: BrowserContext) -> None:
    base, _ = site
    page, watch = _open(context, base, "book/intro.html")
    try:
        page.wait_for_selector("mjx-container", timeout=15_000)
        assert not watch.foreign and not watch.problems, (watch.foreign, watch.problems)
        page.screenshot(path=str(_screenshot_dir() / "intro.png"))
    finally:
        page.close()


def test_explorer_dropdown_and_hover_change_what_is_shown(
    site: tuple[str, Path], context: BrowserContext
) -> None:
    base, _ = site
    page, watch = _open(context, base, EXPLORER)
    try:
        gd = page.locator(".plotly-graph-div").first
        n_paths = gd.evaluate("gd => gd.data.length")
        assert n_paths >= 2

        def drawn() -> int:
            return gd.locator(".scatterlayer g.trace").count()

        def title() -> str:
            return gd.locator(".gtitle").text_content() or ""

        assert drawn() == n_paths
        before = title()

        # Hover the second point of the first path: a tooltip naming the reached feature appears.
        gd.scroll_into_view_if_needed()
        point = gd.locator(".scatterlayer g.trace").first.locator("path.point").nth(1)
        box = point.bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        hover = gd.locator(".hoverlayer .hovertext")
        hover.first.wait_for(state="visible", timeout=5_000)
        assert "feature" in (hover.first.text_content() or "")

        # Pick the second path in the dropdown: only it stays drawn and the title names it.
        gd.locator(".updatemenu-header-group").first.click()
        buttons = gd.locator(".updatemenu-dropdown-button")
        buttons.first.wait_for(state="visible", timeout=5_000)
        assert buttons.count() == n_paths + 1
        label = buttons.nth(2).text_content() or ""
        buttons.nth(2).click()
        page.wait_for_function(
            "([id, n]) => document.getElementById(id).querySelectorAll('.scatterlayer g.trace').length < n",
            arg=[gd.get_attribute("id"), n_paths],
            timeout=5_000,
        )
        assert drawn() == 1
        assert title() != before and label in title()
        gd.screenshot(path=str(_screenshot_dir() / "explorer.png"))
        assert not watch.foreign and not watch.problems, (watch.foreign, watch.problems)
    finally:
        page.close()
