"""Networks: a chain of torch.nn-named layers run forward, backward and trained on one backend.

A network is a description (:class:`Sequential` of layer specs, argued and defaulted exactly like
``torch.nn``); its parameters travel separately, as a list with one dict per layer
(``{"weight": w, "bias": b}``, no "bias" key when ``bias=False``, ``{}`` for layers without
parameters) in torch's layouts::

    net = Sequential(Conv2d(1, 6, 3), ReLU(), MaxPool2d(2), Flatten(), Linear(6 * 3 * 3, 10))
    params = net.init(seed=0)
    logits = forward(backend, net, x, params)               # x: (N, 1, 8, 8)
    grads = backward(backend, net, x, params, grad_logits)  # NetworkGradients(input, params)

:func:`check_network` validates the whole chain on shapes alone, before anything is allocated:
each layer's arguments (with the op surface's integer rules), that its input fits it (errors name
``layers[i].<argument>``), the parameters (``params[i].weight``: key, shape, dtype), and the
backend's caps on every layer's output (``max_elements``) and cost (``max_flops``).

Compute: every layer but Linear and Flatten calls the backend's kernel table (the kernels behind
``Backend.conv2d``, ``conv_transpose2d``, the pools, relu and their backwards, so their parity
tests cover them), with geometries worked out once per batch size. Linear is ``x @ weight.T +
bias`` through ``backend.xp`` (BLAS), not a conv whose kernel covers the whole input: measured on
the numba backend for a forward plus backward of (64, 256) -> 120, (64, 400) -> 120 and
(64, 120) -> 10, the conv route (the im2col plumbing around the same GEMM, a 1x1 output per
sample) took 12-40x longer than the matmul, in float32 and float64 alike. Flatten is a reshape.

Activations: the forward pass of a backward or a training step keeps every layer's input (the
conv weight gradients, relu and max pool need them): the sum of the layers' input sizes, each
under the element cap. For the digits LeNet of ``bench/train.py`` at batch 64 that is 127k
elements (31 times the batch's 4k; 0.5 MB in float32). Recomputing them in the backward pass
instead would add a forward pass to every step: measured on the numba backend, 2.7 ms to a
float32 step of 8.3 ms (2.3 ms to 10.8 ms in float64), a third slower to save half a megabyte.

dtypes: float32 and float64 are computed as they are; float16 and bfloat16 are widened to float32
and the results rounded once, as the ops do. Training runs in float32 or float64 only (see
:mod:`convrpc.core.training`).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from . import config, training
from . import params as P
from .backend import DTYPES, Backend
from .errors import InvalidArgumentError, ResourceExhaustedError
from .optim import AdamOptions, SgdOptions

__all__ = [
    "LAYERS",
    "LOSSES",
    "AvgPool2d",
    "Conv2d",
    "ConvTranspose2d",
    "Flatten",
    "Linear",
    "MaxPool2d",
    "NetworkGradients",
    "NetworkProgress",
    "NetworkResult",
    "NetworkTrainConfig",
    "ReLU",
    "Sequential",
    "backward",
    "check_network",
    "fit_network",
    "forward",
]

_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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
        return check_network(self, input_shape)[-1]


class NetworkGradients(NamedTuple):
    """Gradients of a loss w.r.t. a network's input and parameters (a list shaped like ``params``)."""

    input: Any
    params: list

    def __repr__(self) -> str:  # shapes, not whole arrays
        def brief(a) -> str:
            return f"<{a.dtype} {tuple(a.shape)}>"

        layers = ", ".join("{" + ", ".join(f"{k!r}: {brief(v)}" for k, v in p.items()) + "}" for p in self.params)
        return f"NetworkGradients(input={brief(self.input)}, params=[{layers}])"


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


class _Step:
    """One layer for one input shape: output shape, cost, and its forward/backward on the kernel table."""

    flops = 0  # of the forward pass; each backward direction costs as much again

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


class _ConvStep(_Step):
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


class _ConvTransposeStep(_Step):
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


class _PoolStep(_Step):
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

    def forward(self, k, x, p):
        return k.max_pool2d(x, self.g)[0] if self.is_max else k.avg_pool2d(x, self.g)

    def backward(self, k, gy, x, p, input_grad):
        if not input_grad:
            return None, {}
        return (k.max_pool2d_backward(gy, x, self.g) if self.is_max else k.avg_pool2d_backward(gy, self.g)), {}


class _ReluStep(_Step):
    def __init__(self, layer, i: int, shape: tuple):
        super().__init__(i, shape, shape)

    def forward(self, k, x, p):
        return k.relu(x)

    def backward(self, k, gy, x, p, input_grad):
        return (k.relu_backward(gy, x) if input_grad else None), {}


class _FlattenStep(_Step):
    def __init__(self, layer, i: int, shape: tuple):
        super().__init__(i, shape, (shape[0], math.prod(shape[1:])))

    def forward(self, k, x, p):
        return x.reshape(self.output_shape)

    def backward(self, k, gy, x, p, input_grad):
        return (gy.reshape(self.input_shape) if input_grad else None), {}


class _LinearStep(_Step):
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


def _plan(net: Sequential, input_shape) -> list[_Step]:
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


def _check_params(net: Sequential, params, dtype) -> None:
    """``params`` is a list of per-layer dicts with exactly the layers' keys, shapes and (given) dtype."""
    if isinstance(params, (str, bytes, dict)) or not isinstance(params, Sequence):
        got = type(params).__name__
        raise InvalidArgumentError("params", f"expected a list of {len(net)} dicts, one per layer, got {got}")
    if len(params) != len(net):
        raise InvalidArgumentError("params", f"expected {len(net)} entries (one per layer), got {len(params)}")
    for i, (entry, shapes) in enumerate(zip(params, net.parameter_shapes())):
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"params[{i}]", f"expected a dict, got {type(entry).__name__}")
        for key in entry:
            if key not in shapes:
                kind = type(net[i]).__name__
                has = f"takes only {', '.join(shapes)}" if shapes else "has no parameters"
                if key == "bias" and shapes:
                    has = "has bias=False"
                raise InvalidArgumentError(f"params[{i}].{key}", f"unexpected: layer {i} ({kind}) {has}")
        for key, shape in shapes.items():
            field = f"params[{i}].{key}"
            if key not in entry:
                raise InvalidArgumentError(field, f"missing (expected shape {shape})")
            a = entry[key]
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                a = np.asarray(a)
            if tuple(a.shape) != shape:
                raise InvalidArgumentError(field, f"expected shape {shape}, got {tuple(a.shape)}")
            got = np.dtype(a.dtype).newbyteorder("=")
            if dtype is not None and got != dtype:
                raise InvalidArgumentError(field, f"dtype {a.dtype} differs from the input's {dtype}")


def _check_caps(backend: Backend, steps: list[_Step], *, backward: bool) -> None:
    """Every layer's output under the element cap and its op call under the cost cap, naming the layer."""
    cap, max_flops = backend.max_elements, backend.max_flops
    for s in steps:
        count = math.prod(s.output_shape)
        if cap is not None and count > cap:
            raise ResourceExhaustedError(
                f"layers[{s.index}]", f"its output {s.output_shape} has {count} elements, over the cap of {cap}",
                setting="max_elements", limit=cap,
            )  # fmt: skip
        if count * 8 >= 2**63:
            raise ResourceExhaustedError(f"layers[{s.index}]", f"its output {s.output_shape} has {count} elements")
        flops = s.flops * (2 if backward and s.flops and not isinstance(s, _PoolStep) else 1)
        if max_flops is not None and flops > max_flops:
            raise ResourceExhaustedError(
                f"layers[{s.index}]",
                f"this layer would cost about {flops:.3g} floating-point operations, over the cap of {max_flops:.3g}",
                setting="max_op_flops", limit=int(max_flops),
            )


def check_network(net: Sequential, input_shape, params=None, dtype=None) -> list[tuple]:
    """Every layer's output shape for an input of ``input_shape``: the whole chain validated, nothing computed.

    Raises InvalidArgumentError naming ``layers[i].<argument>``, ``input.shape`` or ``params[i].<key>``
    (when ``params`` is given; dtypes are compared to ``dtype`` when that is given too).
    """
    steps = _plan(net, input_shape)
    if params is not None:
        _check_params(net, params, None if dtype is None else np.dtype(dtype).newbyteorder("="))
    return [s.output_shape for s in steps]


# -- running a chain ----------------------------------------------------------------------------


class _Prepared(NamedTuple):
    """A validated call: the plan, arrays on the device in the compute dtype, and where results go."""

    steps: list
    x: Any
    params: list
    dtype: np.dtype
    on_host: bool


def _on_device(a) -> bool:
    return hasattr(a, "__cuda_array_interface__") or type(a).__module__.startswith("cupy")


def _prepare(backend: Backend, net, input, params, *, backward: bool, grad_output=None) -> _Prepared:
    """Validate the call on shapes and dtypes (caps included), then move the arrays to the device."""
    on_host = not _on_device(input)
    x = input if not on_host or isinstance(input, np.ndarray) else np.asarray(input)
    dtype = x.dtype.newbyteorder("=")
    if dtype not in DTYPES:
        raise InvalidArgumentError("input", f"dtype must be float16, bfloat16, float32 or float64, got {x.dtype}")
    steps = _plan(net, x.shape)
    _check_params(net, params, dtype)
    if grad_output is not None:
        shape = steps[-1].output_shape
        if tuple(grad_output.shape) != shape:
            got = tuple(grad_output.shape)
            raise InvalidArgumentError("grad_output", f"expected shape {shape} (the network's output), got {got}")
        if grad_output.dtype.newbyteorder("=") != dtype:
            raise InvalidArgumentError("grad_output", f"dtype {grad_output.dtype} differs from the input's {dtype}")
    _check_caps(backend, steps, backward=backward)
    compute = dtype if dtype in _COMPUTE_DTYPES else np.dtype(np.float32)
    k = backend.kernels

    def move(a):
        a = a if _on_device(a) or isinstance(a, np.ndarray) else np.asarray(a)
        return k.to_device(a.astype(compute, copy=False))

    device_params = [{key: move(v) for key, v in entry.items()} for entry in params]
    return _Prepared(steps, move(x), device_params, dtype, on_host)


def _result(backend: Backend, prep: _Prepared, a):
    if prep.on_host:
        a = backend.kernels.to_host(a)
    return a if a.dtype == prep.dtype else a.astype(prep.dtype)


def _run_forward(kernels, steps: list[_Step], x, params: list, keep: bool = False):
    """The chain's output on device arrays, and (with ``keep``) every layer's input for the backward pass."""
    inputs = []
    for s, p in zip(steps, params):
        if keep:
            inputs.append(x)
        x = s.forward(kernels, x, p)
    return x, inputs


def _run_backward(kernels, steps: list[_Step], inputs: list, params: list, grad_output, input_grad: bool = True):
    """(gradient w.r.t. the input or None, per-layer parameter gradients) from the kept layer inputs."""
    grads: list[dict] = [{} for _ in steps]
    gy = grad_output
    for s in reversed(steps):
        gy, grads[s.index] = s.backward(kernels, gy, inputs[s.index], params[s.index], input_grad or s.index > 0)
    return gy, grads


def forward(backend: Backend, net: Sequential, input, params: list):
    """The network's output for ``input`` (dtype and device of the input), every layer in one call."""
    prep = _prepare(backend, net, input, params, backward=False)
    y, _ = _run_forward(backend.kernels, prep.steps, prep.x, prep.params)
    return _result(backend, prep, y)


def backward(backend: Backend, net: Sequential, input, params: list, grad_output) -> NetworkGradients:
    """Gradients of a loss w.r.t. the input and every parameter, given its gradient w.r.t. the output."""
    gy = grad_output if _on_device(grad_output) or isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
    prep = _prepare(backend, net, input, params, backward=True, grad_output=gy)
    k = backend.kernels
    compute = prep.x.dtype
    _, inputs = _run_forward(k, prep.steps, prep.x, prep.params, keep=True)
    gx, grads = _run_backward(k, prep.steps, inputs, prep.params, k.to_device(gy.astype(compute, copy=False)))
    return NetworkGradients(
        _result(backend, prep, gx), [{key: _result(backend, prep, v) for key, v in g.items()} for g in grads]
    )


# -- training -----------------------------------------------------------------------------------

#: Loss names of network training, in the order of the proto's ``Loss`` enum: training.LOSSES, then cross_entropy.
LOSSES = (*training.LOSSES, "cross_entropy")


@dataclass(frozen=True, eq=False)
class NetworkTrainConfig:
    """Everything a network fit needs besides the data and parameters (rules as in :class:`training.TrainConfig`).

    ``batch_size`` 0/None means full batch, else each epoch visits a permutation of the samples
    drawn from ``seed`` in batches of that size; ``max_seconds`` 0/None means no limit;
    ``report_every`` 0 means 1. ``seed`` also draws the parameters when fit_network gets none.
    """

    loss: str = "mse"
    optimizer: SgdOptions | AdamOptions = field(default_factory=SgdOptions)
    max_steps: int = 1000
    tol: float = 0.0
    batch_size: int | None = None
    seed: int | None = None
    max_seconds: float | None = None
    report_every: int = 1


@dataclass(frozen=True, eq=False)
class NetworkProgress:
    """State after ``step`` updates: the loss of the parameters before the last update (on its batch),
    seconds since the run began, the L2 norm of that update's gradient (all parameters) and, for
    cross_entropy, the share of that batch classified right."""

    step: int
    loss: float
    elapsed: float
    grad_norm: float
    accuracy: float | None = None


@dataclass(frozen=True, eq=False)
class NetworkResult:
    """The final state: host parameters (the layout of ``params``), the full-data loss (and accuracy,
    for cross_entropy) of exactly these, updates run, why it stopped, and the loss curve
    ``history`` (float64, steps + 1 long, as :class:`training.TrainResult`'s)."""

    params: list
    loss: float
    steps: int
    stop_reason: str
    elapsed: float
    history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    accuracy: float | None = None


def fit_network(
    backend: Backend,
    net: Sequential,
    input,
    target,
    params: list | None,
    config: NetworkTrainConfig,
    *,
    stop_event: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[NetworkProgress | NetworkResult]:
    """Validate now, then return the run's events: NetworkProgress..., NetworkResult (last, exactly one).

    Fits every parameter with ``config.optimizer`` (torch.optim's rules, over the parameters in
    layer order, weight then bias) to minimise ``config.loss`` of ``forward(net, input)`` against
    ``target``: for mse/half_mse/half_sse a float array of the output's shape, for cross_entropy
    int64 class indices (N,) in [0, classes) against logits (N, classes). ``params`` None draws
    them with ``net.init(config.seed)``. Stop reasons and rules are fit_kernel's (see
    :func:`training.descend`). Raises InvalidArgumentError/ResourceExhaustedError at call time.
    """
    run = _NetworkRun(backend, net, input, target, params, config)
    return run.events(stop_event, clock)


def _cross_entropy(xp, z, t, index) -> tuple[float, Any, float]:
    """(mean loss, gradient w.r.t. the logits z (N, K), share right) of F.cross_entropy with class indices t."""
    n = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)  # log-sum-exp, stable
    e = xp.exp(shifted)
    s = e.sum(axis=1)
    loss = float((xp.log(s) - shifted[index, t]).sum()) / n
    grad = e / s[:, None]
    grad[index, t] -= 1
    grad /= n
    right = float((z.argmax(axis=1) == t).sum()) / n
    return loss, grad, right


class _Measured:
    """What measuring a batch leaves for its gradient: the layers' inputs, the loss's gradient (or the
    residual), and the batch accuracy (cross_entropy). The gradient pass drops the first two, so the
    next step's forward does not run while the last one's activations are still held."""

    __slots__ = ("inputs", "grad_z", "accuracy")

    def __init__(self, inputs, grad_z, accuracy):
        self.inputs, self.grad_z, self.accuracy = inputs, grad_z, accuracy


class _NetworkRun:
    """One validated network fit: data and parameters on the device, plans per batch size, the loss."""

    def __init__(self, backend: Backend, net, input, target, params, c: NetworkTrainConfig):
        if not isinstance(c, NetworkTrainConfig):
            raise InvalidArgumentError("config", f"expected a NetworkTrainConfig, got {type(c).__name__}")
        self.backend = backend
        xp = self.xp = backend.xp
        k = self.kernels = backend.kernels
        x = training.device_array(xp, input, "input")
        steps = _plan(net, x.shape)
        if c.loss not in LOSSES:
            raise InvalidArgumentError("loss", f"expected one of {', '.join(LOSSES)}, got {c.loss!r}")
        self.loss_name = c.loss
        out_shape = steps[-1].output_shape
        if c.loss == "cross_entropy":
            if len(out_shape) != 2:
                raise InvalidArgumentError(
                    "loss", f"cross_entropy needs logits (N, classes), but the network's output has shape {out_shape}"
                )
            y = xp.asarray(target)
            if y.dtype.kind not in "iu":
                raise InvalidArgumentError("target", f"cross_entropy takes int64 class indices, got dtype {y.dtype}")
            if tuple(y.shape) != out_shape[:1]:
                got = tuple(y.shape)
                raise InvalidArgumentError("target", f"expected shape {out_shape[:1]} (a class per sample), got {got}")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= out_shape[1]:
                bad = low if low < 0 else high
                raise InvalidArgumentError("target", f"class indices must be in [0, {out_shape[1]}), got {bad}")
            y = xp.ascontiguousarray(y.astype(np.int64))
        else:
            y = training.device_array(xp, target, "target", x.dtype)
            if tuple(y.shape) != out_shape:
                got = tuple(y.shape)
                raise InvalidArgumentError("target", f"expected shape {out_shape} (the network's output), got {got}")
        self.rules = training.run_rules(c)
        self.batch_size = self.rules.batch_size
        seed = self.rules.seed
        _, self.shuffle_rng = training.run_rngs(seed)
        self.optimizer = training.build_optimizer(c.optimizer, xp)
        _check_caps(backend, steps, backward=True)
        if params is None:
            cap = backend.max_elements
            for i, shapes in enumerate(net.parameter_shapes()):
                for key, shape in shapes.items():
                    if cap is not None and math.prod(shape) > cap:
                        raise ResourceExhaustedError(f"params[{i}].{key}", f"shape {shape} is over the cap of {cap}"
                                                     " elements", setting="max_elements", limit=cap)  # fmt: skip
            params = net.init(seed, dtype=x.dtype)
        _check_params(net, params, x.dtype)
        # The result must not alias the caller's arrays: copy them once onto the device.
        self.layout = [(i, key) for i, entry in enumerate(params) for key in entry]
        self.params = [k.to_device(training.device_array(xp, params[i][key], f"params[{i}].{key}", x.dtype).copy())
                       for i, key in self.layout]  # fmt: skip
        self.net, self.n_layers = net, len(net)
        self.x, self.y = k.to_device(x), y
        self._plans = {x.shape[0]: steps}
        if self.batch_size >= x.shape[0]:
            self.batch_size = 0  # one batch holding every sample is the full batch
        self.index = {}

    def _layers(self, flat: list) -> list[dict]:
        out: list[dict] = [{} for _ in range(self.n_layers)]
        for (i, key), a in zip(self.layout, flat):
            out[i][key] = a
        return out

    def _steps(self, n: int) -> list[_Step]:
        steps = self._plans.get(n)
        if steps is None:
            steps = self._plans[n] = _plan(self.net, (n, *self.x.shape[1:]))
        return steps

    def _measure(self, batch, flat: list, keep: bool) -> tuple[float, _Measured]:
        """The loss of the parameters on ``batch`` = (x, y), and what its gradient needs."""
        xb, yb = batch
        layers = self._layers(flat)
        z, inputs = _run_forward(self.kernels, self._steps(xb.shape[0]), xb, layers, keep=keep)
        if self.loss_name == "cross_entropy":
            index = self.index.get(xb.shape[0])
            if index is None:
                index = self.index[xb.shape[0]] = self.xp.arange(xb.shape[0])
            loss, grad, accuracy = _cross_entropy(self.xp, z, yb, index)
            return loss, _Measured(inputs, grad, accuracy)
        r = z - yb
        return training.regression_loss(self.xp, r, self.loss_name), _Measured(inputs, r, None)

    def _gradients(self, batch, measured: _Measured, flat: list):
        inputs, grad_z = measured.inputs, measured.grad_z
        measured.inputs = measured.grad_z = None
        if self.loss_name != "cross_entropy":
            grad_z = training.regression_grad(grad_z, self.loss_name)
        layers = self._layers(flat)
        _, grads = _run_backward(self.kernels, self._steps(batch[0].shape[0]), inputs, layers, grad_z, input_grad=False)
        out = [grads[i][key] for i, key in self.layout]
        norm = math.sqrt(sum(float(self.xp.vdot(g.reshape(-1), g.reshape(-1))) for g in out))
        return out, norm

    def _host(self, a):
        to_numpy = getattr(self.xp, "asnumpy", None)
        return to_numpy(a) if to_numpy is not None else np.asarray(a)

    def _batches(self):
        for idx in training.minibatches(self.xp, self.x.shape[0], self.batch_size, self.shuffle_rng):
            yield (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])

    def events(self, stop_event, clock) -> Iterator[NetworkProgress | NetworkResult]:
        def progress(step, loss, elapsed, grad_norm, info, flat):
            return NetworkProgress(step, loss, elapsed, grad_norm, info.accuracy)

        def result(flat, loss, info, steps, reason, elapsed, history):
            host = self._layers([self._host(a) for a in flat])
            return NetworkResult(host, loss, steps, reason, elapsed, history, info.accuracy)

        yield from training.descend(
            self.params, self.optimizer, self._batches(),
            lambda batch, flat: self._measure(batch, flat, keep=True), self._gradients,
            lambda flat: self._measure((self.x, self.y), flat, keep=False),
            full_batch=not self.batch_size, rules=self.rules, progress=progress, result=result, stop_event=stop_event,
            clock=clock,
        )  # fmt: skip
