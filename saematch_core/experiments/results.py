"""Typed experiment results: JSON round trip, input fingerprints and the on-disk result cache.

The base of :mod:`saematch_core.experiments`. Every experiment returns a frozen dataclass that
mixes in :class:`JsonResult`, and is cached as one JSON file per set of inputs under
``cache_root()/results/<kind>/<content_key(spec)>.json``, where ``spec`` describes the inputs by
their fingerprints (:func:`tensor_digest`, :func:`acts_digest`, :func:`sae_digest`,
:func:`model_digest`) and the config. A rerun with the same inputs reads the file instead of computing.
Experiments that run per layer pair share their cache-spec fields (:func:`pair_spec`) and their loop
(:func:`map_layer_pairs`); matchings are solved once and shared (:func:`cached_match`,
:func:`cached_matches`).

Files follow the one result layout of :mod:`saematch_core.result_file`: ``config`` is the cache
spec and ``data`` the result's fields (tuples become lists, nested results become objects).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saematch_core.cache import cache_root, content_key, is_intact, seal
from saematch_core.experiments.inputs import ArrayLike, Inputs
from saematch_core.match import MatchConfig, MatchResult, match
from saematch_core.result_file import read_result_file, result_document, write_result_file
from saematch_core.sae import SAE
from saematch_core.verify import read_cached_match, write_cached_match

__all__ = [
    "JsonResult",
    "acts_digest",
    "array_rows",
    "cached_match",
    "cached_matches",
    "default_workers",
    "finite_mean",
    "load_or_compute",
    "map_layer_pairs",
    "model_digest",
    "pair_spec",
    "parallel_map",
    "read_result",
    "result_path",
    "sae_digest",
    "tensor_digest",
    "write_result",
]

logger = logging.getLogger(__name__)

R = TypeVar("R", bound="JsonResult")
T = TypeVar("T")
U = TypeVar("U")

_FULL_HASH_BYTES = 64 * 2**20


def tensor_digest(t: Tensor | np.ndarray) -> str:
    """A 16-hex-digit fingerprint of an array's dtype, shape and values.

    Arrays up to 64 MiB are hashed whole. Larger ones (activation caches, read through memory
    maps) contribute ~4096 evenly spaced rows plus the last one, so that a warm-cache rerun does
    not read gigabytes: any rebuild from other tokens, model or dtype changes the digest.

    >>> tensor_digest(torch.arange(3)) == tensor_digest(torch.arange(3))
    True
    >>> tensor_digest(torch.arange(3)) == tensor_digest(torch.arange(3.0))
    False
    """
    if isinstance(t, Tensor):
        t = t.detach().cpu()
        # numpy has no bfloat16: hash its float32 image, under its own dtype name.
        arr = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        dtype_name = "bfloat16" if t.dtype == torch.bfloat16 else str(arr.dtype)
    else:
        arr = t
        dtype_name = str(arr.dtype)
    h = hashlib.sha256(f"{dtype_name}|{tuple(arr.shape)}|".encode())
    if arr.nbytes > _FULL_HASH_BYTES and arr.ndim >= 1 and arr.shape[0] > 1:
        step = max(1, arr.shape[0] // 4096)
        h.update(b"sampled|")
        h.update(np.ascontiguousarray(arr[::step]).tobytes())
        h.update(np.ascontiguousarray(arr[-1:]).tobytes())
    else:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def array_rows(x: ArrayLike, start: int, stop: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rows ``start:stop`` of a tensor or (memory-mapped) array as a tensor on ``device`` in ``dtype``.

    Memory-mapped rows are copied into memory first: the cache's maps are read-only, and torch
    warns on (and must not write through) a tensor that views read-only memory.
    """
    part = x[start:stop]
    t = part if isinstance(part, Tensor) else torch.from_numpy(np.array(part))
    return t.to(device=device, dtype=dtype)


def acts_digest(acts: ArrayLike) -> str:
    """Fingerprint of activations (tensor, array or memory map) for cache keys (:func:`tensor_digest`)."""
    return tensor_digest(acts if isinstance(acts, Tensor) else np.asarray(acts))


def finite_mean(values: Sequence[float] | Tensor | np.ndarray) -> float:
    """Mean of the finite values (``nan`` when there are none), in float64.

    For summarising per-pair series and per-feature measures where ``nan`` marks "not defined"
    (a dead feature, a missing partner).

    >>> finite_mean([1.0, float("nan"), 3.0]), finite_mean(torch.tensor([float("nan")]))
    (2.0, nan)
    """
    if isinstance(values, Tensor):
        t = values.detach().to("cpu", torch.float64)
        ok = t[torch.isfinite(t)]
        return float(ok.mean()) if ok.numel() else math.nan
    arr = np.asarray(values, dtype=np.float64)
    kept = arr[np.isfinite(arr)]
    return float(kept.mean()) if kept.size else math.nan


def sae_digest(sae: SAE) -> str:
    """Fingerprint of an SAE's parameters, activation and ``k`` (not its free-form ``meta``)."""
    h = hashlib.sha256(f"{sae.activation}|{sae.k}|".encode())
    for name, t in sorted(sae.tensors().items()):
        h.update(f"{name}:{tensor_digest(t)}|".encode())
    return h.hexdigest()[:16]


def model_digest(model: torch.nn.Module) -> str:
    """Fingerprint of a model's class, config and parameters.

    Reading every weight of a 2B model would take seconds per call, so each parameter contributes
    its name, shape, dtype and a strided sample of ~4096 of its values (first and last included):
    a retrained or differently loaded model changes it; a surgical edit of a few weights might not.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = torch.cat([flat[::step], flat[-1:]]).to(device="cpu", dtype=torch.float64)
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        # JSON has no NaN; keep it readable and reversible.
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (np.floating, np.integer)):
        return _encode(value.item())
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _decode(non_none[0], value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value, strict=True))
    if origin in (dict, Mapping, typing.Mapping):
        key_tp, val_tp = args
        return {_decode(key_tp, k): _decode(val_tp, v) for k, v in value.items()}
    if origin is typing.Literal:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp)})
    if tp is float:
        return float(value)
    if tp is int:
        return int(value)
    return value


class JsonResult:
    """Mixin for frozen-dataclass results: ``to_dict``/``from_dict`` and ``to_json``/``from_json``.

    Fields may be numbers, strings, bools, ``None``, tuples, str-keyed dicts and nested
    dataclasses of the same kinds; floats survive NaN and infinities.
    """

    kind: ClassVar[str] = "result"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        return _encode(self)

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        """Inverse of :meth:`to_dict`; unknown or missing fields are an error."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"data: {cls.__name__} fields mismatch, unknown {unknown}, missing {missing}")
        hints = typing.get_type_hints(cls)
        decoded = {name: _decode(hints[name], _restore_floats(hints[name], data[name])) for name in names}
        return cls(**decoded)

    def to_json(self, path: str | Path, config: Mapping[str, Any] | None = None) -> None:
        """Write the result atomically in the one result layout (:mod:`saematch_core.result_file`),
        with ``config`` (e.g. the cache spec) as its ``config``."""
        doc = result_document(
            kind=self.kind,
            config=dict(config or {}),
            data=self.to_dict(),
            git_commit_reason="results are keyed by their inputs, not by the code's commit",
        )
        write_result_file(path, doc)

    @classmethod
    def from_json(cls: type[R], path: str | Path) -> R:
        """Read a file written by :meth:`to_json` (either layout version)."""
        return cls.from_dict(read_result_file(path, cls.kind)["data"])


def _restore_floats(tp: Any, value: Any) -> Any:
    # "nan"/"inf" strings come back as floats wherever the field type allows floats.
    if isinstance(value, str) and value in ("nan", "inf", "-inf") and tp is not str:
        return float(value)
    if isinstance(value, list):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_restore_floats(inner, v) for v in value]
    if isinstance(value, dict):
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            return {k: _restore_floats(hints.get(k, Any), v) for k, v in value.items()}
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {k: _restore_floats(inner, v) for k, v in value.items()}
    return value


def result_path(
    result_type: type[JsonResult], spec: Mapping[str, Any], cache_dir: str | Path | None = None
) -> Path:
    """Where the result of kind ``result_type.kind`` for ``spec`` is cached:
    ``<cache_dir or cache_root()/results>/<kind>/<content_key(spec)>.json``."""
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "results"
    return root / result_type.kind / f"{content_key(spec)}.json"


def cached_match(
    sae_a: SAE, sae_b: SAE, config: MatchConfig, cache_dir: str | Path | None = None
) -> MatchResult:
    """:func:`~saematch_core.match.match`, stored as ``<cache_dir>/match/<key>.json`` and reused.

    Sections 2–5 and 8 match the same layer pairs with the same objectives; an exact assignment of
    two real 2048-wide SAEs takes seconds (the unfolded objective five or more), so every analysis
    shares one solve. The key covers both SAEs' parameters (:func:`sae_digest`) and the config minus
    the ``device`` it ran on; an unreadable file is recomputed. ``cache_dir`` defaults to
    ``cache_root()/results``.
    """
    path = _match_path(sae_a, sae_b, config, cache_dir)
    found = read_cached_match(path, sae_a, sae_b)
    if found is not None:
        return found
    result = match(sae_a, sae_b, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cached_match(result, path)
    return result


def _match_path(sae_a: SAE, sae_b: SAE, config: MatchConfig, cache_dir: str | Path | None) -> Path:
    spec = {
        "a": sae_digest(sae_a),
        "b": sae_digest(sae_b),
        "config": {k: v for k, v in config.to_dict().items() if k != "device"},
    }
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "results"
    return root / "match" / f"{content_key(spec)}.json"


def default_workers() -> int:
    """Threads for independent exact solves: the number of CPUs, at most 4."""
    return min(4, os.cpu_count() or 1)


def _memory_bytes() -> int:
    """Physical memory of this machine (a generous 64 GiB where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 64 << 30


def parallel_map(fn: Callable[[T], U], items: Sequence[T], *, workers: int | None = None) -> list[U]:
    """``[fn(x) for x in items]``, ``workers`` at a time in threads (results in order).

    Meant for exact matchings: scipy's solver and the sparse solver's compiled kernels release the
    GIL, so two solves overlap on two cores. ``workers`` defaults to :func:`default_workers`; 1 runs
    them one after the other.
    """
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    if len(items) < 2 or workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _solve_bytes(a: SAE, b: SAE, cfg: MatchConfig) -> int:
    """Rough peak memory of one solve: the solvers' model, :func:`saematch_core.lap.solve_memory_bytes`."""
    from saematch_core.lap import solve_memory_bytes

    return solve_memory_bytes(cfg.solver, a.d_sae, b.d_sae, chunk_size=cfg.chunk_size, k=cfg.sparse_k)


def cached_matches(
    jobs: Sequence[tuple[SAE, SAE, MatchConfig]],
    cache_dir: str | Path | None = None,
    *,
    workers: int | None = None,
) -> list[MatchResult]:
    """:func:`cached_match` of every ``(sae_a, sae_b, config)``, the uncached ones solved in parallel
    (:func:`parallel_map`).

    Each dense ``"scipy"`` solve holds an ``F_A × F_B`` float64 matrix, so fewer of them run at once
    when ``workers`` of them would need more than half of the machine's memory (the sparse solver
    counts its score blocks and its dense fallback, :func:`_solve_bytes`). ``"sparse"`` solves run one
    at a time where numba's threading layer is not thread-safe
    (:func:`saematch_core.lap_sparse.threadsafe`).
    """
    jobs = list(jobs)
    found = [read_cached_match(_match_path(a, b, cfg, cache_dir), a, b) for a, b, cfg in jobs]
    todo = [i for i, r in enumerate(found) if r is None]
    workers = default_workers() if workers is None else workers
    need = [_solve_bytes(*jobs[i]) for i in todo]
    if need and max(need) and isinstance(workers, int) and workers > 1:
        workers = max(1, min(workers, _memory_bytes() // (2 * max(need))))
    if workers != 1 and any(jobs[i][2].solver == "sparse" for i in todo):
        from saematch_core import lap_sparse  # numba: imported only when needed

        if not lap_sparse.threadsafe():
            workers = 1

    def solve(i: int) -> MatchResult:
        a, b, cfg = jobs[i]
        return cached_match(a, b, cfg, cache_dir)

    solved = dict(zip(todo, parallel_map(solve, todo, workers=workers), strict=True))
    return [r if r is not None else solved[i] for i, r in enumerate(found)]


def read_result(result_type: type[R], path: Path) -> R | None:
    """The cached result at ``path``, or ``None`` when it is missing or unreadable (then recompute)."""
    if not path.is_file() or not is_intact(path):
        return None
    try:
        result = result_type.from_json(path)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        logger.warning("%s: unreadable cached result (%s); recomputing", path, exc)
        return None
    logger.info("%s: cached %s", path, result_type.kind)
    return result


def write_result(result: JsonResult, path: Path, spec: Mapping[str, Any]) -> None:
    """Store ``result`` at ``path`` (atomically), recording ``spec`` as its config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result.to_json(path, config=spec)
    seal(path)


def load_or_compute(
    result_type: type[R],
    spec: Mapping[str, Any],
    compute: Callable[[], R],
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> R:
    """Return the cached result for ``spec`` or compute, store and return it.

    Parameters
    ----------
    result_type : the result class (its ``kind`` names the sub-folder).
    spec : JSON-serialisable description of every input (fingerprints, config); its
        :func:`~saematch_core.cache.content_key` names the file (:func:`result_path`).
    compute : called only on a cache miss (or with ``force``).
    cache_dir : root of the result cache; default ``cache_root() / "results"``.
    force : recompute and overwrite even when a cached file exists.
    """
    path = result_path(result_type, spec, cache_dir)
    if not force:
        cached = read_result(result_type, path)
        if cached is not None:
            return cached
    result = compute()
    write_result(result, path, spec)
    return result


def pair_spec(
    sae_a: SAE,
    sae_b: SAE,
    layers: tuple[int, int],
    *,
    acts: tuple[ArrayLike, ArrayLike] | None = None,
    keep: ArrayLike | None = None,
) -> dict[str, Any]:
    """The cache-spec fields every per-layer-pair experiment shares.

    ``a``, ``b`` (:func:`sae_digest`), ``layers``, and with activations ``acts`` (their two
    :func:`acts_digest`) and ``keep`` (its digest, or ``None``). Without activations neither ``acts``
    nor ``keep`` is recorded: nothing computed from them can differ. The experiment adds its own
    fields (config, seeds, ...) to the returned dict.

    Parameters
    ----------
    layers : (layer_a, layer_b).
    acts : (acts_a, acts_b), each (n_tokens, d_in) on the same tokens, optional.
    keep : BoolTensor (n_tokens,), optional; ignored without ``acts``.
    """
    spec: dict[str, Any] = {
        "a": sae_digest(sae_a),
        "b": sae_digest(sae_b),
        "layers": [int(x) for x in layers],
    }
    if acts is not None:
        spec["acts"] = [acts_digest(acts[0]), acts_digest(acts[1])]
        spec["keep"] = None if keep is None else acts_digest(keep)
    return spec


def map_layer_pairs(
    result_type: type[R],
    inputs: Inputs,
    pairs: Iterable[tuple[int, int]],
    compute: Callable[[int, int], R],
    *,
    desc: str,
    spec: Mapping[str, Any] | Callable[[int, int], Mapping[str, Any]] | None = None,
    saes: Mapping[int, SAE] | None = None,
    data: bool = True,
    prefetch: Callable[[list[tuple[int, int]]], object] | None = None,
) -> list[R]:
    """``compute(layer_a, layer_b)`` for every pair, each cached on its own (:func:`load_or_compute`).

    A pair's cache spec is :func:`pair_spec` (with the pair's activations and ``inputs.keep`` when
    ``data`` is set and ``inputs`` has activations of both layers) updated with ``spec``: fields
    shared by every pair, or a function of the pair. ``inputs`` also gives the cache folder,
    ``force`` and ``progress``.

    Parameters
    ----------
    result_type : the result class of one pair.
    inputs : the experiment's inputs.
    pairs : (layer_a, layer_b), computed in this order behind one tqdm bar named ``desc``.
    compute : called only on a cache miss (or with ``inputs.force``).
    saes : layer → SAE; default ``inputs.saes``. Every layer of ``pairs`` must be present.
    data : whether the result depends on the activations (then they are part of the key).
    prefetch : called once with the pairs that will be computed (cache misses) before any of them,
        e.g. to solve their matchings in parallel with :func:`cached_matches`.

    Returns
    -------
    list of ``result_type``, one per pair, in order.
    """
    saes = inputs.saes if saes is None else saes
    activations = inputs.activations if data else None
    cache_dir, force = inputs.cache_dir, inputs.force
    pairs = list(pairs)
    keys = []
    for la, lb in pairs:
        with_data = activations is not None and la in activations and lb in activations
        acts = (activations[la], activations[lb]) if with_data and activations is not None else None
        key = pair_spec(saes[la], saes[lb], (la, lb), acts=acts, keep=inputs.keep)
        if spec is not None:
            key.update(spec(la, lb) if callable(spec) else spec)
        keys.append(key)
    # With a prefetch, the cache is read up front (once) to know the misses.
    found: list[R | None] = [None] * len(pairs)
    if prefetch is not None:
        if not force:
            found = [read_result(result_type, result_path(result_type, key, cache_dir)) for key in keys]
        missing = [pair for pair, hit in zip(pairs, found, strict=True) if hit is None]
        if missing:
            prefetch(missing)
    out = []
    for (la, lb), key, hit in tqdm(
        list(zip(pairs, keys, found, strict=True)), desc=desc, disable=not inputs.progress
    ):
        out.append(
            hit
            if hit is not None
            else load_or_compute(
                result_type, key, lambda la=la, lb=lb: compute(la, lb), cache_dir=cache_dir, force=force
            )
        )
    return out
