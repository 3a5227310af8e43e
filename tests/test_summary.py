"""Summaries of per-layer series and the paper's depth conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saematch_core.experiments.measures.summary import (
    correlation,
    early_late_split,
    first_below,
    paper_layer,
    rank_correlation,
)


def test_small_summaries() -> None:
    assert first_below([1, 2, 3], [0.9, 0.8, 0.7], 0.5) == math.inf
    assert first_below([1, 2], [0.4, 0.9], 0.5) == 1.0
    assert correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3]))
    x, y = np.random.default_rng(0).normal(size=(2, 20))
    assert correlation(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    early, late = early_late_split(list(range(26)), [0.0] * 10 + [1.0] * 16, 26)
    assert (early, late) == (0.0, 1.0)
    assert paper_layer(25, 30) == 29 and paper_layer(0, 30) == 0
    with pytest.raises(ValueError, match="Gemma 2 2B layer"):
        paper_layer(26, 30)


def test_rank_correlation_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = rng.integers(0, 5, 15).astype(float), rng.normal(size=15)  # ties in x
        expected = float(stats.spearmanr(x, y).statistic)
        assert rank_correlation(x.tolist(), y.tolist()) == pytest.approx(expected, abs=1e-12)
    assert rank_correlation([1, 2, math.nan, 4], [1, 4, 0, 9]) == pytest.approx(1.0)
    assert math.isnan(rank_correlation([1.0], [2.0]))
