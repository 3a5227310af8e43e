"""Damaged cached artifacts are found on reuse and rebuilt with one warning line, never used.

The same faults as a user would cause: a cached SAE truncated to half (also after the run's manifest
is deleted), bytes flipped inside its tensor data, a truncated activation file, a hand-edited
cached result.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from saematch_core import data
from saematch_core.activations import ActivationCache, open_activation_cache
from saematch_core.cache import check_file, read_manifest, record_path
from saematch_core.data import Document
from saematch_core.errors import DamagedFileError, SAEFormatError
from saematch_core.experiments.results import JsonResult, load_or_compute, result_path
from saematch_core.formats import FORMATS, load_sae
from saematch_core.prepare import prepare, sae_file
from saematch_core.profiles import Profile, get_profile


def _profile() -> Profile:
    smoke = get_profile("smoke")
    return dataclasses.replace(
        smoke,
        data=dataclasses.replace(smoke.data, train_tokens=256, eval_tokens=96, chunk_len=32),
        sae=dataclasses.replace(smoke.sae, n_tokens=256, width=16),
        sweep_layers=(),
        family_layers=(),
        seed_layers=(),
        delta_loss_tokens=0,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One prepared cache (toy corpora, 4 tiny SAEs), copied afresh for each test."""
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("austen", "code", "reference"):
            docs = tuple(Document(name, f"{name}{i:02d}", f"{name} text {i}. " * (20 + i)) for i in range(20))
            mp.setitem(data._READERS, name, lambda docs=docs: docs)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            prepare(_profile(), cache_dir=root, progress=False)
        finally:
            torch.set_num_threads(n)
    yield root


@pytest.fixture
def cache(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("austen", "code", "reference"):
        docs = tuple(Document(name, f"{name}{i:02d}", f"{name} text {i}. " * (20 + i)) for i in range(20))
        monkeypatch.setitem(data._READERS, name, lambda docs=docs: docs)
    root = tmp_path / "cache"
    shutil.copytree(built, root)
    return root


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("drop_manifest", [False, True])
def test_truncated_sae_is_rebuilt_not_reported_cached(
    cache: Path, caplog: pytest.LogCaptureFixture, drop_manifest: bool
) -> None:
    profile = _profile()
    victim = sae_file(cache / profile.name, "main", 1)
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    if drop_manifest:
        (cache / profile.name / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        again = prepare(profile, cache_dir=cache, progress=False)
    assert not again.cached and check_file(victim) is None
    assert load_sae(victim).d_sae == profile.sae.width
    damaged = [w for w in _warnings(caplog) if "damaged" in w]
    assert len(damaged) == 1 and damaged[0].startswith(f"{victim}: damaged cached file (truncated")
    assert prepare(profile, cache_dir=cache, progress=False).cached


def test_flipped_bytes_in_a_cached_sae_are_found(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    profile = _profile()
    victim = sae_file(cache / profile.name, "main", 2)
    before = load_sae(victim)
    raw = bytearray(victim.read_bytes())
    raw[-20] ^= 0x40  # inside the tensor data: the file still loads, as other weights
    victim.write_bytes(bytes(raw))
    after = FORMATS["native"](victim, None).tensors()  # the file still parses, as other weights
    assert any(not torch.equal(t, after[k]) for k, t in before.tensors().items())
    with pytest.raises(SAEFormatError, match=r"layer_02\.safetensors: content differs from when it was"):
        load_sae(victim)  # opened directly, it is checked against its record too
    with caplog.at_level(logging.WARNING):
        again = prepare(profile, cache_dir=cache, progress=False)
    assert not again.cached
    assert any(w.startswith(f"{victim}: damaged cached file (content differs") for w in _warnings(caplog))
    assert check_file(victim) is None


def test_truncated_activation_file_is_rebuilt_and_never_read_bare(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    profile = _profile()
    folder = cache / profile.name / "activations" / "eval"
    victim = folder / "layer_02.npy"
    good = victim.read_bytes()
    with open(victim, "r+b") as fh:
        fh.truncate(len(good) // 2)
    # Opened by hand, it names the file instead of numpy's "mmap length is greater than file size".
    stale = ActivationCache(folder=folder, manifest=read_manifest(folder) or {})
    with pytest.raises(DamagedFileError, match=r"layer_02\.npy: truncated: \d+ bytes, its \.npy header"):
        stale.layer(2)
    with caplog.at_level(logging.WARNING):
        assert open_activation_cache(folder) is None
        again = prepare(profile, cache_dir=cache, progress=False)
    assert not again.cached and victim.read_bytes() == good
    assert any(w.startswith(f"{victim}: damaged cached file (truncated") for w in _warnings(caplog))
    reopened = open_activation_cache(folder)
    assert reopened is not None and np.asarray(reopened.layer(2)).shape[0] == reopened.n_tokens


@dataclass(frozen=True, kw_only=True)
class _Answer(JsonResult):
    kind: ClassVar[str] = "answer"
    value: float


def test_hand_edited_result_is_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def compute() -> _Answer:
        calls.append(1)
        return _Answer(value=42.0)

    spec = {"question": "everything"}
    assert load_or_compute(_Answer, spec, compute, cache_dir=tmp_path).value == 42.0
    path = result_path(_Answer, spec, tmp_path)
    assert record_path(path).is_file()
    assert load_or_compute(_Answer, spec, compute, cache_dir=tmp_path).value == 42.0 and len(calls) == 1
    doc = json.loads(path.read_text())
    doc["data"]["value"] = 41.0
    path.write_text(json.dumps(doc, indent=1) + "\n")
    with caplog.at_level(logging.WARNING):
        assert load_or_compute(_Answer, spec, compute, cache_dir=tmp_path).value == 42.0
    assert len(calls) == 2 and any(str(path) in w for w in _warnings(caplog))


def test_full_disk_while_caching_activations_is_an_error_not_a_crash(cache: Path) -> None:
    """The arrays are memory-mapped: without reserved blocks a full disk would end in SIGBUS."""
    profile = _profile()
    shutil.rmtree(cache / profile.name / "activations" / "eval")

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "posix_fallocate", full)
        with pytest.raises(OSError, match=r"No space left on device: '.*eval\.partial/layer_00\.npy'"):
            prepare(profile, cache_dir=cache, progress=False)
    assert not (cache / profile.name / "activations" / "eval").exists()
    assert not prepare(profile, cache_dir=cache, progress=False).cached  # space again: it resumes
    assert prepare(profile, cache_dir=cache, progress=False).cached
