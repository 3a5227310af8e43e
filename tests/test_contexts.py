"""Top-activating contexts and the automatic agreement of a feature with its partner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _planted import D_IN, D_SAE, planted
from conftest import make_sae

from saematch_core.experiments.measures.contexts import (
    alive_features,
    feature_values,
    pad_rows,
    pair_contexts,
    sample_features,
    top_contexts,
)


def test_top_contexts_windows_and_markers() -> None:
    ids = torch.tensor([[10, 72, 105, 33, 10], [10, 65, 66, 67, 68]])
    vals = torch.tensor([[9.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    dec = lambda t: bytes(t).decode()  # noqa: E731
    ctx = top_contexts(vals, ids, dec, k=5, before=2, after=1)
    # position 0 (activation 9) is excluded; only positive activations, highest first
    assert [(c.chunk, c.position) for c in ctx] == [(1, 4), (0, 2)]
    assert ctx[0].text == "BC«D»" and ctx[1].text == "\nH«i»!"
    assert ctx[0].activation == 5.0 and ctx[1].token == "i"


def test_pair_contexts_of_a_feature_and_its_copy() -> None:
    a, b, truth = planted()
    assert a.d_in == D_IN
    ids = torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(0))
    x = 2 * torch.randn(6, 20, D_IN, generator=torch.Generator().manual_seed(1))
    counts = (a.encode(x[:, 1:]) > 0).sum((0, 1))
    f = int(torch.argmax(counts))
    pc = pair_contexts(a, b, x, x, f, int(truth[f]), ids, lambda t: bytes(t).decode("latin-1"), k=5)
    assert pc.top_position_overlap == 1.0 and pc.top_token_overlap == 1.0
    assert pc.pearson == pytest.approx(1.0)
    assert [c.text for c in pc.contexts_a] == [c.text for c in pc.contexts_b]
    other = pair_contexts(
        a, b, x, x, f, int(truth[(f + 1) % D_SAE]), ids, lambda t: bytes(t).decode("latin-1")
    )
    assert other.pearson < 0.99


def test_pair_contexts_errors_name_the_parameter() -> None:
    sae = make_sae(D_IN, D_SAE)
    ids = torch.zeros(2, 5, dtype=torch.long)
    x = torch.randn(2, 5, D_IN)
    with pytest.raises(ValueError, match="feature"):
        pair_contexts(sae, sae, x, x, D_SAE, 0, ids, str)
    with pytest.raises(ValueError, match="acts_a"):
        pair_contexts(sae, sae, x[:1], x, 0, 0, ids, str)


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
    sae = make_sae(8, 16)
    x = torch.randn(50, 8)
    full = sae.encode(x)
    assert torch.allclose(feature_values(sae, x.numpy(), [3, 0, 7], chunk_size=7), full[:, [3, 0, 7]])
    keep = np.zeros(50, dtype=bool)
    keep[::3] = True
    assert np.array_equal(alive_features(sae, x.numpy(), keep, chunk_size=8), (full[keep] > 0).any(0).numpy())
    with pytest.raises(ValueError, match="features: expected indices"):
        feature_values(sae, x, [16])


def test_sample_features_is_seeded_and_alive_only() -> None:
    alive = np.zeros(100, dtype=bool)
    alive[::4] = True
    a = sample_features(alive, 10, seed=3)
    assert a == sample_features(alive, 10, seed=3) and len(set(a)) == 10
    assert all(alive[i] for i in a) and a == sorted(a)
    assert len(sample_features(alive, 500)) == 25
