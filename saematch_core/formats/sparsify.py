"""EleutherAI sparsify: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors`` (TopK SAEs).

Keys ``encoder.weight`` (d_sae, d_in), ``encoder.bias`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec``
(d_in,); the config holds ``k`` and ``d_in``. sparsify encodes ``topk(relu((x - b_dec) W_eᵀ + b_e))``
(the subtraction is skipped for transcoders, ``transcode: true``); the shift is folded exactly into
the encoder bias, ``b_enc = b_e - b_dec @ W_eᵀ`` (computed in float64).
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

__all__ = ["SPARSIFY_CFG", "SPARSIFY_WEIGHTS", "find_sparsify_folder", "load_sparsify"]

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def _is_hookpoint(path: Path) -> bool:
    return path.is_dir() and (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file()


def find_sparsify_folder(path: Path) -> Path | None:
    """The hookpoint folder: ``path``, or its only subfolder with ``cfg.json`` + ``sae.safetensors``.

    Raises :class:`SAEFormatError` when ``path`` holds several hookpoints (ambiguous).
    """
    if path.is_file() and path.name in (SPARSIFY_CFG, SPARSIFY_WEIGHTS):
        path = path.parent
    if _is_hookpoint(path):
        return path
    if not path.is_dir():
        return None
    subs = sorted(p for p in path.iterdir() if _is_hookpoint(p))
    if len(subs) > 1:
        names = [p.name for p in subs]
        raise SAEFormatError(f"{path}: holds {len(subs)} sparsify hookpoints {names}; pass one of them")
    return subs[0] if subs else None


def load_sparsify(path: Path, dtype: torch.dtype | None = None) -> SAE:
    """Load a sparsify hookpoint folder (or its parent with exactly one) as a TopK SAE on CPU."""
    folder = find_sparsify_folder(path)
    if folder is None:
        raise FileNotFoundError(
            f"{path}: no sparsify hookpoint folder ({SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}) found"
        )
    cfg_path = require_file(folder / SPARSIFY_CFG, f"sparsify {SPARSIFY_CFG}")
    weights_path = require_file(folder / SPARSIFY_WEIGHTS, f"sparsify {SPARSIFY_WEIGHTS}")
    cfg = read_json(cfg_path)
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SAEFormatError(f"{cfg_path}: k: expected an int >= 1, got {k!r}")
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise SAEFormatError(f"{cfg_path}: activation: expected 'topk', got {act!r}")
    tensors, _ = read_safetensors(weights_path)
    require_float_keys(tensors, _KEYS, weights_path)
    if "W_skip" in tensors or cfg.get("skip_connection"):
        raise SAEFormatError(
            f"{weights_path}: W_skip: skip connections are not supported by the SAE container"
        )
    d_in = vector_dim(tensors["b_dec"], "b_dec", weights_path)
    d_sae = vector_dim(tensors["encoder.bias"], "encoder.bias", weights_path)
    if "d_in" in cfg and cfg["d_in"] != d_in:
        raise SAEFormatError(f"{cfg_path}: d_in: config says {cfg['d_in']!r}, the weights have {d_in}")
    check_shape(tensors["encoder.weight"], "encoder.weight", (d_sae, d_in), weights_path, "(d_sae, d_in)")
    check_shape(tensors["W_dec"], "W_dec", (d_sae, d_in), weights_path, "(d_sae, d_in)")
    out_dtype = dtype or tensors["W_dec"].dtype
    W_e, b_e, b_dec = tensors["encoder.weight"], tensors["encoder.bias"], tensors["b_dec"]
    transcode = bool(cfg.get("transcode", False))
    b_enc = b_e if transcode else b_e.double() - W_e.double() @ b_dec.double()
    meta: dict[str, Any] = {"format": "sparsify", "source": str(folder), "hookpoint": folder.name}
    if transcode:
        meta["transcode"] = True
    return build_sae(
        weights_path,
        W_enc=cast(W_e.T, out_dtype),
        b_enc=cast(b_enc, out_dtype),
        W_dec=cast(tensors["W_dec"], out_dtype),
        b_dec=cast(b_dec, out_dtype),
        activation="topk",
        k=k,
        meta=meta,
    )
