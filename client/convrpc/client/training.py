"""Kernel fitting from the SDK: the TrainKernel request, a live ``TrainingRun`` and its ``TrainResult``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import grpc
import numpy as np

from convrpc import wire
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError
from .tensors import as_tensor, from_tensor, op_message

__all__ = ["History", "TrainProgress", "TrainResult", "TrainingRun", "train_request"]

class TrainProgress(NamedTuple):
    """One progress update: the loss before update ``step`` and the time since the run started."""

    step: int
    loss: float
    elapsed: float
    grad_norm: float
    #: The weight at this step, when ``snapshot_every`` asked for one; else None.
    weight: np.ndarray | None = None


@dataclass(frozen=True)
class History:
    """Every progress update received, as arrays of equal length."""

    step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    elapsed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grad_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.step)


@dataclass(frozen=True)
class TrainResult:
    """The outcome of a run: fitted ``weight`` (and ``bias``), final ``loss``, ``steps`` run, why it stopped."""

    weight: np.ndarray
    bias: np.ndarray | None
    loss: float
    steps: int
    stop_reason: str
    history: History
    elapsed: float = 0.0

    def plot(self, ax=None, *, title: str | None = None):
        """Draw the loss curve (log scale) with matplotlib and return the axes."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("plot() needs matplotlib: pip install 'convrpc[notebook]'") from None
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.history.step, self.history.loss, lw=1.5)
        if len(self.history) and np.all(self.history.loss > 0):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title or f"{self.stop_reason} after {self.steps} steps, loss {self.loss:.3g}")
        ax.grid(True, which="both", alpha=0.3)
        return ax


def train_request(
    input, target, *, kernel_size=None, init_weight=None, bias=False, init_bias=None, stride=1, padding=0,
    dilation=1, groups=1, optimizer="sgd", lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0,
    betas=(0.9, 0.999), eps=1e-8, loss="mse", max_steps=1000, tol=0.0, report_every=1, seed=None,
    batch_size=None, max_seconds=None, snapshot_every=0,
) -> pb.TrainKernelRequest:  # fmt: skip
    """The TrainKernelRequest for ``ConvClient.train_kernel``'s arguments."""
    if loss not in wire.LOSSES:
        raise ConvRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, f"loss: expected one of {sorted(wire.LOSSES)}, got {loss!r}", "loss"
        )
    conv = op_message("conv2d", dict(stride=stride, padding=padding, dilation=dilation, groups=groups)).conv2d
    kernel = op_message("max_pool2d", dict(kernel_size=kernel_size)).max_pool2d.kernel_size if kernel_size else None
    request = pb.TrainKernelRequest(
        input=as_tensor(input, "input"),
        target=as_tensor(target, "target"),
        bias=bool(bias),
        conv=conv,
        loss=wire.LOSSES[loss],
        max_steps=int(max_steps),
        tol=float(tol),
        report_every=int(report_every),
        batch_size=int(batch_size or 0),
        max_seconds=float(max_seconds or 0.0),
        snapshot_every=int(snapshot_every),
    )
    if kernel is not None:
        request.kernel_size.CopyFrom(kernel)
    if init_weight is not None:
        request.init_weight.CopyFrom(as_tensor(init_weight, "init_weight"))
    if init_bias is not None:
        request.init_bias.CopyFrom(as_tensor(init_bias, "init_bias"))
    if seed is not None:
        request.seed = int(seed)
    if optimizer == "sgd":
        request.sgd.CopyFrom(pb.SgdOptions(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
    elif optimizer == "adam":
        request.adam.CopyFrom(pb.AdamOptions(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay))
    else:
        raise ConvRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, f"optimizer: expected 'sgd' or 'adam', got {optimizer!r}", "optimizer"
        )
    return request


class TrainingRun:
    """A kernel-fitting run streaming from the server.

    Iterate it for :class:`TrainProgress` updates as they arrive; ``result()`` waits for the end and
    returns the :class:`TrainResult`; ``cancel()`` stops the run on the server; ``history`` holds
    the updates received so far as numpy arrays. Leaving the iteration early (``break``, an
    exception, Ctrl-C or a notebook's interrupt, also inside ``result()``) cancels the server's run
    too; the client stays usable. With ``progress=True`` a tqdm bar (step, loss, ETA) follows the
    iteration, in a terminal or a notebook.
    """

    def __init__(self, call, *, max_steps: int, progress: bool = False):
        self._call = call
        self._max_steps = max_steps
        self._progress = progress
        self._rows: list[tuple[int, float, float, float]] = []
        self._result: TrainResult | None = None
        self._started = time.monotonic()

    def __iter__(self) -> Iterator[TrainProgress]:
        bar = self._progress_bar() if self._progress and self._result is None else None
        try:
            while self._result is None:
                try:
                    message = next(self._call)
                except StopIteration:
                    raise ConvRpcError(grpc.StatusCode.INTERNAL, "the training stream ended without a result") from None
                except grpc.RpcError as error:
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
            if bar is not None:
                bar.update(self._result.steps - bar.n)
                bar.set_postfix(loss=f"{self._result.loss:.3e}", stop=self._result.stop_reason, refresh=False)
            return None
        update = self._record(message.progress)
        if bar is not None:
            bar.update(update.step - bar.n)
            bar.set_postfix(loss=f"{update.loss:.3e}", refresh=False)
        return update

    def _leave(self, bar) -> None:
        """The iteration is over: by the result, an error, or the caller leaving the loop early.

        Leaving early (``break``, an exception or Ctrl-C in the loop body, a notebook's interrupt
        while waiting for the next message) cancels the server's run: nobody is reading it any more,
        and the server frees its worker at once.
        """
        if self._result is None:
            self.cancel()
        if bar is not None:
            bar.close()

    def _progress_bar(self):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError("progress=True needs tqdm: pip install 'convrpc[notebook]'") from None
        # total=max_steps gives the ETA; a run that converges early simply ends short of it.
        return tqdm(total=self._max_steps, unit="step", desc="train_kernel")

    def _record(self, msg: pb.TrainProgress) -> TrainProgress:
        self._rows.append((msg.step, msg.loss, msg.elapsed_seconds, msg.grad_norm))
        weight = from_tensor(msg.weight) if msg.HasField("weight") else None
        return TrainProgress(msg.step, msg.loss, msg.elapsed_seconds, msg.grad_norm, weight)

    def _make_result(self, msg: pb.TrainResult) -> TrainResult:
        return TrainResult(
            weight=from_tensor(msg.weight),
            bias=from_tensor(msg.bias) if msg.HasField("bias") else None,
            loss=msg.loss,
            steps=msg.steps,
            stop_reason=wire.STOP_REASON_NAMES.get(msg.stop_reason, "unknown"),
            history=self.history,
            elapsed=msg.elapsed_seconds,
        )

    @property
    def history(self) -> History:
        """The progress received so far."""
        if not self._rows:
            return History()
        step, loss, elapsed, grad_norm = map(np.asarray, zip(*self._rows))
        return History(step.astype(np.int64), loss.astype(float), elapsed.astype(float), grad_norm.astype(float))

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self) -> TrainResult:
        """Wait for the run to end and return its result (with the progress seen, showing a bar if asked)."""
        for _ in self:
            pass
        return self._result

    def cancel(self) -> None:
        """Stop the run on the server; iterating afterwards raises ConvRpcError(CANCELLED)."""
        self._call.cancel()

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc) -> None:
        if self._result is None:
            self.cancel()
