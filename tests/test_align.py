"""Aligned copies in every format, the ID map, and chain IDs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from _planted_pairs import FORMATS, as_format, planted_pair, write_sae
from conftest import make_sae

from saematch_core.align import (
    ChainResult,
    align,
    aligned_order,
    chain,
    chain_ids,
    write_permuted,
)
from saematch_core.compare import CompareConfig
from saematch_core.errors import SAEFormatError
from saematch_core.formats import load_sae, save_sae
from saematch_core.match import match


def _same(a: object, b: object) -> bool:
    ta, tb = a.tensors(), b.tensors()  # type: ignore[attr-defined]
    return ta.keys() == tb.keys() and all(
        torch.allclose(ta[k].double(), tb[k].double(), atol=1e-6) for k in ta
    )


def test_aligned_order_puts_partners_in_a_order_then_the_rest() -> None:
    assert aligned_order(torch.tensor([3, 1]), 5).tolist() == [3, 1, 0, 2, 4]
    assert aligned_order(torch.tensor([-1, 0, 2]), 3).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="one-to-one"):
        aligned_order(torch.tensor([1, 1]), 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_permuted_keeps_the_format_and_reorders_features(tmp_path: Path, fmt: str) -> None:
    sae = make_sae(8, 12, seed=3)
    src = write_sae(sae, fmt, tmp_path / "src")
    b = load_sae(src)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(4))
    out = tmp_path / ("out" + (src.suffix if src.is_file() else ""))
    path = write_permuted(src, fmt, order, out, expected=b.permute(order))
    back = load_sae(path)
    assert back.meta.get("format", fmt) == fmt and _same(back, b.permute(order))
    with pytest.raises(FileExistsError, match="--force"):
        write_permuted(src, fmt, order, out, expected=b.permute(order))
    write_permuted(src, fmt, order.flip(0), out, expected=b.permute(order.flip(0)), force=True)
    assert _same(load_sae(path), b.permute(order.flip(0)))
    # every other file is copied as it was
    if src.is_dir():
        for f in src.rglob("*.json"):
            assert (path / f.relative_to(src)).read_bytes() == f.read_bytes()


def test_write_permuted_refuses_unknown_per_feature_tensors(tmp_path: Path) -> None:
    sae = make_sae(8, 12, seed=3)
    folder = write_sae(sae, "saelens", tmp_path / "s")
    tensors = safetensors.torch.load_file(str(folder / "sae_weights.safetensors"))
    tensors["feature_scale"] = torch.ones(12)
    safetensors.torch.save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match=r"unexpected tensors \['feature_scale'\]"):
        load_sae(folder)  # the loader refuses it too; write_permuted must not rely on that
    order = torch.arange(12).flip(0)
    with pytest.raises(SAEFormatError, match=r"feature_scale: shape \(12,\) has an axis of length d_sae=12"):
        write_permuted(folder, "saelens", order, tmp_path / "out", expected=sae.permute(order))
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["s"]


def test_write_permuted_gemma_scope_single_file(tmp_path: Path) -> None:
    sae = make_sae(8, 12, seed=5)
    folder = write_sae(sae, "gemma_scope", tmp_path / "g")
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    path = write_permuted(
        folder / "params.npz", "gemma_scope", order, tmp_path / "al.npz", expected=sae.permute(order)
    )
    assert path == tmp_path / "al.npz" and _same(load_sae(path), sae.permute(order))
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    with pytest.raises(ValueError, match=r"expected a path ending in \.npz"):
        write_permuted(folder / "params.npz", "gemma_scope", order, tmp_path / "x.safetensors", expected=sae)


@pytest.mark.parametrize("fmt", ["native", "sparsify"])
def test_align_round_trip_gives_the_identity(tmp_path: Path, fmt: str) -> None:
    p = planted_pair()
    pa = write_sae(p.a, fmt, tmp_path / "a")  # the same kind of SAE on both sides: folded alike
    pb = write_sae(p.b, fmt, tmp_path / "b")
    out = tmp_path / ("b_aligned" + (pb.suffix if pb.is_file() else ""))
    res = align(str(pa), str(pb), out)
    b_al = load_sae(res.sae_path)
    again = match(load_sae(pa), b_al)
    assert torch.equal(again.perm, torch.arange(48))
    assert _same(b_al, load_sae(pb).permute(torch.tensor(res.order)))
    rows = list(csv.DictReader(res.ids_csv.open()))
    assert len(rows) == 64 and [int(r["b_aligned"]) for r in rows] == list(range(64))
    assert sum(r["verdict"] == "matched" for r in rows) == 48
    assert sum(r["verdict"] == "unmatched" and r["a"] == "-1" for r in rows) == 16
    first = rows[0]
    assert first["a"] == "0" and int(first["b"]) == int(res.order[0]) and first["mutual"] in ("true", "false")
    doc = json.loads(res.ids_json.read_text())
    assert doc["kind"] == "feature_id_map" and len(doc["ids"]) == 64 and doc["b"]["format"] == fmt


def test_align_refuses_many_to_one_matchers_and_existing_outputs(tmp_path: Path) -> None:
    pa = save_sae(make_sae(8, 12, seed=1), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="aligning needs a one-to-one matcher"):
        align(str(pa), str(pa), tmp_path / "o.safetensors", config=CompareConfig(matcher="greedy", others=()))
    (tmp_path / "o.ids.csv").write_text("x")
    with pytest.raises(FileExistsError, match=r"--ids: .*o.ids.csv exists"):
        align(str(pa), str(pa), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_chain_ids_follow_the_rule() -> None:
    # layer 0 → 1: 0↔1 matched, 1↔0 not matched (breaks), 2 has no partner; layer 1 has 3 features
    ids = chain_ids(
        [torch.tensor([1, 0, -1]), torch.tensor([2, 0, 1])],
        [torch.tensor([True, False, False]), torch.tensor([True, True, False])],
        [3, 3, 3],
    )
    assert [t.tolist() for t in ids] == [[0, 1, 2], [3, 0, 4], [0, 5, 3]]


def test_chain_along_planted_layers(tmp_path: Path) -> None:
    base = make_sae(16, 40, seed=9)
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(40, generator=g) for _ in range(2)]
    l1 = base.permute(perms[0])
    unrelated = make_sae(16, 40, seed=10)
    res = chain([base, l1, unrelated])
    assert res.n_chains == 40 + 40 - res.steps[1].n_continued
    assert res.steps[0].n_continued == 40 and res.steps[0].n_broken == 0
    assert res.steps[1].n_continued <= 4  # an unrelated SAE ends (almost) every chain
    # chain IDs follow the planted permutation
    assert all(res.ids[1][j] == res.ids[0][int(perms[0][j])] for j in range(40))
    path = tmp_path / "chain.json"
    res.to_json(path)
    assert ChainResult.from_json(path) == res
    assert res.chain(res.ids[0][3])[:2] == [(0, 3), (1, int(torch.argsort(perms[0])[3]))]


def test_as_format_is_what_the_files_hold(tmp_path: Path) -> None:
    sae = make_sae(8, 12, seed=2)
    for fmt in FORMATS:
        assert _same(load_sae(write_sae(sae, fmt, tmp_path / fmt)), as_format(sae, fmt))
