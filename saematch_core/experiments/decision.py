"""Which matched pairs are real? The calibrated verdict on every layer pair, checked on data.

For each layer pair the matching gets the data-free verdict of
:mod:`saematch_core.experiments.measures.verdict` (rotated-partner null, Benjamini–Hochberg at FDR
``alpha``); with activations, co-activation on real tokens checks it: the mean
``P(partner active | feature active)`` of confident pairs, of the other matched pairs and of random
partners, and the share of each whose co-activation beats 95 % of random pairs'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from saematch_core.experiments.inputs import ArrayLike, Inputs
from saematch_core.experiments.measures.coactivation import coactivation, pair_metrics, random_partners
from saematch_core.experiments.measures.verdict import MatchDecision, decide
from saematch_core.experiments.results import JsonResult, finite_mean, map_layer_pairs
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

__all__ = ["DecisionConfig", "DecisionResult", "DecisionRow", "run"]


@dataclass(frozen=True, kw_only=True)
class DecisionConfig:
    """What :func:`run` measures."""

    match: MatchConfig = field(default_factory=MatchConfig)
    """The matching judged, and the feature vectors the verdict is computed on (default: the paper's)."""
    alpha: float = 0.05
    """False-discovery rate of the "matched" verdict, in (0, 1)."""
    n_null: int = 2
    """Random rotations of layer B in the null (each gives one null sample per feature of A)."""

    def __post_init__(self) -> None:
        if not isinstance(self.match, MatchConfig):
            raise TypeError(f"DecisionConfig.match: expected a MatchConfig, got {type(self.match).__name__}")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ValueError(f"DecisionConfig.alpha: expected a number in (0, 1), got {self.alpha!r}")
        if not isinstance(self.n_null, int) or isinstance(self.n_null, bool) or self.n_null < 1:
            raise ValueError(f"DecisionConfig.n_null: expected an int >= 1, got {self.n_null!r}")


@dataclass(frozen=True, kw_only=True)
class DecisionRow:
    """Verdicts on one layer pair, with the data-based check when activations were given."""

    layer_a: int
    layer_b: int
    n_tested: int
    """Features of A with a partner."""
    n_matched: int
    """Confident partners at the FDR level."""
    fraction_matched: float
    threshold: float
    """Largest relative cost declared matched."""
    null_median: float
    """Median best-chance relative cost."""
    median_margin: float
    """Median best-vs-second-best margin over tested pairs."""
    score_matched: float
    """Mean ``P(partner active | feature active)`` of confident pairs (``nan`` without data)."""
    score_unmatched: float
    """Same for pairs not declared matched."""
    score_random: float
    """Same for random partners (the data-based null)."""
    confirmed_matched: float
    """Fraction of confident pairs whose co-activation beats the 95th percentile of random pairs'."""
    confirmed_unmatched: float
    """Same for pairs not declared matched."""
    n_scored_matched: int
    """Confident pairs with both members alive on the data (those in the scores)."""
    n_scored_unmatched: int


@dataclass(frozen=True, kw_only=True)
class DecisionResult(JsonResult):
    """Rows per layer pair."""

    kind: ClassVar[str] = "match_decision"
    alpha: float
    rows: tuple[DecisionRow, ...]

    def series(self, metric: str = "fraction_matched") -> tuple[float, ...]:
        """``metric`` per layer pair, pairs in order."""
        return tuple(float(getattr(r, metric)) for r in self.rows)

    def mean(self, metric: str = "fraction_matched") -> float:
        """Mean of :meth:`series` over pairs where it is defined (``nan`` if nowhere)."""
        return finite_mean(self.series(metric))


def _data_check(
    dec: MatchDecision,
    sae_a: SAE,
    sae_b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    keep: ArrayLike | None,
    seed: int,
    chunk_size: int,
) -> dict[str, float | int]:
    minus = torch.full_like(dec.perm, -1)
    perms = {
        "matched": torch.where(dec.matched, dec.perm, minus),
        "unmatched": torch.where(~dec.matched, dec.perm, minus),
        "random": random_partners(sae_a.d_sae, sae_b.d_sae, torch.Generator().manual_seed(seed)),
    }
    stats = coactivation(sae_a, sae_b, acts_a, acts_b, perms, keep=keep, chunk_size=chunk_size)
    p = {k: pair_metrics(stats, k)["p_partner"] for k in perms}
    rnd = p["random"][~torch.isnan(p["random"])]
    cut = float(torch.quantile(rnd, 0.95)) if rnd.numel() else math.nan
    out: dict[str, float | int] = {}
    for k, v in p.items():
        ok = v[~torch.isnan(v)]
        out[f"score_{k}"] = finite_mean(ok)
        if k != "random":
            out[f"confirmed_{k}"] = float((ok > cut).double().mean()) if ok.numel() else math.nan
            out[f"n_scored_{k}"] = int(ok.numel())
    return out


def run(inputs: Inputs, config: DecisionConfig | None = None) -> DecisionResult:
    """:func:`~saematch_core.experiments.measures.verdict.decide` on every layer pair of ``inputs``
    (default consecutive layers), with the co-activation check where ``inputs`` has activations of
    both layers (else the data columns are ``nan``). Each pair is cached on its own."""
    cfg = DecisionConfig() if config is None else config
    seed = inputs.seed
    nan_data: dict[str, float | int] = {
        "score_matched": math.nan,
        "score_unmatched": math.nan,
        "score_random": math.nan,
        "confirmed_matched": math.nan,
        "confirmed_unmatched": math.nan,
        "n_scored_matched": 0,
        "n_scored_unmatched": 0,
    }

    def compute(la: int, lb: int) -> DecisionResult:
        a, b = inputs.saes[la], inputs.saes[lb]
        dec = decide(
            a, b, cfg.match, alpha=cfg.alpha, n_null=cfg.n_null, seed=seed, cache_dir=inputs.cache_dir
        )
        data = dict(nan_data)
        if inputs.has_data(la, lb):
            data = _data_check(
                dec, a, b, inputs.acts(la), inputs.acts(lb), inputs.keep, seed, inputs.chunk_size
            )
        tested = dec.perm >= 0
        margins = dec.margin[tested & ~torch.isnan(dec.margin)]
        row = DecisionRow(
            layer_a=la,
            layer_b=lb,
            n_tested=dec.n_tested,
            n_matched=dec.n_matched,
            fraction_matched=dec.fraction_matched,
            threshold=dec.threshold,
            null_median=float(dec.null.median()),
            median_margin=float(margins.median()) if margins.numel() else math.nan,
            score_matched=float(data["score_matched"]),
            score_unmatched=float(data["score_unmatched"]),
            score_random=float(data["score_random"]),
            confirmed_matched=float(data["confirmed_matched"]),
            confirmed_unmatched=float(data["confirmed_unmatched"]),
            n_scored_matched=int(data["n_scored_matched"]),
            n_scored_unmatched=int(data["n_scored_unmatched"]),
        )
        return DecisionResult(alpha=cfg.alpha, rows=(row,))

    parts = map_layer_pairs(
        DecisionResult,
        inputs,
        inputs.layer_pairs(),
        compute,
        spec={"config": cfg.match.to_dict(), "alpha": cfg.alpha, "n_null": cfg.n_null, "seed": seed},
        desc="match decisions",
    )
    return DecisionResult(alpha=cfg.alpha, rows=tuple(r for part in parts for r in part.rows))
