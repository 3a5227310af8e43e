"""Composing feature matchings across layers (the paper's ``P(A→C) ≈ P(B→C) ∘ P(A→B)``).

A matching from layer A to layer B is a LongTensor ``p`` of shape (F_A,): feature ``i`` of A goes to
feature ``p[i]`` of B, and ``-1`` means "no partner". Partners may repeat (a greedy, many-to-one
mapping) everywhere except in :func:`invert`, which needs a one-to-one matching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FeaturePath", "agreement", "compose", "compose_chain", "identity", "invert", "path"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _as_map(p: object, name: str, size: int | None = None) -> Tensor:
    """Validate a matching: 1-D integers in ``[-1, size)``; returned as a CPU LongTensor."""
    t = p if isinstance(p, Tensor) else torch.as_tensor(p)
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D tensor (F,), got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.long)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < -1:
            raise ValueError(f"{name}: expected entries >= -1, got {lo}")
        if size is not None and hi >= size:
            first = int((t >= size).nonzero()[0, 0])
            raise ValueError(
                f"{name}: expected entries < {size} (the partner side's width), "
                f"got {hi} (first at feature {first})"
            )
    return t


def _check_one_to_one(p: Tensor, name: str) -> None:
    used = p[p >= 0]
    uniq, counts = torch.unique(used, return_counts=True)
    if bool((counts > 1).any()):
        dup = int(uniq[counts > 1][0])
        sources = (p == dup).nonzero().flatten()[:2].tolist()
        raise ValueError(
            f"{name}: expected a one-to-one matching, but feature {dup} is the partner of features {sources} "
            f"({int((counts > 1).sum())} repeated partners; greedy mappings cannot be inverted)"
        )


def identity(n: int) -> Tensor:
    """The identity matching of ``n`` features, ``arange(n)``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    return torch.arange(n, dtype=torch.long)


def compose(p_ab: Tensor, p_bc: Tensor) -> Tensor:
    """Apply ``p_ab`` then ``p_bc``: ``p_ac[i] = p_bc[p_ab[i]]``, with ``-1`` where either step has none.

    Parameters
    ----------
    p_ab : LongTensor, shape (F_A,), entries in ``[-1, F_B)``
    p_bc : LongTensor, shape (F_B,), entries in ``[-1, F_C)``

    Returns
    -------
    LongTensor, shape (F_A,)

    Examples
    --------
    >>> compose(torch.tensor([1, 2, -1]), torch.tensor([0, -1, 1])).tolist()
    [-1, 1, -1]
    """
    p_bc = _as_map(p_bc, "p_bc")
    p_ab = _as_map(p_ab, "p_ab", size=p_bc.shape[0])
    out = torch.full_like(p_ab, -1)
    ok = p_ab >= 0
    out[ok] = p_bc[p_ab[ok]]
    return out


def compose_chain(perms: Sequence[Tensor], start: int = 0, stop: int | None = None) -> Tensor:
    """Compose ``perms[start], perms[start + 1], ..., perms[stop - 1]`` (layer ``start`` → layer ``stop``).

    ``start == stop`` gives the identity on layer ``start``'s features.
    """
    stop = len(perms) if stop is None else stop
    if not 0 <= start <= stop <= len(perms):
        raise ValueError(f"start, stop: expected 0 <= start <= stop <= {len(perms)}, got {start}, {stop}")
    if start == len(perms):
        raise ValueError(f"start: layer {start} is the last layer; its width is unknown from the chain")
    out = identity(_as_map(perms[start], f"perms[{start}]").shape[0])
    for i in range(start, stop):
        nxt = None if i + 1 >= len(perms) else _as_map(perms[i + 1], f"perms[{i + 1}]").shape[0]
        out = compose(out, _as_map(perms[i], f"perms[{i}]", size=nxt))
    return out


def invert(p: Tensor, size: int | None = None) -> Tensor:
    """The inverse matching B → A of a one-to-one matching A → B.

    Parameters
    ----------
    p : LongTensor, shape (F_A,)
        One-to-one (no partner used twice); ``-1`` allowed.
    size : int, optional
        ``F_B``, the width of B. Defaults to ``F_A`` (square matchings).

    Returns
    -------
    LongTensor, shape (F_B,): ``q[p[i]] = i``; ``-1`` for features of B that nobody maps to.

    Examples
    --------
    >>> invert(torch.tensor([2, 0, 1])).tolist()
    [1, 2, 0]
    """
    p = _as_map(p, "p")
    size = p.shape[0] if size is None else size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size: expected an int >= 0, got {size!r}")
    p = _as_map(p, "p", size=size)
    _check_one_to_one(p, "p")
    out = torch.full((size,), -1, dtype=torch.long)
    ok = (p >= 0).nonzero().flatten()
    out[p[ok]] = ok
    return out


@dataclass(frozen=True)
class FeaturePath:
    """One feature followed through a chain of matchings, forward and backward from its start.

    Every tuple has one entry per layer of the chain, in chain order.
    """

    layers: tuple[int, ...]
    """The chain's layers (labels: model layers, or positions 0, 1, … by default)."""
    start: int
    """The layer the path starts from (one of :attr:`layers`)."""
    features: tuple[int, ...]
    """The feature occupied at each layer; ``-1`` once a step (away from the start) has no partner."""
    step_costs: tuple[float, ...]
    """Per layer, the cost of the matched pair linking it to its neighbour towards the start; ``nan``
    at the start, after a lost step, and everywhere when no costs were given."""

    def forward(self) -> list[int]:
        """The features from the start layer to the last one.

        >>> path([torch.tensor([1, 0]), torch.tensor([-1, 0])], 0, 0).forward()
        [0, 1, 0]
        """
        return list(self.features[self.layers.index(self.start) :])

    def pair_costs(self) -> list[float]:
        """:attr:`step_costs` re-indexed by layer pair ``(layers[i], layers[i+1])``: after the start a
        step is stored at its target layer, before the start at its source.

        >>> p = path([torch.tensor([1, 0]), torch.tensor([0, 1])], 1, 0,
        ...          costs=[torch.tensor([0.5, 0.25])] * 2)
        >>> p.features, p.step_costs, p.pair_costs()
        ((1, 0, 0), (0.25, nan, 0.5), [0.25, 0.5])
        """
        i0 = self.layers.index(self.start)
        steps = self.step_costs
        return [float(steps[i + 1] if i + 1 > i0 else steps[i]) for i in range(len(self.layers) - 1)]


def path(
    perms: Sequence[Tensor],
    start_layer: int,
    feature: int,
    *,
    costs: Sequence[Tensor] | None = None,
    layers: Sequence[int] | None = None,
) -> FeaturePath:
    """Follow one feature through a chain of matchings, forward and backward from ``start_layer``.

    Parameters
    ----------
    perms : sequence of LongTensor
        ``perms[i]`` maps the features of the chain's layer ``i`` to those of layer ``i + 1`` (so the
        chain has ``len(perms) + 1`` layers). Steps backward from the start invert the matchings,
        which must then be one-to-one (:func:`invert`).
    start_layer : int
        The layer to start from: a label of ``layers`` (by default a position ``0 … len(perms)``).
    feature : int
        Feature index at ``start_layer``.
    costs : sequence of Tensor, optional
        ``costs[i]``: the per-pair cost (F_i,) of ``perms[i]``, indexed by layer ``i``'s features
        (e.g. :attr:`MatchResult.cost <saematch_core.match.MatchResult.cost>`).
    layers : sequence of int, optional
        Labels of the chain's layers (e.g. model layers), ``len(perms) + 1`` of them; default
        ``0 … len(perms)``.

    Returns
    -------
    FeaturePath
        The feature at every layer of the chain (``-1`` once a step has no partner) and the cost of
        every step.

    Examples
    --------
    >>> path([torch.tensor([1, 0]), torch.tensor([-1, 0])], 0, 0).features
    (0, 1, 0)
    >>> path([torch.tensor([1, 0]), torch.tensor([-1, 0])], 11, 0, layers=[10, 11, 12]).features
    (1, 0, -1)
    """
    n_layers = len(perms) + 1
    labels = tuple(range(n_layers)) if layers is None else tuple(int(t) for t in layers)
    if len(labels) != n_layers:
        raise ValueError(f"layers: expected {n_layers} labels (one per chain layer), got {len(labels)}")
    if start_layer not in labels:
        raise ValueError(f"start_layer: expected one of {list(labels)}, got {start_layer!r}")
    maps = [_as_map(p, f"perms[{i}]") for i, p in enumerate(perms)]
    for i in range(len(maps) - 1):
        _as_map(maps[i], f"perms[{i}]", size=maps[i + 1].shape[0])
    if costs is not None and (
        len(costs) != len(maps) or any(c.shape != m.shape for c, m in zip(costs, maps, strict=False))
    ):
        raise ValueError(f"costs: expected one (F_i,) tensor per matching ({len(maps)}), shaped like perms")
    i0 = labels.index(start_layer)
    width = maps[i0].shape[0] if i0 < len(maps) else None
    if not isinstance(feature, int) or feature < 0 or (width is not None and feature >= width):
        raise ValueError(f"feature: expected an int in [0, {width}) at layer {start_layer}, got {feature!r}")

    def cost(i: int, f: int) -> float:
        return math.nan if costs is None else float(costs[i][f])

    feats, step = [-1] * n_layers, [math.nan] * n_layers
    feats[i0] = feature
    for i in range(i0 + 1, n_layers):
        prev = feats[i - 1]
        if prev < 0:
            break
        feats[i] = int(maps[i - 1][prev])
        step[i] = cost(i - 1, prev) if feats[i] >= 0 else math.nan
    for i in range(i0 - 1, -1, -1):
        nxt = feats[i + 1]
        if nxt < 0:
            break
        m = maps[i]
        size = maps[i + 1].shape[0] if i + 1 < len(maps) else max(int(m.max()) + 1, int(m.shape[0]))
        feats[i] = int(invert(m, size=size)[nxt])
        step[i] = cost(i, feats[i]) if feats[i] >= 0 else math.nan
    return FeaturePath(layers=labels, start=start_layer, features=tuple(feats), step_costs=tuple(step))


def agreement(p_composed: Tensor, p_direct: Tensor) -> float:
    """Fraction of features whose partner is the same in both matchings.

    Only features that have a partner in *both* (neither entry ``-1``) are counted; ``nan`` if there
    are none.

    Examples
    --------
    >>> agreement(torch.tensor([0, 1, 2, -1]), torch.tensor([0, 2, 2, 3]))
    0.6666666666666666
    """
    a = _as_map(p_composed, "p_composed")
    b = _as_map(p_direct, "p_direct")
    if a.shape != b.shape:
        raise ValueError(
            f"p_composed, p_direct: expected the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    both = (a >= 0) & (b >= 0)
    n = int(both.sum())
    if n == 0:
        return math.nan
    return float((a[both] == b[both]).sum()) / n
