"""SAEs on the Hugging Face Hub: ``hub:repo_id/path/inside/repo@revision``.

The files are fetched with :func:`huggingface_hub.hf_hub_download` (which honours ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` and ``HF_ENDPOINT``) into the usual hub cache, then loaded from there with the
local loader of their format. A path ending in ``.npz`` / ``.safetensors`` names one file; any other
path names a folder, whose layout is found by fetching each format's files in turn
(``params.npz``; ``cfg.json`` + ``sae_weights.safetensors``; ``cfg.json`` + ``sae.safetensors``;
``checkpoints/final.safetensors`` + ``hyperparams.json``).

Before the first request the hub is asked once, with a :data:`HUB_PROBE_TIMEOUT` limit, whether
it answers at all (:func:`probe_hub`). When it does not (no network, DNS failure, firewall), every
file is taken from the local hub cache only, instead of each request retrying for about 20 s, and
the error names the reason. Every error names the repository, the file and the revision as
``hub:owner/name/path/file@revision``.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from huggingface_hub import constants, hf_hub_download, list_repo_files
from huggingface_hub.utils import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    get_session,
)

from saematch_core.formats.llama_scope import LLAMA_SCOPE_HYPERPARAMS, LLAMA_SCOPE_WEIGHTS
from saematch_core.formats.registry import FOLDER_LAYOUTS, FORMATS, detect_format

__all__ = [
    "HUB_PREFIX",
    "HUB_PROBE_TIMEOUT",
    "HubSpec",
    "fetch_hub",
    "hub_where",
    "list_hub_files",
    "parse_hub_spec",
    "probe_hub",
]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hub:"

HUB_PROBE_TIMEOUT = 5.0
"""Seconds :func:`probe_hub` waits for the hub to answer before taking it as unreachable."""
_PROBE_MEMORY_S = 30.0
_unreachable: dict[str, tuple[float, str]] = {}

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


def hub_where(spec: HubSpec, filename: str = "") -> str:
    """``hub:owner/name/path/filename@revision`` (the default branch is named ``@main``)."""
    full = str(PurePosixPath(spec.path, filename)) if spec.path and filename else spec.path or filename
    rev = spec.revision or constants.DEFAULT_REVISION
    return f"{HUB_PREFIX}{spec.repo_id}" + (f"/{full}" if full else "") + f"@{rev}"


def probe_hub() -> str | None:
    """``None`` when the hub (``HF_ENDPOINT``) answers, else why it cannot be used.

    ``HF_HUB_OFFLINE`` answers at once; otherwise one HEAD request with a
    :data:`HUB_PROBE_TIMEOUT` limit decides (any HTTP status means reachable). A failure is
    remembered for 30 s, so loading many SAEs does not wait for each.
    """
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    now = time.monotonic()
    seen = _unreachable.get(endpoint)
    if seen is not None and now - seen[0] < _PROBE_MEMORY_S:
        return seen[1]
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT)
    except Exception as exc:  # connection errors come from whichever HTTP client the hub library uses
        reason = f"the hub at {endpoint} cannot be reached ({type(exc).__name__}: {exc})"
        _unreachable[endpoint] = (now, reason)
        return reason
    _unreachable.pop(endpoint, None)
    return None


def _download(spec: HubSpec, filename: str, local_only: bool) -> Path:
    """One file of ``spec``'s folder; ``EntryNotFoundError`` when it is not there (or not cached)."""
    full = str(PurePosixPath(spec.path, filename)) if spec.path else filename
    where = hub_where(spec, filename)
    logger.info("fetching %s", where)
    try:
        return Path(hf_hub_download(spec.repo_id, full, revision=spec.revision, local_files_only=local_only))
    except EntryNotFoundError:
        raise
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(
            f"{where}: repository {spec.repo_id!r} not found, or private/gated without a token "
            f"({type(exc).__name__})"
        ) from exc
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(
            f"{where}: revision {spec.revision!r} not found in {spec.repo_id!r} ({type(exc).__name__})"
        ) from exc
    except OSError as exc:
        raise OSError(f"{where}: download failed ({type(exc).__name__}: {exc})") from exc


def _try_layout(
    spec: HubSpec, required: tuple[str, ...], optional: tuple[str, ...], local_only: bool
) -> Path | None:
    """Download a layout's files; the local folder, or None when a required file is missing."""
    local: list[Path] = []
    for name in required:
        try:
            local.append(_download(spec, name, local_only))
        except EntryNotFoundError:
            return None
    for name in optional:
        try:
            _download(spec, name, local_only)
        except EntryNotFoundError:
            logger.debug("optional %s not in %s", name, hub_where(spec))
    # The snapshot folder mirrors the repo, so the folder is the file's parent at the depth of required[0].
    folder = local[0]
    for _ in PurePosixPath(required[0]).parts:
        folder = folder.parent
    return folder


def _not_found(where: str, what: str, unreachable: str | None) -> FileNotFoundError:
    if unreachable is None:
        return FileNotFoundError(f"{where}: {what}")
    cache = constants.HF_HUB_CACHE
    return FileNotFoundError(
        f"{where}: {what} in the local hub cache ({cache}), and {unreachable}; connect, or fetch the "
        "files once where the hub can be reached"
    )


def fetch_hub(spec: str | HubSpec, format: str | None = None) -> tuple[Path, str]:
    """Download what a ``hub:`` spec needs; return the local path (file or folder) and its format.

    Parameters
    ----------
    spec : ``hub:owner/name/path@revision`` or a parsed :class:`HubSpec`.
    format : the format of the files (a key of ``FORMATS``); ``None`` detects it.

    Raises
    ------
    FileNotFoundError
        If no known layout is found at that path, the repository or revision does not exist, or the
        hub cannot be reached (or ``HF_HUB_OFFLINE`` is set) and the files are not in the local hub
        cache; the message names ``hub:repo/path@revision`` and the reason.
    OSError
        If a download fails midway (named the same way).
    """
    parsed = parse_hub_spec(spec) if isinstance(spec, str) else spec
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {sorted(FORMATS)}, got {format!r}")
    unreachable = probe_hub()
    local_only = unreachable is not None
    if local_only:
        logger.info("%s; using the local hub cache only", unreachable)
    suffix = PurePosixPath(parsed.path).suffix
    if suffix in (".npz", ".safetensors", ".json"):
        parent = str(PurePosixPath(parsed.path).parent)
        folder_spec = parsed._replace(path="" if parent == "." else parent)
        name = PurePosixPath(parsed.path).name
        for fmt, (required, optional) in FOLDER_LAYOUTS.items():
            # A file inside a folder layout (e.g. .../sae_weights.safetensors): fetch its siblings too.
            if (format in (None, fmt)) and name in required and len(required) > 1:
                folder = _try_layout(folder_spec, required, optional, local_only)
                if folder is not None:
                    return folder, fmt
        if parsed.path.endswith(LLAMA_SCOPE_WEIGHTS) and format in (None, "llama_scope"):
            base = parsed.path[: -len(LLAMA_SCOPE_WEIGHTS)].rstrip("/")
            folder = _try_layout(
                parsed._replace(path=base), (LLAMA_SCOPE_WEIGHTS,), (LLAMA_SCOPE_HYPERPARAMS,), local_only
            )
            if folder is not None:
                return folder, "llama_scope"
        try:
            local = _download(folder_spec, name, local_only)
        except EntryNotFoundError as exc:
            raise _not_found(hub_where(parsed), "no such file", unreachable) from exc
        return local, format or detect_format(local)
    tried: list[str] = []
    for fmt, (required, optional) in FOLDER_LAYOUTS.items():
        if format not in (None, fmt):
            continue
        tried.append(f"{fmt}: {' + '.join(required)}")
        folder = _try_layout(parsed, required, optional, local_only)
        if folder is not None:
            return folder, fmt
    raise _not_found(hub_where(parsed), f"no known SAE layout found (tried {tried})", unreachable)


def list_hub_files(repo_id: str, revision: str | None = None) -> list[str]:
    """Every file path in a hub repository (POSIX, relative to its root).

    Asks the hub (:func:`huggingface_hub.list_repo_files`); offline (``HF_HUB_OFFLINE``) or when the
    hub cannot be reached (:func:`probe_hub`), lists the files of the repository's snapshot in the
    local hub cache instead, so a profile can discover what it has already downloaded.

    Raises
    ------
    FileNotFoundError
        If the hub cannot be reached and the local cache has no snapshot of ``repo_id``.
    """
    where = hub_where(HubSpec(repo_id, "", revision))
    reason = probe_hub()
    if reason is None:
        try:
            return sorted(list_repo_files(repo_id, revision=revision))
        except Exception as exc:  # connection errors come from whichever HTTP client the hub library uses
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "%s: cannot list the files on the hub (%s); using the local hub cache", where, reason
            )
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or constants.DEFAULT_REVISION)
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    snapshot = repo / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        raise FileNotFoundError(
            f"{where}: no snapshot in the local hub cache ({repo}) and the hub could not be asked ({reason})"
        )
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
