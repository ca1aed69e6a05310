"""The public op surface every backend shares: torch-named ops that validate, then call a kernel table.

A backend is a small table of kernels (see :class:`Kernels`) working on checked arrays and a
geometry from :mod:`convrpc.core.params`. :class:`Backend` wraps such a table in methods named,
ordered and defaulted like ``torch.nn.functional``; the server's handlers and the SDK's methods
mirror these exactly. conv_transpose2d is built from the conv2d kernels (it is conv2d's input
gradient), so a table has only nine kernels.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Protocol

import ml_dtypes
import numpy as np

from . import config, params
from .errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["Backend", "DTYPES", "Gradients", "Kernels", "OPS", "common_dtype"]

#: Element types every backend takes and returns. The half types (float16, ``ml_dtypes.bfloat16``)
#: are computed in float32 and rounded once at the end, as torch does on the CPU.
DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
#: Element types the kernels compute in; the others are widened to float32 first.
_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: The ops of the contract, in their canonical order.
OPS = ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "relu")
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


class Gradients(NamedTuple):
    """Gradients of the loss with respect to an op's inputs; ``None`` where an input has none."""

    input: Any
    weight: Any = None
    bias: Any = None

    def __repr__(self) -> str:  # shapes, not whole arrays: a notebook cell shows this
        def brief(a) -> str:
            return "None" if a is None else f"<{getattr(a, 'dtype', '?')} {tuple(getattr(a, 'shape', ()))}>"

        return f"Gradients(input={brief(self.input)}, weight={brief(self.weight)}, bias={brief(self.bias)})"


class Kernels(Protocol):
    """What a backend module provides. Arrays are C-contiguous float32/float64 of one dtype, on the backend's device,
    4-d with N >= 1 (the Backend handles unbatched inputs and empty batches itself).

    ``conv2d(x, w, b, g)`` -> y; ``conv2d_input_grad(gy, w, g)`` -> gx;
    ``conv2d_weight_grad(x, gy, g)`` -> gw; ``max_pool2d(x, g)`` -> (y, int64 flat indices h*W+w per plane);
    ``max_pool2d_backward(gy, x, g)``; ``avg_pool2d(x, g)``; ``avg_pool2d_backward(gy, g)``;
    ``relu(x)``; ``relu_backward(gy, x)`` (any shape, 0-d included).
    ``xp`` is the array module; ``to_device``/``to_host`` move arrays in and out.
    """

    xp: Any


def common_dtype(arrays: Mapping[str, Any]) -> np.dtype:
    """The one dtype (native byte order) of an op's tensors, by field (None entries skipped).

    Each must be one of DTYPES: integer, bool and complex tensors are refused, never converted. All must
    share one dtype; a mismatch names the odd one out (the majority's dtype wins, the input's on a tie).
    The SDK checks its arguments with this rule before sending them.
    """
    for field, a in arrays.items():
        if a is not None and a.dtype.newbyteorder("=") not in DTYPES:
            raise InvalidArgumentError(field, f"dtype must be {_DTYPE_NAMES}, got {a.dtype}")
    dtypes = [a.dtype.newbyteorder("=") for a in arrays.values() if a is not None]
    first = arrays["input"].dtype.newbyteorder("=") if arrays.get("input") is not None else dtypes[0]
    dtype = max(dict.fromkeys([first, *dtypes]), key=dtypes.count)
    for field, a in arrays.items():
        if a is not None and a.dtype.newbyteorder("=") != dtype:
            raise InvalidArgumentError(field, f"dtype {a.dtype} differs from the other tensors' {dtype}")
    return dtype


class _Origin(NamedTuple):
    """Where a call's arrays came from and in which dtype its results go back."""

    on_host: bool
    dtype: np.dtype


class Backend:
    """Ops with torch.nn.functional names and semantics over one kernel table.

    Arrays in, arrays out: host (NumPy) inputs give host outputs; device inputs of a GPU backend
    give device outputs. Every tensor must have one of DTYPES, all the same; results have
    that dtype. Convs and pools take (N, C, H, W) or unbatched (C, H, W) inputs (results follow) and
    empty batches; relu takes any shape.

    An op called inside ``convrpc.core.stopping.stopping(flag)`` stops part way once ``flag`` is set
    (the numba kernels between rows and tiles; the reference backend runs to the end) and raises
    ``CallCancelled`` or ``DeadlineExceeded`` instead of returning.
    """

    def __init__(self, name: str, kernels: Any, device: str = "cpu", max_elements: int | None = None,
                 max_flops: float | None = None):  # fmt: skip
        self.name = name
        self.device = device
        self.kernels = kernels
        self.xp = kernels.xp
        #: Largest output an op may produce (elements); None means no cap. The server sets it.
        self.max_elements = max_elements
        #: Most floating-point operations one op call may cost, estimated from its geometry before
        #: anything is allocated (a pooling window's tap counts as ``config.POOL_TAP_FLOPS``); None means no cap.
        self.max_flops = max_flops

    def with_max_elements(self, max_elements: int | None, max_flops: float | None = None) -> "Backend":
        """The same backend with a cap on the elements of any op's output and on each call's cost (a server's limits)."""
        return Backend(self.name, self.kernels, self.device, max_elements, max_flops)

    def __repr__(self) -> str:
        return f"<convrpc backend {self.name!r} on {self.device}>"

    # -- conversion -------------------------------------------------------------------------

    def _inputs(self, **named):
        """(origin, arrays) with every dtype checked (see ``common_dtype``); nothing is converted or moved yet."""
        arrays = {}
        on_host = True
        for field, a in named.items():
            if a is not None and (hasattr(a, "__cuda_array_interface__") or type(a).__module__.startswith("cupy")):
                on_host = False
            elif a is not None and not isinstance(a, np.ndarray):
                a = np.asarray(a)
            arrays[field] = a
        return _Origin(on_host, common_dtype(arrays)), list(arrays.values())

    def _device(self, origin: _Origin, *arrays, shapes=None):
        """The arrays on the device in the compute dtype, C-contiguous, native-endian, reshaped to ``shapes``."""
        compute = origin.dtype if origin.dtype in _COMPUTE_DTYPES else np.dtype(np.float32)
        out = []
        for i, a in enumerate(arrays):
            if a is not None:
                if a.dtype != compute:
                    a = a.astype(compute)  # widening a half type, or a byte swap; on the array's own device
                a = self.kernels.to_device(a)
                if shapes is not None and shapes[i] is not None:
                    a = a.reshape(shapes[i])
            out.append(a)
        return out

    def _result(self, origin: _Origin, a, shape=None):
        """A result back where the inputs came from, in their dtype (int64 indices stay int64)."""
        if a is None:
            return None
        if shape is not None:
            a = a.reshape(shape)
        if origin.on_host:
            a = self.kernels.to_host(a)
        if a.dtype.kind == "f" and a.dtype != origin.dtype:
            a = a.astype(origin.dtype)
        return a

    def _check_output(self, shape, itemsize: int = 8) -> None:
        count = 1
        for dim in shape:
            count *= dim
        if count * itemsize >= 2**63 or (self.max_elements is not None and count > self.max_elements):
            cap = self.max_elements if self.max_elements is not None else (2**63 - 1) // itemsize
            if self.max_elements is None:  # past what int64 byte offsets address: no setting lifts it
                raise ResourceExhaustedError("output", f"shape {tuple(shape)} has {count} elements, over the cap of {cap}")
            raise ResourceExhaustedError("output", f"shape {tuple(shape)} has {count} elements, over the cap of {cap}",
                                         setting="max_elements", limit=cap)  # fmt: skip

    def _check_cost(self, flops: int) -> None:
        if self.max_flops is not None and flops > self.max_flops:
            raise ResourceExhaustedError(
                "op", f"this call would cost about {flops:.3g} floating-point operations, over the cap of {self.max_flops:.3g}",
                setting="max_op_flops", limit=int(self.max_flops),
            )

    @staticmethod
    def _pool_flops(g) -> int:
        return config.POOL_TAP_FLOPS * g.n * g.c * g.out_h * g.out_w * g.kh * g.kw

    @staticmethod
    def _check_grad_output(gy, shape) -> None:
        if tuple(gy.shape) != tuple(shape):
            raise InvalidArgumentError("grad_output", f"expected shape {tuple(shape)} (the op's output), got {tuple(gy.shape)}")

    @staticmethod
    def _user_shape(g, shape):
        """``shape`` as the caller sees it: without the batch axis for an unbatched call."""
        return tuple(shape[1:]) if g.unbatched else tuple(shape)

    def _zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    # -- conv2d -------------------------------------------------------------------------------

    def conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        """(N, C, H, W) x (K, C/groups, kh, kw) -> (N, K, OH, OW); ``padding`` may be 'valid' or 'same'."""
        origin, (x, w, b) = self._inputs(input=input, weight=weight, bias=bias)
        g = params.conv2d_geometry(x.shape, w.shape, None if b is None else b.shape, stride, padding, dilation, groups)
        self._check_output(g.output_shape)
        self._check_cost(g.flops)
        x, w, b = self._device(origin, x, w, b, shapes=(g.input_shape, None, None))
        y = self._zeros(g.output_shape, x.dtype) if g.n == 0 else self.kernels.conv2d(x, w, b, g)
        if g.n == 0 and b is not None:
            y += b.reshape(1, -1, 1, 1)
        return self._result(origin, y, self._user_shape(g, g.output_shape))

    def conv2d_backward(
        self, grad_output, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, input_grad=True
    ) -> Gradients:
        """Gradients of conv2d w.r.t. input, weight and (when given) bias.

        ``input_grad=False`` skips the input gradient (returned as None): kernel fitting needs
        only the weight's, and the input gradient costs as much again.
        """
        origin, (gy, x, w, b) = self._inputs(grad_output=grad_output, input=input, weight=weight, bias=bias)
        g = params.conv2d_geometry(x.shape, w.shape, None if b is None else b.shape, stride, padding, dilation, groups)
        self._check_grad_output(gy, self._user_shape(g, g.output_shape))
        self._check_cost(g.flops * (2 if input_grad else 1))
        gy, x, w, b = self._device(origin, gy, x, w, b, shapes=(g.output_shape, g.input_shape, None, None))
        k = self.kernels
        if g.n == 0:
            gi, gw = self._zeros(g.input_shape, x.dtype), self._zeros(g.weight_shape, x.dtype)
        else:
            gi = k.conv2d_input_grad(gy, w, g) if input_grad else None
            gw = k.conv2d_weight_grad(x, gy, g)
        gi = gi if input_grad else None
        gb = None if b is None else gy.sum(axis=(0, 2, 3))
        return Gradients(
            self._result(origin, gi, self._user_shape(g, g.input_shape)), self._result(origin, gw), self._result(origin, gb)
        )

    # -- conv_transpose2d ---------------------------------------------------------------------

    def conv_transpose2d(self, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        """(N, C, H, W) x (C, K/groups, kh, kw) -> (N, K, OH, OW), the adjoint of conv2d."""
        origin, (x, w, b) = self._inputs(input=input, weight=weight, bias=bias)
        g = params.conv_transpose2d_geometry(
            x.shape, w.shape, None if b is None else b.shape, stride, padding, output_padding, groups, dilation
        )
        self._check_output(g.input_shape)
        self._check_cost(g.flops)
        x, w, b = self._device(origin, x, w, b, shapes=(g.output_shape, None, None))
        y = self._zeros(g.input_shape, x.dtype) if g.n == 0 else self.kernels.conv2d_input_grad(x, w, g)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return self._result(origin, y, self._user_shape(g, g.input_shape))

    def conv_transpose2d_backward(
        self, grad_output, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
    ) -> Gradients:
        """Gradients of conv_transpose2d w.r.t. input, weight and (when given) bias."""
        origin, (gy, x, w, b) = self._inputs(grad_output=grad_output, input=input, weight=weight, bias=bias)
        g = params.conv_transpose2d_geometry(
            x.shape, w.shape, None if b is None else b.shape, stride, padding, output_padding, groups, dilation
        )
        self._check_grad_output(gy, self._user_shape(g, g.input_shape))
        self._check_cost(2 * g.flops)
        gy, x, w, b = self._device(origin, gy, x, w, b, shapes=(g.input_shape, g.output_shape, None, None))
        k = self.kernels
        if g.n == 0:
            gi, gw = self._zeros(g.output_shape, x.dtype), self._zeros(w.shape, x.dtype)
        else:
            gi, gw = k.conv2d(gy, w, None, g), k.conv2d_weight_grad(gy, x, g)
        gb = None if b is None else gy.sum(axis=(0, 2, 3))
        return Gradients(
            self._result(origin, gi, self._user_shape(g, g.output_shape)), self._result(origin, gw), self._result(origin, gb)
        )

    # -- pooling ------------------------------------------------------------------------------

    def max_pool2d(
        self, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
    ):
        """Max over each window; padding counts as -inf.

        ``return_indices=True`` returns ``(output, indices)``: int64 flat indices ``h * W + w`` into each
        input plane, torch's (a window over padding alone gets its first tap's index, clipped to >= 0).
        """
        origin, (x,) = self._inputs(input=input)
        g = params.pool2d_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
        return_indices = params.flag(return_indices, "return_indices")
        self._check_output(g.output_shape)
        self._check_cost(self._pool_flops(g))
        (x,) = self._device(origin, x, shapes=(g.input_shape,))
        if g.n == 0:
            y, idx = self._zeros(g.output_shape, x.dtype), self._zeros(g.output_shape, self.xp.int64)
        else:
            y, idx = self.kernels.max_pool2d(x, g)
        shape = self._user_shape(g, g.output_shape)
        y = self._result(origin, y, shape)
        return (y, self._result(origin, idx, shape)) if return_indices else y

    def max_pool2d_backward(
        self, grad_output, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
    ) -> Gradients:
        """Input gradient of max_pool2d: each window's gradient goes to the element its index names.

        ``return_indices`` is accepted so the options match the forward's; it changes nothing here.
        """
        origin, (gy, x) = self._inputs(grad_output=grad_output, input=input)
        g = params.pool2d_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
        params.flag(return_indices, "return_indices")
        self._check_grad_output(gy, self._user_shape(g, g.output_shape))
        self._check_cost(self._pool_flops(g))
        gy, x = self._device(origin, gy, x, shapes=(g.output_shape, g.input_shape))
        gx = self._zeros(g.input_shape, x.dtype) if g.n == 0 else self.kernels.max_pool2d_backward(gy, x, g)
        return Gradients(self._result(origin, gx, self._user_shape(g, g.input_shape)))

    def avg_pool2d(
        self, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
    ):
        """Mean over each window: by default zero padding counts in the divisor (torch's rules throughout)."""
        origin, (x,) = self._inputs(input=input)
        g = params.pool2d_geometry(
            x.shape, kernel_size, stride, padding, 1, ceil_mode, count_include_pad, divisor_override
        )
        self._check_output(g.output_shape)
        self._check_cost(self._pool_flops(g))
        (x,) = self._device(origin, x, shapes=(g.input_shape,))
        y = self._zeros(g.output_shape, x.dtype) if g.n == 0 else self.kernels.avg_pool2d(x, g)
        return self._result(origin, y, self._user_shape(g, g.output_shape))

    def avg_pool2d_backward(
        self, grad_output, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
        divisor_override=None,
    ) -> Gradients:
        """Input gradient of avg_pool2d."""  # fmt: skip
        origin, (gy, x) = self._inputs(grad_output=grad_output, input=input)
        g = params.pool2d_geometry(
            x.shape, kernel_size, stride, padding, 1, ceil_mode, count_include_pad, divisor_override
        )
        self._check_grad_output(gy, self._user_shape(g, g.output_shape))
        self._check_cost(self._pool_flops(g))
        (gy,) = self._device(origin, gy, shapes=(g.output_shape,))
        gx = self._zeros(g.input_shape, gy.dtype) if g.n == 0 else self.kernels.avg_pool2d_backward(gy, g)
        return Gradients(self._result(origin, gx, self._user_shape(g, g.input_shape)))

    # -- relu ---------------------------------------------------------------------------------

    def relu(self, input):
        """max(input, 0), elementwise, any shape (0-d and empty included); NaN stays NaN."""
        origin, (x,) = self._inputs(input=input)
        (x,) = self._device(origin, x)
        return self._result(origin, self.kernels.relu(x))

    def relu_backward(self, grad_output, input) -> Gradients:
        """torch's rule: 0 where the result is <= 0, else grad_output (so a NaN input passes it through)."""
        origin, (gy, x) = self._inputs(grad_output=grad_output, input=input)
        self._check_grad_output(gy, x.shape)
        gy, x = self._device(origin, gy, x)
        return Gradients(self._result(origin, self.kernels.relu_backward(gy, x)))
