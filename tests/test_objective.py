"""The objective ablation and the L0-mismatch analysis on planted SAEs, a tiny model and the smoke profile."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from _planted import planted
from conftest import make_sae

from saematch_core.experiments import objective
from saematch_core.experiments.objective import (
    L0MismatchConfig,
    L0MismatchResult,
    MismatchRow,
    Objective,
    ObjectiveConfig,
    RetrainRow,
    _next_coef,
    _objective_perm,
    block_distances,
    block_weighted,
    default_objectives,
    normalising_weights,
    paper_scale,
    random_pair_distance,
    rescale_input,
    spearman,
)
from saematch_core.fold import fold
from saematch_core.match import MatchConfig


def _perm(obj: Objective, a, b, c: float = 7.0) -> torch.Tensor:
    return _objective_perm(obj, a, b, c, None)[0]


@pytest.mark.parametrize("obj", default_objectives(), ids=lambda o: o.name)
def test_every_objective_recovers_a_planted_permutation(obj: Objective) -> None:
    # B is A reordered with every feature rescaled: folded blocks agree exactly at the partner and a
    # decoder row keeps its direction, so every objective should find the planted partner.
    a, b, truth = planted()
    assert torch.equal(_perm(obj, a, b), truth)


def test_normalised_matching_ignores_a_rescaled_block() -> None:
    a = make_sae(16, 48, seed=1)
    b = make_sae(16, 48, seed=2)  # unrelated: the matching is decided by the blocks' balance
    norm = next(o for o in default_objectives() if o.name == "normalised")
    summed = default_objectives()[0]
    for block in ("W_enc", "W_dec", "b_enc"):
        k = {block: 30.0}
        base = _perm(norm, a, b)
        assert torch.equal(_perm(norm, block_weighted(a, k), block_weighted(b, k)), base), block
    # ...while the summed objective does change when one block is blown up
    k = {"W_enc": 30.0}
    assert not torch.equal(_perm(summed, block_weighted(a, k), block_weighted(b, k)), _perm(summed, a, b))


def test_normalising_weights_make_each_block_one_per_random_pair() -> None:
    a, b = make_sae(16, 48, seed=1), make_sae(16, 48, seed=2)
    w = normalising_weights(a, b, ("W_enc", "W_dec", "b_enc"), fold_it=True)
    wa, wb = block_weighted(a, w), block_weighted(b, w)
    for block in ("W_enc", "W_dec", "b_enc"):
        d = block_distances(wa, wb, torch.arange(48))
        assert d[f"{block}_random"] == pytest.approx(1.0, rel=1e-6)


def test_paper_scale_is_the_summed_objective_with_blocks_weighted_c_squared() -> None:
    a, b = make_sae(16, 48, seed=1), make_sae(16, 48, seed=2)
    c = 9.0
    paper = next(o for o in default_objectives() if o.name == "paper_scale")
    weighted = _perm(
        default_objectives()[0],
        block_weighted(a, {"W_enc": c, "W_dec": 1 / c}),
        block_weighted(b, {"W_enc": c, "W_dec": 1 / c}),
    )
    assert torch.equal(_perm(paper, a, b, c), weighted)


def test_rescale_input_keeps_folded_codes_and_scales_the_reconstruction() -> None:
    sae = make_sae(16, 48, seed=4)
    x = 3 * torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    c = 6.0
    small = rescale_input(sae, c)
    torch.testing.assert_close(fold(small).encode(x / c), fold(sae).encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small(x / c).recon * c, sae(x).recon, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="c: expected"):
        rescale_input(sae, 0.0)


def test_paper_scale_puts_the_geometric_mean_theta_at_the_target() -> None:
    saes = {i: replace(make_sae(seed=i), threshold=torch.full((64,), 2.0**i)) for i in range(3)}
    c = paper_scale(saes, 0.1)
    scaled = [float(rescale_input(s, c).threshold.mean()) for s in saes.values()]
    assert math.exp(sum(math.log(v) for v in scaled) / 3) == pytest.approx(0.1)


def test_random_pair_distance_matches_the_mean_over_all_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) + 1
    brute = float((x[:, None] - y[None]).square().sum(-1).mean())
    assert random_pair_distance(x, y) == pytest.approx(brute)


def test_block_distances_of_the_planted_matching_are_zero_and_random_is_not() -> None:
    a, b, truth = planted()
    d = block_distances(a, b, truth)
    for block in ("W_dec", "b_enc", "W_enc"):
        assert d[block] == pytest.approx(0.0, abs=1e-10)
        assert d[f"{block}_random"] > 0


def test_objective_validation() -> None:
    with pytest.raises(ValueError, match="needs metric 'mse'"):
        Objective(name="x", match=MatchConfig(metric="cosine"), weighting="normalised")
    with pytest.raises(ValueError, match="unique names"):
        ObjectiveConfig(objectives=(default_objectives()[0], default_objectives()[0]))
    with pytest.raises(ValueError, match="stride"):
        ObjectiveConfig(stride=0)
    with pytest.raises(ValueError, match="weights: expected keys"):
        block_weighted(make_sae(), {"b_dec": 2.0})


# ------------------------------------------------------------------------- L0 mismatch statistics
def test_spearman_ignores_nan_and_needs_three_points() -> None:
    assert spearman([1, 2, 3, float("nan")], [3, 2, 1, 5]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _row(la: int, mismatch: float, score: float, ev: float) -> MismatchRow:
    return MismatchRow(
        layer_a=la,
        layer_b=la + 1,
        l0_a=10.0,
        l0_b=10.0 * math.exp(mismatch),
        mismatch=mismatch,
        matching_score=score,
        explained_variance=ev,
        delta_loss=0.1,
    )


def _retrained(ev_before: float, ev_after: float) -> RetrainRow:
    nan = math.nan
    return RetrainRow(
        layer_a=0, layer_b=1, target_l0=10.0, l0_before=12.0, l0_after=10.1, coef_before=0.3, coef_after=0.35,
        tries=1, ev_before=ev_before, ev_after=ev_after, ev_control=nan, score_before=nan, score_after=nan,
        delta_loss_before=nan, delta_loss_after=nan, fvu_after=nan,
    )  # fmt: skip


def test_l0_neighbours_reports_the_contract_numbers() -> None:
    rows = tuple(
        _row(i, m, s, e) for i, (m, s, e) in enumerate([(0.1, 0.5, 0.2), (0.3, 0.4, 0.1), (0.2, 0.45, 0.3)])
    )
    result = L0MismatchResult(rows=rows, retrained=(_retrained(0.1, 0.15), _retrained(0.2, 0.1)))
    out = result.l0_neighbours()
    assert out["rho_mismatch_score"] == pytest.approx(-1.0)
    assert out["rho_mismatch_ev"] == pytest.approx(-0.5)
    assert out["ev_gain"] == pytest.approx((0.05, -0.1))
    assert isinstance(out["rho_mismatch_ev"], float)
    assert L0MismatchResult.from_dict(result.to_dict()).to_dict() == result.to_dict()


def test_retrain_pairs_are_the_largest_early_mismatches() -> None:
    rows = [_row(i, m, 0.5, 0.1) for i, m in enumerate([0.05, 0.3, 0.1, 0.2, 0.9, 0.4])]
    cfg = L0MismatchConfig(n_retrain=2, early_fraction=0.5)  # early: first layers 0..2 of 6
    assert objective._pick_retrain(rows, cfg, 6) == [(1, 2), (2, 3)]
    assert objective._pick_retrain(rows, replace(cfg, retrain_pairs=((4, 5),)), 6) == [(4, 5)]


def test_next_coefficient_follows_the_power_law_then_the_secant() -> None:
    # L0 = 10 · λ^(−0.5): from λ = 1 (L0 10), a target of 20 needs λ = 0.25
    assert _next_coef([(1.0, 10.0)], 20.0, 0.5) == pytest.approx(0.25)
    assert _next_coef([(1.0, 10.0), (0.5, 10.0 * 0.5**-0.5)], 20.0, 2.0) == pytest.approx(0.25)
    # a flat response is bounded to a factor 4 per try
    assert _next_coef([(1.0, 10.0)], 1e6, 0.5) == pytest.approx(0.25)
