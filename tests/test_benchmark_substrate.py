"""``python -m benchmarks.substrate`` on the smoke profile: both precisions timed, errors small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import substrate


def test_substrate_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "substrate.json"
        assert substrate.main(["--profile", "smoke", "--reps", "1", "--steps", "2", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert set(result["forward_tok_per_s"]) == set(result["sae_step_ms"]) == {"float32", "bfloat16"}
    assert all(v > 0 for v in (*result["forward_tok_per_s"].values(), *result["sae_step_ms"].values()))
    cpu = (*result["forward_cpu_ms_per_tok"].values(), *result["sae_step_cpu_ms"].values())
    assert len(cpu) == 4 and all(v > 0 for v in cpu)
    errors = result["forward_rel_err_per_layer"]
    assert len(errors) == 4 and all(0 < e < 0.05 for e in errors)  # bfloat16 differs, but little
    assert "SAE step float32" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        substrate.main(["--reps", "0"])
