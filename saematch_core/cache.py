"""Content-keyed cache folders, manifests, atomic writes and integrity records.

Every file saematch writes goes through :func:`atomic_path` (or the two ``atomic_write_*``
helpers): the data is written to a temporary file in the *same* folder and moved onto the target
with :func:`os.replace` only when writing succeeded, so a crash or a kill leaves either the old
file or the new one, never half of one. Cached results live under :func:`cache_root` in folders
named by :func:`content_key` of the inputs that produced them, with a ``manifest.json`` that
describes the content; an unreadable manifest counts as missing, so callers rebuild.

Each cached artifact (SAE, activation array, result, matching) is *sealed* when written
(:func:`seal`: its size and SHA-256 in a hidden ``.<name>.record`` beside it) and checked before
it is reused (:func:`is_intact`): a truncated, resized or edited file is reported in one warning
line and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "FULL_HASH_BYTES",
    "MANIFEST_NAME",
    "RECORD_SUFFIX",
    "FileRecord",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_root",
    "check_file",
    "check_writable",
    "content_key",
    "file_sha256",
    "folder_lock",
    "is_intact",
    "load_npy",
    "preallocate",
    "read_manifest",
    "read_record",
    "record_path",
    "recorded_problem",
    "seal",
    "structure_problem",
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
    removed and ``path`` is left as it was; an :class:`OSError` of the write (disk full, permission
    denied, ...) is raised again naming ``path``, not the hidden temporary file. The written file
    gets the mode of any new file (``0o666`` less the umask), even when the writer replaced the
    temporary file by one of its own.

    Parameters
    ----------
    path : target file; its parent folder must exist.

    Raises
    ------
    FileNotFoundError
        If the parent folder of ``path`` does not exist.
    OSError
        If the folder is not writable or the write fails; the message names ``path``.

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
    try:
        tmp, mode = _create_temp(target)
    except OSError as exc:
        raise _naming(exc, target) from exc
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the block did not write the temporary file for {target}")
        # Writers such as safetensors' save_file replace the file by their own 0600 temporary.
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
        if not target.name.endswith(RECORD_SUFFIX):
            # The content changed: a record of the old content would call the new one damaged.
            with contextlib.suppress(FileNotFoundError):
                record_path(target).unlink()
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise _naming(exc, target) from exc
        raise
    logger.debug("wrote %s", target)


def _create_temp(target: Path) -> tuple[Path, int]:
    """Create the hidden temporary file for ``target``; return it and its mode (umask applied).

    ``os.open`` with mode ``0o666`` lets the kernel apply the umask (and default ACLs), which
    ``tempfile.mkstemp`` (always ``0o600``) would not; a shared cache stays readable by others.
    """
    for _ in range(100):
        name = f".{target.name}.{secrets.token_hex(4)}.tmp{target.suffix}"
        tmp = target.parent / name
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"{target.parent}: could not create a unique temporary file for {target.name}")


def _naming(exc: OSError, target: Path) -> OSError:
    """``exc`` again, but naming ``target`` (the file the caller asked for) instead of a temporary."""
    if exc.errno is None or exc.strerror is None:
        return type(exc)(f"{target}: cannot write ({exc or type(exc).__name__})")
    return type(exc)(exc.errno, exc.strerror, str(target))


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Raise unless a file can be created in ``folder`` (created and removed again at once).

    Asks the file system itself rather than the mode bits, so a read-only mount, a full inode table
    or a folder the user may not write is found even for root, before any expensive work.

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist.
    OSError
        (``PermissionError``, read-only file system, ...) naming ``folder``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder does not exist")
    try:
        tmp, _ = _create_temp(folder / ".saematch-write-probe")
    except OSError as exc:
        raise _naming(exc, folder) from exc
    tmp.unlink()


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


def preallocate(path: str | os.PathLike[str]) -> None:
    """Reserve the disk blocks of a file already sized (e.g. a zero-filled ``np.memmap``).

    A file created at its final size is sparse: its blocks are allocated only when the pages of a
    memory map are written, and on a full disk that write kills the process with SIGBUS, without a
    message. Reserving them up front turns that into an :class:`OSError` here, naming the file.
    Where the file system or platform cannot reserve blocks this does nothing.

    Raises
    ------
    OSError
        ``ENOSPC`` (disk full), ``EDQUOT`` (quota), ... naming ``path``.
    """
    path = Path(path)
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise _naming(exc, path) from exc
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- integrity records
RECORD_SUFFIX = ".record"
"""Suffix of the hidden record ``.<name>.record`` that :func:`seal` writes next to a file."""

FULL_HASH_BYTES = 64 * 2**20
"""Files up to this size (an SAE of 2048 × 2304 float32 features is 38 MB) are hashed on every
:func:`check_file`, ~70 ms at the ~1 GB/s SHA-256 runs at; larger ones (activation caches, 0.2–0.5
GB per layer) only when their size, mtime or ctime differ from the record's."""

_HASH_BLOCK = 4 * 2**20
_WARNED: set[tuple[str, str]] = set()


class FileRecord(NamedTuple):
    """What :func:`seal` records about a file when it is written."""

    size: int
    """Size in bytes."""
    sha256: str
    """SHA-256 of the content, hex."""
    mtime_ns: int
    """Modification time when recorded (or last verified), ns."""
    ctime_ns: int
    """Status-change time when recorded (or last verified), ns; any write or rename changes it."""


def record_path(path: str | os.PathLike[str]) -> Path:
    """Where the record of ``path`` lives: the hidden file ``.<name>.record`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{RECORD_SUFFIX}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _record_of(path: Path, sha256: str) -> FileRecord:
    st = path.stat()
    return FileRecord(st.st_size, sha256, st.st_mtime_ns, st.st_ctime_ns)


def seal(path: str | os.PathLike[str]) -> FileRecord:
    """Record the size and SHA-256 of a file just written, in :func:`record_path` (atomically).

    Call it after the file is complete; :func:`check_file` compares the file with this record.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
    >>> _ = f.write_bytes(b"abc")
    >>> seal(f).size, check_file(f)
    (3, None)
    >>> _ = f.write_bytes(b"abd")
    >>> check_file(f)
    'content differs from when it was written (SHA-256 mismatch)'
    """
    path = Path(path)
    record = _record_of(path, file_sha256(path))
    _write_record(path, record)
    return record


def _write_record(path: Path, record: FileRecord) -> None:
    atomic_write_text(record_path(path), json.dumps(record._asdict(), sort_keys=True) + "\n")


def read_record(path: str | os.PathLike[str]) -> FileRecord | None:
    """The record :func:`seal` wrote for ``path``, or ``None`` when there is none (or it is unreadable)."""
    try:
        data = json.loads(record_path(path).read_text(encoding="utf-8"))
        return FileRecord(**{name: data[name] for name in FileRecord._fields})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_file(path: str | os.PathLike[str], *, adopt: bool = True) -> str | None:
    """What is wrong with a cached file, or ``None`` when it is intact.

    Always (cheap): the file exists, has the recorded size, and its own header agrees with its
    size (:func:`structure_problem`: a safetensors header covers the data, an ``.npy`` header's
    shape × itemsize fits, JSON parses). Then the SHA-256 is compared with the record: always for
    files up to :data:`FULL_HASH_BYTES`, for larger ones only when their size, mtime or ctime differ
    from the record's (any write, truncation or copy changes those; a verified file's new stamp is
    recorded so it is not hashed again).

    Parameters
    ----------
    path : the file.
    adopt : a file without a record (written by an older version, or its record was deleted) that
        passes the cheap checks is sealed now, when its folder is writable.

    Returns
    -------
    str or None
        A short description (``"missing"``, ``"truncated: ..."``, ``"content differs ..."``).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    problem = structure_problem(path)
    if problem is not None:
        return problem
    record = read_record(path)
    if record is None:
        if adopt and os.access(path.parent, os.W_OK):
            with contextlib.suppress(OSError):
                seal(path)
                logger.info("%s: no integrity record (older cache); recorded its content now", path)
        return None
    if st.st_size != record.size:
        return f"{st.st_size} bytes, {record.size} when it was written"
    same_stamp = (st.st_mtime_ns, st.st_ctime_ns) == (record.mtime_ns, record.ctime_ns)
    if same_stamp and st.st_size > FULL_HASH_BYTES:
        return None
    if file_sha256(path) != record.sha256:
        return "content differs from when it was written (SHA-256 mismatch)"
    if not same_stamp:
        with contextlib.suppress(OSError):
            _write_record(path, _record_of(path, record.sha256))
    return None


def recorded_problem(path: str | os.PathLike[str]) -> str | None:
    """:func:`check_file` for a file that has a record; ``None`` for one without (nothing to compare).

    For readers that are not cache readers (loading a file the user named): a cached file copied
    or opened directly is still checked against what was written, and other files are left alone.
    """
    if read_record(path) is None:
        return None
    return check_file(path, adopt=False)


def is_intact(path: str | os.PathLike[str], *, adopt: bool = True) -> bool:
    """:func:`check_file` for cache readers: ``False`` for a missing or damaged file.

    A damaged file (anything but missing) gets a one-line warning naming it, once per process and
    problem; the caller then rebuilds it instead of using it. ``adopt`` as in :func:`check_file`.
    """
    problem = check_file(path, adopt=adopt)
    if problem is None:
        return True
    if problem != "missing" and (str(path), problem) not in _WARNED:
        _WARNED.add((str(path), problem))
        logger.warning("%s: damaged cached file (%s); not using it, rebuilding", path, problem)
    return False


def structure_problem(path: str | os.PathLike[str]) -> str | None:
    """Whether a file's own header agrees with its size (``None`` when it does, or is not checked).

    ``.safetensors``: the JSON header parses and its data offsets end exactly at the end of the
    file. ``.npy``: the header parses and shape × itemsize ends exactly at the end of the file.
    ``.json``: the text is valid JSON. Other suffixes are not checked. Reads the header only (JSON
    files in full).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            return _safetensors_problem(path, size)
        if path.suffix == ".npy":
            return _npy_problem(path, size)
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not valid JSON ({exc})"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"truncated: {size} bytes, the safetensors header alone takes {8 + n}"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "corrupt safetensors header (not valid JSON)"
    if not isinstance(header, dict):
        return "corrupt safetensors header (not a JSON object)"
    ends = [
        v.get("data_offsets", [0, 0])[1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict)
    ]
    expected = 8 + n + max((int(e) for e in ends), default=0)
    if expected != size:
        what = "truncated" if size < expected else "too long"
        return f"{what}: {size} bytes, its safetensors header describes {expected}"
    return None


def _npy_problem(path: Path, size: int) -> str | None:
    import numpy as np  # only here: this module is imported by processes that never read arrays

    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return None  # version 3 (utf-8 field names) is never written for plain arrays
        except (ValueError, EOFError) as exc:
            return f"corrupt .npy header ({exc})"
        offset = fh.tell()
    if dtype.hasobject:
        return None
    expected = offset + math.prod(shape) * dtype.itemsize
    if expected != size:
        what = "truncated" if size < expected else "too long"
        return f"{what}: {size} bytes, its .npy header {tuple(shape)} {dtype} describes {expected}"
    return None


def load_npy(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """``np.load`` of one ``.npy`` file (memory-mapped read-only by default, never with pickle).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    saematch_core.errors.DamagedFileError
        If it is truncated or corrupt; the message names the file and the sizes (numpy's own
        ``mmap length is greater than file size`` names neither).
    """
    import numpy as np

    from saematch_core.errors import DamagedFileError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    problem = structure_problem(path)
    if problem is not None:
        raise DamagedFileError(f"{path}: {problem}; rebuild it (saematch prepare rebuilds its caches)")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DamagedFileError(f"{path}: cannot be read as .npy ({exc})") from exc
