"""θ and hidden-state norm per layer (Fig. 1)."""

from __future__ import annotations

import math

import pytest
import torch
from _planted import D_IN, D_SAE, N_TOK, acts
from conftest import make_sae

from saematch_core.experiments import scale
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.scale import ScaleConfig
from saematch_core.fold import rescale_features


def test_scale_vs_depth_matches_direct_computation() -> None:
    s0 = make_sae(D_IN, D_SAE, seed=0)
    s1 = rescale_features(make_sae(D_IN, D_SAE, seed=1), torch.full((D_SAE,), 0.25))  # θ × 4
    x0, x1 = acts(seed=0), 3 * acts(seed=1)
    keep = torch.ones(N_TOK, dtype=torch.bool)
    keep[:5] = False
    inputs = Inputs(saes={0: s0, 1: s1}, activations={0: x0, 1: x1.numpy()}, keep=keep)
    res = scale.run(inputs, ScaleConfig(chunk_size=100))
    r0, r1 = res.rows
    assert r0.theta_mean == pytest.approx(float(s0.threshold.mean()))  # type: ignore[union-attr]
    assert r1.theta_mean == pytest.approx(float(s1.threshold.mean()))  # type: ignore[union-attr]
    assert r0.norm_mean == pytest.approx(float(x0[5:].norm(dim=1).mean()), rel=1e-6)
    assert r1.n_tokens == N_TOK - 5 and r1.norm_mean > r0.norm_mean
    assert r0.theta_quantiles[2] == pytest.approx(float(s0.threshold.median()), rel=0.05)  # type: ignore[union-attr]
    # precomputed norms with a per-layer keep mask give the same statistics
    pre = scale.run(
        Inputs(saes={0: s0}),
        norms={0: x0.norm(dim=1), 1: x1.norm(dim=1).numpy()},
        layer_keep={0: keep, 1: keep},
    )
    assert pre.rows[0].norm_mean == pytest.approx(r0.norm_mean, rel=1e-6)
    assert pre.rows[1].norm_quantiles == pytest.approx(r1.norm_quantiles, rel=1e-6)
    assert math.isnan(pre.rows[1].theta_mean)
    headers, rows = res.table()
    assert headers[0] == "layer" and [r[0] for r in rows] == [0, 1] and rows[1][5] == N_TOK - 5
    relu = scale.run(Inputs(saes={0: make_sae(D_IN, D_SAE, activation="relu")}))
    assert math.isnan(relu.rows[0].theta_mean)


def test_scale_config_checks_its_quantiles() -> None:
    with pytest.raises(ValueError, match=r"ScaleConfig\.quantiles"):
        ScaleConfig(quantiles=(1.5,))
