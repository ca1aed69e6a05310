"""The SDK's op methods, shared by the sync and asyncio clients: named and ordered like torch.nn.functional.

Each method turns its arguments into a ``Call`` (arrays by request field, the ``Op``) and hands it to
the client's ``_run``, which drives the call core (``calls.CallCore``): the sync client answers with
arrays, the asyncio client with awaitables of arrays.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import grpc
import numpy as np
from numpy.typing import ArrayLike

from convrpc import wire
from convrpc.core.backend import Gradients
from convrpc.v1 import conv_service_pb2 as pb

from .calls import CallCore
from .channel import max_message_bytes, methods, open_channels, pinned_options, single_address
from .errors import ConvRpcError
from .messages import Call
from .server_info import ServerInfo
from .tensors import as_array, checked_op
from .training import TrainingRun, train_request

__all__ = ["OpMethods"]


def _gradients(results: dict) -> Gradients:
    return Gradients(results.get("grad_input"), results.get("grad_weight"), results.get("grad_bias"))


def _forward_results(fields: tuple[str, ...]):
    """The forward's answer: the output, or ``(output, indices)`` when the op returns both."""
    if len(fields) == 1:
        return lambda results: results[fields[0]]
    return lambda results: tuple(results[f] for f in fields)


def _into(target: np.ndarray):
    """relu's ``inplace=True``: the result written into the caller's array, which is returned (torch's meaning)."""

    def finish(results: dict) -> np.ndarray:
        np.copyto(target, results["output"])
        return target

    return finish


def _max_options(kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> dict:
    return dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode,
                return_indices=return_indices)  # fmt: skip


def _avg_options(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override) -> dict:
    return dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                count_include_pad=count_include_pad, divisor_override=divisor_override)  # fmt: skip


class OpMethods:
    """One method per op and one ``<op>_backward`` per op; every method takes ``timeout=`` (seconds).

    Also the constructor both clients share: one channel per target (``grpc`` or ``grpc.aio``, the class's
    ``_grpc``), their methods and stubs, and the call core that decides over them.
    """

    _grpc = None  # the grpc module whose channels a client opens

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        options: Sequence[tuple[str, object]] = (),
        shard_size: int | None = None,
        data_path: str = "auto",
        chunk_bytes: int | None = None,
    ):
        self._channel_args = dict(
            token=token, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, grpc_module=self._grpc,
        )  # fmt: skip
        self._options = tuple(options)
        self.targets, self._metadata, self._channels = open_channels(target, options=options, **self._channel_args)
        self.timeout = timeout
        self._core = CallCore(
            self.targets, mode=data_path, chunk_bytes=chunk_bytes, shard_size=shard_size,
            max_message_bytes=max_message_bytes(options),
        )  # fmt: skip
        self._methods = [methods(c) for c in self._channels]
        self._start()

    def _start(self) -> None:  # pragma: no cover - provided by clients
        raise NotImplementedError

    _closed = False

    def _check_open(self) -> None:
        """Refuse a call on a closed client with the SDK's one error, not gRPC's ValueError."""
        if self._closed:
            raise ConvRpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this client of {', '.join(self.targets)} is closed (its 'with' block ended or close() was called); "
                "open a new one",
            )  # fmt: skip

    def _timeout(self, timeout):
        return self.timeout if timeout is None else timeout

    def _deadline(self, timeout):
        return self._core.deadline(self._timeout(timeout))

    def _run_methods(self) -> tuple[dict, object | None]:
        """``(methods, channel)`` for a training run: its stream and its StopTraining must reach one server.

        A target that is one IP address uses the client's channel (``channel`` None); a name, which
        may resolve to several servers, gets a channel of its own (to close when the run ends) that
        sends both calls to one of its addresses, picked at random.
        """
        replica = self._core.pick()
        target = self.targets[replica.index]
        if single_address(target):
            return self._methods[replica.index], None
        _, _, (channel,) = open_channels(target, options=pinned_options(self._options), **self._channel_args)
        return methods(channel), channel

    def _run(self, steps, finish):  # pragma: no cover - provided by clients
        raise NotImplementedError

    def _train(self, request: pb.TrainKernelRequest, progress: bool, timeout):  # pragma: no cover
        raise NotImplementedError

    def _call(self, op: str, backward: bool, tensors: dict, options: dict, timeout, finish=None):
        """Check the call as the server would (``checked_op``), then run it; nothing is sent for a bad one."""
        spec = wire.OP_SPECS[op]
        named = {f: np.asarray(tensors[f]) for f in spec.request_tensors(backward) if tensors.get(f) is not None}
        message = checked_op(op, named, options)
        arrays = {f: as_array(a, f) for f, a in named.items()}
        call = Call(op, message, backward, arrays, self._deadline(timeout))
        if finish is None:
            finish = _gradients if backward else _forward_results(spec.result_tensors(False, options))
        return self._run(self._core.call(call), finish)

    def _call_forward(self, op: str, tensors: dict, options: dict, timeout, finish=None):
        return self._call(op, False, tensors, options, timeout, finish)

    def _call_backward(self, op: str, grad_output, tensors: dict, options: dict, timeout):
        return self._call(op, True, dict(tensors, grad_output=grad_output), options, timeout)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """Describe the server: its version, backend, device and limits.

        Parameters
        ----------
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        ServerInfo
            Named fields (``version``, ``backend``, ``device``, ``max_message_bytes``,
            ``max_elements``, ``max_train_steps``, ``max_train_seconds``, ``ops``, ``dtypes``,
            ``compute_threads``); ``print(info)`` shows one per line.

        Raises
        ------
        ConvRpcError
            UNAVAILABLE when no replica answers, DEADLINE_EXCEEDED after ``timeout``.
        """
        steps = self._core.unary("GetServerInfo", pb.GetServerInfoRequest(), self._deadline(timeout))
        return self._run(steps, ServerInfo.from_response)

    # -- forward ------------------------------------------------------------------------------

    def conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, timeout=None):
        """conv2d of (N, C, H, W) by (K, C/groups, kh, kw) -> (N, K, OH, OW); ``padding`` may be 'valid'/'same'."""
        return self._call_forward(
            "conv2d", dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, dilation=dilation, groups=groups), timeout,
        )  # fmt: skip

    def conv_transpose2d(
        self, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *, timeout=None
    ):
        """conv_transpose2d of (N, C, H, W) by (C, K/groups, kh, kw) -> (N, K, OH, OW)."""
        return self._call_forward(
            "conv_transpose2d", dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation),
            timeout,
        )  # fmt: skip

    def max_pool2d(
        self, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False,
        *, timeout=None,
    ):  # fmt: skip
        """Max pooling of (N, C, H, W) or (C, H, W); ``stride=None`` means ``kernel_size``, padding counts as
        -inf. ``return_indices=True`` returns ``(output, indices)``: torch's int64 flat indices h*W+w per plane."""
        return self._call_forward(
            "max_pool2d", dict(input=input),
            _max_options(kernel_size, stride, padding, dilation, ceil_mode, return_indices), timeout,
        )  # fmt: skip

    def avg_pool2d(
        self, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
        divisor_override=None, *, timeout=None,
    ):  # fmt: skip
        """Average pooling of (N, C, H, W) or (C, H, W); ``stride=None`` means ``kernel_size``; zero padding
        counts in the divisor unless ``count_include_pad=False``; ``divisor_override`` replaces the divisor."""
        return self._call_forward(
            "avg_pool2d", dict(input=input), _avg_options(kernel_size, stride, padding, ceil_mode, count_include_pad,
                                                          divisor_override), timeout,
        )  # fmt: skip

    def relu(self, input, inplace=False, *, timeout=None):
        """max(input, 0) elementwise, any shape (0-d and empty too). ``inplace=True`` writes the result into
        ``input`` (a writable numpy array) and returns it, as torch does; the computation is remote either way."""
        if not inplace:
            return self._call_forward("relu", dict(input=input), {}, timeout)
        if not isinstance(input, np.ndarray) or not input.flags.writeable:
            raise ConvRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "input: inplace=True needs a writable numpy array", "input"
            )
        return self._call_forward("relu", dict(input=input), {}, timeout, _into(input))

    # -- backward -----------------------------------------------------------------------------

    def conv2d_backward(
        self, grad_output, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, timeout=None
    ):
        """Gradients(input, weight, bias) of conv2d; ``bias`` is None unless a bias is passed."""
        return self._call_backward(
            "conv2d", grad_output, dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, dilation=dilation, groups=groups), timeout,
        )  # fmt: skip

    def conv_transpose2d_backward(
        self, grad_output, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
        *, timeout=None,
    ):  # fmt: skip
        """Gradients(input, weight, bias) of conv_transpose2d."""
        return self._call_backward(
            "conv_transpose2d", grad_output, dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation),
            timeout,
        )  # fmt: skip

    def max_pool2d_backward(
        self, grad_output, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
        return_indices=False, *, timeout=None,
    ):  # fmt: skip
        """Gradients(input, None, None) of max_pool2d: each window's gradient goes to its first maximum.
        ``return_indices`` is accepted so the options match the forward's; it changes nothing here."""
        return self._call_backward(
            "max_pool2d", grad_output, dict(input=input),
            _max_options(kernel_size, stride, padding, dilation, ceil_mode, return_indices), timeout,
        )  # fmt: skip

    def avg_pool2d_backward(
        self, grad_output, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
        divisor_override=None, *, timeout=None,
    ):  # fmt: skip
        """Gradients(input, None, None) of avg_pool2d."""
        return self._call_backward(
            "avg_pool2d", grad_output, dict(input=input), _avg_options(kernel_size, stride, padding, ceil_mode,
                                                                       count_include_pad, divisor_override), timeout,
        )  # fmt: skip

    def relu_backward(self, grad_output, input, inplace=False, *, timeout=None):
        """Gradients(input, None, None) of relu: 0 where the result is <= 0, else grad_output (torch's rule).
        ``inplace`` is accepted so the options match the forward's; it changes nothing here."""
        return self._call_backward("relu", grad_output, dict(input=input), {}, timeout)

    # -- training -----------------------------------------------------------------------------

    def train_kernel(
        self, input: ArrayLike, target: ArrayLike, *, kernel_size: int | Sequence[int] | None = None,
        init_weight: ArrayLike | None = None, bias: bool = False, init_bias: ArrayLike | None = None,
        stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
        groups: int = 1, optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, loss: str = "mse",
        max_steps: int = 1000, tol: float = 0.0, report_every: int = 1, seed: int | None = None,
        batch_size: int | None = None, max_seconds: float | None = None, snapshot_every: int = 0,
        progress: bool = False, timeout: float | None = None,
    ) -> TrainingRun:  # fmt: skip
        """Fit a conv2d weight (and a bias if ``bias=True``) so that conv2d(input) approaches ``target``.

        Returns at once with a live run: iterate it for progress updates (``.step``, ``.loss``,
        ``.elapsed``), call ``.result()`` for the :class:`TrainResult`, ``.cancel()`` to stop it.
        The whole run happens on one server.

        Parameters
        ----------
        input : array_like, (N, C, H, W), float32 or float64
            The conv input.
        target : array_like, (N, K, OH, OW), the input's dtype
            What conv2d(input, weight, bias, stride, padding, dilation, groups) should become.
        kernel_size : int or (int, int), optional
            With no ``init_weight``: the weight is (K, C/groups, kh, kw), Kaiming-uniform like
            torch's Conv2d, drawn from ``seed``.
        init_weight : array_like, (K, C/groups, kh, kw), optional
            The starting weight (give it or ``kernel_size``).
        bias : bool, default False
            Fit a bias (K,) too, starting at ``init_bias`` or zero.
        stride, padding, dilation, groups
            conv2d's options, as ``torch.nn.functional.conv2d`` takes them.
        optimizer : {"sgd", "adam"}, default "sgd"
            With torch.optim's update rules: SGD takes ``lr``, ``momentum``, ``nesterov``,
            ``weight_decay``; Adam takes ``lr``, ``betas``, ``eps``, ``weight_decay`` and refuses
            ``momentum``/``nesterov`` (its momentum terms are the betas).
        loss : {"mse", "half_mse", "half_sse"}, default "mse"
            mean((z-y)^2) as torch's mse_loss; half of it; half the sum of squares.
        max_steps : int, default 1000
            At most this many updates (and at most the server's cap).
        tol : float, default 0.0
            Stop as "converged" once the loss is <= tol.
        report_every : int, default 1
            A progress update every this many steps (the server also sends at most one per 50 ms).
        seed : int in [0, 2**64), optional
            Seeds the initial weight and the mini-batch shuffling.
        batch_size : int, optional
            Samples per step (None: the whole batch), shuffled per epoch.
        max_seconds : float, optional
            Stop as "time_limit" after this long (None: the server's cap).
        snapshot_every : int, default 0
            Attach the weight to every this-many-th progress update (0: never).
        progress : bool, default False
            Show a tqdm bar (terminal or notebook) while the run is consumed.
        timeout : float, optional
            Stop the run this many seconds after it started; ``result()`` then returns it with stop
            reason "cancelled" and the weights reached. A run is *not* bounded by the client's
            default ``timeout``: it ends when it converges, runs out of steps or time, or is stopped.

        Returns
        -------
        TrainingRun
            ``.result()`` returns a :class:`TrainResult` (weight, bias, loss, steps, stop_reason,
            history). ``.cancel()``, leaving its loop early and Ctrl-C stop the run on the server
            without losing it: ``.result()`` then returns the weights of the last step.

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``.field``) for a bad one, before anything is
            sent; the server's refusals (shapes, caps) when the run is consumed.
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ConvRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"timeout: expected None or seconds > 0, got {timeout!r}", "timeout"
            )
        request = train_request(
            input, target, kernel_size=kernel_size, init_weight=init_weight, bias=bias, init_bias=init_bias,
            stride=stride, padding=padding, dilation=dilation, groups=groups, optimizer=optimizer, lr=lr,
            momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas, eps=eps, loss=loss,
            max_steps=max_steps, tol=tol, report_every=report_every, seed=seed, batch_size=batch_size,
            max_seconds=max_seconds, snapshot_every=snapshot_every,
        )  # fmt: skip
        request.run_id = secrets.token_hex(16)  # 128 random bits: only this client can stop the run
        return self._train(request, progress, timeout)
