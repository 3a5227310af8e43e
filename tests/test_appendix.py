"""What the appendix shows: benchmark tables and the software environment."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from saematch_core.experiments.appendix import (
    benchmark_meta,
    benchmark_series,
    benchmark_table,
    environment_table,
)


def test_benchmark_table(tmp_path: Path) -> None:
    assert benchmark_table(tmp_path / "none.json") is None
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps({"meta": {}, "records": [{"F": 64, "ours_s": 0.123456, "scipy_s": None, "x": 1}]})
    )
    table = benchmark_table(path)
    assert table is not None
    headers, rows = table
    assert headers == ["F", "scipy_s", "ours_s"] and rows == [["64", "–", "0.1235"]]


def test_benchmark_series_groups_instances_by_precision(tmp_path: Path) -> None:
    assert benchmark_series(tmp_path / "none.json", "e2e_over_gemm") is None
    path = tmp_path / "results.json"
    recs = [
        {"F": 8, "d": 4, "noise": "easy", "candidates": "float32", "e2e_over_gemm": 1.5},
        {"F": 8, "d": 4, "noise": "easy", "candidates": "bfloat16", "e2e_over_gemm": 0.5},
        {"F": 8, "d": 4, "noise": "hard", "candidates": "float32", "e2e_over_gemm": 2.0},
        {"F": 8, "d": 4, "noise": "medium", "candidates": "float32", "chain_layers": 30},  # no ratio
    ]
    path.write_text(json.dumps({"meta": {}, "records": recs}))
    got = benchmark_series(path, "e2e_over_gemm")
    assert got is not None
    cats, series = got
    assert cats == ["F=8 d=4 easy", "F=8 d=4 hard"] and series["float32"] == [1.5, 2.0]
    assert series["bfloat16"][0] == 0.5 and math.isnan(series["bfloat16"][1])
    assert benchmark_series(path, "no_such_column") is None


def test_environment_table_lists_python_and_packages() -> None:
    rows = dict(environment_table(("saematch", "surely-not-a-package")))
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", rows["python"])
    assert rows["surely-not-a-package"] == "not installed"
    assert rows["saematch"] != "not installed"


def test_benchmark_meta_says_where_and_when(tmp_path: Path) -> None:
    assert benchmark_meta(tmp_path / "none.json") is None
    path = tmp_path / "results.json"
    meta = {"cpu": "Some CPU", "cpu_count": 2, "torch": "2.1", "numba": None, "date": "2026-01-02", "x": 1}
    path.write_text(
        json.dumps({"meta": {**meta, "command": "python -m benchmarks.run --quick"}, "records": []})
    )
    rows = benchmark_meta(path)
    assert rows == [
        ("date", "2026-01-02"),
        ("CPU", "Some CPU"),
        ("cores", "2"),
        ("torch", "2.1"),
        ("command", "python -m benchmarks.run --quick"),
    ]
    path.write_text(json.dumps({"records": [{"F": 1}]}))
    with pytest.raises(ValueError, match=r"results\.json: expected a 'meta' object"):
        benchmark_meta(path)


def test_benchmark_table_shows_the_certificates_gap_bound(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {"date": "d"}, "records": [{"F": 8, "gap_bound_rel": 0.0}]}))
    table = benchmark_table(path)
    assert table is not None and table[0] == ["F", "gap_bound_rel"] and table[1] == [["8", "0"]]
