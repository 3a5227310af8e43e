"""Certified-exact assignment without solving the dense problem.

The matching problem of SAE Match is a linear assignment on ``S = X Yᵀ`` (``X`` (n, D), ``Y`` (m, D),
``n <= m``): maximise ``Σ_i S[i, cols[i]]`` over injective ``cols``. Dense solvers need the whole
``n × m`` matrix (17 GB in float32 at F = 65536) and spend seconds in a Hungarian-type sweep even when
almost every feature's partner is its nearest neighbour. This module

1. streams row blocks of ``X Yᵀ`` in float32 (CPU threads, or CUDA) and keeps each row's best columns
   by score and by ``S_ij / ‖Y_j‖`` (cosine order, which still finds a partner whose norm is small):
   the top ``k`` of each order enter the sparse graph, the next ``3k`` are a reserve with stored
   approximate scores, and the last kept values bound every other entry of the row
   (``S_ij <= t_i`` and ``S_ij <= a_i ‖Y_j‖``),
2. re-scores the candidate edges exactly in float64 and solves the sparse assignment with a
   shortest-augmenting-path solver that maintains LP dual potentials (:mod:`saematch_core._jv_numba`),
3. **certifies** the result against the full dense problem. The sparse solver leaves a matching
   ``c`` and column prices ``V_j >= 0`` (0 on unmatched columns). At those prices, the *gain* of entry
   ``(i, j)`` is ``g_ij = (S_ij - V_j) - (S_ic(i) - V_c(i))``: how much better column ``j`` would serve
   row ``i``. Weak LP duality (with row potentials ``U_i = max_j (S_ij - V_j)``) gives, for every
   injective assignment ``σ``,

       ``Σ_i S_iσ(i) <= Σ_i S_ic(i) + Σ_i max(0, max_j g_ij)``,

   so the rows' largest gains bound how far the result can fall short of the optimum. Gains are
   found without the dense matrix: rows whose bound ``max_j (min(t_i, a_i ‖Y_j‖) - V_j)`` (plus a
   rigorous float32 error term) is below ``S_ic(i) - V_c(i)`` cannot gain at all; reserve entries are
   checked from their stored scores; the remaining rows are recomputed block by block (never the
   whole ``n × m``). Every entry that might gain is re-scored in float64 and its gain evaluated
   exactly (error-free transformations, :func:`~saematch_core._jv_numba.exact_gains`); entries whose
   gain exceeds ``tol · (|S_ij| + |S_ic(i)|)`` join the graph, and the warm-started solver runs
   again. A recomputed row keeps its best entries by reduced score ``S_ij - V_j`` and the bound on
   the rest, which stays valid while ``V`` does not fall, so later rounds rarely recompute it.

**The guarantee.** The result's ``total`` (the float64 scores of its pairs, summed exactly by
``math.fsum``) is within ``gap_bound`` of the largest total of any assignment of the same float64
scores: ``optimum - total <= gap_bound``, proven by the last certificate, with every decision about
which entries need no exact look carrying a bound on its own rounding. The float64 scores are the
given matrix for :func:`solve_scores`, and for :func:`solve_inner_product` the float64 evaluation of
``⟨X_i, Y_j⟩`` from the inputs widened exactly to float64 (within ``D · 2^-53 · ‖X_i‖ ‖Y_j‖`` of the
real inner product; another float64 evaluation may round differently by that much). ``gap_bound``
is 0 when no entry gains at all; otherwise it is the sum, rounded up, of the rows' largest gains,
in the objective's units: gains below the tolerance, normally at the level of the float64 rounding
of the prices (1e-21 to 1e-15 of the objective on our benchmarks). The solver never scales ``tol``
by the largest norm or score, so a few huge rows or columns, or heavy-tailed norms, do not loosen
it for the others. When gains above the tolerance sit on graph edges or within the rounding of
prices grown far beyond the scores (after a poor first graph or penalty entries of order 1e12),
the graph is re-solved once from cold duals before the result is returned.

If the sparse graph has no full matching, ``k`` is doubled for the rows of the failed alternating
trees, the unmatched rows get edges to their best free columns and (once) every column gets its
best ``k`` rows by ``S_ij / ‖X_i‖``, until it does: a few large-norm "hub" columns that top every
row's list then cannot starve the others.

Hub-dominated costs leave most rows without a partner in the first graph and then grow it round
after round (to a third of the dense matrix on the unfolded objective of our trained SAEs). When over
a quarter of the rows are unmatched or the graph holds more than 1/16 of all entries, the problem
goes to a dense kernel (scipy's algorithm, compiled here, which keeps its duals) and the same
certificate, which is then faster: for :func:`solve_inner_product` when the float64 matrix takes at
most 512 MiB (and at least 2^20 entries), for :func:`solve_scores` from 2^16 entries on (the matrix
is in memory already).

``SAEMATCH_REFERENCE=1`` (or ``reference=True``) switches to the dense scipy reference
(:func:`scipy.optimize.linear_sum_assignment` on the float64 matrix).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Literal, NamedTuple

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from saematch_core._jv_numba import (
    capped_envelope,
    dense_sap,
    exact_dots,
    exact_gains,
    line_envelope,
    reduced_scan,
    row_abs_max,
    sparse_sap,
    topk2,
    topk2_bf16,
)
from saematch_core.cost import resolve_device
from saematch_core.errors import InfeasibleMatchError
from saematch_core.lap import DEFAULT_TOL, Candidates, as_cost_matrix, check_candidates, check_tol
from saematch_core.sae import nonfinite_summary

__all__ = [
    "Candidates",
    "Method",
    "Precision",
    "SparseLAPResult",
    "candidate_precision",
    "memory_bytes",
    "solve_cost_matrix",
    "solve_inner_product",
    "solve_scores",
    "threadsafe",
]

logger = logging.getLogger(__name__)

_U32 = 2.0**-24
_U64 = 2.0**-53
# A block of scores is at most this many elements (1 GiB in float32), whatever ``chunk_size`` says.
_MAX_BLOCK = 2**28
# Relative dual slack below which the warm-start repair keeps a matched row (float64 noise; well
# below DEFAULT_TOL, so what it keeps is never a gain the certificate would chase).
_FEAS_REL = 2.0**-47
# Candidates kept per row and order, as a multiple of k: the best k enter the graph, the rest are a
# reserve checked from their stored scores, so the certificate rarely recomputes a row.
_RESERVE = 4
# Entries kept per recomputed row (multiple of k), by reduced score S_ij - V_j, for later rounds.
_PRICED = 8
# Dense fallback (see _dense_is_faster): graph size relative to the dense matrix, and problem sizes:
# for inner products, whose dense matrix must be built first, and for explicit matrices.
_DENSE_FRACTION = 16
_DENSE_MIN_ENTRIES = 1 << 20
_DENSE_MAX_BYTES = 512 << 20
_DENSE_MIN_ENTRIES_GIVEN = 1 << 16
# Stand-in for a forbidden (-inf) score inside the compiled scans, which assume finite values.
_FORBIDDEN = -1e300

Precision = Literal["float32", "bfloat16"]
Method = Literal["sparse", "dense"]


class SparseLAPResult(NamedTuple):
    """Result of :func:`solve_inner_product`, :func:`solve_scores` and :func:`solve_cost_matrix`."""

    cols: np.ndarray
    """int64 (n,): row ``i`` is assigned to column ``cols[i]`` (all distinct)."""
    total: float
    """The objective ``Σ_i S[i, cols[i]]`` of the float64 scores, summed exactly (``math.fsum``); for
    ``solve_scores(maximize=False)`` and :func:`solve_cost_matrix`, the total cost."""
    gap_bound: float
    """Proven bound on the shortfall, in the objective's units: no assignment of the float64 problem
    is better than ``total`` by more than this (see the module docstring). 0 when proven optimal;
    also 0 on the scipy reference path, which is exact by construction and not re-checked."""
    rounds: int
    """Number of sparse solves (1 when the first candidate graph already certified; 0 on the reference
    path and on the dense method; those before it on the dense fallback)."""
    n_candidates: int
    """Number of edges in the final sparse graph, not counting the reserve (``n · m`` on the reference
    path and the dense method or fallback)."""


class _Oracle:
    """Access to the scores: float32 (or exact) row blocks, exact entries, error bounds."""

    n: int
    m: int
    row_scale: np.ndarray  # (n,) bound on |S_ij| over the row's finite entries
    margin: np.ndarray  # (n,) bound on |candidate-block entry - exact entry| for each row
    alpha_margin: np.ndarray  # (n,) the same bound for candidate-block entries divided by ‖Y_j‖
    block_margin: np.ndarray  # (n,) bound on |float32-block entry - exact entry| (the certificate's)
    dense_margin: np.ndarray  # (n,) bound on |dense_exact() entry - exact entry|
    col_norm: np.ndarray | None  # (m,) ‖Y_j‖ when S = X Yᵀ: enables norm-scaled candidates
    inv_norm: np.ndarray  # (m,) 1/‖Y_j‖ (0 for zero rows), or (0,) without norms
    row_inv_norm: Tensor | None  # (n,) 1/‖X_i‖ on the block device, or None without norms
    dense_entries: tuple[int, int]  # problem sizes (entries) for which the dense fallback is allowed

    def block(self, rows: np.ndarray, *, candidates: bool = False, native: bool = False) -> Tensor:
        """Float32 scores of ``rows``; ``candidates=True`` may compute them in a faster, coarser
        precision whose error stays below :attr:`margin` (instead of :attr:`block_margin`), and
        ``native=True`` then returns them in that precision (e.g. bfloat16) instead of float32.
        Forbidden entries read as a large finite negative number."""
        raise NotImplementedError

    def scaled_(self, S: Tensor) -> Tensor:
        """Divide a row block by the column norms, in place."""
        raise NotImplementedError

    def exact(self, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        """The float64 scores of the entries ``(ii, jj)`` (``-inf`` where forbidden)."""
        raise NotImplementedError

    def dense_exact(self) -> np.ndarray | None:
        """The whole score matrix in float64 (entries within :attr:`dense_margin` of :meth:`exact`'s)
        for the dense fallback, or ``None`` (no fallback)."""
        return None


class _InnerProductOracle(_Oracle):
    def __init__(self, X: Tensor, Y: Tensor, device: torch.device, candidates: Precision = "float32") -> None:
        self.n, self.m = X.shape[0], Y.shape[0]
        D = X.shape[1]
        exact_dtype = torch.float64 if X.dtype == torch.float64 or Y.dtype == torch.float64 else torch.float32
        self._Xe = np.ascontiguousarray(X.detach().to("cpu", exact_dtype).numpy())
        self._Ye = np.ascontiguousarray(Y.detach().to("cpu", exact_dtype).numpy())
        self._buf: Tensor | None = None
        self._X32 = X.detach().to(device, torch.float32).contiguous()
        self._Y32t = Y.detach().to(device, torch.float32).T.contiguous()
        # Norms in the inputs' own precision (30× faster than widening to float64 first), rounded up
        # by their error bound: the error margins below need upper bounds; the norm-scaled order
        # only needs one consistent value per row.
        up = 1.0 + (D + 2) * float(torch.finfo(exact_dtype).eps)
        xn = torch.linalg.vector_norm(torch.from_numpy(self._Xe), dim=1).double().numpy() * up
        yn = torch.linalg.vector_norm(torch.from_numpy(self._Ye), dim=1).double().numpy() * up
        ymax = float(yn.max()) if self.m else 0.0
        self.row_scale = xn * ymax
        self.dense_entries = (_DENSE_MIN_ENTRIES, _DENSE_MAX_BYTES // 8)
        # the dense fallback's float64 GEMM and exact_dots each round within γ_D ‖x‖‖y‖
        gamma64 = D * _U64 / (1.0 - D * _U64)
        self.dense_margin = 2.0 * gamma64 * self.row_scale
        # Rigorous float32 error: rounding the inputs to float32 (when they were float64) plus a
        # D-term dot product in any summation order, |err| <= γ Σ|x_k y_k| <= γ ‖x‖‖y‖.
        terms = D + (2 if exact_dtype == torch.float64 else 0)
        gamma = terms * _U32 / (1.0 - terms * _U32)
        if device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        ):
            gamma += 2.0**-10  # TF32 rounds each input to a 10-bit mantissa
        # 2× for safety against the bound being applied to a float32-rounded threshold value (of
        # size at most the row's scale: each row's own, so one huge row does not widen the others').
        self.block_margin = 2.0 * gamma * self.row_scale + 4.0 * _U32 * self.row_scale
        self.margin, self.alpha_margin = self.block_margin, 2.0 * (gamma + 4.0 * _U32) * xn + 4.0 * _U32 * xn
        self._Xc: Tensor | None = None
        self._Yct: Tensor | None = None
        self._cbuf: Tensor | None = None
        if candidates == "bfloat16":
            # Inputs rounded to bfloat16 (relative error u_in <= u + 2^-23 with u = 2^-8, counting a
            # first rounding of float64 inputs to float32), exact products accumulated in float32
            # (every PyTorch bf16 GEMM does; CUDA's reduced-precision reductions are switched off
            # around the call), the result rounded to bfloat16 once more. With p = (1 + u_in)²:
            # |err| <= ((p - 1) + γ_D p + u (1 + γ_D) p) ‖x‖‖y‖, a rigorous bound (no safety factor:
            # a bfloat16 margin is 700× the float32 one and every doubling adds certificate work;
            # the platform test sees at most a quarter of it).
            u = 2.0**-8
            p = (1.0 + u + 2.0 * _U32) ** 2
            gamma_c = (p - 1.0) + gamma * p + u * (1.0 + gamma) * p
            self.margin = gamma_c * self.row_scale + 4.0 * _U32 * self.row_scale
            self.alpha_margin = (gamma_c + 4.0 * _U32) * xn + 4.0 * _U32 * xn
            self._Xc = self._X32.to(torch.bfloat16)
            self._Yct = self._Y32t.to(torch.bfloat16)
        self.col_norm = yn
        self.inv_norm = np.where(yn > 0, 1.0 / np.where(yn > 0, yn, 1.0), 0.0)
        self._inv_norm = torch.from_numpy(self.inv_norm).to(device, torch.float32)
        self.row_inv_norm = torch.from_numpy(np.where(xn > 0, 1.0 / np.where(xn > 0, xn, 1.0), 0.0)).to(
            device, torch.float32
        )

    def scaled_(self, S: Tensor) -> Tensor:
        return S.mul_(self._inv_norm[None, :])

    def block(self, rows: np.ndarray, *, candidates: bool = False, native: bool = False) -> Tensor:
        # One reused output buffer: a fresh (rows, m) tensor per block costs page faults comparable to
        # a good share of the GEMM itself. The returned block is valid until the next call.
        if self._buf is None or self._buf.shape[0] < rows.size:
            self._buf = torch.empty((rows.size, self.m), dtype=torch.float32, device=self._X32.device)
        out = self._buf[: rows.size]
        coarse = candidates and self._Xc is not None
        X, Yt = (self._Xc, self._Yct) if coarse else (self._X32, self._Y32t)
        assert X is not None and Yt is not None
        if rows.size and rows[-1] - rows[0] == rows.size - 1:  # a contiguous range: no gather
            lhs = X[int(rows[0]) : int(rows[-1]) + 1]
        else:
            lhs = X.index_select(0, torch.from_numpy(rows).to(X.device))
        if not coarse:
            return torch.matmul(lhs, Yt, out=out)
        if self._cbuf is None or self._cbuf.shape[0] < rows.size:
            self._cbuf = torch.empty((rows.size, self.m), dtype=torch.bfloat16, device=X.device)
        cuda = torch.backends.cuda.matmul
        reduced = cuda.allow_bf16_reduced_precision_reduction
        cuda.allow_bf16_reduced_precision_reduction = False
        try:
            torch.matmul(lhs, Yt, out=self._cbuf[: rows.size])
        finally:
            cuda.allow_bf16_reduced_precision_reduction = reduced
        return self._cbuf[: rows.size] if native else out.copy_(self._cbuf[: rows.size])

    def exact(self, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        out = np.empty(ii.shape[0], np.float64)
        if ii.shape[0]:
            exact_dots(self._Xe, self._Ye, ii.astype(np.int64), jj.astype(np.int64), out)
        return out

    def dense_exact(self) -> np.ndarray | None:
        X, Y = torch.from_numpy(self._Xe).double(), torch.from_numpy(self._Ye).double()
        return (X @ Y.T).numpy()


class _DenseOracle(_Oracle):
    """An explicit float64 score matrix (``-inf`` = forbidden), used as it is."""

    def __init__(self, S: np.ndarray) -> None:
        self._S = S
        self.n, self.m = S.shape
        self.row_scale = np.zeros(self.n)
        self.forbidden = bool(row_abs_max(S, self.row_scale)) if S.size else False
        self.margin = self.block_margin = self.dense_margin = np.zeros(self.n)
        self.col_norm = None
        self.alpha_margin = np.zeros(self.n)
        self.inv_norm = np.zeros(0)
        self.row_inv_norm = None
        self.dense_entries = (_DENSE_MIN_ENTRIES_GIVEN, self.n * self.m)  # the matrix is in memory already

    def block(self, rows: np.ndarray, *, candidates: bool = False, native: bool = False) -> Tensor:
        del candidates, native  # the scores are given exactly
        contiguous = rows.size and rows[-1] - rows[0] == rows.size - 1
        S = self._S[int(rows[0]) : int(rows[-1]) + 1] if contiguous else self._S[rows]
        if self.forbidden:
            S = np.maximum(S, _FORBIDDEN)  # a copy: -inf → a finite stand-in for the compiled scans
        return torch.from_numpy(S)

    def exact(self, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        return self._S[ii, jj]

    def dense_exact(self) -> np.ndarray | None:
        return self._S


def _row_blocks(rows: np.ndarray, m: int, chunk_size: int) -> list[np.ndarray]:
    step = max(1, min(chunk_size, _MAX_BLOCK // max(m, 1)))
    return [rows[s : s + step] for s in range(0, rows.shape[0], step)]


class _Candidates(NamedTuple):
    graph_i: np.ndarray
    graph_j: np.ndarray
    reserve_i: np.ndarray
    reserve_j: np.ndarray
    reserve_v: np.ndarray  # approximate scores (block precision)
    kth: np.ndarray
    alpha: np.ndarray


def _topk_rows(oracle: _Oracle, rows: np.ndarray, k: int, depth: int, chunk_size: int) -> _Candidates:
    """Candidate edges of ``rows`` and two bounds on each row's other entries.

    Each row keeps its top-``depth`` columns by score and, for inner products, its top-``depth`` by
    ``S_ij / ‖Y_j‖`` (cosine order: a partner whose norm is small is still found). The best ``k`` of
    each order enter the sparse graph; the others are a *reserve* whose approximate scores let the
    certificate check them without recomputing the row. Entries outside both sets satisfy
    ``S_ij <= kth_i`` and ``S_ij <= alpha_i · ‖Y_j‖`` (up to float32 error).
    """
    m = oracle.m
    depth = min(max(depth, k), m)
    gi, gj, ri, rj, rv = [], [], [], [], []
    kth = np.full(rows.shape[0], -np.inf)
    alpha = np.full(rows.shape[0], -np.inf)
    scaled = oracle.col_norm is not None
    pos = 0

    def split(blk: np.ndarray, idx: np.ndarray, val: np.ndarray, raw: np.ndarray) -> None:
        order = np.argsort(-val, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)
        raw = np.take_along_axis(raw, order, axis=1)
        gi.append(np.repeat(blk, k))
        gj.append(idx[:, :k].ravel())
        if depth > k:
            rest = raw[:, k:].ravel()
            allowed = rest > _FORBIDDEN  # forbidden entries need no look
            ri.append(np.repeat(blk, depth - k)[allowed])
            rj.append(idx[:, k:].ravel()[allowed])
            rv.append(rest[allowed])

    for blk in _row_blocks(rows, m, chunk_size):
        sl = slice(pos, pos + len(blk))
        pos += len(blk)
        if k >= m:
            gi.append(np.repeat(blk, m))
            gj.append(np.tile(np.arange(m, dtype=np.int64), len(blk)))
            continue
        S = oracle.block(blk, candidates=True, native=True)
        if S.device.type == "cpu":
            # one fused pass of a compiled scan beats two torch.topk calls on the CPU
            ir, vr = np.empty((len(blk), depth), np.int64), np.empty((len(blk), depth))
            isc, vsc = np.empty((len(blk), depth), np.int64), np.empty((len(blk), depth))
            if S.dtype == torch.bfloat16:
                bits = S.view(torch.int16).numpy().view(np.uint16)
                topk2_bf16(bits, oracle.inv_norm, depth, ir, vr, isc, vsc)
            else:
                topk2(S.numpy(), oracle.inv_norm, depth, ir, vr, isc, vsc)
        else:
            S = S.float()
            vals, idx = torch.topk(S, depth, dim=1, sorted=False)
            ir, vr = idx.cpu().numpy().astype(np.int64), vals.double().cpu().numpy()
            if scaled:
                vals, idx = torch.topk(oracle.scaled_(S), depth, dim=1, sorted=False)
                isc, vsc = idx.cpu().numpy().astype(np.int64), vals.double().cpu().numpy()
            else:
                isc, vsc = ir, vr
        kth[sl] = vr.min(axis=1)
        split(blk, ir, vr, vr)
        if oracle.col_norm is not None:
            alpha[sl] = vsc.min(axis=1)
            split(blk, isc, vsc, vsc * oracle.col_norm[isc])
        else:
            alpha[sl] = np.inf

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return _Candidates(
        cat(gi, np.int64),
        cat(gj, np.int64),
        cat(ri, np.int64),
        cat(rj, np.int64),
        cat(rv, np.float64),
        kth,
        alpha,
    )


def _column_candidates(oracle: _Oracle, k: int, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges from every column to its best ``k`` rows by ``S_ij / ‖X_i‖`` (cosine order within the
    column; by raw score every column would pick the same few large-norm rows), one more pass over
    the score blocks. Used only when the row candidates have no full matching: on hub-dominated
    costs (every row's top list holds the same few large-norm columns) growing k row by row would
    otherwise take rounds and most of the dense matrix."""
    n, m = oracle.n, oracle.m
    ck = min(k, n)
    best_v = torch.full((ck, m), -torch.inf, dtype=torch.float64)
    best_i = torch.zeros((ck, m), dtype=torch.int64)
    inv = oracle.row_inv_norm
    for blk in _row_blocks(np.arange(n, dtype=np.int64), m, chunk_size):
        S = oracle.block(blk, candidates=True)
        if inv is not None:
            S = S * inv[torch.from_numpy(blk).to(inv.device)][:, None]
        v, i = torch.topk(S, min(ck, len(blk)), dim=0)
        merged, order = torch.topk(torch.cat([best_v, v.double().cpu()]), ck, dim=0)
        best_i = torch.gather(torch.cat([best_i, torch.from_numpy(blk)[i.cpu()]]), 0, order)
        best_v = merged
    return best_i.numpy().ravel(), np.tile(np.arange(m, dtype=np.int64), ck)


def _merge(
    keys: np.ndarray, s: np.ndarray, ii: np.ndarray, jj: np.ndarray, m: int, oracle: _Oracle
) -> tuple[np.ndarray, np.ndarray]:
    """Add edges (ii, jj) (exactly re-scored; forbidden ones dropped) to the sorted key set; returns
    new (keys, scores)."""
    new = np.sort(ii * m + jj)
    pos = np.searchsorted(keys, new)
    fresh = np.ones(new.size, np.bool_)
    fresh[1:] = new[1:] != new[:-1]
    if keys.size:
        fresh &= keys[np.minimum(pos, keys.size - 1)] != new
    new, pos = new[fresh], pos[fresh]
    if new.size == 0:
        return keys, s
    scores = oracle.exact(new // m, new % m)
    allowed = scores > -np.inf
    # both sorted: inserting at the search positions keeps the keys sorted
    return np.insert(keys, pos[allowed], new[allowed]), np.insert(s, pos[allowed], scores[allowed])


def _scan_reduced(
    S: Tensor, V: np.ndarray, lo: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reduced scores ``R_ij = S_ij - V_j`` (float64) of a row block: the entries with ``R_ij > lo_i``
    (row positions, columns) and each row's ``depth`` largest ``R_ij`` (columns, values; unsorted).

    On the CPU one compiled pass (:func:`reduced_scan`) finds both; rows with more than ``depth``
    entries above ``lo_i`` (rare) are searched again. Elsewhere, torch on the block's device
    (:func:`_scan_reduced_torch`, also the reference)."""
    if S.device.type != "cpu":
        return _scan_reduced_torch(S, V, lo, depth)
    r = S.shape[0]
    tj, tv, cnt = np.empty((r, depth), np.int64), np.empty((r, depth)), np.empty(r, np.int64)
    Sn = S.numpy()
    reduced_scan(Sn, V, lo, tj, tv, cnt)
    rr, cc = np.nonzero((tv > lo[:, None]) & (cnt <= depth)[:, None])
    near_r, near_c = [rr], [tj[rr, cc]]
    for i in np.flatnonzero(cnt > depth):
        cols = np.flatnonzero(Sn[i].astype(np.float64) - V > lo[i])
        near_r.append(np.full(cols.size, i, np.int64))
        near_c.append(cols)
    return np.concatenate(near_r).astype(np.int64), np.concatenate(near_c).astype(np.int64), tj, tv


def _scan_reduced_torch(
    S: Tensor, V: np.ndarray, lo: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    R = S.double() - torch.from_numpy(V).to(S.device)[None, :]
    near = torch.nonzero(R > torch.from_numpy(lo).to(S.device)[:, None]).cpu().numpy()
    top_v, top_j = torch.topk(R, depth, dim=1, sorted=False)
    tj, tv = top_j.cpu().numpy().astype(np.int64), top_v.cpu().numpy()
    return near[:, 0].astype(np.int64), near[:, 1].astype(np.int64), tj, tv


def _gains(s: np.ndarray, v_j: np.ndarray, s_c: np.ndarray, v_c: np.ndarray) -> np.ndarray:
    """Exact gains ``max(0, (s - v_j) - (s_c - v_c))``, rounded up (:func:`exact_gains`)."""
    out = np.empty(s.shape[0])
    if s.shape[0]:
        exact_gains(
            np.ascontiguousarray(s, np.float64),
            np.ascontiguousarray(v_j, np.float64),
            np.ascontiguousarray(s_c, np.float64),
            np.ascontiguousarray(v_c, np.float64),
            out,
        )
    return out


def _sum_up(values: np.ndarray) -> float:
    """An upper bound on the exact sum of non-negative ``values`` (0.0 when all are 0)."""
    total = math.fsum(values.tolist())
    return math.nextafter(total, math.inf) if total > 0 else 0.0


class _Certificate(NamedTuple):
    """What one certificate pass found for the current matching and prices."""

    gains: np.ndarray
    """(n,) upper bound on each row's largest gain ``max(0, max_j g_ij)`` (exact arithmetic)."""
    gap_bound: float
    """Proven bound on the shortfall: the gains' sum, plus (rectangular problems) the prices that
    break ``V >= 0`` on matched or ``V = 0`` on unmatched columns (0 for the sparse solver's)."""
    new_i: np.ndarray
    """Rows of the off-graph entries whose gain exceeds the tolerance (at most a few per row)."""
    new_j: np.ndarray
    """Their columns."""
    n_checked: int
    """Rows whose scores were recomputed (their bounds could not rule out a gain)."""
    n_blurred: int
    """Rows with a gain above the tolerance that adds no edge: on a graph edge, or within the
    rounding of large prices. Fresh prices (:meth:`_CertifiedSolve.restart`) remove them."""


class _CertifiedSolve:
    """One certified solve, in phases that can be run (and tested) one at a time.

    :meth:`find_candidates` (the first pass over the score blocks), :meth:`solve_graph` (the sparse
    solver, warm-started), :meth:`grow` (more edges for rows the graph cannot match),
    :meth:`certify` (the check against the full dense problem), :meth:`add_edges`,
    :meth:`solve_dense` (the dense method and fallback) and :meth:`run`, which chains them.
    """

    def __init__(
        self,
        oracle: _Oracle,
        *,
        k: int,
        chunk_size: int,
        tol: float,
        max_rounds: int,
        clock: dict[str, float] | None = None,
    ) -> None:
        self.oracle = oracle
        self.n, self.m = n, m = oracle.n, oracle.m
        self.k, self.chunk_size, self.tol, self.max_rounds = k, chunk_size, tol, max_rounds
        self.clock = clock if clock is not None else {"candidates_s": 0.0, "solve_s": 0.0, "certify_s": 0.0}
        self.all_rows = np.arange(n, dtype=np.int64)
        self.k_row = np.full(n, min(k, m), np.int64)
        # the sparse graph: sorted keys i·m + j and their exact scores
        self.keys = np.zeros(0, np.int64)
        self.s = np.zeros(0)
        # bounds on the entries outside the candidates, and the reserve (approximate scores)
        self.kth = np.full(n, np.inf)
        self.alpha = np.full(n, np.inf)
        self.res_i = self.res_j = np.zeros(0, np.int64)
        self.res_v = np.zeros(0)
        self.columns_added = False
        # the sparse solver's state, minimisation form (prices V = -v)
        self.u = np.zeros(n)
        self.v = np.zeros(m)
        self.col4row = np.full(n, -1, np.int64)
        self.row4col = np.full(m, -1, np.int64)
        self.rounds = 0
        self.certified_rounds = 0
        self.restarted = False
        # Rows recomputed by the certificate keep their best entries by current reduced score S_ij - V_j
        # (a "priced reserve") and the bound thr_i on the others; while V does not decrease, unstored
        # entries stay below thr_i + V_j(then) <= thr_i + V_j(now), so the row need not be recomputed.
        self.depth_p = min(_PRICED * k, m)
        self.pr_j = np.zeros((n, self.depth_p), np.int64)
        self.pr_v = np.zeros((n, self.depth_p))
        self.pr_thr = np.full(n, np.inf)
        self.pr_round = np.zeros(n, np.int64)
        self.v_snaps: list[np.ndarray] = []

    # ------------------------------------------------------------------ phases
    def find_candidates(self) -> None:
        """The first pass: every row's top candidates enter the graph, the next ones the reserve, and
        the bounds ``kth`` / ``alpha`` cover the rest."""
        tick = time.perf_counter()
        cand = _topk_rows(self.oracle, self.all_rows, int(self.k_row[0]), _RESERVE * self.k, self.chunk_size)
        self.kth, self.alpha = cand.kth, cand.alpha
        self.res_i, self.res_j, self.res_v = cand.reserve_i, cand.reserve_j, cand.reserve_v
        self.add_edges(cand.graph_i, cand.graph_j)
        self.clock["candidates_s"] += time.perf_counter() - tick

    def add_edges(self, ii: np.ndarray, jj: np.ndarray) -> int:
        """Add entries to the graph (exactly scored; duplicates and forbidden entries dropped);
        returns how many were new."""
        before = self.keys.size
        self.keys, self.s = _merge(self.keys, self.s, ii, jj, self.m, self.oracle)
        return self.keys.size - before

    def solve_graph(self) -> np.ndarray:
        """Run the sparse solver (warm-started from the current state) on the graph; returns the
        rows of the alternating trees that found no free column (empty: every row is matched)."""
        n, m = self.n, self.m
        self.rounds += 1
        rows_e = self.keys // m
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows_e, minlength=n), out=indptr[1:])
        stuck = np.zeros(n, np.bool_)
        tick = time.perf_counter()
        sparse_sap(
            indptr,
            self.keys % m,
            -self.s,
            self.u,
            self.v,
            self.col4row,
            self.row4col,
            n < m,
            _FEAS_REL,
            stuck,
        )
        self.clock["solve_s"] += time.perf_counter() - tick
        return np.flatnonzero(stuck)

    def grow(self, stuck: np.ndarray) -> None:
        """More edges for the rows of failed alternating trees: ``k`` doubled for them, every
        unmatched row's best free columns and (once) every column's best rows."""
        oracle, m, k, chunk_size = self.oracle, self.m, self.k, self.chunk_size
        tick = time.perf_counter()
        grow = stuck[self.k_row[stuck] < m]
        if grow.size == 0:
            # every row of a failed tree already sees all its allowed columns
            raise InfeasibleMatchError(
                f"scores: cost matrix is infeasible: {stuck.size} rows (the first is row {int(stuck[0])}) "
                "cannot all be assigned to distinct allowed (non-forbidden) columns"
            )
        logger.debug("round %d: %d rows unmatched, growing k for %d rows", self.rounds, stuck.size, grow.size)
        new_i, new_j = [], []
        doubled = np.minimum(2 * self.k_row[grow], m)
        for kk in np.unique(doubled):
            sel = grow[doubled == kk]
            grown = _topk_rows(oracle, sel, int(kk), int(kk), chunk_size)
            new_i.append(grown.graph_i)
            new_j.append(grown.graph_j)
            # entries outside the new top-kk *and* the old candidates obey both bounds
            self.kth[sel] = np.minimum(self.kth[sel], grown.kth)
            self.alpha[sel] = np.minimum(self.alpha[sel], grown.alpha)
            self.k_row[sel] = kk
        # Unmatched rows also see their best *free* columns: on hub-dominated costs (every row's top
        # candidates are the same few large-norm columns) growing k alone would take rounds and most
        # of the dense matrix before the graph has a full matching.
        if not self.columns_added:
            col_i, col_j = _column_candidates(oracle, k, chunk_size)
            new_i.append(col_i)
            new_j.append(col_j)
            self.columns_added = True
        free_rows, free_cols = np.flatnonzero(self.col4row < 0), np.flatnonzero(self.row4col < 0)
        kf = min(k, free_cols.size)
        for blk in _row_blocks(free_rows, m, chunk_size) if kf else ():
            S = oracle.block(blk)
            idx = torch.topk(S[:, torch.from_numpy(free_cols).to(S.device)], kf, dim=1).indices.cpu().numpy()
            new_i.append(np.repeat(blk, kf))
            new_j.append(free_cols[idx].ravel())
        self.add_edges(np.concatenate(new_i), np.concatenate(new_j))
        self.clock["candidates_s"] += time.perf_counter() - tick

    def _beta(self, s: np.ndarray, v_j: np.ndarray, s_c: np.ndarray, v_c: np.ndarray) -> np.ndarray:
        """The gain above which an entry is chased: ``tol`` relative to the two scores compared, plus
        the float64 rounding of the prices (which re-solving cannot remove)."""
        return self.tol * (np.abs(s) + np.abs(s_c)) + 4.0 * _U64 * (np.abs(v_j) + np.abs(v_c))

    def certify(self) -> _Certificate:
        """Check the current (full) matching against the whole dense problem at the current prices."""
        oracle, n, m = self.oracle, self.n, self.m
        tick = time.perf_counter()
        keys, s, c = self.keys, self.s, self.col4row
        rows_e, cols_e = keys // m, keys % m
        V = -self.v
        s_c = s[np.searchsorted(keys, self.all_rows * m + c)]
        T = s_c - V[c]  # each row's reduced score at its column (float64; the gains below are exact)
        v_abs = float(np.abs(V).max())
        v_min = float(V.min())
        # float64 rounding of the comparisons below, with a float32-sized safety factor
        rounding = 8.0 * _U32 * (np.abs(T) + v_abs + oracle.row_scale)
        gains = np.zeros(n)
        add: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # rows with a gain above tol that is on the graph or hidden by the prices' rounding: the
        # prices, not the graph, are at fault
        blurred = np.zeros(n, np.bool_)

        def look(gi: np.ndarray, gj: np.ndarray, exact: np.ndarray | None = None) -> None:
            # exact gains of entries that may gain; those above the tolerance are chased
            sc = oracle.exact(gi, gj) if exact is None else exact
            g = _gains(sc, V[gj], s_c[gi], V[c[gi]])
            pos = np.flatnonzero(g > 0)  # usually none
            gi, gj, sc, g = gi[pos], gj[pos], sc[pos], g[pos]
            np.maximum.at(gains, gi, g)
            blurred[gi[g > self.tol * (np.abs(sc) + np.abs(s_c[gi]))]] = True
            bad = g > self._beta(sc, V[gj], s_c[gi], V[c[gi]])
            add.append((gi[bad], gj[bad], g[bad]))

        look(rows_e, cols_e, s)  # the graph's edges (every row has one: its matched edge)
        # Off-graph entries of row i are <= kth_i and <= alpha_i ‖Y_j‖ (+ float32 error): rows whose
        # bound on max_j (S_ij - V_j) is below their reduced score T_i gain nowhere off the graph.
        bound = self.kth + oracle.margin - v_min
        if oracle.col_norm is not None:
            alpha = self.alpha
            finite = np.isfinite(alpha)
            env = np.full(n, np.inf)
            env[finite] = line_envelope(oracle.col_norm, -V, alpha[finite] + oracle.alpha_margin[finite])
            env[alpha == -np.inf] = -np.inf
            # both bounds at once: max_j (min(kth_i, alpha_i ‖Y_j‖) - V_j), much tighter when the
            # large-norm columns are the expensive (high V_j) ones
            capped = capped_envelope(
                oracle.col_norm, -V, self.kth + oracle.margin, alpha + oracle.alpha_margin
            )
            bound = np.minimum(bound, np.minimum(env, capped))
        self.v_snaps.append(V.copy())
        # how far V fell since each earlier round (0 for square problems: prices only rise there)
        drop = np.array([max(0.0, float(np.max(snap - V))) for snap in self.v_snaps])
        has_pr = np.isfinite(self.pr_thr)
        bound[has_pr] = np.minimum(bound[has_pr], self.pr_thr[has_pr] + drop[self.pr_round[has_pr]])
        check = np.flatnonzero(bound - T + rounding > 0)
        rows_pr = np.flatnonzero(has_pr)
        if rows_pr.size:
            # priced-reserve entries: stored approximate scores, an exact look near the boundary
            pj = self.pr_j[rows_pr]
            lo = T[rows_pr] - oracle.block_margin[rows_pr] - rounding[rows_pr]
            rr, cc = np.nonzero(self.pr_v[rows_pr] - V[pj] > lo[:, None])
            look(rows_pr[rr], pj[rr, cc])
        if self.res_i.size:
            # reserve entries, the same way
            near = np.flatnonzero(self.res_v - V[self.res_j] > (T - oracle.margin - rounding)[self.res_i])
            look(self.res_i[near], self.res_j[near])
        depth_p = self.depth_p
        for blk in _row_blocks(check, m, self.chunk_size):
            # reduced scores in float64: only the block's own error separates them from the exact ones
            marg = oracle.block_margin[blk]
            near_r, near_c, tj, tv = _scan_reduced(
                oracle.block(blk), V, T[blk] - marg - rounding[blk], depth_p
            )
            if depth_p < m:
                self.pr_j[blk] = tj
                self.pr_v[blk] = tv + V[tj]
                self.pr_thr[blk] = tv.min(axis=1) + marg
                self.pr_round[blk] = len(self.v_snaps) - 1
            look(blk[near_r], near_c)
        new_i = np.concatenate([a[0] for a in add])
        new_j = np.concatenate([a[1] for a in add])
        new_g = np.concatenate([a[2] for a in add])
        if new_i.size:
            # only entries off the graph are new edges, each once (several sources may find one)
            key, first = np.unique(new_i * m + new_j, return_index=True)
            pos = np.minimum(np.searchsorted(keys, key), keys.size - 1)
            off = first[keys[pos] != key]
            new_i, new_j, new_g = new_i[off], new_j[off], new_g[off]
        blurred[new_i] = False  # a new edge is progress, not blur
        if new_i.size:
            # Column generation: the largest gains of each row (k of them, doubling every round) make
            # progress while keeping the graph small when the prices are far from the dense optimum.
            order = np.lexsort((-new_g, new_i))
            new_i, new_j = new_i[order], new_j[order]
            starts = np.searchsorted(new_i, new_i, side="left")
            keep = np.arange(new_i.size) - starts < self.k << min(self.certified_rounds, 20)
            new_i, new_j = new_i[keep], new_j[keep]
        cert = _Certificate(
            gains=gains,
            gap_bound=self._gap_bound(gains, V),
            new_i=new_i,
            new_j=new_j,
            n_checked=int(check.size),
            n_blurred=int(blurred.sum()),
        )
        logger.debug(
            "round %d: %d edges, %d rows rechecked, %d new edges, gap bound %.3g",
            self.rounds,
            keys.size,
            check.size,
            new_i.size,
            cert.gap_bound,
        )
        self.clock["certify_s"] += time.perf_counter() - tick
        return cert

    def _gap_bound(self, gains: np.ndarray, V: np.ndarray) -> float:
        # Σ_i gain_i, plus for rectangular problems Σ_{j free} max(V_j, 0) + Σ_{j matched} max(-V_j, 0)
        # (for square ones every assignment pays every price, so the prices cancel)
        terms = [gains]
        if self.n < self.m:
            matched = self.row4col >= 0
            terms += [np.maximum(V[~matched], 0.0), np.maximum(-V[matched], 0.0)]
        return _sum_up(np.concatenate(terms))

    def restart(self) -> None:
        """Forget the warm-start state: the next :meth:`solve_graph` starts from zero prices."""
        self.u[:] = 0.0
        self.v[:] = 0.0
        self.col4row[:] = -1
        self.row4col[:] = -1
        self.pr_thr[:] = np.inf
        self.v_snaps.clear()
        self.restarted = True

    def solve_dense(self, S: np.ndarray) -> SparseLAPResult:
        """Solve the dense matrix ``S`` (this oracle's scores, within ``dense_margin``) with the dense
        kernel, then certify its matching and prices against the exact scores."""
        oracle, n, m = self.oracle, self.n, self.m
        tick = time.perf_counter()
        u, v = np.zeros(n), np.zeros(m)
        c, r4c = np.full(n, -1, np.int64), np.full(m, -1, np.int64)
        failed = dense_sap(S, u, v, c, r4c)
        if failed >= 0:
            raise InfeasibleMatchError(
                f"scores: cost matrix is infeasible: row {failed} cannot be assigned along with the rows "
                "before it without a forbidden entry"
            )
        self.clock["solve_s"] += time.perf_counter() - tick
        tick = time.perf_counter()
        self.col4row, self.row4col = c, r4c
        V = -v
        s_c = oracle.exact(self.all_rows, c)
        T = S[self.all_rows, c] - V[c]
        # a dense entry and the exact one differ by at most dense_margin: twice that (both entries of
        # a comparison) plus float64 rounding separates the entries that may gain
        slack = 2.0 * oracle.dense_margin + 8.0 * _U64 * (
            np.abs(T) + float(np.abs(V).max()) + oracle.row_scale
        )
        gains = np.zeros(n)
        for blk in _row_blocks(self.all_rows, m, self.chunk_size):
            with np.errstate(invalid="ignore"):
                rr, cc = np.nonzero(S[blk] - V[None, :] > (T[blk] - slack[blk])[:, None])
            gi = blk[rr]
            np.maximum.at(gains, gi, _gains(oracle.exact(gi, cc), V[cc], s_c[gi], V[c[gi]]))
        self.clock["certify_s"] += time.perf_counter() - tick
        return SparseLAPResult(c, math.fsum(s_c.tolist()), self._gap_bound(gains, V), self.rounds, n * m)

    def dense_fallback(self, n_unmatched: int) -> SparseLAPResult | None:
        """The dense method instead, when the graph has grown too large or matches too few rows
        (:func:`_dense_is_faster`); ``None`` otherwise."""
        lo, hi = self.oracle.dense_entries
        if not _dense_is_faster(self.n, self.m, self.keys.size, n_unmatched, lo, hi):
            return None
        tick = time.perf_counter()
        S = self.oracle.dense_exact()
        self.clock["candidates_s"] += time.perf_counter() - tick
        if S is None:
            return None
        logger.debug(
            "round %d: %d edges; solving the dense %d × %d problem instead",
            self.rounds,
            self.keys.size,
            self.n,
            self.m,
        )
        return self.solve_dense(S)

    def result(self, cert: _Certificate) -> SparseLAPResult:
        s_c = self.s[np.searchsorted(self.keys, self.all_rows * self.m + self.col4row)]
        return SparseLAPResult(
            self.col4row.copy(), math.fsum(s_c.tolist()), cert.gap_bound, self.rounds, int(self.keys.size)
        )

    # ------------------------------------------------------------------ all phases
    def run(self) -> SparseLAPResult:
        """Candidates, then solve, grow and certify until the certificate finds nothing to add."""
        if self.n == 0:
            return SparseLAPResult(np.zeros(0, np.int64), 0.0, 0.0, 0, 0)
        self.find_candidates()
        while True:
            if (res := self.dense_fallback(0)) is not None:
                return res
            stuck = self.solve_graph()
            if stuck.size:
                if (res := self.dense_fallback(int((self.col4row < 0).sum()))) is not None:
                    return res
                self.grow(stuck)
                continue
            cert = self.certify()
            if cert.new_i.size:
                self.certified_rounds += 1
                if self.certified_rounds >= self.max_rounds:
                    logger.warning(
                        "solve: stopped after max_rounds=%d with gap bound %.3g",
                        self.max_rounds,
                        cert.gap_bound,
                    )
                    return self.result(cert)
                self.add_edges(cert.new_i, cert.new_j)
                continue
            if cert.n_blurred and not self.restarted:
                # gains above the tolerance that the graph already holds or the prices' rounding
                # hides (prices grown far beyond the scores while early graphs lacked good edges,
                # or after penalty entries): fresh prices from cold duals on the same graph
                logger.debug(
                    "round %d: %d rows gain up to %.3g; re-solving from cold duals",
                    self.rounds,
                    cert.n_blurred,
                    float(cert.gains.max()),
                )
                self.restart()
                continue
            return self.result(cert)


def _dense_is_faster(
    n: int, m: int, n_edges: int, n_unmatched: int, min_entries: int, max_entries: int
) -> bool:
    """Hub-dominated costs: the graph has grown past 1/16 of all entries, or over a quarter of the
    rows found no partner in it (SAE Match's folded objective leaves < 4 % of them without one).
    Only for problems of ``min_entries`` to ``max_entries`` entries."""
    if not min_entries <= n * m <= max_entries:
        return False
    return n_edges * _DENSE_FRACTION > n * m or 4 * n_unmatched > n


def _reference(S: np.ndarray) -> SparseLAPResult:
    try:
        rows, cols = scipy.optimize.linear_sum_assignment(S, maximize=True)
    except ValueError as exc:
        raise InfeasibleMatchError(f"scores: cost matrix is infeasible ({exc})") from None
    out = np.empty(S.shape[0], np.int64)
    out[rows] = cols
    return SparseLAPResult(out, math.fsum(S[rows, cols].tolist()), 0.0, 0, int(S.size))


def _use_reference(reference: bool) -> bool:
    return reference or os.environ.get("SAEMATCH_REFERENCE", "") not in ("", "0")


def _check_common(k: int, chunk_size: int, tol: float, max_rounds: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    check_tol(tol)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds: expected an int >= 1, got {max_rounds!r}")


def _as_matrix(name: str, a: object) -> Tensor:
    """A real matrix as a tensor: numpy arrays of any strides, tensors, nested lists; int, unsigned and
    bool entries widened to float64."""
    if not isinstance(a, Tensor):
        arr = np.asarray(a)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
            raise TypeError(f"{name}: expected a real float, int or bool dtype, got {arr.dtype}")
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
        a = torch.from_numpy(np.ascontiguousarray(arr))  # a copy only for strides torch cannot view
    t = a
    if t.is_complex():
        raise TypeError(f"{name}: expected a real float, int or bool dtype, got {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    problem = nonfinite_summary(t)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")
    return t


def memory_bytes(n: int, m: int, *, chunk_size: int = 4096, k: int = 8) -> int:
    """Rough peak memory (bytes) of :func:`solve_inner_product` for ``n <= m`` rows and columns, beyond
    its inputs: one float32 score block and its bfloat16 copy, the candidate state (graph, reserve,
    priced reserve) and the dense fallback's float64 matrix when the problem is small enough for it."""
    n, m = sorted((int(n), int(m)))
    rows = min(n, max(1, min(chunk_size, _MAX_BLOCK // max(m, 1))))
    blocks = 6 * rows * m
    depth = min(_PRICED * k, m)
    # priced reserve (int64 + float64), reserve (2 orders × (RESERVE - 1)k entries of 3 × 8 bytes),
    # graph edges (keys, scores, CSR: ~4k per row of 24 bytes), ~10 float64 per row and column
    state = n * (16 * depth + 48 * (_RESERVE - 1) * k + 96 * k) + 80 * (n + m)
    dense = 8 * n * m if _DENSE_MIN_ENTRIES <= n * m <= _DENSE_MAX_BYTES // 8 else 0
    return blocks + state + dense


def candidate_precision(device: str | torch.device) -> Precision:
    """The precision ``candidates="auto"`` picks on ``device``: ``"bfloat16"`` where bfloat16 GEMMs are
    native (CUDA devices of compute capability 8.0 or more; CPUs with AMX or AVX512-BF16, where they
    run 3–7× faster than float32), else ``"float32"``. Either gives the same certified optimum."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.get_device_capability(dev)[0] >= 8 else "float32"
    if dev.type == "cpu":
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):  # private torch.cpu API
            fn = getattr(torch.cpu, probe, None)
            if fn is not None and bool(fn()):
                return "bfloat16"
    return "float32"


def threadsafe() -> bool:
    """Whether sparse solves may run in several Python threads at once.

    The compiled kernels release the GIL; numba's ``workqueue`` threading layer (its fallback when
    neither OpenMP nor TBB is available) aborts the process when two threads launch parallel kernels
    concurrently, ``omp`` and ``tbb`` do not.
    """
    from numba.np.ufunc.parallel import threading_layer

    try:
        layer = threading_layer()
    except ValueError:  # chosen at the first parallel launch: launch a tiny one
        one, zero = np.zeros((1, 1)), np.zeros(1, np.int64)
        exact_dots(one, one, zero, zero, np.empty(1))
        layer = threading_layer()
    return layer != "workqueue"


def _run(
    oracle: _Oracle,
    *,
    k: int,
    chunk_size: int,
    tol: float,
    max_rounds: int,
    timings: dict[str, float] | None,
    method: Method = "sparse",
) -> SparseLAPResult:
    clock = {"candidates_s": 0.0, "solve_s": 0.0, "certify_s": 0.0}
    t0 = time.perf_counter()
    solver = _CertifiedSolve(oracle, k=k, chunk_size=chunk_size, tol=tol, max_rounds=max_rounds, clock=clock)
    if method == "dense" and oracle.n:
        S = oracle.dense_exact()
        assert S is not None  # only explicit matrices take the dense method
        res = solver.solve_dense(S)
    else:
        res = solver.run()
    if timings is not None:
        timings.update(clock, total_s=time.perf_counter() - t0)
    return res


def solve_inner_product(
    X: Tensor | np.ndarray,
    Y: Tensor | np.ndarray,
    *,
    k: int = 8,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    tol: float = DEFAULT_TOL,
    reference: bool = False,
    max_rounds: int = 100,
    timings: dict[str, float] | None = None,
    candidates: Candidates = "auto",
) -> SparseLAPResult:
    """Assign every row of ``X`` to a distinct row of ``Y`` maximising ``Σ_i ⟨X_i, Y_cols[i]⟩``, exactly.

    Never holds the ``n × m`` score matrix: row blocks of ``X Yᵀ`` are streamed for top-``k``
    candidates and for the optimality certificate (see the module docstring for the guarantee).

    Parameters
    ----------
    X : Tensor or ndarray, shape (n, D). Rows to assign (e.g. folded parameters of SAE A's features).
    Y : Tensor or ndarray, shape (m, D), ``m >= n``. Candidate partners (SAE B's features). Any real
        dtype and strides; the objective is that of the float64 problem, on the values as given.
    k : int
        Initial candidates per row (grown where the sparse graph has no full matching).
    device : str or torch.device, optional
        Where the score blocks are computed: ``None`` or ``"auto"`` CUDA when available, else CPU;
        asking for CUDA without it is an error (:func:`saematch_core.cost.resolve_device`). Exact
        re-scoring and the sparse solver run on the CPU.
    chunk_size : int
        Rows per score block (capped so a block holds at most 2**28 entries).
    tol : float
        Relative tolerance: an entry is added to the graph when its gain exceeds ``tol`` times the
        magnitude of the two scores compared (|S_ij| + |S_i,cols[i]|). Whatever ``tol``, ``gap_bound``
        states what is left (see the module docstring).
    reference : bool
        Solve the dense problem with scipy instead (also forced by ``SAEMATCH_REFERENCE=1``).
    max_rounds : int
        Safety limit on certify-and-extend rounds (growing ``k`` does not count); if reached, the
        result is returned with its (larger) ``gap_bound`` and a warning is logged.
    timings : dict, optional
        If given, filled with wall-clock seconds per phase: ``candidates_s`` (score blocks and
        top-``k``, growth of ``k``), ``solve_s`` (sparse solves), ``certify_s`` (certificate and new
        edges) and ``total_s`` (not including input validation and copies).
    candidates : ``"auto"``, ``"float32"`` or ``"bfloat16"``
        Precision of the candidate search (the top-``k`` scan and the bounds it leaves). bfloat16
        GEMMs run 3–7× faster on CPUs with AVX512-BF16/AMX and on recent GPUs; the result stays exact,
        as the bounds carry bfloat16's rounding error and the certificate re-checks in float32 and
        float64. ``"auto"`` (default) picks bfloat16 where it is native (:func:`candidate_precision`).

    Returns
    -------
    SparseLAPResult
        ``cols`` (n,), ``total``, ``gap_bound`` (0 = proven optimal), ``rounds``, ``n_candidates``.

    Examples
    --------
    >>> import torch
    >>> X = torch.eye(3)
    >>> res = solve_inner_product(X, X[[2, 0, 1]])
    >>> res.cols.tolist(), res.total, res.gap_bound
    ([1, 2, 0], 3.0, 0.0)
    """
    X = _as_matrix("X", X)
    Y = _as_matrix("Y", Y)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"X, Y: expected the same dimension D, got X {tuple(X.shape)} and Y {tuple(Y.shape)}"
        )
    if X.shape[0] > Y.shape[0]:
        raise ValueError(
            f"X, Y: expected n <= m (every row of X gets a distinct row of Y), got n={X.shape[0]} > "
            f"m={Y.shape[0]}; swap the arguments"
        )
    _check_common(k, chunk_size, tol, max_rounds)
    if _use_reference(reference):
        S = X.detach().cpu().double() @ Y.detach().cpu().double().T
        return _reference(S.numpy())
    candidates = check_candidates(candidates)
    dev = resolve_device(device, fallback="auto")
    precision: Precision = candidate_precision(dev) if candidates == "auto" else candidates
    oracle = _InnerProductOracle(X, Y, dev, precision)
    return _run(oracle, k=k, chunk_size=chunk_size, tol=tol, max_rounds=max_rounds, timings=timings)


def solve_scores(
    scores: object,
    *,
    maximize: bool = True,
    k: int = 8,
    chunk_size: int = 4096,
    tol: float = DEFAULT_TOL,
    reference: bool = False,
    max_rounds: int = 100,
    timings: dict[str, float] | None = None,
    method: Method = "sparse",
) -> SparseLAPResult:
    """The same certified solver on an explicit score (or cost) matrix.

    The matrix is held in memory (float64); candidates, bounds and the certificate are computed from
    it exactly, so the only difference to :func:`solve_inner_product` is where the scores come from.

    Parameters
    ----------
    scores : array_like, shape (n, m), ``n <= m``
        Real numeric or bool entries (numpy of any strides, tensors, lists). As in scipy, an infinite
        entry of the sign that can never be optimal (``-inf`` when maximising, ``+inf`` when
        minimising) forbids the pairing; NaN and the other infinity are errors.
    maximize : bool
        Maximise ``Σ scores[i, cols[i]]`` (default) or minimise it (``total`` is then the cost).
    method : ``"sparse"`` or ``"dense"``
        The candidate graph with its certificate (default), or the dense kernel (scipy's algorithm,
        with the same certificate) directly.
    k, chunk_size, tol, reference, max_rounds, timings
        As in :func:`solve_inner_product`.

    Returns
    -------
    SparseLAPResult

    Raises
    ------
    InfeasibleMatchError
        Every assignment uses a forbidden entry.

    Examples
    --------
    >>> import numpy as np
    >>> solve_scores(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0]]), maximize=False).cols.tolist()
    [1, 0]
    """
    C = as_cost_matrix(scores, maximize, name="scores")  # the costs to minimise (-scores when maximising)
    if C.shape[0] > C.shape[1]:
        raise ValueError(
            f"scores: expected n <= m (rows are assigned to distinct columns), got shape {C.shape}; "
            "pass the transpose"
        )
    res = solve_cost_matrix(
        C,
        k=k,
        chunk_size=chunk_size,
        tol=tol,
        reference=reference,
        max_rounds=max_rounds,
        timings=timings,
        method=method,
    )
    return res._replace(total=res.total if not maximize else -res.total)


def solve_cost_matrix(
    C: np.ndarray,
    *,
    k: int = 8,
    chunk_size: int = 4096,
    tol: float = DEFAULT_TOL,
    reference: bool = False,
    max_rounds: int = 100,
    timings: dict[str, float] | None = None,
    method: Method = "sparse",
) -> SparseLAPResult:
    """Minimise ``Σ_i C[i, cols[i]]`` for a checked cost matrix, consuming it.

    ``C`` is what :func:`saematch_core.lap.as_cost_matrix` returns (C-contiguous float64, ``+inf`` =
    forbidden, no NaN or ``-inf``), with ``n <= m``; it is negated in place (no second copy of a
    large matrix). ``total`` is the minimal total cost. Other arguments as in :func:`solve_scores`.
    """
    _check_common(k, chunk_size, tol, max_rounds)
    if method not in ("sparse", "dense"):
        raise ValueError(f"method: expected 'sparse' or 'dense', got {method!r}")
    S = np.negative(C, out=C)  # the score form the solver maximises; forbidden entries are -inf
    if _use_reference(reference):
        res = _reference(S)
    else:
        res = _run(
            _DenseOracle(S),
            k=k,
            chunk_size=chunk_size,
            tol=tol,
            max_rounds=max_rounds,
            timings=timings,
            method=method,
        )
    return res._replace(total=-res.total)
