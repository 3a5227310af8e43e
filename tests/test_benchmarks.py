"""``make bench`` end to end on a tiny planted instance: every solver variant agrees with scipy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_sae

from benchmarks import run
from benchmarks.planted import NOISE_LEVELS, noise_for


def test_benchmark_runs_and_checks_the_optimum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--F", "256", "--d", "16", "--noise", "easy", "hard", "--out", str(tmp_path), "--timeout", "300"]
    assert run.main(argv) == 0
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {(r["noise"], r["candidates"]) for r in records} == {
        (n, c) for n in ("easy", "hard") for c in ("float32", "bfloat16")
    }
    for r in records:
        assert r["same_optimum"] is True and r["max_violation"] <= 1e-9 and not r["errors"]
        assert r["gemm_s"] > 0 and r["lap_speedup_vs_scipy"] > 0
    assert "F=256" not in capsys.readouterr().out  # no FAIL line names an instance


def test_substrate_chain_task_matches_every_consecutive_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import saematch_core.prepare as prepare_module
    from saematch_core.formats import save_sae

    paths = {}
    for layer in range(4):
        paths[layer] = tmp_path / f"layer_{layer}.safetensors"
        save_sae(make_sae(16, 32, seed=layer), paths[layer])

    class Prepared:
        def saes(self) -> dict[int, Path]:
            return paths

    def cached(profile: str, *, cached_only: bool, progress: bool) -> Prepared:
        assert profile == "smoke" and cached_only
        return Prepared()

    monkeypatch.setattr(prepare_module, "prepare", cached)
    spec = {"task": "substrate", "profile": "smoke", "F": 0, "d": 0, "noise": "easy", "seed": 0}
    ref = run._child({**spec, "solver": "scipy", "candidates": "float32"})
    fast = run._child({**spec, "solver": "sparse", "candidates": "bfloat16"})
    assert ref["n_pairs"] == fast["n_pairs"] == 3 and (ref["F"], ref["d"]) == (32, 16)
    assert fast["total"] == pytest.approx(ref["total"], rel=1e-9) and fast["max_violation"] <= 1e-9


def test_noise_levels_scale_with_the_dimension() -> None:
    assert noise_for("hard", 576) == NOISE_LEVELS["hard"]
    assert noise_for("hard", 2304) == 2 * NOISE_LEVELS["hard"]
