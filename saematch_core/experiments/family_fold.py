"""A folding analogue for TopK and ReLU SAEs, and the comparison across SAE families.

Folding divides every JumpReLU feature by its threshold θ, a per-feature activation scale. TopK
and ReLU SAEs have no θ, but every feature still has a scale, measured on data or estimated from
the weights (:mod:`saematch_core.experiments.measures.scales`). ``match(a, b, scales=(s_a, s_b))`` matches
the rescaled weights (as matching vectors only: rescaling changes which ``k`` features a TopK SAE
selects).

:func:`run` asks the reviewers' question: on SAEs of the same layers trained with each activation,
does matching the scaled vectors beat matching the raw ones by a similar margin in every family
(then the scale correction drives the gain), or only for JumpReLU?
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scales import (
    activation_scale,
    fill_dead_scale,
    weight_scale,
)
from saematch_core.experiments.measures.scores import matching_scores
from saematch_core.experiments.results import (
    JsonResult,
    acts_digest,
    cached_match,
    finite_mean,
    map_layer_pairs,
    parallel_map,
)
from saematch_core.match import MatchConfig, match
from saematch_core.sae import SAE

__all__ = ["FamilyFoldConfig", "FamilyFoldResult", "FamilyRow", "run"]


@dataclass(frozen=True, kw_only=True)
class FamilyRow:
    """One matching method for one SAE family on one layer pair, scored on data."""

    family: str
    """``jumprelu``, ``topk``, ``relu`` (or any name the caller used)."""
    layer_a: int
    layer_b: int
    method: str
    """``raw`` (unscaled weights), ``data_scale``, ``weight_scale``, ``theta`` (JumpReLU folding)."""
    matching_score: float
    """Mean ``P(partner active | feature active)`` over included pairs (the Matching Score)."""
    random_score: float
    """The same for random partners."""
    pearson: float
    n_pairs: int
    agreement_with_raw: float
    """Fraction of features whose partner is the same as under ``raw`` matching."""


@dataclass(frozen=True, kw_only=True)
class FamilyFoldResult(JsonResult):
    """Rows per (family, layer pair, method)."""

    kind: ClassVar[str] = "family_fold"
    rows: tuple[FamilyRow, ...]

    def series(self, family: str, method: str, metric: str = "matching_score") -> tuple[float, ...]:
        return tuple(
            float(getattr(r, metric)) for r in self.rows if r.family == family and r.method == method
        )

    def mean(self, family: str, method: str, metric: str = "matching_score") -> float:
        """Mean of :meth:`series` over layer pairs where it is defined (``nan`` if nowhere)."""
        return finite_mean(self.series(family, method, metric))

    def gain(self, family: str, method: str, baseline: str = "raw") -> tuple[float, ...]:
        """Matching Score of ``method`` minus ``baseline`` per layer pair, for one family."""
        return tuple(
            x - y for x, y in zip(self.series(family, method), self.series(family, baseline), strict=True)
        )

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows: per family and method, the mean Matching Score, the random one and the
        agreement with raw matching (families in row order; methods ``raw``, ``data_scale``,
        ``weight_scale``, ``theta`` where present)."""
        rows = [
            [
                fam,
                method,
                f"{self.mean(fam, method):.3f}",
                f"{self.mean(fam, method, 'random_score'):.3f}",
                f"{self.mean(fam, method, 'agreement_with_raw'):.2f}",
            ]
            for fam in dict.fromkeys(r.family for r in self.rows)
            for method in ("raw", "data_scale", "weight_scale", "theta")
            if self.series(fam, method)
        ]
        return ["family", "method", "mean Matching Score", "mean random", "agreement with raw"], rows


def _family_perms(
    a: SAE,
    b: SAE,
    scale_a: Tensor | None,
    scale_b: Tensor | None,
    cfg: MatchConfig,
    cache_dir: Path | None,
) -> dict[str, Tensor]:
    ones_a, ones_b = torch.ones(a.d_sae, dtype=torch.float64), torch.ones(b.d_sae, dtype=torch.float64)
    scales = {"raw": (ones_a, ones_b)}
    if scale_a is not None and scale_b is not None:
        scales["data_scale"] = (scale_a, scale_b)
    if float(a.b_dec.abs().sum()) > 0 and float(b.b_dec.abs().sum()) > 0:
        scales["weight_scale"] = (weight_scale(a), weight_scale(b))
    # Independent exact solves: in parallel (see experiments.results.parallel_map).
    unfolded = replace(cfg, fold=False)
    solved = parallel_map(lambda sc: match(a, b, unfolded, scales=sc).perm, list(scales.values()))
    perms = dict(zip(scales, solved, strict=True))
    if a.activation == "jumprelu" and b.activation == "jumprelu":
        perms["theta"] = cached_match(a, b, replace(cfg, fold=True), cache_dir).perm
    return perms


@dataclass(frozen=True, kw_only=True)
class FamilyFoldConfig:
    """What :func:`run` measures."""

    match: MatchConfig = field(default_factory=MatchConfig)
    """Matching objective (params, metric, solver) shared by every method; default the paper's."""
    families: tuple[str, ...] | None = None
    """Names in ``inputs.families`` to compare, in order; ``None``: all of them."""
    n_null: int = 3
    """Random matchings for the random row of the Matching Score."""

    def __post_init__(self) -> None:
        if not isinstance(self.match, MatchConfig):
            got = type(self.match).__name__
            raise TypeError(f"FamilyFoldConfig.match: expected a MatchConfig, got {got}")
        if self.families is not None:
            if isinstance(self.families, str) or not all(isinstance(f, str) for f in self.families):
                got = self.families
                raise TypeError(f"FamilyFoldConfig.families: expected a tuple of names, got {got!r}")
            object.__setattr__(self, "families", tuple(self.families))
        if not isinstance(self.n_null, int) or isinstance(self.n_null, bool) or self.n_null < 0:
            raise ValueError(f"FamilyFoldConfig.n_null: expected an int >= 0, got {self.n_null!r}")


def run(
    inputs: Inputs, config: FamilyFoldConfig | None = None, *, fit: Inputs | None = None
) -> FamilyFoldResult:
    """Raw vs scale-corrected matching for every SAE family on the same layers, scored on data.

    Parameters
    ----------
    inputs : ``families`` (name → layer → SAE, e.g. ``jumprelu``, ``topk``, ``relu``), the
        activations and ``keep`` the Matching Score is measured on, and ``pairs`` (default:
        consecutive layers present in every family and in the activations).
    config : the objective, the families compared and the null.
    fit : inputs whose activations and ``keep`` estimate the ``data`` scale (default ``inputs``;
        use other tokens to keep estimation and evaluation apart).

    Every (family, pair) is cached; the Matching Scores themselves are cached by
    :func:`~saematch_core.experiments.measures.scores.matching_scores`.
    """
    cfg = FamilyFoldConfig() if config is None else config
    names = tuple(inputs.families) if cfg.families is None else cfg.families
    missing = [f for f in names if f not in inputs.families]
    if missing:
        have = sorted(inputs.families)
        raise ValueError(f"FamilyFoldConfig.families: {missing} not in inputs.families {have}")
    families = {f: inputs.families[f] for f in names}
    activations = inputs.activations or {}
    fit_inputs = inputs if fit is None else fit
    fit_acts, fit_keep = fit_inputs.activations or {}, fit_inputs.keep
    n_null, seed, chunk_size = cfg.n_null, inputs.seed, inputs.chunk_size
    if inputs.pairs is None:
        common = set(activations)
        for layer_map in families.values():
            common &= set(layer_map)
        pairs = list(itertools.pairwise(sorted(common)))
    else:
        pairs = list(inputs.pairs)

    def extra_spec(fam: str, la: int, lb: int) -> dict[str, Any]:
        return {
            "family": fam,
            "config": cfg.match.to_dict(),
            "fit": [acts_digest(fit_acts[la]), acts_digest(fit_acts[lb])]
            if la in fit_acts and lb in fit_acts
            else None,
            "fit_keep": None if fit_keep is None else acts_digest(fit_keep),
            "n_null": n_null,
            "seed": seed,
        }

    def compute(fam: str, la: int, lb: int) -> FamilyFoldResult:
        a, b = families[fam][la], families[fam][lb]
        sa = sb = None
        if la in fit_acts and lb in fit_acts:
            sa = fill_dead_scale(activation_scale(a, fit_acts[la], keep=fit_keep, chunk_size=chunk_size))
            sb = fill_dead_scale(activation_scale(b, fit_acts[lb], keep=fit_keep, chunk_size=chunk_size))
        perms = _family_perms(a, b, sa, sb, cfg.match, inputs.cache_dir)
        scores = matching_scores(inputs, (la, lb), dict(perms), saes=(a, b), n_null=n_null)
        rnd = scores.row("random").matching_score if n_null else math.nan
        raw = perms["raw"]
        out = []
        for name, perm in perms.items():
            r = scores.row(name)
            out.append(
                FamilyRow(
                    family=fam,
                    layer_a=la,
                    layer_b=lb,
                    method=name,
                    matching_score=r.matching_score,
                    random_score=rnd,
                    pearson=r.pearson,
                    n_pairs=r.n_pairs,
                    agreement_with_raw=float((perm == raw).double().mean()),
                )
            )
        return FamilyFoldResult(rows=tuple(out))

    rows: list[FamilyRow] = []
    for fam, saes in families.items():
        parts = map_layer_pairs(
            FamilyFoldResult,
            inputs,
            pairs,
            functools.partial(compute, fam),
            spec=functools.partial(extra_spec, fam),
            saes=saes,
            desc=f"family folding ({fam})",
        )
        rows.extend(r for part in parts for r in part.rows)
    return FamilyFoldResult(rows=tuple(rows))
