"""Folded vs unfolded matching, head-to-head where they disagree (evidence for H2 from data).

Folding is judged in the paper partly by the parameter MSE it minimises, which is circular. Where
folded and unfolded matching give a feature *different* partners, which partner co-activates with
it more on real tokens? Each such feature is one paired comparison of
``P(partner active | feature active)``; a two-sided sign test over them says whether one matching
wins more often than chance. Features where both matchings agree carry no information about H2 and
are left out. The other non-circular tests: θ against the measured activation scale
(:mod:`saematch_core.experiments.theta_scale`), the Matching Score
(:mod:`saematch_core.experiments.matching_score`) and ΔL of folded vs unfolded matching
(:mod:`saematch_core.experiments.approximate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from scipy import stats as sps

from saematch_core.experiments.inputs import ArrayLike, Inputs
from saematch_core.experiments.measures.coactivation import coactivation, pair_metrics
from saematch_core.experiments.results import JsonResult, cached_match, finite_mean, map_layer_pairs
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

__all__ = [
    "Disagreement",
    "DisagreementConfig",
    "DisagreementResult",
    "DisagreementRow",
    "run",
]


@dataclass(frozen=True, kw_only=True)
class Disagreement:
    """One feature whose folded and unfolded partners differ."""

    feature: int
    partner_folded: int
    partner_unfolded: int
    p_folded: float
    """``P(folded partner active | feature active)``."""
    p_unfolded: float


@dataclass(frozen=True, kw_only=True)
class DisagreementRow:
    """Folded vs unfolded matching, head-to-head on the features where they disagree."""

    layer_a: int
    layer_b: int
    n_features: int
    n_disagree: int
    """Features with different partners under the two matchings."""
    n_compared: int
    """Of those, features alive with both partners alive (the paired comparisons)."""
    folded_wins: int
    unfolded_wins: int
    ties: int
    sign_test_p: float
    """Two-sided binomial test of ``folded_wins`` vs ``unfolded_wins`` (ties dropped)."""
    mean_p_folded: float
    """Mean ``P(partner active | feature active)`` of the folded partners on compared features."""
    mean_p_unfolded: float
    score_folded: float
    """Matching Score of the folded matching over all its included pairs."""
    score_unfolded: float
    examples: tuple[Disagreement, ...]
    """The compared features with the largest ``|p_folded − p_unfolded|`` (for contexts)."""


@dataclass(frozen=True, kw_only=True)
class DisagreementResult(JsonResult):
    """Rows per layer pair."""

    kind: ClassVar[str] = "h2_disagreements"
    rows: tuple[DisagreementRow, ...]

    def series(self, metric: str) -> tuple[float, ...]:
        """``metric`` per row, in order."""
        return tuple(float(getattr(r, metric)) for r in self.rows)

    def mean(self, metric: str) -> float:
        """Mean of :meth:`series` where it is defined (``nan`` if nowhere)."""
        return finite_mean(self.series(metric))


def _disagreement_row(
    a: SAE,
    b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    layers: tuple[int, int],
    folded: MatchConfig,
    unfolded: MatchConfig,
    keep: ArrayLike | None,
    n_examples: int,
    chunk_size: int,
    cache_dir: Path | None,
) -> DisagreementRow:
    pf, pu = cached_match(a, b, folded, cache_dir).perm, cached_match(a, b, unfolded, cache_dir).perm
    stats = coactivation(
        a, b, acts_a, acts_b, {"folded": pf, "unfolded": pu}, keep=keep, chunk_size=chunk_size
    )
    mf, mu = pair_metrics(stats, "folded")["p_partner"], pair_metrics(stats, "unfolded")["p_partner"]
    differ = pf != pu
    both = differ & ~torch.isnan(mf) & ~torch.isnan(mu)
    idx = both.nonzero().flatten()
    x, y = mf[idx], mu[idx]
    wins_f, wins_u = int((x > y).sum()), int((y > x).sum())
    n = wins_f + wins_u
    p = float(sps.binomtest(wins_f, n, 0.5).pvalue) if n else math.nan
    order = torch.argsort((x - y).abs(), descending=True)[:n_examples]
    examples = tuple(
        Disagreement(
            feature=int(idx[k]),
            partner_folded=int(pf[idx[k]]),
            partner_unfolded=int(pu[idx[k]]),
            p_folded=float(x[k]),
            p_unfolded=float(y[k]),
        )
        for k in order.tolist()
    )
    return DisagreementRow(
        layer_a=layers[0],
        layer_b=layers[1],
        n_features=a.d_sae,
        n_disagree=int(differ.sum()),
        n_compared=int(idx.numel()),
        folded_wins=wins_f,
        unfolded_wins=wins_u,
        ties=int(idx.numel()) - n,
        sign_test_p=p,
        mean_p_folded=float(x.mean()) if x.numel() else math.nan,
        mean_p_unfolded=float(y.mean()) if y.numel() else math.nan,
        score_folded=finite_mean(mf),
        score_unfolded=finite_mean(mu),
        examples=examples,
    )


@dataclass(frozen=True, kw_only=True)
class DisagreementConfig:
    """What :func:`run` measures."""

    folded: MatchConfig = field(default_factory=lambda: MatchConfig(fold=True))
    """The first matching (default: the paper's objective, folded)."""
    unfolded: MatchConfig = field(default_factory=lambda: MatchConfig(fold=False))
    """The second matching (default: the same objective on the raw weights)."""
    n_examples: int = 3
    """Disagreements kept per pair (the largest differences), for showing their contexts."""

    def __post_init__(self) -> None:
        for name in ("folded", "unfolded"):
            if not isinstance(getattr(self, name), MatchConfig):
                raise TypeError(
                    f"DisagreementConfig.{name}: expected a MatchConfig, got {getattr(self, name)!r}"
                )
        if not isinstance(self.n_examples, int) or isinstance(self.n_examples, bool) or self.n_examples < 0:
            raise ValueError(f"DisagreementConfig.n_examples: expected an int >= 0, got {self.n_examples!r}")


def run(inputs: Inputs, config: DisagreementConfig | None = None) -> DisagreementResult:
    """Head-to-head test of folded vs unfolded matching per layer pair of ``inputs`` (default
    consecutive layers with SAEs and activations); each pair cached on its own."""
    cfg = DisagreementConfig() if config is None else config

    def compute(la: int, lb: int) -> DisagreementResult:
        row = _disagreement_row(
            inputs.saes[la],
            inputs.saes[lb],
            inputs.acts(la),
            inputs.acts(lb),
            (la, lb),
            cfg.folded,
            cfg.unfolded,
            inputs.keep,
            cfg.n_examples,
            inputs.chunk_size,
            inputs.cache_dir,
        )
        return DisagreementResult(rows=(row,))

    parts = map_layer_pairs(
        DisagreementResult,
        inputs,
        inputs.layer_pairs(data=True),
        compute,
        spec={
            "folded": cfg.folded.to_dict(),
            "unfolded": cfg.unfolded.to_dict(),
            "n_examples": cfg.n_examples,
        },
        desc="folded vs unfolded",
    )
    return DisagreementResult(rows=tuple(r for part in parts for r in part.rows))
