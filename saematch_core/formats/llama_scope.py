"""Llama Scope (OpenMOSS lm-saes): ``<sae>/checkpoints/final.safetensors`` + ``<sae>/hyperparams.json``.

Keys ``encoder.weight`` (d_sae, d_in), ``encoder.bias`` (d_sae,), ``decoder.weight`` (d_in, d_sae),
``decoder.bias`` (d_in,), usually bfloat16. The JumpReLU threshold is one scalar,
``jump_relu_threshold`` (in ``hyperparams.json`` or as a scalar tensor in the file); newer files may
hold a per-feature ``log_jumprelu_threshold`` instead. Decoder columns are not unit norm.

What lm-saes computes, for an input ``x`` in the model's own scale (hyperparams keys in quotes):

* ``"norm_activation": "dataset-wise"``: ``x' = x · s_in`` with ``s_in = sqrt(d_model) / n_in``,
  where ``n_in = "dataset_average_activation_norm"["in"]`` (the output uses ``n_out``, ``s_out``);
* ``"apply_decoder_bias_to_pre_encoder"``: ``x' -= b_D``;
* ``z = x' W_Eᵀ + b_E``; with ``"sparsity_include_decoder_norm"`` the gate compares
  ``z_i · ‖W_D[:, i]‖`` with θ, otherwise ``z_i``; ``f = z · 1[gate > θ]``;
* reconstruction in the normalised output space ``f W_Dᵀ + b_D``, i.e. ``(f W_Dᵀ + b_D) / s_out``
  in the model's scale.

The loader folds all of it, exactly, into saematch's container, which takes raw ``x`` and returns
raw ``x̂`` with the same codes ``f``:

* ``W_enc = s_in · W_Eᵀ``;
* ``b_enc = b_E`` (minus ``W_E b_D`` when the decoder bias is applied before the encoder);
* ``θ_i = θ / ‖W_D[:, i]‖`` (just θ when the decoder norm is not part of the gate);
* ``W_dec = W_Dᵀ / s_out`` and ``b_dec = b_D / s_out``.

The arithmetic is done in float64, then cast to the requested dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saematch_core.errors import SAEFormatError
from saematch_core.formats._common import (
    build_sae,
    cast,
    check_shape,
    positive_finite,
    read_json,
    read_safetensors,
    require_file,
    require_float_keys,
    vector_dim,
)
from saematch_core.sae import SAE

__all__ = ["LLAMA_SCOPE_HYPERPARAMS", "LLAMA_SCOPE_WEIGHTS", "find_llama_scope_folder", "load_llama_scope"]

LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"
LLAMA_SCOPE_HYPERPARAMS = "hyperparams.json"
_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")


def find_llama_scope_folder(path: Path) -> Path | None:
    """The SAE folder (holding ``checkpoints/final.safetensors``) for a folder or the weights file."""
    if path.is_file() and path.name == "final.safetensors" and path.parent.name == "checkpoints":
        return path.parent.parent
    if path.is_dir() and (path / LLAMA_SCOPE_WEIGHTS).is_file():
        return path
    return None


def _threshold(tensors: Mapping[str, Tensor], hp: Mapping[str, Any], d_sae: int, where: Path) -> Tensor:
    """θ per feature in float64, from the file (scalar or log per feature) or hyperparams.json."""
    if "log_jumprelu_threshold" in tensors:
        log_theta = tensors["log_jumprelu_threshold"].double()
        if log_theta.shape not in ((), (1,), (d_sae,)):
            raise SAEFormatError(
                f"{where}: log_jumprelu_threshold: expected shape (d_sae,) = ({d_sae},) or a scalar, "
                f"got {tuple(log_theta.shape)}"
            )
        return log_theta.exp().reshape(-1).expand(d_sae).clone()
    if "jump_relu_threshold" in tensors:
        theta = tensors["jump_relu_threshold"].double()
        if theta.numel() != 1:
            raise SAEFormatError(
                f"{where}: jump_relu_threshold: expected a scalar, got shape {tuple(theta.shape)}"
            )
        return theta.reshape(()).expand(d_sae).clone()
    if "jump_relu_threshold" in hp:
        value = hp["jump_relu_threshold"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SAEFormatError(f"{where}: jump_relu_threshold: expected a number, got {value!r}")
        return torch.full((d_sae,), float(value), dtype=torch.float64)
    raise SAEFormatError(
        f"{where}: no JumpReLU threshold: expected 'jump_relu_threshold' in {LLAMA_SCOPE_HYPERPARAMS} "
        "or a 'jump_relu_threshold' / 'log_jumprelu_threshold' tensor"
    )


def _norm_scales(hp: Mapping[str, Any], d_in: int, where: Path) -> tuple[float, float]:
    """(s_in, s_out): the dataset-wise input / output scalings (1, 1 when not used)."""
    mode = hp.get("norm_activation", "dataset-wise" if "dataset_average_activation_norm" in hp else None)
    if mode in (None, "inference", "none"):
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise SAEFormatError(
            f"{where}: norm_activation: {mode!r} rescales every token at run time, which a fixed-weight SAE "
            "cannot represent; supported: 'dataset-wise', 'inference'"
        )
    norms = hp.get("dataset_average_activation_norm")
    if not isinstance(norms, Mapping):
        raise SAEFormatError(
            f"{where}: dataset_average_activation_norm: expected an object with 'in' and 'out' for "
            f"norm_activation='dataset-wise', got {norms!r}"
        )

    def pick(side: str, hook_key: str) -> float:
        hook = hp.get(hook_key)
        for key in (side, hook):
            if key is not None and key in norms:
                return positive_finite(norms[key], f"dataset_average_activation_norm.{key}", where)
        raise SAEFormatError(
            f"{where}: dataset_average_activation_norm: expected key {side!r} (or {hook!r}), "
            f"found {sorted(norms)}"
        )

    root = math.sqrt(d_in)
    return root / pick("in", "hook_point_in"), root / pick("out", "hook_point_out")


def load_llama_scope(path: Path, dtype: torch.dtype | None = None) -> SAE:
    """Load a Llama Scope SAE folder (or its ``checkpoints/final.safetensors``) as a JumpReLU SAE.

    ``hyperparams.json`` next to ``checkpoints/`` is read when present. ``dtype`` None keeps the
    stored dtype (bfloat16 for the released SAEs).
    """
    folder = find_llama_scope_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: Llama Scope {LLAMA_SCOPE_WEIGHTS} not found")
    weights_path = require_file(folder / LLAMA_SCOPE_WEIGHTS, f"Llama Scope {LLAMA_SCOPE_WEIGHTS}")
    hp_path = folder / LLAMA_SCOPE_HYPERPARAMS
    hp: dict[str, Any] = read_json(hp_path) if hp_path.is_file() else {}
    act = str(hp.get("act_fn", "jumprelu")).lower()
    if act not in ("jumprelu", "relu"):
        raise SAEFormatError(f"{hp_path}: act_fn: expected 'jumprelu' or 'relu', got {hp.get('act_fn')!r}")
    tensors, _ = read_safetensors(weights_path)
    require_float_keys(tensors, _KEYS, weights_path)
    d_in = vector_dim(tensors["decoder.bias"], "decoder.bias", weights_path)
    d_sae = vector_dim(tensors["encoder.bias"], "encoder.bias", weights_path)
    for key, value in (("d_model", d_in), ("d_sae", d_sae)):
        if key in hp and hp[key] != value:
            raise SAEFormatError(f"{hp_path}: {key}: hyperparams say {hp[key]!r}, the weights have {value}")
    check_shape(tensors["encoder.weight"], "encoder.weight", (d_sae, d_in), weights_path, "(d_sae, d_in)")
    check_shape(tensors["decoder.weight"], "decoder.weight", (d_in, d_sae), weights_path, "(d_in, d_sae)")
    out_dtype = dtype or tensors["decoder.weight"].dtype
    where = hp_path if hp else weights_path

    W_E = tensors["encoder.weight"].double()  # (d_sae, d_in)
    b_E = tensors["encoder.bias"].double()
    W_D = tensors["decoder.weight"].double()  # (d_in, d_sae)
    b_D = tensors["decoder.bias"].double()
    s_in, s_out = _norm_scales(hp, d_in, where)
    b_enc = b_E - W_E @ b_D if hp.get("apply_decoder_bias_to_pre_encoder", False) else b_E
    threshold = None
    if act == "jumprelu":
        theta = _threshold(tensors, hp, d_sae, where)
        if hp.get("sparsity_include_decoder_norm", True):
            dec_norm = W_D.norm(dim=0)
            # A zero decoder column never passes the gate (0 > θ is false): an unreachable threshold.
            big = torch.finfo(out_dtype).max
            theta = torch.where(dec_norm > 0, theta / dec_norm.clamp_min(1e-300), torch.full_like(theta, big))
            theta = theta.clamp(max=big)
        threshold = cast(theta, out_dtype)
    meta: dict[str, Any] = {
        "format": "llama_scope",
        "source": str(folder),
        "input_scale": s_in,
        "output_scale": s_out,
    }
    for key in ("hook_point_in", "hook_point_out"):
        if isinstance(hp.get(key), str):
            meta[key] = hp[key]
    return build_sae(
        weights_path,
        W_enc=cast(W_E.T * s_in, out_dtype),
        b_enc=cast(b_enc, out_dtype),
        W_dec=cast(W_D.T / s_out, out_dtype),
        b_dec=cast(b_D / s_out, out_dtype),
        activation=act,
        threshold=threshold,
        meta=meta,
    )
