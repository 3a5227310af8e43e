"""Assignment solvers: the scipy-compatible dense entry point, the solver registry behind ``match()``,
the exact reference (scipy, brute force), the greedy / identity baselines, and the solvers' memory
model.

:func:`linear_sum_assignment` is a drop-in for :func:`scipy.optimize.linear_sum_assignment` on a dense
cost matrix (same arguments, semantics and errors) that can use the certified solver of
:mod:`saematch_core.lap_sparse` instead of scipy's.

Every solver in :data:`SOLVERS` takes the two sides' feature vectors ``x`` (F_A, D) and ``y`` (F_B, D)
(already unit-normalised for the cosine metric) and returns an :class:`Assignment`: ``cols[i]`` is the
partner in B of feature ``i`` of A, or ``-1``.

Exact solvers minimise the summed cost over one-to-one assignments that cover the smaller side. With
the MSE metric on equal widths this is the same as maximising ``Σ ⟨x_i, y_P(i)⟩``, and the solvers are
handed that inner-product form (scipy is much faster on ``−x·yᵀ`` than on the MSE-form matrix, whose
row/column norm terms defeat its column reduction). With unequal widths the norms of the larger side's
*chosen* rows matter, so :func:`lap_vectors` appends one coordinate that carries ``−½‖y_j‖²`` (in
float64) and the problem stays an inner-product assignment.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Literal, NamedTuple, Protocol, get_args

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from saematch_core.cost import check_metric, iter_score_chunks
from saematch_core.errors import InfeasibleMatchError

__all__ = [
    "CANDIDATES",
    "DEFAULT_TOL",
    "DENSE_SOLVERS",
    "SOLVERS",
    "Assignment",
    "Candidates",
    "DenseSolver",
    "SolverFn",
    "as_cost_matrix",
    "auto_dense_solver",
    "brute_force_assignment",
    "check_candidates",
    "check_tol",
    "lap_vectors",
    "linear_sum_assignment",
    "register_solver",
    "solve",
    "solve_memory_bytes",
]

logger = logging.getLogger(__name__)

_BRUTE_FORCE_MAX = 8

DEFAULT_TOL = 1e-13
"""Default relative tolerance of the certified solvers (``tol`` of :func:`solve`,
:func:`linear_sum_assignment`, ``MatchConfig.tol``): an entry counts as improving a row when its gain
exceeds ``tol`` times the magnitude of the two scores compared (:mod:`saematch_core.lap_sparse`)."""

Candidates = Literal["auto", "float32", "bfloat16"]
"""Precision of the certified sparse solver's candidate search."""
CANDIDATES: tuple[str, ...] = get_args(Candidates)

DenseSolver = Literal["auto", "sparse", "dense", "scipy"]
"""Solvers of :func:`linear_sum_assignment`."""
DENSE_SOLVERS: tuple[str, ...] = get_args(DenseSolver)


def check_candidates(value: object, name: str = "candidates") -> Candidates:
    """``value`` if it is one of :data:`CANDIDATES`, else a ``ValueError`` naming ``name``."""
    if value not in CANDIDATES:
        raise ValueError(f"{name}: expected one of {list(CANDIDATES)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_tol(value: object, name: str = "tol") -> float:
    """``value`` as a float if it is finite and ``>= 0``, else a ``ValueError`` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"{name}: expected a finite float >= 0, got {value!r}")
    return float(value)


class Assignment(NamedTuple):
    """Output of a solver in :data:`SOLVERS`."""

    cols: np.ndarray
    """int64, shape (F_A,): partner in B of each feature of A, ``-1`` where unmatched."""
    info: dict[str, float]
    """Diagnostics: ``objective`` (the maximised inner-product score, float64, for exact solvers) and
    solver-specific values: the certified solver's ``gap_bound`` (a proven bound on how far
    ``objective`` may fall short of the optimum, in the same units; 0 when proven optimal), ``rounds``
    and ``n_candidates``; the greedy solver's ``n_collisions``."""


class SolverFn(Protocol):
    """Signature of a registered solver: the vectors, then keyword options (solvers ignore the ones
    that do not concern them)."""

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        metric: str,
        chunk_size: int,
        k: int,
        candidates: Candidates = "auto",
        tol: float = DEFAULT_TOL,
    ) -> Assignment: ...


# ---------------------------------------------------------------------- scipy-compatible dense interface
def _numpy_input(cost: Any) -> np.ndarray:
    if isinstance(cost, Tensor):
        t = cost.detach().cpu()
        # numpy has no bfloat16: widen floats (exactly) instead of letting the conversion fail
        return (t.double() if t.is_floating_point() else t).numpy()
    return np.asarray(cost)


def _where(mask: np.ndarray) -> tuple[int, tuple[int, ...]]:
    flat = np.flatnonzero(mask)
    return flat.size, tuple(int(i) for i in np.unravel_index(flat[0], mask.shape)) if flat.size else ()


def as_cost_matrix(cost: Any, maximize: bool = False, *, name: str = "cost") -> np.ndarray:
    """``cost`` as a C-contiguous float64 matrix to *minimise* (negated when ``maximize``), checked as
    :func:`scipy.optimize.linear_sum_assignment` checks it.

    Any array-like (lists, numpy arrays of any strides, torch tensors of any dtype and device) of a
    real numeric or bool dtype. ``+inf`` (after the negation for ``maximize``) marks a forbidden
    pairing; NaN and ``-inf`` are rejected.

    Raises
    ------
    ValueError
        Not 2-D (``expected a matrix``), or NaN / ``-inf`` entries (``contains invalid numeric
        entries``, with their count and the first position).
    TypeError
        Not a real numeric or bool dtype (``Cannot cast array data``).
    """
    arr = _numpy_input(cost)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a matrix (2-D array), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise TypeError(
            f"{name}: expected a real numeric or bool matrix; Cannot cast array data from "
            f"{arr.dtype!r} to dtype('float64') according to the rule 'safe'"
        )
    out = np.array(arr, dtype=np.float64, order="C")  # a copy: negated in place below
    if maximize:
        # the checks below see exactly what the minimiser will see
        np.negative(out, out=out)
    bad = np.isnan(out) | (out == -np.inf)
    n_bad, first = _where(bad)
    if n_bad:
        n_nan = int(np.isnan(out).sum())
        what = "+inf" if maximize else "-inf"
        raise ValueError(
            f"{name}: matrix contains invalid numeric entries: {n_nan} NaN and {n_bad - n_nan} {what}, "
            f"first at {first}"
        )
    return out


def _infeasible(name: str, shape: tuple[int, ...]) -> InfeasibleMatchError:
    return InfeasibleMatchError(
        f"{name}: cost matrix is infeasible: no assignment of all {min(shape)} "
        f"{'rows' if shape[0] <= shape[1] else 'columns'} of the {shape[0]} × {shape[1]} matrix avoids "
        "its forbidden (infinite) entries"
    )


def auto_dense_solver(n_rows: int, n_cols: int) -> Literal["sparse", "scipy"]:
    """The solver ``linear_sum_assignment(solver="auto")`` uses for an ``n_rows × n_cols`` matrix.

    scipy, at every size. Measured side by side (``python -m benchmarks.run --dense``), the
    certified sparse solver was faster than scipy on large unstructured matrices (uniform random
    entries: 6.8–7.8× at n = 2000–4000) and slower on structured ones (a noisy planted permutation,
    as in feature matching: 0.1–0.8× for n = 1000–8000; rank 1: 0.8–0.9×; many ties: 0.3×) and,
    depending on the draw, on matrices of normal entries or of n <= 1000; nothing cheap tells these
    apart. Its strength is inner-product problems, where it never forms the matrix
    (:func:`saematch_core.lap_sparse.solve_inner_product`, ``match()``)."""
    del n_rows, n_cols
    return "scipy"


def linear_sum_assignment(
    cost: Any, maximize: bool = False, *, solver: DenseSolver = "auto", tol: float = DEFAULT_TOL
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the linear sum assignment problem: a drop-in for :func:`scipy.optimize.linear_sum_assignment`.

    Assign every row to a distinct column (every column to a distinct row when there are more rows)
    so that the summed cost is minimal (maximal with ``maximize``).

    Parameters
    ----------
    cost : array_like, shape (n, m)
        Real numeric or bool entries: lists, numpy arrays of any strides, torch tensors of any
        floating dtype (float16/bfloat16 included) or device. ``+inf`` forbids a pairing (``-inf`` when
        maximising); NaN and the other infinity are errors.
    maximize : bool
        Maximise instead of minimise the total.
    solver : ``"auto"``, ``"sparse"``, ``"dense"`` or ``"scipy"``
        ``"sparse"``: the certified sparse solver (:func:`saematch_core.lap_sparse.solve_scores`), fast
        when each row's optimal partner is among its best few entries (as in SAE matching and most
        random matrices). ``"dense"``: its dense kernel, scipy's algorithm with the same certificate.
        ``"scipy"``: :func:`scipy.optimize.linear_sum_assignment`. ``"auto"``: the one measured fastest
        on dense matrices (:func:`auto_dense_solver`; scipy today). All return an optimal assignment;
        among tied optima they may choose differently.
    tol : float
        Relative tolerance of the certified solvers (:data:`DEFAULT_TOL`; ignored by scipy).

    Returns
    -------
    row_ind, col_ind : ndarray of int64, shape (min(n, m),)
        ``row_ind`` sorted ascending; row ``row_ind[t]`` is assigned to column ``col_ind[t]``, and
        ``cost[row_ind, col_ind].sum()`` is the optimum.

    Raises
    ------
    ValueError
        Not 2-D (``expected a matrix``), NaN or ``-inf`` entries (``contains invalid numeric entries``,
        with their count and first position) or an unknown ``solver``.
    InfeasibleMatchError
        A ``ValueError``: every assignment uses a forbidden entry (``cost matrix is infeasible``).
    TypeError
        Not a real numeric or bool dtype (``Cannot cast array data``).

    Notes
    -----
    The certified solvers prove their answer optimal for the float64 matrix: the total they return
    is within a stated bound (``gap_bound`` of :func:`~saematch_core.lap_sparse.solve_scores`: 0, or
    the float64 rounding of its prices) of the best total of any assignment. On large unstructured
    matrices the sparse one is up to 8× faster than scipy; on structured ones (planted permutations,
    low rank, many ties) scipy is faster, and on low-rank ones the sparse solver falls back to its
    dense kernel.

    Examples
    --------
    >>> rows, cols = linear_sum_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    >>> rows.tolist(), cols.tolist()
    ([0, 1, 2], [1, 0, 2])
    >>> linear_sum_assignment([[1.0, float("inf")], [2.0, 5.0]])[1].tolist()
    [0, 1]
    """
    if solver not in DENSE_SOLVERS:
        raise ValueError(f"solver: expected one of {list(DENSE_SOLVERS)}, got {solver!r}")
    tol = check_tol(tol)
    C = as_cost_matrix(cost, maximize)
    n, m = C.shape
    if min(n, m) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    transposed = n > m
    if transposed:
        C = np.ascontiguousarray(C.T)
    chosen = auto_dense_solver(n, m) if solver == "auto" else solver
    if chosen == "scipy":
        try:
            rows, cols = scipy.optimize.linear_sum_assignment(C)
        except ValueError as exc:
            if "infeasible" in str(exc):
                raise _infeasible("cost", (n, m)) from None
            raise
        cols = cols[np.argsort(rows)]
    else:
        from saematch_core import lap_sparse  # numba: imported on first use

        try:
            res = lap_sparse.solve_cost_matrix(C, method="dense" if chosen == "dense" else "sparse", tol=tol)
        except InfeasibleMatchError:
            raise _infeasible("cost", (n, m)) from None
        cols = res.cols
    rows = np.arange(cols.shape[0], dtype=np.int64)
    cols = cols.astype(np.int64)
    if transposed:
        order = np.argsort(cols)
        rows, cols = cols[order], rows[order]
    return rows, cols


def brute_force_assignment(cost: Any, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reference solver: try every one-to-one assignment of the smaller side (larger side ≤ 8).

    Same contract as :func:`linear_sum_assignment` (``+inf`` forbids a pairing); among tied optima the
    lexicographically first column sequence wins.
    """
    arr = as_cost_matrix(cost, maximize)
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
    if best is None and n:
        raise _infeasible("cost", arr.T.shape if transposed else arr.shape)
    rows = np.arange(n, dtype=np.int64)
    cols = np.asarray(best if best is not None else (), dtype=np.int64)
    if transposed:
        order = np.argsort(cols)
        rows, cols = cols[order], rows[order]
    return rows, cols


# ---------------------------------------------------------------------- solver registry
SOLVERS: dict[str, SolverFn] = {}
"""Solvers by name; :func:`register_solver` adds one (then ``MatchConfig.solver`` and the command
line accept it too)."""


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
    candidates: Candidates = "auto",
    tol: float = DEFAULT_TOL,
) -> Assignment:
    """Run the solver registered as ``name`` on feature vectors ``x`` (F_A, D) and ``y`` (F_B, D).

    ``k``, ``candidates`` (the precision of the candidate search) and ``tol`` (the certificate's relative
    tolerance, :data:`DEFAULT_TOL`) only concern the certified sparse solver.
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
    check_metric(metric)
    return fn(
        x,
        y,
        metric=metric,
        chunk_size=chunk_size,
        k=k,
        candidates=check_candidates(candidates),
        tol=check_tol(tol),
    )


def solve_memory_bytes(name: str, n_a: int, n_b: int, *, chunk_size: int = 4096, k: int = 8) -> int:
    """Rough peak memory (bytes) that solver ``name`` holds beyond its inputs for an ``n_a × n_b``
    problem: scipy's dense float64 matrix; for the certified sparse solver its score blocks, candidate
    state and dense fallback (:func:`saematch_core.lap_sparse.memory_bytes`); 0 for the baselines and
    for solvers registered without a memory model."""
    n, m = sorted((int(n_a), int(n_b)))
    if name == "scipy":
        return 8 * n * m
    if name == "sparse":
        from saematch_core import lap_sparse

        return lap_sparse.memory_bytes(n, m, chunk_size=chunk_size, k=k)
    return 0


def lap_vectors(x: Tensor, y: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Vectors whose inner-product assignment is the minimum-cost assignment.

    For ``"cosine"`` (unit rows) and for MSE with ``F_A == F_B`` the vectors are returned unchanged. For
    MSE with unequal widths the larger side's rows get an extra coordinate ``−½‖y_j‖²`` and the smaller
    side's rows a ``1``, because ``Σ‖x_i − y_P(i)‖² = const − 2 Σ (⟨x_i, y_P(i)⟩ − ½‖y_P(i)‖²)`` when every
    row of the smaller side is matched. Both sides are then float64 (the inputs widened exactly, the
    norm term computed in float64), so the assignment is the best one for the vectors as given, not for
    a norm rounded to their precision.
    """
    if metric == "cosine" or x.shape[0] == y.shape[0]:
        return x, y
    small, large = (x, y) if x.shape[0] < y.shape[0] else (y, x)
    small, large = small.double(), large.double()
    small = torch.cat([small, torch.ones_like(small[:, :1])], dim=1)
    large = torch.cat([large, -0.5 * (large * large).sum(dim=1, keepdim=True)], dim=1)
    return (small, large) if x.shape[0] < y.shape[0] else (large, small)


def _dense_scores(x: Tensor, y: Tensor, chunk_size: int) -> np.ndarray:
    # float64 whatever the inputs' dtype: half-precision scores overflow (float16 norms of ~300) and
    # round the problem
    out = np.empty((x.shape[0], y.shape[0]), dtype=np.float64)
    for start, block in iter_score_chunks(x, y, chunk_size=chunk_size, dtype=torch.float64):
        out[start : start + block.shape[0]] = block.detach().cpu().numpy()
    return out


def _scipy_solver(x: Tensor, y: Tensor, *, metric: str, chunk_size: int, **_: Any) -> Assignment:
    xs, ys = lap_vectors(x, y, metric)
    scores = _dense_scores(xs, ys, chunk_size)
    np.negative(scores, out=scores)  # minimise −x·yᵀ, in place: no second F×F array
    rows, cols = scipy.optimize.linear_sum_assignment(scores)
    out = np.full(x.shape[0], -1, dtype=np.int64)
    out[rows] = cols
    return Assignment(cols=out, info={"objective": _exact_objective(xs, ys, rows, cols)})


def _exact_objective(x: Tensor, y: Tensor, rows: np.ndarray, cols: np.ndarray) -> float:
    """``Σ ⟨x_rows[t], y_cols[t]⟩`` re-scored in float64, whatever dtype the score matrix used."""
    r = torch.as_tensor(rows, dtype=torch.long, device=x.device)
    c = torch.as_tensor(cols, dtype=torch.long, device=y.device)
    return math.fsum((x[r].double() * y[c].double()).sum(dim=1).tolist())


def _sparse_solver(
    x: Tensor,
    y: Tensor,
    *,
    metric: str,
    chunk_size: int,
    k: int,
    candidates: Candidates = "auto",
    tol: float = DEFAULT_TOL,
    **_: Any,
) -> Assignment:
    # Imported on first use: numba's import and JIT cache load cost ~1 s that the other solvers never pay.
    from saematch_core import lap_sparse

    xs, ys = lap_vectors(x, y, metric)
    swap = xs.shape[0] > ys.shape[0]
    rows_side, cols_side = (ys, xs) if swap else (xs, ys)
    res = lap_sparse.solve_inner_product(
        rows_side, cols_side, k=k, device=x.device, chunk_size=chunk_size, candidates=candidates, tol=tol
    )
    cols = np.asarray(res.cols, dtype=np.int64)
    if swap:
        out = np.full(x.shape[0], -1, dtype=np.int64)
        out[cols] = np.arange(cols.shape[0], dtype=np.int64)
    else:
        out = cols
    info = {
        "objective": float(res.total),
        "gap_bound": float(res.gap_bound),
        "rounds": float(res.rounds),
        "n_candidates": float(res.n_candidates),
    }
    return Assignment(cols=out, info=info)


def _greedy_solver(x: Tensor, y: Tensor, *, metric: str, chunk_size: int, **_: Any) -> Assignment:
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


def _identity_solver(x: Tensor, y: Tensor, **_: Any) -> Assignment:
    n, m = x.shape[0], y.shape[0]
    out = np.arange(n, dtype=np.int64)
    out[out >= m] = -1
    return Assignment(cols=out, info={})


register_solver("scipy", _scipy_solver)
register_solver("sparse", _sparse_solver)
register_solver("greedy", _greedy_solver)
register_solver("identity", _identity_solver)
