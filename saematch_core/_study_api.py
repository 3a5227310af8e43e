"""The study's measures that ``compare``, ``align``, ``chain`` and ``suite`` use, imported in one place.

The calibrated verdict (rotated null, Benjamini–Hochberg), the split/merge link graph, co-activation
and the Matching Score, and the content-keyed result store live with the paper's experiments; this
module is the only place the comparison tools import them from.
"""

from __future__ import annotations

from saematch_core.decision import MatchDecision, decide_vectors, relative_cost_chunks
from saematch_core.evaluate import (
    MatchingScoreResult,
    coactivation,
    matching_scores,
    pair_metrics,
    random_partners,
)
from saematch_core.results import (
    ArrayLike,
    JsonResult,
    cached_match,
    cached_matches,
    finite_mean,
    sae_digest,
)
from saematch_core.results import _match_path as match_path
from saematch_core.splits import FeatureLinks, link_vectors

__all__ = [
    "ArrayLike",
    "FeatureLinks",
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
