"""Does a JumpReLU threshold θ track its feature's activation scale? (folding's premise)

Folding is judged in the paper partly by the parameter MSE it minimises, which is circular; this
test and :mod:`saematch_core.experiments.circularity` use data instead. Folding's premise is that
θ_i measures how large feature ``i``'s activations are. Per feature, from data:
``m_i = E[f_i | f_i > 0]`` (:func:`~saematch_core.experiments.measures.scales.activation_scale`)
against ``θ_i``, with the Spearman rank correlation (and its p-value), the correlation and slope of
``log m`` on ``log θ``, and the spread of ``m_i / θ_i``. Since ``f_i > θ_i`` whenever active,
``m_i ≥ θ_i`` always; the question is whether θ also orders the features by scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy import stats as sps
from tqdm.auto import tqdm

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scales import activation_scale
from saematch_core.experiments.results import (
    JsonResult,
    acts_digest,
    finite_mean,
    load_or_compute,
    sae_digest,
)
from saematch_core.sae import SAE

__all__ = ["ThetaScaleResult", "ThetaScaleRow", "run", "theta_scale_row"]


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


def run(inputs: Inputs) -> ThetaScaleResult:
    """:func:`theta_scale_row` for every JumpReLU layer of ``inputs`` with activations (counting the
    ``keep`` rows); each layer cached. Nothing to configure."""
    rows = []
    saes, activations, keep = inputs.saes, inputs.activations or {}, inputs.keep
    layers = [t for t in sorted(saes) if t in activations and saes[t].activation == "jumprelu"]
    for layer in tqdm(layers, desc="θ vs activation scale", disable=not inputs.progress):
        sae = saes[layer]
        spec = {
            "sae": sae_digest(sae),
            "acts": acts_digest(activations[layer]),
            "keep": None if keep is None else acts_digest(keep),
            "layer": layer,
        }

        def compute(sae: SAE = sae, layer: int = layer) -> ThetaScaleResult:
            assert sae.threshold is not None  # JumpReLU, filtered above
            scale = activation_scale(sae, activations[layer], keep=keep, chunk_size=inputs.chunk_size)
            return ThetaScaleResult(rows=(theta_scale_row(layer, sae.threshold, scale),))

        found = load_or_compute(
            ThetaScaleResult, spec, compute, cache_dir=inputs.cache_dir, force=inputs.force
        )
        rows.extend(found.rows)
    return ThetaScaleResult(rows=tuple(rows))
