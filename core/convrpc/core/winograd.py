"""Winograd minimal filtering F(m x m, 3 x 3) for stride-1 3x3 convs (Lavin & Gray, 2015).

A conv is cut into m x m output tiles; each reads an (m+2) x (m+2) input tile. With the input tile
transformed as V = B^T d B and the filter as U = G g G^T, the tile's output is A^T (U * V) A: per
tile and (input, output) channel pair, a*a products (a = m+2) instead of 9*m*m. Summed over input
channels, the a*a element-wise products become a*a matmuls (K x C) @ (C x tiles), which BLAS runs.

- F(2x2, 3x3): 16 products per 4 outputs, 2.25x fewer multiplications. The transforms use only 0
  and ±1, so rounding stays at the direct sum's level (4-6e-7 of the output's max on shapes d, e).
- F(3x3, 3x3): 25 products per 9 outputs, 3.24x fewer; the default (``WINOGRAD_TILE`` of the numba
  backend). Points 0, ±1, 2 and infinity: B^T and A^T carry only 2, 3 and 4, and G's 1/6 and 1/3
  are applied in float64 to the filter. Float32 error 3-4e-6 of the max on d and e. Points 1/2
  instead of 2 give the mirror image (x -> 1/x reverses the tile) and measured the same (largest
  error 3.8-4.6e-6 against 3.2-4.0e-6, rms 2.40-2.48e-7 against 2.34-2.41e-7, three seeds of e),
  so the integer set was kept.
- F(4x4, 3x3): 36 products per 16 outputs, 4x fewer; its transforms carry 2, 4, 5 and 8 (1/24 in
  the filter's), which raised float32 errors to 8-11e-6 of the max on d and e.

The transforms run in numba, vectorised across a row of tiles; each call handles one chunk of
images x tile rows so a worker's V and M blocks stay near its cache. The weight gradient
(``grad_output_transform``, ``filter_gradient``) is F(2x2, 3x3)'s adjoint.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from convrpc.core import _simd

__all__ = ["TRANSFORMS", "filter_transform", "filter_gradient", "grad_output_transform", "input_transform",
           "output_transform"]

_FAST = {"reassoc", "contract", "nsz", "arcp"}
_SER = dict(cache=True, nogil=True, fastmath=_FAST)

#: m -> (B^T (a x a), G (a x 3), A^T (m x a)), a = m + 2; the interpolation points of Lavin & Gray.
TRANSFORMS = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
    ),
    3: (  # points 0, 1, -1, 2, infinity (the 1/6 and 1/3 stay in G, applied in float64)
        np.array(
            [[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]],
            dtype=np.float64,
        ),
        np.array(
            [[1 / 2, 0, 0], [-1 / 2, -1 / 2, -1 / 2], [-1 / 6, 1 / 6, -1 / 6], [1 / 6, 1 / 3, 2 / 3], [0, 0, 1]],
            dtype=np.float64,
        ),
        np.array([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 1]], dtype=np.float64),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            dtype=np.float64,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            dtype=np.float64,
        ),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64),
    ),
}


def filter_transform(w: np.ndarray, m: int) -> np.ndarray:
    """U (a*a, K, C) = G w[k, c] G^T for w (K, C, 3, 3), in float64 then cast to w's dtype."""
    _, g_mat, _ = TRANSFORMS[m]
    a = m + 2
    u = np.empty((a * a, w.shape[0], w.shape[1]), dtype=w.dtype)
    _filter_transform(w, g_mat, u)
    return u


def filter_gradient(du: np.ndarray, m: int, dtype) -> np.ndarray:
    """dw (K, C, 3, 3) = G^T dU[k, c] G: the weight gradient from dU (a*a, K, C), the gradient of U."""
    _, g_mat, _ = TRANSFORMS[m]
    dw = np.empty((du.shape[1], du.shape[2], 3, 3), dtype=dtype)
    _filter_gradient(np.ascontiguousarray(du, dtype=np.float64), g_mat, dw)
    return dw


# The filter transforms are loops over the filters, not einsum: np.einsum took 3-9 ms for e's
# 128 x 128 filters (a fifth of the conv). Loops over the taps of one filter at a time took
# 0.54 ms (F(2x2)) and 0.83 ms (F(3x3)); with the taps copied channels-last first, so that every
# loop runs along the input channels, 0.09 and 0.12 ms (best of 30 on 2 threads, load 1.5).


@njit(cache=True, nogil=True, parallel=True)
def _filter_transform(w, g_mat, u):
    a = g_mat.shape[0]
    n_c = w.shape[1]
    for k in prange(w.shape[0]):
        wt = np.empty((3, 3, n_c))  # float64, channels last: every loop below runs along c
        for c in range(n_c):
            for i in range(3):
                for j in range(3):
                    wt[i, j, c] = w[k, c, i, j]
        t = np.empty((a, 3, n_c))  # G w
        for p in range(a):
            g0, g1, g2 = g_mat[p, 0], g_mat[p, 1], g_mat[p, 2]
            for j in range(3):
                for c in range(n_c):
                    t[p, j, c] = g0 * wt[0, j, c] + g1 * wt[1, j, c] + g2 * wt[2, j, c]
        for p in range(a):  # then (G w) G^T
            for q in range(a):
                h0, h1, h2 = g_mat[q, 0], g_mat[q, 1], g_mat[q, 2]
                dst = u[p * a + q, k]
                for c in range(n_c):
                    dst[c] = t[p, 0, c] * h0 + t[p, 1, c] * h1 + t[p, 2, c] * h2


@njit(cache=True, nogil=True, parallel=True)
def _filter_gradient(du, g_mat, dw):
    a = g_mat.shape[0]
    n_c = du.shape[2]
    for k in prange(du.shape[1]):
        t = np.zeros((3, a, n_c))  # G^T dU, every input channel at once (unit-stride inner loops)
        for p in range(a):
            for q in range(a):
                for i in range(3):
                    g = g_mat[p, i]
                    for c in range(n_c):
                        t[i, q, c] += g * du[p * a + q, k, c]
        for c in range(n_c):
            for i in range(3):
                for j in range(3):
                    s = 0.0
                    for q in range(a):
                        s += t[i, q, c] * g_mat[q, j]
                    dw[k, c, i, j] = s


# The 1-D transforms written out, in the arrays' dtype: ``k`` holds 2, 4, 5, 8 of that dtype
# (a float literal would promote float32 to float64 and stop 8-wide SIMD).


@njit(cache=True, inline="always")
def _bt2(d0, d1, d2, d3, k):
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(cache=True, inline="always")
def _bt3(d0, d1, d2, d3, d4, k):
    two = k[0]
    s32, d31 = d3 - d2, d3 - d1
    return two * (d0 - d2) + d31, s32 - two * d1, s32 + two * (d1 - d2), d31, d4 - d2 - two * d31


@njit(cache=True, inline="always")
def _bt4(d0, d1, d2, d3, d4, d5, k):
    four, five = k[1], k[2]
    two = k[0]
    return (
        four * d0 - five * d2 + d4,
        d3 + d4 - four * (d1 + d2),
        four * (d1 - d2) + d4 - d3,
        two * (d3 - d1) + d4 - d2,
        two * (d1 - d3) + d4 - d2,
        four * d1 - five * d3 + d5,
    )


@njit(cache=True, inline="always")
def _at2(m0, m1, m2, m3, k):
    return m0 + m1 + m2, m1 - m2 - m3


@njit(cache=True, inline="always")
def _at3(m0, m1, m2, m3, m4, k):
    s12, d12 = m1 + m2, m1 - m2
    return m0 + s12 + m3, d12 + k[0] * m3, s12 + k[1] * m3 + m4


@njit(cache=True, inline="always")
def _at4(m0, m1, m2, m3, m4, m5, k):
    s13, d13 = m1 + m2, m1 - m2
    s24, d24 = m3 + m4, m3 - m4
    return m0 + s13 + s24, d13 + k[0] * d24, s13 + k[1] * s24, d13 + k[3] * d24 + m5


@njit(cache=True, inline="always")
def _a2(g0, g1):
    """A g for F(2x2, 3x3) (A = (A^T)^T, 4 x 2): the adjoint of _at2."""
    return g0, g0 + g1, g0 - g1, -g1


@njit(cache=True, inline="always")
def _phase_edge(xq, rr, src, q0, q1, col0, m):
    """xq[rr, s, q] for tiles q0 .. q1 of _phase_rows, one column at a time, zero outside the row src."""
    for q in range(q0, q1):
        for s in range(m):
            col = col0 + q * m + s
            xq[rr, s, q] = src[col] if 0 <= col < src.shape[0] else 0.0


@njit(cache=True, inline="always")
def _phase_rows(x, n, c, xq, row0, col0, m):
    """xq[rr, s, q] = x[n, c, row0 + rr, col0 + q*m + s], zero outside the image: the padded rows
    split into their m column phases, so that tile q's input columns are xq[rr, e % m, q + e // m]
    and every pass over a row of tiles reads unit-stride. xq is overwritten.

    A row's columns inside the image are split a vector of tiles at a time (_simd.load_phase), the
    last shifted back to end at the image's edge; in a row narrower than a vector, the one vector
    runs past it (into the next row, within x), and the columns past the image are then overwritten
    one by one."""
    h, wd = x.shape[2], x.shape[3]
    rows, _, cols = xq.shape
    lanes = _simd.lanes(xq)
    # q in [lo, hi): every phase's column inside the image
    lo = min(cols, max(0, (m - 1 - col0) // m))
    hi = max(lo, min(cols, (wd - col0) // m))
    for rr in range(rows):
        ih = row0 + rr
        if ih < 0 or ih >= h:
            xq[rr, :, :] = 0.0
            continue
        src = x[n, c, ih]
        row, out = ((n * x.shape[1] + c) * h + ih) * wd + col0, rr * m * cols
        for qq in range((hi - lo + lanes - 1) // lanes):
            q = min(lo + qq * lanes, max(lo, hi - lanes))  # the last shifted back, or one past hi
            at = row + q * m
            if at + m * lanes > x.size or q + lanes > cols:  # x's or the phase row's end: one by one
                for qs in range(q, hi):
                    for s in range(m):
                        xq[rr, s, qs] = src[col0 + qs * m + s]
                break
            if m == 2:
                _simd.store(xq, out + q, _simd.load_phase(x, at, 2, 0))
                _simd.store(xq, out + cols + q, _simd.load_phase(x, at, 2, 1))
            elif m == 3:
                _simd.store(xq, out + q, _simd.load_phase(x, at, 3, 0))
                _simd.store(xq, out + cols + q, _simd.load_phase(x, at, 3, 1))
                _simd.store(xq, out + 2 * cols + q, _simd.load_phase(x, at, 3, 2))
            else:
                _simd.store(xq, out + q, _simd.load_phase(x, at, 4, 0))
                _simd.store(xq, out + cols + q, _simd.load_phase(x, at, 4, 1))
                _simd.store(xq, out + 2 * cols + q, _simd.load_phase(x, at, 4, 2))
                _simd.store(xq, out + 3 * cols + q, _simd.load_phase(x, at, 4, 3))
        _phase_edge(xq, rr, src, 0, lo, col0, m)  # the tiles reaching past the image's edges
        _phase_edge(xq, rr, src, hi, cols, col0, m)


def _pad(e, n: int):
    """A transform's values padded to n with copies of the last: one tuple type for every m, so a
    kernel can take m at run time (B^T's a = m + 2 values to 6, A^T's m to 4); callers use only
    the first ones."""
    return (*e, *(e[-1],) * (n - len(e)))


@overload(_pad, inline="always")
def _pad_impl(e, n):
    key = (len(e.types), getattr(n, "literal_value", None))
    return {
        (4, 6): lambda e, n: (e[0], e[1], e[2], e[3], e[3], e[3]),
        (5, 6): lambda e, n: (e[0], e[1], e[2], e[3], e[4], e[4]),
        (6, 6): lambda e, n: e,
        (2, 4): lambda e, n: (e[0], e[1], e[1], e[1]),
        (3, 4): lambda e, n: (e[0], e[1], e[2], e[2]),
        (4, 4): lambda e, n: e,
    }.get(key)


@njit(cache=True, inline="always")
def _bt(d, i, step, k, m):
    """B^T of the a = m + 2 values d[i + e*step] (one tile's; padded to 6)."""
    if m == 2:
        return _pad(_bt2(d[i], d[i + step], d[i + 2 * step], d[i + 3 * step], k), 6)
    if m == 3:
        return _pad(_bt3(d[i], d[i + step], d[i + 2 * step], d[i + 3 * step], d[i + 4 * step], k), 6)
    return _bt4(d[i], d[i + step], d[i + 2 * step], d[i + 3 * step], d[i + 4 * step], d[i + 5 * step], k)


# The vector transforms below spell their loads out rather than take a load function as an argument:
# numba calls such an argument through a pointer instead of inlining it (input_transform ran 2x slower).


@njit(cache=True, inline="always")
def _vec_bt(d, i, step, k, m):
    """_bt of a _simd vector of tiles: the a Vecs at d.flat[i + e*step] (k: the constants splatted)."""
    ld = _simd.load
    if m == 2:
        return _pad(_bt2(ld(d, i), ld(d, i + step), ld(d, i + 2 * step), ld(d, i + 3 * step), k), 6)
    if m == 3:
        return _pad(_bt3(ld(d, i), ld(d, i + step), ld(d, i + 2 * step), ld(d, i + 3 * step), ld(d, i + 4 * step), k),
                    6)  # fmt: skip
    return _bt4(ld(d, i), ld(d, i + step), ld(d, i + 2 * step), ld(d, i + 3 * step), ld(d, i + 4 * step),
                ld(d, i + 5 * step), k)  # fmt: skip


@njit(cache=True, inline="always")
def _vec_phase_bt(d, i, w1, k, m):
    """_vec_bt of tile columns 0 .. a-1 of the phase-split row at d.flat[i] (phase s at i + s*w1, the
    next tile's columns one element on)."""
    ld = _simd.load
    if m == 2:
        return _pad(_bt2(ld(d, i), ld(d, i + w1), ld(d, i + 1), ld(d, i + w1 + 1), k), 6)
    if m == 3:
        return _pad(_bt3(ld(d, i), ld(d, i + w1), ld(d, i + 2 * w1), ld(d, i + 1), ld(d, i + w1 + 1), k), 6)
    return _bt4(ld(d, i), ld(d, i + w1), ld(d, i + 2 * w1), ld(d, i + 3 * w1), ld(d, i + 1), ld(d, i + w1 + 1), k)


@njit(cache=True, inline="always")
def _vec_consts(k):
    sp = _simd.splat
    return sp(k[0]), sp(k[1]), sp(k[2]), sp(k[3])


@njit(cache=True, inline="always")
def _store_vecs(a, o, step, e, count):
    """a.flat[o + i*step ...] = e[i] for i < count (2 to 6): the tuple indexed by constants, not by
    a loop variable (numba spills a tuple to the stack to index it at run time)."""
    e = _pad(e, 6)
    _simd.store(a, o, e[0])
    _simd.store(a, o + step, e[1])
    if count > 2:
        _simd.store(a, o + 2 * step, e[2])
    if count > 3:
        _simd.store(a, o + 3 * step, e[3])
    if count > 4:
        _simd.store(a, o + 4 * step, e[4])
    if count > 5:
        _simd.store(a, o + 5 * step, e[5])


@njit(**_SER)
def input_transform(x, v, xq, rt, k, n0, tn, th0, nth, tiles_w, pt, pl, m):
    """v (a*a, C, tn*nth*tiles_w) = B^T d B of the input tiles of images n0..n0+tn, tile rows th0..th0+nth.

    Column ``(t*nth + r)*tiles_w + q`` is image n0 + t, tile row th0 + r, tile column q, whose input
    tile starts at row (th0 + r)*m - pt, column q*m - pl (zero outside the image). Scratch: xq
    (nth*m + 2, m, tw + 1), the rows split into column phases (_phase_rows), and rt (nth*m + 2, a,
    tw), tw = tiles_w, or a _simd vector of tiles where that is wider. Both passes run a vector of tiles at a
    time, the last one of a row shifted back to end at its end; a row narrower than a vector takes one
    from tile 0 on, which spills into the next row of v (written after it), and at the end of v's
    slab, runs one tile at a time. v, xq and rt are overwritten.
    """
    c_in = x.shape[1]
    rows, w1, tw = xq.shape[0], xq.shape[2], rt.shape[2]
    a = m + 2
    p_all = v.shape[2]
    lanes = _simd.lanes(v)
    kv = _vec_consts(k)
    flat_r, flat_v = rt.reshape(-1), v.reshape(-1)
    # a row's vectors of tiles: the last shifted back to end at the row's end, or in a row narrower
    # than a vector, one from tile 0 on, past the row's end
    chunks, last = (tiles_w + lanes - 1) // lanes, max(0, tiles_w - lanes)
    for t in range(tn):
        for c in range(c_in):
            _phase_rows(x, n0 + t, c, xq, th0 * m - pt, -pl, m)
            for rr in range(rows):  # B^T along each row: rt[rr, j, q] for tile column q
                src, dst = rr * m * w1, rr * a * tw
                for qq in range(chunks):
                    q = min(qq * lanes, last)
                    _store_vecs(rt, dst + q, tw, _vec_phase_bt(xq, src + q, w1, kv, m), a)
            for r in range(nth):  # then B^T down each column of every tile
                p0, y0 = (t * nth + r) * tiles_w, r * m
                for j in range(a):
                    src, step = (y0 * a + j) * tw, a * tw
                    dst = (j * c_in + c) * p_all + p0  # + i*a*C*P for output position (i, j)
                    for qq in range(chunks):
                        q = min(qq * lanes, last)
                        if p0 + q + lanes <= p_all:
                            _store_vecs(v, dst + q, a * c_in * p_all, _vec_bt(rt, src + q, step, kv, m), a)
                            continue
                        for qs in range(tiles_w):  # a narrow row at the slab's end: one tile at a time
                            e = _bt(flat_r, src + qs, step, k, m)
                            for i in range(a):
                                flat_v[i * a * c_in * p_all + dst + qs] = e[i]


@njit(cache=True, inline="always")
def _vec_at(d, i, step, k, m):
    """A^T of a _simd vector of tiles: the a = m + 2 Vecs at d.flat[i + e*step] (padded to 4)."""
    ld = _simd.load
    if m == 2:
        return _pad(_at2(ld(d, i), ld(d, i + step), ld(d, i + 2 * step), ld(d, i + 3 * step), k), 4)
    if m == 3:
        return _pad(_at3(ld(d, i), ld(d, i + step), ld(d, i + 2 * step), ld(d, i + 3 * step), ld(d, i + 4 * step), k),
                    4)  # fmt: skip
    return _at4(ld(d, i), ld(d, i + step), ld(d, i + 2 * step), ld(d, i + 3 * step), ld(d, i + 4 * step),
                ld(d, i + 5 * step), k)  # fmt: skip


@njit(**_SER)
def output_transform(mm, b, has_bias, y, yq, ct, k, n0, tn, th0, nth, tiles_w, m):
    """y's tiles for images n0..n0+tn, tile rows th0..th0+nth = A^T M A (+ b), from mm (a*a, K, tn*nth*tiles_w).

    Scratch: yq (nth*m, m, tw), the output rows in column phases (yq[rr, j, q] is column q*m + j, as
    _phase_rows), and ct (m, a, tw), tw as input_transform's. Both passes run a vector of tiles at a
    time, as input_transform's (in a row narrower than a vector, the one vector reads the next row of
    mm, or past mm's end into the slack that follows it: lanes nothing uses); tile pixels past y's
    edge are dropped, and the phases are
    interleaved into y's rows a vector of tiles at a time (_simd.store_interleaved).
    Returns whether every value written is finite (a NaN or inf anywhere in a tile's input
    spreads over the whole tile, where a direct sum keeps it to the windows that read it).
    """
    _, c_out, out_h, out_w = y.shape
    a = m + 2
    p_all, tw = mm.shape[2], ct.shape[2]
    rows = min(nth * m, out_h - th0 * m)
    lanes = _simd.lanes(mm)
    kv = _vec_consts(k)
    full = out_w // m  # tiles wholly inside a row
    chunks, last = (tiles_w + lanes - 1) // lanes, max(0, tiles_w - lanes)  # as input_transform's
    check = 0.0  # + every output * 0: NaN once one is not finite
    vzero = _simd.zeros(mm)
    vcheck = vzero
    for t in range(tn):
        for kk in range(c_out):
            vinit = _simd.splat(b[kk] if has_bias else k[0] - k[0])  # in mm's dtype
            for r in range(nth):
                p0, y0 = (t * nth + r) * tiles_w, r * m
                for j in range(a):  # A^T down the columns: ct[i, j, q]
                    src, step = (j * c_out + kk) * p_all + p0, a * c_out * p_all
                    for qq in range(chunks):
                        q = min(qq * lanes, last)
                        _store_vecs(ct, j * tw + q, a * tw, _vec_at(mm, src + q, step, kv, m), m)
                for i in range(m):  # then along the rows, into column phases: yq[y0 + i, j, q]
                    src, dst = i * a * tw, (y0 + i) * m * tw
                    for qq in range(chunks):
                        q = min(qq * lanes, last)
                        g = _vec_at(ct, src + q, tw, kv, m)
                        _store_vecs(yq, dst + q, tw, (g[0] + vinit, g[1] + vinit, g[2] + vinit, g[3] + vinit), m)
            for rr in range(rows):  # the phases interleaved into y's row
                row = y[n0 + t, kk, th0 * m + rr]
                base, o = (((n0 + t) * c_out + kk) * out_h + th0 * m + rr) * out_w, rr * m * tw
                start = 0
                for q in range(0, full - lanes + 1, lanes):
                    start = q + lanes
                    if m == 2:
                        vs2 = (_simd.load(yq, o + q), _simd.load(yq, o + tw + q))
                        _simd.store_interleaved(y, base + q * 2, vs2)
                        vcheck = vcheck + (vs2[0] + vs2[1]) * vzero
                    elif m == 3:
                        vs3 = (_simd.load(yq, o + q), _simd.load(yq, o + tw + q), _simd.load(yq, o + 2 * tw + q))
                        _simd.store_interleaved(y, base + q * 3, vs3)
                        vcheck = vcheck + (vs3[0] + vs3[1] + vs3[2]) * vzero
                    else:
                        vs4 = (_simd.load(yq, o + q), _simd.load(yq, o + tw + q), _simd.load(yq, o + 2 * tw + q),
                               _simd.load(yq, o + 3 * tw + q))  # fmt: skip
                        _simd.store_interleaved(y, base + q * 4, vs4)
                        vcheck = vcheck + (vs4[0] + vs4[1] + vs4[2] + vs4[3]) * vzero
                for j in range(m):  # the rest one by one
                    src = yq[rr, j]
                    for q in range(start, (out_w - j + m - 1) // m):
                        val = src[q]
                        row[q * m + j] = val
                        check += val * 0.0
    _simd.store(ct, 0, vcheck)  # the vector check's lanes, summed (ct, of m*a*tw >= lanes elements, is free now)
    flat_c = ct.reshape(-1)
    for lane in range(lanes):
        check += flat_c[lane]
    return check == 0.0


@njit(**_SER)
def grad_output_transform(gy, wv, gp, ct, n0, tn, th0, nth, tiles_w):
    """wv (16, K, tn*nth*tiles_w) = A dY A^T of gy's 2x2 tiles (F(2x2, 3x3); zero past gy's edge).

    The adjoint of output_transform: with V from input_transform, dU = wv @ V^T per position is the
    gradient of U = G w G^T, and filter_gradient turns it into the weight's. Columns are laid out as
    input_transform's. Scratch: gp (nth*2, tiles_w*2), ct (2, 4, tiles_w). wv, gp, ct are overwritten.
    """
    c_out, out_h, out_w = gy.shape[1], gy.shape[2], gy.shape[3]
    rows = min(nth * 2, out_h - th0 * 2)
    cols = min(tiles_w * 2, out_w)
    for t in range(tn):
        for kk in range(c_out):
            gp[:, :] = 0.0
            for rr in range(rows):
                dst, src = gp[rr, :cols], gy[n0 + t, kk, th0 * 2 + rr, :cols]
                for q in range(cols):  # not a slice assignment: its call and overlap check cost 2x here
                    dst[q] = src[q]
            for r in range(nth):
                p0, y0 = (t * nth + r) * tiles_w, r * 2
                for i in range(2):  # A along each row of the tile
                    for q in range(tiles_w):
                        e = _a2(gp[y0 + i, 2 * q], gp[y0 + i, 2 * q + 1])
                        for j in range(4):
                            ct[i, j, q] = e[j]
                for j in range(4):  # then down its columns
                    for q in range(tiles_w):
                        e = _a2(ct[0, j, q], ct[1, j, q])
                        for i in range(4):
                            wv[i * 4 + j, kk, p0 + q] = e[i]
