"""The certified solver against scipy on the float64 problem, where scaling used to fool it.

Each case is a family of random instances of a kind that once got a "certified" answer that was not
optimal: heavy-tailed norms, one huge orthogonal pair, huge JumpReLU thresholds through ``match()``,
big-M penalties, near-ties, rank-1 matrices and half-precision rectangular MSE. Every time the
certified total must reach scipy's within the bound the result states, and that bound must be tiny
(``GAP`` relative to the objective). Totals are compared, not indices (ties).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from conftest import make_sae
from scipy.sparse import random_array

from saematch_core.cost import cost_matrix, feature_vectors
from saematch_core.lap import linear_sum_assignment, solve
from saematch_core.lap_sparse import solve_inner_product, solve_scores
from saematch_core.match import match
from saematch_core.sae import SAE

GAP = 1e-12
"""Largest accepted ``gap_bound`` relative to the objective's magnitude."""


def _scipy_max(S: np.ndarray) -> float:
    r, c = scipy.optimize.linear_sum_assignment(S, maximize=True)
    return math.fsum(S[r, c].tolist())


def _assert_reaches(
    total: float, reference: float, gap_bound: float, magnitude: float, rounding: float
) -> None:
    """``total`` (maximised) is within ``gap_bound`` of the reference optimum, the bound is tiny, and the
    reference is not better than the bound allows. ``rounding``: how much two float64 evaluations of
    the same scores may differ (0 when both solvers saw the very same matrix)."""
    assert 0.0 <= gap_bound <= GAP * magnitude
    assert reference - gap_bound - rounding <= total <= reference + rounding + 1e-14 * magnitude


def _inner_product_case(X: np.ndarray, Y: np.ndarray, k: int = 8) -> None:
    res = solve_inner_product(X, Y, k=k)
    S = X @ Y.T
    n = X.shape[0]
    ours = math.fsum(S[np.arange(n), res.cols].tolist())
    magnitude = math.fsum(np.abs(S[np.arange(n), res.cols]).tolist())
    # S here is numpy's float64 evaluation; the solver's may round each entry differently
    rounding = (
        4 * X.shape[1] * 2.0**-53 * float(np.linalg.norm(X, axis=1) @ np.linalg.norm(Y[res.cols], axis=1))
    )
    assert abs(ours - res.total) <= rounding
    _assert_reaches(ours, _scipy_max(S), res.gap_bound, magnitude, 2 * rounding)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("seed", range(3))
def test_log_normal_norms(sigma: float, seed: int) -> None:
    rng = np.random.default_rng([seed, int(sigma)])
    n, m, d = 150, 170, 24
    X = rng.standard_normal((n, d)) * np.exp(sigma * rng.standard_normal((n, 1)))
    Y = rng.standard_normal((m, d)) * np.exp(sigma * rng.standard_normal((m, 1)))
    _inner_product_case(X, Y)


@pytest.mark.parametrize("d", [2, 8, 32])
@pytest.mark.parametrize("seed", range(3))
def test_one_huge_orthogonal_pair(d: int, seed: int) -> None:
    # a row and a column of norm 1e6 that score 0 with everything: the optimum of the rest is unchanged
    rng = np.random.default_rng([seed, d])
    n = 200
    X, Y = np.zeros((n + 1, d + 2)), np.zeros((n + 1, d + 2))
    X[:n, :d] = rng.standard_normal((n, d))
    Y[:n, :d] = rng.standard_normal((n, d))
    X[n, d] = Y[n, d + 1] = 1e6
    _inner_product_case(X, Y, k=4)


def _jumprelu_pair(big: float, seed: int, f: int = 80, d_in: int = 8) -> tuple[SAE, SAE]:
    """A JumpReLU SAE with one feature of threshold ``big`` and a noisy permuted copy of it (the huge
    feature copied exactly, so its pair costs ~0): folding multiplies that decoder row by ``big``."""
    a = make_sae(d_in=d_in, d_sae=f, seed=seed)
    assert a.threshold is not None
    theta = a.threshold.clone()
    theta[3] = big
    a = SAE(W_enc=a.W_enc, b_enc=a.b_enc, W_dec=a.W_dec, b_dec=a.b_dec, threshold=theta)
    g = torch.Generator().manual_seed(seed + 100)
    perm = torch.randperm(f, generator=g)
    b = a.permute(perm)

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return t + 2.0 * t.std() * torch.randn(t.shape, generator=g)

    j = int((perm == 3).nonzero())
    W_enc, b_enc, W_dec = noisy(b.W_enc), noisy(b.b_enc), noisy(b.W_dec)
    W_enc[:, j], b_enc[j], W_dec[j] = b.W_enc[:, j], b.b_enc[j], b.W_dec[j]
    return a, SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b.b_dec, threshold=b.threshold)


@pytest.mark.parametrize("big", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("seed", range(3))
def test_huge_thresholds_through_match(big: float, seed: int) -> None:
    a, b = _jumprelu_pair(big, seed)
    ref = match(a, b, solver="scipy")
    res = match(a, b)
    # both totals are recomputed per pair in float64; the solvers' float64 scores of the huge pair
    # (~big² · ‖w‖²) may round differently by ~1e-16 of that, which is (2/D) · that in cost units
    D = 2 * a.d_in + 1
    rounding = 4 * 2.0**-53 * big**2 * float(a.W_dec[3].double().norm() ** 2) * 2 / D
    assert res.info["gap_bound"] <= GAP * res.total_cost
    assert ref.total_cost - rounding <= res.total_cost <= ref.total_cost + res.info["gap_bound"] + rounding


@pytest.mark.parametrize("penalty", [1e6, 1e12])
def test_big_m_penalties(penalty: float) -> None:
    # scipy's sparse 100 × 100 instances (6 % of entries allowed) with a big-M penalty for the others
    rng = np.random.default_rng(12342309)
    n_without_penalty = 0
    for _ in range(30):
        sparse = random_array(
            (100, 100), density=0.06, rng=rng, data_sampler=lambda size: rng.integers(1, 100, size)
        )
        C = np.full(sparse.shape, penalty)
        C[sparse.row, sparse.col] = sparse.data
        res = solve_scores(C, maximize=False)
        r, c = scipy.optimize.linear_sum_assignment(C)
        ref = math.fsum(C[r, c].tolist())
        # minimisation: the certified cost is at most scipy's plus the bound
        assert ref - 1e-14 * ref <= res.total <= ref + res.gap_bound
        assert res.gap_bound <= GAP * res.total
        n_without_penalty += bool(res.total < penalty)
    assert n_without_penalty >= 10


@pytest.mark.parametrize("levels", [2, 5, 1000])
def test_near_ties(levels: int) -> None:
    # few distinct values (many exact ties), and ties broken by 1e-12 (near-ties)
    rng = np.random.default_rng(levels)
    for t in range(6):
        S = rng.integers(0, levels, (60, 60 + 10 * (t % 2))).astype(float)
        if t >= 3:
            S += 1e-12 * rng.standard_normal(S.shape)
        for method in ("sparse", "dense"):
            res = solve_scores(S, k=2, method=method)
            magnitude = math.fsum(np.abs(S[np.arange(60), res.cols]).tolist())
            _assert_reaches(res.total, _scipy_max(S), res.gap_bound, max(magnitude, 1.0), 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_rank_one(seed: int) -> None:
    # every row ranks the columns the same way (or reversed): the candidate graph cannot match them
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(300), rng.standard_normal(320)
    C = np.outer(a, b)
    rows, cols = linear_sum_assignment(C, solver="sparse")
    r, c = scipy.optimize.linear_sum_assignment(C)
    assert math.fsum(C[rows, cols].tolist()) <= math.fsum(C[r, c].tolist()) + 1e-12 * np.abs(C).sum() / 300
    res = solve_scores(-C, k=4)
    _assert_reaches(
        res.total, _scipy_max(-C), res.gap_bound, math.fsum(np.abs(C[np.arange(300), res.cols]).tolist()), 0.0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "m"), [(100, 170), (170, 100)])
def test_half_precision_rectangular_mse(dtype: torch.dtype, n: int, m: int) -> None:
    # the best matching of the half-precision vectors themselves, by their exact squared distances
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        x = (torch.randn(n, 8, generator=g) * 30).to(dtype)
        y = (torch.randn(m, 8, generator=g) * 30).to(dtype)
        C = cost_matrix(x.double(), y.double(), "mse").numpy()
        r, c = scipy.optimize.linear_sum_assignment(C)
        ref = math.fsum(C[r, c].tolist())
        for name in ("sparse", "scipy"):
            res = solve(name, x, y, metric="mse")
            rows = np.flatnonzero(res.cols >= 0)
            total = math.fsum(C[rows, res.cols[rows]].tolist())
            gap = res.info.get("gap_bound", 0.0) * 2 / 8  # inner-product units to MSE units
            assert ref - 1e-13 * ref <= total <= ref + gap + 1e-13 * ref, name
            assert gap <= GAP * ref


def test_match_states_the_bound_it_reached() -> None:
    a, b = _jumprelu_pair(1e6, 7)
    res = match(a, b, tol=0.0)
    assert res.info["gap_bound"] <= GAP * res.total_cost
    va = feature_vectors(a, dtype=torch.float64)
    assert float(va.norm(dim=1).max()) > 1e5, "the case has the huge feature it claims"
