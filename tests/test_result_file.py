"""The one JSON layout of result files."""

from __future__ import annotations

import json
import math

import pytest

from saematch_core.result_file import (
    RESULT_SCHEMA_VERSION,
    dumps_result,
    json_safe,
    read_result_file,
    result_document,
    write_result_file,
)


def test_document_header_and_round_trip(tmp_path) -> None:
    data = {"pairs": [{"a": 0, "b": 2, "cost": 0.5}, {"a": 1, "b": 0, "cost": math.inf}], "x": math.nan}
    doc = result_document(kind="demo", config={"k": (1, 2)}, data=data, run_id="r1", created_ms=7)
    assert list(doc) == [
        "kind", "schema_version", "saematch_version", "git_commit", "git_commit_reason", "run_id",
        "created_ms", "config", "data",
    ]  # fmt: skip
    assert doc["schema_version"] == RESULT_SCHEMA_VERSION and doc["git_commit_reason"]
    assert doc["config"] == {"k": [1, 2]} and doc["data"]["x"] == "nan"
    path = write_result_file(tmp_path / "r.json", doc)
    text = path.read_text()
    assert '   {"a": 0, "b": 2, "cost": 0.5},\n   {"a": 1, "b": 0, "cost": "inf"}\n' in text  # one per line
    assert json.loads(text) == doc == read_result_file(path, "demo")
    assert result_document(kind="demo", config={}, data={}, git_commit="abc")["git_commit_reason"] is None


def test_dumps_matches_json_for_nested_objects() -> None:
    doc = {"a": {"b": [1, 2, {"c": [3]}], "d": {}}, "e": [], "f": "x"}
    assert json.loads(dumps_result(doc)) == doc
    assert dumps_result({"s": [1, 2]}) == '{\n "s": [1, 2]\n}\n'


def test_json_safe_spells_non_finite_floats() -> None:
    assert json_safe((1.0, {"y": -math.inf})) == [1.0, {"y": "-inf"}]


def test_reading_names_the_file_and_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such result file"):
        read_result_file(tmp_path / "none.json", "demo")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_result_file(bad, "demo")
    bad.write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_result_file(bad, "demo")
    bad.write_text(json.dumps({"kind": "other", "schema_version": 2}))
    with pytest.raises(ValueError, match="expected a result of kind 'demo', got 'other'"):
        read_result_file(bad, "demo")
    bad.write_text(json.dumps({"kind": "demo", "schema_version": 9}))
    with pytest.raises(ValueError, match="schema_version"):
        read_result_file(bad, "demo")
    bad.write_text(json.dumps({"kind": "demo", "schema_version": 1}))
    assert read_result_file(bad, "demo")["schema_version"] == 1  # the first layout still reads
