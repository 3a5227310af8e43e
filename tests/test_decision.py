"""The calibrated verdict on every layer pair, checked on data (experiments.decision)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae
from test_verdict import D_IN, D_SAE, planted

from saematch_core.experiments import decision
from saematch_core.experiments.decision import DecisionConfig, DecisionResult
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.results import result_path


def test_decisions_by_layer_checks_coactivation_and_caches(tmp_path) -> None:
    a, b, _ = planted(noise=0.05)
    c = make_sae(D_IN, D_SAE, seed=5)
    x = 2 * torch.randn(400, D_IN)
    acts = {0: x, 1: x, 2: x}
    inputs = Inputs(saes={0: a, 1: b, 2: c}, activations=acts, cache_dir=tmp_path, progress=False)
    res = decision.run(inputs)
    assert isinstance(res, DecisionResult)
    first, second = res.rows
    assert first.fraction_matched == 1.0 and second.fraction_matched < 0.1
    # Same tokens, planted copies: confident pairs fire together, random pairs rarely do.
    assert first.score_matched == pytest.approx(1.0)
    assert first.score_matched > first.score_random
    assert first.confirmed_matched == pytest.approx(1.0)
    files = list((tmp_path / DecisionResult.kind).glob("*.json"))
    assert len(files) == 2
    again = decision.run(inputs)
    assert again.to_dict() == res.to_dict()  # nan-safe comparison
    assert result_path(DecisionResult, {"x": 1}, tmp_path).parent == files[0].parent


def test_decision_config_checks_its_fields() -> None:
    with pytest.raises(ValueError, match=r"DecisionConfig\.alpha"):
        DecisionConfig(alpha=1.5)
    with pytest.raises(ValueError, match=r"DecisionConfig\.n_null"):
        DecisionConfig(n_null=0)
