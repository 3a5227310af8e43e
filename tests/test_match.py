"""match(): planted-permutation recovery, folding, baselines, unequal widths, config and result I/O."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_sae

from saematch_core.compose import invert
from saematch_core.cost import cost_matrix, feature_vectors
from saematch_core.errors import SAEValidationError
from saematch_core.fold import rescale_features
from saematch_core.lap import brute_force_assignment
from saematch_core.match import MATCH_RESULT_KIND, MatchConfig, MatchResult, match
from saematch_core.sae import SAE


def planted(
    d_sae: int = 48, d_in: int = 16, noise: float = 0.0, spread: float = 2.0, seed: int = 0
) -> tuple[SAE, SAE, torch.Tensor]:
    """B = A with features permuted, noised, then rescaled per feature by ``exp(U(-spread, spread))``.

    Returns ``(a, b, expected)`` where ``expected[i]`` is B's copy of A's feature ``i``.
    """
    a = make_sae(d_in=d_in, d_sae=d_sae, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    perm = torch.randperm(d_sae, generator=g)
    b = a.permute(perm)
    if noise:

        def jitter(t: torch.Tensor) -> torch.Tensor:
            return t + noise * t.std() * torch.randn(t.shape, generator=g)

        b = replace(b, W_enc=jitter(b.W_enc), W_dec=jitter(b.W_dec), b_enc=jitter(b.b_enc))
    scale = torch.exp(spread * (2 * torch.rand(d_sae, generator=g) - 1))
    b = rescale_features(b, scale)
    return a, b, invert(perm)


def brute_force_total(a: SAE, b: SAE, config: MatchConfig) -> float:
    folded = (config.fold and a.activation == "jumprelu", config.fold and b.activation == "jumprelu")
    va = feature_vectors(a, config.params, folded[0], dtype=torch.float64)
    vb = feature_vectors(b, config.params, folded[1], dtype=torch.float64)
    cost = cost_matrix(va, vb, config.metric).numpy()
    rows, cols = brute_force_assignment(cost)
    return float(cost[rows, cols].sum())


# ---------------------------------------------------------------------- planted recovery
def test_planted_exact_recovery_at_low_noise() -> None:
    a, b, expected = planted(noise=0.01)
    res = match(a, b)
    assert torch.equal(res.perm, expected)
    assert res.is_permutation and res.shape == (48, 48) and res.solver == "sparse"
    assert res.info["gap_bound"] == 0.0  # the default solver proves its optimum
    assert res.folded == (True, True)
    assert res.total_cost == pytest.approx(float(res.cost.sum()))
    assert res.mean_cost < 1e-3


def test_planted_noiseless_costs_zero() -> None:
    a, b, expected = planted(noise=0.0)
    res = match(a, b, dtype="float64")
    assert torch.equal(res.perm, expected)
    assert res.total_cost < 1e-10  # float32 rescaling rounds at ~1e-7 per entry


@pytest.mark.parametrize("params", [("W_enc", "W_dec", "b_enc"), ("W_dec",)])
def test_folding_recovers_what_unfolded_matching_misses(params) -> None:
    # Per-feature rescaling moves thresholds by up to e^±3; folding undoes it exactly, while unfolded
    # matching is pulled toward the features whose scale happens to be large.
    a, b, expected = planted(d_in=8, noise=0.1, spread=3.0)
    folded = match(a, b, params=params, fold=True)
    unfolded = match(a, b, params=params, fold=False)
    assert torch.equal(folded.perm, expected)
    frac_unfolded = float((unfolded.perm == expected).float().mean())
    assert frac_unfolded < 0.9, f"unfolded matching should be fooled by the rescaling, got {frac_unfolded}"
    assert unfolded.folded == (False, False)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_high_noise_objective_equals_brute_force(seed, metric) -> None:
    a, b, _ = planted(d_sae=6, d_in=4, noise=1.5, seed=seed)
    config = MatchConfig(metric=metric, dtype="float64")
    res = match(a, b, config)
    assert res.total_cost == pytest.approx(brute_force_total(a, b, config), rel=1e-9, abs=1e-12)


def test_high_noise_scipy_beats_every_other_assignment() -> None:
    a, b, expected = planted(noise=2.0)
    res = match(a, b, dtype="float64")
    frac = float((res.perm == expected).float().mean())
    assert frac < 1.0, "noise this high should break exact recovery (else the test proves nothing)"
    va, vb = feature_vectors(a, dtype=torch.float64), feature_vectors(b, dtype=torch.float64)
    cost = cost_matrix(va, vb)
    rows = torch.arange(48)
    assert res.total_cost <= float(cost[rows, expected].sum()) + 1e-9
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        assert res.total_cost <= float(cost[rows, torch.randperm(48, generator=g)].sum()) + 1e-9
    # float32 cost algebra reaches the same optimum on this instance.
    assert match(a, b).total_cost == pytest.approx(res.total_cost, rel=1e-6)


@pytest.mark.parametrize("solver", ["scipy", "greedy"])
def test_chunking_and_dtype_do_not_change_the_result(solver) -> None:
    a, b, _ = planted(d_sae=20, noise=0.5)
    ref = match(a, b, solver=solver, dtype="float64")
    assert torch.equal(match(a, b, solver=solver, dtype="float64", chunk_size=3).perm, ref.perm)
    low = match(a, b, solver=solver, dtype="bfloat16", device="auto")
    assert low.cost.dtype == torch.float64 and low.config.dtype == "bfloat16"
    # Costs are rescored from the float32 parameters, so the float64 optimum is a true lower bound.
    assert low.total_cost == pytest.approx(ref.total_cost, rel=0.05)
    if solver == "scipy":
        assert low.total_cost >= ref.total_cost - 1e-9


def test_cosine_on_decoder_ignores_scale_without_folding() -> None:
    a, b, expected = planted(noise=0.01, spread=2.0)
    res = match(a, b, params=("W_dec",), metric="cosine", fold=False)
    assert torch.equal(res.perm, expected)
    assert float(res.cost.max()) < 1e-3


# ---------------------------------------------------------------------- baselines and shapes
def test_greedy_many_to_one() -> None:
    a = make_sae(d_in=8, d_sae=12, seed=1)
    # B holds two copies of A's feature 0 direction and junk elsewhere: greedy may reuse partners.
    b = make_sae(d_in=8, d_sae=12, seed=2)
    res = match(a, b, solver="greedy")
    exact = match(a, b)
    assert res.solver == "greedy" and res.n_matched == 12
    assert not res.is_permutation, "random SAEs should make greedy reuse a partner"
    assert res.info["n_collisions"] >= 1
    # Each greedy pair is the cheapest available for that row, so never worse per feature.
    assert bool((res.cost <= exact.cost + 1e-9).all())
    assert res.total_cost < exact.total_cost
    with pytest.raises(ValueError, match="one-to-one"):
        invert(res.perm)


def test_identity_baseline() -> None:
    a, b, _ = planted(noise=0.0)
    res = match(a, b, solver="identity")
    assert torch.equal(res.perm, torch.arange(48))
    assert res.total_cost > match(a, b).total_cost


@pytest.mark.parametrize(("f_a", "f_b"), [(5, 7), (7, 5), (1, 6)])
def test_rectangular(f_a, f_b) -> None:
    a = make_sae(d_in=4, d_sae=f_a, seed=3)
    b = make_sae(d_in=4, d_sae=f_b, seed=4)
    res = match(a, b, dtype="float64")
    assert res.shape == (f_a, f_b) and res.perm.shape == (f_a,)
    matched = res.perm[res.perm >= 0]
    assert matched.numel() == min(f_a, f_b) and res.is_permutation
    assert torch.unique(matched).numel() == matched.numel()
    assert int((res.perm == -1).sum()) == max(f_a - f_b, 0)
    assert bool(torch.isnan(res.cost[res.perm == -1]).all())
    assert res.total_cost == pytest.approx(brute_force_total(a, b, res.config), rel=1e-9)
    ident = match(a, b, solver="identity")
    assert ident.perm.tolist() == [i if i < f_b else -1 for i in range(f_a)]


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_non_jumprelu_is_matched_unfolded(activation) -> None:
    a = make_sae(d_in=6, d_sae=10, seed=5, activation=activation)
    perm = torch.randperm(10)
    res = match(a, a.permute(perm))
    assert res.folded == (False, False)
    assert torch.equal(res.perm, invert(perm))


def test_cosine_with_zero_feature_is_an_error() -> None:
    a = make_sae(d_in=4, d_sae=6, activation="relu")
    a = replace(a, W_dec=a.W_dec.clone().index_fill_(0, torch.tensor([3]), 0.0))
    with pytest.raises(
        SAEValidationError, match=r"a: 1 features have an all-zero vector \(first at feature 3\)"
    ):
        match(a, a, params=("W_dec",), metric="cosine")


def test_bad_inputs() -> None:
    a = make_sae(d_in=16, d_sae=8)
    b = make_sae(d_in=8, d_sae=8)
    with pytest.raises(SAEValidationError, match=r"a, b: expected the same d_in, got a.d_in=16 and b.d_in=8"):
        match(a, b)
    with pytest.raises(TypeError, match="b: expected an SAE, got Tensor"):
        match(a, torch.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"match: unknown MatchConfig fields \['objective'\]"):
        match(a, a, objective="mse")
    with pytest.raises(TypeError, match="config: expected a MatchConfig or None, got dict"):
        match(a, a, {"metric": "mse"})  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda() -> None:
    a = make_sae(d_in=4, d_sae=4)
    with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
        match(a, a, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    a, b, _ = planted(noise=0.5)
    cpu = match(a, b, dtype="float64")
    gpu = match(a, b, dtype="float64", device="cuda")
    assert gpu.total_cost == pytest.approx(cpu.total_cost, rel=1e-9)
    assert gpu.perm.device.type == "cpu"


@pytest.mark.parametrize("candidates", ["float32", "bfloat16"])
def test_sparse_solver_equals_scipy(candidates: str) -> None:
    for noise in (0.01, 2.0):
        a, b, _ = planted(noise=noise)
        ref = match(a, b, dtype="float64")
        fast = match(a, b, dtype="float64", solver="sparse", sparse_k=3, sparse_candidates=candidates)
        assert fast.is_permutation and fast.total_cost == pytest.approx(ref.total_cost, rel=1e-9)
        assert fast.info["gap_bound"] <= 1e-12 * fast.total_cost


# ---------------------------------------------------------------------- config
def test_config_defaults_and_round_trip() -> None:
    cfg = MatchConfig()
    assert cfg.params == ("W_enc", "W_dec", "b_enc") and cfg.metric == "mse" and cfg.fold
    assert cfg.solver == "sparse" and cfg.sparse_candidates == "auto" and cfg.torch_dtype == torch.float32
    custom = MatchConfig(params=["W_dec", "b_enc"], metric="cosine", solver="greedy", dtype="float64")  # type: ignore[arg-type]
    assert custom.params == ("W_dec", "b_enc")
    data = json.loads(json.dumps(custom.to_dict()))
    assert MatchConfig.from_dict(data) == custom


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (
            {"metric": "cos"},
            ValueError,
            r"MatchConfig.metric: expected one of \['mse', 'cosine'\], got 'cos'",
        ),
        ({"params": ()}, ValueError, "MatchConfig.params: expected a non-empty subset"),
        ({"params": ("W_enc", "b_dec")}, ValueError, r"MatchConfig.params: .*got \['W_enc', 'b_dec'\]"),
        ({"params": ("W_dec", "W_dec")}, ValueError, "MatchConfig.params: .* without repeats"),
        ({"params": "W_dec"}, TypeError, "MatchConfig.params: expected a sequence of names"),
        ({"solver": "hungarian"}, ValueError, "MatchConfig.solver: expected one of"),
        ({"dtype": "int8"}, ValueError, "MatchConfig.dtype: expected one of"),
        ({"chunk_size": 0}, ValueError, "MatchConfig.chunk_size: expected an int >= 1, got 0"),
        ({"sparse_k": 2.5}, ValueError, "MatchConfig.sparse_k: expected an int >= 1, got 2.5"),
        (
            {"sparse_candidates": "float16"},
            ValueError,
            r"MatchConfig.sparse_candidates: expected one of \['auto', 'float32', 'bfloat16'\], got",
        ),
        ({"tol": -1e-9}, ValueError, "MatchConfig.tol: expected a finite float >= 0, got -1e-09"),
        ({"tol": float("inf")}, ValueError, "MatchConfig.tol: expected a finite float >= 0"),
        ({"fold": "yes"}, TypeError, "MatchConfig.fold: expected a bool"),
        ({"device": "gpu"}, ValueError, "MatchConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_config_validation(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        MatchConfig(**kwargs)


def test_config_from_dict_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"MatchConfig: unknown keys \['objective'\]"):
        MatchConfig.from_dict({"objective": "mse"})


# ---------------------------------------------------------------------- result I/O
def _assert_same_result(x: MatchResult, y: MatchResult) -> None:
    assert torch.equal(x.perm, y.perm)
    assert torch.equal(torch.isnan(x.cost), torch.isnan(y.cost))
    assert torch.equal(x.cost.nan_to_num(-1.0), y.cost.nan_to_num(-1.0))
    assert x.total_cost == y.total_cost and x.solver == y.solver and x.shape == y.shape
    assert x.is_permutation == y.is_permutation and x.config == y.config and x.folded == y.folded
    assert dict(x.timings) == dict(y.timings) and dict(x.info) == dict(y.info)
    assert x.run_id == y.run_id and x.created_ms == y.created_ms


def test_json_round_trip_and_layout(tmp_path) -> None:
    a = make_sae(d_in=4, d_sae=7, seed=6)
    b = make_sae(d_in=4, d_sae=5, seed=7)
    res = match(a, b, metric="cosine")
    path = res.to_json(tmp_path / "perm.json", git_commit="abc123")
    data = json.loads(path.read_text())
    assert data["kind"] == MATCH_RESULT_KIND and data["schema_version"] == 2
    assert data["git_commit"] == "abc123" and data["saematch_version"]
    assert set(data) == {
        "kind", "schema_version", "saematch_version", "git_commit", "git_commit_reason", "run_id",
        "created_ms", "config", "data",
    }  # fmt: skip
    body = data["data"]
    assert body["total_cost"] == pytest.approx(res.total_cost) and body["n_matched"] == res.n_matched
    text = path.read_text()
    pairs_text = text[text.index('"pairs"') :]
    assert pairs_text.count("\n") == len(body["pairs"]) + 4, "one line per pair"
    assert [d["a"] for d in body["pairs"]] == (res.perm >= 0).nonzero().flatten().tolist()
    assert {tuple(d) for d in body["pairs"]} == {("a", "b", "cost")}
    _assert_same_result(MatchResult.from_json(path), res)
    assert [p.name for p in tmp_path.iterdir()] == ["perm.json"], "no temp files left behind"


def test_json_of_the_first_layout_version_still_reads(tmp_path) -> None:
    """Files written before the one result layout: ``metrics`` and ``details`` at the top level."""
    res = match(make_sae(d_in=4, d_sae=5, seed=1), make_sae(d_in=4, d_sae=5, seed=2))
    new = res.to_dict()
    old = {k: v for k, v in new.items() if k != "data"} | {"schema_version": 1}
    body = new["data"]
    old.update({k: body[k] for k in ("solver", "shape", "is_permutation", "folded", "timings", "info")})
    old["metrics"] = {"total_cost": body["total_cost"], "mean_cost": body["mean_cost"], "n_matched": 5.0}
    old["details"] = body["pairs"]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    _assert_same_result(MatchResult.from_json(tmp_path / "v1.json"), res)
    with pytest.raises(ValueError, match="schema_version"):
        MatchResult.from_dict(new | {"schema_version": 7})


def test_safetensors_round_trip(tmp_path) -> None:
    a, b, _ = planted(d_sae=10, noise=0.1)
    res = match(a, b, solver="greedy")
    path = res.save(tmp_path / "perm.safetensors")
    _assert_same_result(MatchResult.load(path), res)


def test_result_io_errors(tmp_path) -> None:
    res = match(make_sae(d_in=4, d_sae=4), make_sae(d_in=4, d_sae=4, seed=1))
    with pytest.raises(FileNotFoundError, match=r"missing: output folder does not exist"):
        res.to_json(tmp_path / "missing" / "perm.json")
    with pytest.raises(FileNotFoundError, match="no such match-result file"):
        MatchResult.from_json(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no such match-result file"):
        MatchResult.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"bad.safetensors: not a readable safetensors file"):
        MatchResult.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"kind": "eval_result"}))
    with pytest.raises(ValueError, match=r"wrong.json: expected kind 'match_result', got 'eval_result'"):
        MatchResult.from_json(wrong)
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "match_result", "schema_version": 1}')
    with pytest.raises(ValueError, match=r"broken.json: malformed match result"):
        MatchResult.from_json(broken)


def test_result_validation() -> None:
    with pytest.raises(ValueError, match=r"MatchResult.perm: expected a LongTensor of shape \(3,\)"):
        MatchResult(
            perm=torch.zeros(3, dtype=torch.int32),
            cost=torch.zeros(3, dtype=torch.float64),
            total_cost=0.0,
            solver="scipy",
            is_permutation=True,
            shape=(3, 3),
        )
    with pytest.raises(ValueError, match=r"MatchResult.perm: expected entries in \[-1, 3\)"):
        MatchResult(
            perm=torch.tensor([0, 1, 3]),
            cost=torch.zeros(3, dtype=torch.float64),
            total_cost=0.0,
            solver="scipy",
            is_permutation=True,
            shape=(3, 3),
        )


def test_empty_match_has_nan_mean(tmp_path) -> None:
    a = make_sae(d_in=4, d_sae=3)
    res = match(a, a, solver="identity")
    # B without features: the only consistent matching in which nothing is matched.
    nan = torch.full((3,), math.nan, dtype=torch.float64)
    empty = replace(res, perm=torch.full((3,), -1), cost=nan, total_cost=0.0, shape=(3, 0))
    assert empty.n_matched == 0 and math.isnan(empty.mean_cost)
    assert np.isfinite(res.mean_cost)
    # NaN is not JSON: the mean is written as the string "nan" and the pairs list is empty.
    data = json.loads(empty.to_json(tmp_path / "empty.json").read_text())
    assert data["data"]["mean_cost"] == "nan" and data["data"]["pairs"] == []
    _assert_same_result(MatchResult.from_json(tmp_path / "empty.json"), empty)


# ---------------------------------------------------------------------- scaled matching
def test_scaling_by_theta_is_folding() -> None:
    a, b, expected = planted(noise=0.2)
    assert a.threshold is not None and b.threshold is not None
    folded = match(a, b, dtype="float64")
    scaled = match(a, b, fold=False, dtype="float64", scales=(a.threshold, b.threshold))
    assert torch.equal(scaled.perm, folded.perm) and torch.equal(scaled.perm, expected)
    # folding runs in the SAE's float32, scaling in float64
    assert scaled.total_cost == pytest.approx(folded.total_cost, rel=1e-6)
    assert scaled.folded == (False, False)


def test_scaled_matching_of_relu_saes_undoes_a_rescaling() -> None:
    a = make_sae(d_in=8, d_sae=24, seed=3, activation="relu")
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(4))
    s = 0.2 + 5 * torch.rand(24, generator=torch.Generator().manual_seed(5))
    b = rescale_features(a.permute(perm), s)
    ones = torch.ones(24)
    assert match(a, b, fold=False).total_cost > 1e-2, "the rescaled copy is far from the original"
    res = match(a, b, fold=False, scales=(ones, 1.0 / s))
    assert torch.equal(res.perm, invert(perm)) and res.total_cost < 1e-10


def test_scales_need_fold_false_and_the_right_shape() -> None:
    a = make_sae(d_in=4, d_sae=6)
    ones = torch.ones(6)
    with pytest.raises(ValueError, match="scales: scaled matching replaces folding"):
        match(a, a, scales=(ones, ones))
    with pytest.raises(ValueError, match=r"scale: expected shape \(6,\), got \(5,\)"):
        match(a, a, fold=False, scales=(ones, torch.ones(5)))
    with pytest.raises(ValueError, match="scale: expected every entry finite and > 0, got 1 that are not"):
        match(a, a, fold=False, scales=(ones, torch.tensor([1.0, 1, 1, 0, 1, 1])))
    with pytest.raises(TypeError, match="scales: expected a pair"):
        match(a, a, fold=False, scales=ones)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- solver registry and tolerance
def test_registered_solver_is_reachable_from_match_config_and_cli() -> None:
    from saematch_core.cli import build_parser
    from saematch_core.lap import SOLVERS, Assignment, register_solver

    seen: dict[str, float] = {}

    def reverse(x: torch.Tensor, y: torch.Tensor, *, tol: float, **_: object) -> Assignment:
        seen["tol"] = tol
        return Assignment(cols=np.arange(x.shape[0])[::-1].copy(), info={"mine": 1.0})

    with pytest.raises(ValueError, match=r"MatchConfig\.solver: expected one of"):
        MatchConfig(solver="test-reverse")
    register_solver("test-reverse", reverse)
    try:
        a = make_sae(d_in=4, d_sae=5)
        res = match(a, a, solver="test-reverse", tol=1e-6)
        assert res.perm.tolist() == [4, 3, 2, 1, 0] and res.solver == "test-reverse"
        assert res.info["mine"] == 1.0 and seen["tol"] == 1e-6
        assert MatchConfig.from_dict({"solver": "test-reverse"}).solver == "test-reverse"
        args = build_parser().parse_args(["match", "a", "b", "--out", "o.json", "--solver", "test-reverse"])
        assert args.solver == "test-reverse"
    finally:
        del SOLVERS["test-reverse"]


def test_gap_bound_is_in_cost_units() -> None:
    # rectangular MSE: the solver's inner-product gap times 2 / D is the total cost's
    from saematch_core.match import _cost_units

    assert _cost_units({"gap_bound": 3.0, "rounds": 2.0}, "mse", 6) == {"gap_bound": 1.0, "rounds": 2.0}
    assert _cost_units({"gap_bound": 3.0}, "cosine", 6) == {"gap_bound": 3.0}
    assert _cost_units({"n_collisions": 1.0}, "mse", 6) == {"n_collisions": 1.0}
