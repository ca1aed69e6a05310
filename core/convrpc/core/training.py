"""Kernel fitting: gradient descent on a conv2d weight (and bias) so that conv2d(input) approaches a target.

``fit_kernel(backend, input, target, config)`` checks everything at once and returns an iterator
of events that mirrors the TrainKernel stream: a :class:`TrainProgress` every ``report_every``
steps, then exactly one :class:`TrainResult`, always last::

    *progress, result = fit_kernel(get_backend("numpy"), x, y, TrainConfig(kernel_size=3))

Each step measures the loss of the current weights, stops if it is non-finite or ``<= tol``,
otherwise computes the gradient and lets the optimizer (:mod:`convrpc.core.optim`) update the
weights. So the loss reported with step ``k`` is that of the weights before the k-th update.
Only the backend's kernel table does tensor work (conv2d and its weight gradient, called with the
geometry worked out once per batch size, not re-validated every step) and array math goes through
``backend.xp``, so every backend trains, a GPU one on device-resident arrays.

Losses over z = conv2d(input) and target y, with r = z - y and M = r.size (of the batch):

- ``mse``: mean(r^2), gradient 2r/M (torch's mse_loss);
- ``half_mse``: mean(r^2)/2, gradient r/M (the textbook convention of the seed experiments);
- ``half_sse``: sum(r^2)/2, gradient r.

The loop and its stop rules (:func:`descend`), the mini-batch sampler (:func:`minibatches`, seeded
by :func:`run_rngs`), the losses and the argument checks are shared with network training
(:mod:`convrpc.core.network`), so both stop, sample and report alike.

Initialisation: a weight built from ``kernel_size`` is Kaiming-uniform like torch's Conv2d,
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_channels/groups * kh * kw, drawn in float64
from ``seed`` and cast; a fitted bias without ``init_bias`` starts at zero (as the proto says).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from . import params
from .backend import Backend
from .errors import InvalidArgumentError, ResourceExhaustedError
from .optim import AdamOptions, SgdOptions

__all__ = [
    "LOSSES",
    "STOP_REASONS",
    "RunRules",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "build_optimizer",
    "check_float",
    "check_int",
    "descend",
    "device_array",
    "fit_kernel",
    "kaiming_uniform",
    "minibatches",
    "regression_grad",
    "regression_loss",
    "run_rngs",
    "run_rules",
]

#: Loss names, in the order of the proto's ``Loss`` enum (LOSS_<NAME>).
LOSSES = ("mse", "half_mse", "half_sse")
#: Stop reasons, in the order of the proto's ``StopReason`` enum (STOP_REASON_<NAME>).
STOP_REASONS = ("converged", "max_steps", "cancelled", "diverged", "time_limit")

_GRAD_SCALE = {"mse": lambda m: 2.0 / m, "half_mse": lambda m: 1.0 / m, "half_sse": lambda m: 1.0}
_LOSS_SCALE = {"mse": lambda m: 1.0 / m, "half_mse": lambda m: 0.5 / m, "half_sse": lambda m: 0.5}


@dataclass(frozen=True, eq=False)
class TrainConfig:
    """Everything a fit needs besides the data: the fields of TrainKernelRequest.

    Exactly one of ``init_weight`` (K, C/groups, kh, kw) and ``kernel_size`` (int or pair; K is
    the target's channel count) gives the starting weight. ``batch_size`` 0/None means full
    batch; otherwise each epoch visits a permutation of the samples drawn from ``seed`` in
    batches of that size (the last one may be smaller). ``max_seconds`` 0/None means no limit.
    ``report_every`` 0 means 1; ``report_interval`` s > 0 lets at most one progress event through
    every s seconds (the others are never built; one with a snapshot always comes). ``snapshot_every``
    k > 0 puts a copy of the weight in every k-th report (every ``k * report_every`` steps).
    """

    kernel_size: Any = None
    init_weight: Any = None
    bias: bool = False
    init_bias: Any = None
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    optimizer: SgdOptions | AdamOptions = field(default_factory=SgdOptions)
    loss: str = "mse"
    max_steps: int = 1000
    tol: float = 0.0
    batch_size: int | None = None
    seed: int | None = None
    max_seconds: float | None = None
    report_every: int = 1
    report_interval: float = 0.0
    snapshot_every: int = 0


@dataclass(frozen=True, eq=False)
class TrainProgress:
    """State after ``step`` updates: ``loss`` of the weights before the last update (of its batch),
    ``elapsed`` seconds since the run began, the L2 norm of that update's weight gradient and,
    when asked for, a host copy of the updated weight."""

    step: int
    loss: float
    elapsed: float
    grad_norm: float
    weight: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class TrainResult:
    """The final state: host arrays, the full-data loss of exactly these weights, updates run.

    ``history`` is the whole loss curve, float64 of shape (steps + 1,): element s is the loss of
    the weights after s updates (with mini-batches, of the batch step s + 1 drew); the last
    element is ``loss``."""

    weight: np.ndarray
    bias: np.ndarray | None
    loss: float
    steps: int
    stop_reason: str
    elapsed: float
    history: np.ndarray = field(default_factory=lambda: np.zeros(0))


def regression_loss(xp, r, name: str) -> float:
    """The loss ``name`` (one of LOSSES) of the residual r = output - target."""
    flat = r.reshape(-1)
    return float(xp.vdot(flat, flat)) * _LOSS_SCALE[name](r.size)


def regression_grad(r, name: str):
    """The loss's gradient w.r.t. the output, written into ``r`` (which it returns)."""
    r *= _GRAD_SCALE[name](r.size)
    return r


def kaiming_uniform(shape, fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """torch's Conv2d default, kaiming_uniform_(a=sqrt(5)): U(-b, b) with b = 1/sqrt(fan_in), float64."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape)


def fit_kernel(
    backend: Backend,
    input,
    target,
    config: TrainConfig,
    *,
    stop_event: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[TrainProgress | TrainResult]:
    """Validate now, then return the run's events: TrainProgress..., TrainResult (last, exactly one).

    Raises InvalidArgumentError naming the field at call time. Nothing runs until the first
    ``next()``; the elapsed time starts there. ``stop_event`` is checked before every step.
    """
    run = _Run(backend, input, target, config)
    return run.events(stop_event, clock)


class _Run:
    """One validated fit: data on the backend's device, optimizer, sampling and stop rules."""

    def _check_kernel_size(self, backend: Backend, input_shape, weight_shape) -> None:
        """A weight of ``weight_shape`` fits the padded input and the element cap (checked on shapes alone)."""
        cap = getattr(backend, "max_elements", None)
        if cap is not None and math.prod(weight_shape) > cap:
            raise ResourceExhaustedError("kernel_size", f"a weight of shape {weight_shape} is over the cap of {cap} elements")
        try:
            params.conv2d_geometry(input_shape, weight_shape, None, **self.conv)
        except InvalidArgumentError as exc:
            if exc.field == "weight":
                raise InvalidArgumentError("kernel_size", exc.description) from None
            # any other field is reported by the full check, once the (capped) weight exists

    def __init__(self, backend: Backend, input, target, c: TrainConfig):
        self.backend = backend
        xp = self.xp = backend.xp
        x = self.x = device_array(xp, input, "input")
        if x.ndim != 4:
            raise InvalidArgumentError("input", f"expected a 4-d tensor (N, C, H, W), got shape {tuple(x.shape)}")
        dtype = x.dtype
        y = self.y = device_array(xp, target, "target", dtype)
        if y.ndim != 4:
            raise InvalidArgumentError("target", f"expected a 4-d tensor (N, K, OH, OW), got shape {tuple(y.shape)}")
        if c.loss not in LOSSES:
            raise InvalidArgumentError("loss", f"expected one of {', '.join(LOSSES)}, got {c.loss!r}")
        self.loss_name = c.loss
        self.rules = run_rules(c)
        self.snapshot_every = check_int(c.snapshot_every, "snapshot_every", minimum=0)
        self.batch_size = self.rules.batch_size
        init_rng, self.shuffle_rng = run_rngs(self.rules.seed)
        self.optimizer = build_optimizer(c.optimizer, xp)
        self.conv = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)

        if not isinstance(c.bias, bool):
            raise InvalidArgumentError("bias", f"expected a bool, got {c.bias!r}")
        if c.init_bias is not None and not c.bias:
            raise InvalidArgumentError("init_bias", "given, but bias is false")
        if c.init_weight is not None:
            if c.kernel_size is not None:
                raise InvalidArgumentError("kernel_size", "give either init_weight or kernel_size, not both")
            w = device_array(xp, c.init_weight, "init_weight", dtype).copy()  # the result must not alias it
            if w.ndim != 4:
                raise InvalidArgumentError(
                    "init_weight", f"expected a 4-d tensor (K, C/groups, kh, kw), got shape {tuple(w.shape)}"
                )
        elif c.kernel_size is None:
            raise InvalidArgumentError("kernel_size", "required when init_weight is not given")
        else:
            kh, kw = params.pair(c.kernel_size, "kernel_size", minimum=1)
            # A bad groups value gets through here; the geometry check below reports it.
            groups = c.groups if isinstance(c.groups, int) and c.groups > 0 else 1
            shape = (y.shape[1], max(1, x.shape[1] // groups), kh, kw)
            self._check_kernel_size(backend, x.shape, shape)  # before allocating the weight
            w = xp.asarray(kaiming_uniform(shape, shape[1] * kh * kw, init_rng).astype(dtype))
        b = None
        if c.bias:
            if c.init_bias is None:
                b = xp.zeros((w.shape[0],), dtype=dtype)
            else:
                b = device_array(xp, c.init_bias, "init_bias", dtype).copy()
        try:
            g = params.conv2d_geometry(x.shape, w.shape, None if b is None else b.shape, **self.conv)
        except InvalidArgumentError as exc:
            rename = {"weight": "init_weight" if c.init_weight is not None else "kernel_size", "bias": "init_bias"}
            raise InvalidArgumentError(rename.get(exc.field, exc.field), exc.description) from None
        if tuple(y.shape) != g.output_shape:
            raise InvalidArgumentError(
                "target", f"expected shape {g.output_shape} (the conv2d output), got {tuple(y.shape)}"
            )
        cap = getattr(backend, "max_elements", None)
        if cap is not None and math.prod(g.output_shape) > cap:
            raise ResourceExhaustedError("target", f"conv2d output {g.output_shape} is over the cap of {cap} elements")
        self.w, self.b = w, b
        # Steps call the kernel table directly: the backend's front would re-validate the arrays and
        # rebuild the geometry twice a step, a tenth of a small step's time.
        self.kernels = backend.kernels
        self.x = self.kernels.to_device(x)  # e.g. a writable alias of read-only request bytes for numba
        self._geometries = {x.shape[0]: g}
        if self.batch_size >= x.shape[0]:
            self.batch_size = 0  # one batch holding every sample is the full batch

    # -- pieces of a step ---------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[Any, Any]]:
        """(input, target) of each step: the whole data set, or seeded shuffled mini-batches."""
        for idx in minibatches(self.xp, self.x.shape[0], self.batch_size, self.shuffle_rng):
            yield (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])

    def _geometry(self, x) -> params.ConvGeometry:
        """The conv geometry for input ``x`` (batches differ only in their sample count)."""
        g = self._geometries.get(x.shape[0])
        if g is None:
            bias_shape = None if self.b is None else self.b.shape
            g = self._geometries[x.shape[0]] = params.conv2d_geometry(x.shape, self.w.shape, bias_shape, **self.conv)
        return g

    def _residual(self, x, y, w, b) -> tuple[float, Any]:
        """The loss (a Python float, possibly non-finite) and r = conv2d(x) - y."""
        r = self.kernels.conv2d(x, w, b, self._geometry(x)) - y
        return regression_loss(self.xp, r, self.loss_name), r

    def _host(self, a, copy: bool = False):
        if a is None:
            return None
        to_numpy = getattr(self.xp, "asnumpy", None)
        if to_numpy is not None:
            return to_numpy(a)
        return np.array(a) if copy else np.asarray(a)

    # -- the loop -----------------------------------------------------------------------------

    def events(self, stop_event, clock) -> Iterator[TrainProgress | TrainResult]:
        xp = self.xp
        has_bias = self.b is not None

        def measure(batch, p):
            return self._residual(*batch, *p, *(() if has_bias else (None,)))

        def gradients(batch, r, p):
            r = regression_grad(r, self.loss_name)
            grad_w = self.kernels.conv2d_weight_grad(batch[0], r, self._geometry(batch[0]))
            gw = grad_w.reshape(-1)
            # The bias gradient sums the residual, finite whenever the loss is, so only gw is checked.
            return ([grad_w, r.sum(axis=(0, 2, 3))] if has_bias else [grad_w]), math.sqrt(float(xp.vdot(gw, gw)))

        reports = 0

        def progress(step, loss, elapsed, grad_norm, r, p, due):
            nonlocal reports
            reports += 1
            snap = self.snapshot_every and reports % self.snapshot_every == 0
            if not (due or snap):
                return None
            return TrainProgress(step, loss, elapsed, grad_norm, self._host(p[0], copy=True) if snap else None)

        def result(p, loss, r, steps, reason, elapsed, history):
            return TrainResult(self._host(p[0]), self._host(p[1]) if has_bias else None, loss, steps, reason, elapsed,
                               history)  # fmt: skip

        params = [self.w, self.b] if has_bias else [self.w]
        yield from descend(
            params, self.optimizer, self._batches(), measure, gradients, lambda p: measure((self.x, self.y), p),
            full_batch=not self.batch_size, rules=self.rules, progress=progress, result=result, stop_event=stop_event,
            clock=clock,
        )  # fmt: skip


class RunRules(NamedTuple):
    """The checked run options every fit shares (the fields of TrainConfig and NetworkTrainConfig)."""

    max_steps: int
    report_every: int  #: 0 in the config means 1
    batch_size: int  #: 0 means the full batch
    tol: float
    max_seconds: float  #: 0 means no limit
    seed: int | None
    report_interval: float  #: seconds; 0 means every report


def run_rules(c) -> RunRules:
    """``c``'s max_steps, report_every, batch_size, tol, max_seconds, seed and report_interval, checked (errors name the field)."""
    return RunRules(
        check_int(c.max_steps, "max_steps", minimum=1),
        check_int(c.report_every, "report_every", minimum=0) or 1,
        check_int(c.batch_size or 0, "batch_size", minimum=0),
        check_float(c.tol, "tol"),
        check_float(c.max_seconds or 0.0, "max_seconds"),
        None if c.seed is None else check_int(c.seed, "seed", minimum=0),
        check_float(c.report_interval, "report_interval"),
    )


def build_optimizer(options, xp):
    """The optimizer ``options`` (SgdOptions or AdamOptions, validated) describe, on array module ``xp``."""
    if not isinstance(options, (SgdOptions, AdamOptions)):
        raise InvalidArgumentError("optimizer", f"expected SgdOptions or AdamOptions, got {options!r}")
    return options.build(xp)


def minibatches(xp, n: int, batch_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """The sample indices of each step: None (the whole data set) forever when ``batch_size`` is 0,
    else each epoch's ``rng.permutation(n)`` (an ``xp`` array) cut into batches of ``batch_size``
    (the last one may be smaller)."""
    if not batch_size:
        yield from itertools.repeat(None)
    while True:
        perm = xp.asarray(rng.permutation(n))
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def run_rngs(seed: int | None) -> tuple[np.random.Generator, np.random.Generator]:
    """(initialisation, shuffling) generators of a run, two independent streams spawned from ``seed``."""
    init, shuffle = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(init), np.random.default_rng(shuffle)


def descend(
    params: list, optimizer, batches: Iterator, measure: Callable, gradients: Callable, full: Callable, *,
    full_batch: bool, rules: RunRules, progress: Callable, result: Callable, stop_event: threading.Event | None,
    clock: Callable[[], float],
) -> Iterator:
    """The loop and stop rules every fit shares: ``progress(...)`` every ``rules.report_every`` steps, then a result.

    Each step draws a batch, ``measure(batch, params) -> (loss, info)`` (the loss of the current
    parameters on it, ``info`` for the gradient), stops on a non-finite loss (rolling back the last
    update) or on ``loss <= tol`` confirmed by ``full(params) -> (loss, info)`` on the whole data set,
    else calls ``gradients(batch, info, params) -> (grads, grad_norm)`` and lets the optimizer update.
    ``stop_event`` is checked before every step ("cancelled": the parameters reached are returned)
    and so is ``rules.max_seconds`` (0: no limit; "time_limit"). ``progress(step, loss, elapsed,
    grad_norm, info, params, due)`` and ``result(params, loss, info, steps, reason, elapsed, history)``
    build the events; the result's loss (and info) is the full-data one of exactly its parameters.
    ``due`` is whether ``rules.report_interval`` has passed since the last event; ``progress`` returns
    None for an event not wanted (a streaming server's ten thousand steps a second then build none).
    """  # fmt: skip
    max_seconds, tol, interval = rules.max_seconds, rules.tol, rules.report_interval
    t0 = clock()
    last_report = -math.inf
    # The parameters before the last update, to fall back on if it diverges. Only the parameters: a
    # measurement's info (a residual, a network's activations) would double what a step holds.
    prev = None
    known = None  # (full-data loss, info) of params, when already measured
    reason = "max_steps"
    steps = 0
    losses: list[float] = []  # the loss before each update: 8 bytes a step, even at the steps cap
    for _ in range(rules.max_steps):
        if stop_event is not None and stop_event.is_set():
            reason = "cancelled"
            break
        if max_seconds and clock() - t0 >= max_seconds:
            reason = "time_limit"
            break
        batch = next(batches)
        loss, info = measure(batch, params)
        if not math.isfinite(loss):
            reason = "diverged"
            if prev is not None:
                params, prev = prev, None  # measured again below, on the whole data set
            break
        if full_batch:
            known = (loss, info)
        if loss <= tol:
            # A mini-batch below tol is only a hint: confirm on the whole data set.
            if not full_batch:
                known = full(params)
            if known[0] <= tol:
                reason = "converged"
                break
        grads, grad_norm = gradients(batch, info, params)
        if not math.isfinite(grad_norm):
            reason = "diverged"
            break
        prev = params
        losses.append(loss)
        params = optimizer.step(params, grads)
        known = None
        steps += 1
        if steps % rules.report_every == 0:
            elapsed = clock() - t0
            event = progress(steps, loss, elapsed, grad_norm, info, params, elapsed - last_report >= interval)
            if event is not None:
                last_report = elapsed
                yield event
    if known is None:
        known = full(params)
        if not math.isfinite(known[0]) and prev is not None:
            # The last update broke the parameters (only a mini-batch, or no step, had measured them).
            reason = "diverged"
            params = prev
            known = full(params)
    losses.append(known[0])
    yield result(params, known[0], known[1], steps, reason, clock() - t0, np.array(losses, dtype=np.float64))


#: Kernel fitting runs in full precision: half-type updates would stall far above any tolerance.
_FIT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def device_array(xp, a, field: str, dtype=None):
    """``a`` as a C-contiguous array of ``xp`` with a supported (or the given) dtype, every element finite."""
    arr = xp.ascontiguousarray(xp.asarray(a))
    if arr.dtype not in _FIT_DTYPES:
        raise InvalidArgumentError(field, f"dtype must be float32 or float64, got {arr.dtype}")
    if dtype is not None and arr.dtype != dtype:
        raise InvalidArgumentError(field, f"dtype {arr.dtype} differs from the input's {dtype}")
    if arr.size == 0:
        raise InvalidArgumentError(field, f"must not be empty, got shape {tuple(arr.shape)}")
    if not bool(xp.isfinite(arr).all()):
        raise InvalidArgumentError(field, "contains NaN or infinity")
    return arr


def check_int(value, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidArgumentError(field, f"expected an integer, got {value!r}")
    if int(value) < minimum:
        raise InvalidArgumentError(field, f"must be >= {minimum}, got {value!r}")
    return int(value)


def check_float(value, field: str) -> float:
    """A finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(field, f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0:
        raise InvalidArgumentError(field, f"must be a finite number >= 0, got {value!r}")
    return v
