"""Folding JumpReLU thresholds into the weights (the paper's Eq. 4).

For a JumpReLU SAE, ``f_i = z_i · 1[z_i > θ_i]`` with ``z = x W_enc + b_enc``. Dividing feature ``i``'s
encoder column and bias by ``θ_i`` and multiplying its decoder row by ``θ_i`` gives a model with
``θ' = 1`` whose codes are ``f_i / θ_i`` and whose reconstruction is *exactly* the same. The
threshold, which grows with the layer's hidden-state norm, is thereby moved into the weights, so
folded parameters of different layers are compared on the same scale.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from saematch_core.errors import SAEValidationError
from saematch_core.sae import SAE

__all__ = ["fold", "is_folded", "rescale_features"]


def rescale_features(sae: SAE, scale: Tensor) -> SAE:
    """Scale every feature's code by ``1/scale``: ``W_enc[:, i] /= s_i``, ``b_enc[i] /= s_i``,
    ``W_dec[i] *= s_i`` and, for JumpReLU, ``θ_i /= s_i``.

    The reconstruction is unchanged for JumpReLU and ReLU (positive homogeneity). For TopK the
    selection of the top ``k`` depends on the scale, so the output would change: this raises.

    Parameters
    ----------
    scale : Tensor, shape (d_sae,), every entry finite and > 0.
    """
    if sae.activation == "topk":
        raise SAEValidationError(
            "activation: rescaling features changes which features a TopK SAE selects; "
            "it is only output-preserving for 'jumprelu' and 'relu'"
        )
    scale = torch.as_tensor(scale, dtype=sae.dtype, device=sae.device)
    if scale.shape != (sae.d_sae,):
        raise SAEValidationError(f"scale: expected shape ({sae.d_sae},), got {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise SAEValidationError("scale: expected every entry finite and > 0")
    theta = None if sae.threshold is None else sae.threshold / scale
    return replace(
        sae,
        W_enc=sae.W_enc / scale,
        b_enc=sae.b_enc / scale,
        W_dec=sae.W_dec * scale[:, None],
        threshold=theta,
        meta={**sae.meta, "folded": sae.activation == "jumprelu" or bool(sae.meta.get("folded", False))},
    )


def fold(sae: SAE) -> SAE:
    """Fold a JumpReLU SAE's thresholds into its weights (θ' = 1); reconstruction unchanged.

    Idempotent: folding a folded SAE returns equal weights. The input SAE is not modified.

    Raises
    ------
    SAEValidationError
        For a non-JumpReLU SAE, and for one with features whose threshold is exactly 0 (such
        features fire whenever their pre-activation is > 0; dividing by θ = 0 has no meaning, and no
        other scale would be the paper's): the message lists them.

    >>> import torch
    >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
    ...           threshold=torch.tensor([0.5, 2.0]))
    >>> fold(sae).W_dec.diagonal().tolist(), fold(sae).threshold.tolist()
    ([0.5, 2.0], [1.0, 1.0])
    """
    if sae.activation != "jumprelu" or sae.threshold is None:
        raise SAEValidationError(
            "activation: folding is defined for JumpReLU SAEs (per-feature threshold), "
            f"got {sae.activation!r}; for other families use rescale_features(sae, scale)"
        )
    zero = (sae.threshold == 0).nonzero().flatten().tolist()
    if zero:
        shown = ", ".join(str(i) for i in zero[:8]) + (", ..." if len(zero) > 8 else "")
        raise SAEValidationError(
            f"threshold: {len(zero)} feature{'s have' if len(zero) > 1 else ' has'} θ = 0 "
            f"(feature{'s' if len(zero) > 1 else ''} {shown}); folding divides each "
            "feature by its θ, and a θ = 0 feature (it fires whenever its pre-activation is > 0) has "
            "no scale to divide by. Match without folding (MatchConfig(fold=False), --no-fold), or "
            "choose a scale for those features with rescale_features(sae, scale)"
        )
    folded = rescale_features(sae, sae.threshold)
    # θ/θ is 1 up to rounding; make it exactly 1 so folding is idempotent bit for bit.
    return replace(folded, threshold=torch.ones_like(sae.threshold))


def is_folded(sae: SAE) -> bool:
    """True for a JumpReLU SAE whose thresholds are all exactly 1."""
    return sae.threshold is not None and bool((sae.threshold == 1).all())
