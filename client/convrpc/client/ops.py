"""The SDK's op methods, shared by the sync and asyncio clients: named and ordered like torch.nn.functional.

Each method turns its arguments into a ``Call`` (arrays by request field, the ``Op``) and hands it to
the client's ``_run``, which drives the call core (``calls.CallCore``): the sync client answers with
arrays, the asyncio client with awaitables of arrays.
"""

from __future__ import annotations

from typing import Sequence

import grpc
import numpy as np
from convrpc import wire
from convrpc.core.backend import Gradients
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

from .calls import CallCore
from .channel import max_message_bytes, methods, open_channels
from .errors import ConvRpcError
from .messages import Call
from .tensors import as_array, checked_op
from .training import train_request

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
        self.targets, self._metadata, self._channels = open_channels(
            target, token=token, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, options=options, grpc_module=self._grpc,
        )  # fmt: skip
        self.timeout = timeout
        self._core = CallCore(
            self.targets, mode=data_path, chunk_bytes=chunk_bytes, shard_size=shard_size,
            max_message_bytes=max_message_bytes(options),
        )  # fmt: skip
        self._methods = [methods(c) for c in self._channels]
        self._stubs = [pb_grpc.ConvServiceStub(c) for c in self._channels]
        self._start()

    def _start(self) -> None:  # pragma: no cover - provided by clients
        raise NotImplementedError

    def _timeout(self, timeout):
        return self.timeout if timeout is None else timeout

    def _deadline(self, timeout):
        return self._core.deadline(self._timeout(timeout))

    def _stub(self) -> pb_grpc.ConvServiceStub:
        """The stub of the replica for a call that stays on one (TrainKernel)."""
        return self._stubs[self._core.pick().index]

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

    def server_info(self, *, timeout=None) -> pb.GetServerInfoResponse:
        """The server's version, backend, device and limits (the GetServerInfo response)."""
        steps = self._core.unary("GetServerInfo", pb.GetServerInfoRequest(), self._deadline(timeout))
        return self._run(steps, lambda response: response)

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
        self, input, target, *, kernel_size=None, init_weight=None, bias=False, init_bias=None, stride=1, padding=0,
        dilation=1, groups=1, optimizer="sgd", lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0,
        betas=(0.9, 0.999), eps=1e-8, loss="mse", max_steps=1000, tol=0.0, report_every=1, seed=None,
        batch_size=None, max_seconds=None, snapshot_every=0, progress=False, timeout=None,
    ):  # fmt: skip
        """Fit a conv2d weight (and a bias if ``bias=True``) so that conv2d(input) approaches ``target``.

        Returns a live training run: iterate it for progress updates (``.step``, ``.loss``,
        ``.elapsed``), call ``.result()`` for the :class:`TrainResult`, ``.cancel()`` to stop it.

        - ``kernel_size``: with no ``init_weight``, the weight is (target channels, input
          channels/groups, kh, kw), Kaiming-uniform like torch's Conv2d, seeded by ``seed``.
        - ``optimizer``: ``"sgd"`` (``lr``, ``momentum``, ``nesterov``, ``weight_decay``) or ``"adam"``
          (``lr``, ``betas``, ``eps``, ``weight_decay``), with torch.optim's update rules.
        - ``loss``: ``"mse"`` = mean((z-y)^2) as torch; ``"half_mse"`` = ½·mean; ``"half_sse"`` = ½·sum.
        - stops when loss <= ``tol``, after ``max_steps``, after ``max_seconds`` (default: the
          server's cap), when the loss turns non-finite ("diverged", last finite state returned) or
          when cancelled.
        - ``batch_size``: samples per step (None: full batch), shuffled per epoch from ``seed``.
        - ``report_every``: a progress update every this many steps (the server also rate-limits them);
          ``snapshot_every``: attach the weight to every this-many-th update.
        - ``progress=True`` shows a tqdm bar (terminal or notebook) while the run is consumed.
        """
        request = train_request(
            input, target, kernel_size=kernel_size, init_weight=init_weight, bias=bias, init_bias=init_bias,
            stride=stride, padding=padding, dilation=dilation, groups=groups, optimizer=optimizer, lr=lr,
            momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas, eps=eps, loss=loss,
            max_steps=max_steps, tol=tol, report_every=report_every, seed=seed, batch_size=batch_size,
            max_seconds=max_seconds, snapshot_every=snapshot_every,
        )  # fmt: skip
        return self._train(request, progress, timeout)
