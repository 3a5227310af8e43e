"""Swapping one SAE's codes into another's dictionary through a matching.

SAE Match's replacement of a hidden state (paper Figs. 10/11): encode ``h_a`` with SAE A, move the
codes to SAE B's feature order with the matching, decode with SAE B. Shared by the hidden-state
approximation (:mod:`saematch_core.experiments.approximate`, inside the model) and the seed ceiling
(:mod:`saematch_core.experiments.ceiling`, without it), and the explained variance of any such
replacement over stored activations (:func:`explained_variance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saematch_core.experiments.inputs import ArrayLike
from saematch_core.experiments.results import array_rows, cached_match
from saematch_core.fold import fold
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.sae import SAE

__all__ = ["explained_variance", "matched_pair", "matched_reconstructor", "permute_codes"]


def permute_codes(codes: Tensor, perm: Tensor, width: int) -> Tensor:
    """Move codes of SAE t−1 into SAE t's feature order; unmatched features are dropped and partners
    shared by several features (greedy) receive the sum."""
    keep = (perm >= 0).nonzero().flatten()
    out = codes.new_zeros((*codes.shape[:-1], width))
    return out.index_add_(-1, perm[keep], codes.index_select(-1, keep))


def matched_reconstructor(
    sae_a: SAE, sae_b: SAE, config: MatchConfig, *, cache_dir: str | Path | None = None
) -> Callable[[Tensor], Tensor]:
    """SAE Match's stand-in for the state SAE B reads, as a function ``h_a ↦ decode_B(P(encode_A(h_a)))``.

    The replacement of Figs. 10/11 without the model: encode ``h_a`` (n, d_in) with SAE A, move the
    codes to B's feature order with the matching (:func:`~saematch_core.experiments.results.cached_match`;
    folded SAEs where the matching folds), decode with SAE B; returns (n, d_in). The matching is
    looked up once, here, so the function can be applied chunk after chunk.
    """
    a, b, result = matched_pair(sae_a, sae_b, config, cache_dir)

    def reconstruct(h_a: Tensor) -> Tensor:
        return b.decode(permute_codes(a.encode(h_a), result.perm.to(h_a.device), b.d_sae))

    return reconstruct


def matched_pair(
    prev: SAE, cur: SAE, cfg: MatchConfig, cache_dir: str | Path | None
) -> tuple[SAE, SAE, MatchResult]:
    """``(SAE A, SAE B, matching)``: the cached matching of ``prev`` to ``cur`` and the two SAEs as
    the matching saw them (folded where it folded), so codes moved by it land where it matched."""
    result = cached_match(prev, cur, cfg, cache_dir)
    use_prev = fold(prev) if result.folded[0] else prev
    use_cur = fold(cur) if result.folded[1] else cur
    return use_prev, use_cur, result


def explained_variance(
    reconstruct: Callable[[Tensor], Tensor],
    source: ArrayLike,
    target: ArrayLike,
    *,
    keep: ArrayLike | None = None,
    chunk_size: int = 4096,
) -> float:
    """``1 − Σ‖reconstruct(source) − target‖² / Σ‖target − mean(target)‖²`` over kept tokens.

    ``source`` and ``target`` are (n_tokens, d_in) residuals of the same tokens (possibly of two
    layers); rows are processed in chunks, in float64 sums.

    >>> x = torch.randn(100, 4)
    >>> explained_variance(lambda h: h, x, x)
    1.0
    >>> abs(explained_variance(lambda h: 0 * h + x.mean(0), x, x)) < 1e-12
    True
    """
    n = int(source.shape[0])
    if int(target.shape[0]) != n:
        raise ValueError(f"source, target: expected the same tokens, got {n} and {int(target.shape[0])} rows")
    mask = (
        torch.ones(n, dtype=torch.bool)
        if keep is None
        else torch.as_tensor(np.asarray(keep), dtype=torch.bool)
    )
    total = torch.zeros((), dtype=torch.float64)
    s1 = torch.zeros(int(target.shape[1]), dtype=torch.float64)
    s2 = torch.zeros((), dtype=torch.float64)
    count = 0
    cpu = torch.device("cpu")
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            m = mask[start : start + chunk_size]
            if not bool(m.any()):
                continue
            src = array_rows(source, start, start + chunk_size, device=cpu, dtype=torch.float32)[m]
            tgt = array_rows(target, start, start + chunk_size, device=cpu, dtype=torch.float64)[m]
            total += (reconstruct(src).double() - tgt).pow(2).sum()
            s1 += tgt.sum(0)
            s2 += tgt.pow(2).sum()
            count += int(m.sum())
    if count == 0:
        return math.nan
    variance = float(s2 - s1.pow(2).sum() / count)
    return 1.0 - float(total) / variance if variance > 0 else math.nan
