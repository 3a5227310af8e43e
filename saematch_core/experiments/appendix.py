"""What the appendix shows beside the science: SAE quality, solver benchmarks, the environment.

:func:`quality_table` lists the prepared SAEs' quality; :func:`benchmark_table` and
:func:`benchmark_series` read the records ``make bench`` writes to
``benchmarks/results/results.json`` (or the quick run the book build makes when that file is
absent), and :func:`benchmark_meta` says on which machine and when they ran;
:func:`environment_table` lists the versions the book was built with.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saematch_core.prepare import SAERecord

__all__ = [
    "BENCHMARK_COLUMNS",
    "BENCHMARK_META",
    "VERSIONED_PACKAGES",
    "benchmark_meta",
    "benchmark_series",
    "benchmark_table",
    "environment_table",
    "quality_table",
]

BENCHMARK_COLUMNS: tuple[str, ...] = (
    "F",
    "d",
    "noise",
    "solver",
    "candidates",
    "chain_layers",
    "gemm_s",
    "scipy_s",
    "ours_s",
    "lap_speedup_vs_scipy",
    "e2e_over_gemm",
    "scipy_peak_rss_mb",
    "ours_peak_rss_mb",
    "same_optimum",
    "gap_bound_rel",
    "errors",
)
"""Columns of ``benchmarks/results/results.json`` records shown in the appendix, when present."""

VERSIONED_PACKAGES = (
    "saematch",
    "torch",
    "numpy",
    "scipy",
    "transformers",
    "safetensors",
    "huggingface_hub",
    "plotly",
    "papermill",
    "jupytext",
    "jupyter-book",
    "sphinx",
    "myst-nb",
)
"""Packages whose versions :func:`environment_table` lists."""


def _benchmark_records(path: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The records of ``make bench``'s ``results.json``, or ``None`` when the file is absent."""
    p = Path(path)
    if not p.is_file():
        return None
    doc = json.loads(p.read_text(encoding="utf-8"))
    records = doc.get("records", []) if isinstance(doc, dict) else []
    return [r for r in records if isinstance(r, dict)]


BENCHMARK_META: tuple[tuple[str, str], ...] = (
    ("date", "date"),
    ("cpu", "CPU"),
    ("cpu_count", "cores"),
    ("torch_threads", "torch threads"),
    ("platform", "platform"),
    ("python", "python"),
    ("torch", "torch"),
    ("numba", "numba"),
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("command", "command"),
)
"""Keys of ``results.json``'s ``meta`` that :func:`benchmark_meta` lists, with their labels."""


def benchmark_meta(path: str | os.PathLike[str]) -> list[tuple[str, str]] | None:
    """Where and when the benchmarks in ``path`` ran: ``(label, value)`` rows from its ``meta``
    (:data:`BENCHMARK_META`, those present), or ``None`` when the file is absent.

    Raises
    ------
    ValueError
        If the file has no ``meta`` object (results of unknown origin are not shown as measured).
    """
    p = Path(path)
    if not p.is_file():
        return None
    doc = json.loads(p.read_text(encoding="utf-8"))
    meta = doc.get("meta") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{p}: expected a 'meta' object saying where and when the benchmarks ran")
    return [(label, str(meta[key])) for key, label in BENCHMARK_META if meta.get(key) is not None]


def benchmark_series(
    path: str | os.PathLike[str], column: str
) -> tuple[list[str], dict[str, list[float]]] | None:
    """``column`` of every planted instance in ``make bench``'s ``results.json``, for a grouped bar chart:
    categories ``"F=… d=… noise"`` (in file order) and one series per candidate precision (NaN where a
    precision was not run or the value is missing). ``None`` when the file or the column is absent."""
    records = [
        r for r in _benchmark_records(path) or [] if r.get("noise") is not None and r.get(column) is not None
    ]
    if not records:
        return None
    labels = [f"F={r.get('F')} d={r.get('d')} {r['noise']}" for r in records]
    cats = list(dict.fromkeys(labels))
    series: dict[str, list[float]] = {}
    for r, label in zip(records, labels, strict=True):
        values = series.setdefault(str(r.get("candidates") or "float32"), [math.nan] * len(cats))
        values[cats.index(label)] = float(r[column])
    return cats, series


def benchmark_table(path: str | os.PathLike[str]) -> tuple[list[str], list[list[str]]] | None:
    """Headers and formatted rows of ``make bench``'s ``results.json`` (``None`` when absent).

    Only the :data:`BENCHMARK_COLUMNS` that some record has are shown.
    """
    records = _benchmark_records(path)
    if records is None:
        return None
    headers = [c for c in BENCHMARK_COLUMNS if any(c in r for r in records)]

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    return headers, [[fmt(r.get(c)) for c in headers] for r in records]


def environment_table(packages: Sequence[str] = VERSIONED_PACKAGES) -> list[tuple[str, str]]:
    """``(name, version)`` rows for the book's appendix: Python, the platform and ``packages``.

    A package that is not installed is listed as ``"not installed"``.
    """
    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    for name in packages:
        try:
            rows.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def quality_table(records: Sequence[SAERecord]) -> tuple[list[str], Sequence[tuple[object, ...]]]:
    """Headers and rows: every prepared SAE's family, layer, setting, L0, FVU, dead fraction, ΔL and
    training time (``–`` where not measured)."""
    rows = [
        (
            r.family,
            r.layer,
            r.setting,
            f"{r.quality.l0:.1f}",
            f"{r.quality.fvu:.3f}",
            f"{r.quality.dead_fraction:.3f}",
            "–" if r.quality.delta_loss is None else f"{r.quality.delta_loss:.3f}",
            "–" if r.train_seconds is None else f"{r.train_seconds:.0f}",
        )
        for r in records
    ]
    return ["family", "layer", "setting", "L0", "FVU", "dead", "ΔL (nats/token)", "training (s)"], rows
