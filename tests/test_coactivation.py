"""Evaluation of matchings: parameter MSE, Matching Score, contexts, MSE-binned agreement."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_sae

from saematch_core.evaluate import (
    MatchingScoreResult,
    ParameterMSEResult,
    coactivation,
    matching_scores,
    matching_scores_by_layer,
    mse_binned_agreement,
    pair_metrics,
    parameter_mse,
    random_partners,
    scale_vs_depth,
)
from saematch_core.fold import fold, rescale_features
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

D_IN, D_SAE, N_TOK = 16, 48, 600


def acts(n: int = N_TOK, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, D_IN, generator=g)


def planted(seed: int = 0) -> tuple[SAE, SAE, torch.Tensor]:
    """SAE B is SAE A reordered by ``perm`` with every feature rescaled: folded weights agree exactly
    at the planted partner, unfolded ones do not."""
    a = make_sae(D_IN, D_SAE, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    perm = torch.randperm(D_SAE, generator=g)
    b = rescale_features(a.permute(perm), 0.2 + 5 * torch.rand(D_SAE, generator=g))
    return a, b, torch.argsort(perm)  # feature i of A is feature argsort(perm)[i] of B


def test_matching_score_of_sae_with_itself_is_one(tmp_path) -> None:
    sae = make_sae(D_IN, D_SAE)
    x = acts()
    res = matching_scores(sae, sae, x, x, {"identity": torch.arange(D_SAE)}, n_null=3, cache_dir=tmp_path)
    row = res.row("identity")
    assert row.matching_score == pytest.approx(1.0)
    assert row.jaccard == pytest.approx(1.0)
    assert row.pearson == pytest.approx(1.0)
    assert row.n_pairs + row.n_excluded == D_SAE
    null = res.row("random")
    assert null.matching_score < 0.8 and null.matching_score_sd > 0


def test_dead_features_are_excluded_and_counted(tmp_path) -> None:
    sae = make_sae(D_IN, D_SAE)
    dead = torch.tensor([3, 7, 11])
    b_enc = sae.b_enc.clone()
    b_enc[dead] = -1e6  # never above threshold
    sae = replace(sae, b_enc=b_enc)
    x = acts()
    stats = coactivation(sae, sae, x, x, {"id": torch.arange(D_SAE)})
    assert set(stats.dead_a.nonzero().flatten().tolist()) >= set(dead.tolist())
    met = pair_metrics(stats, "id")
    assert not met["included"][dead].any()
    assert torch.isnan(met["p_partner"][dead]).all()
    res = matching_scores(sae, sae, x, x, {"id": torch.arange(D_SAE)}, n_null=0, cache_dir=tmp_path)
    row = res.row("id")
    n_dead = int(stats.dead_a.sum())
    assert row.n_dead_a == row.n_dead_b == n_dead >= 3
    assert row.n_pairs == D_SAE - n_dead and row.n_excluded == n_dead
    assert row.matching_score == pytest.approx(1.0)  # the dead pairs did not drag it to 0
    # a partner that is dead also excludes the pair, though the A feature is alive
    perm = torch.arange(D_SAE)
    alive = int((~stats.dead_a).nonzero()[0])
    perm[alive], perm[3] = 3, alive
    met2 = pair_metrics(coactivation(sae, sae, x, x, {"p": perm}), "p")
    assert not bool(met2["included"][alive])


def test_pair_metrics_agree_with_dense_reference() -> None:
    a, b = make_sae(D_IN, D_SAE, seed=1), make_sae(D_IN, 40, seed=2)
    xa, xb = acts(seed=1), acts(seed=2)
    perm = random_partners(D_SAE, 40, torch.Generator().manual_seed(0))
    keep = torch.rand(N_TOK, generator=torch.Generator().manual_seed(5)) > 0.2
    stats = coactivation(a, b, xa, xb, {"p": perm}, keep=keep, chunk_size=97, top_k=5)
    met = pair_metrics(stats, "p")
    fa, fb = a.encode(xa[keep]).double(), b.encode(xb[keep]).double()
    assert stats.n_tokens == int(keep.sum())
    for i in range(D_SAE):
        j = int(perm[i])
        u, v = fa[:, i], (fb[:, j] if j >= 0 else None)
        if v is None or not (u > 0).any() or not (v > 0).any():
            assert not bool(met["included"][i])
            continue
        both = ((u > 0) & (v > 0)).sum()
        assert float(met["p_partner"][i]) == pytest.approx(float(both / (u > 0).sum()))
        assert float(met["jaccard"][i]) == pytest.approx(float(both / ((u > 0) | (v > 0)).sum()))
        assert float(met["pearson"][i]) == pytest.approx(
            float(np.corrcoef(u.numpy(), v.numpy())[0, 1]), abs=1e-9
        )
        rows = keep.nonzero().flatten()
        top_u = set(rows[torch.topk(u, 5).indices[torch.topk(u, 5).values > 0]].tolist())
        top_v = set(rows[torch.topk(v, 5).indices[torch.topk(v, 5).values > 0]].tolist())
        assert float(met["top_position_overlap"][i]) == pytest.approx(len(top_u & top_v) / 5)


def test_random_partners_is_one_to_one_for_any_widths() -> None:
    g = torch.Generator().manual_seed(0)
    for fa, fb in ((10, 10), (6, 10), (10, 6)):
        p = random_partners(fa, fb, g)
        used = p[p >= 0]
        assert p.shape == (fa,) and used.unique().numel() == used.numel() == min(fa, fb)


def test_parameter_mse_planted_permutation(tmp_path) -> None:
    a, b, _ = planted()
    res = parameter_mse({4: a, 5: b}, cache_dir=tmp_path, progress=False)
    rows = {r.method: r for r in res.rows}
    assert {r.layer_a for r in res.rows} == {4} and {r.layer_b for r in res.rows} == {5}
    assert rows["folded"].mse == pytest.approx(0.0, abs=1e-10)
    assert rows["decoder_only"].mse == pytest.approx(0.0, abs=1e-10)
    assert rows["vanilla"].mse > 0.1 and rows["vanilla"].identity_fraction == 1.0
    # folded all-parameter matching minimises exactly the evaluated MSE: no method can beat it
    assert all(r.mse >= rows["folded"].mse - 1e-12 for r in res.rows)
    assert rows["folded"].mse_W_enc == pytest.approx(0.0, abs=1e-10)
    assert rows["greedy_cosine"].n_matched == D_SAE
    assert res.series("folded") == (rows["folded"].mse,)
    # cached: the second call reads the file
    again = parameter_mse({4: a, 5: b}, cache_dir=tmp_path, progress=False)
    assert again == res
    assert ParameterMSEResult.from_dict(res.to_dict()) == res


def test_planted_matching_scores_folded_one_vanilla_lower(tmp_path) -> None:
    a, b, truth = planted()
    x = acts()
    methods = {"folded": MatchConfig(), "vanilla": MatchConfig(solver="identity"), "truth": truth}
    res = matching_scores(a, b, x, x, methods, layers=(4, 5), n_null=2, cache_dir=tmp_path)
    assert res.row("folded").matching_score == pytest.approx(1.0)
    assert res.row("truth").matching_score == pytest.approx(1.0)
    assert res.row("vanilla").matching_score < 0.8
    assert (res.layer_a, res.layer_b) == (4, 5)
    cached = MatchingScoreResult.from_json(next((tmp_path / "matching_score").glob("*.json")))
    assert cached == res
    by_layer = matching_scores_by_layer(
        {4: a, 5: b, 6: a},
        {4: x, 5: x, 6: x},
        {"folded": MatchConfig()},
        n_null=0,
        cache_dir=tmp_path,
        progress=False,
    )
    assert [(r.layer_a, r.layer_b) for r in by_layer] == [(4, 5), (5, 6)]
    assert all(r.row("folded").matching_score == pytest.approx(1.0) for r in by_layer)


def test_scale_vs_depth_matches_direct_computation() -> None:
    s0 = make_sae(D_IN, D_SAE, seed=0)
    s1 = rescale_features(make_sae(D_IN, D_SAE, seed=1), torch.full((D_SAE,), 0.25))  # θ × 4
    x0, x1 = acts(seed=0), 3 * acts(seed=1)
    keep = torch.ones(N_TOK, dtype=torch.bool)
    keep[:5] = False
    res = scale_vs_depth({0: s0, 1: s1}, {0: x0, 1: x1.numpy()}, keep=keep, chunk_size=100)
    r0, r1 = res.rows
    assert r0.theta_mean == pytest.approx(float(s0.threshold.mean()))  # type: ignore[union-attr]
    assert r1.theta_mean == pytest.approx(float(s1.threshold.mean()))  # type: ignore[union-attr]
    assert r0.norm_mean == pytest.approx(float(x0[5:].norm(dim=1).mean()), rel=1e-6)
    assert r1.n_tokens == N_TOK - 5 and r1.norm_mean > r0.norm_mean
    assert r0.theta_quantiles[2] == pytest.approx(float(s0.threshold.median()), rel=0.05)  # type: ignore[union-attr]
    # precomputed norms with a per-layer keep mask give the same statistics
    pre = scale_vs_depth(
        {0: s0}, norms={0: x0.norm(dim=1), 1: x1.norm(dim=1).numpy()}, keep={0: keep, 1: keep}
    )
    assert pre.rows[0].norm_mean == pytest.approx(r0.norm_mean, rel=1e-6)
    assert pre.rows[1].norm_quantiles == pytest.approx(r1.norm_quantiles, rel=1e-6)
    assert math.isnan(pre.rows[1].theta_mean)
    relu = scale_vs_depth({0: make_sae(D_IN, D_SAE, activation="relu")})
    assert math.isnan(relu.rows[0].theta_mean)


def test_mse_binned_agreement_bins_all_included_pairs(tmp_path) -> None:
    a = make_sae(D_IN, D_SAE, seed=0)
    g = torch.Generator().manual_seed(9)
    # B: a copy whose features are perturbed more and more: agreement should fall as MSE grows
    noise = torch.linspace(0, 2, D_SAE)[:, None]
    b = replace(
        a,
        W_enc=a.W_enc + (noise * torch.randn(D_SAE, D_IN, generator=g)).T / D_IN**0.5,
        W_dec=a.W_dec + noise * torch.randn(D_SAE, D_IN, generator=g),
    )
    x = acts(n=2000)
    ids = torch.randint(0, 50, (2000,), generator=g)
    res = mse_binned_agreement(
        a, b, x, x, MatchConfig(solver="identity"), token_ids=ids, n_bins=4, top_k=10, cache_dir=tmp_path
    )
    included = [p for p in res.pairs if p.included]
    assert len(res.pairs) == D_SAE
    assert sum(r.n_pairs for r in res.bins) == len(included)
    assert [r.lo for r in res.bins] == sorted(r.lo for r in res.bins)
    assert res.bins[0].p_partner > res.bins[-1].p_partner
    assert res.bins[0].pearson > res.bins[-1].pearson
    assert all(0 <= p.top_token_overlap <= 1 for p in included)


def test_folded_and_unfolded_codes_give_the_same_coactivation() -> None:
    a, b, truth = planted()
    x = acts()
    s1 = pair_metrics(coactivation(a, b, x, x, {"t": truth}), "t")
    s2 = pair_metrics(coactivation(fold(a), fold(b), x, x, {"t": truth}), "t")
    for k in ("p_partner", "jaccard", "pearson"):
        torch.testing.assert_close(s1[k], s2[k], equal_nan=True)


def test_input_errors_name_the_parameter() -> None:
    sae = make_sae(D_IN, D_SAE)
    with pytest.raises(ValueError, match="acts_b"):
        coactivation(sae, sae, acts(), acts(n=10), {})
    with pytest.raises(ValueError, match="perms"):
        coactivation(sae, sae, acts(), acts(), {"x": torch.arange(3)})
    with pytest.raises(ValueError, match="keep"):
        coactivation(sae, sae, acts(), acts(), {}, keep=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="quantiles"):
        scale_vs_depth({0: sae}, quantiles=(1.5,))


def test_sparse_pair_sums_agree_with_dense_reference() -> None:
    from saematch_core.evaluate import _add_pair_sums, _add_pair_sums_dense, _zero_sums

    g = torch.Generator().manual_seed(3)
    n, fa, fb = 300, 40, 33
    # Sparse codes with a few negative entries (allowed by the sums), dead columns and -1 partners.
    ca = torch.randn(n, fa, generator=g) * (torch.rand(n, fa, generator=g) < 0.1)
    cb = torch.randn(n, fb, generator=g).abs() * (torch.rand(n, fb, generator=g) < 0.1)
    ca[:, 5] = 0.0
    perms = {"p": random_partners(fa, fb, g), "q": torch.randint(-1, fb, (fa,), generator=g)}
    safe = {k: p.clamp(min=0) for k, p in perms.items()}
    has = {k: p >= 0 for k, p in perms.items()}
    fast, ref = _zero_sums(fa, fb, perms), _zero_sums(fa, fb, perms)
    for rows in (slice(0, 128), slice(128, 300)):
        _add_pair_sums(fast, ca[rows], cb[rows], safe, has)
        _add_pair_sums_dense(ref, ca[rows], cb[rows], safe, has)
    for name in ("count_a", "count_b", "sum_a", "sq_a", "sum_b", "sq_b"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    for k in perms:
        torch.testing.assert_close(fast.both[k], ref.both[k], rtol=0, atol=0)
        torch.testing.assert_close(fast.prod[k], ref.prod[k], rtol=1e-12, atol=1e-12)
    assert float(ref.both["p"].sum()) > 0 and float(ref.count_a[5]) == 0
