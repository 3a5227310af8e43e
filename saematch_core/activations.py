"""On-disk cache of the residual stream after every block, fp16 and memory-mapped.

Layout of a cache folder (one per profile and split)::

    manifest.json          what it holds (spec, token count, dtype, medians, library version)
    tokens.npy             (n_tokens,) int32   token ids, chunk after chunk
    positions.npy          (n_tokens,) int32   position of each token inside its chunk (0 = BOS / sink)
    chunk_ids.npy          (n_tokens,) int32   index of the chunk each token belongs to
    chunks.json            per chunk: corpus, doc_id, start (token offset in the document), length
    norms.npy              (n_layers, n_tokens) float32  ‖h‖ of every residual vector (before fp16)
    layer_00.npy ...       (n_tokens, d_model) float16   residual after block L

The folder is built in ``<folder>.partial`` and moved into place (``os.replace``) only when
complete, with the manifest written last; after each batch the arrays are flushed and
``progress.json`` records how many chunks are done, so a killed build resumes where it stopped and
produces the same bytes. A folder whose manifest is missing, corrupt or describes another spec is
rebuilt.

Outliers: from the middle layers on, position 0 and a few tokens at position 1 have norms 80-145×
the median. :meth:`ActivationCache.usable` excludes position 0 and every token whose norm exceeds
``outlier_factor`` × the layer's median norm (over positions ≥ 1).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from saematch_core.cache import (
    atomic_write_text,
    content_key,
    is_intact,
    load_npy,
    preallocate,
    read_manifest,
    seal,
    write_manifest,
)
from saematch_core.data import Chunk
from saematch_core.models import LoadedModel, capture_residuals, forward_precision

__all__ = ["FORMAT_VERSION", "ActivationCache", "build_activation_cache", "open_activation_cache"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the folder layout above; part of every cache spec."""

_FP16_MAX = float(np.finfo(np.float16).max)
_PROGRESS = "progress.json"


def _layer_file(layer: int) -> str:
    return f"layer_{layer:02d}.npy"


@dataclass(frozen=True, eq=False)
class ActivationCache:
    """A finished activation cache folder, opened read-only (arrays are memory-mapped)."""

    folder: Path
    """The cache folder."""
    manifest: Mapping[str, Any]
    """Its manifest (``spec``, ``n_tokens``, ``n_layers``, ``d_model``, ``median_norms``, ...)."""

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def outlier_factor(self) -> float:
        return float(self.manifest["outlier_factor"])

    @property
    def median_norms(self) -> np.ndarray:
        """Median residual norm per layer over positions ≥ 1, shape (n_layers,)."""
        return np.asarray(self.manifest["median_norms"], dtype=np.float64)

    @property
    def corpus_ranges(self) -> dict[str, tuple[int, int]]:
        """Token row range ``[start, stop)`` of each corpus (corpora are stored one after another)."""
        return {name: (int(a), int(b)) for name, (a, b) in self.manifest["corpus_ranges"].items()}

    def _load(self, name: str) -> np.ndarray:
        return load_npy(self.folder / name)

    @cached_property
    def tokens(self) -> np.ndarray:
        """Token ids, shape (n_tokens,), int32."""
        return self._load("tokens.npy")

    @cached_property
    def positions(self) -> np.ndarray:
        """Position of each token in its chunk, shape (n_tokens,), int32."""
        return self._load("positions.npy")

    @cached_property
    def chunk_ids(self) -> np.ndarray:
        """Chunk index of each token, shape (n_tokens,), int32."""
        return self._load("chunk_ids.npy")

    @cached_property
    def norms(self) -> np.ndarray:
        """Residual norms, shape (n_layers, n_tokens), float32 (computed before the fp16 cast)."""
        return self._load("norms.npy")

    @cached_property
    def chunks(self) -> list[dict[str, Any]]:
        """Per chunk: ``corpus``, ``doc_id``, ``start``, ``length``."""
        return json.loads((self.folder / "chunks.json").read_text(encoding="utf-8"))

    def layer(self, layer: int) -> np.ndarray:
        """Residual after block ``layer``, shape (n_tokens, d_model), float16, memory-mapped."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer: expected 0..{self.n_layers - 1}, got {layer}")
        return self._load(_layer_file(layer))

    def usable(self, layer: int) -> np.ndarray:
        """Rows used for training and metrics at ``layer``, shape (n_tokens,), bool.

        Excludes position 0 (BOS / attention sink) and outliers whose norm exceeds
        ``outlier_factor`` × the layer's median norm.
        """
        limit = self.outlier_factor * self.median_norms[layer]
        return (np.asarray(self.positions) > 0) & (np.asarray(self.norms[layer]) <= limit)


def _chunk_records(chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
    return [
        {"corpus": c.corpus, "doc_id": c.doc_id, "start": int(c.start), "length": len(c.ids)} for c in chunks
    ]


def open_activation_cache(
    folder: str | os.PathLike[str], spec: Mapping[str, Any] | None = None
) -> ActivationCache | None:
    """The finished cache at ``folder``, or ``None`` if absent, corrupt or built from another ``spec``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != FORMAT_VERSION:
        return None
    if spec is not None and manifest.get("spec_key") != content_key(spec):
        return None
    needed = ["tokens.npy", "positions.npy", "chunk_ids.npy", "norms.npy", "chunks.json"]
    needed += [_layer_file(i) for i in range(int(manifest.get("n_layers", 0)))]
    if not all(is_intact(folder / name) for name in needed):
        return None
    return ActivationCache(folder=folder, manifest=manifest)


def build_activation_cache(
    loaded: LoadedModel,
    chunks: Sequence[Chunk],
    folder: str | os.PathLike[str],
    *,
    spec: Mapping[str, Any],
    batch_size: int = 8,
    outlier_factor: float = 10.0,
    force: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    precision: str = "float32",
) -> ActivationCache:
    """Run the model over ``chunks`` and cache the residual after every block (resumable).

    Parameters
    ----------
    loaded : the language model.
    chunks : token chunks, stored in this order (group them by corpus for contiguous ranges).
    folder : destination; ``<folder>.partial`` holds an unfinished build.
    spec : JSON description of what is cached (model, data, split); a cache with another spec is
        rebuilt.
    batch_size : chunks per forward pass.
    outlier_factor : stored in the manifest; see :meth:`ActivationCache.usable`.
    force : rebuild even if a matching cache exists.
    on_batch : called with the number of chunks done after each flushed batch (progress hooks,
        tests that simulate a kill).
    precision : arithmetic of the forward passes (:func:`saematch_core.models.forward_precision`);
        the residuals are stored as float16 either way. When not ``float32`` it is part of the
        stored spec (``forward_precision``), so open the cache with a spec that says it.

    Returns
    -------
    ActivationCache
    """
    folder = Path(folder)
    if not chunks:
        raise ValueError("chunks: expected at least one chunk, got none")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    from saematch_core import __version__

    spec = dict(spec)
    if precision != "float32" or "forward_precision" in spec:
        # float32 caches built before precision was a choice have no such entry: keep them valid
        said = spec.setdefault("forward_precision", precision)
        if said != precision:
            raise ValueError(
                f"spec['forward_precision']: expected {precision!r} like precision, got {said!r}"
            )
    key = content_key({**spec, "format": FORMAT_VERSION, "outlier_factor": outlier_factor})
    if not force:
        found = open_activation_cache(folder, spec)
        if found is not None and found.outlier_factor == outlier_factor:
            return found

    n_layers, d_model = loaded.n_layers, loaded.d_model
    lengths = np.array([len(c.ids) for c in chunks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_tokens = int(offsets[-1])

    work = folder.with_name(folder.name + ".partial")
    state = _read_progress(work)
    done = state["done"] if state is not None and state["key"] == key and not force else 0
    if done == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _write_static(work, chunks, offsets, n_layers, d_model)
        _write_progress(work, key, 0)
    mode = "r+"
    layer_maps = [open_memmap(work / _layer_file(i), mode=mode) for i in range(n_layers)]
    norm_map = open_memmap(work / "norms.npy", mode=mode)
    clipped = int(state.get("clipped", 0)) if state is not None and done else 0

    model = loaded.model
    device = next(model.parameters()).device
    bar = tqdm(total=n_tokens, initial=int(offsets[done]), unit="tok", unit_scale=True, disable=not progress)
    bar.set_description(f"activations {folder.name}")
    start_time = time.perf_counter()
    for lo in range(done, len(chunks), batch_size):
        hi = min(lo + batch_size, len(chunks))
        batch = chunks[lo:hi]
        width = max(len(c.ids) for c in batch)
        # Right padding needs no attention mask in a causal model: real tokens never see the pads.
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, c in enumerate(batch):
            ids[row, : len(c.ids)] = torch.from_numpy(c.ids)
        with forward_precision(precision, device):
            resid = capture_residuals(model, ids.to(device)).float().cpu()  # (L, B, S, d)
        for row, c in enumerate(batch):
            a, b = int(offsets[lo + row]), int(offsets[lo + row + 1])
            h = resid[:, row, : len(c.ids)]
            norm_map[:, a:b] = torch.linalg.vector_norm(h, dim=-1).numpy()
            over = h.abs() > _FP16_MAX
            clipped += int(over.sum())
            h16 = h.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).numpy()
            for layer in range(n_layers):
                layer_maps[layer][a:b] = h16[layer]
        for m in (*layer_maps, norm_map):
            m.flush()
        _write_progress(work, key, hi, clipped=clipped)
        bar.update(int(offsets[hi] - offsets[lo]))
        if on_batch is not None:
            on_batch(hi)
    bar.close()
    elapsed = time.perf_counter() - start_time
    del layer_maps

    medians = []
    positions = np.load(work / "positions.npy")
    for layer in range(n_layers):
        row = np.asarray(norm_map[layer])[positions > 0]
        medians.append(float(np.median(row)) if row.size else 0.0)
    n_outliers = [
        int(((np.asarray(norm_map[i]) > outlier_factor * medians[i]) & (positions > 0)).sum())
        for i in range(n_layers)
    ]
    del norm_map
    if clipped:
        logger.warning("%s: %d residual entries exceeded the fp16 range and were clipped", folder, clipped)
    corpus_ranges: dict[str, list[int]] = {}
    for c, a, b in zip(chunks, offsets[:-1], offsets[1:], strict=True):
        lo_hi = corpus_ranges.setdefault(c.corpus, [int(a), int(b)])
        lo_hi[1] = int(b)
    manifest = {
        "format": FORMAT_VERSION,
        "spec": spec,
        "spec_key": content_key(spec),
        "build_key": key,
        "saematch_version": __version__,
        "dtype": "float16",
        "n_tokens": n_tokens,
        "n_chunks": len(chunks),
        "n_layers": n_layers,
        "d_model": d_model,
        "outlier_factor": outlier_factor,
        "median_norms": medians,
        "n_outliers": n_outliers,
        "n_clipped_fp16": clipped,
        "corpus_ranges": corpus_ranges,
        "build_seconds_last_session": round(elapsed, 3),
    }
    (work / _PROGRESS).unlink()
    for file in sorted(p for p in work.iterdir() if not p.name.startswith(".")):
        seal(file)
    write_manifest(work, manifest)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(work, folder)
    logger.info("cached %d tokens × %d layers in %s", n_tokens, n_layers, folder)
    return ActivationCache(folder=folder, manifest=manifest)


def _write_static(
    work: Path, chunks: Sequence[Chunk], offsets: np.ndarray, n_layers: int, d_model: int
) -> None:
    n_tokens = int(offsets[-1])
    tokens = np.concatenate([c.ids for c in chunks]).astype(np.int32)
    positions = np.concatenate([np.arange(len(c.ids)) for c in chunks]).astype(np.int32)
    chunk_ids = np.repeat(np.arange(len(chunks)), np.diff(offsets)).astype(np.int32)
    for name, arr in (("tokens.npy", tokens), ("positions.npy", positions), ("chunk_ids.npy", chunk_ids)):
        np.save(work / name, arr)
    atomic_write_text(work / "chunks.json", json.dumps(_chunk_records(chunks)))
    # Zero-filled files of the final size; rows are filled batch by batch.
    for i in range(n_layers):
        open_memmap(work / _layer_file(i), mode="w+", dtype=np.float16, shape=(n_tokens, d_model)).flush()
        preallocate(work / _layer_file(i))
    open_memmap(work / "norms.npy", mode="w+", dtype=np.float32, shape=(n_layers, n_tokens)).flush()
    preallocate(work / "norms.npy")


def _read_progress(work: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((work / _PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("done"), int) or "key" not in state:
        return None
    return state


def _write_progress(work: Path, key: str, done: int, *, clipped: int = 0) -> None:
    atomic_write_text(work / _PROGRESS, json.dumps({"key": key, "done": done, "clipped": clipped}))
