"""Reading and writing SAEs: Gemma Scope, SAELens, sparsify, Llama Scope, saematch's own format, hub paths.

Every loader converts its layout at the file boundary (key names, transposes, input shifts and
scalings folded exactly into the weights) and returns a validated :class:`~saematch_core.sae.SAE`.

>>> import tempfile, pathlib, torch
>>> from saematch_core.sae import SAE
>>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
...           threshold=torch.tensor([0.5, 2.0]))
>>> path = save_sae(sae, pathlib.Path(tempfile.mkdtemp()) / "sae.safetensors")
>>> detect_format(path), torch.equal(load_sae(path).threshold, sae.threshold)
('native', True)
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from saematch_core.cache import recorded_problem
from saematch_core.errors import SAEFormatError
from saematch_core.formats._common import parse_dtype
from saematch_core.formats.gemma_scope import (
    GEMMA_SCOPE_2B_RES_16K_L0,
    GEMMA_SCOPE_2B_RES_REPO,
    gemma_scope_path,
    parse_gemma_scope_path,
)
from saematch_core.formats.hub import HUB_PREFIX, HubSpec, fetch_hub, list_hub_files, parse_hub_spec
from saematch_core.formats.native import save_native
from saematch_core.formats.registry import FORMATS, FormatRegistry, detect_format, register_format
from saematch_core.formats.resolve import ResolvedSAE, resolve
from saematch_core.sae import SAE

__all__ = [
    "FORMATS",
    "GEMMA_SCOPE_2B_RES_16K_L0",
    "GEMMA_SCOPE_2B_RES_REPO",
    "HUB_PREFIX",
    "FormatRegistry",
    "HubSpec",
    "ResolvedSAE",
    "detect_format",
    "fetch_hub",
    "gemma_scope_path",
    "list_hub_files",
    "load_sae",
    "parse_gemma_scope_path",
    "parse_hub_spec",
    "register_format",
    "resolve",
    "save_sae",
]


def load_sae(
    spec: str | os.PathLike[str] | ResolvedSAE,
    *,
    format: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load an SAE from a local file or folder, or from the hub (``hub:repo_id/path@revision``).

    Parameters
    ----------
    spec : a path, ``"hub:owner/name/path/inside/repo@revision"`` (revision optional), or what
        :func:`resolve` returned for one.
    format : one of ``FORMATS`` (``native``, ``gemma_scope``, ``saelens``, ``sparsify``,
        ``llama_scope``); ``None`` detects it from the content (see :func:`detect_format`).
    device : where the tensors go (default CPU).
    dtype : floating dtype (``torch.float32`` or ``"float32"``); ``None`` keeps the stored dtype.

    Returns
    -------
    SAE
        Validated; ``meta["source"]`` says where it came from (except for native files, whose meta is
        returned exactly as saved).

    Raises
    ------
    FileNotFoundError
        Missing file or folder (or hub file not found / not cached offline).
    SAEFormatError
        Unknown or ambiguous format, missing or unknown key, wrong shape, corrupt or truncated file,
        or a file that differs from what its integrity record (see :func:`saematch_core.cache.seal`)
        says was written.
    SAEValidationError
        Tensors that load but are not a valid SAE (NaN/inf, threshold < 0, ...).
    """
    target_dtype = parse_dtype(dtype)
    if isinstance(spec, ResolvedSAE):
        if format is not None and format != spec.format:
            raise ValueError(f"format: {format!r} given for {spec.source}, resolved as {spec.format!r}")
        resolved = spec
    else:
        resolved = resolve(spec, format=format)
    problem = recorded_problem(resolved.path) if resolved.path.is_file() else None
    if problem is not None:
        raise SAEFormatError(f"{resolved.path}: {problem}, by its integrity record; rebuild or re-save it")
    sae = FORMATS[resolved.format](resolved.path, target_dtype)
    if resolved.hub:
        sae = replace(sae, meta={**sae.meta, "source": resolved.source})
    if device is not None:
        sae = sae.to(device=device)
    return sae


def save_sae(sae: SAE, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Save ``sae`` in saematch's native format (one safetensors file), atomically.

    Raises ``FileExistsError`` for an existing ``path`` unless ``force``, ``FileNotFoundError`` when
    the folder of ``path`` is missing. See :func:`saematch_core.formats.native.save_native`.
    """
    return save_native(sae, path, force=force)
