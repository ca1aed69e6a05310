"""How the SDK moves a request's tensors: one unary message, chunked streams, or shared memory.

``data_path="auto"`` (the default) decides per call from the bytes of the request's tensors: up to
``STREAM_THRESHOLD_BYTES`` the unary RPCs (lowest latency); above ``SHM_THRESHOLD_BYTES``
shared memory when the target is on this host (127.0.0.1, localhost, ::1, unix:) and the server
agrees; otherwise ForwardStream/BackwardStream. A path the server refuses (an older server, shared
memory disabled or not visible) is dropped for that channel and the call falls back at once.
``"unary"``, ``"stream"`` and ``"shm"`` force one path and fail rather than fall back.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
from convrpc import chunks, shm
from convrpc.core import config
from convrpc.core.backend import Gradients
from convrpc.core.errors import ConvError
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError
from .shared_memory import SharedMemorySession, probe_region

__all__ = ["DataPath", "PATHS", "is_local"]

PATHS = ("auto", "unary", "stream", "shm")
_SERVICE = "/convrpc.v1.ConvService/"
_FORWARD = ("input", "weight", "bias")
_BACKWARD = ("grad_output", "input", "weight", "bias")
_GRADIENTS = ("grad_input", "grad_weight", "grad_bias")
# Codes that mean "this server will not use that path", as opposed to "this call is wrong".
_REFUSALS = (
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
)


def is_local(target: str) -> bool:
    """Whether a target names this host (shared memory is worth trying)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    if target.startswith("["):
        host = target[1 : target.find("]")]
    else:
        host = target.rsplit(":", 1)[0] if target.count(":") == 1 else target
    return host in ("localhost", "::1") or host.startswith("127.")


def _encode(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _gradients(arrays: dict) -> Gradients:
    return Gradients(arrays.get("grad_input"), arrays.get("grad_weight"), arrays.get("grad_bias"))


class _ResponseReader:
    """Reassembles a ForwardStream/BackwardStream response (a header, then chunks) into arrays."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields = fields
        self.assembler: chunks.PayloadAssembler | None = None

    def add(self, message) -> None:
        kind = "chunk" if isinstance(message, tuple) else message.WhichOneof("message")
        try:
            if isinstance(message, tuple) and self.assembler is not None:
                self.assembler.add(*message)  # a chunk, decoded without copying its data
            elif self.assembler is None and kind == "header":
                specs = [(f, getattr(message.header, f)) for f in self.fields if message.header.HasField(f)]
                self.assembler = chunks.PayloadAssembler(specs)
            elif self.assembler is not None and kind == "chunk":
                self.assembler.add(message.chunk.offset, message.chunk.data)
            else:
                raise ConvRpcError(
                    grpc.StatusCode.INTERNAL, f"unexpected {kind or 'empty'} message in the response stream"
                )
        except ConvError as exc:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed response stream: {exc}") from None

    def finish(self) -> dict[str, np.ndarray]:
        if self.assembler is None:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, "the response stream ended without a header")
        try:
            return self.assembler.finish()
        except ConvError as exc:
            raise ConvRpcError(grpc.StatusCode.DATA_LOSS, f"malformed response stream: {exc}") from None


class _Paths:
    """What sync and asyncio data paths share: the choice of path and the request messages."""

    def __init__(self, channel, target: str, mode: str, chunk_bytes: int | None):
        if mode not in PATHS:
            raise ValueError(f"data_path: expected one of {', '.join(PATHS)}, got {mode!r}")
        self.mode = mode
        self.chunk_bytes = chunk_bytes or config.CHUNK_BYTES
        self.stream_ok = True
        self.shm_ok = shm.AVAILABLE and (mode == "shm" or (mode == "auto" and is_local(target)))
        self.session: SharedMemorySession | None = None

        def stream(name, response_type):
            return channel.stream_stream(
                _SERVICE + name, request_serializer=_encode, response_deserializer=chunks.decoder(response_type),
                _registered_method=True,
            )  # fmt: skip

        def unary(name, response_type):
            return channel.unary_unary(
                _SERVICE + name, request_serializer=_encode, response_deserializer=response_type.FromString,
                _registered_method=True,
            )  # fmt: skip

        self._stream = {
            "ForwardStream": stream("ForwardStream", pb.ForwardStreamResponse),
            "BackwardStream": stream("BackwardStream", pb.BackwardStreamResponse),
        }
        self._unary = {
            "OpenSharedMemorySession": unary("OpenSharedMemorySession", pb.OpenSharedMemorySessionResponse),
            "ForwardSharedMemory": unary("ForwardSharedMemory", pb.ForwardSharedMemoryResponse),
            "BackwardSharedMemory": unary("BackwardSharedMemory", pb.BackwardSharedMemoryResponse),
            "CloseSharedMemorySession": unary("CloseSharedMemorySession", pb.CloseSharedMemorySessionResponse),
        }

    def choose(self, arrays: dict, *, shared: bool = True) -> str:
        """The path for a request with these tensors (``shared=False``: a network path)."""
        if self.mode != "auto":
            return self.mode
        nbytes = chunks.payload_bytes(list(arrays.values()))
        if nbytes > config.SHM_THRESHOLD_BYTES and self.shm_ok and shared:
            return "shm"
        if nbytes > config.STREAM_THRESHOLD_BYTES and self.stream_ok:
            return "stream"
        return "unary"

    def _messages(self, backward: bool, op_msg: pb.Op, arrays: dict):
        fields = _BACKWARD if backward else _FORWARD
        ordered = [(f, arrays[f]) for f in fields if f in arrays]
        specs = {f: chunks.tensor_spec(a) for f, a in ordered}
        if backward:
            yield pb.BackwardStreamRequest(header=pb.BackwardStreamHeader(op=op_msg, **specs))
        else:
            yield pb.ForwardStreamRequest(header=pb.ForwardStreamHeader(op=op_msg, **specs))
        yield from chunks.iter_chunks([a for _, a in ordered], self.chunk_bytes)

    def _refused(self, error: grpc.RpcError, what: str) -> bool:
        """Whether to fall back after ``error`` (and stop trying ``what`` on this channel)."""
        if self.mode == "auto" and error.code() in _REFUSALS:
            setattr(self, f"{what}_ok", False)
            return True
        return False

    def _no_room_there(self, error: grpc.RpcError) -> bool:
        """The server's /dev/shm had no room for the result: this call takes the network."""
        return (
            self.mode == "auto"
            and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            and (error.details() or "").startswith("output_buffer:")
        )

    def _no_room(self, exc: OSError):
        if self.mode == "shm":
            raise ConvRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room in shared memory: {exc}") from None

    def _no_session(self, reason: str):
        if self.mode == "shm":
            raise ConvRpcError(grpc.StatusCode.FAILED_PRECONDITION, f"shared memory is not usable: {reason}")


class DataPath(_Paths):
    """The data paths of one channel of a ConvClient. ``forward``/``backward`` return None for "use unary"."""

    def __init__(self, channel, target: str, mode: str = "auto", chunk_bytes: int | None = None):
        super().__init__(channel, target, mode, chunk_bytes)
        self._lock = threading.Lock()

    def forward(self, op_msg, arrays, timeout, metadata):
        out = self._call(False, op_msg, arrays, timeout, metadata)
        return None if out is None else out["output"]

    def backward(self, op_msg, arrays, timeout, metadata):
        out = self._call(True, op_msg, arrays, timeout, metadata)
        return None if out is None else _gradients(out)

    def _call(self, backward, op_msg, arrays, timeout, metadata):
        path = self.choose(arrays)
        if path == "shm":
            out = self._shared(backward, op_msg, arrays, timeout, metadata)
            if out is not None:
                return out
            path = self.choose(arrays, shared=False)
        if path == "stream":
            return self._streamed(backward, op_msg, arrays, timeout, metadata)
        return None

    def _streamed(self, backward, op_msg, arrays, timeout, metadata):
        reader = _ResponseReader(_GRADIENTS if backward else ("output",))
        method = "BackwardStream" if backward else "ForwardStream"
        call = self._stream[method](self._messages(backward, op_msg, arrays), timeout=timeout, metadata=metadata)
        try:
            for message in call:
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

    def _session(self, timeout, metadata) -> SharedMemorySession | None:
        with self._lock:
            if self.session is None and self.shm_ok:
                try:
                    with probe_region() as (name, nonce):
                        request = pb.OpenSharedMemorySessionRequest(probe_region=name, probe_nonce=nonce)
                        response = self._unary["OpenSharedMemorySession"](request, timeout=timeout, metadata=metadata)
                except grpc.RpcError as error:
                    if self.mode == "shm" or not self._refused(error, "shm"):
                        raise ConvRpcError.from_rpc_error(error) from None
                except OSError as exc:
                    self.shm_ok = False
                    return self._no_session(f"cannot create a shared-memory region here ({exc})")
                else:
                    self.session = SharedMemorySession(response)
            return self.session if self.session is not None else self._no_session("the server refused a session")

    def _shared(self, backward, op_msg, arrays, timeout, metadata):
        method = "BackwardSharedMemory" if backward else "ForwardSharedMemory"
        request_type = pb.BackwardSharedMemoryRequest if backward else pb.ForwardSharedMemoryRequest
        fields = _GRADIENTS if backward else ("output",)
        for attempt in range(2):
            session = self._session(timeout, metadata)
            if session is None:
                return None
            try:
                with session.place(arrays) as (shared, buffer, collect):
                    request = request_type(session_id=session.id, op=op_msg, output_buffer=buffer, **shared)
                    response = self._unary[method](request, timeout=timeout, metadata=metadata)
                    return collect([(f, getattr(response, f)) for f in fields if response.HasField(f)])
            except grpc.RpcError as error:
                session.discard_outputs()
                if error.code() is grpc.StatusCode.FAILED_PRECONDITION and attempt == 0:
                    self._drop(session)  # expired, or the server restarted: open a new session once
                    continue
                if self._refused(error, "shm") or self._no_room_there(error):
                    return None
                raise ConvRpcError.from_rpc_error(error) from None
            except OSError as exc:  # /dev/shm is full: this call takes the network
                return self._no_room(exc)
        return None

    def _drop(self, session: SharedMemorySession) -> None:
        with self._lock:
            if self.session is session:
                self.session = None
        session.close()

    def close(self, metadata=None) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        try:
            request = pb.CloseSharedMemorySessionRequest(session_id=session.id)
            self._unary["CloseSharedMemorySession"](request, timeout=5, metadata=metadata)
        except grpc.RpcError:
            pass  # the server sweeps what it created once the TTL passes
        finally:
            session.close()
