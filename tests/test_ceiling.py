"""The seed ceiling: same-layer matchings bound cross-layer ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_sae

from saematch_core.experiments import ceiling
from saematch_core.experiments.ceiling import SeedCeilingConfig, SeedCeilingResult, explained_variance
from saematch_core.experiments.inputs import Inputs

D_IN, D_SAE = 16, 48


def test_a_permuted_copy_reaches_the_ceiling_and_strangers_do_not(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    acts = {t: 2 * torch.randn(500, D_IN, generator=g) for t in range(3)}
    saes = {t: make_sae(D_IN, D_SAE, seed=t) for t in range(3)}
    perm = torch.randperm(D_SAE, generator=g)
    copy = saes[1].permute(perm)  # the same dictionary in another order: a perfectly reproducible SAE
    inputs = Inputs(
        saes=saes, activations=acts, families={"seed": {1: copy}}, cache_dir=tmp_path, progress=False
    )
    config = SeedCeilingConfig(n_null=2)
    res = ceiling.run(inputs, config)
    assert res.layers() == [1] and {r.method for r in res.rows} == {"folded", "unfolded"}
    folded = next(r for r in res.rows if r.method == "folded")
    assert folded.same_layer == pytest.approx(1.0)
    # unrelated random SAEs on neighbouring layers stay far below it, near chance
    assert folded.previous < 0.9 and folded.next < 0.9 and folded.random < 0.9
    assert 0 < res.fraction_of_ceiling("folded") < 0.9
    # the permuted copy reconstructs exactly like the original once its codes are moved back
    assert folded.ev_same_layer == pytest.approx(folded.ev_self, rel=1e-6)
    assert folded.ev_previous != pytest.approx(folded.ev_self, rel=1e-3)
    again = SeedCeilingResult.from_dict(res.to_dict())
    assert again == res
    # cached as a whole: a rerun reads it back; another seed SAE is another key
    files = list((tmp_path / "seed_ceiling").glob("*.json"))
    assert len(files) == 1
    assert ceiling.run(inputs, config) == res
    other = ceiling.run(inputs.replace(families={"seed": {1: saes[0]}}), config)
    assert other != res and len(list((tmp_path / "seed_ceiling").glob("*.json"))) == 2


def test_edges_of_the_depth_have_one_neighbour(tmp_path: Path) -> None:
    acts = {t: torch.randn(200, D_IN) for t in range(2)}
    saes = {t: make_sae(D_IN, D_SAE, seed=t) for t in range(2)}
    inputs = Inputs(
        saes=saes, activations=acts, families={"seed": {0: make_sae(D_IN, D_SAE, seed=9)}}, cache_dir=tmp_path
    )
    res = ceiling.run(inputs, SeedCeilingConfig(n_null=0))
    with pytest.raises(ValueError, match=r"SeedCeilingConfig\.family"):
        ceiling.run(inputs, SeedCeilingConfig(family="other"))
    row = res.rows[0]
    assert math.isnan(row.previous) and not math.isnan(row.next) and math.isnan(row.random)


def test_explained_variance_counts_only_kept_tokens() -> None:
    x = torch.randn(300, 4)
    keep = torch.arange(300) < 200
    bad = x.clone()
    bad[200:] += 100.0  # garbage only where tokens are dropped
    assert explained_variance(lambda h: h, x, bad, keep=keep) == pytest.approx(1.0)
    assert explained_variance(lambda h: h, x, bad) < 0
    with pytest.raises(ValueError, match="expected the same tokens"):
        explained_variance(lambda h: h, x, x[:10])
