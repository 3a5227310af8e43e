"""How close are matched features' parameters? MSE of matched folded parameters (Figs. 3, 12).

Every consecutive layer pair is matched by each method (identity order, unfolded, folded = SAE
Match, encoder-only, decoder-only, exact cosine, greedy cosine) and every method is *scored* the
same way, on the folded ``W_enc``, ``W_dec``, ``b_enc`` of its matched pairs
(:func:`~saematch_core.experiments.measures.scores.folded_pair_mse`), whatever objective it
optimised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from saematch_core.cost import feature_vectors
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scores import EVAL_PARAMS, default_methods, folded_pair_mse
from saematch_core.experiments.results import JsonResult, cached_match, cached_matches, map_layer_pairs
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

__all__ = ["ParameterMSEConfig", "ParameterMSEResult", "ParameterMSERow", "run"]


@dataclass(frozen=True, kw_only=True)
class ParameterMSEConfig:
    """What :func:`run` measures."""

    methods: Mapping[str, MatchConfig] = field(default_factory=default_methods)
    """Name → matching; default :func:`~saematch_core.experiments.measures.scores.default_methods`."""

    def __post_init__(self) -> None:
        if not isinstance(self.methods, Mapping) or not all(
            isinstance(v, MatchConfig) for v in self.methods.values()
        ):
            raise TypeError("ParameterMSEConfig.methods: expected a mapping name → MatchConfig")
        object.__setattr__(self, "methods", dict(self.methods))


@dataclass(frozen=True, kw_only=True)
class ParameterMSERow:
    """One matching method on one layer pair, scored on the folded parameters."""

    layer_a: int
    layer_b: int
    method: str
    mse: float
    """Mean over matched pairs of ``‖v_A[i] − v_B[perm i]‖² / D`` with ``v`` the folded concatenation
    of ``W_enc[:, i]``, ``W_dec[i]`` and ``b_enc[i]`` (``D = 2 d_in + 1``)."""
    mse_W_enc: float
    mse_W_dec: float
    mse_b_enc: float
    dec_norm_diff: float
    """Median over matched pairs of ``‖θ_B W_dec,B[perm i]‖ − ‖θ_A W_dec,A[i]‖``: how much longer
    the matched folded decoder row is one layer deeper (paper Fig. 1, right)."""
    n_matched: int
    identity_fraction: float
    """Fraction of features matched to the same index (1 for ``vanilla``)."""
    is_permutation: bool


@dataclass(frozen=True, kw_only=True)
class ParameterMSEResult(JsonResult):
    """Rows per (layer pair, method)."""

    kind: ClassVar[str] = "parameter_mse"
    rows: tuple[ParameterMSERow, ...]

    def series(self, method: str, metric: str = "mse") -> tuple[float, ...]:
        """``metric`` of ``method`` per layer pair (pairs in order)."""
        return tuple(float(getattr(r, metric)) for r in self.rows if r.method == method)

    def table(self, methods: Sequence[str]) -> tuple[list[str], Sequence[tuple[object, ...]]]:
        """Headers and rows: per method, the mean MSE over layer pairs, the mean fraction of
        features matched to the same index, and whether every matching is one-to-one."""
        rows = [
            (
                name,
                f"{np.mean(self.series(name)):.4g}",
                f"{np.mean(self.series(name, 'identity_fraction')):.3f}",
                all(r.is_permutation for r in self.rows if r.method == name),
            )
            for name in methods
        ]
        return [
            "method",
            "mean MSE over pairs",
            "mean fraction matched to the same index",
            "one-to-one",
        ], rows


def run(inputs: Inputs, config: ParameterMSEConfig | None = None) -> ParameterMSEResult:
    """MSE of matched parameters per layer pair of ``inputs`` (default consecutive layers) and
    matching method (Fig. 3, Fig. 12). Data-free; each pair is cached on its own, and the uncached
    pairs' matchings are solved up front in parallel."""
    methods = (ParameterMSEConfig() if config is None else config).methods
    saes, cache_dir = inputs.saes, inputs.cache_dir
    parts = map_layer_pairs(
        ParameterMSEResult,
        inputs,
        inputs.layer_pairs(),
        lambda la, lb: _parameter_mse_pair(saes[la], saes[lb], la, lb, methods, cache_dir),
        spec={"methods": {k: v.to_dict() for k, v in methods.items()}},
        desc="parameter MSE",
        data=False,
        prefetch=lambda missing: cached_matches(
            [(saes[la], saes[lb], cfg) for la, lb in missing for cfg in methods.values()], cache_dir
        ),
    )
    return ParameterMSEResult(rows=tuple(r for part in parts for r in part.rows))


def _parameter_mse_pair(
    a: SAE, b: SAE, la: int, lb: int, methods: Mapping[str, MatchConfig], cache_dir: Path | None
) -> ParameterMSEResult:
    rows = []
    norm_a, norm_b = (
        torch.linalg.vector_norm(feature_vectors(s, ("W_dec",), fold=True, dtype=torch.float64), dim=1)
        for s in (a, b)
    )
    for name, cfg in methods.items():
        res = cached_match(a, b, cfg, cache_dir)
        per = {p: folded_pair_mse(a, b, res.perm, (p,)) for p in EVAL_PARAMS}
        total = folded_pair_mse(a, b, res.perm, EVAL_PARAMS)
        ok = res.perm >= 0
        n = int(ok.sum())
        rows.append(
            ParameterMSERow(
                layer_a=la,
                layer_b=lb,
                method=name,
                mse=float(total[ok].mean()) if n else math.nan,
                mse_W_enc=float(per["W_enc"][ok].mean()) if n else math.nan,
                mse_W_dec=float(per["W_dec"][ok].mean()) if n else math.nan,
                mse_b_enc=float(per["b_enc"][ok].mean()) if n else math.nan,
                dec_norm_diff=float((norm_b[res.perm[ok]] - norm_a[ok]).median()) if n else math.nan,
                n_matched=n,
                identity_fraction=float((res.perm == torch.arange(res.perm.numel())).double().mean()),
                is_permutation=res.is_permutation,
            )
        )
    return ParameterMSEResult(rows=tuple(rows))
