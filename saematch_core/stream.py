"""Training many SAEs from one streamed forward pass, without an activation cache on disk.

Each batch of chunks runs through the model once; the residuals of every layer that has SAEs to
train go into that layer's *mixing buffer* (float16, like the disk cache), and whenever every buffer
holds ``buffer_tokens`` rows, each buffer is shuffled and its first half is served to the SAEs of its
layer (each SAE takes its own random batches of that half), then dropped. A row is served exactly
once per pass over the chunks, so an SAE whose token budget equals the usable training tokens sees
every token once, as :func:`saematch_core.train.train_sae` does over a cache; a larger budget starts
another pass in a new chunk order (more epochs cost another forward pass, where the disk cache
re-reads).

Differences from training over the disk cache, all deliberate:

- the input scale ``s`` and the mean that initialises ``b_dec`` come from the first full buffer of
  the layer (``buffer_tokens`` rows), not from every training row;
- the outlier limit per layer is given (``prepare`` takes the evaluation cache's medians, which
  exist before training starts) instead of the training split's own medians;
- batches come from a buffer of ``buffer_tokens`` rows (about ``buffer_tokens / chunk_len`` chunks)
  instead of the whole split; chunks are shuffled across corpora first.

What streaming buys: no training activations on disk (the default profile's take 35 KB per token,
6.3 GB for 193k tokens), hence more distinct tokens than the disk could hold, and no write and
read-back. Resumability: the caller gets each SAE as soon as it is done (``on_done``); a killed
stream restarts with the SAEs not yet saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saematch_core.cache import atomic_path, atomic_write_text, content_key
from saematch_core.data import Chunk
from saematch_core.models import LoadedModel, capture_residuals, forward_precision
from saematch_core.profiles import SAETrainConfig
from saematch_core.train import SAETrainer, StepBuffers, TrainResult, input_scale, threads_for

__all__ = ["STREAM_VERSION", "StreamJob", "StreamStats", "train_streamed"]

STREAM_VERSION = 1
"""Version of the streaming scheme above; part of the key of every streamed SAE."""

_INIT_SAMPLE = 4096

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamJob:
    """One SAE to train from the stream."""

    layer: int
    """Residual layer (after block ``layer``)."""
    config: SAETrainConfig
    """Its recipe (its ``seed`` draws the initial dictionary and its batches)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Extra provenance stored in the trained ``sae.meta``."""


@dataclass(frozen=True, kw_only=True)
class StreamStats:
    """What a streamed training run cost."""

    tokens_forwarded: int
    """Tokens run through the model (all passes)."""
    passes: float
    """Passes over the chunks (fractional for the last one)."""
    forward_seconds: float
    """Time in model forward passes and buffer filling."""
    train_seconds: float
    """Time in SAE steps (all SAEs)."""
    peak_buffer_bytes: int
    """Memory held by the mixing buffers."""


class _Buffer:
    """Rows of one layer waiting to be served, float16, grown as needed."""

    def __init__(self, d_model: int, capacity: int) -> None:
        self.rows = torch.empty((capacity, d_model), dtype=torch.float16)
        self.count = 0

    def append(self, new: Tensor) -> None:
        need = self.count + len(new)
        if need > len(self.rows):
            grown = torch.empty((max(need, 2 * len(self.rows)), self.rows.shape[1]), dtype=torch.float16)
            grown[: self.count] = self.rows[: self.count]
            self.rows = grown
        self.rows[self.count : need] = new.to(torch.float16)
        self.count = need

    def take_half(self, half: int, generator: torch.Generator) -> Tensor:
        """Shuffle the held rows, return ``half`` of them (float32) and keep the rest."""
        perm = torch.randperm(self.count, generator=generator)
        held = self.rows[: self.count][perm]
        served = held[:half].float()
        rest = held[half:]
        self.rows[: len(rest)] = rest
        self.count = len(rest)
        return served


class _Source:
    """The model over the chunks, pass after pass (each in a new random order), filling the buffers.

    Its whole state (chunk order, position, buffers, counters, generators) goes into a checkpoint.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        chunks: Sequence[Chunk],
        layers: list[int],
        limits: Tensor,
        *,
        precision: str,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
    ) -> None:
        self.loaded, self.chunks, self.layers, self.limits = loaded, chunks, layers, limits
        self.precision, self.batch_size = precision, batch_size
        self.device = next(loaded.model.parameters()).device
        room = buffer_tokens + batch_size * max(len(c.ids) for c in chunks)
        self.buffers = {layer: _Buffer(loaded.d_model, room) for layer in layers}
        self.chunk_gen = torch.Generator().manual_seed(seed)
        self.shuffle_gen = torch.Generator().manual_seed(seed + 1)
        self.pass_start = self.chunk_gen.get_state()  # the order of a pass is drawn from this state
        self.order = torch.randperm(len(chunks), generator=self.chunk_gen).tolist()
        self.position = 0  # chunks of the current pass already forwarded
        self.added = dict.fromkeys(layers, 0)  # rows added in the current pass
        self.forwarded = 0
        self.seconds = 0.0

    def fill(self) -> None:
        """Forward the next batch of chunks and append its usable rows to every layer's buffer."""
        t0 = time.perf_counter()
        if self.position >= len(self.order):
            empty = [layer for layer in self.layers if not self.added[layer]]
            if empty:
                raise ValueError(
                    f"norm_limits: no usable rows at layers {empty} in a whole pass (every token is at "
                    "position 0 or above its layer's limit)"
                )
            self.pass_start = self.chunk_gen.get_state()
            self.order = torch.randperm(len(self.chunks), generator=self.chunk_gen).tolist()
            self.position = 0
            self.added = dict.fromkeys(self.layers, 0)
        batch = [self.chunks[i] for i in self.order[self.position : self.position + self.batch_size]]
        self.position += len(batch)
        width = max(len(c.ids) for c in batch)
        # Right padding needs no attention mask in a causal model: real tokens never see the pads.
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        real = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, c in enumerate(batch):
            ids[row, : len(c.ids)] = torch.from_numpy(c.ids)
            real[row, 1 : len(c.ids)] = True  # position 0 (BOS / attention sink) is never trained on
        with forward_precision(self.precision, self.device):
            resid = capture_residuals(self.loaded.model, ids.to(self.device), layers=self.layers)
        resid = resid.float().cpu()
        keep = real[None] & (torch.linalg.vector_norm(resid, dim=-1) <= self.limits[:, None, None])
        for i, layer in enumerate(self.layers):
            self.buffers[layer].append(resid[i][keep[i]])
            self.added[layer] += int(keep[i].sum())
        self.forwarded += sum(len(c.ids) for c in batch)
        self.seconds += time.perf_counter() - t0

    def full(self, rows: int) -> bool:
        return all(b.count >= rows for b in self.buffers.values())

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"buffer.{layer}": b.rows[: b.count] for layer, b in self.buffers.items()}
        tensors["gen.pass_start"] = self.pass_start
        tensors["gen.shuffle"] = self.shuffle_gen.get_state()
        scalars = {
            "position": self.position,
            "added": {str(k): v for k, v in self.added.items()},
            "forwarded": self.forwarded,
            "seconds": self.seconds,
        }
        return tensors, scalars

    def load_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        for layer, b in self.buffers.items():
            b.count = 0
            b.append(tensors[f"buffer.{layer}"])
        self.pass_start = tensors["gen.pass_start"]
        self.chunk_gen.set_state(self.pass_start)
        self.order = torch.randperm(len(self.chunks), generator=self.chunk_gen).tolist()
        self.shuffle_gen.set_state(tensors["gen.shuffle"])
        self.position = int(scalars["position"])
        self.added = {int(k): int(v) for k, v in scalars["added"].items()}
        self.forwarded = int(scalars["forwarded"])
        self.seconds = float(scalars["seconds"])


def _stream_key(
    chunks: Sequence[Chunk], jobs: Sequence[StreamJob], limits: Tensor, settings: dict[str, Any]
) -> str:
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(np.ascontiguousarray(c.ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    spec = {
        "version": STREAM_VERSION,
        "chunks": digest.hexdigest(),
        "jobs": [[j.layer, dataclasses.asdict(j.config)] for j in jobs],
        "limits": [float(v) for v in limits],
        **settings,
    }
    return content_key(spec)


def _save_checkpoint(
    path: Path,
    key: str,
    source: _Source,
    trainers: Sequence[SAETrainer],
    generators: Sequence[torch.Generator],
) -> None:
    tensors, scalars = source.state()
    jobs = []
    for i, (trainer, gen) in enumerate(zip(trainers, generators, strict=True)):
        t, sc = trainer.state()
        tensors.update({f"job.{i}.{name}": v for name, v in t.items()})
        tensors[f"job.{i}.gen"] = gen.get_state()
        jobs.append(sc)
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    # the JSON last: a checkpoint without it (or with another key) is ignored
    atomic_write_text(path.with_suffix(".json"), json.dumps({"key": key, "source": scalars, "jobs": jobs}))


def _load_checkpoint(
    path: Path,
    key: str,
    source: _Source,
    trainers: Sequence[SAETrainer],
    generators: Sequence[torch.Generator],
) -> bool:
    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return False
        tensors = load_file(str(path.with_suffix(".safetensors")))
    except (OSError, ValueError):
        return False
    source.load_state(tensors, meta["source"])
    for i, (trainer, gen) in enumerate(zip(trainers, generators, strict=True)):
        prefix = f"job.{i}."
        mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        trainer.load_state(mine, meta["jobs"][i])
        gen.set_state(mine["gen"])
    return True


def _remove_checkpoint(path: Path) -> None:
    for suffix in (".json", ".safetensors"):
        path.with_suffix(suffix).unlink(missing_ok=True)


def train_streamed(
    loaded: LoadedModel,
    chunks: Sequence[Chunk],
    jobs: Sequence[StreamJob],
    *,
    norm_limits: Sequence[float],
    precision: str = "float32",
    batch_size: int = 8,
    buffer_tokens: int = 16_384,
    seed: int = 0,
    progress: bool = True,
    on_done: Callable[[int, TrainResult], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_seconds: float = 300.0,
) -> tuple[list[TrainResult], StreamStats]:
    """Train ``jobs`` from residuals computed on the fly over ``chunks``.

    Parameters
    ----------
    loaded : the language model.
    chunks : training chunks (position 0 of each is never trained on).
    jobs : SAEs to train; several may share a layer.
    norm_limits : per layer (index = layer): residuals with a larger norm are outliers, skipped.
    precision : arithmetic of the forward passes (see :func:`saematch_core.models.forward_precision`).
    batch_size : chunks per forward pass.
    buffer_tokens : rows a layer's mixing buffer holds before it serves half of them.
    seed : seed of the chunk order and of the buffer shuffles.
    progress : tqdm bar over forwarded tokens.
    on_done : called with (job index, result) as soon as each SAE has taken all its steps.
    checkpoint : path stem of a checkpoint (``.json`` + ``.safetensors``), written at most every
        ``checkpoint_seconds`` between rounds and removed at the end. A stream of the same jobs
        over the same chunks with the same settings resumes from it and ends with the same bits as
        an uninterrupted run; any other stream ignores it.
    checkpoint_seconds : time between checkpoints.

    Returns
    -------
    (results in job order, stats)
    """
    from tqdm.auto import tqdm

    if not jobs:
        raise ValueError("jobs: expected at least one SAE to train, got none")
    if not chunks:
        raise ValueError("chunks: expected at least one chunk, got none")
    n_layers, d_model = loaded.n_layers, loaded.d_model
    bad = sorted({j.layer for j in jobs if not 0 <= j.layer < n_layers})
    if bad:
        raise ValueError(f"jobs: expected layers in 0..{n_layers - 1}, got {bad}")
    if len(norm_limits) != n_layers:
        raise ValueError(f"norm_limits: expected {n_layers} values (one per layer), got {len(norm_limits)}")
    largest = max(j.config.batch_size for j in jobs)
    if buffer_tokens < 2 * largest:
        raise ValueError(
            f"buffer_tokens: expected >= 2 × the largest SAE batch ({2 * largest}), got {buffer_tokens}"
        )
    layers = sorted({j.layer for j in jobs})
    limits = torch.tensor([float(norm_limits[layer]) for layer in layers])
    source = _Source(
        loaded,
        chunks,
        layers,
        limits,
        precision=precision,
        batch_size=batch_size,
        buffer_tokens=buffer_tokens,
        seed=seed,
    )
    total_tokens = sum(len(c.ids) for c in chunks)
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc="stream")

    def fill() -> None:
        before = source.forwarded
        source.fill()
        bar.update(source.forwarded - before)

    # The first full buffers set each layer's input scale and each SAE's initial b_dec and θ.
    while not source.full(buffer_tokens):
        fill()
    shared: dict[tuple[int, int, int, torch.dtype], StepBuffers] = {}
    trainers: list[SAETrainer] = []
    generators: list[torch.Generator] = []
    scales: dict[int, float] = {}
    for job in jobs:
        buffer = source.buffers[job.layer]
        held = buffer.rows[: buffer.count].float()
        scale = scales.setdefault(job.layer, input_scale(held))
        gen = torch.Generator().manual_seed(job.config.seed)
        key = (job.config.batch_size, d_model, job.config.width, getattr(torch, job.config.precision))
        trainers.append(
            SAETrainer(
                job.config,
                scale=scale,
                mean=held.double().mean(0) * scale,
                generator=gen,
                sample=lambda held=held, gen=gen, scale=scale: (
                    held[torch.randperm(len(held), generator=gen)[:_INIT_SAMPLE]] * scale
                ),
                scratch=shared.setdefault(key, StepBuffers(*key)),
            )
        )
        generators.append(gen)
    settings = {
        "precision": precision,
        "batch_size": batch_size,
        "buffer_tokens": buffer_tokens,
        "seed": seed,
    }
    path = None if checkpoint is None else Path(checkpoint)
    ckpt_key = "" if path is None else _stream_key(chunks, jobs, limits, settings)
    if path is not None and _load_checkpoint(path, ckpt_key, source, trainers, generators):
        logger.info("stream resumed from %s at %d tokens", path, source.forwarded)
        bar.update(source.forwarded)
    results: list[TrainResult | None] = [None] * len(jobs)
    half = buffer_tokens // 2
    t_train = 0.0
    last_checkpoint = time.perf_counter()
    while not all(t.done for t in trainers):
        if path is not None and time.perf_counter() - last_checkpoint >= checkpoint_seconds:
            _save_checkpoint(path, ckpt_key, source, trainers, generators)
            last_checkpoint = time.perf_counter()
        while not source.full(buffer_tokens):
            fill()
        t0 = time.perf_counter()
        for layer in layers:
            served = source.buffers[layer].take_half(half, source.shuffle_gen)
            todo = [i for i, j in enumerate(jobs) if j.layer == layer and not trainers[i].done]
            xs = served * scales[layer] if todo else served
            for i in todo:
                trainer, size = trainers[i], jobs[i].config.batch_size
                # each SAE its own batches of the served rows, so two seeds differ in data order too
                order = torch.randperm(half, generator=generators[i])
                with threads_for(d_model, jobs[i].config.width):
                    for lo in range(0, half - size + 1, size):
                        if trainer.done:
                            break
                        trainer.step(xs[order[lo : lo + size]])
        t_train += time.perf_counter() - t0
        for i, trainer in enumerate(trainers):
            if trainer.done and results[i] is None:
                result = results[i] = trainer.result(meta=dict(jobs[i].meta))
                if on_done is not None:
                    on_done(i, result)
        bar.set_postfix_str(f"{sum(r is not None for r in results)}/{len(jobs)} SAEs done")
    bar.close()
    if path is not None:
        _remove_checkpoint(path)
    stats = StreamStats(
        tokens_forwarded=source.forwarded,
        passes=source.forwarded / total_tokens,
        forward_seconds=source.seconds,
        train_seconds=t_train,
        peak_buffer_bytes=sum(b.rows.numel() * 2 for b in source.buffers.values()),
    )
    return [r for r in results if r is not None], stats
