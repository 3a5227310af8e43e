"""Tests for saematch_core.cache: keys, atomic writes, manifests."""

from __future__ import annotations

import json
import os
import signal
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
    content_key,
    folder_lock,
    read_manifest,
    write_manifest,
)


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
