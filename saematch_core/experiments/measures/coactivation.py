"""Co-activation of two SAEs' features on the same tokens: the one data-based primitive.

Inputs are SAEs and residual-stream activations of their two layers *on the same tokens*: arrays
``acts_a``, ``acts_b`` of shape (n_tokens, d_in) (tensors, numpy arrays or memory maps), plus an
optional boolean ``keep`` (n_tokens,) that is False for tokens to ignore (position 0 of a chunk,
padding, outliers). Activations are encoded in chunks of ``chunk_size`` rows
(:func:`iter_code_pairs`), so memory stays ~ chunk_size × d_sae.

:func:`coactivation` makes one pass over the tokens and returns a :class:`Coactivation`: per-feature
counts and sums of both SAEs, plus the joint statistics either of the pairs of some matchings
(``perms``: name → partner of every A feature; cheap, the cost grows with L0) or of *every* pair
(``all_pairs=True``: ``F_A × F_B`` float64 matrices, 64 MiB at F = 2048 and 4 GiB at F = 16384).

Definitions used throughout (one feature ``i`` of SAE A and its partner ``j = perm[i]`` of SAE B):

- *active*: feature ``i`` is active on token ``x`` when its code ``f_i(x) > 0``. Folding divides
  codes by ``θ > 0``, so activity and Pearson correlations are the same for folded and unfolded SAEs.
- *dead*: never active on the kept tokens. Pairs where either member is dead, or that have no
  partner (``perm[i] = −1``), are *excluded* from every mean and counted in the results.
- ``p_partner``: ``P(g_j > 0 | f_i > 0) = |A_i ∩ B_j| / |A_i|``, where ``A_i`` (``B_j``) is the set
  of kept tokens on which ``i`` (``j``) is active; its mean over a matching's included pairs is the
  **Matching Score** (:mod:`saematch_core.experiments.measures.scores`).
- ``jaccard``: ``|A_i ∩ B_j| / |A_i ∪ B_j|``.
- ``pearson``: Pearson correlation over kept tokens of the activation values ``f_i`` and ``g_j``.
- ``overlap``: ``|A_i ∩ B_j| / min(|A_i|, |B_j|)``, high when one feature's tokens contain the
  other's, as for the parts of a split feature (all pairs only).
- ``top_token_overlap``: Jaccard overlap of the sets of token *ids* at the ``top_k`` most activating
  tokens of ``i`` and of ``j``; ``top_position_overlap``: fraction of those ``top_k`` token
  *positions* the two share (matchings only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saematch_core.experiments.inputs import ArrayLike
from saematch_core.experiments.results import array_rows
from saematch_core.sae import SAE

__all__ = [
    "Coactivation",
    "CodeChunk",
    "check_acts",
    "check_keep",
    "coactivation",
    "coactivation_from_codes",
    "iter_code_pairs",
    "pair_metrics",
    "random_partners",
]


def check_acts(name: str, acts: ArrayLike, d_in: int, n: int | None = None) -> int:
    """Check that ``acts`` is a (n_tokens, ``d_in``) tensor or array (with ``n`` rows when given);
    returns n_tokens. The error names ``name``."""
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


def check_keep(keep: ArrayLike | None, n: int) -> Tensor:
    """``keep`` as a CPU BoolTensor of shape (n,) (all True when ``None``)."""
    if keep is None:
        return torch.ones(n, dtype=torch.bool)
    t = keep if isinstance(keep, Tensor) else torch.from_numpy(np.asarray(keep))
    if t.shape != (n,):
        raise ValueError(f"keep: expected shape ({n},), got {tuple(t.shape)}")
    return t.bool().cpu()


class CodeChunk(NamedTuple):
    """The codes of one chunk of kept tokens."""

    rows: Tensor
    """LongTensor (n,): indices of the kept rows in the activation arrays."""
    a: Tensor
    """(n, F_A) codes of SAE A."""
    b: Tensor | None
    """(n, F_B) codes of SAE B (``None`` when only one SAE is encoded)."""


def iter_code_pairs(
    sae_a: SAE,
    sae_b: SAE | None,
    acts_a: ArrayLike,
    acts_b: ArrayLike | None,
    *,
    keep: ArrayLike | None = None,
    chunk_size: int = 4096,
) -> Iterator[CodeChunk]:
    """Codes of the kept tokens, chunk by chunk (:class:`CodeChunk`).

    Parameters
    ----------
    sae_a, sae_b : SAEs of the two layers (``sae_b`` may be ``None`` to encode one layer only).
    acts_a, acts_b : (n_tokens, d_in) activations on the same tokens (tensor, array or memory map).
    keep : BoolTensor (n_tokens,), optional; False for tokens to ignore.
    chunk_size : tokens encoded at once (memory ~ chunk_size × d_sae).
    """
    n = check_acts("acts_a", acts_a, sae_a.d_in)
    if sae_b is not None:
        if acts_b is None:
            raise ValueError("acts_b: required when sae_b is given")
        check_acts("acts_b", acts_b, sae_b.d_in, n)
    mask = check_keep(keep, n)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    for s in range(0, n, chunk_size):
        rows = mask[s : s + chunk_size].nonzero().flatten()
        if rows.numel() == 0:
            continue
        with torch.no_grad():
            xa = array_rows(acts_a, s, s + chunk_size, device=sae_a.device, dtype=sae_a.dtype)
            ca = sae_a.encode(xa[rows.to(sae_a.device)])
            cb = None
            if sae_b is not None and acts_b is not None:
                xb = array_rows(acts_b, s, s + chunk_size, device=sae_b.device, dtype=sae_b.dtype)
                cb = sae_b.encode(xb[rows.to(sae_b.device)])
        yield CodeChunk(rows + s, ca, cb)


def random_partners(f_a: int, f_b: int, generator: torch.Generator) -> Tensor:
    """A uniformly random one-to-one matching of ``f_a`` features into ``f_b`` (``-1`` for extras)."""
    r = torch.randperm(max(f_a, f_b), generator=generator)[:f_a]
    return torch.where(r < f_b, r, torch.full_like(r, -1))


# ============================================================================ the statistics
@dataclass(frozen=True, eq=False)
class Coactivation:
    """Co-activation statistics of two SAEs' codes on the same tokens (float64, CPU).

    All counts are over kept tokens. Per-feature sums are always there; the joint statistics are
    those of the pairs of some matchings (:attr:`perms`, :attr:`both`, :attr:`prod`; indexed by A's
    feature ``i`` and referring to the pair ``(i, perms[name][i])``), and, when collected for every
    pair, the ``F_A × F_B`` matrices :attr:`all_both` and :attr:`all_prod` behind :meth:`pearson`,
    :meth:`jaccard`, :meth:`p_partner` and :meth:`overlap`.
    """

    n_tokens: int
    perms: dict[str, Tensor]
    """name → LongTensor (F_A,), the matchings whose pairs were collected (may be empty)."""
    count_a: Tensor
    """(F_A,) tokens on which each A feature is active."""
    count_b: Tensor
    """(F_B,) same for B."""
    sum_a: Tensor
    """(F_A,) Σ f_i."""
    sq_a: Tensor
    """(F_A,) Σ f_i²."""
    sum_b: Tensor
    sq_b: Tensor
    both: dict[str, Tensor]
    """name → (F_A,) tokens on which ``i`` and its partner are both active."""
    prod: dict[str, Tensor]
    """name → (F_A,) Σ f_i g_perm(i)."""
    top_a: Tensor | None = None
    """(top_k, F_A) flat indices (into the activation rows) of each A feature's top activations; -1 pads."""
    top_b: Tensor | None = None
    """(top_k, F_B) same for B."""
    token_ids: Tensor | None = None
    """(n_rows,) token id of every activation row, when given (for ``top_token_overlap``)."""
    all_both: Tensor | None = None
    """(F_A, F_B) tokens on which both ``i`` and ``j`` are active (every pair; ``None`` if not collected)."""
    all_prod: Tensor | None = None
    """(F_A, F_B) Σ f_i g_j (every pair)."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(F_A, F_B)``."""
        return int(self.count_a.shape[0]), int(self.count_b.shape[0])

    @property
    def dead_a(self) -> Tensor:
        """(F_A,) features of A never active on the kept tokens."""
        return self.count_a == 0

    @property
    def dead_b(self) -> Tensor:
        """(F_B,) features of B never active on the kept tokens."""
        return self.count_b == 0

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(all_both, all_prod)``; an error when every pair's statistics were not collected."""
        if self.all_both is None or self.all_prod is None:
            raise ValueError("stats: collected for matchings only; use coactivation(..., all_pairs=True)")
        return self.all_both, self.all_prod

    def pearson(self) -> Tensor:
        """(F_A, F_B) Pearson correlation of activation values; ``nan`` where a feature is constant."""
        _, prod = self.matrices()
        n = max(self.n_tokens, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = prod / n - mean_a[:, None] * mean_b[None, :]
        sd_a = (self.sq_a / n - mean_a**2).clamp(min=0).sqrt()
        sd_b = (self.sq_b / n - mean_b**2).clamp(min=0).sqrt()
        denom = sd_a[:, None] * sd_b[None, :]
        out = cov / denom.clamp(min=1e-300)
        return torch.where(denom > 0, out.clamp(-1.0, 1.0), torch.full_like(out, math.nan))

    def jaccard(self) -> Tensor:
        """(F_A, F_B) ``|A_i ∩ B_j| / |A_i ∪ B_j|``; ``nan`` where both are dead."""
        both, _ = self.matrices()
        union = self.count_a[:, None] + self.count_b[None, :] - both
        return torch.where(union > 0, both / union.clamp(min=1), torch.full_like(union, math.nan))

    def p_partner(self) -> Tensor:
        """(F_A, F_B) ``P(j active | i active)``; ``nan`` for dead ``i``."""
        both, _ = self.matrices()
        ca = self.count_a[:, None].expand_as(both)
        return torch.where(ca > 0, both / ca.clamp(min=1), torch.full_like(both, math.nan))

    def overlap(self) -> Tensor:
        """(F_A, F_B) ``|A_i ∩ B_j| / min(|A_i|, |B_j|)``; ``nan`` where either is dead."""
        both, _ = self.matrices()
        m = torch.minimum(self.count_a[:, None], self.count_b[None, :])
        return torch.where(m > 0, both / m.clamp(min=1), torch.full_like(m, math.nan))

    def measure(self, name: str) -> Tensor:
        """One of :meth:`pearson`, :meth:`jaccard`, :meth:`p_partner`, :meth:`overlap` by name."""
        fns = {"pearson": self.pearson, "jaccard": self.jaccard, "p_partner": self.p_partner}
        fns["overlap"] = self.overlap
        if name not in fns:
            raise ValueError(f"measure: expected one of {sorted(fns)}, got {name!r}")
        return fns[name]()


# ---------------------------------------------------------------------------- pairs of matchings
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


# ---------------------------------------------------------------------------- every pair
class _AllPairs:
    """Streaming sums of every pair (float64 totals; see :meth:`add` for the products)."""

    def __init__(self, fa: int, fb: int) -> None:
        f64 = torch.float64
        self.n = 0
        self.count_a, self.count_b = torch.zeros(fa, dtype=f64), torch.zeros(fb, dtype=f64)
        self.sum_a, self.sq_a = torch.zeros(fa, dtype=f64), torch.zeros(fa, dtype=f64)
        self.sum_b, self.sq_b = torch.zeros(fb, dtype=f64), torch.zeros(fb, dtype=f64)
        self.both = torch.zeros(fa, fb, dtype=f64)
        self.prod = torch.zeros(fa, fb, dtype=f64)

    def add(self, ca: Tensor, cb: Tensor) -> None:
        ca, cb = ca.detach().to("cpu", torch.float32), cb.detach().to("cpu", torch.float32)
        act_a, act_b = (ca > 0).float(), (cb > 0).float()
        self.n += int(ca.shape[0])
        self.count_a += act_a.sum(0).double()
        self.count_b += act_b.sum(0).double()
        self.sum_a += ca.double().sum(0)
        self.sq_a += ca.double().pow(2).sum(0)
        self.sum_b += cb.double().sum(0)
        self.sq_b += cb.double().pow(2).sum(0)
        # The F_A × F_B products run in float32 (twice as fast as float64 on CPU): per-chunk counts
        # are exact below 2**24 tokens, and chunk sums are accumulated in float64.
        self.both += (act_a.T @ act_b).double()
        self.prod += (ca.T @ cb).double()

    def result(self, perms: dict[str, Tensor]) -> Coactivation:
        # The pairs of the given matchings are read off the matrices.
        both, prod = {}, {}
        for k, p in perms.items():
            rows, has = torch.arange(p.numel()), p >= 0
            both[k] = torch.where(has, self.both[rows, p.clamp(min=0)], 0.0)
            prod[k] = torch.where(has, self.prod[rows, p.clamp(min=0)], 0.0)
        return Coactivation(
            n_tokens=self.n,
            perms=perms,
            count_a=self.count_a,
            count_b=self.count_b,
            sum_a=self.sum_a,
            sq_a=self.sq_a,
            sum_b=self.sum_b,
            sq_b=self.sq_b,
            both=both,
            prod=prod,
            all_both=self.both,
            all_prod=self.prod,
        )


def coactivation_from_codes(codes_a: Tensor, codes_b: Tensor, *, chunk_size: int = 4096) -> Coactivation:
    """:class:`Coactivation` of every pair, from codes given directly.

    Parameters
    ----------
    codes_a : Tensor, shape (n_tokens, F_A)
    codes_b : Tensor, shape (n_tokens, F_B), the same tokens.
    """
    for name, c in (("codes_a", codes_a), ("codes_b", codes_b)):
        if not isinstance(c, Tensor) or c.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D tensor (n_tokens, F), got {getattr(c, 'shape', c)!r}")
    if codes_a.shape[0] != codes_b.shape[0]:
        raise ValueError(
            f"codes_a, codes_b: expected the same number of tokens, "
            f"got {codes_a.shape[0]} and {codes_b.shape[0]}"
        )
    acc = _AllPairs(codes_a.shape[1], codes_b.shape[1])
    for s in range(0, codes_a.shape[0], chunk_size):
        acc.add(codes_a[s : s + chunk_size], codes_b[s : s + chunk_size])
    return acc.result({})


# ---------------------------------------------------------------------------- one pass
def _check_perms(perms: Mapping[str, Tensor], fa: int, fb: int) -> dict[str, Tensor]:
    checked = {}
    for name, p in perms.items():
        p = torch.as_tensor(p, dtype=torch.long).cpu()
        if p.shape != (fa,) or (p.numel() and (int(p.min()) < -1 or int(p.max()) >= fb)):
            raise ValueError(f"perms[{name!r}]: expected a LongTensor (F_A={fa},) with entries in [-1, {fb})")
        checked[name] = p
    return checked


def coactivation(
    sae_a: SAE,
    sae_b: SAE,
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    perms: Mapping[str, Tensor] | None = None,
    *,
    all_pairs: bool = False,
    keep: ArrayLike | None = None,
    top_k: int = 0,
    token_ids: ArrayLike | None = None,
    chunk_size: int = 4096,
    progress: bool = False,
) -> Coactivation:
    """One pass over the tokens collecting everything :func:`pair_metrics` (and, with
    ``all_pairs``, :meth:`Coactivation.measure`) needs.

    Parameters
    ----------
    sae_a, sae_b : SAEs of the two layers.
    acts_a, acts_b : (n_tokens, d_in) activations of the two layers on the same tokens.
    perms : name → LongTensor (F_A,), matchings of A's features into B's (``-1``: none), optional.
    all_pairs : also collect every pair's statistics (``F_A × F_B`` matrices, accumulated with
        float32 products; the pairs of ``perms`` are then read off them).
    keep : BoolTensor (n_tokens,), optional.
    top_k : how many top activations per feature to keep (0: none; not with ``all_pairs``).
    token_ids : (n_tokens,) token ids of the rows, optional (for ``top_token_overlap``).
    """
    n = check_acts("acts_a", acts_a, sae_a.d_in)
    check_acts("acts_b", acts_b, sae_b.d_in, n)
    fa, fb = sae_a.d_sae, sae_b.d_sae
    checked = _check_perms(perms or {}, fa, fb)
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")
    if all_pairs and top_k:
        raise ValueError("top_k: top activations are collected for matchings only, not with all_pairs")
    codes = iter_code_pairs(sae_a, sae_b, acts_a, acts_b, keep=keep, chunk_size=chunk_size)
    if all_pairs:
        acc = _AllPairs(fa, fb)
        for chunk in tqdm(codes, desc="co-activation", leave=False, disable=not progress):
            assert chunk.b is not None  # sae_b was given
            acc.add(chunk.a, chunk.b)
        return acc.result(checked)
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
    for rows, ca, cb in tqdm(codes, desc="co-activation", leave=False, disable=not progress):
        assert cb is not None  # sae_b was given
        n_kept += int(rows.numel())
        _add_pair_sums(sums, ca, cb, safe, has)
        if top is not None:
            flat = rows.cpu()
            top[0], top[1] = _topk_update(top[0], top[1], ca.to(f64).cpu(), flat, top_k)
            top[2], top[3] = _topk_update(top[2], top[3], cb.to(f64).cpu(), flat, top_k)
    top_a = top_b = None
    if top is not None:
        # Only positive activations count as "top activating"; the rest are padding.
        top_a = torch.where(top[0] > 0, top[1], torch.full_like(top[1], -1))
        top_b = torch.where(top[2] > 0, top[3], torch.full_like(top[3], -1))
    return dataclasses.replace(sums, n_tokens=n_kept, top_a=top_a, top_b=top_b)


# ============================================================================ per-pair metrics
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
