"""Job lists on threads and on a local Dask cluster of 2 workers: same results, reruns skip done work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_sae

from saematch_core.formats import save_sae
from saematch_core.suite import (
    SuiteJob,
    adjacent_jobs,
    all_pair_jobs,
    load_jobs,
    local_cluster,
    run_suite,
)


def _specs(tmp_path: Path, n: int = 3) -> list[str]:
    base = make_sae(16, 40, seed=0)
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        sae = base if i == 0 else make_sae(16, 40, seed=i).permute(torch.randperm(40, generator=g))
        out.append(str(save_sae(sae, tmp_path / f"layer_{i}.safetensors")))
    return out


def _jobs(specs: list[str]) -> list[SuiteJob]:
    return (
        adjacent_jobs(specs)
        + adjacent_jobs(specs, "cosine")
        + adjacent_jobs(specs, "sinkhorn")
        + all_pair_jobs(specs, "saematch", solver="scipy")
    )


def test_threads_path_solves_then_skips(tmp_path: Path) -> None:
    jobs = _jobs(_specs(tmp_path))
    first = run_suite(jobs, tmp_path / "store")
    assert first.n_solved == len(jobs) == 9 and first.n_cached == 0
    again = run_suite(jobs, tmp_path / "store")
    assert again.n_cached == len(jobs) and again.n_solved == 0
    assert [o.path for o in again.outcomes] == [o.path for o in first.outcomes]
    # a sparse and a scipy job on the same pair reach the same optimum
    assert first.outcomes[0].total_cost == pytest.approx(first.outcomes[6].total_cost, rel=1e-9)


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    pytest.importorskip("distributed")
    cluster = local_cluster(2)
    try:
        assert len(cluster.workers) == 2
        yield cluster.scheduler_address
    finally:
        cluster.close()


def test_distributed_path_gives_the_thread_results_and_skips_done_work(
    tmp_path: Path, cluster_address: str
) -> None:
    jobs = _jobs(_specs(tmp_path))
    threads = run_suite(jobs, tmp_path / "threads")
    dist = run_suite(jobs, tmp_path / "dask", scheduler=cluster_address)
    assert dist.n_solved == len(jobs)
    for t, d in zip(threads.outcomes, dist.outcomes, strict=True):
        rt, rd = t.result(), d.result()
        assert torch.equal(rt.perm, rd.perm) and rt.total_cost == rd.total_cost
        assert Path(t.path).name == Path(d.path).name  # the same content key
    stamps = {o.path: Path(o.path).stat().st_mtime_ns for o in dist.outcomes}
    rerun = run_suite(jobs, tmp_path / "dask", scheduler=cluster_address)
    assert rerun.n_cached == len(jobs) and rerun.n_solved == 0
    assert {o.path: Path(o.path).stat().st_mtime_ns for o in rerun.outcomes} == stamps


def test_load_jobs_reads_relative_paths_and_refuses_bad_lists(tmp_path: Path) -> None:
    specs = _specs(tmp_path, 2)
    doc = {"jobs": [{"a": "layer_0.safetensors", "b": "layer_1.safetensors", "matcher": "cosine"}]}
    (tmp_path / "jobs.json").write_text(json.dumps(doc))
    jobs = load_jobs(tmp_path / "jobs.json")
    assert jobs == [SuiteJob(a=specs[0], b=specs[1], matcher="cosine")]
    (tmp_path / "bad.json").write_text(json.dumps({"jobs": [{"a": "x", "b": "y", "solver": "scipy"}]}))
    with pytest.raises(ValueError, match=r"bad\.json: jobs\[0\]: unknown keys \['solver'\]"):
        load_jobs(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"MatchConfig: unknown keys \['epsilon'\]"):
        SuiteJob(a="x", b="y", config={"epsilon": 1})
    with pytest.raises(ValueError, match=r"SuiteJob\.matcher: expected one of"):
        SuiteJob(a="x", b="y", matcher="nearest")
