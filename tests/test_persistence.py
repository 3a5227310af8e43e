"""Persistence: composed vs direct matchings over distance (Fig. 8)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_sae

from saematch_core.experiments import persistence
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.persistence import (
    PersistenceConfig,
    PersistenceResult,
    PersistenceRow,
    default_starts,
)
from saematch_core.fold import rescale_features
from saematch_core.sae import SAE

D_IN, D_SAE = 16, 32


def chain(n: int, noise: float) -> dict[int, SAE]:
    """Layer l+1's SAE is layer l's, reordered, rescaled per feature and perturbed by ``noise``."""
    g = torch.Generator().manual_seed(0)
    saes = {0: make_sae(D_IN, D_SAE)}
    for layer in range(1, n):
        prev = saes[layer - 1].permute(torch.randperm(D_SAE, generator=g))
        prev = rescale_features(prev, 0.5 + torch.rand(D_SAE, generator=g))
        w_enc = prev.W_enc + noise * prev.W_enc.std() * torch.randn(D_IN, D_SAE, generator=g)
        w_dec = prev.W_dec + noise * prev.W_dec.std() * torch.randn(D_SAE, D_IN, generator=g)
        saes[layer] = type(prev)(**{**prev.tensors(), "W_enc": w_enc, "W_dec": w_dec}, activation="jumprelu")
    return saes


def test_exact_chain_composes_to_the_direct_matching(tmp_path) -> None:
    saes = chain(5, noise=0.0)
    x = 2 * torch.randn(400, D_IN, generator=torch.Generator().manual_seed(1))
    acts = {layer: x for layer in saes}  # the same tokens; SAEs are reorderings, so partners co-fire
    inputs = Inputs(saes=saes, activations=acts, cache_dir=tmp_path, progress=False)
    res = persistence.run(inputs, PersistenceConfig(starts=(0, 2), max_distance=3))
    assert [(r.start, r.distance) for r in res.rows] == [(0, 1), (0, 2), (0, 3), (2, 1), (2, 2)]
    for r in res.rows:
        assert r.agreement == 1.0 and r.n_compared == D_SAE and r.n_lost == 0
        assert r.score_composed == pytest.approx(1.0) and r.score_direct == pytest.approx(1.0)
        assert r.score_random < 0.9
    assert res.curve(2) == ((1, 2), (1.0, 1.0))
    distances, curves = res.curves()
    assert distances == [1, 2, 3] and curves[0] == [1.0, 1.0, 1.0]
    assert curves[2][:2] == [1.0, 1.0] and math.isnan(curves[2][2])  # start 2 reaches two layers
    assert PersistenceResult.from_json(next((tmp_path / "persistence").glob("*.json"))) == res


def test_noisy_chain_agreement_decays_with_distance(tmp_path) -> None:
    inputs = Inputs(saes=chain(7, noise=1.0), cache_dir=tmp_path, progress=False)
    res = persistence.run(inputs, PersistenceConfig(starts=(0,), max_distance=6))
    dist, agree = res.curve(0)
    assert dist == (1, 2, 3, 4, 5, 6)
    assert agree[0] == 1.0  # one step: composed is direct
    assert agree[-1] < agree[1] <= 1.0
    assert all(math.isnan(r.score_composed) for r in res.rows)  # no activations given


def test_default_starts_and_errors() -> None:
    assert default_starts(range(30)) == (10, 15, 22)
    assert default_starts([3, 4]) == (3,)
    with pytest.raises(ValueError, match="starts"):
        persistence.run(Inputs(saes=chain(2, 0.0), progress=False), PersistenceConfig(starts=(5,)))
    with pytest.raises(ValueError, match="max_distance"):
        PersistenceConfig(max_distance=0)


def test_curves_pad_short_starts_with_nan() -> None:
    def row(s: int, d: int, a: float) -> PersistenceRow:
        return PersistenceRow(
            start=s, target=s + d, distance=d, agreement=a, n_compared=1, n_lost=0,
            score_composed=a, score_direct=a, score_random=0.0,
        )  # fmt: skip

    result = PersistenceResult(rows=(row(1, 1, 1.0), row(1, 2, 0.5), row(2, 1, 1.0)))
    distances, curves = result.curves()
    assert distances == [1, 2] and curves[1] == [1.0, 0.5]
    assert curves[2][0] == 1.0 and math.isnan(curves[2][1])
