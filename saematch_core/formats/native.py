"""saematch's own format: one safetensors file in exactly the :class:`~saematch_core.sae.SAE` layout.

Tensors ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,) and,
for JumpReLU, ``threshold`` (d_sae,), all in the SAE's dtype. The safetensors metadata (str -> str)
holds ``format="saematch"``, ``schema_version``, ``activation``, ``k`` (empty unless TopK), ``d_in``,
``d_sae``, ``dtype`` and ``meta`` (the SAE's meta dict as JSON). Saving then loading gives back the
same tensors bit for bit, the same dtype and the same meta.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from saematch_core.cache import atomic_path
from saematch_core.errors import SAEFormatError
from saematch_core.formats._common import (
    build_sae,
    check_float,
    check_shape,
    dtype_name,
    read_safetensors,
    read_safetensors_metadata,
    require_keys,
    vector_dim,
)
from saematch_core.sae import SAE

__all__ = [
    "NATIVE_FORMAT_ID",
    "NATIVE_SCHEMA_VERSION",
    "is_native_file",
    "load_native",
    "save_native",
    "write_safetensors",
]

NATIVE_FORMAT_ID = "saematch"
"""Value of the ``format`` metadata key that marks a native file."""
NATIVE_SCHEMA_VERSION = 1
"""Version of the native layout written by :func:`save_native`."""

_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def is_native_file(path: Path) -> bool:
    """True for a ``.safetensors`` file whose metadata says ``format="saematch"``."""
    return (
        path.is_file()
        and path.suffix == ".safetensors"
        and (read_safetensors_metadata(path).get("format") == NATIVE_FORMAT_ID)
    )


def save_native(sae: SAE, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write ``sae`` as one safetensors file, atomically.

    Parameters
    ----------
    sae : the SAE to save (any dtype, any device; tensors are copied to CPU).
    path : target file; its folder must exist. A ``.safetensors`` suffix is recommended.
    force : overwrite an existing file.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is false.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    TypeError
        If ``sae`` is not an SAE or its meta is not JSON-serialisable.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected an SAE, got {type(sae).__name__}")
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{target}: output exists; pass force=True (--force) to overwrite")
    try:
        meta_json = json.dumps(dict(sae.meta), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"sae.meta: expected JSON-serialisable values, {exc}") from exc
    metadata = {
        "format": NATIVE_FORMAT_ID,
        "schema_version": str(NATIVE_SCHEMA_VERSION),
        "activation": sae.activation,
        "k": "" if sae.k is None else str(sae.k),
        "d_in": str(sae.d_in),
        "d_sae": str(sae.d_sae),
        "dtype": dtype_name(sae.dtype),
        "meta": meta_json,
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.tensors().items()}
    write_safetensors(target, tensors, metadata)
    return target


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, with the same bytes for the same tensors and metadata.

    safetensors keeps the metadata in a hash map, so its order (and the file's bytes) changes from
    one process to the next; the header is rewritten here as JSON with sorted keys, padded with
    spaces to a multiple of 8 bytes as safetensors pads it (the data section is unchanged).
    """
    blob = safetensors.torch.save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        fh.write(memoryview(blob)[8 + n :])
        fh.flush()
        os.fsync(fh.fileno())


def _migrate(metadata: dict[str, str], path: Path) -> dict[str, str]:
    """Upgrade metadata written by older schema versions (only version 1 exists so far)."""
    raw = metadata.get("schema_version", "")
    try:
        version = int(raw)
    except ValueError:
        raise SAEFormatError(f"{path}: schema_version: expected an integer, got {raw!r}") from None
    if not 1 <= version <= NATIVE_SCHEMA_VERSION:
        raise SAEFormatError(
            f"{path}: schema_version: expected 1..{NATIVE_SCHEMA_VERSION}, got {version} "
            "(written by a newer saematch?)"
        )
    return metadata


def load_native(path: Path, dtype: torch.dtype | None = None) -> SAE:
    """Load a file written by :func:`save_native` (on CPU; ``dtype`` None keeps the stored dtype)."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != NATIVE_FORMAT_ID:
        raise SAEFormatError(
            f"{path}: format: expected metadata format={NATIVE_FORMAT_ID!r}, got {metadata.get('format')!r}"
        )
    metadata = _migrate(metadata, path)
    activation = metadata.get("activation", "")
    require_keys(tensors, (*_KEYS, "threshold") if activation == "jumprelu" else _KEYS, path)
    for key, t in tensors.items():
        check_float(t, key, path)
    d_in = vector_dim(tensors["b_dec"], "b_dec", path)
    d_sae = vector_dim(tensors["b_enc"], "b_enc", path)
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        if metadata.get(key) != str(value):
            raise SAEFormatError(
                f"{path}: metadata {key}: expected {value} from the tensors, got {metadata.get(key)!r}"
            )
    check_shape(tensors["W_enc"], "W_enc", (d_in, d_sae), path, "(d_in, d_sae)")
    check_shape(tensors["W_dec"], "W_dec", (d_sae, d_in), path, "(d_sae, d_in)")
    k_raw = metadata.get("k", "")
    try:
        k = int(k_raw) if k_raw else None
    except ValueError:
        raise SAEFormatError(f"{path}: metadata k: expected an integer or empty, got {k_raw!r}") from None
    try:
        meta: Any = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as exc:
        raise SAEFormatError(f"{path}: metadata meta: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise SAEFormatError(f"{path}: metadata meta: expected a JSON object, got {type(meta).__name__}")
    params = {key: tensors[key] for key in _KEYS}
    if "threshold" in tensors:
        params["threshold"] = tensors["threshold"]
    if dtype is not None:
        params = {key: t.to(dtype) for key, t in params.items()}
    return build_sae(path, activation=activation, k=k, meta=meta, **params)
