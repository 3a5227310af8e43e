"""How high can a cross-layer Matching Score be? The seed ceiling.

Two SAEs trained on the *same* layer, from the same data with the same recipe, differ only in their
initialisation; matching one with the other gives the Matching Score of a perfect correspondence as
far as the features are reproducible at all. A cross-layer score near this ceiling means matching
finds everything there is to find, whatever its absolute value; a score far below it means features
change between layers (or the matching misses them). The substrate trains such a second SAE for
``Profile.seed_layers`` (family ``seed``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from tqdm.auto import tqdm

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scores import MatchingScoreResult, default_methods, matching_scores
from saematch_core.experiments.measures.swap import explained_variance, matched_reconstructor
from saematch_core.experiments.results import (
    JsonResult,
    acts_digest,
    finite_mean,
    load_or_compute,
    sae_digest,
)
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

__all__ = ["SeedCeilingConfig", "SeedCeilingResult", "SeedCeilingRow", "explained_variance", "run"]


@dataclass(frozen=True, kw_only=True)
class SeedCeilingRow:
    """Matching Scores around one layer ``t`` for one matching method."""

    layer: int
    method: str
    same_layer: float
    """Main SAE of layer t matched with the other-seed SAE of layer t: the ceiling."""
    previous: float
    """Main SAEs t−1 → t (``nan`` without layer t−1)."""
    next: float
    """Main SAEs t → t+1 (``nan`` without layer t+1)."""
    random: float
    """Random partners between the two SAEs of layer t (chance level)."""
    ev_self: float
    """Explained variance of h_t by the main SAE t's own reconstruction (the best any swap can do)."""
    ev_same_layer: float
    """Explained variance of h_t by ``decode_seed(P(encode_main(h_t)))``: the same-layer swap."""
    ev_previous: float
    """Explained variance of h_t by ``decode_t(P(encode_{t−1}(h_{t−1})))``: SAE Match's replacement
    (Figs. 10/11) without the model (``nan`` without layer t−1)."""


@dataclass(frozen=True, kw_only=True)
class SeedCeilingResult(JsonResult):
    """:class:`SeedCeilingRow` per layer with a second-seed SAE and per method."""

    kind: ClassVar[str] = "seed_ceiling"
    rows: tuple[SeedCeilingRow, ...]

    def series(self, method: str, metric: str) -> list[float]:
        """``metric`` (a :class:`SeedCeilingRow` field) of ``method`` in layer order."""
        return [float(getattr(r, metric)) for r in self.rows if r.method == method]

    def layers(self) -> list[int]:
        """Layers with a second-seed SAE, in order."""
        return sorted({r.layer for r in self.rows})

    def fraction_of_ceiling(self, method: str) -> float:
        """Mean over layers of the cross-layer score (mean of previous and next where defined)
        divided by the same-layer ceiling; ``nan`` when nothing is defined."""
        ratios = []
        for r in self.rows:
            if r.method != method or not r.same_layer > 0:
                continue
            cross = finite_mean([r.previous, r.next])
            if not math.isnan(cross):
                ratios.append(cross / r.same_layer)
        return finite_mean(ratios)


def _ceiling_methods() -> dict[str, MatchConfig]:
    base = default_methods()
    return {k: base[k] for k in ("folded", "unfolded")}


@dataclass(frozen=True, kw_only=True)
class SeedCeilingConfig:
    """What :func:`run` measures."""

    methods: Mapping[str, MatchConfig] = field(default_factory=_ceiling_methods)
    """Name → matching (default ``folded`` and ``unfolded`` of
    :func:`~saematch_core.experiments.measures.scores.default_methods`)."""
    family: str = "seed"
    """The family of ``inputs.families`` that holds the second-seed SAEs (layer → SAE)."""
    n_null: int = 5
    """Random matchings of the Matching Score's null."""

    def __post_init__(self) -> None:
        if not isinstance(self.methods, Mapping) or not all(
            isinstance(v, MatchConfig) for v in self.methods.values()
        ):
            raise TypeError("SeedCeilingConfig.methods: expected a mapping name → MatchConfig")
        object.__setattr__(self, "methods", dict(self.methods))
        if not isinstance(self.n_null, int) or isinstance(self.n_null, bool) or self.n_null < 0:
            raise ValueError(f"SeedCeilingConfig.n_null: expected an int >= 0, got {self.n_null!r}")


def run(inputs: Inputs, config: SeedCeilingConfig | None = None) -> SeedCeilingResult:
    """Matching Scores of same-layer (other seed) and neighbouring-layer matchings.

    Parameters
    ----------
    inputs : ``saes`` (layer → main SAE), ``families[config.family]`` (layer → SAE of the same layer
        trained from another seed), ``activations`` (the same tokens for every layer) and ``keep``,
        ``seed``, the result cache. The whole result is cached, and so is each Matching Score on
        its own, so the neighbouring-layer scores are shared with section 2 when its methods and
        null agree.
    config : the matchings and the null.

    Examples
    --------
    See ``tests/test_ceiling.py``: an SAE and a copy with permuted features reach the ceiling 1.
    """
    cfg = SeedCeilingConfig() if config is None else config
    if cfg.family not in inputs.families:
        have = sorted(inputs.families)
        raise ValueError(f"SeedCeilingConfig.family: no family {cfg.family!r} in inputs.families {have}")
    saes, seed_saes, activations = inputs.saes, inputs.families[cfg.family], inputs.activations or {}
    methods, n_null, keep = cfg.methods, cfg.n_null, inputs.keep
    layers = sorted(set(seed_saes) & set(saes) & set(activations))

    def score(la: int, lb: int, a: SAE, b: SAE) -> MatchingScoreResult:
        return matching_scores(inputs, (la, lb), methods, saes=(a, b), n_null=n_null)

    def ev_self(sae: SAE, layer: int) -> float:
        acts = activations[layer]
        return explained_variance(lambda h: sae(h).recon, acts, acts, keep=keep)

    def ev_swap(a: SAE, b: SAE, cfg: MatchConfig, source: int, target: int) -> float:
        return explained_variance(
            matched_reconstructor(a, b, cfg, cache_dir=inputs.cache_dir),
            activations[source],
            activations[target],
            keep=keep,
        )

    around = sorted({u for t in layers for u in (t - 1, t, t + 1) if u in saes and u in activations})
    spec = {
        "saes": {str(u): sae_digest(saes[u]) for u in around},
        "seed_saes": {str(t): sae_digest(seed_saes[t]) for t in layers},
        "acts": {str(u): acts_digest(activations[u]) for u in around},
        "keep": None if keep is None else acts_digest(keep),
        "methods": {k: v.to_dict() for k, v in methods.items()},
        "n_null": n_null,
        "seed": inputs.seed,
    }

    def compute() -> SeedCeilingResult:
        rows = []
        for t in tqdm(layers, desc="seed ceiling", disable=not inputs.progress):
            same = score(t, t, saes[t], seed_saes[t])
            prev = score(t - 1, t, saes[t - 1], saes[t]) if t - 1 in saes and t - 1 in activations else None
            nxt = score(t, t + 1, saes[t], saes[t + 1]) if t + 1 in saes and t + 1 in activations else None
            own = ev_self(saes[t], t)
            for name, cfg in methods.items():
                rows.append(
                    SeedCeilingRow(
                        layer=t,
                        method=name,
                        same_layer=same.row(name).matching_score,
                        previous=math.nan if prev is None else prev.row(name).matching_score,
                        next=math.nan if nxt is None else nxt.row(name).matching_score,
                        random=same.row("random").matching_score if n_null else math.nan,
                        ev_self=own,
                        ev_same_layer=ev_swap(saes[t], seed_saes[t], cfg, t, t),
                        ev_previous=math.nan
                        if prev is None
                        else ev_swap(saes[t - 1], saes[t], cfg, t - 1, t),
                    )
                )
        return SeedCeilingResult(rows=tuple(rows))

    return load_or_compute(SeedCeilingResult, spec, compute, cache_dir=inputs.cache_dir, force=inputs.force)
