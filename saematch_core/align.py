"""Stable feature IDs across SAEs: write B in A's feature order, and chain IDs along layers.

**Aligning B to A** (:func:`align`). The primary one-to-one matching of :func:`~saematch_core.compare.compare`
gives every feature of A at most one partner in B. The aligned B lists B's features in A's order
(:func:`aligned_order`): first the partners of A's features 0, 1, 2, … (skipping features of A without
one), then B's features without a partner, in their original order. When B is at least as wide as A,
feature ``i`` of the aligned B is therefore the partner of A's feature ``i`` for every ``i``. The aligned
SAE is written in B's own format by permuting the feature axis of every per-feature tensor of B's
files (:func:`write_permuted`), so everything else in them (configs, dtypes, normalisation constants,
metadata) stays as it was; the result is loaded back and checked against ``B.permute(order)`` before
it replaces anything. An ID map (CSV and JSON, one row per feature, :class:`IdRecord`) says for every
feature its old and new ID, its partner in A, the cost, the calibrated verdict and the direction flags.

**Chains** (:func:`chain`). Along SAEs ``0 … n`` (e.g. consecutive layers), layer 0's features get
chain IDs ``0 … F_0 − 1``. Feature ``j`` of layer ``l + 1`` continues the chain of feature ``i`` of
layer ``l`` when the one-to-one matching of ``l`` to ``l + 1`` pairs them **and** the calibrated verdict
calls the pair matched; otherwise ``j`` starts a new chain, with the next unused ID (new IDs are given
in feature order). A chain thus ends at the last layer whose pair is called matched, and never skips
a layer; a broken link is counted in :class:`ChainStep`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from saematch_core._study_api import JsonResult
from saematch_core.cache import atomic_path, atomic_write_text
from saematch_core.compare import (
    CompareConfig,
    CompareReport,
    SaeInfo,
    compare,
    judged_matching,
    sae_info,
    write_records_json,
)
from saematch_core.compose import compose, invert
from saematch_core.errors import SAEFormatError, SAEValidationError
from saematch_core.formats import load_sae, resolve
from saematch_core.formats.llama_scope import find_llama_scope_folder
from saematch_core.formats.sparsify import find_sparsify_folder
from saematch_core.sae import SAE

__all__ = [
    "FEATURE_AXES",
    "AlignResult",
    "ChainResult",
    "ChainStep",
    "IdRecord",
    "align",
    "aligned_order",
    "chain",
    "chain_ids",
    "id_records",
    "write_id_map",
    "write_permuted",
]

FEATURE_AXES: dict[str, dict[str, int]] = {
    "native": {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0},
    "gemma_scope": {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0},
    "saelens": {
        "W_enc": 1,
        "b_enc": 0,
        "W_dec": 0,
        "threshold": 0,
        "log_threshold": 0,
        "sparsity": 0,
        "log_feature_sparsity": 0,
    },
    "sparsify": {"encoder.weight": 0, "encoder.bias": 0, "W_dec": 0},
    "llama_scope": {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1, "log_jumprelu_threshold": 0},
}
"""Per format, the tensors that hold one entry per feature and their feature axis. A tensor not listed
is copied unchanged when no axis has length ``d_sae``, and refused otherwise (it could be per feature)."""

_TENSOR_SUFFIXES = (".safetensors", ".npz")


# ---------------------------------------------------------------------------------------- order
def aligned_order(perm: Tensor, f_b: int) -> Tensor:
    """B's features in A's order: the partners of A's features in A's order, then the rest of B.

    Parameters
    ----------
    perm : LongTensor (F_A,), a one-to-one matching of A into B (``-1``: no partner).
    f_b : width of B.

    Returns
    -------
    LongTensor (F_B,): feature ``t`` of the aligned B is feature ``order[t]`` of B (the argument of
    :meth:`SAE.permute`).

    >>> aligned_order(torch.tensor([2, -1, 0]), 4).tolist()
    [2, 0, 1, 3]
    """
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    used = perm[perm >= 0]
    if used.numel() and (int(used.max()) >= f_b or torch.unique(used).numel() != used.numel()):
        raise ValueError(f"perm: expected a one-to-one matching into range({f_b})")
    rest = torch.ones(f_b, dtype=torch.bool)
    rest[used] = False
    return torch.cat([used, rest.nonzero().flatten()])


# ---------------------------------------------------------------------------------------- id map
@dataclass(frozen=True, kw_only=True)
class IdRecord:
    """One feature in the ID map of an alignment."""

    a: int
    """Feature of A (``-1``: a feature of B with no partner in A)."""
    b: int
    """Feature of B, original ID (``-1``: a feature of A with no partner in B)."""
    b_aligned: int
    """The same feature's ID in the aligned B (``-1`` as ``b``)."""
    cost: float
    """Per-pair cost under the matcher's metric (``nan`` without partner)."""
    relative_cost: float
    verdict: str
    """``matched`` (a real partner at the FDR level), ``not_matched`` (paired, but no better than
    chance) or ``unmatched`` (no partner)."""
    q_value: float
    margin: float
    a_to_b_best: bool
    """``b`` is ``a``'s most similar feature of B."""
    b_to_a_best: bool
    """``a`` is ``b``'s most similar feature of A."""
    mutual: bool
    """Both flags: ``a`` and ``b`` are each other's most similar feature (False without a pair)."""


def id_records(report: CompareReport, order: Tensor) -> tuple[IdRecord, ...]:
    """The ID map of aligning B to A with ``order`` (:func:`aligned_order`), one row per feature of B,
    then one per feature of A without partner."""
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(order.numel())
    by_b = {p.b: p for p in report.pairs}
    nan = math.nan
    rows = []
    for t, j in enumerate(order.tolist()):
        p = by_b.get(j)
        if p is None:
            rows.append(
                IdRecord(
                    a=-1, b=j, b_aligned=t, cost=nan, relative_cost=nan, verdict="unmatched", q_value=nan,
                    margin=nan, a_to_b_best=False, b_to_a_best=False, mutual=False,
                )
            )  # fmt: skip
            continue
        rows.append(
            IdRecord(
                a=p.a, b=j, b_aligned=int(new_id[j]), cost=p.cost, relative_cost=p.relative_cost,
                verdict="matched" if p.matched else "not_matched", q_value=p.q_value, margin=p.margin,
                a_to_b_best=p.a_to_b_best, b_to_a_best=p.b_to_a_best, mutual=p.mutual,
            )
        )  # fmt: skip
    paired = {p.a for p in report.pairs}
    for i in range(report.summary.n_a):
        if i not in paired:
            rows.append(
                IdRecord(
                    a=i, b=-1, b_aligned=-1, cost=nan, relative_cost=nan, verdict="unmatched", q_value=nan,
                    margin=nan, a_to_b_best=False, b_to_a_best=False, mutual=False,
                )
            )  # fmt: skip
    return tuple(rows)


_ID_FIELDS = tuple(IdRecord.__dataclass_fields__)


def write_id_map(records: Sequence[IdRecord], stem: Path, *, header: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``stem.csv`` and ``stem.json`` (atomically); returns both paths.

    The CSV has one row per record with the columns of :class:`IdRecord` (empty cells for ``nan``,
    ``true``/``false`` for flags); the JSON holds ``header`` and the same rows under ``ids``.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_ID_FIELDS)
    for r in records:
        row = []
        for name in _ID_FIELDS:
            v = getattr(r, name)
            row.append(
                ("true" if v else "false")
                if isinstance(v, bool)
                else ("" if isinstance(v, float) and math.isnan(v) else v)
            )
        writer.writerow(row)
    csv_path, json_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")
    atomic_write_text(csv_path, buf.getvalue())
    body = {
        "kind": "feature_id_map",
        "schema_version": 1,
        **header,
        "ids": [{k: _json_value(getattr(r, k)) for k in _ID_FIELDS} for r in records],
    }
    write_records_json(json_path, body)
    return csv_path, json_path


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


# ---------------------------------------------------------------------------------------- files
def _root(path: Path, fmt: str) -> Path:
    """The file or folder that holds the whole SAE: what an aligned copy mirrors."""
    if fmt in ("native", "gemma_scope") or (path.is_dir() and fmt != "llama_scope"):
        return path
    if fmt == "sparsify":
        found = find_sparsify_folder(path)
    elif fmt == "llama_scope":
        found = find_llama_scope_folder(path)
    else:
        found = path.parent
    if found is None:
        raise SAEFormatError(f"{path}: cannot find the {fmt} folder that holds this file")
    return found


def _permute_array(key: str, arr: Any, axis: int | None, order: Tensor, d_sae: int, where: Path) -> Any:
    shape = tuple(arr.shape)
    if axis is None:
        if d_sae in shape:
            raise SAEFormatError(
                f"{where}: {key}: shape {shape} has an axis of length d_sae={d_sae} but is not a known "
                "per-feature tensor of this format; refusing to guess whether to reorder it"
            )
        return arr
    if len(shape) == 0:
        return arr  # a scalar shared by every feature
    if len(shape) <= axis or shape[axis] != d_sae:
        raise SAEFormatError(
            f"{where}: {key}: expected length d_sae={d_sae} on axis {axis}, got shape {shape}"
        )
    if isinstance(arr, np.ndarray):
        return np.take(arr, order.numpy(), axis=axis)
    return arr.index_select(axis, order).contiguous()


def _permute_file(src: Path, dst: Path, fmt: str, order: Tensor, d_sae: int) -> None:
    axes = FEATURE_AXES.get(fmt, {})
    if src.suffix == ".safetensors":
        with safe_open(str(src), framework="pt") as fh:
            metadata = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        out = {k: _permute_array(k, t, axes.get(k), order, d_sae, src) for k, t in tensors.items()}
        safetensors.torch.save_file(out, str(dst), metadata=metadata)
        return
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out_np = {k: _permute_array(k, v, axes.get(k), order, d_sae, src) for k, v in arrays.items()}
    with open(dst, "wb") as fh:
        np.savez(fh, **out_np)


def write_permuted(
    src: Path, fmt: str, order: Tensor, out: Path, *, expected: SAE, force: bool = False
) -> Path:
    """Write a copy of the SAE at ``src`` (format ``fmt``) with its features in ``order``.

    Every ``.safetensors`` / ``.npz`` file of the SAE gets its per-feature tensors (:data:`FEATURE_AXES`)
    reordered along the feature axis; every other file is copied byte for byte. The copy is loaded
    back and must equal ``expected`` (``B.permute(order)``) before it is moved onto ``out``.

    Parameters
    ----------
    src : the SAE's file or folder, as its loader accepts it.
    out : a file with ``src``'s suffix when the SAE is one file, else a folder.
    force : replace an existing ``out``.

    Returns
    -------
    The path to pass to :func:`~saematch_core.formats.load_sae` for the aligned SAE.
    """
    root = _root(src, fmt)
    order = torch.as_tensor(order, dtype=torch.long).cpu()
    d_sae = int(order.numel())
    _check_out(root, out, force)
    # Where the loader looks inside the copy: the same relative place as in the original.
    inner = src.relative_to(root) if src != root and src.is_relative_to(root) else Path()
    if root.is_file():
        with atomic_path(out) as tmp:
            _permute_file(root, tmp, fmt, order, d_sae)
            _check_copy(tmp, fmt, expected)
        return out
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            dst = tmp_dir / rel
            if path.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix in _TENSOR_SUFFIXES:
                _permute_file(path, dst, fmt, order, d_sae)
            else:
                shutil.copyfile(path, dst)
        os.chmod(tmp_dir, 0o755)
        _check_copy(tmp_dir / inner, fmt, expected)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp_dir, out)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out / inner


def _check_out(root: Path, out: Path, force: bool) -> None:
    if root.is_file() and out.suffix != root.suffix:
        raise ValueError(
            f"--out: B is one {root.suffix} file; expected a path ending in {root.suffix}, got {out}"
        )
    if out.exists() and not force:
        raise FileExistsError(f"--out: {out} exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {out.parent} does not exist")


def _check_copy(path: Path, fmt: str, expected: SAE) -> None:
    back = load_sae(path, format=fmt)
    for name, t in expected.tensors().items():
        got = back.tensors().get(name)
        if (
            got is None
            or got.shape != t.shape
            or not torch.allclose(got.double(), t.double(), rtol=1e-5, atol=1e-7)
        ):
            raise SAEFormatError(
                f"{path}: the reordered copy does not load as B with its features reordered "
                f"({name} differs); its files hold per-feature data this tool does not know"
            )


# ---------------------------------------------------------------------------------------- align
@dataclass(frozen=True, kw_only=True)
class AlignResult:
    """What :func:`align` wrote."""

    order: tuple[int, ...]
    """Feature ``t`` of the aligned B is feature ``order[t]`` of B."""
    records: tuple[IdRecord, ...]
    sae_path: Path
    """The aligned SAE (load it with ``load_sae``)."""
    ids_csv: Path
    ids_json: Path
    report: CompareReport
    """The comparison the alignment used (matching, verdicts, best matches)."""


def align(
    a_spec: str,
    b_spec: str,
    out: str | os.PathLike[str],
    *,
    config: CompareConfig | None = None,
    ids: str | os.PathLike[str] | None = None,
    format_a: str | None = None,
    format_b: str | None = None,
    force: bool = False,
    cache_dir: str | Path | None = None,
) -> AlignResult:
    """Write SAE B with its features in A's order, in B's own format, plus its ID map.

    Parameters
    ----------
    a_spec, b_spec : paths or ``hub:`` specs of the two SAEs (same ``d_in``).
    out : where the aligned B goes: a file with B's suffix when B is one file, else a folder.
    config : the comparison (its ``matcher`` must be one-to-one; ``others`` are not run).
    ids : stem of the ID map (``<ids>.csv``, ``<ids>.json``); default ``out`` without suffix + ``.ids``.
    force : replace existing outputs.

    Returns
    -------
    AlignResult
    """
    cfg = CompareConfig(others=()) if config is None else replace(config, others=())
    if not cfg.matcher_for(cfg.matcher).one_to_one:
        raise ValueError(
            f"--matcher: {cfg.matcher!r} may give one feature of B to several of A; aligning needs a "
            "one-to-one matcher (saematch or cosine)"
        )
    out = Path(out)
    stem = Path(ids) if ids is not None else out.with_name(out.name.removesuffix(out.suffix) + ".ids")
    for path in (stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")):
        if path.exists() and not force:
            raise FileExistsError(f"--ids: {path} exists; pass --force to overwrite")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"--ids: folder {path.parent} does not exist")
    found_a, found_b = resolve(a_spec, format=format_a), resolve(b_spec, format=format_b)
    a_fmt, b_local, b_fmt = found_a.format, found_b.path, found_b.format
    _check_out(_root(b_local, b_fmt), out, force)  # before any work
    a, b = load_sae(found_a), load_sae(found_b)
    report = compare(
        a, b, cfg, sources=(sae_info(a, a_spec, a_fmt), sae_info(b, b_spec, b_fmt)), cache_dir=cache_dir
    )
    order = aligned_order(report.perm, b.d_sae)
    sae_path = write_permuted(b_local, b_fmt, order, out, expected=b.permute(order), force=force)
    records = id_records(report, order)
    header = {
        "a": _info_dict(report.a),
        "b": _info_dict(report.b),
        "aligned": str(sae_path),
        "matcher": cfg.matcher,
        "alpha": cfg.alpha,
        "created_ms": int(time.time() * 1000),
    }
    csv_path, json_path = write_id_map(records, stem, header=header)
    return AlignResult(
        order=tuple(order.tolist()),
        records=records,
        sae_path=sae_path,
        ids_csv=csv_path,
        ids_json=json_path,
        report=report,
    )


def _info_dict(info: SaeInfo) -> dict[str, Any]:
    return {k: getattr(info, k) for k in info.__dataclass_fields__}


# ---------------------------------------------------------------------------------------- chains
def chain_ids(perms: Sequence[Tensor], matched: Sequence[Tensor], widths: Sequence[int]) -> list[Tensor]:
    """Chain IDs of every feature of every layer (module docstring rule).

    Parameters
    ----------
    perms : ``perms[l]`` LongTensor (F_l,), one-to-one matching of layer ``l`` into layer ``l + 1``.
    matched : ``matched[l]`` BoolTensor (F_l,), the verdict of each pair of ``perms[l]``.
    widths : ``F_0 … F_n``.

    Returns
    -------
    ``ids[l]`` LongTensor (F_l,).

    >>> [t.tolist() for t in chain_ids([torch.tensor([1, 0])], [torch.tensor([True, False])], [2, 3])]
    [[0, 1], [2, 0, 3]]
    """
    if not (len(perms) == len(matched) == len(widths) - 1):
        raise ValueError(
            "perms, matched, widths: expected n, n and n + 1 entries, "
            f"got {len(perms)}, {len(matched)}, {len(widths)}"
        )
    ids = [torch.arange(widths[0], dtype=torch.long)]
    next_id = widths[0]
    for step, (p, ok) in enumerate(zip(perms, matched, strict=True)):
        p = torch.as_tensor(p, dtype=torch.long)
        if p.shape != (widths[step],) or torch.as_tensor(ok).shape != (widths[step],):
            raise ValueError(f"perms[{step}], matched[{step}]: expected shape ({widths[step]},)")
        kept = torch.where(torch.as_tensor(ok, dtype=torch.bool), p, torch.full_like(p, -1))
        back = invert(kept, size=widths[step + 1])  # feature of layer l + 1 → its confident source
        cur = compose(back, ids[-1])
        fresh = cur < 0
        n_new = int(fresh.sum())
        cur[fresh] = torch.arange(next_id, next_id + n_new)
        next_id += n_new
        ids.append(cur)
    return ids


@dataclass(frozen=True, kw_only=True)
class ChainStep:
    """One link of the chain, layer ``l`` to layer ``l + 1``."""

    n_pairs: int
    """Features of layer ``l`` with a partner."""
    n_continued: int
    """Pairs called matched: their chains go on."""
    n_broken: int
    """Pairs not called matched: the chain of layer ``l``'s feature ends there."""
    n_new: int
    """Features of layer ``l + 1`` that start a chain."""


@dataclass(frozen=True, kw_only=True)
class ChainResult(JsonResult):
    """Chain IDs of every feature along a sequence of SAEs (module docstring)."""

    kind: ClassVar[str] = "feature_chains"
    matcher: str
    alpha: float
    sources: tuple[SaeInfo, ...]
    steps: tuple[ChainStep, ...]
    n_chains: int
    ids: tuple[tuple[int, ...], ...]
    """``ids[l][f]``: chain ID of feature ``f`` of SAE ``l``."""

    def chain(self, chain_id: int) -> list[tuple[int, int]]:
        """``(layer, feature)`` of every member of chain ``chain_id``, by layer."""
        return [(l, row.index(chain_id)) for l, row in enumerate(self.ids) if chain_id in row]

    def lengths(self) -> dict[int, int]:
        """Chain length (number of layers) → number of chains."""
        counts: dict[int, int] = {}
        for row in self.ids:
            for c in row:
                counts[c] = counts.get(c, 0) + 1
        out: dict[int, int] = {}
        for n in counts.values():
            out[n] = out.get(n, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self, path: str | Path, config: Any = None) -> None:
        """Write the chains atomically, one SAE's IDs per line (``config`` is not used)."""
        del config
        from saematch_core import __version__

        body = {
            "kind": self.kind,
            "schema_version": 1,
            "saematch_version": __version__,
            "created_ms": int(time.time() * 1000),
            **self.to_dict(),
        }
        write_records_json(Path(path), body)

    @classmethod
    def from_json(cls, path: str | Path) -> ChainResult:
        """Read a file written by :meth:`to_json`."""
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("kind") != cls.kind or doc.get("schema_version") != 1:
            raise ValueError(f"{path}: expected a {cls.kind!r} file of schema_version 1")
        return cls.from_dict(
            {
                k: v
                for k, v in doc.items()
                if k not in ("kind", "schema_version", "saematch_version", "created_ms")
            }
        )


def chain(
    saes: Sequence[SAE],
    *,
    config: CompareConfig | None = None,
    sources: Sequence[SaeInfo] | None = None,
    cache_dir: str | Path | None = None,
) -> ChainResult:
    """Chain IDs along ``saes`` (consecutive SAEs matched with ``config.matcher``, one-to-one; each pair
    judged with the calibrated verdict at FDR ``config.alpha``).

    Parameters
    ----------
    saes : two or more SAEs with the same ``d_in``.
    config : matcher, ``alpha``, ``n_null``, ``seed`` (the rest is not used).
    sources : where each SAE came from (recorded).
    """
    cfg = CompareConfig(others=()) if config is None else config
    if len(saes) < 2:
        raise ValueError(f"saes: expected at least 2 SAEs, got {len(saes)}")
    m = cfg.matcher_for(cfg.matcher)
    if not m.one_to_one:
        raise ValueError(f"--matcher: {cfg.matcher!r} is not one-to-one; chains need saematch or cosine")
    perms, matched, steps = [], [], []
    for l, (a, b) in enumerate(itertools.pairwise(saes)):
        if a.d_in != b.d_in:
            raise SAEValidationError(
                f"saes[{l}], saes[{l + 1}]: expected the same d_in, got {a.d_in} and {b.d_in}"
            )
        res, dec, _, _ = judged_matching(a, b, m, cfg, cache_dir)
        perms.append(res.perm)
        matched.append(dec.matched)
    ids = chain_ids(perms, matched, [s.d_sae for s in saes])
    for l in range(len(perms)):
        has = perms[l] >= 0
        n_cont = int((matched[l] & has).sum())
        steps.append(
            ChainStep(
                n_pairs=int(has.sum()),
                n_continued=n_cont,
                n_broken=int(has.sum()) - n_cont,
                n_new=saes[l + 1].d_sae - n_cont,
            )
        )
    infos = tuple(sources) if sources is not None else tuple(sae_info(s) for s in saes)
    return ChainResult(
        matcher=cfg.matcher,
        alpha=cfg.alpha,
        sources=infos,
        steps=tuple(steps),
        n_chains=int(max(int(t.max()) for t in ids if t.numel()) + 1) if any(t.numel() for t in ids) else 0,
        ids=tuple(tuple(int(v) for v in t.tolist()) for t in ids),
    )
