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
def _pad_rows(x, n, c, xp, row0, col0):
    """xp = x[n, c] from row row0, column col0 on, zero outside the image; xp is overwritten."""
    h, wd = x.shape[2], x.shape[3]
    rows, cols = xp.shape
    lo, hi = max(0, -col0), min(cols, wd - col0)
    for rr in range(rows):
        ih = row0 + rr
        if ih < 0 or ih >= h or hi <= lo:
            xp[rr, :] = 0.0
            continue
        xp[rr, :lo] = 0.0
        dst, src = xp[rr, lo:hi], x[n, c, ih, lo + col0 : hi + col0]
        for q in range(hi - lo):  # not a slice assignment: its call and overlap check cost 2x here
            dst[q] = src[q]
        xp[rr, hi:] = 0.0


@njit(**_SER)
def input_transform(x, v, xp, rt, k, n0, tn, th0, nth, tiles_w, pt, pl, m):
    """v (a*a, C, tn*nth*tiles_w) = B^T d B of the input tiles of images n0..n0+tn, tile rows th0..th0+nth.

    Column ``(t*nth + r)*tiles_w + q`` is image n0 + t, tile row th0 + r, tile column q, whose input
    tile starts at row (th0 + r)*m - pt, column q*m - pl (zero outside the image). Scratch: xp
    (nth*m + 2, tiles_w*m + 2), rt (nth*m + 2, a, tiles_w); both passes run along a row of tiles
    (contiguous, so LLVM vectorises them). v, xp and rt are overwritten.
    """
    c_in = x.shape[1]
    rows = xp.shape[0]
    for t in range(tn):
        for c in range(c_in):
            _pad_rows(x, n0 + t, c, xp, th0 * m - pt, -pl)
            for rr in range(rows):  # B^T along each row: rt[rr, j, q] for tile column q
                for q in range(tiles_w):
                    x0 = q * m
                    if m == 2:
                        e2 = _bt2(xp[rr, x0], xp[rr, x0 + 1], xp[rr, x0 + 2], xp[rr, x0 + 3], k)
                        for j in range(4):
                            rt[rr, j, q] = e2[j]
                    elif m == 3:
                        e3 = _bt3(xp[rr, x0], xp[rr, x0 + 1], xp[rr, x0 + 2], xp[rr, x0 + 3], xp[rr, x0 + 4], k)
                        for j in range(5):
                            rt[rr, j, q] = e3[j]
                    else:
                        e4 = _bt4(xp[rr, x0], xp[rr, x0 + 1], xp[rr, x0 + 2], xp[rr, x0 + 3], xp[rr, x0 + 4],
                                  xp[rr, x0 + 5], k)  # fmt: skip
                        for j in range(6):
                            rt[rr, j, q] = e4[j]
            for r in range(nth):  # then B^T down each column of every tile
                p0, y0 = (t * nth + r) * tiles_w, r * m
                for j in range(m + 2):
                    for q in range(tiles_w):
                        if m == 2:
                            e2 = _bt2(rt[y0, j, q], rt[y0 + 1, j, q], rt[y0 + 2, j, q], rt[y0 + 3, j, q], k)
                            for i in range(4):
                                v[i * 4 + j, c, p0 + q] = e2[i]
                        elif m == 3:
                            e3 = _bt3(rt[y0, j, q], rt[y0 + 1, j, q], rt[y0 + 2, j, q], rt[y0 + 3, j, q],
                                      rt[y0 + 4, j, q], k)  # fmt: skip
                            for i in range(5):
                                v[i * 5 + j, c, p0 + q] = e3[i]
                        else:
                            e4 = _bt4(rt[y0, j, q], rt[y0 + 1, j, q], rt[y0 + 2, j, q], rt[y0 + 3, j, q],
                                      rt[y0 + 4, j, q], rt[y0 + 5, j, q], k)  # fmt: skip
                            for i in range(6):
                                v[i * 6 + j, c, p0 + q] = e4[i]


@njit(**_SER)
def output_transform(mm, b, has_bias, y, yp, ct, k, n0, tn, th0, nth, tiles_w, m):
    """y's tiles for images n0..n0+tn, tile rows th0..th0+nth = A^T M A (+ b), from mm (a*a, K, tn*nth*tiles_w).

    Scratch: yp (nth*m, tiles_w*m), ct (m, a, tiles_w); tile pixels past y's edge are dropped.
    Returns whether every value written is finite (a NaN or inf anywhere in a tile's input
    spreads over the whole tile, where a direct sum keeps it to the windows that read it).
    """
    _, c_out, out_h, out_w = y.shape
    a = m + 2
    rows = min(nth * m, out_h - th0 * m)
    check = 0.0
    for t in range(tn):
        for kk in range(c_out):
            init = b[kk] if has_bias else 0.0
            for r in range(nth):
                p0, y0 = (t * nth + r) * tiles_w, r * m
                for j in range(a):  # A^T down the columns
                    for q in range(tiles_w):
                        p = p0 + q
                        if m == 2:
                            f2 = _at2(mm[j, kk, p], mm[a + j, kk, p], mm[2 * a + j, kk, p], mm[3 * a + j, kk, p], k)
                            for i in range(2):
                                ct[i, j, q] = f2[i]
                        elif m == 3:
                            f3 = _at3(mm[j, kk, p], mm[a + j, kk, p], mm[2 * a + j, kk, p], mm[3 * a + j, kk, p],
                                      mm[4 * a + j, kk, p], k)  # fmt: skip
                            for i in range(3):
                                ct[i, j, q] = f3[i]
                        else:
                            f4 = _at4(mm[j, kk, p], mm[a + j, kk, p], mm[2 * a + j, kk, p], mm[3 * a + j, kk, p],
                                      mm[4 * a + j, kk, p], mm[5 * a + j, kk, p], k)  # fmt: skip
                            for i in range(4):
                                ct[i, j, q] = f4[i]
                for i in range(m):  # then along the rows
                    for q in range(tiles_w):
                        if m == 2:
                            g2 = _at2(ct[i, 0, q], ct[i, 1, q], ct[i, 2, q], ct[i, 3, q], k)
                            for j in range(2):
                                yp[y0 + i, q * 2 + j] = g2[j] + init
                        elif m == 3:
                            g3 = _at3(ct[i, 0, q], ct[i, 1, q], ct[i, 2, q], ct[i, 3, q], ct[i, 4, q], k)
                            for j in range(3):
                                yp[y0 + i, q * 3 + j] = g3[j] + init
                        else:
                            g4 = _at4(ct[i, 0, q], ct[i, 1, q], ct[i, 2, q], ct[i, 3, q], ct[i, 4, q], ct[i, 5, q], k)
                            for j in range(4):
                                yp[y0 + i, q * 4 + j] = g4[j] + init
            for rr in range(rows):
                for ow in range(out_w):
                    val = yp[rr, ow]
                    y[n0 + t, kk, th0 * m + rr, ow] = val
                    check += val * 0.0
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
                for q in range(cols):  # as in _pad_rows
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
