"""The nine kernels written against an array module, so one code path serves CuPy on a GPU and NumPy on a CPU.

``make_kernels(xp)`` returns a kernel table (see :class:`convrpc.core.backend.Kernels`) whose every
array operation goes through ``xp``: device arrays in, device arrays out, nothing copied to the host.
Convolutions are im2col + ``xp.matmul`` (cuBLAS under CuPy): the column buffer is filled by one
strided slice per kernel tap (kh*kw copies, never a loop over pixels), groups become the batch axis
of one batched matmul, and the work is tiled over the batch (then over output rows) so the buffer
stays within a workspace budget. Pooling is a loop over taps with running reductions, which needs no
buffer beyond the output.
"""

from __future__ import annotations

from typing import Any, Iterator

from . import config
from .params import ConvGeometry, PoolGeometry

__all__ = ["ArrayKernels", "make_kernels"]


def make_kernels(xp: Any, *, workspace_bytes: int | None = None) -> "ArrayKernels":
    """A kernel table computing with array module ``xp`` (``numpy`` or ``cupy``).

    ``workspace_bytes`` caps the im2col buffer of one tile; ``None`` reads
    ``config.WORKSPACE_BYTES`` at each call.
    """
    return ArrayKernels(xp, workspace_bytes)


def _taps(kh: int, kw: int) -> Iterator[tuple[int, int]]:
    for i in range(kh):
        for j in range(kw):
            yield i, j


def _span(first: int, count: int, step: int) -> slice:
    """Slice of ``count`` positions ``step`` apart starting at ``first``."""
    return slice(first, first + step * (count - 1) + 1, step)


class ArrayKernels:
    """Kernel table over array module ``xp``; arrays are (N, C, H, W), C-contiguous, of one float dtype."""

    def __init__(self, xp: Any, workspace_bytes: int | None = None):
        self.xp = xp
        self.workspace_bytes = workspace_bytes
        self._asnumpy = getattr(xp, "asnumpy", None)

    def __repr__(self) -> str:
        return f"<ArrayKernels over {self.xp.__name__}>"

    def to_device(self, a):
        return self.xp.asarray(a, order="C")  # not ascontiguousarray, which turns 0-d into shape (1,)

    def to_host(self, a):
        return a if self._asnumpy is None else self._asnumpy(a)

    # -- helpers ------------------------------------------------------------------------------

    def _padded(self, x, top, bottom, left, right, value=0.0):
        """x (N, C, H, W) inside a border filled with ``value``; x itself when there is no border."""
        if top == bottom == left == right == 0:
            return x
        n, c, h, w = x.shape
        out = self.xp.full((n, c, h + top + bottom, w + left + right), value, dtype=x.dtype)
        out[:, :, top : top + h, left : left + w] = x
        return out

    @staticmethod
    def row_bytes(g: ConvGeometry, itemsize: int) -> int:
        """Workspace one output row of one sample takes: its im2col columns plus its output channels."""
        return (g.c_in * g.kh * g.kw + g.c_out) * g.out_w * itemsize

    def tiles(self, g: ConvGeometry, itemsize: int) -> Iterator[tuple[int, int, int, int]]:
        """(n0, n1, r0, r1): the samples and output rows of each tile of a conv, sized to the workspace.

        Whole samples are batched while at least one fits; otherwise each sample is split into row
        bands (at least one output row per tile, whatever the budget).
        """
        budget = config.WORKSPACE_BYTES if self.workspace_bytes is None else self.workspace_bytes
        row_bytes = self.row_bytes(g, itemsize)
        sample_bytes = row_bytes * g.out_h
        if sample_bytes <= budget:
            nb = min(g.n, budget // sample_bytes)
            for n0 in range(0, g.n, nb):
                yield n0, min(g.n, n0 + nb), 0, g.out_h
        else:
            rows = max(1, budget // row_bytes)
            for n0 in range(g.n):
                for r0 in range(0, g.out_h, rows):
                    yield n0, n0 + 1, r0, min(g.out_h, r0 + rows)

    def _im2col(self, xpad, g: ConvGeometry, r0: int, r1: int):
        """Columns (G, C/G*kh*kw, nb*rows*OW) of output rows [r0, r1) over padded input xpad (nb, C, Hp, Wp).

        The row order (channel, tap) matches a weight reshaped to (G, K/G, C/G*kh*kw); the
        column order (sample, row, col) matches an output tile transposed to channels first.
        """
        nb, rows = xpad.shape[0], r1 - r0
        cols = self.xp.empty((g.c_in, g.kh, g.kw, nb, rows, g.out_w), dtype=xpad.dtype)
        for i, j in _taps(g.kh, g.kw):
            hs = _span(i * g.dil_h + r0 * g.stride_h, rows, g.stride_h)
            ws = _span(j * g.dil_w, g.out_w, g.stride_w)
            cols[:, i, j] = xpad[:, :, hs, ws].transpose(1, 0, 2, 3)
        return cols.reshape(g.groups, (g.c_in // g.groups) * g.kh * g.kw, nb * rows * g.out_w)

    def _col2im_add(self, gxpad, cols, g: ConvGeometry, r0: int, r1: int) -> None:
        """Add columns (G, C/G*kh*kw, nb*rows*OW) back onto the padded grid gxpad (nb, C, Hp, Wp), in place."""
        nb, rows = gxpad.shape[0], r1 - r0
        cols = cols.reshape(g.c_in, g.kh, g.kw, nb, rows, g.out_w)
        for i, j in _taps(g.kh, g.kw):
            hs = _span(i * g.dil_h + r0 * g.stride_h, rows, g.stride_h)
            ws = _span(j * g.dil_w, g.out_w, g.stride_w)
            gxpad[:, :, hs, ws] += cols[:, i, j].transpose(1, 0, 2, 3)

    def _channels_first(self, a, g: ConvGeometry):
        """An output-shaped tile (nb, K, rows, OW) as (G, K/G, nb*rows*OW), the matmul's layout."""
        a = self.xp.ascontiguousarray(a.transpose(1, 0, 2, 3))
        return a.reshape(g.groups, g.c_out // g.groups, -1)

    @staticmethod
    def _grouped_weight(w, g: ConvGeometry):
        return w.reshape(g.groups, g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw)

    def _column_tiles(self, x, g: ConvGeometry):
        """(n0, n1, r0, r1, cols) for each tile of conv input x, padding each batch tile once."""
        xpad = None
        for n0, n1, r0, r1 in self.tiles(g, x.dtype.itemsize):
            if r0 == 0:
                xpad = self._padded(x[n0:n1], g.pad_top, g.pad_bottom, g.pad_left, g.pad_right)
            yield n0, n1, r0, r1, self._im2col(xpad, g, r0, r1)

    # -- convolution --------------------------------------------------------------------------

    def conv2d(self, x, w, b, g: ConvGeometry):
        """y (N, K, OH, OW) = conv2d of x (N, C, H, W) with w (K, C/G, kh, kw), plus b (K,) when given."""
        xp = self.xp
        y = xp.empty(g.output_shape, dtype=x.dtype)
        wg = self._grouped_weight(w, g)
        for n0, n1, r0, r1, cols in self._column_tiles(x, g):
            yt = xp.matmul(wg, cols).reshape(g.c_out, n1 - n0, r1 - r0, g.out_w)
            y[n0:n1, :, r0:r1] = yt.transpose(1, 0, 2, 3)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    def conv2d_weight_grad(self, x, gy, g: ConvGeometry):
        """gw (K, C/G, kh, kw): the weight gradient of conv2d given x and gy (N, K, OH, OW)."""
        xp = self.xp
        gw = xp.zeros((g.groups, g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw), dtype=x.dtype)
        for n0, n1, r0, r1, cols in self._column_tiles(x, g):
            gyt = self._channels_first(gy[n0:n1, :, r0:r1], g)
            gw += xp.matmul(gyt, cols.transpose(0, 2, 1))
        return gw.reshape(g.weight_shape)

    def conv2d_input_grad(self, gy, w, g: ConvGeometry):
        """gx (N, C, H, W): the input gradient of conv2d given gy (N, K, OH, OW); also conv_transpose2d."""
        xp = self.xp
        gx = xp.empty(g.input_shape, dtype=gy.dtype)
        hp, wp = g.h + g.pad_top + g.pad_bottom, g.w + g.pad_left + g.pad_right
        wgt = self._grouped_weight(w, g).transpose(0, 2, 1)
        gxpad = None
        for n0, n1, r0, r1 in self.tiles(g, gy.dtype.itemsize):
            if r0 == 0:
                gxpad = xp.zeros((n1 - n0, g.c_in, hp, wp), dtype=gy.dtype)
            cols = xp.matmul(wgt, self._channels_first(gy[n0:n1, :, r0:r1], g))
            self._col2im_add(gxpad, cols, g, r0, r1)
            if r1 == g.out_h:
                gx[n0:n1] = gxpad[:, :, g.pad_top : g.pad_top + g.h, g.pad_left : g.pad_left + g.w]
        return gx

    # -- pooling ------------------------------------------------------------------------------

    def _first_max(self, x, g: PoolGeometry):
        """(value, int64 flat index h*W+w) that torch's max pooling picks in each window.

        torch scans the in-image taps row-major from the first one, and a strictly greater value or a
        NaN takes over: ties go to the first maximum, NaNs to the last NaN, an all -inf window to its
        first in-image tap. Padding reads as -inf, so it never takes over; a window over padding alone
        keeps torch's starting index (see :meth:`_start_index`).
        """
        xp = self.xp
        xpad = self._padded(x, g.pad_h, g.pad_bottom, g.pad_w, g.pad_right, -float("inf"))
        best = xp.full(g.output_shape, -float("inf"), dtype=x.dtype)
        idx = xp.broadcast_to(self._start_index(g), g.output_shape)
        for i, j, hs, ws in self._pool_taps(g):
            v = xpad[:, :, hs, ws]
            # A running comparison rather than argmax over stacked taps: no (kh*kw)-fold buffer, and the
            # NaN rule is spelled out here instead of resting on each array library's argmax.
            take = (v > best) | xp.isnan(v)
            best = xp.where(take, v, best)
            idx = xp.where(take, self._tap_index(g, i, j), idx)
        return best, idx

    def _tap_index(self, g: PoolGeometry, i: int, j: int):
        """(out_h, out_w) int64 flat input index of tap (i, j) of every window (outside the image for padding)."""
        xp = self.xp
        rows = xp.arange(g.out_h, dtype=xp.int64) * g.stride_h - g.pad_h + i * g.dil_h
        cols = xp.arange(g.out_w, dtype=xp.int64) * g.stride_w - g.pad_w + j * g.dil_w
        return rows[:, None] * g.w + cols[None, :]

    def _start_index(self, g: PoolGeometry):
        """(out_h, out_w) torch's initial index of each window: its first tap at or after row 0 and column 0."""
        xp = self.xp

        def first(out, stride, pad, dil):
            start = xp.arange(out, dtype=xp.int64) * stride - pad
            return start + xp.where(start < 0, (-start + dil - 1) // dil, 0) * dil

        rows = first(g.out_h, g.stride_h, g.pad_h, g.dil_h)
        cols = first(g.out_w, g.stride_w, g.pad_w, g.dil_w)
        return rows[:, None] * g.w + cols[None, :]

    def _pool_taps(self, g: PoolGeometry) -> Iterator[tuple[int, int, slice, slice]]:
        """(i, j, rows, cols) of every tap's view over the padded input, row-major."""
        for i, j in _taps(g.kh, g.kw):
            yield i, j, _span(i * g.dil_h, g.out_h, g.stride_h), _span(j * g.dil_w, g.out_w, g.stride_w)

    def _padded_grad(self, g: PoolGeometry, dtype):
        return self.xp.zeros((g.n, g.c, g.pad_h + g.h + g.pad_bottom, g.pad_w + g.w + g.pad_right), dtype=dtype)

    def _unpadded(self, gxpad, g: PoolGeometry):
        return self.xp.ascontiguousarray(gxpad[:, :, g.pad_h : g.pad_h + g.h, g.pad_w : g.pad_w + g.w])

    def max_pool2d(self, x, g: PoolGeometry):
        best, idx = self._first_max(x, g)
        return best, self.xp.ascontiguousarray(idx)  # a broadcast view where no tap ever took over

    def max_pool2d_backward(self, gy, x, g: PoolGeometry):
        xp = self.xp
        _, idx = self._first_max(x, g)
        gxpad = self._padded_grad(g, gy.dtype)
        zero = gy.dtype.type(0)
        # A padding tap's flat index may equal the chosen in-image one; its share lands in the padding, cut away.
        for i, j, hs, ws in self._pool_taps(g):
            gxpad[:, :, hs, ws] += xp.where(idx == self._tap_index(g, i, j), gy, zero)
        return self._unpadded(gxpad, g)

    def avg_pool2d(self, x, g: PoolGeometry):
        xpad = self._padded(x, g.pad_h, g.pad_bottom, g.pad_w, g.pad_right)
        total = self.xp.zeros(g.output_shape, dtype=x.dtype)
        for _, _, hs, ws in self._pool_taps(g):
            total += xpad[:, :, hs, ws]
        total /= g.divisors(self.xp).astype(x.dtype)
        return total

    def avg_pool2d_backward(self, gy, g: PoolGeometry):
        share = gy / g.divisors(self.xp).astype(gy.dtype)
        gxpad = self._padded_grad(g, gy.dtype)
        for _, _, hs, ws in self._pool_taps(g):
            gxpad[:, :, hs, ws] += share
        return self._unpadded(gxpad, g)

    # -- relu ---------------------------------------------------------------------------------

    def relu(self, x):
        return self.xp.maximum(x, x.dtype.type(0))

    def relu_backward(self, gy, x):
        # torch's rule is "0 where the result <= 0": a NaN input (NaN result) passes grad_output through.
        return self.xp.where(x <= 0, gy.dtype.type(0), gy)
