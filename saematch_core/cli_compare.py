"""The ``compare``, ``align``, ``chain`` and ``suite`` subcommands of ``saematch``.

Registered by :mod:`saematch_core.cli`, which owns the parser, the output checks and the error
contract (one line ``saematch: error: ...``, exit status 2, nothing partial written).

``--corpus`` (text to run through a model) is not offered: turning text into the residuals an SAE
reads needs the model and the hook site it was trained on, which SAE files do not reliably name.
``--activations`` takes those residuals directly, e.g. the ``layer_NN.npy`` files that
``saematch prepare`` caches.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from saematch_core import cli as _cli
from saematch_core.compare import CompareConfig, compare, load_activations, sae_info
from saematch_core.matchers import MATCHERS, SinkhornConfig

__all__ = [
    "COMPARE_FLAGS",
    "compare_config_from_args",
    "configure_align",
    "configure_chain",
    "configure_compare",
    "configure_suite",
    "run_align",
    "run_chain",
    "run_compare",
    "run_suite_command",
]

COMPARE_FLAGS: dict[str, str] = {
    "matcher": "--matcher",
    "others": "--others",
    "alpha": "--alpha",
    "n_null": "--n-null",
    "level": "--level",
    "seed": "--seed",
    "n_random": "--n-random",
    "chunk_size": "--chunk-size",
    "data_chunk_size": "--data-chunk-size",
    "device": "--device",
    "sinkhorn": "--epsilon",
}
"""The flag of every :class:`CompareConfig` field (``sinkhorn``: its ε)."""


def _names(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in MATCHERS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {sorted(MATCHERS)}, got {text!r}"
        )
    return items


def _add_compare_flags(p: argparse.ArgumentParser, *, others: bool = True, data: bool = True) -> None:
    d = CompareConfig()
    g = p.add_argument_group("comparison options (fields of CompareConfig)")
    g.add_argument(
        "--matcher",
        choices=sorted(MATCHERS),
        default=d.matcher,
        help="the primary matching, judged pair by pair: saematch (folded MSE, exact), cosine (exact on "
        "decoder cosine), greedy (top-1 decoder cosine), sinkhorn (entropic OT) (default: %(default)s)",
    )
    if others:
        g.add_argument(
            "--others",
            type=_names,
            default=d.others,
            metavar="M1,M2",
            help="matchers run beside it for the agreement table; '' for none (default: cosine,greedy)",
        )
    g.add_argument(
        "--alpha", type=float, default=d.alpha, help="FDR level of the verdicts (default: %(default)s)"
    )
    g.add_argument(
        "--n-null",
        type=int,
        default=d.n_null,
        metavar="N",
        help="random rotations in the null (default: %(default)s)",
    )
    g.add_argument(
        "--level",
        type=float,
        default=d.level,
        help="links (families) lie below this quantile of the null (default: %(default)s)",
    )
    g.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the null and random partners (default: %(default)s)"
    )
    g.add_argument("--chunk-size", type=int, default=d.chunk_size, metavar="N", help="rows per cost block")
    g.add_argument("--device", default=None, help="where the cost algebra runs (cpu, cuda, auto)")
    g.add_argument(
        "--epsilon",
        type=float,
        default=d.sinkhorn.epsilon,
        help="Sinkhorn's ε, in units of the median pair cost (default: %(default)s)",
    )
    if data:
        g.add_argument(
            "--n-random", type=int, default=d.n_random, metavar="N", help="random matchings in the data null"
        )
        g.add_argument(
            "--data-chunk-size",
            type=int,
            default=d.data_chunk_size,
            metavar="N",
            help="tokens encoded at once",
        )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="result store for the matchings (default: $SAEMATCH_CACHE/results or ~/.cache/saematch/results)",
    )


def compare_config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The :class:`CompareConfig` the flags describe (absent flags keep the defaults)."""
    d = CompareConfig()
    values = {f.name: getattr(args, f.name, getattr(d, f.name)) for f in dataclasses.fields(CompareConfig)}
    values["sinkhorn"] = dataclasses.replace(SinkhornConfig(), epsilon=args.epsilon)
    return CompareConfig(**values)


# ------------------------------------------------------------------------------------ compare
def configure_compare(p: argparse.ArgumentParser) -> None:
    """Arguments of ``saematch compare``."""
    _cli._add_sae_arg(p, "a", "SAE A")
    _cli._add_sae_arg(p, "b", "SAE B (same d_in as A; any format and width)")
    _cli._add_load_args(p)
    _cli._add_out_args(p, ".json: the report, matched pairs under 'pairs'")
    p.add_argument(
        "--html", type=Path, default=None, help="also write a self-contained offline HTML report here"
    )
    p.add_argument(
        "--activations",
        nargs="+",
        type=Path,
        default=None,
        metavar="FILE.npy",
        help="residuals (n_tokens, d_in) read by the SAEs, for the data check: one .npy for both, or "
        "one for A then one for B on the same tokens",
    )
    _add_compare_flags(p)


def run_compare(args: argparse.Namespace) -> int:
    """``saematch compare``: write the JSON (and HTML) report and print its summary."""
    _cli._check_out(args.out, args.force, (".json",))
    if args.html is not None:
        _cli._check_out(args.html, args.force, (".html",))
        _require_plotly()
    if args.activations is not None and len(args.activations) > 2:
        raise ValueError(f"--activations: expected one or two .npy files, got {len(args.activations)}")
    cfg = compare_config_from_args(args)
    a, fa = _cli._load(args.a, args.format)
    b, fb = _cli._load(args.b, args.format)
    acts = None
    if args.activations is not None:
        arrays = [load_activations(path, a.d_in) for path in args.activations]
        if len(arrays) == 2 and arrays[0].shape[0] != arrays[1].shape[0]:
            raise ValueError(
                f"--activations: expected the same tokens for A and B, got {arrays[0].shape[0]} and "
                f"{arrays[1].shape[0]} rows"
            )
        acts = (arrays[0], arrays[-1])
    try:
        report = compare(
            a,
            b,
            cfg,
            activations=acts,
            sources=(sae_info(a, args.a, fa), sae_info(b, args.b, fb)),
            cache_dir=args.cache_dir,
        )
    except ImportError as exc:  # e.g. POT for the sinkhorn matcher
        raise ValueError(str(exc)) from exc
    html_path: Path | None = args.html
    page = None
    if html_path is not None:
        from saematch_core.report_html import report_html

        page = report_html(report)
    report.to_json(args.out)
    if html_path is not None and page is not None:
        from saematch_core.cache import atomic_write_text

        atomic_write_text(html_path, page)
    for line in report.summary_lines():
        print(line)
    print(f"report: {args.out}" + (f"  html: {args.html}" if args.html is not None else ""))
    return 0


def _require_plotly() -> None:
    try:
        import plotly  # noqa: F401
    except ImportError as exc:
        raise ValueError("--html: the HTML report needs plotly: pip install 'saematch[compare]'") from exc


# ------------------------------------------------------------------------------------ align
def configure_align(p: argparse.ArgumentParser) -> None:
    """Arguments of ``saematch align``."""
    _cli._add_sae_arg(p, "a", "SAE A, whose feature order B takes")
    _cli._add_sae_arg(p, "b", "SAE B, written reordered")
    _cli._add_load_args(p)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="the aligned B, in B's format: a file with B's suffix when B is one file, else a folder",
    )
    p.add_argument(
        "--ids",
        type=Path,
        default=None,
        help="stem of the ID map: writes STEM.csv and STEM.json (default: --out without suffix + '.ids')",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_compare_flags(p, others=False, data=False)


def run_align(args: argparse.Namespace) -> int:
    """``saematch align``: write the reordered B and its ID map."""
    from saematch_core.align import align

    cfg = compare_config_from_args(args)
    result = align(
        args.a,
        args.b,
        args.out,
        config=dataclasses.replace(cfg, others=()),
        ids=args.ids,
        format_a=args.format,
        format_b=args.format,
        force=args.force,
        cache_dir=args.cache_dir,
    )
    for line in result.report.summary_lines()[:2]:
        print(line)
    print(f"aligned B: {result.sae_path}")
    print(f"ID map: {result.ids_csv}  {result.ids_json}")
    return 0


# ------------------------------------------------------------------------------------ chain
def configure_chain(p: argparse.ArgumentParser) -> None:
    """Arguments of ``saematch chain``."""
    p.add_argument(
        "saes", nargs="+", help="two or more SAEs in order (files, folders or hub:repo_id/path@revision)"
    )
    _cli._add_load_args(p)
    _cli._add_out_args(p, ".json: the chain ID of every feature of every SAE")
    _add_compare_flags(p, others=False, data=False)


def run_chain(args: argparse.Namespace) -> int:
    """``saematch chain``: write the chain IDs."""
    from saematch_core.align import chain

    _cli._check_out(args.out, args.force, (".json",))
    if len(args.saes) < 2:
        raise ValueError(f"saes: expected at least 2 SAEs, got {len(args.saes)}")
    cfg = dataclasses.replace(compare_config_from_args(args), others=())
    loaded = [_cli._load(spec, args.format) for spec in args.saes]
    result = chain(
        [s for s, _ in loaded],
        config=cfg,
        sources=[sae_info(s, spec, fmt) for spec, (s, fmt) in zip(args.saes, loaded, strict=True)],
        cache_dir=args.cache_dir,
    )
    result.to_json(args.out)
    broken = sum(s.n_broken for s in result.steps)
    print(
        f"{result.n_chains} chains over {len(args.saes)} SAEs; {broken} pairs not called matched end a chain"
    )
    print(f"chains: {args.out}")
    return 0


# ------------------------------------------------------------------------------------ suite
def configure_suite(p: argparse.ArgumentParser) -> None:
    """Arguments of ``saematch suite``."""
    p.add_argument(
        "jobs",
        type=Path,
        help='job list: {"jobs": [{"a": SAE, "b": SAE, "matcher": "saematch", "config": {...}}, ...]}',
    )
    p.add_argument(
        "--scheduler",
        default="threads",
        help="'threads' (this machine), 'local' (a Dask cluster of --n-workers processes here) or the "
        "address of a Dask scheduler, e.g. tcp://host:8786 (default: %(default)s)",
    )
    p.add_argument("--workers", type=int, default=None, metavar="N", help="threads for --scheduler threads")
    p.add_argument("--n-workers", type=int, default=2, metavar="N", help="processes for --scheduler local")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the result store (a shared folder for a remote cluster; default: $SAEMATCH_CACHE/results)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the outcomes (.json)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run_suite_command(args: argparse.Namespace) -> int:
    """``saematch suite``: solve every job not in the store yet."""
    from saematch_core.suite import load_jobs, run_suite

    if args.out is not None:
        _cli._check_out(args.out, args.force, (".json",))
    jobs = load_jobs(args.jobs)
    try:
        result = run_suite(
            jobs, args.cache_dir, scheduler=args.scheduler, workers=args.workers, n_workers=args.n_workers
        )
    except ImportError as exc:  # an optional extra is missing: say which, in one line
        raise ValueError(str(exc)) from exc
    if args.out is not None:
        result.to_json(args.out)
    print(
        f"{len(jobs)} jobs on {args.scheduler}: {result.n_solved} solved, {result.n_cached} already in the "
        f"store, {result.wall_seconds:.1f} s"
    )
    seconds = np.array([o.seconds for o in result.outcomes if o.status == "solved"])
    if seconds.size:
        print(f"per solved job: median {np.median(seconds):.2f} s, max {seconds.max():.2f} s")
    return 0
