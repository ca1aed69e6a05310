"""AsyncConvClient: the asyncio twin of ConvClient; every method is awaited, runs are iterated with ``async for``."""

from __future__ import annotations

from typing import AsyncIterator, Sequence

import grpc
from grpc import aio

from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

from .aio_transport import AsyncDataPath
from .errors import ConvRpcError
from .ops import OpMethods
from .sharding import AsyncShardedCalls
from .training import TrainingRun, TrainProgress, TrainResult

__all__ = ["AsyncConvClient", "AsyncTrainingRun"]


class AsyncTrainingRun(TrainingRun):
    """A training run for asyncio: ``async for update in run``, ``await run.result()``, ``run.cancel()``."""

    async def __aiter__(self) -> AsyncIterator[TrainProgress]:
        bar = self._progress_bar() if self._progress and self._result is None else None
        try:
            while self._result is None:
                try:
                    message = await self._call.read()
                except grpc.RpcError as error:
                    raise ConvRpcError.from_rpc_error(error) from None
                if message is aio.EOF:
                    raise ConvRpcError(grpc.StatusCode.INTERNAL, "the training stream ended without a result")
                update = self._receive(message, bar)
                if update is not None:
                    yield update
        finally:
            self._leave(bar)  # leaving early (break, task cancelled, Ctrl-C) cancels the server's run

    def __iter__(self):
        raise TypeError("an AsyncTrainingRun is iterated with 'async for'")

    async def result(self) -> TrainResult:
        async for _ in self:
            pass
        return self._result


class AsyncConvClient(OpMethods):
    """ConvClient for asyncio: the same constructor and methods, each a coroutine.

    ``train_kernel`` returns an :class:`AsyncTrainingRun` at once (no await).
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
            chunk_bytes=chunk_bytes, grpc_module=aio, sharded_calls_type=AsyncShardedCalls, data_path_type=AsyncDataPath,
        )  # fmt: skip

    def _stub(self) -> pb_grpc.ConvServiceStub:
        return self._stubs[next(self._turn) % len(self._stubs)]

    async def _unary(self, method: str, request, timeout):
        deadline = self._deadline(timeout)
        try:
            return await getattr(self._stub(), method)(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ConvRpcError.from_rpc_error(error) from None

    async def _forward_arrays(self, op, arrays, timeout):
        path = self._path(arrays)
        if path is None:
            return await super()._forward_arrays(op, arrays, timeout)
        deadline = self._deadline(timeout)
        output = await path.forward(op, arrays, deadline, self._metadata)
        return await super()._forward_arrays(op, arrays, timeout) if output is None else output

    async def _backward_arrays(self, op, arrays, timeout):
        path = self._path(arrays)
        if path is None:
            return await super()._backward_arrays(op, arrays, timeout)
        deadline = self._deadline(timeout)
        grads = await path.backward(op, arrays, deadline, self._metadata)
        return await super()._backward_arrays(op, arrays, timeout) if grads is None else grads

    async def _forward(self, request, timeout, decode):
        return decode(await self._calls("Forward", request, self._deadline(timeout)))

    async def _backward(self, request, timeout, decode):
        return decode(await self._calls("Backward", request, self._deadline(timeout)))

    async def server_info(self, *, timeout=None) -> pb.GetServerInfoResponse:
        return await self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout)

    def _train(self, request, progress, timeout) -> AsyncTrainingRun:
        deadline = self._deadline(timeout)
        call = self._stub().TrainKernel(request, timeout=deadline, metadata=self._metadata)
        return AsyncTrainingRun(call, max_steps=request.max_steps, progress=progress)

    async def close(self) -> None:
        for path in self._paths:
            await path.close(self._metadata)
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncConvClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
