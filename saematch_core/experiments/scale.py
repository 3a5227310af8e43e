"""Do thresholds grow with depth like the hidden state? θ and ‖h‖ per layer (paper Fig. 1).

The motivation of hypothesis H2 (folding improves matching): if a JumpReLU threshold carries its
feature's scale, the mean θ per layer grows with depth like the norm of the residual stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from saematch_core.experiments.inputs import ArrayLike, Inputs
from saematch_core.experiments.measures.coactivation import check_acts, check_keep
from saematch_core.experiments.results import JsonResult, array_rows

__all__ = ["ScaleConfig", "ScaleDepthResult", "ScaleRow", "run"]


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    """What :func:`run` measures."""

    quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    """Quantiles of θ and of ‖h‖ reported per layer, each in [0, 1]."""
    chunk_size: int = 65536
    """Activation rows read at once when norms are computed from activations."""

    def __post_init__(self) -> None:
        qs = tuple(float(q) for q in self.quantiles)
        if not qs or any(not 0 <= q <= 1 for q in qs):
            raise ValueError(f"ScaleConfig.quantiles: expected numbers in [0, 1], got {list(self.quantiles)}")
        object.__setattr__(self, "quantiles", qs)
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"ScaleConfig.chunk_size: expected an int >= 1, got {self.chunk_size!r}")


@dataclass(frozen=True, kw_only=True)
class ScaleRow:
    """Threshold statistics of one layer's SAE and the norm of its residual stream."""

    layer: int
    theta_mean: float
    """Mean JumpReLU threshold θ over features (``nan`` for other activations)."""
    theta_quantiles: tuple[float, ...]
    """θ at the quantiles :attr:`ScaleDepthResult.quantiles`."""
    norm_mean: float
    """Mean ‖h‖ over kept tokens (``nan`` without activations)."""
    norm_quantiles: tuple[float, ...]
    """‖h‖ at :attr:`ScaleDepthResult.quantiles`."""
    n_tokens: int


@dataclass(frozen=True, kw_only=True)
class ScaleDepthResult(JsonResult):
    """θ and hidden-state norm per layer (paper Fig. 1)."""

    kind: ClassVar[str] = "scale_vs_depth"
    quantiles: tuple[float, ...]
    rows: tuple[ScaleRow, ...]

    def table(self) -> tuple[list[str], Sequence[tuple[object, ...]]]:
        """Headers and rows: per layer mean and median θ, mean and median ‖h‖, tokens (the medians
        are the third quantile, 0.5 with the default quantiles)."""
        rows = [
            (
                r.layer,
                f"{r.theta_mean:.4g}",
                f"{r.theta_quantiles[2]:.4g}",
                f"{r.norm_mean:.4g}",
                f"{r.norm_quantiles[2]:.4g}",
                r.n_tokens,
            )
            for r in self.rows
        ]
        return ["layer", "mean θ", "θ median", "mean ‖h‖", "‖h‖ median", "tokens"], rows


def run(
    inputs: Inputs,
    config: ScaleConfig | None = None,
    *,
    norms: Mapping[int, ArrayLike] | None = None,
    layer_keep: Mapping[int, ArrayLike] | None = None,
) -> ScaleDepthResult:
    """Mean and quantiles of θ per layer, next to the mean residual norm per layer (Fig. 1).

    Parameters
    ----------
    inputs : ``saes`` (layer → SAE) and, optionally, ``activations`` (norms are computed from them)
        with ``keep`` (rows counted in the norm statistics, e.g. without position 0 and outliers).
    norms : layer → precomputed ‖h‖ per token (n_tokens,), optional (e.g. an activation cache's
        ``norms``); used for layers without activations.
    layer_keep : layer → rows counted at that layer, optional; replaces ``inputs.keep`` where given.

    Examples
    --------
    >>> from saematch_core.sae import SAE
    >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
    ...           threshold=torch.tensor([1.0, 3.0]))
    >>> run(Inputs(saes={0: sae})).rows[0].theta_mean
    2.0
    """
    cfg = ScaleConfig() if config is None else config
    saes, activations = inputs.saes, inputs.activations
    keep: ArrayLike | Mapping[int, ArrayLike] | None = inputs.keep if layer_keep is None else layer_keep
    qs = np.array(cfg.quantiles, dtype=np.float64)
    chunk_size = cfg.chunk_size
    nan_q = tuple(math.nan for _ in qs)
    rows = []
    for layer in sorted(set(saes) | set(activations or {}) | set(norms or {})):
        sae = saes.get(layer)
        if sae is not None and sae.threshold is not None:
            theta = sae.threshold.double().cpu().numpy()
            t_mean, t_q = float(theta.mean()), tuple(np.quantile(theta, qs).tolist())
        else:
            t_mean, t_q = math.nan, nan_q
        layer_norms = _layer_norms(layer, activations, norms, keep, chunk_size)
        n_tok, n_mean, n_q = 0, math.nan, nan_q
        if layer_norms is not None and layer_norms.size:
            n_tok = int(layer_norms.size)
            n_mean, n_q = float(layer_norms.mean()), tuple(np.quantile(layer_norms, qs).tolist())
        rows.append(
            ScaleRow(
                layer=layer,
                theta_mean=t_mean,
                theta_quantiles=t_q,
                norm_mean=n_mean,
                norm_quantiles=n_q,
                n_tokens=n_tok,
            )
        )
    return ScaleDepthResult(quantiles=tuple(qs.tolist()), rows=tuple(rows))


def _layer_norms(
    layer: int,
    activations: Mapping[int, ArrayLike] | None,
    norms: Mapping[int, ArrayLike] | None,
    keep: ArrayLike | Mapping[int, ArrayLike] | None,
    chunk_size: int,
) -> np.ndarray | None:
    """‖h‖ of the kept tokens of ``layer`` (float64), or ``None`` without data for it."""
    layer_keep = keep.get(layer) if isinstance(keep, Mapping) else keep
    if activations is not None and layer in activations:
        acts = activations[layer]
        n = check_acts(f"activations[{layer}]", acts, int(acts.shape[1]))
        mask = check_keep(layer_keep, n)
        parts = []
        for s in range(0, n, chunk_size):
            x = array_rows(acts, s, s + chunk_size, device=torch.device("cpu"), dtype=torch.float64)
            parts.append(torch.linalg.vector_norm(x, dim=1)[mask[s : s + chunk_size]].numpy())
        return np.concatenate(parts) if parts else np.zeros(0)
    if norms is not None and layer in norms:
        values = norms[layer]
        arr = (
            values.detach().cpu().double().numpy()
            if isinstance(values, Tensor)
            else np.asarray(values, np.float64)
        )
        if arr.ndim != 1:
            raise ValueError(f"norms[{layer}]: expected shape (n_tokens,), got {arr.shape}")
        return arr[check_keep(layer_keep, arr.shape[0]).numpy()]
    return None
