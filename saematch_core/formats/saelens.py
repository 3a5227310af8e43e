"""SAELens: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Weights are in saematch's layout (``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in),
``b_dec``, and ``threshold`` for JumpReLU). The config names the ``architecture`` (``standard`` =
ReLU, ``jumprelu``, ``topk``; configs written before SAELens 6 may lack it and name the activation
in ``activation_fn_str`` / ``activation_fn`` with ``activation_fn_kwargs.k``). Everything SAELens
does at run time that a fixed-weight SAE can express is folded into the weights, exactly (the
arithmetic in float64):

* ``apply_b_dec_to_input`` (the pre-6.0 default): SAELens encodes ``x - b_dec``;
  ``b_enc' = b_enc - b_dec @ W_enc``.
* JumpReLU: SAELens computes ``relu(z) · 1[z > θ]``, so a feature with ``θ_i = 0`` fires whenever
  ``z_i > 0`` (training clamps θ at 0, so such files exist) and ``θ_i < 0`` acts as 0: the loaded
  threshold is ``max(θ, 0)``. Training checkpoints store ``log_threshold``; ``θ = exp(log_threshold)``.
* TopK with ``rescale_acts_by_decoder_norm``: SAELens ranks ``z_i · ‖W_dec[i]‖`` and decodes
  ``f_i / ‖W_dec[i]‖``; ``W_enc[:, i]`` and ``b_enc[i]`` are multiplied by ``‖W_dec[i]‖`` and
  ``W_dec[i]`` divided by it (a zero decoder row stays zero).
* A per-feature ``scaling_factor`` (or ``finetuning_scaling_factor``) multiplies the codes before
  decoding when the config sets ``finetuning_scaling_factor: true``; it is folded into ``W_dec[i]``.
  Without that flag SAELens drops a factor that is all ones within ``torch.allclose`` and refuses
  any other; so do we (``meta["scaling_factor"]`` says which).

Any other tensor in the file is refused rather than ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saematch_core.errors import SAEFormatError
from saematch_core.formats._common import (
    build_sae,
    cast,
    check_float,
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
_BASE_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
_THRESHOLD_KEYS = ("threshold", "log_threshold")
_SCALING_KEYS = ("scaling_factor", "finetuning_scaling_factor")
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
    return _ARCHITECTURES[arch], k


def _threshold(tensors: dict[str, Tensor], d_sae: int, path: Path) -> tuple[Tensor, int]:
    """θ per feature in float64 (``threshold`` or ``exp(log_threshold)``), clamped at 0, and how many
    entries were below 0."""
    if "threshold" in tensors and "log_threshold" in tensors:
        raise SAEFormatError(
            f"{path}: holds both 'threshold' and 'log_threshold'; expected one of them for a jumprelu SAE"
        )
    if "log_threshold" in tensors:
        check_float(tensors["log_threshold"], "log_threshold", path)
        check_shape(tensors["log_threshold"], "log_threshold", (d_sae,), path, "(d_sae,)")
        theta = tensors["log_threshold"].double().exp()
    else:
        require_float_keys(tensors, ("threshold",), path)
        check_shape(tensors["threshold"], "threshold", (d_sae,), path, "(d_sae,)")
        theta = tensors["threshold"].double()
    negative = int((theta < 0).sum())
    return theta.clamp_min(0.0), negative


def _scaling_factor(
    tensors: dict[str, Tensor], cfg: dict[str, Any], d_sae: int, path: Path, cfg_path: Path
) -> tuple[Tensor | None, str | None]:
    """The per-feature factor SAELens applies to the codes before decoding (None when it applies
    none), and what was done with the tensor, for ``meta``."""
    names = [k for k in _SCALING_KEYS if k in tensors]
    if not names:
        return None, None
    if len(names) > 1:
        raise SAEFormatError(f"{path}: holds both {names}; expected at most one scaling factor")
    name = names[0]
    check_float(tensors[name], name, path)
    check_shape(tensors[name], name, (d_sae,), path, "(d_sae,)")
    scale = tensors[name].double()
    if bool((scale == 1).all()):
        return None, f"{name}: all ones"
    if cfg.get("finetuning_scaling_factor"):
        return scale, f"{name}: folded into W_dec"
    if torch.allclose(scale, torch.ones_like(scale)):
        return None, f"{name}: dropped as all ones within torch.allclose, as SAELens does"
    raise SAEFormatError(
        f"{path}: {name}: a per-feature scaling factor that is not all ones, but {cfg_path.name} does "
        "not set finetuning_scaling_factor: true (SAELens refuses this file too)"
    )


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
    require_float_keys(tensors, _BASE_KEYS, weights_path)
    allowed = {*_BASE_KEYS, *_SCALING_KEYS, *(_THRESHOLD_KEYS if activation == "jumprelu" else ())}
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        raise SAEFormatError(
            f"{weights_path}: unexpected tensors {unknown} for a {cfg.get('architecture', activation)!r} "
            f"SAE; expected {sorted(allowed)} (refused rather than ignored: they may change the output)"
        )
    d_in = vector_dim(tensors["b_dec"], "b_dec", weights_path)
    d_sae = vector_dim(tensors["b_enc"], "b_enc", weights_path)
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != value:
            raise SAEFormatError(f"{cfg_path}: {key}: config says {cfg[key]!r}, the weights have {value}")
    check_shape(tensors["W_enc"], "W_enc", (d_in, d_sae), weights_path, "(d_in, d_sae)")
    check_shape(tensors["W_dec"], "W_dec", (d_sae, d_in), weights_path, "(d_sae, d_in)")
    out_dtype = dtype or tensors["W_dec"].dtype
    W_enc, b_enc = tensors["W_enc"].double(), tensors["b_enc"].double()
    W_dec, b_dec = tensors["W_dec"].double(), tensors["b_dec"].double()
    meta: dict[str, Any] = {"format": "saelens", "source": str(folder)}
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if apply_b_dec:
        b_enc = b_enc - b_dec @ W_enc
    meta["apply_b_dec_to_input_folded"] = bool(apply_b_dec)
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1)
        W_enc, b_enc = W_enc * norms, b_enc * norms
        W_dec = torch.where(norms[:, None] > 0, W_dec / norms.clamp_min(1e-300)[:, None], 0.0)
        meta["decoder_norm_folded"] = True
    scale, scale_note = _scaling_factor(tensors, cfg, d_sae, weights_path, cfg_path)
    if scale is not None:
        W_dec = W_dec * scale[:, None]
    if scale_note is not None:
        meta["scaling_factor"] = scale_note
    threshold = None
    if activation == "jumprelu":
        theta, negative = _threshold(tensors, d_sae, weights_path)
        if negative:
            meta["threshold_clamped_to_zero"] = negative
        threshold = cast(theta, out_dtype)
    hook = _hook_name(cfg)
    if hook is not None:
        meta["hook_name"] = hook
    return build_sae(
        weights_path,
        W_enc=cast(W_enc, out_dtype),
        b_enc=cast(b_enc, out_dtype),
        W_dec=cast(W_dec, out_dtype),
        b_dec=cast(b_dec, out_dtype),
        activation=activation,
        threshold=threshold,
        k=k,
        meta=meta,
    )
