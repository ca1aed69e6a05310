"""Networks: a chain of torch.nn-named layers run forward, backward and trained on one backend.

A network is a description (:class:`Sequential` of layer specs, argued and defaulted exactly like
``torch.nn``); its parameters travel separately, as a list with one dict per layer
(``{"weight": w, "bias": b}``, no "bias" key when ``bias=False``, ``{}`` for layers without
parameters) in torch's layouts. The layer specs and how each computes are :mod:`convrpc.core.layers`
(re-exported here); this module validates whole calls, runs them and trains::

    net = Sequential(Conv2d(1, 6, 3), ReLU(), MaxPool2d(2), Flatten(), Linear(6 * 3 * 3, 10))
    params = net.init(seed=0)
    logits = forward(backend, net, x, params)               # x: (N, 1, 8, 8)
    grads = backward(backend, net, x, params, grad_logits)  # NetworkGradients(input, params)

:func:`check_network` validates the whole chain on shapes alone, before anything is allocated:
each layer's arguments (with the op surface's integer rules), that its input fits it (errors name
``layers[i].<argument>``), the parameters (``params[i].weight``: key, shape, dtype), and the
backend's caps on every layer's output (``max_elements``) and cost (``max_flops``).

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

from . import training
from .backend import DTYPES, Backend
from .errors import InvalidArgumentError, ResourceExhaustedError
from .layers import (
    LAYERS,
    AvgPool2d,
    Conv2d,
    ConvTranspose2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    Step,
    plan,
    run_backward,
    run_forward,
)
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

class NetworkGradients(NamedTuple):
    """Gradients of a loss w.r.t. a network's input and parameters (a list shaped like ``params``)."""

    input: Any
    params: list

    def __repr__(self) -> str:  # shapes, not whole arrays
        def brief(a) -> str:
            return f"<{a.dtype} {tuple(a.shape)}>"

        layers = ", ".join("{" + ", ".join(f"{k!r}: {brief(v)}" for k, v in p.items()) + "}" for p in self.params)
        return f"NetworkGradients(input={brief(self.input)}, params=[{layers}])"


# -- validating a call ---------------------------------------------------------------------------


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


def _check_caps(backend: Backend, steps: list[Step], *, backward: bool) -> None:
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
        flops = s.backward_flops if backward else s.flops
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
    steps = plan(net, input_shape)
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
    steps = plan(net, x.shape)
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


def forward(backend: Backend, net: Sequential, input, params: list):
    """The network's output for ``input`` (dtype and device of the input), every layer in one call."""
    prep = _prepare(backend, net, input, params, backward=False)
    y, _ = run_forward(backend.kernels, prep.steps, prep.x, prep.params)
    return _result(backend, prep, y)


def backward(backend: Backend, net: Sequential, input, params: list, grad_output) -> NetworkGradients:
    """Gradients of a loss w.r.t. the input and every parameter, given its gradient w.r.t. the output."""
    gy = grad_output if _on_device(grad_output) or isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
    prep = _prepare(backend, net, input, params, backward=True, grad_output=gy)
    k = backend.kernels
    compute = prep.x.dtype
    _, inputs = run_forward(k, prep.steps, prep.x, prep.params, keep=True)
    gx, grads = run_backward(k, prep.steps, inputs, prep.params, k.to_device(gy.astype(compute, copy=False)))
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
    ``report_every`` 0 means 1; ``report_interval`` s > 0 lets at most one progress event through every s
    seconds. ``seed`` also draws the parameters when fit_network gets none.
    """

    loss: str = "mse"
    optimizer: SgdOptions | AdamOptions = field(default_factory=SgdOptions)
    max_steps: int = 1000
    tol: float = 0.0
    batch_size: int | None = None
    seed: int | None = None
    max_seconds: float | None = None
    report_every: int = 1
    report_interval: float = 0.0


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

    __slots__ = ("accuracy", "grad_z", "inputs")

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
        steps = plan(net, x.shape)
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

    def _steps(self, n: int) -> list[Step]:
        steps = self._plans.get(n)
        if steps is None:
            steps = self._plans[n] = plan(self.net, (n, *self.x.shape[1:]))
        return steps

    def _measure(self, batch, flat: list, keep: bool) -> tuple[float, _Measured]:
        """The loss of the parameters on ``batch`` = (x, y), and what its gradient needs."""
        xb, yb = batch
        layers = self._layers(flat)
        z, inputs = run_forward(self.kernels, self._steps(xb.shape[0]), xb, layers, keep=keep)
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
        _, grads = run_backward(self.kernels, self._steps(batch[0].shape[0]), inputs, layers, grad_z, input_grad=False)
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
        def progress(step, loss, elapsed, grad_norm, info, flat, due):
            return NetworkProgress(step, loss, elapsed, grad_norm, info.accuracy) if due else None

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
