"""``make bench`` end to end on a tiny planted instance: every solver variant agrees with scipy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run


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
