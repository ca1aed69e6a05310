"""Argument checking and output-shape arithmetic for every op, with torch.nn.functional semantics.

Every backend shares this module, so an op validates identically whatever computes it. Each
function returns a frozen geometry object that the backends' kernels read; kernels never
recompute sizes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import InvalidArgumentError

__all__ = [
    "ConvGeometry",
    "PoolGeometry",
    "conv2d_geometry",
    "conv_transpose2d_geometry",
    "pool2d_geometry",
    "pair",
]


def pair(value, field: str, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints as ``(height, width)``, each at least ``minimum``."""
    if _is_int(value):
        out = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(map(_is_int, value)):
        out = (int(value[0]), int(value[1]))
    else:
        raise InvalidArgumentError(field, f"expected an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise InvalidArgumentError(field, f"must be >= {minimum}, got {value!r}")
    return out


def _is_int(v) -> bool:
    return hasattr(v, "__index__") and not isinstance(v, bool)


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
    """Check the arguments of ``conv2d`` and return its geometry."""
    n, c_in, h, w = _shape4(input_shape, "input")
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
    return ConvGeometry(n, c_in, h, w, c_out, kh, kw, groups, sh, sw, pt, pb, pl, pr, dh, dw, out_h, out_w)


def conv_transpose2d_geometry(
    input_shape, weight_shape, bias_shape=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
) -> ConvGeometry:
    """Check the arguments of ``conv_transpose2d`` and return the geometry of its adjoint conv2d.

    The transposed conv's weight ``(in_channels, out_channels/groups, kh, kw)`` is read as the
    adjoint conv2d's weight ``(c_out, c_in/groups, kh, kw)``: the transposed conv's input is that
    conv's output and its output is that conv's input.
    """
    n, c_in, h, w = _shape4(input_shape, "input")
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
    return ConvGeometry(n, c_out, out_h, out_w, c_in, kh, kw, groups, sh, sw, ph, ph, pw, pw, dh, dw, h, w)


@dataclass(frozen=True)
class PoolGeometry:
    """Sizes of one 2-d pooling: input (n, c, h, w), windows kh x kw, output (n, c, out_h, out_w)."""

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

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.out_h, self.out_w)


def pool2d_geometry(input_shape, kernel_size, stride=None, padding=0, dilation=1) -> PoolGeometry:
    """Check the arguments of ``max_pool2d``/``avg_pool2d`` (floor mode) and return the geometry.

    ``stride=None`` (or an empty sequence) means the kernel size, as in torch.
    """
    n, c, h, w = _shape4(input_shape, "input")
    kh, kw = pair(kernel_size, "kernel_size", minimum=1)
    if stride is None or (isinstance(stride, Sequence) and not isinstance(stride, str) and len(stride) == 0):
        sh, sw = kh, kw
    else:
        sh, sw = pair(stride, "stride", minimum=1)
    ph, pw = pair(padding, "padding", minimum=0)
    dh, dw = pair(dilation, "dilation", minimum=1)
    if ph > kh // 2 or pw > kw // 2:
        raise InvalidArgumentError(
            "padding", f"must be at most half the kernel size ({kh // 2}, {kw // 2}), got ({ph}, {pw})"
        )
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if out_h <= 0 or out_w <= 0:
        raise InvalidArgumentError(
            "kernel_size",
            f"effective window {dh * (kh - 1) + 1}x{dw * (kw - 1) + 1} is larger than the padded input "
            f"{h + 2 * ph}x{w + 2 * pw}",
        )
    return PoolGeometry(n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w)


def _groups(groups) -> int:
    if not _is_int(groups) or int(groups) < 1:
        raise InvalidArgumentError("groups", f"must be an int >= 1, got {groups!r}")
    return int(groups)
