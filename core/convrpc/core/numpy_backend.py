"""The reference backend: every kernel in vectorised NumPy (strided windows and einsum), no pixel loops.

It favours clarity over speed and is the yardstick the fast backends are tested against. Window
views come from ``as_strided`` over the padded input: axis layout (N, C, OH, OW, kh, kw), with
output steps of ``stride`` and tap steps of ``dilation``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .params import ConvGeometry, PoolGeometry
from .placing import placed_empty

xp = np


def to_device(a):
    return np.asarray(a, order="C")  # not ascontiguousarray, which turns a 0-d array into shape (1,)


def to_host(a):
    return a


def _pad(x, top, bottom, left, right, value=0.0):
    if top == bottom == left == right == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def _windows(xpad, out_h, out_w, kh, kw, sh, sw, dh, dw):
    """Read-only view (N, C, out_h, out_w, kh, kw) of the windows over a padded input."""
    n, c = xpad.shape[:2]
    s_n, s_c, s_h, s_w = xpad.strides
    return as_strided(
        xpad,
        shape=(n, c, out_h, out_w, kh, kw),
        strides=(s_n, s_c, s_h * sh, s_w * sw, s_h * dh, s_w * dw),
        writeable=False,
    )


def _conv_windows(x, g: ConvGeometry):
    """Windows of the padded conv input split by group: (N, G, C/G, OH, OW, kh, kw)."""
    xpad = _pad(x, g.pad_top, g.pad_bottom, g.pad_left, g.pad_right)
    win = _windows(xpad, g.out_h, g.out_w, g.kh, g.kw, g.stride_h, g.stride_w, g.dil_h, g.dil_w)
    return win.reshape(g.n, g.groups, g.c_in // g.groups, g.out_h, g.out_w, g.kh, g.kw)


def _scatter_taps(cols, g: ConvGeometry, dtype):
    """Sum per-tap contributions cols (N, C, kh, kw, OH, OW) back onto the unpadded input grid."""
    hp, wp = g.h + g.pad_top + g.pad_bottom, g.w + g.pad_left + g.pad_right
    gxpad = np.zeros((g.n, g.c_in, hp, wp), dtype=dtype)
    h_span = g.stride_h * (g.out_h - 1) + 1
    w_span = g.stride_w * (g.out_w - 1) + 1
    for i in range(g.kh):
        for j in range(g.kw):
            r, c = i * g.dil_h, j * g.dil_w
            gxpad[:, :, r : r + h_span : g.stride_h, c : c + w_span : g.stride_w] += cols[:, :, i, j]
    return gxpad[:, :, g.pad_top : g.pad_top + g.h, g.pad_left : g.pad_left + g.w]


def conv2d(x, w, b, g: ConvGeometry):
    win = _conv_windows(x, g)
    wg = w.reshape(g.groups, g.c_out // g.groups, g.c_in // g.groups, g.kh, g.kw)
    y = np.einsum("ngchwij,gkcij->ngkhw", win, wg, optimize=True).reshape(g.output_shape)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(y)


def conv2d_weight_grad(x, gy, g: ConvGeometry):
    win = _conv_windows(x, g)
    gyg = gy.reshape(g.n, g.groups, g.c_out // g.groups, g.out_h, g.out_w)
    gw = np.einsum("ngchwij,ngkhw->gkcij", win, gyg, optimize=True)
    return np.ascontiguousarray(gw.reshape(g.weight_shape))


def conv2d_input_grad(gy, w, g: ConvGeometry):
    gyg = gy.reshape(g.n, g.groups, g.c_out // g.groups, g.out_h, g.out_w)
    wg = w.reshape(g.groups, g.c_out // g.groups, g.c_in // g.groups, g.kh, g.kw)
    cols = np.einsum("ngkhw,gkcij->ngcijhw", gyg, wg, optimize=True)
    cols = cols.reshape(g.n, g.c_in, g.kh, g.kw, g.out_h, g.out_w)
    return np.ascontiguousarray(_scatter_taps(cols, g, gy.dtype))


def _pool_windows(x, g: PoolGeometry, pad_value):
    xpad = _pad(x, g.pad_h, g.pad_bottom, g.pad_w, g.pad_right, pad_value)
    return _windows(xpad, g.out_h, g.out_w, g.kh, g.kw, g.stride_h, g.stride_w, g.dil_h, g.dil_w)


def _pool_geometry_as_conv(g: PoolGeometry) -> ConvGeometry:
    """A depthwise conv geometry with the pooling's windows, for scattering gradients back."""
    return ConvGeometry(
        g.n, g.c, g.h, g.w, g.c, g.kh, g.kw, g.c, g.stride_h, g.stride_w,
        g.pad_h, g.pad_bottom, g.pad_w, g.pad_right, g.dil_h, g.dil_w, g.out_h, g.out_w,
    )  # fmt: skip


def _tap_positions(out, stride, pad, k, dil):
    """(out, k) input coordinate of every tap of every window along one axis."""
    return (np.arange(out) * stride - pad)[:, None] + np.arange(k)[None, :] * dil


def _max_taps(x, g: PoolGeometry):
    """Per window, the flat tap index torch's max pooling picks, the flat windows, and whether it has an in-image tap.

    torch scans a window's in-image taps row-major from the first, and a strictly greater value or a
    NaN takes over: ties go to the first maximum, NaNs to the last NaN, and a window of -inf values to
    its first in-image tap.
    """
    k = g.kh * g.kw
    flat = _pool_windows(x, g, -np.inf).reshape(g.n, g.c, g.out_h, g.out_w, k)
    inside = np.ones((1, 1, g.h, g.w), dtype=bool)
    inside = _pool_windows(inside, g, False).reshape(1, 1, g.out_h, g.out_w, k)
    nan = np.isnan(flat)
    last_nan = k - 1 - np.argmax(nan[..., ::-1], axis=-1)
    best = np.max(flat, axis=-1, keepdims=True)  # NaN windows are settled by last_nan
    first_max = np.argmax(inside & (flat == best), axis=-1)
    return np.where(nan.any(axis=-1), last_nan, first_max), flat, inside.any(axis=-1)


def max_pool2d(x, g: PoolGeometry):
    idx, flat, nonempty = _max_taps(x, g)
    # Read the value at the chosen tap, so forward and backward agree on the element exactly.
    y = np.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
    rows = _tap_positions(g.out_h, g.stride_h, g.pad_h, g.kh, g.dil_h)  # (OH, kh)
    cols = _tap_positions(g.out_w, g.stride_w, g.pad_w, g.kw, g.dil_w)  # (OW, kw)
    positions = (rows[:, None, :, None] * g.w + cols[None, :, None, :]).reshape(g.out_h, g.out_w, -1)
    picked = np.take_along_axis(np.broadcast_to(positions, flat.shape), idx[..., None], axis=-1)[..., 0]
    # A window over padding alone reports torch's starting point: its first tap at or after row/column 0.
    first_row = rows[np.arange(g.out_h), np.argmax(rows >= 0, axis=1)]
    first_col = cols[np.arange(g.out_w), np.argmax(cols >= 0, axis=1)]
    empty = first_row[:, None] * g.w + first_col[None, :]
    indices = np.where(nonempty[0, 0], picked, empty).astype(np.int64)
    return np.ascontiguousarray(y), np.ascontiguousarray(indices)


def max_pool2d_backward(gy, x, g: PoolGeometry):
    idx, _, nonempty = _max_taps(x, g)
    taps = np.arange(g.kh * g.kw)
    # One-hot over taps: (N, C, OH, OW, kh*kw) -> (N, C, kh, kw, OH, OW) contributions.
    onehot = np.where((idx[..., None] == taps) & nonempty[..., None], gy[..., None], gy.dtype.type(0))
    cols = np.moveaxis(onehot.reshape(g.n, g.c, g.out_h, g.out_w, g.kh, g.kw), (4, 5), (2, 3))
    return np.ascontiguousarray(_scatter_taps(cols, _pool_geometry_as_conv(g), gy.dtype))


def avg_pool2d(x, g: PoolGeometry):
    win = _pool_windows(x, g, 0.0)
    return np.ascontiguousarray(win.sum(axis=(4, 5)) / g.divisors(np).astype(x.dtype))


def avg_pool2d_backward(gy, g: PoolGeometry):
    share = gy / g.divisors(np).astype(gy.dtype)
    cols = np.broadcast_to(share[:, :, None, None], (g.n, g.c, g.kh, g.kw, g.out_h, g.out_w))
    return np.ascontiguousarray(_scatter_taps(cols, _pool_geometry_as_conv(g), gy.dtype))


def relu(x):
    return np.maximum(x, x.dtype.type(0), out=placed_empty(x.shape, x.dtype))


def relu_backward(gy, x):
    # torch's rule is "0 where the result <= 0": a NaN input (NaN result) passes grad_output through.
    return np.where(x <= 0, gy.dtype.type(0), gy)
