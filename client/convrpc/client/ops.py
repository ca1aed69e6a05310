"""The SDK's op methods, shared by the sync and asyncio clients: named and ordered like torch.nn.functional.

Each method builds its request and hands it to the client's ``_forward``/``_backward``, which the
sync client answers with arrays and the asyncio client with awaitables of arrays.
"""

from __future__ import annotations

import itertools

from convrpc import wire
from convrpc.core.backend import Gradients
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

from .channel import open_channels
from .sharding import max_message_bytes
from .tensors import as_array, from_tensor, op_message
from .training import train_request

__all__ = ["OpMethods"]


def _gradients(response: pb.BackwardResponse) -> Gradients:
    def get(field):
        return from_tensor(getattr(response, field)) if response.HasField(field) else None

    return Gradients(get("grad_input"), get("grad_weight"), get("grad_bias"))


class OpMethods:
    """One method per op and one ``<op>_backward`` per op; every method takes ``timeout=`` (seconds).

    Also the state both clients share: channels, stubs, data paths and sharded calls (see ``_open``).
    """

    def _open(
        self, target, *, timeout, token, root_certificates, private_key, certificate_chain, options, shard_size,
        data_path, chunk_bytes, grpc_module, sharded_calls_type, data_path_type,
    ):  # fmt: skip
        """Open one channel, stub and data path per target (``grpc`` or ``grpc.aio`` flavoured, with the
        matching sharded-calls and data-path classes)."""
        self.targets, self._metadata, self._channels = open_channels(
            target, token=token, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, options=options, grpc_module=grpc_module,
        )  # fmt: skip
        self.timeout = timeout
        self._stubs = [pb_grpc.ConvServiceStub(c) for c in self._channels]
        self._turn = itertools.count()
        self._shard_size = shard_size
        self._calls = sharded_calls_type(self._stubs, self._metadata, shard_size, max_message_bytes(options))
        # A data path per channel: a shared-memory session belongs to one server.
        self._paths = [data_path_type(c, t, data_path, chunk_bytes) for c, t in zip(self._channels, self.targets)]
        self._path_turn = itertools.count()

    def _deadline(self, timeout):
        return self.timeout if timeout is None else timeout

    def _path(self, arrays):
        """The data path of the next call, or None for the unary path, which shards a batch over shard_size."""
        if self._shard_size is not None and arrays["input"].shape[0] > self._shard_size:
            return None
        return self._paths[next(self._path_turn) % len(self._paths)]

    def _forward(self, request: pb.ForwardRequest, timeout, decode):  # pragma: no cover - provided by clients
        raise NotImplementedError

    def _backward(self, request: pb.BackwardRequest, timeout, decode):  # pragma: no cover
        raise NotImplementedError

    def _train(self, request: pb.TrainKernelRequest, progress: bool, timeout):  # pragma: no cover
        raise NotImplementedError

    def _call_forward(self, op: str, tensors: dict, options: dict, timeout):
        arrays = {field: as_array(value, field) for field, value in tensors.items() if value is not None}
        return self._forward_arrays(op_message(op, options), arrays, timeout)

    def _call_backward(self, op: str, grad_output, tensors: dict, options: dict, timeout):
        arrays = {"grad_output": as_array(grad_output, "grad_output")}
        arrays.update((field, as_array(value, field)) for field, value in tensors.items() if value is not None)
        return self._backward_arrays(op_message(op, options), arrays, timeout)

    def _forward_arrays(self, op: pb.Op, arrays: dict, timeout):
        """Forward over the unary RPC; clients with faster data paths (see ``transport``) route large ones there."""
        request = pb.ForwardRequest(op=op, **{field: wire.encode_tensor(a) for field, a in arrays.items()})
        return self._forward(request, timeout, lambda r: from_tensor(r.output))

    def _backward_arrays(self, op: pb.Op, arrays: dict, timeout):
        """Backward over the unary RPC (``arrays`` holds grad_output and the op's inputs)."""
        request = pb.BackwardRequest(op=op, **{field: wire.encode_tensor(a) for field, a in arrays.items()})
        return self._backward(request, timeout, _gradients)

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

    def max_pool2d(self, input, kernel_size, stride=None, padding=0, dilation=1, *, timeout=None):
        """Max pooling; ``stride=None`` means ``kernel_size``."""
        return self._call_forward(
            "max_pool2d", dict(input=input),
            dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation), timeout,
        )  # fmt: skip

    def avg_pool2d(self, input, kernel_size, stride=None, padding=0, *, timeout=None):
        """Average pooling, zero padding counted; ``stride=None`` means ``kernel_size``."""
        return self._call_forward(
            "avg_pool2d", dict(input=input), dict(kernel_size=kernel_size, stride=stride, padding=padding), timeout
        )

    def relu(self, input, *, timeout=None):
        """max(input, 0) elementwise."""
        return self._call_forward("relu", dict(input=input), {}, timeout)

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

    def max_pool2d_backward(self, grad_output, input, kernel_size, stride=None, padding=0, dilation=1, *, timeout=None):
        """Gradients(input, None, None) of max_pool2d: each window's gradient goes to its first maximum."""
        return self._call_backward(
            "max_pool2d", grad_output, dict(input=input),
            dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation), timeout,
        )  # fmt: skip

    def avg_pool2d_backward(self, grad_output, input, kernel_size, stride=None, padding=0, *, timeout=None):
        """Gradients(input, None, None) of avg_pool2d."""
        return self._call_backward(
            "avg_pool2d", grad_output, dict(input=input),
            dict(kernel_size=kernel_size, stride=stride, padding=padding), timeout,
        )  # fmt: skip

    def relu_backward(self, grad_output, input, *, timeout=None):
        """Gradients(input, None, None) of relu: grad_output where input > 0."""
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
