"""Co-activation of two SAEs' features (pairs of matchings and every pair) and the Matching Score."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _planted import D_IN, D_SAE, N_TOK, acts, planted
from conftest import make_sae

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.coactivation import (
    coactivation,
    coactivation_from_codes,
    pair_metrics,
    random_partners,
)
from saematch_core.experiments.measures.scores import matching_scores
from saematch_core.fold import fold


def test_matching_score_of_sae_with_itself_is_one(tmp_path) -> None:
    sae = make_sae(D_IN, D_SAE)
    x = acts()
    inputs = Inputs(saes={0: sae, 1: sae}, activations={0: x, 1: x}, cache_dir=tmp_path)
    res = matching_scores(inputs, (0, 1), {"identity": torch.arange(D_SAE)}, n_null=3)
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
    inputs = Inputs(saes={0: sae, 1: sae}, activations={0: x, 1: x}, cache_dir=tmp_path)
    res = matching_scores(inputs, (0, 1), {"id": torch.arange(D_SAE)}, n_null=0)
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
    with pytest.raises(ValueError, match="top_k"):
        coactivation(sae, sae, acts(), acts(), all_pairs=True, top_k=3)
    with pytest.raises(ValueError, match="all_pairs"):
        coactivation(sae, sae, acts(), acts(), {"x": torch.arange(D_SAE)}).overlap()


def test_sparse_pair_sums_agree_with_dense_reference() -> None:
    from saematch_core.experiments.measures.coactivation import (
        _add_pair_sums,
        _add_pair_sums_dense,
        _zero_sums,
    )

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


def test_every_pair_agrees_with_the_pairs_of_a_matching() -> None:
    """The two accumulation strategies of the one co-activation give the same statistics."""
    a, b = make_sae(D_IN, D_SAE, seed=1), make_sae(D_IN, 40, seed=2)
    xa, xb = acts(seed=1), acts(seed=2)
    perm = random_partners(D_SAE, 40, torch.Generator().manual_seed(0))
    keep = torch.rand(N_TOK, generator=torch.Generator().manual_seed(5)) > 0.2
    pairs = coactivation(a, b, xa, xb, {"p": perm}, keep=keep, chunk_size=97)
    full = coactivation(a, b, xa, xb, {"p": perm}, all_pairs=True, keep=keep, chunk_size=97)
    assert full.n_tokens == pairs.n_tokens and full.shape == (D_SAE, 40)
    for name in ("count_a", "count_b", "sum_a", "sq_a", "sum_b", "sq_b"):
        torch.testing.assert_close(getattr(full, name), getattr(pairs, name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full.both["p"], pairs.both["p"], rtol=0, atol=0)
    torch.testing.assert_close(full.prod["p"], pairs.prod["p"], rtol=1e-5, atol=1e-5)
    m_pairs, m_full = pair_metrics(pairs, "p"), pair_metrics(full, "p")
    torch.testing.assert_close(m_full["p_partner"], m_pairs["p_partner"], equal_nan=True)
    rows = torch.arange(D_SAE)[perm >= 0]
    torch.testing.assert_close(full.p_partner()[rows, perm[rows]], m_pairs["p_partner"][rows], equal_nan=True)
    codes = coactivation_from_codes(a.encode(xa[keep]), b.encode(xb[keep]))
    torch.testing.assert_close(codes.all_both, full.all_both)
