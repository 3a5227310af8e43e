"""Assignment solvers: the scipy-compatible entry point against scipy's own test cases and the brute
force, the registry, the baselines and the memory model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
import scipy.optimize
import torch
from cases import LAP_CASES
from scipy.sparse import random_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from saematch_core.cost import cost_matrix, normalize_rows
from saematch_core.errors import InfeasibleMatchError
from saematch_core.lap import (
    DENSE_SOLVERS,
    SOLVERS,
    Assignment,
    auto_dense_solver,
    brute_force_assignment,
    lap_vectors,
    linear_sum_assignment,
    register_solver,
    solve,
    solve_memory_bytes,
)

Solver = Callable[..., tuple[np.ndarray, np.ndarray]]
EXACT: list[tuple[str, Solver]] = [
    *[(name, partial(linear_sum_assignment, solver=name)) for name in DENSE_SOLVERS],
    ("brute_force", brute_force_assignment),
]
"""Every exact dense solver: each of ``linear_sum_assignment``'s and the brute force."""
EXACT_IDS = [name for name, _ in EXACT]
FAST = [(name, fn) for name, fn in EXACT if name != "brute_force"]
FAST_IDS = [name for name, _ in FAST]


def _check_assignment(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    n, m = cost.shape
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == cols.shape == (min(n, m),)
    assert np.all(np.diff(rows) > 0), "rows must be sorted and distinct"
    assert np.unique(cols).shape == cols.shape, "cols must be distinct"
    return float(cost[rows, cols].sum()) if rows.size else 0.0


# ---------------------------------------------------------------------- hand-solved cases
@pytest.mark.parametrize(("solver_name", "solver"), EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize(("name", "cost", "expected"), LAP_CASES, ids=[c[0] for c in LAP_CASES])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_hand_solved_cases(solver_name, solver, name, cost, expected, transpose, maximize) -> None:
    arr = np.asarray(cost)
    if transpose:
        arr = arr.T
    if maximize:
        # Maximising the negated matrix has the negated optimum (forbidden +inf becomes -inf).
        arr = -arr.astype(np.float64)
    rows, cols = solver(arr, maximize=maximize)
    total = _check_assignment(np.asarray(arr, dtype=np.float64), rows, cols)
    assert total == pytest.approx(-expected if maximize else expected)


# scipy's hand-solved cases with the cost of each row's partner (its csgraph matching tests): the
# optimum is unique, so every solver must return these very pairs.
SCIPY_SMALL = [
    ([[400, 150, 400], [400, 450, 600], [300, 225, 300]], [150, 400, 300]),
    ([[400, 150, 400, 1], [400, 450, 600, 2], [300, 225, 300, 3]], [150, 2, 300]),
    ([[10, 10, 8], [9, 8, 1], [9, 7, 4]], [10, 1, 7]),
    ([[10, np.inf, np.inf], [np.inf, np.inf, 1], [np.inf, 7, np.inf]], [10, 1, 7]),
]


@pytest.mark.parametrize(("solver_name", "solver"), EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize(("cost", "per_row"), SCIPY_SMALL)
@pytest.mark.parametrize("sign", [1, -1])
def test_scipy_small_inputs_give_the_same_pairs(solver_name, solver, cost, per_row, sign) -> None:
    C = sign * np.asarray(cost, dtype=np.float64)
    rows, cols = solver(C, maximize=sign == -1)
    assert rows.tolist() == sorted(rows.tolist())
    assert (C[rows, cols] == sign * np.asarray(per_row)).all()
    rows, cols = solver(C.T, maximize=sign == -1)
    assert sorted(C.T[rows, cols].tolist()) == sorted((sign * np.asarray(per_row)).tolist())


# ---------------------------------------------------------------------- scipy's input rules
@pytest.mark.parametrize(("solver_name", "solver"), EXACT, ids=EXACT_IDS)
def test_input_errors_match_scipy(solver_name, solver) -> None:
    with pytest.raises(ValueError, match=r"cost: expected a matrix \(2-D array\), got shape \(3,\)"):
        solver([1, 2, 3])
    with pytest.raises(TypeError, match="Cannot cast array data"):
        solver(np.identity(3).astype(str))
    with pytest.raises(TypeError, match="Cannot cast array data"):
        solver(np.ones((2, 2), dtype=complex))
    nan = np.diag([np.nan, 1, 1])
    nan[2, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"contains invalid numeric entries: 2 NaN and 0 -inf, first at \(0, 0\)"
    ):
        solver(nan)
    with pytest.raises(
        ValueError, match=r"contains invalid numeric entries: 0 NaN and 1 -inf, first at \(1, 1\)"
    ):
        solver(np.diag([1, -np.inf, 1]))
    # maximising: the negated matrix is checked, so +inf is the invalid one and -inf is forbidden
    with pytest.raises(ValueError, match=r"0 NaN and 1 \+inf, first at \(0, 2\)"):
        solver(np.array([[0.0, 1.0, np.inf]]), maximize=True)
    infeasible = np.identity(3)
    infeasible[:, 0] = np.inf
    with pytest.raises(InfeasibleMatchError, match="cost matrix is infeasible"):
        solver(infeasible)
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        solver(-infeasible, maximize=True)


def test_unknown_solver_and_bad_tol() -> None:
    with pytest.raises(ValueError, match=r"solver: expected one of \['auto', 'sparse', 'dense', 'scipy'\]"):
        linear_sum_assignment(np.eye(2), solver="hungarian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tol: expected a finite float >= 0, got -1"):
        linear_sum_assignment(np.eye(2), tol=-1)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize(("solver_name", "solver"), FAST, ids=FAST_IDS)
def test_list_matrix_and_bool_inputs_equal_arrays(solver_name, solver) -> None:
    C = [[1, 2, 3], [4, 5, 6]]
    ref = solver(np.asarray(C))
    for other in (C, np.asmatrix(C), torch.tensor(C)):
        got = solver(other)
        assert [a.tolist() for a in got] == [a.tolist() for a in ref]
    eye = np.identity(3)
    assert [a.tolist() for a in solver(eye.astype(np.bool_))] == [a.tolist() for a in solver(eye)]


@pytest.mark.parametrize(("solver_name", "solver"), FAST, ids=FAST_IDS)
def test_constant_matrix_every_assignment_ties(solver_name, solver) -> None:
    # scipy's regression #11602; scipy itself returns the identity, and so do our kernels' tie rules
    rows, cols = solver(np.ones((8, 8)))
    assert _check_assignment(np.ones((8, 8)), rows, cols) == 8.0
    if solver_name in ("scipy", "dense"):
        assert cols.tolist() == list(range(8))


@pytest.mark.parametrize(("solver_name", "solver"), EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize("shape", [(0, 0), (2, 0), (0, 3)])
def test_trivial_shapes(solver_name, solver, shape) -> None:
    rows, cols = solver(np.empty(shape))
    assert rows.shape == cols.shape == (0,)


@pytest.mark.parametrize(("solver_name", "solver"), FAST, ids=FAST_IDS)
def test_agrees_with_sparse_matching_on_scipys_random_sparse_inputs(solver_name, solver) -> None:
    # scipy's cross-check: random 100 × 100 matrices with 6 % finite entries (+inf elsewhere), a third
    # of them infeasible (50 of scipy's 100); both methods must raise together or reach the same total.
    rng = np.random.default_rng(12342309)
    n_feasible = 0
    for _ in range(50):
        sparse = random_array(
            (100, 100), density=0.06, rng=rng, data_sampler=lambda size: rng.integers(1, 100, size)
        )
        dense = np.full(sparse.shape, np.inf)
        dense[sparse.row, sparse.col] = sparse.data
        try:
            r, c = min_weight_full_bipartite_matching(sparse.tocsr())
            expected = float(sparse.tocsr()[r, c].sum())
        except ValueError:
            expected = None
        if expected is None:
            with pytest.raises(ValueError, match="infeasible"):
                solver(dense)
            continue
        n_feasible += 1
        rows, cols = solver(dense)
        assert _check_assignment(dense, rows, cols) == expected
    assert 20 <= n_feasible <= 45


@pytest.mark.parametrize(("solver_name", "solver"), EXACT, ids=EXACT_IDS)
def test_any_strides_and_memory_order(solver_name, solver) -> None:
    C = np.random.default_rng(5).random((6, 8))
    for view in (C[:, ::-1], C[::-1], C[::2], np.asfortranarray(C), C.T[::-1]):
        rows, cols = solver(view)
        ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(np.array(view))
        assert _check_assignment(view, rows, cols) == pytest.approx(float(view[ref_rows, ref_cols].sum()))


@pytest.mark.parametrize(("solver_name", "solver"), FAST, ids=FAST_IDS)
@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a.astype(np.int8),
        lambda a: a.astype(np.uint8),
        lambda a: a.astype(np.uint64),
        lambda a: a.astype(np.float16),
        lambda a: a.astype(np.float32),
        lambda a: torch.from_numpy(a).to(torch.bfloat16),
        lambda a: torch.from_numpy(a).to(torch.float16),
        lambda a: torch.from_numpy(a).to(torch.int32),
    ],
    ids=["int8", "uint8", "uint64", "float16", "float32", "torch-bfloat16", "torch-float16", "torch-int32"],
)
def test_dtypes(solver_name, solver, convert) -> None:
    # small integers: exact in every dtype, so every dtype poses the same problem
    C = np.random.default_rng(6).integers(0, 50, (7, 9)).astype(np.float64)
    rows, cols = solver(convert(C))
    ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(C)
    assert _check_assignment(C, rows, cols) == float(C[ref_rows, ref_cols].sum())


@pytest.mark.parametrize(("solver_name", "solver"), FAST, ids=FAST_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7)])
def test_random_cross_check_against_brute_force(solver_name, solver, shape) -> None:
    rng = np.random.default_rng(sum(shape))
    for trial in range(5):
        # Integer costs on some trials make ties likely; compare totals, not indices.
        cost = rng.integers(0, 4, size=shape).astype(float) if trial % 2 else rng.normal(size=shape)
        total_fast = _check_assignment(cost, *solver(cost))
        total_ref = _check_assignment(cost, *brute_force_assignment(cost))
        assert total_fast == pytest.approx(total_ref)


def test_brute_force_limit() -> None:
    with pytest.raises(ValueError, match="brute force is limited to 8"):
        brute_force_assignment(np.zeros((9, 3)))


def test_auto_uses_the_solver_measured_fastest_on_dense_matrices() -> None:
    assert {auto_dense_solver(n, m) for n, m in [(10, 10), (1000, 1000), (8000, 8000), (256, 4096)]} == {
        "scipy"
    }
    C = np.random.default_rng(7).random((30, 40))
    assert [a.tolist() for a in linear_sum_assignment(C)] == [
        a.tolist() for a in linear_sum_assignment(C, solver="scipy")
    ]


# ---------------------------------------------------------------------- registry and vector solvers
def test_registry() -> None:
    assert {"scipy", "sparse", "greedy", "identity"} <= set(SOLVERS)
    with pytest.raises(ValueError, match="solver 'scipy' is already registered"):
        register_solver("scipy", SOLVERS["scipy"])
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"solver: expected one of .*got 'nope'"):
        solve("nope", x, x)
    with pytest.raises(ValueError, match=r"x, y: expected the same vector length D"):
        solve("scipy", x, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="metric: expected one of"):
        solve("scipy", x, x, metric="l1")
    with pytest.raises(ValueError, match=r"candidates: expected one of \['auto', 'float32', 'bfloat16'\]"):
        solve("sparse", x, x, candidates="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tol: expected a finite float >= 0"):
        solve("sparse", x, x, tol=float("nan"))


def _min_cost_total(x: torch.Tensor, y: torch.Tensor, metric: str) -> float:
    cost = cost_matrix(x.double(), y.double(), metric).numpy()
    return _check_assignment(cost, *brute_force_assignment(cost))


def _assignment_total(x: torch.Tensor, y: torch.Tensor, metric: str, cols: np.ndarray) -> float:
    cost = cost_matrix(x.double(), y.double(), metric).numpy()
    rows = np.nonzero(cols >= 0)[0]
    return float(cost[rows, cols[rows]].sum())


@pytest.mark.parametrize("metric", ["mse", "cosine"])
@pytest.mark.parametrize(("n", "m"), [(6, 6), (4, 7), (7, 4), (1, 5)])
def test_scipy_solver_is_min_cost_assignment(metric, n, m) -> None:
    g = torch.Generator().manual_seed(n * 10 + m)
    for _ in range(3):
        # Rows of very different norms: the regime where the rectangular MSE norm term matters.
        x = (
            torch.randn(n, 5, generator=g, dtype=torch.float64)
            * torch.rand(n, 1, generator=g, dtype=torch.float64)
            * 3
        )
        y = (
            torch.randn(m, 5, generator=g, dtype=torch.float64)
            * torch.rand(m, 1, generator=g, dtype=torch.float64)
            * 3
        )
        xs, ys = (normalize_rows(x), normalize_rows(y)) if metric == "cosine" else (x, y)
        res = solve("scipy", xs, ys, metric=metric, chunk_size=2)
        assert isinstance(res, Assignment)
        matched = res.cols[res.cols >= 0]
        assert matched.shape[0] == min(n, m) and np.unique(matched).shape == matched.shape
        assert _assignment_total(x, y, metric, res.cols) == pytest.approx(
            _min_cost_total(x, y, metric), abs=1e-9
        )


def test_rectangular_mse_needs_the_norm_term() -> None:
    # x is closest to y[0]; y[1] has the larger inner product only because it is long.
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    assert solve("scipy", x, y, metric="mse").cols.tolist() == [0]
    assert solve("scipy", y, x, metric="mse").cols.tolist() == [0, -1]
    _, naive = linear_sum_assignment((x @ y.T).numpy(), maximize=True)
    assert naive.tolist() == [1], "the plain inner product would pick the long vector"
    xs, ys = lap_vectors(x, y, "mse")
    assert xs.shape == (1, 3) and ys[:, -1].tolist() == [-0.5, -50.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rectangular_mse_norm_term_is_exact_for_low_precision_vectors(dtype: torch.dtype) -> None:
    # The norm coordinate in the vectors' own dtype would be rounded (bfloat16 keeps 8 bits), and
    # the solvers would then solve a neighbouring problem.
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(7, 8, generator=g) * 30).to(dtype)
    x = (torch.randn(4, 8, generator=g) * 30).to(dtype)
    xs, ys = lap_vectors(x, y, "mse")
    assert xs.dtype == ys.dtype == torch.float64
    exact = -0.5 * (y.double() ** 2).sum(dim=1)
    assert torch.equal(ys[:, -1], exact) and torch.equal(ys[:, :-1], y.double())
    assert torch.equal(xs[:, :-1], x.double()) and bool((xs[:, -1] == 1).all())


def test_scipy_solver_scores_in_float64_whatever_the_dtype() -> None:
    # float16 vectors of norm ~300 whose partners are aligned: their scores (~1e5) overflow float16
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(20, 64, generator=g) * 40).to(torch.float16)
    perm = torch.randperm(20, generator=g)
    y = x[perm] * 1.01
    assert not bool((x @ y.T).isfinite().all())
    res = solve("scipy", x, y, metric="mse")
    assert (res.cols[perm.numpy()] == np.arange(20)).all()
    assert np.isfinite(res.info["objective"])


def test_greedy_is_many_to_one_and_per_row_best() -> None:
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    res = solve("greedy", x, y, metric="mse")
    assert res.cols.tolist() == [0, 0, 1]
    assert res.info["n_collisions"] == 1.0
    g = torch.Generator().manual_seed(3)
    for metric in ("mse", "cosine"):
        a, b = torch.randn(9, 4, generator=g), torch.randn(5, 4, generator=g) * 3
        xs, ys = (normalize_rows(a), normalize_rows(b)) if metric == "cosine" else (a, b)
        cols = solve("greedy", xs, ys, metric=metric, chunk_size=4).cols
        best = cost_matrix(a.double(), b.double(), metric).argmin(dim=1)
        assert cols.tolist() == best.tolist()


def test_greedy_mse_is_not_max_inner_product() -> None:
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    assert solve("greedy", x, y, metric="mse").cols.tolist() == [0]


def test_identity_solver_rectangular() -> None:
    assert solve("identity", torch.zeros(3, 2), torch.zeros(5, 2)).cols.tolist() == [0, 1, 2]
    assert solve("identity", torch.zeros(5, 2), torch.zeros(3, 2)).cols.tolist() == [0, 1, 2, -1, -1]


@pytest.mark.parametrize(("n", "m"), [(12, 12), (8, 13), (13, 8)])
def test_sparse_solver_matches_scipy_objective(n, m) -> None:
    g = torch.Generator().manual_seed(n + m)
    for metric in ("mse", "cosine"):
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = torch.randn(m, 6, generator=g, dtype=torch.float64)
        if metric == "cosine":
            x, y = normalize_rows(x), normalize_rows(y)
        ref = solve("scipy", x, y, metric=metric)
        fast = solve("sparse", x, y, metric=metric, k=2)
        matched = fast.cols[fast.cols >= 0]
        assert matched.shape[0] == min(n, m) and np.unique(matched).shape == matched.shape
        assert fast.info["objective"] >= ref.info["objective"] - fast.info["gap_bound"] - 1e-12
        assert fast.info["gap_bound"] <= 1e-12 * abs(ref.info["objective"])
        assert _assignment_total(x, y, metric, fast.cols) == pytest.approx(
            _assignment_total(x, y, metric, ref.cols), abs=1e-9
        )


# ---------------------------------------------------------------------- memory model
def test_memory_model() -> None:
    assert solve_memory_bytes("scipy", 300, 200) == 8 * 300 * 200
    assert solve_memory_bytes("greedy", 10**5, 10**5) == solve_memory_bytes("identity", 5, 5) == 0
    small, big = (solve_memory_bytes("sparse", f, f) for f in (2048, 65536))
    # the dense fallback's matrix (512 MiB at most) and the score blocks count; never the whole
    # dense matrix of a large problem
    assert 8 * 2048 * 2048 <= small < 8 * 2048 * 2048 + (64 << 20)
    assert 6 * 4096 * 65536 <= big < 8 * 65536 * 65536 // 8
    assert solve_memory_bytes("sparse", 65536, 65536, chunk_size=1024) < big
    assert solve_memory_bytes("sparse", 300, 200) == solve_memory_bytes("sparse", 200, 300)


def test_custom_solver_has_no_memory_model() -> None:
    def mine(x: torch.Tensor, y: torch.Tensor, **_: Any) -> Assignment:
        return Assignment(cols=np.zeros(x.shape[0], np.int64), info={})

    register_solver("test-zeros", mine, overwrite=True)
    try:
        assert solve_memory_bytes("test-zeros", 100, 100) == 0
        assert solve("test-zeros", torch.zeros(3, 2), torch.zeros(4, 2)).cols.tolist() == [0, 0, 0]
    finally:
        del SOLVERS["test-zeros"]
