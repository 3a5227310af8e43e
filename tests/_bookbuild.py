"""One smoke-profile book build per test session, shared by test_book.py and test_browser.py.

Fixtures imported into two modules become two fixture definitions, so the build is cached on the
pytest config's stash instead: whichever module asks first builds, the other reuses it.

``SAEMATCH_BOOK_BUILD=<build dir>`` makes the tests check a book already built there (for instance
by ``make book PROFILE=smoke`` in CI) instead of building their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from saematch_core._book import BookConfig, BookResult, build_book

REPO = Path(__file__).resolve().parents[1]

_BUILT = pytest.StashKey[tuple[Path, BookResult]]()


def smoke_book(request: pytest.FixtureRequest) -> tuple[Path, BookResult]:
    """``(build_dir, result)`` of the whole smoke-profile book, built into a session temp folder."""
    stash = request.config.stash
    prebuilt = os.environ.get("SAEMATCH_BOOK_BUILD", "")
    if _BUILT not in stash and prebuilt:
        build_dir = Path(prebuilt).resolve()
        html = build_dir / "_build" / "html"
        if not (html / "index.html").is_file():
            raise FileNotFoundError(f"{html / 'index.html'}: SAEMATCH_BOOK_BUILD names no built book")
        executed = tuple(
            sorted(
                p for p in (build_dir / "executed").glob("[0-9][0-9]_*.ipynb") if ".failed" not in p.suffixes
            )
        )
        stash[_BUILT] = (build_dir, BookResult(executed=executed, html_dir=html, timings={}))
    if _BUILT not in stash:
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        build_dir = factory.mktemp("book")
        cache = factory.mktemp("book_cache")
        # The notebook kernels inherit this environment: keep their cache out of the user's home.
        with mock.patch.dict(os.environ, {"SAEMATCH_CACHE": str(cache)}):
            result = build_book(BookConfig(root=REPO, build_dir=build_dir, profile="smoke"))
        stash[_BUILT] = (build_dir, result)
    return stash[_BUILT]
