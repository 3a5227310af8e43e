"""Gemma Scope: ``layer_L/width_W/average_l0_X/params.npz`` (Google DeepMind, JumpReLU SAEs).

The npz holds float32 ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in),
``b_dec`` (d_in,) and ``threshold`` (d_sae,): already saematch's layout, so loading mostly checks and
converts. Files are always read with ``allow_pickle=False``. What else the loader does, exactly as
SAELens's Gemma Scope loader:

* the reference encoder is ``relu(z) · 1[z > θ]``, so ``θ_i = 0`` means "fires whenever ``z_i > 0``"
  and a negative θ acts as 0: the loaded threshold is ``max(θ, 0)``;
* the SAEs of the embeddings (``embedding/width_W/average_l0_X``, the folder above ``width_W``)
  were trained on embeddings without Gemma's ``√d_model`` factor: ``W_enc`` is divided by
  ``√d_in`` and ``W_dec`` multiplied by it (``meta["site"] = "embedding"``);
* an extra ``scaling_factor`` array that is all ones (within ``torch.allclose``) is dropped, any
  other is refused, and so is every other extra array (never ignored).
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from saematch_core.errors import SAEFormatError
from saematch_core.formats._common import build_sae, check_shape, require_file, vector_dim
from saematch_core.sae import SAE

__all__ = [
    "GEMMA_SCOPE_2B_RES_16K_L0",
    "GEMMA_SCOPE_2B_RES_REPO",
    "GEMMA_SCOPE_FILENAME",
    "gemma_scope_path",
    "load_gemma_scope",
    "parse_gemma_scope_path",
]

GEMMA_SCOPE_FILENAME = "params.npz"
"""File name of a Gemma Scope SAE inside its ``average_l0_X`` folder."""

GEMMA_SCOPE_2B_RES_REPO = "google/gemma-scope-2b-pt-res"
"""Hub repository of the Gemma 2 2B residual-stream SAEs used by the paper."""

GEMMA_SCOPE_2B_RES_16K_L0: Mapping[int, int] = MappingProxyType(
    {
        # Layers 0 and 1: the paper prints 102 and 108, but the hub has no layer_0/.../average_l0_102
        # or layer_1/.../average_l0_108; its canonical SAEs for these layers are 105 and 102.
        0: 105,
        1: 102,
        # Layers 2-25 as in the paper's Table 1. Layers 4, 13 and 14 (125, 83, 83) differ from the
        # hub's "canonical" aliases (124, 84, 84); all of these files exist on the hub.
        2: 141,
        3: 59,
        4: 125,
        5: 68,
        6: 70,
        7: 69,
        8: 71,
        9: 73,
        10: 77,
        11: 80,
        12: 82,
        13: 83,
        14: 83,
        15: 78,
        16: 78,
        17: 77,
        18: 74,
        19: 73,
        20: 71,
        21: 70,
        22: 72,
        23: 75,
        24: 73,
        25: 116,
    }
)
"""Average L0 of the width-16k SAE the paper uses at each layer of ``google/gemma-scope-2b-pt-res``."""

_EXPECTED_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
_SCALING_KEY = "scaling_factor"
_PATH_RE = {
    "layer": re.compile(r"(?:^|/)layer_(\d+)(?:/|$)"),
    "width": re.compile(r"(?:^|/)width_([0-9]+[kKmM]?)(?:/|$)"),
    "average_l0": re.compile(r"(?:^|/)average_l0_(\d+)(?:/|$)"),
}


def gemma_scope_path(layer: int, width: str = "16k", l0: int | None = None) -> str:
    """Path of a Gemma Scope SAE inside its hub repository, e.g. ``layer_20/width_16k/average_l0_71``.

    Parameters
    ----------
    layer : residual layer index (0-25 for Gemma 2 2B).
    width : ``"16k"``, ``"65k"``, ``"1m"``, ...
    l0 : average L0 of the variant; ``None`` takes the paper's choice from
        :data:`GEMMA_SCOPE_2B_RES_16K_L0` (width 16k only).

    Examples
    --------
    >>> gemma_scope_path(20)
    'layer_20/width_16k/average_l0_71'
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer: expected an int >= 0, got {layer!r}")
    if not isinstance(width, str) or not re.fullmatch(r"[0-9]+[kKmM]?", width):
        raise ValueError(f"width: expected a width like '16k' or '1m', got {width!r}")
    if l0 is None:
        if width != "16k":
            raise ValueError(f"l0: required for width {width!r} (the paper's table covers width '16k' only)")
        if layer not in GEMMA_SCOPE_2B_RES_16K_L0:
            raise ValueError(f"layer: expected one of 0..{max(GEMMA_SCOPE_2B_RES_16K_L0)}, got {layer}")
        l0 = GEMMA_SCOPE_2B_RES_16K_L0[layer]
    if isinstance(l0, bool) or not isinstance(l0, int) or l0 <= 0:
        raise ValueError(f"l0: expected an int > 0, got {l0!r}")
    return f"layer_{layer}/width_{width}/average_l0_{l0}"


def parse_gemma_scope_path(path: str | Path) -> dict[str, Any]:
    """``layer`` (int), ``width`` (str) and ``average_l0`` (int) found in a Gemma Scope path, and
    ``site="embedding"`` when the folder above ``width_W`` is ``embedding``.

    >>> parse_gemma_scope_path("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6")
    {'width': '4k', 'average_l0': 6, 'site': 'embedding'}
    """
    text = Path(path).as_posix()
    out: dict[str, Any] = {}
    for key, pattern in _PATH_RE.items():
        found = pattern.findall(text)
        if found:
            value = found[-1]
            out[key] = value if key == "width" else int(value)
    parts = text.split("/")
    widths = [i for i, part in enumerate(parts) if _PATH_RE["width"].fullmatch(f"/{part}/")]
    if widths and widths[-1] > 0 and parts[widths[-1] - 1] == "embedding":
        out.pop("layer", None)
        out["site"] = "embedding"
    return out


def _resolve(path: Path) -> Path:
    if path.is_dir():
        return require_file(path / GEMMA_SCOPE_FILENAME, f"Gemma Scope {GEMMA_SCOPE_FILENAME}")
    return require_file(path, "Gemma Scope params.npz")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise SAEFormatError(f"{path}: not a readable npz archive, truncated or corrupt ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SAEFormatError(
            f"{path}: expected an npz archive of named arrays, got a single {type(archive).__name__}"
        )
    with archive:
        keys = list(archive.files)
        missing = [k for k in _EXPECTED_KEYS if k not in keys]
        if missing:
            raise SAEFormatError(
                f"{path}: missing keys {missing}; expected keys {list(_EXPECTED_KEYS)}, found {keys}"
            )
        unknown = [k for k in keys if k not in (*_EXPECTED_KEYS, _SCALING_KEY)]
        if unknown:
            raise SAEFormatError(
                f"{path}: unexpected arrays {unknown}; a Gemma Scope file holds {list(_EXPECTED_KEYS)} "
                f"(and optionally {_SCALING_KEY!r}); refused rather than ignored, they may change the output"
            )
        arrays: dict[str, np.ndarray] = {}
        for key in keys:
            try:
                arr = archive[key]
            except ValueError as exc:
                # numpy refuses object arrays (which would need pickle) with a ValueError.
                raise SAEFormatError(
                    f"{path}: {key}: cannot load without pickle (object array?): {exc}"
                ) from exc
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise SAEFormatError(f"{path}: {key}: truncated or corrupt entry ({exc})") from exc
            if arr.dtype.kind != "f":
                raise SAEFormatError(f"{path}: {key}: expected a float array, got dtype {arr.dtype}")
            arrays[key] = arr
    return arrays


def load_gemma_scope(path: Path, dtype: torch.dtype | None = None) -> SAE:
    """Load ``params.npz`` (or its folder) as a JumpReLU SAE; ``dtype`` None keeps float32.

    ``meta`` gets ``format``, ``source`` and the ``layer``, ``width``, ``average_l0`` (or
    ``site="embedding"``) parsed from the path when present. See the module docstring for the
    threshold, embedding and ``scaling_factor`` rules.
    """
    file = _resolve(path)
    arrays = _read_npz(file)
    t = {key: torch.from_numpy(np.ascontiguousarray(arr)) for key, arr in arrays.items()}
    d_in = vector_dim(t["b_dec"], "b_dec", file)
    d_sae = vector_dim(t["b_enc"], "b_enc", file)
    check_shape(t["W_enc"], "W_enc", (d_in, d_sae), file, "(d_in, d_sae)")
    check_shape(t["W_dec"], "W_dec", (d_sae, d_in), file, "(d_sae, d_in)")
    check_shape(t["threshold"], "threshold", (d_sae,), file, "(d_sae,)")
    meta: dict[str, Any] = {
        "format": "gemma_scope",
        "source": str(file),
        **parse_gemma_scope_path(file.parent),
    }
    if _SCALING_KEY in t:
        scale = t.pop(_SCALING_KEY)
        check_shape(scale, _SCALING_KEY, (d_sae,), file, "(d_sae,)")
        if not torch.allclose(scale.double(), torch.ones((d_sae,), dtype=torch.float64)):
            raise SAEFormatError(
                f"{file}: {_SCALING_KEY}: a per-feature scaling factor that is not all ones; Gemma Scope "
                "SAEs have none, and SAELens refuses this file too"
            )
        meta["scaling_factor"] = "dropped as all ones within torch.allclose, as SAELens does"
    theta = t["threshold"]
    negative = int((theta < 0).sum())
    if negative:
        t["threshold"] = theta.clamp_min(0.0)
        meta["threshold_clamped_to_zero"] = negative
    if meta.get("site") == "embedding":
        root = math.sqrt(d_in)
        t["W_enc"] = (t["W_enc"].double() / root).to(t["W_enc"].dtype)
        t["W_dec"] = (t["W_dec"].double() * root).to(t["W_dec"].dtype)
    if dtype is not None:
        t = {key: v.to(dtype) for key, v in t.items()}
    return build_sae(file, activation="jumprelu", meta=meta, **t)
