"""Non-circular evidence for H2: θ vs measured activation scale, folded vs unfolded head-to-head."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_sae

from saematch_core.experiments import circularity, theta_scale
from saematch_core.experiments.circularity import DisagreementResult
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scales import activation_scale
from saematch_core.experiments.theta_scale import ThetaScaleResult, theta_scale_row
from saematch_core.fold import rescale_features
from saematch_core.sae import SAE

D_IN, D_SAE = 8, 64


def test_theta_scale_row_on_planted_relations() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.exp(torch.randn(200, generator=g)).double()
    tracking = theta_scale_row(3, theta, 2.0 * theta * torch.exp(0.05 * torch.randn(200, generator=g)))
    assert tracking.layer == 3 and tracking.n_alive == 200
    assert tracking.spearman > 0.95 and tracking.spearman_p < 1e-10
    assert tracking.log_slope == pytest.approx(1.0, abs=0.05)
    assert tracking.ratio_median == pytest.approx(2.0, rel=0.05)
    unrelated = theta_scale_row(3, theta, torch.exp(torch.randn(200, generator=g)).double())
    assert abs(unrelated.spearman) < 0.2
    dead = torch.full((200,), math.nan, dtype=torch.float64)
    assert theta_scale_row(3, theta, dead).n_alive == 0


def test_theta_vs_scale_active_codes_exceed_threshold(tmp_path) -> None:
    sae = make_sae(D_IN, D_SAE)
    x = 2 * torch.randn(500, D_IN)
    inputs = Inputs(
        saes={0: sae, 1: make_sae(D_IN, D_SAE, activation="relu")},
        activations={0: x, 1: x},
        cache_dir=tmp_path,
    )
    res = theta_scale.run(inputs)
    assert isinstance(res, ThetaScaleResult)
    assert [r.layer for r in res.rows] == [0]  # only JumpReLU layers have θ
    row = res.rows[0]
    assert row.ratio_q05 >= 1.0  # an active JumpReLU code is above its threshold
    assert sae.threshold is not None
    scale = activation_scale(sae, x)
    ok = ~torch.isnan(scale)
    assert row.scale_mean == pytest.approx(float(scale[ok].mean()))


def noisy_spread_copy(sae: SAE, seed: int = 1) -> tuple[SAE, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sae.d_sae, generator=g)
    p = sae.permute(perm)
    p = replace(
        p,
        W_enc=p.W_enc * (1 + 0.5 * torch.randn(p.W_enc.shape, generator=g)),
        W_dec=p.W_dec * (1 + 0.5 * torch.randn(p.W_dec.shape, generator=g)),
    )
    return rescale_features(p, torch.exp(2.0 * torch.randn(sae.d_sae, generator=g))), torch.argsort(perm)


def test_disagreements_favour_the_planted_partner(tmp_path) -> None:
    a = make_sae(D_IN, D_SAE)
    b, truth = noisy_spread_copy(a)
    x = 2 * torch.randn(500, D_IN)
    inputs = Inputs(saes={0: a, 1: b}, activations={0: x, 1: x}, cache_dir=tmp_path, progress=False)
    res = circularity.run(inputs)
    assert isinstance(res, DisagreementResult)
    row = res.rows[0]
    assert row.n_disagree > 10
    assert row.n_compared <= row.n_disagree
    assert row.folded_wins > row.unfolded_wins
    assert row.folded_wins + row.unfolded_wins + row.ties == row.n_compared
    assert row.sign_test_p < 0.05
    assert row.mean_p_folded > row.mean_p_unfolded
    assert len(row.examples) == 3
    ex = row.examples[0]
    assert ex.partner_folded != ex.partner_unfolded
    assert ex.partner_folded == int(truth[ex.feature])
    again = circularity.run(inputs)
    assert again.to_dict() == res.to_dict()


def test_identical_matchings_have_nothing_to_compare(tmp_path) -> None:
    a = make_sae(D_IN, D_SAE)
    x = 2 * torch.randn(100, D_IN)
    inputs = Inputs(saes={0: a, 1: a}, activations={0: x, 1: x}, cache_dir=tmp_path, progress=False)
    row = circularity.run(inputs).rows[0]
    assert (row.n_disagree, row.n_compared) == (0, 0)
    assert math.isnan(row.sign_test_p)
