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

from convrpc import shm, wire
from convrpc.core.backend import Gradients
from convrpc.v1 import conv_service_pb2 as pb

from . import config
from .calls import CallCore
from .channel import max_message_bytes, methods, open_channels, pinned_options, single_address
from .errors import ConvRpcError
from .messages import Call
from .server_info import ServerInfo
from .side_channel import SideConnector
from .tensors import as_array, checked_op
from .network_methods import NetworkMethods
from .training import TrainingRun, check_timeout, train_request

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


class OpMethods(NetworkMethods):
    """One method per op and one ``<op>_backward`` per op, and a network's ``forward``, ``backward`` and
    ``train`` (:class:`NetworkMethods`); every method takes ``timeout=`` (seconds). The return types are the sync client's: on ``AsyncConvClient`` each method is a coroutine returning them.

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
        shm_pool_bytes: int = config.SHM_POOL_BYTES,
        side_channel: bool = True,
        stream_buffer_bytes: int = config.STREAM_BUFFER_BYTES,
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
            max_message_bytes=max_message_bytes(options), shm_pool_bytes=shm_pool_bytes,
            side=self._side_connector(side_channel), stream_buffer_bytes=stream_buffer_bytes,
        )  # fmt: skip
        self._methods = [methods(c) for c in self._channels]
        self._start()

    def _side_connector(self, enabled: bool) -> SideConnector | None:
        """How to dial the servers' side channels: TLS exactly when the channels use it, for the name they verify."""
        if not enabled:
            return None
        a = self._channel_args
        tls = any(a[k] is not None for k in ("root_certificates", "private_key", "certificate_chain"))
        name = dict(self._options).get("grpc.ssl_target_name_override")
        return SideConnector(tls=tls, root_certificates=a["root_certificates"], server_name=name)

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

    # -- arrays in shared memory ----------------------------------------------------------------

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """A new, uninitialised array in the client's shared memory (a sealed memfd region of its own): as
        the input of a call to a server on this host it travels by reference, with no copy at all. The
        results of shared-memory calls live there too. Its region is recycled once the array (and every
        view of it) is freed. An ordinary array where shared memory is not available here, or when the
        client's regions already hold ``shm_pool_bytes``."""
        array = self._core.pool.empty(shape, dtype) if shm.AVAILABLE else None
        return np.empty(shape, dtype) if array is None else array

    def asarray(self, x, dtype=None) -> np.ndarray:
        """``x`` as an array in the client's shared memory (see ``empty``): ``x`` itself when it lies there
        already (C-contiguous, of that dtype), else a copy."""
        a = np.asarray(x, dtype=dtype)
        if self._core.pool.find(a) is not None:
            return a
        out = self.empty(a.shape, a.dtype)
        np.copyto(out, a)
        return out

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

    def conv2d(
        self, input: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None, stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1, *,
        timeout: float | None = None,
    ) -> np.ndarray:  # fmt: skip
        """2-D convolution (cross-correlation), as ``torch.nn.functional.conv2d``.

        Parameters
        ----------
        input : array_like, (N, C, H, W) or unbatched (C, H, W), float16, bfloat16, float32 or float64
            N may be 0.
        weight : array_like, (K, C/groups, kh, kw), the input's dtype
        bias : array_like, (K,), optional
        stride : int or (int, int), default 1
        padding : int or (int, int) or {"valid", "same"}, default 0
            Zeros added on each side; "same" (stride 1 only) puts an odd pixel bottom/right, like torch.
        dilation : int or (int, int), default 1
        groups : int, default 1
            Must divide C and K.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        numpy.ndarray, (N, K, OH, OW) or (K, OH, OW), the input's dtype

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.conv2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_forward(
            "conv2d", dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, dilation=dilation, groups=groups), timeout,
        )  # fmt: skip

    def conv_transpose2d(
        self, input: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None, stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0, output_padding: int | Sequence[int] = 0, groups: int = 1,
        dilation: int | Sequence[int] = 1, *, timeout: float | None = None,
    ) -> np.ndarray:  # fmt: skip
        """2-D transposed convolution (the adjoint of conv2d), as ``torch.nn.functional.conv_transpose2d``.

        Parameters
        ----------
        input : array_like, (N, C, H, W) or unbatched (C, H, W), float16, bfloat16, float32 or float64
        weight : array_like, (C, K/groups, kh, kw), the input's dtype
            Note the layout: in_channels first, as in torch.
        bias : array_like, (K,), optional
        stride, padding, dilation : int or (int, int), defaults 1, 0, 1
            Those of the conv2d this is the adjoint of; ``padding`` is removed from the output.
        output_padding : int or (int, int), default 0
            Rows/columns added bottom/right; smaller than the stride or the dilation.
        groups : int, default 1
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        numpy.ndarray, (N, K, OH, OW) or (K, OH, OW), the input's dtype

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.conv_transpose2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_forward(
            "conv_transpose2d", dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation),
            timeout,
        )  # fmt: skip

    def max_pool2d(
        self, input: ArrayLike, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, ceil_mode: bool = False,
        return_indices: bool = False, *, timeout: float | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """2-D max pooling, as ``torch.nn.functional.max_pool2d``; padding counts as -inf.

        Parameters
        ----------
        input : array_like, (N, C, H, W) or unbatched (C, H, W), float16, bfloat16, float32 or float64
        kernel_size : int or (int, int)
        stride : int or (int, int), optional
            Default: ``kernel_size``.
        padding : int or (int, int), default 0
            At most half the kernel size.
        dilation : int or (int, int), default 1
        ceil_mode : bool, default False
            Round the output size up; a last window must still start inside the input or its left padding.
        return_indices : bool, default False
            Also return the int64 flat index (h*W + w within its plane) of every maximum.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        numpy.ndarray, (N, C, OH, OW) or (C, OH, OW), the input's dtype
            With ``return_indices=True``, ``(output, indices)``, indices int64 shaped like output.

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.max_pool2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_forward(
            "max_pool2d", dict(input=input),
            _max_options(kernel_size, stride, padding, dilation, ceil_mode, return_indices), timeout,
        )  # fmt: skip

    def avg_pool2d(
        self, input: ArrayLike, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0, ceil_mode: bool = False, count_include_pad: bool = True,
        divisor_override: int | None = None, *, timeout: float | None = None,
    ) -> np.ndarray:  # fmt: skip
        """2-D average pooling, as ``torch.nn.functional.avg_pool2d``.

        Parameters
        ----------
        input : array_like, (N, C, H, W) or unbatched (C, H, W), float16, bfloat16, float32 or float64
        kernel_size : int or (int, int)
        stride : int or (int, int), optional
            Default: ``kernel_size``.
        padding : int or (int, int), default 0
            Implicit zeros on each side, at most half the kernel size.
        ceil_mode : bool, default False
            Round the output size up, as torch does.
        count_include_pad : bool, default True
            Whether the zero padding counts in the divisor.
        divisor_override : int, optional
            Divide every window's sum by this (non-zero) instead.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        numpy.ndarray, (N, C, OH, OW) or (C, OH, OW), the input's dtype

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.avg_pool2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_forward(
            "avg_pool2d", dict(input=input), _avg_options(kernel_size, stride, padding, ceil_mode, count_include_pad,
                                                          divisor_override), timeout,
        )  # fmt: skip

    def relu(self, input: ArrayLike, inplace: bool = False, *, timeout: float | None = None) -> np.ndarray:
        """max(input, 0) elementwise, as ``torch.nn.functional.relu``.

        Parameters
        ----------
        input : array_like, any shape (0-d and empty too), float16, bfloat16, float32 or float64
        inplace : bool, default False
            Write the result into ``input`` (a writable numpy array) and return it, as torch does; the
            computation is remote either way.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        numpy.ndarray, the input's shape and dtype

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.relu.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        if not inplace:
            return self._call_forward("relu", dict(input=input), {}, timeout)
        if not isinstance(input, np.ndarray) or not input.flags.writeable:
            raise ConvRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "input: inplace=True needs a writable numpy array", "input"
            )
        return self._call_forward("relu", dict(input=input), {}, timeout, _into(input))

    # -- backward -----------------------------------------------------------------------------

    def conv2d_backward(
        self, grad_output: ArrayLike, input: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None,
        stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
        groups: int = 1, *, timeout: float | None = None,
    ) -> Gradients:  # fmt: skip
        """Gradients of conv2d given ``grad_output``, the gradient of the loss w.r.t. its output.

        Parameters
        ----------
        grad_output : array_like, shaped like conv2d's output, the inputs' dtype
        input, weight, bias, stride, padding, dilation, groups
            The op's inputs and options, exactly as given to ``conv2d``.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        Gradients
            ``Gradients(input, weight, bias)``: arrays shaped like the op's inputs, in their dtype;
            ``bias`` is None unless a bias was given.

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.conv2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_backward(
            "conv2d", grad_output, dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, dilation=dilation, groups=groups), timeout,
        )  # fmt: skip

    def conv_transpose2d_backward(
        self, grad_output: ArrayLike, input: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None,
        stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, output_padding: int | Sequence[int] = 0,
        groups: int = 1, dilation: int | Sequence[int] = 1, *, timeout: float | None = None,
    ) -> Gradients:  # fmt: skip
        """Gradients of conv_transpose2d given ``grad_output``, the gradient of the loss w.r.t. its output.

        Parameters
        ----------
        grad_output : array_like, shaped like conv_transpose2d's output, the inputs' dtype
        input, weight, bias, stride, padding, output_padding, groups, dilation
            The op's inputs and options, exactly as given to ``conv_transpose2d``.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        Gradients
            ``Gradients(input, weight, bias)``: arrays shaped like the op's inputs, in their dtype;
            ``bias`` is None unless a bias was given.

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.conv_transpose2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_backward(
            "conv_transpose2d", grad_output, dict(input=input, weight=weight, bias=bias),
            dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation),
            timeout,
        )  # fmt: skip

    def max_pool2d_backward(
        self, grad_output: ArrayLike, input: ArrayLike, kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None, padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1, ceil_mode: bool = False, return_indices: bool = False, *,
        timeout: float | None = None,
    ) -> Gradients:  # fmt: skip
        """Gradients of max_pool2d given ``grad_output``, the gradient of the loss w.r.t. its output.

        Parameters
        ----------
        grad_output : array_like, shaped like max_pool2d's output, the inputs' dtype
        input, kernel_size, stride, padding, dilation, ceil_mode, return_indices
            The op's inputs and options, exactly as given to ``max_pool2d``.
            ``return_indices`` is accepted so the options match the forward's; it changes nothing here.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        Gradients
            ``Gradients(input, weight, bias)``: arrays shaped like the op's inputs, in their dtype
            (``weight`` and ``bias`` None); each window's gradient goes to its first maximum.

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.max_pool2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_backward(
            "max_pool2d", grad_output, dict(input=input),
            _max_options(kernel_size, stride, padding, dilation, ceil_mode, return_indices), timeout,
        )  # fmt: skip

    def avg_pool2d_backward(
        self, grad_output: ArrayLike, input: ArrayLike, kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None, padding: int | Sequence[int] = 0, ceil_mode: bool = False,
        count_include_pad: bool = True, divisor_override: int | None = None, *, timeout: float | None = None,
    ) -> Gradients:  # fmt: skip
        """Gradients of avg_pool2d given ``grad_output``, the gradient of the loss w.r.t. its output.

        Parameters
        ----------
        grad_output : array_like, shaped like avg_pool2d's output, the inputs' dtype
        input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
            The op's inputs and options, exactly as given to ``avg_pool2d``.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        Gradients
            ``Gradients(input, weight, bias)``: arrays shaped like the op's inputs, in their dtype
            (``weight`` and ``bias`` None).

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.avg_pool2d.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._call_backward(
            "avg_pool2d", grad_output, dict(input=input), _avg_options(kernel_size, stride, padding, ceil_mode,
                                                                       count_include_pad, divisor_override), timeout,
        )  # fmt: skip

    def relu_backward(
        self, grad_output: ArrayLike, input: ArrayLike, inplace: bool = False, *, timeout: float | None = None
    ) -> Gradients:
        """Gradients of relu given ``grad_output``, the gradient of the loss w.r.t. its output.

        Parameters
        ----------
        grad_output : array_like, shaped like relu's output, the inputs' dtype
        input, inplace
            The op's inputs and options, exactly as given to ``relu``.
            ``inplace`` is accepted so the options match the forward's; it changes nothing here.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        Gradients
            ``Gradients(input, weight, bias)``: arrays shaped like the op's inputs, in their dtype
            (``weight`` and ``bias`` None): 0 where the result is <= 0, else grad_output (torch's rule,
            so a NaN input passes grad_output through).

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument (``op.relu.<argument>``, ``input``, ``weight``...) for what
            torch would refuse, raised before anything is sent; RESOURCE_EXHAUSTED past the server's caps;
            UNAVAILABLE when no replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
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
            Attach the weight to the progress update every ``snapshot_every * report_every`` steps
            (0: never); those updates always come, whatever the 50 ms limit.
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
        check_timeout(timeout)
        request = train_request(
            input, target, kernel_size=kernel_size, init_weight=init_weight, bias=bias, init_bias=init_bias,
            stride=stride, padding=padding, dilation=dilation, groups=groups, optimizer=optimizer, lr=lr,
            momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas, eps=eps, loss=loss,
            max_steps=max_steps, tol=tol, report_every=report_every, seed=seed, batch_size=batch_size,
            max_seconds=max_seconds, snapshot_every=snapshot_every,
        )  # fmt: skip
        request.run_id = secrets.token_hex(16)  # 128 random bits: only this client can stop the run
        return self._train(request, progress, timeout)
