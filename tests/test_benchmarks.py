"""``make bench`` end to end on tiny instances: every solver variant agrees with scipy, results carry
the machine and date, and the book's reader can read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_sae

from benchmarks import run
from benchmarks.planted import NOISE_LEVELS, noise_for
from saematch_core.experiments.appendix import benchmark_series, benchmark_table


@pytest.mark.slow
def test_benchmark_runs_each_measurement_in_its_own_process(tmp_path: Path) -> None:
    argv = ["--F", "256", "--d", "16", "--noise", "hard", "--candidates", "float32", "--out", str(tmp_path)]
    assert run.main([*argv, "--timeout", "300"]) == 0
    (rec,) = json.loads((tmp_path / "results.json").read_text())["records"]
    assert rec["same_optimum"] is True and rec["ours_peak_rss_mb"] >= rec["ours_base_rss_mb"] > 0


def test_benchmark_runs_and_checks_the_optimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # every measurement in this process (the subprocesses only isolate peak memory; slow test above)
    monkeypatch.setattr(run, "_run_child", lambda spec, timeout: run._child(spec))
    argv = ["--F", "256", "--d", "16", "--noise", "easy", "hard", "--out", str(tmp_path), "--timeout", "300"]
    assert run.main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    records = doc["records"]
    assert {(r["noise"], r["candidates"]) for r in records} == {
        (n, c) for n in ("easy", "hard") for c in ("float32", "bfloat16")
    }
    for r in records:
        assert r["same_optimum"] is True and r["gap_bound_rel"] <= 1e-12 and not r["errors"]
        assert r["gemm_s"] > 0 and r["lap_speedup_vs_scipy"] > 0
    assert "F=256" not in capsys.readouterr().out  # no FAIL line names an instance
    meta = doc["meta"]
    assert meta["cpu_count"] >= 1 and meta["cpu"] and meta["torch"] and meta["numba"] and meta["date"]
    # the book's reader
    table = benchmark_table(tmp_path / "results.json")
    assert table is not None and len(table[1]) == 4 and "ours_s" in table[0]
    series = benchmark_series(tmp_path / "results.json", "e2e_over_gemm")
    assert series is not None and set(series[1]) == {"float32", "bfloat16"}


def test_quick_mode_is_the_small_side_by_side_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def planted(args, records, failures, warnings) -> None:
        seen.update(F=args.F, d=args.d, noise=args.noise, candidates=args.candidates)
        records.append(
            {"F": 4096, "d": 576, "noise": "hard", "candidates": args.candidates[0], "ours_s": 1.0}
        )

    monkeypatch.setattr(run, "_planted", planted)
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    assert seen["F"] == [4096] and seen["d"] == [576] and seen["noise"] == ["easy", "hard"]
    assert seen["candidates"] in (["float32"], ["bfloat16"])  # the machine's default, resolved
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["date"] and meta["command"] == f"python -m benchmarks.run --quick --out {tmp_path}"


def test_dense_task_compares_every_solver_on_explicit_matrices() -> None:
    out = run._child({"task": "dense", "kind": "planted", "n": 60, "seed": 0, "repeats": 1})
    assert out["sparse_total"] == pytest.approx(out["scipy_total"], rel=1e-12)
    assert out["dense_total"] == pytest.approx(out["scipy_total"], rel=1e-12)
    assert all(out[f"{s}_s"] > 0 for s in ("scipy", "sparse", "dense"))
    for kind in run.DENSE_KINDS:
        assert run.dense_matrix(kind, 5).shape == (5, 5)
    with pytest.raises(ValueError, match="kind: expected one of"):
        run.dense_matrix("sparse", 5)


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
    assert (
        fast["total"] == pytest.approx(ref["total"], rel=1e-9) and fast["gap_bound"] <= 1e-12 * fast["total"]
    )


def test_noise_levels_scale_with_the_dimension() -> None:
    assert noise_for("hard", 576) == NOISE_LEVELS["hard"]
    assert noise_for("hard", 2304) == 2 * NOISE_LEVELS["hard"]


def test_full_run_adds_the_target_instances_and_explicit_runs_do_not() -> None:
    full = run.instances(run._parser().parse_args([]))
    grid = [(F, d, n) for F in run.GRID_F for d in run.GRID_D for n in NOISE_LEVELS]
    assert full[: len(grid)] == grid and set(full) == set(grid) | set(run.TARGETS)
    assert (131072, 576, "hard") in full and (16384, 2304, "hard") in full
    assert run.instances(run._parser().parse_args(["--F", "256", "--noise", "hard"])) == [(256, 576, "hard")]
    big = run.instances(run._parser().parse_args(["--F", "256", "--noise", "hard", "--big"]))
    assert big == [(256, 576, "hard"), (65536, 576, "hard"), (131072, 576, "hard")]
    with pytest.raises(SystemExit):
        run._parser().parse_args(["--repeats", "0"])


def test_repetitions_are_interleaved_and_the_fastest_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    clock = iter(range(100, 0, -1))  # every later measurement is faster

    def child(spec: dict, timeout: float) -> dict:
        name = spec["task"] + (f"/{spec['candidates']}" if spec["task"] == "sparse" else "")
        order.append(name)
        out = {"time_s": float(next(clock)), "peak_rss_mb": 1.0}
        if spec["task"] != "gemm":
            out.update(total=1.0, gap_bound=0.0)
        if spec["task"] == "sparse":
            out.update(phase_candidates_s=0.5, phase_solve_s=0.25, phase_certify_s=0.25)
        return out

    monkeypatch.setattr(run, "_run_child", child)
    argv = ["--F", "64", "--d", "8", "--noise", "hard", "--repeats", "2", "--candidates", "float32"]
    assert run.main([*argv, "--out", str(tmp_path)]) == 0
    assert order == ["gemm", "scipy", "sparse/float32"] * 2
    (rec,) = json.loads((tmp_path / "results.json").read_text())["records"]
    assert rec["repeats"] == 2 and rec["gemm_runs_s"] == [100.0, 97.0] and rec["ours_runs_s"] == [98.0, 95.0]
    assert rec["gemm_s"] == 97.0 and rec["ours_s"] == 95.0 and rec["e2e_over_gemm"] == pytest.approx(95 / 97)


def test_target_lines_say_whether_each_target_was_reached() -> None:
    recs = [
        {"F": 131072, "d": 576, "noise": "hard", "candidates": "bfloat16", "e2e_over_gemm": 1.2},
        {"F": 16384, "d": 2304, "noise": "hard", "candidates": "float32", "lap_speedup_vs_scipy": 7.0},
        {"F": 4096, "d": 576, "noise": "hard", "candidates": "float32", "e2e_over_gemm": 9.0},
    ]
    lines = run.target_lines(recs)
    assert len(lines) == 2 and "e2e_over_gemm 1.2 (<= 1.5: reached)" in lines[0]
    assert "lap_speedup_vs_scipy 7 (>= 10: NOT reached)" in lines[1]
