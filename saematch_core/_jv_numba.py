"""Numba kernels behind :mod:`saematch_core.lap_sparse` (private).

* :func:`sparse_sap` — a shortest-augmenting-path (Jonker–Volgenant style) solver for the
  minimisation assignment problem on a CSR graph. It keeps LP dual potentials ``u`` (rows) and ``v``
  (columns) with ``u_i + v_j <= c_ij`` on every edge, tight on matched edges, and — for rectangular
  problems — ``v_j <= 0`` with ``v_j = 0`` on unmatched columns. It warm-starts from any previous
  state (matching, ``u``, ``v``) on a *superset* of the previous edges: a repair pass restores dual
  feasibility, unmatching the rows whose potential had to drop, and then augments every free row.
* :func:`dense_sap` — the same kind of solver on a dense score matrix (scipy's algorithm: one
  shortest augmenting path per row, Dijkstra by linear scans), keeping the duals for the
  certificate; ``-inf`` scores are forbidden edges.
* :func:`exact_dots` — float64 dot products of selected (row, column) pairs.
* :func:`exact_gains` — the sign-exact value of ``(s_ij - V_j) - (s_ic - V_c)`` (error-free
  transformations), so the certificate's last check involves no rounding.
* :func:`topk2` / :func:`topk2_bf16` / :func:`reduced_scan` / :func:`reduced_scan_bf16` — per-row
  top-``k`` scans of score blocks. One vectorised pass takes the maximum of every (strided) chunk of
  :data:`_CHUNK` columns; the ``k``-th largest chunk maximum bounds the row's ``k``-th largest entry
  from below, so only the entries of the few chunks that reach it are collected, and a heap (small
  ``k``) or quickselect picks the ``k`` among them. The reduced scans rank entries by an upper bound
  on their exact reduced score that carries the block's rounding error, entry by entry.
* :func:`stored_near` — the stored candidates (reserve, recomputed rows) that may gain at new prices.
* :func:`line_envelope` / :func:`capped_envelope` — upper envelopes behind the certificate's bounds.
* :func:`row_abs_max` — each row's largest finite magnitude, in one pass.
* :func:`split_norms` — the norms of a float32 matrix's bfloat16 rounding and of its rounding error.

The public kernels release the GIL (``nogil``), so solves in several Python threads overlap; see
:func:`saematch_core.lap_sparse.threadsafe` for when that is allowed.
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = [
    "capped_envelope",
    "dense_sap",
    "exact_dots",
    "exact_gains",
    "line_envelope",
    "reduced_scan",
    "reduced_scan_bf16",
    "row_abs_max",
    "sparse_sap",
    "split_norms",
    "stored_near",
    "topk2",
    "topk2_bf16",
]


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def exact_dots(X, Y, ii, jj, out):  # pragma: no cover - compiled
    """``out[e] = Σ_k float64(X[ii[e], k]) · float64(Y[jj[e], k])`` for every pair ``e``."""
    d = X.shape[1]
    for e in nb.prange(ii.shape[0]):
        a = ii[e]
        b = jj[e]
        acc = 0.0
        for t in range(d):
            acc += np.float64(X[a, t]) * np.float64(Y[b, t])
        out[e] = acc


@nb.njit(cache=True, nogil=True, parallel=True)
def split_norms(full, bits, hi, lo):  # pragma: no cover - compiled
    """Per row of a float32 matrix ``full`` (r, D) and of its bfloat16 rounding, given as raw ``uint16``
    ``bits`` (r, D): ``hi[i]`` the norm of the rounded row, ``lo[i]`` the norm of what the rounding took
    away (``full - rounded``, exact in float32), both summed in float64 (each within ``(D + 2) · 2^-53``
    relative: float32 squares are exact in float64, and nothing under- or overflows)."""
    r, D = full.shape
    for task in nb.prange((r + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        wide = np.empty(D, np.uint32)
        rounded = wide.view(np.float32)
        for i in range(task * _ROWS_PER_TASK, min(r, (task + 1) * _ROWS_PER_TASK)):
            for t in range(D):
                wide[t] = np.uint32(bits[i, t]) << 16  # a bfloat16 is the top half of a float32
            h2 = 0.0
            e2 = 0.0
            for t in range(D):
                h = np.float64(rounded[t])
                e = np.float64(full[i, t] - rounded[t])
                h2 += h * h
                e2 += e * e
            hi[i] = np.sqrt(h2)
            lo[i] = np.sqrt(e2)


@nb.njit(cache=True, nogil=True, parallel=True)
def row_abs_max(S, out):  # pragma: no cover - compiled
    """``out[i] = max_j |S[i, j]|`` over the finite entries of row ``i`` (0 if none); returns whether
    ``S`` has a non-finite entry."""
    n, m = S.shape
    bad = np.zeros(n, np.bool_)
    for i in nb.prange(n):
        best = 0.0
        for j in range(m):
            x = abs(S[i, j])
            if x <= np.inf and x != np.inf:  # finite (NaN fails the first test)
                best = max(best, x)
            else:
                bad[i] = True
        out[i] = best
    return bool(bad.any())


@nb.njit(cache=True, inline="always")
def _two_sum(a, b):  # pragma: no cover - compiled
    """``a + b = s + e`` exactly (Knuth's TwoSum; needs IEEE arithmetic, so no ``fastmath``)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


@nb.njit(cache=True, nogil=True)
def exact_gains(s, vj, t, vc, out):  # pragma: no cover - compiled
    """``out[e]``: an upper bound on ``max(0, (s[e] - vj[e]) - (t[e] - vc[e]))``, exactly 0 when that
    real number is ``<= 0``.

    The four terms are summed into a non-overlapping expansion (Shewchuk's grow-expansion of TwoSum
    steps), whose largest component has the sign of the exact sum; a positive sum is returned
    rounded up. ``s[e] = -inf`` (a forbidden edge) gives 0.
    """
    comp = np.empty(4)
    for e in range(s.shape[0]):
        if s[e] == -np.inf:
            out[e] = 0.0
            continue
        terms = (s[e], -vj[e], -t[e], vc[e])
        size = 0
        for b in terms:
            q = b
            keep = 0
            for c in range(size):
                q, err = _two_sum(q, comp[c])
                if err != 0.0:
                    comp[keep] = err
                    keep += 1
            comp[keep] = q
            size = keep + 1
        top = 0.0
        total = 0.0
        for c in range(size):
            total += comp[c]
            if comp[c] != 0.0:
                top = comp[c]
        if not np.isfinite(total):
            out[e] = np.inf if not total < 0.0 else 0.0
        elif top > 0.0:
            # the components below the largest one add less than 3 units in its last place
            out[e] = total * (1.0 + 2.0**-50) + 5e-324
        else:
            out[e] = 0.0


@nb.njit(cache=True, inline="always")
def _augment(pred, col4row, row4col, sink, root):  # pragma: no cover - compiled
    """Flip the alternating path that ``pred`` (column → row) traces from ``sink`` back to ``root``."""
    j = sink
    while True:
        i = pred[j]
        row4col[j] = i
        nxt = col4row[i]
        col4row[i] = j
        if i == root:
            break
        j = nxt


@nb.njit(cache=True, nogil=True)
def dense_sap(S, u, v, col4row, row4col):  # pragma: no cover - compiled
    """Maximise ``Σ_i S[i, col4row[i]]`` over full row matchings of a dense (n, m) matrix, n <= m.

    The minimisation form ``c_ij = -S_ij`` is solved from scratch by one shortest augmenting path per
    row (Dijkstra on reduced costs by linear scans, as scipy's ``linear_sum_assignment`` does), so
    ``u`` (n,) and ``v`` (m,) end as LP duals: ``u_i + v_j <= c_ij``, tight on matched edges,
    ``v_j <= 0`` and ``v_j = 0`` on unmatched columns. ``S_ij = -inf`` is a forbidden edge. ``u``,
    ``v``, ``col4row`` and ``row4col`` are filled in place (their input values are ignored).

    Returns
    -------
    int, -1 when every row was matched, else the first row for which no assignment exists
    (the problem is infeasible).
    """
    n, m = S.shape
    inf = np.inf
    u[:] = 0.0
    v[:] = 0.0
    col4row[:] = -1
    row4col[:] = -1
    spc = np.empty(m)
    path = np.full(m, -1, np.int64)
    seen_row = np.zeros(n, np.bool_)
    seen_col = np.zeros(m, np.bool_)
    remaining = np.empty(m, np.int64)
    for cur in range(n):
        for j in range(m):
            spc[j] = inf
            seen_col[j] = False
            remaining[j] = m - 1 - j
        for i in range(n):
            seen_row[i] = False
        n_rem = m
        min_val = 0.0
        i = cur
        sink = -1
        while sink < 0:
            seen_row[i] = True
            lowest = inf
            index = -1
            ui = u[i]
            for it in range(n_rem):
                j = remaining[it]
                r = min_val - S[i, j] - ui - v[j]
                if r < spc[j]:
                    path[j] = i
                    spc[j] = r
                # ties go to a free column: shorter paths, and scipy's choice on constant matrices
                if spc[j] < lowest or (spc[j] == lowest and row4col[j] < 0):
                    lowest = spc[j]
                    index = it
            if index < 0 or lowest == inf:
                return cur
            min_val = lowest
            j = remaining[index]
            if row4col[j] < 0:
                sink = j
            else:
                i = row4col[j]
            seen_col[j] = True
            n_rem -= 1
            remaining[index] = remaining[n_rem]
        u[cur] += min_val
        for i in range(n):
            if seen_row[i] and i != cur:
                u[i] += min_val - spc[col4row[i]]
        for j in range(m):
            if seen_col[j]:
                v[j] -= min_val - spc[j]
        _augment(path, col4row, row4col, sink, cur)
    return -1


@nb.njit(cache=True, inline="always")
def _sift_down(hv, hi, k, pos, x, j):  # pragma: no cover - compiled
    """Put ``(x, j)`` at ``pos`` of the min-heap ``(hv, hi)`` of size ``k`` and sift it down."""
    while True:
        c = 2 * pos + 1
        if c >= k:
            break
        if c + 1 < k and hv[c + 1] < hv[c]:
            c += 1
        if hv[c] >= x:
            break
        hv[pos] = hv[c]
        hi[pos] = hi[c]
        pos = c
    hv[pos] = x
    hi[pos] = j


@nb.njit(cache=True)
def _push(hk, hc, size, key, col):  # pragma: no cover - compiled
    pos = size
    while pos > 0:
        parent = (pos - 1) >> 1
        if hk[parent] <= key:
            break
        hk[pos] = hk[parent]
        hc[pos] = hc[parent]
        pos = parent
    hk[pos] = key
    hc[pos] = col
    return size + 1


@nb.njit(cache=True)
def _pop(hk, hc, size):  # pragma: no cover - compiled
    size -= 1
    if size > 0:
        _sift_down(hk, hc, size, 0, hk[size], hc[size])
    return size


@nb.njit(cache=True, nogil=True)
def sparse_sap(indptr, indices, cost, u, v, col4row, row4col, rect, feas_rel, stuck):  # pragma: no cover
    """Solve ``min Σ c_{i, col4row[i]}`` over full row matchings of the CSR graph, in place.

    Parameters
    ----------
    indptr, indices : int64 arrays, CSR structure (n + 1,), (nnz,); column indices sorted per row.
    cost : float64 (nnz,), edge costs (minimisation form).
    u, v : float64 (n,), (m,), dual potentials, updated in place (warm start: previous values).
    col4row, row4col : int64 (n,), (m,), matching (-1 = free), updated in place.
    rect : bool, enforce the rectangular dual conditions (``v <= 0``, ``v = 0`` on free columns).
    feas_rel : float, a matched row whose potential exceeds ``min_j (c_ij - v_j)`` by at most
        ``feas_rel · (|u_i| + |min_j (c_ij - v_j)|)`` keeps its column (float noise, relative to the
        row's own magnitudes so that rows of very different scales are treated alike).
    stuck : bool (n,), set True for every row of an alternating tree that found no free column.

    Returns
    -------
    int, the number of rows that could not be matched (0 = a full row matching was found).
    """
    n = indptr.shape[0] - 1
    m = v.shape[0]
    nnz = indices.shape[0]
    inf = np.inf

    # Repair: restore u_i <= min_j (c_ij - v_j) on the (possibly grown) graph. A matched row whose
    # potential must drop loses tightness, so it is unmatched; in the rectangular case its column
    # must then satisfy v_j = 0, and raising v_j can break the rows adjacent to j (cascade; each
    # column is raised at most once because nothing lowers v during the repair).
    if n > 0:
        csc_ptr = np.zeros(m + 1, np.int64)
        csc_rows = np.empty(nnz if rect else 0, np.int64)
        if rect:
            for e in range(nnz):
                csc_ptr[indices[e] + 1] += 1
            for j in range(m):
                csc_ptr[j + 1] += csc_ptr[j]
            fill = csc_ptr[:-1].copy()
            for i in range(n):
                for e in range(indptr[i], indptr[i + 1]):
                    j = indices[e]
                    csc_rows[fill[j]] = i
                    fill[j] += 1
        queue = np.arange(n).astype(np.int64)
        inq = np.ones(n, np.bool_)
        head = 0
        count = n
        while count > 0:
            i = queue[head]
            head = (head + 1) % n
            count -= 1
            inq[i] = False
            best = inf
            for e in range(indptr[i], indptr[i + 1]):
                val = cost[e] - v[indices[e]]
                if val < best:
                    best = val
            j0 = col4row[i]
            if j0 < 0:
                u[i] = best
                continue
            if u[i] > best + feas_rel * (abs(u[i]) + abs(best)):
                u[i] = best
                col4row[i] = -1
                row4col[j0] = -1
                if rect and v[j0] < 0.0:
                    v[j0] = 0.0
                    for p in range(csc_ptr[j0], csc_ptr[j0 + 1]):
                        k2 = csc_rows[p]
                        if not inq[k2]:
                            inq[k2] = True
                            queue[(head + count) % n] = k2
                            count += 1

    dist = np.full(m, inf)
    done = np.zeros(m, np.bool_)
    pred = np.full(m, -1, np.int64)
    touched = np.empty(m, np.int64)
    final = np.empty(m, np.int64)
    hk = np.empty(nnz + 1, np.float64)
    hc = np.empty(nnz + 1, np.int64)
    n_fail = 0
    for i0 in range(n):
        if col4row[i0] >= 0:
            continue
        best = inf
        jb = -1
        for e in range(indptr[i0], indptr[i0 + 1]):
            val = cost[e] - v[indices[e]]
            if val < best:
                best = val
                jb = indices[e]
        if jb < 0:
            stuck[i0] = True
            n_fail += 1
            continue
        u[i0] = best
        if row4col[jb] < 0:
            col4row[i0] = jb
            row4col[jb] = i0
            continue
        # Dijkstra on reduced costs c_ij - u_i - v_j >= 0 from the free row i0.
        ntouch = 0
        nfinal = 0
        size = 0
        i = i0
        di = 0.0
        sink = -1
        while True:
            ui = u[i]
            for e in range(indptr[i], indptr[i + 1]):
                j = indices[e]
                if done[j]:
                    continue
                r = cost[e] - ui - v[j]
                if r < 0.0:
                    r = 0.0
                nd = di + r
                if nd < dist[j]:
                    if dist[j] == inf:
                        touched[ntouch] = j
                        ntouch += 1
                    dist[j] = nd
                    pred[j] = i
                    size = _push(hk, hc, size, nd, j)
            j = -1
            while size > 0:
                dj = hk[0]
                jc = hc[0]
                size = _pop(hk, hc, size)
                if not done[jc] and dj <= dist[jc]:
                    j = jc
                    break
            if j < 0:
                break
            done[j] = True
            final[nfinal] = j
            nfinal += 1
            if row4col[j] < 0:
                sink = j
                break
            i = row4col[j]
            di = dist[j]
        if sink < 0:
            stuck[i0] = True
            for t in range(nfinal):
                stuck[row4col[final[t]]] = True
            n_fail += 1
        else:
            minv = dist[sink]
            u[i0] += minv
            for t in range(nfinal):
                j = final[t]
                if j == sink:
                    continue
                delta = minv - dist[j]
                u[row4col[j]] += delta
                v[j] -= delta
            _augment(pred, col4row, row4col, sink, i0)
        for t in range(ntouch):
            j = touched[t]
            dist[j] = inf
            done[j] = False
    return n_fail


@nb.njit(cache=True, inline="always")
def _hull_push(hs, hb, h, a, b):  # pragma: no cover - compiled
    """Add the line ``a·x + b`` to the upper hull ``(hs, hb)[:h]`` of lines pushed in non-decreasing
    slope order; returns the new hull size."""
    if h > 0 and hs[h - 1] == a:
        if hb[h - 1] >= b:
            return h
        h -= 1
    # drop the last line while it is never the maximum between its neighbours
    while h >= 2 and (hb[h - 2] - b) * (hs[h - 1] - hs[h - 2]) <= (hb[h - 2] - hb[h - 1]) * (a - hs[h - 2]):
        h -= 1
    hs[h] = a
    hb[h] = b
    return h + 1


@nb.njit(cache=True, inline="always")
def _hull_query(hs, hb, h, x):  # pragma: no cover - compiled
    """``max_t (hs[t]·x + hb[t])`` over a non-empty upper hull (unimodal along it: binary search)."""
    lo = 0
    hi = h - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if hs[mid] * x + hb[mid] <= hs[mid + 1] * x + hb[mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return hs[lo] * x + hb[lo]


@nb.njit(cache=True, nogil=True)
def line_envelope(slopes, intercepts, xs):  # pragma: no cover - compiled
    """``out[q] = max_j (slopes[j] · xs[q] + intercepts[j])`` for every query, in O((m + Q) log m)."""
    m = slopes.shape[0]
    out = np.full(xs.shape[0], -np.inf)
    if m == 0:
        return out
    order = np.argsort(slopes, kind="mergesort")
    hs = np.empty(m, np.float64)
    hb = np.empty(m, np.float64)
    h = 0
    for t in range(m):
        h = _hull_push(hs, hb, h, slopes[order[t]], intercepts[order[t]])
    for q in range(xs.shape[0]):
        out[q] = _hull_query(hs, hb, h, xs[q])
    return out


# Columns per chunk of the top-k scans. Chunk c holds the columns c, c + nc, c + 2·nc, ... (nc chunks),
# so that one pass over contiguous memory takes every chunk's maximum in SIMD lanes; a chunk is
# visited only if its maximum can be among the row's top k.
_CHUNK = 16
# Below every finite float64 (sentinel; ``fastmath`` assumes no infinities).
_LOWEST = -1.7976931348623157e308
# Up to this many of the top values, a heap finds the k-th largest chunk maximum faster than a
# quickselect (most maxima fall below the heap's minimum at once).
_HEAP_K = 48
# Rows per task of the parallel scans: their scratch is allocated once per task.
_ROWS_PER_TASK = 16


@nb.njit(cache=True, inline="always", fastmath=True)
def _chunk_max(row, inv, scaled, cmx, cmy):  # pragma: no cover - compiled
    """``cmx[c]`` / ``cmy[c]``: the maximum of ``row`` / ``row · inv`` (in the row's precision) over
    chunk ``c`` (strided: columns ``c + t · nc``)."""
    m = row.shape[0]
    nc = cmx.shape[0]
    for c in range(nc):
        cmx[c] = row[c]
    for t in range(1, _CHUNK):
        base = t * nc
        for c in range(min(nc, m - base)):
            cmx[c] = max(cmx[c], row[base + c])
    if scaled:
        for c in range(nc):
            cmy[c] = row[c] * inv[c]
        for t in range(1, _CHUNK):
            base = t * nc
            for c in range(min(nc, m - base)):
                cmy[c] = max(cmy[c], row[base + c] * inv[base + c])


@nb.njit(cache=True, inline="always", fastmath=True)
def _upper(x, vj, rel, cn):  # pragma: no cover - compiled
    """An upper bound on the exact reduced score of a block entry ``x``: ``x - vj + rel·|x| + cn``."""
    return x - vj + rel * abs(x) + cn


@nb.njit(cache=True, inline="always", fastmath=True)
def _chunk_upper(row, v, rel, ci, colsc, low, cm):  # pragma: no cover - compiled
    """``cm[c]``: the maximum of :func:`_upper` over chunk ``c``, in float64; returns how many of the
    row's upper bounds exceed ``low``."""
    m = row.shape[0]
    nc = cm.shape[0]
    cnt = 0
    for c in range(nc):
        x = _upper(np.float64(row[c]), v[c], rel, ci * colsc[c])
        cm[c] = x
        cnt += x > low
    for t in range(1, _CHUNK):
        base = t * nc
        for c in range(min(nc, m - base)):
            j = base + c
            x = _upper(np.float64(row[j]), v[j], rel, ci * colsc[j])
            cm[c] = max(cm[c], x)
            cnt += x > low
    return cnt


@nb.njit(cache=True, inline="always", fastmath=True)
def _value(row, j, mode, inv, v, rel, ci, colsc):  # pragma: no cover - compiled
    """Entry ``j`` of a row in the order ``mode`` ranks by: 0 the score, 1 the score times ``inv[j]``
    (both in the row's precision, as :func:`_chunk_max` computes them), 2 the upper bound
    :func:`_upper` on its exact reduced score (float64, as :func:`_chunk_upper`)."""
    if mode == 1:
        return np.float64(row[j] * inv[j])
    if mode == 2:
        return _upper(np.float64(row[j]), v[j], rel, ci * colsc[j])
    return np.float64(row[j])


@nb.njit(cache=True, inline="always", fastmath=True)
def _kth_heap(vals, n, k, hv):  # pragma: no cover - compiled
    """The ``k``-th largest of ``vals[:n]`` (``_LOWEST`` if fewer), with ``hv`` (>= k) as scratch."""
    for t in range(k):
        hv[t] = _LOWEST
    for c in range(n):
        x = vals[c]
        if x > hv[0]:
            pos = 0  # sift the new value down the min-heap from the root
            while True:
                ch = 2 * pos + 1
                if ch >= k:
                    break
                if ch + 1 < k and hv[ch + 1] < hv[ch]:
                    ch += 1
                if hv[ch] >= x:
                    break
                hv[pos] = hv[ch]
                pos = ch
            hv[pos] = x
    return hv[0]


@nb.njit(cache=True, inline="always", fastmath=True)
def _kth_select(vals, n, k):  # pragma: no cover - compiled
    """The ``k``-th largest of ``vals[:n]`` (1 <= k <= n), reordering them (quickselect)."""
    lo = 0
    hi = n - 1
    target = k - 1  # its position in decreasing order
    while lo < hi:
        mid = (lo + hi) >> 1
        a = vals[lo]
        b = vals[mid]
        c = vals[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i = lo
        j = hi
        while i <= j:
            while vals[i] > pivot:
                i += 1
            while vals[j] < pivot:
                j -= 1
            if i <= j:
                t = vals[i]
                vals[i] = vals[j]
                vals[j] = t
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return vals[target]  # between the two parts: equal to the pivot
    return vals[target]


@nb.njit(cache=True, inline="always", fastmath=True)
def _kth_largest(vals, n, k, scratch):  # pragma: no cover - compiled
    """The ``k``-th largest of ``vals[:n]`` (``_LOWEST`` if ``n < k``); ``vals`` is left as it was,
    ``scratch`` (at least ``n + k``, not overlapping ``vals``) is overwritten.

    The maxima of groups of :data:`_CHUNK` values come first (one vectorised pass): their ``k``-th
    largest is a lower bound (``k`` distinct values reach it), so only the values that reach it take
    part in the heap or quickselect that follows (tens instead of thousands)."""
    if n < k:
        return _LOWEST
    floor = _LOWEST
    ng = n // _CHUNK
    if ng >= 4 * k:
        for g in range(ng):
            mx = vals[g * _CHUNK]
            for t in range(1, _CHUNK):
                mx = max(mx, vals[g * _CHUNK + t])
            scratch[g] = mx
        floor = _kth_heap(scratch, ng, k, scratch[ng:]) if k <= _HEAP_K else _kth_select(scratch, ng, k)
    cnt = 0
    for c in range(n):
        if vals[c] >= floor:
            scratch[cnt] = vals[c]
            cnt += 1
    if k <= _HEAP_K:
        return _kth_heap(scratch, cnt, k, scratch[cnt:])
    return _kth_select(scratch, cnt, k)


@nb.njit(cache=True, inline="always", fastmath=True)
def _top_select(row, mode, inv, v, rel, ci, colsc, cm, k, buf_v, buf_i, out_v, out_i):  # pragma: no cover
    """The ``k`` largest :func:`_value` of ``row`` into ``out_v`` / ``out_i`` (unsorted), given the
    chunk maxima ``cm`` of that order (``k`` <= the row's length).

    The ``k`` largest chunk maxima are ``k`` distinct entries, so the ``k``-th of them bounds the
    row's ``k``-th largest entry from below: only the entries of chunks that reach it can be among the
    ``k``, and only those that reach it are collected (a few ``k`` of ``m``); a second selection among
    them finds the ``k``-th value, ties at it taken in column order. ``buf_v`` (at least ``3 m``) and
    ``buf_i`` (``m``) are scratch.
    """
    m = row.shape[0]
    nc = cm.shape[0]
    t0 = _kth_largest(cm, nc, k, buf_v)
    cnt = 0
    for c in range(nc):
        if cm[c] >= t0:
            for j in range(c, m, nc):
                x = _value(row, j, mode, inv, v, rel, ci, colsc)
                if x >= t0:
                    buf_v[cnt] = x
                    buf_i[cnt] = j
                    cnt += 1
    t1 = _kth_largest(buf_v, cnt, k, buf_v[cnt:])
    q = 0
    for e in range(cnt):
        if buf_v[e] > t1:
            out_v[q] = buf_v[e]
            out_i[q] = buf_i[e]
            q += 1
    for e in range(cnt):
        if q < k and buf_v[e] == t1:
            out_v[q] = buf_v[e]
            out_i[q] = buf_i[e]
            q += 1


@nb.njit(cache=True, inline="always", fastmath=True)
def _topk2_row(row, inv, k, scaled, bv, bi, cv, ci, cmx, cmy, buf_v, buf_i):  # pragma: no cover
    """Best ``k`` of ``row`` into ``(bv, bi)`` and of ``row · inv`` into ``(cv, ci)`` (unsorted),
    by :func:`_top_select` on the chunk maxima of one vectorised pass."""
    _chunk_max(row, inv, scaled, cmx, cmy)
    _top_select(row, 0, inv, inv, 0.0, 0.0, inv, cmx, k, buf_v, buf_i, bv, bi)
    if scaled:
        _top_select(row, 1, inv, inv, 0.0, 0.0, inv, cmy, k, buf_v, buf_i, cv, ci)


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def topk2(S, inv, k, idx_raw, val_raw, idx_scaled, val_scaled):  # pragma: no cover - compiled
    """Per row of ``S`` (r, m): the top-``k`` columns of ``S`` and of ``S · inv`` (column scaling, in
    the precision of ``S`` and ``inv``, which must agree: float32 or float64).

    Each order's best ``k`` are selected from the chunks that can hold one (see :func:`_top_select`);
    ``idx_*`` (r, k) int64 and ``val_*`` (r, k) float64 are filled in place (unsorted; among tied
    values, which indices are kept is unspecified). With ``inv`` of length 0 the scaled outputs are
    left untouched.
    """
    r, m = S.shape
    scaled = inv.shape[0] == m
    nc = (m + _CHUNK - 1) // _CHUNK
    for task in nb.prange((r + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        cmx = np.empty(nc, S.dtype)
        cmy = np.empty(nc, S.dtype)
        buf_v = np.empty(3 * m)
        buf_i = np.empty(m, np.int64)
        for i in range(task * _ROWS_PER_TASK, min(r, (task + 1) * _ROWS_PER_TASK)):
            _topk2_row(
                S[i],
                inv,
                k,
                scaled,
                val_raw[i],
                idx_raw[i],
                val_scaled[i],
                idx_scaled[i],
                cmx,
                cmy,
                buf_v,
                buf_i,
            )


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def topk2_bf16(S16, inv, k, idx_raw, val_raw, idx_scaled, val_scaled):  # pragma: no cover - compiled
    """:func:`topk2` of a bfloat16 block given as its raw ``uint16`` bits (r, m), in float32 (``inv``
    float32).

    Each row is widened to float32 in a small scratch buffer (a bfloat16 is the top half of a
    float32), which saves converting and storing the whole block first.
    """
    r, m = S16.shape
    scaled = inv.shape[0] == m
    nc = (m + _CHUNK - 1) // _CHUNK
    for task in nb.prange((r + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        bits = np.empty(m, np.uint32)
        row = bits.view(np.float32)
        cmx = np.empty(nc, np.float32)
        cmy = np.empty(nc, np.float32)
        buf_v = np.empty(3 * m)
        buf_i = np.empty(m, np.int64)
        for i in range(task * _ROWS_PER_TASK, min(r, (task + 1) * _ROWS_PER_TASK)):
            for j in range(m):
                bits[j] = np.uint32(S16[i, j]) << 16
            _topk2_row(
                row,
                inv,
                k,
                scaled,
                val_raw[i],
                idx_raw[i],
                val_scaled[i],
                idx_scaled[i],
                cmx,
                cmy,
                buf_v,
                buf_i,
            )


@nb.njit(cache=True, inline="always", fastmath=True)
def _reduced_row(row, v, rel, ci, colsc, low, out_v, out_i, cm, buf_v, buf_i):  # pragma: no cover
    """:func:`reduced_scan` of one row: its ``len(out_v)`` largest upper bounds into ``out_v`` /
    ``out_i``, then their block scores into ``out_v`` in place of the bounds; returns how many bounds
    exceed ``low`` and the smallest of those kept."""
    cnt = _chunk_upper(row, v, rel, ci, colsc, low, cm)
    _top_select(row, 2, v, v, rel, ci, colsc, cm, out_v.shape[0], buf_v, buf_i, out_v, out_i)
    lowest = out_v[0]
    for t in range(out_v.shape[0]):
        lowest = min(lowest, out_v[t])
        out_v[t] = np.float64(row[out_i[t]])
    return cnt, lowest


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def reduced_scan(S, v, rel, crow, colsc, lo, top_j, top_s, thr, n_near):  # pragma: no cover - compiled
    """Per row of a score block ``S`` (r, m): the ``k = top_j.shape[1]`` (<= m) largest upper bounds on
    the exact reduced scores, ``U_ij = S_ij - v_j + rel·|S_ij| + crow_i·colsc_j`` (the block's error
    model), and how many exceed ``lo[i]``, in float64.

    ``top_j`` (r, k) int64 gets their columns (unsorted), ``top_s`` (r, k) float64 their block scores
    ``S_ij``, ``thr[i]`` the smallest of the ``k`` (every other entry has ``U_ij <= thr[i]``) and
    ``n_near[i]`` the count; when ``n_near[i] <= k`` every entry above ``lo[i]`` is among the ``k``.
    One vectorised pass computes the count and the chunk maxima, then only the chunks that can hold
    a top-``k`` entry are visited (as in :func:`topk2`).
    """
    r, m = S.shape
    nc = (m + _CHUNK - 1) // _CHUNK
    for task in nb.prange((r + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        cm = np.empty(nc)
        buf_v = np.empty(3 * m)
        buf_i = np.empty(m, np.int64)
        for i in range(task * _ROWS_PER_TASK, min(r, (task + 1) * _ROWS_PER_TASK)):
            n_near[i], thr[i] = _reduced_row(
                S[i], v, rel, crow[i], colsc, lo[i], top_s[i], top_j[i], cm, buf_v, buf_i
            )


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def reduced_scan_bf16(S16, v, rel, crow, colsc, lo, top_j, top_s, thr, n_near):  # pragma: no cover
    """:func:`reduced_scan` of a bfloat16 block given as its raw ``uint16`` bits (r, m)."""
    r, m = S16.shape
    nc = (m + _CHUNK - 1) // _CHUNK
    for task in nb.prange((r + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        bits = np.empty(m, np.uint32)
        row = bits.view(np.float32)
        cm = np.empty(nc)
        buf_v = np.empty(3 * m)
        buf_i = np.empty(m, np.int64)
        for i in range(task * _ROWS_PER_TASK, min(r, (task + 1) * _ROWS_PER_TASK)):
            for j in range(m):
                bits[j] = np.uint32(S16[i, j]) << 16
            n_near[i], thr[i] = _reduced_row(
                row, v, rel, crow[i], colsc, lo[i], top_s[i], top_j[i], cm, buf_v, buf_i
            )


@nb.njit(cache=True, inline="always", fastmath=True)
def _stored_upper(sj, ss, exact, v, rel, crow, colsc, i, p):  # pragma: no cover - compiled
    """The upper bound of :func:`stored_near` for slot ``(i, p)`` (``_LOWEST`` for an empty slot)."""
    j = sj[i, p]
    if j < 0:
        return _LOWEST
    x = ss[i, p]
    return x - v[j] if exact[i, p] else x - v[j] + rel * abs(x) + crow[i] * colsc[j]


@nb.njit(cache=True, nogil=True, fastmath=True)
def stored_near(sj, ss, exact, v, rel, crow, colsc, lo):  # pragma: no cover - compiled
    """Entries of a stored candidate table that may gain: ``sj`` (r, w) columns (-1 = empty slot),
    ``ss`` (r, w) block scores (the exact score where ``exact`` is set); returns the (row, slot)
    pairs whose upper bound ``ss - v_j (+ rel·|ss| + crow_i·colsc_j unless exact)`` exceeds ``lo[i]``.

    Serial, two passes (count, then fill): a few milliseconds for a million entries, where two
    threads on a busy machine wait on each other for ten times that.
    """
    r, w = sj.shape
    q = 0
    for i in range(r):
        for p in range(w):
            q += _stored_upper(sj, ss, exact, v, rel, crow, colsc, i, p) > lo[i]
    out_r = np.empty(q, np.int64)
    out_p = np.empty(q, np.int64)
    q = 0
    for i in range(r):
        for p in range(w):
            if _stored_upper(sj, ss, exact, v, rel, crow, colsc, i, p) > lo[i]:
                out_r[q] = i
                out_p[q] = p
                q += 1
    return out_r, out_p


@nb.njit(cache=True, nogil=True)
def capped_envelope(ny, negv, kth, c, alpha):  # pragma: no cover - compiled
    """``out[i] = max_j (min(kth[i] + c[i] · ny[j], alpha[i] · ny[j]) + negv[j])`` for rows with
    ``alpha[i] > c[i]`` (``ny >= 0``), ``+inf`` (no bound) for the others and non-finite inputs.

    The two lines in ``ny`` cross once, at ``tau_i = kth_i / (alpha_i - c_i)``: columns below it
    contribute ``alpha_i · ny_j + negv_j`` (the upper envelope of the columns sorted by ``ny``, built
    incrementally while rows are visited in increasing ``tau``), the others ``kth_i + c_i · ny_j +
    negv_j`` (the same envelope of the suffix, built while rows are visited in decreasing ``tau``).
    """
    m = ny.shape[0]
    n = kth.shape[0]
    out = np.full(n, np.inf)
    if m == 0:
        return out
    corder = np.argsort(ny, kind="mergesort")
    sny = ny[corder]
    snv = negv[corder]
    tau = np.full(n, np.inf)
    valid = np.zeros(n, np.bool_)
    for i in range(n):
        if np.isfinite(alpha[i]) and np.isfinite(kth[i]) and np.isfinite(c[i]) and alpha[i] > c[i]:
            valid[i] = True
            tau[i] = kth[i] / (alpha[i] - c[i])
    rorder = np.argsort(tau, kind="mergesort")
    best = np.full(n, -np.inf)
    hs = np.empty(m)
    hb = np.empty(m)
    h = 0
    p = 0
    for q in range(n):  # prefix: ny_j < tau_i
        i = rorder[q]
        if not valid[i]:
            continue
        while p < m and sny[p] < tau[i]:
            h = _hull_push(hs, hb, h, sny[p], snv[p])
            p += 1
        if h > 0:
            best[i] = _hull_query(hs, hb, h, alpha[i])
    h = 0
    p = m - 1
    for q in range(n - 1, -1, -1):  # suffix: ny_j >= tau_i, lines of slope -ny_j queried at -c_i
        i = rorder[q]
        if not valid[i]:
            continue
        while p >= 0 and sny[p] >= tau[i]:
            h = _hull_push(hs, hb, h, -sny[p], snv[p])
            p -= 1
        if h > 0:
            best[i] = max(best[i], kth[i] + _hull_query(hs, hb, h, -c[i]))
        out[i] = best[i]
    return out
