"""The ``saematch`` command: ``info``, ``fold`` and ``match`` on SAE files, folders or ``hub:`` paths.

Every SAE argument accepts a local file or folder in any known format (see
:func:`saematch_core.formats.detect_format`) or ``hub:repo_id/path/inside/repo@revision``, resolved
by :func:`saematch_core.formats.resolve` exactly as :func:`~saematch_core.formats.load_sae` does.
Bad input, an unwritable or full output location, an unreachable hub and a missing optional
dependency each print one line ``saematch: error: ...`` to stderr and exit with status 2. Outputs
are written atomically (nothing partial is ever left at ``--out``), the output location is checked
before any SAE is loaded, and an existing output is only replaced with ``--force``.

The flags of ``saematch match`` are generated from the fields of
:class:`~saematch_core.match.MatchConfig` (names, types, choices and help text), so the two cannot
drift apart. New subcommands are added with :func:`register_command`.

Examples
--------
::

    saematch info hub:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71
    saematch fold sae_dir --out folded.safetensors
    saematch match a.safetensors b.safetensors --objective W_dec --metric cosine --out perm.json
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import json
import logging
import re
import sys
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, NoReturn, Union, get_args, get_origin, get_type_hints

import torch

from saematch_core.cache import check_writable
from saematch_core.errors import InfeasibleMatchError, SAEFormatError, SAEValidationError
from saematch_core.fold import fold
from saematch_core.formats import load_sae, resolve, save_sae
from saematch_core.formats.registry import FORMATS
from saematch_core.match import MatchConfig, MatchResult, match
from saematch_core.sae import SAE

__all__ = [
    "MATCH_FLAG_ALIASES",
    "add_match_config_flags",
    "build_parser",
    "main",
    "match_config_from_args",
    "missing_dependency_hint",
    "register_command",
    "sae_summary",
]

logger = logging.getLogger(__name__)

PROG = "saematch"
EXIT_USAGE = 2
"""Exit status for bad input (argparse's convention)."""

MATCH_FLAG_ALIASES: dict[str, tuple[str, ...]] = {"params": ("--objective",)}
"""Extra flag spellings per MatchConfig field (``--objective``: ``--params`` named by what it sets)."""

# Errors that mean "bad input", reported in one line with exit status 2 (bugs still show a traceback).
_USER_ERRORS = (
    SAEFormatError,
    SAEValidationError,
    InfeasibleMatchError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
)


class _UsageError(Exception):
    """Raised by the parser instead of exiting, so :func:`main` prints one line and returns 2."""


class _OutputError(Exception):
    """``--out`` cannot be written (folder not writable, disk full, ...); printed as is."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------ commands
class _Command(NamedTuple):
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_COMMANDS: dict[str, _Command] = {}


def register_command(
    name: str,
    *,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add a subcommand: ``configure(parser)`` adds its arguments, ``run(args)`` returns the exit status.

    Raise one of the usual errors (``ValueError``, ``FileNotFoundError``, ``SAEFormatError``, ...)
    for bad input; :func:`main` prints it in one line and exits with status 2.
    """
    if name in _COMMANDS:
        raise ValueError(f"name: command {name!r} is already registered")
    _COMMANDS[name] = _Command(help, configure, run)


def build_parser() -> argparse.ArgumentParser:
    """The full ``saematch`` argument parser (every registered subcommand)."""
    from saematch_core import __version__

    parser = _Parser(prog=PROG, description="Match sparse-autoencoder features across layers (SAE Match).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in _COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(sp)
        sp.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``saematch`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s"
        )
        return int(args._run(args))
    except (_UsageError, _OutputError) as exc:
        return _fail(str(exc))
    except _USER_ERRORS as exc:
        logger.debug("traceback (shown with -vv)", exc_info=True)
        return _fail(str(exc) or type(exc).__name__)
    except OSError as exc:  # network / hub errors, disk full, ...
        logger.debug("traceback (shown with -vv)", exc_info=True)
        return _fail(f"{type(exc).__name__}: {exc}")
    except ModuleNotFoundError as exc:
        hint = missing_dependency_hint(exc.name or "")
        if hint is None:
            raise  # not an optional dependency: a bug, show the traceback
        logger.debug("traceback (shown with -vv)", exc_info=True)
        return _fail(hint)
    except KeyboardInterrupt:
        return 130


def missing_dependency_hint(module: str) -> str | None:
    """``"... pip install 'saematch[substrate]'"`` for a module of an optional extra, else ``None``.

    The extras and their packages are read from the installed package's metadata (the
    ``optional-dependencies`` of ``pyproject.toml``), so the hint cannot drift from them.

    >>> missing_dependency_hint("not_a_dependency_of_saematch") is None
    True
    """
    from importlib.metadata import PackageNotFoundError, requires

    root = module.split(".")[0]
    if not root:
        return None
    try:
        requirements = requires("saematch") or []
    except PackageNotFoundError:
        return None
    for requirement in requirements:
        name_part, _, marker = requirement.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        name = re.split(r"[\s<>=!~\[(]", name_part.strip(), maxsplit=1)[0]
        if extra and name.lower().replace("-", "_") == root.lower():
            return (
                f"the optional dependency {root!r} is not installed; install the "
                f"{extra.group(1)!r} extra: pip install 'saematch[{extra.group(1)}]'"
            )
    return None


def _fail(message: str) -> int:
    one_line = " ".join(message.split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)
    return EXIT_USAGE


# ------------------------------------------------------------------------------------ shared args
def _add_sae_arg(parser: argparse.ArgumentParser, name: str, what: str) -> None:
    parser.add_argument(name, help=f"{what}: a file, a folder or hub:repo_id/path@revision")


def _add_load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default=None,
        help="file format of the SAE(s); detected from the content when omitted",
    )


def _add_out_args(parser: argparse.ArgumentParser, suffixes: str) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help=f"output file ({suffixes}); its folder must exist"
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _check_out(path: Path, force: bool, suffixes: tuple[str, ...]) -> None:
    """Refuse before any work: wrong suffix, missing or unwritable folder, existing file without --force."""
    if path.suffix not in suffixes:
        raise ValueError(f"--out: expected a file ending in {' or '.join(suffixes)}, got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"--out: {path} is a folder")
    if path.exists() and not force:
        raise FileExistsError(f"--out: {path} exists; pass --force to overwrite")
    try:
        check_writable(path.parent)
    except OSError as exc:
        raise _OutputError(f"--out: cannot write {path}: {exc.strerror or exc}") from exc


def _write_out(path: Path, write: Callable[[Path], object]) -> None:
    """``write(path)``, reporting a failure (disk full, permission, ...) as one line naming ``--out``.

    The writers are atomic, so a failed write leaves ``--out`` as it was.
    """
    try:
        write(path)
    except OSError as exc:
        logger.debug("traceback (shown with -vv)", exc_info=True)
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise _OutputError(f"--out: cannot write {path}: {reason}; nothing was written") from exc


def _load(spec: str, fmt: str | None) -> tuple[SAE, str]:
    """Load an SAE (the same resolution as :func:`load_sae`) and say which format it was in."""
    resolved = resolve(spec, format=fmt)
    return load_sae(resolved), resolved.format


# ------------------------------------------------------------------------------------ info
def _stats(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().double()
    return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}


def sae_summary(sae: SAE, fmt: str, source: str) -> dict[str, Any]:
    """What ``saematch info`` reports, as a JSON-ready dict."""
    out: dict[str, Any] = {
        "source": source,
        "format": fmt,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "activation": sae.activation,
        "k": sae.k,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "threshold": None if sae.threshold is None else _stats(sae.threshold),
        "decoder_norm": _stats(sae.W_dec.double().norm(dim=1)),
        "encoder_norm": _stats(sae.W_enc.double().norm(dim=0)),
        "meta": dict(sae.meta),
    }
    return out


def _configure_info(p: argparse.ArgumentParser) -> None:
    _add_sae_arg(p, "sae", "the SAE")
    _add_load_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _fmt_stats(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return "  ".join(f"{k} {v:.6g}" for k, v in stats.items())


def _run_info(args: argparse.Namespace) -> int:
    sae, fmt = _load(args.sae, args.format)
    summary = sae_summary(sae, fmt, args.sae)
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    for key in ("source", "format", "d_in", "d_sae", "activation", "k", "dtype"):
        if summary[key] is not None:
            print(f"{key + ':':14}{summary[key]}")
    print(f"{'threshold:':14}{_fmt_stats(summary['threshold'])}")
    print(f"{'decoder_norm:':14}{_fmt_stats(summary['decoder_norm'])}")
    print(f"{'encoder_norm:':14}{_fmt_stats(summary['encoder_norm'])}")
    print(f"{'meta:':14}{json.dumps(summary['meta'], default=str, sort_keys=True)}")
    return 0


# ------------------------------------------------------------------------------------ fold
def _configure_fold(p: argparse.ArgumentParser) -> None:
    _add_sae_arg(p, "sae", "the JumpReLU SAE to fold")
    _add_load_args(p)
    _add_out_args(p, ".safetensors, saematch's native format")


def _run_fold(args: argparse.Namespace) -> int:
    _check_out(args.out, args.force, (".safetensors",))
    sae, _ = _load(args.sae, args.format)
    try:
        folded = fold(sae)
    except SAEValidationError as exc:
        raise SAEValidationError(f"{args.sae}: {exc}") from exc
    folded = replace(folded, meta={**folded.meta, "folded_from": args.sae})
    _write_out(args.out, lambda out: save_sae(folded, out, force=args.force))
    print(args.out)
    return 0


# ------------------------------------------------------------------------------------ match
def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the class source (one source of truth)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            text = " ".join(nxt.value.value.split())
            # Plain text for --help: drop reST roles and literal markers.
            docs[node.target.id] = re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")
    return docs


def _comma_tuple(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {list(choices)}, got {text!r}"
            )
        return items

    return parse


def _flag_kwargs(name: str, hint: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for one MatchConfig field, from its type."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if name == "solver":
        from saematch_core.lap import SOLVERS

        return {"choices": sorted(SOLVERS)}  # every registered solver, including added ones
    if origin is Literal:
        return {"choices": list(args)}
    if hint is int:
        return {"type": int, "metavar": "N"}
    if hint is float:
        return {"type": float, "metavar": "X"}
    if hint is str:
        return {"type": str}
    if origin in (Union, types.UnionType) and set(args) == {str, type(None)}:
        return {"type": str}
    if origin is tuple and args and args[0] is str:
        from saematch_core.cost import PARAMS

        return {"type": _comma_tuple(PARAMS if name == "params" else ()), "metavar": "A,B,..."}
    raise TypeError(f"MatchConfig.{name}: no command-line flag for type {hint!r}; extend cli._flag_kwargs")


def _describe_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_match_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`MatchConfig` field (``--chunk-size`` for ``chunk_size``, ...).

    Every flag defaults to "not given", so only the flags on the command line override the
    configuration (``--config`` file or MatchConfig's defaults).
    """
    hints = get_type_hints(MatchConfig)
    docs = _field_docs(MatchConfig)
    group = parser.add_argument_group("matching options (fields of MatchConfig)")
    for f in fields(MatchConfig):
        flags = (f"--{f.name.replace('_', '-')}", *MATCH_FLAG_ALIASES.get(f.name, ()))
        kwargs = _flag_kwargs(f.name, hints[f.name], f.default)
        default = f.default if f.default is not MISSING else None
        doc = docs.get(f.name, f"MatchConfig.{f.name}")
        help_text = f"{doc} (default: {_describe_default(default)})".replace("%", "%%")
        group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kwargs)


def match_config_from_args(args: argparse.Namespace) -> MatchConfig:
    """``--config`` file (if any) with the given flags on top."""
    base = MatchConfig()
    if getattr(args, "config", None) is not None:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: {path} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--config: {path} is not valid JSON ({exc})") from exc
        base = MatchConfig.from_dict(data)
    overrides = {f.name: getattr(args, f.name) for f in fields(MatchConfig) if hasattr(args, f.name)}
    return replace(base, **overrides)


def _configure_match(p: argparse.ArgumentParser) -> None:
    _add_sae_arg(p, "a", "SAE A (its features are the rows of the result)")
    _add_sae_arg(p, "b", "SAE B (same d_in as A)")
    _add_load_args(p)
    _add_out_args(p, ".json: header + list of {a, b, cost}; .safetensors: perm and cost tensors")
    p.add_argument("--config", type=Path, default=None, help="MatchConfig as a JSON file; flags override it")
    add_match_config_flags(p)


def _run_match(args: argparse.Namespace) -> int:
    _check_out(args.out, args.force, (".json", ".safetensors"))
    config = match_config_from_args(args)
    a, _ = _load(args.a, args.format)
    b, _ = _load(args.b, args.format)
    result: MatchResult = match(a, b, config)
    _write_out(args.out, result.to_json if args.out.suffix == ".json" else result.save)
    logger.info(
        "matched %d of %d features, total cost %.6g", result.n_matched, result.shape[0], result.total_cost
    )
    print(f"{args.out}  total_cost {result.total_cost:.6g}  matched {result.n_matched}/{result.shape[0]}")
    return 0


def _configure_prepare(p: argparse.ArgumentParser) -> None:
    from saematch_core.profiles import PROFILE_NAMES

    p.add_argument("--profile", choices=PROFILE_NAMES, default="default", help="which substrate to build")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $SAEMATCH_CACHE or ~/.cache/saematch)",
    )
    p.add_argument("--force", action="store_true", help="recompute every step even when cached")
    p.add_argument("--device", default=None, help="where the language model runs (cpu, cuda, ...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _run_prepare(args: argparse.Namespace) -> int:
    # Imported here: the substrate pulls in transformers, which `info`/`fold`/`match` never need.
    from saematch_core.prepare import prepare

    result = prepare(
        args.profile,
        cache_dir=args.cache_dir,
        force=args.force,
        progress=not args.no_progress,
        device=args.device,
    )
    state = "cached" if result.cached else f"built in {result.seconds:.1f} s"
    print(f"profile {result.profile}: {len(result.records)} SAEs ({state})")
    print(f"SAEs: {result.folder / 'saes'}")
    for record in result.records:
        print(f"  {record.family:<8} layer {record.layer:>2} {record.setting:<10} {record.path}")
    return 0


register_command(
    "info",
    help="describe an SAE: format, sizes, activation, dtype, threshold and norm statistics, meta",
    configure=_configure_info,
    run=_run_info,
)
register_command(
    "fold",
    help="fold a JumpReLU SAE's thresholds into its weights (paper Eq. 4) and save it in native format",
    configure=_configure_fold,
    run=_run_fold,
)
register_command(
    "match",
    help="match the features of SAE A to those of SAE B and save the permutation",
    configure=_configure_match,
    run=_run_match,
)
register_command(
    "prepare",
    help="build a profile's substrate: model, corpora, activation cache and SAEs for every layer (cached)",
    configure=_configure_prepare,
    run=_run_prepare,
)


def _deferred(name: str) -> Callable[[Any], Any]:
    """``saematch_core.cli_compare.<name>``, imported when first called (that module imports this one)."""

    def call(arg: Any) -> Any:
        from saematch_core import cli_compare

        return getattr(cli_compare, name)(arg)

    return call


register_command(
    "compare",
    help="compare two SAEs: exact matching, a calibrated verdict per pair, best matches both ways, split "
    "families, agreement between matchers, optional data check; JSON and offline HTML report",
    configure=_deferred("configure_compare"),
    run=_deferred("run_compare"),
)
register_command(
    "align",
    help="write SAE B with its features in A's order, in B's own format, plus an ID map (CSV and JSON)",
    configure=_deferred("configure_align"),
    run=_deferred("run_align"),
)
register_command(
    "chain",
    help="give every feature a stable chain ID along a sequence of SAEs (a chain ends where the verdict "
    "says a pair is not matched)",
    configure=_deferred("configure_chain"),
    run=_deferred("run_chain"),
)
register_command(
    "suite",
    help="solve a job list of matchings on this machine or a Dask cluster, skipping results already stored",
    configure=_deferred("configure_suite"),
    run=_deferred("run_suite_command"),
)
