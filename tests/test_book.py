"""The book pipeline: jupytext → papermill → Jupyter Book, and the smoke-profile book end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
from _bookbuild import REPO, smoke_book

from saematch_core._book import (
    REQUIREMENTS,
    BookBuildError,
    BookConfig,
    build_book,
    convert_notebook,
    discover_notebooks,
    main,
    notebook_requires,
    parse_param_value,
    setup,
    stage_site,
    toc_files,
)

_HEADER = (
    "# ---\n# jupyter:\n"
    '#   jupytext: {formats: "py:percent"}\n'
    "#   kernelspec: {name: python3, display_name: Python 3, language: python}\n"
    "# ---\n"
)


def _write_notebook(path: Path, body: str, *, params: str = 'profile = "smoke"\n') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'{_HEADER}\n# %% [markdown]\n# # A title\n\n# %% tags=["parameters"]\n{params}\n# %%\n{body}\n'
    )
    return path


def _fake_repo(root: Path, notebooks: dict[str, str], params: Mapping[str, str] | None = None) -> Path:
    """A minimal repository: the real _config.yml, a one-page book/, a TOC listing ``notebooks``
    (``params``: a parameters cell per stem, default ``profile`` only)."""
    root.mkdir(parents=True)
    shutil.copy2(REPO / "_config.yml", root / "_config.yml")
    shutil.copytree(REPO / "book" / "_extra", root / "book" / "_extra")  # the config names its favicon
    (root / "book" / "intro.md").write_text("# Intro\n\nA page.\n")
    chapters = "".join(f"      - file: notebooks/{stem}\n" for stem in notebooks)
    (root / "_toc.yml").write_text(
        f"format: jb-book\nroot: book/intro\nparts:\n  - caption: S\n    chapters:\n{chapters}"
    )
    for stem, body in notebooks.items():
        cell = (params or {}).get(stem, 'profile = "smoke"\n')
        _write_notebook(root / "notebooks" / f"{stem}.py", body, params=cell)
    return root


# ---------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20", 20),
        ("-1.5", -1.5),
        ("None", None),
        ("True", True),
        ("[1, 2]", [1, 2]),
        ("smoke", "smoke"),
        ("", ""),
    ],
)
def test_parse_param_value(text: str, value: object) -> None:
    assert parse_param_value(text) == value


def test_book_config_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match=r"BookConfig.profile: expected one of .*got 'smok'"):
        BookConfig(profile="smok")
    with pytest.raises(ValueError, match=r"BookConfig\.params: 'profile' is set by the pipeline"):
        BookConfig(params={"profile": "default"})
    with pytest.raises(ValueError, match="expected Python identifiers"):
        BookConfig(params={"not a name": 1})
    with pytest.raises(TypeError, match=r"BookConfig\.only"):
        BookConfig(only="06")  # type: ignore[arg-type]  # a bare string is the mistake under test
    with pytest.raises(ValueError, match=r"BookConfig\.cell_timeout_s"):
        BookConfig(cell_timeout_s=0)


def test_discover_notebooks_sorts_filters_and_rejects_duplicate_numbers(tmp_path: Path) -> None:
    for name in ("06_b.py", "02_a.py", "notes.py", "2_x.py", "03_Bad.py", "04_c.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in discover_notebooks(tmp_path)] == ["02_a.py", "06_b.py"]
    (tmp_path / "02_again.py").write_text("")
    with pytest.raises(ValueError, match="notebook number 02 is already used"):
        discover_notebooks(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        discover_notebooks(tmp_path / "missing")


def test_convert_notebook_checks_the_parameters_cell(tmp_path: Path) -> None:
    src = _write_notebook(tmp_path / "01_ok.py", "x = 1", params='profile = "smoke"\nseed = 0')
    out = convert_notebook(src, tmp_path / "out" / "01_ok.ipynb")
    nb = json.loads(out.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and "seed = 0" in "".join(tagged[0]["source"])
    assert nb["metadata"]["kernelspec"]["name"] == "python3"

    none = tmp_path / "02_none.py"
    none.write_text(f"{_HEADER}\n# %%\nx = 1\n")
    with pytest.raises(ValueError, match="exactly one cell tagged 'parameters', got 0"):
        convert_notebook(none, tmp_path / "02.ipynb")
    two = tmp_path / "03_two.py"
    two.write_text(f'{_HEADER}\n# %% tags=["parameters"]\na = 1\n\n# %% tags=["parameters"]\nb = 2\n')
    with pytest.raises(ValueError, match="got 2"):
        convert_notebook(two, tmp_path / "03.ipynb")
    assert not (tmp_path / "02.ipynb").exists() and not (tmp_path / "03.ipynb").exists()


def test_toc_files_lists_every_file_in_order(tmp_path: Path) -> None:
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n      - file: x/one\n"
        "        sections:\n          - file: x/two\n  - caption: B\n    chapters:\n      - file: x/three\n"
    )
    assert toc_files(toc) == ["book/intro", "x/one", "x/two", "x/three"]
    toc.write_text("- just a list\n")
    with pytest.raises(ValueError, match="'root'"):
        toc_files(toc)


def test_repository_toc_lists_exactly_the_notebooks() -> None:
    stems = {f"notebooks/{p.stem}" for p in discover_notebooks(REPO / "notebooks")}
    in_toc = {f for f in toc_files(REPO / "_toc.yml") if f.startswith("notebooks/")}
    assert stems and in_toc == stems
    for doc in toc_files(REPO / "_toc.yml"):
        if not doc.startswith("notebooks/"):
            assert (REPO / f"{doc}.md").is_file(), doc


def test_every_notebook_converts_and_declares_profile(tmp_path: Path) -> None:
    import papermill

    for src in discover_notebooks(REPO / "notebooks"):
        nb = convert_notebook(src, tmp_path / f"{src.stem}.ipynb")
        assert "profile" in papermill.inspect_notebook(str(nb)), src.name


def test_stage_site_refuses_a_toc_that_disagrees_with_the_notebooks(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path / "repo", {"01_a": "x = 1"})
    (tmp_path / "executed").mkdir()
    other = tmp_path / "executed" / "02_b.ipynb"
    other.write_text("{}")
    with pytest.raises(
        ValueError,
        match=r"missing from the TOC: \['notebooks/02_b'\].*without a notebook: \['notebooks/01_a'\]",
    ):
        stage_site(root, tmp_path / "site", [other])


def test_stage_site_copies_plotly_js_and_the_static_files(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path / "repo", {"01_a": "x = 1"})
    (root / "book" / "_static").mkdir()
    (root / "book" / "_static" / "plotly.min.js").write_text("stale")
    executed = tmp_path / "01_a.ipynb"
    executed.write_text("{}")
    site = stage_site(root, tmp_path / "site", [executed])
    js = (site / "book" / "_static" / "plotly.min.js").read_text()
    assert js != "stale" and "plotly" in js[:2000].lower()
    assert (site / "notebooks" / "01_a.ipynb").is_file()
    assert (site / "_config.yml").read_text() == (root / "_config.yml").read_text()


def test_unknown_override_is_an_error_before_anything_runs(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path / "repo", {"01_a": "x = 1"})
    with pytest.raises(ValueError, match=r"-p layr: not a parameter of 01_a"):
        build_book(BookConfig(root=root, build_dir=tmp_path / "build", params={"layr": 20}))
    assert not (tmp_path / "build" / "executed").exists()


def test_main_reports_bad_input_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_repo(tmp_path / "repo", {"01_a": "x = 1"})
    code = main(["--root", str(root), "--build-dir", str(tmp_path / "b"), "--only", "09"])
    assert code == 2
    assert "no notebook '09'" in capsys.readouterr().err


def test_sphinx_extension_adds_plotly_js_only_to_pages_with_a_figure() -> None:
    class FakeApp:
        def __init__(self) -> None:
            self.handlers: dict[str, object] = {}
            self.js: list[str] = []

        def connect(self, event: str, handler: object) -> None:
            self.handlers[event] = handler

        def add_js_file(self, name: str) -> None:
            self.js.append(name)

    app = FakeApp()
    meta = setup(app)
    assert meta["parallel_read_safe"] and meta["parallel_write_safe"]
    handler = app.handlers["html-page-context"]
    assert callable(handler)
    handler(app, "text", "page.html", {"body": "<p>no figure</p>"}, None)
    assert app.js == []
    handler(app, "fig", "page.html", {"body": '<div id="x" class="plotly-graph-div" style=""></div>'}, None)
    assert app.js == ["plotly.min.js"]


# ------------------------------------------------------------------------------------ with a kernel
def test_a_failing_notebook_stops_the_build(tmp_path: Path) -> None:
    root = _fake_repo(
        tmp_path / "repo",
        {"01_fails": 'raise RuntimeError("planted failure")', "02_after": "open('ran.txt', 'w').write('x')"},
    )
    build = tmp_path / "build"
    stale = build / "executed" / "01_fails.ipynb"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    with pytest.raises(
        BookBuildError,
        match=r"01_fails\.ipynb: execution failed, cell \[\d+\] raised RuntimeError: planted failure; "
        r".*01_fails\.failed\.ipynb",
    ):
        build_book(BookConfig(root=root, build_dir=build))
    failed = json.loads((build / "executed" / "01_fails.failed.ipynb").read_text())
    assert "planted failure" in json.dumps(failed)
    assert not stale.exists(), "a stale executed notebook must not survive a failed run"
    assert not (build / "executed" / "02_after.ipynb").exists() and not (build / "ran.txt").exists()
    assert not (build / "_build").exists()


def test_partial_rebuild_reruns_the_summary_notebooks(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path / "repo", {"01_a": "x = 1", "02_b": "y = 2", "99_summary": "z = 3"})
    build = tmp_path / "build"
    first = build_book(BookConfig(root=root, build_dir=build, html=False))
    assert [p.stem for p in first.executed] == ["01_a", "02_b", "99_summary"]
    again = build_book(BookConfig(root=root, build_dir=build, html=False, only=("02",)))
    assert [p.stem for p in again.executed] == ["02_b", "99_summary"]


def test_stage_site_stamps_a_page_whose_content_changed(tmp_path: Path) -> None:
    # Sphinx rereads only sources newer than its last read: a default page put back in place of an
    # override page is older than it, and would leave the override page in the HTML.
    root = _fake_repo(tmp_path / "repo", {"01_a": "x = 1"})
    default, override = tmp_path / "d" / "01_a.ipynb", tmp_path / "o" / "01_a.ipynb"
    for path, text in ((default, '{"a": 1}'), (override, '{"a": 2}')):
        path.parent.mkdir()
        path.write_text(text)
    os.utime(default, (1_000_000, 1_000_000))
    stage_site(root, tmp_path / "site", [override])
    staged = tmp_path / "site" / "notebooks" / "01_a.ipynb"
    stage_site(root, tmp_path / "site", [default])
    assert staged.read_text() == '{"a": 1}' and staged.stat().st_mtime > 1_000_000 + 3600
    os.utime(staged, (1_000_000, 1_000_000))
    stage_site(root, tmp_path / "site", [default])  # unchanged: keeps its own time
    assert staged.stat().st_mtime == 1_000_000


_LAYER_CELL = 'profile = "smoke"\nlayer: int | None = None  # a layer [layer]\nout_dir = "x"\n'
_RECORD_LAYER = "from pathlib import Path\nPath(out_dir, 'layer.txt').write_text(repr(layer))"


def _parameters(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())["metadata"]["papermill"]["parameters"]


def test_only_with_overrides_runs_no_other_section_with_them(tmp_path: Path) -> None:
    root = _fake_repo(
        tmp_path / "repo",
        {"01_a": _RECORD_LAYER, "02_b": _RECORD_LAYER, "99_summary": "z = 3"},
        params={"01_a": _LAYER_CELL, "02_b": _LAYER_CELL},
    )
    build = tmp_path / "build"
    first = build_book(BookConfig(root=root, build_dir=build, only=("01",), params={"layer": 2}))
    override = build / "overrides" / "executed" / "01_a.ipynb"
    assert [p.stem for p in first.executed] == ["01_a", "02_b", "99_summary"]
    assert first.executed[0] == override
    # the section without an executed copy ran without the override, as its default copy
    assert "layer" not in _parameters(build / "executed" / "02_b.ipynb")
    assert (build / "results" / "02_b" / "layer.txt").read_text() == "None"
    # the override run is not the default copy, writes its results apart and is marked on its page
    assert not (build / "executed" / "01_a.ipynb").exists() and not (build / "results" / "01_a").exists()
    assert (build / "overrides" / "results" / "01_a" / "layer.txt").read_text() == "2"
    nb = json.loads(override.read_text())
    assert nb["metadata"]["saematch"] == {"overrides": {"layer": 2}}
    assert "Run with parameter overrides:** `layer = 2`" in "".join(nb["cells"][1]["source"])
    page = (first.html_dir or tmp_path) / "notebooks" / "01_a.html"
    assert "Run with parameter overrides" in page.read_text()
    # the next build without overrides runs the section's default copy and publishes it instead
    again = build_book(BookConfig(root=root, build_dir=build, only=("02",)))
    assert [p.stem for p in again.executed] == ["01_a", "02_b", "99_summary"]
    assert (build / "results" / "01_a" / "layer.txt").read_text() == "None"
    assert "Run with parameter overrides" not in page.read_text()


def test_overrides_for_the_selection_leave_existing_default_copies_alone(tmp_path: Path) -> None:
    root = _fake_repo(
        tmp_path / "repo",
        {"01_a": _RECORD_LAYER, "02_b": _RECORD_LAYER},
        params={"01_a": _LAYER_CELL, "02_b": _LAYER_CELL},
    )
    build = tmp_path / "build"
    build_book(BookConfig(root=root, build_dir=build, html=False))
    before = {p.name: p.read_bytes() for p in (build / "executed").glob("*.ipynb")}
    result = build_book(BookConfig(root=root, build_dir=build, html=False, only=("02",), params={"layer": 0}))
    assert [p.parent.parent.name for p in result.executed] == ["overrides"]
    assert {p.name: p.read_bytes() for p in (build / "executed").glob("*.ipynb")} == before
    assert (build / "results" / "02_b" / "layer.txt").read_text() == "None"


def _fake_benchmarks(root: Path, cpu: str) -> None:
    """A ``benchmarks.run`` that writes a results.json like the real one's, in a blink."""
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "run.py").write_text(
        "import json, pathlib, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[0] == '--quick', args\n"
        "out = pathlib.Path(args[args.index('--out') + 1]); out.mkdir(parents=True)\n"
        f"meta = {{'cpu': {cpu!r}, 'date': '2026-01-02'}}\n"
        "rec = {'F': 8, 'noise': 'easy', 'ours_s': 0.5, 'gap_bound_rel': 0.0}\n"
        "(out / 'results.json').write_text(json.dumps({'meta': meta, 'records': [rec]}))\n"
    )


_APPENDIX_CELL = 'profile = "smoke"\nbench_results: str | None = None  # results file\n'
_READ_BENCH = (
    "import json\ncpu = json.load(open(bench_results))['meta']['cpu']\nopen('cpu.txt', 'w').write(cpu)"
)


def test_the_book_runs_a_quick_benchmark_when_none_exists(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path / "repo", {"07_app": _READ_BENCH}, params={"07_app": _APPENDIX_CELL})
    _fake_benchmarks(root, "quick-cpu")
    build = tmp_path / "build"
    first = build_book(BookConfig(root=root, build_dir=build, html=False))
    assert "benchmark" in first.timings and (build / "cpu.txt").read_text() == "quick-cpu"
    assert _parameters(build / "executed" / "07_app.ipynb")["bench_results"] == str(
        build / "bench" / "results.json"
    )
    # made once: the next build reuses it
    again = build_book(BookConfig(root=root, build_dir=build, html=False, only=("07",)))
    assert "benchmark" not in again.timings
    # `make bench`'s full results win when present
    full = root / "benchmarks" / "results" / "results.json"
    full.parent.mkdir()
    full.write_text(json.dumps({"meta": {"cpu": "full-cpu"}, "records": []}))
    build_book(BookConfig(root=root, build_dir=build, html=False, only=("07",)))
    assert (build / "cpu.txt").read_text() == "full-cpu"


def test_a_failed_quick_benchmark_stops_the_build_and_is_not_reused(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path / "repo", {"07_app": _READ_BENCH}, params={"07_app": _APPENDIX_CELL})
    _fake_benchmarks(root, "quick-cpu")
    run_py = root / "benchmarks" / "run.py"
    run_py.write_text(run_py.read_text() + "sys.exit(1)\n")
    build = tmp_path / "build"
    with pytest.raises(BookBuildError, match=r"benchmarks\.run --quick: failed with exit code 1 \(log: "):
        build_book(BookConfig(root=root, build_dir=build, html=False))
    assert not (build / "bench").exists() and not (build / "executed" / "07_app.ipynb").exists()
    assert "--quick" in (build / "bench.log").read_text()


# ------------------------------------------------------------------------------------- the whole book
def test_smoke_book_builds_end_to_end(request: pytest.FixtureRequest) -> None:
    build_dir, result = smoke_book(request)
    assert result.html_dir == build_dir / "_build" / "html"
    html = result.html_dir
    assert (html / "index.html").is_file()
    stems = [p.stem for p in discover_notebooks(REPO / "notebooks")]
    assert sorted(p.stem for p in result.executed) == sorted(stems)
    for doc in toc_files(REPO / "_toc.yml"):
        assert (html / f"{doc}.html").is_file(), f"{doc} has no page"
    for stem in stems:
        nb = json.loads((build_dir / "executed" / f"{stem}.ipynb").read_text())
        assert nb["metadata"]["papermill"]["parameters"]["profile"] == "smoke"
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o["output_type"] == "error"], stem
    # the appendix shows measured performance, from the quick run when `make bench` has not run
    bench = json.loads((build_dir / "executed" / "10_appendix.ipynb").read_text())
    bench_path = Path(str(bench["metadata"]["papermill"]["parameters"]["bench_results"]))
    appendix = (html / "notebooks" / "10_appendix.html").read_text()
    meta = json.loads(bench_path.read_text())["meta"]
    assert "gap_bound_rel" in appendix and "measured on" in appendix and meta["date"] in appendix
    # the pipeline hands each notebook that declares `out_dir` a folder under the build directory
    assert (build_dir / "results" / "02_folding_vs_cosine" / "match_00_01.json").is_file()
    log = (build_dir / "jupyter-book.log").read_text()
    assert "WARNING" not in log and "build succeeded" in log


def test_smoke_book_references_nothing_outside_the_site(request: pytest.FixtureRequest) -> None:
    _, result = smoke_book(request)
    assert result.html_dir is not None
    pages = sorted(result.html_dir.rglob("*.html"))
    assert pages
    resource = re.compile(
        r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"']((?:https?:)?//[^\"']+)", re.I
    )
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not resource.findall(text), f"{page.relative_to(result.html_dir)} loads a remote resource"
        assert "cdn.plot.ly" not in text
    figures = (result.html_dir / "notebooks" / "02_folding_vs_cosine.html").read_text()
    assert figures.count("Plotly.newPlot(") >= 2
    # plotly.js is loaded in the head of pages with figures, before their inline drawing scripts
    assert figures.index("_static/plotly.min.js") < figures.index("Plotly.newPlot(")
    for plain in ("search.html", "book/intro.html"):
        assert "plotly.min.js" not in (result.html_dir / plain).read_text(), plain
    assert (result.html_dir / "_static" / "plotly.min.js").is_file()
    assert (result.html_dir / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_a_notebook_the_profile_cannot_run_gets_a_page_saying_why(tmp_path: Path) -> None:
    root = _fake_repo(
        tmp_path / "repo",
        {"01_a": "open('a.txt', 'w').write('x')", "02_trains": "open('t.txt', 'w').write('x')"},
    )
    src = root / "notebooks" / "02_trains.py"
    src.write_text(
        src.read_text().replace("# ---\n\n", "#   saematch: {requires: [training_rows]}\n# ---\n\n", 1)
    )
    build = tmp_path / "build"
    # `paper` loads pretrained SAEs: it keeps no training rows; `smoke` does.
    res = build_book(BookConfig(root=root, build_dir=build, profile="paper", html=False))
    assert dict(res.not_built) == {"02_trains": "training_rows"}
    assert (build / "a.txt").exists() and not (build / "t.txt").exists()
    page = json.loads((build / "executed" / "02_trains.ipynb").read_text())
    text = json.dumps(page["cells"])
    assert "A title" in text and "Not built on the `paper` profile" in text and "training_rows" in text
    assert page["metadata"]["saematch"]["not_built"] == ["training_rows"]
    again = build_book(BookConfig(root=root, build_dir=tmp_path / "b2", profile="smoke", html=False))
    assert dict(again.not_built) == {} and (tmp_path / "b2" / "t.txt").exists()
    # A requirement nobody provides is refused, naming the file, before anything runs.
    src.write_text(src.read_text().replace("[training_rows]", "[gpu]"))
    with pytest.raises(ValueError, match=r"02_trains\.py: header saematch\.requires: expected a list of"):
        build_book(BookConfig(root=root, build_dir=tmp_path / "b3", html=False))
    assert not (tmp_path / "b3" / "a.txt").exists()


def test_every_notebook_declares_only_known_requirements() -> None:
    declared = {p.stem: notebook_requires(p) for p in discover_notebooks(REPO / "notebooks")}
    assert declared["07_strength"] == ("training_rows",)
    assert all(set(r) <= set(REQUIREMENTS) for r in declared.values())
