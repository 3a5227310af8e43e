"""Summaries of per-layer series: correlations, thresholds crossed, and the paper's depth conventions.

The paper reports curves over Gemma 2 2B's 26 layers; a model of another depth is compared at the
same *relative* depth (:func:`paper_layer`), and the paper's "early layers" (0–9 of 26) are the
first :data:`EARLY_FRACTION` of the depth (:func:`early_late_split`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "EARLY_FRACTION",
    "PAPER_N_LAYERS",
    "correlation",
    "early_late_split",
    "first_below",
    "paper_layer",
    "rank_correlation",
]

EARLY_FRACTION = 10 / 26
"""The paper's early layers are 0–9 of Gemma 2 2B's 26: this fraction of the depth."""
PAPER_N_LAYERS = 26
"""Gemma 2 2B's depth, for mapping the paper's layer indices to another model's."""


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equal-length series, ignoring positions where either is NaN.

    ``nan`` when fewer than two points remain or either series is constant.

    >>> round(correlation([1, 2, 3, float("nan")], [2, 4, 7, 1]), 4)
    0.9934
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D series of equal length, got {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def rank_correlation(x: Sequence[float], y: Sequence[float], *, min_points: int = 2) -> float:
    """Spearman rank correlation of two equal-length series (Pearson of their average ranks),
    ignoring positions where either is NaN; ``nan`` with fewer than ``min_points`` such positions or
    when :func:`correlation` of the ranks is (a constant series).

    >>> rank_correlation([1, 2, 3, 4], [1, 10, 100, 1000]), rank_correlation([1, 2, 3], [3, 1, 2])
    (1.0, -0.5)
    >>> rank_correlation([1, 2], [1, 2], min_points=3)
    nan
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D series of equal length, got {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    if int(ok.sum()) < min_points:
        return math.nan
    return correlation(_ranks(a[ok]).tolist(), _ranks(b[ok]).tolist())


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(1, v.size + 1)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def first_below(distances: Sequence[int], values: Sequence[float], threshold: float) -> float:
    """The first distance at which ``values`` drops below ``threshold`` (``inf`` if it never does).

    >>> first_below([1, 2, 3], [0.9, 0.6, 0.4], 0.5)
    3.0
    """
    for d, v in zip(distances, values, strict=True):
        if v < threshold:
            return float(d)
    return math.inf


def early_late_split(layers: Sequence[int], values: Sequence[float], n_layers: int) -> tuple[float, float]:
    """Mean of ``values`` over the paper's "early" layers (the first 10/26 of the depth) and the rest.

    ``layers`` are the first layers of the pairs the values belong to; NaN values are ignored.

    >>> early_late_split([0, 1, 2, 3], [0.1, 0.2, 0.5, 0.7], 4)
    (0.15000000000000002, 0.6)
    """
    cut = EARLY_FRACTION * n_layers
    v = np.asarray(values, dtype=np.float64)
    early = np.array([layer < cut for layer in layers])
    if len(v) != len(early):
        raise ValueError(f"values: expected {len(early)} values (one per layer), got {len(v)}")

    def mean(sel: np.ndarray) -> float:
        x = v[sel & ~np.isnan(v)]
        return float(x.mean()) if x.size else math.nan

    return mean(early), mean(~early)


def paper_layer(layer: int, n_layers: int) -> int:
    """The layer of an ``n_layers``-deep model at the same relative depth as Gemma 2 2B's ``layer``.

    >>> paper_layer(20, 26), paper_layer(20, 30), paper_layer(0, 4), paper_layer(25, 4)
    (20, 23, 0, 3)
    """
    if not 0 <= layer < PAPER_N_LAYERS:
        raise ValueError(f"layer: expected a Gemma 2 2B layer in 0..{PAPER_N_LAYERS - 1}, got {layer}")
    if n_layers < 1:
        raise ValueError(f"n_layers: expected >= 1, got {n_layers}")
    return round(layer / (PAPER_N_LAYERS - 1) * (n_layers - 1))
