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
3. **certifies** the result against the full dense problem with the LP dual. For the rectangular
   assignment ``max Σ S_ij x_ij`` s.t. every row assigned once, every column at most once, the dual is
   ``min Σ U_i + Σ V_j`` s.t. ``U_i + V_j >= S_ij`` for all ``(i, j)`` and ``V_j >= 0``. A matching is
   optimal iff duals exist that are feasible, tight on matched edges and ``V_j = 0`` on unmatched
   columns (complementary slackness). Feasibility off the graph is checked without recomputing
   rows whose bound ``max_j (min(t_i, a_i ‖Y_j‖) - V_j) <= U_i`` (plus a rigorous float32 error
   term) already proves it; reserve entries are checked from their stored scores; the remaining rows
   are recomputed block by block (never the whole ``n × m``), near-tight entries are re-scored in
   float64, the most violated entries of each row are added to the graph, and the warm-started solver
   runs again. A recomputed row keeps its best entries by reduced score ``S_ij - V_j`` and the bound on
   the rest, which stays valid while ``V`` does not fall, so later rounds rarely recompute it.

The loop stops when no entry violates the dual by more than ``tol``; then for every injective
assignment ``σ``, ``Σ S_iσ(i) <= total + n · max_violation · scale``, so the result is optimal (exactly,
up to float64 rounding of the certificate, when ``max_violation`` is 0). If the sparse graph has no
full matching, ``k`` is doubled for the rows of the failed alternating trees, the unmatched rows get
edges to their best free columns and (once) every column gets its best ``k`` rows by
``S_ij / ‖X_i‖``, until it does: a few large-norm "hub" columns that top every row's list then cannot
starve the others.

Hub-dominated costs leave most rows without a partner in the first graph and then grow it round
after round (to a third of the dense matrix on the unfolded objective of our trained SAEs). When over
a quarter of the rows are unmatched or the graph holds more than 1/16 of all entries, a problem whose
float64 matrix takes at most 512 MiB goes to the dense reference below (exact by construction),
which is then faster.

``SAEMATCH_REFERENCE=1`` (or ``reference=True``) switches to the dense scipy reference
(:func:`scipy.optimize.linear_sum_assignment` on the float64 matrix).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saematch_core._jv_numba import (
    capped_envelope,
    exact_dots,
    line_envelope,
    reduced_scan,
    sparse_sap,
    topk2,
    topk2_bf16,
)
from saematch_core.sae import nonfinite_summary

__all__ = [
    "Candidates",
    "Precision",
    "SparseLAPResult",
    "candidate_precision",
    "solve_inner_product",
    "solve_scores",
    "threadsafe",
]

logger = logging.getLogger(__name__)

_U32 = 2.0**-24
# A block of scores is at most this many elements (1 GiB in float32), whatever ``chunk_size`` says.
_MAX_BLOCK = 2**28
# Relative dual slack below which the warm-start repair keeps a matched row (float64 noise).
_FEAS_REL = 1e-13
# Candidates kept per row and order, as a multiple of k: the best k enter the graph, the rest are a
# reserve checked from their stored scores, so the certificate rarely recomputes a row.
_RESERVE = 4
# Entries kept per recomputed row (multiple of k), by reduced score S_ij - V_j, for later rounds.
_PRICED = 8
# Dense fallback (see _dense_is_faster): graph size relative to the dense matrix, and problem sizes.
_DENSE_FRACTION = 16
_DENSE_MIN_ENTRIES = 1 << 20
_DENSE_MAX_BYTES = 512 << 20

Precision = Literal["float32", "bfloat16"]
Candidates = Literal["auto", "float32", "bfloat16"]
_CANDIDATES: tuple[str, ...] = get_args(Candidates)


class SparseLAPResult(NamedTuple):
    """Result of :func:`solve_inner_product` / :func:`solve_scores`."""

    cols: np.ndarray
    """int64 (n,): row ``i`` is assigned to column ``cols[i]`` (all distinct)."""
    total: float
    """The objective ``Σ_i S[i, cols[i]]``, re-scored in float64 (for ``solve_scores(maximize=False)``,
    the total cost)."""
    max_violation: float
    """The certificate: the largest violation of the LP dual conditions over the full dense problem
    (feasibility ``U_i + V_j >= S_ij`` for every ``(i, j)``, tightness on matched edges, ``V_j = 0`` on
    unmatched columns, ``V_j >= 0``), in units of ``scale`` (``max_i ‖X_i‖ · max_j ‖Y_j‖``, or
    ``max |S|``). ``<= tol`` means proven optimal. 0.0 on the dense reference path (exact by
    construction)."""
    rounds: int
    """Number of sparse solves (1 when the first candidate graph already certified; 0 on the reference
    path; those before it on the dense fallback)."""
    n_candidates: int
    """Number of edges in the final sparse graph, not counting the reserve (``n · m`` on the reference
    path and the dense fallback)."""


class _Oracle:
    """Access to ``S = X Yᵀ``: float32 (or exact) row blocks, exact entries, error bounds."""

    n: int
    m: int
    scale: float
    margin: np.ndarray  # (n,) bound on |candidate-block entry - exact entry| for each row
    alpha_margin: np.ndarray  # (n,) the same bound for candidate-block entries divided by ‖Y_j‖
    block_margin: np.ndarray  # (n,) bound on |float32-block entry - exact entry| (the certificate's)
    col_norm: np.ndarray | None  # (m,) ‖Y_j‖ when S = X Yᵀ: enables norm-scaled candidates
    inv_norm: np.ndarray  # (m,) 1/‖Y_j‖ (0 for zero rows), or (0,) without norms
    row_inv_norm: Tensor | None  # (n,) 1/‖X_i‖ on the block device, or None without norms

    def block(self, rows: np.ndarray, *, candidates: bool = False, native: bool = False) -> Tensor:
        """Float32 scores of ``rows``; ``candidates=True`` may compute them in a faster, coarser
        precision whose error stays below :attr:`margin` (instead of :attr:`block_margin`), and
        ``native=True`` then returns them in that precision (e.g. bfloat16) instead of float32."""
        raise NotImplementedError

    def scaled_(self, S: Tensor) -> Tensor:
        """Divide a row block by the column norms, in place."""
        raise NotImplementedError

    def exact(self, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def dense_exact(self) -> np.ndarray | None:
        """The whole score matrix in float64 for the dense fallback, or ``None`` (no fallback)."""
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
        xmax = float(xn.max()) if self.n else 0.0
        self.scale = xmax * ymax if xmax * ymax > 0 else 1.0
        # Rigorous float32 error: rounding the inputs to float32 (when they were float64) plus a
        # D-term dot product in any summation order, |err| <= γ Σ|x_k y_k| <= γ ‖x‖‖y‖.
        terms = D + (2 if exact_dtype == torch.float64 else 0)
        gamma = terms * _U32 / (1.0 - terms * _U32)
        if device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        ):
            gamma += 2.0**-10  # TF32 rounds each input to a 10-bit mantissa
        # 2× for safety against the bound being applied to a float32-rounded threshold value.
        self.block_margin = 2.0 * gamma * xn * ymax + 4.0 * _U32 * self.scale
        self.margin, self.alpha_margin = (
            self.block_margin,
            2.0 * (gamma + 4.0 * _U32) * xn + 4.0 * _U32 * xmax,
        )
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
            self.margin = gamma_c * xn * ymax + 4.0 * _U32 * self.scale
            self.alpha_margin = (gamma_c + 4.0 * _U32) * xn + 4.0 * _U32 * xmax
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
    def __init__(self, S: np.ndarray) -> None:
        self._S = S
        self.n, self.m = S.shape
        amax = float(np.abs(S).max()) if S.size else 0.0
        self.scale = amax if amax > 0 else 1.0
        self.margin = self.block_margin = np.zeros(self.n)
        self.col_norm = None
        self.alpha_margin = np.zeros(self.n)
        self.inv_norm = np.zeros(0)
        self.row_inv_norm = None

    def block(self, rows: np.ndarray, *, candidates: bool = False, native: bool = False) -> Tensor:
        del candidates, native  # the scores are given exactly
        return torch.from_numpy(self._S[rows])

    def exact(self, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        return self._S[ii, jj]


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
            ri.append(np.repeat(blk, depth - k))
            rj.append(idx[:, k:].ravel())
            rv.append(raw[:, k:].ravel())

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
    """Add edges (ii, jj) (exactly re-scored) to the sorted key set; returns new (keys, scores)."""
    new = np.sort(ii * m + jj)
    pos = np.searchsorted(keys, new)
    fresh = np.ones(new.size, np.bool_)
    fresh[1:] = new[1:] != new[:-1]
    if keys.size:
        fresh &= keys[np.minimum(pos, keys.size - 1)] != new
    new, pos = new[fresh], pos[fresh]
    if new.size == 0:
        return keys, s
    # both sorted: inserting at the search positions keeps the keys sorted
    return np.insert(keys, pos, new), np.insert(s, pos, oracle.exact(new // m, new % m))


def _rescore(
    oracle: _Oracle,
    U: np.ndarray,
    V: np.ndarray,
    gi: np.ndarray,
    gj: np.ndarray,
    tol_abs: float,
    out: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]],
) -> float:
    """Exact reduced costs of the entries (gi, gj): append the violating ones to ``out`` (rows,
    columns, violations) and return the largest reduced cost (-inf when there is no entry)."""
    exact_v = oracle.exact(gi, gj) - U[gi] - V[gj]
    bad = exact_v > tol_abs
    out[0].append(gi[bad])
    out[1].append(gj[bad])
    out[2].append(exact_v[bad])
    return float(exact_v.max()) if exact_v.size else -math.inf


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


def _solve(
    oracle: _Oracle, *, k: int, chunk_size: int, tol: float, max_rounds: int, timings: dict[str, float] | None
) -> SparseLAPResult:
    clock = {"candidates_s": 0.0, "solve_s": 0.0, "certify_s": 0.0}
    t0 = time.perf_counter()
    res = _solve_inner(oracle, k=k, chunk_size=chunk_size, tol=tol, max_rounds=max_rounds, clock=clock)
    if timings is not None:
        timings.update(clock, total_s=time.perf_counter() - t0)
    return res


def _solve_inner(
    oracle: _Oracle, *, k: int, chunk_size: int, tol: float, max_rounds: int, clock: dict[str, float]
) -> SparseLAPResult:
    n, m = oracle.n, oracle.m
    if n == 0:
        return SparseLAPResult(np.zeros(0, np.int64), 0.0, 0.0, 0, 0)
    all_rows = np.arange(n, dtype=np.int64)
    k_row = np.full(n, min(k, m), np.int64)
    tick = time.perf_counter()
    cand = _topk_rows(oracle, all_rows, int(k_row[0]), _RESERVE * k, chunk_size)
    ii, jj, kth, alpha = cand.graph_i, cand.graph_j, cand.kth, cand.alpha
    res_i, res_j, res_v = cand.reserve_i, cand.reserve_j, cand.reserve_v
    columns_added = False
    keys, s = _merge(np.zeros(0, np.int64), np.zeros(0), ii, jj, m, oracle)
    clock["candidates_s"] += time.perf_counter() - tick

    u = np.zeros(n)
    v = np.zeros(m)
    col4row = np.full(n, -1, np.int64)
    row4col = np.full(m, -1, np.int64)
    rect = n < m
    scale = oracle.scale
    tol_abs = tol * scale
    feas_tol = _FEAS_REL * scale
    rounds = 0
    max_viol = math.inf
    # Rows recomputed by the certificate keep their best entries by current reduced score S_ij - V_j
    # (a "priced reserve") and the bound thr_i on the others; while V does not decrease, unstored
    # entries stay below thr_i + V_j(then) <= thr_i + V_j(now), so the row need not be recomputed.
    depth_p = min(_PRICED * k, m)
    pr_j = np.zeros((n, depth_p), np.int64)
    pr_v = np.zeros((n, depth_p))
    pr_thr = np.full(n, np.inf)
    pr_round = np.zeros(n, np.int64)
    v_snaps: list[np.ndarray] = []
    certified_rounds = 0

    def dense_fallback(n_unmatched: int) -> SparseLAPResult | None:
        # Hub-dominated costs (a few large-norm columns top every row) leave most rows unmatched and
        # grow the graph round after round; a small problem is then faster solved densely, exactly.
        if not _dense_is_faster(n, m, keys.size, n_unmatched):
            return None
        tick = time.perf_counter()
        S_dense = oracle.dense_exact()
        if S_dense is None:
            return None
        logger.debug("round %d: %d edges; solving the dense %d × %d problem instead", rounds, keys.size, n, m)
        res = _reference(S_dense)._replace(rounds=rounds)
        clock["solve_s"] += time.perf_counter() - tick
        return res

    while True:
        if (res := dense_fallback(0)) is not None:
            return res
        rounds += 1
        rows_e = keys // m
        cols_e = keys % m
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows_e, minlength=n), out=indptr[1:])
        stuck = np.zeros(n, np.bool_)
        tick = time.perf_counter()
        n_fail = sparse_sap(indptr, cols_e, -s, u, v, col4row, row4col, rect, feas_tol, stuck)
        clock["solve_s"] += time.perf_counter() - tick
        if n_fail and (res := dense_fallback(n_fail)) is not None:
            return res
        tick = time.perf_counter()
        if n_fail:
            grow = np.flatnonzero(stuck & (k_row < m))
            if grow.size == 0:
                raise RuntimeError("sparse_sap: no full matching although every row sees every column")
            logger.debug("round %d: %d rows unmatched, growing k for %d rows", rounds, n_fail, grow.size)
            new_i, new_j = [], []
            for kk in np.unique(np.minimum(2 * k_row[grow], m)):
                sel = grow[np.minimum(2 * k_row[grow], m) == kk]
                grown = _topk_rows(oracle, sel, int(kk), int(kk), chunk_size)
                new_i.append(grown.graph_i)
                new_j.append(grown.graph_j)
                # entries outside the new top-kk *and* the old candidates obey both bounds
                kth[sel] = np.minimum(kth[sel], grown.kth)
                alpha[sel] = np.minimum(alpha[sel], grown.alpha)
                k_row[sel] = kk
            # Unmatched rows also see their best *free* columns: on hub-dominated costs (every row's
            # top candidates are the same few large-norm columns) growing k alone would take rounds
            # and most of the dense matrix before the graph has a full matching.
            if not columns_added:
                col_i, col_j = _column_candidates(oracle, k, chunk_size)
                new_i.append(col_i)
                new_j.append(col_j)
                columns_added = True
            free_rows, free_cols = np.flatnonzero(col4row < 0), np.flatnonzero(row4col < 0)
            kf = min(k, free_cols.size)
            for blk in _row_blocks(free_rows, m, chunk_size) if kf else ():
                S = oracle.block(blk)
                idx = (
                    torch.topk(S[:, torch.from_numpy(free_cols).to(S.device)], kf, dim=1)
                    .indices.cpu()
                    .numpy()
                )
                new_i.append(np.repeat(blk, kf))
                new_j.append(free_cols[idx].ravel())
            keys, s = _merge(keys, s, np.concatenate(new_i), np.concatenate(new_j), m, oracle)
            clock["candidates_s"] += time.perf_counter() - tick
            continue

        U, V = -u, -v
        viol = float(np.max(s - U[rows_e] - V[cols_e]))
        matched_s = s[np.searchsorted(keys, all_rows * m + col4row)]
        viol = max(viol, float(np.max(np.abs(matched_s - U - V[col4row]))))
        free_cols = row4col < 0
        if free_cols.any():
            viol = max(viol, float(np.max(np.abs(V[free_cols]))))
        v_min = float(V.min())
        viol = max(viol, -v_min)
        # Off-graph entries of row i are <= kth_i and <= alpha_i ‖Y_j‖ (+ float32 error): rows whose
        # bound on max_j (S_ij - V_j) is below U_i need no recomputation.
        bound = kth + oracle.margin - v_min
        if oracle.col_norm is not None:
            finite = np.isfinite(alpha)
            env = np.full(n, np.inf)
            env[finite] = line_envelope(oracle.col_norm, -V, alpha[finite] + oracle.alpha_margin[finite])
            env[alpha == -np.inf] = -np.inf
            # both bounds at once: max_j (min(kth_i, alpha_i ‖Y_j‖) - V_j), much tighter when the
            # large-norm columns are the expensive (high V_j) ones
            capped = capped_envelope(oracle.col_norm, -V, kth + oracle.margin, alpha + oracle.alpha_margin)
            bound = np.minimum(bound, np.minimum(env, capped))
        v_snaps.append(V.copy())
        # how far V fell since each earlier round (0 for square problems: duals only rise there)
        drop = np.array([max(0.0, float(np.max(snap - V))) for snap in v_snaps])
        has_pr = np.isfinite(pr_thr)
        bound[has_pr] = np.minimum(bound[has_pr], pr_thr[has_pr] + drop[pr_round[has_pr]])
        check = np.flatnonzero(bound - U > 0)
        add_i, add_j, add_v = [], [], []
        v_abs = float(np.abs(V).max())
        rows_pr = np.flatnonzero(has_pr)
        # stored approximate scores need an exact look only above U_i - slack_i (their error plus the
        # rounding of the comparison itself)
        rounding = 8.0 * _U32 * (np.abs(U) + v_abs + scale)
        if rows_pr.size:
            # priced-reserve entries, like the reserve below
            pj = pr_j[rows_pr]
            lo = U[rows_pr] - oracle.block_margin[rows_pr] - rounding[rows_pr]
            rr, cc = np.nonzero(pr_v[rows_pr] - V[pj] > lo[:, None])
            gi, gj = rows_pr[rr], pj[rr, cc]
            viol = max(viol, _rescore(oracle, U, V, gi, gj, tol_abs, (add_i, add_j, add_v)))
        if res_i.size:
            # reserve entries: approximate scores first, exact re-scoring near the dual boundary
            near = np.flatnonzero(res_v - V[res_j] > (U - oracle.margin - rounding)[res_i])
            gi, gj = res_i[near], res_j[near]
            viol = max(viol, _rescore(oracle, U, V, gi, gj, tol_abs, (add_i, add_j, add_v)))
        for blk in _row_blocks(check, m, chunk_size):
            # reduced scores in float64: only the block's own error separates them from the exact ones
            marg = oracle.block_margin[blk]
            near_r, near_c, tj, tv = _scan_reduced(oracle.block(blk), V, U[blk] - marg, min(depth_p, m))
            if depth_p < m:
                pr_j[blk] = tj
                pr_v[blk] = tv + V[tj]
                pr_thr[blk] = tv.min(axis=1) + marg
                pr_round[blk] = len(v_snaps) - 1
            gi = blk[near_r]
            viol = max(viol, _rescore(oracle, U, V, gi, near_c, tol_abs, (add_i, add_j, add_v)))
        max_viol = max(viol, 0.0) / scale
        new_i = np.concatenate(add_i) if add_i else np.zeros(0, np.int64)
        new_j = np.concatenate(add_j) if add_j else np.zeros(0, np.int64)
        if new_i.size:
            # Column generation: the most violated entries of each row (k of them, doubling every round)
            # make progress while keeping the graph small when the duals are far from the dense optimum.
            new_v = np.concatenate(add_v)
            order = np.lexsort((-new_v, new_i))
            new_i, new_j = new_i[order], new_j[order]
            starts = np.searchsorted(new_i, new_i, side="left")
            keep = np.arange(new_i.size) - starts < k << min(certified_rounds, 20)
            new_i, new_j = new_i[keep], new_j[keep]
        logger.debug(
            "round %d: %d edges, %d rows rechecked, %d violating edges, max violation %.3g",
            rounds,
            keys.size,
            check.size,
            new_i.size,
            max_viol,
        )
        clock["certify_s"] += time.perf_counter() - tick
        if new_i.size == 0:
            break
        certified_rounds += 1
        if certified_rounds >= max_rounds:
            logger.warning("solve: stopped after max_rounds=%d, max violation %.3g", max_rounds, max_viol)
            break
        n_keys = keys.size
        keys, s = _merge(keys, s, new_i, new_j, m, oracle)
        if keys.size == n_keys:
            break  # violations only on graph edges: float noise beyond tol, reported honestly
    total = math.fsum(s[np.searchsorted(keys, all_rows * m + col4row)].tolist())
    return SparseLAPResult(col4row.copy(), total, max_viol, rounds, int(keys.size))


def _dense_is_faster(n: int, m: int, n_edges: int, n_unmatched: int) -> bool:
    """Hub-dominated costs: the graph has grown past 1/16 of all entries, or over a quarter of the
    rows found no partner in it (SAE Match's folded objective leaves < 4 % of them without one).
    Only for problems of at least 2^20 and at most 512 MiB of float64 entries."""
    if not _DENSE_MIN_ENTRIES <= n * m <= _DENSE_MAX_BYTES // 8:
        return False
    return n_edges * _DENSE_FRACTION > n * m or 4 * n_unmatched > n


def _reference(S: np.ndarray) -> SparseLAPResult:
    rows, cols = linear_sum_assignment(S, maximize=True)
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
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a finite float >= 0, got {tol!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds: expected an int >= 1, got {max_rounds!r}")


def _check_matrix(name: str, t: Tensor) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8)):
        raise TypeError(f"{name}: expected a float or int dtype, got {t.dtype}")
    problem = nonfinite_summary(t)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device: %s requested but CUDA is not available; using the CPU", dev)
        return torch.device("cpu")
    return dev


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


def solve_inner_product(
    X: Tensor,
    Y: Tensor,
    *,
    k: int = 8,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    tol: float = 1e-9,
    reference: bool = False,
    max_rounds: int = 100,
    timings: dict[str, float] | None = None,
    candidates: Candidates = "auto",
) -> SparseLAPResult:
    """Assign every row of ``X`` to a distinct row of ``Y`` maximising ``Σ_i ⟨X_i, Y_cols[i]⟩``, exactly.

    Never holds the ``n × m`` score matrix: row blocks of ``X Yᵀ`` are streamed for top-``k``
    candidates and for the optimality certificate (see the module docstring).

    Parameters
    ----------
    X : Tensor, shape (n, D). Rows to assign (e.g. folded parameters of SAE A's features).
    Y : Tensor, shape (m, D), ``m >= n``. Candidate partners (SAE B's features). Any float dtype;
        the objective is evaluated in float64 on the values as given.
    k : int
        Initial candidates per row (grown where the sparse graph has no full matching).
    device : str or torch.device, optional
        Where the score blocks are computed; default CUDA when available, else CPU. Exact re-scoring
        and the sparse solver run on the CPU.
    chunk_size : int
        Rows per score block (capped so a block holds at most 2**28 entries).
    tol : float
        Accepted dual violation relative to ``scale = max_i ‖X_i‖ · max_j ‖Y_j‖``.
    reference : bool
        Solve the dense problem with scipy instead (also forced by ``SAEMATCH_REFERENCE=1``).
    max_rounds : int
        Safety limit on certify-and-extend rounds (growing ``k`` does not count); if reached, the
        result is returned with its (too large) ``max_violation`` and a warning is logged.
    timings : dict, optional
        If given, filled with wall-clock seconds per phase: ``candidates_s`` (score blocks and
        top-``k``, growth of ``k``), ``solve_s`` (sparse solves), ``certify_s`` (dual check and new
        edges) and ``total_s`` (not including input validation and copies).
    candidates : ``"auto"``, ``"float32"`` or ``"bfloat16"``
        Precision of the candidate search (the top-``k`` scan and the bounds it leaves). bfloat16
        GEMMs run 3–7× faster on CPUs with AVX512-BF16/AMX and on recent GPUs; the result stays exact,
        as the bounds carry bfloat16's rounding error and the certificate re-checks in float32 and
        float64. ``"auto"`` (default) picks bfloat16 where it is native (:func:`candidate_precision`).

    Returns
    -------
    SparseLAPResult
        ``cols`` (n,), ``total``, ``max_violation`` (<= ``tol`` means proven optimal), ``rounds``,
        ``n_candidates``.

    Examples
    --------
    >>> import torch
    >>> X = torch.eye(3)
    >>> res = solve_inner_product(X, X[[2, 0, 1]])
    >>> res.cols.tolist(), res.total, res.max_violation <= 1e-9
    ([1, 2, 0], 3.0, True)
    """
    X = torch.as_tensor(X)
    Y = torch.as_tensor(Y)
    _check_matrix("X", X)
    _check_matrix("Y", Y)
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
    if not X.is_floating_point():
        X = X.double()
    if not Y.is_floating_point():
        Y = Y.double()
    if _use_reference(reference):
        S = X.detach().cpu().double() @ Y.detach().cpu().double().T
        return _reference(S.numpy())
    if candidates not in _CANDIDATES:
        raise ValueError(f"candidates: expected one of {list(_CANDIDATES)}, got {candidates!r}")
    dev = _resolve_device(device)
    precision: Precision = candidate_precision(dev) if candidates == "auto" else candidates
    oracle = _InnerProductOracle(X, Y, dev, precision)
    return _solve(oracle, k=k, chunk_size=chunk_size, tol=tol, max_rounds=max_rounds, timings=timings)


def solve_scores(
    scores: np.ndarray | Tensor,
    *,
    maximize: bool = True,
    k: int = 8,
    chunk_size: int = 4096,
    tol: float = 1e-9,
    reference: bool = False,
    max_rounds: int = 100,
    timings: dict[str, float] | None = None,
) -> SparseLAPResult:
    """The same certified sparse solver on an explicit score (or cost) matrix.

    Useful for adversarial tests and for cost matrices that are not inner products. The matrix is
    held in memory (float64); candidates, bounds and the certificate are computed from it exactly, so
    the only difference to :func:`solve_inner_product` is where the scores come from.

    Parameters
    ----------
    scores : array, shape (n, m), ``n <= m``; finite.
    maximize : bool
        Maximise ``Σ scores[i, cols[i]]`` (default) or minimise it (``total`` is then the cost).
    k, chunk_size, tol, reference, max_rounds, timings
        As in :func:`solve_inner_product`; ``tol`` is relative to ``max |scores|``.

    Returns
    -------
    SparseLAPResult

    Examples
    --------
    >>> import numpy as np
    >>> solve_scores(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0]]), maximize=False).cols.tolist()
    [1, 0]
    """
    t = torch.as_tensor(scores)
    _check_matrix("scores", t)
    if t.shape[0] > t.shape[1]:
        raise ValueError(
            f"scores: expected n <= m (rows are assigned to distinct columns), got shape {tuple(t.shape)}; "
            "pass the transpose"
        )
    _check_common(k, chunk_size, tol, max_rounds)
    S = np.ascontiguousarray(t.detach().cpu().double().numpy())
    sign = 1.0 if maximize else -1.0
    S = sign * S
    res = (
        _reference(S)
        if _use_reference(reference)
        else _solve(
            _DenseOracle(S), k=k, chunk_size=chunk_size, tol=tol, max_rounds=max_rounds, timings=timings
        )
    )
    return res._replace(total=sign * res.total)
