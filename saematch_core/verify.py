"""Checks that a stored matching is what it says it is, and the matching cache's reader and writer.

A matching read back from a file (the result cache, or a ``saematch match --out`` file) may have been
damaged or edited while staying well-formed: two partners swapped, one feature of B given to two
features of A, rows deleted, the flags or the total left as they were. :func:`check_match_result`
re-derives everything the result states about itself (a one-to-one matching that covers the smaller
side, or for ``"greedy"`` a partner for every feature of A; per-pair costs that are finite where
matched and ``nan`` elsewhere; the total as their sum) and, given the two SAEs, recomputes every
pair's cost from their parameters exactly as :func:`~saematch_core.match.match` does.

:func:`read_cached_match` and :func:`write_cached_match` keep the matching cache honest: a file is
sealed when written (:func:`saematch_core.cache.seal`); on reuse its record is checked and the
result validated, and a file without a record (an older cache) has its costs recomputed from the
SAEs; anything wrong gives one warning line and ``None``, so the caller solves again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saematch_core.cache import is_intact, read_record, seal
from saematch_core.cost import feature_vectors, pair_costs
from saematch_core.errors import DamagedFileError
from saematch_core.sae import SAE

if TYPE_CHECKING:
    from saematch_core.match import MatchResult

__all__ = ["check_match_result", "read_cached_match", "write_cached_match"]

logger = logging.getLogger(__name__)

_MANY_TO_ONE = ("greedy", "sinkhorn")
"""Solvers whose result maps every feature of A and may repeat partners (greedy top-1; entropic OT
read out by row argmax); every other solver gives a one-to-one matching of the smaller side."""
_REL_TOL = 1e-6
_ABS_TOL = 1e-12


def check_match_result(
    result: MatchResult,
    a: SAE | None = None,
    b: SAE | None = None,
    *,
    pairs: Sequence[Mapping[str, Any]] | None = None,
    source: str | os.PathLike[str] = "MatchResult",
) -> MatchResult:
    """Return ``result`` unchanged if it is a consistent matching, else raise naming what is wrong.

    Parameters
    ----------
    result : the matching to check.
    a, b : the two SAEs it matched; when both are given, every matched pair's cost is recomputed
        from their parameters (same folding, parameters and metric as the result's config) and
        compared with the stored cost.
    pairs : the raw ``pairs`` records of a JSON file (``{a, b, cost}``), to find rows that name an
        A feature twice or outside ``[0, F_A)`` (reading them into ``perm`` would hide that).
    source : the file, for messages.

    Raises
    ------
    DamagedFileError
        One message naming ``source`` and the first inconsistency found.
    """
    problem = _problem(result, a, b, pairs)
    if problem is not None:
        raise DamagedFileError(f"{source}: not a consistent matching: {problem}")
    return result


def _problem(
    result: MatchResult, a: SAE | None, b: SAE | None, pairs: Sequence[Mapping[str, Any]] | None
) -> str | None:
    f_a, f_b = result.shape
    perm, cost = result.perm.cpu(), result.cost.cpu()
    if pairs is not None:
        rows = [rec.get("a") for rec in pairs]
        bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < f_a]
        if bad:
            return f"pairs: row a={bad[0]!r} is not a feature of A (expected 0..{f_a - 1})"
        if len(set(rows)) != len(rows):
            twice = next(r for r in rows if rows.count(r) > 1)
            return f"pairs: A feature {twice} appears in {rows.count(twice)} rows"
    matched = perm >= 0
    used = perm[matched]
    values, counts = torch.unique(used, return_counts=True)
    distinct = bool((counts == 1).all())
    if result.is_permutation and not distinct:
        j = int(values[counts > 1][0])
        owners = (perm == j).nonzero().flatten().tolist()
        return f"is_permutation is true, but feature {j} of B is the partner of A features {owners}"
    if not result.is_permutation and distinct:
        return "is_permutation is false, but no feature of B is used twice"
    n = int(matched.sum())
    if result.solver in _MANY_TO_ONE:
        if n != f_a:
            return f"solver {result.solver!r} gives every feature of A a partner, got {n} of {f_a}"
    else:
        if not distinct:
            return f"solver {result.solver!r} gives a one-to-one matching, but a feature of B repeats"
        if n != min(f_a, f_b):
            return (
                f"solver {result.solver!r} matches every feature of the smaller side "
                f"(min(F_A, F_B) = {min(f_a, f_b)}), got {n} matched pairs"
            )
    problem = _cost_problem(result, perm, cost, matched)
    if problem is None and a is not None and b is not None:
        problem = _recomputed_problem(result, a, b, perm, cost, matched)
    return problem


def _cost_problem(
    result: MatchResult, perm: torch.Tensor, cost: torch.Tensor, matched: torch.Tensor
) -> str | None:
    finite = torch.isfinite(cost)
    if bool((matched & ~finite).any()):
        i = int((matched & ~finite).nonzero()[0])
        return f"A feature {i} is matched to {int(perm[i])} with cost {float(cost[i])}"
    if bool((~matched & ~torch.isnan(cost)).any()):
        i = int((~matched & ~torch.isnan(cost)).nonzero()[0])
        return f"A feature {i} is unmatched but has cost {float(cost[i])} (expected nan)"
    low, high = (0.0, math.inf) if result.config.metric == "mse" else (-1e-9, 2.0 + 1e-9)
    out = matched & ((cost < low) | (cost > high))
    if bool(out.any()):
        i = int(out.nonzero()[0])
        return f"A feature {i}: cost {float(cost[i])} outside [{low:g}, {high:g}] for {result.config.metric}"
    total = float(cost[matched].sum()) if bool(matched.any()) else 0.0
    if not math.isclose(result.total_cost, total, rel_tol=1e-9, abs_tol=1e-12):
        return f"total_cost is {result.total_cost!r}, the per-pair costs sum to {total!r}"
    return None


def _recomputed_problem(
    result: MatchResult,
    a: SAE,
    b: SAE,
    perm: torch.Tensor,
    cost: torch.Tensor,
    matched: torch.Tensor,
) -> str | None:
    if (a.d_sae, b.d_sae) != result.shape:
        return f"shape {result.shape} is not that of the SAEs given, {(a.d_sae, b.d_sae)}"
    config = result.config
    # match() scores half-precision searches from the parameters in their own precision.
    dtype = None if config.torch_dtype in (torch.float16, torch.bfloat16) else config.torch_dtype
    a_vecs = feature_vectors(a, config.params, fold=result.folded[0], device="cpu", dtype=dtype)
    b_vecs = feature_vectors(b, config.params, fold=result.folded[1], device="cpu", dtype=dtype)
    fresh = pair_costs(a_vecs, b_vecs, perm, metric=config.metric)
    off = matched & ((fresh - cost).abs() > _ABS_TOL + _REL_TOL * fresh.abs())
    if bool(off.any()):
        i = int(off.nonzero()[0])
        return (
            f"{int(off.sum())} pairs have another cost than their SAEs give, first A feature {i} ↔ "
            f"B feature {int(perm[i])}: {float(cost[i])!r} stored, {float(fresh[i])!r} recomputed"
        )
    return None


def read_cached_match(path: str | os.PathLike[str], a: SAE, b: SAE) -> MatchResult | None:
    """The matching cached at ``path`` for SAEs ``a`` and ``b``, or ``None`` to solve again.

    ``None`` (with one warning line, except when the file is simply missing) when the file fails its
    integrity record (:func:`saematch_core.cache.is_intact`), cannot be read, or is not a
    consistent matching (:func:`check_match_result`). A file without a record, written by an older
    version, also has every pair's cost recomputed from ``a`` and ``b`` before it is trusted.
    """
    from saematch_core.match import MatchResult

    path = Path(path)
    if not path.is_file():
        return None
    recorded = read_record(path) is not None
    # An unrecorded file is sealed only once its costs have been recomputed.
    if not is_intact(path, adopt=False):
        return None
    try:
        result = MatchResult.from_json(path)
        if not recorded:
            check_match_result(result, a, b, source=path)
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("%s; not using this cached matching, solving again", exc)
        return None
    if not recorded:
        with contextlib.suppress(OSError):
            seal(path)
    return result


def write_cached_match(result: MatchResult, path: str | os.PathLike[str]) -> None:
    """Write ``result`` as JSON at ``path`` (atomically) and seal it for :func:`read_cached_match`."""
    result.to_json(path)
    seal(path)
