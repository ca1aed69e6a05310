"""The asyncio twin of ``transport.DataPath``: the same choices, awaited calls."""

from __future__ import annotations

import asyncio

import grpc
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError
from .shared_memory import SharedMemorySession, probe_region
from .transport import _GRADIENTS, _gradients, _Paths, _ResponseReader

__all__ = ["AsyncDataPath"]


class AsyncDataPath(_Paths):
    """The asyncio twin of :class:`DataPath` (same decisions, awaited calls)."""

    def __init__(self, channel, target: str, mode: str = "auto", chunk_bytes: int | None = None):
        super().__init__(channel, target, mode, chunk_bytes)
        self._lock = asyncio.Lock()

    async def forward(self, op_msg, arrays, timeout, metadata):
        out = await self._call(False, op_msg, arrays, timeout, metadata)
        return None if out is None else out["output"]

    async def backward(self, op_msg, arrays, timeout, metadata):
        out = await self._call(True, op_msg, arrays, timeout, metadata)
        return None if out is None else _gradients(out)

    async def _call(self, backward, op_msg, arrays, timeout, metadata):
        path = self.choose(arrays)
        if path == "shm":
            out = await self._shared(backward, op_msg, arrays, timeout, metadata)
            if out is not None:
                return out
            path = self.choose(arrays, shared=False)
        if path == "stream":
            return await self._streamed(backward, op_msg, arrays, timeout, metadata)
        return None

    async def _streamed(self, backward, op_msg, arrays, timeout, metadata):
        reader = _ResponseReader(_GRADIENTS if backward else ("output",))
        method = "BackwardStream" if backward else "ForwardStream"
        call = self._stream[method](self._messages(backward, op_msg, arrays), timeout=timeout, metadata=metadata)
        try:
            async for message in call:
                reader.add(message)
        except grpc.RpcError as error:
            if self.mode == "auto" and error.code() is grpc.StatusCode.UNIMPLEMENTED:
                self.stream_ok = False  # a server from before the streams: unary it is
                return None
            raise ConvRpcError.from_rpc_error(error) from None
        except BaseException:
            call.cancel()
            raise
        return reader.finish()

    async def _session(self, timeout, metadata) -> SharedMemorySession | None:
        async with self._lock:
            if self.session is None and self.shm_ok:
                try:
                    with probe_region() as (name, nonce):
                        request = pb.OpenSharedMemorySessionRequest(probe_region=name, probe_nonce=nonce)
                        response = await self._unary["OpenSharedMemorySession"](
                            request, timeout=timeout, metadata=metadata
                        )
                except grpc.RpcError as error:
                    if self.mode == "shm" or not self._refused(error, "shm"):
                        raise ConvRpcError.from_rpc_error(error) from None
                except OSError as exc:
                    self.shm_ok = False
                    return self._no_session(f"cannot create a shared-memory region here ({exc})")
                else:
                    self.session = SharedMemorySession(response)
            return self.session if self.session is not None else self._no_session("the server refused a session")

    async def _shared(self, backward, op_msg, arrays, timeout, metadata):
        method = "BackwardSharedMemory" if backward else "ForwardSharedMemory"
        request_type = pb.BackwardSharedMemoryRequest if backward else pb.ForwardSharedMemoryRequest
        fields = _GRADIENTS if backward else ("output",)
        for attempt in range(2):
            session = await self._session(timeout, metadata)
            if session is None:
                return None
            try:
                with session.place(arrays) as (shared, buffer, collect):
                    request = request_type(session_id=session.id, op=op_msg, output_buffer=buffer, **shared)
                    response = await self._unary[method](request, timeout=timeout, metadata=metadata)
                    return collect([(f, getattr(response, f)) for f in fields if response.HasField(f)])
            except grpc.RpcError as error:
                session.discard_outputs()
                if error.code() is grpc.StatusCode.FAILED_PRECONDITION and attempt == 0:
                    if self.session is session:
                        self.session = None
                    session.close()
                    continue
                if self._refused(error, "shm") or self._no_room_there(error):
                    return None
                raise ConvRpcError.from_rpc_error(error) from None
            except OSError as exc:
                return self._no_room(exc)
        return None

    async def close(self, metadata=None) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        try:
            request = pb.CloseSharedMemorySessionRequest(session_id=session.id)
            await self._unary["CloseSharedMemorySession"](request, timeout=5, metadata=metadata)
        except grpc.RpcError:
            pass
        finally:
            session.close()
