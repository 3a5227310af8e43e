"""The study: a profile loaded for the notebooks, its inputs, views, contexts and feature paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sae
from torch import nn

from saematch_core.activations import ActivationCache
from saematch_core.compose import path as compose_path
from saematch_core.experiments.appendix import quality_table
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.study import NEVER_ACTIVE, Study, load_study, path_contexts, path_table
from saematch_core.formats import save_sae
from saematch_core.match import MatchConfig
from saematch_core.models import ByteTokenizer, LoadedModel
from saematch_core.prepare import PrepareResult, SAERecord
from saematch_core.profiles import get_profile
from saematch_core.train import SAEQuality

D_IN, D_SAE, N_LAYERS = 8, 16, 3
TEXT = "the cat sat on the mat. def f(x): return x. topics about the mat."


def _fake_study(tmp_path: Path, *, chunk_len: int = 10) -> Study:
    """A Study over a hand-built activation cache: three corpora of byte-token chunks, random SAEs."""
    ids = list(TEXT.encode())
    corpora = ("austen", "code", "reference")
    pieces = [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)]
    chunks, tokens, positions, chunk_ids = [], [], [], []
    for c, piece in enumerate(pieces):
        chunks.append({"corpus": corpora[c % 3], "doc_id": str(c), "start": 0, "length": len(piece)})
        tokens += piece
        positions += list(range(len(piece)))
        chunk_ids += [c] * len(piece)
    # Storage is by corpus: reorder chunks so each corpus's rows are contiguous.
    order = sorted(range(len(chunks)), key=lambda c: corpora.index(chunks[c]["corpus"]))
    starts = np.concatenate([[0], np.cumsum([ch["length"] for ch in chunks])])
    tokens = np.concatenate([np.asarray(tokens)[starts[c] : starts[c + 1]] for c in order]).astype(np.int32)
    new_chunks = [chunks[c] for c in order]
    positions = np.concatenate([np.arange(new_chunks[i]["length"]) for i in range(len(order))]).astype(
        np.int32
    )
    chunk_ids = np.concatenate([[i] * new_chunks[i]["length"] for i in range(len(order))]).astype(np.int32)
    n = tokens.size
    folder = tmp_path / "acts"
    folder.mkdir()
    g = np.random.default_rng(0)
    norms = np.zeros((N_LAYERS, n), dtype=np.float32)
    for layer in range(N_LAYERS):
        x = g.normal(size=(n, D_IN)).astype(np.float16)
        np.save(folder / f"layer_{layer:02d}.npy", x)
        norms[layer] = np.linalg.norm(x.astype(np.float32), axis=1)
    norms[1, 5] = 1e3  # an outlier at layer 1
    np.save(folder / "tokens.npy", tokens)
    np.save(folder / "positions.npy", positions)
    np.save(folder / "chunk_ids.npy", chunk_ids)
    np.save(folder / "norms.npy", norms)
    (folder / "chunks.json").write_text(json.dumps(new_chunks))
    ranges, row = {}, 0
    for name in corpora:
        length = sum(ch["length"] for ch in new_chunks if ch["corpus"] == name)
        ranges[name] = [row, row + length]
        row += length
    manifest = {
        "n_tokens": int(n),
        "n_layers": N_LAYERS,
        "d_model": D_IN,
        "outlier_factor": 10.0,
        "median_norms": [float(np.median(norms[i])) for i in range(N_LAYERS)],
        "corpus_ranges": ranges,
    }
    evals = ActivationCache(folder=folder, manifest=manifest)
    saes = {layer: make_sae(D_IN, D_SAE, seed=layer) for layer in range(N_LAYERS)}
    records = []
    quality = SAEQuality(n_tokens=n, l0=1.0, fvu=0.1, dead_fraction=0.0)
    for family, layer, setting, seed in [("main", t, "x", t) for t in range(N_LAYERS)] + [
        ("sweep", 1, "a", 10),
        ("sweep", 2, "a", 11),
        ("sweep", 2, "b", 12),
    ]:
        p = tmp_path / "saes" / f"{family}_{layer}_{setting}.safetensors"
        p.parent.mkdir(exist_ok=True)
        save_sae(saes[layer] if family == "main" else make_sae(D_IN, D_SAE, seed=seed), p)
        records.append(SAERecord(family=family, layer=layer, path=p, setting=setting, quality=quality))
    prepared = PrepareResult(
        profile="smoke", folder=tmp_path, records=tuple(records), seconds=0.0, cached=True,
        activation_folders={"eval": folder},
    )  # fmt: skip
    loaded = LoadedModel(model=nn.Identity(), tokenizer=ByteTokenizer(), config=get_profile("smoke").model)
    return Study(
        profile=get_profile("smoke"),
        prepared=prepared,
        loaded=loaded,
        saes=saes,
        evals=evals,
        results_dir=tmp_path / "results",
    )


# ------------------------------------------------------------------------------------------ the Study
def test_study_views_and_keep_mask(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    assert study.layers == (0, 1, 2) and study.pairs == ((0, 1), (1, 2))
    assert study.corpora == ("austen", "code", "reference")
    keep = study.keep(1)
    pos = np.asarray(study.evals.positions)
    assert not keep[pos == 0].any() and not keep[5]
    assert keep.sum() == (pos > 0).sum() - (pos[5] > 0)
    assert study.keep().sum() <= study.keep(0).sum()
    assert "profile 'smoke'" in study.describe()
    assert set(study.sweep()) == {1, 2} and set(study.sweep()[2]) == {"a", "b"}
    layer, variants = study.sweep_variants() or (None, {})
    assert layer == 2 and list(variants) == ["a"]


def test_corpus_batch_matches_the_cache_rows(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    ids, mask = study.corpus_batch("code")
    lo, hi = study.evals.corpus_ranges["code"]
    assert torch.equal(ids[mask], torch.from_numpy(np.asarray(study.evals.tokens[lo:hi], dtype=np.int64)))
    small, small_mask = study.corpus_batch("code", max_tokens=12)
    assert int(small_mask.sum()) <= 12 and small.shape[0] >= 1
    with pytest.raises(ValueError, match="corpus: expected one of"):
        study.corpus_batch("poetry")


def test_consecutive_matches_are_memoised_per_config(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    first = study.consecutive_matches()
    again = study.consecutive_matches()
    assert set(first) == {(0, 1), (1, 2)} and first[(0, 1)] is again[(0, 1)]
    other = study.consecutive_matches(MatchConfig(solver="identity"))
    assert other[(0, 1)] is not first[(0, 1)]
    assert torch.equal(other[(0, 1)].perm, torch.arange(D_SAE))
    assert len(list((study.results_dir / "match").glob("*.json"))) == 4


def test_feature_contexts_agree_with_a_direct_search(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    layer, feats = 1, [0, 3]
    got = study.contexts(layer, feats, k=3, before=2, after=1)
    values = study.saes[layer].encode(torch.from_numpy(np.asarray(study.acts(layer), dtype=np.float32)))
    keep = study.keep(layer)
    tokens = np.asarray(study.evals.tokens)
    for f in feats:
        v = values[:, f].numpy().copy()
        v[~keep | (v <= 0)] = -np.inf
        best = [i for i in np.argsort(-v, kind="stable")[:3] if np.isfinite(v[i])]
        assert [c.token for c in got[f]] == [bytes([int(tokens[i])]).decode() for i in best]
        for c, i in zip(got[f], best, strict=True):
            assert c.activation == pytest.approx(float(v[i]), rel=1e-5)
            assert c.position == int(study.evals.positions[i]) and "«" in c.text


def test_inputs_cover_the_study(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    inputs = study.inputs(pairs=[(0, 1)])
    assert isinstance(inputs, Inputs) and inputs.saes is study.saes and inputs.pairs == ((0, 1),)
    assert set(inputs.activations or {}) == {0, 1, 2} and inputs.cache_dir == study.results_dir
    assert np.array_equal(np.asarray(inputs.keep), study.keep()) and not inputs.progress
    assert inputs.layer_pairs() == [(0, 1)] and study.inputs().layer_pairs() == [(0, 1), (1, 2)]
    assert study.inputs(keep=study.keep(1)).keep is not None
    assert study.inputs(activations=None).activations is None
    headers, rows = quality_table(study.prepared.records)
    assert len(rows) == len(study.prepared.records) and len(headers) == len(rows[0])
    assert rows[0][:3] == ("main", 0, "x") and rows[0][6] == "–"  # ΔL not measured here


def test_paths_follow_the_consecutive_matchings_with_their_costs(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    matches = study.consecutive_matches()
    paths = study.paths(1, [2, 5])
    p = paths[2]
    perms = [matches[(0, 1)].perm, matches[(1, 2)].perm]
    assert p.layers == (0, 1, 2) and p.features[1] == 2
    assert p.forward() == compose_path(perms, 1, 2).forward()
    assert int(perms[0][p.features[0]]) == 2  # the backward step lands on the start feature
    assert p.step_costs[2] == pytest.approx(float(matches[(1, 2)].cost[2]))
    contexts = path_contexts(study, paths.values(), k=2)
    headers, rows = path_table(p, contexts)
    assert headers[:3] == ["layer", "feature", "step MSE"] and [r[0] for r in rows] == [0, 1, 2]
    assert rows[1][2] == "start" and rows[2][2] == f"{p.step_costs[2]:.4g}"
    for t, f, _, text in rows:
        ctx = contexts.get(t, {}).get(f, ())
        assert text == (" ‖ ".join(c.text for c in ctx) if ctx else NEVER_ACTIVE)


def test_load_study_rejects_a_non_profile() -> None:
    with pytest.raises(TypeError, match="profile: expected a Profile or a profile name"):
        load_study(3)  # type: ignore[arg-type]  # the wrong type is the point
    with pytest.raises(ValueError, match="expected one of"):
        load_study("smok")


def test_eval_batch_takes_chunks_round_robin_over_corpora(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    ids, mask = study.eval_batch(30)
    corpora = [c["corpus"] for c in study.evals.chunks]
    first = {name: corpora.index(name) for name in ("austen", "code", "reference")}
    starts = np.concatenate([[0], np.cumsum([c["length"] for c in study.evals.chunks])])
    tokens = np.asarray(study.evals.tokens)
    # one chunk of each corpus, in corpus order, until the budget
    for row, name in enumerate(("austen", "code", "reference")):
        i = first[name]
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == tokens[starts[i] : starts[i] + n].tolist()
    assert ids.shape[0] == 3 and int(mask.sum()) <= 30
    with pytest.raises(FileNotFoundError, match="no training activation cache"):
        study.train_activations()


@pytest.mark.slow
def test_load_study_on_the_smoke_profile(tmp_path: Path) -> None:
    """The whole chain on the real smoke substrate (prepare takes about a minute cold)."""
    study = load_study("smoke", cache_dir=tmp_path)
    assert study.layers == tuple(range(study.profile.model.n_layers))
    assert study.results_dir == tmp_path / "results"
    ids, mask = study.corpus_batch(study.corpora[0], max_tokens=128)
    assert ids.shape == mask.shape and 0 < int(mask.sum()) <= 128
    fit_ids, fit_mask = study.fit_batch(256)
    assert fit_ids.shape == fit_mask.shape
    assert 0 < int(fit_mask.sum()) <= 256
    assert study.alive(1).any()
    train_rows = study.train_activations()
    assert sorted(train_rows) == list(study.layers)
    x = train_rows[1]
    assert x.dtype == np.float32 and x.shape[1] == study.profile.model.d_model
    assert train_rows[1] is x  # the layer read last is kept
    again = load_study("smoke", cache_dir=tmp_path)
    assert again.prepared.cached
