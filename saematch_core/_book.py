"""Build the book: jupytext → papermill → Jupyter Book 1.x, offline, stopping at the first failure.

Layout under the build folder (``build/`` by default; nothing is written into the sources)::

    notebooks/NN_x.ipynb   jupytext conversion of notebooks/NN_x.py (py:percent)
    executed/NN_x.ipynb    papermill output (NN_x.failed.ipynb when a cell raised)
    results/NN_x/          the ``out_dir`` parameter handed to each notebook that declares one
    site/                  the Sphinx source: _config.yml, _toc.yml, book/, notebooks/ (executed copies)
    _build/html/           the book (open index.html); jupyter-book.log holds the Sphinx output

Jupyter Book never executes anything (``execute_notebooks: "off"``): papermill has run every
notebook, with the kernel's working directory set to the build folder. Sphinx runs with warnings as
errors (``-W -n --keep-going``). plotly.js is copied from the installed ``plotly`` package into
``site/book/_static`` so that pages never reach for a CDN (see :mod:`saematch_core.plots`).

This module is also the Sphinx extension (``extensions: [saematch_core._book]`` in ``_config.yml``)
that loads ``plotly.min.js`` on the pages that hold a figure, and only there.

Command line: ``python -m saematch_core._book --profile smoke [--only 06] [-p layer 20] [--build-dir build]``.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from saematch_core.cache import atomic_write_text
from saematch_core.profiles import PROFILE_NAMES

__all__ = [
    "PLOTLY_JS",
    "BookBuildError",
    "BookConfig",
    "BookResult",
    "build_book",
    "build_html",
    "convert_notebook",
    "discover_notebooks",
    "execute_notebook",
    "main",
    "parse_param_value",
    "setup",
    "stage_site",
    "toc_files",
]

logger = logging.getLogger(__name__)

NOTEBOOK_PATTERN = re.compile(r"^(?P<nn>\d\d)_[a-z0-9_]+\.py$")
"""File names of the notebook sources: two digits, an underscore, a lower-case snake-case topic."""
PLOTLY_JS = "plotly.min.js"
"""File name of plotly.js in the book's ``_static`` folder."""
_FIGURE_MARKER = 'class="plotly-graph-div"'
SUMMARY_PREFIX = "99_"
"""Notebooks named ``99_*`` summarise the other sections' results and re-run after any of them."""
_SITE_NOTEBOOKS = "notebooks"
_PIPELINE_PARAMS = frozenset({"profile", "out_dir"})


class BookBuildError(RuntimeError):
    """A step of the book build failed; the message names the notebook or the step and where its log is."""


@dataclass(frozen=True, kw_only=True)
class BookConfig:
    """What to build and where. Every default builds the whole smoke-profile book into ``build/``."""

    root: Path = Path(".")
    """Repository root: holds ``_config.yml``, ``_toc.yml``, ``book/`` and ``notebooks/``."""
    build_dir: Path = Path("build")
    """Everything the build writes goes below this folder (see the module docstring)."""
    profile: str = "smoke"
    """Profile passed to every notebook as its ``profile`` parameter (one of ``PROFILE_NAMES``)."""
    only: tuple[str, ...] = ()
    """Notebooks to (re)execute, by number (``"09"``) or stem (``"09_explorer"``); empty means all.
    Notebooks outside this selection are executed too when they have no executed output yet."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Parameter overrides (name → value) for every executed notebook that declares the name. A name
    no executed notebook declares is an error, so typos do not pass silently."""
    cell_timeout_s: int | None = 3600
    """Per-cell execution limit in seconds for papermill (None: no limit). The only timeout."""
    html: bool = True
    """Run Jupyter Book after the notebooks; False stops after papermill."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "build_dir", Path(self.build_dir))
        if self.profile not in PROFILE_NAMES:
            raise ValueError(
                f"BookConfig.profile: expected one of {list(PROFILE_NAMES)}, got {self.profile!r}"
            )
        if isinstance(self.only, str) or not all(isinstance(s, str) and s for s in self.only):
            raise TypeError(
                f"BookConfig.only: expected a tuple of notebook numbers or stems, got {self.only!r}"
            )
        object.__setattr__(self, "only", tuple(self.only))
        object.__setattr__(self, "params", dict(self.params))
        for name in self.params:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"BookConfig.params: expected Python identifiers as names, got {name!r}")
            if name in _PIPELINE_PARAMS:
                raise ValueError(
                    f"BookConfig.params: {name!r} is set by the pipeline (use BookConfig.profile / build_dir)"
                )
        if self.cell_timeout_s is not None and (
            not isinstance(self.cell_timeout_s, int) or self.cell_timeout_s < 1
        ):
            raise ValueError(
                f"BookConfig.cell_timeout_s: expected an int >= 1 or None, got {self.cell_timeout_s!r}"
            )

    @property
    def notebooks_dir(self) -> Path:
        return self.root / "notebooks"

    @property
    def site_dir(self) -> Path:
        return self.build_dir / "site"

    @property
    def html_dir(self) -> Path:
        return self.build_dir / "_build" / "html"


class BookResult(NamedTuple):
    """What :func:`build_book` produced."""

    executed: tuple[Path, ...]
    """Executed notebooks of this run, in build order (those reused from an earlier run are not listed)."""
    html_dir: Path | None
    """Folder holding ``index.html``; None when ``BookConfig.html`` is False."""
    timings: Mapping[str, float]
    """Wall-clock seconds per step: one entry per executed notebook stem, plus ``html`` and ``total``."""


def discover_notebooks(notebooks_dir: str | os.PathLike[str]) -> list[Path]:
    """The notebook sources ``NN_topic.py`` in ``notebooks_dir``, sorted by name.

    Raises
    ------
    FileNotFoundError
        If ``notebooks_dir`` does not exist.
    ValueError
        If two sources share a number.
    """
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: notebooks folder does not exist")
    found = sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))
    numbers: dict[str, Path] = {}
    for path in found:
        nn = path.name[:2]
        if nn in numbers:
            raise ValueError(f"{path}: notebook number {nn} is already used by {numbers[nn].name}")
        numbers[nn] = path
    return found


def _select(notebooks: Sequence[Path], only: Iterable[str]) -> list[Path]:
    wanted = list(only)
    if not wanted:
        return list(notebooks)
    selected: list[Path] = []
    for key in wanted:
        hits = [p for p in notebooks if key in (p.stem, p.name[:2])]
        if not hits:
            raise ValueError(
                f"BookConfig.only: no notebook {key!r}; expected one of {[p.stem for p in notebooks]}"
            )
        selected.extend(h for h in hits if h not in selected)
    return sorted(selected)


def toc_files(toc_path: str | os.PathLike[str]) -> list[str]:
    """Every ``file:`` entry of a Jupyter Book ``_toc.yml`` (root first, then in reading order)."""
    import yaml  # a jupyter-book dependency

    path = Path(toc_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table of contents does not exist")
    toc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(toc, dict) or "root" not in toc:
        raise ValueError(f"{path}: expected a jb-book table of contents with a 'root' key")
    out = [str(toc["root"])]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                out.append(str(node["file"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return out


def convert_notebook(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Convert a py:percent source to ``.ipynb`` (atomically), checking it has one ``parameters`` cell.

    Returns
    -------
    Path of the written notebook.

    Raises
    ------
    FileNotFoundError
        If ``source`` does not exist.
    ValueError
        If the notebook has no cell tagged ``parameters``, or more than one.
    """
    import jupytext
    import nbformat

    src, dst = Path(source), Path(target)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: notebook source does not exist")
    nb = jupytext.read(src, fmt="py:percent")
    tagged = [
        i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    if len(tagged) != 1:
        raise ValueError(
            f"{src}: expected exactly one cell tagged 'parameters', got {len(tagged)} (cells {tagged})"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, nbformat.writes(nb))
    return dst


def parse_param_value(text: str) -> Any:
    """A command-line parameter value as a Python literal when it is one, else the string itself.

    >>> [parse_param_value(v) for v in ("20", "0.5", "None", "[1, 2]", "smoke")]
    [20, 0.5, None, [1, 2], 'smoke']
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def execute_notebook(
    notebook: str | os.PathLike[str],
    output: str | os.PathLike[str],
    parameters: Mapping[str, Any],
    *,
    cwd: str | os.PathLike[str],
    cell_timeout_s: int | None = None,
) -> Path:
    """Run ``notebook`` with papermill, injecting ``parameters``; write the result to ``output``.

    The output appears only when every cell succeeded. When a cell raises, the partly executed
    notebook is kept next to it as ``<stem>.failed.ipynb`` (the traceback is in it), any older
    ``output`` is removed so a stale page cannot be published, and :class:`BookBuildError` is raised.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    src, dst = Path(notebook), Path(output)
    dst.parent.mkdir(parents=True, exist_ok=True)
    running = dst.with_name(f".{dst.stem}.running.ipynb")
    failed = dst.with_name(f"{dst.stem}.failed.ipynb")
    failed.unlink(missing_ok=True)
    try:
        papermill.execute_notebook(
            str(src),
            str(running),
            parameters=dict(parameters),
            cwd=str(cwd),
            progress_bar=False,
            log_output=False,
            execution_timeout=cell_timeout_s,
        )
    except Exception as exc:  # papermill raises its own error types and kernel/timeout errors
        dst.unlink(missing_ok=True)
        if running.exists():
            os.replace(running, failed)
        if isinstance(exc, PapermillExecutionError):
            what = f"cell [{exc.exec_count}] raised {exc.ename}: {exc.evalue}"
        else:
            what = f"{type(exc).__name__}: {exc}"
        where = f"; the executed notebook with the traceback is {failed}" if failed.exists() else ""
        raise BookBuildError(f"{src.name}: execution failed, {what}{where}") from exc
    os.replace(running, dst)
    return dst


def stage_site(
    root: str | os.PathLike[str], site_dir: str | os.PathLike[str], executed: Sequence[Path]
) -> Path:
    """Assemble the Sphinx source folder: config, TOC, ``book/``, executed notebooks and plotly.js.

    ``site_dir`` is recreated. Files are copied with their modification times so that Sphinx
    rebuilds only the pages whose source changed. Every ``notebooks/...`` entry of ``_toc.yml`` must
    be one of ``executed`` and every executed notebook must be in the TOC.
    """
    import plotly

    root_p, site = Path(root), Path(site_dir)
    for name in ("_config.yml", "_toc.yml"):
        if not (root_p / name).is_file():
            raise FileNotFoundError(f"{root_p / name}: book configuration does not exist")
    in_toc = {f for f in toc_files(root_p / "_toc.yml") if f.startswith(f"{_SITE_NOTEBOOKS}/")}
    have = {f"{_SITE_NOTEBOOKS}/{p.stem}" for p in executed}
    if in_toc != have:
        raise ValueError(
            f"{root_p / '_toc.yml'}: notebook entries must match the notebooks; "
            f"missing from the TOC: {sorted(have - in_toc)}, "
            f"in the TOC without a notebook: {sorted(in_toc - have)}"
        )
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root_p / name, site / name)
    if (root_p / "book").is_dir():
        shutil.copytree(root_p / "book", site / "book", ignore=shutil.ignore_patterns(PLOTLY_JS))
    static = site / "book" / "_static"
    static.mkdir(parents=True, exist_ok=True)
    plotly_js = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not plotly_js.is_file():
        raise FileNotFoundError(f"{plotly_js}: {PLOTLY_JS} is missing from the installed plotly package")
    shutil.copy2(plotly_js, static / PLOTLY_JS)
    (site / _SITE_NOTEBOOKS).mkdir()
    for path in executed:
        shutil.copy2(path, site / _SITE_NOTEBOOKS / path.name)
    return site


def build_html(site_dir: str | os.PathLike[str], build_dir: str | os.PathLike[str]) -> Path:
    """Run ``jupyter-book build`` on ``site_dir`` with warnings as errors; return the HTML folder.

    The full Sphinx output goes to ``build_dir/jupyter-book.log``.

    Raises
    ------
    BookBuildError
        If Jupyter Book exits non-zero (any warning counts); the message ends with the log's tail.
    """
    site, out = Path(site_dir), Path(build_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(site),
        "--path-output",
        str(out),
        "--builder",
        "html",
        "--warningiserror",
        "--nitpick",
        "--keep-going",
    ]
    logger.info("running %s", " ".join(cmd[3:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = out / "jupyter-book.log"
    atomic_write_text(
        log, f"$ jupyter-book {' '.join(cmd[3:])}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-30:])
        raise BookBuildError(
            f"jupyter-book: build failed with exit code {proc.returncode} (log: {log})\n{tail}"
        )
    html = out / "_build" / "html"
    if not (html / "index.html").is_file():
        raise BookBuildError(f"jupyter-book: finished but {html / 'index.html'} is missing (log: {log})")
    return html


def _declared_parameters(notebook: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def build_book(config: BookConfig | None = None) -> BookResult:
    """Convert, execute (stopping at the first failure) and publish the notebooks as a book.

    Steps: every ``notebooks/NN_*.py`` is converted with jupytext into ``build_dir/notebooks``;
    the selected ones (all by default) and any without an executed output are run with papermill
    into ``build_dir/executed`` with ``profile``, ``out_dir`` (when declared) and the overrides;
    then :func:`stage_site` and :func:`build_html`.

    Raises
    ------
    BookBuildError
        If a notebook fails (nothing after it runs and no HTML is built) or Jupyter Book fails.
    ValueError
        If an override names a parameter that no notebook to execute declares, or the TOC and the
        notebooks disagree.
    """
    cfg = config or BookConfig()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    root = cfg.root.resolve()
    build_dir = cfg.build_dir.resolve()
    sources = discover_notebooks(root / "notebooks")
    if not sources:
        raise FileNotFoundError(f"{root / 'notebooks'}: no notebook sources NN_topic.py")
    selected = _select(sources, cfg.only)
    executed_dir = build_dir / "executed"
    to_run = [p for p in sources if p in selected or not (executed_dir / f"{p.stem}.ipynb").is_file()]
    if to_run:
        # Summary notebooks read the others' saved results, so they go stale whenever any notebook runs.
        to_run += [p for p in sources if p.stem.startswith(SUMMARY_PREFIX) and p not in to_run]

    converted = {p: convert_notebook(p, build_dir / "notebooks" / f"{p.stem}.ipynb") for p in to_run}
    declared = {p: _declared_parameters(nb) for p, nb in converted.items()}
    for p, names in declared.items():
        if "profile" not in names:
            raise ValueError(f"{p}: the parameters cell must declare 'profile' (got {sorted(names)})")
    unused = set(cfg.params) - set().union(*declared.values())
    if unused:
        raise ValueError(
            f"BookConfig.params: {sorted(unused)} not declared by any notebook to execute "
            f"({[p.stem for p in to_run]})"
        )

    ran: list[Path] = []
    for p in to_run:
        params: dict[str, Any] = {"profile": cfg.profile}
        if "out_dir" in declared[p]:
            out_dir = build_dir / "results" / p.stem
            out_dir.mkdir(parents=True, exist_ok=True)
            params["out_dir"] = str(out_dir)
        params.update({k: v for k, v in cfg.params.items() if k in declared[p]})
        logger.info("executing %s with %s", p.name, params)
        t0 = time.perf_counter()
        ran.append(
            execute_notebook(
                converted[p],
                executed_dir / f"{p.stem}.ipynb",
                params,
                cwd=build_dir,
                cell_timeout_s=cfg.cell_timeout_s,
            )
        )
        timings[p.stem] = time.perf_counter() - t0

    html_dir = None
    if cfg.html:
        t0 = time.perf_counter()
        site = stage_site(root, cfg.site_dir.resolve(), [executed_dir / f"{p.stem}.ipynb" for p in sources])
        html_dir = build_html(site, build_dir)
        timings["html"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return BookResult(executed=tuple(ran), html_dir=html_dir, timings=timings)


def _add_plotly_js(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    # Called from html-page-context, add_js_file applies to this page only; pages without a
    # figure (search, index, text chapters) then skip parsing several MB of JavaScript.
    if _FIGURE_MARKER in str(context.get("body", "")):
        app.add_js_file(PLOTLY_JS)


def setup(app: Any) -> dict[str, Any]:
    """Sphinx extension entry point: load ``plotly.min.js`` on every page that holds a plotly figure."""
    app.connect("html-page-context", _add_plotly_js)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saematch_core._book",
        description="Execute the notebooks with papermill and build the offline Jupyter Book.",
    )
    parser.add_argument(
        "--profile", default="smoke", choices=PROFILE_NAMES, help="profile for every notebook"
    )
    parser.add_argument(
        "--root", default=".", help="repository root (holds _config.yml, _toc.yml, notebooks/)"
    )
    parser.add_argument("--build-dir", default="build", help="output folder (default: build)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NN",
        help="re-execute only this notebook (number or stem), repeatable; "
        "the others are reused when already executed",
    )
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        nargs=2,
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a notebook parameter (VALUE parsed as a Python literal when possible); repeatable",
    )
    parser.add_argument("--cell-timeout", type=int, default=3600, help="per-cell limit in seconds")
    parser.add_argument("--no-html", action="store_true", help="stop after executing the notebooks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on a build failure, 2 on bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = BookConfig(
            root=Path(args.root),
            build_dir=Path(args.build_dir),
            profile=args.profile,
            only=tuple(args.only),
            params={name: parse_param_value(value) for name, value in args.param},
            cell_timeout_s=args.cell_timeout,
            html=not args.no_html,
        )
        result = build_book(cfg)
    except BookBuildError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except (ValueError, TypeError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    sys.stdout.write(f"book: {result.html_dir or 'notebooks executed (no HTML)'} ({steps})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
