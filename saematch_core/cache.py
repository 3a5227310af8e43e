"""Content-keyed cache folders, manifests and atomic writes.

Every file saematch writes goes through :func:`atomic_path` (or the two ``atomic_write_*``
helpers): the data is written to a temporary file in the *same* folder and moved onto the target
with :func:`os.replace` only when writing succeeded, so a crash or a kill leaves either the old
file or the new one, never half of one. Cached results live under :func:`cache_root` in folders
named by :func:`content_key` of the inputs that produced them, with a ``manifest.json`` that
describes the content; an unreadable manifest counts as missing, so callers rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_NAME",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_root",
    "content_key",
    "folder_lock",
    "read_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside a cache folder."""

_ENV_CACHE = "SAEMATCH_CACHE"


def cache_root() -> Path:
    """The root of saematch's on-disk cache.

    ``$SAEMATCH_CACHE`` when set (and non-empty), otherwise ``~/.cache/saematch``. The folder is
    not created here; writers create what they need.
    """
    env = os.environ.get(_ENV_CACHE, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "saematch"


def _canonical_json(spec: Mapping[str, Any]) -> str:
    # Sorted keys and fixed separators make the text, hence the key, independent of dict order.
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def content_key(spec: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit key for a JSON-serialisable description of some content.

    The key is the first 16 hex digits of the SHA-256 of ``spec`` as canonical JSON (sorted keys,
    no whitespace), so equal specs give equal keys across runs, machines and dict orders.

    Parameters
    ----------
    spec : mapping with str keys and JSON-serialisable values (no NaN/inf floats).

    Raises
    ------
    TypeError
        If ``spec`` is not a mapping or holds a value JSON cannot encode.
    ValueError
        If ``spec`` holds a NaN or infinite float.

    Examples
    --------
    >>> content_key({"b": 1, "a": [1, 2]}) == content_key({"a": [1, 2], "b": 1})
    True
    >>> len(content_key({"a": 1}))
    16
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec: expected a mapping, got {type(spec).__name__}")
    try:
        text = _canonical_json(spec)
    except TypeError as exc:
        raise TypeError(f"spec: expected JSON-serialisable values, {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"spec: expected finite floats only, {exc}") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder (so :func:`os.replace` is atomic on POSIX and
    Windows) and has a hidden name ``.<name>.<random>.tmp<suffix>``, so writers that add a suffix
    when it is missing (``np.savez``) write to it as is. If the block raises, the temporary file is
    removed and ``path`` is left as it was.

    Parameters
    ----------
    path : target file; its parent folder must exist.

    Raises
    ------
    FileNotFoundError
        If the parent folder of ``path`` does not exist.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text()
    'hello'
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: output folder does not exist (for {target.name})")
    # Keep the target's suffix so writers that append one when missing (np.savez) use tmp as is.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs should be readable like any file the user writes.
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the block did not write the temporary file for {target}")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    logger.debug("wrote %s", target)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`), flushed to disk first."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_path`)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def write_manifest(folder: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` as ``folder/manifest.json`` atomically (indented, sorted keys).

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist.
    TypeError
        If ``manifest`` is not a mapping or is not JSON-serialisable.
    """
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest: expected a mapping, got {type(manifest).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: cache folder does not exist")
    try:
        text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"manifest: expected JSON-serialisable values, {exc}") from exc
    atomic_write_text(folder / MANIFEST_NAME, text + "\n")


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read ``folder/manifest.json``.

    Returns
    -------
    dict or None
        The manifest, or ``None`` when it is missing, unreadable, not valid JSON or not a JSON
        object: the caller should then rebuild the folder's content.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s: unreadable manifest (%s); treating it as missing", path, exc)
        return None
    if not isinstance(data, dict):
        logger.warning(
            "%s: expected a JSON object, got %s; treating it as missing", path, type(data).__name__
        )
        return None
    return data


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], *, timeout: float | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file inside it) for the block.

    Two processes that fill the same cache folder (two ``saematch prepare`` runs, a notebook and
    the CLI) would otherwise both compute every missing file; with the lock the second one waits,
    then finds the first one's results. The lock is advisory (``fcntl.flock``), released when the
    block ends or the process dies; where ``fcntl`` is missing (Windows) the block runs unlocked.

    Parameters
    ----------
    folder : the cache folder; created if missing.
    timeout : seconds to wait for the lock; ``None`` waits as long as it takes.

    Raises
    ------
    TimeoutError
        If another process holds the lock for longer than ``timeout``.

    Examples
    --------
    >>> import tempfile
    >>> with folder_lock(tempfile.mkdtemp()) as lock:
    ...     lock.name
    '.lock'
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield Path(folder) / ".lock"
        return
    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    logger.info("%s: another process is filling this cache; waiting for it", folder)
                    waiting = True
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{path}: still locked by another process after {timeout:g} s"
                    ) from None
                time.sleep(0.2)
        try:
            yield path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
