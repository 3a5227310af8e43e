"""Scores of a matching: the Matching Score on data, and the parameter MSE of its pairs.

- :func:`matching_scores`: the **Matching Score** of one or more matchings of a layer pair, the
  mean ``P(partner active | feature active)`` over a matching's included pairs (the paper's
  "probability that matched features fire together"; definitions in
  :mod:`saematch_core.experiments.measures.coactivation`), with Jaccard and Pearson means and a
  random null: ``perm`` replaced by uniformly random partners (seeded) under the same exclusion
  rules, its mean and standard deviation over draws reported. Cached per layer pair.
- :func:`folded_pair_mse`: the per-pair MSE of matched features on the folded parameters, whatever
  objective the matching optimised (the paper's Fig. 3 scoring).
- :func:`default_methods`: the matchings the book compares, by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from saematch_core.cost import feature_vectors, pair_costs
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.coactivation import (
    Coactivation,
    coactivation,
    pair_metrics,
    random_partners,
)
from saematch_core.experiments.results import (
    JsonResult,
    cached_match,
    finite_mean,
    load_or_compute,
    pair_spec,
    tensor_digest,
)
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

__all__ = [
    "EVAL_PARAMS",
    "MatchingScoreResult",
    "ScoreRow",
    "default_methods",
    "folded_pair_mse",
    "matching_scores",
]

EVAL_PARAMS: tuple[str, ...] = ("W_enc", "W_dec", "b_enc")
"""Parameters on which matched pairs' MSE is evaluated (folded), as in the paper's Fig. 3."""


def default_methods() -> dict[str, MatchConfig]:
    """The matchings compared in Figs. 3/4/12 and by the reviewers, by name.

    ``vanilla`` (identity order), ``unfolded`` and ``folded`` (all parameters, MSE, exact),
    ``encoder_only`` / ``decoder_only`` (folded), ``cosine`` (unfolded decoder rows, exact) and
    ``greedy_cosine`` (Feature Flow's greedy top-1 on decoder rows).
    """
    return {
        "vanilla": MatchConfig(solver="identity"),
        "unfolded": MatchConfig(fold=False),
        "folded": MatchConfig(fold=True),
        "encoder_only": MatchConfig(fold=True, params=("W_enc", "b_enc")),
        "decoder_only": MatchConfig(fold=True, params=("W_dec",)),
        "cosine": MatchConfig(fold=False, metric="cosine", params=("W_dec",)),
        "greedy_cosine": MatchConfig(fold=False, metric="cosine", params=("W_dec",), solver="greedy"),
    }


def folded_pair_mse(sae_a: SAE, sae_b: SAE, perm: Tensor, params: Sequence[str] = EVAL_PARAMS) -> Tensor:
    """Per-pair MSE (F_A,) of ``perm``'s pairs on the folded ``params`` (raw ones for non-JumpReLU SAEs)."""
    va = feature_vectors(sae_a, tuple(params), fold=True, dtype=torch.float64)
    vb = feature_vectors(sae_b, tuple(params), fold=True, dtype=torch.float64)
    return pair_costs(va, vb, perm, metric="mse")


@dataclass(frozen=True, kw_only=True)
class ScoreRow:
    """Summary of one matching (or of the random null) on one layer pair."""

    method: str
    matching_score: float
    """Mean ``p_partner`` over included pairs (the Matching Score)."""
    matching_score_sd: float
    """Standard deviation over null draws (0 for real matchings)."""
    jaccard: float
    pearson: float
    """Mean over included pairs with a defined correlation."""
    n_pairs: int
    """Included pairs (both alive, matched)."""
    n_unmatched: int
    n_dead_a: int
    """Dead features of SAE A (the same for every method)."""
    n_dead_b: int
    n_excluded: int
    """Pairs left out: unmatched or with a dead member."""


@dataclass(frozen=True, kw_only=True)
class MatchingScoreResult(JsonResult):
    """Matching Score per method on one layer pair, plus the random null."""

    kind: ClassVar[str] = "matching_score"
    layer_a: int
    layer_b: int
    n_tokens: int
    rows: tuple[ScoreRow, ...]

    def row(self, method: str) -> ScoreRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"method: no row {method!r}; have {[r.method for r in self.rows]}")


def _score_row(stats: Coactivation, names: Sequence[str], label: str) -> ScoreRow:
    scores, jac, pea, pairs, unmatched, excluded = [], [], [], [], [], []
    for name in names:
        m = pair_metrics(stats, name)
        scores.append(finite_mean(m["p_partner"]))
        jac.append(finite_mean(m["jaccard"]))
        pea.append(finite_mean(m["pearson"]))
        pairs.append(int(m["included"].sum()))
        unmatched.append(int((stats.perms[name] < 0).sum()))
        excluded.append(int((~m["included"]).sum()))
    arr = np.array(scores, dtype=np.float64)
    return ScoreRow(
        method=label,
        matching_score=float(np.mean(arr)),
        matching_score_sd=float(np.std(arr)) if len(arr) > 1 else 0.0,
        jaccard=float(np.mean(jac)),
        pearson=float(np.mean(pea)),
        n_pairs=round(float(np.mean(pairs))),
        n_unmatched=round(float(np.mean(unmatched))),
        n_dead_a=int(stats.dead_a.sum()),
        n_dead_b=int(stats.dead_b.sum()),
        n_excluded=round(float(np.mean(excluded))),
    )


def matching_scores(
    inputs: Inputs,
    layers: tuple[int, int],
    methods: Mapping[str, MatchConfig | Tensor] | None = None,
    *,
    saes: tuple[SAE, SAE] | None = None,
    n_null: int = 5,
) -> MatchingScoreResult:
    """Matching Score (and Jaccard / Pearson) of each method on one layer pair, with a random null.

    Parameters
    ----------
    inputs : activations of both layers (the same tokens), ``keep``, ``seed`` (of the null),
        ``chunk_size`` and the result cache.
    layers : (layer_a, layer_b): whose activations are encoded, recorded in the result.
    methods : name → MatchConfig (matched here) or a precomputed LongTensor (F_A,) matching;
        default ``folded``, ``unfolded`` and ``cosine`` from :func:`default_methods`.
    saes : the two SAEs; default ``inputs.saes`` of the two layers (give them to score another
        family, or two SAEs of the same layer).
    n_null : random matchings for the ``random`` row (0: none).

    Examples
    --------
    See ``tests/test_coactivation.py``: an SAE against itself under the identity scores 1.
    """
    la, lb = layers
    sae_a, sae_b = (inputs.saes[la], inputs.saes[lb]) if saes is None else saes
    acts_a, acts_b = inputs.acts(la), inputs.acts(lb)
    keep, seed, cache_dir = inputs.keep, inputs.seed, inputs.cache_dir
    if methods is None:
        base = default_methods()
        methods = {k: base[k] for k in ("folded", "unfolded", "cosine")}
    if not isinstance(n_null, int) or n_null < 0:
        raise ValueError(f"n_null: expected an int >= 0, got {n_null!r}")
    spec = pair_spec(sae_a, sae_b, layers, acts=(acts_a, acts_b), keep=keep)
    spec["methods"] = {
        k: (v.to_dict() if isinstance(v, MatchConfig) else tensor_digest(torch.as_tensor(v)))
        for k, v in methods.items()
    }
    spec.update(n_null=n_null, seed=seed)

    def compute() -> MatchingScoreResult:
        perms = {
            k: (
                cached_match(sae_a, sae_b, v, cache_dir).perm
                if isinstance(v, MatchConfig)
                else torch.as_tensor(v)
            )
            for k, v in methods.items()
        }
        g = torch.Generator().manual_seed(seed)
        nulls = [f"_null{i}" for i in range(n_null)]
        for name in nulls:
            perms[name] = random_partners(sae_a.d_sae, sae_b.d_sae, g)
        stats = coactivation(sae_a, sae_b, acts_a, acts_b, perms, keep=keep, chunk_size=inputs.chunk_size)
        rows = [_score_row(stats, [k], k) for k in methods]
        if nulls:
            rows.append(_score_row(stats, nulls, "random"))
        return MatchingScoreResult(layer_a=la, layer_b=lb, n_tokens=stats.n_tokens, rows=tuple(rows))

    return load_or_compute(MatchingScoreResult, spec, compute, cache_dir=cache_dir, force=inputs.force)
