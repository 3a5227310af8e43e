"""Build the book: jupytext → papermill → Jupyter Book 1.x, offline, stopping at the first failure.

Layout under the build folder (``build/`` by default; nothing is written into the sources)::

    notebooks/NN_x.ipynb   jupytext conversion of notebooks/NN_x.py (py:percent)
    executed/NN_x.ipynb    papermill output (NN_x.failed.ipynb when a cell raised)
    results/NN_x/          the ``out_dir`` parameter handed to each notebook that declares one
    overrides/             executed/ and results/ of the notebooks run with ``-p`` overrides: such a
                           page is published in place of the default one by the run that made it,
                           and never replaces the default copy in executed/
    bench/                 the quick benchmark run the appendix shows when ``make bench`` has not run
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from saematch_core._book_params import check_overrides, notebook_parameters, parameters_cell
from saematch_core.cache import atomic_write_text
from saematch_core.profiles import PROFILE_NAMES, Profile, get_profile

__all__ = [
    "PLOTLY_JS",
    "REQUIREMENTS",
    "BookBuildError",
    "BookConfig",
    "BookResult",
    "Requirement",
    "build_book",
    "build_html",
    "convert_notebook",
    "discover_notebooks",
    "execute_notebook",
    "main",
    "notebook_requires",
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
    Notebooks outside this selection are executed too, without overrides, when they have no
    executed output yet."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Parameter overrides (name → value) for the selected notebooks that declare the name, checked
    against their parameters cells before anything runs (see :mod:`saematch_core._book_params`):
    a name no selected notebook declares, a wrong type or an out-of-range value is an error. A
    notebook run with overrides goes to ``build_dir/overrides`` and never becomes its default copy."""
    cell_timeout_s: int | None = 3600
    """Per-cell execution limit in seconds for papermill (None: no limit), also the limit of the quick
    benchmark run the appendix falls back on. The only timeout."""
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
    """Executed notebooks of this run, in build order (those reused from an earlier run are not listed;
    those run with overrides are under ``build_dir/overrides``)."""
    html_dir: Path | None
    """Folder holding ``index.html``; None when ``BookConfig.html`` is False."""
    timings: Mapping[str, float]
    """Wall-clock seconds per step: one entry per executed notebook stem, plus ``html`` and ``total``
    (and ``benchmark`` when the build ran the quick benchmark)."""
    not_built: Mapping[str, str] = {}
    """Stem → why: notebooks this profile cannot run (:func:`notebook_requires`), published as a page
    that says so instead of being executed."""


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
    parameters_cell(src)  # exactly one, or the error naming the file
    nb = jupytext.read(src, fmt="py:percent")
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, nbformat.writes(nb))
    return dst


class Requirement(NamedTuple):
    """Something a notebook may need of the build profile."""

    meaning: str
    """What it is, as the page of a notebook that was not built says."""
    met: Callable[[Profile], bool]
    """Whether a profile provides it."""


REQUIREMENTS: Mapping[str, Requirement] = {
    "training_rows": Requirement(
        "the stored training activations of every layer, to train more SAEs on",
        lambda profile: profile.keeps_training_rows,
    ),
}
"""What a notebook may require of the build profile, by the name its header uses (see
:func:`notebook_requires`)."""


def notebook_requires(source: str | os.PathLike[str]) -> tuple[str, ...]:
    """What the notebook needs of the profile, declared in its jupytext header::

        # jupyter:
        #   saematch: {requires: [training_rows]}

    Raises
    ------
    ValueError
        If the declaration is not a list of names from :data:`REQUIREMENTS` (the file is named).
    """
    import jupytext

    meta = jupytext.read(Path(source), fmt="py:percent").metadata.get("saematch", {})
    requires = meta.get("requires", []) if isinstance(meta, Mapping) else None
    if not isinstance(requires, list) or not all(isinstance(r, str) and r in REQUIREMENTS for r in requires):
        raise ValueError(
            f"{source}: header saematch.requires: expected a list of {sorted(REQUIREMENTS)}, got {requires!r}"
        )
    return tuple(requires)


def _write_not_built(notebook: Path, output: Path, profile: str, missing: Sequence[str]) -> Path:
    """The page of a notebook the profile cannot run: its title and overview, then why not."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), None)
    nb.cells = [] if first is None else [nb.cells[first]]
    needs = "; ".join(f"`{r}`: {REQUIREMENTS[r].meaning}" for r in missing)
    nb.cells.append(
        nbformat.v4.new_markdown_cell(
            f"**Not built on the `{profile}` profile.** This section needs {needs}, which this profile "
            "does not keep (its SAEs are pretrained, or trained from a stream without a training cache). "
            "Build it on a profile that keeps them, e.g. `make book PROFILE=default`."
        )
    )
    nb.metadata["saematch"] = {**dict(nb.metadata.get("saematch", {})), "not_built": list(missing)}
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, nbformat.writes(nb))
    return output


def parse_param_value(text: str) -> Any:
    """A command-line parameter value as a Python literal when it is one, else the string itself.

    >>> [parse_param_value(v) for v in ("20", "0.5", "None", "[1, 2]", "smoke")]
    [20, 0.5, None, [1, 2], 'smoke']
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class _ParameterParserFilter(logging.Filter):
    """Drop papermill's warnings about the parameters cell ("Passed unknown parameter", "Unable to
    parse line"): its parser skips annotated names such as ``layer: int | None = None`` and lines
    whose range rule holds a second ``=``, and :mod:`saematch_core._book_params` reads the cell and
    checks every override instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Passed unknown parameter", "Unable to parse line"))


def _quiet_papermill_parameter_check() -> None:
    for name in ("papermill", "papermill.translators"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _ParameterParserFilter) for f in log.filters):
            log.addFilter(_ParameterParserFilter())


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
    _quiet_papermill_parameter_check()
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
    rebuilds only the pages whose source changed; a notebook whose content differs from the one
    staged before (a default page back in place of an override page, possibly older) is stamped
    with the current time, since Sphinx rereads only sources newer than its last read. Every
    ``notebooks/...`` entry of ``_toc.yml`` must be one of ``executed`` and every executed notebook
    must be in the TOC.
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
    before: dict[str, bytes] = {}
    if (site / _SITE_NOTEBOOKS).is_dir():
        before = {p.name: p.read_bytes() for p in (site / _SITE_NOTEBOOKS).glob("*.ipynb")}
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
        staged = site / _SITE_NOTEBOOKS / path.name
        shutil.copy2(path, staged)
        if path.name in before and before[path.name] != staged.read_bytes():
            os.utime(staged)
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


def _benchmark_results(root: Path, build_dir: Path, timeout_s: int | None) -> tuple[Path, bool]:
    """Measured solver benchmarks for the appendix, and whether this call ran them: ``make bench``'s
    results when they exist, else a quick side-by-side run (``python -m benchmarks.run --quick``)
    into ``build_dir/bench``, made once and reused by later builds (its ``meta`` records the machine
    and date it ran on)."""
    full = root / "benchmarks" / "results" / "results.json"
    if full.is_file():
        return full, False
    quick = build_dir / "bench"
    if (quick / "results.json").is_file():
        return quick / "results.json", False
    # Written beside and renamed when complete, so a failed or killed run is never reused.
    partial = build_dir / "bench.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(partial)]
    logger.info("no benchmark results at %s: running %s", full, " ".join(cmd[1:]))
    log = build_dir / "bench.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, check=False, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise BookBuildError(f"benchmarks.run --quick: no result after {timeout_s} s") from exc
    build_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log, f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0 or not (partial / "results.json").is_file():
        raise BookBuildError(f"benchmarks.run --quick: failed with exit code {proc.returncode} (log: {log})")
    shutil.rmtree(quick, ignore_errors=True)
    os.replace(partial, quick)
    return quick / "results.json", True


def _mark_overridden(path: Path, overrides: Mapping[str, Any]) -> None:
    """Record the overrides in the executed notebook and say so at the top of its page."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata["saematch"] = {"overrides": dict(overrides)}
    values = ", ".join(f"`{k} = {v!r}`" for k, v in overrides.items())
    note = nbformat.v4.new_markdown_cell(
        f"**Run with parameter overrides:** {values}. This page is not the book's default run of this "
        "section, which uses the parameters cell as written."
    )
    title = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), -1)
    nb.cells.insert(title + 1, note)
    atomic_write_text(path, nbformat.writes(nb))


def build_book(config: BookConfig | None = None) -> BookResult:
    """Convert, execute (stopping at the first failure) and publish the notebooks as a book.

    Steps: the overrides are checked against the parameters cells of the selected notebooks (all
    by default; see :mod:`saematch_core._book_params`), before anything runs. Every notebook to run
    is converted with jupytext into ``build_dir/notebooks`` and run with papermill, with
    ``profile``, ``out_dir`` and ``bench_results`` (when declared) and the overrides it declares:

    * a selected notebook that gets overrides runs into ``build_dir/overrides/executed`` (its
      ``out_dir`` under ``build_dir/overrides/results``), marked as such in its metadata and at the
      top of its page; the default copy in ``build_dir/executed`` is left as it is;
    * the other selected notebooks, and every notebook without a default copy yet, run *without*
      overrides into ``build_dir/executed``; summary notebooks (``99_*``) then rerun too.

    A notebook that declares ``bench_results`` gets ``benchmarks/results/results.json`` when
    ``make bench`` has written it, else the results of a quick benchmark run made by the build.
    Then :func:`stage_site` (this run's override pages in place of the default ones) and
    :func:`build_html`.

    Raises
    ------
    BookBuildError
        If a notebook fails (nothing after it runs and no HTML is built) or Jupyter Book fails.
    ValueError
        If an override is not a parameter of any selected notebook, or has the wrong type or is out
        of range for one that declares it; if the TOC and the notebooks disagree.
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
    schemas = {p: notebook_parameters(p) for p in sources}
    for p, schema in schemas.items():
        if "profile" not in schema:
            raise ValueError(f"{p}: the parameters cell must declare 'profile' (got {sorted(schema)})")
    applied = check_overrides(
        cfg.params,
        {p.stem: schemas[p] for p in selected},
        get_profile(cfg.profile).layers,
        fixed=_PIPELINE_PARAMS,
    )
    overridden = {p: applied[p.stem] for p in selected if applied[p.stem]}
    defaults = [
        p
        for p in sources
        if p not in overridden and (p in selected or not (executed_dir / f"{p.stem}.ipynb").is_file())
    ]
    if defaults:
        # Summary notebooks read the others' saved results, so they go stale whenever one of them runs.
        defaults += [p for p in sources if p.stem.startswith(SUMMARY_PREFIX) and p not in defaults]
    to_run = [p for p in sources if p in defaults or p in overridden]

    profile = get_profile(cfg.profile)
    missing = {p: [r for r in notebook_requires(p) if not REQUIREMENTS[r].met(profile)] for p in sources}
    converted = {p: convert_notebook(p, build_dir / "notebooks" / f"{p.stem}.ipynb") for p in to_run}
    bench: Path | None = None
    ran: list[Path] = []
    not_built: dict[str, str] = {}
    for p in to_run:
        base = build_dir / "overrides" if p in overridden else build_dir
        if missing[p]:
            logger.info("not building %s on profile %s: it needs %s", p.name, cfg.profile, missing[p])
            ran.append(
                _write_not_built(converted[p], base / "executed" / f"{p.stem}.ipynb", cfg.profile, missing[p])
            )
            not_built[p.stem] = ", ".join(missing[p])
            continue
        params: dict[str, Any] = {"profile": cfg.profile}
        if "out_dir" in schemas[p]:
            out_dir = base / "results" / p.stem
            out_dir.mkdir(parents=True, exist_ok=True)
            params["out_dir"] = str(out_dir)
        if "bench_results" in schemas[p] and "bench_results" not in overridden.get(p, {}):
            if bench is None:
                t0 = time.perf_counter()
                bench, measured = _benchmark_results(root, build_dir, cfg.cell_timeout_s)
                if measured:
                    timings["benchmark"] = time.perf_counter() - t0
            params["bench_results"] = str(bench)
        params.update(overridden.get(p, {}))
        logger.info("executing %s with %s", p.name, params)
        t0 = time.perf_counter()
        output = execute_notebook(
            converted[p],
            base / "executed" / f"{p.stem}.ipynb",
            params,
            cwd=build_dir,
            cell_timeout_s=cfg.cell_timeout_s,
        )
        if p in overridden:
            _mark_overridden(output, overridden[p])
        ran.append(output)
        timings[p.stem] = time.perf_counter() - t0

    html_dir = None
    if cfg.html:
        t0 = time.perf_counter()
        pages = [
            (build_dir / "overrides" / "executed" if p in overridden else executed_dir) / f"{p.stem}.ipynb"
            for p in sources
        ]
        site = stage_site(root, cfg.site_dir.resolve(), pages)
        html_dir = build_html(site, build_dir)
        timings["html"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return BookResult(executed=tuple(ran), html_dir=html_dir, timings=timings, not_built=not_built)


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
        help="re-execute only this notebook (number or stem), repeatable; the others are reused "
        "when already executed, else executed without the -p overrides",
    )
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        nargs=2,
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a parameter of the --only notebooks (VALUE parsed as a Python literal when "
        "possible), checked against their parameters cells; the page is published marked as such and "
        "never replaces the section's default copy; repeatable",
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
    for stem, needs in result.not_built.items():
        sys.stdout.write(f"not built on profile {args.profile}: {stem} (needs {needs})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
