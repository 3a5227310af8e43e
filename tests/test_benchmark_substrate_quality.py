"""``python -m benchmarks.substrate_quality`` on a smoke profile prepared with its main SAEs only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from benchmarks import substrate_quality
from saematch_core.activations import open_activation_cache
from saematch_core.models import load_model
from saematch_core.prepare import _rows, prepare
from saematch_core.profiles import get_profile

_MAIN_ONLY = dataclasses.replace(
    get_profile("smoke"), sweep_layers=(), sweep_l0_coefs=(), family_layers=(), seed_layers=()
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    prepare(_MAIN_ONLY, cache_dir=root, progress=False)
    return root


def test_bfloat16_rows_are_the_cache_rows_recomputed(prepared: Path) -> None:
    train = open_activation_cache(prepared / "smoke" / "activations" / "train")
    assert train is not None
    loaded = load_model(_MAIN_ONLY.model, cache_dir=prepared)
    low = substrate_quality.bfloat16_rows(loaded, train, [1, 3], batch_size=3)
    for layer in (1, 3):
        exact = _rows(train, layer)
        assert low[layer].shape == exact.shape
        rel = ((low[layer] - exact).norm(dim=1) / exact.norm(dim=1)).mean()
        assert 0 < rel < 0.05  # recomputed in bfloat16: close, not equal
        # aligned row for row: the same rows one position off differ as much as any two tokens
        shifted = ((low[layer][1:] - exact[:-1]).norm(dim=1) / exact[:-1].norm(dim=1)).mean()
        assert shifted > 10 * rel


def test_quality_benchmark_runs(prepared: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = substrate_quality.measure(_MAIN_ONLY, [2], cache_dir=prepared, n_tokens=1024)
    finally:
        torch.set_num_threads(threads)
    rows = result["layers"]["2"]["variants"]
    assert set(rows) == set(substrate_quality.VARIANTS)
    assert rows["float32"]["best_cos_vs_float32"] == pytest.approx(1.0)
    assert rows["float32_seed2"]["best_cos_vs_float32"] < 0.99  # another initial dictionary
    assert rows["bf16_step"]["fvu"] != rows["float32"]["fvu"]  # another arithmetic
    assert all(0 <= row["fvu"] and row["l0"] > 0 for row in rows.values())
    with pytest.raises(ValueError, match="expected a float32 disk profile"):
        streamed = dataclasses.replace(_MAIN_ONLY, train_mode="stream")
        substrate_quality.measure(streamed, [2], cache_dir=prepared)
    with pytest.raises(ValueError, match=r"layers: expected some of 0..3, got \[9\]"):
        substrate_quality.measure(_MAIN_ONLY, [9], cache_dir=prepared)
