"""The claims the book tests, each with the measurement it reads and its verdict rule, as code.

Every claim is a :class:`Claim`: its ``key``, the ``figure`` it comes from, its ``text``, the
notebook ``section`` that measures it, what it reads (``measurement``, in words, and the typed
measurement its ``verdict`` takes) and the verdict ``rule`` with its threshold, in words and as the
``verdict`` function. Two registries:

- :data:`PAPER_CLAIMS`: what the paper claims (the "paper's claim" column of the reproduction table);
- :data:`OUR_CLAIMS`: comparisons of our own that the paper does not make ("Beyond the paper").

A notebook computes a claim's measurement through the library (the ``measure_*`` functions below
turn experiment results into measurements), calls :meth:`Claim.evaluate` and records the
:class:`Finding` with :func:`write_claims`; the last notebook collects every section's findings
with :func:`read_claims` and shows :func:`claims_table_html`. No verdict and no threshold lives in a
notebook, and every rule is tested on synthetic measurements.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from saematch_core.cache import atomic_write_text
from saematch_core.experiments.agreement import MSEBinnedAgreement
from saematch_core.experiments.approximate import ApproximationResult, L0SweepResult
from saematch_core.experiments.matching_score import MatchingScores
from saematch_core.experiments.measures.summary import correlation, early_late_split, first_below
from saematch_core.experiments.parameter_mse import ParameterMSEResult
from saematch_core.experiments.persistence import PersistenceResult
from saematch_core.experiments.scale import ScaleDepthResult

__all__ = [
    "CLAIMS",
    "CLAIMS_FILE",
    "EARLY_DROP",
    "FOLDED_TIE",
    "OUR_CLAIMS",
    "PAPER_CLAIMS",
    "PERSISTENCE_AGREEMENT",
    "PERSISTENCE_MIN_LAYERS",
    "THETA_NORM_MIN_R",
    "AgreementByMSE",
    "BestL0",
    "CaseCount",
    "Claim",
    "DecoderOnly",
    "EarlyLate",
    "Finding",
    "FoldedMSE",
    "PersistenceHorizons",
    "QuantileGain",
    "ScoreComparison",
    "ThetaNorm",
    "claims_table_html",
    "measure_agreement",
    "measure_best_l0",
    "measure_decoder_only",
    "measure_early_late",
    "measure_folded_ev",
    "measure_folded_mse",
    "measure_folded_score",
    "measure_match_vs_drop",
    "measure_persistence",
    "measure_quantile_gain",
    "measure_theta_norm",
    "read_claims",
    "write_claims",
]

CLAIMS_FILE = "claims.json"
"""File name, inside a notebook's ``out_dir``, of the findings it recorded (see :func:`write_claims`)."""

_M = TypeVar("_M")

FOLDED_TIE = 1e-12
"""Folded matching counts as "not worse" than unfolded on a layer pair within this MSE tolerance."""
THETA_NORM_MIN_R = 0.5
"""Fig. 1 holds when mean θ and mean ‖h‖ correlate above this across layers."""
EARLY_DROP = 0.75
"""Fig. 7's "much worse": early layers score below this fraction of the later layers' score."""
PERSISTENCE_MIN_LAYERS = 3
"""Fig. 8 holds when composed and direct matching agree on ≥ half the features for at least this
many layers from every start."""
PERSISTENCE_AGREEMENT = 0.5
"""The agreement below which a composed path counts as diverged from direct matching."""


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One row of the reproduction table: a claim as measured by one notebook."""

    key: str
    """Key into :data:`CLAIMS`."""
    ours: str
    """Our measurement, formatted for the table."""
    holds: bool | None
    """Whether our measurement supports the claim (``None``: not measurable on this profile)."""
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
    """The claim as stated (for :data:`OUR_CLAIMS`: our question)."""
    section: str
    """The notebook stem that measures it (e.g. ``"02_folding_vs_cosine"``)."""
    measurement: str
    """What the verdict reads, in words."""
    rule: str
    """The verdict rule with its threshold, in words."""
    verdict: Callable[[_M], bool | None]
    """The rule as code: True (reproduced), False (not), ``None`` (not measurable here)."""
    describe: Callable[[_M], str]
    """Our measurement as the table shows it."""

    def evaluate(self, measured: _M) -> Finding:
        """The :class:`Finding` of ``measured`` (the verdict and the formatted measurement)."""
        return Finding(key=self.key, ours=self.describe(measured), holds=self.verdict(measured))


# ============================================================================================ measurements
def _nan(x: float) -> bool:
    return x != x


@dataclass(frozen=True)
class ThetaNorm:
    """Fig. 1: how mean θ follows the hidden-state norm across layers."""

    r_theta_norm: float
    """Pearson correlation across layers of mean θ and mean ‖h‖ (``nan`` if undefined)."""
    r_theta_depth: float
    """Pearson correlation of mean θ with the layer index."""
    n_layers: int


def measure_theta_norm(scale: ScaleDepthResult) -> ThetaNorm:
    """:class:`ThetaNorm` of a Fig. 1 result."""
    layers = [r.layer for r in scale.rows]
    theta = [r.theta_mean for r in scale.rows]
    norm = [r.norm_mean for r in scale.rows]
    return ThetaNorm(
        r_theta_norm=correlation(theta, norm), r_theta_depth=correlation(layers, theta), n_layers=len(layers)
    )


@dataclass(frozen=True)
class FoldedMSE:
    """Fig. 3: folded vs unfolded (and identity-order) matching, scored on folded parameters."""

    folded_best: float
    """Fraction of layer pairs where folded matching's MSE ≤ unfolded's (within :data:`FOLDED_TIE`)."""
    folded_vs_vanilla: float
    """Median over layer pairs of MSE(folded) / MSE(identity order)."""


def measure_folded_mse(mse: ParameterMSEResult) -> FoldedMSE:
    """:class:`FoldedMSE` of a parameter-MSE result with ``folded``, ``unfolded`` and ``vanilla`` rows."""
    folded, unfolded = np.asarray(mse.series("folded")), np.asarray(mse.series("unfolded"))
    vanilla = np.asarray(mse.series("vanilla"))
    return FoldedMSE(
        folded_best=float(np.mean(folded <= unfolded + FOLDED_TIE)),
        folded_vs_vanilla=float(np.median(folded / vanilla)),
    )


@dataclass(frozen=True)
class DecoderOnly:
    """Fig. 12: matching on one part of the parameters, against all of them."""

    decoder_ratio: float
    """Median over layer pairs of MSE(decoder-only) / MSE(all parameters)."""
    encoder_ratio: float
    """Median over layer pairs of MSE(encoder-only) / MSE(all parameters)."""


def measure_decoder_only(mse: ParameterMSEResult) -> DecoderOnly:
    """:class:`DecoderOnly` of a parameter-MSE result with ``folded``, ``decoder_only`` and
    ``encoder_only`` rows."""
    folded = np.asarray(mse.series("folded"))
    return DecoderOnly(
        decoder_ratio=float(np.median(np.asarray(mse.series("decoder_only")) / folded)),
        encoder_ratio=float(np.median(np.asarray(mse.series("encoder_only")) / folded)),
    )


@dataclass(frozen=True)
class ScoreComparison:
    """Fig. 7: the mean Matching Score over layer pairs of folded and unfolded matching."""

    folded: float
    unfolded: float


def measure_folded_score(scores: MatchingScores) -> ScoreComparison:
    """:class:`ScoreComparison` of Matching Scores with ``folded`` and ``unfolded`` rows (the mean
    ignores undefined pairs)."""
    return ScoreComparison(
        folded=float(np.nanmean(scores.series("folded"))),
        unfolded=float(np.nanmean(scores.series("unfolded"))),
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
class AgreementByMSE:
    """Figs. 5/6: agreement on data of the lowest- and highest-MSE bins of one layer pair."""

    layer_a: int
    layer_b: int
    low: float
    """Mean ``P(partner active | feature active)`` in the lowest-MSE bin."""
    high: float
    """The same in the highest-MSE bin."""
    n_low: int
    """Pairs in the lowest bin."""
    n_high: int


def measure_agreement(binned: MSEBinnedAgreement) -> AgreementByMSE:
    """:class:`AgreementByMSE` of an MSE-binned agreement (its first and last bins)."""
    low, high = binned.bins[0], binned.bins[-1]
    return AgreementByMSE(
        layer_a=binned.layer_a,
        layer_b=binned.layer_b,
        low=low.p_partner,
        high=high.p_partner,
        n_low=low.n_pairs,
        n_high=high.n_pairs,
    )


@dataclass(frozen=True)
class PersistenceHorizons:
    """Fig. 8: how far composed matching agrees with direct matching from each start layer."""

    horizons: Mapping[int, float]
    """Start layer → the first distance at which the agreement falls below
    :data:`PERSISTENCE_AGREEMENT` (``inf``: never within the distances followed)."""
    max_distance: int
    """The farthest distance followed."""


def measure_persistence(result: PersistenceResult) -> PersistenceHorizons:
    """:class:`PersistenceHorizons` of a persistence result."""
    distances, curves = result.curves("agreement")
    horizons = {s: first_below(distances, v, PERSISTENCE_AGREEMENT) for s, v in curves.items()}
    return PersistenceHorizons(horizons=horizons, max_distance=max(distances))


@dataclass(frozen=True)
class CaseCount:
    """How often one scheme beats another over (corpus, layer) cases (Figs. 10/11)."""

    wins: int
    total: int


def _count(
    results: Mapping[str, ApproximationResult], better: Callable[[ApproximationResult, int], bool]
) -> CaseCount:
    wins = total = 0
    for r in results.values():
        for t in r.layers:
            total += 1
            wins += better(r, t)
    return CaseCount(wins=wins, total=total)


def measure_match_vs_drop(results: Mapping[str, ApproximationResult]) -> CaseCount:
    """(corpus, layer) cases where folded SAE Match's ΔL is below layer drop's."""
    return _count(results, lambda r, t: r.row(t, "match_folded").delta_loss < r.row(t, "drop").delta_loss)


def measure_folded_ev(results: Mapping[str, ApproximationResult]) -> CaseCount:
    """(corpus, layer) cases where folded SAE Match explains more variance than unfolded."""
    return _count(
        results,
        lambda r, t: (
            r.row(t, "match_folded").explained_variance > r.row(t, "match_unfolded").explained_variance
        ),
    )


@dataclass(frozen=True)
class BestL0:
    """Fig. 14: where along an L0 sweep folded SAE Match explains the most variance."""

    l0s: tuple[float, ...]
    """Measured L0 of the swept SAEs, ascending (empty: no sweep on this profile)."""
    best_l0: float
    """The L0 of the highest explained variance (``nan`` without a sweep)."""
    interior: bool | None
    """Whether the best L0 lies strictly inside the sweep (``None`` without a sweep)."""


def measure_best_l0(sweep: L0SweepResult | None) -> BestL0:
    """:class:`BestL0` of an L0 sweep's ``match_folded`` explained variance (``None``: no sweep)."""
    if sweep is None:
        return BestL0(l0s=(), best_l0=math.nan, interior=None)
    l0s, ev = sweep.series("match_folded", "explained_variance")
    i_best = int(np.nanargmax(np.asarray(ev)))
    return BestL0(l0s=tuple(l0s), best_l0=float(l0s[i_best]), interior=0 < i_best < len(l0s) - 1)


@dataclass(frozen=True)
class QuantileGain:
    """Figs. 16/17: explained variance of the hybrid at the first quantile minus at the last."""

    q_first: float
    q_last: float
    gain: float
    """Mean over layers of EV(q_first) − EV(q_last)."""


def measure_quantile_gain(hybrid: ApproximationResult, quantiles: Sequence[float]) -> QuantileGain:
    """:class:`QuantileGain` of a hybrid result whose schemes are one per quantile, in order."""
    labels = hybrid.schemes
    if len(labels) != len(quantiles):
        raise ValueError(f"quantiles: expected one per hybrid scheme ({len(labels)}), got {len(quantiles)}")
    gains = [
        hybrid.row(t, labels[0]).explained_variance - hybrid.row(t, labels[-1]).explained_variance
        for t in hybrid.layers
    ]
    return QuantileGain(q_first=float(quantiles[0]), q_last=float(quantiles[-1]), gain=float(np.mean(gains)))


# ============================================================================================ registry
def _early_late_text(m: EarlyLate) -> str:
    return f"folded Matching Score early {m.early:.3f} vs later {m.late:.3f} ({m.early / m.late - 1:+.0%})"


def _persistence_text(m: PersistenceHorizons) -> str:
    summary = ", ".join(f"L{s}: {h:g}" for s, h in m.horizons.items())
    return f"agreement < 50% after {summary} layers (max {m.max_distance} followed)"


def _agreement_holds(m: AgreementByMSE) -> bool | None:
    if not (m.n_low and m.n_high) or _nan(m.low):
        return None
    return bool(m.low > m.high)


_PAPER: tuple[Claim[Any], ...] = (
    Claim[ThetaNorm](
        key="fig1_theta_norm",
        figure="Fig. 1",
        text="mean θ grows with depth like the hidden-state norm (Fig. 1)",
        section="01_hypotheses",
        measurement="Pearson correlation across layers of the mean JumpReLU threshold and the mean "
        "residual norm (measure_theta_norm)",
        rule=f"reproduced when the correlation exceeds {THETA_NORM_MIN_R}; not measurable when undefined",
        verdict=lambda m: None if _nan(m.r_theta_norm) else bool(m.r_theta_norm > THETA_NORM_MIN_R),
        describe=lambda m: f"corr(mean θ, mean ‖h‖) = {m.r_theta_norm:.2f} over {m.n_layers} layers",
    ),
    Claim[FoldedMSE](
        key="fig3_folded_beats_unfolded",
        figure="Fig. 3",
        text="folded + matched: lowest parameter MSE at every layer pair (Fig. 3)",
        section="02_folding_vs_cosine",
        measurement="fraction of layer pairs where folded matching's folded-parameter MSE is at most "
        "unfolded matching's (measure_folded_mse)",
        rule=f"reproduced when folded ≤ unfolded (within {FOLDED_TIE:g}) on every layer pair",
        verdict=lambda m: m.folded_best == 1.0,
        describe=lambda m: (
            f"folded ≤ unfolded on {m.folded_best:.0%} of pairs; folded/vanilla MSE {m.folded_vs_vanilla:.2f}"
        ),
    ),
    Claim[DecoderOnly](
        key="fig12_decoder_only",
        figure="Fig. 12",
        text="decoder-only ≈ all parameters; encoder-only much worse (Fig. 12)",
        section="02_folding_vs_cosine",
        measurement="median MSE ratio to all-parameter matching of decoder-only and encoder-only "
        "matching (measure_decoder_only)",
        rule="reproduced when decoder-only's ratio is below encoder-only's",
        verdict=lambda m: bool(m.decoder_ratio < m.encoder_ratio),
        describe=lambda m: (
            f"MSE ratio to all-params: decoder-only {m.decoder_ratio:.2f}, encoder-only {m.encoder_ratio:.2f}"
        ),
    ),
    Claim[ScoreComparison](
        key="fig7_folded_score",
        figure="Fig. 7",
        text="Matching Score: folded ≥ unfolded (Fig. 7)",
        section="02_folding_vs_cosine",
        measurement="mean Matching Score over layer pairs of folded and unfolded matching "
        "(measure_folded_score)",
        rule="reproduced when folded ≥ unfolded",
        verdict=lambda m: bool(m.folded >= m.unfolded),
        describe=lambda m: f"Matching Score folded {m.folded:.3f} vs unfolded {m.unfolded:.3f}",
    ),
    Claim[EarlyLate](
        key="fig7_early_layers",
        figure="Fig. 7",
        text="layers 0–9 of 26 (first 38% of depth) match much worse than 10–25 (Fig. 7)",
        section="02_folding_vs_cosine",
        measurement="folded Matching Score averaged over the first 10/26 of the depth and over the "
        "rest (measure_early_late)",
        rule=f'reproduced when the early mean is below {EARLY_DROP} × the later mean ("much worse": '
        f"at least {1 - EARLY_DROP:.0%} lower); not measurable when either is undefined",
        verdict=lambda m: None if _nan(m.early) or _nan(m.late) else bool(m.early < EARLY_DROP * m.late),
        describe=_early_late_text,
    ),
    Claim[AgreementByMSE](
        key="fig5_low_mse_agree",
        figure="Figs. 5/6",
        text="low-MSE pairs are mostly SAME; a long tail of high-MSE failures (Figs. 5/6)",
        section="03_feature_matching",
        measurement="P(partner active | feature active) in the lowest- and highest-MSE bins of one "
        "layer pair (measure_agreement)",
        rule="reproduced when the lowest-MSE bin agrees more than the highest; not measurable when a "
        "bin is empty or undefined",
        verdict=_agreement_holds,
        describe=lambda m: (
            f"layers {m.layer_a}→{m.layer_b}: agreement {m.low:.2f} (lowest-MSE bin) vs "
            f"{m.high:.2f} (highest)"
        ),
    ),
    Claim[PersistenceHorizons](
        key="fig8_persistence",
        figure="Fig. 8",
        text="composed ≈ direct matching for about 5 layers (Fig. 8)",
        section="04_persistence",
        measurement=f"per start layer, the first distance at which composed and direct matching agree "
        f"on fewer than {PERSISTENCE_AGREEMENT:.0%} of the features (measure_persistence)",
        rule=f"reproduced when that distance is at least {PERSISTENCE_MIN_LAYERS} from every start",
        verdict=lambda m: bool(min(m.horizons.values()) >= PERSISTENCE_MIN_LAYERS),
        describe=_persistence_text,
    ),
    Claim[CaseCount](
        key="fig10_folded_vs_unfolded",
        figure="Figs. 10/11",
        text="folded matching approximates h_t better than unfolded (Figs. 10/11)",
        section="05_hidden_state",
        measurement="(corpus, layer) cases where folded SAE Match's explained variance is above "
        "unfolded's (measure_folded_ev)",
        rule="reproduced when folded wins in more than half of the cases",
        verdict=lambda m: bool(m.wins > m.total / 2),
        describe=lambda m: f"folded EV > unfolded in {m.wins}/{m.total} (corpus, layer) cases",
    ),
    Claim[BestL0](
        key="fig14_best_l0",
        figure="Fig. 14",
        text="the approximation is best around L0 ≈ 70 (Fig. 14, layers 20/21)",
        section="05_hidden_state",
        measurement="the L0 at which folded SAE Match explains the most variance along the L0 sweep "
        "(measure_best_l0)",
        rule="reproduced when the best L0 lies strictly inside the sweep (an optimum, not a trend); "
        "not measurable without a sweep",
        verdict=lambda m: m.interior,
        describe=lambda m: (
            "no sweep on this profile" if m.interior is None else f"SAE Match EV best at L0 = {m.best_l0:.0f}"
        ),
    ),
    Claim[QuantileGain](
        key="fig16_quantile",
        figure="Figs. 16/17",
        text="explained variance rises as q falls toward the well-matched features (Figs. 16/17)",
        section="05_hidden_state",
        measurement="mean over layers of the hybrid's EV at the first quantile minus at the last "
        "(measure_quantile_gain)",
        rule="reproduced when the difference is positive",
        verdict=lambda m: bool(m.gain > 0),
        describe=lambda m: f"EV(q={m.q_first:g}) − EV(q={m.q_last:g}) = {m.gain:+.3f}",
    ),
)

_OURS: tuple[Claim[Any], ...] = (
    Claim[CaseCount](
        key="fig10_match_vs_drop",
        figure="Figs. 10/11",
        text="SAE Match approximates h_t better than dropping the layer (Figs. 10/11)",
        section="05_hidden_state",
        measurement="(corpus, layer) cases where folded SAE Match's ΔL is below layer drop's "
        "(measure_match_vs_drop)",
        rule="holds when SAE Match wins in more than half of the cases",
        verdict=lambda m: bool(m.wins > m.total / 2),
        describe=lambda m: f"SAE Match ΔL < layer drop in {m.wins}/{m.total} (corpus, layer) cases",
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
        {"key": f.key, "ours": f.ours, "holds": f.holds, "section": section}
        for f in findings
        if isinstance(f, Finding)
    ]
    if len(rows) != len(findings):
        raise TypeError("findings: expected a sequence of Finding")
    path = folder / CLAIMS_FILE
    atomic_write_text(path, json.dumps({"section": section, "claims": rows}, indent=1) + "\n")
    return path


def read_claims(results_root: str | os.PathLike[str]) -> list[Finding]:
    """Every finding recorded under ``results_root/*/claims.json``, in the order of :data:`CLAIMS`."""
    root = Path(results_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: results folder does not exist")
    found: dict[str, Finding] = {}
    for path in sorted(root.glob(f"*/{CLAIMS_FILE}")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for row in doc.get("claims", []):
            found[row["key"]] = Finding(
                key=row["key"], ours=str(row["ours"]), holds=row["holds"], section=str(row["section"])
            )
    order = list(CLAIMS)
    return sorted(found.values(), key=lambda f: order.index(f.key))


_VERDICT = {True: "reproduced", False: "not reproduced", None: "not measurable here"}


def _table(findings: Sequence[Finding], first: str, link_prefix: str) -> str:
    body = []
    for f in findings:
        link = f'<a href="{html.escape(link_prefix + f.section)}.html">{html.escape(f.section)}</a>'
        body.append(
            "<tr>"
            f"<td>{html.escape(f.paper)}</td><td>{html.escape(f.ours)}</td>"
            f"<td>{_VERDICT[f.holds]}</td><td>{link}</td>"
            "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in (first, "ours", "verdict", "section"))
    return (
        f'<table class="saematch-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def claims_table_html(findings: Sequence[Finding], link_prefix: str = "") -> str:
    """The reproduction table as HTML: claim, ours, verdict, link to the section; the paper's claims
    first, then (when measured) our own comparisons under "Beyond the paper".

    ``link_prefix`` is prepended to ``<section>.html`` (e.g. ``"../notebooks/"`` from the intro page).
    """
    paper = [f for f in findings if f.key in PAPER_CLAIMS]
    ours = [f for f in findings if f.key in OUR_CLAIMS]
    out = _table(paper, "paper's claim", link_prefix)
    if ours:
        out += "<p><strong>Beyond the paper</strong></p>" + _table(ours, "our comparison", link_prefix)
    return out
