"""A calibrated "matched / not matched" verdict for every matched pair, from the weights alone.

SAE Match ranks pairs by cost but never says when a feature has *no* real partner. This module
turns each pair's cost into a p-value against a null model and controls the false-discovery rate.

**Statistic.** For a pair of feature vectors ``a`` (layer A) and ``b`` (layer B), the same vectors the
matching used (by default folded ``W_enc[:, i]``, ``W_dec[i]``, ``b_enc[i]``), the *relative cost*

    r(a, b) = ‖a − b‖² / (‖a‖² + ‖b‖²)        (metric "mse"; 0 = identical, 1 = orthogonal)
    r(a, b) = 1 − cos(a, b)                    (metric "cosine")

is free of the features' overall scale, so one null distribution serves every feature.

**Null model (rotated partners).** Layer B's residual basis is replaced by a random rotation ``Q``
(Haar-distributed orthogonal ``d_in × d_in``): every encoder column and decoder row of B is rotated,
biases are kept. This keeps everything about B's dictionary (norms, angles between its features,
biases) but destroys any correspondence with A. For every feature of A the *best* chance partner
``min_j r(a_i, Q b_j)`` is recorded; pooled over features and ``n_null`` rotations this is the
distribution of what the best of ``F_B`` unrelated candidates achieves by luck. A real pair's p-value
is ``(1 + #{null ≤ r}) / (1 + N_null)``, conservative because the real matching is one-to-one and
the null partner is the unconstrained best. The smallest attainable p-value is ``1 / (1 + F_A·n_null)``:
with few real pairs among many features, Benjamini–Hochberg needs more rotations to reject any.

**Decision.** Benjamini–Hochberg at level ``alpha`` over the features with a partner: the pairs
declared "matched" contain at most a fraction ``alpha`` of chance pairs in expectation (under the
pooled null). The best-vs-second-best *margin* is reported next to it: the gap between the matched
partner's relative cost and the best other candidate's.

Nothing here reads activations, so a face (the command line) may use it on two SAE files directly;
:mod:`saematch_core.experiments.decision` runs it over a study's layer pairs with a data check.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saematch_core.cost import feature_vectors
from saematch_core.experiments.results import cached_match
from saematch_core.match import MatchConfig
from saematch_core.sae import SAE

__all__ = [
    "MatchDecision",
    "benjamini_hochberg",
    "decide",
    "decide_vectors",
    "empirical_p_values",
    "random_rotation",
    "relative_cost",
    "relative_cost_chunks",
    "rotate_vectors",
    "rotated_null",
    "rotation_blocks",
    "smallest_relative_costs",
]

_EPS = 1e-30


# ----------------------------------------------------------------------------------- statistics
def relative_cost(a: Tensor, b: Tensor, metric: str = "mse") -> Tensor:
    """Row-wise relative cost of paired vectors (module docstring), float64.

    Parameters
    ----------
    a, b : Tensor, shape (n, D)

    Returns
    -------
    Tensor, float64, shape (n,)

    >>> relative_cost(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).tolist()
    [1.0]
    """
    a, b = a.double(), b.double()
    if metric == "cosine":
        na, nb = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
        return 1.0 - (a * b).sum(1) / (na * nb).clamp(min=_EPS)
    if metric != "mse":
        raise ValueError(f"metric: expected 'mse' or 'cosine', got {metric!r}")
    den = (a * a).sum(1) + (b * b).sum(1)
    return ((a - b) ** 2).sum(1) / den.clamp(min=_EPS)


def relative_cost_chunks(
    a: Tensor, b: Tensor, metric: str = "mse", *, chunk_size: int = 1024
) -> Iterator[tuple[int, Tensor]]:
    """Relative costs of every row of ``a`` against all rows of ``b``, ``chunk_size`` rows of ``a`` at a time.

    The statistic of :func:`relative_cost`, computed in float32 through dot products:
    ``1 − 2⟨a, b⟩ / (‖a‖² + ‖b‖²)`` (mse) or ``1 − cos(a, b)`` (cosine).

    Parameters
    ----------
    a : Tensor, shape (F_A, D)
    b : Tensor, shape (F_B, D)

    Yields
    ------
    start : int, the first row of ``a`` in the chunk.
    rel : Tensor, float32, shape (n, F_B), the costs of rows ``start .. start + n`` of ``a``.
    """
    if metric not in ("mse", "cosine"):
        raise ValueError(f"metric: expected 'mse' or 'cosine', got {metric!r}")
    a32, b32 = a.float(), b.float()
    if metric == "cosine":
        a32 = a32 / torch.linalg.vector_norm(a32, dim=1, keepdim=True).clamp(min=_EPS)
        b32 = b32 / torch.linalg.vector_norm(b32, dim=1, keepdim=True).clamp(min=_EPS)
    na, nb = (a32 * a32).sum(1), (b32 * b32).sum(1)
    for s in range(0, a32.shape[0], chunk_size):
        dot = a32[s : s + chunk_size] @ b32.T
        if metric == "cosine":
            yield s, 1.0 - dot
        else:
            yield s, 1.0 - 2.0 * dot / (na[s : s + chunk_size, None] + nb[None, :]).clamp(min=_EPS)


def smallest_relative_costs(
    a: Tensor, b: Tensor, k: int = 2, metric: str = "mse", *, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest relative costs of every row of ``a`` against all rows of ``b``.

    Parameters
    ----------
    a : Tensor, shape (F_A, D)
    b : Tensor, shape (F_B, D), ``F_B >= k``

    Returns
    -------
    values : Tensor, float64, shape (F_A, k), ascending
    indices : LongTensor, shape (F_A, k)
    """
    if b.shape[0] < k:
        raise ValueError(f"k: expected at most F_B={b.shape[0]} candidates, got {k}")
    vals, idx = [], []
    for _, rel in relative_cost_chunks(a, b, metric, chunk_size=chunk_size):
        top = torch.topk(rel, k, dim=1, largest=False)
        vals.append(top.values.double())
        idx.append(top.indices)
    if not vals:
        return torch.zeros(0, k, dtype=torch.float64), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(vals), torch.cat(idx)


def random_rotation(d: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed random orthogonal matrix, shape (d, d), float64."""
    z = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    # Fixing the signs of R's diagonal makes Q uniform over the orthogonal group.
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(d, dtype=torch.float64))


def rotation_blocks(params: Sequence[str], width: int) -> tuple[tuple[int, int, bool], ...]:
    """Column ranges ``(start, stop, rotate)`` of each parameter in a feature vector of length ``width``.

    ``W_enc`` and ``W_dec`` blocks have ``d_in`` columns and rotate with the residual basis; a
    ``b_enc`` block has one column and does not.
    """
    n_w = sum(p in ("W_enc", "W_dec") for p in params)
    n_b = sum(p == "b_enc" for p in params)
    if n_w == 0 or (width - n_b) % n_w:
        raise ValueError(f"params: cannot split vectors of length {width} into blocks {list(params)}")
    d_in = (width - n_b) // n_w
    out, pos = [], 0
    for p in params:
        size = 1 if p == "b_enc" else d_in
        out.append((pos, pos + size, p != "b_enc"))
        pos += size
    return tuple(out)


def rotate_vectors(vecs: Tensor, blocks: Sequence[tuple[int, int, bool]], q: Tensor) -> Tensor:
    """Feature vectors (F, D) with every rotating block (:func:`rotation_blocks`) multiplied by ``q``
    (d_in, d_in): the vectors of the same SAE in the residual basis ``x → x q``."""
    parts = []
    for start, stop, rot in blocks:
        part = vecs[:, start:stop]
        parts.append(part @ q.to(part.dtype) if rot else part)
    return torch.cat(parts, dim=1)


def rotated_null(
    a: Tensor,
    b: Tensor,
    params: Sequence[str],
    *,
    metric: str = "mse",
    n_null: int = 2,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Pooled best-chance relative costs: ``min_j r(a_i, Q b_j)`` for every ``i`` and ``n_null`` rotations.

    Parameters
    ----------
    a : Tensor, shape (F_A, D); b : Tensor, shape (F_B, D)
        Feature vectors built from ``params`` (in that order).

    Returns
    -------
    Tensor, float64, shape (F_A · n_null,), sorted ascending.
    """
    if not isinstance(n_null, int) or n_null < 1:
        raise ValueError(f"n_null: expected an int >= 1, got {n_null!r}")
    blocks = rotation_blocks(params, a.shape[1])
    d_in = next(stop - start for start, stop, rot in blocks if rot)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n_null):
        q = random_rotation(d_in, g)
        vals, _ = smallest_relative_costs(a, rotate_vectors(b, blocks, q), 1, metric, chunk_size=chunk_size)
        samples.append(vals[:, 0])
    return torch.sort(torch.cat(samples)).values


def empirical_p_values(stat: Tensor, null: Tensor) -> Tensor:
    """``(1 + #{null ≤ s}) / (1 + N)`` for every ``s`` of ``stat`` (small = better than chance).

    ``null`` must be sorted ascending; ``nan`` statistics give ``nan``.

    >>> empirical_p_values(torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.5, 3.0])).tolist()
    [0.25, 0.75]
    """
    counts = torch.searchsorted(null.double(), stat.double().nan_to_num(nan=math.inf), right=True)
    p = (1.0 + counts.double()) / (1.0 + null.numel())
    return torch.where(torch.isnan(stat), torch.full_like(p, math.nan), p)


def benjamini_hochberg(p_values: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """Benjamini–Hochberg step-up procedure.

    Parameters
    ----------
    p_values : Tensor, shape (n,); ``nan`` entries are not tested (never rejected, q = ``nan``).
    alpha : FDR level in (0, 1).

    Returns
    -------
    rejected : BoolTensor, shape (n,)
    q_values : Tensor, float64, shape (n,): BH-adjusted p-values, ``rejected == (q <= alpha)``.

    >>> rej, q = benjamini_hochberg(torch.tensor([0.01, 0.02, 0.03, 0.5]), 0.05)
    >>> rej.tolist(), [round(v, 3) for v in q.tolist()]
    ([True, True, True, False], [0.04, 0.04, 0.04, 0.5])
    """
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    p = torch.as_tensor(p_values, dtype=torch.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values: expected a 1-D tensor, got shape {tuple(p.shape)}")
    tested = ~torch.isnan(p)
    if bool(((p[tested] < 0) | (p[tested] > 1)).any()):
        raise ValueError("p_values: expected values in [0, 1] (or nan)")
    q = torch.full_like(p, math.nan)
    idx = tested.nonzero().flatten()
    m = int(idx.numel())
    if m:
        order = torch.argsort(p[idx])
        ranked = p[idx][order] * m / torch.arange(1, m + 1, dtype=torch.float64)
        # Running minimum from the largest p downwards makes the adjusted values monotone.
        adj = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
        q_tested = torch.empty(m, dtype=torch.float64)
        q_tested[order] = adj
        q[idx] = q_tested
    return (q <= alpha) & tested, q


# ----------------------------------------------------------------------------------- per-pair verdict
@dataclass(frozen=True, eq=False)
class MatchDecision:
    """Verdict for every feature of A under one matching (tensors of shape (F_A,), CPU)."""

    perm: Tensor
    """LongTensor: the matching (``-1``: no partner)."""
    statistic: Tensor
    """Float64: relative cost of the pair (``nan`` without partner)."""
    p_value: Tensor
    """Float64: empirical p-value against the rotated null."""
    q_value: Tensor
    """Float64: Benjamini–Hochberg adjusted p-value."""
    matched: Tensor
    """Bool: confident partner at FDR :attr:`alpha`."""
    margin: Tensor
    """Float64: best other candidate's relative cost minus the pair's (> 0: the partner is the clear best)."""
    null: Tensor
    """Float64, sorted: the pooled best-chance relative costs."""
    alpha: float

    @property
    def n_matched(self) -> int:
        return int(self.matched.sum())

    @property
    def n_tested(self) -> int:
        return int((self.perm >= 0).sum())

    @property
    def fraction_matched(self) -> float:
        """Confident pairs over features with a partner."""
        return self.n_matched / self.n_tested if self.n_tested else math.nan

    @property
    def threshold(self) -> float:
        """Largest relative cost declared matched (``nan`` if none)."""
        return float(self.statistic[self.matched].max()) if self.n_matched else math.nan


def decide_vectors(
    a: Tensor,
    b: Tensor,
    perm: Tensor,
    params: Sequence[str],
    *,
    metric: str = "mse",
    alpha: float = 0.05,
    n_null: int = 2,
    seed: int = 0,
    chunk_size: int = 1024,
) -> MatchDecision:
    """:class:`MatchDecision` for a matching ``perm`` of feature vectors ``a`` (F_A, D) to ``b`` (F_B, D).

    ``params`` names the blocks of the vectors in order (to rotate the right columns).
    """
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.shape != (a.shape[0],):
        raise ValueError(f"perm: expected shape ({a.shape[0]},), got {tuple(perm.shape)}")
    if perm.numel() and (int(perm.min()) < -1 or int(perm.max()) >= b.shape[0]):
        raise ValueError(f"perm: expected entries in [-1, {b.shape[0]})")
    a, b = a.detach().cpu(), b.detach().cpu()
    has = perm >= 0
    stat = torch.full((a.shape[0],), math.nan, dtype=torch.float64)
    if bool(has.any()):
        stat[has] = relative_cost(a[has], b[perm[has]], metric)
    g = torch.Generator().manual_seed(seed)
    null = rotated_null(a, b, params, metric=metric, n_null=n_null, generator=g, chunk_size=chunk_size)
    p = empirical_p_values(stat, null)
    matched, q = benjamini_hochberg(p, alpha)
    margin = torch.full_like(stat, math.nan)
    if b.shape[0] >= 2:
        vals, idx = smallest_relative_costs(a, b, 2, metric, chunk_size=chunk_size)
        other = torch.where(idx[:, 0] == perm, vals[:, 1], vals[:, 0])
        margin = torch.where(has, other - stat, margin)
    return MatchDecision(
        perm=perm,
        statistic=stat,
        p_value=p,
        q_value=q,
        matched=matched,
        margin=margin,
        null=null,
        alpha=alpha,
    )


def decide(
    sae_a: SAE,
    sae_b: SAE,
    config: MatchConfig | None = None,
    *,
    perm: Tensor | None = None,
    alpha: float = 0.05,
    n_null: int = 2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> MatchDecision:
    """Match (unless ``perm`` is given) and give every pair a calibrated verdict.

    Parameters
    ----------
    config : the matching, and the feature vectors the verdict is judged on (default: the paper's
        folded ``W_enc``, ``W_dec``, ``b_enc`` with MSE).
    perm : LongTensor (F_A,), optional; a precomputed matching to judge instead of ``match``'s.
    alpha : FDR level.
    n_null : random rotations of B in the null (each gives F_A null samples).
    cache_dir : where the matching is cached (:func:`~saematch_core.experiments.results.cached_match`).

    Examples
    --------
    See ``tests/test_verdict.py``: a planted permutation is "matched", an unrelated SAE is not.
    """
    cfg = MatchConfig() if config is None else config
    if perm is None:
        perm = cached_match(sae_a, sae_b, cfg, cache_dir).perm
    va = feature_vectors(sae_a, cfg.params, fold=cfg.fold and sae_a.activation == "jumprelu")
    vb = feature_vectors(sae_b, cfg.params, fold=cfg.fold and sae_b.activation == "jumprelu")
    return decide_vectors(
        va, vb, perm, cfg.params, metric=cfg.metric, alpha=alpha, n_null=n_null, seed=seed, chunk_size=1024
    )
