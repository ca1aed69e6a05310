"""The SDK's side of a shared-memory session: the regions it owns and the output regions it claims.

Each call copies its tensors into a pooled region the client created (with ``SharedMemory``, whose
resource tracker unlinks it even if this process dies) and offers the rest of that region for the
response; the server writes the results there and the client copies them out. Reusing regions
matters: the first touch of a fresh shared page is far slower than a copy. A response that does
not fit comes in a region the server created instead: the client maps it, unlinks its name at once
and hands out arrays viewing the mapping (and offers more room next time).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import weakref
from multiprocessing import resource_tracker, shared_memory

import grpc
import numpy as np
from convrpc import shm, wire
from convrpc.core.errors import ConvError
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError

__all__ = ["SharedMemorySession", "probe_region"]

_ALIGN = 64  # every tensor starts on a cache line
_MIN_REGION = 1024 * 1024
_IDLE_REGIONS = 2  # regions kept for reuse: a fresh region's first touch of each page is slow


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@contextlib.contextmanager
def probe_region():
    """``(name, nonce)`` of a short-lived region holding a random nonce, for OpenSharedMemorySession."""
    name, nonce = f"cvp{secrets.token_hex(12)}", secrets.token_bytes(32)
    region = shared_memory.SharedMemory(name=name, create=True, size=len(nonce))
    try:
        region.buf[: len(nonce)] = nonce
        yield name, nonce
    finally:
        region.close()
        region.unlink()


class _Region:
    def __init__(self, prefix: str, size: int):
        self.name = f"{prefix}i{secrets.token_hex(8)}"
        self.size = size
        self.memory = shared_memory.SharedMemory(name=self.name, create=True, size=size)
        try:
            fd = shm.open_region(self.name, writable=True)
            try:
                shm.reserve(fd, size)  # OSError now rather than SIGBUS later if /dev/shm is full
            finally:
                os.close(fd)
        except BaseException:
            self.destroy()
            raise

    def write(self, offset: int, array: np.ndarray) -> None:
        np.frombuffer(self.memory.buf, dtype=array.dtype, count=array.size, offset=offset)[:] = array.reshape(-1)

    def destroy(self) -> None:
        self.memory.close()
        try:
            self.memory.unlink()  # also tells the resource tracker it need not clean up after us
        except FileNotFoundError:  # the server unlinked it when the session ended
            resource_tracker.unregister(self.memory._name, "shared_memory")


def _destroy_all(regions: list[_Region]) -> None:
    while regions:
        regions.pop().destroy()


class SharedMemorySession:
    """One open session: its id, its name prefix and a small pool of reusable regions. Thread-safe."""

    def __init__(self, response: pb.OpenSharedMemorySessionResponse):
        self.id = response.session_id
        self.prefix = response.region_prefix
        self._outputs = re.compile(re.escape(self.prefix) + r"o[0-9a-f]{16}")
        self._idle: list[_Region] = []
        self._lock = threading.Lock()
        #: Largest response seen that did not fit the span offered: offered from then on.
        self._output_hint = 0
        self.closed = False
        # A client never closed still unlinks its idle regions when collected or at exit.
        self._finalizer = weakref.finalize(self, _destroy_all, self._idle)

    @contextlib.contextmanager
    def place(self, arrays: dict[str, np.ndarray]):
        """Copy ``arrays`` into a pooled region, with room after them for the response, for one call.

        Yields ``(tensors, context, collect)``: ``{field: Tensor}`` (shared storage) for the request, its
        ``SharedMemoryContext`` (this session, offering the rest of the region for the results), and
        ``collect(tensors)`` turning the response's ``[(field, Tensor)]`` into arrays (to be called
        before the block ends, while the region is still this call's).
        """
        layout, size = [], 0
        for name, array in arrays.items():
            layout.append((name, array, size))
            size += _aligned(array.nbytes)
        out_size = _aligned(max(size, self._output_hint))
        region = self._take(size + out_size)
        try:
            for _, array, offset in layout:
                region.write(offset, array)
            tensors = {
                name: pb.Tensor(
                    dtype=wire.dtype_enum(a.dtype, name), shape=a.shape,
                    shared=pb.SharedSpan(region=region.name, offset=offset),
                )  # fmt: skip
                for name, a, offset in layout
            }
            buffer = pb.SharedBuffer(region=region.name, offset=size, size=region.size - size)
            context = pb.SharedMemoryContext(session_id=self.id, output_buffer=buffer)
            yield tensors, context, lambda tensors: self._collect(region, tensors)
        except BaseException:
            # A call that failed (a deadline, a lost connection) may still be running on the server,
            # which would write its result into this region later: never hand it to another call.
            region.destroy()
            raise
        self._give_back(region)

    def _take(self, size: int) -> _Region:
        with self._lock:
            fitting = [r for r in self._idle if r.size >= size]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._idle.remove(region)
                return region
        return _Region(self.prefix, max(size, _MIN_REGION))

    def _give_back(self, region: _Region) -> None:
        with self._lock:
            if not self.closed:
                self._idle.append(region)
                self._idle.sort(key=lambda r: r.size)
                region = self._idle.pop(0) if len(self._idle) > _IDLE_REGIONS else None
        if region is not None:
            region.destroy()

    def _collect(self, own: _Region, tensors: list[tuple[str, pb.Tensor]]) -> dict[str, np.ndarray]:
        """Arrays of the response: copied out of our own region, or viewing a claimed server region."""
        for name, msg in tensors:
            if msg.WhichOneof("storage") != "shared":
                raise ConvRpcError(grpc.StatusCode.INTERNAL, f"{name}: expected a tensor in shared memory")
        foreign = [(name, msg) for name, msg in tensors if msg.shared.region != own.name]
        out = self._claim(foreign) if foreign else {}
        if foreign:
            needed = sum(_aligned(a.nbytes) for a in out.values())
            with self._lock:
                self._output_hint = max(self._output_hint, needed)
        try:
            for name, msg in tensors:
                if msg.shared.region == own.name:
                    dtype, shape, nbytes = wire.tensor_layout(msg, name)
                    count, offset = nbytes // dtype.itemsize, msg.shared.offset
                    if offset < 0 or offset + nbytes > own.size:
                        raise ConvRpcError(grpc.StatusCode.INTERNAL, f"{name} lies outside the offered buffer")
                    array = np.empty(shape, dtype)
                    np.copyto(array.reshape(-1), np.frombuffer(own.memory.buf, dtype, count, offset))
                    out[name] = array
        except ConvError as exc:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed shared-memory response: {exc}") from None
        return {name: out[name] for name, _ in tensors}

    def _claim(self, tensors: list[tuple[str, pb.Tensor]]) -> dict[str, np.ndarray]:
        """Map the server's output region(s), unlink them, and return arrays viewing the mapping."""
        regions = {}
        try:
            for _, msg in tensors:
                name = msg.shared.region
                if name in regions:
                    continue
                if not self._outputs.fullmatch(name):
                    raise ConvRpcError(grpc.StatusCode.INTERNAL, f"the server named a foreign output region {name!r}")
                try:
                    regions[name] = shm.attach(name, writable=True)
                except FileNotFoundError:
                    raise ConvRpcError(
                        grpc.StatusCode.DATA_LOSS, f"output region {name} vanished before it was read"
                    ) from None
            out = {}
            for name, msg in tensors:
                dtype, shape, nbytes = wire.tensor_layout(msg, name)
                region, offset = regions[msg.shared.region], msg.shared.offset
                if offset < 0 or offset + nbytes > len(region):
                    raise ConvRpcError(grpc.StatusCode.INTERNAL, f"{name} lies outside its output region")
                out[name] = np.frombuffer(region, dtype, nbytes // dtype.itemsize, offset).reshape(shape)
            return out
        except ConvError as exc:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed shared-memory response: {exc}") from None
        finally:
            for _, msg in tensors:
                if self._outputs.fullmatch(msg.shared.region):
                    shm.unlink(msg.shared.region)

    def discard_outputs(self) -> None:
        """Unlink any output region of this session left behind (a call that failed midway)."""
        for name in shm.names_with_prefix(self.prefix + "o"):
            shm.unlink(name)

    def close(self) -> None:
        """Unlink the idle input regions and any unclaimed output; regions still in use go when their call ends."""
        with self._lock:
            self.closed = True
        self._finalizer()
        self.discard_outputs()
