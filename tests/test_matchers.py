"""The four matchers behind one interface; Sinkhorn's plan, its ε scale and its limits."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae

from saematch_core import lap
from saematch_core.match import MatchConfig, MatchResult, match
from saematch_core.matchers import (
    MATCHER_NAMES,
    MATCHERS,
    Matcher,
    SinkhornConfig,
    get_matcher,
    register_matcher,
    sinkhorn_plan,
)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _planted_vectors(
    n: int, d: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = _unit(torch.randn(n, d, generator=g, dtype=torch.float64))
    perm = torch.randperm(n, generator=g)
    y = _unit(x[perm] + noise * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5)
    return x, y, torch.argsort(perm)  # x_i ↔ y_{inv[i]}


def test_registry_has_the_four_matchers_in_order() -> None:
    assert MATCHER_NAMES == ("saematch", "cosine", "greedy", "sinkhorn")
    assert get_matcher("cosine") is MATCHERS["cosine"]
    assert [MATCHERS[n].one_to_one for n in MATCHER_NAMES] == [True, True, False, False]
    with pytest.raises(ValueError, match=r"matcher: expected one of .*got 'hungarian'"):
        get_matcher("hungarian")
    with pytest.raises(ValueError, match="already registered"):
        register_matcher(MATCHERS["cosine"])
    assert "sinkhorn" in lap.SOLVERS  # usable through the solver registry too


@pytest.mark.parametrize("name", MATCHER_NAMES)
def test_every_matcher_recovers_a_planted_permutation(name: str) -> None:
    a = make_sae(16, 64, seed=1)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    res = MATCHERS[name](a, a.permute(perm))
    assert isinstance(res, MatchResult) and res.shape == (64, 64)
    assert torch.equal(res.perm, torch.argsort(perm))
    assert res.solver == MATCHERS[name].solver and res.is_permutation
    assert float(res.cost.abs().max()) < 1e-5


def test_exact_matchers_are_match_with_their_config() -> None:
    a, b = make_sae(16, 40, seed=3), make_sae(16, 40, seed=4)
    for name in ("saematch", "cosine", "greedy"):
        m = MATCHERS[name]
        assert torch.equal(m(a, b).perm, match(a, b, m.config).perm)
    assert MATCHERS["cosine"].config == MatchConfig(params=("W_dec",), metric="cosine", fold=False)


def test_sinkhorn_plan_has_uniform_marginals_and_reports_its_scale() -> None:
    x, y, _ = _planted_vectors(30, 8, 1.0, seed=0)
    y = y[:20]
    plan, info = sinkhorn_plan(x, y, metric="cosine", config=SinkhornConfig(epsilon=0.05, tol=1e-10))
    assert plan.shape == (30, 20) and plan.dtype == torch.float64
    torch.testing.assert_close(plan.sum(1), torch.full((30,), 1 / 30, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((20,), 1 / 20, dtype=torch.float64), atol=1e-8, rtol=0)
    expected_scale = float((1 - x @ y.T).clamp(min=0).median())
    assert info["cost_scale"] == pytest.approx(expected_scale) and info["epsilon"] == 0.05


def test_sinkhorn_at_small_epsilon_recovers_a_planted_permutation_greedy_misses() -> None:
    # Noise such that the nearest neighbour fails on some rows: the transport constraint fixes them.
    x, y, inv = _planted_vectors(100, 16, 0.8, seed=1)
    greedy = (x @ y.T).argmax(1)
    assert float((greedy == inv).double().mean()) < 0.99
    plan, info = sinkhorn_plan(x, y, metric="cosine")  # the default ε = 0.01
    assert info["log_domain"] == 0.0
    assert torch.equal(plan.argmax(1), inv)
    exact = torch.as_tensor(lap.linear_sum_assignment((x @ y.T).numpy(), maximize=True)[1])
    assert torch.equal(exact, inv)  # ε → 0 tends to this: the optimal assignment of the same cost


def test_sinkhorn_at_large_epsilon_tends_to_greedy_on_column_centred_costs() -> None:
    # log P_ij = f_i + g_j − C_ij/ε and, to first order in 1/ε, g_j = mean_i C_ij / ε + const.
    x, y, _ = _planted_vectors(200, 12, 1.6, seed=2)
    cost = 1 - x @ y.T
    plan, _ = sinkhorn_plan(x, y, metric="cosine", config=SinkhornConfig(epsilon=50.0))
    assert torch.equal(plan.argmax(1), (cost - cost.mean(0, keepdim=True)).argmin(1))


def test_sinkhorn_mse_uses_the_log_domain_when_costs_are_heavy_tailed() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x[0] *= 100.0  # one huge feature: max cost / median ≫ 600 ε
    perm = torch.randperm(40, generator=g)
    plan, info = sinkhorn_plan(x, x[perm], metric="mse", config=SinkhornConfig(epsilon=0.01))
    assert info["log_domain"] == 1.0 and bool(torch.isfinite(plan).all())
    assert torch.equal(plan.argmax(1), torch.argsort(perm))


def test_sinkhorn_refuses_too_large_plans_and_bad_config() -> None:
    x = _unit(torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"max_pairs: the plan would hold 10 × 10 = 100 pairs"):
        sinkhorn_plan(x, x, metric="cosine", config=SinkhornConfig(max_pairs=99))
    with pytest.raises(ValueError, match=r"SinkhornConfig.epsilon: expected a number > 0, got 0"):
        SinkhornConfig(epsilon=0)
    with pytest.raises(ValueError, match=r"SinkhornConfig: unknown keys \['eps'\]"):
        SinkhornConfig.from_dict({"eps": 1.0})
    with pytest.raises(ValueError, match="metric: expected 'cosine' or 'mse'"):
        sinkhorn_plan(x, x, metric="l1")


def test_matcher_round_trips_through_a_dict() -> None:
    for m in MATCHERS.values():
        assert Matcher.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match=r"Matcher.name: expected an identifier-like str"):
        Matcher(name="two words")


def test_sinkhorn_result_on_unequal_widths() -> None:
    a, b = make_sae(16, 30, seed=5), make_sae(16, 50, seed=6)
    res = MATCHERS["sinkhorn"](a, b)
    assert res.shape == (30, 50) and bool((res.perm >= 0).all()) and res.info["n_iter"] >= 0
    from saematch_core.cost import feature_vectors, pair_costs

    va, vb = feature_vectors(a, ("W_dec",), fold=False), feature_vectors(b, ("W_dec",), fold=False)
    torch.testing.assert_close(res.cost, pair_costs(va, vb, res.perm, metric="cosine"))
