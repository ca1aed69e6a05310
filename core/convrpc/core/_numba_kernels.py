"""Private numba kernels of the numba backend; the public, shaped entry points are in numba_backend.

Every kernel writes into arrays its caller allocated and takes sizes as plain ints. Parallel loops
split the work so that each iteration owns the elements it writes (an output row, an input row,
one weight tap, an input plane): no two threads ever add into the same element, so no atomics or
per-thread buffers are needed. Index conventions follow ConvGeometry: input row ``ih`` of output
row ``oh`` and tap ``i`` is ``oh * sh - pt + i * dh`` (the same with w/l for columns).

The parallel kernels take ``stop``, a StopFlag's uint8 array of one element: once it is nonzero
they skip the rest of their work (one load per output row, plane or tap row; a ``prange`` cannot
break, so its iterations ``continue``), and what they leave in their outputs is garbage the
caller drops (see convrpc.core.stopping).
"""

from __future__ import annotations

from types import FunctionType

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from convrpc.core import _cblas, _simd

# Reassociation lets LLVM vectorise dot products; no nnan/ninf, so NaN and inf stay IEEE.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_PAR = dict(parallel=True, cache=True, nogil=True, fastmath=_FAST)
_SER = dict(cache=True, nogil=True, fastmath=_FAST)


@intrinsic
def _stopped(typingctx, flag):
    """Whether ``flag[0]`` (uint8) is nonzero, read from memory every time: an atomic (acquire) load,
    which LLVM may not hoist out of a loop (a plain load is, since the loop never writes the flag)."""
    if not (isinstance(flag, types.Array) and flag.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        value = builder.load_atomic(data, "acquire", 1)
        return builder.icmp_unsigned("!=", value, ir.Constant(value.type, 0))

    return types.boolean(flag), codegen


@njit(cache=True, inline="always")
def _col_range(off, sw, w, out_w):
    """Output columns [lo, hi) whose input column ``ow * sw + off`` lies inside [0, w), within [0, out_w)."""
    lo = 0 if off >= 0 else (-off + sw - 1) // sw
    hi = (w - 1 - off) // sw + 1 if w - 1 - off >= 0 else 0
    return min(lo, out_w), min(hi, out_w)


# -- direct convolution (small channel counts, depthwise, tiny batches) -------------------------


@njit(**_PAR)
def conv2d_direct(x, w, b, has_bias, y, groups, sh, sw, pt, pl, dh, dw, stop):
    """y (N, K, OH, OW) = conv2d(x (N, C, H, W), w (K, C/groups, kh, kw)) (+ b); y is overwritten."""
    n_, c_in, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    out_h, out_w = y.shape[2], y.shape[3]
    kg = c_out // groups
    for job in prange(n_ * c_out * out_h):
        oh = job % out_h
        k = (job // out_h) % c_out
        n = job // (out_h * c_out)
        if _stopped(stop):
            continue
        row = y[n, k, oh]
        init = b[k] if has_bias else 0.0
        for ow in range(out_w):
            row[ow] = init
        c0 = (k // kg) * cg
        for cc in range(cg):
            for i in range(kh):
                ih = oh * sh - pt + i * dh
                if ih < 0 or ih >= h or _stopped(stop):
                    continue
                xrow = x[n, c0 + cc, ih]
                for j in range(kw):
                    off = j * dw - pl
                    lo, hi = _col_range(off, sw, wd, out_w)
                    if hi <= lo:
                        continue
                    wv = w[k, cc, i, j]
                    dst = row[lo:hi]
                    if sw == 1:
                        src = xrow[lo + off : hi + off]
                        for q in range(dst.shape[0]):
                            dst[q] += wv * src[q]
                    else:
                        src_s = xrow[lo * sw + off : (hi - 1) * sw + off + 1 : sw]
                        for q in range(dst.shape[0]):
                            dst[q] += wv * src_s[q]


@njit(**_PAR)
def conv2d_input_grad_direct(gy, w, gx, groups, sh, sw, pt, pl, dh, dw, stop):
    """gx (N, C, H, W) = adjoint of conv2d applied to gy (N, K, OH, OW); gx is overwritten.

    Each iteration owns one input row and gathers every (output row, tap) that reads it.
    """
    n_, c_in, h, wd = gx.shape
    c_out, cg, kh, kw = w.shape
    out_h, out_w = gy.shape[2], gy.shape[3]
    kg = c_out // groups
    for job in prange(n_ * c_in * h):
        ih = job % h
        c = (job // h) % c_in
        n = job // (h * c_in)
        if _stopped(stop):
            continue
        row = gx[n, c, ih]
        for iw in range(wd):
            row[iw] = 0.0
        grp = c // cg
        cc = c - grp * cg
        for k in range(grp * kg, (grp + 1) * kg):
            for i in range(kh):
                t = ih + pt - i * dh
                if t < 0 or t % sh != 0 or _stopped(stop):
                    continue
                oh = t // sh
                if oh >= out_h:
                    continue
                grow = gy[n, k, oh]
                for j in range(kw):
                    off = j * dw - pl
                    lo, hi = _col_range(off, sw, wd, out_w)
                    if hi <= lo:
                        continue
                    wv = w[k, cc, i, j]
                    src = grow[lo:hi]
                    if sw == 1:
                        dst = row[lo + off : hi + off]
                        for q in range(src.shape[0]):
                            dst[q] += wv * src[q]
                    else:
                        dst_s = row[lo * sw + off : (hi - 1) * sw + off + 1 : sw]
                        for q in range(src.shape[0]):
                            dst_s[q] += wv * src[q]


@njit(**_PAR)
def conv2d_weight_grad_direct(x, gy, gw, groups, sh, sw, pt, pl, dh, dw, stop):
    """gw (K, C/groups, kh, kw) = sum over batch and positions of gy * x windows; overwritten.

    Each iteration owns one weight element, a dot product over the batch and output positions.
    """
    n_, c_in, h, wd = x.shape
    c_out, cg, kh, kw = gw.shape
    out_h, out_w = gy.shape[2], gy.shape[3]
    kg = c_out // groups
    for job in prange(c_out * cg * kh * kw):
        j = job % kw
        i = (job // kw) % kh
        cc = (job // (kw * kh)) % cg
        k = job // (kw * kh * cg)
        c = (k // kg) * cg + cc
        off = j * dw - pl
        lo, hi = _col_range(off, sw, wd, out_w)
        total = 0.0
        for n in range(n_):
            if hi <= lo:
                break
            for oh in range(out_h):
                ih = oh * sh - pt + i * dh
                if ih < 0 or ih >= h or _stopped(stop):
                    continue
                grow = gy[n, k, oh, lo:hi]
                acc = 0.0
                if sw == 1:
                    xs = x[n, c, ih, lo + off : hi + off]
                    for q in range(grow.shape[0]):
                        acc += grow[q] * xs[q]
                else:
                    xs_s = x[n, c, ih, lo * sw + off : (hi - 1) * sw + off + 1 : sw]
                    for q in range(grow.shape[0]):
                        acc += grow[q] * xs_s[q]
                total += acc
        gw[k, cc, i, j] = total


# -- col2im for the BLAS path (serial: each worker thread runs its own tile) --------------------


@njit(**_SER)
def col2im_add(cols, gx, n0, c0, r0, ih_lo, ih_hi, kh, kw, sh, sw, pt, pl, dh, dw, out_w):
    """gx[n0:n0+T, c0:c0+C', ih_lo:ih_hi] += the taps in cols (C'*kh*kw, T, R*OW) summed onto the input grid.

    Taps landing outside input rows [ih_lo, ih_hi) are skipped: the worker that owns those rows
    adds them, so two workers never write the same element.
    """
    rows, t_, cols_len = cols.shape
    wd = gx.shape[3]
    n_rows = cols_len // out_w
    for t in range(t_):
        for c in range(rows // (kh * kw)):
            plane = gx[n0 + t, c0 + c]
            for i in range(kh):
                for j in range(kw):
                    src = cols[(c * kh + i) * kw + j, t]
                    off = j * dw - pl
                    lo, hi = _col_range(off, sw, wd, out_w)
                    if hi <= lo:
                        continue
                    first, last = lo * sw + off, (hi - 1) * sw + off + 1
                    for r in range(n_rows):
                        ih = (r0 + r) * sh - pt + i * dh
                        if ih < ih_lo or ih >= ih_hi:
                            continue
                        # A loop over the slices: `plane[ih, first:last:sw] += ...` costs a call and a temporary
                        # per row and tap (g, 7x7 stride 2: 5.9 -> 1.0 ms an image, float32).
                        dst = plane[ih, first:last:sw]
                        part = src[r * out_w + lo : r * out_w + hi]
                        for q in range(hi - lo):
                            dst[q] += part[q]


# -- small convs: im2col per (image, group) in a private buffer, then vectorised axpy/dot loops --


@njit(cache=True, inline="always")
def _wide_sizes(out_h, out_w, kh, kw, sh, sw, dh, dw):
    """im2col_wide's grid width, grid length for all out_h rows, and padded-input span per channel."""
    wg = out_w + dw * (kw - 1) // sw
    return wg, out_h * wg, sh * sw * (out_h + dh * (kh - 1) // sh + 1) * wg


@njit(**_PAR)
def conv2d_small(x, w, b, has_bias, y, groups, sh, sw, pt, pl, dh, dw, stop):
    """y (N, K, OH, OW) = conv2d(x, w) (+ b); one (image, group) per iteration; y is overwritten.

    The windows come from im2col_wide (a few long copies, not one slice per output row, which
    dominated on 26-78 wide rows); the axpy loops run over its grid and keep the valid columns.
    """
    n_ = x.shape[0]
    c_out, cg, kh, kw = w.shape
    out_h, out_w = y.shape[2], y.shape[3]
    kg, ckk = c_out // groups, cg * kh * kw
    wg, length, span = _wide_sizes(out_h, out_w, kh, kw, sh, sw, dh, dw)
    wm = w.reshape(c_out, ckk)
    for job in prange(n_ * groups):
        grp = job % groups
        n = job // groups
        if _stopped(stop):
            continue
        cols = np.empty((ckk, 1, length), dtype=x.dtype)
        xpad = np.empty((cg, span), dtype=x.dtype)
        acc = np.empty(length, dtype=x.dtype)
        im2col_wide(x, xpad, cols, n, grp * cg, 0, kh, kw, sh, sw, pt, pl, dh, dw, wg, out_w, False)
        for k in range(grp * kg, (grp + 1) * kg):
            init = b[k] if has_bias else 0.0
            for q in range(length):
                acc[q] = init
            for t in range(ckk):
                wv = wm[k, t]
                src = cols[t, 0]
                for q in range(length):
                    acc[q] += wv * src[q]
            for oh in range(out_h):
                y[n, k, oh, :] = acc[oh * wg : oh * wg + out_w]


@njit(**_PAR)
def conv2d_weight_grad_small(x, gy, partial, groups, kh, kw, sh, sw, pt, pl, dh, dw, stop):
    """partial (chunks, K, C/groups*kh*kw): chunk s sums the (image, group) jobs s, s+chunks, ...

    Each chunk owns its slice of partial; the caller sums over chunks (no races). Windows come
    from im2col_wide with its overhang columns zeroed, gy is laid on the same grid.
    """
    n_ = x.shape[0]
    chunks, c_out, ckk = partial.shape
    out_h, out_w = gy.shape[2], gy.shape[3]
    cg = x.shape[1] // groups
    kg = c_out // groups
    wg, length, span = _wide_sizes(out_h, out_w, kh, kw, sh, sw, dh, dw)
    for s in prange(chunks):
        part = partial[s]
        part[:, :] = 0.0
        cols = np.empty((ckk, 1, length), dtype=x.dtype)
        xpad = np.empty((cg, span), dtype=x.dtype)
        grid = np.zeros(length, dtype=x.dtype)
        for job in range(s, n_ * groups, chunks):
            if _stopped(stop):
                break
            grp = job % groups
            n = job // groups
            im2col_wide(x, xpad, cols, n, grp * cg, 0, kh, kw, sh, sw, pt, pl, dh, dw, wg, out_w, True)
            for k in range(grp * kg, (grp + 1) * kg):
                for oh in range(out_h):
                    grid[oh * wg : oh * wg + out_w] = gy[n, k, oh, :]
                for t in range(ckk):
                    src = cols[t, 0]
                    acc = 0.0
                    for q in range(length):
                        acc += grid[q] * src[q]
                    part[k, t] += acc


# -- pooling -----------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _first_tap(start, dil):
    """The first tap position at or after 0 of a window starting at ``start`` (torch's starting point)."""
    return start + (-start + dil - 1) // dil * dil if start < 0 else start


@njit(parallel=True, cache=True, nogil=True)
def max_pool2d(x, y, arg, kh, kw, sh, sw, ph, pw, dh, dw, stop):
    """y (N, C, OH, OW) = each window's maximum; arg (int64) gets its flat index ih * W + iw in the plane.

    torch's rule: scan the in-image taps from the first one, and a strictly greater value or a NaN
    takes over, so ties go to the first maximum, NaNs to the last NaN and an all -inf window to its
    first in-image tap. A window over padding alone gives -inf and torch's starting index (its first
    tap at or after row and column 0, which may lie outside the plane).
    """
    n_, c_, h, wd = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    for job in prange(n_ * c_ * out_h):
        oh = job % out_h
        c = (job // out_h) % c_
        n = job // (out_h * c_)
        ih0 = _first_tap(oh * sh - ph, dh)
        ih1 = min(oh * sh - ph + (kh - 1) * dh + 1, h)
        for ow in range(out_w):
            if _stopped(stop):  # per window: one window may hold millions of taps
                break
            iw0 = _first_tap(ow * sw - pw, dw)
            iw1 = min(ow * sw - pw + (kw - 1) * dw + 1, wd)
            best = -np.inf
            best_i = ih0 * wd + iw0
            for ih in range(ih0, ih1, dh):
                for iw in range(iw0, iw1, dw):
                    v = x[n, c, ih, iw]
                    if v > best or v != v:
                        best = v
                        best_i = ih * wd + iw
            y[n, c, oh, ow] = best
            arg[n, c, oh, ow] = best_i


@njit(parallel=True, cache=True, nogil=True)
def max_pool2d_backward(gy, arg, gx, kh, kw, sh, sw, ph, pw, dh, dw, stop):
    """gx (N, C, H, W) = gy routed to each window's flat argmax; overwritten. One plane per iteration.

    Windows over padding alone send nothing (their index may name an element outside them).
    """
    n_, c_, h, wd = gx.shape
    out_h, out_w = gy.shape[2], gy.shape[3]
    for job in prange(n_ * c_):
        c = job % c_
        n = job // c_
        plane = gx[n, c]
        plane[:, :] = 0.0
        for oh in range(out_h):
            if _stopped(stop):
                break
            if _first_tap(oh * sh - ph, dh) >= min(oh * sh - ph + (kh - 1) * dh + 1, h):
                continue
            for ow in range(out_w):
                if _first_tap(ow * sw - pw, dw) >= min(ow * sw - pw + (kw - 1) * dw + 1, wd):
                    continue
                t = arg[n, c, oh, ow]
                plane[t // wd, t % wd] += gy[n, c, oh, ow]


@njit(**_PAR)
def avg_pool2d(x, y, div, kh, kw, sh, sw, ph, pw, stop):
    """y (N, C, OH, OW) = window sums over the in-image taps / div (OH, OW), the divisors torch uses."""
    n_, c_, h, wd = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    for job in prange(n_ * c_ * out_h):
        oh = job % out_h
        c = (job // out_h) % c_
        n = job // (out_h * c_)
        row = y[n, c, oh]
        row[:] = 0.0
        for i in range(kh):
            ih = oh * sh - ph + i
            if ih < 0 or ih >= h or _stopped(stop):
                continue
            xrow = x[n, c, ih]
            for j in range(kw):
                lo, hi = _col_range(j - pw, sw, wd, out_w)
                for ow in range(lo, hi):
                    row[ow] += xrow[ow * sw + j - pw]
        for ow in range(out_w):
            row[ow] = row[ow] / div[oh, ow]


@njit(**_PAR)
def avg_pool2d_backward(gy, gx, div, kh, kw, sh, sw, ph, pw, stop):
    """gx (N, C, H, W) = each window's gy / div spread over its in-image taps; one plane per iteration."""
    n_, c_, h, wd = gx.shape
    out_h, out_w = gy.shape[2], gy.shape[3]
    for job in prange(n_ * c_):
        c = job % c_
        n = job // c_
        plane = gx[n, c]
        plane[:, :] = 0.0
        for oh in range(out_h):
            grow = gy[n, c, oh]
            drow = div[oh]
            for i in range(kh):
                ih = oh * sh - ph + i
                if ih < 0 or ih >= h or _stopped(stop):
                    continue
                prow = plane[ih]
                for j in range(kw):
                    lo, hi = _col_range(j - pw, sw, wd, out_w)
                    for ow in range(lo, hi):
                        prow[ow * sw + j - pw] += grow[ow] / drow[ow]


# -- relu --------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def relu(x, y):
    """y = max(x, 0) elementwise on flat arrays; NaN stays NaN (like np.maximum)."""
    for i in prange(x.size):
        v = x[i]
        y[i] = v if (v >= 0.0 or v != v) else 0.0


@njit(parallel=True, cache=True, nogil=True)
def relu_backward(gy, x, gx):
    """gx = 0 where x <= 0, else gy (torch's rule: a NaN input passes gy through), on flat arrays."""
    for i in prange(x.size):
        gx[i] = 0.0 if x[i] <= 0.0 else gy[i]


# -- im2col from padded phase planes (long contiguous copies instead of one per output row) ------


@njit(cache=True, inline="always")
def _wide_pad(x, n, c, pad, r0, sh, sw, pt, pl, wg):
    """pad (sh*sw planes, each a whole number of rows wg wide) = x[n, c] from output row r0 on, with
    its padding, in im2col_wide's layout (see there); pad is overwritten."""
    plane = pad.shape[0] // (sh * sw)
    _wide_pad_rows(x, n, c, pad, r0, sh, sw, pt, pl, wg, 0, plane // wg)


@njit(cache=True, inline="always")
def _wide_pad_rows(x, n, c, pad, r0, sh, sw, pt, pl, wg, lo, hi):
    """_wide_pad's rows lo .. hi of every plane only (plane a*sw + b: rows a, a+sh, ..., columns b, b+sw, ...)."""
    h, wd = x.shape[2], x.shape[3]
    plane = pad.shape[0] // (sh * sw)
    for ab in range(sh * sw):
        pad[ab * plane + lo * wg : ab * plane + hi * wg] = 0.0
    for a in range(sh):
        for rr in range(lo, hi):
            ih = r0 * sh - pt + rr * sh + a
            if ih < 0 or ih >= h:
                continue
            src_row = x[n, c, ih]
            if sw == 2:  # both column phases in one pass over the row: g's image 118-155 -> 39 us
                d0 = pad[2 * a * plane + rr * wg : 2 * a * plane + (rr + 1) * wg]
                d1 = pad[(2 * a + 1) * plane + rr * wg : (2 * a + 1) * plane + (rr + 1) * wg]
                _pad_row_phases(src_row, d0, d1, pl, wg)
                continue
            for b in range(sw):
                base = (a * sw + b) * plane
                u_lo = max(0, -((b - pl) // sw))  # grid columns whose input column is in [0, wd)
                u_hi = min(wg, (wd - 1 + pl - b) // sw + 1) if wd - 1 + pl - b >= 0 else 0
                if u_hi <= u_lo:
                    continue
                dst_row = pad[base + rr * wg : base + (rr + 1) * wg]
                if sw == 1:  # loops over slices: a slice assignment costs a call and an overlap check
                    dst, src = dst_row[u_lo:u_hi], src_row[u_lo + b - pl : u_hi + b - pl]
                    for u in range(u_hi - u_lo):
                        dst[u] = src[u]
                else:
                    for u in range(u_lo, u_hi):
                        dst_row[u] = src_row[u * sw + b - pl]


@njit(cache=True, inline="always")
def _pad_row_phases(src, d0, d1, pl, wg):
    """d_b[u] = src[2u + b - pl] where that column is in src, for b = 0, 1 (stride-2 phase planes'
    row): pairs of input columns go to both planes at once, so the copy vectorises."""
    ix_lo, ix_hi = max(0, -pl), min(src.shape[0], 2 * wg - pl)
    if ix_hi <= ix_lo:
        return
    first = ix_lo + (ix_lo + pl) % 2  # the first column of plane 0
    if first > ix_lo:  # one column of plane 1 before it
        d1[(ix_lo + pl) // 2] = src[ix_lo]
    pairs, u0 = max(0, ix_hi - first) // 2, (first + pl) // 2
    for t in range(pairs):
        d0[u0 + t] = src[first + 2 * t]
        d1[u0 + t] = src[first + 2 * t + 1]
    end = first + 2 * pairs
    if end < ix_hi:  # one column of plane 0 after them
        d0[(end + pl) // 2] = src[end]


@njit(cache=True, inline="always")
def _wide_start(i, j, sh, sw, dh, dw, plane, wg):
    """Where tap (i, j)'s run over the grid starts in a channel's padded planes (see im2col_wide)."""
    return (((i * dh) % sh) * sw + (j * dw) % sw) * plane + ((i * dh) // sh) * wg + (j * dw) // sw


@njit(**_SER)
def im2col_wide(x, xpad, cols, n0, c0, r0, kh, kw, sh, sw, pt, pl, dh, dw, wg, out_w, clean):
    """cols (C'*kh*kw, T, R*wg): the windows of output rows r0..r0+R on a grid wg wide.

    Image t, channel c is first copied with its padding into xpad (C', sh*sw planes), plane
    (a, b) holding padded rows a, a+sh, ... and columns b, b+sw, ... of the tile's input rows, wg
    wide (wg = OW + (kw-1)*dw // sw). Tap (i, j) of all R output rows is then one contiguous run
    of plane ((i*dh) % sh, (j*dw) % sw) from row (i*dh) // sh, column (j*dw) // sw. Grid columns
    >= OW mix neighbouring rows; the caller drops them, or with ``clean`` they are zeroed (a
    weight gradient sums over them, and a NaN there would reach taps that never read it).
    cols and xpad are overwritten.
    """
    _im2col_planes(x, xpad, cols, n0, c0, r0, kh, kw, sh, sw, pt, pl, dh, dw, wg, out_w, clean, wg)


@njit(**_SER)
def im2col_phased(x, xpad, cols, n0, c0, r0, kh, kw, sh, sw, pt, pl, dh, dw, wg, out_w):
    """cols (C'*kh*kw, T, R*OW): im2col's block, copied from im2col_wide's padded phase planes.

    Every tap of an output row is then one contiguous run of a plane (im2col gathered a strided,
    clipped row per tap and row: g, 7x7 stride 2, 1.16 -> 0.44 ms an image, float32). cols and
    xpad (C', span of R rows) are overwritten.
    """
    _im2col_planes(x, xpad, cols, n0, c0, r0, kh, kw, sh, sw, pt, pl, dh, dw, wg, out_w, False, out_w)


@njit(cache=True, inline="always")
def _im2col_planes(x, xpad, cols, n0, c0, r0, kh, kw, sh, sw, pt, pl, dh, dw, wg, out_w, clean, width):
    """im2col_wide (``width`` wg: one run per tap) or im2col_phased (``width`` OW: one per tap and row)."""
    rows, t_, length = cols.shape
    plane = xpad.shape[1] // (sh * sw)
    for t in range(t_):
        for c in range(rows // (kh * kw)):
            pad = xpad[c]
            _wide_pad(x, n0 + t, c0 + c, pad, r0, sh, sw, pt, pl, wg)
            for i in range(kh):
                for j in range(kw):
                    start = _wide_start(i, j, sh, sw, dh, dw, plane, wg)
                    dst = cols[(c * kh + i) * kw + j, t]
                    if width == wg:
                        dst[:] = pad[start : start + length]
                        if clean:
                            for r in range(length // wg):
                                dst[r * wg + out_w : (r + 1) * wg] = 0.0
                        continue
                    # Loops over slices: a slice assignment per row costs a call and an overlap check,
                    # which made this copy twice as slow.
                    for r in range(length // width):
                        seg = dst[r * width : (r + 1) * width]
                        src = pad[start + r * wg : start + r * wg + width]
                        for q in range(width):
                            seg[q] = src[q]


@njit(**_SER)
def col2im_wide(cols, xpad, gx, n0, c0, kh, kw, pt, pl, dh, dw, wg):
    """gx[n0:n0+T, c0:c0+C'] = the taps in cols (C'*kh*kw, T, OH*wg) summed onto the input (stride 1).

    The transpose of im2col_wide for whole images: each tap's run is added in one contiguous
    stretch onto a padded grid wg wide (xpad, C' x (OH + dh*(kh-1) + 1)*wg), whose interior is
    then copied to gx; inputs no window reaches get 0. The caller zeroes the grid's overhang
    columns of gy, so cols is zero there. gx (these images and channels) and xpad are overwritten.
    """
    rows, t_, length = cols.shape
    h, wd = gx.shape[2], gx.shape[3]
    prow = xpad.shape[1] // wg
    for t in range(t_):
        for c in range(rows // (kh * kw)):
            pad = xpad[c]
            pad[:] = 0.0
            for i in range(kh):
                for j in range(kw):
                    start = i * dh * wg + j * dw
                    src = cols[(c * kh + i) * kw + j, t]
                    dst = pad[start : start + length]
                    for q in range(length):
                        dst[q] += src[q]
            lo, hi = max(0, -pl), min(wd, wg - pl)  # input columns on the grid
            for ih in range(h):
                row = gx[n0 + t, c0 + c, ih]
                rr = ih + pt
                if rr < 0 or rr >= prow or hi <= lo:
                    row[:] = 0.0
                    continue
                row[:lo] = 0.0
                row[lo:hi] = pad[rr * wg + lo + pl : rr * wg + hi + pl]
                row[hi:] = 0.0


# -- direct loops on im2col_wide's grid (few input channels: the GEMM would be memory-bound) -----


@njit(cache=True)
def wide_direct_taps(c_in, kh, kw, sh, sw, dh, dw, span, wg, taps):
    """(taps,) int64: where each tap's run starts in an image's padded planes (C, span), tap
    ``(c*kh + i)*kw + j``; the ones past C*kh*kw (padding to a multiple of 4, zero weights) start at 0."""
    plane = span // (sh * sw)
    offs = np.zeros(taps, dtype=np.int64)
    for c in range(c_in):
        for i in range(kh):
            for j in range(kw):
                offs[(c * kh + i) * kw + j] = c * span + _wide_start(i, j, sh, sw, dh, dw, plane, wg)
    return offs


#: conv2d_wide_direct's blocks: 6 channels of one output row; 6 rows of one channel (at most
#: WIDE_DIRECT_THIN output channels: a's one channel filled 1 of the 6 slots); 6 channels along the
#: whole grid (outputs narrower than a vector).
_CHANNELS, _ROWS, _GRID = 0, 1, 2
WIDE_DIRECT_THIN = 4
#: Elements of zeros after an image's padded planes in conv2d_wide_direct's scratch: a float32
#: vector (a narrow output's last grid block reads up to a vector - 2 elements past the planes).
WIDE_DIRECT_SLACK = 16


@njit(cache=True, inline="always")
def _wide_direct_blocks(y, wg):
    """(kind of block, blocks per image and channel block, blocks along a row, channel blocks) of conv2d_wide_direct."""
    v = _simd.lanes(y)
    c_out, out_h, out_w = y.shape[1], y.shape[2], y.shape[3]
    if out_w < v:
        return _GRID, (out_h * wg + v - 1) // v, 1, (c_out + 5) // 6
    if c_out <= WIDE_DIRECT_THIN:
        return _ROWS, (out_h + 5) // 6, (out_w + v - 1) // v, c_out
    return _CHANNELS, out_h, (out_w + v - 1) // v, (c_out + 5) // 6


@njit(**_PAR)
def conv2d_wide_direct(x, w, b, has_bias, y, xpad, offs, wg, span, chunks, sh, sw, pt, pl, stop):
    """y (N, K, OH, OW) = conv2d(x, w) (+ b), one group, register-blocked over im2col_wide's grid.

    w is (K, T = C*kh*kw); offs holds each tap's start in an image's padded planes (C, span), wg
    wide; xpad (chunks, C*span + WIDE_DIRECT_SLACK) is each iteration's padded image. A block of 6
    slots x a vector (_simd.Vec: 16 float32, 8 float64) of grid positions stays in registers while
    all T taps are added into it, then is stored once. The slots are 6 output channels of one row
    (6 fused multiply-adds per load and 6 broadcasts), or, with at most WIDE_DIRECT_THIN channels, 6
    output rows of one channel (6 per 6 loads and 1 broadcast). Rows at least a vector wide are
    cut into blocks along the row, the last one shifted back to end at OW (the overlap is written
    twice, with the same values), so every store is a whole vector into y; narrower outputs run
    blocks along the whole grid into a scratch block, whose columns < OW are copied to y. Spare
    slots (past K, or past OH) repeat the last channel or row and are not stored. Iteration s of
    the parallel loop runs jobs (image, output row or block, channel or channel block) s*J/chunks
    .. (s+1)*J/chunks and pads an image only when it changes. y and xpad are overwritten.
    """
    _, per_image, _, kb = _wide_direct_blocks(y, wg)
    jobs = x.shape[0] * per_image * kb
    for s in prange(chunks):
        lo, hi = s * jobs // chunks, (s + 1) * jobs // chunks
        _wide_direct_jobs(x, w, b, has_bias, y, xpad[s], offs, wg, span, sh, sw, pt, pl, lo, hi, stop)


@njit(cache=True, inline="always")
def _bias_vectors(like, b, has_bias, r0, r1, r2, r3, r4, r5):
    """Six vectors of b[r_i] each (or zeros), of ``like``'s dtype: a block's starting accumulators."""
    if has_bias:
        s0, s1, s2 = _simd.splat(b[r0]), _simd.splat(b[r1]), _simd.splat(b[r2])
        return s0, s1, s2, _simd.splat(b[r3]), _simd.splat(b[r4]), _simd.splat(b[r5])
    z = _simd.zeros(like)
    return z, z, z, z, z, z


@njit(cache=True, inline="always")
def _fma_slots(x0, w, t, r0, r1, r2, r3, a0, a1, a2, a3):
    """Four slots' accumulators a_i + x0 * w[r_i, t] (one broadcast of a weight each)."""
    a0, a1 = _simd.fma(x0, _simd.splat(w[r0, t]), a0), _simd.fma(x0, _simd.splat(w[r1, t]), a1)
    return a0, a1, _simd.fma(x0, _simd.splat(w[r2, t]), a2), _simd.fma(x0, _simd.splat(w[r3, t]), a3)


@njit(cache=True, inline="always")
def _store_slots(y, o, step, slots, acc):
    """y.flat[o + i*step ...] = slot i's vector of acc, for the first ``slots`` slots."""
    a0, a1, a2, a3, a4, a5 = acc
    _simd.store(y, o, a0)
    if slots > 1:
        _simd.store(y, o + step, a1)
    if slots > 2:
        _simd.store(y, o + 2 * step, a2)
    if slots > 3:
        _simd.store(y, o + 3 * step, a3)
    if slots > 4:
        _simd.store(y, o + 4 * step, a4)
    if slots > 5:
        _simd.store(y, o + 5 * step, a5)


@njit(**_SER)
def _wide_direct_jobs(x, w, b, has_bias, y, pad, offs, wg, span, sh, sw, pt, pl, lo, hi, stop):
    """conv2d_wide_direct's jobs lo .. hi, in a function of their own: compiled outside the parallel
    loop, the vector width and the block's offsets are constants (inside, they were arguments of
    the loop's body and the kernel ran 25-40% slower on g, one thread)."""
    c_in, c_out, out_h, out_w = x.shape[1], y.shape[1], y.shape[2], y.shape[3]
    v = _simd.lanes(y)
    ohw, last = out_h * out_w, c_out - 1
    kind, per_image, per_row, kb = _wide_direct_blocks(y, wg)
    block = np.zeros((6, v), dtype=y.dtype)
    if pad.shape[0] < c_in * span + v:
        raise ValueError("conv2d_wide_direct: the scratch lacks its slack")
    pad[c_in * span :] = 0.0  # the slack a narrow output's last block reads
    prow = span // (sh * sw) // wg
    reach = prow - out_h - 1  # plane rows past a block's output row that its taps read
    padded = -1
    for job in range(lo, hi):
        if _stopped(stop):
            break
        n, u, k = job // (per_image * kb), (job // kb) % per_image, job % kb
        if n != padded:  # the plane rows this call's jobs on image n read (all of them for a narrow output)
            base = n * per_image * kb
            first, end = max(lo, base) - base, min(hi, base + per_image * kb) - base
            rr_lo, rr_hi = 0, prow
            if kind == _CHANNELS:
                rr_lo, rr_hi = first // kb, (end - 1) // kb + reach + 1
            elif kind == _ROWS:
                rr_lo, rr_hi = 6 * (first // kb), min(6 * ((end - 1) // kb) + 6, out_h) + reach
            for c in range(c_in):
                _wide_pad_rows(x, n, c, pad[c * span : (c + 1) * span], 0, sh, sw, pt, pl, wg, rr_lo, rr_hi)
            padded = n
        if kind == _ROWS:  # channel k, output rows 6u .. 6u+5 (the spare ones repeat row OH-1)
            u0 = 6 * u
            g0, g1, g2 = u0 * wg, min(u0 + 1, out_h - 1) * wg, min(u0 + 2, out_h - 1) * wg
            g3, g4, g5 = min(u0 + 3, out_h - 1) * wg, min(u0 + 4, out_h - 1) * wg, min(u0 + 5, out_h - 1) * wg
            for j in range(per_row):
                ow0 = min(j * v, out_w - v)
                p0, p1, p2, p3, p4, p5 = g0 + ow0, g1 + ow0, g2 + ow0, g3 + ow0, g4 + ow0, g5 + ow0
                a0, a1, a2, a3, a4, a5 = _bias_vectors(y, b, has_bias, k, k, k, k, k, k)
                for t in range(w.shape[1]):
                    o, e = offs[t], _simd.splat(w[k, t])
                    a0 = _simd.fma(_simd.load(pad, o + p0), e, a0)
                    a1 = _simd.fma(_simd.load(pad, o + p1), e, a1)
                    a2 = _simd.fma(_simd.load(pad, o + p2), e, a2)
                    a3 = _simd.fma(_simd.load(pad, o + p3), e, a3)
                    a4 = _simd.fma(_simd.load(pad, o + p4), e, a4)
                    a5 = _simd.fma(_simd.load(pad, o + p5), e, a5)
                acc = (a0, a1, a2, a3, a4, a5)
                _store_slots(y, (n * c_out + k) * ohw + u0 * out_w + ow0, out_w, min(6, out_h - u0), acc)
            continue
        # Channels 6k .. 6k+5 (the spare ones repeat channel K-1): one load for the six slots. A last
        # block of at most 4 channels runs 4 slots (c's 16 channels: 16 slot-runs a row, not 18).
        k0 = 6 * k
        r0, r1, r2, r3 = k0, min(k0 + 1, last), min(k0 + 2, last), min(k0 + 3, last)
        r4, r5 = min(k0 + 4, last), min(k0 + 5, last)
        short = c_out - k0 <= 4
        for j in range(per_row):
            ow0 = min(j * v, out_w - v)
            q = u * wg + ow0 if kind == _CHANNELS else u * v
            a0, a1, a2, a3, a4, a5 = _bias_vectors(y, b, has_bias, r0, r1, r2, r3, r4, r5)
            if short:
                for t in range(w.shape[1]):
                    x0 = _simd.load(pad, offs[t] + q)
                    a0, a1, a2, a3 = _fma_slots(x0, w, t, r0, r1, r2, r3, a0, a1, a2, a3)
            else:
                for t in range(w.shape[1]):
                    x0 = _simd.load(pad, offs[t] + q)
                    a0, a1, a2, a3 = _fma_slots(x0, w, t, r0, r1, r2, r3, a0, a1, a2, a3)
                    a4 = _simd.fma(x0, _simd.splat(w[r4, t]), a4)
                    a5 = _simd.fma(x0, _simd.splat(w[r5, t]), a5)
            acc = (a0, a1, a2, a3, a4, a5)
            if kind == _CHANNELS:
                _store_slots(y, (n * c_out + k0) * ohw + u * out_w + ow0, ohw, min(6, c_out - k0), acc)
                continue
            _store_slots(block, 0, v, 6, acc)
            for i in range(v):
                oh, ow = (q + i) // wg, (q + i) % wg
                if oh < out_h and ow < out_w:
                    for r in range(min(6, c_out - k0)):
                        y[n, k0 + r, oh, ow] = block[r, i]


# -- Winograd F(4, 4) along the rows of column-stride-2 convs (7x7 and 8x8 stride 2) ------------
#
# A column-stride-2 conv with 7 or 8 taps a row is, per (input channel, tap row, column phase b),
# a 1-D correlation of 4 taps (b + 2s, s < 4; a 7-tap row's phase 1 has a zero fourth) with that
# phase's columns. F(4, 4) (points 0, 1, -1, 2, -2, 1/2 and infinity) turns a tile of 4 outputs
# into 7 products: 1.75 multiplications an output and phase against 4, so the conv's 147 taps an
# output cost 73.5 (C = 3, kh = 7). Sums over channels, tap rows and phases stay in the
# transformed domain, so the output transform runs once a block. B^T and A^T are integers (the
# 1/45-type factors are G's, applied to the weights in float64); float32 error on g: 1.1e-6 of the
# output's max against 5.4e-7 for the direct sum.


@njit(**_SER)
def winograd_row_weights(w, g_mat, v):
    """v (K, C*kh*2, 7) = G g for every row tap (c, i, column phase b) of w (K, C, kh, kw), g its taps
    b, b + 2, b + 4, b + 6 (0 past kw), summed in float64 (g_mat: G, 7 x 4)."""
    k_, c_in, kh, kw = w.shape
    for k in range(k_):
        for c in range(c_in):
            for i in range(kh):
                for b in range(2):
                    t = (c * kh + i) * 2 + b
                    for xi in range(7):
                        acc = 0.0
                        for s in range(4):
                            if b + 2 * s < kw:
                                acc += g_mat[xi, s] * w[k, c, i, b + 2 * s]
                        v[k, t, xi] = acc


@njit(cache=True, inline="always")
def _winograd_row_inputs(x, n, u, ph, xs, t_, sh, pt, pl, r_lo, r_hi, tc):
    """u[((c*sh + a)*2 + b)*7 + xi][(rho - r_lo)*t_ + tau] = (B^T d)[xi] for plane rows rho in r_lo ..
    r_hi of image n: d the 7 columns 4*tau .. 4*tau + 6 of column phase b of padded input row
    rho*sh + a (its columns 8*tau + 2s + b); rows outside the image give 0. ph (24, t_ + 2) is
    scratch: a row's columns 8t + r in ph[r], and the halves and quarters they are split from."""
    c_in, h = x.shape[1], x.shape[2]
    w8 = t_ + 2
    halves, quarters = ph[16 * w8 : 24 * w8], ph[8 * w8 : 16 * w8]  # columns 2t + r, 4t + r (r-th of each)
    for c in range(c_in):
        for a in range(sh):
            for rho in range(r_lo, r_hi):
                ih = rho * sh + a - pt
                first = (((c * sh + a) * 2) * 7) * xs + (rho - r_lo) * t_
                if ih < 0 or ih >= h:
                    for z in range(14):
                        row = u[first + z * xs : first + z * xs + t_]
                        row[:] = 0.0
                    continue
                halves[:] = 0.0
                _pad_row_phases(x[n, c, ih], halves[: 4 * w8], halves[4 * w8 :], pl, 4 * w8)  # each split vectorises
                for r in range(2):  # half r (columns 2t + r) into quarters r and r + 2 (4t + r, 4t + r + 2)
                    _pad_row_phases(halves[r * 4 * w8 : (r + 1) * 4 * w8], quarters[r * 2 * w8 : (r + 1) * 2 * w8],
                                    quarters[(r + 2) * 2 * w8 : (r + 3) * 2 * w8], 0, 2 * w8)
                for r in range(4):  # quarter r into eighths r and r + 4
                    _pad_row_phases(quarters[r * 2 * w8 : (r + 1) * 2 * w8], ph[r * w8 : (r + 1) * w8],
                                    ph[(r + 4) * w8 : (r + 5) * w8], 0, w8)
                for b in range(2):
                    if t_ >= _simd.lanes(u):
                        _bt_rows(ph, b * w8, w8, u, first + b * 7 * xs, xs, t_, tc)
                        continue
                    p0, p2 = ph[b * w8 : (b + 1) * w8], ph[(b + 2) * w8 : (b + 3) * w8]
                    p4, p6 = ph[(b + 4) * w8 : (b + 5) * w8], ph[(b + 6) * w8 : (b + 7) * w8]
                    o = first + b * 7 * xs
                    for t in range(t_):  # a row narrower than a vector of tiles
                        d0, d1, d2, d3 = p0[t], p2[t], p4[t], p6[t]
                        d4, d5, d6 = p0[t + 1], p2[t + 1], p4[t + 1]
                        u[o + t] = 4.0 * d0 - 8.0 * d1 - 5.0 * d2 + 10.0 * d3 + d4 - 2.0 * d5
                        u[o + xs + t] = -4.0 * d1 + 4.0 * d2 + 9.0 * d3 - d4 - 2.0 * d5
                        u[o + 2 * xs + t] = -4.0 * d1 + 12.0 * d2 - 7.0 * d3 - 3.0 * d4 + 2.0 * d5
                        u[o + 3 * xs + t] = 2.0 * d1 - 3.0 * d2 - 4.0 * d3 + 3.0 * d4 + 2.0 * d5
                        u[o + 4 * xs + t] = 2.0 * d1 - 5.0 * d2 + 5.0 * d4 - 2.0 * d5
                        u[o + 5 * xs + t] = 4.0 * d1 - 5.0 * d3 + d5
                        u[o + 6 * xs + t] = -4.0 * d1 + 8.0 * d2 + 5.0 * d3 - 10.0 * d4 - d5 + 2.0 * d6


@njit(cache=True, inline="always")
def _bt_rows(ph, p, w8, u, o, xs, t_, tc):
    """u[o + xi*xs + tau] = (B^T d)[xi] for the t_ >= lanes tiles of a row, a vector of tiles at a time;
    d_s = ph[p + (s % 4)*2*w8 + s // 4 + tau] (the phase's columns 0, 2, 4, 6 of tile tau, then 0, 2, 4
    of the next). tc holds B^T's entries in u's dtype (4, -8, -5, 10, 1, -2, -4, 9, -1, 12, -7, -3, 2,
    3, 5, 8, -10)."""
    lanes = _simd.lanes(u)
    f, sp = _simd.fma, _simd.splat
    q2, q4, q6 = p + 2 * w8, p + 4 * w8, p + 6 * w8
    for j in range((t_ + lanes - 1) // lanes):
        t = min(j * lanes, t_ - lanes)  # the last vector shifted back: the overlap is written twice alike
        d0, d1, d2, d3 = _simd.load(ph, p + t), _simd.load(ph, q2 + t), _simd.load(ph, q4 + t), _simd.load(ph, q6 + t)
        d4, d5, d6 = _simd.load(ph, p + t + 1), _simd.load(ph, q2 + t + 1), _simd.load(ph, q4 + t + 1)
        z = _simd.zeros(u)
        # 4d0 - 8d1 - 5d2 + 10d3 + d4 - 2d5
        _simd.store(u, o + t, f(d5, sp(tc[5]), f(d4, sp(tc[4]), f(d3, sp(tc[3]), f(d2, sp(tc[2]), f(d1, sp(tc[1]), f(d0, sp(tc[0]), z)))))))
        # -4d1 + 4d2 + 9d3 - d4 - 2d5
        _simd.store(u, o + xs + t, f(d5, sp(tc[5]), f(d4, sp(tc[8]), f(d3, sp(tc[7]), f(d2, sp(tc[0]), f(d1, sp(tc[6]), z))))))
        # -4d1 + 12d2 - 7d3 - 3d4 + 2d5
        _simd.store(u, o + 2 * xs + t, f(d5, sp(tc[12]), f(d4, sp(tc[11]), f(d3, sp(tc[10]), f(d2, sp(tc[9]), f(d1, sp(tc[6]), z))))))
        # 2d1 - 3d2 - 4d3 + 3d4 + 2d5
        _simd.store(u, o + 3 * xs + t, f(d5, sp(tc[12]), f(d4, sp(tc[13]), f(d3, sp(tc[6]), f(d2, sp(tc[11]), f(d1, sp(tc[12]), z))))))
        # 2d1 - 5d2 + 5d4 - 2d5
        _simd.store(u, o + 4 * xs + t, f(d5, sp(tc[5]), f(d4, sp(tc[14]), f(d2, sp(tc[2]), f(d1, sp(tc[12]), z)))))
        # 4d1 - 5d3 + d5
        _simd.store(u, o + 5 * xs + t, f(d5, sp(tc[4]), f(d3, sp(tc[2]), f(d1, sp(tc[0]), z))))
        # -4d1 + 8d2 + 5d3 - 10d4 - d5 + 2d6
        _simd.store(u, o + 6 * xs + t, f(d6, sp(tc[12]), f(d5, sp(tc[8]), f(d4, sp(tc[16]), f(d3, sp(tc[14]), f(d2, sp(tc[15]), f(d1, sp(tc[6]), z)))))))


@njit(cache=True, inline="always")
def _fma4(e, v, t, xi, r0, r1, r2, r3, a, b, c, d):
    """Four channels' accumulators of transformed position xi, plus e times their weight."""
    a, b = _simd.fma(e, _simd.splat(v[r0, t, xi]), a), _simd.fma(e, _simd.splat(v[r1, t, xi]), b)
    return a, b, _simd.fma(e, _simd.splat(v[r2, t, xi]), c), _simd.fma(e, _simd.splat(v[r3, t, xi]), d)


@njit(cache=True, inline="always")
def _position_sums(sums, ch):
    """Channel ch's (of 6) sums of positions 0 .. 6, as by_position stored them."""
    lanes = _simd.lanes(sums)
    ld = _simd.load
    return (ld(sums, ch * lanes), ld(sums, (6 + ch) * lanes), ld(sums, (12 + ch) * lanes), ld(sums, (18 + ch) * lanes),
            ld(sums, (24 + ch) * lanes), ld(sums, (30 + ch) * lanes), ld(sums, (36 + ch) * lanes))  # fmt: skip


@njit(cache=True, inline="always")
def _winograd_row_store(y, o, k, m0, m1, m2, m3, m4, m5, m6, check):
    """y.flat[o ...] = A^T m (k: the constants 1, -1, 2, -2, 4, 8, -8 as vectors), each tile's four
    outputs in order; returns check + those outputs * 0 (NaN once one is not finite)."""
    one, neg, two, ntwo, four, eight, neight = k
    s = _simd.fma(m2, one, m1)
    e = _simd.fma(m2, neg, m1)
    y0 = _simd.fma(m5, eight, _simd.fma(m4, one, _simd.fma(m3, one, _simd.fma(s, one, m0))))
    y1 = _simd.fma(m5, four, _simd.fma(m4, ntwo, _simd.fma(m3, two, e)))
    y2 = _simd.fma(m5, two, _simd.fma(m4, four, _simd.fma(m3, four, s)))
    y3 = _simd.fma(m6, one, _simd.fma(m5, one, _simd.fma(m4, neight, _simd.fma(m3, eight, e))))
    lo02, lo13 = _simd.zip_lo(y0, y2), _simd.zip_lo(y1, y3)
    hi02, hi13 = _simd.zip_hi(y0, y2), _simd.zip_hi(y1, y3)
    lanes = _simd.lanes(y)
    _simd.store(y, o, _simd.zip_lo(lo02, lo13))
    _simd.store(y, o + lanes, _simd.zip_hi(lo02, lo13))
    _simd.store(y, o + 2 * lanes, _simd.zip_lo(hi02, hi13))
    _simd.store(y, o + 3 * lanes, _simd.zip_hi(hi02, hi13))
    zero = _simd.zeros(y)
    return _simd.fma(y3, zero, _simd.fma(y2, zero, _simd.fma(y1, zero, _simd.fma(y0, zero, check))))


@njit(**_PAR)
def conv2d_winograd_row(x, v, b, has_bias, y, scratch, taps, consts, tc, band, urows, prow, sh, pt, pl, reach,
                        by_position, chunks, status, stop):
    """y (N, K, OH, OW) = conv2d(x, w) (+ b), column stride 2, 7 or 8 taps a row, by F(4, 4) along rows.

    v (K, RT, 7) holds the transformed weights of the RT = C*kh*2 row taps (c, i, column phase b),
    taps (RT, 2) each one's first transformed row (of 7) in u and the plane rows it is below the
    output row, consts (1, -1, 2, -2, 4, 8, -8) and tc (B^T's, see _bt_rows) of y's dtype; OW is a
    multiple of 4. A block is 4
    output channels x a vector of tiles (16 float32: 64 outputs) taken along the image's
    flattened tile grid (OH x OW/4, the last block shifted back to end at its end), whose 7
    transformed positions stay in 28 registers over all RT taps: 7 loads and 28 fused
    multiply-adds a tap, from the block's inputs gathered once for all its channel blocks. With
    ``by_position`` (a machine without AVX-512, where a vector is two of 16 registers and 28 would
    spill) a block is 6 output channels, summed one position at a time (6 accumulators, 12 AVX
    registers, over the RT taps) into scratch.
    Iteration s of the parallel loop runs jobs (image, block, channel block) s*J/chunks ..
    (s+1)*J/chunks; the transformed input rows of ``band`` blocks at a time (at most ``urows``
    plane rows: a band's u stays in L2) are made in scratch[s] when the band changes. status[s] is
    NaN when an output of its jobs is not finite (the transforms turn an inf into NaN, and read a
    few columns past the taps: the caller recomputes); y is overwritten.
    """
    lanes = _simd.lanes(y)
    tiles = y.shape[2] * (y.shape[3] // 4)
    cb = 6 if by_position else 4  # output channels a block
    jobs = x.shape[0] * ((tiles + lanes - 1) // lanes) * ((y.shape[1] + cb - 1) // cb)
    for s in prange(chunks):
        lo, hi = s * jobs // chunks, (s + 1) * jobs // chunks
        status[s] = _winograd_row_jobs(x, v, b, has_bias, y, scratch[s], taps, consts, tc, band, urows, prow, sh, pt,
                                       pl, reach, by_position, lo, hi, stop)


@njit(**_SER)
def _winograd_row_jobs(x, v, b, has_bias, y, scratch, taps, consts, tc, band, urows, prow, sh, pt, pl, reach,
                       by_position, lo, hi, stop):
    """conv2d_winograd_row's jobs lo .. hi (compiled outside the parallel loop, as _wide_direct_jobs)."""
    c_in, k_, oh_, ow_ = x.shape[1], y.shape[1], y.shape[2], y.shape[3]
    t_ = ow_ // 4
    lanes = _simd.lanes(y)
    tiles = oh_ * t_
    cb = 6 if by_position else 4  # output channels a block
    kb = (k_ + cb - 1) // cb
    blocks = (tiles + lanes - 1) // lanes
    per_image = blocks * kb
    xs = urows * t_
    size, rt = c_in * sh * 14 * xs, v.shape[1]
    u, ph = scratch[:size], scratch[size : size + 24 * (t_ + 2)]
    # A block's 7*RT vectors of u, gathered once for all its channel blocks: read in place they are
    # unaligned loads from rows far apart, twice L1, and the loop ran at 0.6 FMA a cycle.
    start = size + 24 * (t_ + 2)
    start += (-(np.int64(scratch[start:].ctypes.data) // y.itemsize)) % lanes  # 64-byte aligned
    gathered = scratch[start : start + 7 * rt * lanes]
    sums = scratch[start + 7 * rt * lanes : start + (7 * rt + 42) * lanes]  # by_position's 7 x 6 sums
    gathered_q = -1
    ohw, last = oh_ * ow_, k_ - 1
    k = (_simd.splat(consts[0]), _simd.splat(consts[1]), _simd.splat(consts[2]), _simd.splat(consts[3]),
         _simd.splat(consts[4]), _simd.splat(consts[5]), _simd.splat(consts[6]))  # fmt: skip
    check = _simd.zeros(y)
    made, r_lo = -1, 0
    for job in range(lo, hi):
        if _stopped(stop):
            break
        n, blk, kk = job // per_image, (job // kb) % blocks, job % kb
        if n * blocks + blk // band != made:  # this band's plane rows
            j0 = (blk // band) * band
            j1 = min(j0 + band, blocks) - 1
            r_lo = min(j0 * lanes, tiles - lanes) // t_
            r_hi = min((min(j1 * lanes, tiles - lanes) + lanes - 1) // t_ + reach + 1, prow)
            _winograd_row_inputs(x, n, u, ph, xs, t_, sh, pt, pl, r_lo, r_hi, tc)
            made, gathered_q = n * blocks + blk // band, -1
        q0 = min(blk * lanes, tiles - lanes)
        if q0 != gathered_q:
            for t in range(rt):
                o = taps[t, 0] * xs + taps[t, 1] * t_ + q0 - r_lo * t_
                for xi in range(7):
                    _simd.store(gathered, (7 * t + xi) * lanes, _simd.load(u, o + xi * xs))
            gathered_q = q0
        k0 = cb * kk
        r0, r1, r2, r3 = k0, min(k0 + 1, last), min(k0 + 2, last), min(k0 + 3, last)
        z = _simd.zeros(y)
        if by_position:  # 6 channels, one position at a time, then each channel's 7 sums out (bias at 1)
            r4, r5 = min(k0 + 4, last), min(k0 + 5, last)
            for xi in range(7):
                e0 = e1 = e2 = e3 = e4 = e5 = z
                if has_bias and xi == 1:
                    e0, e1, e2, e3 = _simd.splat(b[r0]), _simd.splat(b[r1]), _simd.splat(b[r2]), _simd.splat(b[r3])
                    e4, e5 = _simd.splat(b[r4]), _simd.splat(b[r5])
                for t in range(rt):
                    e = _simd.load(gathered, (7 * t + xi) * lanes)
                    e0, e1, e2, e3 = _fma4(e, v, t, xi, r0, r1, r2, r3, e0, e1, e2, e3)
                    e4 = _simd.fma(e, _simd.splat(v[r4, t, xi]), e4)
                    e5 = _simd.fma(e, _simd.splat(v[r5, t, xi]), e5)
                o = 6 * xi * lanes
                _simd.store(sums, o, e0)
                _simd.store(sums, o + lanes, e1)
                _simd.store(sums, o + 2 * lanes, e2)
                _simd.store(sums, o + 3 * lanes, e3)
                _simd.store(sums, o + 4 * lanes, e4)
                _simd.store(sums, o + 5 * lanes, e5)
            o = (n * k_ + k0) * ohw + 4 * q0
            for ch in range(min(6, k_ - k0)):
                s0, s1, s2, s3, s4, s5, s6 = _position_sums(sums, ch)
                check = _winograd_row_store(y, o + ch * ohw, k, s0, s1, s2, s3, s4, s5, s6, check)
            continue
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = b0 = b1 = b2 = b3 = b4 = b5 = b6 = z
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = d0 = d1 = d2 = d3 = d4 = d5 = d6 = z
        if has_bias:  # position 1 enters every output with weight 1
            a1, b1, c1, d1 = _simd.splat(b[r0]), _simd.splat(b[r1]), _simd.splat(b[r2]), _simd.splat(b[r3])
        for t in range(rt):
            o = 7 * t * lanes
            a0, b0, c0, d0 = _fma4(_simd.load(gathered, o), v, t, 0, r0, r1, r2, r3, a0, b0, c0, d0)
            a1, b1, c1, d1 = _fma4(_simd.load(gathered, o + lanes), v, t, 1, r0, r1, r2, r3, a1, b1, c1, d1)
            a2, b2, c2, d2 = _fma4(_simd.load(gathered, o + 2 * lanes), v, t, 2, r0, r1, r2, r3, a2, b2, c2, d2)
            a3, b3, c3, d3 = _fma4(_simd.load(gathered, o + 3 * lanes), v, t, 3, r0, r1, r2, r3, a3, b3, c3, d3)
            a4, b4, c4, d4 = _fma4(_simd.load(gathered, o + 4 * lanes), v, t, 4, r0, r1, r2, r3, a4, b4, c4, d4)
            a5, b5, c5, d5 = _fma4(_simd.load(gathered, o + 5 * lanes), v, t, 5, r0, r1, r2, r3, a5, b5, c5, d5)
            a6, b6, c6, d6 = _fma4(_simd.load(gathered, o + 6 * lanes), v, t, 6, r0, r1, r2, r3, a6, b6, c6, d6)
        o = (n * k_ + k0) * ohw + 4 * q0
        check = _winograd_row_store(y, o, k, a0, a1, a2, a3, a4, a5, a6, check)
        if k0 + 1 <= last:
            check = _winograd_row_store(y, o + ohw, k, b0, b1, b2, b3, b4, b5, b6, check)
        if k0 + 2 <= last:
            check = _winograd_row_store(y, o + 2 * ohw, k, c0, c1, c2, c3, c4, c5, c6, check)
        if k0 + 3 <= last:
            check = _winograd_row_store(y, o + 3 * ohw, k, d0, d1, d2, d3, d4, d5, d6, check)
    lane = np.zeros(lanes, dtype=y.dtype)
    _simd.store(lane, 0, check)
    return lane.sum()


@njit(**_PAR)
def conv2d_weight_grad_wide_direct(x, gy, partial, offs, wg, span, sh, sw, pt, pl, stop):
    """partial (chunks, K', T'): chunk s sums images s*N/chunks .. (s+1)*N/chunks of the weight gradient.

    Laid out like conv2d_wide_direct's wq (zero past K and C*kh*kw); the caller sums the chunks.
    gy is copied onto the grid with its overhang columns zero, and each pass takes 8 dot
    products (2 channels x 4 taps) over the whole grid. The overhang multiplies padded-input values
    of neighbouring rows by 0: a non-finite input there makes a NaN the direct sum would not
    have, so the caller checks the result. partial is overwritten.
    """
    n_, c_in = x.shape[0], x.shape[1]
    chunks, kq, tq = partial.shape
    c_out, out_h, out_w = gy.shape[1], gy.shape[2], gy.shape[3]
    length = out_h * wg
    for s in prange(chunks):
        part = partial[s]
        part[:, :] = 0.0
        pad = np.empty((c_in, span), dtype=x.dtype)
        flat = pad.reshape(-1)
        grid = np.zeros((kq, length), dtype=x.dtype)
        for n in range(s * n_ // chunks, (s + 1) * n_ // chunks):
            if _stopped(stop):
                break
            for c in range(c_in):
                _wide_pad(x, n, c, pad[c], 0, sh, sw, pt, pl, wg)
            for k in range(c_out):
                for oh in range(out_h):
                    dst, src = grid[k, oh * wg : oh * wg + out_w], gy[n, k, oh]
                    for q in range(out_w):
                        dst[q] = src[q]
            for k in range(0, kq, 2):
                g0, g1 = grid[k], grid[k + 1]
                for t in range(0, tq, 4):
                    s0 = flat[offs[t] : offs[t] + length]
                    s1 = flat[offs[t + 1] : offs[t + 1] + length]
                    s2 = flat[offs[t + 2] : offs[t + 2] + length]
                    s3 = flat[offs[t + 3] : offs[t + 3] + length]
                    # Start from part's entries, not 0.0 (a float64 literal would make float32 sums float64).
                    a0, a1, a2, a3 = part[k, t], part[k, t + 1], part[k, t + 2], part[k, t + 3]
                    if k + 1 == c_out:  # an odd channel count's last one alone: its pair is the zero row
                        for q in range(length):
                            e = g0[q]
                            a0 += e * s0[q]
                            a1 += e * s1[q]
                            a2 += e * s2[q]
                            a3 += e * s3[q]
                        part[k, t], part[k, t + 1], part[k, t + 2], part[k, t + 3] = a0, a1, a2, a3
                        continue
                    b0, b1, b2, b3 = part[k + 1, t], part[k + 1, t + 1], part[k + 1, t + 2], part[k + 1, t + 3]
                    for q in range(length):
                        e0, e1, e2, e3 = s0[q], s1[q], s2[q], s3[q]
                        a0 += g0[q] * e0
                        a1 += g0[q] * e1
                        a2 += g0[q] * e2
                        a3 += g0[q] * e3
                        b0 += g1[q] * e0
                        b1 += g1[q] * e1
                        b2 += g1[q] * e2
                        b3 += g1[q] * e3
                    part[k, t], part[k, t + 1], part[k, t + 2], part[k, t + 3] = a0, a1, a2, a3
                    part[k + 1, t], part[k + 1, t + 1], part[k + 1, t + 2], part[k + 1, t + 3] = b0, b1, b2, b3


# -- matmul batches -------------------------------------------------------------------------------


@njit(**_PAR)
def gemm_batch(fn, parts, chunks, count, ta, tb, m, n, k, a, a_step, a_part, lda, b, b_step, ldb, c, c_step, c_part,
               ldc, accumulate, beta, bias, has_bias, stop):
    """Row-major ``C[i] = op(A[i]) @ op(B[i]) + beta * C[i]`` (+ ``bias[r]`` on row r) for i < count by
    BLAS gemm at address ``fn``. The batch runs as ``chunks`` contiguous runs of matrices, and the m
    rows of each matrix as ``parts`` blocks of ``ceil(m / parts)`` rows: one task per (run, block).
    Matrix i, block q starts ``i * x_step + q * x_part`` elements into x (b takes no part offset).
    ``accumulate``: run j sums its matrices into ``C[j]`` (beta applies to the first; chunks <= count,
    or some C[j] is left unwritten). No two tasks write the same element."""
    size = c.itemsize
    # Signed addresses: numba types uint64 + int64 as float64.
    pa, pb, pc = np.int64(a.ctypes.data), np.int64(b.ctypes.data), np.int64(c.ctypes.data)
    rows = (m + parts - 1) // parts
    for task in prange(parts * chunks):
        q, j = np.int64(task) % parts, np.int64(task) // parts
        mq = min(rows, m - q * rows)
        for i in range(j * count // chunks, (j + 1) * count // chunks):
            if mq <= 0 or _stopped(stop):
                break
            scale = 1.0 if accumulate and i > j * count // chunks else beta
            start = (j if accumulate else i) * c_step + q * c_part
            _cblas.gemm(fn, c, ta, tb, mq, n, k, pa + (i * a_step + q * a_part) * size, lda,
                        pb + i * b_step * size, ldb, scale, pc + start * size, ldc)
            if has_bias and not accumulate:  # while the block is still in cache
                for r in range(mq):
                    v = bias[q * rows + r]
                    row = start + r * ldc
                    for col in range(n):
                        c[row + col] += v


def _serial_twin(kernel):
    """``kernel`` compiled without ``parallel=True`` (its prange runs as a range), under its own name and
    cache file: a tiny op calls it on its own thread instead of launching the parallel region on one
    thread (3.4 -> 1.4 us a call, and no numba.set_num_threads toggle, 4 us, around it)."""
    fn = kernel.py_func
    twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    return njit(**_SER)(twin)


conv2d_wide_direct_serial = _serial_twin(conv2d_wide_direct)
conv2d_weight_grad_wide_direct_serial = _serial_twin(conv2d_weight_grad_wide_direct)
gemm_batch_serial = _serial_twin(gemm_batch)  # for matmuls inside a worker pool's task
