"""Composition of matchings: compose, invert, chains, paths and agreement."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_sae

from saematch_core.compose import agreement, compose, compose_chain, identity, invert, path
from saematch_core.fold import rescale_features
from saematch_core.match import match


def _randperm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [0, 1, 7, 50])
def test_compose_with_inverse_is_identity(n) -> None:
    p = _randperm(n, n)
    assert torch.equal(compose(p, invert(p)), identity(n))
    assert torch.equal(compose(invert(p), p), identity(n))
    assert torch.equal(invert(invert(p)), p)


def test_compose_is_function_composition() -> None:
    p_ab, p_bc = _randperm(9, 1), _randperm(9, 2)
    p_ac = compose(p_ab, p_bc)
    assert p_ac.tolist() == [int(p_bc[int(p_ab[i])]) for i in range(9)]
    p_cd = _randperm(9, 3)
    assert torch.equal(compose(compose(p_ab, p_bc), p_cd), compose(p_ab, compose(p_bc, p_cd)))
    assert torch.equal(compose(identity(9), p_ab), p_ab) and torch.equal(compose(p_ab, identity(9)), p_ab)


def test_compose_propagates_unmatched_and_handles_widths() -> None:
    p_ab = torch.tensor([2, -1, 0, 1])  # 4 features of A -> 3 of B
    p_bc = torch.tensor([4, -1, 1])  # 3 of B -> 5 of C
    assert compose(p_ab, p_bc).tolist() == [1, -1, 4, -1]
    # Greedy many-to-one maps compose too.
    assert compose(torch.tensor([0, 0, 1]), torch.tensor([1, 1])).tolist() == [1, 1, 1]


def test_invert_rectangular_and_partial() -> None:
    p = torch.tensor([3, -1, 0])
    q = invert(p, size=5)
    assert q.tolist() == [2, -1, -1, 0, -1]
    assert compose(p, q).tolist() == [0, -1, 2]


def test_bad_inputs() -> None:
    with pytest.raises(
        ValueError, match=r"p: expected a one-to-one matching, but feature 1 is the partner of"
    ):
        invert(torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"p_ab: expected entries < 2 .*got 2 \(first at feature 1\)"):
        compose(torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="p_bc: expected entries >= -1, got -2"):
        compose(torch.tensor([0]), torch.tensor([-2]))
    with pytest.raises(TypeError, match=r"p_ab: expected an integer tensor, got dtype torch\.float32"):
        compose(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"p: expected a 1-D tensor \(F,\), got shape \(2, 2\)"):
        invert(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"p: expected entries < 2"):
        invert(torch.tensor([0, 3]), size=2)
    with pytest.raises(ValueError, match="n: expected an int >= 0, got -1"):
        identity(-1)
    with pytest.raises(ValueError, match=r"p_composed, p_direct: expected the same shape"):
        agreement(torch.tensor([0, 1]), torch.tensor([0]))


def test_path_follows_chain() -> None:
    perms = [_randperm(6, s) for s in range(4)]
    full = path(perms, 0, 2).forward()
    assert len(full) == 5 and full[0] == 2
    for layer in range(1, 5):
        assert full[layer] == int(compose_chain(perms, 0, layer)[2])
    # Starting midway gives the tail of the same path, and the head by inverting the matchings.
    midway = path(perms, 2, full[2])
    assert midway.forward() == full[2:] and list(midway.features) == full
    assert path(perms, 4, 3).forward() == [3]


def test_path_stops_at_unmatched() -> None:
    perms = [torch.tensor([1, 0]), torch.tensor([-1, 0]), torch.tensor([1, 0])]
    assert path(perms, 0, 0).features == (0, 1, 0, 1)
    assert path(perms, 0, 1).features == (1, 0, -1, -1)


def test_path_bad_inputs() -> None:
    perms = [torch.tensor([1, 0]), torch.tensor([0, 1, 2])]
    with pytest.raises(ValueError, match=r"start_layer: expected one of \[0, 1, 2\], got 3"):
        path(perms, 3, 0)
    with pytest.raises(ValueError, match=r"feature: expected an int in \[0, 2\) at layer 0, got 5"):
        path(perms, 0, 5)
    with pytest.raises(ValueError, match=r"perms\[0\]: expected entries < 1"):
        path([torch.tensor([1, 0]), torch.tensor([0])], 0, 0)


def test_compose_chain() -> None:
    perms = [_randperm(5, s) for s in range(3)]
    assert torch.equal(compose_chain(perms), compose(compose(perms[0], perms[1]), perms[2]))
    assert torch.equal(compose_chain(perms, 1, 1), identity(5))
    with pytest.raises(ValueError, match="start, stop: expected 0 <= start <= stop <= 3"):
        compose_chain(perms, 2, 1)


def test_agreement() -> None:
    assert agreement(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])) == 1.0
    assert agreement(torch.tensor([0, 1, -1, 3]), torch.tensor([0, 2, 2, -1])) == 0.5
    assert math.isnan(agreement(torch.tensor([-1]), torch.tensor([0])))


def test_composed_matching_agrees_with_direct_on_a_planted_chain() -> None:
    # Layers B and C are rescaled permutations of A: matching is exact, so composition is too.
    a = make_sae(d_in=12, d_sae=24, seed=0)
    g = torch.Generator().manual_seed(9)
    b = rescale_features(a.permute(torch.randperm(24, generator=g)), torch.rand(24, generator=g) + 0.5)
    c = rescale_features(b.permute(torch.randperm(24, generator=g)), torch.rand(24, generator=g) + 0.5)
    p_ab, p_bc, p_ac = match(a, b).perm, match(b, c).perm, match(a, c).perm
    assert agreement(compose(p_ab, p_bc), p_ac) == 1.0
    assert path([p_ab, p_bc], 0, 5).features == (5, int(p_ab[5]), int(p_ac[5]))


def test_path_forward_composes_and_backward_inverts_with_step_costs() -> None:
    g = torch.Generator().manual_seed(0)
    layers = [10, 11, 12, 13]
    perms = [torch.randperm(6, generator=g) for _ in range(3)]
    costs = [torch.rand(6, generator=g) for _ in perms]
    p = path(perms, 11, 4, costs=costs, layers=layers)
    feats, step = p.features, p.step_costs
    assert list(feats[1:]) == [4, int(perms[1][4]), int(compose_chain(perms, 1, 3)[4])]
    assert p.forward() == list(feats[1:])
    assert int(perms[0][feats[0]]) == feats[1]  # the backward step lands on the start feature
    assert math.isnan(step[1])
    assert step[0] == pytest.approx(float(costs[0][feats[0]]))
    assert step[2] == pytest.approx(float(costs[1][feats[1]]))
    assert p.pair_costs() == [step[0], step[2], step[3]]
    assert all(math.isnan(s) for s in path(perms, 11, 4, layers=layers).step_costs)  # no costs given
    with pytest.raises(ValueError, match="start_layer"):
        path(perms, 7, 0, layers=layers)
    with pytest.raises(ValueError, match="layers"):
        path(perms, 0, 0, layers=[0, 1])
    with pytest.raises(ValueError, match="costs"):
        path(perms, 0, 0, costs=costs[:2])


def test_path_costs_stop_at_a_missing_partner() -> None:
    perms = [torch.tensor([1, -1]), torch.tensor([0, 1])]
    costs = [torch.tensor([0.5, 0.25])] * 2
    p = path(perms, 0, 1, costs=costs)
    assert p.features == (1, -1, -1) and all(math.isnan(s) for s in p.step_costs)
