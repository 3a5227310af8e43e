"""Every claim's verdict rule on synthetic measurements (one passing, one failing case each), the
measurement builders, and the findings files behind the reproduction table."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pytest

from saematch_core.experiments.agreement import BinRow, MSEBinnedAgreement, PairRecord
from saematch_core.experiments.approximate import ApproximationResult, ApproxRow, L0SweepResult, SweepRow
from saematch_core.experiments.ceiling import SeedCeilingResult, SeedCeilingRow
from saematch_core.experiments.claims import (
    CLAIMS,
    CLAIMS_FILE,
    L0_NOT_MEASURED,
    OUR_CLAIMS,
    PAPER_CLAIMS,
    AboveChance,
    AgreementByMSE,
    Check,
    CodeLast,
    Comparison,
    CorpusLoss,
    DepthTrend,
    EarlyLate,
    EVGap,
    Finding,
    L0Sweep,
    MSEAgreement,
    NormFollow,
    PanelWins,
    Persistence,
    QuantileShape,
    ScoreGain,
    ScoresByParams,
    ScoreVs,
    SeedCeiling,
    SmallLoss,
    ThetaNorm,
    claims_table_html,
    finding_markdown,
    measure_above_chance,
    measure_agreement,
    measure_code_last,
    measure_corpus_loss,
    measure_depth_trend,
    measure_early_late,
    measure_ev_gap,
    measure_folding_gain,
    measure_l0_neighbours,
    measure_l0_sweep,
    measure_match_vs,
    measure_norm_follow,
    measure_persistence,
    measure_quantile_shape,
    measure_score_vs,
    measure_scores_by_params,
    measure_seed_ceiling,
    measure_small_loss,
    measure_theta_norm,
    measure_unfolded_higher,
    read_claims,
    write_claims,
)
from saematch_core.experiments.matching_score import MatchingScores
from saematch_core.experiments.measures.scores import MatchingScoreResult, ScoreRow
from saematch_core.experiments.parameter_mse import ParameterMSEResult, ParameterMSERow
from saematch_core.experiments.persistence import PersistenceResult, PersistenceRow
from saematch_core.experiments.scale import ScaleDepthResult, ScaleRow

NAN = math.nan


def _agree(low: float, high: float, random: float, median: float = 1.0) -> AgreementByMSE:
    return AgreementByMSE(layer_a=1, layer_b=2, low=low, high=high, random=random, median_mse=median)


def _persist(horizons: dict[int, int], rho: float, near: float, far: float) -> Persistence:
    return Persistence(
        horizons=horizons, rho_decline=rho, ratio_near=near, ratio_far=far, agreement_near=0.3, max_distance=8
    )


def _sweep(peaks: tuple[int, int, int], rhos: tuple[float, float, float], above: float) -> L0Sweep:
    schemes = ("match_folded", "encdec_current", "encdec_previous")
    return L0Sweep(
        l0s=(10.0, 20.0, 40.0, 80.0, 160.0),
        ev_peak=dict(zip(schemes, peaks, strict=True)),
        rho_dl=dict(zip(schemes, rhos, strict=True)),
        epd_above=above,
    )


def _cmp(wins_dl: int, wins_ev: int) -> Comparison:
    return Comparison(
        other="drop", wins_dl=wins_dl, wins_ev=wins_ev, total=10, mean_dl=(1.0, 0.5), mean_ev=(0.2, 0.8)
    )


GOOD_SWEEP = _sweep((2, 4, 4), (-1.0, -0.9, -0.8), 1.0)

# key → (a measurement that reproduces the claim, one that does not)
CASES: dict[str, tuple[Any, Any]] = {
    "fig1_theta_norm": (ThetaNorm(0.9, 0.8, 0.6, 26), ThetaNorm(0.9, 0.8, 0.4, 26)),
    "fig1_folded_norm_diff": (NormFollow(0.6, 25), NormFollow(0.4, 25)),
    "fig3_unfolded_higher": (PanelWins(1.0, 0.9, 0.95, 29), PanelWins(1.0, 1.0, 0.85, 29)),
    "fig3_depth_trend": (DepthTrend(-0.5, 0.7), DepthTrend(-0.4, 0.9)),
    "fig7_folding_raises_score": (ScoreGain(0.75, 0.2, 0.1), ScoreGain(0.9, 0.1, 0.1)),
    "fig7_early_low": (EarlyLate(0.29, 0.4), EarlyLate(0.31, 0.4)),
    "fig7_not_zero": (AboveChance(3.0, 2, 0.1), AboveChance(2.9, 2, 0.1)),
    "fig5_low_mse_similar": (
        MSEAgreement((_agree(0.4, 0.2, 0.1), _agree(0.5, 0.1, 0.05))),
        MSEAgreement((_agree(0.4, 0.2, 0.05), _agree(0.5, 0.1, 0.05))),
    ),
    "fig5_scale_differs": (
        MSEAgreement((_agree(0.4, 0.1, 0.1, 2.0), _agree(0.4, 0.1, 0.1, 3.0))),
        MSEAgreement((_agree(0.4, 0.1, 0.1, 2.0), _agree(0.4, 0.1, 0.1, 2.9))),
    ),
    "fig8_five_layers": (
        _persist({10: 4, 12: 5, 20: 3}, -0.5, 0.8, 0.5),
        _persist({10: 4, 12: 3, 20: 3}, -0.5, 0.8, 0.5),
    ),
    "fig8_composition_nearby": (_persist({10: 5}, -0.5, 0.8, 0.7), _persist({10: 5}, -0.5, 0.8, 0.75)),
    "fig10_small_loss_late": (SmallLoss(0.3, 2.0, 3.0), SmallLoss(0.31, 2.0, 3.0)),
    "fig10_web_least": (
        CorpusLoss({"austen": 0.2, "code": 0.5, "reference": 0.3}, "austen"),
        CorpusLoss({"austen": 0.4, "code": 0.5, "reference": 0.3}, "austen"),
    ),
    "fig10_code_last": (CodeLast(29, 1.0, 0.5, 0.9), CodeLast(29, 1.0, 0.5, 1.1)),
    "fig11_converges": (EVGap(0.05, 1.0, -0.2), EVGap(0.06, 1.0, -0.2)),
    "fig11_worse_early": (EVGap(0.0, 0.8, -0.2), EVGap(0.0, 0.7, -0.2)),
    "fig12_encoder_poor": (
        ScoresByParams(19, 20, 0.4, 0.37, 0.2, 0.03),
        ScoresByParams(19, 20, 0.4, 0.35, 0.1, 0.03),
    ),
    "fig14_ev_peak": (GOOD_SWEEP, _sweep((2, 2, 4), (-1.0, -1.0, -1.0), 1.0)),
    "fig14_l0_lowers_dl": (GOOD_SWEEP, _sweep((2, 4, 0), (-1.0, -0.7, -1.0), 1.0)),
    "fig14_epd_above_encdec": (GOOD_SWEEP, _sweep((2, 4, 0), (-1.0, -1.0, -1.0), 0.8)),
    "fig15_l0_neighbours": (
        measure_l0_neighbours(-0.5, -0.3, (0.02, 0.01, -0.01)),
        measure_l0_neighbours(-0.5, -0.3, (0.05, -0.01, -0.01)),
    ),
    "fig16_quantile": (QuantileShape(-0.8, 0.4, 0.2, (3, 10)), QuantileShape(-0.8, 0.4, 0.21, (3, 10))),
    "ours_match_vs_drop": (_cmp(6, 6), _cmp(5, 10)),
    "ours_match_vs_linear": (_cmp(6, 6), _cmp(10, 5)),
    "ours_folded_vs_cosine_approx": (_cmp(10, 6), _cmp(1, 1)),
    "ours_folded_vs_cosine_score": (ScoreVs("cosine", 0.6, 0.2, 0.2), ScoreVs("cosine", 0.5, 0.2, 0.2)),
    "ours_seed_ceiling": (
        SeedCeiling(0.4, 0.8, 0.05, 0.97, (4, 14)),
        SeedCeiling(0.09, 0.8, 0.04, 0.97, (4, 14)),
    ),
}

# key → a measurement the rule cannot judge (None), for the rules that have that case
NOT_MEASURABLE: dict[str, Any] = {
    "fig1_theta_norm": ThetaNorm(NAN, NAN, NAN, 2),
    "fig7_early_low": EarlyLate(NAN, 0.4),
    "fig5_low_mse_similar": MSEAgreement((_agree(0.4, NAN, 0.1),)),
    "fig5_scale_differs": MSEAgreement((_agree(0.4, 0.1, 0.1),)),
    "fig8_composition_nearby": _persist({10: 3}, -0.5, 0.9, NAN),
    "fig10_web_least": CorpusLoss({"code": 0.5, "reference": 0.3}, "austen"),
    "fig10_code_last": measure_code_last({}),
    "fig14_ev_peak": measure_l0_sweep(None),
    "fig14_l0_lowers_dl": measure_l0_sweep(None),
    "fig14_epd_above_encdec": measure_l0_sweep(None),
    "fig15_l0_neighbours": L0_NOT_MEASURED,
    "ours_seed_ceiling": measure_seed_ceiling(None),
}


def test_every_claim_has_a_passing_and_a_failing_case() -> None:
    assert set(CASES) == set(CLAIMS)


@pytest.mark.parametrize("key", sorted(CASES))
def test_rule_passes_and_fails(key: str) -> None:
    claim = CLAIMS[key]
    good, bad = CASES[key]
    assert claim.verdict(good) is True, claim.rule
    assert claim.verdict(bad) is False, claim.rule
    found = claim.evaluate(good)
    assert found.key == key and found.holds is True and found.ours == claim.describe(good)
    assert found.reason == ""
    failed = claim.evaluate(bad)
    assert failed.holds is False and "needs" in failed.reason  # the failed check, with our number
    assert claim.figure.startswith("Fig") or claim.figure == "(ours)"
    assert claim.text and claim.rule and claim.measurement and claim.why


@pytest.mark.parametrize("key", sorted(NOT_MEASURABLE))
def test_rule_is_silent_when_it_cannot_judge(key: str) -> None:
    claim = CLAIMS[key]
    assert claim.verdict(NOT_MEASURABLE[key]) is None
    assert claim.reason(NOT_MEASURABLE[key]).startswith("undefined here: ")
    claim.describe(NOT_MEASURABLE[key])  # formats without raising


def test_check_compares_and_formats() -> None:
    assert Check("x", 1.0, "≥", 1.0).passed is True and Check("x", 1.0, ">", 1.0).passed is False
    assert Check("x", 0.5, "<", 1.0).passed is True and Check("x", 1.0, "≤", 0.5).passed is False
    assert Check("x", NAN, "≥", 1.0).passed is None
    assert Check("ρ", -0.31, "≤", -0.5).text() == "ρ = -0.31 (needs ≤ -0.5)"


def test_registries_split_the_papers_claims_from_ours() -> None:
    assert not set(PAPER_CLAIMS) & set(OUR_CLAIMS)
    assert list(CLAIMS) == [*PAPER_CLAIMS, *OUR_CLAIMS]
    # the paper never compares with layer drop, a linear map or cosine matching in words
    assert {"ours_match_vs_drop", "ours_match_vs_linear", "ours_seed_ceiling"} <= set(OUR_CLAIMS)
    assert all(c.key == k for k, c in CLAIMS.items())
    assert all(not k.startswith("ours_") for k in PAPER_CLAIMS) and all(
        k.startswith("ours_") for k in OUR_CLAIMS
    )
    # one row per claim of the paper's text, figure by figure
    figures = {c.figure.split(" (")[0] for c in PAPER_CLAIMS.values()}
    assert figures == {"Fig. 1", "Fig. 3", "Figs. 4/7", "Fig. 7", "Figs. 5/6", "Fig. 8", "Fig. 10", "Fig. 11",
                       "Fig. 12", "Fig. 14", "Fig. 15", "Figs. 16/17"}  # fmt: skip


def test_describe_formats_as_the_table_shows_them() -> None:
    assert CLAIMS["fig7_early_low"].describe(EarlyLate(0.3, 0.4)) == (
        "folded Matching Score early 0.300 vs later 0.400"
    )
    assert CLAIMS["fig14_ev_peak"].describe(measure_l0_sweep(None)) == "no L0 sweep on this profile"
    assert CLAIMS["fig15_l0_neighbours"].describe(L0_NOT_MEASURED).startswith("not measured in this build")
    assert (
        CLAIMS["fig3_depth_trend"].reason(DepthTrend(-0.4, 0.9))
        == "ρ(layer, W_enc MSE) = -0.4 (needs ≤ -0.5)"
    )
    ours = finding_markdown(CLAIMS["ours_match_vs_drop"].evaluate(_cmp(1, 1)))
    assert ours.startswith("*our question:*") and "**does not hold**" in ours
    paper = finding_markdown(CLAIMS["fig3_depth_trend"].evaluate(DepthTrend(-0.6, 0.9)))
    assert paper.startswith("*Fig. 3, the paper:*") and "**reproduced**" in paper


# ------------------------------------------------------------------------------------------ builders
def _mse(method: str, mse: float, layer: int, dec_norm_diff: float = 0.0) -> ParameterMSERow:
    return ParameterMSERow(
        layer_a=layer, layer_b=layer + 1, method=method, mse=mse, mse_W_enc=mse, mse_W_dec=2 * mse,
        mse_b_enc=mse, dec_norm_diff=dec_norm_diff, n_matched=4, identity_fraction=0.0, is_permutation=True,
    )  # fmt: skip


def _scale(thetas: list[float], norms: list[float]) -> ScaleDepthResult:
    nan_q = (NAN,) * 5
    rows = tuple(
        ScaleRow(layer=t, theta_mean=th, theta_quantiles=nan_q, norm_mean=n, norm_quantiles=nan_q, n_tokens=3)
        for t, (th, n) in enumerate(zip(thetas, norms, strict=True))
    )
    return ScaleDepthResult(quantiles=(0.5,), rows=rows)


def test_parameter_mse_and_scale_measurements() -> None:
    folded, unfolded = (3.0, 2.0, 1.0), (4.0, 1.5, 2.0)
    rows = tuple(_mse("folded", v, t, dec_norm_diff=t + 1.0) for t, v in enumerate(folded))
    rows += tuple(_mse("unfolded", v, t) for t, v in enumerate(unfolded))
    mse = ParameterMSEResult(rows=rows)
    wins = measure_unfolded_higher(mse)
    assert (wins.W_enc, wins.W_dec, wins.b_enc, wins.n_pairs) == (pytest.approx(2 / 3),) * 3 + (3,)
    trend = measure_depth_trend(mse)
    assert trend.rho_enc == pytest.approx(-1.0) and trend.rho_dec == pytest.approx(-1.0)
    scale = _scale([1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 4.0, 7.0])  # ‖h‖ grows by 1, 2, 3
    theta = measure_theta_norm(scale)
    assert theta.rho_theta_norm == pytest.approx(0.8) and theta.rho_norm_depth == pytest.approx(1.0)
    assert theta.n_layers == 4
    follow = measure_norm_follow(mse, scale)
    assert follow.r == pytest.approx(1.0) and follow.n_pairs == 3


def _scores(layer: int, values: dict[str, float]) -> MatchingScoreResult:
    def row(method: str, score: float) -> ScoreRow:
        return ScoreRow(
            method=method, matching_score=score, matching_score_sd=0.0, jaccard=score, pearson=score,
            n_pairs=4, n_unmatched=0, n_dead_a=0, n_dead_b=0, n_excluded=0,
        )  # fmt: skip

    rows = tuple(row(m, v) for m, v in values.items())
    return MatchingScoreResult(layer_a=layer, layer_b=layer + 1, n_tokens=10, rows=rows)


def test_matching_score_measurements() -> None:
    values = [
        {"folded": 0.1, "unfolded": 0.2, "cosine": 0.1, "random": 0.05},
        {"folded": 0.12, "unfolded": 0.1, "cosine": 0.2, "random": 0.01},
        {"folded": 0.5, "unfolded": 0.2, "cosine": 0.4, "random": 0.01},
        {"folded": 0.5, "unfolded": NAN, "cosine": 0.4, "random": 0.01},
    ]
    scores = MatchingScores(pairs=tuple(_scores(t, v) for t, v in enumerate(values)))
    gain = measure_folding_gain(scores)
    assert gain.fraction == pytest.approx(2 / 3) and gain.folded == pytest.approx(0.305)
    assert gain.unfolded == pytest.approx(0.5 / 3)
    # 4 layers → 5-layer model: 10/26 of 5 is 1.9, so pairs starting at 0 and 1 are early
    assert measure_early_late(scores, 5) == EarlyLate(early=0.11, late=0.5)
    chance = measure_above_chance(scores)
    assert (chance.min_ratio, chance.worst_layer, chance.min_score) == (pytest.approx(2.0), 0, 0.1)
    vs = measure_score_vs(scores, "cosine")
    assert vs.fraction == 0.75 and vs.other == "cosine"
    pair = _scores(19, {"folded": 0.4, "decoder_only": 0.38, "encoder_only": 0.1, "random": 0.02})
    assert measure_scores_by_params(pair) == ScoresByParams(19, 20, 0.4, 0.38, 0.1, 0.02)


def test_agreement_measurement() -> None:
    def bin_(p: float, n: int) -> BinRow:
        return BinRow(
            lo=0.0, hi=1.0, n_pairs=n, p_partner=p, jaccard=p, pearson=p, top_token_overlap=p,
            top_position_overlap=p,
        )  # fmt: skip

    def rec(i: int, mse: float, included: bool = True) -> PairRecord:
        return PairRecord(
            feature=i, partner=i, mse=mse, p_partner=0.5, jaccard=0.5, pearson=0.5, top_token_overlap=0.5,
            top_position_overlap=0.5, included=included,
        )  # fmt: skip

    binned = MSEBinnedAgreement(
        layer_a=4, layer_b=5, n_tokens=9, bins=(bin_(0.8, 3), bin_(0.5, 2), bin_(0.1, 4)), p_random=0.02,
        pairs=(rec(0, 1.0), rec(1, 3.0), rec(2, 2.0), rec(3, 100.0, included=False)),
    )  # fmt: skip
    empty = MSEBinnedAgreement(layer_a=6, layer_b=7, n_tokens=9, bins=(bin_(0.8, 0), bin_(0.1, 4)))
    m = measure_agreement([binned, empty])
    assert m.pairs[0] == AgreementByMSE(4, 5, 0.8, 0.1, 0.02, 2.0)
    assert math.isnan(m.pairs[1].low) and math.isnan(m.pairs[1].median_mse)


def test_persistence_measurement() -> None:
    def row(s: int, d: int, direct: float, composed: float) -> PersistenceRow:
        return PersistenceRow(
            start=s, target=s + d, distance=d, agreement=composed / direct, n_compared=1, n_lost=0,
            score_composed=composed, score_direct=direct, score_random=0.1,
        )  # fmt: skip

    rows = [row(1, d, dr, c) for d, dr, c in ((1, 0.5, 0.5), (2, 0.4, 0.36), (3, 0.2, 0.1), (4, 0.35, 0.1))]
    rows += [row(2, d, 0.9 - 0.1 * d, 0.9 - 0.1 * d) for d in range(1, 6)]
    m = measure_persistence(PersistenceResult(rows=tuple(rows)))
    assert m.horizons == {1: 2, 2: 5} and m.max_distance == 5
    assert m.ratio_near == pytest.approx(0.95) and m.ratio_far == pytest.approx(1.0)  # start 1 stops at 4
    assert m.agreement_near == pytest.approx(0.95)
    assert m.rho_decline == pytest.approx((-0.8 - 1.0) / 2)


def _approx(layer: int, scheme: str, dl: float, ev: float, l0: float = NAN, clean: float = 3.0) -> ApproxRow:
    return ApproxRow(
        layer=layer, scheme=scheme, delta_loss=dl, delta_loss_se=0.0, clean_loss=clean, explained_variance=ev,
        kl=0.0, n_tokens=1, n_loss_tokens=1, n_passthrough=0, l0_cur=l0,
    )  # fmt: skip


def _corpus(dls: list[float], evs: list[float], prev_evs: list[float]) -> ApproximationResult:
    rows = []
    for t, (dl, ev, pev) in enumerate(zip(dls, evs, prev_evs, strict=True), 1):
        rows += [_approx(t, "match_folded", dl, ev), _approx(t, "drop", 0.5, 0.9)]
        rows += [_approx(t, "encdec_previous", 0.8, pev)]
    return ApproximationResult(rows=tuple(rows))


def test_approximation_measurements() -> None:
    # a 6-layer model: layers 1, 2 are early (< 10/26 · 6 = 2.3), 4 and 5 the last third (≥ 4)
    austen = _corpus([2.0, 1.0, 0.2, 0.2, 0.3], [0.1, 0.2, 0.5, 0.6, 0.6], [0.5, 0.1, 0.5, 0.6, 0.7])
    code = _corpus([2.0, 0.3, 0.4, 0.4, 0.9], [0.1, 0.2, 0.5, 0.6, 0.6], [0.5, 0.1, 0.5, 0.6, 0.5])
    results = {"austen": austen, "code": code}
    small = measure_small_loss(results, 6)
    assert (small.late, small.early, small.clean) == (
        pytest.approx(0.4),
        pytest.approx(1.325),
        pytest.approx(3.0),
    )
    corpus = measure_corpus_loss(results, 6)
    assert corpus.late == {"austen": pytest.approx(0.7 / 3), "code": pytest.approx(1.7 / 3)}
    assert CLAIMS["fig10_web_least"].verdict(corpus) is True
    last = measure_code_last(results)
    assert last == CodeLast(layer=5, code_last=0.9, code_before=0.4, others_last=0.3)
    gap = measure_ev_gap(results, 6)
    assert gap.late_gap == pytest.approx(0.0) and gap.early_worse == 0.5
    assert gap.mean_early_gap == pytest.approx(-0.15)
    vs = measure_match_vs(results, "drop")
    assert (vs.wins_dl, vs.wins_ev, vs.total) == (6, 0, 10)
    assert vs.mean_dl == (pytest.approx(0.77), 0.5)


def test_hybrid_and_sweep_measurements() -> None:
    qs = (0.0, 0.25, 0.5, 1.0)
    evs = {3: (0.8, 0.5, 0.3, 0.2), 10: (0.6, 0.5, 0.45, 0.45)}  # a tie at layer 10
    hybrid = ApproximationResult(
        rows=tuple(_approx(t, f"hybrid_q{q:g}", 0.0, ev) for t, vs in evs.items()
                   for q, ev in zip(qs, vs, strict=True))
    )  # fmt: skip
    shape = measure_quantile_shape(hybrid, qs)
    assert -1.0 < shape.rho_max < -0.9 and shape.layers == (3, 10)
    assert shape.drop_low == pytest.approx(0.325) and shape.drop_high == pytest.approx(0.05)
    with pytest.raises(ValueError, match="one per hybrid scheme"):
        measure_quantile_shape(hybrid, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"0, 0\.5 and 1"):
        measure_quantile_shape(hybrid, (0.0, 0.25, 0.75, 1.0))
    points = {"a": 10.0, "b": 40.0, "c": 90.0}
    series = {  # scheme → (EV, ΔL) per variant
        "match_folded": ((0.2, 0.5, 0.3), (3.0, 2.0, 1.0)),
        "encdec_current": ((0.7, 0.8, 0.9), (0.5, 0.4, 0.3)),
        "encdec_previous": ((0.5, 0.6, 0.7), (0.9, 0.7, 0.8)),
    }
    sweep = L0SweepResult(
        layer=2,
        rows=tuple(SweepRow(variant=v, row=_approx(2, s, dls[i], evs_[i], points[v]))
                   for s, (evs_, dls) in series.items() for i, v in enumerate(points)),
    )  # fmt: skip
    m = measure_l0_sweep(sweep)
    assert m.l0s == (10.0, 40.0, 90.0) and dict(m.ev_peak) == {
        "match_folded": 1,
        "encdec_current": 2,
        "encdec_previous": 2,
    }
    assert m.rho_dl["match_folded"] == pytest.approx(-1.0)
    assert m.rho_dl["encdec_previous"] == pytest.approx(-0.5)
    assert m.epd_above == 1.0
    assert [
        CLAIMS[k].verdict(m) for k in ("fig14_ev_peak", "fig14_l0_lowers_dl", "fig14_epd_above_encdec")
    ] == [
        True,
        False,
        True,
    ]


def test_seed_ceiling_measurement() -> None:
    def row(layer: int, method: str, swap: float) -> SeedCeilingRow:
        return SeedCeilingRow(
            layer=layer, method=method, same_layer=0.2, previous=0.18, next=NAN, random=0.03, ev_self=0.8,
            ev_same_layer=swap, ev_previous=0.05,
        )  # fmt: skip

    result = SeedCeilingResult(rows=(row(4, "folded", 0.1), row(4, "unfolded", 0.5), row(14, "folded", 0.3)))
    m = measure_seed_ceiling(result)
    assert (m.ev_swap, m.ev_self, m.ev_previous) == (pytest.approx(0.2), 0.8, 0.05)
    assert m.score_fraction == pytest.approx(0.9) and m.layers == (4, 14)


# ------------------------------------------------------------------------------------------ files
def test_findings_round_trip_in_registry_order(tmp_path: Path) -> None:
    q = CLAIMS["fig16_quantile"]
    write_claims(tmp_path / "05_x", "05_x", [Finding(key="fig16_quantile", ours="+0.1", holds=True)])
    write_claims(tmp_path / "05_x", "05_x", [
        Finding(key="ours_match_vs_drop", ours="1/87", holds=False, reason="few wins"),
        Finding(key="fig16_quantile", ours="+0.1", holds=True),
    ])  # fmt: skip
    write_claims(tmp_path / "01_y", "01_y", [Finding(key="fig1_theta_norm", ours="r = <0.9>", holds=None)])
    (tmp_path / "other").mkdir()
    found = read_claims(tmp_path)
    assert [f.key for f in found] == ["fig1_theta_norm", "fig16_quantile", "ours_match_vs_drop"]
    assert found[0].section == "01_y" and found[0].holds is None and found[2].reason == "few wins"
    assert (
        found[0].paper == PAPER_CLAIMS["fig1_theta_norm"].text and found[0].claim is CLAIMS["fig1_theta_norm"]
    )
    table = claims_table_html(found, link_prefix="../notebooks/")
    assert "r = &lt;0.9&gt;" in table and 'href="../notebooks/05_x.html"' in table
    assert "not measurable here" in table and "does not hold: few wins" in table
    assert html.escape(q.rule) in table and "Figs. 16/17: " in table
    assert table.index("r = &lt;0.9&gt;") < table.index("Beyond the paper") < table.index("1/87")
    assert "1/87" not in claims_table_html(found, which="paper")
    assert "r = &lt;0.9&gt;" not in claims_table_html(found, which="ours")
    with pytest.raises(ValueError, match="which"):
        claims_table_html(found, which="all")
    doc = json.loads((tmp_path / "05_x" / CLAIMS_FILE).read_text())
    assert doc["section"] == "05_x" and [r["key"] for r in doc["claims"]] == [
        "ours_match_vs_drop",
        "fig16_quantile",
    ]
    # the file's exact text: one key per line, written in the notebook's order
    assert (tmp_path / "01_y" / CLAIMS_FILE).read_text() == (
        '{\n "section": "01_y",\n "claims": [\n  {\n   "key": "fig1_theta_norm",\n   "ours": "r = <0.9>",\n'
        '   "holds": null,\n   "reason": "",\n   "section": "01_y"\n  }\n ]\n}\n'
    )
    with pytest.raises(ValueError, match=r"Finding\.key"):
        Finding(key="fig99", ours="", holds=None)
    with pytest.raises(TypeError, match="findings"):
        write_claims(tmp_path / "z", "z", ["not a finding"])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError):
        read_claims(tmp_path / "missing")


def test_the_claims_own_section_wins_over_a_placeholder(tmp_path: Path) -> None:
    placeholder = CLAIMS["fig15_l0_neighbours"].evaluate(L0_NOT_MEASURED)
    measured = CLAIMS["fig15_l0_neighbours"].evaluate(measure_l0_neighbours(-0.4, -0.2, (0.1, 0.2, -0.1)))
    write_claims(tmp_path / "06_objective", "06_objective", [measured])
    write_claims(tmp_path / "07_later", "07_later", [placeholder])  # read after, but not the claim's section
    (found,) = read_claims(tmp_path)
    assert found.section == "06_objective" and found.holds is True
    # an old results folder with a claim this version does not test is skipped
    (tmp_path / "00_old").mkdir()
    old = {
        "section": "00_old",
        "claims": [{"key": "fig99_gone", "ours": "", "holds": True, "section": "00_old"}],
    }
    (tmp_path / "00_old" / CLAIMS_FILE).write_text(json.dumps(old))
    assert [f.key for f in read_claims(tmp_path)] == ["fig15_l0_neighbours"]
