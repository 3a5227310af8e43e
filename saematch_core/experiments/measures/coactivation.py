"""Data-free and data-based evaluation of feature matchings (paper Figs. 1, 3–7, 12).

Inputs are SAEs and, for the data-based measures, residual-stream activations of two layers *on
the same tokens*: arrays ``acts_a``, ``acts_b`` of shape (n_tokens, d_in) (tensors, numpy arrays or
memory maps), plus an optional boolean ``keep`` (n_tokens,) that is False for tokens to ignore
(position 0 of a chunk, padding, outliers). Activations are encoded in chunks of ``chunk_size``
rows, so memory stays ~ chunk_size × d_sae.

Definitions used throughout (one feature ``i`` of SAE A and its partner ``j = perm[i]`` of SAE B):

- *active*: feature ``i`` is active on token ``x`` when its code ``f_i(x) > 0``. Folding divides
  codes by ``θ > 0``, so activity and Pearson correlations are the same for folded and unfolded SAEs.
- *dead*: never active on the kept evaluation tokens. Pairs where either member is dead, or that
  have no partner (``perm[i] = −1``), are *excluded* from every mean and counted in the result.
- ``p_partner``: ``P(g_j > 0 | f_i > 0) = |A_i ∩ B_j| / |A_i|``, where ``A_i`` (``B_j``) is the set
  of kept tokens on which ``i`` (``j``) is active.
- ``jaccard``: ``|A_i ∩ B_j| / |A_i ∪ B_j|``.
- ``pearson``: Pearson correlation over kept tokens of the activation values ``f_i`` and ``g_j``.
- ``top_token_overlap``: Jaccard overlap of the sets of token *ids* at the ``top_k`` most activating
  tokens of ``i`` and of ``j``; ``top_position_overlap``: fraction of those ``top_k`` token
  *positions* the two share.

The **Matching Score** of a matching is the mean ``p_partner`` over its included pairs (the paper's
"probability that matched features fire together"). The random null replaces ``perm`` by uniformly
random partners (seeded) under the same exclusion rules; its mean and standard deviation over
draws are reported.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saematch_core.cost import feature_vectors, pair_costs
from saematch_core.match import MatchConfig
from saematch_core.results import (
    ArrayLike,
    JsonResult,
    acts_digest,
    array_rows,
    cached_match,
    cached_matches,
    finite_mean,
    load_or_compute,
    map_layer_pairs,
    pair_spec,
    tensor_digest,
)
from saematch_core.sae import SAE

__all__ = [
    "ArrayLike",
    "BinRow",
    "Coactivation",
    "MSEBinnedAgreement",
    "MatchingScoreResult",
    "PairRecord",
    "ParameterMSEResult",
    "ParameterMSERow",
    "ScaleDepthResult",
    "ScaleRow",
    "ScoreRow",
    "coactivation",
    "default_methods",
    "matching_scores",
    "matching_scores_by_layer",
    "mse_binned_agreement",
    "pair_metrics",
    "parameter_mse",
    "random_partners",
    "scale_vs_depth",
]

EVAL_PARAMS: tuple[str, ...] = ("W_enc", "W_dec", "b_enc")
"""Parameters on which matched pairs' MSE is evaluated (folded), as in the paper's Fig. 3."""


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


def _check_keep(keep: ArrayLike | None, n: int) -> Tensor:
    if keep is None:
        return torch.ones(n, dtype=torch.bool)
    t = keep if isinstance(keep, Tensor) else torch.from_numpy(np.asarray(keep))
    if t.shape != (n,):
        raise ValueError(f"keep: expected shape ({n},), got {tuple(t.shape)}")
    return t.bool().cpu()


# ============================================================================ scale vs depth (Fig. 1)
@dataclass(frozen=True, kw_only=True)
class ScaleRow:
    """Threshold statistics of one layer's SAE and the norm of its residual stream."""

    layer: int
    theta_mean: float
    """Mean JumpReLU threshold θ over features (``nan`` for other activations)."""
    theta_quantiles: tuple[float, ...]
    """θ at the quantiles :attr:`ScaleDepthResult.quantiles`."""
    norm_mean: float
    """Mean ‖h‖ over kept tokens (``nan`` without activations)."""
    norm_quantiles: tuple[float, ...]
    """‖h‖ at :attr:`ScaleDepthResult.quantiles`."""
    n_tokens: int


@dataclass(frozen=True, kw_only=True)
class ScaleDepthResult(JsonResult):
    """θ and hidden-state norm per layer (paper Fig. 1)."""

    kind: ClassVar[str] = "scale_vs_depth"
    quantiles: tuple[float, ...]
    rows: tuple[ScaleRow, ...]


def scale_vs_depth(
    saes: Mapping[int, SAE],
    activations: Mapping[int, ArrayLike] | None = None,
    *,
    norms: Mapping[int, ArrayLike] | None = None,
    keep: ArrayLike | Mapping[int, ArrayLike] | None = None,
    quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    chunk_size: int = 65536,
) -> ScaleDepthResult:
    """Mean and quantiles of θ per layer, next to the mean residual norm per layer (Fig. 1).

    Parameters
    ----------
    saes : layer → SAE.
    activations : layer → activations (n_tokens, d_in), optional; norms are computed from them.
    norms : layer → precomputed ‖h‖ per token (n_tokens,), optional (e.g. an activation cache's
        ``norms``); used for layers without ``activations``.
    keep : BoolTensor (n_tokens,), or layer → BoolTensor, optional; tokens counted in the norm
        statistics (e.g. without position 0 and outliers).

    Examples
    --------
    >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
    ...           threshold=torch.tensor([1.0, 3.0]))
    >>> scale_vs_depth({0: sae}).rows[0].theta_mean
    2.0
    """
    qs = np.array([float(q) for q in quantiles], dtype=np.float64)
    if qs.size == 0 or bool(((qs < 0) | (qs > 1)).any()):
        raise ValueError(f"quantiles: expected numbers in [0, 1], got {list(quantiles)}")
    nan_q = tuple(math.nan for _ in qs)
    rows = []
    for layer in sorted(set(saes) | set(activations or {}) | set(norms or {})):
        sae = saes.get(layer)
        if sae is not None and sae.threshold is not None:
            theta = sae.threshold.double().cpu().numpy()
            t_mean, t_q = float(theta.mean()), tuple(np.quantile(theta, qs).tolist())
        else:
            t_mean, t_q = math.nan, nan_q
        layer_norms = _layer_norms(layer, activations, norms, keep, chunk_size)
        n_tok, n_mean, n_q = 0, math.nan, nan_q
        if layer_norms is not None and layer_norms.size:
            n_tok = int(layer_norms.size)
            n_mean, n_q = float(layer_norms.mean()), tuple(np.quantile(layer_norms, qs).tolist())
        rows.append(
            ScaleRow(
                layer=layer,
                theta_mean=t_mean,
                theta_quantiles=t_q,
                norm_mean=n_mean,
                norm_quantiles=n_q,
                n_tokens=n_tok,
            )
        )
    return ScaleDepthResult(quantiles=tuple(qs.tolist()), rows=tuple(rows))


def _layer_norms(
    layer: int,
    activations: Mapping[int, ArrayLike] | None,
    norms: Mapping[int, ArrayLike] | None,
    keep: ArrayLike | Mapping[int, ArrayLike] | None,
    chunk_size: int,
) -> np.ndarray | None:
    """‖h‖ of the kept tokens of ``layer`` (float64), or ``None`` without data for it."""
    layer_keep = keep.get(layer) if isinstance(keep, Mapping) else keep
    if activations is not None and layer in activations:
        acts = activations[layer]
        n = _check_acts(f"activations[{layer}]", acts, int(acts.shape[1]))
        mask = _check_keep(layer_keep, n)
        parts = []
        for s in range(0, n, chunk_size):
            x = array_rows(acts, s, s + chunk_size, device=torch.device("cpu"), dtype=torch.float64)
            parts.append(torch.linalg.vector_norm(x, dim=1)[mask[s : s + chunk_size]].numpy())
        return np.concatenate(parts) if parts else np.zeros(0)
    if norms is not None and layer in norms:
        values = norms[layer]
        arr = (
            values.detach().cpu().double().numpy()
            if isinstance(values, Tensor)
            else np.asarray(values, np.float64)
        )
        if arr.ndim != 1:
            raise ValueError(f"norms[{layer}]: expected shape (n_tokens,), got {arr.shape}")
        return arr[_check_keep(layer_keep, arr.shape[0]).numpy()]
    return None


# ============================================================================ parameter MSE (Figs. 3, 12)
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


def _folded_pair_mse(sae_a: SAE, sae_b: SAE, perm: Tensor, params: Sequence[str]) -> Tensor:
    va = feature_vectors(sae_a, tuple(params), fold=True, dtype=torch.float64)
    vb = feature_vectors(sae_b, tuple(params), fold=True, dtype=torch.float64)
    return pair_costs(va, vb, perm, metric="mse")


def parameter_mse(
    saes: Mapping[int, SAE],
    pairs: Sequence[tuple[int, int]] | None = None,
    methods: Mapping[str, MatchConfig] | None = None,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> ParameterMSEResult:
    """MSE of matched parameters per layer pair and matching method (Fig. 3, Fig. 12).

    Every method is *scored* the same way, on folded ``W_enc``, ``W_dec``, ``b_enc`` (for
    non-JumpReLU SAEs, on the raw ones), whatever objective it optimised. Each pair is cached.

    Parameters
    ----------
    saes : layer → SAE.
    pairs : (layer_a, layer_b) pairs; default consecutive layers.
    methods : name → MatchConfig; default :func:`default_methods`.
    """
    methods = default_methods() if methods is None else dict(methods)
    layers = sorted(saes)
    pairs = list(itertools.pairwise(layers)) if pairs is None else list(pairs)
    parts = map_layer_pairs(
        ParameterMSEResult,
        saes,
        pairs,
        lambda la, lb: _parameter_mse_pair(saes[la], saes[lb], la, lb, methods, cache_dir),
        spec={"methods": {k: v.to_dict() for k, v in methods.items()}},
        desc="parameter MSE",
        cache_dir=cache_dir,
        force=force,
        progress=progress,
        prefetch=lambda missing: cached_matches(
            [(saes[la], saes[lb], cfg) for la, lb in missing for cfg in methods.values()], cache_dir
        ),
    )
    return ParameterMSEResult(rows=tuple(r for part in parts for r in part.rows))


def _parameter_mse_pair(
    a: SAE, b: SAE, la: int, lb: int, methods: Mapping[str, MatchConfig], cache_dir: str | Path | None
) -> ParameterMSEResult:
    rows = []
    for name, cfg in methods.items():
        res = cached_match(a, b, cfg, cache_dir)
        per = {p: _folded_pair_mse(a, b, res.perm, (p,)) for p in EVAL_PARAMS}
        total = _folded_pair_mse(a, b, res.perm, EVAL_PARAMS)
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
                n_matched=n,
                identity_fraction=float((res.perm == torch.arange(res.perm.numel())).double().mean()),
                is_permutation=res.is_permutation,
            )
        )
    return ParameterMSEResult(rows=tuple(rows))


# ============================================================================ co-activation statistics
def random_partners(f_a: int, f_b: int, generator: torch.Generator) -> Tensor:
    """A uniformly random one-to-one matching of ``f_a`` features into ``f_b`` (``-1`` for extras)."""
    r = torch.randperm(max(f_a, f_b), generator=generator)[:f_a]
    return torch.where(r < f_b, r, torch.full_like(r, -1))


@dataclass(frozen=True, eq=False)
class Coactivation:
    """Streaming statistics of two SAEs' codes on the same tokens, for several matchings at once.

    All counts are over kept tokens. Per-pair arrays are indexed by SAE A's feature ``i`` and refer
    to the pair ``(i, perms[name][i])``.
    """

    n_tokens: int
    perms: dict[str, Tensor]
    """name → LongTensor (F_A,), the matchings evaluated."""
    count_a: Tensor
    """(F_A,) tokens on which each A feature is active."""
    count_b: Tensor
    """(F_B,) same for B."""
    sum_a: Tensor
    sq_a: Tensor
    sum_b: Tensor
    sq_b: Tensor
    both: dict[str, Tensor]
    """name → (F_A,) tokens on which ``i`` and its partner are both active."""
    prod: dict[str, Tensor]
    """name → (F_A,) Σ f_i g_perm(i) (float64)."""
    top_a: Tensor | None
    """(top_k, F_A) flat indices (into the activation rows) of each A feature's top activations; -1 pads."""
    top_b: Tensor | None
    """(top_k, F_B) same for B."""
    token_ids: Tensor | None
    """(n_rows,) token id of every activation row, when given (for ``top_token_overlap``)."""

    @property
    def dead_a(self) -> Tensor:
        return self.count_a == 0

    @property
    def dead_b(self) -> Tensor:
        return self.count_b == 0


def _topk_update(best_v: Tensor, best_i: Tensor, v: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    vv = torch.cat([best_v, v])
    ii = torch.cat([best_i, idx[:, None].expand_as(v)])
    top = torch.topk(vv, min(k, vv.shape[0]), dim=0)
    return top.values, ii.gather(0, top.indices)


def _zero_sums(fa: int, fb: int, perms: dict[str, Tensor], token_ids: Tensor | None = None) -> Coactivation:
    """A :class:`Coactivation` with every sum zero, for :func:`_add_pair_sums` to fill in place."""
    z = functools.partial(torch.zeros, dtype=torch.float64)
    return Coactivation(
        n_tokens=0,
        perms=perms,
        count_a=z(fa),
        count_b=z(fb),
        sum_a=z(fa),
        sq_a=z(fa),
        sum_b=z(fb),
        sq_b=z(fb),
        both={k: z(fa) for k in perms},
        prod={k: z(fa) for k in perms},
        top_a=None,
        top_b=None,
        token_ids=token_ids,
    )


def _add_pair_sums(
    sums: Coactivation, ca: Tensor, cb: Tensor, safe: Mapping[str, Tensor], has: Mapping[str, Tensor]
) -> None:
    """Add one chunk of codes ``ca`` (n, F_A) and ``cb`` (n, F_B) to the float64 sums of ``sums``.

    Works on the codes' nonzeros only (a few percent of the entries for a sparse SAE), so the cost
    grows with L0, not with the width; :func:`_add_pair_sums_dense` is the reference.
    """
    f64 = torch.float64
    for codes, count, total, squares in (
        (cb, sums.count_b, sums.sum_b, sums.sq_b),
        (ca, sums.count_a, sums.sum_a, sums.sq_a),  # last: its nonzeros are reused below
    ):
        tok, feat = codes.nonzero(as_tuple=True)
        vals = codes[tok, feat].to(f64)
        feat_cpu, vals_cpu = feat.cpu(), vals.cpu()
        count.index_add_(0, feat_cpu, (vals_cpu > 0).to(f64))
        total.index_add_(0, feat_cpu, vals_cpu)
        squares.index_add_(0, feat_cpu, vals_cpu * vals_cpu)
    va = vals
    for k in safe:
        partner = cb[tok, safe[k][feat]].to(f64) * has[k][feat]
        sums.both[k].index_add_(0, feat_cpu, ((va > 0) & (partner > 0)).to(f64).cpu())
        sums.prod[k].index_add_(0, feat_cpu, (va * partner).cpu())


def _add_pair_sums_dense(
    sums: Coactivation, ca: Tensor, cb: Tensor, safe: Mapping[str, Tensor], has: Mapping[str, Tensor]
) -> None:
    """Reference for :func:`_add_pair_sums`: the same sums over every (token, feature) entry."""
    ca, cb = ca.double(), cb.double()
    act_a, act_b = ca > 0, cb > 0
    sums.count_a.add_(act_a.sum(0).cpu())
    sums.count_b.add_(act_b.sum(0).cpu())
    sums.sum_a.add_(ca.sum(0).cpu())
    sums.sq_a.add_((ca * ca).sum(0).cpu())
    sums.sum_b.add_(cb.sum(0).cpu())
    sums.sq_b.add_((cb * cb).sum(0).cpu())
    for k in safe:
        partner = cb.index_select(1, safe[k]) * has[k]
        sums.both[k].add_((act_a & (partner > 0)).sum(0).cpu())
        sums.prod[k].add_((ca * partner).sum(0).cpu())


def coactivation(
    sae_a: SAE,
    sae_b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    perms: Mapping[str, Tensor],
    *,
    keep: ArrayLike | None = None,
    top_k: int = 0,
    token_ids: ArrayLike | None = None,
    chunk_size: int = 4096,
    progress: bool = False,
) -> Coactivation:
    """One pass over the tokens collecting everything :func:`pair_metrics` needs.

    Parameters
    ----------
    sae_a, sae_b : SAEs of the two layers.
    acts_a, acts_b : (n_tokens, d_in) activations of the two layers on the same tokens.
    perms : name → LongTensor (F_A,), matchings of A's features into B's (``-1``: none).
    keep : BoolTensor (n_tokens,), optional.
    top_k : how many top activations per feature to keep (0: none).
    token_ids : (n_tokens,) token ids of the rows, optional (for ``top_token_overlap``).
    """
    n = _check_acts("acts_a", acts_a, sae_a.d_in)
    _check_acts("acts_b", acts_b, sae_b.d_in, n)
    mask = _check_keep(keep, n)
    fa, fb = sae_a.d_sae, sae_b.d_sae
    checked = {}
    for name, p in perms.items():
        p = torch.as_tensor(p, dtype=torch.long).cpu()
        if p.shape != (fa,) or (p.numel() and (int(p.min()) < -1 or int(p.max()) >= fb)):
            raise ValueError(f"perms[{name!r}]: expected a LongTensor (F_A={fa},) with entries in [-1, {fb})")
        checked[name] = p
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")
    ids = None
    if token_ids is not None:
        ids = token_ids if isinstance(token_ids, Tensor) else torch.from_numpy(np.asarray(token_ids))
        if ids.shape != (n,):
            raise ValueError(f"token_ids: expected shape ({n},), got {tuple(ids.shape)}")
        ids = ids.long().cpu()
    dev, f64 = sae_a.device, torch.float64
    sums = _zero_sums(fa, fb, checked, ids)
    safe = {k: p.clamp(min=0).to(dev) for k, p in checked.items()}
    has = {k: (p >= 0).to(dev) for k, p in checked.items()}
    top = None
    if top_k:
        top = [
            torch.full((0, fa), -math.inf, dtype=f64),
            torch.zeros((0, fa), dtype=torch.long),
            torch.full((0, fb), -math.inf, dtype=f64),
            torch.zeros((0, fb), dtype=torch.long),
        ]
    n_kept = 0
    starts = range(0, n, chunk_size)
    for s in tqdm(starts, desc="co-activation", leave=False, disable=not progress):
        m = mask[s : s + chunk_size]
        if not bool(m.any()):
            continue
        rows = m.nonzero().flatten()
        with torch.no_grad():
            xa = array_rows(acts_a, s, s + chunk_size, device=dev, dtype=sae_a.dtype)
            xb = array_rows(acts_b, s, s + chunk_size, device=dev, dtype=sae_b.dtype)
            ca = sae_a.encode(xa[rows.to(dev)])
            cb = sae_b.encode(xb[rows.to(dev)])
        n_kept += int(rows.numel())
        _add_pair_sums(sums, ca, cb, safe, has)
        if top is not None:
            flat = (rows + s).cpu()
            top[0], top[1] = _topk_update(top[0], top[1], ca.to(f64).cpu(), flat, top_k)
            top[2], top[3] = _topk_update(top[2], top[3], cb.to(f64).cpu(), flat, top_k)
    top_a = top_b = None
    if top is not None:
        # Only positive activations count as "top activating"; the rest are padding.
        top_a = torch.where(top[0] > 0, top[1], torch.full_like(top[1], -1))
        top_b = torch.where(top[2] > 0, top[3], torch.full_like(top[3], -1))
    return dataclasses.replace(sums, n_tokens=n_kept, top_a=top_a, top_b=top_b)


def _set_jaccard(a: Tensor, b: Tensor) -> float:
    sa = {int(v) for v in a.tolist() if v >= 0}
    sb = {int(v) for v in b.tolist() if v >= 0}
    union = sa | sb
    return len(sa & sb) / len(union) if union else math.nan


def pair_metrics(stats: Coactivation, name: str) -> dict[str, Tensor]:
    """Per-pair agreement of matching ``name`` (module docstring definitions).

    Returns
    -------
    dict of float64 tensors (F_A,): ``p_partner``, ``jaccard``, ``pearson``, ``top_token_overlap``,
    ``top_position_overlap`` (``nan`` where excluded or not collected) and bool ``included``.
    """
    if name not in stats.perms:
        raise KeyError(f"name: expected one of {sorted(stats.perms)}, got {name!r}")
    perm = stats.perms[name]
    has = perm >= 0
    safe = perm.clamp(min=0)
    cb = stats.count_b[safe]
    included = has & (stats.count_a > 0) & (cb > 0)
    nan = torch.full_like(stats.count_a, math.nan)
    both = stats.both[name]
    n = max(stats.n_tokens, 1)
    p_partner = torch.where(included, both / stats.count_a.clamp(min=1), nan)
    union = stats.count_a + cb - both
    jaccard = torch.where(included, both / union.clamp(min=1), nan)
    mean_a, mean_b = stats.sum_a / n, stats.sum_b[safe] / n
    cov = stats.prod[name] / n - mean_a * mean_b
    var_a = (stats.sq_a / n - mean_a**2).clamp(min=0)
    var_b = (stats.sq_b[safe] / n - mean_b**2).clamp(min=0)
    denom = (var_a * var_b).sqrt()
    pearson = torch.where(included & (denom > 0), cov / denom.clamp(min=1e-300), nan)
    tok_ov = nan.clone()
    pos_ov = nan.clone()
    if stats.top_a is not None and stats.top_b is not None:
        k = stats.top_a.shape[0]
        for i in included.nonzero().flatten().tolist():
            ta, tb = stats.top_a[:, i], stats.top_b[:, int(perm[i])]
            pa = {int(v) for v in ta.tolist() if v >= 0}
            pb = {int(v) for v in tb.tolist() if v >= 0}
            pos_ov[i] = len(pa & pb) / k
            if stats.token_ids is not None:
                tok_ov[i] = _set_jaccard(
                    stats.token_ids[ta.clamp(min=0)][ta >= 0], stats.token_ids[tb.clamp(min=0)][tb >= 0]
                )
    return {
        "p_partner": p_partner,
        "jaccard": jaccard,
        "pearson": pearson,
        "top_token_overlap": tok_ov,
        "top_position_overlap": pos_ov,
        "included": included,
    }


# ============================================================================ matching score (Figs. 4/7)
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
    sae_a: SAE,
    sae_b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    methods: Mapping[str, MatchConfig | Tensor] | None = None,
    *,
    layers: tuple[int, int] = (-1, -1),
    keep: ArrayLike | None = None,
    n_null: int = 5,
    seed: int = 0,
    chunk_size: int = 4096,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> MatchingScoreResult:
    """Matching Score (and Jaccard / Pearson) of each method on one layer pair, with a random null.

    Parameters
    ----------
    methods : name → MatchConfig (matched here) or a precomputed LongTensor (F_A,) matching;
        default ``folded``, ``unfolded`` and ``cosine`` from :func:`default_methods`.
    layers : (layer_a, layer_b), recorded in the result.
    n_null : random matchings for the ``random`` row (0: none).

    Examples
    --------
    See ``tests/test_evaluate.py``: an SAE against itself under the identity scores 1.
    """
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
        stats = coactivation(sae_a, sae_b, acts_a, acts_b, perms, keep=keep, chunk_size=chunk_size)
        rows = [_score_row(stats, [k], k) for k in methods]
        if nulls:
            rows.append(_score_row(stats, nulls, "random"))
        return MatchingScoreResult(
            layer_a=layers[0], layer_b=layers[1], n_tokens=stats.n_tokens, rows=tuple(rows)
        )

    return load_or_compute(MatchingScoreResult, spec, compute, cache_dir=cache_dir, force=force)


def matching_scores_by_layer(
    saes: Mapping[int, SAE],
    activations: Mapping[int, ArrayLike],
    methods: Mapping[str, MatchConfig] | None = None,
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    keep: ArrayLike | None = None,
    n_null: int = 5,
    seed: int = 0,
    chunk_size: int = 4096,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[MatchingScoreResult, ...]:
    """:func:`matching_scores` for every layer pair (default: consecutive layers with both SAEs and
    activations), each cached on its own (Figs. 4/7)."""
    if pairs is None:
        layers = sorted(set(saes) & set(activations))
        pairs = list(itertools.pairwise(layers))
    out = []
    for la, lb in tqdm(list(pairs), desc="matching scores", disable=not progress):
        out.append(
            matching_scores(
                saes[la],
                saes[lb],
                activations[la],
                activations[lb],
                methods,
                layers=(la, lb),
                keep=keep,
                n_null=n_null,
                seed=seed,
                chunk_size=chunk_size,
                cache_dir=cache_dir,
                force=force,
            )
        )
    return tuple(out)


# ======================================================================= MSE-binned agreement (Figs. 5/6)
@dataclass(frozen=True, kw_only=True)
class PairRecord:
    """One matched pair with its folded-parameter MSE and data-based agreement."""

    feature: int
    partner: int
    mse: float
    p_partner: float
    jaccard: float
    pearson: float
    top_token_overlap: float
    top_position_overlap: float
    included: bool
    """False when unmatched or a member is dead (agreement values are then ``nan``)."""


@dataclass(frozen=True, kw_only=True)
class BinRow:
    """Pairs whose MSE falls in ``[lo, hi)`` (the last bin includes ``hi``)."""

    lo: float
    hi: float
    n_pairs: int
    p_partner: float
    jaccard: float
    pearson: float
    top_token_overlap: float
    top_position_overlap: float


@dataclass(frozen=True, kw_only=True)
class MSEBinnedAgreement(JsonResult):
    """Agreement vs per-pair matching MSE on one layer pair (Figs. 5/6 without an LLM judge)."""

    kind: ClassVar[str] = "mse_binned_agreement"
    layer_a: int
    layer_b: int
    n_tokens: int
    bins: tuple[BinRow, ...]
    pairs: tuple[PairRecord, ...] = field(default=())


_AGREEMENT = ("p_partner", "jaccard", "pearson", "top_token_overlap", "top_position_overlap")


def mse_binned_agreement(
    sae_a: SAE,
    sae_b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    config: MatchConfig | None = None,
    *,
    layers: tuple[int, int] = (-1, -1),
    keep: ArrayLike | None = None,
    token_ids: ArrayLike | None = None,
    n_bins: int = 10,
    top_k: int = 20,
    chunk_size: int = 4096,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> MSEBinnedAgreement:
    """Match (default: folded, paper objective), score every pair's MSE on the folded parameters, and
    bin the included pairs by MSE quantiles, with the mean agreement in each bin.

    Parameters
    ----------
    token_ids : (n_tokens,) token ids of the activation rows, for ``top_token_overlap``.
    n_bins : equal-count bins over the included pairs' MSE.
    top_k : top activations per feature for the overlap measures.
    """
    cfg = MatchConfig() if config is None else config
    spec = pair_spec(sae_a, sae_b, layers, acts=(acts_a, acts_b), keep=keep)
    spec.update(
        token_ids=None if token_ids is None else acts_digest(token_ids),
        config=cfg.to_dict(),
        n_bins=n_bins,
        top_k=top_k,
    )

    def compute() -> MSEBinnedAgreement:
        perm = cached_match(sae_a, sae_b, cfg, cache_dir).perm
        mse = _folded_pair_mse(sae_a, sae_b, perm, EVAL_PARAMS)
        stats = coactivation(
            sae_a,
            sae_b,
            acts_a,
            acts_b,
            {"m": perm},
            keep=keep,
            top_k=top_k,
            token_ids=token_ids,
            chunk_size=chunk_size,
        )
        met = pair_metrics(stats, "m")
        return _binned(mse, perm, met, n_bins, layers, stats.n_tokens)

    return load_or_compute(MSEBinnedAgreement, spec, compute, cache_dir=cache_dir, force=force)


def _binned(
    mse: Tensor, perm: Tensor, met: Mapping[str, Tensor], n_bins: int, layers: tuple[int, int], n_tokens: int
) -> MSEBinnedAgreement:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins: expected an int >= 1, got {n_bins!r}")
    inc = met["included"]
    pairs = tuple(
        PairRecord(
            feature=i,
            partner=int(perm[i]),
            mse=float(mse[i]),
            included=bool(inc[i]),
            **{k: float(met[k][i]) for k in _AGREEMENT},
        )
        for i in range(perm.numel())
    )
    vals = mse[inc]
    bins = []
    if vals.numel():
        edges = torch.quantile(vals, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))
        for b in range(n_bins):
            lo, hi = float(edges[b]), float(edges[b + 1])
            upper = mse <= hi if b == n_bins - 1 else mse < hi
            sel = inc & (mse >= lo) & upper
            bins.append(
                BinRow(
                    lo=lo,
                    hi=hi,
                    n_pairs=int(sel.sum()),
                    **{k: finite_mean(met[k][sel]) for k in _AGREEMENT},
                )
            )
    return MSEBinnedAgreement(
        layer_a=layers[0], layer_b=layers[1], n_tokens=n_tokens, bins=tuple(bins), pairs=pairs
    )
