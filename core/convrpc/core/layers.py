"""Layer specs named and argued like torch.nn, :class:`Sequential`, and each layer planned for one input shape.

A spec is a frozen description (``Conv2d(1, 6, 5)``); :func:`plan` checks a chain of them against
an input shape on shapes alone (errors name ``layers[i].<argument>``) and returns one
:class:`Step` per layer: its geometry, output shape and cost, and its forward and backward on a
backend's kernel table. :mod:`convrpc.core.network` validates whole calls and runs them.

Compute: every layer but Linear and Flatten calls the backend's kernel table (the kernels behind
``Backend.conv2d``, ``conv_transpose2d``, the pools, relu and their backwards, so their parity
tests cover them), with geometries worked out once per batch size. Linear is ``x @ weight.T +
bias`` through ``backend.xp`` (BLAS), not a conv whose kernel covers the whole input: measured on
the numba backend for a forward plus backward of (64, 256) -> 120, (64, 400) -> 120 and
(64, 120) -> 10, the conv route (the im2col plumbing around the same GEMM, a 1x1 output per
sample) took 12-40x longer than the matmul, in float32 and float64 alike. Flatten is a reshape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from . import config
from . import params as P
from .backend import DTYPES, Backend
from .errors import InvalidArgumentError

__all__ = [
    "LAYERS",
    "AvgPool2d",
    "Conv2d",
    "ConvTranspose2d",
    "Flatten",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "Sequential",
    "Step",
    "plan",
    "run_backward",
    "run_forward",
]

# -- layer specs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv2d:
    """torch.nn.Conv2d: weight (out_channels, in_channels/groups, kh, kw), bias (out_channels,)."""

    in_channels: int
    out_channels: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    bias: bool = True


@dataclass(frozen=True)
class ConvTranspose2d:
    """torch.nn.ConvTranspose2d: weight (in_channels, out_channels/groups, kh, kw), bias (out_channels,)."""

    in_channels: int
    out_channels: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0
    output_padding: Any = 0
    groups: int = 1
    bias: bool = True
    dilation: Any = 1


@dataclass(frozen=True)
class MaxPool2d:
    """torch.nn.MaxPool2d (``stride=None`` means the kernel size)."""

    kernel_size: Any
    stride: Any = None
    padding: Any = 0
    dilation: Any = 1
    ceil_mode: bool = False


@dataclass(frozen=True)
class AvgPool2d:
    """torch.nn.AvgPool2d (``stride=None`` means the kernel size)."""

    kernel_size: Any
    stride: Any = None
    padding: Any = 0
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None


@dataclass(frozen=True)
class ReLU:
    """torch.nn.ReLU: max(x, 0) elementwise."""


@dataclass(frozen=True)
class Flatten:
    """torch.nn.Flatten with its defaults: (N, d1, d2, ...) -> (N, d1*d2*...)."""


@dataclass(frozen=True)
class Linear:
    """torch.nn.Linear on the last axis: weight (out_features, in_features), bias (out_features,)."""

    in_features: int
    out_features: int
    bias: bool = True


#: Every layer kind, in the order of the proto's layer messages.
LAYERS = (Conv2d, ConvTranspose2d, MaxPool2d, AvgPool2d, ReLU, Flatten, Linear)


class Sequential:
    """A chain of layer specs, applied in order: ``.layers`` (a tuple), len(), iteration, indexing."""

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not isinstance(layer, LAYERS):
                names = ", ".join(kind.__name__ for kind in LAYERS)
                raise InvalidArgumentError(f"layers[{i}]", f"expected a layer spec ({names}), got {layer!r}")
        self.layers = tuple(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator:
        return iter(self.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*self.layers[index])
        return self.layers[index]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequential) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(self.layers)

    def __repr__(self) -> str:  # torch's layout, with each spec's own (constructible) repr
        if not self.layers:
            return "Sequential()"
        lines = "".join(f"  ({i}): {layer!r}\n" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{lines})"

    def parameter_shapes(self) -> list[dict[str, tuple]]:
        """Per layer, the shape of each parameter (``{}`` for layers without any); checks the layers' arguments."""
        return [_parameter_shapes(layer, i) for i, layer in enumerate(self.layers)]

    def init(self, seed: int | None = None, dtype=np.float64) -> list[dict]:
        """Fresh parameters drawn like torch's ``reset_parameters``, layer by layer, weight then bias.

        Weights are Kaiming-uniform and biases uniform, both U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        fan_in = weight.shape[1] * kh * kw (in_features for Linear), drawn in float64 from ``seed``
        and cast to ``dtype``.
        """
        dtype = np.dtype(dtype)
        if dtype not in DTYPES:
            raise InvalidArgumentError("dtype", f"expected one of {', '.join(map(str, DTYPES))}, got {dtype}")
        shapes = self.parameter_shapes()
        rng = np.random.default_rng(seed)
        out = []
        for entry in shapes:
            drawn = {}
            if entry:
                fan_in = math.prod(entry["weight"][1:])
                bound = 1.0 / math.sqrt(fan_in)
                for name, shape in entry.items():
                    drawn[name] = rng.uniform(-bound, bound, size=shape).astype(dtype)
            out.append(drawn)
        return out

    def output_shape(self, input_shape) -> tuple:
        """The network's output shape for an input of ``input_shape``; validates the chain, computes nothing."""
        return plan(self, input_shape)[-1].output_shape


# -- argument checks ----------------------------------------------------------------------------


def _int(value, field: str, minimum: int = 1) -> int:
    if not P._is_int(value):
        raise InvalidArgumentError(field, f"expected an int, got {value!r}")
    if not minimum <= int(value) <= config.MAX_GEOMETRY_INT:
        raise InvalidArgumentError(field, f"must be an int in [{minimum}, {config.MAX_GEOMETRY_INT}], got {value!r}")
    return int(value)


def _renamed(exc: InvalidArgumentError, index: int, rename: dict | None = None) -> InvalidArgumentError:
    """A geometry error pointed at the layer's argument (``weight`` -> ``kernel_size`` and the like)."""
    name = (rename or {}).get(exc.field, exc.field)
    return InvalidArgumentError(f"layers[{index}].{name}", exc.description)


def _conv_channels(layer, i: int) -> tuple[int, int, int]:
    prefix = f"layers[{i}]"
    c_in = _int(layer.in_channels, f"{prefix}.in_channels")
    c_out = _int(layer.out_channels, f"{prefix}.out_channels")
    groups = _int(layer.groups, f"{prefix}.groups")
    for name, value in (("in_channels", c_in), ("out_channels", c_out)):
        if value % groups:
            raise InvalidArgumentError(f"{prefix}.groups", f"{name} {value} is not divisible by groups={groups}")
    P.flag(layer.bias, f"{prefix}.bias")
    return c_in, c_out, groups


def _parameter_shapes(layer, i: int) -> dict[str, tuple]:
    """The layer's parameter shapes in torch's layouts, its arguments checked."""
    if isinstance(layer, (Conv2d, ConvTranspose2d)):
        c_in, c_out, groups = _conv_channels(layer, i)
        kh, kw = P.pair(layer.kernel_size, f"layers[{i}].kernel_size", minimum=1)
        if isinstance(layer, Conv2d):
            shapes = {"weight": (c_out, c_in // groups, kh, kw)}
        else:
            shapes = {"weight": (c_in, c_out // groups, kh, kw)}
    elif isinstance(layer, Linear):
        c_out = _int(layer.out_features, f"layers[{i}].out_features")
        shapes = {"weight": (c_out, _int(layer.in_features, f"layers[{i}].in_features"))}
        P.flag(layer.bias, f"layers[{i}].bias")
    else:
        return {}
    if layer.bias:
        shapes["bias"] = (c_out,)
    return shapes


def _input_shape(shape) -> tuple:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InvalidArgumentError("input.shape", f"expected a sequence of ints, got {shape!r}") from None
    if len(shape) < 2:
        raise InvalidArgumentError("input.shape", f"expected a batch (N, C, H, W) or (N, features), got shape {shape}")
    if min(shape) <= 0:
        raise InvalidArgumentError("input.shape", f"every dimension must be > 0, got shape {shape}")
    return shape


# -- planned layers: a layer with its geometry for one input shape ------------------------------


class Step:
    """One layer for one input shape: output shape, cost, and its forward/backward on the kernel table."""

    flops = 0  # of the forward pass

    @property
    def backward_flops(self) -> int:
        """Of the backward pass: each direction (input, parameters) costs about a forward."""
        return 2 * self.flops

    def __init__(self, index: int, input_shape: tuple, output_shape: tuple):
        self.index = index
        self.input_shape = input_shape
        self.output_shape = output_shape

    def forward(self, k, x, p):
        raise NotImplementedError

    def backward(self, k, gy, x, p, input_grad: bool) -> tuple[Any, dict]:
        """(gradient w.r.t. the input or None, gradients of the parameters); ``x`` is the forward's input."""
        raise NotImplementedError


def _needs_4d(layer, i: int, shape: tuple) -> None:
    if len(shape) != 4:
        hint = " (a Linear or Flatten before it changed the rank)" if len(shape) < 4 else ""
        raise InvalidArgumentError(
            f"layers[{i}]", f"{type(layer).__name__} expects a 4-d (N, C, H, W) input, got shape {shape}{hint}"
        )


class _ConvStep(Step):
    def __init__(self, layer: Conv2d, i: int, shape: tuple):
        _needs_4d(layer, i, shape)
        wshape = _parameter_shapes(layer, i)["weight"]
        if shape[1] != layer.in_channels:
            raise InvalidArgumentError(f"layers[{i}].in_channels", f"expected {shape[1]}, got {layer.in_channels}")
        try:
            self.g = P.conv2d_geometry(shape, wshape, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        except InvalidArgumentError as exc:
            raise _renamed(exc, i, {"weight": "kernel_size"}) from None
        super().__init__(i, shape, self.g.output_shape)
        self.flops = self.g.flops

    def forward(self, k, x, p):
        return k.conv2d(x, p["weight"], p.get("bias"), self.g)

    def backward(self, k, gy, x, p, input_grad):
        grads = {"weight": k.conv2d_weight_grad(x, gy, self.g)}
        if "bias" in p:
            grads["bias"] = gy.sum(axis=(0, 2, 3))
        return (k.conv2d_input_grad(gy, p["weight"], self.g) if input_grad else None), grads


class _ConvTransposeStep(Step):
    def __init__(self, layer: ConvTranspose2d, i: int, shape: tuple):
        _needs_4d(layer, i, shape)
        wshape = _parameter_shapes(layer, i)["weight"]
        if shape[1] != layer.in_channels:
            raise InvalidArgumentError(f"layers[{i}].in_channels", f"expected {shape[1]}, got {layer.in_channels}")
        try:
            self.g = P.conv_transpose2d_geometry(shape, wshape, None, layer.stride, layer.padding,
                                                 layer.output_padding, layer.groups, layer.dilation)  # fmt: skip
        except InvalidArgumentError as exc:
            raise _renamed(exc, i, {"weight": "kernel_size"}) from None
        super().__init__(i, shape, self.g.input_shape)  # the adjoint conv's input is this layer's output
        self.flops = self.g.flops

    def forward(self, k, x, p):
        y = k.conv2d_input_grad(x, p["weight"], self.g)
        if "bias" in p:
            y += p["bias"].reshape(1, -1, 1, 1)
        return y

    def backward(self, k, gy, x, p, input_grad):
        grads = {"weight": k.conv2d_weight_grad(gy, x, self.g)}
        if "bias" in p:
            grads["bias"] = gy.sum(axis=(0, 2, 3))
        return (k.conv2d(gy, p["weight"], None, self.g) if input_grad else None), grads


class _PoolStep(Step):
    def __init__(self, layer, i: int, shape: tuple):
        _needs_4d(layer, i, shape)
        try:
            if isinstance(layer, MaxPool2d):
                self.g = P.pool2d_geometry(shape, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                           layer.ceil_mode)  # fmt: skip
            else:
                self.g = P.pool2d_geometry(shape, layer.kernel_size, layer.stride, layer.padding, 1, layer.ceil_mode,
                                           layer.count_include_pad, layer.divisor_override)  # fmt: skip
        except InvalidArgumentError as exc:
            raise _renamed(exc, i) from None
        self.is_max = isinstance(layer, MaxPool2d)
        super().__init__(i, shape, self.g.output_shape)
        self.flops = Backend._pool_flops(self.g)

    @property
    def backward_flops(self) -> int:
        return self.flops  # as Backend.max_pool2d_backward and avg_pool2d_backward count it

    def forward(self, k, x, p):
        return k.max_pool2d(x, self.g)[0] if self.is_max else k.avg_pool2d(x, self.g)

    def backward(self, k, gy, x, p, input_grad):
        if not input_grad:
            return None, {}
        return (k.max_pool2d_backward(gy, x, self.g) if self.is_max else k.avg_pool2d_backward(gy, self.g)), {}


class _ReluStep(Step):
    def __init__(self, layer, i: int, shape: tuple):
        super().__init__(i, shape, shape)

    def forward(self, k, x, p):
        return k.relu(x)

    def backward(self, k, gy, x, p, input_grad):
        return (k.relu_backward(gy, x) if input_grad else None), {}


class _FlattenStep(Step):
    def __init__(self, layer, i: int, shape: tuple):
        super().__init__(i, shape, (shape[0], math.prod(shape[1:])))

    def forward(self, k, x, p):
        return x.reshape(self.output_shape)

    def backward(self, k, gy, x, p, input_grad):
        return (gy.reshape(self.input_shape) if input_grad else None), {}


class _LinearStep(Step):
    def __init__(self, layer: Linear, i: int, shape: tuple):
        out_features, in_features = _parameter_shapes(layer, i)["weight"]
        if shape[-1] != in_features:
            hint = f" (the last axis of shape {shape}; put a Flatten before it)" if len(shape) > 2 else ""
            raise InvalidArgumentError(f"layers[{i}].in_features", f"expected {shape[-1]}, got {in_features}{hint}")
        super().__init__(i, shape, (*shape[:-1], out_features))
        self.flops = 2 * math.prod(shape) * out_features

    def forward(self, k, x, p):
        y = x @ p["weight"].T
        if "bias" in p:
            y += p["bias"]
        return y

    def backward(self, k, gy, x, p, input_grad):
        gy2 = gy.reshape(-1, gy.shape[-1])
        grads = {"weight": gy2.T @ x.reshape(-1, x.shape[-1])}
        if "bias" in p:
            grads["bias"] = gy2.sum(axis=0)
        return (gy @ p["weight"] if input_grad else None), grads


_STEPS = {
    Conv2d: _ConvStep,
    ConvTranspose2d: _ConvTransposeStep,
    MaxPool2d: _PoolStep,
    AvgPool2d: _PoolStep,
    ReLU: _ReluStep,
    Flatten: _FlattenStep,
    Linear: _LinearStep,
}


def plan(net: Sequential, input_shape) -> list[Step]:
    """One Step per layer for an input of ``input_shape``, the chain checked on shapes alone."""
    if not isinstance(net, Sequential):
        raise InvalidArgumentError("net", f"expected a Sequential, got {type(net).__name__}")
    if not net.layers:
        raise InvalidArgumentError("layers", "a network needs at least one layer")
    shape = _input_shape(input_shape)
    steps = []
    for i, layer in enumerate(net.layers):
        step = _STEPS[type(layer)](layer, i, shape)
        steps.append(step)
        shape = step.output_shape
    return steps


def run_forward(kernels, steps: list[Step], x, params: list, keep: bool = False):
    """The chain's output on device arrays, and (with ``keep``) every layer's input for the backward pass."""
    inputs = []
    for s, p in zip(steps, params):
        if keep:
            inputs.append(x)
        x = s.forward(kernels, x, p)
    return x, inputs


def run_backward(kernels, steps: list[Step], inputs: list, params: list, grad_output, input_grad: bool = True):
    """(gradient w.r.t. the input or None, per-layer parameter gradients) from the kept layer inputs."""
    grads: list[dict] = [{} for _ in steps]
    gy = grad_output
    for s in reversed(steps):
        gy, grads[s.index] = s.backward(kernels, gy, inputs[s.index], params[s.index], input_grad or s.index > 0)
    return gy, grads
