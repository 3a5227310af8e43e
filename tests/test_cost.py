"""Feature vectors and cost matrices: the MSE ↔ inner-product identity, chunking, devices, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_sae

from saematch_core.cost import (
    check_metric,
    check_params,
    cost_matrix,
    feature_vectors,
    iter_cost_chunks,
    iter_score_chunks,
    normalize_rows,
    pair_costs,
    resolve_device,
)
from saematch_core.errors import SAEValidationError
from saematch_core.fold import fold

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _direct_cost(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Obviously correct per-pair loop in float64."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            x, y = a[i].double(), b[j].double()
            if metric == "mse":
                out[i, j] = ((x - y) ** 2).mean()
            else:
                out[i, j] = 1 - torch.dot(x, y) / (x.norm() * y.norm())
    return out


def test_feature_vectors_layout() -> None:
    sae = make_sae(d_in=4, d_sae=6)
    vec = feature_vectors(sae, ("W_dec", "b_enc", "W_enc"), fold=False)
    assert vec.shape == (6, 9)
    torch.testing.assert_close(vec[:, :4], sae.W_dec)
    torch.testing.assert_close(vec[:, 4], sae.b_enc)
    torch.testing.assert_close(vec[:, 5:], sae.W_enc.T)
    folded = fold(sae)
    vec_f = feature_vectors(sae)
    assert vec_f.shape == (6, 9)
    torch.testing.assert_close(vec_f, torch.cat([folded.W_enc.T, folded.W_dec, folded.b_enc[:, None]], dim=1))
    assert not torch.allclose(vec_f, feature_vectors(sae, fold=False)), "folding must change the vectors"


def test_feature_vectors_non_jumprelu_is_not_folded() -> None:
    sae = make_sae(d_in=4, d_sae=6, activation="relu")
    torch.testing.assert_close(feature_vectors(sae, fold=True), feature_vectors(sae, fold=False))


def test_feature_vectors_with_scales() -> None:
    sae = make_sae(d_in=4, d_sae=6)
    assert sae.threshold is not None
    s = 0.5 + torch.rand(6, generator=torch.Generator().manual_seed(1))
    got = feature_vectors(sae, fold=False, scale=s, dtype=torch.float64)
    raw = feature_vectors(sae, fold=False, dtype=torch.float64)
    s64 = s.double()[:, None]
    torch.testing.assert_close(got, torch.cat([raw[:, :4] / s64, raw[:, 4:8] * s64, raw[:, 8:] / s64], dim=1))
    # folding is the scale θ
    torch.testing.assert_close(
        feature_vectors(sae, fold=False, scale=sae.threshold), feature_vectors(sae, fold=True)
    )
    with pytest.raises(ValueError, match="fold, scale: scaling replaces folding"):
        feature_vectors(sae, scale=s)
    with pytest.raises(ValueError, match=r"scale: expected shape \(6,\), got \(2,\)"):
        feature_vectors(sae, fold=False, scale=torch.ones(2))


def test_shared_checks_name_the_field() -> None:
    assert check_params(["W_dec"], name="MatchConfig.params") == ("W_dec",)
    with pytest.raises(ValueError, match=r"^MatchConfig\.params: expected a non-empty subset"):
        check_params((), name="MatchConfig.params")
    assert check_metric("cosine") == "cosine"
    with pytest.raises(ValueError, match=r"^cfg\.metric: expected one of \['mse', 'cosine'\], got 'l2'"):
        check_metric("l2", name="cfg.metric")


def test_feature_vectors_dtype_and_errors() -> None:
    sae = make_sae(d_in=4, d_sae=6)
    assert feature_vectors(sae, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match=r"params: expected a non-empty subset .* got \['W_enc', 'W_enc'\]"):
        feature_vectors(sae, ("W_enc", "W_enc"))
    with pytest.raises(ValueError, match=r"params: .*got \['b_dec'\]"):
        feature_vectors(sae, ("b_dec",))
    with pytest.raises(TypeError, match="params: expected a sequence of names"):
        feature_vectors(sae, "W_enc")
    with pytest.raises(TypeError, match="sae: expected an SAE, got Tensor"):
        feature_vectors(torch.zeros(3), ("W_enc",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype: expected a floating dtype"):
        feature_vectors(sae, dtype=torch.int64)


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_cost_matrix_equals_direct_per_pair(metric) -> None:
    a = feature_vectors(make_sae(d_in=5, d_sae=7, seed=1), dtype=torch.float64)
    b = feature_vectors(make_sae(d_in=5, d_sae=9, seed=2), dtype=torch.float64)
    dense = cost_matrix(a, b, metric)
    assert dense.shape == (7, 9) and dense.dtype == torch.float64
    torch.testing.assert_close(dense, _direct_cost(a, b, metric), rtol=1e-10, atol=1e-12)
    # Self-cost is zero on the diagonal.
    assert cost_matrix(a, a, metric).diagonal().abs().max() < 1e-12


def test_mse_of_an_assignment_is_norms_minus_twice_inner_product() -> None:
    # The identity the solvers rely on: for a permutation P, Σ‖a_i − b_P(i)‖² depends on P only
    # through Σ⟨a_i, b_P(i)⟩.
    a = torch.randn(9, 5, dtype=torch.float64)
    b = torch.randn(9, 5, dtype=torch.float64)
    norms = float((a * a).sum() + (b * b).sum())
    for seed in range(3):
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
        direct = float(pair_costs(a, b, perm).sum()) * 5
        inner = float((a * b[perm]).sum())
        assert direct == pytest.approx(norms - 2 * inner, rel=1e-12)


def test_mse_identity_float32_close_to_direct() -> None:
    a = feature_vectors(make_sae(d_in=16, d_sae=20, seed=3))
    b = feature_vectors(make_sae(d_in=16, d_sae=20, seed=4))
    torch.testing.assert_close(cost_matrix(a, b).double(), _direct_cost(a, b, "mse"), rtol=1e-4, atol=1e-5)
    assert (cost_matrix(a, a) >= 0).all(), "rounding must not produce negative squared distances"


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_chunked_equals_dense(chunk_size, metric) -> None:
    a = torch.randn(11, 6, dtype=torch.float64)
    b = torch.randn(8, 6, dtype=torch.float64)
    dense = cost_matrix(a, b, metric, chunk_size=10_000)
    starts, blocks = [], []
    for start, block in iter_cost_chunks(a, b, metric, chunk_size=chunk_size):
        assert block.shape[0] <= chunk_size and block.shape[1] == 8
        starts.append(start)
        blocks.append(block)
    assert starts == list(range(0, 11, chunk_size))
    torch.testing.assert_close(torch.cat(blocks), dense, rtol=0, atol=1e-12)
    scores = torch.cat([blk for _, blk in iter_score_chunks(a, b, chunk_size=chunk_size)])
    torch.testing.assert_close(scores, a @ b.T)


def test_dtype_selection() -> None:
    a, b = torch.randn(5, 4), torch.randn(6, 4)
    assert cost_matrix(a, b, dtype=torch.float64).dtype == torch.float64
    low = cost_matrix(a, b, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), cost_matrix(a.double(), b.double()), rtol=0.05, atol=0.05)


def test_pair_costs_direct() -> None:
    a = torch.randn(6, 5)
    b = torch.randn(4, 5)
    perm = torch.tensor([3, -1, 0, 0, 2, -1])
    for metric in ("mse", "cosine"):
        pc = pair_costs(a, b, perm, metric, chunk_size=4)
        assert pc.dtype == torch.float64 and pc.shape == (6,)
        assert math.isnan(pc[1]) and math.isnan(pc[5])
        dense = _direct_cost(a, b, metric)
        for i, j in enumerate(perm.tolist()):
            if j >= 0:
                assert float(pc[i]) == pytest.approx(float(dense[i, j]), rel=1e-12, abs=1e-12)


def test_pair_costs_bad_perm() -> None:
    a, b = torch.randn(3, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"perm: expected shape \(3,\), got \(2,\)"):
        pair_costs(a, b, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"perm: expected entries in \[-1, 4\), got min 0, max 4"):
        pair_costs(a, b, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="perm: expected an integer tensor"):
        pair_costs(a, b, torch.tensor([0.0, 1.0, 2.0]))


def test_bad_vectors() -> None:
    with pytest.raises(ValueError, match=r"a, b: expected feature vectors of the same length D"):
        cost_matrix(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"a: expected 2-D feature vectors \(F, D\), got shape \(3,\)"):
        cost_matrix(torch.zeros(3), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="metric: expected one of \\['mse', 'cosine'\\], got 'l2'"):
        cost_matrix(torch.zeros(3, 4), torch.zeros(3, 4), "l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size: expected an int >= 1, got 0"):
        next(iter_cost_chunks(torch.zeros(3, 4), torch.zeros(3, 4), chunk_size=0))


def test_cosine_zero_rows_are_an_error() -> None:
    x = torch.randn(5, 3)
    x[2] = 0
    x[4] = 0
    with pytest.raises(
        SAEValidationError, match=r"b: 2 features have an all-zero vector \(first at feature 2\)"
    ):
        normalize_rows(x, name="b")
    with pytest.raises(SAEValidationError, match="all-zero vector"):
        cost_matrix(torch.randn(2, 3), x, "cosine")


def test_resolve_device() -> None:
    # the one device policy of the matching code: explicit devices are honoured (or refused), "auto"
    # and a fallback of "auto" pick CUDA when it exists
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None, fallback="auto").type == auto
    assert resolve_device(None, fallback="cpu") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
        cost_matrix(torch.zeros(2, 2), torch.zeros(2, 2), device="cuda")


@pytest.mark.gpu
@requires_cuda
def test_cuda_equals_cpu() -> None:
    a = torch.randn(300, 40, dtype=torch.float64)
    b = torch.randn(200, 40, dtype=torch.float64)
    for metric in ("mse", "cosine"):
        gpu = cost_matrix(a, b, metric, device="cuda", chunk_size=64)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cost_matrix(a, b, metric), rtol=1e-10, atol=1e-10)
