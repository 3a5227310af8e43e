"""Streamed training: every row served once per pass, budgets honoured, and SAEs as good as from disk."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saematch_core.activations import build_activation_cache
from saematch_core.data import Chunk, Document, chunk_documents
from saematch_core.models import LoadedModel, load_model
from saematch_core.profiles import SAETrainConfig, get_profile
from saematch_core.stream import StreamJob, _Buffer, train_streamed
from saematch_core.train import SAETrainer, sae_quality, train_sae


@pytest.fixture(scope="module", autouse=True)
def tiny() -> Iterator[LoadedModel]:
    # The smoke model on one thread: its tiny matmuls only spin a second OpenMP thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(get_profile("smoke").model)
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chunks(tiny: LoadedModel) -> list[Chunk]:
    text = [(f"d{i}", f"Line {i}: the quick brown fox. " * 12) for i in range(40)]
    docs = [Document("ab"[i % 2], doc_id, body) for i, (doc_id, body) in enumerate(text)]
    return chunk_documents(docs, tiny.tokenizer.encode, chunk_len=64, n_tokens=10**6)


def _config(**overrides: object) -> SAETrainConfig:
    base = {"width": 32, "n_tokens": 2048, "batch_size": 64, "init_l0": 4.0, "l0_coef": 0.03}
    return SAETrainConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_buffer_serves_every_row_once() -> None:
    buffer = _Buffer(d_model=1, capacity=4)
    gen = torch.Generator().manual_seed(0)
    served: list[float] = []
    for start in range(0, 40, 10):
        buffer.append(torch.arange(start, start + 10, dtype=torch.float32)[:, None])  # grows past 4
        served += buffer.take_half(5, gen)[:, 0].tolist()
    served += buffer.take_half(buffer.count, gen)[:, 0].tolist()
    assert sorted(served) == [float(i) for i in range(40)] and buffer.count == 0
    assert served[:5] != sorted(served[:5]) or served[5:10] != sorted(served[5:10])  # shuffled


def test_streamed_saes_take_their_budgets(tiny: LoadedModel, chunks: list[Chunk]) -> None:
    n_tokens = sum(len(c.ids) for c in chunks)
    jobs = [
        StreamJob(0, _config(seed=1), meta={"layer": 0}),
        StreamJob(2, _config(seed=2)),
        StreamJob(2, _config(seed=3, activation="topk", k=4, n_tokens=3 * n_tokens)),  # three passes
        StreamJob(3, _config(seed=4, precision="bfloat16")),
    ]
    done: list[int] = []
    results, stats = train_streamed(
        tiny,
        chunks,
        jobs,
        norm_limits=[1e9] * 4,
        buffer_tokens=512,
        progress=False,
        on_done=lambda i, r: done.append(i),
    )
    assert sorted(done) == [0, 1, 2, 3]
    assert [r.steps for r in results] == [j.config.n_steps for j in jobs]
    assert results[0].sae.meta["layer"] == 0 and results[2].sae.activation == "topk"
    # The longest budget needs three passes over the chunks (plus what the buffer holds back).
    assert 3.0 <= stats.passes <= 4.0 and stats.tokens_forwarded >= 3 * n_tokens
    # Outliers are skipped: with a limit of 0 no row ever enters a buffer, and that is an error.
    with pytest.raises(ValueError, match=r"norm_limits: no usable rows at layers \[0, 2, 3\]"):
        train_streamed(tiny, chunks, jobs, norm_limits=[0.0] * 4, progress=False)


def test_streamed_training_is_deterministic_and_seeded(tiny: LoadedModel, chunks: list[Chunk]) -> None:
    jobs = [StreamJob(1, _config(seed=5)), StreamJob(1, _config(seed=6))]
    a, _ = train_streamed(tiny, chunks, jobs, norm_limits=[1e9] * 4, buffer_tokens=512, progress=False)
    b, _ = train_streamed(tiny, chunks, jobs, norm_limits=[1e9] * 4, buffer_tokens=512, progress=False)
    for x, y in zip(a, b, strict=True):
        for name, t in x.sae.tensors().items():
            assert torch.equal(t, y.sae.tensors()[name]), name
    assert not torch.allclose(a[0].sae.W_dec, a[1].sae.W_dec)  # the seeds differ


def test_streamed_equals_disk_in_quality(tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path) -> None:
    # Same rows, same recipe: the SAE trained from the stream is as good as the one trained from the
    # activation cache (the batches differ, so the weights do too).
    folder = tmp_path / "acts"
    cache = build_activation_cache(tiny, chunks, folder, spec={"t": 1}, batch_size=4, progress=False)
    layer = 2
    rows = torch.from_numpy(cache.layer(layer)[cache.usable(layer)].astype("float32"))
    train_rows, held_out = rows[: len(rows) * 3 // 4], rows[len(rows) * 3 // 4 :]
    # one epoch over the training rows each way
    n_train = sum(len(c.ids) - 1 for c in chunks[: len(chunks) * 3 // 4])
    config = _config(width=64, n_tokens=(n_train // 64) * 64, seed=9, init_l0=8.0)
    disk = train_sae(train_rows, config, progress=False)
    limits = [float(cache.outlier_factor * m) for m in cache.median_norms]
    streamed, _ = train_streamed(
        tiny,
        chunks[: len(chunks) * 3 // 4],
        [StreamJob(layer, config)],
        norm_limits=limits,
        buffer_tokens=512,
    )
    q_disk, q_stream = sae_quality(disk.sae, held_out), sae_quality(streamed[0].sae, held_out)
    assert q_stream.fvu == pytest.approx(q_disk.fvu, abs=0.05)
    assert q_stream.l0 == pytest.approx(q_disk.l0, rel=0.25)
    # The tolerance is not vacuous: an SAE trained for a tenth of the budget is clearly worse.
    short = train_sae(train_rows, dataclasses.replace(config, n_tokens=config.n_tokens // 10), progress=False)
    assert sae_quality(short.sae, held_out).fvu > q_disk.fvu + 0.05


def test_bad_arguments(tiny: LoadedModel, chunks: list[Chunk]) -> None:
    job = StreamJob(1, _config())
    with pytest.raises(ValueError, match="jobs: expected at least one SAE"):
        train_streamed(tiny, chunks, [], norm_limits=[1e9] * 4)
    with pytest.raises(ValueError, match="chunks: expected at least one chunk"):
        train_streamed(tiny, [], [job], norm_limits=[1e9] * 4)
    with pytest.raises(ValueError, match=r"jobs: expected layers in 0..3, got \[9\]"):
        train_streamed(tiny, chunks, [StreamJob(9, _config())], norm_limits=[1e9] * 4)
    with pytest.raises(ValueError, match="norm_limits: expected 4 values"):
        train_streamed(tiny, chunks, [job], norm_limits=[1.0])
    with pytest.raises(
        ValueError, match=r"buffer_tokens: expected >= 2 × the largest SAE batch \(128\), got 100"
    ):
        train_streamed(tiny, chunks, [job], norm_limits=[1e9] * 4, buffer_tokens=100)


def test_killed_stream_resumes_from_its_checkpoint(
    tiny: LoadedModel, chunks: list[Chunk], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [StreamJob(1, _config(seed=5, n_tokens=4096)), StreamJob(3, _config(seed=6, precision="bfloat16"))]
    kwargs = {"norm_limits": [1e9] * 4, "buffer_tokens": 512, "progress": False}
    whole, _ = train_streamed(tiny, chunks, jobs, **kwargs)  # type: ignore[arg-type]
    ckpt = tmp_path / "stream"
    real_step = SAETrainer.step
    calls = {"n": 0}

    def dying_step(self: SAETrainer, xb: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt  # a kill in the middle of the second round or later
        real_step(self, xb)

    monkeypatch.setattr(SAETrainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_streamed(tiny, chunks, jobs, checkpoint=ckpt, checkpoint_seconds=0.0, **kwargs)  # type: ignore[arg-type]
    assert ckpt.with_suffix(".json").is_file()
    monkeypatch.setattr(SAETrainer, "step", real_step)
    resumed_steps = {"n": 0}

    def counting_step(self: SAETrainer, xb: torch.Tensor) -> None:
        resumed_steps["n"] += 1
        real_step(self, xb)

    monkeypatch.setattr(SAETrainer, "step", counting_step)
    resumed, _ = train_streamed(tiny, chunks, jobs, checkpoint=ckpt, **kwargs)  # type: ignore[arg-type]
    # It went on from the checkpoint (fewer steps than a whole run) and ended with the same bits.
    assert resumed_steps["n"] < sum(j.config.n_steps for j in jobs)
    for a, b in zip(whole, resumed, strict=True):
        for name, t in a.sae.tensors().items():
            assert torch.equal(t, b.sae.tensors()[name]), name
    assert not ckpt.with_suffix(".json").exists() and not ckpt.with_suffix(".safetensors").exists()
    # Another stream (other jobs) ignores a checkpoint that is not its own.
    monkeypatch.setattr(SAETrainer, "step", dying_step)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        train_streamed(tiny, chunks, jobs, checkpoint=ckpt, checkpoint_seconds=0.0, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(SAETrainer, "step", counting_step)
    resumed_steps["n"] = 0
    other = [StreamJob(1, _config(seed=7))]
    train_streamed(tiny, chunks, other, checkpoint=ckpt, **kwargs)  # type: ignore[arg-type]
    assert resumed_steps["n"] == other[0].config.n_steps
