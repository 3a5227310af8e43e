"""Calibrated matched / not-matched verdicts: BH, the rotated-partner null, planted structure."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_sae

from saematch_core.experiments.measures.verdict import (
    benjamini_hochberg,
    decide,
    empirical_p_values,
    random_rotation,
    relative_cost,
    relative_cost_chunks,
    rotation_blocks,
    smallest_relative_costs,
)
from saematch_core.fold import rescale_features
from saematch_core.sae import SAE

D_IN, D_SAE = 16, 64


def planted(seed: int = 0, noise: float = 0.0) -> tuple[SAE, SAE, torch.Tensor]:
    """B is A with features shuffled and rescaled (folded weights equal up to ``noise``)."""
    a = make_sae(D_IN, D_SAE, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(D_SAE, generator=g)
    b = rescale_features(a.permute(perm), 0.5 + torch.rand(D_SAE, generator=g))
    if noise:
        b = replace(b, W_dec=b.W_dec * (1 + noise * torch.randn(D_SAE, D_IN, generator=g)))
    return a, b, torch.argsort(perm)


def _bh_reference(p: list[float], alpha: float) -> list[bool]:
    tested = [(v, i) for i, v in enumerate(p) if not math.isnan(v)]
    m = len(tested)
    order = sorted(tested)
    k_max = 0
    for k, (v, _) in enumerate(order, start=1):
        if v <= alpha * k / m:
            k_max = k
    chosen = {i for _, i in order[:k_max]}
    return [i in chosen for i in range(len(p))]


def test_benjamini_hochberg_agrees_with_step_up_reference() -> None:
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        p = torch.rand(30, generator=g) ** (1 + trial % 4)
        p[torch.rand(30, generator=g) < 0.1] = math.nan
        rejected, q = benjamini_hochberg(p, 0.1)
        assert rejected.tolist() == _bh_reference(p.tolist(), 0.1)
        assert torch.equal(rejected, (q <= 0.1) & ~torch.isnan(p))
        assert bool(torch.isnan(q[torch.isnan(p)]).all())


def test_benjamini_hochberg_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="alpha"):
        benjamini_hochberg(torch.tensor([0.1]), 1.5)
    with pytest.raises(ValueError, match="p_values"):
        benjamini_hochberg(torch.tensor([1.2]), 0.05)


def test_empirical_p_values_match_counting() -> None:
    null = torch.sort(torch.rand(50)).values.double()
    stat = torch.tensor([0.0, 0.3, 0.7, 2.0, math.nan], dtype=torch.float64)
    p = empirical_p_values(stat, null)
    for s, v in zip(stat.tolist()[:4], p.tolist()[:4], strict=True):
        assert v == pytest.approx((1 + sum(x <= s for x in null.tolist())) / 51)
    assert math.isnan(p[4])


def test_random_rotation_is_orthogonal() -> None:
    q = random_rotation(7, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(7, dtype=torch.float64), atol=1e-12)


def test_smallest_relative_costs_agree_with_dense_reference() -> None:
    a, b = torch.randn(9, 5), torch.randn(11, 5)
    vals, idx = smallest_relative_costs(a, b, 2, chunk_size=4)
    dense = torch.stack([relative_cost(a[i].expand(11, 5), b) for i in range(9)])
    ref = torch.sort(dense, dim=1)
    assert torch.allclose(vals, ref.values[:, :2], rtol=1e-5, atol=1e-6)
    assert torch.equal(idx[:, 0], ref.indices[:, 0])


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_relative_cost_chunks_agree_with_pairwise_reference(metric: str) -> None:
    a, b = torch.randn(9, 5), torch.randn(11, 5)
    chunks = list(relative_cost_chunks(a, b, metric, chunk_size=4))
    assert [s for s, _ in chunks] == [0, 4, 8]
    got = torch.cat([rel for _, rel in chunks])
    dense = torch.stack([relative_cost(a[i].expand(11, 5), b, metric) for i in range(9)])
    assert got.shape == (9, 11)
    assert torch.allclose(got.double(), dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        next(relative_cost_chunks(a, b, "l1"))


def test_relative_cost_is_rotation_invariant() -> None:
    a, b = torch.randn(6, 8).double(), torch.randn(6, 8).double()
    q = random_rotation(8, torch.Generator().manual_seed(1))
    assert torch.allclose(relative_cost(a @ q, b @ q), relative_cost(a, b), atol=1e-12)


def test_rotation_blocks_layout() -> None:
    assert rotation_blocks(("W_enc", "W_dec", "b_enc"), 33) == (
        (0, 16, True),
        (16, 32, True),
        (32, 33, False),
    )
    with pytest.raises(ValueError, match="params"):
        rotation_blocks(("W_enc", "W_dec", "b_enc"), 34)
    with pytest.raises(ValueError, match="params"):
        rotation_blocks(("b_enc",), 1)


def test_planted_permutation_is_matched_and_unrelated_sae_is_not() -> None:
    a, b, truth = planted(noise=0.05)
    dec = decide(a, b, alpha=0.05)
    assert torch.equal(dec.perm, truth)
    assert dec.n_matched == D_SAE
    assert bool((dec.margin > 0).all())
    unrelated = make_sae(D_IN, D_SAE, seed=7)
    dec0 = decide(a, unrelated, alpha=0.05)
    # Under the complete null BH keeps the family-wise error at alpha: almost never any discovery.
    assert dec0.n_matched <= 1
    assert dec0.fraction_matched < 0.05


def test_half_planted_false_discoveries_stay_near_alpha() -> None:
    a, b, truth = planted(noise=0.05)
    other = make_sae(D_IN, D_SAE, seed=11)
    replaced = truth[: D_SAE // 2]  # these B features lose their A counterpart
    w_enc, w_dec, b_enc = b.W_enc.clone(), b.W_dec.clone(), b.b_enc.clone()
    w_enc[:, replaced], w_dec[replaced], b_enc[replaced] = (
        other.W_enc[:, replaced],
        other.W_dec[replaced],
        other.b_enc[replaced],
    )
    b2 = replace(b, W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, threshold=b.threshold)
    dec = decide(a, b2, perm=truth, alpha=0.1)
    real = torch.zeros(D_SAE, dtype=torch.bool)
    real[D_SAE // 2 :] = True
    assert bool(dec.matched[real].all())
    false = int((dec.matched & ~real).sum())
    assert false / max(dec.n_matched, 1) <= 0.15


def test_rotating_vector_blocks_equals_rotating_the_sae() -> None:
    """The null rotates W_enc / W_dec blocks of the vectors; that must be the vectors of an SAE whose
    residual basis is rotated (x → x Q), built the slow way."""
    from saematch_core.cost import feature_vectors
    from saematch_core.experiments.measures.verdict import rotate_vectors

    sae = make_sae(D_IN, D_SAE)
    q = random_rotation(D_IN, torch.Generator().manual_seed(2)).float()
    turned = replace(sae, W_enc=q.T @ sae.W_enc, W_dec=sae.W_dec @ q, b_dec=sae.b_dec @ q)
    params = ("W_enc", "W_dec", "b_enc")
    fast = rotate_vectors(feature_vectors(sae, params), rotation_blocks(params, 2 * D_IN + 1), q)
    assert torch.allclose(fast, feature_vectors(turned, params), atol=1e-5)
    x = torch.randn(5, D_IN)
    assert torch.allclose(turned.encode(x @ q), sae.encode(x), atol=1e-5)  # same SAE, new basis
