"""Chunked tensor payloads of ForwardStream/BackwardStream, shared by server and SDK.

A stream's payload is the bytes of every tensor of its first message (a ForwardRequest, a
BackwardRequest or their responses) that has no storage set, concatenated in field order.
The sender cuts it into ``TensorChunk`` messages that it encodes by hand: byte for byte what
protobuf would produce, but built with one copy of the bulk bytes (protobuf's Python runtime
copies them into a message and again when serialising, which measured 0.3-0.5 GB/s here). The
receiver validates those tensors' headers, preallocates one array per tensor and copies every chunk straight
into place, refusing gaps, overlaps, extra bytes and early ends.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np
from convrpc import wire
from convrpc.core.errors import InvalidArgumentError, ResourceExhaustedError
from convrpc.v1 import conv_service_pb2 as pb

__all__ = [
    "SIDE_ACCEPTED", "SIDE_TOKEN_BYTES", "PayloadAssembler", "byte_views", "decoder", "encode_chunk", "iter_chunks",
    "payload_bytes", "recv_exactly", "recv_views", "send_views", "streamed_tensors",
]  # fmt: skip

#: HTTP/2 and TCP tuning for bulk tensors (server and SDK alike): bigger frames and socket reads.
#: Measured (bench/transport.py --grpc-defaults) it gains 0-25% on 16-64 MiB streams, within noise on a
#: busy 2-core machine; larger flow-control windows, no BDP probing and a bigger write buffer gained nothing.
TRANSPORT_OPTIONS = (
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
    ("grpc.experimental.tcp_read_chunk_size", 4 * 1024 * 1024),
    ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 * 1024 * 1024),
)
#: Field number of ``chunk`` in every *StreamRequest / *StreamResponse oneof.
CHUNK_FIELD = 2
_LEN = 2  # wire type of length-delimited fields
_VARINT = 0


#: A side-channel connection opens with the offer's token and the payload's length (8 bytes, little-endian);
#: the server answers this one byte when it accepted both. (See SideChannelOffer in the proto.)
SIDE_TOKEN_BYTES = 32
SIDE_ACCEPTED = b"\x01"
#: Largest piece handed to one socket call: big enough that Python's per-call cost is noise.
_SOCKET_PIECE = 16 * 1024 * 1024


def streamed_tensors(message) -> list[tuple[str, pb.Tensor]]:
    """``[(field, Tensor)]`` of the tensors of ``message`` whose bytes follow as chunks (set, without
    storage), in field order (a network's ``params[i].weight`` after the message's own): the payload's order."""
    return [(path, value) for path, value in wire.tensor_fields(message) if value.WhichOneof("storage") is None]


def payload_bytes(arrays: Sequence[np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays)


def _byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat memoryview (``memoryview.cast`` cannot take empty
    arrays, nor dtypes outside the buffer protocol such as ``ml_dtypes.bfloat16``)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def byte_views(arrays: Sequence[np.ndarray]) -> list[memoryview]:
    """The payload of ``arrays`` (C-contiguous) as one flat byte view per array, in order: no copy."""
    return [_byte_view(a) for a in arrays]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(offset: int, data: memoryview) -> bytes:
    """A serialised *StreamRequest/*StreamResponse whose ``chunk`` is (offset, data): one copy of ``data``."""
    inner = (
        (_varint(1 << 3 | _VARINT) + _varint(offset) if offset else b"") + _varint(2 << 3 | _LEN) + _varint(len(data))
    )
    prefix = _varint(CHUNK_FIELD << 3 | _LEN) + _varint(len(inner) + len(data)) + inner
    return b"".join((prefix, data))


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IndexError
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def decoder(message_type):
    """A deserialiser for ``message_type`` (a *StreamRequest/*StreamResponse) that returns either
    ``(offset, memoryview)`` for a chunk in the canonical encoding ``encode_chunk`` produces (no copy
    of the data) or, for anything else, the message as protobuf parses it."""
    parse = message_type.FromString
    tag_chunk, tag_offset, tag_data = CHUNK_FIELD << 3 | _LEN, 1 << 3 | _VARINT, 2 << 3 | _LEN

    def decode(raw: bytes):
        view = memoryview(raw)
        try:
            if view[0] == tag_chunk:
                length, pos = _read_varint(view, 1)
                if pos + length == len(view):
                    offset = 0
                    if view[pos] == tag_offset:
                        offset, pos = _read_varint(view, pos + 1)
                    if view[pos] == tag_data:
                        size, pos = _read_varint(view, pos + 1)
                        if pos + size == len(view) and offset < 1 << 63:
                            return offset, view[pos:]
        except IndexError:
            pass
        return parse(raw)

    return decode


def iter_chunks(arrays: Sequence[np.ndarray], chunk_bytes: int) -> Iterator[bytes]:
    """The encoded chunks of the payload of ``arrays`` (C-contiguous), at most ``chunk_bytes`` each."""
    offset = 0
    for array in arrays:
        view = _byte_view(array)
        for start in range(0, len(view), chunk_bytes):
            piece = view[start : start + chunk_bytes]
            yield encode_chunk(offset, piece)
            offset += len(piece)


class PayloadAssembler:
    """Receives one stream's payload into preallocated arrays.

    ``headers`` is ``[(field, Tensor)]`` in payload order (see ``streamed_tensors``). Every header is
    checked (dtype, dims, overflow, ``max_elements``, and all of them against ``max_bytes``) before
    anything is allocated (by ``allocate(shape, dtype)``, ``np.empty`` by default). ``add`` copies a chunk
    into place;
    ``finish`` returns ``{field: array}`` once exactly the declared bytes arrived.
    """

    def __init__(
        self, headers: Sequence[tuple[str, pb.Tensor]], *, max_elements: int | None = None,
        max_bytes: int | None = None, allocate=np.empty,
    ):  # fmt: skip
        layouts = []
        announced = 0
        for field, header in headers:
            dtype, shape, nbytes = wire.tensor_layout(header, field, max_elements=max_elements)
            layouts.append((field, dtype, shape))
            announced += nbytes
        if max_bytes is not None and announced > max_bytes:
            raise ResourceExhaustedError("request", f"tensors of {announced} bytes exceed the server's cap of {max_bytes}",
                                         setting="max_request_bytes", limit=max_bytes)  # fmt: skip
        self.arrays = {field: allocate(shape, dtype) for field, dtype, shape in layouts}
        self._views = [(field, _byte_view(a)) for field, a in self.arrays.items()]
        self.total = sum(len(v) for _, v in self._views)
        self.received = 0
        self._index = 0  # the tensor the next byte goes to
        self._filled = 0  # bytes of that tensor already received

    def add(self, offset: int, data) -> None:
        """Copy one chunk into place; INVALID_ARGUMENT unless it starts where the last one ended and fits."""
        size = len(data)
        if offset != self.received:
            raise InvalidArgumentError(
                "chunk.offset",
                f"expected {self.received} (chunks must arrive in order, without gaps or overlaps), got {offset}",
            )
        if size == 0:
            raise InvalidArgumentError("chunk.data", f"must not be empty (at offset {offset})")
        if offset + size > self.total:
            raise InvalidArgumentError(
                "chunk.data",
                f"the stream sends more than the {self.total} bytes its first message declares "
                f"({offset + size} bytes by the chunk at offset {offset})",
            )
        source = memoryview(data)
        done = 0
        while done < size:
            _, view = self._views[self._index]
            n = min(size - done, len(view) - self._filled)
            view[self._filled : self._filled + n] = source[done : done + n]
            done += n
            self._filled += n
            if self._filled == len(view):
                self._index += 1
                self._filled = 0
        self.received += size

    def fill(self, receive) -> None:
        """Have ``receive(views, total)`` fill the whole payload at once (a raw socket's bytes): the views
        of every tensor in order, ``total`` bytes in all; it raises unless it filled every one."""
        if self.received:
            raise InvalidArgumentError("chunk", "a payload received in part cannot be filled at once")
        receive([v for _, v in self._views], self.total)
        self.received, self._index, self._filled = self.total, len(self._views), 0

    def finish(self) -> dict[str, np.ndarray]:
        """The assembled arrays; INVALID_ARGUMENT when the stream ended before the whole payload arrived."""
        if self.received != self.total:
            field = self._views[self._index][0] if self._index < len(self._views) else "payload"
            raise InvalidArgumentError(
                "chunk",
                f"the stream ended after {self.received} of the {self.total} bytes its first message declares "
                f"(truncated in {field})",
            )
        return self.arrays


# -- the side channel's raw socket: the same payload, framed by its length ---------------------------


def recv_exactly(sock, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes from ``sock``; ConnectionError if it closes first, TimeoutError past ``deadline``
    (``time.monotonic()``; None: the socket's own timeout)."""
    out = bytearray()
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(out)} of {n} bytes by the deadline")
            sock.settimeout(left)
        data = sock.recv(n - len(out))
        if not data:
            raise ConnectionError(f"the peer closed the connection after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


def recv_views(sock, views: Sequence[memoryview]) -> None:
    """Fill every view from ``sock`` in order, straight into place; ConnectionError naming how much
    arrived if it closes first."""
    got, total = 0, sum(len(v) for v in views)
    for view in views:
        filled = 0
        while filled < len(view):
            n = sock.recv_into(view[filled:], min(len(view) - filled, _SOCKET_PIECE))
            if n == 0:
                raise ConnectionError(f"the connection ended after {got} of the {total} bytes announced")
            filled += n
            got += n


def send_views(sock, views: Sequence[memoryview]) -> None:
    for view in views:
        for start in range(0, len(view), _SOCKET_PIECE):
            sock.sendall(view[start : start + _SOCKET_PIECE])
