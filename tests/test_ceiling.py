"""The seed ceiling: same-layer matchings bound cross-layer ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_sae

from saematch_core.ceiling import SeedCeilingResult, seed_ceiling

D_IN, D_SAE = 16, 48


def test_a_permuted_copy_reaches_the_ceiling_and_strangers_do_not(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    acts = {t: 2 * torch.randn(500, D_IN, generator=g) for t in range(3)}
    saes = {t: make_sae(D_IN, D_SAE, seed=t) for t in range(3)}
    perm = torch.randperm(D_SAE, generator=g)
    copy = saes[1].permute(perm)  # the same dictionary in another order: a perfectly reproducible SAE
    res = seed_ceiling(saes, {1: copy}, acts, n_null=2, cache_dir=tmp_path, progress=False)
    assert res.layers() == [1] and {r.method for r in res.rows} == {"folded", "unfolded"}
    folded = next(r for r in res.rows if r.method == "folded")
    assert folded.same_layer == pytest.approx(1.0)
    # unrelated random SAEs on neighbouring layers stay far below it, near chance
    assert folded.previous < 0.9 and folded.next < 0.9 and folded.random < 0.9
    assert 0 < res.fraction_of_ceiling("folded") < 0.9
    again = SeedCeilingResult.from_dict(res.to_dict())
    assert again == res


def test_edges_of_the_depth_have_one_neighbour(tmp_path: Path) -> None:
    acts = {t: torch.randn(200, D_IN) for t in range(2)}
    saes = {t: make_sae(D_IN, D_SAE, seed=t) for t in range(2)}
    res = seed_ceiling(
        saes, {0: make_sae(D_IN, D_SAE, seed=9)}, acts, n_null=0, cache_dir=tmp_path, progress=False
    )
    row = res.rows[0]
    assert math.isnan(row.previous) and not math.isnan(row.next) and math.isnan(row.random)
