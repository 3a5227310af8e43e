"""The claims the book tests, each with the measurement it reads and its verdict rule, as code.

Every claim is a :class:`Claim`: its ``key``, the ``figure`` it comes from, its ``text``, the
notebook ``section`` that measures it, what it reads (``measurement``, in words, and a typed
measurement), and its verdict rule: in words (``rule``, thresholds included, and ``why`` these
thresholds) and as code (``checks``: the numbers the rule compares, each against its threshold).
Two registries:

- :data:`PAPER_CLAIMS`: what the paper's text claims, figure by figure (the paper prints no number
  for any curve, so every rule compares shapes and directions, and where the text is vague —
  "small", "about five" — the rule says what we chose and why);
- :data:`OUR_CLAIMS`: comparisons of our own that the paper does not make ("Beyond the paper").

A notebook computes a claim's measurement through the library (the ``measure_*`` functions below
turn experiment results into measurements), calls :meth:`Claim.evaluate` and records the
:class:`Finding` with :func:`write_claims`; the last notebook collects every section's findings
with :func:`read_claims` and shows :func:`claims_table_html`. No verdict and no threshold lives in a
notebook, and every rule is tested on synthetic measurements.

Depth conventions (:mod:`~saematch_core.experiments.measures.summary`): the paper's layer ``L`` of
Gemma 2 2B's 26 is our layer at the same relative depth, and its "early layers" (0–9, before
"layer 10") are the first 10/26 ≈ 38 % of the depth.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from saematch_core.cache import atomic_write_text
from saematch_core.experiments.agreement import MSEBinnedAgreement
from saematch_core.experiments.approximate import ApproximationResult, L0SweepResult
from saematch_core.experiments.ceiling import SeedCeilingResult
from saematch_core.experiments.matching_score import MatchingScores
from saematch_core.experiments.measures.scores import MatchingScoreResult
from saematch_core.experiments.measures.summary import (
    EARLY_FRACTION,
    correlation,
    early_late_split,
    rank_correlation,
)
from saematch_core.experiments.parameter_mse import ParameterMSEResult
from saematch_core.experiments.persistence import PersistenceResult
from saematch_core.experiments.scale import ScaleDepthResult

__all__ = [
    "CLAIMS",
    "CLAIMS_FILE",
    "CODE_CORPUS",
    "EPD",
    "L0_NOT_MEASURED",
    "OUR_CLAIMS",
    "PAPER_CLAIMS",
    "WEB_TEXT_STAND_IN",
    "AboveChance",
    "AgreementByMSE",
    "Check",
    "Claim",
    "CodeLast",
    "Comparison",
    "CorpusLoss",
    "DepthTrend",
    "EVGap",
    "EarlyLate",
    "Finding",
    "L0Neighbours",
    "L0Sweep",
    "MSEAgreement",
    "NormFollow",
    "PanelWins",
    "Persistence",
    "QuantileShape",
    "ScoreGain",
    "ScoreVs",
    "ScoresByParams",
    "SeedCeiling",
    "SmallLoss",
    "ThetaNorm",
    "claims_table_html",
    "finding_markdown",
    "measure_above_chance",
    "measure_agreement",
    "measure_code_last",
    "measure_corpus_loss",
    "measure_depth_trend",
    "measure_early_late",
    "measure_ev_gap",
    "measure_folding_gain",
    "measure_l0_neighbours",
    "measure_l0_sweep",
    "measure_match_vs",
    "measure_norm_follow",
    "measure_persistence",
    "measure_quantile_shape",
    "measure_score_vs",
    "measure_scores_by_params",
    "measure_seed_ceiling",
    "measure_small_loss",
    "measure_theta_norm",
    "measure_unfolded_higher",
    "read_claims",
    "write_claims",
]

CLAIMS_FILE = "claims.json"
"""File name, inside a notebook's ``out_dir``, of the findings it recorded (see :func:`write_claims`)."""

EPD = "match_folded"
"""The approximation scheme the paper calls encode-permute-decode (folded SAE Match)."""
WEB_TEXT_STAND_IN = "austen"
"""Our corpus standing in for the paper's web text (OpenWebText) in Fig. 10: of our three corpora it
is the only plain natural-language prose; ``reference`` (Python's documentation topics, expository
text with code fragments) stands in for WikiText, ``code`` for GitHub code."""
CODE_CORPUS = "code"
"""Our corpus standing in for the paper's GitHub code."""

_M = TypeVar("_M")
_Op = Literal["<", "≤", ">", "≥"]
_NAN = math.nan


# ============================================================================================ checks
@dataclass(frozen=True)
class Check:
    """One comparison a rule makes: a measured number against its threshold."""

    what: str
    """What the number is, e.g. ``"ρ(layer, encoder MSE)"``."""
    value: float
    """Our number (``nan``: not measurable here)."""
    op: _Op
    """How it must compare with :attr:`threshold`."""
    threshold: float

    @property
    def passed(self) -> bool | None:
        """Whether the comparison holds (``None`` when :attr:`value` is undefined)."""
        v, t = self.value, self.threshold
        if math.isnan(v):
            return None
        return bool({"<": v < t, "≤": v <= t, ">": v > t, "≥": v >= t}[self.op])

    def text(self) -> str:
        return f"{self.what} = {self.value:.3g} (needs {self.op} {self.threshold:g})"


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One row of the reproduction table: a claim as measured by one notebook."""

    key: str
    """Key into :data:`CLAIMS`."""
    ours: str
    """Our measurement, formatted for the table."""
    holds: bool | None
    """Whether our measurement supports the claim (``None``: not measurable on this profile)."""
    reason: str = ""
    """For "not reproduced" and "not measurable": the checks that failed or were undefined, with
    our numbers; empty when reproduced."""
    section: str = ""
    """Notebook stem that measured it (filled in by :func:`write_claims`)."""

    def __post_init__(self) -> None:
        if self.key not in CLAIMS:
            raise ValueError(f"Finding.key: expected one of {sorted(CLAIMS)}, got {self.key!r}")

    @property
    def claim(self) -> Claim[Any]:
        """The claim this finding measures."""
        return CLAIMS[self.key]

    @property
    def paper(self) -> str:
        """The claim's statement."""
        return CLAIMS[self.key].text


@dataclass(frozen=True, kw_only=True)
class Claim(Generic[_M]):
    """A tested claim: its statement, where it is measured, and its verdict rule."""

    key: str
    """Stable identifier (the ``key`` of the findings in ``claims.json``)."""
    figure: str
    """The paper's figure(s) the claim comes from, e.g. ``"Fig. 7"``."""
    text: str
    """The claim as the paper states it (for :data:`OUR_CLAIMS`: our question)."""
    section: str
    """The notebook stem that measures it (e.g. ``"02_folding_vs_cosine"``)."""
    measurement: str
    """What the verdict reads, in words."""
    rule: str
    """The verdict rule with its thresholds, in words."""
    why: str
    """One line: why these thresholds (where the paper gives none)."""
    checks: Callable[[_M], Sequence[Check]]
    """The rule as code: the claim is reproduced when every check passes, not reproduced when one
    fails, and not measurable when none fails but one is undefined."""
    describe: Callable[[_M], str]
    """Our measurement as the table shows it."""

    def verdict(self, measured: _M) -> bool | None:
        """True (reproduced), False (not), ``None`` (not measurable here)."""
        results = [c.passed for c in self.checks(measured)]
        if False in results:
            return False
        return None if None in results else True

    def reason(self, measured: _M) -> str:
        """The failed checks (or, when none failed, the undefined ones) with our numbers; empty when
        the claim is reproduced."""
        checks = list(self.checks(measured))
        failed = [c.text() for c in checks if c.passed is False]
        if failed:
            return "; ".join(failed)
        undefined = [c.what for c in checks if c.passed is None]
        return "undefined here: " + ", ".join(undefined) if undefined else ""

    def evaluate(self, measured: _M) -> Finding:
        """The :class:`Finding` of ``measured`` (verdict, formatted measurement and reason)."""
        return Finding(
            key=self.key,
            ours=self.describe(measured),
            holds=self.verdict(measured),
            reason=self.reason(measured),
        )


def _ratio(a: float, b: float) -> float:
    """``a / b``, ``nan`` when either is undefined or ``b`` is 0."""
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else _NAN


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else _NAN


# ============================================================================================ Fig. 1
@dataclass(frozen=True)
class ThetaNorm:
    """Fig. 1 (left): how mean θ and the mean hidden-state norm grow with depth."""

    rho_theta_norm: float
    """Spearman correlation across layers of mean θ and mean ‖h‖."""
    rho_theta_depth: float
    """Spearman correlation of mean θ with the layer index."""
    rho_norm_depth: float
    """Spearman correlation of mean ‖h‖ with the layer index."""
    n_layers: int


def measure_theta_norm(scale: ScaleDepthResult) -> ThetaNorm:
    """:class:`ThetaNorm` of a Fig. 1 result."""
    layers = [float(r.layer) for r in scale.rows]
    theta = [r.theta_mean for r in scale.rows]
    norm = [r.norm_mean for r in scale.rows]
    return ThetaNorm(
        rho_theta_norm=rank_correlation(theta, norm),
        rho_theta_depth=rank_correlation(layers, theta),
        rho_norm_depth=rank_correlation(layers, norm),
        n_layers=len(layers),
    )


@dataclass(frozen=True)
class NormFollow:
    """Fig. 1 (right): matched folded decoder rows grow between layers as the hidden state does."""

    r: float
    """Pearson correlation across consecutive layer pairs of the median growth of matched folded
    decoder rows (``‖θ W_dec‖``) and the growth of the mean ‖h‖."""
    n_pairs: int


def measure_norm_follow(
    mse: ParameterMSEResult, scale: ScaleDepthResult, method: str = "folded"
) -> NormFollow:
    """:class:`NormFollow` of a parameter-MSE result (its ``method`` rows' ``dec_norm_diff``) and the
    per-layer norms of a Fig. 1 result."""
    norm = {r.layer: r.norm_mean for r in scale.rows}
    rows = [r for r in mse.rows if r.method == method]
    grow = [r.dec_norm_diff for r in rows]
    dnorm = [norm.get(r.layer_b, _NAN) - norm.get(r.layer_a, _NAN) for r in rows]
    return NormFollow(r=correlation(grow, dnorm), n_pairs=len(rows))


# ============================================================================================ Fig. 3
@dataclass(frozen=True)
class PanelWins:
    """Fig. 3: fraction of layer pairs where unfolded matching's MSE is above folded matching's, per
    panel (all scored on folded parameters)."""

    W_enc: float
    W_dec: float
    b_enc: float
    n_pairs: int


def measure_unfolded_higher(mse: ParameterMSEResult) -> PanelWins:
    """:class:`PanelWins` of a parameter-MSE result with ``folded`` and ``unfolded`` rows."""
    out = {}
    for panel in ("W_enc", "W_dec", "b_enc"):
        folded = np.asarray(mse.series("folded", f"mse_{panel}"))
        unfolded = np.asarray(mse.series("unfolded", f"mse_{panel}"))
        out[panel] = float(np.mean(unfolded > folded)) if folded.size else _NAN
    return PanelWins(n_pairs=len(mse.series("folded")), **out)


@dataclass(frozen=True)
class DepthTrend:
    """Fig. 3: how folded matching's per-panel MSE changes with depth."""

    rho_enc: float
    """Spearman correlation over layer pairs of the pair's first layer and the folded ``W_enc`` MSE."""
    rho_dec: float
    """The same for the folded ``W_dec`` MSE."""


def measure_depth_trend(mse: ParameterMSEResult, method: str = "folded") -> DepthTrend:
    """:class:`DepthTrend` of a parameter-MSE result's ``method`` rows."""
    layers = [float(r.layer_a) for r in mse.rows if r.method == method]
    return DepthTrend(
        rho_enc=rank_correlation(layers, mse.series(method, "mse_W_enc")),
        rho_dec=rank_correlation(layers, mse.series(method, "mse_W_dec")),
    )


# ============================================================================================ Figs. 4/7
@dataclass(frozen=True)
class ScoreGain:
    """Figs. 4/7: Matching Score of folded against unfolded matching over layer pairs."""

    fraction: float
    """Fraction of layer pairs (both defined) where folded scores above unfolded."""
    folded: float
    """Mean folded Matching Score over layer pairs."""
    unfolded: float


def measure_folding_gain(scores: MatchingScores) -> ScoreGain:
    """:class:`ScoreGain` of Matching Scores with ``folded`` and ``unfolded`` rows."""
    return ScoreGain(
        fraction=scores.fraction_better("folded", "unfolded"),
        folded=scores.mean("folded"),
        unfolded=scores.mean("unfolded"),
    )


@dataclass(frozen=True)
class EarlyLate:
    """Fig. 7: the folded Matching Score over the paper's early layers and over the rest."""

    early: float
    """Mean over pairs starting in the first 10/26 of the depth (``nan`` if none)."""
    late: float
    """Mean over the other pairs."""


def measure_early_late(scores: MatchingScores, n_layers: int) -> EarlyLate:
    """:class:`EarlyLate` of the ``folded`` Matching Scores of a model with ``n_layers`` layers."""
    early, late = early_late_split(scores.layers, scores.series("folded"), n_layers)
    return EarlyLate(early=early, late=late)


@dataclass(frozen=True)
class AboveChance:
    """Fig. 7: the folded Matching Score of the worst layer pair against random partners there."""

    min_ratio: float
    """Smallest over layer pairs of folded Matching Score / random-partner Matching Score."""
    worst_layer: int
    """First layer of that pair (−1 when undefined)."""
    min_score: float
    """The smallest folded Matching Score over layer pairs."""


def measure_above_chance(scores: MatchingScores) -> AboveChance:
    """:class:`AboveChance` of Matching Scores with ``folded`` and ``random`` rows."""
    ratios = [_ratio(f, r) for f, r in zip(scores.series("folded"), scores.series("random"), strict=True)]
    ok = [(v, t) for v, t in zip(ratios, scores.layers, strict=True) if not math.isnan(v)]
    if not ok:
        return AboveChance(min_ratio=_NAN, worst_layer=-1, min_score=_NAN)
    value, layer = min(ok)
    return AboveChance(
        min_ratio=value, worst_layer=layer, min_score=float(np.nanmin(scores.series("folded")))
    )


# ============================================================================================ Figs. 5/6
@dataclass(frozen=True)
class AgreementByMSE:
    """Figs. 5/6 on one layer pair: agreement on data of the lowest- and highest-MSE bins."""

    layer_a: int
    layer_b: int
    low: float
    """Mean ``P(partner active | feature active)`` in the lowest-MSE bin."""
    high: float
    """The same in the highest-MSE bin."""
    random: float
    """The same for random partners (chance)."""
    median_mse: float
    """Median per-pair folded-parameter MSE of the included pairs."""


@dataclass(frozen=True)
class MSEAgreement:
    """Figs. 5/6 on several layer pairs (the paper's 11→12, 19→20 and 23→24, mapped)."""

    pairs: tuple[AgreementByMSE, ...]


def measure_agreement(binned: Sequence[MSEBinnedAgreement]) -> MSEAgreement:
    """:class:`MSEAgreement` of MSE-binned agreements, one per layer pair (first and last bins)."""
    out = []
    for b in binned:
        mse = np.array([p.mse for p in b.pairs if p.included], dtype=np.float64)
        low, high = (b.bins[0], b.bins[-1]) if b.bins else (None, None)
        out.append(
            AgreementByMSE(
                layer_a=b.layer_a,
                layer_b=b.layer_b,
                low=low.p_partner if low is not None and low.n_pairs else _NAN,
                high=high.p_partner if high is not None and high.n_pairs else _NAN,
                random=b.p_random,
                median_mse=float(np.median(mse)) if mse.size else _NAN,
            )
        )
    return MSEAgreement(pairs=tuple(out))


def _agreement_checks(m: MSEAgreement) -> list[Check]:
    low_high = [_ratio(p.low, p.high) for p in m.pairs]
    high_chance = [_ratio(p.high, p.random) for p in m.pairs]
    return [
        Check("smallest low-/high-MSE agreement ratio over pairs", _nanmin(low_high), "≥", AGREE_LOW_HIGH),
        Check("largest high-MSE agreement / chance over pairs", _nanmax(high_chance), "≤", AGREE_TAIL_CHANCE),
    ]


def _nanmin(values: Sequence[float]) -> float:
    return _NAN if not values or any(math.isnan(v) for v in values) else float(min(values))


def _nanmax(values: Sequence[float]) -> float:
    return _NAN if not values or any(math.isnan(v) for v in values) else float(max(values))


def _mse_scale(m: MSEAgreement) -> float:
    medians = [p.median_mse for p in m.pairs]
    return _ratio(_nanmax(medians), _nanmin(medians)) if len(medians) > 1 else _NAN


# ============================================================================================ Fig. 8
@dataclass(frozen=True)
class Persistence:
    """Fig. 8: direct and composed matching from each start layer, scored on data."""

    horizons: Mapping[int, int]
    """Start layer → the largest distance ``k`` up to which direct matching's Matching Score stays
    ≥ :data:`PERSIST_CHANCE` × random partners' at every distance 1..k (0: not even at 1)."""
    rho_decline: float
    """Mean over starts of the Spearman correlation of distance and direct Matching Score."""
    ratio_near: float
    """Mean over starts of composed / direct Matching Score at distance 2."""
    ratio_far: float
    """The same at distance :data:`PERSIST_FAR` (``nan`` when not followed that far)."""
    agreement_near: float
    """Mean over starts of the fraction of features with the same partner at distance 2."""
    max_distance: int


def measure_persistence(result: PersistenceResult) -> Persistence:
    """:class:`Persistence` of a persistence result with its data-based scores."""
    distances, direct = result.curves("score_direct")
    _, composed = result.curves("score_composed")
    _, rand = result.curves("score_random")
    _, agree = result.curves("agreement")
    horizons, rhos = {}, []
    for s, d in direct.items():
        k = 0
        for dist, value, chance in zip(distances, d, rand[s], strict=True):
            if not value >= PERSIST_CHANCE * chance:
                break
            k = dist
        horizons[s] = k
        rhos.append(rank_correlation([float(x) for x in distances], d))

    def at(curves: Mapping[int, Sequence[float]], dist: int) -> list[float]:
        return [c[dist - 1] if dist <= len(c) else _NAN for c in curves.values()]

    def ratio(dist: int) -> float:
        return _nanmean([_ratio(c, d) for c, d in zip(at(composed, dist), at(direct, dist), strict=True)])

    return Persistence(
        horizons=horizons,
        rho_decline=_nanmean(rhos),
        ratio_near=ratio(2),
        ratio_far=ratio(PERSIST_FAR),
        agreement_near=_nanmean(at(agree, 2)),
        max_distance=max(distances, default=0),
    )


def _mean_horizon(m: Persistence) -> float:
    return float(np.mean(list(m.horizons.values()))) if m.horizons else _NAN


# ============================================================================================ Figs. 10/11
def _layer_means(results: Mapping[str, ApproximationResult], scheme: str, metric: str) -> dict[int, float]:
    """Layer → ``metric`` of ``scheme`` averaged over corpora (the curve the paper would plot)."""
    layers = sorted({t for r in results.values() for t in r.layers})
    return {
        t: _nanmean([float(getattr(r.row(t, scheme), metric)) for r in results.values() if t in r.layers])
        for t in layers
    }


def _is_early(layer: int, n_layers: int) -> bool:
    return layer < EARLY_FRACTION * n_layers


@dataclass(frozen=True)
class SmallLoss:
    """Fig. 10: folded SAE Match's ΔL over the paper's late layers, against the clean loss."""

    late: float
    """Mean ΔL (nats/token) over corpora and the layers from 10/26 of the depth on."""
    early: float
    """The same over the earlier layers."""
    clean: float
    """Mean clean next-token loss over the same late rows."""


def measure_small_loss(results: Mapping[str, ApproximationResult], n_layers: int) -> SmallLoss:
    """:class:`SmallLoss` of approximation results (corpus → result) of an ``n_layers``-deep model."""
    dl = _layer_means(results, EPD, "delta_loss")
    clean = _layer_means(results, EPD, "clean_loss")
    late = [t for t in dl if not _is_early(t, n_layers)]
    early = [t for t in dl if _is_early(t, n_layers)]
    return SmallLoss(
        late=_nanmean([dl[t] for t in late]),
        early=_nanmean([dl[t] for t in early]),
        clean=_nanmean([clean[t] for t in late]),
    )


@dataclass(frozen=True)
class CorpusLoss:
    """Fig. 10: folded SAE Match's mean ΔL over the late layers, per corpus."""

    late: Mapping[str, float]
    """Corpus → mean ΔL over the layers from 10/26 of the depth on."""
    stand_in: str
    """The corpus standing in for web text (:data:`WEB_TEXT_STAND_IN`)."""


def measure_corpus_loss(results: Mapping[str, ApproximationResult], n_layers: int) -> CorpusLoss:
    """:class:`CorpusLoss` of approximation results (corpus → result)."""
    late = {
        c: _nanmean([r.row(t, EPD).delta_loss for t in r.layers if not _is_early(t, n_layers)])
        for c, r in results.items()
    }
    return CorpusLoss(late=late, stand_in=WEB_TEXT_STAND_IN)


def _stand_in_rank(m: CorpusLoss) -> float:
    if m.stand_in not in m.late or len(m.late) < 2:
        return _NAN
    return float(1 + sum(v < m.late[m.stand_in] for v in m.late.values()))


@dataclass(frozen=True)
class CodeLast:
    """Fig. 10: folded SAE Match's ΔL on code at the last replaced layer."""

    layer: int
    """The last replaced layer (−1 without the code corpus)."""
    code_last: float
    """ΔL on code there."""
    code_before: float
    """Largest ΔL on code over the :data:`CODE_BEFORE` layers before it."""
    others_last: float
    """Largest ΔL of the other corpora at the last layer."""


def measure_code_last(results: Mapping[str, ApproximationResult]) -> CodeLast:
    """:class:`CodeLast` of approximation results (corpus → result); undefined without ``code``."""
    code = results.get(CODE_CORPUS)
    if code is None or len(code.layers) < 2:
        return CodeLast(layer=-1, code_last=_NAN, code_before=_NAN, others_last=_NAN)
    last = code.layers[-1]
    before = code.layers[-1 - CODE_BEFORE : -1]
    others = [
        r.row(last, EPD).delta_loss for c, r in results.items() if c != CODE_CORPUS and last in r.layers
    ]
    return CodeLast(
        layer=last,
        code_last=code.row(last, EPD).delta_loss,
        code_before=max(code.row(t, EPD).delta_loss for t in before),
        others_last=max(others) if others else _NAN,
    )


@dataclass(frozen=True)
class EVGap:
    """Fig. 11: folded SAE Match's explained variance against encode-decode of the previous layer
    (both averaged over corpora per layer)."""

    late_gap: float
    """Mean over the last third of the layers of |EV(SAE Match) − EV(encode-decode previous)|."""
    early_worse: float
    """Fraction of the paper's early layers where SAE Match's EV is below encode-decode previous's."""
    mean_early_gap: float
    """Mean over the early layers of EV(SAE Match) − EV(encode-decode previous)."""


def measure_ev_gap(results: Mapping[str, ApproximationResult], n_layers: int) -> EVGap:
    """:class:`EVGap` of approximation results (corpus → result) with ``match_folded`` and
    ``encdec_previous`` rows, of an ``n_layers``-deep model."""
    epd = _layer_means(results, EPD, "explained_variance")
    prev = _layer_means(results, "encdec_previous", "explained_variance")
    layers = sorted(epd)
    late = [t for t in layers if t >= n_layers * 2 / 3]
    early = [t for t in layers if _is_early(t, n_layers)]
    return EVGap(
        late_gap=_nanmean([abs(epd[t] - prev[t]) for t in late]),
        early_worse=float(np.mean([epd[t] < prev[t] for t in early])) if early else _NAN,
        mean_early_gap=_nanmean([epd[t] - prev[t] for t in early]),
    )


# ============================================================================================ Fig. 12
@dataclass(frozen=True)
class ScoresByParams:
    """Fig. 12: Matching Score of matchings on part of the folded parameters, on one layer pair."""

    layer_a: int
    layer_b: int
    all: float
    """Matching Score of all-parameter (folded) matching."""
    decoder: float
    """Decoder-only matching's."""
    encoder: float
    """Encoder-only (``W_enc``, ``b_enc``) matching's."""
    random: float


def measure_scores_by_params(result: MatchingScoreResult) -> ScoresByParams:
    """:class:`ScoresByParams` of one pair's Matching Scores with ``folded``, ``decoder_only``,
    ``encoder_only`` and ``random`` rows."""
    return ScoresByParams(
        layer_a=result.layer_a,
        layer_b=result.layer_b,
        all=result.row("folded").matching_score,
        decoder=result.row("decoder_only").matching_score,
        encoder=result.row("encoder_only").matching_score,
        random=result.row("random").matching_score,
    )


# ============================================================================================ Fig. 14
_SWEEP_SCHEMES = (EPD, "encdec_current", "encdec_previous")


@dataclass(frozen=True)
class L0Sweep:
    """Fig. 14: the approximation along an L0 sweep at one layer."""

    l0s: tuple[float, ...]
    """Measured L0 of the swept SAEs of layer t, ascending (empty: no sweep on this profile)."""
    ev_peak: Mapping[str, int]
    """Scheme → index into :attr:`l0s` of its highest explained variance."""
    rho_dl: Mapping[str, float]
    """Scheme → Spearman correlation of L0 and ΔL."""
    epd_above: float
    """Fraction of the sweep's points where encode-permute-decode's ΔL is above both encode-decode
    schemes' (``nan`` without a sweep)."""


def measure_l0_sweep(sweep: L0SweepResult | None) -> L0Sweep:
    """:class:`L0Sweep` of an L0 sweep with ``match_folded``, ``encdec_current`` and
    ``encdec_previous`` rows (``None``: no sweep on this profile)."""
    if sweep is None:
        return L0Sweep(l0s=(), ev_peak={}, rho_dl={}, epd_above=_NAN)
    l0s, _ = sweep.series(EPD, "explained_variance")
    peak = {
        s: int(np.nanargmax(np.asarray(sweep.series(s, "explained_variance")[1]))) for s in _SWEEP_SCHEMES
    }
    dl = {s: np.asarray(sweep.series(s, "delta_loss")[1]) for s in _SWEEP_SCHEMES}
    rho = {s: rank_correlation(list(l0s), list(v)) for s, v in dl.items()}
    above = (dl[EPD] > dl["encdec_current"]) & (dl[EPD] > dl["encdec_previous"])
    return L0Sweep(l0s=tuple(l0s), ev_peak=peak, rho_dl=rho, epd_above=float(above.mean()))


def _interior(m: L0Sweep, scheme: str) -> bool:
    return 0 < m.ev_peak[scheme] < len(m.l0s) - 1


def _sweep_checks(m: L0Sweep, part: str) -> list[Check]:
    if len(m.l0s) < 3:
        undefined = {
            "peak": "EPD's EV peak inside the sweep",
            "dl": "largest ρ(L0, ΔL)",
            "above": "EPD above",
        }
        return [Check(undefined[part], _NAN, "≥", 1.0)]
    if part == "peak":
        others = sum(_interior(m, s) for s in _SWEEP_SCHEMES if s != EPD)
        return [
            Check("EPD's EV peak strictly inside the sweep (1 = yes)", float(_interior(m, EPD)), "≥", 1.0),
            Check("encode-decode schemes with an interior EV peak", float(others), "≤", 0.0),
        ]
    if part == "dl":
        return [Check("largest ρ(L0, ΔL) over the three schemes", max(m.rho_dl.values()), "≤", L0_DL_RHO)]
    return [
        Check(
            "fraction of L0 points where EPD's ΔL is above both encode-decode schemes", m.epd_above, "≥", 1.0
        )
    ]


def _sweep_text(m: L0Sweep) -> str:
    if not m.l0s:
        return "no L0 sweep on this profile"
    peaks = ", ".join(f"{_SCHEME_NAMES[s]} {m.l0s[i]:.0f}" for s, i in m.ev_peak.items())
    rhos = ", ".join(f"{_SCHEME_NAMES[s]} {v:+.2f}" for s, v in m.rho_dl.items())
    return (
        f"L0 {', '.join(f'{v:.0f}' for v in m.l0s)}; EV peak at L0: {peaks}; ρ(L0, ΔL): {rhos}; "
        f"EPD's ΔL above both encode-decode at {m.epd_above:.0%} of the points"
    )


_SCHEME_NAMES = {EPD: "EPD", "encdec_current": "enc-dec current", "encdec_previous": "enc-dec previous"}


# ============================================================================================ Fig. 15
@dataclass(frozen=True)
class L0Neighbours:
    """Fig. 15: does L0 mismatch between neighbouring SAEs predict where matching fails?"""

    rho_mismatch_score: float
    """Spearman over layer pairs: ``|log L0_t − log L0_{t−1}|`` against the Matching Score."""
    rho_mismatch_ev: float
    """The same against the approximation's explained variance (folded SAE Match)."""
    ev_gain: tuple[float, ...]
    """Per retrained early pair: EV(one SAE retrained at its neighbour's L0) − EV(original)."""


L0_NOT_MEASURED = L0Neighbours(rho_mismatch_score=_NAN, rho_mismatch_ev=_NAN, ev_gain=())
"""The Fig. 15 measurement of a build without SAEs retrained at their neighbour's L0."""


def measure_l0_neighbours(
    rho_mismatch_score: float, rho_mismatch_ev: float, ev_gain: Sequence[float]
) -> L0Neighbours:
    """:class:`L0Neighbours` from the L0-mismatch experiment's three values (plain floats)."""
    return L0Neighbours(
        rho_mismatch_score=float(rho_mismatch_score),
        rho_mismatch_ev=float(rho_mismatch_ev),
        ev_gain=tuple(float(g) for g in ev_gain),
    )


def _l0_text(m: L0Neighbours) -> str:
    if not m.ev_gain:
        return "not measured in this build: no SAE was retrained at its neighbour's L0"
    gains = ", ".join(f"{g:+.3f}" for g in m.ev_gain)
    return (
        f"EV change after retraining at the neighbour's L0: {gains}; ρ(|Δlog L0|, Matching Score) "
        f"{m.rho_mismatch_score:+.2f}, ρ(|Δlog L0|, EV) {m.rho_mismatch_ev:+.2f}"
    )


# ============================================================================================ Figs. 16/17
@dataclass(frozen=True)
class QuantileShape:
    """Figs. 16/17: the hybrid's explained variance against the quantile q of swapped features."""

    rho_max: float
    """Largest over the tested layers of the Spearman correlation of q and EV."""
    drop_low: float
    """Mean over layers of EV(q = 0) − EV(q = 0.5): the cost of swapping the low-MSE half."""
    drop_high: float
    """Mean over layers of EV(q = 0.5) − EV(q = 1): the cost of swapping the high-MSE half."""
    layers: tuple[int, ...]


def measure_quantile_shape(hybrid: ApproximationResult, quantiles: Sequence[float]) -> QuantileShape:
    """:class:`QuantileShape` of a hybrid result whose schemes are one per quantile, in order;
    ``quantiles`` must include 0, 0.5 and 1."""
    labels, qs = hybrid.schemes, [float(q) for q in quantiles]
    if len(labels) != len(qs):
        raise ValueError(f"quantiles: expected one per hybrid scheme ({len(labels)}), got {len(qs)}")
    if not {0.0, 0.5, 1.0} <= set(qs):
        raise ValueError(f"quantiles: expected 0, 0.5 and 1 among them, got {qs}")
    by_q = dict(zip(qs, labels, strict=True))
    rhos, low, high = [], [], []
    for t in hybrid.layers:
        ev = [hybrid.row(t, lab).explained_variance for lab in labels]
        rhos.append(rank_correlation(qs, ev))
        e0, e5, e1 = (hybrid.row(t, by_q[q]).explained_variance for q in (0.0, 0.5, 1.0))
        low.append(e0 - e5)
        high.append(e5 - e1)
    return QuantileShape(
        rho_max=_nanmax(rhos), drop_low=_nanmean(low), drop_high=_nanmean(high), layers=hybrid.layers
    )


def _flatness(m: QuantileShape) -> float:
    if math.isnan(m.drop_low) or math.isnan(m.drop_high):
        return _NAN
    return m.drop_high / m.drop_low if m.drop_low > 0 else math.inf


# ============================================================================================ ours
@dataclass(frozen=True)
class Comparison:
    """Folded SAE Match against another approximation over (corpus, layer) cases."""

    other: str
    """The other scheme's label."""
    wins_dl: int
    """Cases where SAE Match's ΔL is below the other's."""
    wins_ev: int
    """Cases where SAE Match's explained variance is above the other's."""
    total: int
    mean_dl: tuple[float, float]
    """Mean ΔL of (SAE Match, other) over the cases."""
    mean_ev: tuple[float, float]
    """Mean explained variance of (SAE Match, other)."""


def measure_match_vs(results: Mapping[str, ApproximationResult], other: str) -> Comparison:
    """:class:`Comparison` of ``match_folded`` against scheme ``other`` over every (corpus, layer)."""
    pairs = [(r.row(t, EPD), r.row(t, other)) for r in results.values() for t in r.layers]
    return Comparison(
        other=other,
        wins_dl=sum(a.delta_loss < b.delta_loss for a, b in pairs),
        wins_ev=sum(a.explained_variance > b.explained_variance for a, b in pairs),
        total=len(pairs),
        mean_dl=(_nanmean([a.delta_loss for a, _ in pairs]), _nanmean([b.delta_loss for _, b in pairs])),
        mean_ev=(
            _nanmean([a.explained_variance for a, _ in pairs]),
            _nanmean([b.explained_variance for _, b in pairs]),
        ),
    )


_OTHER_NAMES = {
    "drop": "layer drop",
    "linear": "the least-squares map",
    "match_unfolded_cosine_W_dec": "exact cosine matching",
}


def _comparison_checks(m: Comparison) -> list[Check]:
    other = _OTHER_NAMES.get(m.other, m.other)
    return [
        Check(f"fraction of cases with ΔL below {other}", _ratio(m.wins_dl, m.total), ">", 0.5),
        Check(f"fraction of cases with EV above {other}", _ratio(m.wins_ev, m.total), ">", 0.5),
    ]


def _comparison_text(m: Comparison) -> str:
    return (
        f"SAE Match vs {_OTHER_NAMES.get(m.other, m.other)}: ΔL lower in {m.wins_dl}/{m.total} "
        "(corpus, layer) cases, EV higher in "
        f"{m.wins_ev}/{m.total}; mean ΔL {m.mean_dl[0]:.2f} vs {m.mean_dl[1]:.2f} nats, mean EV "
        f"{m.mean_ev[0]:.3f} vs {m.mean_ev[1]:.3f}"
    )


@dataclass(frozen=True)
class ScoreVs:
    """Folded SAE Match's Matching Score against another matching's, over layer pairs."""

    other: str
    fraction: float
    """Fraction of layer pairs where folded scores at least as high as ``other``."""
    folded: float
    """Mean folded Matching Score."""
    other_score: float


def measure_score_vs(scores: MatchingScores, other: str) -> ScoreVs:
    """:class:`ScoreVs` of Matching Scores with ``folded`` and ``other`` rows."""
    f, o = np.asarray(scores.series("folded")), np.asarray(scores.series(other))
    ok = ~(np.isnan(f) | np.isnan(o))
    return ScoreVs(
        other=other,
        fraction=float(np.mean(f[ok] >= o[ok])) if ok.any() else _NAN,
        folded=scores.mean("folded"),
        other_score=scores.mean(other),
    )


@dataclass(frozen=True)
class SeedCeiling:
    """How reproducible the SAEs are: the same layer's SAE from another seed, swapped in."""

    ev_swap: float
    """Mean over seed layers of the EV of h_t through main SAE → matching → other-seed SAE."""
    ev_self: float
    """Mean EV of the main SAE's own reconstruction."""
    ev_previous: float
    """Mean EV of SAE Match's replacement from the previous layer (the same swap across layers)."""
    score_fraction: float
    """Neighbour-layer Matching Score as a fraction of the same-layer (seed) one."""
    layers: tuple[int, ...]


def measure_seed_ceiling(result: SeedCeilingResult | None, method: str = "folded") -> SeedCeiling:
    """:class:`SeedCeiling` of a seed-ceiling result's ``method`` rows (``None``: no seed SAEs)."""
    if result is None:
        return SeedCeiling(ev_swap=_NAN, ev_self=_NAN, ev_previous=_NAN, score_fraction=_NAN, layers=())
    return SeedCeiling(
        ev_swap=_nanmean(result.series(method, "ev_same_layer")),
        ev_self=_nanmean(result.series(method, "ev_self")),
        ev_previous=_nanmean(result.series(method, "ev_previous")),
        score_fraction=result.fraction_of_ceiling(method),
        layers=tuple(result.layers()),
    )


# ============================================================================================ thresholds
THETA_RHO = 0.7
"""Fig. 1: "grow together" — rank correlation of mean θ and mean ‖h‖ across layers at least this."""
DEPTH_RHO = 0.5
"""Figs. 1/3: a series "grows" (or "falls") with depth when its rank correlation with the layer is
at least this (at most minus this)."""
FOLLOW_R = 0.5
"""Fig. 1 right: "follow" — Pearson correlation across layer pairs at least this."""
THROUGHOUT = 0.9
"""Fig. 3: "throughout" — unfolded above folded on at least this fraction of layer pairs per panel."""
FOLDING_PAIRS = 0.75
"""Figs. 4/7: folding raises the Matching Score on at least this fraction of layer pairs."""
EARLY_DROP = 0.75
"""Fig. 7: early layers are "low" when their mean score is below this fraction of the later mean."""
NOT_ZERO = 3.0
"""Fig. 7: "does not drop to zero" — every pair scores at least this multiple of random partners."""
AGREE_LOW_HIGH = 2.0
"""Figs. 5/6: the lowest-MSE bin agrees at least this many times as often as the highest."""
AGREE_TAIL_CHANCE = 2.0
"""Figs. 5/6: "no similar partner" — the highest-MSE bin agrees at most this multiple of chance."""
MSE_SCALE = 1.5
"""Figs. 5/6: "the scale differs" — largest / smallest median per-pair MSE over the pairs."""
PERSIST_CHANCE = 3.0
"""Fig. 8: a distance still counts as "significant" while direct matching scores this multiple of
random partners (as :data:`NOT_ZERO`)."""
PERSIST_LAYERS = 4.0
"""Fig. 8: "about five layers" — the mean significant horizon over starts is at least this."""
PERSIST_FAR = 5
"""Fig. 8: the distance at which composition must have diverged (the paper's "about five")."""
COMPOSE_NEAR = 0.8
"""Fig. 8: composition is "adequate" when it keeps this fraction of direct matching's score at 2."""
COMPOSE_DIVERGE = 0.1
"""Fig. 8: "then diverges" — the composed/direct ratio falls by at least this from distance 2 to 5."""
SMALL_LOSS = 0.1
"""Fig. 10: "small" — the late layers' mean ΔL is at most this fraction of the clean loss."""
CODE_BEFORE = 3
"""Fig. 10: code "degrades at the last layer" against the largest ΔL of this many layers before."""
EV_EQUAL = 0.05
"""Fig. 11: "equals" — mean |EV gap| over the last third of the layers at most this."""
EARLY_WORSE = 0.8
"""Fig. 11: "worse at lower layers" — on at least this fraction of the early layers."""
DECODER_PAR = 0.9
"""Fig. 12: "on par" — decoder-only keeps at least this fraction of all-parameter matching's score."""
ENCODER_POOR = 0.5
"""Fig. 12: "poor" — encoder-only reaches at most this fraction of it."""
L0_DL_RHO = -0.8
"""Fig. 14: "higher L0 gives lower ΔL" — every scheme's rank correlation of L0 and ΔL at most this."""
L0_GAIN_PAIRS = 2.0
"""Fig. 15: EV must rise at this many of the retrained pairs."""
QUANTILE_RHO = -0.8
"""Figs. 16/17: EV falls with q at every tested layer (rank correlation at most this)."""
QUANTILE_FLAT = 0.5
"""Figs. 16/17: "varies little for large MSE" — swapping the high-MSE half costs at most this
fraction of what swapping the low-MSE half costs."""
CEILING_EV = 0.5
"""Seed ceiling: the same-layer swap keeps at least this fraction of the SAE's own EV."""


# ============================================================================================ registry
_PAPER: tuple[Claim[Any], ...] = (
    Claim[ThetaNorm](
        key="fig1_theta_norm",
        figure="Fig. 1 (left)",
        text="the mean threshold θ per layer and the mean hidden-state norm grow together with depth",
        section="01_hypotheses",
        measurement="Spearman correlations across layers of mean θ, mean ‖h‖ and the layer index "
        "(measure_theta_norm)",
        rule=f"ρ(mean θ, mean ‖h‖) ≥ {THETA_RHO} and both ρ with the layer ≥ {DEPTH_RHO}",
        why="the paper shows two rising curves and gives no correlation: a strong rank correlation "
        "(monotone, not necessarily linear) and both rising is what 'grow together' means",
        checks=lambda m: [
            Check("ρ(mean θ, mean ‖h‖)", m.rho_theta_norm, "≥", THETA_RHO),
            Check("ρ(layer, mean θ)", m.rho_theta_depth, "≥", DEPTH_RHO),
            Check("ρ(layer, mean ‖h‖)", m.rho_norm_depth, "≥", DEPTH_RHO),
        ],
        describe=lambda m: (
            f"ρ(mean θ, mean ‖h‖) = {m.rho_theta_norm:+.2f}; ρ with the layer: θ {m.rho_theta_depth:+.2f}, "
            f"‖h‖ {m.rho_norm_depth:+.2f} ({m.n_layers} layers)"
        ),
    ),
    Claim[NormFollow](
        key="fig1_folded_norm_diff",
        figure="Fig. 1 (right)",
        text="after folding, the norm differences of matched decoder rows between consecutive layers "
        "follow the change of the hidden-state norm",
        section="01_hypotheses",
        measurement="per consecutive pair, the median over matched pairs of ‖θ_B W_dec,B[P i]‖ − "
        "‖θ_A W_dec,A[i]‖ against the change of mean ‖h‖; their Pearson correlation across pairs "
        "(measure_norm_follow)",
        rule=f"Pearson r ≥ {FOLLOW_R} across layer pairs",
        why="'follow' without a number: a clearly positive linear relation between the two per-pair "
        "changes is the weakest reading that still says the one tracks the other",
        checks=lambda m: [Check("r(decoder-row growth, ‖h‖ growth)", m.r, "≥", FOLLOW_R)],
        describe=lambda m: f"r = {m.r:+.2f} over {m.n_pairs} layer pairs",
    ),
    Claim[PanelWins](
        key="fig3_unfolded_higher",
        figure="Fig. 3",
        text="scored on folded parameters, matching without folding has a higher MSE than folded "
        "matching throughout (W_enc, W_dec and b_enc panels)",
        section="02_folding_vs_cosine",
        measurement="per panel, the fraction of layer pairs where unfolded matching's folded MSE is "
        "above folded matching's (measure_unfolded_higher)",
        rule=f"≥ {THROUGHOUT:.0%} of the layer pairs in every panel",
        why="'throughout' read as nearly every pair: one or two of ~30 pairs crossing on a noisy "
        "substrate do not overturn a curve-level statement; per panel because the reviewers doubted "
        "b_enc and the summed MSE is what folded matching minimises (always lower)",
        checks=lambda m: [
            Check(f"{panel} panel: fraction of pairs unfolded > folded", getattr(m, panel), "≥", THROUGHOUT)
            for panel in ("W_enc", "W_dec", "b_enc")
        ],
        describe=lambda m: (
            f"unfolded above folded on {m.W_enc:.0%} (W_enc), {m.W_dec:.0%} (W_dec), {m.b_enc:.0%} (b_enc) "
            f"of {m.n_pairs} pairs"
        ),
    ),
    Claim[DepthTrend](
        key="fig3_depth_trend",
        figure="Fig. 3",
        text="with depth, the encoder MSE of folded matching falls and the decoder MSE rises (θ grows)",
        section="02_folding_vs_cosine",
        measurement="Spearman correlation over layer pairs of depth and folded matching's W_enc and "
        "W_dec MSE (measure_depth_trend)",
        rule=f"ρ(layer, W_enc MSE) ≤ −{DEPTH_RHO} and ρ(layer, W_dec MSE) ≥ {DEPTH_RHO}",
        why="a clear monotone trend in rank, not only a difference between the two ends",
        checks=lambda m: [
            Check("ρ(layer, W_enc MSE)", m.rho_enc, "≤", -DEPTH_RHO),
            Check("ρ(layer, W_dec MSE)", m.rho_dec, "≥", DEPTH_RHO),
        ],
        describe=lambda m: f"ρ(layer, W_enc MSE) = {m.rho_enc:+.2f}, ρ(layer, W_dec MSE) = {m.rho_dec:+.2f}",
    ),
    Claim[ScoreGain](
        key="fig7_folding_raises_score",
        figure="Figs. 4/7",
        text="folding improves the matching: a higher Matching Score than matching without folding",
        section="02_folding_vs_cosine",
        measurement="fraction of layer pairs where folded matching's Matching Score is above "
        "unfolded's, and the two means (measure_folding_gain)",
        rule=f"folded above unfolded on ≥ {FOLDING_PAIRS:.0%} of the layer pairs and a higher mean",
        why="the paper shows folded above unfolded over the depth; three pairs in four allows a few "
        "crossings of two noisy curves",
        checks=lambda m: [
            Check("fraction of pairs folded > unfolded", m.fraction, "≥", FOLDING_PAIRS),
            Check("mean gain (folded − unfolded)", m.folded - m.unfolded, ">", 0.0),
        ],
        describe=lambda m: (
            f"folded above unfolded on {m.fraction:.0%} of pairs; mean {m.folded:.3f} vs {m.unfolded:.3f}"
        ),
    ),
    Claim[EarlyLate](
        key="fig7_early_low",
        figure="Figs. 4/7",
        text="matching is poor in the initial layers and improves after layer 10 of 26 (≈ 38 % of depth)",
        section="02_folding_vs_cosine",
        measurement="mean folded Matching Score over pairs in the first 10/26 of the depth and over "
        "the rest (measure_early_late)",
        rule=f"early mean < {EARLY_DROP} × later mean",
        why="the paper's SAME labels are near zero early: a drop of at least a quarter is the least a "
        "data-based score must show to call the early layers 'low'",
        checks=lambda m: [Check("early / later Matching Score", _ratio(m.early, m.late), "<", EARLY_DROP)],
        describe=lambda m: f"folded Matching Score early {m.early:.3f} vs later {m.late:.3f}",
    ),
    Claim[AboveChance](
        key="fig7_not_zero",
        figure="Fig. 7",
        text="the Matching Score follows the LLM labels' pattern but does not drop to zero in the "
        "early layers",
        section="02_folding_vs_cosine",
        measurement="the smallest ratio over layer pairs of folded Matching Score to random partners' "
        "(measure_above_chance)",
        rule=f"every layer pair ≥ {NOT_ZERO:g} × its random-partner score",
        why="for a data-based score 'zero' is chance (random partners also co-fire sometimes); three "
        "times chance is far outside the random draws' spread",
        checks=lambda m: [Check("smallest folded / random Matching Score", m.min_ratio, "≥", NOT_ZERO)],
        describe=lambda m: (
            f"lowest folded Matching Score {m.min_score:.3f}; worst pair (from layer {m.worst_layer}) at "
            f"{m.min_ratio:.1f} × random partners"
        ),
    ),
    Claim[MSEAgreement](
        key="fig5_low_mse_similar",
        figure="Figs. 5/6",
        text="low-MSE matched pairs are semantically similar; the high-MSE tail has no similar partner "
        "(layers 11→12, 19→20, 23→24)",
        section="03_feature_matching",
        measurement="at the three pairs (mapped), P(partner active | feature active) in the lowest- "
        "and highest-MSE bins and for random partners (measure_agreement)",
        rule=f"at every pair lowest bin ≥ {AGREE_LOW_HIGH:g} × highest bin, and highest bin ≤ "
        f"{AGREE_TAIL_CHANCE:g} × random partners",
        why="the paper gives no threshold: 'similar vs not' must at least double the agreement, and 'no "
        "similar partner' must sit within a factor two of chance",
        checks=_agreement_checks,
        describe=lambda m: "; ".join(
            f"{p.layer_a}→{p.layer_b}: {p.low:.2f} lowest-MSE bin, {p.high:.2f} highest, "
            f"{p.random:.3f} random"
            for p in m.pairs
        ),
    ),
    Claim[MSEAgreement](
        key="fig5_scale_differs",
        figure="Figs. 5/6",
        text="the scale of the per-pair MSE differs between layer pairs",
        section="03_feature_matching",
        measurement="median per-pair folded MSE at the three pairs (measure_agreement)",
        rule=f"largest / smallest median ≥ {MSE_SCALE:g}",
        why="the paper plots the pairs on separate axes; a 1.5× shift of the median is a difference one "
        "sees on such plots",
        checks=lambda m: [Check("largest / smallest median MSE", _mse_scale(m), "≥", MSE_SCALE)],
        describe=lambda m: (
            "median MSE " + ", ".join(f"{p.layer_a}→{p.layer_b}: {p.median_mse:.3g}" for p in m.pairs)
        ),
    ),
    Claim[Persistence](
        key="fig8_five_layers",
        figure="Fig. 8",
        text="similarity to the start feature declines with distance but stays significant for about "
        "five layers",
        section="04_persistence",
        measurement=f"per start (10, 12, 20 mapped), the largest distance up to which direct matching "
        f"scores ≥ {PERSIST_CHANCE:g} × random partners, and ρ(distance, score) (measure_persistence)",
        rule=f"mean horizon over starts ≥ {PERSIST_LAYERS:g} layers and mean ρ(distance, score) < 0",
        why="'about five' read as at least four; 'significant' as the Fig. 7 chance rule",
        checks=lambda m: [
            Check("mean significant horizon (layers)", _mean_horizon(m), "≥", PERSIST_LAYERS),
            Check("mean ρ(distance, direct score)", m.rho_decline, "<", 0.0),
        ],
        describe=lambda m: (
            "significant up to "
            + ", ".join(f"L{s}: {h}" for s, h in m.horizons.items())
            + f" layers (of {m.max_distance} followed); mean ρ(distance, score) {m.rho_decline:+.2f}"
        ),
    ),
    Claim[Persistence](
        key="fig8_composition_nearby",
        figure="Fig. 8",
        text="composing consecutive matchings is adequate for nearby layers, then diverges from direct "
        "matching",
        section="04_persistence",
        measurement=f"mean over starts of composed / direct Matching Score at distance 2 and at "
        f"{PERSIST_FAR} (measure_persistence)",
        rule=f"ratio ≥ {COMPOSE_NEAR} at distance 2 and at least {COMPOSE_DIVERGE} lower at distance "
        f"{PERSIST_FAR}",
        why="the paper compares the judged similarity of composed and direct paths: keeping 80 % of the "
        "direct score is 'adequate', and losing ten more points by the paper's horizon is 'diverges'",
        checks=lambda m: [
            Check("composed / direct score at distance 2", m.ratio_near, "≥", COMPOSE_NEAR),
            Check(
                f"drop of that ratio from 2 to {PERSIST_FAR}",
                m.ratio_near - m.ratio_far,
                "≥",
                COMPOSE_DIVERGE,
            ),
        ],
        describe=lambda m: (
            f"composed / direct Matching Score {m.ratio_near:.2f} at distance 2, {m.ratio_far:.2f} at "
            f"{PERSIST_FAR}; same partner as direct for {m.agreement_near:.0%} of features at distance 2"
        ),
    ),
    Claim[SmallLoss](
        key="fig10_small_loss_late",
        figure="Fig. 10",
        text="from layer 10 of 26 on (≈ 38 % of depth), replacing the hidden state by SAE Match "
        "increases the loss only a little",
        section="05_hidden_state",
        measurement="mean ΔL of folded SAE Match over corpora and the late layers, against the clean "
        "loss (measure_small_loss)",
        rule=f"late mean ΔL ≤ {SMALL_LOSS} × the clean loss",
        why="'small' has no number in the paper; a tenth of the model's own loss is a small relative "
        "degradation on any model (0.3 nats on a clean loss of 3)",
        checks=lambda m: [Check("late ΔL / clean loss", _ratio(m.late, m.clean), "≤", SMALL_LOSS)],
        describe=lambda m: (
            f"mean ΔL {m.late:.2f} nats late ({_ratio(m.late, m.clean):.0%} of the clean loss "
            f"{m.clean:.2f}), {m.early:.2f} early"
        ),
    ),
    Claim[CorpusLoss](
        key="fig10_web_least",
        figure="Fig. 10",
        text=f"the loss increase is smallest on web text (ours: {WEB_TEXT_STAND_IN}, the only plain "
        "prose corpus)",
        section="05_hidden_state",
        measurement="mean late-layer ΔL of folded SAE Match per corpus (measure_corpus_loss)",
        rule=f"{WEB_TEXT_STAND_IN} has the lowest late mean ΔL of the corpora",
        why="OpenWebText is general prose; of our corpora only the novels are prose (the pydoc "
        "reference topics stand in for WikiText, the stdlib for GitHub code)",
        checks=lambda m: [Check(f"rank of {m.stand_in} by late ΔL (1 = least)", _stand_in_rank(m), "≤", 1.0)],
        describe=lambda m: "late mean ΔL " + ", ".join(f"{c} {v:.2f}" for c, v in m.late.items()),
    ),
    Claim[CodeLast](
        key="fig10_code_last",
        figure="Fig. 10",
        text="on code the approximation degrades at the last layer",
        section="05_hidden_state",
        measurement=f"folded SAE Match's ΔL on code at the last layer, against code's {CODE_BEFORE} "
        "layers before and the other corpora there (measure_code_last)",
        rule=f"code's last-layer ΔL above its largest of the {CODE_BEFORE} layers before and above "
        "every other corpus's at the last layer",
        why="'degrades at the last layer' is a jump there, and a jump of code's own",
        checks=lambda m: [
            Check("code ΔL at the last layer − largest before", m.code_last - m.code_before, ">", 0.0),
            Check("code ΔL at the last layer − other corpora's", m.code_last - m.others_last, ">", 0.0),
        ],
        describe=lambda m: (
            f"code ΔL {m.code_last:.2f} at layer {m.layer} vs ≤ {m.code_before:.2f} before; "
            f"other corpora ≤ {m.others_last:.2f} there"
        ),
    ),
    Claim[EVGap](
        key="fig11_converges",
        figure="Fig. 11",
        text="folded matching eventually explains as much variance as encode-decode of the previous "
        "hidden state",
        section="05_hidden_state",
        measurement="mean |EV(SAE Match) − EV(encode-decode previous)| over the last third of the "
        "layers, corpus-averaged (measure_ev_gap)",
        rule=f"≤ {EV_EQUAL}",
        why="'equals' on a 0–1 axis: within five points of explained variance",
        checks=lambda m: [Check("late mean |EV gap|", m.late_gap, "≤", EV_EQUAL)],
        describe=lambda m: f"late mean |EV gap| {m.late_gap:.3f}",
    ),
    Claim[EVGap](
        key="fig11_worse_early",
        figure="Fig. 11",
        text="at lower layers matching explains less variance than encode-decode of the previous "
        "hidden state",
        section="05_hidden_state",
        measurement="fraction of the early layers (first 10/26 of depth) where SAE Match's EV is below "
        "encode-decode previous's, corpus-averaged (measure_ev_gap)",
        rule=f"≥ {EARLY_WORSE:.0%} of the early layers",
        why="a curve-level 'worse' allows one crossing in five",
        checks=lambda m: [Check("fraction of early layers worse", m.early_worse, "≥", EARLY_WORSE)],
        describe=lambda m: f"worse on {m.early_worse:.0%} of early layers (mean gap {m.mean_early_gap:+.3f})",
    ),
    Claim[ScoresByParams](
        key="fig12_encoder_poor",
        figure="Fig. 12",
        text="at layers 19→20, encoder-only matching is poor while decoder-only is on par with all "
        "parameters",
        section="02_folding_vs_cosine",
        measurement="Matching Score of all-parameter, decoder-only and encoder-only folded matching "
        "at the pair mapped from 19→20 (measure_scores_by_params)",
        rule=f"decoder-only ≥ {DECODER_PAR} × all-parameter, encoder-only ≤ {ENCODER_POOR} × all-parameter",
        why="'on par' allows a tenth less; 'poor' is at most half",
        checks=lambda m: [
            Check("decoder-only / all-parameter score", _ratio(m.decoder, m.all), "≥", DECODER_PAR),
            Check("encoder-only / all-parameter score", _ratio(m.encoder, m.all), "≤", ENCODER_POOR),
        ],
        describe=lambda m: (
            f"{m.layer_a}→{m.layer_b}: Matching Score all {m.all:.3f}, decoder-only {m.decoder:.3f}, "
            f"encoder-only {m.encoder:.3f} (random {m.random:.3f})"
        ),
    ),
    Claim[L0Sweep](
        key="fig14_ev_peak",
        figure="Fig. 14",
        text="the explained variance of encode-permute-decode peaks at an intermediate L0 (≈ 70 for "
        "Gemma Scope); the other schemes have no peak",
        section="05_hidden_state",
        measurement="where along the L0 sweep each scheme's EV is highest (measure_l0_sweep)",
        rule="EPD's best L0 strictly inside the sweep; both encode-decode schemes' at an end",
        why="a peak is an interior maximum; the L0 value itself depends on the SAEs' width",
        checks=lambda m: _sweep_checks(m, "peak"),
        describe=_sweep_text,
    ),
    Claim[L0Sweep](
        key="fig14_l0_lowers_dl",
        figure="Fig. 14",
        text="a higher L0 gives a lower ΔL for every scheme",
        section="05_hidden_state",
        measurement="Spearman correlation of L0 and ΔL along the sweep for EPD, encode-decode current "
        "and previous (measure_l0_sweep)",
        rule=f"every scheme's ρ(L0, ΔL) ≤ {L0_DL_RHO}",
        why="'every scheme, lower' is a monotone trend: one swapped neighbour in five points allowed",
        checks=lambda m: _sweep_checks(m, "dl"),
        describe=_sweep_text,
    ),
    Claim[L0Sweep](
        key="fig14_epd_above_encdec",
        figure="Fig. 14",
        text="encode-permute-decode has a higher ΔL than both encode-decode schemes",
        section="05_hidden_state",
        measurement="fraction of the sweep's L0 points where EPD's ΔL is above both (measure_l0_sweep)",
        rule="at every L0 point",
        why="the paper states it without exception",
        checks=lambda m: _sweep_checks(m, "above"),
        describe=_sweep_text,
    ),
    Claim[L0Neighbours](
        key="fig15_l0_neighbours",
        figure="Fig. 15",
        text="choosing, per layer, SAEs whose L0 is close to their neighbours' raises the explained "
        "variance of the permutations in the early layers",
        section="06_objective",
        measurement="EV change at early pairs after retraining one SAE at its neighbour's L0, with "
        "the rank correlations of L0 mismatch and matching quality (measure_l0_neighbours)",
        rule=f"EV rises at ≥ {L0_GAIN_PAIRS:g} of the retrained pairs and the mean gain > 0",
        why="the paper shows bumps removed; with three retrained pairs, two of three plus a positive "
        "mean is the smallest majority",
        checks=lambda m: [
            Check(
                "retrained pairs where EV rose",
                float(sum(g > 0 for g in m.ev_gain)) if m.ev_gain else _NAN,
                "≥",
                L0_GAIN_PAIRS,
            ),
            Check("mean EV gain", _nanmean(m.ev_gain) if m.ev_gain else _NAN, ">", 0.0),
        ],
        describe=_l0_text,
    ),
    Claim[QuantileShape](
        key="fig16_quantile",
        figure="Figs. 16/17",
        text="the lower the MSE of the swapped features, the higher the explained variance; for large "
        "MSE the explained variance varies little",
        section="05_hidden_state",
        measurement="per tested layer (3, 10, 20 mapped) ρ(q, EV) of the hybrid; the EV lost swapping "
        "the low-MSE half (q 0→0.5) and the high-MSE half (q 0.5→1) (measure_quantile_shape)",
        rule=f"ρ(q, EV) ≤ {QUANTILE_RHO} at every layer and high-half loss ≤ {QUANTILE_FLAT} × low-half loss",
        why="'the lower the MSE the higher the EV' is a monotone fall with q; 'varies little for large "
        "MSE' is the curve flattening: the high-MSE half costing at most half of the low-MSE half",
        checks=lambda m: [
            Check("largest ρ(q, EV) over layers", m.rho_max, "≤", QUANTILE_RHO),
            Check("high-half / low-half EV loss", _flatness(m), "≤", QUANTILE_FLAT),
        ],
        describe=lambda m: (
            f"largest ρ(q, EV) {m.rho_max:+.2f} over layers {list(m.layers)}; EV lost q 0→0.5 "
            f"{m.drop_low:+.3f}, q 0.5→1 {m.drop_high:+.3f}"
        ),
    ),
)

_OURS: tuple[Claim[Any], ...] = (
    Claim[Comparison](
        key="ours_match_vs_drop",
        figure="Figs. 10/11 (ours)",
        text="SAE Match approximates h_t better than dropping block t (h_t ≈ h_{t−1})",
        section="05_hidden_state",
        measurement="(corpus, layer) cases where folded SAE Match has a lower ΔL / higher EV than layer "
        "drop (measure_match_vs)",
        rule="both in more than half of the cases",
        why="a majority of cases on both measures",
        checks=_comparison_checks,
        describe=_comparison_text,
    ),
    Claim[Comparison](
        key="ours_match_vs_linear",
        figure="Figs. 10/11 (ours)",
        text="SAE Match approximates h_t better than a least-squares linear map h_{t−1} → h_t",
        section="05_hidden_state",
        measurement="(corpus, layer) cases where folded SAE Match has a lower ΔL / higher EV than the "
        "least-squares map fitted on held-out tokens (measure_match_vs)",
        rule="both in more than half of the cases",
        why="a majority of cases on both measures",
        checks=_comparison_checks,
        describe=_comparison_text,
    ),
    Claim[Comparison](
        key="ours_folded_vs_cosine_approx",
        figure="Figs. 10/11 (ours)",
        text="folded SAE Match approximates h_t better than exact cosine matching of decoder rows",
        section="05_hidden_state",
        measurement="(corpus, layer) cases where folded SAE Match has a lower ΔL / higher EV than exact "
        "cosine matching (measure_match_vs)",
        rule="both in more than half of the cases",
        why="a majority of cases on both measures",
        checks=_comparison_checks,
        describe=_comparison_text,
    ),
    Claim[ScoreVs](
        key="ours_folded_vs_cosine_score",
        figure="Fig. 7 (ours)",
        text="folded SAE Match finds partners that co-fire at least as often as exact cosine matching's",
        section="02_folding_vs_cosine",
        measurement="fraction of layer pairs where folded matching's Matching Score is at least exact "
        "cosine matching's (measure_score_vs)",
        rule="more than half of the layer pairs",
        why="a majority of pairs",
        checks=lambda m: [Check(f"fraction of pairs folded ≥ {m.other}", m.fraction, ">", 0.5)],
        describe=lambda m: (
            f"folded ≥ {m.other} on {m.fraction:.0%} of pairs; mean {m.folded:.3f} vs {m.other_score:.3f}"
        ),
    ),
    Claim[SeedCeiling](
        key="ours_seed_ceiling",
        figure="(ours)",
        text="our SAEs are reproducible enough to test the approximation: an SAE of the same layer "
        "from another seed, swapped in through SAE Match, keeps most of the SAE's own explained variance",
        section="08_beyond",
        measurement="mean over the seed layers of the EV of the same-layer swap and of the SAE's own "
        "reconstruction (measure_seed_ceiling)",
        rule=f"swap EV ≥ {CEILING_EV} × own EV",
        why="if two trainings of one layer cannot stand in for each other, a cross-layer swap failing "
        "says nothing about the method",
        checks=lambda m: [
            Check("same-layer swap EV / own EV", _ratio(m.ev_swap, m.ev_self), "≥", CEILING_EV)
        ],
        describe=lambda m: (
            f"EV own {m.ev_self:.2f}, same layer other seed {m.ev_swap:.2f}, previous layer (SAE Match) "
            f"{m.ev_previous:.2f}; neighbour Matching Score {m.score_fraction:.0%} of the same-layer one "
            f"(layers {list(m.layers)})"
        ),
    ),
)

PAPER_CLAIMS: Mapping[str, Claim[Any]] = {c.key: c for c in _PAPER}
"""The paper's claims, by key, in the order of the reproduction table."""
OUR_CLAIMS: Mapping[str, Claim[Any]] = {c.key: c for c in _OURS}
"""Our own comparisons (the paper does not make them), by key: the "Beyond the paper" table."""
CLAIMS: Mapping[str, Claim[Any]] = {**PAPER_CLAIMS, **OUR_CLAIMS}
"""Every claim: :data:`PAPER_CLAIMS` then :data:`OUR_CLAIMS`."""


# ============================================================================================ files
def write_claims(out_dir: str | os.PathLike[str], section: str, findings: Sequence[Finding]) -> Path:
    """Store a notebook's findings as ``out_dir/claims.json`` (atomically), in the given order."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"key": f.key, "ours": f.ours, "holds": f.holds, "reason": f.reason, "section": section}
        for f in findings
        if isinstance(f, Finding)
    ]
    if len(rows) != len(findings):
        raise TypeError("findings: expected a sequence of Finding")
    path = folder / CLAIMS_FILE
    atomic_write_text(path, json.dumps({"section": section, "claims": rows}, indent=1) + "\n")
    return path


def read_claims(results_root: str | os.PathLike[str]) -> list[Finding]:
    """Every finding recorded under ``results_root/*/claims.json``, in the order of :data:`CLAIMS`.

    When two sections record the same claim, the one recorded by the claim's own ``section`` wins
    (e.g. a placeholder "not measured" written elsewhere until that section exists).
    """
    root = Path(results_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: results folder does not exist")
    found: dict[str, Finding] = {}
    for path in sorted(root.glob(f"*/{CLAIMS_FILE}")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for row in doc.get("claims", []):
            if row["key"] not in CLAIMS:
                continue  # a claim this version no longer tests (an old results folder)
            f = Finding(
                key=row["key"],
                ours=str(row["ours"]),
                holds=row["holds"],
                reason=str(row.get("reason", "")),
                section=str(row["section"]),
            )
            old = found.get(f.key)
            if old is None or old.section != CLAIMS[f.key].section:
                found[f.key] = f
    order = list(CLAIMS)
    return sorted(found.values(), key=lambda f: order.index(f.key))


_VERDICT = {True: "reproduced", False: "not reproduced", None: "not measurable here"}
_VERDICT_OURS = {True: "holds", False: "does not hold", None: "not measurable here"}


def _verdict(finding: Finding) -> str:
    """The verdict's words: a claim of the paper is (not) reproduced, a question of ours (does not) hold."""
    return (_VERDICT_OURS if finding.key in OUR_CLAIMS else _VERDICT)[finding.holds]


def finding_markdown(finding: Finding) -> str:
    """A finding as the Markdown paragraph a notebook shows under its figure: the claim with its
    figure, our measurement, the verdict (with the failed checks) and the rule with its threshold.

    >>> f = CLAIMS["fig3_depth_trend"].evaluate(DepthTrend(rho_enc=-0.4, rho_dec=0.9))
    >>> "**not reproduced** (ρ(layer, W_enc MSE) = -0.4 (needs ≤ -0.5))" in finding_markdown(f)
    True
    """
    c = finding.claim
    reason = f" ({finding.reason})" if finding.reason else ""
    whose = "our question" if finding.key in OUR_CLAIMS else f"{c.figure}, the paper"
    return (
        f"*{whose}:* {c.text}.\n\n"
        f"*Ours:* {finding.ours}.\n\n"
        f"Verdict: **{_verdict(finding)}**{reason}. Rule: {c.rule}."
    )


def _table(findings: Sequence[Finding], first: str, link_prefix: str) -> str:
    body = []
    for f in findings:
        c = f.claim
        link = f'<a href="{html.escape(link_prefix + f.section)}.html">{html.escape(f.section)}</a>'
        verdict = _verdict(f) + (f": {f.reason}" if f.reason else "")
        body.append(
            "<tr>"
            f"<td>{html.escape(c.figure)}: {html.escape(f.paper)}</td><td>{html.escape(f.ours)}</td>"
            f"<td>{html.escape(verdict)}</td>"
            f"<td>{html.escape(c.rule)} <em>(why: {html.escape(c.why)})</em></td><td>{link}</td>"
            "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in (first, "our measurement", "verdict", "rule", "section"))
    return (
        f'<table class="saematch-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def claims_table_html(findings: Sequence[Finding], link_prefix: str = "", which: str = "both") -> str:
    """The reproduction table as HTML: claim (with its figure), our measurement, verdict (with the
    reason when not reproduced), the rule with its threshold and why, link to the section.

    ``which``: ``"paper"`` (the paper's claims), ``"ours"`` (our comparisons) or ``"both"`` (the
    paper's, then ours under "Beyond the paper" when measured). ``link_prefix`` is prepended to
    ``<section>.html`` (e.g. ``"../notebooks/"`` from the intro page).
    """
    if which not in ("paper", "ours", "both"):
        raise ValueError(f"which: expected 'paper', 'ours' or 'both', got {which!r}")
    paper = [f for f in findings if f.key in PAPER_CLAIMS]
    ours = [f for f in findings if f.key in OUR_CLAIMS]
    if which == "ours":
        return _table(ours, "our comparison", link_prefix)
    out = _table(paper, "paper's claim", link_prefix)
    if which == "both" and ours:
        out += "<p><strong>Beyond the paper</strong></p>" + _table(ours, "our comparison", link_prefix)
    return out
