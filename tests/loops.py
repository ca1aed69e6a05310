"""Plain-loop reference of every op and its gradients, written from the definitions, for tests only.

Each function visits every (output pixel, kernel tap) pair one at a time and computes in float64,
so it shares nothing with the backends' vectorised kernels. Padding is explicit:
``pads = (top, bottom, left, right)`` for conv2d and ``(pad_h, pad_w)`` elsewhere. Keep inputs tiny.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np


def _f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


# -- conv2d ------------------------------------------------------------------------------------
#
# y[n, o, p, q] = b[o] + sum_{c, i, j} x[n, g*C/G + c, p*sh - top + i*dh, q*sw - left + j*dw] * w[o, c, i, j]
# with g = o // (K/G) the group of output channel o, and x read as zero outside the image.


def conv2d_out_size(size, pad_before, pad_after, k, stride, dilation):
    return (size + pad_before + pad_after - dilation * (k - 1) - 1) // stride + 1


def _conv2d_taps(x_shape, w_shape, stride, pads, dilation, groups):
    """Yield (n, o, p, q, ci, c, i, j, r, s): output pixel, input channel, kernel tap and input pixel."""
    n_, _, h, w = x_shape
    k_out, c_per_group, kh, kw = w_shape
    (sh, sw), (dh, dw) = stride, dilation
    top, bottom, left, right = pads
    out_h = conv2d_out_size(h, top, bottom, kh, sh, dh)
    out_w = conv2d_out_size(w, left, right, kw, sw, dw)
    k_per_group = k_out // groups
    for n, o, p, q in product(range(n_), range(k_out), range(out_h), range(out_w)):
        g = o // k_per_group
        for c, i, j in product(range(c_per_group), range(kh), range(kw)):
            r, s = p * sh - top + i * dh, q * sw - left + j * dw
            if 0 <= r < h and 0 <= s < w:
                yield n, o, p, q, g * c_per_group + c, c, i, j, r, s


def conv2d_output_shape(x_shape, w_shape, stride, pads, dilation):
    top, bottom, left, right = pads
    return (
        x_shape[0],
        w_shape[0],
        conv2d_out_size(x_shape[2], top, bottom, w_shape[2], stride[0], dilation[0]),
        conv2d_out_size(x_shape[3], left, right, w_shape[3], stride[1], dilation[1]),
    )


def conv2d(x, w, b=None, stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    x, w, b = _f64(x, w, b)
    y = np.zeros(conv2d_output_shape(x.shape, w.shape, stride, pads, dilation))
    for n, o, p, q, ci, c, i, j, r, s in _conv2d_taps(x.shape, w.shape, stride, pads, dilation, groups):
        y[n, o, p, q] += x[n, ci, r, s] * w[o, c, i, j]
    if b is not None:
        for o in range(y.shape[1]):
            y[:, o] += b[o]
    return y


def conv2d_backward(gy, x, w, with_bias=False, stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """(grad input, grad weight, grad bias or None): each product x*w in y sends gy to its two factors."""
    gy, x, w = _f64(gy, x, w)
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for n, o, p, q, ci, c, i, j, r, s in _conv2d_taps(x.shape, w.shape, stride, pads, dilation, groups):
        gx[n, ci, r, s] += gy[n, o, p, q] * w[o, c, i, j]
        gw[o, c, i, j] += gy[n, o, p, q] * x[n, ci, r, s]
    return gx, gw, _bias_grad(gy) if with_bias else None


def _bias_grad(gy):
    gb = np.zeros(gy.shape[1])
    for n, o, p, q in np.ndindex(*gy.shape):
        gb[o] += gy[n, o, p, q]
    return gb


# -- conv_transpose2d --------------------------------------------------------------------------
#
# Every input pixel x[n, c, r, s] stamps a copy of its kernel slice w[c, k, :, :], scaled by the
# pixel, onto the output at rows r*sh - ph + i*dh and columns s*sw - pw + j*dw (output channel
# g*K/G + k, g the group of c); stamps falling outside the (cropped) output are dropped.


def conv_transpose2d_output_shape(x_shape, w_shape, stride, padding, output_padding, dilation, groups):
    n, _, h, w = x_shape
    _, k_per_group, kh, kw = w_shape
    out_h = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + output_padding[0] + 1
    out_w = (w - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + output_padding[1] + 1
    return (n, k_per_group * groups, out_h, out_w)


def _conv_transpose2d_stamps(x_shape, w_shape, stride, padding, output_padding, dilation, groups):
    """Yield (n, c, r, s, k, o, i, j, p, q): input pixel, kernel slice and tap, output pixel."""
    n_, c_in, h, w = x_shape
    _, k_per_group, kh, kw = w_shape
    geometry = (stride, padding, output_padding, dilation, groups)
    _, _, out_h, out_w = conv_transpose2d_output_shape(x_shape, w_shape, *geometry)
    c_per_group = c_in // groups
    for n, c, r, s in product(range(n_), range(c_in), range(h), range(w)):
        g = c // c_per_group
        for k, i, j in product(range(k_per_group), range(kh), range(kw)):
            p = r * stride[0] - padding[0] + i * dilation[0]
            q = s * stride[1] - padding[1] + j * dilation[1]
            if 0 <= p < out_h and 0 <= q < out_w:
                yield n, c, r, s, k, g * k_per_group + k, i, j, p, q


def conv_transpose2d(x, w, b=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1, dilation=(1, 1)):
    x, w, b = _f64(x, w, b)
    geometry = (stride, padding, output_padding, dilation, groups)
    y = np.zeros(conv_transpose2d_output_shape(x.shape, w.shape, *geometry))
    for n, c, r, s, k, o, i, j, p, q in _conv_transpose2d_stamps(x.shape, w.shape, *geometry):
        y[n, o, p, q] += x[n, c, r, s] * w[c, k, i, j]
    if b is not None:
        for o in range(y.shape[1]):
            y[:, o] += b[o]
    return y


def conv_transpose2d_backward(
    gy, x, w, with_bias=False, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1, dilation=(1, 1)
):
    gy, x, w = _f64(gy, x, w)
    geometry = (stride, padding, output_padding, dilation, groups)
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for n, c, r, s, k, o, i, j, p, q in _conv_transpose2d_stamps(x.shape, w.shape, *geometry):
        gx[n, c, r, s] += gy[n, o, p, q] * w[c, k, i, j]
        gw[c, k, i, j] += gy[n, o, p, q] * x[n, c, r, s]
    return gx, gw, _bias_grad(gy) if with_bias else None


# -- pooling -----------------------------------------------------------------------------------
#
# Window (p, q) has taps at rows p*sh - ph + i*dh, columns q*sw - pw + j*dw. Floor mode keeps the
# windows that end inside the padded input; ceil mode also keeps the first one that reaches past
# its end, provided it starts inside the input or the left padding (torch's rule).


def pool_out_size(size, k, stride, pad, dilation=1, ceil_mode=False):
    """Windows along one axis, counted one by one from the definition above."""
    extent, span = size + 2 * pad, dilation * (k - 1) + 1
    count = 0
    while True:
        start = count * stride  # in padded coordinates
        if start + span <= extent or (ceil_mode and start < size + pad and (count == 0 or start - stride + span < extent)):
            count += 1
        else:
            return count


def pool_output_shape(x_shape, kernel_size, stride, padding, dilation=(1, 1), ceil_mode=False):
    n, c, h, w = x_shape
    out_h = pool_out_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_w = pool_out_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    return (n, c, out_h, out_w)


def _pool_windows(x_shape, kernel_size, stride, padding, dilation, ceil_mode=False):
    """Yield ((n, c, p, q), taps, padded_taps): each output pixel, its window's in-image input pixels
    (row-major), and how many of its taps lie inside the padded input."""
    n_, c_, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    _, _, out_h, out_w = pool_output_shape(x_shape, kernel_size, stride, padding, dilation, ceil_mode)
    for n, c, p, q in product(range(n_), range(c_), range(out_h), range(out_w)):
        taps, padded_taps = [], 0
        for i, j in product(range(kh), range(kw)):
            r, s = p * sh - ph + i * dh, q * sw - pw + j * dw
            if 0 <= r < h and 0 <= s < w:
                taps.append((r, s))
            padded_taps += -ph <= r < h + ph and -pw <= s < w + pw
        yield (n, c, p, q), taps, padded_taps


def _first_max(x, n, c, taps):
    """torch's rule: scan the in-image taps row-major, starting from the first; a strictly greater value or
    a NaN takes over. So ties go to the first maximum, NaNs to the last NaN, an all -inf window to its
    first in-image tap; a window over padding alone has none (None)."""
    if not taps:
        return None
    best_tap = taps[0]
    best = x[n, c, best_tap[0], best_tap[1]]
    for r, s in taps[1:]:
        v = x[n, c, r, s]
        if v > best or math.isnan(v):
            best, best_tap = v, (r, s)
    return best_tap


def _first_tap_at_or_after_zero(start, dilation):
    while start < 0:
        start += dilation
    return start


def max_pool2d(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False, return_indices=False):
    """Padding reads as -inf, so a window that only covers padding gives -inf.

    Indices are flat per plane (r * W + s); a window over padding alone reports the position torch
    starts its scan at: the first tap at or after row 0 and column 0.
    """
    (x,) = _f64(x)
    shape = pool_output_shape(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    y = np.full(shape, -math.inf)
    indices = np.zeros(shape, dtype=np.int64)
    for (n, c, p, q), taps, _ in _pool_windows(x.shape, kernel_size, stride, padding, dilation, ceil_mode):
        tap = _first_max(x, n, c, taps)
        if tap is None:
            tap = (
                _first_tap_at_or_after_zero(p * stride[0] - padding[0], dilation[0]),
                _first_tap_at_or_after_zero(q * stride[1] - padding[1], dilation[1]),
            )
        else:
            y[n, c, p, q] = x[n, c, tap[0], tap[1]]
        indices[n, c, p, q] = tap[0] * x.shape[3] + tap[1]
    return (y, indices) if return_indices else y


def max_pool2d_backward(gy, x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    gy, x = _f64(gy, x)
    gx = np.zeros_like(x)
    for (n, c, p, q), taps, _ in _pool_windows(x.shape, kernel_size, stride, padding, dilation, ceil_mode):
        tap = _first_max(x, n, c, taps)
        if tap is not None:
            gx[n, c, tap[0], tap[1]] += gy[n, c, p, q]
    return gx


def _avg_divisor(taps, padded_taps, count_include_pad, divisor_override):
    """divisor_override, else the taps inside the padded input (count_include_pad) or inside the image."""
    if divisor_override is not None:
        return divisor_override
    return padded_taps if count_include_pad else len(taps)


def avg_pool2d(x, kernel_size, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True, divisor_override=None):
    """Window sum of the in-image taps over torch's divisor (see _avg_divisor)."""
    (x,) = _f64(x)
    y = np.zeros(pool_output_shape(x.shape, kernel_size, stride, padding, (1, 1), ceil_mode))
    for (n, c, p, q), taps, padded in _pool_windows(x.shape, kernel_size, stride, padding, (1, 1), ceil_mode):
        y[n, c, p, q] = sum(x[n, c, r, s] for r, s in taps) / _avg_divisor(taps, padded, count_include_pad, divisor_override)
    return y


def avg_pool2d_backward(
    gy, x_shape, kernel_size, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True, divisor_override=None
):
    (gy,) = _f64(gy)
    gx = np.zeros(x_shape)
    for (n, c, p, q), taps, padded in _pool_windows(x_shape, kernel_size, stride, padding, (1, 1), ceil_mode):
        for r, s in taps:
            gx[n, c, r, s] += gy[n, c, p, q] / _avg_divisor(taps, padded, count_include_pad, divisor_override)
    return gx


# -- relu --------------------------------------------------------------------------------------


def relu(x):
    (x,) = _f64(x)
    y = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        v = x[idx]
        y[idx] = v if (v > 0 or math.isnan(v)) else 0.0
    return y


def relu_backward(gy, x):
    """torch's rule: 0 where the result is <= 0, else gy; a NaN input has a NaN result, so gy passes."""
    gy, x = _f64(gy, x)
    gx = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        result = relu(x[idx])
        if not result <= 0:
            gx[idx] = gy[idx]
    return gx
