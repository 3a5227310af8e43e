"""The certified sparse solver against scipy's dense ``linear_sum_assignment`` (the reference), its
phases one at a time, and its compiled kernels against obviously correct references.

Totals are compared, not indices: with ties several assignments are optimal.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_array, random_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from saematch_core._jv_numba import (
    capped_envelope,
    dense_sap,
    exact_dots,
    exact_gains,
    line_envelope,
    reduced_scan,
    reduced_scan_bf16,
    row_abs_max,
    sparse_sap,
    split_norms,
    stored_near,
    topk2,
    topk2_bf16,
)
from saematch_core.errors import InfeasibleMatchError
from saematch_core.lap_sparse import (
    _RESERVE,
    Precision,
    SparseLAPResult,
    _CertifiedSolve,
    _DenseOracle,
    _ErrorModel,
    _InnerProductOracle,
    _scan_reduced,
    _scan_reduced_torch,
    candidate_precision,
    solve_inner_product,
    solve_scores,
    threadsafe,
)

GAP = 1e-12
"""The largest ``gap_bound`` accepted, relative to the optimum's magnitude."""


def _reference_total(S: np.ndarray) -> float:
    r, c = linear_sum_assignment(S, maximize=True)
    return math.fsum(S[r, c].tolist())


def _check(res: SparseLAPResult, S: np.ndarray, *, exact: bool = False) -> None:
    """A valid assignment whose total reaches scipy's within the bound it states, and a tiny bound.

    ``exact``: ``S`` holds the very float64 scores the solver saw (an explicit matrix), so the total
    is their exact sum; for inner products ``S`` comes from another float64 evaluation, which may
    round each entry differently (by ~1e-16 relative)."""
    n = S.shape[0]
    assert res.cols.shape == (n,) and res.cols.dtype == np.int64
    assert len(set(res.cols.tolist())) == n, "columns must be distinct"
    ref = _reference_total(S)
    total = math.fsum(S[np.arange(n), res.cols].tolist())
    magnitude = math.fsum(np.abs(S[np.arange(n), res.cols]).tolist())
    assert 0.0 <= res.gap_bound <= GAP * magnitude
    rounding = 0.0 if exact else 1e-13 * magnitude
    assert abs(res.total - total) <= rounding
    # scipy solves the same float64 matrix: it cannot beat the bound; its own rounding may leave it
    # below our total by float64 noise
    assert ref - res.gap_bound - rounding <= total <= ref + 1e-14 * magnitude + rounding


def _random_instances() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(0)
    cases = []
    for t in range(60):
        n = int(rng.integers(1, 30))
        m = n + [0, 1, int(rng.integers(2, 25))][t % 3]
        k = int(rng.integers(1, 5))
        kind = t % 5
        if kind == 0:
            S = rng.standard_normal((n, m))
        elif kind == 1:
            S = rng.integers(0, 3, (n, m)).astype(float)  # many exact ties
        elif kind == 2:
            S = np.full((n, m), 1.5)  # every assignment ties (scipy #11602)
        elif kind == 3:
            # popular columns: every row ranks the same few columns first, so top-k misses the optimum
            S = 3.0 * rng.standard_normal((1, m)) + 0.2 * rng.standard_normal((n, m))
        else:
            S = -rng.random((n, m)) * 1e6
        cases.append((f"t{t}-kind{kind}-{n}x{m}-k{k}", S, k))
    return cases


@pytest.mark.parametrize(
    ("name", "S", "k"), _random_instances(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_scores_match_scipy(name: str, S: np.ndarray, k: int) -> None:
    _check(solve_scores(S, k=k), S, exact=True)


def test_minimize_and_transposed_reference() -> None:
    rng = np.random.default_rng(1)
    C = rng.random((12, 20))
    res = solve_scores(C, maximize=False, k=2)
    r, c = linear_sum_assignment(C)
    assert res.total == pytest.approx(float(C[r, c].sum()), abs=1e-12)
    assert float(C[np.arange(12), res.cols].sum()) == pytest.approx(res.total, abs=1e-12)


def test_k_larger_than_m() -> None:
    S = np.random.default_rng(2).standard_normal((5, 7))
    res = solve_scores(S, k=50)
    _check(res, S, exact=True)
    assert res.rounds == 1 and res.n_candidates == 35


def _popular_columns(n: int, m: int, seed: int) -> np.ndarray:
    # Every row ranks columns 0, 1, ... first, but in a square problem the popularity term adds the
    # same constant to every assignment: the optimum is decided by the small noise, far down the lists.
    rng = np.random.default_rng(seed)
    return 100.0 * np.arange(m, 0, -1)[None, :] + rng.standard_normal((n, m))


@pytest.mark.parametrize(("n", "m"), [(40, 40), (25, 30), (40, 50)])
def test_adversarial_topk_misses_optimum_needs_rounds(n: int, m: int) -> None:
    S = _popular_columns(n, m, seed=n + m)
    res = solve_scores(S, k=2)
    _check(res, S, exact=True)
    assert res.rounds > 1


def test_adversarial_inner_product_small_norm_partners() -> None:
    # Planted pairs whose partner has a small norm rank below many big-norm strangers by inner
    # product; the cosine-ordered candidates and the certificate must still find the optimum.
    g = torch.Generator().manual_seed(4)
    n, d = 120, 24
    A = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    perm = torch.randperm(n, generator=g)
    B = torch.empty_like(A)
    scale = torch.where(torch.arange(n) % 3 == 0, 0.2, 3.0)[:, None]
    B[perm] = (A + 0.8 * torch.randn(n, d, generator=g) / d**0.5) * scale
    res = solve_inner_product(A, B, k=1)
    S = (A.double() @ B.double().T).numpy()
    _check(res, S)
    assert res.rounds > 1


def _hub_instance(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # A few large-norm "hub" columns top every row's list: most rows find no partner in the first graph.
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g).abs()
    Y = torch.randn(n, d, generator=g).abs() * torch.where(torch.arange(n) < 4, 50.0, 1.0)[:, None]
    return X, Y


def test_hub_dominated_problems_fall_back_to_the_dense_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    from saematch_core import lap_sparse

    X, Y = _hub_instance(200)
    S = (X.double() @ Y.double().T).numpy()
    sparse = solve_inner_product(X, Y, k=2)  # 40,000 entries: below the fallback's minimum size
    _check(sparse, S)
    assert sparse.n_candidates < S.size
    monkeypatch.setattr(lap_sparse, "_DENSE_MIN_ENTRIES", 0)
    dense = solve_inner_product(X, Y, k=2)
    _check(dense, S)
    assert dense.n_candidates == S.size and dense.rounds >= 1
    assert dense.total == pytest.approx(sparse.total, rel=1e-12)
    # the rule: over a quarter of the rows unmatched, or a graph past 1/16 of the entries, within sizes
    faster = lap_sparse._dense_is_faster
    assert faster(100, 100, 0, 26, 0, 10**4) and not faster(100, 100, 0, 25, 0, 10**4)
    assert faster(100, 100, 626, 0, 0, 10**4) and not faster(100, 100, 625, 0, 0, 10**4)
    assert not faster(100, 100, 10**6, 100, 0, 10**4 - 1) and not faster(
        100, 100, 10**6, 100, 10**4 + 1, 10**5
    )
    # an explicit score matrix falls back too (from 2^16 entries), to the same optimum
    scores = solve_scores(S, k=2)
    _check(scores, S, exact=True)
    assert scores.n_candidates < S.size
    monkeypatch.setattr(lap_sparse, "_DENSE_MIN_ENTRIES_GIVEN", 0)
    scores = solve_scores(S, k=2)
    _check(scores, S, exact=True)
    assert scores.n_candidates == S.size


def test_max_rounds_reports_uncertified_result_honestly(caplog: pytest.LogCaptureFixture) -> None:
    S = _popular_columns(40, 40, seed=0)
    res = solve_scores(S, k=2, max_rounds=1)
    assert "stopped after max_rounds=1" in caplog.text
    ref = _reference_total(S)
    assert res.total < ref - 1e-6, "one round is not enough on this instance"
    assert res.total + res.gap_bound >= ref, "the stated bound still holds"


@pytest.mark.parametrize("candidates", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("n", "m"), [(30, 30), (25, 40), (1, 17), (60, 61)])
def test_inner_product_matches_scipy(seed: int, n: int, m: int, candidates: Precision) -> None:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    Y = torch.randn(m, 8, generator=g) * (0.3 + torch.rand(m, 1, generator=g))
    res = solve_inner_product(X, Y, k=1 + seed % 3, chunk_size=7, candidates=candidates)
    _check(res, (X.double() @ Y.double().T).numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_stay_within_their_error_models(dtype: torch.dtype) -> None:
    # The certificate is exact only if every block entry is within its error model of the exact score,
    # entry by entry; check the bounds on the platform the tests run on, with large D and mixed norms.
    g = torch.Generator().manual_seed(11)
    X = torch.randn(64, 2304, generator=g, dtype=dtype) * torch.exp(
        torch.randn(64, 1, generator=g, dtype=dtype)
    )
    Y = torch.randn(300, 2304, generator=g, dtype=dtype) * torch.exp(
        torch.randn(300, 1, generator=g, dtype=dtype)
    )
    Y[:64] = 1.3 * X  # aligned pairs: |S| = ‖x‖‖y‖, where the output rounding is largest
    exact = (X.double() @ Y.double().T).numpy()
    rows = np.arange(64)
    worst = {}
    for cand in ("float32", "bfloat16"):
        oracle = _InnerProductOracle(X, Y, torch.device("cpu"), cand)
        for candidates in (True, False):
            err = oracle.cand_err if candidates else oracle.block_err
            native = oracle.block(rows, candidates=candidates, native=True).double().numpy()
            widened = oracle.block(rows, candidates=candidates).double().numpy()
            np.testing.assert_array_equal(native, widened)
            bound = err.rel * np.abs(native) + err.row[:, None] * oracle.col_scale[None, :]
            assert (np.abs(native - exact) <= bound).all()
            worst[cand, candidates] = float((np.abs(native - exact) / bound).max())
    coarse, fine = worst["bfloat16", True], worst["float32", True]
    assert worst["bfloat16", False] == fine, "only the candidate blocks are computed in bfloat16"
    # the measured rounding of the inputs keeps the bfloat16 model within a small factor of the truth
    assert coarse > 0.1, "the bfloat16 error model is far looser than the errors it bounds"
    bf16 = _InnerProductOracle(X, Y, torch.device("cpu"), "bfloat16")
    assert (bf16.cand_err.row > 10 * bf16.block_err.row).all(), "bfloat16 blocks are coarser"


@pytest.mark.parametrize("candidates", ["float32", "bfloat16"])
@pytest.mark.parametrize("noise", [0.1, 1.0, 3.0])
def test_planted_instances(noise: float, candidates: Precision) -> None:
    g = torch.Generator().manual_seed(5)
    F, d = 300, 32
    A = torch.randn(F, d, generator=g) * torch.exp(torch.rand(F, 1, generator=g) - 0.5)
    perm = torch.randperm(F, generator=g)
    B = torch.empty_like(A)
    B[perm] = (A + noise * A.norm(dim=1, keepdim=True) * torch.randn(F, d, generator=g) / d**0.5) * torch.exp(
        torch.rand(F, 1, generator=g) - 0.5
    )
    res = solve_inner_product(A, B, candidates=candidates)
    _check(res, (A.double() @ B.double().T).numpy())
    if noise <= 0.1:
        assert (res.cols == perm.numpy()).all()


def test_integer_and_float64_inputs() -> None:
    X = torch.tensor([[1, 0], [0, 1], [1, 1]])
    Y = torch.tensor([[0, 2], [2, 0], [1, 1], [0, 0]])
    res = solve_inner_product(X, Y)
    _check(res, (X.double() @ Y.double().T).numpy())
    Xd = torch.randn(20, 5, dtype=torch.float64)
    Yd = Xd[torch.randperm(20)] * 1e-3
    res = solve_inner_product(Xd, Yd, k=1)
    _check(res, (Xd @ Yd.T).numpy())


def test_reference_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    S = np.random.default_rng(6).standard_normal((9, 11))
    res = solve_scores(S, reference=True)
    assert res.rounds == 0 and res.n_candidates == 99
    _check(res, S, exact=True)
    monkeypatch.setenv("SAEMATCH_REFERENCE", "1")
    X, Y = torch.randn(6, 3), torch.randn(8, 3)
    res = solve_inner_product(X, Y)
    assert res.rounds == 0
    _check(res, (X.double() @ Y.double().T).numpy())


def test_empty() -> None:
    res = solve_inner_product(torch.zeros(0, 4), torch.zeros(3, 4))
    assert res.cols.shape == (0,) and res.total == 0.0 and res.gap_bound == 0.0
    res = solve_scores(np.zeros((0, 2)), method="dense")
    assert res.cols.shape == (0,) and res.gap_bound == 0.0


@pytest.mark.parametrize(
    ("X", "Y", "match"),
    [
        (torch.zeros(5, 3), torch.zeros(4, 3), "n <= m"),
        (torch.zeros(3, 3), torch.zeros(4, 2), "same dimension"),
        (torch.zeros(3), torch.zeros(4, 3), "2-D"),
        (
            torch.tensor([[0.0, float("nan")]]),
            torch.zeros(2, 2),
            r"X: 1 non-finite \(NaN/inf\) entries, first at \(0, 1\)",
        ),
    ],
)
def test_bad_input(X: torch.Tensor, Y: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve_inner_product(X, Y)


@pytest.mark.parametrize(
    ("kw", "match"), [({"k": 0}, "k:"), ({"chunk_size": 0}, "chunk_size:"), ({"tol": -1.0}, "tol:")]
)
def test_bad_options(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve_inner_product(torch.zeros(2, 2), torch.zeros(2, 2), **kw)
    with pytest.raises(ValueError, match="scores: expected n <= m"):
        solve_scores(np.zeros((3, 2)))
    with pytest.raises(
        ValueError, match=r"candidates: expected one of \['auto', 'float32', 'bfloat16'\], got 'fp8'"
    ):
        solve_inner_product(torch.zeros(2, 2), torch.zeros(2, 2), candidates="fp8")  # type: ignore[arg-type]


# --- kernels against obviously-correct references -------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_sparse_sap_matches_scipy_sparse_matching(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = 25, 25 + 5 * (seed % 2)
    dense = np.where(rng.random((n, m)) < 0.3, rng.integers(1, 20, (n, m)).astype(float), 0.0)
    dense[np.arange(n), rng.permutation(m)[:n]] = 30.0 + rng.random(n)  # guarantees a full matching
    G = csr_array(dense)
    G.sort_indices()
    u, v = np.zeros(n), np.zeros(m)
    c4r, r4c = np.full(n, -1, np.int64), np.full(m, -1, np.int64)
    stuck = np.zeros(n, np.bool_)
    nf = sparse_sap(
        G.indptr.astype(np.int64), G.indices.astype(np.int64), G.data, u, v, c4r, r4c, n < m, 0.0, stuck
    )
    assert nf == 0
    r, c = min_weight_full_bipartite_matching(G)
    assert dense[np.arange(n), c4r].sum() == pytest.approx(dense[r, c].sum())
    # duals: feasible on every edge, tight on matched edges, rectangular conditions on columns
    rows = np.repeat(np.arange(n), np.diff(G.indptr))
    assert (G.data - u[rows] - v[G.indices] >= -1e-9).all()
    assert np.allclose(dense[np.arange(n), c4r] - u - v[c4r], 0.0)
    assert (v <= 1e-12).all() and np.allclose(v[r4c < 0], 0.0)


def test_sparse_sap_reports_stuck_rows() -> None:
    # rows 0, 1, 2 only see columns 0 and 1: no full matching
    indptr = np.array([0, 2, 4, 6, 7], np.int64)
    indices = np.array([0, 1, 0, 1, 0, 1, 2], np.int64)
    cost = np.ones(7)
    u, v = np.zeros(4), np.zeros(4)
    c4r, r4c = np.full(4, -1, np.int64), np.full(4, -1, np.int64)
    stuck = np.zeros(4, np.bool_)
    assert sparse_sap(indptr, indices, cost, u, v, c4r, r4c, True, 0.0, stuck) == 1
    assert stuck[:3].all() and not stuck[3]


def test_line_envelope_vs_brute_force() -> None:
    rng = np.random.default_rng(7)
    for t in range(50):
        m, q = int(rng.integers(1, 30)), int(rng.integers(1, 20))
        a = rng.integers(-3, 4, m).astype(float) if t % 2 else rng.standard_normal(m)
        b = rng.integers(-3, 4, m).astype(float) if t % 2 else rng.standard_normal(m)
        x = 3.0 * rng.standard_normal(q)
        np.testing.assert_allclose(line_envelope(a, b, x), (a[None] * x[:, None] + b[None]).max(axis=1))


def test_capped_envelope_vs_brute_force() -> None:
    rng = np.random.default_rng(9)
    for t in range(80):
        m, n = int(rng.integers(1, 30)), int(rng.integers(1, 20))
        ny = 3.0 * rng.random(m) if t % 2 else rng.integers(0, 4, m).astype(float)
        negv = -2.0 * rng.random(m)
        kth = rng.standard_normal(n) + (1.0 if t % 3 else -0.5)  # crossings at negative ny too
        c = 0.0 * kth if t % 4 == 0 else 0.3 * rng.random(n)
        alpha = 2.0 * rng.random(n) - 0.3
        got = capped_envelope(ny, negv, kth, c, alpha)
        ref = (np.minimum(kth[:, None] + c[:, None] * ny[None], alpha[:, None] * ny[None]) + negv[None]).max(
            axis=1
        )
        ok = alpha > c
        np.testing.assert_allclose(got[ok], ref[ok])
        assert np.isinf(got[~ok]).all()


@pytest.mark.parametrize("ties", [False, True])
def test_chunked_topk2_on_long_rows_vs_torch(ties: bool) -> None:
    # Long rows exercise the chunk filter (the k-th largest chunk maximum as a threshold); integer
    # scores put many ties at the threshold, where only the values are determined.
    rng = np.random.default_rng(3)
    S = rng.integers(-20, 20, (9, 1003)).astype(np.float32) if ties else rng.standard_normal((9, 1003))
    S = np.ascontiguousarray(S, np.float32)
    inv = (rng.random(1003) + 0.25).astype(np.float32)
    for k in (1, 8, 32, 60, 200, 1003):  # heap and quickselect thresholds, up to the whole row
        out = [np.empty((9, k), np.int64), np.empty((9, k)), np.empty((9, k), np.int64), np.empty((9, k))]
        topk2(S, inv, k, *out)
        t = torch.from_numpy(S).double()
        np.testing.assert_array_equal(np.sort(out[1], 1), np.sort(torch.topk(t, k).values.numpy(), 1))
        scaled = (torch.from_numpy(S) * torch.from_numpy(inv)).double()  # products in float32
        np.testing.assert_array_equal(np.sort(out[3], 1), np.sort(torch.topk(scaled, k).values.numpy(), 1))
        # the indices point at the values reported
        np.testing.assert_array_equal(np.take_along_axis(S, out[0], 1).astype(np.float64), out[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rel", [0.0, 2.0**-8])
def test_reduced_scan_matches_the_torch_reference(dtype: torch.dtype, rel: float) -> None:
    rng = np.random.default_rng(4)
    r, m, depth = 6, 517, 16
    S = torch.from_numpy(rng.standard_normal((r, m))).to(dtype)
    V = rng.random(m)
    err = _ErrorModel(rel, 0.01 * rng.random(r))
    col_scale = rng.random(m) + 0.5
    # row 0: more entries above its threshold than ``depth`` (searched again); row 5: none
    lo = np.array([-3.0, 1.0, 1.5, 2.0, 2.2, 50.0])
    got = _scan_reduced(S, V, err, col_scale, lo, depth)
    ref = _scan_reduced_torch(S, V, err, col_scale, lo, depth)
    got_near = sorted(zip(got.near_r.tolist(), got.near_c.tolist(), strict=True))
    assert got_near == sorted(zip(ref.near_r.tolist(), ref.near_c.tolist(), strict=True))
    assert {i for i, _ in got_near} >= {0, 1} and all(i != 5 for i, _ in got_near)
    x = S.double().numpy()
    U = x - V + rel * np.abs(x) + err.row[:, None] * col_scale[None, :]
    np.testing.assert_allclose(
        np.sort(np.take_along_axis(U, got.top_j, 1), 1), np.sort(np.take_along_axis(U, ref.top_j, 1), 1)
    )
    np.testing.assert_array_equal(np.take_along_axis(x, got.top_j, 1), got.top_s)
    np.testing.assert_allclose(got.thr, ref.thr, rtol=1e-15)
    # every entry left out is at most the row's threshold
    kept = np.zeros_like(U, dtype=bool)
    np.put_along_axis(kept, got.top_j, True, axis=1)
    assert (U[~kept] <= np.broadcast_to(got.thr[:, None], U.shape)[~kept]).all()
    cnt, tj, ts, thr = (
        np.empty(r, np.int64),
        np.empty((r, depth), np.int64),
        np.empty((r, depth)),
        np.empty(r),
    )
    if dtype == torch.bfloat16:
        reduced_scan_bf16(
            S.view(torch.int16).numpy().view(np.uint16), V, rel, err.row, col_scale, lo, tj, ts, thr, cnt
        )
    else:
        reduced_scan(S.numpy(), V, rel, err.row, col_scale, lo, tj, ts, thr, cnt)
    np.testing.assert_array_equal(cnt, (U > lo[:, None]).sum(axis=1))


def test_split_norms_vs_float64_numpy() -> None:
    # the norms of a bfloat16 rounding and of its error, against float64 numpy on widened copies;
    # rows of every scale, subnormal float32 entries and zero rows included
    rng = np.random.default_rng(11)
    full = (rng.standard_normal((37, 53)) * np.exp(rng.uniform(-30, 30, (37, 1)))).astype(np.float32)
    full[3] = 0.0
    full[5, :4] = np.float32(1e-44)
    coarse = torch.from_numpy(full).to(torch.bfloat16)
    hi, lo = np.empty(37), np.empty(37)
    split_norms(full, coarse.view(torch.int16).numpy().view(np.uint16), hi, lo)
    wide = coarse.double().numpy()
    np.testing.assert_allclose(hi, np.linalg.norm(wide, axis=1), rtol=1e-14, atol=0)
    np.testing.assert_allclose(lo, np.linalg.norm(full.astype(np.float64) - wide, axis=1), rtol=1e-14, atol=0)
    assert hi[3] == lo[3] == 0.0 and lo.max() > 0


def test_stored_near_vs_numpy() -> None:
    rng = np.random.default_rng(5)
    r, w, m = 40, 12, 50
    sj = rng.integers(-1, m, (r, w))
    ss = rng.standard_normal((r, w))
    exact = rng.random((r, w)) < 0.3
    V, crow, col_scale = rng.random(m), 0.05 * rng.random(r), rng.random(m) + 0.5
    lo = rng.standard_normal(r) - 0.5
    rr, pp = stored_near(sj, ss, exact, V, 2.0**-8, crow, col_scale, lo)
    jj = np.maximum(sj, 0)
    ub = np.where(exact, ss - V[jj], ss - V[jj] + 2.0**-8 * np.abs(ss) + crow[:, None] * col_scale[jj])
    ref = np.nonzero((ub > lo[:, None]) & (sj >= 0))
    np.testing.assert_array_equal(rr, ref[0])
    np.testing.assert_array_equal(pp, ref[1])
    assert 0 < rr.size < (sj >= 0).sum()


def test_topk2_and_exact_dots_vs_torch() -> None:
    g = torch.Generator().manual_seed(8)
    S = torch.randn(13, 50, generator=g)
    inv = (np.random.default_rng(8).random(50) + 0.5).astype(np.float32)
    k = 4
    ir, vr, isc, vsc = (
        np.empty((13, k), np.int64),
        np.empty((13, k)),
        np.empty((13, k), np.int64),
        np.empty((13, k)),
    )
    topk2(S.numpy(), inv, k, ir, vr, isc, vsc)
    np.testing.assert_allclose(np.sort(vr, 1), np.sort(torch.topk(S, k).values.double().numpy(), 1))
    scaled = (S * torch.from_numpy(inv)).double()
    np.testing.assert_array_equal(np.sort(vsc, 1), np.sort(torch.topk(scaled, k).values.numpy(), 1))
    np.testing.assert_array_equal(np.sort(ir, 1), np.sort(torch.topk(S, k).indices.numpy(), 1))
    # bfloat16 blocks, read from their raw bits: the same as topk2 on the widened values (k up to m)
    Sb = (S * 7).to(torch.bfloat16)
    for kk in (k, 17, 50):
        got = [
            np.empty((13, kk), np.int64),
            np.empty((13, kk)),
            np.empty((13, kk), np.int64),
            np.empty((13, kk)),
        ]
        ref = [np.empty_like(a) for a in got]
        topk2_bf16(Sb.view(torch.int16).numpy().view(np.uint16), inv, kk, *got)
        topk2(Sb.float().numpy(), inv, kk, *ref)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(np.sort(a, 1), np.sort(b, 1))
        np.testing.assert_allclose(np.sort(got[1], 1), np.sort(torch.topk(Sb.double(), kk).values.numpy(), 1))
    X, Y = torch.randn(5, 7, generator=g), torch.randn(6, 7, generator=g)
    ii, jj = np.array([0, 4, 2], np.int64), np.array([5, 0, 3], np.int64)
    out = np.empty(3)
    exact_dots(X.numpy(), Y.numpy(), ii, jj, out)
    np.testing.assert_allclose(out, (X.double() @ Y.double().T).numpy()[ii, jj], rtol=1e-12)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")],
)
def test_auto_candidates_follow_the_cpu(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert candidate_precision("cpu") == expected
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(40, 6, generator=g), torch.randn(50, 6, generator=g)
    _check(solve_inner_product(X, Y, candidates="auto", k=2), (X.double() @ Y.double().T).numpy())


def test_threadsafe_reports_the_threading_layer() -> None:
    from numba.np.ufunc.parallel import threading_layer

    safe = threadsafe()
    assert safe == (threading_layer() != "workqueue")


# --- exactness on explicit matrices ---------------------------------------------------------------


def test_forbidden_entries_are_never_used_and_infeasible_problems_raise() -> None:
    rng = np.random.default_rng(11)
    for t in range(20):
        n, m = 12, 12 + t % 4
        C = rng.integers(1, 20, (n, m)).astype(float)
        C[rng.random((n, m)) < 0.5] = np.inf
        C[np.arange(n), rng.permutation(m)[:n]] = rng.integers(1, 20, n)  # feasible
        ref_r, ref_c = linear_sum_assignment(C)
        for method in ("sparse", "dense"):
            res = solve_scores(C, maximize=False, k=1 + t % 3, method=method)
            assert np.isfinite(C[np.arange(n), res.cols]).all()
            assert res.total == C[ref_r, ref_c].sum() and res.gap_bound == 0.0
    infeasible = np.ones((3, 4))
    infeasible[:, :2] = np.inf
    for method in ("sparse", "dense"):
        with pytest.raises(InfeasibleMatchError, match="scores: cost matrix is infeasible"):
            solve_scores(infeasible, maximize=False, method=method)
    with pytest.raises(
        ValueError,
        match=r"scores: matrix contains invalid numeric entries: 0 NaN and 6 -inf, first at \(0, 0\)",
    ):
        solve_scores(-infeasible, maximize=False)  # -inf is never optimal when minimising


def test_any_strides_and_integer_inputs() -> None:
    C = np.random.default_rng(12).standard_normal((7, 9))
    for view in (C[:, ::-1], C[::-1], np.asfortranarray(C)[:, 1:]):
        _check(solve_scores(view, k=2), np.array(view), exact=True)
    X = np.random.default_rng(13).integers(-3, 4, (10, 5))
    Y = np.random.default_rng(14).integers(-3, 4, (12, 5)).astype(np.uint8)
    res = solve_inner_product(X[:, ::-1], Y[:, ::-1])
    _check(res, (X[:, ::-1] @ Y[:, ::-1].astype(np.float64).T).astype(np.float64))


@pytest.mark.parametrize("seed", range(4))
def test_heavy_tailed_scales_do_not_loosen_the_certificate(seed: int) -> None:
    # One huge row and column that score 0 with everything (they change nothing) used to set the
    # tolerance for every other row; log-normal norms likewise.
    rng = np.random.default_rng(seed)
    n, d = 120, 3
    X, Y = np.zeros((n + 1, d + 2)), np.zeros((n + 1, d + 2))
    X[:n, :d] = rng.standard_normal((n, d)) * np.exp(rng.standard_normal((n, 1)) * seed)
    Y[:n, :d] = rng.standard_normal((n, d)) * np.exp(rng.standard_normal((n, 1)) * seed)
    X[n, d], Y[n, d + 1] = 1e6, 1e6
    res = solve_inner_product(X, Y, k=2)
    _check(res, X @ Y.T)


def test_big_penalties_do_not_blur_the_prices() -> None:
    # A big-M formulation: 1e12 where scipy's sparse instances have no edge. Prices that once moved by
    # 1e12 carry rounding errors far larger than the entries that decide the optimum; the certificate
    # sees the gains they hide and re-solves from cold duals.
    rng = np.random.default_rng(3)
    n_checked = 0
    for _ in range(30):
        sparse = random_array(
            (60, 60), density=0.08, rng=rng, data_sampler=lambda size: rng.integers(1, 100, size)
        )
        C = np.full((60, 60), 1e12)
        C[sparse.row, sparse.col] = sparse.data
        res = solve_scores(C, maximize=False, k=2)
        ref_r, ref_c = linear_sum_assignment(C)
        assert res.total == C[ref_r, ref_c].sum()
        assert res.gap_bound <= GAP * abs(res.total)
        n_checked += bool(res.total < 1e12)
    assert n_checked >= 5, "some instances must be feasible without a penalty"


def test_total_is_exact_and_gap_zero_on_integer_ties() -> None:
    # every assignment of a constant matrix ties; integer scores make every gain exactly 0
    S = np.full((30, 40), 3.0)
    for method in ("sparse", "dense"):
        res = solve_scores(S, k=1, method=method)
        assert res.total == 90.0 and res.gap_bound == 0.0


# --- the phases of one certified solve -----------------------------------------------------------


def _phases(S: np.ndarray, k: int) -> _CertifiedSolve:
    return _CertifiedSolve(_DenseOracle(S.copy()), k=k, chunk_size=64, tol=1e-13, max_rounds=100)


def test_phase_candidates_bound_every_other_entry() -> None:
    S = np.random.default_rng(20).standard_normal((30, 45))
    ph = _phases(S, k=3)
    ph.find_candidates()
    rows, cols = ph.keys // 45, ph.keys % 45
    assert (np.bincount(rows, minlength=30) == 3).all()
    # the graph holds each row's 3 best entries, exactly scored
    assert (ph.s == S[rows, cols]).all()
    best3 = np.sort(S, axis=1)[:, -3:]
    assert np.array_equal(np.sort(ph.s.reshape(30, 3), axis=1), best3)
    # every entry outside the graph and the reserve is below the row's bound
    stored = np.zeros_like(S, dtype=bool)
    stored[rows, cols] = True
    res_i, res_p = np.nonzero(ph.res_j >= 0)
    stored[res_i, ph.res_j[res_i, res_p]] = True
    assert (S[~stored] <= np.broadcast_to(ph.kth[:, None], S.shape)[~stored]).all()
    assert (S[res_i, ph.res_j[res_i, res_p]] == ph.res_s[res_i, res_p]).all()
    assert res_i.size == 30 * (_RESERVE - 1) * 3, "the reserve holds the next entries of every row"


def test_phase_solve_gives_optimal_duals_on_the_graph() -> None:
    S = np.random.default_rng(21).standard_normal((25, 30))
    ph = _phases(S, k=4)
    ph.find_candidates()
    assert ph.solve_graph().size == 0
    rows, cols = ph.keys // 30, ph.keys % 30
    red = -ph.s - ph.u[rows] - ph.v[cols]  # minimisation-form reduced costs
    assert red.min() >= -1e-12
    matched = ph.keys == rows * 30 + ph.col4row[rows]
    assert np.abs(red[matched]).max() <= 1e-12
    assert (ph.v <= 0).all() and (ph.v[ph.row4col < 0] == 0).all()


def test_phase_grow_adds_edges_for_the_stuck_rows() -> None:
    S = _popular_columns(20, 20, seed=1)
    ph = _phases(S, k=1)
    ph.find_candidates()
    n_edges = ph.keys.size
    stuck = ph.solve_graph()
    assert stuck.size > 0, "every row's top entry is the same column"
    ph.grow(stuck)
    assert ph.keys.size > n_edges and ph.columns_added
    assert (ph.k_row[stuck] == 2).all()
    while (stuck := ph.solve_graph()).size:
        ph.grow(stuck)
    assert (ph.col4row >= 0).all()


def test_phase_certify_finds_exactly_the_gains_a_dense_check_finds() -> None:
    S = _popular_columns(30, 30, seed=2)
    ph = _phases(S, k=2)
    ph.find_candidates()
    while (stuck := ph.solve_graph()).size:
        ph.grow(stuck)
    cert = ph.certify()
    V, c = -ph.v, ph.col4row
    gains = (S - V[None, :]) - (S[np.arange(30), c] - V[c])[:, None]
    dense = np.maximum(gains.max(axis=1), 0.0)
    np.testing.assert_allclose(cert.gains, dense, rtol=1e-12, atol=1e-12)
    assert cert.gap_bound == pytest.approx(math.fsum(dense.tolist()), rel=1e-12, abs=1e-15)
    assert cert.gap_bound > 1.0, "k = 2 leaves this instance far from optimal"
    # the new edges are off the graph and gain, at most k per row in the first round
    new = cert.new_i * 30 + cert.new_j
    assert not np.isin(new, ph.keys).any() and (gains[cert.new_i, cert.new_j] > 0).all()
    assert np.bincount(cert.new_i).max() <= 2
    assert ph.add_edges(cert.new_i, cert.new_j) == cert.new_i.size


def test_phase_dense_solve_is_certified() -> None:
    S = np.random.default_rng(22).standard_normal((40, 50))
    ph = _phases(S, k=2)
    dense = ph.oracle.dense_exact()
    assert dense is not None
    res = ph.solve_dense(dense)
    _check(res, S, exact=True)
    assert res.n_candidates == S.size


def test_phase_restart_recovers_from_blurred_prices() -> None:
    # prices far above the scores carry rounding larger than the gains that decide the optimum
    S = np.random.default_rng(23).integers(0, 1000, (20, 20)).astype(float) / 7.0
    ph = _phases(S, k=20)
    ph.find_candidates()
    ph.solve_graph()
    ph.v -= 1e13 + np.random.default_rng(24).random(20) * 1e-2  # a common shift plus rounding-like noise
    cert = ph.certify()
    assert cert.n_blurred > 0 and cert.gap_bound > 1e-3 and cert.new_i.size == 0
    ph.restart()
    ph.solve_graph()
    cert = ph.certify()
    assert cert.n_blurred == 0 and cert.gap_bound <= GAP * np.abs(S).sum()


# --- kernels ---------------------------------------------------------------------------------------


def test_exact_gains_vs_fractions() -> None:
    rng = np.random.default_rng(30)
    cases = [
        (1.0, 0.0, 1.0, 0.0),
        (0.1, 0.2, 0.0, 0.1),  # 0.1 - 0.2 + 0.1 is exactly 0 in binary
        (1e20, 1.0, 1e20, 1.0),
        (3.0, 1.0, 1.0, -1.0 + 2.0**-52),
        (1.0, 1e-30, 1.0, 0.0),  # -1e-30: no gain
        (1.0, 0.0, 1.0, 1e-30),  # +1e-30: a gain far below float64 resolution of the terms
        (-np.inf, 0.0, 1.0, 0.0),
    ]
    for _ in range(300):
        a, b, c, d = rng.standard_normal(4) * 10.0 ** rng.integers(-5, 6, 4)
        cases.append((a, b, a + (c - a) * rng.integers(0, 2), d))
    s, vj, t, vc = (np.array(col, dtype=np.float64) for col in zip(*cases, strict=True))
    out = np.empty(s.shape[0])
    exact_gains(s, vj, t, vc, out)
    for e in range(s.shape[0]):
        if s[e] == -np.inf:
            assert out[e] == 0.0
            continue
        exact = Fraction(s[e]) - Fraction(vj[e]) - Fraction(t[e]) + Fraction(vc[e])
        if exact <= 0:
            assert out[e] == 0.0
        else:
            assert Fraction(out[e]) >= exact and out[e] <= float(exact) * (1 + 1e-15) + 1e-300


@pytest.mark.parametrize("seed", range(4))
def test_dense_sap_matches_scipy_and_leaves_dual_prices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = 30, 30 + 7 * (seed % 2)
    S = rng.standard_normal((n, m)) if seed < 2 else rng.integers(0, 4, (n, m)).astype(float)
    if seed == 3:
        S[rng.random((n, m)) < 0.3] = -np.inf
        S[np.arange(n), rng.permutation(m)[:n]] = 1.0
    u, v = np.zeros(n), np.zeros(m)
    c4r, r4c = np.empty(n, np.int64), np.empty(m, np.int64)
    assert dense_sap(S, u, v, c4r, r4c) == -1
    assert S[np.arange(n), c4r].sum() == pytest.approx(_reference_total(S))
    with np.errstate(invalid="ignore"):
        red = -S - u[:, None] - v[None, :]
    assert np.nanmin(red) >= -1e-12 and np.abs(red[np.arange(n), c4r]).max() <= 1e-12
    assert (v <= 0).all() and (v[r4c < 0] == 0).all()
    blocked = np.full((2, 3), -np.inf)
    blocked[0, 0] = blocked[1, 0] = 1.0
    assert dense_sap(blocked, np.zeros(2), np.zeros(3), np.empty(2, np.int64), np.empty(3, np.int64)) == 1


def test_device_policy_is_the_cost_modules() -> None:
    X = torch.randn(5, 3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
            solve_inner_product(X, X, device="cuda")
    _check(solve_inner_product(X, X, device="auto"), (X.double() @ X.double().T).numpy())


def test_row_abs_max_vs_numpy() -> None:
    S = np.random.default_rng(31).standard_normal((9, 13))
    out = np.empty(9)
    assert not row_abs_max(S, out)
    np.testing.assert_array_equal(out, np.abs(S).max(axis=1))
    S[2, 3], S[4, :] = -np.inf, np.inf
    assert row_abs_max(S, out)
    assert out[4] == 0.0 and out[2] == np.abs(np.delete(S[2], 3)).max()
