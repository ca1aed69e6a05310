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


# -- im2col / col2im for the BLAS path (serial: each worker thread runs its own tile) -----------


@njit(**_SER)
def im2col(x, cols, n0, c0, r0, kh, kw, sh, sw, pt, pl, dh, dw, out_w):
    """cols (C'*kh*kw, T, R*OW) = windows of images n0..n0+T, channels c0..c0+C', output rows r0..r0+R.

    Row ``(c*kh + i)*kw + j`` holds tap (i, j) of channel c0 + c; out-of-bounds taps (padding)
    are zero. cols is overwritten.
    """
    rows, t_, cols_len = cols.shape
    h, wd = x.shape[2], x.shape[3]
    n_rows = cols_len // out_w
    for c in range(rows // (kh * kw)):
        for i in range(kh):
            for j in range(kw):
                off = j * dw - pl
                lo, hi = _col_range(off, sw, wd, out_w)
                if hi <= lo:
                    lo = hi = 0
                first, last = lo * sw + off, (hi - 1) * sw + off + 1  # input columns read
                for t in range(t_):
                    dst = cols[(c * kh + i) * kw + j, t]
                    xplane = x[n0 + t, c0 + c]
                    for r in range(n_rows):
                        base = r * out_w
                        ih = (r0 + r) * sh - pt + i * dh
                        if ih < 0 or ih >= h:
                            dst[base : base + out_w] = 0.0
                            continue
                        # Slice copies compile to memcpy-like loops, 3x faster than indexed ones here.
                        dst[base : base + lo] = 0.0
                        if hi > lo:
                            dst[base + lo : base + hi] = xplane[ih, first:last:sw]
                        dst[base + hi : base + out_w] = 0.0


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
                        base = r * out_w
                        plane[ih, first:last:sw] += src[base + lo : base + hi]


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


# -- stride-1 direct convs on the padded-width grid ("direct-wide") -----------------------------
#
# With stride 1, output (oh, ow) of tap (i, j) reads padded input (oh + i*dh, ow + j*dw): on the padded
# input laid out wp = OW + dw*(kw-1) wide, a tap's reads for a whole block of output rows are ONE
# contiguous run, starting at i*dh*wp + j*dw, (rows-1)*wp + OW long. Each tap is then one long
# vectorised axpy (forward) or dot product (weight gradient), taps four at a time, with no im2col
# copy; grid columns >= OW mix neighbouring rows and are dropped. For b (3,3,28,28)x(4,3,3,3) this is
# 27 runs of 726 per output channel and image instead of 702 runs of 26 (direct) or an im2col copy
# plus axpys (small): float64 forward 83 (small) or 137 (direct) -> 29-44 us on one thread, measured.

#: Elements of a run processed at a time: the accumulator's slice stays in L1 across the taps.
_RUN_BLOCK = 1024


@njit(**_SER)
def _effective_weights(w, groups, flip):
    """The forward weights as (K, C/groups*kh*kw); with ``flip``, those of the stride-1 input gradient.

    The input gradient is a conv of gy with w'[c, k, i, j] = w[k, c, kh-1-i, kw-1-j], group by group
    (see numba_backend._adjoint_as_forward): gathered here, so a call needs no flipped copy of w.
    """
    a, b_, kh, kw = w.shape
    if not flip:
        return w.reshape(a, b_ * kh * kw)
    kg = a // groups
    we = np.empty((groups * b_, kg * kh * kw), dtype=w.dtype)
    for k in range(groups * b_):
        grp = k // b_
        for c in range(kg):
            for i in range(kh):
                for j in range(kw):
                    we[k, (c * kh + i) * kw + j] = w[grp * kg + c, k - grp * b_, kh - 1 - i, kw - 1 - j]
    return we


@njit(**_SER)
def _grid_runs(x, n, c0, cg, r0, nr, kh, kw, pt, pl, dh, dw, wp):
    """(flat padded input, start of each tap's run) for output rows r0..r0+nr of image n, channels c0..c0+cg.

    Unpadded inputs are read in place (each plane is already wp wide); otherwise the rows the block
    reads are copied with their padding (zero outside the image; negative padding crops).
    """
    h, wd = x.shape[2], x.shape[3]
    prow = nr + dh * (kh - 1)
    if pt == 0 and pl == 0 and wp == wd and r0 + prow <= h:
        p = x[n].reshape(x.shape[1] * h * wd)
        base, plane = (c0 * h + r0) * wd, h * wd
    else:
        planes = np.zeros((cg, prow * wp), dtype=x.dtype)
        u_lo, u_hi = max(0, pl), min(wp, wd + pl)  # grid columns inside the image
        for c in range(cg):
            for r in range(prow):
                ih = r0 - pt + r
                if 0 <= ih < h and u_lo < u_hi:
                    planes[c, r * wp + u_lo : r * wp + u_hi] = x[n, c0 + c, ih, u_lo - pl : u_hi - pl]
        p = planes.reshape(cg * prow * wp)
        base, plane = 0, prow * wp
    starts = np.empty(cg * kh * kw, dtype=np.int64)
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                starts[(c * kh + i) * kw + j] = base + c * plane + i * dh * wp + j * dw
    return p, starts


@njit(**_SER)
def _block_runs(x, job, groups, out_h, out_w, kh, kw, pt, pl, dh, dw, rows):
    """Job ``job``'s block: (image, group, first row, rows, grid width, run length, padded input, run starts).

    Jobs count row blocks of ``rows`` output rows fastest, then groups, then images.
    """
    blocks = -(-out_h // rows)
    grp = (job // blocks) % groups
    n = job // (blocks * groups)
    r0 = (job % blocks) * rows
    nr = min(rows, out_h - r0)
    wp = out_w + dw * (kw - 1)
    cg = x.shape[1] // groups
    p, starts = _grid_runs(x, n, grp * cg, cg, r0, nr, kh, kw, pt, pl, dh, dw, wp)
    return n, grp, r0, nr, wp, (nr - 1) * wp + out_w, p, starts


@njit(**_SER)
def _direct_wide_job(x, we, b, has_bias, y, job, groups, kh, kw, pt, pl, dh, dw, rows, stop):
    """Output rows of block ``job`` of one (image, group), every output channel of the group."""
    out_w = y.shape[3]
    kg = y.shape[1] // groups
    n, grp, r0, nr, wp, length, p, starts = _block_runs(x, job, groups, y.shape[2], out_w, kh, kw, pt, pl, dh, dw, rows)
    taps = starts.shape[0]
    quads = taps - taps % 4
    acc = np.empty(length, dtype=y.dtype)
    for k in range(grp * kg, (grp + 1) * kg):
        if _stopped(stop):
            return
        acc[:] = b[k] if has_bias else 0.0
        wk = we[k]
        for q0 in range(0, length, _RUN_BLOCK):
            q1 = min(length, q0 + _RUN_BLOCK)
            a = acc[q0:q1]
            for t in range(0, quads, 4):
                w0, w1, w2, w3 = wk[t], wk[t + 1], wk[t + 2], wk[t + 3]
                s0 = p[starts[t] + q0 : starts[t] + q1]
                s1 = p[starts[t + 1] + q0 : starts[t + 1] + q1]
                s2 = p[starts[t + 2] + q0 : starts[t + 2] + q1]
                s3 = p[starts[t + 3] + q0 : starts[t + 3] + q1]
                for q in range(q1 - q0):
                    a[q] += w0 * s0[q] + w1 * s1[q] + w2 * s2[q] + w3 * s3[q]
            for t in range(quads, taps):
                wv = wk[t]
                s0 = p[starts[t] + q0 : starts[t] + q1]
                for q in range(q1 - q0):
                    a[q] += wv * s0[q]
        for r in range(nr):
            y[n, k, r0 + r, :] = acc[r * wp : r * wp + out_w]


@njit(**_PAR)
def conv2d_direct_wide(x, w, b, has_bias, flip, y, groups, pt, pl, dh, dw, rows, stop):
    """y (N, K, OH, OW) = stride-1 conv2d(x, w) (+ b), or with ``flip`` the input gradient (x is then gy,
    w the forward weight, y gx, pt/pl the adjoint's padding); one block of ``rows`` output rows of one
    (image, group) per iteration. y is overwritten."""
    we = _effective_weights(w, groups, flip)
    jobs = x.shape[0] * groups * -(-y.shape[2] // rows)
    for job in prange(jobs):
        if not _stopped(stop):
            _direct_wide_job(x, we, b, has_bias, y, job, groups, w.shape[2], w.shape[3], pt, pl, dh, dw, rows, stop)


@njit(**_SER)
def _weight_grad_wide_job(x, gy, part, job, groups, pt, pl, dh, dw, rows):
    """part (K, C/groups, kh, kw) += one block of output rows of one (image, group)'s weight gradient."""
    c_out, _, kh, kw = part.shape
    out_w = gy.shape[3]
    kg = c_out // groups
    n, grp, r0, nr, wp, length, p, starts = _block_runs(x, job, groups, gy.shape[2], out_w, kh, kw, pt, pl, dh, dw, rows)
    taps = starts.shape[0]
    quads = taps - taps % 4
    grid = np.zeros(length, dtype=gy.dtype)  # gy on the grid; its overhang columns stay 0
    zero = np.zeros(1, dtype=gy.dtype)[0]  # sums in gy's dtype: float32 ones vectorise twice as wide
    for k in range(grp * kg, (grp + 1) * kg):
        for r in range(nr):
            grid[r * wp : r * wp + out_w] = gy[n, k, r0 + r, :]
        pk = part[k].reshape(taps)
        for q0 in range(0, length, _RUN_BLOCK):
            q1 = min(length, q0 + _RUN_BLOCK)
            g = grid[q0:q1]
            for t in range(0, quads, 4):
                s0 = p[starts[t] + q0 : starts[t] + q1]
                s1 = p[starts[t + 1] + q0 : starts[t + 1] + q1]
                s2 = p[starts[t + 2] + q0 : starts[t + 2] + q1]
                s3 = p[starts[t + 3] + q0 : starts[t + 3] + q1]
                d0 = d1 = d2 = d3 = zero
                for q in range(q1 - q0):
                    gv = g[q]
                    d0 += gv * s0[q]
                    d1 += gv * s1[q]
                    d2 += gv * s2[q]
                    d3 += gv * s3[q]
                pk[t] += d0
                pk[t + 1] += d1
                pk[t + 2] += d2
                pk[t + 3] += d3
            for t in range(quads, taps):
                s0 = p[starts[t] + q0 : starts[t] + q1]
                d0 = zero
                for q in range(q1 - q0):
                    d0 += g[q] * s0[q]
                pk[t] += d0


@njit(**_PAR)
def conv2d_weight_grad_direct_wide(x, gy, partial, groups, pt, pl, dh, dw, rows, stop):
    """partial (chunks, K, C/groups, kh, kw): chunk s sums the stride-1 weight gradient of the row blocks
    s, s+chunks, ... of every (image, group); overwritten. Returns whether every sum came out finite.

    The grid's overhang columns multiply gy's zeros there with input values no tap of a valid output
    reads: exact for finite inputs, but a NaN or inf there spreads into the sum, so the caller
    recomputes a non-finite result with an exact kernel.
    """
    chunks = partial.shape[0]
    jobs = x.shape[0] * groups * -(-gy.shape[2] // rows)
    for s in prange(chunks):
        part = partial[s]
        part[:] = 0.0
        for job in range(s, jobs, chunks):
            if _stopped(stop):
                break
            _weight_grad_wide_job(x, gy, part, job, groups, pt, pl, dh, dw, rows)
    return np.isfinite(partial).all()


def _serial_twin(kernel):
    """``kernel`` compiled without ``parallel=True`` (its prange runs as a range), under its own name and
    cache file: a tiny op calls it on its own thread instead of launching the parallel region on one
    thread (3.4 -> 1.4 us a call, and no numba.set_num_threads toggle, 4 us, around it)."""
    fn = kernel.py_func
    twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    return njit(**_SER)(twin)


conv2d_direct_wide_serial = _serial_twin(conv2d_direct_wide)
conv2d_weight_grad_direct_wide_serial = _serial_twin(conv2d_weight_grad_direct_wide)


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


# -- stride-1 im2col on a padded-width grid (long contiguous copies instead of one per output row) --


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
    rows, t_, length = cols.shape
    h, wd = x.shape[2], x.shape[3]
    plane = xpad.shape[1] // (sh * sw)
    prow = plane // wg
    for t in range(t_):
        for c in range(rows // (kh * kw)):
            pad = xpad[c]
            pad[:] = 0.0
            for a in range(sh):
                for b in range(sw):
                    base = (a * sw + b) * plane
                    u_lo = max(0, -((b - pl) // sw))  # grid columns whose input column is in [0, wd)
                    u_hi = min(wg, (wd - 1 + pl - b) // sw + 1) if wd - 1 + pl - b >= 0 else 0
                    if u_hi <= u_lo:
                        continue
                    for rr in range(prow):
                        ih = r0 * sh - pt + rr * sh + a
                        if ih < 0 or ih >= h:
                            continue
                        dst_row = pad[base + rr * wg : base + (rr + 1) * wg]
                        src_row = x[n0 + t, c0 + c, ih]
                        if sw == 1:
                            dst_row[u_lo:u_hi] = src_row[u_lo + b - pl : u_hi + b - pl]
                        else:
                            for u in range(u_lo, u_hi):
                                dst_row[u] = src_row[u * sw + b - pl]
            for i in range(kh):
                for j in range(kw):
                    start = (((i * dh) % sh) * sw + (j * dw) % sw) * plane + ((i * dh) // sh) * wg + (j * dw) // sw
                    dst = cols[(c * kh + i) * kw + j, t]
                    dst[:] = pad[start : start + length]
                    if clean:
                        for r in range(length // wg):
                            dst[r * wg + out_w : (r + 1) * wg] = 0.0


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
