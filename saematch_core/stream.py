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

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saematch_core.data import Chunk
from saematch_core.models import LoadedModel, capture_residuals, forward_precision
from saematch_core.profiles import SAETrainConfig
from saematch_core.train import SAETrainer, StepBuffers, TrainResult, input_scale, threads_for

__all__ = ["STREAM_VERSION", "StreamJob", "StreamStats", "train_streamed"]

STREAM_VERSION = 1
"""Version of the streaming scheme above; part of the key of every streamed SAE."""

_INIT_SAMPLE = 4096


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


def _batches(
    chunks: Sequence[Chunk], batch_size: int, generator: torch.Generator
) -> Iterator[tuple[list[Chunk], bool]]:
    """(batch of chunks, last of its pass), pass after pass, each pass in a new random order."""
    while True:
        order = torch.randperm(len(chunks), generator=generator).tolist()
        for lo in range(0, len(order), batch_size):
            yield [chunks[i] for i in order[lo : lo + batch_size]], lo + batch_size >= len(order)


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
    room = buffer_tokens + batch_size * max(len(c.ids) for c in chunks)
    buffers = {layer: _Buffer(d_model, room) for layer in layers}
    chunk_gen = torch.Generator().manual_seed(seed)
    shuffle_gen = torch.Generator().manual_seed(seed + 1)
    source = _batches(chunks, batch_size, chunk_gen)
    device = next(loaded.model.parameters()).device
    total_tokens = sum(len(c.ids) for c in chunks)
    forwarded = 0
    t_forward = 0.0

    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc="stream")

    added = dict.fromkeys(layers, 0)  # rows added in the current pass

    def fill() -> None:
        nonlocal forwarded, t_forward
        t0 = time.perf_counter()
        batch, last = next(source)
        width = max(len(c.ids) for c in batch)
        # Right padding needs no attention mask in a causal model: real tokens never see the pads.
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        real = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, c in enumerate(batch):
            ids[row, : len(c.ids)] = torch.from_numpy(c.ids)
            real[row, 1 : len(c.ids)] = True  # position 0 (BOS / attention sink) is never trained on
        with forward_precision(precision, device):
            resid = capture_residuals(loaded.model, ids.to(device), layers=layers).float().cpu()
        keep = real[None] & (torch.linalg.vector_norm(resid, dim=-1) <= limits[:, None, None])
        for i, layer in enumerate(layers):
            buffers[layer].append(resid[i][keep[i]])
            added[layer] += int(keep[i].sum())
        if last:
            empty = [layer for layer in layers if not added[layer]]
            if empty:
                raise ValueError(
                    f"norm_limits: no usable rows at layers {empty} in a whole pass (every token is at "
                    "position 0 or above its layer's limit)"
                )
            added.update(dict.fromkeys(layers, 0))
        n = sum(len(c.ids) for c in batch)
        forwarded += n
        bar.update(n)
        t_forward += time.perf_counter() - t0

    def full() -> bool:
        return all(buffers[layer].count >= buffer_tokens for layer in layers)

    while not full():
        fill()
    shared: dict[tuple[int, int, int, torch.dtype], StepBuffers] = {}
    trainers: list[SAETrainer] = []
    generators: list[torch.Generator] = []
    scales: dict[int, float] = {}
    for job in jobs:
        buffer = buffers[job.layer]
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
    results: list[TrainResult | None] = [None] * len(jobs)
    half = buffer_tokens // 2
    t_train = 0.0
    while any(r is None for r in results):
        while not full():
            fill()
        t0 = time.perf_counter()
        for layer in layers:
            served = buffers[layer].take_half(half, shuffle_gen)
            todo = [i for i, j in enumerate(jobs) if j.layer == layer and results[i] is None]
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
                if trainer.done:
                    result = results[i] = trainer.result(meta=dict(jobs[i].meta))
                    if on_done is not None:
                        on_done(i, result)
        t_train += time.perf_counter() - t0
        bar.set_postfix_str(f"{sum(r is not None for r in results)}/{len(jobs)} SAEs done")
    bar.close()
    stats = StreamStats(
        tokens_forwarded=forwarded,
        passes=forwarded / total_tokens,
        forward_seconds=t_forward,
        train_seconds=t_train,
        peak_buffer_bytes=sum(b.rows.numel() * 2 for b in buffers.values()),
    )
    return [r for r in results if r is not None], stats
