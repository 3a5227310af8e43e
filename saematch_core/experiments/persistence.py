"""Feature persistence across layers (paper Fig. 8, hypothesis H3).

From a start layer ``s``, each feature is followed forward by composing the consecutive matchings
``P(s→s+1), P(s+1→s+2), …`` (:func:`saematch_core.compose.compose_chain`). At every distance ``d``
the composed matching ``s→s+d`` is compared with the direct matching of SAE ``s`` to SAE ``s+d``:

- ``agreement``: fraction of start features whose composed partner equals the direct partner
  (features without a partner in either are not compared; :func:`saematch_core.compose.agreement`);
- with activations, the data-based check: the Matching Score (mean ``P(reached feature active |
  start feature active)``, see :mod:`saematch_core.experiments.measures.coactivation`) of the
  composed matching, of the direct matching, and of random partners, over the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saematch_core.compose import agreement, compose_chain
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.coactivation import coactivation, pair_metrics, random_partners
from saematch_core.experiments.results import (
    JsonResult,
    acts_digest,
    cached_matches,
    finite_mean,
    load_or_compute,
    sae_digest,
)
from saematch_core.match import MatchConfig

__all__ = ["PersistenceConfig", "PersistenceResult", "PersistenceRow", "default_starts", "run"]


@dataclass(frozen=True, kw_only=True)
class PersistenceRow:
    """Composed vs direct matching from ``start`` to ``target``."""

    start: int
    target: int
    distance: int
    """``target − start`` (in layers)."""
    agreement: float
    """Fraction of compared start features with the same partner under both matchings."""
    n_compared: int
    """Start features with a partner in both."""
    n_lost: int
    """Start features whose composed path hit ``−1`` (no partner somewhere on the way)."""
    score_composed: float
    """Matching Score of the composed matching (``nan`` without activations)."""
    score_direct: float
    """Matching Score of the direct matching."""
    score_random: float
    """Matching Score of random partners (the null)."""


@dataclass(frozen=True, kw_only=True)
class PersistenceResult(JsonResult):
    """Rows per (start, target), starts ascending then distance ascending."""

    kind: ClassVar[str] = "persistence"
    rows: tuple[PersistenceRow, ...]

    def curve(self, start: int, metric: str = "agreement") -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(distances, values of ``metric``) for one start layer."""
        rows = [r for r in self.rows if r.start == start]
        return tuple(r.distance for r in rows), tuple(float(getattr(r, metric)) for r in rows)

    def curves(self, metric: str = "agreement") -> tuple[list[int], dict[int, list[float]]]:
        """Every start's curve on a shared distance axis, NaN where a start reaches fewer layers.

        Returns
        -------
        distances : 1..max distance; curves : start layer → values of ``metric`` per distance.
        """
        starts = sorted({r.start for r in self.rows})
        max_d = max((r.distance for r in self.rows), default=0)
        distances = list(range(1, max_d + 1))
        curves = {}
        for s in starts:
            ds, vs = self.curve(s, metric)
            by_d = dict(zip(ds, vs, strict=True))
            curves[s] = [float(by_d.get(d, math.nan)) for d in distances]
        return distances, curves


def default_starts(layers: Sequence[int]) -> tuple[int, ...]:
    """Start layers at about a third, half and three quarters of the available layers.

    >>> default_starts(range(26))
    (8, 13, 19)
    """
    ls = sorted(int(x) for x in layers)
    if len(ls) < 2:
        raise ValueError(f"layers: expected at least 2 layers, got {ls}")
    picks = [ls[min(len(ls) - 2, int(f * len(ls)))] for f in (1 / 3, 1 / 2, 3 / 4)]
    return tuple(dict.fromkeys(picks))


@dataclass(frozen=True, kw_only=True)
class PersistenceConfig:
    """What :func:`run` measures."""

    starts: tuple[int, ...] | None = None
    """Start layers; ``None``: :func:`default_starts` of the SAEs' layers."""
    max_distance: int = 5
    """Follow at most this many layers from each start."""
    match: MatchConfig = field(default_factory=MatchConfig)
    """Matching used for both the consecutive and the direct matchings (default: the paper's)."""

    def __post_init__(self) -> None:
        if self.starts is not None:
            if isinstance(self.starts, (str, bytes)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.starts
            ):
                raise TypeError(f"PersistenceConfig.starts: expected a tuple of ints, got {self.starts!r}")
            object.__setattr__(self, "starts", tuple(self.starts))
        d = self.max_distance
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"PersistenceConfig.max_distance: expected an int >= 1, got {d!r}")
        if not isinstance(self.match, MatchConfig):
            raise TypeError(
                f"PersistenceConfig.match: expected a MatchConfig, got {type(self.match).__name__}"
            )


def run(inputs: Inputs, config: PersistenceConfig | None = None) -> PersistenceResult:
    """Composed vs direct matching over distance from each start layer (Fig. 8).

    Parameters
    ----------
    inputs : ``saes`` (targets stop where a consecutive layer is missing), optional activations
        (same tokens) and ``keep`` for the data-based check, ``seed`` of the random null, the
        result cache.
    config : starts, distance, matching.
    """
    cfg = PersistenceConfig() if config is None else config
    saes, activations, keep, seed = inputs.saes, inputs.activations, inputs.keep, inputs.seed
    starts = default_starts(list(saes)) if cfg.starts is None else cfg.starts
    max_distance, chunk_size = cfg.max_distance, inputs.chunk_size
    plan: list[tuple[int, list[int]]] = []
    for s in starts:
        if s not in saes:
            raise ValueError(f"starts: no SAE for start layer {s}; have {sorted(saes)}")
        targets = []
        for t in range(s + 1, s + max_distance + 1):
            if t not in saes:
                break
            targets.append(t)
        plan.append((s, targets))
    used = sorted({s for s, ts in plan} | {t for _, ts in plan for t in ts})
    spec: dict[str, Any] = {
        "saes": {str(layer): sae_digest(saes[layer]) for layer in used},
        "starts": list(starts),
        "max_distance": max_distance,
        "config": cfg.match.to_dict(),
        "activations": None
        if activations is None
        else {str(layer): acts_digest(activations[layer]) for layer in used if layer in activations},
        "keep": None if keep is None else acts_digest(keep),
        "seed": seed,
    }

    def compute() -> PersistenceResult:
        # Every exact solve up front, in parallel: consecutive steps and the longer direct matchings.
        steps = sorted({t for _, ts in plan for t in ts})
        longer = [(s, t) for s, ts in plan for t in ts if t > s + 1]
        solved = cached_matches(
            [(saes[t - 1], saes[t], cfg.match) for t in steps]
            + [(saes[s], saes[t], cfg.match) for s, t in longer],
            inputs.cache_dir,
        )
        step: dict[int, Tensor] = {t - 1: r.perm for t, r in zip(steps, solved[: len(steps)], strict=True)}
        direct_perm = {pair: r.perm for pair, r in zip(longer, solved[len(steps) :], strict=True)}
        rows = []
        g = torch.Generator().manual_seed(seed)
        total = sum(len(ts) for _, ts in plan)
        bar = tqdm(total=total, desc="persistence", disable=not inputs.progress)
        for s, targets in plan:
            for t in targets:
                composed = compose_chain([step[i] for i in range(s, t)])
                direct = composed if t == s + 1 else direct_perm[(s, t)]
                both = (composed >= 0) & (direct >= 0)
                scores = (math.nan, math.nan, math.nan)
                if activations is not None and s in activations and t in activations:
                    null = random_partners(saes[s].d_sae, saes[t].d_sae, g)
                    perms = {"composed": composed, "direct": direct, "random": null}
                    stats = coactivation(
                        saes[s],
                        saes[t],
                        activations[s],
                        activations[t],
                        perms,
                        keep=keep,
                        chunk_size=chunk_size,
                    )
                    s_c, s_d, s_r = (finite_mean(pair_metrics(stats, k)["p_partner"]) for k in perms)
                    scores = (s_c, s_d, s_r)
                rows.append(
                    PersistenceRow(
                        start=s,
                        target=t,
                        distance=t - s,
                        agreement=agreement(composed, direct),
                        n_compared=int(both.sum()),
                        n_lost=int((composed < 0).sum()),
                        score_composed=scores[0],
                        score_direct=scores[1],
                        score_random=scores[2],
                    )
                )
                bar.update()
        bar.close()
        return PersistenceResult(rows=tuple(rows))

    return load_or_compute(PersistenceResult, spec, compute, cache_dir=inputs.cache_dir, force=inputs.force)
