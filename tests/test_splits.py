"""Splits, merges, births and deaths from the cost structure, validated with co-activation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_sae

from saematch_core.experiments import splits
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.coactivation import coactivation_from_codes
from saematch_core.experiments.measures.links import FeatureLinks, feature_links, link_vectors, validate_links
from saematch_core.experiments.splits import SplitsConfig, SplitsResult, SplitsRow
from saematch_core.fold import rescale_features

D_IN = 32
PARAMS = ("W_enc", "W_dec", "b_enc")


def planted_structure(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """Feature vectors of A (12) and B (12): A0 splits into B0, B1; A1 and A2 (near-duplicates) merge
    into B2; A3..A10 go on one-to-one to B3..B10; A11 dies; B11 is born."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * D_IN + 1

    def rnd(n: int) -> torch.Tensor:
        return torch.randn(n, width, generator=g)

    a = rnd(12)
    a[2] = a[1] + 0.3 * rnd(1)[0]
    b = torch.empty(12, width)
    b[0] = a[0] + 0.15 * rnd(1)[0]
    b[1] = a[0] + 0.15 * rnd(1)[0]
    b[2] = 0.5 * (a[1] + a[2])
    b[3:11] = a[3:11] + 0.05 * rnd(8)
    b[11] = rnd(1)[0]
    return a, b, {"split": 0, "merge_into": 2, "merged": (1, 2), "death": 11, "birth": 11}


def test_planted_split_merge_birth_death_are_detected() -> None:
    a, b, truth = planted_structure()
    links = link_vectors(a, b, PARAMS, level=0.01, n_null=4)
    assert links.splits.nonzero().flatten().tolist() == [truth["split"]]
    assert links.merges.nonzero().flatten().tolist() == [truth["merge_into"]]
    assert links.deaths.nonzero().flatten().tolist() == [truth["death"]]
    assert links.births.nonzero().flatten().tolist() == [truth["birth"]]
    assert links.one_to_one.nonzero().flatten().tolist() == list(range(3, 11))
    assert set(map(tuple, links.links.tolist())) == {(0, 0), (0, 1), (1, 2), (2, 2)} | {
        (i, i) for i in range(3, 11)
    }
    assert bool((links.statistic < links.threshold).all())


def test_threshold_from_null_gives_few_links_between_unrelated_features() -> None:
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(200, 2 * D_IN + 1, generator=g), torch.randn(200, 2 * D_IN + 1, generator=g)
    links = link_vectors(a, b, PARAMS, level=0.01, n_null=2)
    # Each unrelated A feature links with probability about `level`.
    assert links.links.shape[0] <= 10
    assert int(links.deaths.sum()) >= 190


def test_explicit_threshold_and_link_kinds() -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 0.1, 0.0], [0.9, -0.1, 0.0], [0.0, 0.0, 1.0]])
    links = link_vectors(a, b, ("W_dec",), threshold=0.1)
    assert links.links.tolist() == [[0, 0], [0, 1]]
    assert links.link_kind() == ["split", "split"]
    assert links.deaths.tolist() == [False, True]
    assert links.births.tolist() == [False, False, True]


def test_feature_links_fold_jumprelu_saes_first() -> None:
    a = make_sae(D_IN, 40, seed=0)
    perm = torch.randperm(40)
    b = rescale_features(a.permute(perm), 0.3 + 3 * torch.rand(40))
    links = feature_links(a, b)
    assert links.one_to_one.all()
    assert torch.equal(links.links[:, 1], torch.argsort(perm))


def test_validation_sees_split_children_inside_the_parent() -> None:
    g = torch.Generator().manual_seed(0)
    n = 400
    parent = (torch.rand(n, generator=g) < 0.3).double()
    half = torch.rand(n, generator=g) < 0.5
    codes_a = torch.stack([parent, (torch.rand(n, generator=g) < 0.3).double()], 1)
    codes_b = torch.stack(
        [parent * half, parent * ~half, codes_a[:, 1], (torch.rand(n, generator=g) < 0.3).double()], 1
    )
    links = FeatureLinks(
        links=torch.tensor([[0, 0], [0, 1], [1, 2]]),
        statistic=torch.zeros(3, dtype=torch.float64),
        threshold=0.1,
        shape=(2, 4),
    )
    val = validate_links(links, coactivation_from_codes(codes_a, codes_b), seed=0)
    assert val.overlap_split == pytest.approx(1.0)
    assert val.overlap_one_to_one == pytest.approx(1.0)
    assert val.overlap_random < 0.8
    assert math.isnan(val.best_overlap_dead)  # nobody dies here
    assert val.best_overlap_born < 0.6  # B3 is unrelated to everything in A
    with pytest.raises(ValueError, match="stats"):
        validate_links(links, coactivation_from_codes(codes_a, codes_b[:, :3]))


def test_links_by_layer_counts_and_caches(tmp_path) -> None:
    a = make_sae(D_IN, 40, seed=0)
    b = rescale_features(a.permute(torch.randperm(40)), 0.5 + torch.rand(40))
    c = make_sae(D_IN, 40, seed=3)
    x = 2 * torch.randn(300, D_IN)
    inputs = Inputs(
        saes={0: a, 1: b, 2: c}, activations={0: x, 1: x, 2: x}, cache_dir=tmp_path, progress=False
    )
    res = splits.run(inputs)
    assert isinstance(res, SplitsResult)
    first, second = res.rows
    assert (first.n_one_to_one, first.n_death, first.n_birth) == (40, 0, 0)
    assert first.overlap_one_to_one == pytest.approx(1.0)
    assert first.overlap_random < first.overlap_one_to_one
    assert second.n_death >= 35
    assert len(list((tmp_path / SplitsResult.kind).glob("*.json"))) == 2
    with pytest.raises(ValueError, match=r"SplitsConfig\.level"):
        SplitsConfig(level=0.0)


def test_fractions_divide_by_the_right_width() -> None:
    nan = math.nan
    row = SplitsRow(
        layer_a=0,
        layer_b=1,
        threshold=0.5,
        n_a=12,
        n_b=24,
        n_links=12,
        n_one_to_one=8,
        n_split=1,
        n_merge=1,
        n_death=1,
        n_birth=6,
        overlap_one_to_one=nan,
        overlap_split=nan,
        overlap_merge=nan,
        overlap_random=nan,
        best_overlap_dead=nan,
        best_overlap_linked=nan,
        best_overlap_born=nan,
        n_active_a=0,
    )
    fr = SplitsResult(level=0.01, rows=(row,)).fractions()
    assert fr["one_to_one"] == (8 / 12,) and fr["birth"] == (0.25,) and fr["merge"] == (1 / 24,)


def test_links_agree_with_dense_reference() -> None:
    from saematch_core.experiments.measures.verdict import relative_cost

    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(15, 7, generator=g), torch.randn(11, 7, generator=g)
    b[:5] = a[:5] + 0.3 * torch.randn(5, 7, generator=g)
    links = link_vectors(a, b, ("W_dec",), threshold=0.3, chunk_size=4)
    ref = [
        (i, j) for i in range(15) for j in range(11) if float(relative_cost(a[i : i + 1], b[j : j + 1])) < 0.3
    ]
    assert [tuple(x) for x in links.links.tolist()] == ref
    assert len(ref) >= 5
