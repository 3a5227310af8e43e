"""The registry of SAE file formats: name -> loader, plus detection by file/folder content."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import torch

from saematch_core.errors import SAEFormatError
from saematch_core.formats.gemma_scope import GEMMA_SCOPE_FILENAME, load_gemma_scope
from saematch_core.formats.llama_scope import (
    LLAMA_SCOPE_HYPERPARAMS,
    LLAMA_SCOPE_WEIGHTS,
    find_llama_scope_folder,
    load_llama_scope,
)
from saematch_core.formats.native import is_native_file, load_native
from saematch_core.formats.saelens import SAELENS_CFG, SAELENS_WEIGHTS, is_saelens_folder, load_saelens
from saematch_core.formats.sparsify import (
    SPARSIFY_CFG,
    SPARSIFY_WEIGHTS,
    find_sparsify_folder,
    load_sparsify,
)
from saematch_core.sae import SAE

__all__ = ["FOLDER_LAYOUTS", "FORMATS", "FormatRegistry", "Loader", "detect_format", "register_format"]

Loader = Callable[[Path, "torch.dtype | None"], SAE]
"""``load(path, dtype) -> SAE`` on CPU; ``dtype`` None keeps the stored dtype."""
Detector = Callable[[Path], bool]
"""``detect(path) -> bool``: does this local file or folder hold this format?"""


class _Entry(NamedTuple):
    load: Loader
    detect: Detector


class FormatRegistry(Mapping[str, Loader]):
    """Read-only mapping name -> loader; :meth:`register` adds a format (a name only once)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, load: Loader, detect: Detector) -> None:
        """Add a format; detection tries formats in registration order.

        Raises
        ------
        ValueError
            If ``name`` is already registered.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name: expected an identifier-like str, got {name!r}")
        if name in self._entries:
            raise ValueError(f"name: format {name!r} is already registered")
        self._entries[name] = _Entry(load, detect)

    def detectors(self) -> Iterator[tuple[str, Detector]]:
        for name, entry in self._entries.items():
            yield name, entry.detect

    def __getitem__(self, name: str) -> Loader:
        return self._entries[name].load

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"FormatRegistry({list(self._entries)})"


FORMATS = FormatRegistry()
"""Every known local format, by name: ``FORMATS["gemma_scope"](path, dtype) -> SAE``."""

FOLDER_LAYOUTS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = MappingProxyType(
    {
        "gemma_scope": ((GEMMA_SCOPE_FILENAME,), ()),
        "saelens": ((SAELENS_CFG, SAELENS_WEIGHTS), ()),
        "sparsify": ((SPARSIFY_CFG, SPARSIFY_WEIGHTS), ()),
        "llama_scope": ((LLAMA_SCOPE_WEIGHTS,), (LLAMA_SCOPE_HYPERPARAMS,)),
    }
)
"""The files (required, optional) that make a folder one of the built-in folder formats, in the
order the hub probes them."""


def register_format(name: str, load: Loader, detect: Detector) -> None:
    """Register a new local format in :data:`FORMATS` (a name can be registered only once)."""
    FORMATS.register(name, load, detect)


def _detect_gemma_scope(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".npz"
    return (path / GEMMA_SCOPE_FILENAME).is_file()


def _detect_saelens(path: Path) -> bool:
    return is_saelens_folder(path.parent if path.is_file() and path.name == SAELENS_WEIGHTS else path)


def _detect_sparsify(path: Path) -> bool:
    if path.is_file() and path.name != SPARSIFY_WEIGHTS:
        return False
    return find_sparsify_folder(path) is not None


def _detect_llama_scope(path: Path) -> bool:
    return find_llama_scope_folder(path) is not None


register_format("native", load_native, is_native_file)
register_format("gemma_scope", load_gemma_scope, _detect_gemma_scope)
register_format("saelens", load_saelens, _detect_saelens)
register_format("sparsify", load_sparsify, _detect_sparsify)
register_format("llama_scope", load_llama_scope, _detect_llama_scope)


def detect_format(path: str | os.PathLike[str]) -> str:
    """Name of the format of a local file or folder, judged by its content.

    ``*.npz`` or a folder with ``params.npz`` -> ``gemma_scope``; a safetensors file whose metadata
    says ``format="saematch"`` -> ``native``; ``cfg.json`` + ``sae_weights.safetensors`` ->
    ``saelens``; ``cfg.json`` + ``sae.safetensors`` (or a folder with exactly one such hookpoint
    subfolder) -> ``sparsify``; ``checkpoints/final.safetensors`` -> ``llama_scope``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    SAEFormatError
        If no format matches (the message lists the known formats), if several do (a folder holding
        e.g. both ``params.npz`` and SAELens files: the message lists the candidates and how to pick
        one), or a safetensors file is corrupt.
    """
    p = Path(path)
    if str(path).startswith("hub:"):
        raise ValueError(f"path: {path!r} is a hub spec; load it with load_sae, which downloads then detects")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    found = [name for name, detect in FORMATS.detectors() if detect(p)]
    if len(found) > 1:
        candidates = "; ".join(f"{name} ({_layout_files(p, name)})" for name in found)
        raise SAEFormatError(
            f"{p}: ambiguous, it holds the files of several SAE formats: {candidates}; point at the "
            "file you mean, or choose with format=... (saematch --format NAME)"
        )
    if found:
        return found[0]
    raise SAEFormatError(
        f"{p}: unknown SAE format; known formats: {sorted(FORMATS)} (and hub:repo_id/path@revision)"
    )


def _layout_files(folder: Path, name: str) -> str:
    layout = FOLDER_LAYOUTS.get(name)
    if layout is None or not folder.is_dir():
        return str(folder)
    if name == "sparsify":
        found = find_sparsify_folder(folder)
        folder = found if found is not None else folder
    return " + ".join(str(folder / f) for f in layout[0])
