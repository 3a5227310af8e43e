"""Result JSON round trips, fingerprints and the on-disk result cache."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import make_sae

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.results import (
    JsonResult,
    acts_digest,
    cached_match,
    cached_matches,
    finite_mean,
    load_or_compute,
    map_layer_pairs,
    pair_spec,
    parallel_map,
    result_path,
    sae_digest,
    tensor_digest,
)
from saematch_core.match import MatchConfig, match


@dataclass(frozen=True, kw_only=True)
class _Inner:
    x: float
    tags: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class _Demo(JsonResult):
    kind: ClassVar[str] = "demo"
    value: float
    count: int
    maybe: float | None
    inner: tuple[_Inner, ...]
    table: dict[str, float]


def _demo() -> _Demo:
    return _Demo(
        value=math.nan,
        count=3,
        maybe=None,
        inner=(_Inner(x=math.inf, tags=("a", "nan")), _Inner(x=-1.5, tags=())),
        table={"k": -math.inf},
    )


def test_json_round_trip_keeps_nan_inf_and_nesting(tmp_path) -> None:
    res = _demo()
    path = tmp_path / "r.json"
    res.to_json(path, config={"seed": 1})
    doc = json.loads(path.read_text())
    assert doc["kind"] == "demo" and doc["config"] == {"seed": 1} and doc["schema_version"] == 2
    assert set(doc) == {
        "kind",
        "schema_version",
        "saematch_version",
        "git_commit",
        "git_commit_reason",
        "run_id",
        "created_ms",
        "config",
        "data",
    }
    # a file of the first layout version (the same object without run_id) still reads
    old = {k: v for k, v in doc.items() if k != "run_id"} | {"schema_version": 1}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert _Demo.from_json(tmp_path / "v1.json").to_dict() == res.to_dict()
    back = _Demo.from_json(path)
    assert math.isnan(back.value) and back.count == 3 and back.maybe is None
    assert back.inner[0] == _Inner(x=math.inf, tags=("a", "nan"))  # a str field keeps "nan" as text
    assert back.table == {"k": -math.inf}
    with pytest.raises(ValueError, match="fields mismatch"):
        _Demo.from_dict({**res.to_dict(), "extra": 1})
    with pytest.raises(FileNotFoundError, match="no such result file"):
        _Demo.from_json(tmp_path / "missing.json")


def test_load_or_compute_caches_and_recovers_from_corrupt_files(tmp_path) -> None:
    calls = []

    def compute() -> _Demo:
        calls.append(1)
        return _demo()

    spec = {"a": 1}
    load_or_compute(_Demo, spec, compute, cache_dir=tmp_path)
    load_or_compute(_Demo, spec, compute, cache_dir=tmp_path)
    assert len(calls) == 1
    (path,) = (tmp_path / "demo").glob("*.json")
    path.write_text("{not json")
    load_or_compute(_Demo, spec, compute, cache_dir=tmp_path)
    assert len(calls) == 2
    load_or_compute(_Demo, spec, compute, cache_dir=tmp_path, force=True)
    load_or_compute(_Demo, {"a": 2}, compute, cache_dir=tmp_path)
    assert len(calls) == 4


def test_digests_see_values_dtypes_and_shapes() -> None:
    x = torch.arange(6.0)
    assert tensor_digest(x) == tensor_digest(x.numpy()) == tensor_digest(np.arange(6.0, dtype=np.float32))
    assert tensor_digest(x) != tensor_digest(x.reshape(2, 3))
    assert tensor_digest(x) != tensor_digest(x.double())
    a = make_sae(8, 16)
    assert sae_digest(a) == sae_digest(make_sae(8, 16))
    assert sae_digest(a) != sae_digest(a.permute(torch.arange(16).flip(0)))


def test_large_arrays_are_sampled_but_still_distinguished(tmp_path) -> None:
    n = (64 * 2**20) // (16 * 2) + 10  # just over the full-hash limit in float16
    arr = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float16, shape=(n, 16))
    arr[:] = 1
    first = tensor_digest(arr)
    arr[-1, 0] = 2  # the last row is always part of the sample
    assert tensor_digest(arr) != first
    assert tensor_digest(arr[: n // 2]) != tensor_digest(arr)


def test_acts_digest_is_the_same_for_tensor_array_and_memory_map(tmp_path) -> None:
    x = torch.randn(10, 4)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(10, 4))
    mm[:] = x.numpy()
    assert acts_digest(x) == acts_digest(x.numpy()) == acts_digest(mm) == tensor_digest(x)
    assert acts_digest([True, False]) == tensor_digest(np.array([True, False]))
    assert acts_digest(x) != acts_digest(x[:9])


def test_finite_mean_skips_nan_and_inf_for_sequences_and_tensors() -> None:
    values = [1.0, math.nan, 3.0, math.inf, -math.inf]
    assert finite_mean(values) == 2.0
    assert finite_mean(torch.tensor(values)) == 2.0
    assert finite_mean(np.array(values)) == 2.0
    for empty in ([], [math.nan], torch.zeros(0), torch.tensor([math.nan], dtype=torch.float16)):
        assert math.isnan(finite_mean(empty))
    # float64 whatever the input dtype, like a reference mean over the defined values.
    t = torch.rand(1000, dtype=torch.float32)
    assert finite_mean(t) == pytest.approx(sum(t.double().tolist()) / 1000, rel=1e-12)


def test_pair_spec_records_activations_only_when_given() -> None:
    a, b = make_sae(8, 16, seed=0), make_sae(8, 16, seed=1)
    x, keep = torch.randn(5, 8), torch.tensor([True, False, True, True, True])
    bare = pair_spec(a, b, (3, 4))
    assert bare == {"a": sae_digest(a), "b": sae_digest(b), "layers": [3, 4]}
    assert pair_spec(a, b, (3, 4), keep=keep) == bare  # keep alone changes nothing computed
    full = pair_spec(a, b, (3, 4), acts=(x, x + 1), keep=keep)
    assert full["acts"] == [acts_digest(x), acts_digest(x + 1)] and full["keep"] == acts_digest(keep)
    assert pair_spec(a, b, (3, 4), acts=(x, x + 1))["keep"] is None
    assert pair_spec(b, a, (3, 4))["a"] == sae_digest(b)


@dataclass(frozen=True, kw_only=True)
class _PairDemo(JsonResult):
    kind: ClassVar[str] = "pair_demo"
    layers: tuple[int, int]
    d_sae: int


def test_map_layer_pairs_caches_each_pair_under_its_spec(tmp_path) -> None:
    saes = {0: make_sae(8, 16, seed=0), 1: make_sae(8, 16, seed=1), 2: make_sae(8, 8, seed=2)}
    acts = {0: torch.randn(5, 8), 1: torch.randn(5, 8)}
    calls: list[tuple[int, int]] = []

    def compute(la: int, lb: int) -> _PairDemo:
        calls.append((la, lb))
        return _PairDemo(layers=(la, lb), d_sae=saes[lb].d_sae)

    def run(activations=None, force=False, **kw) -> list[_PairDemo]:  # type: ignore[no-untyped-def]
        kw.setdefault("spec", {"seed": 0})
        inputs = Inputs(saes=saes, activations=activations, cache_dir=tmp_path, force=force, progress=False)
        return map_layer_pairs(_PairDemo, inputs, [(1, 2), (0, 1)], compute, desc="demo", **kw)

    first = run(activations=acts)
    assert [r.layers for r in first] == [(1, 2), (0, 1)] and first[0].d_sae == 8
    assert calls == [(1, 2), (0, 1)]
    assert run(activations=acts) == first and len(calls) == 2  # both read from the cache
    # Pair (0, 1) has activations: its spec records them; (1, 2) lacks layer 2's, so it does not.
    with_acts = pair_spec(saes[0], saes[1], (0, 1), acts=(acts[0], acts[1])) | {"seed": 0}
    assert result_path(_PairDemo, with_acts, tmp_path).is_file()
    assert result_path(_PairDemo, pair_spec(saes[1], saes[2], (1, 2)) | {"seed": 0}, tmp_path).is_file()
    run()  # without activations only (0, 1) changes key
    assert calls == [(1, 2), (0, 1), (0, 1)]
    run(spec=lambda la, lb: {"seed": la})  # a per-pair spec: (1, 2) gets seed 1, (0, 1) seed 0
    assert calls == [(1, 2), (0, 1), (0, 1), (1, 2)]
    run(force=True)
    assert len(calls) == 6
    # prefetch sees exactly the pairs that will be computed, before any of them
    seen: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = []
    run(prefetch=lambda missing: seen.append((missing, list(calls))))
    assert seen == []  # everything cached: not called
    run(spec={"seed": 9}, prefetch=lambda missing: seen.append((missing, list(calls))))
    assert seen == [([(1, 2), (0, 1)], calls[:6])] and len(calls) == 8
    run(activations=acts, data=False)  # a result that does not depend on the data keeps the data-free key
    assert len(calls) == 8


def test_array_rows_copies_read_only_memmaps_without_warning(tmp_path) -> None:
    import warnings

    from saematch_core.experiments.results import array_rows

    path = tmp_path / "acts.npy"
    np.save(path, np.arange(12, dtype=np.float16).reshape(6, 2))
    mm = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = array_rows(mm, 2, 4, device=torch.device("cpu"), dtype=torch.float32)
    assert rows.dtype == torch.float32 and rows.tolist() == [[4.0, 5.0], [6.0, 7.0]]
    t = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(array_rows(t, 1, 3, device=torch.device("cpu"), dtype=torch.float64), t[1:].double())


def test_cached_match_reuses_the_disk_copy_and_survives_corruption(tmp_path: Path) -> None:
    a, b = make_sae(16, 8, seed=0), make_sae(16, 8, seed=1)
    cfg = MatchConfig()
    first = cached_match(a, b, cfg, tmp_path)
    files = list((tmp_path / "match").glob("*.json"))
    assert len(files) == 1
    assert torch.equal(first.perm, match(a, b, cfg).perm)
    again = cached_match(a, b, cfg, tmp_path)
    assert torch.equal(again.perm, first.perm) and again.run_id == first.run_id  # read, not re-solved
    assert torch.allclose(again.cost, first.cost)
    other = cached_match(a, b, MatchConfig(fold=False), tmp_path)
    assert len(list((tmp_path / "match").glob("*.json"))) == 2 and other.run_id != first.run_id
    files[0].write_text("{not json")
    fixed = cached_match(a, b, cfg, tmp_path)
    assert torch.equal(fixed.perm, first.perm) and fixed.run_id != first.run_id


def test_cached_matches_solves_in_threads_like_one_by_one(tmp_path: Path) -> None:
    saes = [make_sae(16, 24, seed=i) for i in range(4)]
    jobs = [(saes[i], saes[i + 1], cfg) for i in range(3) for cfg in (MatchConfig(), MatchConfig(fold=False))]
    a, b, cfg = jobs[1]
    cached_match(a, b, cfg, tmp_path)  # one is cached already
    parallel = cached_matches(jobs, tmp_path, workers=3)
    serial = [match(a, b, cfg) for a, b, cfg in jobs]
    assert [torch.equal(p.perm, s.perm) for p, s in zip(parallel, serial, strict=True)] == [True] * 6
    assert len(list((tmp_path / "match").glob("*.json"))) == 6
    again = cached_matches(jobs, tmp_path, workers=1)
    assert [r.run_id for r in again] == [r.run_id for r in parallel]  # all read back, none re-solved
    assert parallel_map(lambda x: x * x, list(range(7)), workers=3) == [x * x for x in range(7)]


def test_cached_matches_runs_fewer_dense_solves_at_once_when_memory_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from saematch_core import lap_sparse
    from saematch_core.experiments import results

    saes = [make_sae(8, 16, seed=i) for i in range(3)]
    jobs = [(saes[i], saes[i + 1], MatchConfig(solver="scipy")) for i in range(2)]
    seen: list[int | None] = []
    real = results.parallel_map
    monkeypatch.setattr(
        results, "parallel_map", lambda fn, items, workers: seen.append(workers) or real(fn, items)
    )
    # each dense solve holds 16 × 16 float64 = 2 KiB: 5 KiB of memory leaves room for one at a time
    monkeypatch.setattr(results, "_memory_bytes", lambda: 5 * 1024)
    cached_matches(jobs, tmp_path / "a", workers=4)
    monkeypatch.setattr(results, "_memory_bytes", lambda: 1 << 30)
    cached_matches(jobs, tmp_path / "b", workers=4)
    sparse = [(a, b, MatchConfig(solver="sparse")) for a, b, _ in jobs]
    cached_matches(sparse, tmp_path / "c", workers=4)
    # the sparse solver's score blocks (and dense fallback) are counted too: 3.5 KiB each here
    monkeypatch.setattr(results, "_memory_bytes", lambda: 5 * 1024)
    cached_matches(sparse, tmp_path / "e", workers=4)
    greedy = [(a, b, MatchConfig(solver="greedy")) for a, b, _ in jobs]
    monkeypatch.setattr(results, "_memory_bytes", lambda: 0)
    cached_matches(greedy, tmp_path / "d", workers=4)  # no matrix held: not limited
    assert seen == [1, 4, 4 if lap_sparse.threadsafe() else 1, 1, 4]
    with pytest.raises(ValueError, match="workers: expected an int >= 1"):
        parallel_map(abs, [1, 2], workers=0)
