"""Forward/Backward requests and responses in the three storages: inline bytes, stream chunks, shared memory.

Requests are built from the op's tensor fields (``wire.OP_SPECS``) and one builder whatever the
storage; a response's tensors are read the same way, each by its own storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from convrpc import chunks, wire
from convrpc.core.errors import ConvError
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError

__all__ = [
    "Call", "StreamReader", "inline_request", "inline_results", "request", "result_tensors", "stream_messages",
    "stream_request",
]  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One Forward or Backward: the op's name and ``Op`` message (or "network", a ``Network`` message and
    the ``Sequential`` it describes), and its tensors by request field (path), in field order."""

    op: str
    message: pb.Op | pb.Network
    backward: bool
    arrays: dict[str, np.ndarray]
    #: ``time.monotonic()`` by which the call must be answered; None: no deadline.
    deadline: float | None
    #: The network of a network call; None for an op.
    net: object = None

    @property
    def method(self) -> str:
        return "Backward" if self.backward else "Forward"

    @property
    def nbytes(self) -> int:
        return chunks.payload_bytes(list(self.arrays.values()))

    def with_arrays(self, arrays: dict[str, np.ndarray]) -> "Call":
        return Call(self.op, self.message, self.backward, arrays, self.deadline, self.net)


def request(call: Call, tensors: dict[str, pb.Tensor], shared_memory: pb.SharedMemoryContext | None = None):
    """The ForwardRequest or BackwardRequest of ``call`` with these ``Tensor`` messages (by path)."""
    kind = pb.BackwardRequest if call.backward else pb.ForwardRequest
    if call.net is None:
        return wire.fill_tensors(kind(op=call.message, shared_memory=shared_memory), tensors)
    return wire.fill_tensors(kind(network=call.message, shared_memory=shared_memory), tensors, len(call.net))


def inline_request(call: Call):
    return request(call, {f: wire.encode_tensor(a, f) for f, a in call.arrays.items()})


def stream_request(call: Call, *, side_channel: bool = False):
    """The request as its stream's first message (tensors without storage), asking for the side channel or not."""
    first = request(call, {f: wire.tensor_header(a, f) for f, a in call.arrays.items()})
    kind = pb.BackwardStreamRequest if call.backward else pb.ForwardStreamRequest
    return kind(request=first, side_channel=side_channel)


def stream_messages(call: Call, chunk_bytes: int):
    """The request as its stream's first message, then the chunks of its tensors' bytes."""
    yield stream_request(call)
    yield from chunks.iter_chunks(list(call.arrays.values()), chunk_bytes)


def result_tensors(response) -> list[tuple[str, pb.Tensor]]:
    """``[(field, Tensor)]`` of a response's tensors that are set, in field order (paths such as
    ``grad_params[0].weight`` for a network's)."""
    return wire.tensor_fields(response)


def _malformed(exc: ConvError, code=grpc.StatusCode.INTERNAL) -> ConvRpcError:
    return ConvRpcError(code, f"malformed response: {exc}")


def inline_results(response) -> dict[str, np.ndarray]:
    """A unary response's tensors as fresh, writable arrays."""
    try:
        return {field: wire.decode_tensor(t, field).copy() for field, t in result_tensors(response)}
    except ConvError as exc:
        raise _malformed(exc) from None


class StreamReader:
    """Reassembles a ForwardStream/BackwardStream response (the response, then chunks) into arrays."""

    def __init__(self, allocate=np.empty):
        self.allocate = allocate  # (shape, dtype) -> the array a result is received into
        self.assembler: chunks.PayloadAssembler | None = None

    def add(self, message) -> None:
        try:
            if isinstance(message, tuple) and self.assembler is not None:
                self.assembler.add(*message)  # a chunk, decoded without copying its data
            elif not isinstance(message, tuple) and message.WhichOneof("message") == "response":
                if self.assembler is not None:
                    raise ConvRpcError(grpc.StatusCode.INTERNAL, "the response stream sent a second response")
                self.assembler = chunks.PayloadAssembler(chunks.streamed_tensors(message.response), allocate=self.allocate)
            else:
                raise ConvRpcError(grpc.StatusCode.INTERNAL, "the response stream sent a chunk before its response")
        except ConvError as exc:
            raise _malformed(exc) from None

    def finish(self) -> dict[str, np.ndarray]:
        if self.assembler is None:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, "the response stream ended without a response")
        try:
            return self.assembler.finish()
        except ConvError as exc:
            raise _malformed(exc, grpc.StatusCode.DATA_LOSS) from None
