"""Swapping one SAE's codes into another's dictionary through a matching.

SAE Match's replacement of a hidden state (paper Figs. 10/11): encode ``h_a`` with SAE A, move the
codes to SAE B's feature order with the matching, decode with SAE B. Shared by the hidden-state
approximation (:mod:`saematch_core.experiments.approximate`, inside the model) and the seed ceiling
(:mod:`saematch_core.experiments.ceiling`, without it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from saematch_core.experiments.results import cached_match
from saematch_core.fold import fold
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.sae import SAE

__all__ = ["matched_pair", "matched_reconstructor", "permute_codes"]


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
