"""The study's measures that ``compare``, ``align``, ``chain`` and ``suite`` use, imported in one place.

The calibrated verdict (rotated null, Benjamini–Hochberg), the split/merge link graph, co-activation
and the Matching Score, and the content-keyed result store live with the paper's experiments; this
module is the only place the comparison tools import them from.
"""

from __future__ import annotations

from saematch_core.experiments.inputs import ArrayLike, Inputs
from saematch_core.experiments.measures.coactivation import coactivation, pair_metrics, random_partners
from saematch_core.experiments.measures.links import FeatureLinks, link_vectors
from saematch_core.experiments.measures.scores import MatchingScoreResult, matching_scores
from saematch_core.experiments.measures.verdict import MatchDecision, decide_vectors, relative_cost_chunks
from saematch_core.experiments.results import (
    JsonResult,
    cached_match,
    cached_matches,
    finite_mean,
    sae_digest,
)
from saematch_core.experiments.results import _match_path as match_path

__all__ = [
    "ArrayLike",
    "FeatureLinks",
    "Inputs",
    "JsonResult",
    "MatchDecision",
    "MatchingScoreResult",
    "cached_match",
    "cached_matches",
    "coactivation",
    "decide_vectors",
    "finite_mean",
    "link_vectors",
    "match_path",
    "matching_scores",
    "pair_metrics",
    "random_partners",
    "relative_cost_chunks",
    "sae_digest",
]
