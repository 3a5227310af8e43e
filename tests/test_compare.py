"""compare(): verdicts, best matches both ways, families, agreement, the data check, the JSON report."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _planted_pairs import planted_pair
from conftest import make_sae

from saematch_core.compare import (
    CompareConfig,
    CompareReport,
    cached_matching,
    compare,
    load_activations,
    matcher_scores_by_layer,
    matcher_scores_summary,
    scan_pairs,
)
from saematch_core.cost import feature_vectors
from saematch_core.errors import SAEValidationError
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.links import link_vectors
from saematch_core.experiments.measures.scores import MatchingScoreResult
from saematch_core.experiments.measures.verdict import smallest_relative_costs


def test_planted_pair_is_matched_with_its_split_reported() -> None:
    p = planted_pair()
    rep = compare(p.a, p.b)
    s = rep.summary
    assert (s.n_a, s.n_b, s.n_pairs) == (48, 64, 48)
    assert torch.equal(rep.perm, p.truth) or int((rep.perm != p.truth).sum()) == 1  # the split's twin
    assert s.n_matched == 48 and s.fraction_matched == 1.0
    fam = [f for f in rep.families if f.side == "a"]
    assert len(fam) == 1 and fam[0].feature == p.split[0]
    assert sorted(fam[0].parts) == sorted(p.split[1]) and fam[0].partner in p.split[1]
    assert s.n_split_a == 1 and s.n_split_b == 0
    # the extra features of B have no partner and no confident best match
    assert all(r.matched and r.mutual for r in rep.pairs if r.a != p.split[0])
    assert [r.name for r in s.matchers] == ["saematch", "cosine", "greedy"]
    assert all(r.agreement == 1.0 for r in s.matchers)


def test_unrelated_saes_are_not_matched() -> None:
    rep = compare(make_sae(16, 64, seed=1), make_sae(16, 64, seed=2), CompareConfig(others=()))
    assert rep.summary.n_pairs == 64
    assert rep.summary.fraction_matched <= 0.1
    assert rep.summary.n_split_a <= 3


def test_scan_pairs_agrees_with_the_three_pass_reference() -> None:
    a, b = make_sae(16, 40, seed=3), make_sae(16, 57, seed=4)
    va, vb = feature_vectors(a, ("W_enc", "W_dec", "b_enc")), feature_vectors(b, ("W_enc", "W_dec", "b_enc"))
    for metric in ("mse", "cosine"):
        scan = scan_pairs(va, vb, metric=metric, threshold=0.8, chunk_size=7)
        rv, ri = smallest_relative_costs(va, vb, 2, metric)
        cv, ci = smallest_relative_costs(vb, va, 2, metric)
        assert torch.equal(scan.row_index, ri) and torch.equal(scan.col_index, ci)
        torch.testing.assert_close(scan.row_cost, rv, atol=1e-5, rtol=0)
        torch.testing.assert_close(scan.col_cost, cv, atol=1e-5, rtol=0)
        ref = link_vectors(va, vb, ("W_enc", "W_dec", "b_enc"), metric=metric, threshold=0.8)
        assert torch.equal(scan.links.links, ref.links) and scan.links.links.shape[0] > 0
        # One pass and chunks sum the same float32 products in orders that depend on the CPU's SIMD width.
        torch.testing.assert_close(scan.links.statistic, ref.statistic, rtol=1e-6, atol=1e-6)


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    p = planted_pair(f_a=20, extra=4)
    acts = torch.randn(600, 16, generator=torch.Generator().manual_seed(0)) * 2
    rep = compare(p.a, p.b, activations=(acts, acts))
    path = tmp_path / "r.json"
    rep.to_json(path)
    back = CompareReport.from_json(path)
    assert back.to_dict() == rep.to_dict()
    text = path.read_text()
    lines = text.splitlines()
    assert ' "pairs": [' in lines and sum(line.startswith('  {"a": ') for line in lines) == len(rep.pairs)
    with pytest.raises(ValueError, match="expected kind 'compare_report'"):
        bad = tmp_path / "bad.json"
        bad.write_text('{"kind": "match_result"}')
        CompareReport.from_json(bad)


def test_data_check_scores_matched_pairs_above_random() -> None:
    p = planted_pair()
    acts = torch.randn(3000, 16, generator=torch.Generator().manual_seed(1)) * 2
    rep = compare(p.a, p.b, CompareConfig(others=("cosine", "greedy", "sinkhorn")), activations=(acts, acts))
    s = rep.summary
    assert s.n_tokens == 3000
    assert s.score_matched > 0.9 > s.score_random + 0.2
    assert s.confirmed_matched > 0.9
    assert all(not math.isnan(r.p_partner) for r in rep.pairs if r.matched)
    assert [m.name for m in s.matchers] == ["saematch", "cosine", "greedy", "sinkhorn"]
    assert all(m.score > 0.9 for m in s.matchers)
    assert np.allclose(np.diag(np.array(s.agreement)), 1.0)


def test_compare_refuses_mismatched_inputs() -> None:
    with pytest.raises(SAEValidationError, match=r"expected the same d_in, got a.d_in=16 and b.d_in=8"):
        compare(make_sae(16, 8), make_sae(8, 8))
    with pytest.raises(ValueError, match=r"CompareConfig.matcher: expected one of"):
        CompareConfig(matcher="nearest")
    with pytest.raises(ValueError, match=r"CompareConfig.alpha: expected a number in \(0, 1\)"):
        CompareConfig(alpha=1.5)
    assert CompareConfig(matcher="cosine", others=("cosine", "greedy")).others == ("greedy",)


def test_load_activations_checks_the_file(tmp_path: Path) -> None:
    good = tmp_path / "x.npy"
    np.save(good, np.ones((5, 4), dtype=np.float16))
    assert load_activations(good, 4).shape == (5, 4)
    with pytest.raises(ValueError, match=r"expected shape \(n_tokens, d_in=3\), got \(5, 4\)"):
        load_activations(good, 3)
    bad = np.ones((5, 4), dtype=np.float32)
    bad[3, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="non-finite value at row 3, column 2"):
        load_activations(tmp_path / "nan.npy", 4)
    with (tmp_path / "obj.npy").open("wb") as fh:  # an object array: loading it would unpickle
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": (1,)})
        fh.write(b"not a pickle")
    with pytest.raises(ValueError, match=r"not a readable \.npy array"):
        load_activations(tmp_path / "obj.npy", 4)
    np.save(tmp_path / "int.npy", np.ones((5, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="expected a float dtype"):
        load_activations(tmp_path / "int.npy", 4)
    with pytest.raises(FileNotFoundError, match=r"--activations: .*missing\.npy not found"):
        load_activations(tmp_path / "missing.npy", 4)


def test_matcher_scores_by_layer_scores_every_matcher_per_pair() -> None:
    base = make_sae(16, 32, seed=7)
    g = torch.Generator().manual_seed(8)
    saes = {0: base}
    for layer in (1, 2):
        saes[layer] = saes[layer - 1].permute(torch.randperm(32, generator=g))
    acts = torch.randn(800, 16, generator=g) * 2
    out = matcher_scores_by_layer(Inputs(saes=saes, activations={k: acts for k in saes}, progress=False))
    assert [(r.layer_a, r.layer_b) for r in out] == [(0, 1), (1, 2)]
    for r in out:
        assert [row.method for row in r.rows] == ["saematch", "cosine", "greedy", "sinkhorn", "random"]
        for name in ("saematch", "cosine", "greedy", "sinkhorn"):
            assert r.row(name).matching_score == pytest.approx(1.0)
        assert r.row("random").matching_score < 0.9


def _with_rows(result: MatchingScoreResult, scores: dict[str, float]) -> MatchingScoreResult:
    rows = tuple(
        dataclasses.replace(r, matching_score=scores.get(r.method, r.matching_score)) for r in result.rows
    )
    return dataclasses.replace(result, rows=rows)


def test_matcher_scores_summary_ranks_matchers_and_counts_partner_reuse() -> None:
    base = make_sae(16, 32, seed=7)
    g = torch.Generator().manual_seed(8)
    # A's features 0 and 1 are one direction: greedy top-1 sends both to one B feature
    W_enc, W_dec, b_enc = base.W_enc.clone(), base.W_dec.clone(), base.b_enc.clone()
    W_enc[:, 1], W_dec[1], b_enc[1] = W_enc[:, 0], W_dec[0], b_enc[0]
    a = dataclasses.replace(base, W_enc=W_enc, W_dec=W_dec, b_enc=b_enc)
    saes = {0: a, 1: base.permute(torch.randperm(32, generator=g)), 2: base}
    acts = torch.randn(800, 16, generator=g) * 2
    inputs = Inputs(saes=saes, activations={k: acts for k in saes}, progress=False)
    results = matcher_scores_by_layer(inputs)
    # planted scores: greedy best at pair 0, a tie of saematch and cosine at pair 1
    planted = [
        _with_rows(
            results[0], {"saematch": 0.5, "cosine": 0.6, "greedy": 0.9, "sinkhorn": 0.7, "random": 0.1}
        ),
        _with_rows(
            results[1], {"saematch": 0.8, "cosine": 0.8, "greedy": 0.3, "sinkhorn": 0.4, "random": 0.2}
        ),
    ]
    s = matcher_scores_summary(inputs, planted)
    assert s.layers == (0, 1) and s.matchers == ("saematch", "cosine", "greedy", "sinkhorn")
    assert s.means == pytest.approx(
        {"saematch": 0.65, "cosine": 0.7, "greedy": 0.6, "sinkhorn": 0.55, "random": 0.15}
    )
    assert s.wins == {"saematch": 1, "cosine": 1, "greedy": 1, "sinkhorn": 0} and s.best == "cosine"
    # reference: distinct partners per matching, counted by hand
    for name in s.matchers:
        shares = []
        for la, lb in ((0, 1), (1, 2)):
            perm = cached_matching(saes[la], saes[lb], name).perm.tolist()
            kept = [j for j in perm if j >= 0]
            shares.append(len(set(kept)) / len(kept))
        assert s.partner_share[name] == pytest.approx(sum(shares) / 2)
    assert s.partner_share["saematch"] == 1.0 and s.partner_share["cosine"] == 1.0
    assert s.partner_share["greedy"] == pytest.approx((31 / 32 + 1) / 2)
    text = s.describe({"cosine": "exact cosine"})
    assert text.startswith(
        "Mean Matching Score over 2 layer pairs: exact cosine 0.700 (highest at 1 of 2 pairs;"
    )
    assert (
        "greedy 0.600 (highest at 1 of 2 pairs; 98% distinct partners)" in text
        and "random partners 0.150" in text
    )
    assert s.best_one_to_one == "cosine"
    assert s.one_to_one == {"saematch": True, "cosine": True, "greedy": False, "sinkhorn": False}
    assert text.endswith(
        "Among the one-to-one matchers, exact cosine scores highest "
        "(0.700, at least as high at 2 of 2 pairs)."
    )
    with pytest.raises(ValueError, match="results: expected the results of at least one layer pair"):
        matcher_scores_summary(inputs, [])


@pytest.mark.slow
def test_matcher_scores_on_the_smoke_profile(tmp_path: Path) -> None:
    """What the book's matcher comparison computes, on the real smoke substrate (prepare: ~1 min cold)."""
    from saematch_core.experiments.study import load_study

    study = load_study("smoke", cache_dir=tmp_path)
    out = matcher_scores_by_layer(study.inputs())
    assert [(r.layer_a, r.layer_b) for r in out] == list(study.pairs)
    for r in out:
        assert [row.method for row in r.rows] == ["saematch", "cosine", "greedy", "sinkhorn", "random"]
        for name in ("saematch", "cosine", "greedy", "sinkhorn"):
            assert r.row(name).n_pairs > 0 and 0.0 <= r.row(name).matching_score <= 1.0
    assert np.mean([r.row("saematch").matching_score - r.row("random").matching_score for r in out]) > 0
