"""``saematch compare | align | chain | suite`` end to end, in a subprocess, on SAEs in every format."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _planted_pairs import FORMATS, planted_pair, write_sae
from conftest import make_sae

from saematch_core.cli import build_parser
from saematch_core.cli_compare import COMPARE_FLAGS
from saematch_core.compare import CompareConfig, CompareReport
from saematch_core.formats import load_sae, save_sae
from saematch_core.match import match

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "saematch_core", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saematch: error: "), proc.stderr
    assert pattern in lines[0], lines[0]


def test_every_compare_config_field_has_a_flag() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["compare"]  # type: ignore[attr-defined]
    flags = {s for a in parser._actions for s in a.option_strings}
    assert set(COMPARE_FLAGS) == {f.name for f in dataclasses.fields(CompareConfig)}
    assert set(COMPARE_FLAGS.values()) <= flags


# B's format paired with A's: every format appears on both sides.
_PAIRS = list(zip(FORMATS, FORMATS[1:] + FORMATS[:1], strict=True))


@pytest.mark.parametrize(("fmt_a", "fmt_b"), _PAIRS)
def test_compare_end_to_end_reports_the_split(tmp_path: Path, fmt_a: str, fmt_b: str) -> None:
    # Decoder cosine: the one objective every format keeps as is (sparsify holds TopK SAEs and
    # llama_scope one threshold, so folded objectives differ between formats of the same weights).
    p = planted_pair(d_in=32)
    pa, pb = write_sae(p.a, fmt_a, tmp_path / "a"), write_sae(p.b, fmt_b, tmp_path / "b")
    out = tmp_path / "report.json"
    text = _ok(_run("compare", pa, pb, "--out", out, "--matcher", "cosine", "--others", "saematch,greedy"))
    assert "families: 1 features of A split in B" in text
    rep = CompareReport.from_json(out)
    assert (rep.a.format, rep.b.format) == (fmt_a, fmt_b)
    assert (rep.summary.n_a, rep.summary.n_b) == (48, 64)
    fam = [f for f in rep.families if f.side == "a"]
    assert [f.feature for f in fam] == [p.split[0]] and sorted(fam[0].parts) == sorted(p.split[1])
    assert rep.summary.n_matched == 48
    doc = json.loads(out.read_text())
    assert len(doc["pairs"]) == 48 and {"a", "b", "matched", "margin", "mutual"} <= set(doc["pairs"][0])


def test_compare_with_activations_and_html(tmp_path: Path) -> None:
    p = planted_pair()
    pa, pb = save_sae(p.a, tmp_path / "a.safetensors"), save_sae(p.b, tmp_path / "b.safetensors")
    acts = np.random.default_rng(0).normal(0, 2, (2000, 16)).astype(np.float16)
    np.save(tmp_path / "acts.npy", acts)
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    text = _ok(_run("compare", pa, pb, "--out", out, "--html", page, "--activations", tmp_path / "acts.npy"))
    assert "data (2000 tokens)" in text
    rep = CompareReport.from_json(out)
    assert rep.summary.n_tokens == 2000 and rep.summary.score_matched > rep.summary.score_random
    html = page.read_text()
    assert (
        html.count('class="plotly-graph-div"') >= 4 and "<script src=" not in html
    )  # Chromium: test_report_html


def test_compare_errors_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    pa = save_sae(make_sae(16, 8, seed=1), tmp_path / "a.safetensors")
    pb = save_sae(make_sae(8, 8, seed=2), tmp_path / "b.safetensors")
    out = tmp_path / "r.json"
    _one_line_error(_run("compare", pa, pb, "--out", out), "expected the same d_in")
    np.save(tmp_path / "bad.npy", np.zeros((10, 3), dtype=np.float32))
    _one_line_error(
        _run("compare", pa, pa, "--out", out, "--activations", tmp_path / "bad.npy"),
        "expected shape (n_tokens, d_in=16), got (10, 3)",
    )
    _one_line_error(
        _run("compare", pa, pa, "--out", tmp_path / "r.txt"), "--out: expected a file ending in .json"
    )
    _one_line_error(_run("compare", pa, pa, "--out", out, "--others", "nearest"), "argument --others")
    _one_line_error(
        _run("compare", pa, tmp_path / "missing", "--out", out), "missing: no such file or folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "bad.npy"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_align_end_to_end_round_trip(tmp_path: Path, fmt: str) -> None:
    p = planted_pair()
    pa, pb = write_sae(p.a, fmt, tmp_path / "a"), write_sae(p.b, fmt, tmp_path / "b")
    out = tmp_path / ("b_aligned" + (pb.suffix if pb.is_file() else ""))
    text = _ok(_run("align", pa, pb, "--out", out))
    assert "aligned B:" in text and (tmp_path / "b_aligned.ids.csv").is_file()
    aligned_path = Path(text.split("aligned B:")[1].split()[0])
    aligned = load_sae(aligned_path)
    assert aligned.meta.get("format", fmt) == fmt
    assert torch.equal(match(load_sae(pa), aligned).perm, torch.arange(48))
    ids = json.loads((tmp_path / "b_aligned.ids.json").read_text())
    assert ids["b"]["format"] == fmt and len(ids["ids"]) == 64
    if fmt == "saelens":  # a second run without --force refuses and changes nothing
        before = (tmp_path / "b_aligned.ids.csv").read_bytes()
        _one_line_error(_run("align", pa, pb, "--out", out), "exists; pass --force")
        assert (tmp_path / "b_aligned.ids.csv").read_bytes() == before


def test_chain_end_to_end_across_formats(tmp_path: Path) -> None:
    base = make_sae(16, 32, seed=3)
    g = torch.Generator().manual_seed(4)
    l1 = base.permute(torch.randperm(32, generator=g))
    l2 = make_sae(16, 32, seed=5)  # unrelated: every chain should end at layer 1
    paths = [
        write_sae(base, "native", tmp_path / "l0"),
        write_sae(l1, "gemma_scope", tmp_path / "l1"),
        write_sae(l2, "saelens", tmp_path / "l2"),
    ]
    out = tmp_path / "chain.json"
    text = _ok(_run("chain", *paths, "--out", out))
    assert "chains over 3 SAEs" in text
    doc = json.loads(out.read_text())
    assert doc["kind"] == "feature_chains" and len(doc["ids"]) == 3
    assert sorted(doc["ids"][1]) == list(range(32))  # every layer-0 chain continues into layer 1
    assert doc["steps"][0]["n_continued"] == 32 and doc["steps"][1]["n_continued"] <= 3


def test_suite_end_to_end_on_threads(tmp_path: Path) -> None:
    specs = [str(save_sae(make_sae(16, 24, seed=i), tmp_path / f"l{i}.safetensors")) for i in range(3)]
    jobs = {
        "jobs": [
            {"a": specs[0], "b": specs[1]},
            {"a": "l1.safetensors", "b": "l2.safetensors", "matcher": "greedy"},
        ]
    }
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    store = tmp_path / "store"
    text = _ok(_run("suite", tmp_path / "jobs.json", "--cache-dir", store, "--out", tmp_path / "o.json"))
    assert "2 jobs on threads: 2 solved, 0 already in the store" in text
    text = _ok(_run("suite", tmp_path / "jobs.json", "--cache-dir", store))
    assert "0 solved, 2 already in the store" in text
    assert len(json.loads((tmp_path / "o.json").read_text())["outcomes"]) == 2
