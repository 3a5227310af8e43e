"""Assignment solvers: hand-solved cases, brute force, registry, baselines and the sparse slot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import LAP_CASES

from saematch_core.cost import cost_matrix, normalize_rows
from saematch_core.lap import (
    SOLVERS,
    Assignment,
    brute_force_assignment,
    lap_vectors,
    linear_assignment,
    register_solver,
    solve,
)

DENSE_SOLVERS = [linear_assignment, brute_force_assignment]


def _check_assignment(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    n, m = cost.shape
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == cols.shape == (min(n, m),)
    assert np.all(np.diff(rows) > 0), "rows must be sorted and distinct"
    assert np.unique(cols).shape == cols.shape, "cols must be distinct"
    return float(cost[rows, cols].sum()) if rows.size else 0.0


@pytest.mark.parametrize("solver", DENSE_SOLVERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("name", "cost", "expected"), LAP_CASES, ids=[c[0] for c in LAP_CASES])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_hand_solved_cases(solver, name, cost, expected, transpose, maximize) -> None:
    arr = np.asarray(cost)
    if transpose:
        arr = arr.T
    if maximize:
        # Maximising the negated matrix has the negated optimum.
        arr = -arr.astype(np.float64)
    rows, cols = solver(arr, maximize=maximize)
    total = _check_assignment(np.asarray(arr, dtype=np.float64), rows, cols)
    assert total == pytest.approx(-expected if maximize else expected)


def test_list_input_equals_array_input() -> None:
    cost = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]
    r1, c1 = linear_assignment(cost)
    r2, c2 = linear_assignment(np.asarray(cost, dtype=np.float64))
    assert r1.tolist() == r2.tolist() and c1.tolist() == c2.tolist()


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7)])
def test_random_cross_check_against_brute_force(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    for trial in range(5):
        # Integer costs on some trials make ties likely; compare totals, not indices.
        cost = rng.integers(0, 4, size=shape).astype(float) if trial % 2 else rng.normal(size=shape)
        total_fast = _check_assignment(cost, *linear_assignment(cost))
        total_ref = _check_assignment(cost, *brute_force_assignment(cost))
        assert total_fast == pytest.approx(total_ref)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"cost: expected a 2-D array, got shape \(5,\)"):
        linear_assignment(np.zeros(5))
    with pytest.raises(TypeError, match="cost: expected a real numeric array, got dtype <U1"):
        linear_assignment([["a", "b"], ["c", "d"]])
    with pytest.raises(TypeError, match="complex"):
        linear_assignment(np.ones((2, 2), dtype=complex))
    bad = np.zeros((3, 4))
    bad[0, 2] = np.nan
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"cost: 2 non-finite entries \(2 NaN, 0 inf\), first at \(0, 2\)"):
        linear_assignment(bad)
    inf = np.zeros((2, 2))
    inf[1, 1] = -np.inf
    with pytest.raises(ValueError, match=r"cost: 1 non-finite entries \(0 NaN, 1 inf\), first at \(1, 1\)"):
        linear_assignment(inf, maximize=True)
    with pytest.raises(ValueError, match="brute force is limited to 8"):
        brute_force_assignment(np.zeros((9, 3)))


def test_registry() -> None:
    assert {"scipy", "sparse", "greedy", "identity"} <= set(SOLVERS)
    with pytest.raises(ValueError, match="solver 'scipy' is already registered"):
        register_solver("scipy", SOLVERS["scipy"])
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"solver: expected one of .*got 'nope'"):
        solve("nope", x, x)
    with pytest.raises(ValueError, match=r"x, y: expected the same vector length D"):
        solve("scipy", x, torch.zeros(3, 4))


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
    _, naive = linear_assignment((x @ y.T).numpy(), maximize=True)
    assert naive.tolist() == [1], "the plain inner product would pick the long vector"
    xs, ys = lap_vectors(x, y, "mse")
    assert xs.shape == (1, 3) and ys[:, -1].tolist() == [-0.5, -50.0]


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
        assert fast.info["objective"] == pytest.approx(ref.info["objective"], rel=1e-9, abs=1e-9)
        assert _assignment_total(x, y, metric, fast.cols) == pytest.approx(
            _assignment_total(x, y, metric, ref.cols), abs=1e-9
        )
