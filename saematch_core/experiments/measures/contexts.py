"""Offline semantic check: top-activating contexts of a feature and of its matched partner.

The paper asks an LLM judge whether a feature and its partner mean the same thing, from their
Neuronpedia explanations. Offline we show the evidence itself, the tokens where each feature fires
most with a window of context (the activating token between markers), and score the pair
automatically: overlap of the top-activating tokens and positions, and the correlation of the two
features' activations. Aggregate versions over all pairs live in :mod:`saematch_core.evaluate`
(:func:`~saematch_core.evaluate.pair_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saematch_core.sae import SAE

__all__ = ["Context", "PairContexts", "pair_contexts", "top_contexts"]


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
