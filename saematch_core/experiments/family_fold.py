"""A folding analogue for TopK and ReLU SAEs, and the comparison across SAE families.

Folding (paper Eq. 4) divides each JumpReLU feature's encoder column and bias by its threshold θ
and multiplies its decoder row by θ: the threshold is a per-feature *activation scale*, and folding
moves it from the codes into the weights. TopK and ReLU SAEs have no θ, but every feature still
has an activation scale ``s_i``. Two estimates:

- ``"data"``: ``s_i = E[f_i | f_i > 0]``, the mean activation of the feature where it is active,
  over real tokens (:func:`activation_scale`);
- ``"weights"``: ``s_i = ‖b_dec‖ · ‖W_enc[:, i]‖``, the code an input of the layer's typical
  size (trained decoder biases sit near the data mean) would give along the feature's encoder
  direction; data-free, crude (:func:`weight_scale`).

Scaling by ``s`` (``W_enc[:, i] / s_i``, ``b_enc[i] / s_i``, ``W_dec[i] · s_i``) preserves a ReLU
SAE's output (positive homogeneity; :func:`saematch_core.fold.rescale_features`), but **not** a TopK
SAE's: dividing the pre-activations by different ``s_i`` changes which ``k`` features win. So the
scaled weights are used only as *matching vectors* (:func:`scaled_vectors`,
:func:`match_scaled`), never as a model. For JumpReLU, ``s = θ`` is exactly folding.

:func:`family_comparison` asks the reviewers' question: on SAEs of the same layers trained with
each activation, does matching the scaled vectors beat matching the raw ones by a similar margin
in every family (then the scale correction drives the gain), or only for JumpReLU?
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from saematch_core.cost import DEFAULT_PARAMS, normalize_rows, pair_costs
from saematch_core.databased import iter_code_pairs
from saematch_core.evaluate import matching_scores
from saematch_core.lap import solve
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.results import (
    ArrayLike,
    JsonResult,
    acts_digest,
    cached_match,
    finite_mean,
    map_layer_pairs,
    parallel_map,
)
from saematch_core.sae import SAE

__all__ = [
    "SCALE_SOURCES",
    "FamilyFoldResult",
    "FamilyRow",
    "ScaleSource",
    "activation_scale",
    "family_comparison",
    "fill_dead_scale",
    "match_scaled",
    "scaled_vectors",
    "token_halves",
    "weight_scale",
]

ScaleSource = Literal["data", "weights"]
SCALE_SOURCES: tuple[str, ...] = get_args(ScaleSource)


def activation_scale(
    sae: SAE, acts: ArrayLike, *, keep: ArrayLike | None = None, chunk_size: int = 4096
) -> Tensor:
    """Mean activation of every feature over the tokens where it is active.

    Parameters
    ----------
    sae : SAE of any family.
    acts : (n_tokens, d_in) residual activations of the SAE's layer.
    keep : BoolTensor (n_tokens,), optional; tokens to use.

    Returns
    -------
    Tensor, float64, shape (d_sae,): ``E[f_i | f_i > 0]``; ``nan`` for features never active.
    """
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    count = torch.zeros(sae.d_sae, dtype=torch.float64)
    for codes, _ in iter_code_pairs(sae, None, acts, None, keep=keep, chunk_size=chunk_size):
        c = codes.detach().to("cpu", torch.float64)
        total += c.sum(0)
        count += (c > 0).double().sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def weight_scale(sae: SAE) -> Tensor:
    """Data-free scale ``‖b_dec‖ · ‖W_enc[:, i]‖`` per feature, float64, shape (d_sae,).

    Raises if ``b_dec`` is zero (no information about the layer's size).
    """
    nb = float(torch.linalg.vector_norm(sae.b_dec.double()))
    if not nb > 0:
        raise ValueError("sae.b_dec: expected a non-zero decoder bias for the weight-based scale, got zeros")
    return nb * torch.linalg.vector_norm(sae.W_enc.double(), dim=0).cpu()


def fill_dead_scale(scale: Tensor) -> Tensor:
    """Replace ``nan`` / non-positive entries (dead features) by the median of the valid ones.

    A dead feature has no measured scale; the layer's typical one keeps its vector comparable.
    """
    s = torch.as_tensor(scale, dtype=torch.float64)
    ok = torch.isfinite(s) & (s > 0)
    if not bool(ok.any()):
        raise ValueError("scale: expected at least one finite entry > 0, got none")
    return torch.where(ok, s, s[ok].median())


def _check_scale(sae: SAE, scale: Tensor, name: str) -> Tensor:
    s = torch.as_tensor(scale, dtype=torch.float64).cpu()
    if s.shape != (sae.d_sae,):
        raise ValueError(f"{name}: expected shape ({sae.d_sae},), got {tuple(s.shape)}")
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError(f"{name}: expected every entry finite and > 0 (see fill_dead_scale)")
    return s


def scaled_vectors(
    sae: SAE, scale: Tensor, params: Sequence[str] = DEFAULT_PARAMS, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Matching vectors of ``sae`` with every feature rescaled by ``scale``.

    ``W_enc[:, i] / s_i``, ``W_dec[i] · s_i``, ``b_enc[i] / s_i``, concatenated in ``params`` order,
    from the *raw* (unfolded) weights. For JumpReLU with ``scale = θ`` this equals the folded vectors.

    Returns
    -------
    Tensor, shape (d_sae, D), CPU.
    """
    s = _check_scale(sae, scale, "scale")
    raw = {"W_enc": sae.W_enc.T, "W_dec": sae.W_dec, "b_enc": sae.b_enc[:, None]}
    parts = []
    for p in params:
        if p not in raw:
            raise ValueError(f"params: expected names from {sorted(raw)}, got {p!r}")
        block = raw[p].detach().to("cpu", torch.float64)
        parts.append(block * s[:, None] if p == "W_dec" else block / s[:, None])
    return torch.cat(parts, dim=1).to(dtype)


def match_scaled(
    sae_a: SAE, sae_b: SAE, scale_a: Tensor, scale_b: Tensor, config: MatchConfig | None = None
) -> MatchResult:
    """Match on :func:`scaled_vectors` of both SAEs (any family); ``config.fold`` is ignored.

    The per-pair costs in the result are on the scaled vectors.
    """
    cfg = MatchConfig() if config is None else config
    t0 = time.perf_counter()
    va = scaled_vectors(sae_a, scale_a, cfg.params, dtype=cfg.torch_dtype)
    vb = scaled_vectors(sae_b, scale_b, cfg.params, dtype=cfg.torch_dtype)
    x, y = va, vb
    if cfg.metric == "cosine":
        x, y = normalize_rows(x, name="a"), normalize_rows(y, name="b")
    res = solve(
        cfg.solver,
        x,
        y,
        metric=cfg.metric,
        chunk_size=cfg.chunk_size,
        k=cfg.sparse_k,
        candidates=cfg.sparse_candidates,
    )
    perm = torch.as_tensor(res.cols, dtype=torch.long)
    cost = pair_costs(va, vb, perm, metric=cfg.metric)
    ok = perm >= 0
    used = perm[ok]
    return MatchResult(
        perm=perm,
        cost=cost,
        total_cost=float(cost[ok].sum()) if bool(ok.any()) else 0.0,
        solver=cfg.solver,
        is_permutation=bool(torch.unique(used).numel() == used.numel()),
        shape=(sae_a.d_sae, sae_b.d_sae),
        timings={"total": time.perf_counter() - t0},
        config=cfg,
        folded=(False, False),
        info=res.info,
    )


def token_halves(keep: ArrayLike, groups: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Split kept tokens into two disjoint halves by group (e.g. chunk id): even groups, odd groups.

    For estimating activation scales on one half and scoring matchings on the other, without
    splitting a text between them.

    >>> fit, held = token_halves(np.array([True, True, False, True]), np.array([0, 1, 2, 3]))
    >>> fit.tolist(), held.tolist()
    ([True, False, False, False], [False, True, False, True])
    """
    k = np.asarray(keep, dtype=bool)
    g = np.asarray(groups)
    if k.shape != g.shape or k.ndim != 1:
        raise ValueError(f"keep, groups: expected equal 1-D shapes, got {k.shape} and {g.shape}")
    even = (g.astype(np.int64) % 2) == 0
    return k & even, k & ~even


# ----------------------------------------------------------------------------------- comparison
@dataclass(frozen=True, kw_only=True)
class FamilyRow:
    """One matching method for one SAE family on one layer pair, scored on data."""

    family: str
    """``jumprelu``, ``topk``, ``relu`` (or any name the caller used)."""
    layer_a: int
    layer_b: int
    method: str
    """``raw`` (unscaled weights), ``data_scale``, ``weight_scale``, ``theta`` (JumpReLU folding)."""
    matching_score: float
    """Mean ``P(partner active | feature active)`` over included pairs (:mod:`saematch_core.evaluate`)."""
    random_score: float
    """The same for random partners."""
    pearson: float
    n_pairs: int
    agreement_with_raw: float
    """Fraction of features whose partner is the same as under ``raw`` matching."""


@dataclass(frozen=True, kw_only=True)
class FamilyFoldResult(JsonResult):
    """Rows per (family, layer pair, method)."""

    kind: ClassVar[str] = "family_fold"
    rows: tuple[FamilyRow, ...]

    def series(self, family: str, method: str, metric: str = "matching_score") -> tuple[float, ...]:
        return tuple(
            float(getattr(r, metric)) for r in self.rows if r.family == family and r.method == method
        )

    def mean(self, family: str, method: str, metric: str = "matching_score") -> float:
        """Mean of :meth:`series` over layer pairs where it is defined (``nan`` if nowhere)."""
        return finite_mean(self.series(family, method, metric))

    def gain(self, family: str, method: str, baseline: str = "raw") -> tuple[float, ...]:
        """Matching Score of ``method`` minus ``baseline`` per layer pair, for one family."""
        return tuple(
            x - y for x, y in zip(self.series(family, method), self.series(family, baseline), strict=True)
        )


def _family_perms(
    a: SAE,
    b: SAE,
    scale_a: Tensor | None,
    scale_b: Tensor | None,
    cfg: MatchConfig,
    cache_dir: str | Path | None,
) -> dict[str, Tensor]:
    ones_a, ones_b = torch.ones(a.d_sae, dtype=torch.float64), torch.ones(b.d_sae, dtype=torch.float64)
    scales = {"raw": (ones_a, ones_b)}
    if scale_a is not None and scale_b is not None:
        scales["data_scale"] = (scale_a, scale_b)
    if float(a.b_dec.abs().sum()) > 0 and float(b.b_dec.abs().sum()) > 0:
        scales["weight_scale"] = (weight_scale(a), weight_scale(b))
    # Independent exact solves: in parallel (see results.parallel_map).
    solved = parallel_map(lambda sc: match_scaled(a, b, sc[0], sc[1], cfg).perm, list(scales.values()))
    perms = dict(zip(scales, solved, strict=True))
    if a.activation == "jumprelu" and b.activation == "jumprelu":
        perms["theta"] = cached_match(a, b, replace(cfg, fold=True), cache_dir).perm
    return perms


def family_comparison(
    families: Mapping[str, Mapping[int, SAE]],
    activations: Mapping[int, ArrayLike],
    config: MatchConfig | None = None,
    *,
    scale_activations: Mapping[int, ArrayLike] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    keep: ArrayLike | None = None,
    scale_keep: ArrayLike | None = None,
    n_null: int = 3,
    seed: int = 0,
    chunk_size: int = 4096,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> FamilyFoldResult:
    """Raw vs scale-corrected matching for every SAE family on the same layers, scored on data.

    Parameters
    ----------
    families : family name → (layer → SAE); e.g. ``{"jumprelu": ..., "topk": ..., "relu": ...}``.
    activations : layer → (n_tokens, d_in), the tokens the Matching Score is measured on.
    config : matching objective (params, metric, solver) shared by every method; default the paper's.
    scale_activations : layer → activations for estimating the ``data`` scale; default
        ``activations`` (use separate tokens to keep estimation and evaluation apart).
    pairs : layer pairs; default consecutive layers present in every family and in ``activations``.
    keep, scale_keep : token masks for ``activations`` and ``scale_activations``.
    n_null : random matchings for the random row.

    Every (family, pair) is cached; the Matching Scores themselves are cached by
    :func:`saematch_core.evaluate.matching_scores`.
    """
    cfg = MatchConfig() if config is None else config
    fit = activations if scale_activations is None else scale_activations
    fit_keep = keep if scale_activations is None else scale_keep
    if pairs is None:
        common = set(activations)
        for layer_map in families.values():
            common &= set(layer_map)
        pairs = list(itertools.pairwise(sorted(common)))

    def extra_spec(fam: str, la: int, lb: int) -> dict[str, Any]:
        return {
            "family": fam,
            "config": cfg.to_dict(),
            "fit": [acts_digest(fit[la]), acts_digest(fit[lb])] if la in fit and lb in fit else None,
            "fit_keep": None if fit_keep is None else acts_digest(fit_keep),
            "n_null": n_null,
            "seed": seed,
        }

    def compute(fam: str, la: int, lb: int) -> FamilyFoldResult:
        a, b = families[fam][la], families[fam][lb]
        sa = sb = None
        if la in fit and lb in fit:
            sa = fill_dead_scale(activation_scale(a, fit[la], keep=fit_keep, chunk_size=chunk_size))
            sb = fill_dead_scale(activation_scale(b, fit[lb], keep=fit_keep, chunk_size=chunk_size))
        perms = _family_perms(a, b, sa, sb, cfg, cache_dir)
        scores = matching_scores(
            a,
            b,
            activations[la],
            activations[lb],
            dict(perms),
            layers=(la, lb),
            keep=keep,
            n_null=n_null,
            seed=seed,
            chunk_size=chunk_size,
            cache_dir=cache_dir,
        )
        rnd = scores.row("random").matching_score if n_null else math.nan
        raw = perms["raw"]
        out = []
        for name, perm in perms.items():
            r = scores.row(name)
            out.append(
                FamilyRow(
                    family=fam,
                    layer_a=la,
                    layer_b=lb,
                    method=name,
                    matching_score=r.matching_score,
                    random_score=rnd,
                    pearson=r.pearson,
                    n_pairs=r.n_pairs,
                    agreement_with_raw=float((perm == raw).double().mean()),
                )
            )
        return FamilyFoldResult(rows=tuple(out))

    rows: list[FamilyRow] = []
    for fam, saes in families.items():
        parts = map_layer_pairs(
            FamilyFoldResult,
            saes,
            pairs,
            functools.partial(compute, fam),
            spec=functools.partial(extra_spec, fam),
            activations=activations,
            keep=keep,
            desc=f"family folding ({fam})",
            cache_dir=cache_dir,
            force=force,
            progress=progress,
        )
        rows.extend(r for part in parts for r in part.rows)
    return FamilyFoldResult(rows=tuple(rows))
