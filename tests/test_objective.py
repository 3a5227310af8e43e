"""The objective ablation and the L0-mismatch analysis on planted SAEs, a tiny model and the smoke profile."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _planted import planted
from conftest import make_sae
from test_approximate import N_LAYERS, D, tiny_llama
from test_approximate import tokens as approx_tokens

from saematch_core.experiments import objective
from saematch_core.experiments.inputs import Inputs, TokenBatch
from saematch_core.experiments.measures.summary import rank_correlation
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
)
from saematch_core.experiments.study import load_study
from saematch_core.fold import fold, rescale_features
from saematch_core.match import MatchConfig
from saematch_core.profiles import SAETrainConfig


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
    thetas = [rescale_input(s, c).threshold for s in saes.values()]
    scaled = [float(t.mean()) for t in thetas if t is not None]
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
def test_rank_correlation_ignores_nan_and_needs_three_points() -> None:
    assert rank_correlation([1, 2, 3, float("nan")], [3, 2, 1, 5], min_points=3) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([1, 2], [1, 2], min_points=3))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3], min_points=3))


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
    assert objective.pick_retrain_pairs(rows, cfg, 6) == [(1, 2), (2, 3)]
    assert objective.pick_retrain_pairs(rows, replace(cfg, retrain_pairs=((4, 5),)), 6) == [(4, 5)]


def test_next_coefficient_follows_the_power_law_then_the_secant() -> None:
    # L0 = 10 · λ^(−0.5): from λ = 1 (L0 10), a target of 20 needs λ = 0.25
    assert _next_coef([(1.0, 10.0)], 20.0, 0.5) == pytest.approx(0.25)
    assert _next_coef([(1.0, 10.0), (0.5, 10.0 * 0.5**-0.5)], 20.0, 2.0) == pytest.approx(0.25)
    # a flat response is bounded to a factor 4 per try
    assert _next_coef([(1.0, 10.0)], 1e6, 0.5) == pytest.approx(0.25)


# ------------------------------------------------------------------------- end to end on a tiny model
def _tiny_inputs(tmp_path: Path) -> tuple[Inputs, torch.Tensor]:
    """A tiny Llama, random SAEs for blocks 0 and 1, and block 2's SAE = block 1's reordered and
    rescaled (the planted pair 1 → 2); activations of every block on the same tokens."""
    model = tiny_llama()
    ids = approx_tokens(n=6, seq=12, seed=1)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    acts = {t: hs[t + 1].reshape(-1, D) for t in range(N_LAYERS)}
    saes = {0: make_sae(D, 48, seed=10), 1: make_sae(D, 48, seed=11)}
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(48, generator=g)
    saes[2] = rescale_features(saes[1].permute(order), 0.3 + 3 * torch.rand(48, generator=g))
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[:: ids.shape[1]] = False  # position 0 of every chunk
    inputs = Inputs(
        saes=saes, activations=acts, keep=keep, model=model, tokens=TokenBatch(ids, None),
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    return inputs, torch.argsort(order)


def test_run_moves_codes_as_the_matching_saw_them(tmp_path: Path) -> None:
    inputs, _ = _tiny_inputs(tmp_path)
    result = objective.run(inputs, ObjectiveConfig(outlier_factor=None))
    assert [(p.layer_a, p.layer_b) for p in result.pairs] == [(0, 1), (1, 2)]
    planted_pair = result.pairs[1]
    previous = planted_pair.reference("encdec_previous")
    # At the planted pair, folded codes carried to the partner's folded decoder rebuild exactly SAE
    # t−1's own reconstruction; raw codes into the rescaled raw decoder do not.
    for name in ("summed", "normalised", "paper_scale", "decoder", "cosine_folded_codes"):
        row = planted_pair.row(name)
        assert row.explained_variance == pytest.approx(previous.explained_variance, abs=1e-5), name
        assert row.delta_loss == pytest.approx(previous.delta_loss, abs=1e-5), name
        assert row.agree_first == 1.0
        assert row.terms["W_dec"] == pytest.approx(0.0, abs=1e-9)
    cosine = planted_pair.row("cosine")
    assert cosine.agree_first == 1.0  # the same partners ...
    assert abs(cosine.explained_variance - previous.explained_variance) > 1e-3  # ... carried over raw
    # the Matching Score depends on the partners only
    assert cosine.matching_score == planted_pair.row("summed").matching_score
    assert set(result.objectives) == {o.name for o in default_objectives()}
    again = objective.run(inputs, ObjectiveConfig(outlier_factor=None))  # from the cache
    assert again.pairs[1].to_dict() == planted_pair.to_dict()
    assert objective.run(inputs, ObjectiveConfig(outlier_factor=None, stride=2)).layers == [1]


def test_l0_mismatch_on_the_tiny_model(tmp_path: Path) -> None:
    inputs, _ = _tiny_inputs(tmp_path)
    result = objective.l0_mismatch(inputs, L0MismatchConfig(n_retrain=0, outlier_factor=None))
    assert [(r.layer_a, r.layer_b) for r in result.rows] == [(0, 1), (1, 2)]
    for r in result.rows:
        assert r.l0_b == pytest.approx(
            objective.mean_l0(inputs.saes[r.layer_b], inputs.acts(r.layer_b), inputs.keep)
        )
        assert r.mismatch == pytest.approx(abs(math.log(r.l0_b / r.l0_a)))
    with pytest.raises(ValueError, match="train_acts"):
        objective.l0_mismatch(inputs, L0MismatchConfig(retrain_pairs=((0, 1),), train=SAETrainConfig()))


@pytest.mark.slow
def test_the_notebook_computation_on_the_smoke_profile(tmp_path: Path) -> None:
    """The section's computation end to end on the smoke substrate (prepare takes about a minute)."""
    study = load_study("smoke", cache_dir=tmp_path)
    inputs = study.inputs(tokens=study.mixed_batch(128))
    result = objective.run(inputs, ObjectiveConfig(stride=2, median_norms=study.median_norms()))
    assert len(result.pairs) == len(study.pairs[::2])
    for name in result.objectives:
        assert all(math.isfinite(v) for v in result.series(name)), name
    assert all(0 <= v <= 1 for v in result.series("summed", "matching_score"))
    cfg = L0MismatchConfig(n_retrain=1, train=study.profile.sae, median_norms=study.median_norms())
    picked = objective.pick_retrain_pairs(
        objective.l0_mismatch(inputs, replace(cfg, n_retrain=0)).rows, cfg, 4
    )
    other = next(p for p in study.pairs if p != picked[0])
    mismatch = objective.l0_mismatch(
        inputs, replace(cfg, retrain_pairs=(picked[0], other)), train_acts=study.train_activations()
    )
    row, second = mismatch.retrained
    assert (row.layer_a, row.layer_b) == picked[0] and (second.layer_a, second.layer_b) == other
    # retraining with the original recipe and seed reproduces the original SAE (and its EV)
    assert row.ev_control == pytest.approx(row.ev_before, abs=1e-6)
    assert math.isnan(second.ev_control)  # n_control = 1: only the first retrained pair has one
    assert set(mismatch.l0_neighbours()) == {"rho_mismatch_score", "rho_mismatch_ev", "ev_gain"}
