"""The public op surface every backend shares: torch-named ops that validate, then call a kernel table.

A backend is a small table of kernels (see :class:`Kernels`) working on checked arrays and a
geometry from :mod:`convrpc.core.params`. :class:`Backend` wraps such a table in methods named,
ordered and defaulted like ``torch.nn.functional``; the server's handlers and the SDK's methods
mirror these exactly. conv_transpose2d is built from the conv2d kernels (it is conv2d's input
gradient), so a table has only nine kernels.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np

from . import params
from .errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["Backend", "Gradients", "Kernels", "SUPPORTED_DTYPES", "OPS"]

#: Element types every backend computes in.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: The ops of the contract, in their canonical order.
OPS = ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "relu")


class Gradients(NamedTuple):
    """Gradients of the loss with respect to an op's inputs; ``None`` where an input has none."""

    input: Any
    weight: Any = None
    bias: Any = None


class Kernels(Protocol):
    """What a backend module provides. Arrays are C-contiguous, of one dtype, on the backend's device.

    ``conv2d(x, w, b, g)`` -> y; ``conv2d_input_grad(gy, w, g)`` -> gx;
    ``conv2d_weight_grad(x, gy, g)`` -> gw; ``max_pool2d(x, g)``; ``max_pool2d_backward(gy, x, g)``;
    ``avg_pool2d(x, g)``; ``avg_pool2d_backward(gy, g)``; ``relu(x)``; ``relu_backward(gy, x)``.
    ``xp`` is the array module; ``to_device``/``to_host`` move arrays in and out.
    """

    xp: Any


class Backend:
    """Ops with torch.nn.functional names and semantics over one kernel table.

    Arrays in, arrays out: host (NumPy) inputs give host outputs; device inputs of a GPU backend
    give device outputs. Every tensor must be float32 or float64, all of one dtype.
    """

    def __init__(self, name: str, kernels: Any, device: str = "cpu", max_elements: int | None = None):
        self.name = name
        self.device = device
        self.kernels = kernels
        self.xp = kernels.xp
        #: Largest output an op may produce (elements); None means no cap. The server sets it.
        self.max_elements = max_elements

    def with_max_elements(self, max_elements: int | None) -> "Backend":
        """The same backend with a cap on the elements of any op's output (a server's limit)."""
        return Backend(self.name, self.kernels, self.device, max_elements)

    def __repr__(self) -> str:
        return f"<convrpc backend {self.name!r} on {self.device}>"

    # -- conversion -------------------------------------------------------------------------

    def _arrays(self, **named):
        """Check dtypes and move every non-None array to the device, C-contiguous and native-endian.

        All must share one dtype; a mismatch names the odd one out (the majority's dtype wins, the
        input's on a tie).
        """
        arrays = {}
        on_host = True
        for field, a in named.items():
            if a is None:
                continue
            if hasattr(a, "__cuda_array_interface__") or type(a).__module__.startswith("cupy"):
                on_host = False
            elif not isinstance(a, np.ndarray):
                a = np.asarray(a)
            if a.dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
                raise InvalidArgumentError(field, f"dtype must be float32 or float64, got {a.dtype}")
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            arrays[field] = a
        dtypes = [a.dtype for a in arrays.values()]
        first = arrays["input"].dtype if "input" in arrays else dtypes[0]
        dtype = max(dict.fromkeys([first, *dtypes]), key=dtypes.count)
        for field, a in arrays.items():
            if a.dtype != dtype:
                raise InvalidArgumentError(field, f"dtype {a.dtype} differs from the other tensors' {dtype}")
        return on_host, [None if named[f] is None else self.kernels.to_device(arrays[f]) for f in named]

    def _result(self, on_host: bool, a):
        return None if a is None else (self.kernels.to_host(a) if on_host else a)

    def _grads(self, on_host, gi, gw=None, gb=None) -> Gradients:
        return Gradients(self._result(on_host, gi), self._result(on_host, gw), self._result(on_host, gb))

    def _check_output(self, shape) -> None:
        if self.max_elements is not None:
            count = 1
            for dim in shape:
                count *= dim
            if count > self.max_elements:
                raise ResourceExhaustedError(
                    "output", f"shape {tuple(shape)} has {count} elements, over the cap of {self.max_elements}"
                )

    @staticmethod
    def _check_grad_output(gy, shape) -> None:
        if tuple(gy.shape) != tuple(shape):
            raise InvalidArgumentError("grad_output", f"expected shape {tuple(shape)} (the op's output), got {tuple(gy.shape)}")

    def _bias_grad(self, gy):
        return gy.sum(axis=(0, 2, 3))

    # -- conv2d -------------------------------------------------------------------------------

    def conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        """(N, C, H, W) x (K, C/groups, kh, kw) -> (N, K, OH, OW); ``padding`` may be 'valid' or 'same'."""
        on_host, (x, w, b) = self._arrays(input=input, weight=weight, bias=bias)
        g = params.conv2d_geometry(x.shape, w.shape, None if b is None else b.shape, stride, padding, dilation, groups)
        self._check_output(g.output_shape)
        return self._result(on_host, self.kernels.conv2d(x, w, b, g))

    def conv2d_backward(
        self, grad_output, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, input_grad=True
    ) -> Gradients:
        """Gradients of conv2d w.r.t. input, weight and (when given) bias.

        ``input_grad=False`` skips the input gradient (returned as None): kernel fitting needs
        only the weight's, and the input gradient costs as much again.
        """
        on_host, (gy, x, w, b) = self._arrays(grad_output=grad_output, input=input, weight=weight, bias=bias)
        g = params.conv2d_geometry(x.shape, w.shape, None if b is None else b.shape, stride, padding, dilation, groups)
        self._check_grad_output(gy, g.output_shape)
        k = self.kernels
        gi = k.conv2d_input_grad(gy, w, g) if input_grad else None
        gb = None if b is None else self._bias_grad(gy)
        return self._grads(on_host, gi, k.conv2d_weight_grad(x, gy, g), gb)

    # -- conv_transpose2d ---------------------------------------------------------------------

    def conv_transpose2d(self, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        """(N, C, H, W) x (C, K/groups, kh, kw) -> (N, K, OH, OW), the adjoint of conv2d."""
        on_host, (x, w, b) = self._arrays(input=input, weight=weight, bias=bias)
        g = params.conv_transpose2d_geometry(
            x.shape, w.shape, None if b is None else b.shape, stride, padding, output_padding, groups, dilation
        )
        self._check_output(g.input_shape)
        y = self.kernels.conv2d_input_grad(x, w, g)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return self._result(on_host, y)

    def conv_transpose2d_backward(
        self, grad_output, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
    ) -> Gradients:
        """Gradients of conv_transpose2d w.r.t. input, weight and (when given) bias."""
        on_host, (gy, x, w, b) = self._arrays(grad_output=grad_output, input=input, weight=weight, bias=bias)
        g = params.conv_transpose2d_geometry(
            x.shape, w.shape, None if b is None else b.shape, stride, padding, output_padding, groups, dilation
        )
        self._check_grad_output(gy, g.input_shape)
        k = self.kernels
        gb = None if b is None else self._bias_grad(gy)
        return self._grads(on_host, k.conv2d(gy, w, None, g), k.conv2d_weight_grad(gy, x, g), gb)

    # -- pooling ------------------------------------------------------------------------------

    def max_pool2d(self, input, kernel_size, stride=None, padding=0, dilation=1):
        """Max over each window; padding counts as -inf."""
        on_host, (x,) = self._arrays(input=input)
        g = params.pool2d_geometry(x.shape, kernel_size, stride, padding, dilation)
        return self._result(on_host, self.kernels.max_pool2d(x, g))

    def max_pool2d_backward(self, grad_output, input, kernel_size, stride=None, padding=0, dilation=1) -> Gradients:
        """Input gradient of max_pool2d: each window's gradient goes to its first maximum."""
        on_host, (gy, x) = self._arrays(grad_output=grad_output, input=input)
        g = params.pool2d_geometry(x.shape, kernel_size, stride, padding, dilation)
        self._check_grad_output(gy, g.output_shape)
        return self._grads(on_host, self.kernels.max_pool2d_backward(gy, x, g))

    def avg_pool2d(self, input, kernel_size, stride=None, padding=0):
        """Mean over each window, zero padding included in the count (torch's default)."""
        on_host, (x,) = self._arrays(input=input)
        g = params.pool2d_geometry(x.shape, kernel_size, stride, padding)
        return self._result(on_host, self.kernels.avg_pool2d(x, g))

    def avg_pool2d_backward(self, grad_output, input, kernel_size, stride=None, padding=0) -> Gradients:
        """Input gradient of avg_pool2d."""
        on_host, (gy, x) = self._arrays(grad_output=grad_output, input=input)
        g = params.pool2d_geometry(x.shape, kernel_size, stride, padding)
        self._check_grad_output(gy, g.output_shape)
        return self._grads(on_host, self.kernels.avg_pool2d_backward(gy, g))

    # -- relu ---------------------------------------------------------------------------------

    def relu(self, input):
        """max(input, 0), elementwise; NaN stays NaN."""
        on_host, (x,) = self._arrays(input=input)
        return self._result(on_host, self.kernels.relu(x))

    def relu_backward(self, grad_output, input) -> Gradients:
        """grad_output where input > 0, else 0."""
        on_host, (gy, x) = self._arrays(grad_output=grad_output, input=input)
        self._check_grad_output(gy, x.shape)
        return self._grads(on_host, self.kernels.relu_backward(gy, x))
