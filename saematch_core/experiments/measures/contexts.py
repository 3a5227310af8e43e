"""Offline semantic check: top-activating contexts of a feature and of its matched partner.

The paper asks an LLM judge whether a feature and its partner mean the same thing, from their
Neuronpedia explanations. Offline we show the evidence itself, the tokens where each feature fires
most with a window of context (the activating token between markers), and score the pair
automatically: overlap of the top-activating tokens and positions, and the correlation of the two
features' activations. Aggregate versions over all pairs live in
:mod:`saematch_core.experiments.measures.coactivation` (:func:`~.coactivation.pair_metrics`).

Activation caches are flat: rows are tokens of consecutive chunks (``chunk_ids``, ``positions``).
:func:`pad_rows` turns per-row values back into padded ``(n_chunks, seq)`` arrays for
:func:`top_contexts`; :func:`feature_values`, :func:`alive_features` and :func:`sample_features`
read features off the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saematch_core.sae import SAE

__all__ = [
    "Context",
    "PairContexts",
    "alive_features",
    "feature_values",
    "pad_rows",
    "pair_contexts",
    "sample_features",
    "top_contexts",
]


@dataclass(frozen=True, kw_only=True)
class Context:
    """One top-activating token with its surrounding window."""

    chunk: int
    position: int
    activation: float
    token: str
    """The activating token, decoded."""
    text: str
    """The window, the activating token between the markers."""


def top_contexts(
    values: Tensor,
    token_ids: Tensor,
    decode: Callable[[Sequence[int]], str],
    *,
    k: int = 10,
    before: int = 8,
    after: int = 2,
    keep: Tensor | None = None,
    markers: tuple[str, str] = ("«", "»"),
) -> tuple[Context, ...]:
    """The ``k`` tokens where a feature is most active, with their context windows.

    Parameters
    ----------
    values : Tensor, shape (n_chunks, seq): the feature's activation on every token.
    token_ids : LongTensor, shape (n_chunks, seq).
    decode : token ids → text (e.g. the tokenizer's ``decode``).
    k : at most this many contexts, only tokens with activation > 0, highest first.
    before, after : tokens of context on each side (clipped to the chunk).
    keep : BoolTensor (n_chunks, seq), optional; default excludes position 0.

    Examples
    --------
    >>> vals = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    >>> ids = torch.tensor([[104, 105, 33, 63]])
    >>> top_contexts(vals, ids, lambda t: bytes(t).decode(), k=1, before=2, after=1)[0].text
    'hi«!»?'
    """
    if values.ndim != 2 or token_ids.shape != values.shape:
        raise ValueError(
            f"values, token_ids: expected equal shapes (n_chunks, seq), got {tuple(values.shape)} and "
            f"{tuple(token_ids.shape)}"
        )
    if keep is None:
        keep = torch.ones_like(values, dtype=torch.bool)
        keep[:, 0] = False
    v = torch.where(
        keep.bool() & (values > 0), values.double(), torch.full_like(values, -math.inf, dtype=torch.float64)
    )
    flat = v.flatten()
    n = min(k, int(torch.isfinite(flat).sum()))
    top = torch.topk(flat, n)
    seq = values.shape[1]
    out = []
    for val, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        c, p = divmod(int(idx), seq)
        row = [int(t) for t in token_ids[c].tolist()]
        left, tok, right = row[max(0, p - before) : p], row[p : p + 1], row[p + 1 : p + 1 + after]
        text = decode(left) + markers[0] + decode(tok) + markers[1] + decode(right)
        out.append(Context(chunk=c, position=p, activation=float(val), token=decode(tok), text=text))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class PairContexts:
    """Top contexts of a feature and of its matched partner, with automatic agreement measures."""

    layer_a: int
    feature: int
    layer_b: int
    partner: int
    contexts_a: tuple[Context, ...]
    contexts_b: tuple[Context, ...]
    top_token_overlap: float
    """Jaccard of the sets of activating token strings in the two context lists."""
    top_position_overlap: float
    """Fraction of the top positions (chunk, position) the two lists share, over ``k``."""
    pearson: float
    """Correlation of the two features' activations over kept tokens."""


def pair_contexts(
    sae_a: SAE,
    sae_b: SAE,
    acts_a: Tensor,
    acts_b: Tensor,
    feature: int,
    partner: int,
    token_ids: Tensor,
    decode: Callable[[Sequence[int]], str],
    *,
    layers: tuple[int, int] = (-1, -1),
    k: int = 10,
    before: int = 8,
    after: int = 2,
    keep: Tensor | None = None,
) -> PairContexts:
    """Side-by-side top-activating contexts of ``feature`` (SAE A) and ``partner`` (SAE B).

    Parameters
    ----------
    acts_a, acts_b : Tensor, shape (n_chunks, seq, d_in): activations on the chunks ``token_ids``.
    token_ids : LongTensor, shape (n_chunks, seq).
    """
    if acts_a.ndim != 3 or acts_a.shape[:2] != token_ids.shape or acts_b.shape != acts_a.shape:
        raise ValueError(
            "acts_a, acts_b: expected shape (n_chunks, seq, d_in) matching token_ids "
            f"{tuple(token_ids.shape)}, "
            f"got {tuple(acts_a.shape)} and {tuple(acts_b.shape)}"
        )
    for name, idx, sae in (("feature", feature, sae_a), ("partner", partner, sae_b)):
        if not 0 <= idx < sae.d_sae:
            raise ValueError(f"{name}: expected an index in [0, {sae.d_sae}), got {idx}")
    with torch.no_grad():
        va = (acts_a.to(sae_a.dtype) @ sae_a.W_enc[:, feature] + sae_a.b_enc[feature])[..., None]
        vb = (acts_b.to(sae_b.dtype) @ sae_b.W_enc[:, partner] + sae_b.b_enc[partner])[..., None]
        fa = _activate_one(sae_a, va, feature)
        fb = _activate_one(sae_b, vb, partner)
    if keep is None:
        keep = torch.ones(token_ids.shape, dtype=torch.bool)
        keep[:, 0] = False
    ca = top_contexts(fa, token_ids, decode, k=k, before=before, after=after, keep=keep)
    cb = top_contexts(fb, token_ids, decode, k=k, before=before, after=after, keep=keep)
    ta, tb = {c.token for c in ca}, {c.token for c in cb}
    pa, pb = {(c.chunk, c.position) for c in ca}, {(c.chunk, c.position) for c in cb}
    x, y = fa[keep].double(), fb[keep].double()
    sx, sy = x.std(correction=0), y.std(correction=0)
    pear = float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy)) if sx > 0 and sy > 0 else math.nan
    return PairContexts(
        layer_a=layers[0],
        feature=feature,
        layer_b=layers[1],
        partner=partner,
        contexts_a=ca,
        contexts_b=cb,
        top_token_overlap=len(ta & tb) / len(ta | tb) if ta | tb else math.nan,
        top_position_overlap=len(pa & pb) / k,
        pearson=pear,
    )


def _activate_one(sae: SAE, pre: Tensor, feature: int) -> Tensor:
    """Activation of a single feature from its pre-activation (..., 1) → (...)."""
    if sae.activation == "jumprelu":
        assert sae.threshold is not None
        return (pre * (pre > sae.threshold[feature]))[..., 0]
    if sae.activation == "relu":
        return torch.relu(pre)[..., 0]
    raise ValueError("sae: TopK activations depend on every feature; encode the full SAE instead")


# ----------------------------------------------------------------------------------- rows
def pad_rows(values: np.ndarray | Tensor, chunk_ids: np.ndarray, positions: np.ndarray) -> Tensor:
    """Flat per-token values → padded per-chunk layout.

    Parameters
    ----------
    values : array, shape (n_tokens,) or (n_tokens, d)
    chunk_ids, positions : int arrays, shape (n_tokens,): the chunk and position of every row.

    Returns
    -------
    Tensor, shape (n_chunks, seq) or (n_chunks, seq, d), zeros where a chunk is shorter.
    """
    v = values if isinstance(values, Tensor) else torch.from_numpy(np.asarray(values))
    cid = torch.from_numpy(np.asarray(chunk_ids, dtype=np.int64))
    pos = torch.from_numpy(np.asarray(positions, dtype=np.int64))
    if v.shape[0] != cid.shape[0] or cid.shape != pos.shape:
        raise ValueError(
            f"values, chunk_ids, positions: expected the same number of rows, got {v.shape[0]}, "
            f"{cid.shape[0]}, {pos.shape[0]}"
        )
    n_chunks = int(cid.max()) + 1 if cid.numel() else 0
    seq = int(pos.max()) + 1 if pos.numel() else 0
    out = torch.zeros((n_chunks, seq, *v.shape[1:]), dtype=v.dtype)
    out[cid, pos] = v
    return out


def feature_values(
    sae: SAE, acts: np.ndarray | Tensor, features: Sequence[int], *, chunk_size: int = 4096
) -> Tensor:
    """Activations of some features of ``sae`` on every row of ``acts``.

    Parameters
    ----------
    acts : array, shape (n_tokens, d_in) (a memory map is read in chunks).
    features : indices into the SAE's d_sae features.

    Returns
    -------
    Tensor, shape (n_tokens, len(features)), float32.
    """
    idx = torch.as_tensor(list(features), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sae.d_sae):
        raise ValueError(f"features: expected indices in [0, {sae.d_sae}), got {idx.tolist()}")
    n = int(acts.shape[0])
    parts = []
    with torch.no_grad():
        for s in range(0, n, chunk_size):
            part = acts[s : s + chunk_size]
            x = part if isinstance(part, Tensor) else torch.from_numpy(np.array(part, dtype=np.float32))
            parts.append(sae.encode(x.to(sae.dtype))[:, idx].float())
    return torch.cat(parts) if parts else torch.zeros((0, idx.numel()))


def alive_features(
    sae: SAE, acts: np.ndarray | Tensor, keep: np.ndarray | None = None, *, chunk_size: int = 4096
) -> np.ndarray:
    """Features active (code > 0) on at least one kept row of ``acts`` (n_tokens, d_in), shape (d_sae,)."""
    n = int(acts.shape[0])
    mask = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"keep: expected shape ({n},), got {mask.shape}")
    alive = torch.zeros(sae.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for s in range(0, n, chunk_size):
            rows = np.flatnonzero(mask[s : s + chunk_size]) + s
            if rows.size == 0:
                continue
            part = acts[rows] if isinstance(acts, Tensor) else np.asarray(acts[rows], dtype=np.float32)
            x = part if isinstance(part, Tensor) else torch.from_numpy(part)
            alive |= (sae.encode(x.to(sae.dtype)) > 0).any(0).cpu()
    return alive.numpy()


def sample_features(alive: np.ndarray | Tensor, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct features drawn uniformly (seeded) among those marked alive, sorted.

    Parameters
    ----------
    alive : bool array, shape (d_sae,)

    >>> sample_features(np.array([True, False, True, True]), 2, seed=0)
    [2, 3]
    """
    a = np.asarray(alive, dtype=bool)
    pool = np.flatnonzero(a)
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    rng = np.random.default_rng(seed)
    picked = rng.choice(pool, size=min(n, pool.size), replace=False)
    return sorted(int(i) for i in picked)
