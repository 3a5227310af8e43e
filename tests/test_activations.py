"""Activation cache: values, layout, outliers, resume after a kill, corrupt manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saematch_core.activations import build_activation_cache, open_activation_cache
from saematch_core.cache import seal
from saematch_core.data import Chunk, Document, chunk_documents
from saematch_core.models import LoadedModel, capture_residuals, load_model
from saematch_core.profiles import get_profile

SPEC = {"model": "tiny", "split": "train"}


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(get_profile("smoke").model)


@pytest.fixture(scope="module")
def chunks(tiny: LoadedModel) -> list[Chunk]:
    docs = [
        Document("a" if i < 3 else "b", f"d{i}", f"Chapter {i}. " + "The quick brown fox. " * (2 + i))
        for i in range(6)
    ]
    return chunk_documents(docs, tiny.tokenizer.encode, chunk_len=24, n_tokens=10**6)


def _files(folder: Path) -> dict[str, bytes]:
    # Hidden files are the integrity records, which hold each file's write time.
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name[0] != "." and p.name != "manifest.json"
    }


def test_cache_holds_the_residuals(tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path) -> None:
    cache = build_activation_cache(tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=3, progress=False)
    n = sum(len(c.ids) for c in chunks)
    assert cache.n_tokens == n and cache.n_layers == 4 and cache.d_model == 32
    assert cache.layer(2).dtype == np.float16 and cache.layer(2).shape == (n, 32)
    assert cache.tokens.tolist() == np.concatenate([c.ids for c in chunks]).tolist()
    # Reference: each chunk alone through the model (no padding at all).
    for i in (0, len(chunks) - 1):
        rows = np.flatnonzero(cache.chunk_ids == i)
        assert cache.positions[rows].tolist() == list(range(len(chunks[i].ids)))
        ref = capture_residuals(tiny.model, torch.from_numpy(chunks[i].ids)[None])[:, 0]
        for layer in range(4):
            got = torch.from_numpy(np.asarray(cache.layer(layer)[rows], dtype=np.float32))
            torch.testing.assert_close(got, ref[layer], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(
                torch.from_numpy(np.asarray(cache.norms[layer, rows])),
                ref[layer].norm(dim=-1),
                atol=1e-5,
                rtol=1e-4,
            )
    assert cache.corpus_ranges == {
        "a": (0, cache.corpus_ranges["b"][0]),
        "b": (cache.corpus_ranges["b"][0], n),
    }
    assert [c["doc_id"] for c in cache.chunks] == [c.doc_id for c in chunks]
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["spec"] == SPEC and manifest["dtype"] == "float16" and "saematch_version" in manifest
    assert not (tmp_path / "acts.partial").exists()


def test_usable_excludes_position_zero_and_outliers(
    tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path
) -> None:
    cache = build_activation_cache(tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=4, progress=False)
    usable = cache.usable(1)
    assert not usable[cache.positions == 0].any()
    assert usable[cache.positions > 0].all()  # a random tiny model has no outliers
    # Plant an outlier norm: it is excluded at that layer only.
    norms = np.load(cache.folder / "norms.npy")
    norms[1, 5] = 11 * cache.median_norms[1]
    np.save(cache.folder / "norms.npy", norms)
    seal(cache.folder / "norms.npy")  # an edit on purpose: record it, or the cache counts as damaged
    reopened = open_activation_cache(cache.folder, SPEC)
    assert reopened is not None
    assert not reopened.usable(1)[5] and reopened.usable(2)[5]


def test_warm_cache_is_reused(tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path) -> None:
    build_activation_cache(tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=4, progress=False)
    calls: list[int] = []
    build_activation_cache(
        tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=4, progress=False, on_batch=calls.append
    )
    assert calls == []
    build_activation_cache(
        tiny,
        chunks,
        tmp_path / "acts",
        spec={**SPEC, "split": "eval"},
        batch_size=4,
        progress=False,
        on_batch=calls.append,
    )
    assert calls  # another spec: rebuilt


class _Killed(Exception):
    pass


def test_kill_and_resume_gives_identical_files(
    tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path
) -> None:
    clean = build_activation_cache(tiny, chunks, tmp_path / "clean", spec=SPEC, batch_size=2, progress=False)

    def kill(done: int) -> None:
        if done >= 4:
            raise _Killed

    with pytest.raises(_Killed):
        build_activation_cache(
            tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=2, progress=False, on_batch=kill
        )
    assert open_activation_cache(tmp_path / "acts") is None
    assert json.loads((tmp_path / "acts.partial" / "progress.json").read_text())["done"] == 4
    seen: list[int] = []
    resumed = build_activation_cache(
        tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=2, progress=False, on_batch=seen.append
    )
    assert seen[0] == 6  # started after the 4 chunks already done
    assert _files(resumed.folder) == _files(clean.folder)


def test_corrupt_manifest_is_rebuilt(tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path) -> None:
    cache = build_activation_cache(tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=4, progress=False)
    before = _files(cache.folder)
    (cache.folder / "manifest.json").write_text('{"format": 1, "n_tok')
    assert open_activation_cache(cache.folder, SPEC) is None
    calls: list[int] = []
    rebuilt = build_activation_cache(
        tiny, chunks, tmp_path / "acts", spec=SPEC, batch_size=4, progress=False, on_batch=calls.append
    )
    assert calls and open_activation_cache(rebuilt.folder, SPEC) is not None
    assert _files(rebuilt.folder) == before


def test_bfloat16_cache_says_so(tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path) -> None:
    exact = build_activation_cache(tiny, chunks, tmp_path / "fp32", spec=SPEC, progress=False)
    low = build_activation_cache(
        tiny, chunks, tmp_path / "bf16", spec=SPEC, precision="bfloat16", progress=False
    )
    assert "forward_precision" not in exact.manifest["spec"]
    assert low.manifest["spec"]["forward_precision"] == "bfloat16"
    # A float32 request never gets the bfloat16 cache, and a bfloat16 request finds its own.
    assert open_activation_cache(tmp_path / "bf16", SPEC) is None
    assert open_activation_cache(tmp_path / "bf16", {**SPEC, "forward_precision": "bfloat16"}) is not None
    a, b = exact.layer(3).astype(np.float32), low.layer(3).astype(np.float32)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert 1e-4 < rel.max() < 0.05
    with pytest.raises(ValueError, match=r"spec\['forward_precision'\]: expected 'float32' like precision"):
        build_activation_cache(
            tiny, chunks, tmp_path / "x", spec={**SPEC, "forward_precision": "bfloat16"}, progress=False
        )


def test_bad_arguments(tiny: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunks: expected at least one chunk"):
        build_activation_cache(tiny, [], tmp_path / "x", spec=SPEC)
    with pytest.raises(ValueError, match="batch_size: expected >= 1, got 0"):
        build_activation_cache(
            tiny, [Chunk("a", "d", 0, np.arange(3))], tmp_path / "x", spec=SPEC, batch_size=0
        )
