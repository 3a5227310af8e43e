"""SAEs on the Hugging Face Hub: ``hub:repo_id/path/inside/repo@revision``.

The files are fetched with :func:`huggingface_hub.hf_hub_download` (which honours ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` and ``HF_ENDPOINT``) into the usual hub cache, then loaded from there with the
local loader of their format. A path ending in ``.npz`` / ``.safetensors`` names one file; any other
path names a folder, whose layout is found by fetching each format's files in turn
(``params.npz``; ``cfg.json`` + ``sae_weights.safetensors``; ``cfg.json`` + ``sae.safetensors``;
``checkpoints/final.safetensors`` + ``hyperparams.json``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from huggingface_hub import constants, hf_hub_download, list_repo_files
from huggingface_hub.utils import EntryNotFoundError

from saematch_core.formats.gemma_scope import GEMMA_SCOPE_FILENAME
from saematch_core.formats.llama_scope import LLAMA_SCOPE_HYPERPARAMS, LLAMA_SCOPE_WEIGHTS
from saematch_core.formats.registry import FORMATS, detect_format
from saematch_core.formats.saelens import SAELENS_CFG, SAELENS_WEIGHTS
from saematch_core.formats.sparsify import SPARSIFY_CFG, SPARSIFY_WEIGHTS

__all__ = ["HUB_PREFIX", "HubSpec", "fetch_hub", "list_hub_files", "parse_hub_spec"]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hub:"

# Files each folder format needs (required, optional), in the order they are probed.
_FOLDER_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gemma_scope": ((GEMMA_SCOPE_FILENAME,), ()),
    "saelens": ((SAELENS_CFG, SAELENS_WEIGHTS), ()),
    "sparsify": ((SPARSIFY_CFG, SPARSIFY_WEIGHTS), ()),
    "llama_scope": ((LLAMA_SCOPE_WEIGHTS,), (LLAMA_SCOPE_HYPERPARAMS,)),
}
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class HubSpec(NamedTuple):
    """A parsed ``hub:`` spec."""

    repo_id: str
    """``owner/name``."""
    path: str
    """Path inside the repository (``""`` for the root), POSIX separators, no leading slash."""
    revision: str | None
    """Branch, tag or commit; ``None`` means the default branch."""


def parse_hub_spec(spec: str) -> HubSpec:
    """Split ``hub:owner/name/path/inside@revision`` into its parts.

    Examples
    --------
    >>> parse_hub_spec("hub:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71@main")
    HubSpec(repo_id='google/gemma-scope-2b-pt-res', path='layer_20/width_16k/average_l0_71', revision='main')
    """
    if not isinstance(spec, str) or not spec.startswith(HUB_PREFIX):
        raise ValueError(f"spec: expected 'hub:owner/name[/path][@revision]', got {spec!r}")
    body = spec[len(HUB_PREFIX) :]
    revision: str | None = None
    if "@" in body:
        body, _, revision = body.rpartition("@")
        if not revision:
            raise ValueError(f"spec: empty revision after '@' in {spec!r}")
    parts = [p for p in body.strip("/").split("/") if p]
    if len(parts) < 2 or not all(_REPO_PART.fullmatch(p) for p in parts[:2]):
        raise ValueError(f"spec: expected 'hub:owner/name[/path][@revision]', got {spec!r}")
    if any(p in (".", "..") for p in parts[2:]):
        raise ValueError(f"spec: '.' and '..' are not allowed in the path, got {spec!r}")
    return HubSpec(repo_id="/".join(parts[:2]), path="/".join(parts[2:]), revision=revision)


def _download(spec: HubSpec, filename: str) -> Path:
    full = str(PurePosixPath(spec.path, filename)) if spec.path else filename
    logger.info("fetching %s/%s@%s", spec.repo_id, full, spec.revision or "default")
    return Path(hf_hub_download(spec.repo_id, full, revision=spec.revision))


def _try_layout(spec: HubSpec, required: tuple[str, ...], optional: tuple[str, ...]) -> Path | None:
    """Download a layout's files; the local folder, or None when a required file is missing."""
    local: list[Path] = []
    for name in required:
        try:
            local.append(_download(spec, name))
        except EntryNotFoundError:
            return None
    for name in optional:
        try:
            _download(spec, name)
        except EntryNotFoundError:
            logger.debug("optional %s not in %s", name, spec)
    # The snapshot folder mirrors the repo, so the folder is the file's parent at the depth of required[0].
    folder = local[0]
    for _ in PurePosixPath(required[0]).parts:
        folder = folder.parent
    return folder


def fetch_hub(spec: str | HubSpec, format: str | None = None) -> tuple[Path, str]:
    """Download what a ``hub:`` spec needs; return the local path (file or folder) and its format.

    Parameters
    ----------
    spec : ``hub:owner/name/path@revision`` or a parsed :class:`HubSpec`.
    format : the format of the files (a key of ``FORMATS``); ``None`` detects it.

    Raises
    ------
    FileNotFoundError
        If no known layout is found at that path (offline: not in the local hub cache).
    """
    parsed = parse_hub_spec(spec) if isinstance(spec, str) else spec
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {sorted(FORMATS)}, got {format!r}")
    suffix = PurePosixPath(parsed.path).suffix
    if suffix in (".npz", ".safetensors", ".json"):
        parent = str(PurePosixPath(parsed.path).parent)
        folder_spec = parsed._replace(path="" if parent == "." else parent)
        name = PurePosixPath(parsed.path).name
        for fmt, (required, optional) in _FOLDER_LAYOUTS.items():
            # A file inside a folder layout (e.g. .../sae_weights.safetensors): fetch its siblings too.
            if (format in (None, fmt)) and name in required and len(required) > 1:
                folder = _try_layout(folder_spec, required, optional)
                if folder is not None:
                    return folder, fmt
        if parsed.path.endswith(LLAMA_SCOPE_WEIGHTS) and format in (None, "llama_scope"):
            base = parsed.path[: -len(LLAMA_SCOPE_WEIGHTS)].rstrip("/")
            folder = _try_layout(
                parsed._replace(path=base), (LLAMA_SCOPE_WEIGHTS,), (LLAMA_SCOPE_HYPERPARAMS,)
            )
            if folder is not None:
                return folder, "llama_scope"
        try:
            local = _download(folder_spec, name)
        except EntryNotFoundError as exc:
            raise FileNotFoundError(f"hub:{parsed.repo_id}/{parsed.path}: not found ({exc})") from exc
        return local, format or detect_format(local)
    tried: list[str] = []
    for fmt, (required, optional) in _FOLDER_LAYOUTS.items():
        if format not in (None, fmt):
            continue
        tried.append(f"{fmt}: {' + '.join(required)}")
        folder = _try_layout(parsed, required, optional)
        if folder is not None:
            return folder, fmt
    where = f"hub:{parsed.repo_id}/{parsed.path}" + (f"@{parsed.revision}" if parsed.revision else "")
    raise FileNotFoundError(
        f"{where}: no known SAE layout found (tried {tried}); offline (HF_HUB_OFFLINE=1) the files must "
        "already be in the hub cache"
    )


def list_hub_files(repo_id: str, revision: str | None = None) -> list[str]:
    """Every file path in a hub repository (POSIX, relative to its root).

    Asks the hub (:func:`huggingface_hub.list_repo_files`); offline (``HF_HUB_OFFLINE``) or when the
    hub cannot be reached, lists the files of the repository's snapshot in the local hub cache
    instead, so a profile can discover what it has already downloaded.

    Raises
    ------
    FileNotFoundError
        If the hub cannot be reached and the local cache has no snapshot of ``repo_id``.
    """
    reason = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            return sorted(list_repo_files(repo_id, revision=revision))
        except Exception as exc:  # connection errors come from whichever HTTP client the hub library uses
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("cannot list %s on the hub (%s); using the local hub cache", repo_id, reason)
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    snapshot = repo / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        raise FileNotFoundError(
            f"{repo_id}: no snapshot in the local hub cache ({repo}) and the hub could not be asked "
            f"({reason})"
        )
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
