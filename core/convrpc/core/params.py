"""Argument checking and output-shape arithmetic for every op, with torch.nn.functional semantics.

Every backend shares this module, so an op validates identically whatever computes it. Each
function returns a frozen geometry object that the backends' kernels read; kernels never
recompute sizes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from .config import MAX_GEOMETRY_INT
from .errors import InvalidArgumentError

__all__ = [
    "ConvGeometry",
    "PoolGeometry",
    "conv2d_geometry",
    "conv_transpose2d_geometry",
    "flag",
    "pair",
    "pool2d_geometry",
]


def pair(value, field: str, *, minimum: int) -> tuple[int, int]:
    """An int, a pair of ints or torch's 1-element ``(v,)`` as ``(height, width)``, each at least ``minimum``.

    Like torch, floats, bools and strings are refused, never truncated; every value is bounded by
    ``MAX_GEOMETRY_INT`` so no size arithmetic in a kernel can overflow.
    """
    if _is_int(value):
        out = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) in (1, 2)
        and all(map(_is_int, value))
    ):
        out = (int(value[0]), int(value[-1]))
    else:
        raise InvalidArgumentError(field, f"expected an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise InvalidArgumentError(field, f"must be >= {minimum}, got {value!r}")
    if max(out) > MAX_GEOMETRY_INT:
        raise InvalidArgumentError(field, f"must be <= {MAX_GEOMETRY_INT}, got {value!r}")
    return out


def flag(value, field: str) -> bool:
    """A bool option (``ceil_mode``, ``count_include_pad``, ``return_indices``); ints are refused, as in torch."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(field, f"expected a bool, got {value!r}")
    return bool(value)


def _is_int(v) -> bool:
    return hasattr(v, "__index__") and not isinstance(v, (bool, np.bool_))


def _input_shape(shape, field: str = "input") -> tuple[tuple[int, int, int, int], bool]:
    """``((N, C, H, W), unbatched)`` of an op's input: 3-d (C, H, W) reads as a batch of one; N may be 0."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise InvalidArgumentError(
            field, f"expected a 3-d (C, H, W) or 4-d (N, C, H, W) tensor, got shape {shape}"
        )
    if min(shape[-3:]) <= 0:
        raise InvalidArgumentError(field, f"channel and spatial dimensions must be > 0, got shape {shape}")
    return (shape if len(shape) == 4 else (1, *shape)), len(shape) == 3


def _shape4(shape, field: str) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise InvalidArgumentError(field, f"expected a 4-d tensor (N, C, H, W), got shape {tuple(shape)}")
    if min(shape) <= 0:
        raise InvalidArgumentError(field, f"every dimension must be > 0, got shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _check_bias(bias_shape, channels: int) -> None:
    if bias_shape is not None and tuple(bias_shape) != (channels,):
        raise InvalidArgumentError("bias", f"expected shape ({channels},), got {tuple(bias_shape)}")


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one conv2d: input (n, c_in, h, w), weight (c_out, c_in/groups, kh, kw), output (n, c_out, out_h, out_w).

    The padded input is ``h + pad_top + pad_bottom`` by ``w + pad_left + pad_right``; windows start
    at multiples of the stride and their taps are ``dil`` apart. For conv_transpose2d this is the
    geometry of the adjoint conv2d (its input is the transposed conv's output), and the padded
    input may reach past the last window, which then leaves those rows and columns untouched.
    """

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    groups: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    dil_h: int
    dil_w: int
    out_h: int
    out_w: int
    #: The caller's input was 3-d (C, H, W): results drop the batch axis again.
    unbatched: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c_in, self.h, self.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.c_out, self.c_in // self.groups, self.kh, self.kw)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c_out, self.out_h, self.out_w)

    @property
    def flops(self) -> int:
        """Multiply-adds times two of the forward pass (the same for each backward direction)."""
        return 2 * self.n * self.c_out * self.out_h * self.out_w * (self.c_in // self.groups) * self.kh * self.kw


def conv2d_geometry(input_shape, weight_shape, bias_shape=None, stride=1, padding=0, dilation=1, groups=1) -> ConvGeometry:
    """Check the arguments of ``conv2d`` and return its geometry (``input_shape`` may be 3-d, unbatched)."""
    (n, c_in, h, w), unbatched = _input_shape(input_shape)
    c_out, c_per_group, kh, kw = _shape4(weight_shape, "weight")
    groups = _groups(groups)
    sh, sw = pair(stride, "stride", minimum=1)
    dh, dw = pair(dilation, "dilation", minimum=1)
    if c_in % groups:
        raise InvalidArgumentError("groups", f"input channels {c_in} are not divisible by groups={groups}")
    if c_out % groups:
        raise InvalidArgumentError("groups", f"weight out_channels {c_out} are not divisible by groups={groups}")
    if c_per_group != c_in // groups:
        raise InvalidArgumentError(
            "weight",
            f"expected shape[1] == in_channels/groups = {c_in}/{groups} = {c_in // groups}, got {c_per_group}",
        )
    _check_bias(bias_shape, c_out)
    ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if isinstance(padding, str):
        if padding == "valid":
            pt = pb = pl = pr = 0
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise InvalidArgumentError("padding", "padding='same' needs stride 1 (as in torch)")
            # torch puts the odd pixel of an even effective kernel at the bottom/right.
            pt, pl = (ekh - 1) // 2, (ekw - 1) // 2
            pb, pr = ekh - 1 - pt, ekw - 1 - pl
        else:
            raise InvalidArgumentError("padding", f"expected an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        ph, pw = pair(padding, "padding", minimum=0)
        pt = pb = ph
        pl = pr = pw
    hp, wp = h + pt + pb, w + pl + pr
    if ekh > hp or ekw > wp:
        raise InvalidArgumentError(
            "weight",
            f"effective kernel {ekh}x{ekw} (kernel {kh}x{kw}, dilation {dh}x{dw}) is larger than the "
            f"padded input {hp}x{wp}",
        )
    out_h = (hp - ekh) // sh + 1
    out_w = (wp - ekw) // sw + 1
    return ConvGeometry(n, c_in, h, w, c_out, kh, kw, groups, sh, sw, pt, pb, pl, pr, dh, dw, out_h, out_w, unbatched)


def conv_transpose2d_geometry(
    input_shape, weight_shape, bias_shape=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
) -> ConvGeometry:
    """Check the arguments of ``conv_transpose2d`` and return the geometry of its adjoint conv2d.

    The transposed conv's weight ``(in_channels, out_channels/groups, kh, kw)`` is read as the
    adjoint conv2d's weight ``(c_out, c_in/groups, kh, kw)``: the transposed conv's input is that
    conv's output and its output is that conv's input. ``input_shape`` may be 3-d (unbatched).
    """
    (n, c_in, h, w), unbatched = _input_shape(input_shape)
    w_in, c_out_per_group, kh, kw = _shape4(weight_shape, "weight")
    groups = _groups(groups)
    sh, sw = pair(stride, "stride", minimum=1)
    dh, dw = pair(dilation, "dilation", minimum=1)
    if isinstance(padding, str):
        raise InvalidArgumentError("padding", "conv_transpose2d takes an int or a pair, not a string mode")
    ph, pw = pair(padding, "padding", minimum=0)
    oph, opw = pair(output_padding, "output_padding", minimum=0)
    if oph >= max(sh, dh) or opw >= max(sw, dw):
        raise InvalidArgumentError(
            "output_padding",
            f"must be smaller than either stride or dilation, got output_padding=({oph}, {opw}), "
            f"stride=({sh}, {sw}), dilation=({dh}, {dw})",
        )
    if c_in % groups:
        raise InvalidArgumentError("groups", f"input channels {c_in} are not divisible by groups={groups}")
    if w_in != c_in:
        raise InvalidArgumentError("weight", f"expected shape[0] == in_channels = {c_in}, got {w_in}")
    c_out = c_out_per_group * groups
    _check_bias(bias_shape, c_out)
    out_h = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    out_w = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    if out_h <= 0 or out_w <= 0:
        raise InvalidArgumentError(
            "padding", f"output size would be {out_h}x{out_w}; padding ({ph}, {pw}) is too large for this input"
        )
    return ConvGeometry(n, c_out, out_h, out_w, c_in, kh, kw, groups, sh, sw, ph, ph, pw, pw, dh, dw, h, w, unbatched)


@dataclass(frozen=True)
class PoolGeometry:
    """Sizes of one 2-d pooling: input (n, c, h, w), windows kh x kw, output (n, c, out_h, out_w).

    Window (oh, ow) starts at input row ``oh * stride_h - pad_h`` (columns likewise); its taps are
    ``dil`` apart. In ceil mode the last window may reach past the bottom/right padding, up to
    ``pad_bottom``/``pad_right``. ``count_include_pad`` and ``divisor_override`` matter to avg pooling only.
    """

    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int
    out_h: int
    out_w: int
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    unbatched: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.out_h, self.out_w)

    @property
    def pad_bottom(self) -> int:
        """Rows below the input that the windows reach: pad_h, or more for a ceil-mode overhang."""
        return max(self.pad_h, (self.out_h - 1) * self.stride_h + self.dil_h * (self.kh - 1) + 1 - self.h - self.pad_h)

    @property
    def pad_right(self) -> int:
        """Columns right of the input that the windows reach (see pad_bottom)."""
        return max(self.pad_w, (self.out_w - 1) * self.stride_w + self.dil_w * (self.kw - 1) + 1 - self.w - self.pad_w)

    def divisors(self, xp):
        """(out_h, out_w) int64 divisor of each avg-pool window, torch's rule.

        ``divisor_override`` when given; else the window's area clipped to the padded input (a
        ceil-mode overhang past the padding does not count) with ``count_include_pad``, or to the
        input itself without it.
        """
        if self.divisor_override is not None:
            return xp.full((self.out_h, self.out_w), self.divisor_override, dtype=xp.int64)

        def counts(out, stride, pad, k, size):
            start = xp.arange(out, dtype=xp.int64) * stride - pad
            end = xp.minimum(start + k, size + pad)
            if self.count_include_pad:
                return end - start
            return xp.minimum(end, size) - xp.maximum(start, 0)

        rows = counts(self.out_h, self.stride_h, self.pad_h, self.kh, self.h)
        cols = counts(self.out_w, self.stride_w, self.pad_w, self.kw, self.w)
        return rows[:, None] * cols[None, :]


def pool_out_size(size: int, k: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling output size; in ceil mode the last window must start inside the input or the left padding."""
    span = size + 2 * pad - dilation * (k - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pool2d_geometry(
    input_shape, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    count_include_pad=True, divisor_override=None,
) -> PoolGeometry:
    """Check the arguments of ``max_pool2d``/``avg_pool2d`` and return the geometry.

    ``stride=None`` (or an empty sequence) means the kernel size, as in torch; ``input_shape`` may
    be 3-d (unbatched) and its batch may be empty.
    """  # fmt: skip
    (n, c, h, w), unbatched = _input_shape(input_shape)
    kh, kw = pair(kernel_size, "kernel_size", minimum=1)
    if stride is None or (isinstance(stride, Sequence) and not isinstance(stride, str) and len(stride) == 0):
        sh, sw = kh, kw
    else:
        sh, sw = pair(stride, "stride", minimum=1)
    ph, pw = pair(padding, "padding", minimum=0)
    dh, dw = pair(dilation, "dilation", minimum=1)
    ceil_mode = flag(ceil_mode, "ceil_mode")
    count_include_pad = flag(count_include_pad, "count_include_pad")
    if divisor_override is not None:
        if not _is_int(divisor_override) or int(divisor_override) == 0:
            raise InvalidArgumentError("divisor_override", f"expected a non-zero int or None, got {divisor_override!r}")
        if abs(int(divisor_override)) > MAX_GEOMETRY_INT:
            raise InvalidArgumentError("divisor_override", f"must be within +-{MAX_GEOMETRY_INT}, got {divisor_override!r}")
        divisor_override = int(divisor_override)
    if ph > kh // 2 or pw > kw // 2:
        raise InvalidArgumentError(
            "padding", f"must be at most half the kernel size ({kh // 2}, {kw // 2}), got ({ph}, {pw})"
        )
    out_h = pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    out_w = pool_out_size(w, kw, sw, pw, dw, ceil_mode)
    if out_h <= 0 or out_w <= 0:
        raise InvalidArgumentError(
            "kernel_size",
            f"effective window {dh * (kh - 1) + 1}x{dw * (kw - 1) + 1} is larger than the padded input "
            f"{h + 2 * ph}x{w + 2 * pw}",
        )
    return PoolGeometry(
        n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w,
        ceil_mode, count_include_pad, divisor_override, unbatched,
    )  # fmt: skip


def _groups(groups) -> int:
    if not _is_int(groups) or not 1 <= int(groups) <= MAX_GEOMETRY_INT:
        raise InvalidArgumentError("groups", f"must be an int in [1, {MAX_GEOMETRY_INT}], got {groups!r}")
    return int(groups)
