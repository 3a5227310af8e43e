"""Not every feature has one partner: splits, merges, births and deaths between layers.

A one-to-one matching forces every feature onto some partner. Here the cost structure decides
instead. Every pair ``(i, j)`` of features of layers A and B whose relative cost
``r = ‖a_i − b_j‖² / (‖a_i‖² + ‖b_j‖²)`` (see :mod:`~saematch_core.experiments.measures.verdict`) is
below a threshold ``τ`` is a *link*. ``τ`` comes from the verdict's rotated-partner null: it is
the ``level`` quantile of the best cost an unrelated feature reaches by chance, so a feature of A
with no real counterpart gets a link with probability about ``level``.

From the bipartite graph of links:

- **one-to-one**: ``i`` has exactly one link, to ``j``, and ``j`` has no other link;
- **split** (one-to-many): ``i`` has two or more links (its parts live on in B);
- **merge** (many-to-one): ``j`` has two or more links (several A features fold into one);
- **death**: ``i`` has no link (nothing in B resembles it beyond chance);
- **birth**: ``j`` has no link.

A feature can be both part of a split and of a merge (a tangle); counts are per feature.

**Validation with co-activation** (same tokens for both layers,
:mod:`~saematch_core.experiments.measures.coactivation`): for the links of each kind, the mean
*overlap coefficient* ``|A_i ∩ B_j| / min(|A_i|, |B_j|)`` (which stays high when one feature's
tokens contain the other's, as for the parts of a split), against random pairs; and for dead (born)
features, their best overlap with *any* feature of the other layer against that of linked features.
Features never active on the tokens are left out of the data columns.

The links are data-free (a face may compute them from two SAE files);
:mod:`saematch_core.experiments.splits` counts them over a study's layer pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saematch_core.cost import feature_vectors
from saematch_core.experiments.measures.coactivation import Coactivation
from saematch_core.experiments.measures.verdict import relative_cost_chunks, rotated_null
from saematch_core.experiments.results import finite_mean
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

__all__ = ["FeatureLinks", "LinkValidation", "feature_links", "link_vectors", "validate_links"]


@dataclass(frozen=True, eq=False)
class FeatureLinks:
    """The graph of below-chance pairs between the features of two layers, and its classification."""

    links: Tensor
    """LongTensor (n_links, 2): ``(i, j)`` pairs, sorted by ``i`` then ``j``."""
    statistic: Tensor
    """Float64 (n_links,): relative cost of each link."""
    threshold: float
    """``τ``: links have relative cost ``< τ``."""
    shape: tuple[int, int]
    """``(F_A, F_B)``."""

    @property
    def out_degree(self) -> Tensor:
        """(F_A,) links of every feature of A."""
        return torch.bincount(self.links[:, 0], minlength=self.shape[0])

    @property
    def in_degree(self) -> Tensor:
        """(F_B,) links of every feature of B."""
        return torch.bincount(self.links[:, 1], minlength=self.shape[1])

    @property
    def deaths(self) -> Tensor:
        """Bool (F_A,): no link."""
        return self.out_degree == 0

    @property
    def births(self) -> Tensor:
        """Bool (F_B,): no link."""
        return self.in_degree == 0

    @property
    def splits(self) -> Tensor:
        """Bool (F_A,): two or more links."""
        return self.out_degree >= 2

    @property
    def merges(self) -> Tensor:
        """Bool (F_B,): two or more links."""
        return self.in_degree >= 2

    @property
    def one_to_one(self) -> Tensor:
        """Bool (F_A,): exactly one link, whose partner has exactly one link."""
        out, inn = self.out_degree, self.in_degree
        single = out == 1
        partner = torch.full((self.shape[0],), -1, dtype=torch.long)
        first = self.links[single[self.links[:, 0]]]
        partner[first[:, 0]] = first[:, 1]
        ok = single.clone()
        ok[single] = inn[partner[single]] == 1
        return ok

    def link_kind(self) -> list[str]:
        """Per link: ``one_to_one``, ``split`` (its A end splits), ``merge`` (its B end merges) or
        ``tangle`` (both)."""
        out, inn = self.out_degree, self.in_degree
        kinds = []
        for i, j in self.links.tolist():
            s, m = bool(out[i] >= 2), bool(inn[j] >= 2)
            kinds.append("tangle" if s and m else "split" if s else "merge" if m else "one_to_one")
        return kinds


def link_vectors(
    a: Tensor,
    b: Tensor,
    params: Sequence[str],
    *,
    metric: str = "mse",
    threshold: float | None = None,
    level: float = 0.01,
    n_null: int = 2,
    seed: int = 0,
    chunk_size: int = 1024,
) -> FeatureLinks:
    """:class:`FeatureLinks` between feature vectors ``a`` (F_A, D) and ``b`` (F_B, D).

    Parameters
    ----------
    params : names of the vector blocks in order (for the rotated null).
    threshold : ``τ``; default the ``level`` quantile of the rotated-partner null.
    level : chance of a spurious link per unrelated feature, when ``threshold`` is None.
    """
    if threshold is None:
        if not 0 < level < 1:
            raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
        g = torch.Generator().manual_seed(seed)
        null = rotated_null(a, b, params, metric=metric, n_null=n_null, generator=g, chunk_size=chunk_size)
        threshold = float(torch.quantile(null, level))
    found, values = [], []
    for s, rel in relative_cost_chunks(a.detach().cpu(), b.detach().cpu(), metric, chunk_size=chunk_size):
        hit = (rel < threshold).nonzero()
        values.append(rel[hit[:, 0], hit[:, 1]].double())
        hit[:, 0] += s
        found.append(hit)
    links = torch.cat(found) if found else torch.zeros(0, 2, dtype=torch.long)
    stat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return FeatureLinks(
        links=links, statistic=stat, threshold=threshold, shape=(int(a.shape[0]), int(b.shape[0]))
    )


def feature_links(
    sae_a: SAE,
    sae_b: SAE,
    config: MatchConfig | None = None,
    *,
    threshold: float | None = None,
    level: float = 0.01,
    n_null: int = 2,
    seed: int = 0,
) -> FeatureLinks:
    """:func:`link_vectors` on the feature vectors ``config`` describes (default: the paper's folded
    ``W_enc``, ``W_dec``, ``b_enc``; ``config.solver`` is not used)."""
    cfg = MatchConfig() if config is None else config
    va = feature_vectors(sae_a, cfg.params, fold=cfg.fold and sae_a.activation == "jumprelu")
    vb = feature_vectors(sae_b, cfg.params, fold=cfg.fold and sae_b.activation == "jumprelu")
    return link_vectors(
        va, vb, cfg.params, metric=cfg.metric, threshold=threshold, level=level, n_null=n_null, seed=seed
    )


@dataclass(frozen=True, kw_only=True)
class LinkValidation:
    """Co-activation evidence for a :class:`FeatureLinks` graph (field meanings as in :class:`SplitsRow`)."""

    overlap_one_to_one: float = math.nan
    overlap_split: float = math.nan
    overlap_merge: float = math.nan
    overlap_random: float = math.nan
    best_overlap_dead: float = math.nan
    best_overlap_linked: float = math.nan
    best_overlap_born: float = math.nan
    n_active_a: int = 0


def validate_links(
    links: FeatureLinks, stats: Coactivation, *, n_random: int = 4096, seed: int = 0
) -> LinkValidation:
    """Mean overlap coefficient per kind of link, of random pairs, and the best overlap of dying,
    linked and born features (module docstring). ``stats`` must be for the same two SAEs."""
    if stats.shape != links.shape:
        raise ValueError(f"stats: expected co-activation of shape {links.shape}, got {stats.shape}")
    ov = stats.overlap()
    kinds = links.link_kind()
    i, j = links.links[:, 0], links.links[:, 1]
    per_link = ov[i, j] if links.links.numel() else torch.zeros(0, dtype=torch.float64)
    by_kind: dict[str, list[float]] = {"one_to_one": [], "split": [], "merge": []}
    for k, v in zip(kinds, per_link.tolist(), strict=True):
        if k in ("split", "tangle"):
            by_kind["split"].append(v)
        if k in ("merge", "tangle"):
            by_kind["merge"].append(v)
        if k == "one_to_one":
            by_kind["one_to_one"].append(v)
    g = torch.Generator().manual_seed(seed)
    fa, fb = links.shape
    ri = torch.randint(0, max(fa, 1), (n_random,), generator=g)
    rj = torch.randint(0, max(fb, 1), (n_random,), generator=g)
    filled = torch.nan_to_num(ov, nan=-1.0)
    best_a = filled.max(dim=1).values if fb else torch.full((fa,), -1.0, dtype=torch.float64)
    best_b = filled.max(dim=0).values if fa else torch.full((fb,), -1.0, dtype=torch.float64)
    alive_a, alive_b = ~stats.dead_a, ~stats.dead_b
    best_a = torch.where(alive_a & (best_a >= 0), best_a, torch.full_like(best_a, math.nan))
    best_b = torch.where(alive_b & (best_b >= 0), best_b, torch.full_like(best_b, math.nan))
    return LinkValidation(
        overlap_one_to_one=finite_mean(by_kind["one_to_one"]),
        overlap_split=finite_mean(by_kind["split"]),
        overlap_merge=finite_mean(by_kind["merge"]),
        overlap_random=finite_mean(ov[ri, rj]) if fa and fb else math.nan,
        best_overlap_dead=finite_mean(best_a[links.deaths]),
        best_overlap_linked=finite_mean(best_a[~links.deaths]),
        best_overlap_born=finite_mean(best_b[links.births]),
        n_active_a=int(alive_a.sum()),
    )
