"""ConvClient: the synchronous SDK, numpy arrays in and out."""

from __future__ import annotations

import threading
from typing import Sequence

import grpc

from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

from .errors import ConvRpcError
from .ops import OpMethods
from .sharding import ShardedCalls
from .training import TrainingRun
from .transport import DataPath

__all__ = ["ConvClient"]


class ConvClient(OpMethods):
    """A client of one or more convrpc servers.

    ``target`` is ``"host:port"``, a gRPC name such as ``"dns:///convrpc:50051"`` (every address it
    resolves to is used round-robin), or a list of those (calls rotate over them). ``timeout`` is the
    default deadline of every call in seconds (None: no deadline); each method also takes
    ``timeout=``. ``token`` is sent as a bearer token; ``root_certificates`` (PEM bytes) switches to
    TLS, and ``private_key``/``certificate_chain`` add a client certificate for mutual TLS.
    ``data_path`` picks how tensors travel: ``"auto"`` (unary for small requests, shared memory to
    a server on this host, chunked streams otherwise), or ``"unary"``, ``"stream"``, ``"shm"`` to
    force one; ``chunk_bytes`` overrides the stream chunk size.

    Forward and Backward calls whose batch exceeds ``shard_size`` (None: no limit) are split along N
    and run concurrently over the replicas on the unary path, as are unary requests too large for one
    message; the result is the unsharded one. A call failing with UNAVAILABLE is sent again to another
    replica. ``train_kernel`` runs on one replica (see :mod:`convrpc.client.sharding`).
    Use it as a context manager or call ``close()``.
    """

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
        self._open(
            target, timeout=timeout, token=token, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, options=options, shard_size=shard_size, data_path=data_path,
            chunk_bytes=chunk_bytes, grpc_module=grpc, sharded_calls_type=ShardedCalls, data_path_type=DataPath,
        )  # fmt: skip
        self._lock = threading.Lock()

    def _stub(self) -> pb_grpc.ConvServiceStub:
        with self._lock:
            return self._stubs[next(self._turn) % len(self._stubs)]

    def _unary(self, method: str, request, timeout):
        try:
            return getattr(self._stub(), method)(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise ConvRpcError.from_rpc_error(error) from None

    def _forward_arrays(self, op, arrays, timeout):
        path = self._path(arrays)
        if path is None:
            return super()._forward_arrays(op, arrays, timeout)
        output = path.forward(op, arrays, self._deadline(timeout), self._metadata)
        return super()._forward_arrays(op, arrays, timeout) if output is None else output

    def _backward_arrays(self, op, arrays, timeout):
        path = self._path(arrays)
        if path is None:
            return super()._backward_arrays(op, arrays, timeout)
        grads = path.backward(op, arrays, self._deadline(timeout), self._metadata)
        return super()._backward_arrays(op, arrays, timeout) if grads is None else grads

    def _forward(self, request, timeout, decode):
        return decode(self._calls("Forward", request, self._deadline(timeout)))

    def _backward(self, request, timeout, decode):
        return decode(self._calls("Backward", request, self._deadline(timeout)))

    def server_info(self, *, timeout=None) -> pb.GetServerInfoResponse:
        """The server's version, backend, device and limits (the GetServerInfo response)."""
        return self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout)

    def _train(self, request, progress, timeout) -> TrainingRun:
        call = self._stub().TrainKernel(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return TrainingRun(call, max_steps=request.max_steps, progress=progress)

    def close(self) -> None:
        self._calls.close()
        for path in self._paths:
            path.close(self._metadata)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "ConvClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConvClient({self.targets!r})"
