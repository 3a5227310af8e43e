"""Data-based matching by activation correlation (Balcells et al. 2024), the upper reference.

SAE Match is data-free: it only looks at weights. The reviewers asked how it compares with
matching features by *how they behave on data*. Here both SAEs encode the same tokens (residual
streams of their two layers), the full ``F_A × F_B`` co-activation statistics are accumulated in one
pass (:func:`~saematch_core.experiments.measures.coactivation.coactivation` with ``all_pairs``), and
the one-to-one matching that maximises the summed
correlation is found exactly (a linear assignment problem on ``−correlation``,
:func:`databased_match`). It uses the very data the Matching Score is measured on, so it is an
upper reference, not a competitor.

Definitions (``A_i`` / ``B_j``: kept tokens on which feature ``i`` of A / ``j`` of B is active, i.e.
code ``> 0``; see :mod:`saematch_core.experiments.measures.coactivation`):

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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.coactivation import Coactivation, coactivation, random_partners
from saematch_core.experiments.results import JsonResult, cached_match, finite_mean, map_layer_pairs
from saematch_core.lap import linear_sum_assignment
from saematch_core.match import MatchConfig

__all__ = [
    "CORRELATION_MEASURES",
    "CorrelationMeasure",
    "DataBasedConfig",
    "DataBasedResult",
    "DataBasedRow",
    "databased_match",
    "recovered_fraction",
    "run",
]

CorrelationMeasure = Literal["pearson", "jaccard"]
CORRELATION_MEASURES: tuple[str, ...] = get_args(CorrelationMeasure)
"""Measures :func:`databased_match` can maximise."""


def databased_match(stats: Coactivation, measure: CorrelationMeasure = "pearson") -> Tensor:
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
    rows, cols = linear_sum_assignment(score, maximize=True, solver="scipy")
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


def _pair_means(stats: Coactivation, perm: Tensor) -> tuple[float, float, float, int]:
    """Mean p_partner, Jaccard and Pearson over pairs with both members alive (as in the Matching Score)."""
    has = perm >= 0
    safe = perm.clamp(min=0)
    inc = has & ~stats.dead_a & ~stats.dead_b[safe]
    idx = inc.nonzero().flatten()
    if idx.numel() == 0:
        return math.nan, math.nan, math.nan, 0
    rows, cols = idx, safe[idx]
    both = stats.matrices()[0][rows, cols]
    p = both / stats.count_a[rows]
    union = stats.count_a[rows] + stats.count_b[cols] - both
    jac = both / union
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


@dataclass(frozen=True, kw_only=True)
class DataBasedConfig:
    """What :func:`run` measures."""

    methods: Mapping[str, MatchConfig] = field(default_factory=_default_free_methods)
    """Name → data-free matching compared with the reference (default ``folded``, ``unfolded``,
    ``cosine``)."""
    measure: CorrelationMeasure = "pearson"
    """The correlation the reference matching maximises."""

    def __post_init__(self) -> None:
        if not isinstance(self.methods, Mapping) or not all(
            isinstance(v, MatchConfig) for v in self.methods.values()
        ):
            raise TypeError("DataBasedConfig.methods: expected a mapping name → MatchConfig")
        object.__setattr__(self, "methods", dict(self.methods))
        if self.measure not in CORRELATION_MEASURES:
            raise ValueError(
                f"DataBasedConfig.measure: expected one of {list(CORRELATION_MEASURES)}, got {self.measure!r}"
            )


def run(inputs: Inputs, config: DataBasedConfig | None = None) -> DataBasedResult:
    """Data-based reference matching per layer pair of ``inputs`` (default consecutive layers with
    SAEs and activations) and how much of it data-free matchings recover.

    ``inputs.seed`` seeds the ``random`` row (uniformly random one-to-one partners). Each pair is
    cached on its own, keyed by SAEs, activations, methods and measure.
    """
    cfg = DataBasedConfig() if config is None else config
    methods, measure, seed = cfg.methods, cfg.measure, inputs.seed

    def compute(la: int, lb: int) -> DataBasedResult:
        a, b = inputs.saes[la], inputs.saes[lb]
        stats = coactivation(
            a,
            b,
            inputs.acts(la),
            inputs.acts(lb),
            all_pairs=True,
            keep=inputs.keep,
            chunk_size=inputs.chunk_size,
        )
        ref = databased_match(stats, measure)
        perms = {
            "databased": ref,
            **{k: cached_match(a, b, v, inputs.cache_dir).perm for k, v in methods.items()},
        }
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
        inputs,
        inputs.layer_pairs(data=True),
        compute,
        spec={"methods": {k: v.to_dict() for k, v in methods.items()}, "measure": measure, "seed": seed},
        desc="data-based matching",
    )
    n_tokens = next((part.n_tokens for part in parts if part.n_tokens), 0)
    return DataBasedResult(
        measure=measure, n_tokens=n_tokens, rows=tuple(r for part in parts for r in part.rows)
    )
