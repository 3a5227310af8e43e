"""Data-based matching by activation correlation: statistics, exact LAP, recovery by data-free matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_sae

from saematch_core.experiments import databased
from saematch_core.experiments.databased import (
    DataBasedConfig,
    DataBasedResult,
    databased_match,
    recovered_fraction,
)
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.coactivation import (
    coactivation,
    coactivation_from_codes,
    pair_metrics,
)
from saematch_core.fold import rescale_features
from saematch_core.match import MatchConfig

D_IN, D_SAE = 16, 48


def sparse_codes(n: int, f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, f, generator=g) < 0.2
    return on * (0.5 + torch.rand(n, f, generator=g))


def test_statistics_agree_with_per_pair_reference() -> None:
    ca, cb = sparse_codes(60, 5, seed=1), sparse_codes(60, 4, seed=2)
    ca[:, 4] = 0  # a dead feature
    stats = coactivation_from_codes(ca, cb, chunk_size=7)
    a, b = ca.double().numpy(), cb.double().numpy()
    for i in range(5):
        for j in range(4):
            sa, sb = set(np.flatnonzero(a[:, i] > 0)), set(np.flatnonzero(b[:, j] > 0))
            if sa:
                assert stats.p_partner()[i, j] == pytest.approx(len(sa & sb) / len(sa))
                assert stats.overlap()[i, j] == pytest.approx(len(sa & sb) / min(len(sa), len(sb)))
                # float32 products: correlations agree to ~1e-6 absolute.
                assert stats.pearson()[i, j] == pytest.approx(np.corrcoef(a[:, i], b[:, j])[0, 1], abs=1e-5)
                assert stats.jaccard()[i, j] == pytest.approx(len(sa & sb) / len(sa | sb))
            else:
                assert math.isnan(stats.pearson()[i, j]) and math.isnan(stats.p_partner()[i, j])
    assert stats.dead_a.tolist() == [False] * 4 + [True]


def test_every_pair_statistics_agree_with_pair_metrics() -> None:
    a, b = make_sae(D_IN, D_SAE, seed=0), make_sae(D_IN, D_SAE, seed=1)
    x, y = 2 * torch.randn(300, D_IN), 2 * torch.randn(300, D_IN)
    perm = torch.randperm(D_SAE)
    keep = torch.rand(300) > 0.2
    stats = coactivation(a, b, x, y, all_pairs=True, keep=keep, chunk_size=64)
    ref = pair_metrics(coactivation(a, b, x, y, {"p": perm}, keep=keep), "p")
    rows = torch.arange(D_SAE)
    for name in ("p_partner", "jaccard", "pearson"):
        got = stats.measure(name)[rows, perm]
        ok = ref["included"] & ~torch.isnan(ref[name])
        assert torch.allclose(got[ok], ref[name][ok], atol=1e-5)


def test_planted_coactivation_is_recovered_exactly() -> None:
    ca = sparse_codes(400, 30, seed=3)
    perm = torch.randperm(30)
    cb = ca[:, perm] * 3.0
    cb += (torch.rand_like(cb) < 0.02) * torch.rand_like(cb)  # a little unrelated firing
    truth = torch.argsort(perm)  # feature i of A is feature truth[i] of B
    for measure in ("pearson", "jaccard"):
        got = databased_match(coactivation_from_codes(ca, cb), measure)  # type: ignore[arg-type]
        assert torch.equal(got, truth)
        assert recovered_fraction(got, truth) == 1.0


def test_dead_features_get_no_partner() -> None:
    ca, cb = sparse_codes(100, 6, seed=4), sparse_codes(100, 6, seed=5)
    ca[:, 2] = 0
    cb[:, 0] = 0
    got = databased_match(coactivation_from_codes(ca, cb))
    assert got[2] == -1
    assert 0 not in got.tolist()
    assert recovered_fraction(torch.tensor([1, 1]), torch.tensor([-1, -1])) != recovered_fraction(
        torch.tensor([1, 1]), torch.tensor([-1, -1])
    )  # nan when the reference has no pairs


def test_recovered_fraction_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="perm, reference"):
        recovered_fraction(torch.tensor([0, 1]), torch.tensor([0]))


def test_databased_by_layer_on_planted_pair(tmp_path) -> None:
    a = make_sae(D_IN, D_SAE, seed=0)
    g = torch.Generator().manual_seed(9)
    perm = torch.randperm(D_SAE, generator=g)
    b = rescale_features(a.permute(perm), 0.3 + 3 * torch.rand(D_SAE, generator=g))
    x = 2 * torch.randn(500, D_IN)
    methods = {"folded": MatchConfig(), "vanilla": MatchConfig(solver="identity")}
    inputs = Inputs(saes={0: a, 1: b}, activations={0: x, 1: x}, cache_dir=tmp_path, progress=False)
    res = databased.run(inputs, DataBasedConfig(methods=methods))
    assert isinstance(res, DataBasedResult)
    by = {r.method: r for r in res.rows}
    assert by["databased"].recovered == 1.0
    assert by["folded"].recovered == pytest.approx(1.0)
    assert by["databased"].matching_score == pytest.approx(1.0)
    assert by["random"].recovered < 0.2
    assert by["vanilla"].recovered < 0.2
    assert res.series("folded") == (by["folded"].recovered,)
    assert len(list((tmp_path / DataBasedResult.kind).glob("*.json"))) == 1


def test_measure_name_is_checked() -> None:
    stats = coactivation_from_codes(sparse_codes(10, 3), sparse_codes(10, 3, seed=1))
    with pytest.raises(ValueError, match="measure"):
        databased_match(stats, "spearman")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"DataBasedConfig\.measure"):
        DataBasedConfig(measure="spearman")  # type: ignore[arg-type]
