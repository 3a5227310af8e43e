"""Do matched features fire together? The Matching Score per layer pair (paper Figs. 4/7).

For every layer pair, each matching's Matching Score (mean ``P(partner active | feature active)``
over its included pairs) against random partners, from
:func:`~saematch_core.experiments.measures.scores.matching_scores` (cached per pair).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scores import MatchingScoreResult, default_methods, matching_scores
from saematch_core.match import MatchConfig

__all__ = ["MatchingScoreConfig", "MatchingScores", "run"]


def _score_methods() -> dict[str, MatchConfig]:
    base = default_methods()
    return {k: base[k] for k in ("folded", "unfolded", "cosine")}


@dataclass(frozen=True, kw_only=True)
class MatchingScoreConfig:
    """What :func:`run` measures."""

    methods: Mapping[str, MatchConfig] = field(default_factory=_score_methods)
    """Name → matching; default ``folded``, ``unfolded`` and ``cosine``."""
    n_null: int = 5
    """Random matchings for the ``random`` row (0: none)."""

    def __post_init__(self) -> None:
        if not isinstance(self.methods, Mapping) or not all(
            isinstance(v, MatchConfig) for v in self.methods.values()
        ):
            raise TypeError("MatchingScoreConfig.methods: expected a mapping name → MatchConfig")
        object.__setattr__(self, "methods", dict(self.methods))
        if not isinstance(self.n_null, int) or isinstance(self.n_null, bool) or self.n_null < 0:
            raise ValueError(f"MatchingScoreConfig.n_null: expected an int >= 0, got {self.n_null!r}")


@dataclass(frozen=True, eq=False)
class MatchingScores:
    """One :class:`~saematch_core.experiments.measures.scores.MatchingScoreResult` per layer pair."""

    pairs: tuple[MatchingScoreResult, ...]
    """Per layer pair, in order (each cached on its own)."""

    @property
    def layers(self) -> list[int]:
        """The first layer of every pair, in order (the x axis of the per-pair plots)."""
        return [r.layer_a for r in self.pairs]

    def series(self, method: str, metric: str = "matching_score") -> list[float]:
        """``metric`` of ``method`` (or ``"random"``) per layer pair."""
        return [float(getattr(r.row(method), metric)) for r in self.pairs]

    def mean(self, method: str) -> float:
        """Mean Matching Score of ``method`` over layer pairs (pairs where it is undefined are skipped)."""
        return float(np.nanmean(self.series(method)))

    def fraction_better(self, method: str, than: str) -> float:
        """Fraction of layer pairs (with both defined) where ``method`` scores above ``than``."""
        a, b = np.asarray(self.series(method)), np.asarray(self.series(than))
        both = ~(np.isnan(a) | np.isnan(b))
        return float(np.mean(a[both] > b[both])) if both.any() else math.nan

    def dead_table(self, method: str) -> tuple[list[str], Sequence[tuple[object, ...]]]:
        """Headers and rows: per layer pair, the dead features of both layers and the pairs of
        ``method`` that were scored."""
        rows = [
            (
                f"{r.layer_a}→{r.layer_b}",
                r.row(method).n_dead_a,
                r.row(method).n_dead_b,
                r.row(method).n_pairs,
            )
            for r in self.pairs
        ]
        return ["pair", "dead in t", "dead in t+1", f"pairs scored ({method})"], rows


def run(inputs: Inputs, config: MatchingScoreConfig | None = None) -> MatchingScores:
    """:func:`~saematch_core.experiments.measures.scores.matching_scores` for every layer pair of
    ``inputs`` (default: consecutive layers with both SAEs and activations), each cached on its own
    (Figs. 4/7)."""
    cfg = MatchingScoreConfig() if config is None else config
    pairs = inputs.layer_pairs(data=True)
    out = [
        matching_scores(inputs, pair, cfg.methods, n_null=cfg.n_null)
        for pair in tqdm(pairs, desc="matching scores", disable=not inputs.progress)
    ]
    return MatchingScores(pairs=tuple(out))
