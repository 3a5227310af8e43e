"""The primitives several experiments share, so that no experiment imports another.

- :mod:`~.coactivation`: the one co-activation of two SAEs' features on the same tokens (pairs of
  matchings, or every pair), per-pair agreement metrics, random partners;
- :mod:`~.scores`: the Matching Score of a layer pair (cached) and the folded-parameter MSE of
  matched pairs; the matchings the book compares;
- :mod:`~.verdict`: the data-free calibrated verdict on a matching (relative cost, rotated-partner
  null, Benjamini–Hochberg);
- :mod:`~.links`: below-chance links between two layers' features (splits, merges, births, deaths);
- :mod:`~.scales`: per-feature activation scales (what folding divides out) for any SAE family;
- :mod:`~.swap`: moving one SAE's codes into another's dictionary through a matching;
- :mod:`~.replacement`: one layer's output replaced inside the model, scored by ΔL, KL and EV;
- :mod:`~.contexts`: top-activating contexts of features on a flat activation cache;
- :mod:`~.summary`: summaries of per-layer series and the paper's depth conventions.

Import from the modules; this package re-exports nothing.
"""

__all__: list[str] = []
