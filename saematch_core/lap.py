"""Assignment solvers: the exact scipy reference, a plug-in slot for the fast certified solver, and
the greedy / identity baselines.

Every solver in :data:`SOLVERS` takes the two sides' feature vectors ``x`` (F_A, D) and ``y`` (F_B, D)
(already unit-normalised for the cosine metric) and returns an :class:`Assignment`: ``cols[i]`` is the
partner in B of feature ``i`` of A, or ``-1``.

Exact solvers minimise the summed cost over one-to-one assignments that cover the smaller side. With
the MSE metric on equal widths this is the same as maximising ``Σ ⟨x_i, y_P(i)⟩``, and the solvers are
handed that inner-product form (scipy is much faster on ``−x·yᵀ`` than on the MSE-form matrix, whose
row/column norm terms defeat its column reduction). With unequal widths the norms of the larger side's
*chosen* rows matter, so :func:`lap_vectors` appends one coordinate that carries ``−½‖y_j‖²`` and the
problem stays an inner-product assignment.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saematch_core.cost import iter_score_chunks

__all__ = [
    "SOLVERS",
    "Assignment",
    "SolverFn",
    "brute_force_assignment",
    "lap_vectors",
    "linear_assignment",
    "register_solver",
    "solve",
]

logger = logging.getLogger(__name__)

_BRUTE_FORCE_MAX = 8


class Assignment(NamedTuple):
    """Output of a solver in :data:`SOLVERS`."""

    cols: np.ndarray
    """int64, shape (F_A,): partner in B of each feature of A, ``-1`` where unmatched."""
    info: dict[str, float]
    """Diagnostics: ``objective`` (the maximised inner-product score, float64, for exact solvers) and
    solver-specific values (``max_violation``, ``rounds``, ``n_candidates``, ``n_collisions``)."""


class SolverFn(Protocol):
    """Signature of a registered solver."""

    def __call__(
        self, x: Tensor, y: Tensor, *, metric: str, chunk_size: int, k: int, candidates: str = "auto"
    ) -> Assignment: ...


# ---------------------------------------------------------------------- scipy-style dense interface
def _as_cost(cost: Any, maximize: bool) -> np.ndarray:
    arr = np.asarray(cost)
    if arr.ndim != 2:
        raise ValueError(f"cost: expected a 2-D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise TypeError(f"cost: expected a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if maximize:
        # Checks below look at exactly what the minimiser will see.
        arr = -arr
    bad = ~np.isfinite(arr)
    n_bad = int(bad.sum())
    if n_bad:
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        n_nan = int(np.isnan(arr).sum())
        raise ValueError(
            f"cost: {n_bad} non-finite entries ({n_nan} NaN, {n_bad - n_nan} inf), first at {first}"
        )
    return arr


def linear_assignment(cost: Any, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Solve a dense (possibly rectangular) linear assignment problem exactly.

    A checked wrapper around ``scipy.optimize.linear_sum_assignment``.

    Parameters
    ----------
    cost : array_like, shape (n, m)
        Real (or bool) entries, all finite.
    maximize : bool
        Maximise instead of minimise the total.

    Returns
    -------
    rows, cols : ndarray of int64, shape (min(n, m),)
        ``rows`` sorted ascending; row ``rows[t]`` is assigned to column ``cols[t]``.

    Raises
    ------
    ValueError
        Not 2-D, or NaN/inf entries (count and first position in the message).
    TypeError
        Non-numeric dtype.

    Examples
    --------
    >>> rows, cols = linear_assignment([[4, 1], [2, 0]])
    >>> rows.tolist(), cols.tolist()
    ([0, 1], [1, 0])
    """
    arr = _as_cost(cost, maximize)
    rows, cols = linear_sum_assignment(arr)
    return rows.astype(np.int64), cols.astype(np.int64)


def brute_force_assignment(cost: Any, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reference solver: try every one-to-one assignment of the smaller side (larger side ≤ 8).

    Same contract as :func:`linear_assignment`; among tied optima the lexicographically first
    column sequence wins.
    """
    arr = _as_cost(cost, maximize)
    n, m = arr.shape
    if max(n, m) > _BRUTE_FORCE_MAX:
        raise ValueError(
            f"cost: brute force is limited to {_BRUTE_FORCE_MAX} rows/columns, got shape {arr.shape}"
        )
    transposed = n > m
    if transposed:
        arr = arr.T
        n, m = m, n
    best_total, best = np.inf, None
    for cols in itertools.permutations(range(m), n):
        total = float(arr[np.arange(n), list(cols)].sum())
        if total < best_total:
            best_total, best = total, cols
    rows = np.arange(n, dtype=np.int64)
    cols = np.asarray(best if best is not None else (), dtype=np.int64)
    if transposed:
        order = np.argsort(cols)
        rows, cols = cols[order], rows[order]
    return rows, cols


# ---------------------------------------------------------------------- solver registry
SOLVERS: dict[str, SolverFn] = {}
"""Solvers by name; :func:`register_solver` adds one."""


def register_solver(name: str, fn: SolverFn, *, overwrite: bool = False) -> None:
    """Register ``fn`` under ``name``; registering a name twice is an error unless ``overwrite``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if name in SOLVERS and not overwrite:
        raise ValueError(f"name: solver {name!r} is already registered")
    SOLVERS[name] = fn


def solve(
    name: str,
    x: Tensor,
    y: Tensor,
    *,
    metric: str = "mse",
    chunk_size: int = 4096,
    k: int = 8,
    candidates: str = "auto",
) -> Assignment:
    """Run the solver registered as ``name`` on feature vectors ``x`` (F_A, D) and ``y`` (F_B, D).

    ``k`` and ``candidates`` (the precision of the candidate search) only concern the sparse solver.
    """
    try:
        fn = SOLVERS[name]
    except KeyError:
        raise ValueError(f"solver: expected one of {sorted(SOLVERS)}, got {name!r}") from None
    for label, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.ndim != 2:
            raise ValueError(
                f"{label}: expected a 2-D tensor (F, D), got {getattr(t, 'shape', type(t).__name__)}"
            )
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x, y: expected the same vector length D, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return fn(x, y, metric=metric, chunk_size=chunk_size, k=k, candidates=candidates)


def lap_vectors(x: Tensor, y: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Vectors whose inner-product assignment is the minimum-cost assignment.

    For ``"cosine"`` (unit rows) and for MSE with ``F_A == F_B`` the vectors are returned unchanged. For
    MSE with unequal widths the larger side's rows get an extra coordinate ``−½‖y_j‖²`` and the smaller
    side's rows a ``1``, because ``Σ‖x_i − y_P(i)‖² = const − 2 Σ (⟨x_i, y_P(i)⟩ − ½‖y_P(i)‖²)`` when every
    row of the smaller side is matched.
    """
    if metric == "cosine" or x.shape[0] == y.shape[0]:
        return x, y
    small, large = (x, y) if x.shape[0] < y.shape[0] else (y, x)
    small = torch.cat([small, torch.ones_like(small[:, :1])], dim=1)
    large = torch.cat([large, -0.5 * (large * large).sum(dim=1, keepdim=True)], dim=1)
    return (small, large) if x.shape[0] < y.shape[0] else (large, small)


def _dense_scores(x: Tensor, y: Tensor, chunk_size: int) -> np.ndarray:
    out = np.empty((x.shape[0], y.shape[0]), dtype=np.float64)
    for start, block in iter_score_chunks(x, y, chunk_size=chunk_size):
        out[start : start + block.shape[0]] = block.detach().to("cpu", torch.float64).numpy()
    return out


def _scipy_solver(
    x: Tensor, y: Tensor, *, metric: str, chunk_size: int, k: int, candidates: str = "auto"
) -> Assignment:
    del candidates, k
    xs, ys = lap_vectors(x, y, metric)
    scores = _dense_scores(xs, ys, chunk_size)
    np.negative(scores, out=scores)  # minimise −x·yᵀ, in place: no second F×F array
    rows, cols = linear_sum_assignment(scores)
    out = np.full(x.shape[0], -1, dtype=np.int64)
    out[rows] = cols
    return Assignment(cols=out, info={"objective": _exact_objective(xs, ys, rows, cols)})


def _exact_objective(x: Tensor, y: Tensor, rows: np.ndarray, cols: np.ndarray) -> float:
    """``Σ ⟨x_rows[t], y_cols[t]⟩`` re-scored in float64, whatever dtype the score matrix used."""
    r = torch.as_tensor(rows, dtype=torch.long, device=x.device)
    c = torch.as_tensor(cols, dtype=torch.long, device=y.device)
    return float((x[r].double() * y[c].double()).sum())


def _sparse_solver(
    x: Tensor, y: Tensor, *, metric: str, chunk_size: int, k: int, candidates: str = "auto"
) -> Assignment:
    # Imported on first use: numba's import and JIT cache load cost ~1 s that the other solvers never pay.
    from saematch_core import lap_sparse

    xs, ys = lap_vectors(x, y, metric)
    swap = xs.shape[0] > ys.shape[0]
    rows_side, cols_side = (ys, xs) if swap else (xs, ys)
    if candidates not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"candidates: expected 'auto', 'float32' or 'bfloat16', got {candidates!r}")
    res = lap_sparse.solve_inner_product(
        rows_side,
        cols_side,
        k=k,
        device=x.device,
        chunk_size=chunk_size,
        candidates=cast("lap_sparse.Candidates", candidates),
    )
    cols = np.asarray(res.cols, dtype=np.int64)
    if swap:
        out = np.full(x.shape[0], -1, dtype=np.int64)
        out[cols] = np.arange(cols.shape[0], dtype=np.int64)
    else:
        out = cols
    info = {
        "objective": float(res.total),
        "max_violation": float(res.max_violation),
        "rounds": float(res.rounds),
        "n_candidates": float(res.n_candidates),
    }
    return Assignment(cols=out, info=info)


def _greedy_solver(
    x: Tensor, y: Tensor, *, metric: str, chunk_size: int, k: int, candidates: str = "auto"
) -> Assignment:
    del candidates, k
    if y.shape[0] == 0:
        return Assignment(cols=np.full(x.shape[0], -1, dtype=np.int64), info={"n_collisions": 0.0})
    # Best partner under the metric itself: for MSE that is argmax ⟨x, y⟩ − ½‖y‖², not argmax ⟨x, y⟩.
    if metric == "mse":
        xs = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        ys = torch.cat([y, -0.5 * (y * y).sum(dim=1, keepdim=True)], dim=1)
    else:
        xs, ys = x, y
    out = np.empty(x.shape[0], dtype=np.int64)
    for start, block in iter_score_chunks(xs, ys, chunk_size=chunk_size):
        out[start : start + block.shape[0]] = block.argmax(dim=1).cpu().numpy()
    n_collisions = float(out.shape[0] - np.unique(out).shape[0])
    return Assignment(cols=out, info={"n_collisions": n_collisions})


def _identity_solver(
    x: Tensor, y: Tensor, *, metric: str, chunk_size: int, k: int, candidates: str = "auto"
) -> Assignment:
    del candidates, metric, chunk_size, k
    n, m = x.shape[0], y.shape[0]
    out = np.arange(n, dtype=np.int64)
    out[out >= m] = -1
    return Assignment(cols=out, info={})


register_solver("scipy", _scipy_solver)
register_solver("sparse", _sparse_solver)
register_solver("greedy", _greedy_solver)
register_solver("identity", _identity_solver)
