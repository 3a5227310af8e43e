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
  top-``k`` scans of score blocks. One vectorised pass takes the maximum of every chunk of
  :data:`_CHUNK` columns; the ``k``-th largest chunk maximum bounds the row's ``k``-th largest entry
  from below, so only the few chunks that reach it are offered to the heap (2× faster than offering
  every entry). The reduced scans rank entries by an upper bound on their exact reduced score that
  carries the block's rounding error, entry by entry.
* :func:`stored_near` — the stored candidates (reserve, recomputed rows) that may gain at new prices.
* :func:`line_envelope` / :func:`capped_envelope` — upper envelopes behind the certificate's bounds.
* :func:`row_abs_max` — each row's largest finite magnitude, in one pass.

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


# Columns per chunk of the top-k scans: a chunk is visited only if its maximum can enter a heap.
_CHUNK = 8
# Below every finite float64 (heap sentinel; ``fastmath`` assumes no infinities).
_LOWEST = -1.7976931348623157e308


@nb.njit(cache=True, inline="always", fastmath=True)
def _span_max(row, inv, scaled, s, e):  # pragma: no cover - compiled
    """The maxima of ``row[s:e]`` and of ``row[s:e] · inv[s:e]`` (in float64)."""
    mx = _LOWEST
    my = _LOWEST
    for t in range(s, e):
        x = np.float64(row[t])
        mx = max(mx, x)
        if scaled:
            my = max(my, x * inv[t])
    return mx, my


@nb.njit(cache=True, inline="always", fastmath=True)
def _chunk_max(row, inv, scaled, cmx, cmy):  # pragma: no cover - compiled
    """``cmx[c]`` / ``cmy[c]``: the maximum of ``row`` / ``row · inv`` over columns ``c·_CHUNK …``."""
    m = row.shape[0]
    full = m // _CHUNK
    for c in range(full):  # a fixed trip count once inlined: vectorised
        cmx[c], cmy[c] = _span_max(row, inv, scaled, c * _CHUNK, c * _CHUNK + _CHUNK)
    if full * _CHUNK < m:
        cmx[full], cmy[full] = _span_max(row, inv, scaled, full * _CHUNK, m)


@nb.njit(cache=True, inline="always", fastmath=True)
def _kth_largest(vals, k, hv, hi):  # pragma: no cover - compiled
    """The ``k``-th largest of ``vals`` (``_LOWEST`` if fewer), with ``(hv, hi)`` as scratch heap."""
    for t in range(k):
        hv[t] = _LOWEST
        hi[t] = -1
    for c in range(vals.shape[0]):
        if vals[c] > hv[0]:
            _sift_down(hv, hi, k, 0, vals[c], c)
    return hv[0]


@nb.njit(cache=True, inline="always", fastmath=True)
def _topk2_row(row, inv, k, scaled, bv, bi, cv, ci, cmx, cmy):  # pragma: no cover - compiled
    """Best ``k`` of ``row`` into the min-heap ``(bv, bi)`` and of ``row · inv`` into ``(cv, ci)``.

    The ``k`` largest chunk maxima are ``k`` distinct entries, so the ``k``-th of them bounds the
    row's ``k``-th largest entry from below: only chunks whose maximum reaches it can hold a top-``k``
    entry, and only their entries that reach it are offered to the heap (a few hundred of ``m``).
    """
    m = row.shape[0]
    nc = (m + _CHUNK - 1) // _CHUNK
    _chunk_max(row, inv, scaled, cmx, cmy)
    tx = _kth_largest(cmx[:nc], k, bv, bi)
    ty = _kth_largest(cmy[:nc], k, cv, ci) if scaled else 0.0
    for t in range(k):
        bv[t] = _LOWEST
        bi[t] = -1
        if scaled:
            cv[t] = _LOWEST
            ci[t] = -1
    for c in range(nc):
        if cmx[c] >= tx or (scaled and cmy[c] >= ty):
            for j in range(c * _CHUNK, min(c * _CHUNK + _CHUNK, m)):
                x = np.float64(row[j])
                if x >= tx and x > bv[0]:
                    _sift_down(bv, bi, k, 0, x, j)
                if scaled:
                    y = x * inv[j]
                    if y >= ty and y > cv[0]:
                        _sift_down(cv, ci, k, 0, y, j)


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def topk2(S, inv, k, idx_raw, val_raw, idx_scaled, val_scaled):  # pragma: no cover - compiled
    """Per row of ``S`` (r, m): the top-``k`` columns of ``S`` and of ``S · inv`` (column scaling).

    Each order's best ``k`` are kept in a min-heap, fed only from the chunks that can hold one (see
    :func:`_topk2_row`); ``idx_*`` (r, k) int64 and ``val_*`` (r, k) float64 are filled in place
    (unsorted; among tied values, which indices are kept is unspecified). With ``inv`` of length 0 the
    scaled outputs are left untouched.
    """
    r, m = S.shape
    scaled = inv.shape[0] == m
    nc = (m + _CHUNK - 1) // _CHUNK
    for i in nb.prange(r):
        cmx = np.empty(nc)
        cmy = np.empty(nc)
        _topk2_row(S[i], inv, k, scaled, val_raw[i], idx_raw[i], val_scaled[i], idx_scaled[i], cmx, cmy)


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def topk2_bf16(S16, inv, k, idx_raw, val_raw, idx_scaled, val_scaled):  # pragma: no cover - compiled
    """:func:`topk2` of a bfloat16 block given as its raw ``uint16`` bits (r, m).

    Each row is widened to float32 in a small scratch buffer (a bfloat16 is the top half of a
    float32), which saves converting and storing the whole block first.
    """
    r, m = S16.shape
    scaled = inv.shape[0] == m
    nc = (m + _CHUNK - 1) // _CHUNK
    for i in nb.prange(r):
        bits = np.empty(m, np.uint32)
        for j in range(m):
            bits[j] = np.uint32(S16[i, j]) << 16
        cmx = np.empty(nc)
        cmy = np.empty(nc)
        _topk2_row(
            bits.view(np.float32),
            inv,
            k,
            scaled,
            val_raw[i],
            idx_raw[i],
            val_scaled[i],
            idx_scaled[i],
            cmx,
            cmy,
        )


@nb.njit(cache=True, inline="always", fastmath=True)
def _upper(x, vj, rel, cn):  # pragma: no cover - compiled
    """An upper bound on the exact reduced score of a block entry ``x``: ``x - vj + rel·|x| + cn``."""
    return x - vj + rel * abs(x) + cn


@nb.njit(cache=True, inline="always", fastmath=True)
def _span_upper(row, v, rel, ci, colsc, low, s, e):  # pragma: no cover - compiled
    """The maximum of :func:`_upper` over ``row[s:e]`` and how many of its values exceed ``low``."""
    mx = _LOWEST
    cnt = 0
    for t in range(s, e):
        x = _upper(np.float64(row[t]), v[t], rel, ci * colsc[t])
        mx = max(mx, x)
        cnt += x > low
    return mx, cnt


@nb.njit(cache=True, inline="always", fastmath=True)
def _reduced_row(row, v, rel, ci, colsc, low, hv, hi, cmx):  # pragma: no cover - compiled
    """:func:`reduced_scan` of one row: fills the heap ``(hv, hi)`` with the row's ``len(hv)`` largest
    upper bounds and returns how many exceed ``low``."""
    m = row.shape[0]
    k = hv.shape[0]
    nc = cmx.shape[0]
    full = m // _CHUNK
    cnt = 0
    for c in range(full):  # a fixed trip count once inlined: vectorised
        cmx[c], above = _span_upper(row, v, rel, ci, colsc, low, c * _CHUNK, c * _CHUNK + _CHUNK)
        cnt += above
    if full < nc:
        cmx[full], above = _span_upper(row, v, rel, ci, colsc, low, full * _CHUNK, m)
        cnt += above
    tx = _kth_largest(cmx, k, hv, hi)
    for t in range(k):
        hv[t] = _LOWEST
        hi[t] = -1
    for c in range(nc):
        if cmx[c] >= tx:
            for j in range(c * _CHUNK, min(c * _CHUNK + _CHUNK, m)):
                x = _upper(np.float64(row[j]), v[j], rel, ci * colsc[j])
                if x >= tx and x > hv[0]:
                    _sift_down(hv, hi, k, 0, x, j)
    return cnt


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def reduced_scan(S, v, rel, crow, colsc, lo, top_j, top_s, thr, n_near):  # pragma: no cover - compiled
    """Per row of a score block ``S`` (r, m): the ``k = top_j.shape[1]`` largest upper bounds on the
    exact reduced scores, ``U_ij = S_ij - v_j + rel·|S_ij| + crow_i·colsc_j`` (the block's error model),
    and how many exceed ``lo[i]``, in float64.

    ``top_j`` (r, k) int64 gets their columns (unsorted), ``top_s`` (r, k) float64 their block scores
    ``S_ij``, ``thr[i]`` the smallest of the ``k`` (every other entry has ``U_ij <= thr[i]``) and
    ``n_near[i]`` the count; when ``n_near[i] <= k`` every entry above ``lo[i]`` is among the ``k``.
    One vectorised pass computes the count and the chunk maxima, then only the chunks that can hold
    a top-``k`` entry are visited (as in :func:`topk2`).
    """
    r, m = S.shape
    k = top_j.shape[1]
    nc = (m + _CHUNK - 1) // _CHUNK
    for i in nb.prange(r):
        cmx = np.empty(nc)
        n_near[i] = _reduced_row(S[i], v, rel, crow[i], colsc, lo[i], top_s[i], top_j[i], cmx)
        thr[i] = top_s[i, 0]  # the heap's minimum
        for t in range(k):
            top_s[i, t] = np.float64(S[i, top_j[i, t]]) if top_j[i, t] >= 0 else _LOWEST


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def reduced_scan_bf16(S16, v, rel, crow, colsc, lo, top_j, top_s, thr, n_near):  # pragma: no cover
    """:func:`reduced_scan` of a bfloat16 block given as its raw ``uint16`` bits (r, m)."""
    r, m = S16.shape
    k = top_j.shape[1]
    nc = (m + _CHUNK - 1) // _CHUNK
    for i in nb.prange(r):
        bits = np.empty(m, np.uint32)
        for j in range(m):
            bits[j] = np.uint32(S16[i, j]) << 16
        row = bits.view(np.float32)
        cmx = np.empty(nc)
        n_near[i] = _reduced_row(row, v, rel, crow[i], colsc, lo[i], top_s[i], top_j[i], cmx)
        thr[i] = top_s[i, 0]
        for t in range(k):
            top_s[i, t] = np.float64(row[top_j[i, t]]) if top_j[i, t] >= 0 else _LOWEST


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def stored_near(sj, ss, exact, v, rel, crow, colsc, lo):  # pragma: no cover - compiled
    """Entries of a stored candidate table that may gain: ``sj`` (r, w) columns (-1 = empty slot),
    ``ss`` (r, w) block scores (the exact score where ``exact`` is set); returns the (row, slot)
    pairs whose upper bound ``ss - v_j (+ rel·|ss| + crow_i·colsc_j unless exact)`` exceeds ``lo[i]``.
    """
    r, w = sj.shape
    offs = np.zeros(r + 1, np.int64)
    for i in nb.prange(r):
        cnt = 0
        for p in range(w):
            j = sj[i, p]
            if j >= 0:
                x = ss[i, p]
                ub = x - v[j] if exact[i, p] else _upper(x, v[j], rel, crow[i] * colsc[j])
                cnt += ub > lo[i]
        offs[i + 1] = cnt
    for i in range(r):
        offs[i + 1] += offs[i]
    out_r = np.empty(offs[r], np.int64)
    out_p = np.empty(offs[r], np.int64)
    for i in nb.prange(r):
        q = offs[i]
        for p in range(w):
            j = sj[i, p]
            if j >= 0:
                x = ss[i, p]
                ub = x - v[j] if exact[i, p] else _upper(x, v[j], rel, crow[i] * colsc[j])
                if ub > lo[i]:
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
