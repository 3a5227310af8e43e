"""Agreement on data by per-pair matching MSE (Figs. 5/6)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from _planted import D_IN, D_SAE, acts
from conftest import make_sae

from saematch_core.experiments import agreement
from saematch_core.experiments.agreement import AgreementConfig, PairRecord
from saematch_core.experiments.inputs import Inputs
from saematch_core.match import MatchConfig


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
    inputs = Inputs(
        saes={0: a, 1: b}, activations={0: x, 1: x}, token_ids=ids, pairs=[(0, 1)], cache_dir=tmp_path
    )
    res = agreement.run(inputs, AgreementConfig(match=MatchConfig(solver="identity"), n_bins=4, top_k=10))
    included = [p for p in res.pairs if p.included]
    assert len(res.pairs) == D_SAE
    assert sum(r.n_pairs for r in res.bins) == len(included)
    assert [r.lo for r in res.bins] == sorted(r.lo for r in res.bins)
    assert res.bins[0].p_partner > res.bins[-1].p_partner
    assert res.bins[0].pearson > res.bins[-1].pearson
    # random partners: the chance level, below the best-matched bin
    assert 0 <= res.p_random < res.bins[0].p_partner
    assert all(0 <= p.top_token_overlap <= 1 for p in included)

    groups = agreement.agreement_groups(res.pairs)
    assert sum(len(v) for v in groups.values()) == D_SAE
    picked = agreement.pick_by_mse(res.pairs)
    assert picked["low"].mse <= picked["median"].mse <= picked["high"].mse
    with pytest.raises(ValueError, match="exactly one layer pair"):
        agreement.run(inputs.replace(pairs=None))


def _pair(i: int, mse: float, p: float, included: bool = True) -> PairRecord:
    return PairRecord(
        feature=i, partner=i, mse=mse, p_partner=p, jaccard=p, pearson=p, top_token_overlap=p,
        top_position_overlap=p, included=included,
    )  # fmt: skip


def test_agreement_groups_and_pick_by_mse() -> None:
    pairs = [_pair(0, 0.1, 0.9), _pair(1, 0.2, 0.3), _pair(2, 5.0, 0.01), _pair(3, 1.0, math.nan, False)]
    groups = agreement.agreement_groups(pairs, cuts=(0.1, 0.5))
    assert [len(v) for v in groups.values()] == [1, 1, 1, 1]
    values = list(groups.values())
    assert values[0].tolist() == [0.1] and values[3].tolist() == [1.0]
    picked = agreement.pick_by_mse(pairs)
    assert (picked["low"].feature, picked["median"].feature, picked["high"].feature) == (0, 1, 2)
    assert agreement.pick_by_mse([_pair(0, 1.0, 0.5, False)]) == {}
