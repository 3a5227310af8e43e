"""Many matchings at once: a job list solved on this machine's threads or on a Dask cluster.

A job is two SAEs (paths or ``hub:`` specs) and a matcher (:data:`~saematch_core.matchers.MATCHERS`,
optionally with :class:`~saematch_core.match.MatchConfig` overrides). Every job's result goes to the
content-keyed result store (:func:`~saematch_core.compare.cached_matching`: the key covers both SAEs'
parameters and the matcher's config; files are written atomically), so a rerun skips every job whose
result is there, and jobs that share a solve (the same pair and objective) share a file.

Schedulers (:func:`run_suite`):

``"threads"`` (default)
    This machine: the SAEs are loaded once each and the uncached exact solves run side by side in
    threads (:func:`saematch_core.experiments.results.cached_matches`).
``"local"``
    A Dask ``LocalCluster`` of ``n_workers`` processes on this machine (``pip install
    'saematch[cluster]'``).
``"tcp://host:8786"`` (any other string)
    The Dask scheduler at that address. Each task loads its two SAEs itself, so every worker must
    see the SAE paths (or reach the hub) and ``cache_dir`` (a shared filesystem); only job
    descriptions and small outcome records travel between the client and the workers.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from saematch_core._study_api import cached_matches
from saematch_core.cache import cache_root
from saematch_core.compare import cached_matching, matching_path, write_records_json
from saematch_core.formats import load_sae
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.matchers import MATCHERS, Matcher, get_matcher
from saematch_core.sae import SAE

__all__ = [
    "JobOutcome",
    "SuiteJob",
    "SuiteResult",
    "adjacent_jobs",
    "all_pair_jobs",
    "load_jobs",
    "local_cluster",
    "run_job",
    "run_suite",
]

_SCHEDULERS_LOCAL = ("threads", "local")


@dataclass(frozen=True, kw_only=True)
class SuiteJob:
    """One matching to compute.

    Examples
    --------
    >>> job = SuiteJob(a="l0.safetensors", b="l1.safetensors", config={"solver": "scipy"})
    >>> job.matcher_obj().config.solver
    'scipy'
    """

    a: str
    """SAE A: a file, a folder or ``hub:repo_id/path@revision``."""
    b: str
    """SAE B (same ``d_in``)."""
    matcher: str = "saematch"
    """A name in :data:`~saematch_core.matchers.MATCHERS`."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """:class:`MatchConfig` fields that replace the matcher's (e.g. ``{"solver": "scipy"}``)."""
    format_a: str | None = None
    """File format of A (detected when ``None``)."""
    format_b: str | None = None

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"SuiteJob.{name}: expected a path or hub spec, got {value!r}")
        if self.matcher not in MATCHERS:
            raise ValueError(f"SuiteJob.matcher: expected one of {sorted(MATCHERS)}, got {self.matcher!r}")
        if not isinstance(self.config, Mapping):
            raise TypeError(f"SuiteJob.config: expected a mapping of MatchConfig fields, got {self.config!r}")
        object.__setattr__(self, "config", dict(self.config))
        self.matcher_obj()  # bad overrides fail here, before any work

    def matcher_obj(self) -> Matcher:
        """The registered matcher with :attr:`config` applied."""
        m = get_matcher(self.matcher)
        if not self.config:
            return m
        return replace(m, config=MatchConfig.from_dict({**m.config.to_dict(), **self.config}))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "job") -> SuiteJob:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{where}: expected an object with keys a, b[, matcher, config], got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True, kw_only=True)
class JobOutcome:
    """What one job did."""

    index: int
    """Position of the job in the list."""
    a: str
    b: str
    matcher: str
    path: str
    """The result file in the store (a :class:`~saematch_core.match.MatchResult` JSON)."""
    status: str
    """``solved`` or ``cached`` (found in the store, not recomputed)."""
    seconds: float
    """Wall-clock time of the job on its worker, loading included (``threads``: the run's wall time
    divided by the number of jobs, as the solves overlap)."""
    total_cost: float
    n_matched: int
    shape: tuple[int, int]
    worker: str
    """Host name and process id that ran it."""

    def result(self) -> MatchResult:
        """The matching, read from the store."""
        return MatchResult.from_json(self.path)


@dataclass(frozen=True, kw_only=True)
class SuiteResult:
    """The outcomes of :func:`run_suite`, in job order."""

    scheduler: str
    outcomes: tuple[JobOutcome, ...]
    wall_seconds: float

    @property
    def n_solved(self) -> int:
        return sum(o.status == "solved" for o in self.outcomes)

    @property
    def n_cached(self) -> int:
        return sum(o.status == "cached" for o in self.outcomes)

    def to_json(self, path: str | Path) -> None:
        """Write the outcomes atomically, one per line."""
        write_records_json(
            Path(path),
            {
                "kind": "suite_result",
                "schema_version": 1,
                "scheduler": self.scheduler,
                "wall_seconds": self.wall_seconds,
                "n_solved": self.n_solved,
                "n_cached": self.n_cached,
                "outcomes": [asdict(o) for o in self.outcomes],
            },
        )


# ---------------------------------------------------------------------------------------- job lists
def load_jobs(path: str | Path) -> list[SuiteJob]:
    """Read a job list: a JSON object ``{"jobs": [{"a": ..., "b": ..., "matcher": ..., "config": {...}}]}``
    (or the bare list). Relative SAE paths are taken relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such job list")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    items = doc.get("jobs") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of jobs under 'jobs'")
    jobs = []
    for i, item in enumerate(items):
        job = SuiteJob.from_dict(item, where=f"{path}: jobs[{i}]")
        jobs.append(replace(job, a=_relative_to(job.a, path.parent), b=_relative_to(job.b, path.parent)))
    return jobs


def _relative_to(spec: str, base: Path) -> str:
    if spec.startswith("hub:") or os.path.isabs(spec):
        return spec
    return str(base / spec)


def adjacent_jobs(specs: Sequence[str], matcher: str = "saematch", **config: Any) -> list[SuiteJob]:
    """Jobs matching every SAE to the next one (a chain of layers)."""
    return [SuiteJob(a=a, b=b, matcher=matcher, config=config) for a, b in itertools.pairwise(specs)]


def all_pair_jobs(specs: Sequence[str], matcher: str = "saematch", **config: Any) -> list[SuiteJob]:
    """Jobs matching every SAE to every later one (persistence across all layer pairs)."""
    return [SuiteJob(a=a, b=b, matcher=matcher, config=config) for a, b in itertools.combinations(specs, 2)]


# ---------------------------------------------------------------------------------------- running
def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _outcome(
    index: int, job: SuiteJob, path: Path, cached: bool, seconds: float, res: MatchResult
) -> JobOutcome:
    return JobOutcome(
        index=index,
        a=job.a,
        b=job.b,
        matcher=job.matcher,
        path=str(path),
        status="cached" if cached else "solved",
        seconds=seconds,
        total_cost=res.total_cost,
        n_matched=res.n_matched,
        shape=res.shape,
        worker=_worker_name(),
    )


def run_job(job: SuiteJob, cache_dir: str | Path | None = None, *, index: int = 0) -> JobOutcome:
    """Load the job's two SAEs, solve (unless the store has the result) and store the matching."""
    t0 = time.perf_counter()
    m = job.matcher_obj()
    a = load_sae(job.a, format=job.format_a)
    b = load_sae(job.b, format=job.format_b)
    path = matching_path(a, b, m, cache_dir)
    cached = path.is_file()
    res = cached_matching(a, b, m, cache_dir)
    return _outcome(index, job, path, cached, time.perf_counter() - t0, res)


def _run_job_dict(job: dict[str, Any], cache_dir: str, index: int) -> dict[str, Any]:
    # What a Dask worker runs: plain dicts in and out, so only JSON-like data travels.
    return asdict(run_job(SuiteJob.from_dict(job), cache_dir, index=index))


def _run_threads(jobs: Sequence[SuiteJob], cache_dir: Path, workers: int | None) -> list[JobOutcome]:
    t0 = time.perf_counter()
    saes: dict[tuple[str, str | None], SAE] = {}
    for job in jobs:
        for spec, fmt in ((job.a, job.format_a), (job.b, job.format_b)):
            if (spec, fmt) not in saes:
                saes[(spec, fmt)] = load_sae(spec, format=fmt)
    pairs = [(saes[(j.a, j.format_a)], saes[(j.b, j.format_b)], j.matcher_obj()) for j in jobs]
    paths = [matching_path(a, b, m, cache_dir) for a, b, m in pairs]
    cached = [p.is_file() for p in paths]
    exact = [i for i, (_, _, m) in enumerate(pairs) if m.sinkhorn is None]
    solved: dict[int, MatchResult] = {}
    found = cached_matches(
        [(pairs[i][0], pairs[i][1], pairs[i][2].config) for i in exact], cache_dir, workers=workers
    )
    solved.update(zip(exact, found, strict=True))
    for i, (a, b, m) in enumerate(pairs):
        if i not in solved:
            solved[i] = cached_matching(a, b, m, cache_dir)
    seconds = (time.perf_counter() - t0) / max(len(jobs), 1)
    return [_outcome(i, j, paths[i], cached[i], seconds, solved[i]) for i, j in enumerate(jobs)]


_NEEDS_DISTRIBUTED = (
    "--scheduler: running on a Dask cluster needs dask.distributed: pip install 'saematch[cluster]'"
)


def local_cluster(n_workers: int = 2) -> Any:
    """A Dask ``LocalCluster`` of ``n_workers`` processes with one thread each (each solve already
    uses its process's cores through BLAS and numba) and no dashboard; close it when done."""
    try:
        from distributed import LocalCluster
    except ImportError as exc:
        raise ImportError(_NEEDS_DISTRIBUTED) from exc
    # dashboard_address=None is documented (no dashboard); the stubs only allow str.
    options: dict[str, Any] = {"dashboard_address": None}
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, **options)


def _run_dask(jobs: Sequence[SuiteJob], cache_dir: Path, scheduler: str, n_workers: int) -> list[JobOutcome]:
    try:
        from distributed import Client
    except ImportError as exc:
        raise ImportError(_NEEDS_DISTRIBUTED) from exc
    cluster = local_cluster(n_workers) if scheduler == "local" else None
    client = Client(cluster if cluster is not None else scheduler)
    try:
        futures = client.map(
            _run_job_dict,
            [j.to_dict() for j in jobs],
            [str(cache_dir)] * len(jobs),
            list(range(len(jobs))),
            pure=False,
        )
        out = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [_outcome_from_dict(d) for d in out]  # type: ignore[union-attr]


def _outcome_from_dict(d: Mapping[str, Any]) -> JobOutcome:
    return JobOutcome(**{**d, "shape": tuple(d["shape"])})


def run_suite(
    jobs: Sequence[SuiteJob],
    cache_dir: str | Path | None = None,
    *,
    scheduler: str = "threads",
    workers: int | None = None,
    n_workers: int = 2,
) -> SuiteResult:
    """Solve every job, skipping those already in the store (module docstring).

    Parameters
    ----------
    jobs : the job list (:func:`load_jobs`, :func:`adjacent_jobs`, :func:`all_pair_jobs`).
    cache_dir : the result store; default ``cache_root()/results``. With a remote scheduler it must
        be a folder every worker can write (a shared filesystem).
    scheduler : ``"threads"``, ``"local"`` or a Dask scheduler address.
    workers : threads for ``"threads"`` (default: :func:`saematch_core.experiments.results.default_workers`).
    n_workers : worker processes for ``"local"``.

    Returns
    -------
    SuiteResult
    """
    jobs = list(jobs)
    for i, job in enumerate(jobs):
        if not isinstance(job, SuiteJob):
            raise TypeError(f"jobs[{i}]: expected a SuiteJob, got {type(job).__name__}")
    if not isinstance(scheduler, str) or not scheduler:
        raise ValueError(f"scheduler: expected 'threads', 'local' or a Dask address, got {scheduler!r}")
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers: expected an int >= 1, got {n_workers!r}")
    root = (Path(cache_dir) if cache_dir is not None else cache_root() / "results").resolve()
    t0 = time.perf_counter()
    if scheduler == "threads":
        outcomes = _run_threads(jobs, root, workers)
    else:
        outcomes = _run_dask(jobs, root, scheduler, n_workers)
    return SuiteResult(scheduler=scheduler, outcomes=tuple(outcomes), wall_seconds=time.perf_counter() - t0)
