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
    reduced_scan_bf16,
    row_abs_max,
    sparse_sap,
    split_norms,
    stored_near,
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


class _ErrorModel(NamedTuple):
    """How far the entries of a row block may lie from the exact scores:
    ``|S_ij - Ŝ_ij| <= rel · |Ŝ_ij| + row[i] · col_scale[j]`` for every computed entry ``Ŝ_ij``."""

    rel: float
    """Relative to the computed entry (the rounding of a bfloat16 output; 0 for float32 blocks)."""
    row: np.ndarray
    """(n,) per-row factor (input rounding and accumulation, ∝ ‖X_i‖; 0 for exact blocks)."""


class _Oracle:
    """Access to the scores: float32 (or exact) row blocks, exact entries, error bounds."""

    n: int
    m: int
    row_scale: np.ndarray  # (n,) bound on |S_ij| over the row's finite entries
    col_scale: np.ndarray  # (m,) the column factor of the error models (‖Y_j‖; 0 for exact blocks)
    cand_err: _ErrorModel  # error of candidate blocks (block(candidates=True))
    block_err: _ErrorModel  # error of float32 blocks (block())
    dense_margin: np.ndarray  # (n,) bound on |dense_exact() entry - exact entry|
    col_norm: np.ndarray | None  # (m,) ‖Y_j‖ when S = X Yᵀ: enables norm-scaled candidates
    inv_norm: np.ndarray  # (m,) 1/‖Y_j‖ (0 for zero rows), or (0,) without norms
    row_inv_norm: Tensor | None  # (n,) 1/‖X_i‖ on the block device, or None without norms
    dense_entries: tuple[int, int]  # problem sizes (entries) for which the dense fallback is allowed

    def block(self, rows: np.ndarray, *, candidates: bool = False, native: bool = False) -> Tensor:
        """Float32 scores of ``rows`` (within :attr:`block_err`); ``candidates=True`` may compute them
        in a faster, coarser precision (within :attr:`cand_err`), and ``native=True`` then returns
        them in that precision (e.g. bfloat16) instead of float32. Forbidden entries read as a large
        finite negative number."""
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


def _norms(a: Tensor, dim: int) -> np.ndarray:
    """Euclidean norms along ``dim`` in float64, rounded up by their error bound (upper bounds)."""
    up = 1.0 + (a.shape[dim] + 2) * 2.0**-52
    return torch.linalg.vector_norm(a.double(), dim=dim).cpu().numpy() * up


def _bf16_parts(
    full: Tensor, coarse: Tensor, exact_norm: np.ndarray, from_float64: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the float32 matrix ``full`` and of ``coarse``, its bfloat16 rounding: upper bounds on
    the norms of the rounded rows and of what was rounded away from the exact inputs (norms
    ``exact_norm``; for float64 inputs that includes their earlier rounding to float32)."""
    if full.device.type == "cpu":
        # one compiled pass over both (10× faster than widening them to float64 for torch)
        hi, lo = np.empty(full.shape[0]), np.empty(full.shape[0])
        split_norms(full.numpy(), coarse.view(torch.int16).numpy().view(np.uint16), hi, lo)
        up = 1.0 + (full.shape[1] + 2) * 2.0**-52
        hi *= up
        lo *= up
    else:
        hi = _norms(coarse, 1)
        lo = _norms(full - coarse.float(), 1)  # the difference is exact in float32
    if from_float64:
        # float64 → float32 rounds each entry within 2^-24 relative (2^-149 absolute if subnormal)
        lo += 2.0**-24 * exact_norm + math.sqrt(full.shape[1]) * 2.0**-149
    return hi, lo


class _InnerProductOracle(_Oracle):
    def __init__(self, X: Tensor, Y: Tensor, device: torch.device, candidates: Precision = "float32") -> None:
        self.n, self.m = X.shape[0], Y.shape[0]
        D = X.shape[1]
        from_float64 = X.dtype == torch.float64 or Y.dtype == torch.float64
        exact_dtype = torch.float64 if from_float64 else torch.float32
        self._Xe = np.ascontiguousarray(X.detach().to("cpu", exact_dtype).numpy())
        self._Ye = np.ascontiguousarray(Y.detach().to("cpu", exact_dtype).numpy())
        self._buf: Tensor | None = None
        self._X32 = X.detach().to(device, torch.float32).contiguous()
        # Y is kept row-major: a GEMM reads Yᵀ as a transposed view as fast as a transposed copy
        self._Y32 = Y.detach().to(device, torch.float32).contiguous()
        # Norms in the inputs' own precision (30× faster than widening to float64 first), rounded up
        # by their error bound: the error models below need upper bounds; the norm-scaled order
        # only needs one consistent value per row.
        up = 1.0 + (D + 2) * float(torch.finfo(exact_dtype).eps)
        xn = torch.linalg.vector_norm(torch.from_numpy(self._Xe), dim=1).double().numpy() * up
        yn = torch.linalg.vector_norm(torch.from_numpy(self._Ye), dim=1).double().numpy() * up
        ymax = float(yn.max()) if self.m else 0.0
        self.row_scale = xn * ymax
        self.col_scale = yn
        self.dense_entries = (_DENSE_MIN_ENTRIES, _DENSE_MAX_BYTES // 8)
        # the dense fallback's float64 GEMM and exact_dots each round within γ_D ‖x‖‖y‖
        gamma64 = D * _U64 / (1.0 - D * _U64)
        self.dense_margin = 2.0 * gamma64 * self.row_scale
        # Rigorous float32 error: rounding the inputs to float32 (when they were float64) plus a
        # D-term dot product in any summation order, |err| <= γ Σ|x_k y_k| <= γ ‖x‖‖y‖. Twice that,
        # plus 4 float32 units of ‖x‖‖y‖ for values that pass through float32, as safety.
        terms = D + (2 if from_float64 else 0)
        gamma = terms * _U32 / (1.0 - terms * _U32)
        if device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        ):
            gamma += 2.0**-10  # TF32 rounds each input to a 10-bit mantissa
        self.block_err = self.cand_err = _ErrorModel(0.0, (2.0 * gamma + 4.0 * _U32) * xn)
        self._Xc: Tensor | None = None
        self._Yc: Tensor | None = None
        self._cbuf: Tensor | None = None
        if candidates == "bfloat16":
            # x = x_h + e_x with x_h its bfloat16 rounding; the norms of e_x are measured, not
            # assumed (typically 5× below the worst case 2^-8 ‖x‖). The GEMM multiplies x_h·y_h
            # exactly and accumulates in float32 (every PyTorch bf16 GEMM does; CUDA's
            # reduced-precision reductions are switched off around the call), then rounds to
            # bfloat16, within u = 2^-8 of the result itself. So |S - Ŝ| <= u|Ŝ| + ‖x_h‖‖e_y‖ +
            # ‖e_x‖‖y_h‖ + ‖e_x‖‖e_y‖ + γ_D ‖x_h‖‖y_h‖, the column norms bounded by their largest
            # ratio to ‖y‖ (so that one factor per row and one per column remain).
            self._Xc = self._X32.to(torch.bfloat16)
            self._Yc = self._Y32.to(torch.bfloat16)
            a, b = _bf16_parts(self._X32, self._Xc, xn, from_float64)
            p, q = _bf16_parts(self._Y32, self._Yc, yn, from_float64)
            pos = yn > 0
            p_r = float((p[pos] / yn[pos]).max()) if pos.any() else 0.0
            q_r = float((q[pos] / yn[pos]).max()) if pos.any() else 0.0
            g_acc = D * _U32 / (1.0 - D * _U32)
            row = (a * q_r + b * p_r + b * q_r + g_acc * a * p_r) * (1.0 + 2.0**-20) + 4.0 * _U32 * xn
            self.cand_err = _ErrorModel(2.0**-8 * (1.0 + 2.0**-20), row)
        self.col_norm = yn
        self.inv_norm = np.where(yn > 0, 1.0 / np.where(yn > 0, yn, 1.0), 0.0)
        self._inv_norm = torch.from_numpy(self.inv_norm).to(device, torch.float32)
        self.row_inv_norm = torch.from_numpy(np.where(xn > 0, 1.0 / np.where(xn > 0, xn, 1.0), 0.0)).to(
            device, torch.float32
        )

    def scaled_(self, S: Tensor) -> Tensor:
        return S.mul_(self._inv_norm[None, :])

    def block(self, rows: np.ndarray, *, candidates: bool = False, native: bool = False) -> Tensor:
        coarse = candidates and self._Xc is not None
        X, Y = (self._Xc, self._Yc) if coarse else (self._X32, self._Y32)
        assert X is not None and Y is not None
        Yt = Y.T
        if rows.size and rows[-1] - rows[0] == rows.size - 1:  # a contiguous range: no gather
            lhs = X[int(rows[0]) : int(rows[-1]) + 1]
        else:
            lhs = X.index_select(0, torch.from_numpy(rows).to(X.device))
        if not coarse:
            return torch.matmul(lhs, Yt, out=self._out(rows.size))
        if self._cbuf is None or self._cbuf.shape[0] < rows.size:
            self._cbuf = torch.empty((rows.size, self.m), dtype=torch.bfloat16, device=X.device)
        cuda = torch.backends.cuda.matmul
        reduced = cuda.allow_bf16_reduced_precision_reduction
        cuda.allow_bf16_reduced_precision_reduction = False
        try:
            torch.matmul(lhs, Yt, out=self._cbuf[: rows.size])
        finally:
            cuda.allow_bf16_reduced_precision_reduction = reduced
        return self._cbuf[: rows.size] if native else self._out(rows.size).copy_(self._cbuf[: rows.size])

    def _out(self, r: int) -> Tensor:
        # One reused output buffer: a fresh (rows, m) tensor per block costs page faults comparable to
        # a good share of the GEMM itself. The returned block is valid until the next call.
        if self._buf is None or self._buf.shape[0] < r:
            self._buf = torch.empty((r, self.m), dtype=torch.float32, device=self._X32.device)
        return self._buf[:r]

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
        self.dense_margin = np.zeros(self.n)
        self.col_scale = np.zeros(self.m)
        self.cand_err = self.block_err = _ErrorModel(0.0, np.zeros(self.n))
        self.col_norm = None
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
    reserve_j: np.ndarray  # (rows, w) columns, -1 for none (forbidden entries need no look)
    reserve_s: np.ndarray  # (rows, w) their block scores (candidate precision)
    kth: np.ndarray
    alpha: np.ndarray


def _block_values(S: Tensor, idx: np.ndarray) -> np.ndarray:
    """The entries ``S[r, idx[r, t]]`` of a score block (bfloat16, float32 or float64), as float64."""
    if S.device.type != "cpu":
        return S.gather(1, torch.from_numpy(idx).to(S.device)).double().cpu().numpy()
    r = np.arange(idx.shape[0])[:, None]
    if S.dtype == torch.bfloat16:
        bits = S.view(torch.int16).numpy().view(np.uint16)[r, idx].astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return S.numpy()[r, idx].astype(np.float64)


def _topk_rows(oracle: _Oracle, rows: np.ndarray, k: int, depth: int, chunk_size: int) -> _Candidates:
    """Candidate edges of ``rows`` and two bounds on each row's other entries.

    Each row keeps its top-``depth`` columns by score and, for inner products, its top-``depth`` by
    ``S_ij / ‖Y_j‖`` (cosine order: a partner whose norm is small is still found). The best ``k`` of
    each order enter the sparse graph; the others are a *reserve* whose block scores let the
    certificate check them without recomputing the row. Entries outside both sets have block scores
    ``Ŝ_ij <= kth_i`` and ``Ŝ_ij <= alpha_i · ‖Y_j‖`` (candidate precision, see :attr:`_Oracle.cand_err`).
    """
    m = oracle.m
    depth = min(max(depth, k), m)
    scaled = oracle.col_norm is not None
    width = (depth - k) * (2 if scaled else 1)
    gi, gj = [], []
    res_j = np.full((rows.shape[0], width), -1, np.int64)
    res_s = np.full((rows.shape[0], width), -np.inf)
    kth = np.full(rows.shape[0], -np.inf)
    alpha = np.full(rows.shape[0], -np.inf)
    pos = 0

    def split(blk: np.ndarray, sl: slice, at: int, idx: np.ndarray, val: np.ndarray, raw: np.ndarray) -> None:
        order = np.argsort(-val, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)
        raw = np.take_along_axis(raw, order, axis=1)
        gi.append(np.repeat(blk, k))
        gj.append(idx[:, :k].ravel())
        if depth > k:
            allowed = raw[:, k:] > _FORBIDDEN  # forbidden entries need no look
            res_j[sl, at : at + depth - k] = np.where(allowed, idx[:, k:], -1)
            res_s[sl, at : at + depth - k] = raw[:, k:]

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
            # the cosine order in the block's precision (float32 products; see _off_graph_bound)
            Sn = S.view(torch.int16).numpy().view(np.uint16) if S.dtype == torch.bfloat16 else S.numpy()
            inv = oracle.inv_norm.astype(np.float32 if Sn.dtype != np.float64 else np.float64)
            (topk2_bf16 if S.dtype == torch.bfloat16 else topk2)(Sn, inv, depth, ir, vr, isc, vsc)
        else:
            Sf = S.float()
            vals, idx = torch.topk(Sf, depth, dim=1, sorted=False)
            ir, vr = idx.cpu().numpy().astype(np.int64), vals.double().cpu().numpy()
            if scaled:
                vals, idx = torch.topk(oracle.scaled_(Sf.clone()), depth, dim=1, sorted=False)
                isc, vsc = idx.cpu().numpy().astype(np.int64), vals.double().cpu().numpy()
            else:
                isc, vsc = ir, vr
        kth[sl] = vr.min(axis=1)
        split(blk, sl, 0, ir, vr, vr)
        if scaled:
            alpha[sl] = vsc.min(axis=1)
            split(blk, sl, depth - k, isc, vsc, _block_values(S, isc))
        else:
            alpha[sl] = np.inf

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    return _Candidates(cat(gi), cat(gj), res_j, res_s, kth, alpha)


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
    keys: np.ndarray,
    s: np.ndarray,
    ii: np.ndarray,
    jj: np.ndarray,
    m: int,
    oracle: _Oracle,
    ss: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add edges (ii, jj) (exactly re-scored unless their exact scores ``ss`` are given; forbidden ones
    dropped) to the sorted key set; returns new (keys, scores)."""
    new = ii * m + jj
    order = np.argsort(new, kind="stable")
    new = new[order]
    pos = np.searchsorted(keys, new)
    fresh = np.ones(new.size, np.bool_)
    fresh[1:] = new[1:] != new[:-1]
    if keys.size:
        fresh &= keys[np.minimum(pos, keys.size - 1)] != new
    new, pos = new[fresh], pos[fresh]
    if new.size == 0:
        return keys, s
    scores = oracle.exact(new // m, new % m) if ss is None else ss[order][fresh]
    allowed = scores > -np.inf
    # both sorted: inserting at the search positions keeps the keys sorted
    return np.insert(keys, pos[allowed], new[allowed]), np.insert(s, pos[allowed], scores[allowed])


class _Scan(NamedTuple):
    """What :func:`_scan_reduced` finds in a row block at prices ``V``."""

    near_r: np.ndarray
    """Row positions (in the block) of the entries whose upper bound exceeds the row's threshold."""
    near_c: np.ndarray
    """Their columns."""
    top_j: np.ndarray
    """(r, depth) each row's entries with the largest upper bounds (unsorted)."""
    top_s: np.ndarray
    """(r, depth) their block scores."""
    thr: np.ndarray
    """(r,) the smallest of those bounds: every other entry of the row is below it."""


def _scan_reduced(
    S: Tensor, V: np.ndarray, err: _ErrorModel, col_scale: np.ndarray, lo: np.ndarray, depth: int
) -> _Scan:
    """Upper bounds on the exact reduced scores ``S_ij - V_j`` of a row block,
    ``U_ij = Ŝ_ij - V_j + err.rel · |Ŝ_ij| + err.row_i · col_scale_j`` (``err.row`` given for the
    block's rows): the entries with ``U_ij > lo_i`` and each row's ``depth`` largest ``U_ij``.

    On the CPU one compiled pass (:func:`reduced_scan`, :func:`reduced_scan_bf16`) finds both; rows
    with more than ``depth`` entries above ``lo_i`` (rare) are searched again. Elsewhere, torch on the
    block's device (:func:`_scan_reduced_torch`, also the reference)."""
    if S.device.type != "cpu":
        return _scan_reduced_torch(S, V, err, col_scale, lo, depth)
    r = S.shape[0]
    tj, ts = np.empty((r, depth), np.int64), np.empty((r, depth))
    thr, cnt = np.empty(r), np.empty(r, np.int64)
    if S.dtype == torch.bfloat16:
        bits = S.view(torch.int16).numpy().view(np.uint16)
        reduced_scan_bf16(bits, V, err.rel, err.row, col_scale, lo, tj, ts, thr, cnt)
    else:
        reduced_scan(S.numpy(), V, err.rel, err.row, col_scale, lo, tj, ts, thr, cnt)
    up = ts - V[tj] + err.rel * np.abs(ts) + err.row[:, None] * col_scale[tj]
    rr, cc = np.nonzero((up > lo[:, None]) & (cnt <= depth)[:, None])
    near_r, near_c = [rr], [tj[rr, cc]]
    for i in np.flatnonzero(cnt > depth):
        x = _block_values(S[i : i + 1], np.arange(S.shape[1])[None, :])[0]
        cols = np.flatnonzero(x - V + err.rel * np.abs(x) + err.row[i] * col_scale > lo[i])
        near_r.append(np.full(cols.size, i, np.int64))
        near_c.append(cols)
    return _Scan(
        np.concatenate(near_r).astype(np.int64), np.concatenate(near_c).astype(np.int64), tj, ts, thr
    )


def _scan_reduced_torch(
    S: Tensor, V: np.ndarray, err: _ErrorModel, col_scale: np.ndarray, lo: np.ndarray, depth: int
) -> _Scan:
    dev = S.device
    x = S.double()
    U = x - torch.from_numpy(V).to(dev)[None, :] + err.rel * x.abs()
    U += torch.from_numpy(err.row).to(dev)[:, None] * torch.from_numpy(col_scale).to(dev)[None, :]
    near = torch.nonzero(U > torch.from_numpy(lo).to(dev)[:, None]).cpu().numpy()
    top_u, top_j = torch.topk(U, depth, dim=1, sorted=False)
    ts = x.gather(1, top_j).cpu().numpy()
    tj = top_j.cpu().numpy().astype(np.int64)
    thr = top_u.min(dim=1).values.cpu().numpy()
    return _Scan(near[:, 0].astype(np.int64), near[:, 1].astype(np.int64), tj, ts, thr)


def _up(x: np.ndarray, rel: float) -> np.ndarray:
    """``x + rel · |x|`` (the largest exact value a computed ``x`` may stand for), infinities kept."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x), x + rel * np.abs(x), x)


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
    new_s: np.ndarray
    """Their exact scores."""
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
        # bounds on the block scores outside the candidates, and the reserve: (n, w) columns (-1 =
        # none), block scores, replaced by the exact score once one was computed (res_x)
        self.kth = np.full(n, np.inf)
        self.alpha = np.full(n, np.inf)
        self.res_j = np.zeros((n, 0), np.int64)
        self.res_s = np.zeros((n, 0))
        self.res_x = np.zeros((n, 0), np.bool_)
        self.columns_added = False
        # the sparse solver's state, minimisation form (prices V = -v)
        self.u = np.zeros(n)
        self.v = np.zeros(m)
        self.col4row = np.full(n, -1, np.int64)
        self.row4col = np.full(m, -1, np.int64)
        self.rounds = 0
        self.certified_rounds = 0
        self.restarted = False
        # Rows recomputed by the certificate keep their entries with the largest upper bounds on the
        # reduced score S_ij - V_j (a "priced reserve", in slots pr_slot[i] of pr_j / pr_s / pr_x) and
        # the bound pr_thr_i on the others; while V does not decrease, unstored entries stay below
        # pr_thr_i + (how far V fell since), so the row need not be recomputed.
        self.depth_p = min(_PRICED * k, m)
        self.pr_slot = np.full(n, -1, np.int64)
        self.pr_j = np.zeros((0, self.depth_p), np.int64)
        self.pr_s = np.zeros((0, self.depth_p))
        self.pr_x = np.zeros((0, self.depth_p), np.bool_)
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
        self.res_j, self.res_s = cand.reserve_j, cand.reserve_s
        self.res_x = np.zeros(self.res_j.shape, np.bool_)
        self.add_edges(cand.graph_i, cand.graph_j)
        self.clock["candidates_s"] += time.perf_counter() - tick

    def add_edges(self, ii: np.ndarray, jj: np.ndarray, ss: np.ndarray | None = None) -> int:
        """Add entries to the graph (exactly scored, or with their exact scores ``ss``; duplicates and
        forbidden entries dropped); returns how many were new."""
        before = self.keys.size
        self.keys, self.s = _merge(self.keys, self.s, ii, jj, self.m, self.oracle, ss)
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

    def _priced_slots(self, rows: np.ndarray) -> np.ndarray:
        """Slots of the priced reserve for ``rows`` (allocated for rows without one)."""
        fresh = rows[self.pr_slot[rows] < 0]
        if fresh.size:
            start = self.pr_j.shape[0]
            self.pr_slot[fresh] = np.arange(start, start + fresh.size)
            pad = ((0, fresh.size), (0, 0))
            self.pr_j = np.pad(self.pr_j, pad, constant_values=-1)
            self.pr_s = np.pad(self.pr_s, pad)
            self.pr_x = np.pad(self.pr_x, pad)
        return self.pr_slot[rows]

    def _off_graph_bound(self, V: np.ndarray) -> np.ndarray:
        """Each row's upper bound on ``max_j (S_ij - V_j)`` over the entries outside its candidates.

        Their block scores satisfy ``Ŝ_ij <= kth_i`` and ``Ŝ_ij <= alpha_i ‖Y_j‖``; with the candidate
        blocks' error model (``|S - Ŝ| <= rel |Ŝ| + c_i n_j``) the exact scores satisfy
        ``S_ij <= kth'_i + c_i n_j`` and ``S_ij <= alpha'_i n_j``. Both at once, over all columns:
        ``max_j (min(kth'_i + c_i n_j, alpha'_i n_j) - V_j)`` (:func:`capped_envelope`), much tighter
        than either when the large-norm columns are the expensive (high ``V_j``) ones."""
        oracle, n = self.oracle, self.n
        err, n_col = oracle.cand_err, oracle.col_scale
        c = err.row
        kth = _up(self.kth, err.rel)
        bound = kth + c * (float(n_col.max()) if n_col.size else 0.0) - float(V.min())
        if oracle.col_norm is not None:
            # the scaled order: Ŝ_ij · (1/‖Y_j‖), with 1/‖Y_j‖ and the product rounded to float32
            alpha = _up(self.alpha, err.rel + 4.0 * _U32) + c
            finite, fin_k = np.isfinite(alpha), np.isfinite(kth)
            env = np.full(n, np.inf)
            env[finite] = line_envelope(n_col, -V, alpha[finite])
            env[self.alpha == -np.inf] = -np.inf
            env_k = np.full(n, np.inf)
            env_k[fin_k] = kth[fin_k] + line_envelope(n_col, -V, c[fin_k])
            capped = capped_envelope(n_col, -V, kth, c, alpha)
            bound = np.minimum(bound, np.minimum(np.minimum(env, env_k), capped))
        return bound

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
        # float64 rounding of the comparisons below, with a float32-sized safety factor
        rounding = 8.0 * _U32 * (np.abs(T) + v_abs + oracle.row_scale)
        lo = T - rounding  # an entry whose upper bound is at most lo cannot gain
        err, n_col = oracle.cand_err, oracle.col_scale
        gains = np.zeros(n)
        add: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        # rows with a gain above tol that is on the graph or hidden by the prices' rounding: the
        # prices, not the graph, are at fault
        blurred = np.zeros(n, np.bool_)

        def look(gi: np.ndarray, gj: np.ndarray, exact: np.ndarray | None = None) -> np.ndarray:
            # exact gains of entries that may gain; those above the tolerance are chased; returns
            # the exact scores
            sc = oracle.exact(gi, gj) if exact is None else exact
            g = _gains(sc, V[gj], s_c[gi], V[c[gi]])
            pos = np.flatnonzero(g > 0)  # usually none
            gi, gj, sp, g = gi[pos], gj[pos], sc[pos], g[pos]
            np.maximum.at(gains, gi, g)
            blurred[gi[g > self.tol * (np.abs(sp) + np.abs(s_c[gi]))]] = True
            bad = g > self._beta(sp, V[gj], s_c[gi], V[c[gi]])
            add.append((gi[bad], gj[bad], g[bad], sp[bad]))
            return sc

        def look_stored(rows: np.ndarray, sj: np.ndarray, ss: np.ndarray, sx: np.ndarray) -> None:
            # stored block scores of ``rows`` (views into a table): an exact look near the
            # boundary, the exact scores kept for later rounds
            rr, pp = stored_near(sj, ss, sx, V, err.rel, err.row[rows], n_col, lo[rows])
            if rr.size:
                ss[rr, pp] = look(rows[rr], sj[rr, pp])
                sx[rr, pp] = True

        look(rows_e, cols_e, s)  # the graph's edges (every row has one: its matched edge)
        bound = self._off_graph_bound(V)
        self.v_snaps.append(V.copy())
        # how far V fell since each earlier round (0 for square problems: prices only rise there)
        drop = np.array([max(0.0, float(np.max(snap - V))) for snap in self.v_snaps])
        has_pr = np.isfinite(self.pr_thr)
        bound[has_pr] = np.minimum(bound[has_pr], self.pr_thr[has_pr] + drop[self.pr_round[has_pr]])
        check = np.flatnonzero(bound > lo)
        rows_pr = np.flatnonzero(has_pr)
        if rows_pr.size:
            slots = self.pr_slot[rows_pr]
            sj, ss, sx = self.pr_j[slots], self.pr_s[slots], self.pr_x[slots]
            look_stored(rows_pr, sj, ss, sx)
            self.pr_s[slots], self.pr_x[slots] = ss, sx
        if self.res_j.shape[1]:
            look_stored(self.all_rows, self.res_j, self.res_s, self.res_x)
        depth_p = self.depth_p
        for blk in _row_blocks(check, m, self.chunk_size):
            # the candidate precision, with its error carried entry by entry
            scan = _scan_reduced(
                oracle.block(blk, candidates=True, native=True),
                V,
                _ErrorModel(err.rel, err.row[blk]),
                n_col,
                lo[blk],
                depth_p,
            )
            slots = self._priced_slots(blk)
            self.pr_j[slots], self.pr_s[slots], self.pr_x[slots] = scan.top_j, scan.top_s, False
            self.pr_thr[blk] = scan.thr
            self.pr_round[blk] = len(self.v_snaps) - 1
            look(blk[scan.near_r], scan.near_c)
        new_i = np.concatenate([a[0] for a in add])
        new_j = np.concatenate([a[1] for a in add])
        new_g = np.concatenate([a[2] for a in add])
        new_s = np.concatenate([a[3] for a in add])
        if new_i.size:
            # only entries off the graph are new edges, each once (several sources may find one)
            key, first = np.unique(new_i * m + new_j, return_index=True)
            pos = np.minimum(np.searchsorted(keys, key), keys.size - 1)
            off = first[keys[pos] != key]
            new_i, new_j, new_g, new_s = new_i[off], new_j[off], new_g[off], new_s[off]
        blurred[new_i] = False  # a new edge is progress, not blur
        if new_i.size:
            # Column generation: the largest gains of each row (k of them, doubling every round) make
            # progress while keeping the graph small when the prices are far from the dense optimum.
            order = np.lexsort((-new_g, new_i))
            new_i, new_j, new_s = new_i[order], new_j[order], new_s[order]
            starts = np.searchsorted(new_i, new_i, side="left")
            keep = np.arange(new_i.size) - starts < self.k << min(self.certified_rounds, 20)
            new_i, new_j, new_s = new_i[keep], new_j[keep], new_s[keep]
        cert = _Certificate(
            gains=gains,
            gap_bound=self._gap_bound(gains, V),
            new_i=new_i,
            new_j=new_j,
            new_s=new_s,
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
                self.add_edges(cert.new_i, cert.new_j, cert.new_s)
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
