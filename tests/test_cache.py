"""Tests for saematch_core.cache: keys, atomic writes, manifests, write faults, integrity records."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import saematch_core.cache as cache_module
from saematch_core.cache import (
    MANIFEST_NAME,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    cache_root,
    check_file,
    check_writable,
    content_key,
    folder_lock,
    is_intact,
    load_npy,
    preallocate,
    read_manifest,
    read_record,
    record_path,
    seal,
    structure_problem,
    write_manifest,
)
from saematch_core.errors import DamagedFileError


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAEMATCH_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SAEMATCH_CACHE")
    assert cache_root() == Path.home() / ".cache" / "saematch"
    monkeypatch.setenv("SAEMATCH_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "saematch"


def test_content_key_stable_and_order_free() -> None:
    a = {"x": 1, "y": [1.5, "s"], "z": {"q": None, "p": True}}
    b = {"z": {"p": True, "q": None}, "y": [1.5, "s"], "x": 1}
    assert content_key(a) == content_key(b)
    assert len(content_key(a)) == 16
    int(content_key(a), 16)
    # Value changes, list order and int vs float change the key.
    assert content_key(a) != content_key({**a, "x": 2})
    assert content_key({"y": [1, 2]}) != content_key({"y": [2, 1]})
    # A frozen reference value: the key must not drift between versions (it names cache folders).
    assert content_key({"a": 1}) == "015abd7f5cc57a2d"


def test_content_key_bad_input() -> None:
    with pytest.raises(TypeError, match="spec: expected a mapping"):
        content_key([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="spec: expected JSON-serialisable"):
        content_key({"a": object()})
    with pytest.raises(ValueError, match="spec: expected finite floats"):
        content_key({"a": float("nan")})


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "a.txt", "héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_text(tmp_path / "a.txt", "second")
    assert (tmp_path / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.txt"]
    with pytest.raises(TypeError, match="data: expected bytes"):
        atomic_write_bytes(tmp_path / "b", "str")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text: expected str"):
        atomic_write_text(tmp_path / "b", b"x")  # type: ignore[arg-type]


def test_atomic_path_missing_parent(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"), atomic_path(missing / "x.txt"):
        pass
    assert not missing.exists()


def test_atomic_path_error_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_keeps_suffix_for_numpy(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    target = tmp_path / "params.npz"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path and tmp.name.startswith(".params.npz.")
        np.savez(tmp, a=np.arange(3))
    with np.load(target, allow_pickle=False) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["params.npz"]


@pytest.mark.parametrize("existing", [False, True])
def test_kill_mid_write_leaves_no_partial_file(tmp_path: Path, existing: bool) -> None:
    """A process SIGKILLed while writing leaves the target absent (or untouched), never partial."""
    target = tmp_path / "big.bin"
    if existing:
        target.write_bytes(b"old")
    ready = tmp_path / "ready"
    code = textwrap.dedent(
        f"""
        import importlib.util, os, signal
        from pathlib import Path
        # Load cache.py alone: importing the package would pull in torch and make the test slow.
        spec = importlib.util.spec_from_file_location("cache", {str(Path(cache_module.__file__))!r})
        cache = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cache)
        atomic_path = cache.atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"x" * 100_000)
                fh.flush()
                Path({str(ready)!r}).write_text("1")
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert ready.exists(), "the child was killed before it started writing"
    if existing:
        assert target.read_bytes() == b"old"
    else:
        assert not target.exists()
    # The orphaned temp file is hidden and recognisable, never at the target path.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in {"ready", "big.bin"}]
    assert all(name.startswith(".big.bin.") and ".tmp" in name for name in leftovers)


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = {"kind": "perm", "schema_version": 1, "inputs": {"a": "x", "b": [1, 2]}}
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME]


def test_manifest_missing_or_corrupt_is_none(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    assert read_manifest(tmp_path / "no_such_folder") is None
    (tmp_path / MANIFEST_NAME).write_text('{"kind": "perm", "sche')  # truncated
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage")
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")  # valid JSON but not an object
    assert read_manifest(tmp_path) is None


def test_write_manifest_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        write_manifest(tmp_path / "missing", {"a": 1})
    with pytest.raises(TypeError, match="manifest: expected a mapping"):
        write_manifest(tmp_path, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="manifest: expected JSON-serialisable"):
        write_manifest(tmp_path, {"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_folder_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "profile"
    with folder_lock(folder) as lock:
        assert lock == folder / ".lock" and lock.is_file()
        with pytest.raises(TimeoutError, match=r"\.lock: still locked"), folder_lock(folder, timeout=0.1):
            pass
    with folder_lock(folder, timeout=0.1):  # released at the end of the block
        pass


# ------------------------------------------------------------------------------ write faults, modes
def test_atomic_path_follows_the_umask_even_when_the_writer_replaces_the_file(tmp_path: Path) -> None:
    """Writers such as safetensors' ``save_file`` put their own 0600 file at the temporary path."""
    old = os.umask(0o002)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.unlink()
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
            os.write(fd, b"x")
            os.close(fd)
        atomic_write_text(tmp_path / "b.txt", "y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o664


def test_disk_full_names_the_target_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"No space left on device: '.*out\.json'$") as info:
        atomic_write_text(target, "new" * 1000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_folder_is_found_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Permission denied / read-only file system (simulated: root ignores mode bits)."""
    kind = PermissionError if code == errno.EACCES else OSError

    def refuse(target: Path) -> tuple[Path, int]:
        raise kind(code, os.strerror(code), str(target))

    check_writable(tmp_path)  # a real folder: fine
    monkeypatch.setattr(cache_module, "_create_temp", refuse)
    with pytest.raises(kind, match=rf"{os.strerror(code)}: '{tmp_path}'"):
        check_writable(tmp_path)
    with pytest.raises(kind, match=rf"{os.strerror(code)}: '{tmp_path / 'x.txt'}'"):
        atomic_write_text(tmp_path / "x.txt", "x")
    with pytest.raises(FileNotFoundError, match="nope: folder does not exist"):
        check_writable(tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- integrity
def _safetensors_file(path: Path) -> Path:
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"w": torch.arange(64.0)}, str(path), metadata={"a": "1"})
    return path


def test_seal_then_check_finds_truncation_flips_and_edits(tmp_path: Path) -> None:
    path = _safetensors_file(tmp_path / "sae.safetensors")
    record = seal(path)
    assert record.size == path.stat().st_size and read_record(path) == record
    assert record_path(path).name == ".sae.safetensors.record" and check_file(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    assert (
        check_file(path) == f"truncated: {len(data) - 40} bytes, its safetensors header describes {len(data)}"
    )
    flipped = bytearray(data)
    flipped[-9] ^= 0xFF  # inside the tensor data: the header still describes the file
    path.write_bytes(bytes(flipped))
    assert check_file(path) == "content differs from when it was written (SHA-256 mismatch)"
    path.write_bytes(data)
    assert check_file(path) is None  # the same bytes again (any write changes the stamp: re-hashed)
    assert check_file(tmp_path / "absent.safetensors") == "missing"


def test_large_files_are_hashed_only_when_their_stamp_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "layer.npy"
    import numpy as np

    np.save(path, np.arange(1000, dtype=np.float32))
    seal(path)
    monkeypatch.setattr(cache_module, "FULL_HASH_BYTES", 100)
    hashed: list[Path] = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda p: hashed.append(Path(p)) or real(p))
    assert check_file(path) is None and hashed == []  # unchanged stamp: not read
    before = path.stat()
    with open(path, "r+b") as fh:  # same size, one value changed, mtime put back
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert check_file(path) == "content differs from when it was written (SHA-256 mismatch)"
    assert hashed == [path]  # the ctime gave it away


def test_structure_checks_without_a_record(tmp_path: Path) -> None:
    import numpy as np

    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros((10, 4), dtype=np.float16))
    size = npy.stat().st_size
    with open(npy, "r+b") as fh:
        fh.truncate(size - 8)
    assert (
        structure_problem(npy)
        == f"truncated: {size - 8} bytes, its .npy header (10, 4) float16 describes {size}"
    )
    bad = tmp_path / "r.json"
    bad.write_text('{"a": ')
    assert (structure_problem(bad) or "").startswith("not valid JSON")
    short = tmp_path / "s.safetensors"
    short.write_bytes(b"\x10\x00")
    assert (structure_problem(short) or "").startswith("truncated")
    assert structure_problem(tmp_path / "a.npy") is not None and check_file(npy) is not None


def test_unrecorded_intact_file_is_adopted(tmp_path: Path) -> None:
    path = _safetensors_file(tmp_path / "old.safetensors")
    assert read_record(path) is None
    assert check_file(path) is None and read_record(path) is not None
    assert check_file(path, adopt=False) is None


def test_rewriting_drops_the_old_record(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_text(path, "[1]")
    seal(path)
    atomic_write_text(path, "[1, 2]")
    assert read_record(path) is None and check_file(path, adopt=False) is None


def test_is_intact_warns_once_naming_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _safetensors_file(tmp_path / "w.safetensors")
    seal(path)
    path.write_bytes(path.read_bytes()[:-8])
    with caplog.at_level("WARNING", logger="saematch_core.cache"):
        assert not is_intact(path) and not is_intact(path)
        assert not is_intact(tmp_path / "never_written.npy")  # missing: no warning
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: damaged cached file (truncated")
    assert "rebuilding" in lines[0] and "\n" not in lines[0]


def test_load_npy_names_the_damaged_file(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "layer_02.npy"
    np.save(path, np.ones((100, 8), dtype=np.float16))
    assert load_npy(path).shape == (100, 8)
    with open(path, "r+b") as fh:
        fh.truncate(500)
    with pytest.raises(DamagedFileError, match=r"layer_02\.npy: truncated: 500 bytes.*\(100, 8\) float16"):
        load_npy(path)
    with pytest.raises(FileNotFoundError, match=r"absent\.npy"):
        load_npy(tmp_path / "absent.npy")


def test_preallocate_turns_a_full_disk_into_an_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse memory-mapped file would die of SIGBUS when its pages are written on a full disk."""
    import numpy as np

    path = tmp_path / "layer_00.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1000, 64)).flush()
    preallocate(path)  # reserves the blocks for real
    assert os.stat(path).st_blocks * 512 >= os.stat(path).st_size

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=rf"No space left on device: '{path}'"):
        preallocate(path)

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    preallocate(path)  # nothing to reserve with: the old behaviour
