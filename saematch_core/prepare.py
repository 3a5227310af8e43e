"""``saematch prepare --profile NAME``: model, corpora, activation caches and SAEs, cached on disk.

Layout under ``<cache>/<profile>/`` (``<cache>`` is :func:`saematch_core.cache.cache_root` unless
given)::

    manifest.json                 the profile, the keys of every step, the result table, timings
    activations/train/            residual cache of the training split (trained profiles only)
    activations/eval/             residual cache of the evaluation split (all profiles)
    saes/layer_XX.safetensors     the main JumpReLU SAE of every layer (our native format)
    saes/sweep/layer_XX_l0coef_C.safetensors   the L0 sweep (``..._l0_X`` for Gemma Scope variants)
    saes/topk/layer_XX.safetensors, saes/relu/layer_XX.safetensors   other families (a layer band)
    saes/**/*.json                next to each SAE: its spec key, training stats and quality

Every step is skipped when its output exists with the same spec key, so an interrupted run
resumes at the SAE it stopped in and a warm rerun only reads the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saematch_core.activations import (
    FORMAT_VERSION,
    ActivationCache,
    build_activation_cache,
    open_activation_cache,
)
from saematch_core.cache import (
    atomic_write_text,
    cache_root,
    content_key,
    folder_lock,
    is_intact,
    read_manifest,
    seal,
    write_manifest,
)
from saematch_core.data import CORPUS_VERSION, Split, corpus_chunks
from saematch_core.formats import list_hub_files, load_sae, save_sae
from saematch_core.models import LoadedModel, forward_precision, load_model
from saematch_core.profiles import Profile, SAETrainConfig, get_profile
from saematch_core.sae import SAE
from saematch_core.stream import STREAM_VERSION, StreamJob, train_streamed
from saematch_core.train import (
    DeltaLoss,
    SAEQuality,
    TrainResult,
    sae_quality,
    sae_replacement,
    train_sae,
)

__all__ = ["PrepareResult", "SAERecord", "layer_seed", "prepare", "sae_file"]

logger = logging.getLogger(__name__)

_SCHEMA = 1


@dataclass(frozen=True, kw_only=True)
class SAERecord:
    """One prepared SAE: where it is, what it is, how good it is."""

    family: str
    """``main`` (JumpReLU, every layer), ``sweep`` (L0 sweep), ``topk``, ``relu`` or ``seed`` (a main
    SAE from another seed)."""
    layer: int
    """Residual layer (after block ``layer``)."""
    path: Path
    """The SAE file (native safetensors)."""
    setting: str
    """What distinguishes it within its family (``l0_coef=0.3``, ``k=48``, ``average_l0=71``)."""
    quality: SAEQuality
    """L0, FVU, dead fraction and ΔL on held-out tokens."""
    train_seconds: float | None = None
    """Training wall time (None for downloaded SAEs, and for a copy of an identical job's SAE)."""

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready; ``path`` relative to ``relative_to`` when given (so a cache folder can move)."""
        path = self.path if relative_to is None else self.path.relative_to(relative_to)
        return {
            "family": self.family,
            "layer": self.layer,
            "path": path.as_posix(),
            "setting": self.setting,
            "quality": self.quality.to_dict(),
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> SAERecord:
        """Inverse of :meth:`to_dict`; a relative ``path`` is joined to ``base``."""
        path = Path(data["path"]) if base is None else base / data["path"]
        return cls(
            family=data["family"],
            layer=int(data["layer"]),
            path=path,
            setting=data["setting"],
            quality=SAEQuality(**data["quality"]),
            train_seconds=data.get("train_seconds"),
        )


@dataclass(frozen=True, kw_only=True)
class PrepareResult:
    """What ``prepare`` produced."""

    profile: str
    """Profile name."""
    folder: Path
    """``<cache>/<profile>``."""
    records: tuple[SAERecord, ...]
    """Every SAE, main ones first (ordered by family, layer, setting)."""
    seconds: float
    """Wall time of this call (small when everything was cached)."""
    cached: bool
    """True when nothing had to be computed."""
    activation_folders: dict[str, Path] = field(default_factory=dict)
    """Activation cache folder per split."""

    def saes(self, family: str = "main") -> dict[int, Path]:
        """Layer → SAE file for one family (for ``sweep`` use :meth:`sweep`)."""
        return {r.layer: r.path for r in self.records if r.family == family}

    def sweep(self) -> dict[tuple[int, str], Path]:
        """(layer, setting) → SAE file of the L0 sweep."""
        return {(r.layer, r.setting): r.path for r in self.records if r.family == "sweep"}


def sae_file(folder: Path, family: str, layer: int, setting: str = "") -> Path:
    """Where ``prepare`` puts an SAE: the one definition of the layout."""
    saes = folder / "saes"
    if family == "main":
        return saes / f"layer_{layer:02d}.safetensors"
    if family == "sweep":
        return saes / "sweep" / f"layer_{layer:02d}_{setting.replace('=', '_')}.safetensors"
    return saes / family / f"layer_{layer:02d}.safetensors"


# ------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class _Job:
    family: str
    layer: int
    setting: str
    config: SAETrainConfig | None  # None: a pretrained SAE
    hub_path: str = ""


def layer_seed(config: SAETrainConfig, layer: int, replica: int = 0) -> SAETrainConfig:
    """``config`` with the seed the substrate gives the SAE of ``layer``: ``seed + 1000 · layer``,
    plus 500 for the second-seed SAE (``replica`` 1, the ``seed`` family).

    One seed per layer: SAEs of neighbouring layers trained from the same initial dictionary keep
    feature i at index i, which would make the identity order a free, perfect "matching".

    >>> layer_seed(SAETrainConfig(seed=0), 14, replica=1).seed
    14500
    """
    if replica not in (0, 1):
        raise ValueError(f"replica: expected 0 (main) or 1 (second seed), got {replica!r}")
    return dataclasses.replace(config, seed=config.seed + 1000 * layer + 500 * replica)


def _jobs(profile: Profile) -> list[_Job]:
    jobs: list[_Job] = []
    if profile.sae_source == "gemma_scope":
        gs = profile.gemma_scope
        if gs is None:
            raise ValueError("Profile.gemma_scope: required when sae_source='gemma_scope'")
        for layer in profile.layers:
            l0 = gs.canonical_l0[layer]
            jobs.append(_Job("main", layer, f"average_l0={l0}", None, gs.sae_folder(layer)))
        files = (
            None if profile.sweep_l0s or not profile.sweep_layers else list_hub_files(gs.repo_id, gs.revision)
        )
        for layer in profile.sweep_layers:
            for l0 in profile.sweep_l0s or gs.l0_variants(layer, files or ()):
                jobs.append(_Job("sweep", layer, f"average_l0={l0}", None, gs.sae_folder(layer, l0)))
        return jobs
    main = profile.sae
    for layer in profile.layers:
        jobs.append(_Job("main", layer, f"l0_coef={main.l0_coef:g}", layer_seed(main, layer)))
    for layer in profile.sweep_layers:
        for coef in profile.sweep_l0_coefs:
            config = layer_seed(dataclasses.replace(main, l0_coef=coef), layer)
            jobs.append(_Job("sweep", layer, f"l0_coef={coef:g}", config))
    for family in ("topk", "relu"):
        config = dataclasses.replace(main, activation=family)
        setting = f"k={config.k}" if family == "topk" else f"l1_coef={config.l1_coef:g}"
        for layer in profile.family_layers:
            jobs.append(_Job(family, layer, setting, layer_seed(config, layer)))
    for layer in profile.seed_layers:
        # the main recipe from a seed no other SAE uses (main seeds step by 1000 per layer)
        config = layer_seed(main, layer, replica=1)
        jobs.append(_Job("seed", layer, f"seed={config.seed}", config))
    return jobs


def _twins(jobs: list[_Job]) -> dict[int, int]:
    """Job index → index of the first job with the same layer and training recipe (the sweep's λ equal
    to the main λ): it would train the same SAE again from the same seed and rows, so it gets a copy."""
    first: dict[tuple[int, str], int] = {}
    twins: dict[int, int] = {}
    for index, job in enumerate(jobs):
        if job.config is not None:
            key = (job.layer, json.dumps(_config_spec(job.config), sort_keys=True))
            if key in first:
                twins[index] = first[key]
            else:
                first[key] = index
    return twins


def _data_spec(profile: Profile, split: Split) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": "activations",
        "model": dataclasses.asdict(profile.model),
        "data": dataclasses.asdict(profile.data),
        "split": split,
        "corpus_version": CORPUS_VERSION,
        # The code corpus is this interpreter's standard library.
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "format": FORMAT_VERSION,
    }
    if profile.forward_precision != "float32":
        # float32 caches built before precision was a choice have no such entry: keep them valid
        spec["forward_precision"] = profile.forward_precision
    return spec


def _config_spec(config: SAETrainConfig) -> dict[str, Any]:
    spec = dataclasses.asdict(config)
    if spec["precision"] == "float32":
        del spec["precision"]  # as in keys made before precision was a choice
    return spec


def _job_key(profile: Profile, job: _Job) -> str:
    spec: dict[str, Any] = {
        "schema": _SCHEMA,
        "family": job.family,
        "layer": job.layer,
        "train_data": content_key(_data_spec(profile, "train")) if job.config is not None else None,
        "eval_data": content_key(_data_spec(profile, "eval")),
        "config": None if job.config is None else _config_spec(job.config),
        "hub": None
        if job.config is not None
        else [profile.gemma_scope and profile.gemma_scope.repo_id, job.hub_path],
        "outlier_factor": profile.outlier_factor,
        "delta_loss_tokens": profile.delta_loss_tokens,
    }
    if job.config is not None and profile.train_mode == "stream":
        spec["stream"] = {"version": STREAM_VERSION, "buffer_tokens": profile.stream_buffer_tokens}
    if profile.forward_precision != "float32":
        spec["forward_precision"] = profile.forward_precision  # ΔL's forward passes
    return content_key(spec)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------ steps
def _activations(
    profile: Profile, loaded: LoadedModel, folder: Path, split: Split, *, force: bool, progress: bool
) -> ActivationCache:
    target, spec = folder / "activations" / split, _data_spec(profile, split)
    found = None if force else open_activation_cache(target, spec)
    if found is not None and found.outlier_factor == profile.outlier_factor:
        return found  # no need to read and tokenise the corpora
    chunks_by_corpus = corpus_chunks(
        profile.data, loaded.tokenizer.encode, split, bos_id=loaded.tokenizer.bos_id
    )
    chunks = [c for name in profile.data.corpora for c in chunks_by_corpus[name]]
    return build_activation_cache(
        loaded,
        chunks,
        target,
        spec=spec,
        batch_size=profile.data.batch_size,
        outlier_factor=profile.outlier_factor,
        force=force,
        progress=progress,
        precision=profile.forward_precision,
    )


def _rows(cache: ActivationCache, layer: int) -> torch.Tensor:
    usable = cache.usable(layer)
    return torch.from_numpy(np.asarray(cache.layer(layer)[usable], dtype=np.float32))


class _LayerRows:
    """The usable training rows of one layer at a time (~0.5 GB on ``default``), read once per layer."""

    def __init__(self, cache: ActivationCache | None) -> None:
        self.cache = cache
        self.layer: int | None = None
        self.rows: torch.Tensor | None = None

    def __call__(self, layer: int) -> torch.Tensor:
        if self.cache is None:
            raise ValueError("training rows: this profile has no training activations")
        if self.rows is None or self.layer != layer:
            self.rows, self.layer = None, None  # free the previous layer first
            self.rows, self.layer = _rows(self.cache, layer), layer
        return self.rows


def _delta_batch(cache: ActivationCache, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation chunks for ΔL, taken round-robin over corpora until ``n_tokens``, right-padded."""
    by_corpus: dict[str, list[int]] = {}
    for i, chunk in enumerate(cache.chunks):
        by_corpus.setdefault(chunk["corpus"], []).append(i)
    picked: list[int] = []
    total = 0
    queues = [list(v) for v in by_corpus.values()]
    while total < n_tokens and any(queues):
        for q in queues:
            if q and total < n_tokens:
                i = q.pop(0)
                picked.append(i)
                total += int(cache.chunks[i]["length"])
    starts = np.concatenate([[0], np.cumsum([c["length"] for c in cache.chunks])])
    lengths = torch.tensor([int(cache.chunks[i]["length"]) for i in picked])
    ids = torch.zeros((len(picked), int(lengths.max())), dtype=torch.long)
    tokens = np.asarray(cache.tokens)
    for row, i in enumerate(picked):
        ids[row, : lengths[row]] = torch.from_numpy(tokens[starts[i] : starts[i + 1]].astype(np.int64))
    return ids, lengths


class _DeltaLoss:
    """ΔL of SAEs on a fixed set of evaluation chunks; the clean pass runs on the first call only."""

    def __init__(
        self, loaded: LoadedModel, cache: ActivationCache, n_tokens: int, batch_size: int, precision: str
    ) -> None:
        self.loaded = loaded
        self.batch_size = batch_size
        self.cache = cache
        self.n_tokens = n_tokens
        self.precision = precision
        self.probe: DeltaLoss | None = None

    def __call__(self, sae: SAE, layer: int) -> float:
        device = next(self.loaded.model.parameters()).device
        with forward_precision(self.precision, device):
            if self.probe is None:
                ids, lengths = _delta_batch(self.cache, self.n_tokens)
                self.probe = DeltaLoss(self.loaded.model, ids, lengths, batch_size=self.batch_size)
            limit = self.cache.outlier_factor * float(self.cache.median_norms[layer])
            return self.probe(layer, sae_replacement(sae, norm_limit=limit))


def _train_extra(result: TrainResult) -> dict[str, Any]:
    return {"input_scale": result.input_scale, "train_l0": result.final_l0, "train_fvu": result.final_fvu}


def _stream_jobs(
    profile: Profile,
    folder: Path,
    loaded: LoadedModel,
    evals: ActivationCache,
    jobs: list[tuple[int, _Job]],
    finish: Callable[[int, SAE, float | None, dict[str, Any]], None],
    progress: bool,
) -> dict[str, float]:
    """Train ``(index, job)`` pairs from one stream over the training chunks; ``finish`` saves each.

    The stream checkpoints itself every few minutes next to the SAEs, so a killed prepare resumes
    it where it was (with the same bits) when it is asked for the same SAEs; one killed while the
    finished SAEs were being saved retrains those not yet saved from the start.
    """
    tokenizer = loaded.tokenizer
    by_corpus = corpus_chunks(profile.data, tokenizer.encode, "train", bos_id=tokenizer.bos_id)
    chunks = [c for name in profile.data.corpora for c in by_corpus[name]]
    stream_jobs = []
    for _, job in jobs:
        assert job.config is not None  # only trained jobs are streamed
        meta = {"profile": profile.name, "layer": job.layer, "family": job.family, "setting": job.setting}
        stream_jobs.append(StreamJob(job.layer, job.config, meta=meta))

    def done(k: int, result: TrainResult) -> None:
        finish(jobs[k][0], result.sae, result.seconds, _train_extra(result))

    # The evaluation split's medians set the outlier limits: they exist before training starts.
    _, stats = train_streamed(
        loaded,
        chunks,
        stream_jobs,
        norm_limits=[evals.outlier_factor * float(m) for m in evals.median_norms],
        precision=profile.forward_precision,
        batch_size=profile.data.batch_size,
        buffer_tokens=profile.stream_buffer_tokens,
        progress=progress,
        on_done=done,
        checkpoint=folder / "saes" / "stream-checkpoint",
    )
    logger.info(
        "streamed %d tokens (%.2f passes): forward %.0f s, SAE steps %.0f s",
        stats.tokens_forwarded,
        stats.passes,
        stats.forward_seconds,
        stats.train_seconds,
    )
    return {"stream_forward": stats.forward_seconds, "stream_train": stats.train_seconds}


def _write_sidecar(folder: Path, path: Path, key: str, record: SAERecord, extra: dict[str, Any]) -> None:
    text = json.dumps({"key": key, "record": record.to_dict(folder), **extra}, indent=2)
    atomic_write_text(path.with_suffix(".json"), text + "\n")


def _fetch_pretrained(profile: Profile, job: _Job) -> SAE:
    gs = profile.gemma_scope
    if gs is None:
        raise ValueError("Profile.gemma_scope: required when sae_source='gemma_scope'")
    revision = f"@{gs.revision}" if gs.revision else ""
    return load_sae(f"hub:{gs.repo_id}/{job.hub_path}{revision}", format="gemma_scope", dtype=torch.float32)


def _complete(folder: Path, key: str) -> tuple[SAERecord, ...] | None:
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("key") != key or not manifest.get("complete"):
        return None
    try:
        records = tuple(SAERecord.from_dict(r, folder) for r in manifest["records"])
    except (KeyError, TypeError, ValueError):
        return None
    if not all(is_intact(r.path) for r in records):
        return None
    return records


def prepare(
    profile: Profile | str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    cached_only: bool = False,
) -> PrepareResult:
    """Build everything a profile needs, reusing what is already cached.

    Parameters
    ----------
    profile : a :class:`~saematch_core.profiles.Profile` or its name.
    cache_dir : cache root (default :func:`saematch_core.cache.cache_root`); outputs go to
        ``<cache_dir>/<profile.name>/``.
    force : recompute every step (activations, SAEs, metrics).
    progress : tqdm bars (activations in tokens/s, training in tokens/s, SAEs done).
    device : where the language model runs (activations, ΔL); SAE training stays on CPU.
    cached_only : never build: return the complete cached result or raise.

    Returns
    -------
    PrepareResult

    Raises
    ------
    FileNotFoundError
        With ``cached_only``, when the profile is not (completely) prepared in ``cache_dir``.
    """
    from tqdm.auto import tqdm

    from saematch_core import __version__

    if isinstance(profile, str):
        profile = get_profile(profile)
    if not isinstance(profile, Profile):
        raise TypeError(f"profile: expected a Profile or a profile name, got {type(profile).__name__}")
    t0 = time.perf_counter()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / profile.name
    jobs = _jobs(profile)
    run_key = content_key({"profile": profile.to_dict(), "jobs": [_job_key(profile, j) for j in jobs]})
    # Pretrained SAEs need no training split; streamed training reads it through the model.
    on_disk = profile.sae_source == "train" and profile.train_mode == "disk"
    splits: tuple[Split, ...] = ("train", "eval") if on_disk else ("eval",)
    act_folders = {split: folder / "activations" / split for split in splits}

    def cached() -> PrepareResult | None:
        records = None if force else _complete(folder, run_key)
        if records is None or any(open_activation_cache(f) is None for f in act_folders.values()):
            return None
        logger.info("profile %r: everything cached in %s", profile.name, folder)
        return PrepareResult(
            profile=profile.name,
            folder=folder,
            records=records,
            seconds=time.perf_counter() - t0,
            cached=True,
            activation_folders=act_folders,
        )

    found = cached()
    if found is not None:
        return found
    if cached_only:
        raise FileNotFoundError(
            f"{folder}: profile {profile.name!r} is not prepared (or not completely); "
            f"run `saematch prepare --profile {profile.name}` first"
        )
    # A second prepare of the same profile waits here, then finds the first one's results.
    with folder_lock(folder):
        found = cached()
        if found is not None:
            return found
        folder.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        loaded = load_model(profile.model, cache_dir=root, device=device)
        timings["load_model"] = time.perf_counter() - t
        caches: dict[str, ActivationCache] = {}
        for split in splits:
            t = time.perf_counter()
            caches[split] = _activations(profile, loaded, folder, split, force=force, progress=progress)
            timings[f"activations_{split}"] = time.perf_counter() - t
        evals = caches["eval"]
        delta = (
            _DeltaLoss(
                loaded, evals, profile.delta_loss_tokens, profile.data.batch_size, profile.forward_precision
            )
            if profile.delta_loss_tokens
            else None
        )

        records: list[SAERecord | None] = [None] * len(jobs)
        keys = [_job_key(profile, job) for job in jobs]
        pending: list[int] = []
        for index, job in enumerate(jobs):
            path = sae_file(folder, job.family, job.layer, job.setting)
            side = _read_sidecar(path)
            if not force and side is not None and side.get("key") == keys[index] and is_intact(path):
                records[index] = SAERecord.from_dict(side["record"], folder)
            else:
                pending.append(index)

        def finish(index: int, sae: SAE, seconds: float | None, extra: dict[str, Any]) -> None:
            job = jobs[index]
            path = sae_file(folder, job.family, job.layer, job.setting)
            path.parent.mkdir(parents=True, exist_ok=True)
            quality = sae_quality(sae, _rows(evals, job.layer))
            if delta is not None:
                quality = dataclasses.replace(quality, delta_loss=delta(sae, job.layer))
            save_sae(sae, path, force=True)
            seal(path)
            record = SAERecord(
                family=job.family,
                layer=job.layer,
                path=path,
                setting=job.setting,
                quality=quality,
                train_seconds=seconds,
            )
            _write_sidecar(folder, path, keys[index], record, extra)
            records[index] = record
            logger.info(
                "%s layer %d %s: L0 %.1f, FVU %.3f, dead %.3f, ΔL %s",
                job.family,
                job.layer,
                job.setting,
                quality.l0,
                quality.fvu,
                quality.dead_fraction,
                "n/a" if quality.delta_loss is None else f"{quality.delta_loss:.3f}",
            )

        twins = {i: source for i, source in _twins(jobs).items() if i in pending}
        pending = [i for i in pending if i not in twins]

        t = time.perf_counter()
        streamed = [] if on_disk else [i for i in pending if jobs[i].config is not None]
        if streamed:
            pairs = [(i, jobs[i]) for i in streamed]
            (folder / "saes").mkdir(parents=True, exist_ok=True)
            timings.update(_stream_jobs(profile, folder, loaded, evals, pairs, finish, progress))
        # Layer by layer, so that all SAEs of one layer read its training rows once.
        order = sorted(set(pending) - set(streamed), key=lambda i: jobs[i].layer)
        rows = _LayerRows(caches.get("train"))
        bar = tqdm(order, desc=f"SAEs ({profile.name})", unit="sae", disable=not progress or not order)
        for index in bar:
            job = jobs[index]
            bar.set_postfix_str(f"{job.family} layer {job.layer} {job.setting}")
            if job.config is None:
                finish(index, _fetch_pretrained(profile, job), None, {})
                continue
            meta = {"profile": profile.name, "layer": job.layer, "family": job.family, "setting": job.setting}
            result = train_sae(
                rows(job.layer), job.config, progress=progress, desc=f"L{job.layer}", meta=meta
            )
            finish(index, result.sae, result.seconds, _train_extra(result))
        for index, source in twins.items():
            original = records[source]
            assert original is not None  # trained, streamed or cached above
            side = _read_sidecar(original.path) or {}
            extra = {k: v for k, v in side.items() if k not in ("key", "record")}
            extra["same_as"] = original.path.relative_to(folder).as_posix()
            job = jobs[index]
            copy = load_sae(original.path, dtype=torch.float32)
            meta = {**copy.meta, "family": job.family, "setting": job.setting}
            finish(index, dataclasses.replace(copy, meta=meta), None, extra)
        timings["saes"] = time.perf_counter() - t
        seconds = time.perf_counter() - t0
        done = [r for r in records if r is not None]
        assert len(done) == len(jobs)  # every job wrote its record
        write_manifest(
            folder,
            {
                "schema": _SCHEMA,
                "key": run_key,
                "complete": True,
                "saematch_version": __version__,
                "profile": profile.to_dict(),
                "records": [r.to_dict(folder) for r in done],
                "timings": {k: round(v, 3) for k, v in timings.items()},
                "seconds": round(seconds, 3),
                "disk_bytes": _disk_bytes(folder.rglob("*")),
            },
        )
        return PrepareResult(
            profile=profile.name,
            folder=folder,
            records=tuple(done),
            seconds=seconds,
            cached=False,
            activation_folders=act_folders,
        )


def _disk_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())
