"""Data-based matching by activation correlation (Balcells et al. 2024), the upper reference.

SAE Match is data-free: it only looks at weights. The reviewers asked how it compares with
matching features by *how they behave on data*. Here both SAEs encode the same tokens (residual
streams of their two layers), the full ``F_A × F_B`` co-activation statistics are accumulated in one
pass (:func:`coactivation_matrix`), and the one-to-one matching that maximises the summed
correlation is found exactly (a linear assignment problem on ``−correlation``,
:func:`databased_match`). It uses the very data the Matching Score is measured on, so it is an
upper reference, not a competitor.

Definitions (``A_i`` / ``B_j``: kept tokens on which feature ``i`` of A / ``j`` of B is active, i.e.
code ``> 0``; the same as :mod:`saematch_core.evaluate`):

- ``pearson[i, j]``: Pearson correlation of the activation values over kept tokens (``nan`` where a
  feature is constant, e.g. dead);
- ``jaccard[i, j] = |A_i ∩ B_j| / |A_i ∪ B_j|``;
- ``p_partner[i, j] = |A_i ∩ B_j| / |A_i|`` (the per-pair term of the Matching Score);
- ``overlap[i, j] = |A_i ∩ B_j| / min(|A_i|, |B_j|)``: high when one feature's tokens contain the
  other's, as for the parts of a split feature.

Memory: the statistics hold two ``F_A × F_B`` float64 matrices (64 MiB at F = 2048; 4 GiB at
F = 16384, where this reference becomes expensive).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from saematch_core.evaluate import random_partners
from saematch_core.lap import linear_assignment
from saematch_core.match import MatchConfig
from saematch_core.results import (
    ArrayLike,
    JsonResult,
    array_rows,
    cached_match,
    finite_mean,
    map_layer_pairs,
)
from saematch_core.sae import SAE

__all__ = [
    "CORRELATION_MEASURES",
    "CoactivationMatrix",
    "CorrelationMeasure",
    "DataBasedResult",
    "DataBasedRow",
    "coactivation_from_codes",
    "coactivation_matrix",
    "databased_by_layer",
    "databased_match",
    "iter_code_pairs",
    "recovered_fraction",
]

CorrelationMeasure = Literal["pearson", "jaccard"]
CORRELATION_MEASURES: tuple[str, ...] = get_args(CorrelationMeasure)
"""Measures :func:`databased_match` can maximise."""


def _check_acts(name: str, acts: ArrayLike, d_in: int, n: int | None = None) -> int:
    if not isinstance(acts, (Tensor, np.ndarray)):
        raise TypeError(
            f"{name}: expected a tensor or numpy array (n_tokens, d_in), got {type(acts).__name__}"
        )
    if acts.ndim != 2 or acts.shape[1] != d_in:
        raise ValueError(f"{name}: expected shape (n_tokens, {d_in}), got {tuple(acts.shape)}")
    if n is not None and acts.shape[0] != n:
        raise ValueError(
            f"{name}: expected {n} tokens like the other layer's activations, got {acts.shape[0]}"
        )
    return int(acts.shape[0])


def iter_code_pairs(
    sae_a: SAE,
    sae_b: SAE | None,
    acts_a: ArrayLike,
    acts_b: ArrayLike | None,
    *,
    keep: ArrayLike | None = None,
    chunk_size: int = 4096,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Codes of the kept tokens, chunk by chunk: yields ``(codes_a (n, F_A), codes_b (n, F_B) or None)``.

    Parameters
    ----------
    sae_a, sae_b : SAEs of the two layers (``sae_b`` may be ``None`` to encode one layer only).
    acts_a, acts_b : (n_tokens, d_in) activations on the same tokens (tensor, array or memory map).
    keep : BoolTensor (n_tokens,), optional; False for tokens to ignore.
    chunk_size : tokens encoded at once (memory ~ chunk_size × d_sae).
    """
    n = _check_acts("acts_a", acts_a, sae_a.d_in)
    if sae_b is not None:
        if acts_b is None:
            raise ValueError("acts_b: required when sae_b is given")
        _check_acts("acts_b", acts_b, sae_b.d_in, n)
    if keep is None:
        mask = torch.ones(n, dtype=torch.bool)
    else:
        mask = keep if isinstance(keep, Tensor) else torch.from_numpy(np.asarray(keep))
        if mask.shape != (n,):
            raise ValueError(f"keep: expected shape ({n},), got {tuple(mask.shape)}")
        mask = mask.bool().cpu()
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    for s in range(0, n, chunk_size):
        rows = mask[s : s + chunk_size].nonzero().flatten()
        if rows.numel() == 0:
            continue
        with torch.no_grad():
            xa = array_rows(acts_a, s, s + chunk_size, device=sae_a.device, dtype=sae_a.dtype)
            ca = sae_a.encode(xa[rows.to(sae_a.device)])
            cb = None
            if sae_b is not None and acts_b is not None:
                xb = array_rows(acts_b, s, s + chunk_size, device=sae_b.device, dtype=sae_b.dtype)
                cb = sae_b.encode(xb[rows.to(sae_b.device)])
        yield ca, cb


@dataclass(frozen=True, eq=False)
class CoactivationMatrix:
    """Co-activation statistics of every pair of features of two SAEs on the same tokens.

    All float64 on the CPU; counts are over kept tokens.
    """

    n_tokens: int
    count_a: Tensor
    """(F_A,) tokens on which each A feature is active."""
    count_b: Tensor
    """(F_B,) same for B."""
    sum_a: Tensor
    """(F_A,) Σ f_i."""
    sq_a: Tensor
    """(F_A,) Σ f_i²."""
    sum_b: Tensor
    sq_b: Tensor
    both: Tensor
    """(F_A, F_B) tokens on which both ``i`` and ``j`` are active."""
    prod: Tensor
    """(F_A, F_B) Σ f_i g_j."""

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.count_a.shape[0]), int(self.count_b.shape[0])

    @property
    def dead_a(self) -> Tensor:
        """(F_A,) features of A never active on the kept tokens."""
        return self.count_a == 0

    @property
    def dead_b(self) -> Tensor:
        return self.count_b == 0

    def pearson(self) -> Tensor:
        """(F_A, F_B) Pearson correlation of activation values; ``nan`` where a feature is constant."""
        n = max(self.n_tokens, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.prod / n - mean_a[:, None] * mean_b[None, :]
        sd_a = (self.sq_a / n - mean_a**2).clamp(min=0).sqrt()
        sd_b = (self.sq_b / n - mean_b**2).clamp(min=0).sqrt()
        denom = sd_a[:, None] * sd_b[None, :]
        out = cov / denom.clamp(min=1e-300)
        return torch.where(denom > 0, out.clamp(-1.0, 1.0), torch.full_like(out, math.nan))

    def jaccard(self) -> Tensor:
        """(F_A, F_B) ``|A_i ∩ B_j| / |A_i ∪ B_j|``; ``nan`` where both are dead."""
        union = self.count_a[:, None] + self.count_b[None, :] - self.both
        return torch.where(union > 0, self.both / union.clamp(min=1), torch.full_like(union, math.nan))

    def p_partner(self) -> Tensor:
        """(F_A, F_B) ``P(j active | i active)``; ``nan`` for dead ``i``."""
        ca = self.count_a[:, None].expand_as(self.both)
        return torch.where(ca > 0, self.both / ca.clamp(min=1), torch.full_like(self.both, math.nan))

    def overlap(self) -> Tensor:
        """(F_A, F_B) ``|A_i ∩ B_j| / min(|A_i|, |B_j|)``; ``nan`` where either is dead."""
        m = torch.minimum(self.count_a[:, None], self.count_b[None, :])
        return torch.where(m > 0, self.both / m.clamp(min=1), torch.full_like(m, math.nan))

    def measure(self, name: str) -> Tensor:
        """One of :meth:`pearson`, :meth:`jaccard`, :meth:`p_partner`, :meth:`overlap` by name."""
        fns = {"pearson": self.pearson, "jaccard": self.jaccard, "p_partner": self.p_partner}
        fns["overlap"] = self.overlap
        if name not in fns:
            raise ValueError(f"measure: expected one of {sorted(fns)}, got {name!r}")
        return fns[name]()


class _Accumulator:
    def __init__(self, fa: int, fb: int) -> None:
        f64 = torch.float64
        self.n = 0
        self.count_a, self.count_b = torch.zeros(fa, dtype=f64), torch.zeros(fb, dtype=f64)
        self.sum_a, self.sq_a = torch.zeros(fa, dtype=f64), torch.zeros(fa, dtype=f64)
        self.sum_b, self.sq_b = torch.zeros(fb, dtype=f64), torch.zeros(fb, dtype=f64)
        self.both = torch.zeros(fa, fb, dtype=f64)
        self.prod = torch.zeros(fa, fb, dtype=f64)

    def add(self, ca: Tensor, cb: Tensor) -> None:
        ca, cb = ca.detach().to("cpu", torch.float32), cb.detach().to("cpu", torch.float32)
        act_a, act_b = (ca > 0).float(), (cb > 0).float()
        self.n += int(ca.shape[0])
        self.count_a += act_a.sum(0).double()
        self.count_b += act_b.sum(0).double()
        self.sum_a += ca.double().sum(0)
        self.sq_a += ca.double().pow(2).sum(0)
        self.sum_b += cb.double().sum(0)
        self.sq_b += cb.double().pow(2).sum(0)
        # The F_A × F_B products run in float32 (twice as fast as float64 on CPU): per-chunk counts
        # are exact below 2**24 tokens, and chunk sums are accumulated in float64.
        self.both += (act_a.T @ act_b).double()
        self.prod += (ca.T @ cb).double()

    def result(self) -> CoactivationMatrix:
        return CoactivationMatrix(
            n_tokens=self.n,
            count_a=self.count_a,
            count_b=self.count_b,
            sum_a=self.sum_a,
            sq_a=self.sq_a,
            sum_b=self.sum_b,
            sq_b=self.sq_b,
            both=self.both,
            prod=self.prod,
        )


def coactivation_from_codes(
    codes_a: Tensor, codes_b: Tensor, *, chunk_size: int = 4096
) -> CoactivationMatrix:
    """:class:`CoactivationMatrix` of codes given directly.

    Parameters
    ----------
    codes_a : Tensor, shape (n_tokens, F_A)
    codes_b : Tensor, shape (n_tokens, F_B), the same tokens.
    """
    for name, c in (("codes_a", codes_a), ("codes_b", codes_b)):
        if not isinstance(c, Tensor) or c.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D tensor (n_tokens, F), got {getattr(c, 'shape', c)!r}")
    if codes_a.shape[0] != codes_b.shape[0]:
        raise ValueError(
            f"codes_a, codes_b: expected the same number of tokens, "
            f"got {codes_a.shape[0]} and {codes_b.shape[0]}"
        )
    acc = _Accumulator(codes_a.shape[1], codes_b.shape[1])
    for s in range(0, codes_a.shape[0], chunk_size):
        acc.add(codes_a[s : s + chunk_size], codes_b[s : s + chunk_size])
    return acc.result()


def coactivation_matrix(
    sae_a: SAE,
    sae_b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    *,
    keep: ArrayLike | None = None,
    chunk_size: int = 4096,
) -> CoactivationMatrix:
    """Encode both layers' activations and accumulate every pair's co-activation in one pass.

    Parameters
    ----------
    acts_a, acts_b : (n_tokens, d_in) residual activations of the two layers on the same tokens.
    keep : BoolTensor (n_tokens,), optional; tokens to count.
    """
    acc = _Accumulator(sae_a.d_sae, sae_b.d_sae)
    for ca, cb in iter_code_pairs(sae_a, sae_b, acts_a, acts_b, keep=keep, chunk_size=chunk_size):
        assert cb is not None  # sae_b was given
        acc.add(ca, cb)
    return acc.result()


def databased_match(stats: CoactivationMatrix, measure: CorrelationMeasure = "pearson") -> Tensor:
    """The one-to-one matching that maximises the summed ``measure`` (exact LAP on ``−measure``).

    Pairs with an undefined measure (a dead feature) count as 0 in the assignment; afterwards every
    dead feature of A, and every A feature assigned to a dead feature of B, gets ``-1``.

    Returns
    -------
    LongTensor, shape (F_A,): partner in B, or ``-1``.
    """
    if measure not in CORRELATION_MEASURES:
        raise ValueError(f"measure: expected one of {list(CORRELATION_MEASURES)}, got {measure!r}")
    m = stats.measure(measure)
    score = torch.nan_to_num(m, nan=0.0).numpy()
    rows, cols = linear_assignment(score, maximize=True)
    perm = torch.full((stats.shape[0],), -1, dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    bad = stats.dead_a | (perm < 0)
    bad |= stats.dead_b[perm.clamp(min=0)]
    return torch.where(bad, torch.full_like(perm, -1), perm)


def recovered_fraction(perm: Tensor, reference: Tensor) -> float:
    """Fraction of the reference's pairs (``reference[i] >= 0``) that ``perm`` also makes.

    >>> recovered_fraction(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2, -1]))
    0.3333333333333333
    """
    perm, reference = torch.as_tensor(perm).long(), torch.as_tensor(reference).long()
    if perm.shape != reference.shape or perm.ndim != 1:
        raise ValueError(
            f"perm, reference: expected equal 1-D shapes, "
            f"got {tuple(perm.shape)} and {tuple(reference.shape)}"
        )
    has = reference >= 0
    n = int(has.sum())
    return float((perm[has] == reference[has]).sum()) / n if n else math.nan


def _pair_means(stats: CoactivationMatrix, perm: Tensor) -> tuple[float, float, float, int]:
    """Mean p_partner, Jaccard and Pearson over pairs with both members alive (as in evaluate)."""
    has = perm >= 0
    safe = perm.clamp(min=0)
    inc = has & ~stats.dead_a & ~stats.dead_b[safe]
    idx = inc.nonzero().flatten()
    if idx.numel() == 0:
        return math.nan, math.nan, math.nan, 0
    rows, cols = idx, safe[idx]
    p = stats.both[rows, cols] / stats.count_a[rows]
    union = stats.count_a[rows] + stats.count_b[cols] - stats.both[rows, cols]
    jac = stats.both[rows, cols] / union
    pear = stats.pearson()[rows, cols]
    return float(p.mean()), float(jac.mean()), finite_mean(pear), int(idx.numel())


@dataclass(frozen=True, kw_only=True)
class DataBasedRow:
    """One matching on one layer pair, compared with the data-based reference."""

    layer_a: int
    layer_b: int
    method: str
    """``databased`` (the reference itself), a data-free method's name, or ``random``."""
    recovered: float
    """Fraction of the data-based pairs this matching also makes (1 for ``databased``)."""
    matching_score: float
    """Mean ``P(partner active | feature active)`` over included pairs (both members alive)."""
    jaccard: float
    pearson: float
    n_pairs: int
    """Included pairs."""
    n_reference: int
    """Pairs of the data-based matching (both members alive)."""


@dataclass(frozen=True, kw_only=True)
class DataBasedResult(JsonResult):
    """Rows per (layer pair, method)."""

    kind: ClassVar[str] = "databased"
    measure: str
    """The correlation the reference maximises (``pearson`` or ``jaccard``)."""
    n_tokens: int
    """Kept tokens of the first layer pair (all pairs use the same tokens)."""
    rows: tuple[DataBasedRow, ...]

    def series(self, method: str, metric: str = "recovered") -> tuple[float, ...]:
        """``metric`` of ``method`` per layer pair, pairs in order."""
        return tuple(float(getattr(r, metric)) for r in self.rows if r.method == method)

    def mean(self, method: str, metric: str = "recovered") -> float:
        """:func:`finite_mean` of :meth:`series` over layer pairs."""
        return finite_mean(self.series(method, metric))

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(dict.fromkeys((r.layer_a, r.layer_b) for r in self.rows))


def _default_free_methods() -> dict[str, MatchConfig]:
    return {
        "folded": MatchConfig(fold=True),
        "unfolded": MatchConfig(fold=False),
        "cosine": MatchConfig(fold=False, metric="cosine", params=("W_dec",)),
    }


def databased_by_layer(
    saes: Mapping[int, SAE],
    activations: Mapping[int, ArrayLike],
    methods: Mapping[str, MatchConfig] | None = None,
    *,
    measure: CorrelationMeasure = "pearson",
    pairs: Sequence[tuple[int, int]] | None = None,
    keep: ArrayLike | None = None,
    seed: int = 0,
    chunk_size: int = 4096,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> DataBasedResult:
    """Data-based reference matching per layer pair and how much of it data-free matchings recover.

    Parameters
    ----------
    saes : layer → SAE.
    activations : layer → (n_tokens, d_in) residual activations, all on the same tokens.
    methods : name → data-free MatchConfig; default ``folded``, ``unfolded`` and ``cosine``.
    measure : correlation the reference maximises.
    pairs : (layer_a, layer_b); default consecutive layers with both SAEs and activations.
    keep : BoolTensor (n_tokens,), optional.
    seed : for the ``random`` row (uniformly random one-to-one partners).

    Each pair is cached on its own, keyed by SAEs, activations, methods and measure.
    """
    methods = _default_free_methods() if methods is None else dict(methods)
    if measure not in CORRELATION_MEASURES:
        raise ValueError(f"measure: expected one of {list(CORRELATION_MEASURES)}, got {measure!r}")
    if pairs is None:
        layers = sorted(set(saes) & set(activations))
        pairs = list(itertools.pairwise(layers))

    def compute(la: int, lb: int) -> DataBasedResult:
        a, b = saes[la], saes[lb]
        stats = coactivation_matrix(a, b, activations[la], activations[lb], keep=keep, chunk_size=chunk_size)
        ref = databased_match(stats, measure)
        perms = {"databased": ref, **{k: cached_match(a, b, v, cache_dir).perm for k, v in methods.items()}}
        perms["random"] = random_partners(a.d_sae, b.d_sae, torch.Generator().manual_seed(seed))
        n_ref = int((ref >= 0).sum())
        out = []
        for name, p in perms.items():
            score, jac, pear, n = _pair_means(stats, p)
            out.append(
                DataBasedRow(
                    layer_a=la,
                    layer_b=lb,
                    method=name,
                    recovered=recovered_fraction(p, ref),
                    matching_score=score,
                    jaccard=jac,
                    pearson=pear,
                    n_pairs=n,
                    n_reference=n_ref,
                )
            )
        return DataBasedResult(measure=measure, n_tokens=stats.n_tokens, rows=tuple(out))

    parts = map_layer_pairs(
        DataBasedResult,
        saes,
        pairs,
        compute,
        spec={"methods": {k: v.to_dict() for k, v in methods.items()}, "measure": measure, "seed": seed},
        activations=activations,
        keep=keep,
        desc="data-based matching",
        cache_dir=cache_dir,
        force=force,
        progress=progress,
    )
    n_tokens = next((part.n_tokens for part in parts if part.n_tokens), 0)
    return DataBasedResult(
        measure=measure, n_tokens=n_tokens, rows=tuple(r for part in parts for r in part.rows)
    )
