"""Per-feature activation scales: what folding divides out, estimated for any SAE family.

Folding (paper Eq. 4) divides each JumpReLU feature's encoder column and bias by its threshold θ
and multiplies its decoder row by θ: the threshold is a per-feature *activation scale*, and folding
moves it from the codes into the weights. TopK and ReLU SAEs have no θ, but every feature still
has an activation scale ``s_i``. Two estimates:

- ``"data"``: ``s_i = E[f_i | f_i > 0]``, the mean activation of the feature where it is active,
  over real tokens (:func:`activation_scale`);
- ``"weights"``: ``s_i = ‖b_dec‖ · ‖W_enc[:, i]‖``, the code an input of the layer's typical
  size (trained decoder biases sit near the data mean) would give along the feature's encoder
  direction; data-free, crude (:func:`weight_scale`).

Scaling by ``s`` (``W_enc[:, i] / s_i``, ``b_enc[i] / s_i``, ``W_dec[i] · s_i``) preserves a ReLU
SAE's output (positive homogeneity; :func:`saematch_core.fold.rescale_features`), but **not** a TopK
SAE's: dividing the pre-activations by different ``s_i`` changes which ``k`` features win. So the
scaled weights are used only as *matching vectors* (:func:`scaled_vectors`), never as a model. For
JumpReLU, ``s = θ`` is exactly folding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from saematch_core.cost import DEFAULT_PARAMS, feature_vectors
from saematch_core.experiments.inputs import ArrayLike
from saematch_core.experiments.measures.coactivation import iter_code_pairs
from saematch_core.sae import SAE

__all__ = [
    "SCALE_SOURCES",
    "ScaleSource",
    "activation_scale",
    "fill_dead_scale",
    "scaled_vectors",
    "token_halves",
    "weight_scale",
]

ScaleSource = Literal["data", "weights"]
SCALE_SOURCES: tuple[str, ...] = get_args(ScaleSource)


def activation_scale(
    sae: SAE, acts: ArrayLike, *, keep: ArrayLike | None = None, chunk_size: int = 4096
) -> Tensor:
    """Mean activation of every feature over the tokens where it is active.

    Parameters
    ----------
    sae : SAE of any family.
    acts : (n_tokens, d_in) residual activations of the SAE's layer.
    keep : BoolTensor (n_tokens,), optional; tokens to use.

    Returns
    -------
    Tensor, float64, shape (d_sae,): ``E[f_i | f_i > 0]``; ``nan`` for features never active.
    """
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    count = torch.zeros(sae.d_sae, dtype=torch.float64)
    for chunk in iter_code_pairs(sae, None, acts, None, keep=keep, chunk_size=chunk_size):
        c = chunk.a.detach().to("cpu", torch.float64)
        total += c.sum(0)
        count += (c > 0).double().sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def weight_scale(sae: SAE) -> Tensor:
    """Data-free scale ``‖b_dec‖ · ‖W_enc[:, i]‖`` per feature, float64, shape (d_sae,).

    Raises if ``b_dec`` is zero (no information about the layer's size).
    """
    nb = float(torch.linalg.vector_norm(sae.b_dec.double()))
    if not nb > 0:
        raise ValueError("sae.b_dec: expected a non-zero decoder bias for the weight-based scale, got zeros")
    return nb * torch.linalg.vector_norm(sae.W_enc.double(), dim=0).cpu()


def fill_dead_scale(scale: Tensor) -> Tensor:
    """Replace ``nan`` / non-positive entries (dead features) by the median of the valid ones.

    A dead feature has no measured scale; the layer's typical one keeps its vector comparable.
    """
    s = torch.as_tensor(scale, dtype=torch.float64)
    ok = torch.isfinite(s) & (s > 0)
    if not bool(ok.any()):
        raise ValueError("scale: expected at least one finite entry > 0, got none")
    return torch.where(ok, s, s[ok].median())


def scaled_vectors(
    sae: SAE, scale: Tensor, params: Sequence[str] = DEFAULT_PARAMS, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Matching vectors of ``sae`` with every feature rescaled by ``scale``.

    ``W_enc[:, i] / s_i``, ``W_dec[i] · s_i``, ``b_enc[i] / s_i``, concatenated in ``params`` order,
    from the *raw* (unfolded) weights (:func:`saematch_core.cost.feature_vectors` with ``scale``). For
    JumpReLU with ``scale = θ`` this equals the folded vectors.

    Returns
    -------
    Tensor, shape (d_sae, D), CPU.
    """
    return feature_vectors(sae, params, fold=False, scale=scale, device="cpu", dtype=dtype)


def token_halves(keep: ArrayLike, groups: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Split kept tokens into two disjoint halves by group (e.g. chunk id): even groups, odd groups.

    For estimating activation scales on one half and scoring matchings on the other, without
    splitting a text between them.

    >>> fit, held = token_halves(np.array([True, True, False, True]), np.array([0, 1, 2, 3]))
    >>> fit.tolist(), held.tolist()
    ([True, False, False, False], [False, True, False, True])
    """
    k = np.asarray(keep, dtype=bool)
    g = np.asarray(groups)
    if k.shape != g.shape or k.ndim != 1:
        raise ValueError(f"keep, groups: expected equal 1-D shapes, got {k.shape} and {g.shape}")
    even = (g.astype(np.int64) % 2) == 0
    return k & even, k & ~even
