"""The notebooks' glue: token batches, contexts, feature paths, summaries and the reproduction table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sae
from torch import nn

from saematch_core.activations import ActivationCache
from saematch_core.compose import path as compose_path
from saematch_core.evaluate import PairRecord
from saematch_core.formats import save_sae
from saematch_core.match import MatchConfig
from saematch_core.models import ByteTokenizer, LoadedModel
from saematch_core.persistence import PersistenceResult, PersistenceRow
from saematch_core.prepare import PrepareResult, SAERecord
from saematch_core.profiles import get_profile
from saematch_core.study import (
    CLAIMS_FILE,
    PAPER,
    Claim,
    Study,
    agreement_groups,
    alive_features,
    benchmark_series,
    benchmark_table,
    claims_table_html,
    correlation,
    curves_by_start,
    early_late_split,
    feature_contexts,
    feature_path,
    feature_values,
    first_below,
    load_study,
    pad_rows,
    pair_step_costs,
    paper_layer,
    pick_by_mse,
    read_claims,
    sample_features,
    write_claims,
)
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
    got = feature_contexts(study, layer, feats, k=3, before=2, after=1)
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


# ------------------------------------------------------------------------------------------ arrays
def test_pad_rows_matches_a_loop() -> None:
    cid = np.array([0, 0, 0, 1, 1, 2])
    pos = np.array([0, 1, 2, 0, 1, 0])
    vals = np.arange(12, dtype=np.float32).reshape(6, 2)
    got = pad_rows(vals, cid, pos)
    ref = torch.zeros(3, 3, 2)
    for i in range(6):
        ref[cid[i], pos[i]] = torch.from_numpy(vals[i])
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="same number of rows"):
        pad_rows(vals[:5], cid, pos)


def test_feature_values_and_alive_match_full_encode() -> None:
    sae = make_sae(D_IN, D_SAE)
    x = torch.randn(50, D_IN)
    full = sae.encode(x)
    assert torch.allclose(feature_values(sae, x.numpy(), [3, 0, 7], chunk_size=7), full[:, [3, 0, 7]])
    keep = np.zeros(50, dtype=bool)
    keep[::3] = True
    assert np.array_equal(alive_features(sae, x.numpy(), keep, chunk_size=8), (full[keep] > 0).any(0).numpy())
    with pytest.raises(ValueError, match="features: expected indices"):
        feature_values(sae, x, [D_SAE])


def test_sample_features_is_seeded_and_alive_only() -> None:
    alive = np.zeros(100, dtype=bool)
    alive[::4] = True
    a = sample_features(alive, 10, seed=3)
    assert a == sample_features(alive, 10, seed=3) and len(set(a)) == 10
    assert all(alive[i] for i in a) and a == sorted(a)
    assert len(sample_features(alive, 500)) == 25


# ------------------------------------------------------------------------------------------ paths
def test_feature_path_forward_is_compose_path_and_backward_inverts() -> None:
    g = torch.Generator().manual_seed(0)
    layers = [0, 1, 2, 3]
    perms = {(t, t + 1): torch.randperm(6, generator=g) for t in range(3)}
    costs = {k: torch.rand(6, generator=g) for k in perms}
    feats, step = feature_path(perms, costs, layers, 1, 4)
    assert feats[1:] == compose_path([perms[(t, t + 1)] for t in range(3)], 1, 4)
    assert int(perms[(0, 1)][feats[0]]) == feats[1]  # the backward step lands on the start feature
    assert math.isnan(step[1])
    assert step[0] == pytest.approx(float(costs[(0, 1)][feats[0]]))
    assert step[2] == pytest.approx(float(costs[(1, 2)][feats[1]]))
    assert pair_step_costs(step, layers, 1) == [step[0], step[2], step[3]]
    with pytest.raises(ValueError, match="start_layer"):
        feature_path(perms, costs, layers, 7, 0)


def test_feature_path_stops_at_a_missing_partner() -> None:
    perms = {(0, 1): torch.tensor([1, -1]), (1, 2): torch.tensor([0, 1])}
    costs = {k: torch.tensor([0.5, 0.25]) for k in perms}
    feats, step = feature_path(perms, costs, [0, 1, 2], 0, 1)
    assert feats == [1, -1, -1] and all(math.isnan(s) for s in step)


# ------------------------------------------------------------------------------------------ summaries
def test_small_summaries() -> None:
    assert first_below([1, 2, 3], [0.9, 0.8, 0.7], 0.5) == math.inf
    assert first_below([1, 2], [0.4, 0.9], 0.5) == 1.0
    assert correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3]))
    x, y = np.random.default_rng(0).normal(size=(2, 20))
    assert correlation(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    early, late = early_late_split(list(range(26)), [0.0] * 10 + [1.0] * 16, 26)
    assert (early, late) == (0.0, 1.0)
    assert paper_layer(25, 30) == 29 and paper_layer(0, 30) == 0
    with pytest.raises(ValueError, match="Gemma 2 2B layer"):
        paper_layer(26, 30)


def _pair(i: int, mse: float, p: float, included: bool = True) -> PairRecord:
    return PairRecord(
        feature=i, partner=i, mse=mse, p_partner=p, jaccard=p, pearson=p, top_token_overlap=p,
        top_position_overlap=p, included=included,
    )  # fmt: skip


def test_agreement_groups_and_pick_by_mse() -> None:
    pairs = [_pair(0, 0.1, 0.9), _pair(1, 0.2, 0.3), _pair(2, 5.0, 0.01), _pair(3, 1.0, math.nan, False)]
    groups = agreement_groups(pairs, cuts=(0.1, 0.5))
    assert [len(v) for v in groups.values()] == [1, 1, 1, 1]
    values = list(groups.values())
    assert values[0].tolist() == [0.1] and values[3].tolist() == [1.0]
    picked = pick_by_mse(pairs)
    assert (picked["low"].feature, picked["median"].feature, picked["high"].feature) == (0, 1, 2)
    assert pick_by_mse([_pair(0, 1.0, 0.5, False)]) == {}


def test_curves_by_start_pads_short_curves() -> None:
    def row(s: int, d: int, a: float) -> PersistenceRow:
        return PersistenceRow(
            start=s, target=s + d, distance=d, agreement=a, n_compared=1, n_lost=0,
            score_composed=a, score_direct=a, score_random=0.0,
        )  # fmt: skip

    result = PersistenceResult(rows=(row(1, 1, 1.0), row(1, 2, 0.5), row(2, 1, 1.0)))
    distances, curves = curves_by_start(result)
    assert distances == [1, 2] and curves[1] == [1.0, 0.5]
    assert curves[2][0] == 1.0 and math.isnan(curves[2][1])


# ------------------------------------------------------------------------------------------ claims
def test_claims_round_trip_in_paper_order(tmp_path: Path) -> None:
    write_claims(tmp_path / "05_x", "05_x", [Claim(key="fig16_quantile", ours="+0.1", holds=True)])
    write_claims(tmp_path / "01_y", "01_y", [Claim(key="fig1_theta_norm", ours="r = <0.9>", holds=None)])
    (tmp_path / "other").mkdir()
    claims = read_claims(tmp_path)
    assert [c.key for c in claims] == ["fig1_theta_norm", "fig16_quantile"]
    assert (
        claims[0].section == "01_y"
        and claims[0].holds is None
        and claims[0].paper == PAPER["fig1_theta_norm"]
    )
    table = claims_table_html(claims, link_prefix="../notebooks/")
    assert "r = &lt;0.9&gt;" in table and 'href="../notebooks/05_x.html"' in table
    assert "not measurable here" in table and "reproduced" in table
    assert json.loads((tmp_path / "05_x" / CLAIMS_FILE).read_text())["section"] == "05_x"
    with pytest.raises(ValueError, match=r"Claim\.key"):
        Claim(key="fig99", ours="", holds=None)
    with pytest.raises(FileNotFoundError):
        read_claims(tmp_path / "missing")


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


def test_load_study_rejects_a_non_profile() -> None:
    with pytest.raises(TypeError, match="profile: expected a Profile or a profile name"):
        load_study(3)  # type: ignore[arg-type]  # the wrong type is the point
    with pytest.raises(ValueError, match="expected one of"):
        load_study("smok")


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
    again = load_study("smoke", cache_dir=tmp_path)
    assert again.prepared.cached
