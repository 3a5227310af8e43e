"""Evidence for H2 ("folding improves matching") that folding's own objective cannot produce.

Folding is judged in the paper partly by the parameter MSE it minimises, which is circular. Two
data-based tests live here; the others are reused from the experiment engine (the Matching Score,
:func:`saematch_core.evaluate.matching_scores`; ΔL of folded vs unfolded matching,
:func:`saematch_core.approximate.approximate_layers`; contexts,
:func:`saematch_core.contexts.pair_contexts`).

1. **Does θ track the feature's activation scale?** Folding's premise is that a JumpReLU
   threshold ``θ_i`` measures how large feature ``i``'s activations are. Per feature, from data:
   ``m_i = E[f_i | f_i > 0]`` (:func:`saematch_core.family_fold.activation_scale`) against ``θ_i``,
   with the Spearman rank correlation (and its p-value), the correlation and slope of ``log m`` on
   ``log θ``, and the spread of ``m_i / θ_i``. Since ``f_i > θ_i`` whenever active, ``m_i ≥ θ_i``
   always; the question is whether θ also orders the features by scale.
2. **Head-to-head on disagreements.** Where folded and unfolded matching give a feature
   *different* partners, which partner co-activates with it more on real tokens? Each such feature
   is one paired comparison of ``P(partner active | feature active)``; a two-sided sign test over
   them says whether one matching wins more often than chance. Features where both matchings agree
   carry no information about H2 and are left out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from scipy import stats as sps
from tqdm.auto import tqdm

from saematch_core.evaluate import coactivation, pair_metrics
from saematch_core.family_fold import activation_scale
from saematch_core.match import MatchConfig
from saematch_core.results import (
    ArrayLike,
    JsonResult,
    acts_digest,
    cached_match,
    finite_mean,
    load_or_compute,
    map_layer_pairs,
    sae_digest,
)
from saematch_core.sae import SAE

__all__ = [
    "Disagreement",
    "DisagreementResult",
    "DisagreementRow",
    "ThetaScaleResult",
    "ThetaScaleRow",
    "disagreements_by_layer",
    "theta_scale_row",
    "theta_vs_scale",
]


# ----------------------------------------------------------------------------------- θ vs scale
@dataclass(frozen=True, kw_only=True)
class ThetaScaleRow:
    """θ against the measured activation scale, per feature, on one layer."""

    layer: int
    n_alive: int
    """Features active at least ``min_count`` times (the ones tested)."""
    spearman: float
    """Rank correlation of ``θ_i`` and ``m_i``."""
    spearman_p: float
    """Two-sided p-value of the rank correlation."""
    log_pearson: float
    """Correlation of ``log θ`` and ``log m``."""
    log_slope: float
    """Least-squares slope of ``log m`` on ``log θ`` (1: scale proportional to θ)."""
    ratio_median: float
    """Median of ``m_i / θ_i``."""
    ratio_q05: float
    ratio_q95: float
    theta_mean: float
    scale_mean: float
    """Mean of ``m_i`` over tested features."""


@dataclass(frozen=True, kw_only=True)
class ThetaScaleResult(JsonResult):
    """Rows per layer."""

    kind: ClassVar[str] = "theta_vs_scale"
    rows: tuple[ThetaScaleRow, ...]

    def series(self, metric: str) -> tuple[float, ...]:
        """``metric`` per row, in order."""
        return tuple(float(getattr(r, metric)) for r in self.rows)

    def mean(self, metric: str) -> float:
        """Mean of :meth:`series` where it is defined (``nan`` if nowhere)."""
        return finite_mean(self.series(metric))


def theta_scale_row(layer: int, theta: torch.Tensor, scale: torch.Tensor) -> ThetaScaleRow:
    """Statistics of one layer from per-feature ``theta`` and measured ``scale`` (``nan`` = dead).

    Parameters
    ----------
    theta, scale : Tensor, shape (d_sae,)
    """
    t = torch.as_tensor(theta, dtype=torch.float64).cpu().numpy()
    m = torch.as_tensor(scale, dtype=torch.float64).cpu().numpy()
    if t.shape != m.shape or t.ndim != 1:
        raise ValueError(f"theta, scale: expected equal 1-D shapes, got {t.shape} and {m.shape}")
    ok = np.isfinite(t) & np.isfinite(m) & (t > 0) & (m > 0)
    t, m = t[ok], m[ok]
    nan = math.nan
    if t.size < 3:
        return ThetaScaleRow(
            layer=layer,
            n_alive=int(t.size),
            spearman=nan,
            spearman_p=nan,
            log_pearson=nan,
            log_slope=nan,
            ratio_median=nan,
            ratio_q05=nan,
            ratio_q95=nan,
            theta_mean=nan,
            scale_mean=nan,
        )
    lt, lm = np.log(t), np.log(m)
    if np.ptp(lt) > 0 and np.ptp(lm) > 0:
        rho, p = sps.spearmanr(t, m)
        r = float(np.corrcoef(lt, lm)[0, 1])
        slope = float(np.polyfit(lt, lm, 1)[0])
    else:
        rho, p, r, slope = nan, nan, nan, nan
    ratio = m / t
    return ThetaScaleRow(
        layer=layer,
        n_alive=int(t.size),
        spearman=float(rho),  # type: ignore[arg-type]
        spearman_p=float(p),  # type: ignore[arg-type]
        log_pearson=r,
        log_slope=slope,
        ratio_median=float(np.median(ratio)),
        ratio_q05=float(np.quantile(ratio, 0.05)),
        ratio_q95=float(np.quantile(ratio, 0.95)),
        theta_mean=float(t.mean()),
        scale_mean=float(m.mean()),
    )


def theta_vs_scale(
    saes: Mapping[int, SAE],
    activations: Mapping[int, ArrayLike],
    *,
    keep: ArrayLike | None = None,
    chunk_size: int = 4096,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> ThetaScaleResult:
    """:func:`theta_scale_row` for every JumpReLU layer with activations; each layer cached."""
    rows = []
    layers = [t for t in sorted(saes) if t in activations and saes[t].activation == "jumprelu"]
    for layer in tqdm(layers, desc="θ vs activation scale", disable=not progress):
        sae = saes[layer]
        spec = {
            "sae": sae_digest(sae),
            "acts": acts_digest(activations[layer]),
            "keep": None if keep is None else acts_digest(keep),
            "layer": layer,
        }

        def compute(sae: SAE = sae, layer: int = layer) -> ThetaScaleResult:
            assert sae.threshold is not None  # JumpReLU, filtered above
            scale = activation_scale(sae, activations[layer], keep=keep, chunk_size=chunk_size)
            return ThetaScaleResult(rows=(theta_scale_row(layer, sae.threshold, scale),))

        rows.extend(load_or_compute(ThetaScaleResult, spec, compute, cache_dir=cache_dir, force=force).rows)
    return ThetaScaleResult(rows=tuple(rows))


# ----------------------------------------------------------------------------------- disagreements
@dataclass(frozen=True, kw_only=True)
class Disagreement:
    """One feature whose folded and unfolded partners differ."""

    feature: int
    partner_folded: int
    partner_unfolded: int
    p_folded: float
    """``P(folded partner active | feature active)``."""
    p_unfolded: float


@dataclass(frozen=True, kw_only=True)
class DisagreementRow:
    """Folded vs unfolded matching, head-to-head on the features where they disagree."""

    layer_a: int
    layer_b: int
    n_features: int
    n_disagree: int
    """Features with different partners under the two matchings."""
    n_compared: int
    """Of those, features alive with both partners alive (the paired comparisons)."""
    folded_wins: int
    unfolded_wins: int
    ties: int
    sign_test_p: float
    """Two-sided binomial test of ``folded_wins`` vs ``unfolded_wins`` (ties dropped)."""
    mean_p_folded: float
    """Mean ``P(partner active | feature active)`` of the folded partners on compared features."""
    mean_p_unfolded: float
    score_folded: float
    """Matching Score of the folded matching over all its included pairs."""
    score_unfolded: float
    examples: tuple[Disagreement, ...]
    """The compared features with the largest ``|p_folded − p_unfolded|`` (for contexts)."""


@dataclass(frozen=True, kw_only=True)
class DisagreementResult(JsonResult):
    """Rows per layer pair."""

    kind: ClassVar[str] = "h2_disagreements"
    rows: tuple[DisagreementRow, ...]

    def series(self, metric: str) -> tuple[float, ...]:
        """``metric`` per row, in order."""
        return tuple(float(getattr(r, metric)) for r in self.rows)

    def mean(self, metric: str) -> float:
        """Mean of :meth:`series` where it is defined (``nan`` if nowhere)."""
        return finite_mean(self.series(metric))


def _disagreement_row(
    a: SAE,
    b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    layers: tuple[int, int],
    folded: MatchConfig,
    unfolded: MatchConfig,
    keep: ArrayLike | None,
    n_examples: int,
    chunk_size: int,
    cache_dir: str | Path | None,
) -> DisagreementRow:
    pf, pu = cached_match(a, b, folded, cache_dir).perm, cached_match(a, b, unfolded, cache_dir).perm
    stats = coactivation(
        a, b, acts_a, acts_b, {"folded": pf, "unfolded": pu}, keep=keep, chunk_size=chunk_size
    )
    mf, mu = pair_metrics(stats, "folded")["p_partner"], pair_metrics(stats, "unfolded")["p_partner"]
    differ = pf != pu
    both = differ & ~torch.isnan(mf) & ~torch.isnan(mu)
    idx = both.nonzero().flatten()
    x, y = mf[idx], mu[idx]
    wins_f, wins_u = int((x > y).sum()), int((y > x).sum())
    n = wins_f + wins_u
    p = float(sps.binomtest(wins_f, n, 0.5).pvalue) if n else math.nan
    order = torch.argsort((x - y).abs(), descending=True)[:n_examples]
    examples = tuple(
        Disagreement(
            feature=int(idx[k]),
            partner_folded=int(pf[idx[k]]),
            partner_unfolded=int(pu[idx[k]]),
            p_folded=float(x[k]),
            p_unfolded=float(y[k]),
        )
        for k in order.tolist()
    )
    return DisagreementRow(
        layer_a=layers[0],
        layer_b=layers[1],
        n_features=a.d_sae,
        n_disagree=int(differ.sum()),
        n_compared=int(idx.numel()),
        folded_wins=wins_f,
        unfolded_wins=wins_u,
        ties=int(idx.numel()) - n,
        sign_test_p=p,
        mean_p_folded=float(x.mean()) if x.numel() else math.nan,
        mean_p_unfolded=float(y.mean()) if y.numel() else math.nan,
        score_folded=finite_mean(mf),
        score_unfolded=finite_mean(mu),
        examples=examples,
    )


def disagreements_by_layer(
    saes: Mapping[int, SAE],
    activations: Mapping[int, ArrayLike],
    *,
    folded: MatchConfig | None = None,
    unfolded: MatchConfig | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    keep: ArrayLike | None = None,
    n_examples: int = 3,
    chunk_size: int = 4096,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> DisagreementResult:
    """Head-to-head test of folded vs unfolded matching per layer pair (module docstring, test 2).

    Parameters
    ----------
    folded, unfolded : the two matchings; default the paper's objective with and without folding.
    pairs : default consecutive layers with SAEs and activations.
    n_examples : disagreements kept per pair for showing their contexts.
    """
    f_cfg = MatchConfig(fold=True) if folded is None else folded
    u_cfg = MatchConfig(fold=False) if unfolded is None else unfolded
    if pairs is None:
        pairs = list(itertools.pairwise(sorted(set(saes) & set(activations))))

    def compute(la: int, lb: int) -> DisagreementResult:
        a, b = saes[la], saes[lb]
        row = _disagreement_row(
            a,
            b,
            activations[la],
            activations[lb],
            (la, lb),
            f_cfg,
            u_cfg,
            keep,
            n_examples,
            chunk_size,
            cache_dir,
        )
        return DisagreementResult(rows=(row,))

    parts = map_layer_pairs(
        DisagreementResult,
        saes,
        pairs,
        compute,
        spec={"folded": f_cfg.to_dict(), "unfolded": u_cfg.to_dict(), "n_examples": n_examples},
        activations=activations,
        keep=keep,
        desc="folded vs unfolded",
        cache_dir=cache_dir,
        force=force,
        progress=progress,
    )
    return DisagreementResult(rows=tuple(r for part in parts for r in part.rows))
