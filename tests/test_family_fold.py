"""Folding analogue for TopK and ReLU SAEs: activation scales, scaled matching vectors, comparison."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_sae

from saematch_core.cost import feature_vectors, pair_costs
from saematch_core.errors import SAEValidationError
from saematch_core.experiments import family_fold
from saematch_core.experiments.family_fold import FamilyFoldConfig, FamilyFoldResult
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scales import (
    activation_scale,
    fill_dead_scale,
    scaled_vectors,
    token_halves,
    weight_scale,
)
from saematch_core.fold import rescale_features
from saematch_core.match import match
from saematch_core.sae import SAE

D_IN, D_SAE = 16, 48


def acts(n: int = 500, seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def spread_copy(sae: SAE, seed: int = 1, noise: float = 0.0) -> tuple[SAE, torch.Tensor]:
    """``sae`` with features shuffled, weights perturbed by relative ``noise``, and each feature's
    weights rescaled by a wide spread of factors (output-preserving for ReLU); and the planted partners."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sae.d_sae, generator=g)
    s = torch.exp(2.0 * torch.randn(sae.d_sae, generator=g))
    p = sae.permute(perm)
    w_enc = p.W_enc * (1 + noise * torch.randn(p.W_enc.shape, generator=g))
    w_dec = p.W_dec * (1 + noise * torch.randn(p.W_dec.shape, generator=g))
    b = SAE(
        W_enc=w_enc / s,
        b_enc=p.b_enc / s,
        W_dec=w_dec * s[:, None],
        b_dec=p.b_dec,
        activation=sae.activation,
        k=sae.k,
        threshold=None if p.threshold is None else p.threshold / s,
    )
    return b, torch.argsort(perm)


def test_activation_scale_agrees_with_dense_reference() -> None:
    sae = make_sae(D_IN, D_SAE, activation="relu")
    x = acts()
    keep = torch.rand(500) > 0.3
    got = activation_scale(sae, x, keep=keep, chunk_size=37)
    codes = sae.encode(x[keep]).double()
    for i in range(D_SAE):
        on = codes[:, i] > 0
        if bool(on.any()):
            assert got[i] == pytest.approx(float(codes[on, i].mean()))
        else:
            assert math.isnan(got[i])


def test_fill_dead_scale_uses_the_median() -> None:
    out = fill_dead_scale(torch.tensor([1.0, math.nan, 3.0, 0.0, 2.0]))
    assert out.tolist() == [1.0, 2.0, 3.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="scale"):
        fill_dead_scale(torch.tensor([math.nan]))


def test_scaling_by_theta_is_folding() -> None:
    sae = make_sae(D_IN, D_SAE)
    assert sae.threshold is not None
    assert torch.allclose(scaled_vectors(sae, sae.threshold), feature_vectors(sae, fold=True), atol=1e-6)


def test_relu_scaling_preserves_output_and_topk_is_vectors_only() -> None:
    relu = make_sae(D_IN, D_SAE, activation="relu")
    s = fill_dead_scale(activation_scale(relu, acts()))
    x = acts(50, seed=3)
    assert torch.allclose(
        rescale_features(relu, s.float()).decode(rescale_features(relu, s.float()).encode(x)),
        relu(x).recon,
        atol=1e-5,
    )
    assert torch.allclose(
        scaled_vectors(relu, s), feature_vectors(rescale_features(relu, s.float()), fold=False), atol=1e-5
    )
    topk = make_sae(D_IN, D_SAE, activation="topk")
    with pytest.raises(SAEValidationError, match="TopK"):
        rescale_features(topk, torch.ones(D_SAE))
    assert scaled_vectors(topk, torch.full((D_SAE,), 2.0)).shape == (D_SAE, 2 * D_IN + 1)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_scale_correction_removes_a_per_feature_rescaling(activation: str) -> None:
    a = make_sae(D_IN, D_SAE, activation=activation)
    b, truth = spread_copy(a)
    x = acts()
    ones = torch.ones(D_SAE)
    sa, sb = fill_dead_scale(activation_scale(a, x)), fill_dead_scale(activation_scale(b, x))

    def planted_cost(scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
        va, vb = (
            scaled_vectors(a, scale_a, dtype=torch.float64),
            scaled_vectors(b, scale_b, dtype=torch.float64),
        )
        return pair_costs(va, vb, truth)

    raw = planted_cost(ones, ones)
    assert float(planted_cost(weight_scale(a), weight_scale(b)).max()) < 1e-10 < float(raw.min())
    if activation == "relu":
        # ReLU codes of B are A's codes divided by s: the measured scales move exactly with s.
        assert float(planted_cost(sa, sb).max()) < 1e-10
    else:
        # TopK selects other features once features are rescaled unequally, so measured scales do not
        # follow s; a uniform rescaling keeps the selection, and then they do.
        uniform = SAE(
            W_enc=a.W_enc / 3, b_enc=a.b_enc / 3, W_dec=a.W_dec * 3, b_dec=a.b_dec, activation="topk", k=a.k
        )
        su = fill_dead_scale(activation_scale(uniform, x))
        va, vu = scaled_vectors(a, sa, dtype=torch.float64), scaled_vectors(uniform, su, dtype=torch.float64)
        assert float(pair_costs(va, vu, torch.arange(D_SAE)).max()) < 1e-10


def test_scale_corrected_matching_beats_raw_on_noisy_relu_copy() -> None:
    a = make_sae(D_IN, D_SAE, activation="relu")
    b, truth = spread_copy(a, noise=1.0)
    x = acts()
    ones = torch.ones(D_SAE)

    def recovered(scale_a: torch.Tensor, scale_b: torch.Tensor) -> float:
        return float((match(a, b, fold=False, scales=(scale_a, scale_b)).perm == truth).double().mean())

    raw = recovered(ones, ones)
    assert recovered(weight_scale(a), weight_scale(b)) > raw
    assert recovered(fill_dead_scale(activation_scale(a, x)), fill_dead_scale(activation_scale(b, x))) > raw


def test_weight_scale_needs_a_decoder_bias() -> None:
    sae = make_sae(D_IN, D_SAE, activation="relu", b_dec=torch.zeros(D_IN))
    with pytest.raises(ValueError, match="b_dec"):
        weight_scale(sae)


def test_family_comparison_rows_and_gain(tmp_path) -> None:
    relu = make_sae(D_IN, D_SAE, activation="relu")
    relu_b, _ = spread_copy(relu, noise=1.0)
    jump = make_sae(D_IN, D_SAE, seed=4)
    jump_b, _ = spread_copy(jump, seed=5)
    x = acts()
    inputs = Inputs(
        saes={0: jump, 1: jump_b},
        activations={0: x, 1: x},
        families={"relu": {0: relu, 1: relu_b}, "jumprelu": {0: jump, 1: jump_b}},
        cache_dir=tmp_path,
        progress=False,
    )
    res = family_fold.run(inputs, FamilyFoldConfig(n_null=2))
    assert isinstance(res, FamilyFoldResult)
    methods = {(r.family, r.method) for r in res.rows}
    assert ("jumprelu", "theta") in methods and ("relu", "theta") not in methods
    assert res.series("jumprelu", "theta") == (pytest.approx(1.0),)
    assert res.gain("relu", "weight_scale")[0] > 0
    assert res.gain("relu", "data_scale")[0] > 0
    assert all(r.random_score < 0.9 for r in res.rows)
    assert len(list((tmp_path / FamilyFoldResult.kind).glob("*.json"))) == 2
    headers, rows = res.table()
    assert headers[:2] == ["family", "method"] and rows[0][:2] == ["relu", "raw"]
    assert ["jumprelu", "theta"] in [r[:2] for r in rows] and ["relu", "theta"] not in [r[:2] for r in rows]
    only = family_fold.run(inputs, FamilyFoldConfig(n_null=2, families=("relu",)))
    assert {r.family for r in only.rows} == {"relu"}
    with pytest.raises(ValueError, match=r"FamilyFoldConfig\.families"):
        family_fold.run(inputs, FamilyFoldConfig(families=("topk",)))


def test_token_halves_are_disjoint_and_keep_whole_groups() -> None:
    keep = torch.tensor([True, True, False, True, True, True]).numpy()
    groups = torch.tensor([0, 0, 1, 1, 2, 3]).numpy()
    fit, held = token_halves(keep, groups)
    assert fit.tolist() == [True, True, False, False, True, False]
    assert held.tolist() == [False, False, False, True, False, True]
    with pytest.raises(ValueError, match="keep, groups"):
        token_halves(keep, groups[:3])
