"""Shared helpers for the per-format loaders: safe file reading and checks that name the file."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open
from torch import Tensor

from saematch_core.errors import SAEFormatError, SAEValidationError
from saematch_core.sae import SAE

__all__: list[str] = []

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: str | torch.dtype | None, *, field: str = "dtype") -> torch.dtype | None:
    """Accept ``None``, a torch dtype, or a name like ``"float32"`` / ``"torch.bfloat16"``."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise TypeError(f"{field}: expected a floating dtype, got {value}")
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        raise ValueError(f"{field}: expected one of {sorted(_DTYPE_NAMES)}, got {value!r}")
    raise TypeError(f"{field}: expected a torch.dtype or str, got {type(value).__name__}")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object; a missing file is FileNotFoundError, bad JSON an SAEFormatError."""
    require_file(path, "JSON config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The str->str metadata of a safetensors file (empty if none); corrupt files raise SAEFormatError."""
    require_file(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise SAEFormatError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file.

    The tensors are copied out of the file: safetensors hands out views of its memory map, through
    which a file changed in place later would change the loaded (and validated) weights, or crash
    the process with SIGBUS once truncated. Truncated or corrupt files raise
    :class:`SAEFormatError` naming the file.
    """
    require_file(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key).clone() for key in fh.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEFormatError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({exc})"
        ) from exc
    return tensors, meta


def require_keys(tensors: Mapping[str, Any], expected: Sequence[str], path: Path) -> None:
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise SAEFormatError(
            f"{path}: missing keys {missing}; expected keys {list(expected)}, found {sorted(tensors)}"
        )


def require_float_keys(tensors: Mapping[str, Tensor], expected: Sequence[str], path: Path) -> None:
    """:func:`require_keys`, then a floating dtype for each of the expected tensors."""
    require_keys(tensors, expected, path)
    for key in expected:
        check_float(tensors[key], key, path)


def check_shape(tensor: Tensor, key: str, expected: tuple[int, ...], path: Path, dims: str) -> None:
    """Raise naming the file, key, expected layout and actual shape (with a transposition hint)."""
    got = tuple(tensor.shape)
    if got != expected:
        hint = " (transposed?)" if len(got) == 2 and got == expected[::-1] else ""
        raise SAEFormatError(f"{path}: {key}: expected shape {dims} = {expected}, got {got}{hint}")


def check_float(tensor: Tensor, key: str, path: Path) -> None:
    if not tensor.is_floating_point():
        raise SAEFormatError(f"{path}: {key}: expected a floating dtype, got {tensor.dtype}")


def vector_dim(tensor: Tensor, key: str, path: Path) -> int:
    """Length of a 1-D tensor (used to read d_in / d_sae off the bias vectors)."""
    if tensor.ndim != 1:
        raise SAEFormatError(f"{path}: {key}: expected a 1-D vector, got shape {tuple(tensor.shape)}")
    return int(tensor.shape[0])


def build_sae(path: Path, **kwargs: Any) -> SAE:
    """Construct the SAE, prefixing validation errors (NaN, θ <= 0, ...) with the file."""
    try:
        return SAE(**kwargs)
    except SAEValidationError as exc:
        raise SAEValidationError(f"{path}: {exc}") from exc


def positive_finite(value: Any, key: str, path: Path) -> float:
    """A float config value that must be finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SAEFormatError(f"{path}: {key}: expected a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out <= 0:
        raise SAEFormatError(f"{path}: {key}: expected a finite number > 0, got {value!r}")
    return out


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype=dtype).contiguous()
