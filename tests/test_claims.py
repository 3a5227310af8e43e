"""Every claim's verdict rule on synthetic measurements (one passing, one failing case each), the
measurement builders, and the findings files behind the reproduction table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from saematch_core.experiments.agreement import BinRow, MSEBinnedAgreement
from saematch_core.experiments.approximate import ApproximationResult, ApproxRow, L0SweepResult, SweepRow
from saematch_core.experiments.claims import (
    CLAIMS,
    CLAIMS_FILE,
    OUR_CLAIMS,
    PAPER_CLAIMS,
    AgreementByMSE,
    BestL0,
    CaseCount,
    DecoderOnly,
    EarlyLate,
    Finding,
    FoldedMSE,
    PersistenceHorizons,
    QuantileGain,
    ScoreComparison,
    ThetaNorm,
    claims_table_html,
    measure_agreement,
    measure_best_l0,
    measure_decoder_only,
    measure_early_late,
    measure_folded_ev,
    measure_folded_mse,
    measure_folded_score,
    measure_match_vs_drop,
    measure_persistence,
    measure_quantile_gain,
    measure_theta_norm,
    read_claims,
    write_claims,
)
from saematch_core.experiments.matching_score import MatchingScores
from saematch_core.experiments.measures.scores import MatchingScoreResult, ScoreRow
from saematch_core.experiments.parameter_mse import ParameterMSEResult, ParameterMSERow
from saematch_core.experiments.persistence import PersistenceResult, PersistenceRow
from saematch_core.experiments.scale import ScaleDepthResult, ScaleRow

NAN = math.nan

# key → (a measurement that reproduces the claim, one that does not)
CASES: dict[str, tuple[Any, Any]] = {
    "fig1_theta_norm": (ThetaNorm(0.9, 0.8, 26), ThetaNorm(0.5, 0.9, 26)),
    "fig3_folded_beats_unfolded": (FoldedMSE(1.0, 0.2), FoldedMSE(0.96, 0.1)),
    "fig12_decoder_only": (DecoderOnly(1.1, 3.0), DecoderOnly(3.0, 3.0)),
    "fig7_folded_score": (ScoreComparison(0.4, 0.4), ScoreComparison(0.39, 0.4)),
    "fig7_early_layers": (EarlyLate(0.29, 0.4), EarlyLate(0.31, 0.4)),
    "fig5_low_mse_agree": (AgreementByMSE(1, 2, 0.5, 0.2, 10, 10), AgreementByMSE(1, 2, 0.2, 0.2, 10, 10)),
    "fig8_persistence": (
        PersistenceHorizons({3: 3.0, 5: math.inf}, 8),
        PersistenceHorizons({3: 2.0, 5: 9.0}, 8),
    ),
    "fig10_folded_vs_unfolded": (CaseCount(4, 7), CaseCount(3, 6)),
    "fig14_best_l0": (BestL0((10.0, 70.0, 200.0), 70.0, True), BestL0((10.0, 70.0, 200.0), 200.0, False)),
    "fig16_quantile": (QuantileGain(0.0, 1.0, 0.01), QuantileGain(0.0, 1.0, -0.01)),
    "fig10_match_vs_drop": (CaseCount(44, 87), CaseCount(1, 87)),
}

# key → a measurement the rule cannot judge (None), for the rules that have that case
NOT_MEASURABLE: dict[str, Any] = {
    "fig1_theta_norm": ThetaNorm(NAN, NAN, 2),
    "fig7_early_layers": EarlyLate(NAN, 0.4),
    "fig5_low_mse_agree": AgreementByMSE(1, 2, 0.5, 0.2, 0, 10),
    "fig14_best_l0": BestL0((), NAN, None),
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
    assert claim.figure.startswith("Fig") and claim.text and claim.rule and claim.measurement


@pytest.mark.parametrize("key", sorted(NOT_MEASURABLE))
def test_rule_is_silent_when_it_cannot_judge(key: str) -> None:
    assert CLAIMS[key].verdict(NOT_MEASURABLE[key]) is None


def test_registries_split_the_papers_claims_from_ours() -> None:
    assert not set(PAPER_CLAIMS) & set(OUR_CLAIMS)
    assert list(CLAIMS) == [*PAPER_CLAIMS, *OUR_CLAIMS]
    assert "fig10_match_vs_drop" in OUR_CLAIMS  # the paper never compares with layer drop in words
    assert all(c.key == k for k, c in CLAIMS.items())


def test_describe_formats_as_the_table_shows_them() -> None:
    assert CLAIMS["fig7_early_layers"].describe(EarlyLate(0.3, 0.4)) == (
        "folded Matching Score early 0.300 vs later 0.400 (-25%)"
    )
    assert CLAIMS["fig8_persistence"].describe(PersistenceHorizons({3: 2.0, 5: math.inf}, 8)) == (
        "agreement < 50% after L3: 2, L5: inf layers (max 8 followed)"
    )
    assert CLAIMS["fig14_best_l0"].describe(BestL0((), NAN, None)) == "no sweep on this profile"


# ------------------------------------------------------------------------------------------ builders
def _mse(method: str, mse: float, layer: int) -> ParameterMSERow:
    return ParameterMSERow(
        layer_a=layer, layer_b=layer + 1, method=method, mse=mse, mse_W_enc=mse, mse_W_dec=mse, mse_b_enc=mse,
        n_matched=4, identity_fraction=0.0, is_permutation=True,
    )  # fmt: skip


def test_parameter_mse_measurements() -> None:
    values = {"folded": (1.0, 2.0), "unfolded": (1.5, 1.5), "vanilla": (4.0, 4.0), "decoder_only": (1.0, 2.2)}
    values["encoder_only"] = (3.0, 6.0)
    rows = tuple(_mse(m, v, t) for t in range(2) for m, vs in values.items() for v in [vs[t]])
    mse = ParameterMSEResult(rows=rows)
    folded = measure_folded_mse(mse)
    assert folded.folded_best == 0.5 and folded.folded_vs_vanilla == pytest.approx(0.375)
    parts = measure_decoder_only(mse)
    assert parts.decoder_ratio == pytest.approx(1.05) and parts.encoder_ratio == pytest.approx(3.0)


def _scores(layer: int, folded: float, unfolded: float) -> MatchingScoreResult:
    def row(method: str, score: float) -> ScoreRow:
        return ScoreRow(
            method=method, matching_score=score, matching_score_sd=0.0, jaccard=score, pearson=score,
            n_pairs=4, n_unmatched=0, n_dead_a=0, n_dead_b=0, n_excluded=0,
        )  # fmt: skip

    rows = (row("folded", folded), row("unfolded", unfolded))
    return MatchingScoreResult(layer_a=layer, layer_b=layer + 1, n_tokens=10, rows=rows)


def test_matching_score_measurements() -> None:
    scores = MatchingScores(
        pairs=tuple(_scores(t, 0.1 if t < 2 else 0.5, NAN if t == 3 else 0.2) for t in range(4))
    )
    m = measure_folded_score(scores)
    assert (m.folded, m.unfolded) == (pytest.approx(0.3), pytest.approx(0.2))
    # 4 layers → 5-layer model: 10/26 of 5 is 1.9, so pairs starting at 0 and 1 are early
    assert measure_early_late(scores, 5) == EarlyLate(early=0.1, late=0.5)


def test_theta_norm_and_agreement_measurements() -> None:
    nan_q = (NAN,) * 5
    rows = tuple(
        ScaleRow(
            layer=t, theta_mean=t + 1.0, theta_quantiles=nan_q, norm_mean=2 * t + 1.0, norm_quantiles=nan_q,
            n_tokens=3,
        )
        for t in range(3)
    )  # fmt: skip
    m = measure_theta_norm(ScaleDepthResult(quantiles=(0.5,), rows=rows))
    assert m.r_theta_norm == pytest.approx(1.0) and m.r_theta_depth == pytest.approx(1.0) and m.n_layers == 3

    def bin_(p: float, n: int) -> BinRow:
        return BinRow(
            lo=0.0, hi=1.0, n_pairs=n, p_partner=p, jaccard=p, pearson=p, top_token_overlap=p,
            top_position_overlap=p,
        )  # fmt: skip

    binned = MSEBinnedAgreement(
        layer_a=4, layer_b=5, n_tokens=9, bins=(bin_(0.8, 3), bin_(0.5, 2), bin_(0.1, 4))
    )
    assert measure_agreement(binned) == AgreementByMSE(4, 5, 0.8, 0.1, 3, 4)


def test_persistence_measurement() -> None:
    def row(s: int, d: int, a: float) -> PersistenceRow:
        return PersistenceRow(
            start=s, target=s + d, distance=d, agreement=a, n_compared=1, n_lost=0,
            score_composed=a, score_direct=a, score_random=0.0,
        )  # fmt: skip

    result = PersistenceResult(rows=(row(1, 1, 1.0), row(1, 2, 0.4), row(2, 1, 1.0), row(2, 2, 0.9)))
    m = measure_persistence(result)
    assert m.horizons == {1: 2.0, 2: math.inf} and m.max_distance == 2


def _approx(layer: int, scheme: str, dl: float, ev: float, l0: float = NAN) -> ApproxRow:
    return ApproxRow(
        layer=layer, scheme=scheme, delta_loss=dl, delta_loss_se=0.0, clean_loss=3.0, explained_variance=ev,
        kl=0.0, n_tokens=1, n_loss_tokens=1, n_passthrough=0, l0_cur=l0,
    )  # fmt: skip


def test_approximation_measurements() -> None:
    rows = []
    for t, (fold_dl, drop_dl, fold_ev, unfold_ev) in enumerate(
        [(0.5, 0.4, 0.3, 0.2), (0.3, 0.4, 0.1, 0.2)], 1
    ):
        rows += [_approx(t, "match_folded", fold_dl, fold_ev), _approx(t, "drop", drop_dl, 0.9)]
        rows += [_approx(t, "match_unfolded", 1.0, unfold_ev)]
    results = {
        "web": ApproximationResult(rows=tuple(rows)),
        "code": ApproximationResult(rows=tuple(rows[:3])),
    }
    assert measure_match_vs_drop(results) == CaseCount(wins=1, total=3)
    assert measure_folded_ev(results) == CaseCount(wins=2, total=3)
    hybrid = ApproximationResult(
        rows=tuple(_approx(t, f"hybrid_q{q:g}", 0.0, ev) for t, evs in ((3, (0.5, 0.2)), (10, (0.4, 0.3)))
                   for q, ev in zip((0.0, 1.0), evs, strict=True))
    )  # fmt: skip
    gain = measure_quantile_gain(hybrid, (0.0, 1.0))
    assert (gain.q_first, gain.q_last) == (0.0, 1.0) and gain.gain == pytest.approx(0.2)
    with pytest.raises(ValueError, match="quantiles"):
        measure_quantile_gain(hybrid, (0.0, 0.5, 1.0))
    sweep = L0SweepResult(
        layer=2,
        rows=tuple(SweepRow(variant=v, row=_approx(2, "match_folded", 0.0, ev, l0)) for v, l0, ev in
                   (("a", 10.0, 0.2), ("b", 40.0, 0.5), ("c", 90.0, 0.3))),
    )  # fmt: skip
    assert measure_best_l0(sweep) == BestL0(l0s=(10.0, 40.0, 90.0), best_l0=40.0, interior=True)
    assert measure_best_l0(None).interior is None


# ------------------------------------------------------------------------------------------ files
def test_findings_round_trip_in_registry_order(tmp_path: Path) -> None:
    write_claims(tmp_path / "05_x", "05_x", [Finding(key="fig16_quantile", ours="+0.1", holds=True)])
    write_claims(tmp_path / "05_x", "05_x", [
        Finding(key="fig10_match_vs_drop", ours="1/87", holds=False),
        Finding(key="fig16_quantile", ours="+0.1", holds=True),
    ])  # fmt: skip
    write_claims(tmp_path / "01_y", "01_y", [Finding(key="fig1_theta_norm", ours="r = <0.9>", holds=None)])
    (tmp_path / "other").mkdir()
    found = read_claims(tmp_path)
    assert [f.key for f in found] == ["fig1_theta_norm", "fig16_quantile", "fig10_match_vs_drop"]
    assert found[0].section == "01_y" and found[0].holds is None
    assert (
        found[0].paper == PAPER_CLAIMS["fig1_theta_norm"].text and found[0].claim is CLAIMS["fig1_theta_norm"]
    )
    table = claims_table_html(found, link_prefix="../notebooks/")
    assert "r = &lt;0.9&gt;" in table and 'href="../notebooks/05_x.html"' in table
    assert "not measurable here" in table and "reproduced" in table
    assert table.index("r = &lt;0.9&gt;") < table.index("Beyond the paper") < table.index("1/87")
    doc = json.loads((tmp_path / "05_x" / CLAIMS_FILE).read_text())
    assert doc["section"] == "05_x" and [r["key"] for r in doc["claims"]] == [
        "fig10_match_vs_drop",
        "fig16_quantile",
    ]
    # the file's exact text: one key per line, written in the notebook's order
    assert (tmp_path / "01_y" / CLAIMS_FILE).read_text() == (
        '{\n "section": "01_y",\n "claims": [\n  {\n   "key": "fig1_theta_norm",\n   "ours": "r = <0.9>",\n'
        '   "holds": null,\n   "section": "01_y"\n  }\n ]\n}\n'
    )
    with pytest.raises(ValueError, match=r"Finding\.key"):
        Finding(key="fig99", ours="", holds=None)
    with pytest.raises(TypeError, match="findings"):
        write_claims(tmp_path / "z", "z", ["not a finding"])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError):
        read_claims(tmp_path / "missing")
