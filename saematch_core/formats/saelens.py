"""SAELens: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Weights are in saematch's layout (``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in),
``b_dec``, and ``threshold`` for JumpReLU). The config names the ``architecture`` (``standard`` =
ReLU, ``jumprelu``, ``topk``; configs written before SAELens 6 may lack it and name the activation
in ``activation_fn_str`` / ``activation_fn`` with ``activation_fn_kwargs.k``). When
``apply_b_dec_to_input`` is true (the pre-6.0 default) SAELens encodes ``x - b_dec``; we fold that
into the encoder bias exactly: ``b_enc' = b_enc - b_dec @ W_enc`` (computed in float64).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saematch_core.errors import SAEFormatError
from saematch_core.formats._common import (
    build_sae,
    cast,
    check_shape,
    read_json,
    read_safetensors,
    require_file,
    require_float_keys,
    vector_dim,
)
from saematch_core.sae import SAE

__all__ = ["SAELENS_CFG", "SAELENS_WEIGHTS", "is_saelens_folder", "load_saelens"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
# "expected_average_only_in" is a no-op at SAELens run time: the scaling factor is not in the file.
_NORMALISATIONS_OK = {None, False, "none", "expected_average_only_in"}


def is_saelens_folder(path: Path) -> bool:
    return path.is_dir() and (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file()


def _folder(path: Path) -> Path:
    if path.is_file() and path.name in (SAELENS_CFG, SAELENS_WEIGHTS):
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: SAELens folder not found")
    return path


def _hook_name(cfg: dict[str, Any]) -> str | None:
    for source in (cfg, cfg.get("metadata") or {}, cfg.get("meta") or {}):
        if isinstance(source, dict):
            for key in ("hook_name", "hook_point"):
                if isinstance(source.get(key), str):
                    return source[key]
    return None


def _architecture(cfg: dict[str, Any], cfg_path: Path) -> tuple[str, int | None]:
    """(activation, k) from a config of any SAELens version."""
    arch = cfg.get("architecture")
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if arch is None:
        arch = "topk" if act_fn == "topk" else "standard"
    if arch not in _ARCHITECTURES:
        raise SAEFormatError(
            f"{cfg_path}: architecture: expected one of {sorted(_ARCHITECTURES)}, got {arch!r}"
        )
    if arch == "standard" and act_fn not in (None, "relu", "topk"):
        raise SAEFormatError(f"{cfg_path}: activation_fn: expected 'relu' or 'topk', got {act_fn!r}")
    if arch == "standard" and act_fn == "topk":
        arch = "topk"
    k = None
    if arch == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SAEFormatError(f"{cfg_path}: k: expected an int >= 1 for a topk SAE, got {k!r}")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise SAEFormatError(f"{cfg_path}: rescale_acts_by_decoder_norm: true is not supported")
    return _ARCHITECTURES[arch], k


def load_saelens(path: Path, dtype: torch.dtype | None = None) -> SAE:
    """Load a SAELens folder (or its ``cfg.json`` / weights file) as an SAE on CPU.

    ``dtype`` None keeps the dtype of the stored tensors.
    """
    folder = _folder(path)
    cfg_path = require_file(folder / SAELENS_CFG, f"SAELens {SAELENS_CFG}")
    weights_path = require_file(folder / SAELENS_WEIGHTS, f"SAELens {SAELENS_WEIGHTS}")
    cfg = read_json(cfg_path)
    activation, k = _architecture(cfg, cfg_path)
    norm = cfg.get("normalize_activations")
    if norm is True:
        norm = "expected_average_only_in"  # pre-6.0 booleans meant this
    if norm not in _NORMALISATIONS_OK:
        raise SAEFormatError(
            f"{cfg_path}: normalize_activations: {norm!r} rescales every input token at run time, which a "
            "fixed-weight SAE cannot represent; supported: 'none', 'expected_average_only_in'"
        )
    tensors, _ = read_safetensors(weights_path)
    keys = ("W_enc", "b_enc", "W_dec", "b_dec", *(("threshold",) if activation == "jumprelu" else ()))
    require_float_keys(tensors, keys, weights_path)
    d_in = vector_dim(tensors["b_dec"], "b_dec", weights_path)
    d_sae = vector_dim(tensors["b_enc"], "b_enc", weights_path)
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != value:
            raise SAEFormatError(f"{cfg_path}: {key}: config says {cfg[key]!r}, the weights have {value}")
    check_shape(tensors["W_enc"], "W_enc", (d_in, d_sae), weights_path, "(d_in, d_sae)")
    check_shape(tensors["W_dec"], "W_dec", (d_sae, d_in), weights_path, "(d_sae, d_in)")
    if activation == "jumprelu":
        check_shape(tensors["threshold"], "threshold", (d_sae,), weights_path, "(d_sae,)")
    out_dtype = dtype or tensors["W_dec"].dtype
    W_enc, b_enc, b_dec = tensors["W_enc"], tensors["b_enc"], tensors["b_dec"]
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if apply_b_dec:
        b_enc = b_enc.double() - b_dec.double() @ W_enc.double()
    meta: dict[str, Any] = {
        "format": "saelens",
        "source": str(folder),
        "apply_b_dec_to_input_folded": bool(apply_b_dec),
    }
    hook = _hook_name(cfg)
    if hook is not None:
        meta["hook_name"] = hook
    return build_sae(
        weights_path,
        W_enc=cast(W_enc, out_dtype),
        b_enc=cast(b_enc, out_dtype),
        W_dec=cast(tensors["W_dec"], out_dtype),
        b_dec=cast(b_dec, out_dtype),
        activation=activation,
        threshold=cast(tensors["threshold"], out_dtype) if activation == "jumprelu" else None,
        k=k,
        meta=meta,
    )
