"""Stored matchings are checked on read: hand edits that keep the file well-formed are caught."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_sae

from saematch_core.cache import read_record, record_path
from saematch_core.errors import DamagedFileError
from saematch_core.match import MatchConfig, MatchResult, match
from saematch_core.sae import SAE
from saematch_core.verify import check_match_result, read_cached_match, write_cached_match

D_IN = 8


def _pair(f_a: int = 12, f_b: int = 12) -> tuple[SAE, SAE]:
    return make_sae(D_IN, f_a, seed=0), make_sae(D_IN, f_b, seed=1)


def _swap(data: dict[str, Any]) -> None:
    rows = data["data"]["pairs"]
    rows[0]["b"], rows[1]["b"] = rows[1]["b"], rows[0]["b"]


def _share(data: dict[str, Any]) -> None:
    data["data"]["pairs"][1]["b"] = data["data"]["pairs"][0]["b"]


def _delete(data: dict[str, Any]) -> None:
    data["data"]["pairs"] = data["data"]["pairs"][:-3]


def _flag(data: dict[str, Any]) -> None:
    data["data"]["is_permutation"] = False


def _total(data: dict[str, Any]) -> None:
    data["data"]["total_cost"] *= 0.5


def _row_twice(data: dict[str, Any]) -> None:
    data["data"]["pairs"].append(dict(data["data"]["pairs"][0]))


def _nan_cost(data: dict[str, Any]) -> None:
    data["data"]["pairs"][2]["cost"] = None


EDITS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("share", _share, r"is_permutation is true, but feature \d+ of B is the partner of A features \[0, 1\]"),
    (
        "delete",
        _delete,
        r"solver 'scipy' matches every feature of the smaller side \(min\(F_A, F_B\) = 12\), got 9",
    ),
    ("flag", _flag, "is_permutation is false, but no feature of B is used twice"),
    ("total", _total, "total_cost is .*, the per-pair costs sum to"),
    ("row_twice", _row_twice, "pairs: A feature 0 appears in 2 rows"),
]


@pytest.mark.parametrize(
    ("f_a", "f_b", "solver"),
    [
        (12, 12, "scipy"),
        (12, 12, "sparse"),
        (12, 12, "greedy"),
        (12, 12, "identity"),
        (7, 12, "scipy"),
        (12, 7, "scipy"),
    ],
)
def test_genuine_results_pass(tmp_path: Path, f_a: int, f_b: int, solver: str) -> None:
    a, b = _pair(f_a, f_b)
    result = match(a, b, solver=solver)
    assert check_match_result(result, a, b) is result
    for metric in ("mse", "cosine"):
        result = match(a, b, solver=solver, metric=metric, params=("W_dec",), fold=False)
        check_match_result(result, a, b)
    path = result.to_json(tmp_path / "r.json")
    assert torch.equal(MatchResult.from_json(path).perm, result.perm)
    assert torch.equal(MatchResult.load(result.save(tmp_path / "r.safetensors")).perm, result.perm)


@pytest.mark.parametrize(("name", "edit", "message"), EDITS, ids=[e[0] for e in EDITS])
def test_hand_edited_json_is_refused(tmp_path: Path, name: str, edit: Any, message: str) -> None:
    a, b = _pair()
    path = match(a, b, solver="scipy").to_json(tmp_path / "m.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DamagedFileError, match=rf"m\.json: not a consistent matching: {message}"):
        MatchResult.from_json(path)


def test_swapped_partners_need_the_saes() -> None:
    """A swap keeps a valid permutation and the total: only the SAEs can tell the costs are wrong."""
    a, b = _pair()
    result = match(a, b, solver="scipy")
    perm = result.perm.clone()
    perm[[0, 1]] = perm[[1, 0]]
    swapped = replace(result, perm=perm)
    check_match_result(swapped)
    with pytest.raises(
        DamagedFileError, match=r"2 pairs have another cost than their SAEs give, first A feature 0"
    ):
        check_match_result(swapped, a, b)
    with pytest.raises(DamagedFileError, match=r"shape \(12, 12\) is not that of the SAEs given"):
        check_match_result(result, a, make_sae(D_IN, 13))


def test_edited_safetensors_result_is_refused(tmp_path: Path) -> None:
    import safetensors.torch
    from safetensors import safe_open

    a, b = _pair()
    path = match(a, b, solver="scipy").save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    original = safetensors.torch.load_file(str(path))
    shared = {
        **original,
        "perm": original["perm"].clone().index_fill(0, torch.tensor([3]), int(original["perm"][4])),
    }
    safetensors.torch.save_file(shared, str(path), metadata=meta)
    with pytest.raises(DamagedFileError, match=r"m\.safetensors: not a consistent matching: is_permutation"):
        MatchResult.load(path)
    lost = {**original, "cost": original["cost"].clone().index_fill(0, torch.tensor([5]), float("nan"))}
    safetensors.torch.save_file(lost, str(path), metadata=meta)
    with pytest.raises(DamagedFileError, match=r"A feature 5 is matched to \d+ with cost nan"):
        MatchResult.load(path)


@pytest.mark.parametrize("name", ["swap", "share", "delete"])
@pytest.mark.parametrize("record", [True, False], ids=["sealed", "unsealed"])
def test_cache_reader_rejects_hand_edits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, record: bool
) -> None:
    """Sealed files fail their record; unsealed ones (older caches) their structure or their costs."""
    a, b = _pair()
    path = tmp_path / "match.json"
    result = match(a, b, MatchConfig(solver="scipy"))
    write_cached_match(result, path)
    assert read_record(path) is not None
    found = read_cached_match(path, a, b)
    assert found is not None and torch.equal(found.perm, result.perm)
    data = json.loads(path.read_text())
    {"swap": _swap, "share": _share, "delete": _delete}[name](data)
    path.write_text(json.dumps(data))
    if not record:
        record_path(path).unlink()
    with caplog.at_level(logging.WARNING):
        assert read_cached_match(path, a, b) is None
    if not record:
        assert read_record(path) is None  # a rejected file is not adopted: it stays suspect
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert read_cached_match(tmp_path / "absent.json", a, b) is None


def test_unsealed_genuine_cache_file_is_adopted(tmp_path: Path) -> None:
    a, b = _pair()
    path = match(a, b, solver="scipy").to_json(tmp_path / "old.json")
    assert read_record(path) is None
    found = read_cached_match(path, a, b)
    assert found is not None and read_record(path) is not None
