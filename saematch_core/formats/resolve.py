"""The one way from what a user typed (a path or ``hub:...``) to a local file and its format.

:func:`~saematch_core.formats.load_sae` and the ``saematch`` command both go through
:func:`resolve`, so a hub SAE loaded either way downloads the same files, finds the same format and
records the same ``meta["source"]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from saematch_core.formats.hub import HUB_PREFIX, fetch_hub
from saematch_core.formats.registry import FORMATS, detect_format

__all__ = ["ResolvedSAE", "resolve"]


class ResolvedSAE(NamedTuple):
    """Where an SAE spec points to, once resolved."""

    path: Path
    """The local file or folder to load (inside the hub cache for ``hub:`` specs)."""
    format: str
    """Its format, a key of ``FORMATS`` (given, or detected from the content)."""
    source: str
    """The spec as given (a path or ``hub:owner/name/path@revision``)."""
    hub: bool
    """Whether it came from the hub (the loaded SAE's ``meta["source"]`` is then :attr:`source`)."""


def resolve(spec: str | os.PathLike[str], *, format: str | None = None) -> ResolvedSAE:
    """Find the local file or folder and the format of an SAE spec (downloading ``hub:`` specs).

    Parameters
    ----------
    spec : a local path, or ``"hub:owner/name/path/inside/repo@revision"`` (revision optional).
    format : one of ``FORMATS``; ``None`` detects it (see
        :func:`~saematch_core.formats.detect_format`).

    Raises
    ------
    FileNotFoundError
        Missing file or folder, or hub file not found (see
        :func:`~saematch_core.formats.fetch_hub`).
    SAEFormatError
        Unknown or ambiguous format.

    Examples
    --------
    >>> import tempfile, pathlib, torch
    >>> from saematch_core.sae import SAE
    >>> from saematch_core.formats import save_sae
    >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
    ...           activation="relu")
    >>> path = save_sae(sae, pathlib.Path(tempfile.mkdtemp()) / "sae.safetensors")
    >>> found = resolve(str(path))
    >>> found.format, found.hub, found.path == path
    ('native', False, True)
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {sorted(FORMATS)} or None, got {format!r}")
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(text, str):
        raise TypeError(f"spec: expected a path or 'hub:...' str, got {type(spec).__name__}")
    if text.startswith(HUB_PREFIX):
        local, found = fetch_hub(text, format)
        return ResolvedSAE(local, found, text, True)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return ResolvedSAE(path, format or detect_format(path), text, False)
