"""Kernel fitting from the SDK: the TrainKernel request, a live ``TrainingRun`` and its ``TrainResult``."""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import grpc
import numpy as np

from convrpc import wire
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError
from .tensors import as_tensor, from_tensor, op_message

__all__ = ["History", "KERNEL_LOSSES", "TrainProgress", "TrainResult", "TrainingRun", "check_timeout", "plot_loss", "run_fields",
           "train_request"]  # fmt: skip

#: The losses train_kernel takes: every wire loss but cross_entropy, which classifies a network's logits.
KERNEL_LOSSES = tuple(name for name in wire.LOSSES if name != "cross_entropy")

class TrainProgress(NamedTuple):
    """One progress update: the loss before update ``step`` and the time since the run started."""

    step: int
    loss: float
    elapsed: float
    grad_norm: float
    #: The weight at this step, when ``snapshot_every`` asked for one; else None.
    weight: np.ndarray | None = None
    #: The share of the step's batch classified right (a network trained with ``loss="cross_entropy"``); else None.
    accuracy: float | None = None


@dataclass(frozen=True)
class History:
    """A loss curve as numpy arrays of equal length.

    A finished run's history (``TrainResult.history``) has one point per step plus the start:
    ``step`` is 0, 1, ..., ``steps`` and ``loss[s]`` the loss of the weights after ``s`` updates
    (with mini-batches, of the batch that step ``s + 1`` drew), so ``loss[-1] == result.loss``.
    ``elapsed[s]`` (seconds) and ``grad_norm[s]`` (of update ``s``) are known only at the steps a
    progress update reported, NaN elsewhere, and so is ``accuracy[s]`` (the batch accuracy of a
    network trained with ``loss="cross_entropy"``; NaN throughout otherwise). While a run is live,
    ``TrainingRun.history`` holds the progress updates received so far (each step's loss measured
    before its update).
    """

    step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    elapsed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grad_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    accuracy: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.step)

    def __repr__(self) -> str:
        if not len(self):
            return "History(empty)"
        return f"History({len(self)} points, steps {self.step[0]}..{self.step[-1]}, last loss {self.loss[-1]:.4g})"


@dataclass(frozen=True, repr=False)
class TrainResult:
    """The outcome of a run.

    Attributes
    ----------
    weight : numpy.ndarray
        The fitted conv2d weight, (K, C/groups, kh, kw), in the input's dtype.
    bias : numpy.ndarray or None
        The fitted bias (K,), or None when ``bias=False``.
    loss : float
        The loss of exactly these weights on the whole data set.
    steps : int
        Optimizer updates run.
    stop_reason : str
        ``"converged"`` (loss <= tol), ``"max_steps"``, ``"cancelled"`` (``cancel()``, leaving
        the loop, Ctrl-C, ``timeout=`` or a server shutdown), ``"diverged"`` (the last finite
        state is returned) or ``"time_limit"`` (``max_seconds`` or the server's cap).
    history : History
        The whole loss curve, ``steps + 1`` points, the last equal to ``loss``.
    elapsed : float
        Seconds the run took on the server.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    loss: float
    steps: int
    stop_reason: str
    history: History
    elapsed: float = 0.0

    def __repr__(self) -> str:
        bias = "None" if self.bias is None else f"<{self.bias.shape}>"
        return (
            f"TrainResult(stop_reason={self.stop_reason!r}, steps={self.steps}, loss={self.loss:.4g}, "
            f"weight=<{self.weight.dtype} {self.weight.shape}>, bias={bias}, elapsed={self.elapsed:.3g}s)"
        )

    def plot(self, ax=None, *, title: str | None = None):
        """Draw the loss curve (log scale) with matplotlib and return the axes."""
        return plot_loss(self, ax, title=title)


def plot_loss(result, ax=None, *, title: str | None = None):
    """Draw a result's loss curve (log scale where positive) with matplotlib and return the axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot() needs matplotlib: pip install -e '.[notebook]' in a clone of convrpc") from None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result.history.step, result.history.loss, lw=1.5)
    if len(result.history) and np.all(result.history.loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or f"{result.stop_reason} after {result.steps} steps, loss {result.loss:.3g}")
    ax.grid(True, which="both", alpha=0.3)
    return ax


def _refuse(name: str, expected: str, value) -> ConvRpcError:
    return ConvRpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: expected {expected}, got {value!r}", name)


def _real(name: str, value, *, positive: bool = False, below: float | None = None) -> float:
    """``value`` as a finite float >= 0 (> 0 if ``positive``, < ``below`` if given), else a ConvRpcError
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _refuse(name, "a real number", value)
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0) or (below is not None and v >= below):
        bound = f"in [0, {below:g})" if below is not None else f"a finite number {'>' if positive else '>='} 0"
        raise _refuse(name, bound, value)
    return v


def _integer(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _refuse(name, "an int", value)
    if value < minimum or (maximum is not None and value > maximum):
        raise _refuse(name, f"an int >= {minimum}" + (f" and <= {maximum}" if maximum is not None else ""), value)
    return int(value)


def _optimizer(optimizer, lr, momentum, nesterov, weight_decay, betas, eps):
    """The request's optimizer message; every argument checked like torch.optim checks it."""
    lr, weight_decay = _real("lr", lr, positive=True), _real("weight_decay", weight_decay)
    if optimizer == "sgd":
        momentum = _real("momentum", momentum)
        if not isinstance(nesterov, bool):
            raise _refuse("nesterov", "a bool", nesterov)
        if nesterov and momentum == 0:
            raise _refuse("nesterov", "momentum > 0 with nesterov=True (as torch.optim.SGD)", momentum)
        return "sgd", pb.SgdOptions(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if optimizer == "adam":
        if momentum or nesterov:
            name = "momentum" if momentum else "nesterov"
            raise ConvRpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name}: not used by optimizer='adam' (its momentum terms are betas=(beta1, beta2))", name,
            )  # fmt: skip
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise _refuse("betas", "a pair (beta1, beta2)", betas)
        beta1, beta2 = (_real("betas", b, below=1.0) for b in betas)
        options = pb.AdamOptions(
            lr=lr, beta1=beta1, beta2=beta2, eps=_real("eps", eps, positive=True), weight_decay=weight_decay
        )
        return "adam", options
    raise _refuse("optimizer", "'sgd' or 'adam'", optimizer)


def check_timeout(timeout) -> None:
    """A training call's ``timeout=``: None or seconds > 0."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise _refuse("timeout", "None or seconds > 0", timeout)


def run_fields(
    *, losses, optimizer, lr, momentum, nesterov, weight_decay, betas, eps, loss, max_steps, tol, report_every,
    seed, batch_size, max_seconds,
) -> dict:  # fmt: skip
    """The request fields every training RPC shares (optimizer, loss, steps, tolerance, reporting, seed,
    batches, time), each argument checked first: a bad one raises ConvRpcError(INVALID_ARGUMENT) naming it.
    ``losses`` are the loss names the RPC takes."""
    if loss not in losses:
        raise _refuse("loss", f"one of {sorted(losses)}", loss)
    kind, options = _optimizer(optimizer, lr, momentum, nesterov, weight_decay, betas, eps)
    fields = dict(
        loss=wire.LOSSES[loss],
        max_steps=_integer("max_steps", max_steps, minimum=1),
        tol=_real("tol", tol),
        report_every=_integer("report_every", report_every, minimum=1),
        batch_size=0 if batch_size is None else _integer("batch_size", batch_size, minimum=1),
        max_seconds=0.0 if max_seconds is None else _real("max_seconds", max_seconds, positive=True),
        **{kind: options},
    )
    if seed is not None:
        fields["seed"] = _integer("seed", seed, minimum=0, maximum=2**64 - 1)
    return fields


def train_request(
    input, target, *, kernel_size=None, init_weight=None, bias=False, init_bias=None, stride=1, padding=0,
    dilation=1, groups=1, optimizer="sgd", lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0,
    betas=(0.9, 0.999), eps=1e-8, loss="mse", max_steps=1000, tol=0.0, report_every=1, seed=None,
    batch_size=None, max_seconds=None, snapshot_every=0,
) -> pb.TrainKernelRequest:  # fmt: skip
    """The TrainKernelRequest for ``ConvClient.train_kernel``'s arguments, each checked first: a bad one
    raises ConvRpcError(INVALID_ARGUMENT) naming it, before anything is encoded or sent."""
    fields = run_fields(
        losses=KERNEL_LOSSES, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
        weight_decay=weight_decay, betas=betas, eps=eps, loss=loss, max_steps=max_steps, tol=tol,
        report_every=report_every, seed=seed, batch_size=batch_size, max_seconds=max_seconds,
    )  # fmt: skip
    if not isinstance(bias, (bool, np.bool_)):
        raise _refuse("bias", "a bool", bias)
    snapshot_every = _integer("snapshot_every", snapshot_every, minimum=0)
    conv = op_message("conv2d", dict(stride=stride, padding=padding, dilation=dilation, groups=groups)).conv2d
    kernel = op_message("max_pool2d", dict(kernel_size=kernel_size)).max_pool2d.kernel_size if kernel_size else None
    request = pb.TrainKernelRequest(
        input=as_tensor(input, "input"),
        target=as_tensor(target, "target"),
        bias=bool(bias),
        conv=conv,
        snapshot_every=snapshot_every,
        **fields,
    )
    if kernel is not None:
        request.kernel_size.CopyFrom(kernel)
    if init_weight is not None:
        request.init_weight.CopyFrom(as_tensor(init_weight, "init_weight"))
    if init_bias is not None:
        request.init_bias.CopyFrom(as_tensor(init_bias, "init_bias"))
    return request


class _StreamReader:
    """Reads a blocking gRPC stream one message at a time on a helper thread.

    A Ctrl-C while waiting must not lose the read in flight: gRPC refuses a second read on a call
    whose first one an interrupt abandoned ("Internal gRPC call error 8"). Here the interrupted
    wait leaves its read pending, and the next ``read()`` waits for that same one. The helper is one
    thread kept for the run (its pool lets it go when the run ends or is dropped).
    """

    def __init__(self, stream):
        self._stream = stream
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="convrpc-train-read")
        self._pending: Future | None = None

    def read(self):
        """The next message; raises StopIteration at the end and the stream's RpcError on failure."""
        if self._pending is None:
            self._pending = self._pool.submit(next, self._stream)
        future = self._pending
        try:
            return future.result()  # an interrupt here leaves the read pending for the next call
        finally:
            if future.done():
                self._pending = None

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class TrainingRun:
    """A training run streaming from the server: a kernel fit (``train_kernel``) or a network's (``train``).

    Iterate it for :class:`TrainProgress` updates as they arrive; ``result()`` waits for the end and
    returns the :class:`TrainResult`; ``cancel()`` stops the run on the server, after which
    ``result()`` returns what the run reached (stop reason ``"cancelled"``, the weights of the
    last step). Leaving the iteration early (``break``, an exception, Ctrl-C or a notebook's
    interrupt, also inside ``result()``) stops the run the same way: the interrupt goes on to the
    caller, and a later ``result()`` returns the fit. ``timeout`` (seconds, the ``train_kernel``
    argument) stops the run that long after it started, with the same outcome. ``history`` holds
    the updates received so far as numpy arrays. With ``progress=True`` a tqdm bar (step, loss,
    ETA; at the end the stop reason) follows the iteration, in a terminal or a notebook.
    """

    def __init__(
        self,
        call,
        *,
        max_steps: int,
        progress: bool = False,
        stop: Callable[[], None] | None = None,
        timeout: float | None = None,
        on_end: Callable[[], None] | None = None,
        name: str = "train_kernel",
        make_result: Callable[[object, History], object] | None = None,
    ):
        self._call = call
        self._name = name
        #: ``(result message, its whole history) -> result`` of a run that is not a kernel fit (a network's).
        self._make_other = make_result
        self._reader = _StreamReader(call) if hasattr(call, "__next__") else None  # aio calls are awaited
        self._max_steps = max_steps
        self._progress = progress
        self._stop = stop or call.cancel
        self._on_end = on_end
        self._rows: list[tuple[int, float, float, float, float]] = []
        self._result: TrainResult | None = None
        self._failed = False
        self._stopping = False
        self._timer = self._start_timer(timeout, self.cancel) if timeout is not None else None

    @staticmethod
    def _start_timer(seconds: float, callback) -> object:
        timer = threading.Timer(seconds, callback)
        timer.daemon = True
        timer.start()
        return timer

    def __iter__(self) -> Iterator[TrainProgress]:
        bar = self._progress_bar() if self._progress and self._result is None else None
        try:
            while self._result is None and not self._failed:
                try:
                    message = self._reader.read()
                except StopIteration:
                    self._end(failed=True)
                    raise ConvRpcError(grpc.StatusCode.INTERNAL, "the training stream ended without a result") from None
                except grpc.RpcError as error:
                    self._end(failed=True)
                    raise ConvRpcError.from_rpc_error(error) from None
                update = self._receive(message, bar)
                if update is not None:
                    yield update
        finally:
            self._leave(bar)

    def _receive(self, message: pb.TrainKernelResponse, bar) -> TrainProgress | None:
        """Record one stream message; returns the progress update, or None for the result."""
        if message.HasField("result"):
            self._result = self._make_result(message.result)
            self._end(failed=False)
            if bar is not None:
                self._finish_bar(bar, self._result)
            return None
        update = self._record(message.progress)
        if bar is not None:
            bar.update(update.step - bar.n)
            accuracy = {} if update.accuracy is None else {"accuracy": f"{update.accuracy:.3f}"}
            bar.set_postfix(loss=f"{update.loss:.3e}", **accuracy, refresh=False)
        return update

    def _end(self, *, failed: bool) -> None:
        """The stream is over: stop the timer, release the run's own channel."""
        self._failed = failed
        if self._timer is not None:
            self._timer.cancel()
        if self._reader is not None:
            self._reader.close()
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()

    def _finish_bar(self, bar, result: TrainResult) -> None:
        """Show the end: a converged run fills the bar (green, where tqdm colours), every run names its reason."""
        if result.stop_reason == "converged":
            bar.total = result.steps
            widgets = getattr(getattr(bar, "container", None), "children", ())  # tqdm.notebook: (label, bar, text)
            if len(widgets) == 3:
                widgets[1].max = max(result.steps, 1)
            bar.colour = "green"
        bar.update(result.steps - bar.n)
        bar.set_description(f"{self._name}: {result.stop_reason}", refresh=False)
        bar.set_postfix(loss=f"{result.loss:.3e}", refresh=False)
        bar.refresh()

    def _leave(self, bar) -> None:
        """The iteration is over: by the result, an error, or the caller leaving the loop early.

        Leaving early (``break``, an exception or Ctrl-C in the loop body, a notebook's interrupt
        while waiting for the next message) stops the server's run: it ends within one step and
        its result waits on the stream for the next ``result()``.
        """
        if self._result is None and not self._failed:
            self.cancel()
        if bar is not None:
            bar.close()

    def _progress_bar(self):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError("progress=True needs tqdm: pip install -e '.[notebook]' in a clone of convrpc") from None
        # total=max_steps gives the ETA; a run that converges early fills the bar at its end.
        return tqdm(total=self._max_steps, unit="step", desc=self._name)

    def _record(self, msg: pb.TrainProgress) -> TrainProgress:
        accuracy = msg.accuracy if msg.HasField("accuracy") else None
        self._rows.append((msg.step, msg.loss, msg.elapsed_seconds, msg.grad_norm, np.nan if accuracy is None else accuracy))
        weight = from_tensor(msg.weight) if msg.HasField("weight") else None
        return TrainProgress(msg.step, msg.loss, msg.elapsed_seconds, msg.grad_norm, weight, accuracy)

    def _make_result(self, msg: pb.TrainResult) -> TrainResult:
        if self._make_other is not None:
            return self._make_other(msg, self._curve(msg))
        return TrainResult(
            weight=from_tensor(msg.weight),
            bias=from_tensor(msg.bias) if msg.HasField("bias") else None,
            loss=msg.loss,
            steps=msg.steps,
            stop_reason=wire.STOP_REASON_NAMES.get(msg.stop_reason, "unknown"),
            history=self._curve(msg),
            elapsed=msg.elapsed_seconds,
        )

    def _curve(self, msg: pb.TrainResult) -> History:
        """The result's whole loss curve, with the elapsed time and gradient norm of the steps reported."""
        if not msg.HasField("loss_history"):  # a server from before the curve was sent: what was received
            return self.history
        loss = from_tensor(msg.loss_history).astype(np.float64, copy=False)
        elapsed, grad_norm, accuracy = (np.full(len(loss), np.nan) for _ in range(3))
        for step, _, seconds, norm, share in self._rows:
            if step < len(loss):
                elapsed[step], grad_norm[step], accuracy[step] = seconds, norm, share
        return History(np.arange(len(loss), dtype=np.int64), loss, elapsed, grad_norm, accuracy)

    @property
    def history(self) -> History:
        """The progress received so far; once the run is over, its whole loss curve."""
        if self._result is not None:
            return self._result.history
        if not self._rows:
            return History()
        step, loss, elapsed, grad_norm, accuracy = map(np.asarray, zip(*self._rows))
        return History(step.astype(np.int64), loss.astype(float), elapsed.astype(float), grad_norm.astype(float),
                       accuracy.astype(float))  # fmt: skip

    @property
    def done(self) -> bool:
        """Whether the result has arrived."""
        return self._result is not None

    def result(self) -> TrainResult:
        """Wait for the run to end and return its result (showing a bar if ``progress=True``).

        Returns
        -------
        TrainResult
            Also after ``cancel()``, ``break``, an interrupt or ``timeout=``: then with stop reason
            ``"cancelled"`` and the weights of the last step.

        Raises
        ------
        ConvRpcError
            When the server refused the run or the stream failed (the weights are lost then).
        """
        for _ in self:
            pass
        if self._result is None:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, "the training stream failed before its result")
        return self._result

    def cancel(self) -> None:
        """Ask the server to stop the run; it ends within one step and ``result()`` returns its state.

        Returns at once (it does not wait for the result). Calling it again, or after the end, does nothing.
        """
        if self._result is None and not self._failed and not self._stopping:
            self._stopping = True
            self._stop()

    def __repr__(self) -> str:
        state = self._result.stop_reason if self._result is not None else "stopping" if self._stopping else "running"
        return f"<TrainingRun {state}, {len(self._rows)} updates received>"

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
