"""Splits, merges, births and deaths between consecutive layers, counted and checked on data.

Per layer pair, the links of :mod:`saematch_core.experiments.measures.links` (pairs of features
closer than the ``level`` quantile of the rotated-partner null) are classified: one-to-one, split,
merge, death, birth; with activations, co-activation validates every kind of link
(:func:`~saematch_core.experiments.measures.links.validate_links`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.coactivation import coactivation
from saematch_core.experiments.measures.links import LinkValidation, feature_links, validate_links
from saematch_core.experiments.results import JsonResult, finite_mean, map_layer_pairs
from saematch_core.match import MatchConfig

__all__ = ["SplitsConfig", "SplitsResult", "SplitsRow", "run"]


@dataclass(frozen=True, kw_only=True)
class SplitsConfig:
    """What :func:`run` measures."""

    match: MatchConfig = field(default_factory=MatchConfig)
    """The feature vectors compared (``params``, ``fold``, ``metric``; the solver is not used)."""
    level: float = 0.01
    """Chance that an unrelated feature gets a link (the null quantile that sets the threshold)."""
    n_null: int = 2
    """Random rotations of layer B in the null."""

    def __post_init__(self) -> None:
        if not isinstance(self.match, MatchConfig):
            raise TypeError(f"SplitsConfig.match: expected a MatchConfig, got {type(self.match).__name__}")
        if not isinstance(self.level, (int, float)) or not 0 < self.level < 1:
            raise ValueError(f"SplitsConfig.level: expected a number in (0, 1), got {self.level!r}")
        if not isinstance(self.n_null, int) or isinstance(self.n_null, bool) or self.n_null < 1:
            raise ValueError(f"SplitsConfig.n_null: expected an int >= 1, got {self.n_null!r}")


@dataclass(frozen=True, kw_only=True)
class SplitsRow:
    """Link structure of one layer pair and its data-based validation."""

    layer_a: int
    layer_b: int
    threshold: float
    n_a: int
    n_b: int
    n_links: int
    n_one_to_one: int
    """Features of A in a one-to-one link."""
    n_split: int
    """Features of A with ≥ 2 links."""
    n_merge: int
    """Features of B with ≥ 2 links."""
    n_death: int
    """Features of A without a link."""
    n_birth: int
    """Features of B without a link."""
    overlap_one_to_one: float
    """Mean overlap coefficient of one-to-one links (``nan`` without data)."""
    overlap_split: float
    """Mean overlap coefficient of links whose A end splits."""
    overlap_merge: float
    """Mean overlap coefficient of links whose B end merges."""
    overlap_random: float
    """Mean overlap coefficient of random pairs."""
    best_overlap_dead: float
    """Mean over dying A features of their best overlap with any B feature."""
    best_overlap_linked: float
    """Same for A features with at least one link."""
    best_overlap_born: float
    """Mean over born B features of their best overlap with any A feature."""
    n_active_a: int
    """A features active on the tokens (the data columns use only these)."""


@dataclass(frozen=True, kw_only=True)
class SplitsResult(JsonResult):
    """Rows per layer pair."""

    kind: ClassVar[str] = "feature_links"
    level: float
    rows: tuple[SplitsRow, ...]

    def series(self, metric: str) -> tuple[float, ...]:
        """``metric`` per row, in order."""
        return tuple(float(getattr(r, metric)) for r in self.rows)

    def mean(self, metric: str) -> float:
        """Mean of :meth:`series` where it is defined (``nan`` if nowhere)."""
        return finite_mean(self.series(metric))

    def fractions(self) -> dict[str, tuple[float, ...]]:
        """Per layer pair, the share of A's features that continue one-to-one, split or die, and of
        B's features that merge several or are born (keys ``one_to_one``, ``split``, ``death``,
        ``merge``, ``birth``)."""
        out: dict[str, tuple[float, ...]] = {}
        for key, width in (("one_to_one", "n_a"), ("split", "n_a"), ("death", "n_a")):
            out[key] = tuple(getattr(r, f"n_{key}") / max(getattr(r, width), 1) for r in self.rows)
        for key in ("merge", "birth"):
            out[key] = tuple(getattr(r, f"n_{key}") / max(r.n_b, 1) for r in self.rows)
        return out


def run(inputs: Inputs, config: SplitsConfig | None = None) -> SplitsResult:
    """Counts of one-to-one links, splits, merges, deaths and births per layer pair of ``inputs``
    (default consecutive layers), validated with co-activation where ``inputs`` has activations of
    both layers. Each pair is cached on its own."""
    cfg = SplitsConfig() if config is None else config
    seed = inputs.seed

    def compute(la: int, lb: int) -> SplitsResult:
        a, b = inputs.saes[la], inputs.saes[lb]
        links = feature_links(a, b, cfg.match, level=cfg.level, n_null=cfg.n_null, seed=seed)
        data = LinkValidation()
        if inputs.has_data(la, lb):
            stats = coactivation(
                a,
                b,
                inputs.acts(la),
                inputs.acts(lb),
                all_pairs=True,
                keep=inputs.keep,
                chunk_size=inputs.chunk_size,
            )
            data = validate_links(links, stats, seed=seed)
        row = SplitsRow(
            layer_a=la,
            layer_b=lb,
            threshold=links.threshold,
            n_a=a.d_sae,
            n_b=b.d_sae,
            n_links=int(links.links.shape[0]),
            n_one_to_one=int(links.one_to_one.sum()),
            n_split=int(links.splits.sum()),
            n_merge=int(links.merges.sum()),
            n_death=int(links.deaths.sum()),
            n_birth=int(links.births.sum()),
            overlap_one_to_one=data.overlap_one_to_one,
            overlap_split=data.overlap_split,
            overlap_merge=data.overlap_merge,
            overlap_random=data.overlap_random,
            best_overlap_dead=data.best_overlap_dead,
            best_overlap_linked=data.best_overlap_linked,
            best_overlap_born=data.best_overlap_born,
            n_active_a=data.n_active_a,
        )
        return SplitsResult(level=cfg.level, rows=(row,))

    parts = map_layer_pairs(
        SplitsResult,
        inputs,
        inputs.layer_pairs(),
        compute,
        spec={"config": cfg.match.to_dict(), "level": cfg.level, "n_null": cfg.n_null, "seed": seed},
        desc="feature links",
    )
    return SplitsResult(level=cfg.level, rows=tuple(r for part in parts for r in part.rows))
