"""The one layout of saematch's JSON result files: matchings and experiment results alike.

Every result file is one JSON object::

    {
     "kind": "match_result",         what the file holds (a matching, "approximation", ...)
     "schema_version": 2,
     "saematch_version": "0.1.0",
     "git_commit": null,
     "git_commit_reason": "...",      why ``git_commit`` is null
     "run_id": "3f2c...",             uuid4 hex of the run that wrote it
     "created_ms": 1765000000000,     milliseconds since the epoch
     "config": {...},                 what produced it (a MatchConfig, an experiment's inputs)
     "data": {...}                    the result itself
    }

A matching's ``data`` holds ``pairs``, one ``{"a": i, "b": j, "cost": c}`` record per matched
feature (see :meth:`saematch_core.match.MatchResult.to_dict`). Floats JSON cannot hold are written
as the strings ``"nan"``, ``"inf"`` and ``"-inf"``. A list of flat records (like ``pairs``) is
written one record per line, so a file of 65536 pairs stays readable and diffable.

Version 1 files (before one layout existed) are still read: experiment results already had
``data``; matchings had ``metrics`` and ``details`` at the top level
(:meth:`~saematch_core.match.MatchResult.from_dict` reads both).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from saematch_core.cache import atomic_write_text

__all__ = [
    "RESULT_SCHEMA_VERSION",
    "dumps_result",
    "json_safe",
    "read_result_file",
    "result_document",
    "saematch_version",
    "write_result_file",
]

RESULT_SCHEMA_VERSION = 2
"""Version of the layout written now (version 1 is still read)."""

_READABLE_VERSIONS = (1, RESULT_SCHEMA_VERSION)


def saematch_version() -> str | None:
    """The installed saematch version (the package's ``__version__`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("saematch")
    except PackageNotFoundError:
        from saematch_core import __version__

        return __version__


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"nan"``, ``"inf"`` or ``"-inf"``
    (recursively through dicts, lists and tuples; tuples become lists).

    >>> json_safe({"x": float("nan"), "y": [1.0, float("-inf")]})
    {'x': 'nan', 'y': [1.0, '-inf']}
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _scalar(value: Any) -> bool:
    return not isinstance(value, (Mapping, list, tuple))


def _dump(value: Any, level: int) -> str:
    # json.dumps(indent=1) except that scalar lists stay on one line and a list of flat records
    # puts one record per line.
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        pad = " " * (level + 1)
        items = [f"{pad}{json.dumps(str(k))}: {_dump(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        if all(_scalar(v) for v in value):
            return json.dumps(list(value), allow_nan=False)
        pad = " " * (level + 1)
        flat = all(isinstance(v, Mapping) and all(_scalar(x) for x in v.values()) for v in value)
        items = [pad + (json.dumps(v, allow_nan=False) if flat else _dump(v, level + 1)) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * level + "]"
    return json.dumps(value, allow_nan=False)


def dumps_result(doc: Mapping[str, Any]) -> str:
    """The text of a result file for ``doc`` (already :func:`json_safe`), ending in a newline.

    >>> print(dumps_result({"kind": "k", "data": {"pairs": [{"a": 0, "b": 1}], "shape": [2, 2]}}))
    {
     "kind": "k",
     "data": {
      "pairs": [
       {"a": 0, "b": 1}
      ],
      "shape": [2, 2]
     }
    }
    <BLANKLINE>
    """
    return _dump(doc, 0) + "\n"


def result_document(
    *,
    kind: str,
    config: Mapping[str, Any],
    data: Mapping[str, Any],
    run_id: str | None = None,
    created_ms: int | None = None,
    git_commit: str | None = None,
    git_commit_reason: str = "not provided by the caller",
) -> dict[str, Any]:
    """The result file's object (see the module docstring), JSON-safe.

    ``run_id`` and ``created_ms`` default to a fresh uuid4 and the current time.
    """
    return json_safe(
        {
            "kind": kind,
            "schema_version": RESULT_SCHEMA_VERSION,
            "saematch_version": saematch_version(),
            "git_commit": git_commit,
            "git_commit_reason": None if git_commit else git_commit_reason,
            "run_id": uuid.uuid4().hex if run_id is None else run_id,
            "created_ms": int(time.time() * 1000) if created_ms is None else int(created_ms),
            "config": dict(config),
            "data": dict(data),
        }
    )


def write_result_file(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` (from :func:`result_document`) to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, dumps_result(doc))
    return path


def read_result_file(
    path: str | os.PathLike[str], kind: str, *, versions: Collection[int] = _READABLE_VERSIONS
) -> dict[str, Any]:
    """The object of the result file at ``path``, after checking its ``kind`` and ``schema_version``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not JSON, not an object, another ``kind`` or an unknown ``schema_version``; the message
        names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such result file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("kind") != kind:
        raise ValueError(f"{path}: expected a result of kind {kind!r}, got {doc.get('kind')!r}")
    if doc.get("schema_version") not in versions:
        raise ValueError(
            f"{path}: expected schema_version in {sorted(versions)}, got {doc.get('schema_version')!r}"
        )
    return doc
