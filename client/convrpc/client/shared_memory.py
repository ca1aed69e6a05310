"""The SDK's side of shared memory: a pool of sealed memfd regions, and one session (a socket) per server.

``RegionPool`` owns the regions, each a sealed memfd mapped here once. A call's inputs that already
live in a region (arrays from ``ConvClient.empty``/``asarray``, or the results of an earlier call) are
sent by reference with no copy; others are copied into a pooled staging region. The results are
written by the server into an output region and handed out as arrays viewing it: the region is
leased to them and goes back to the pool when the last of them is freed (``weakref.finalize``).
Reusing regions matters: the first touch of a fresh page costs more than a copy. The pool is bounded
(``max_bytes``): past it, regions are not made and the call takes the network instead.

``SharedMemorySession`` is one server's session: its id, and the socket connection over which each
region's descriptor is handed to that server once, before the first request that uses it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import mmap
import os
import select
import socket
import threading
import weakref

import grpc
import numpy as np
from convrpc import shm, wire
from convrpc.core.errors import ConvError
from convrpc.v1 import conv_service_pb2 as pb

from . import config
from .errors import ConvRpcError

__all__ = ["Placement", "RegionPool", "SharedMemorySession", "aligned"]

_ALIGN = 64  # every tensor starts on a cache line
_MIN_REGION = 64 * 1024
#: Idle regions kept for reuse (smallest first out); more are closed.
_IDLE_REGIONS = 4
#: Seconds the SDK waits for the server's answer on the session socket: it answers at once from a thread of
#: its own, so silence means a frozen replica, given up on as soon as gRPC's keepalive would.
_SOCKET_TIMEOUT = (config.KEEPALIVE_TIME_MS + config.KEEPALIVE_TIMEOUT_MS) / 1000
_ids = itertools.count(1)


def aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class _Region:
    """One sealed memfd and its mapping here. ``sessions`` are those it was handed to."""

    def __init__(self, size: int):
        self.id = next(_ids)
        self.size = size
        self.fd = shm.create_region(size)
        try:
            self.mapping = shm.map_region(self.fd, size, populate=True)
        except BaseException:
            os.close(self.fd)
            raise
        self.address = np.frombuffer(self.mapping, np.uint8, 1).ctypes.data
        self.sessions: set[SharedMemorySession] = set()

    def destroy(self) -> None:
        """Close the descriptor and tell each server to drop it; the mapping goes with its last array."""
        for session in list(self.sessions):
            session.drop(self)
        os.close(self.fd)
        self.fd = -1
        with contextlib.suppress(BufferError):  # arrays of a client's user still view it
            self.mapping.close()


class RegionPool:
    """The client's regions: idle ones for reuse, leased ones viewed by arrays. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._idle: list[_Region] = []
        self._leased: dict[int, _Region] = {}  # by id
        self._returned: collections.deque[_Region] = collections.deque()  # by finalizers, any thread
        self._total = 0
        self._lock = threading.Lock()
        self.closed = False
        self._finalizer = weakref.finalize(self, _destroy_all, self._idle)

    # -- regions --------------------------------------------------------------------------------

    def take(self, size: int) -> _Region | None:
        """An idle region of at least ``size`` bytes (at most twice that), or a new one; None past ``max_bytes``.
        OSError if the kernel has no memory for it."""
        size = max(_MIN_REGION, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        doomed, region, fits = [], None, True
        with self._lock:
            self._settle(doomed)
            fitting = [r for r in self._idle if size <= r.size <= 2 * size]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._idle.remove(region)
            else:
                while self._idle and self._total + size > self.max_bytes:
                    doomed.append(self._forget(self._idle.pop()))
                fits = not self.closed and self._total + size <= self.max_bytes
                self._total += size if fits else 0
        for old in doomed:
            old.destroy()
        if region is not None or not fits:
            return region
        try:
            return _Region(size)
        except BaseException:
            with self._lock:
                self._total -= size
            raise

    def give_back(self, region: _Region) -> None:
        """Return a region no array views to the idle list."""
        doomed = []
        with self._lock:
            self._returned.append(region)
            self._settle(doomed)
        for old in doomed:
            old.destroy()

    def discard(self, region: _Region) -> None:
        """Destroy a region that must never be reused (a failed call may still write into it)."""
        with self._lock:
            self._forget(region)
        region.destroy()

    def _forget(self, region: _Region) -> _Region:
        self._total -= region.size
        return region

    def _settle(self, doomed: list) -> None:
        """Move regions given back or whose arrays were freed to the idle list (under the lock)."""
        while self._returned:
            region = self._returned.popleft()
            self._leased.pop(region.id, None)
            if self.closed:
                doomed.append(self._forget(region))
            else:
                self._idle.append(region)
        self._idle.sort(key=lambda r: r.size)
        while len(self._idle) > _IDLE_REGIONS:
            doomed.append(self._forget(self._idle.pop(0)))

    # -- arrays ---------------------------------------------------------------------------------

    def lease(self, region: _Region, layout: list[tuple[np.dtype, tuple, int]]) -> list[np.ndarray]:
        """Arrays ``(dtype, shape, offset)`` viewing ``region``, which goes back to the pool once all are freed."""
        base = np.frombuffer(region.mapping, np.uint8)  # one base per lease: its finalizer is the lease's end
        with self._lock:
            self._leased[region.id] = region
        weakref.finalize(base, self._lease_ended, region)
        arrays = []
        for dtype, shape, offset in layout:
            count = int(np.prod(shape, dtype=np.int64))
            arrays.append(base[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape))
        return arrays

    def _lease_ended(self, region: _Region) -> None:
        """A finalizer, in whatever thread freed the last array: it takes no lock (that thread may hold one)."""
        if self.closed:
            region.destroy()
        else:
            self._returned.append(region)

    def empty(self, shape, dtype) -> np.ndarray | None:
        """A new array in a region of its own, or None past ``max_bytes``."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in np.atleast_1d(shape)) if np.ndim(shape) else (int(shape),)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        try:
            region = self.take(nbytes)
        except OSError:
            return None
        return None if region is None else self.lease(region, [(dtype, shape, 0)])[0]

    def find(self, array: np.ndarray) -> tuple[_Region, int] | None:
        """``(region, offset)`` when ``array`` is C-contiguous and lies wholly in a leased region."""
        if not array.flags.c_contiguous or array.nbytes == 0:
            return None
        start = array.__array_interface__["data"][0]
        with self._lock:
            for region in self._leased.values():
                offset = start - region.address
                if 0 <= offset and offset + array.nbytes <= region.size:
                    return region, offset
        return None

    def close(self) -> None:
        """Destroy the idle regions; leased ones go when their arrays are freed."""
        doomed = []
        with self._lock:
            self.closed = True
            self._settle(doomed)
        for region in doomed:
            region.destroy()
        self._finalizer()


def _destroy_all(regions: list[_Region]) -> None:
    while regions:
        regions.pop().destroy()


class SharedMemorySession:
    """One server's session: its id and the socket its regions are handed over. Thread-safe."""

    def __init__(self, response: pb.OpenSharedMemorySessionResponse):
        self.id = response.session_id
        self.max_region_bytes = response.max_region_bytes
        # Reentrant: a region's finalizer may drop it from inside a hand-over in the same thread.
        self._lock = threading.RLock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(_SOCKET_TIMEOUT)
        self.closed = False
        try:
            self._sock.connect(shm.socket_address(response.socket_address))
            self._send_and_check(shm.encode(shm.HELLO, token=response.connect_token), [], 0)
        except BaseException:
            self._sock.close()
            raise

    def _send_and_check(self, message: bytes, fds: list[int], region_id: int) -> None:
        """Send one message and raise the server's refusal as ConvRpcError; OSError if the socket fails."""
        if fds:
            socket.send_fds(self._sock, [message], fds)
        else:
            self._sock.send(message)
        reply = self._sock.recv(shm.MAX_MESSAGE)
        if not reply:
            raise ConnectionResetError("the server closed the shared-memory socket")
        try:
            got_id, code, text = shm.decode_reply(reply)
        except ValueError as exc:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed shared-memory reply: {exc}") from None
        if code:
            raise ConvRpcError(_CODES.get(code, grpc.StatusCode.UNKNOWN), text)
        if got_id != region_id:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"the server answered for region {got_id}, not {region_id}")

    def alive(self) -> bool:
        """Whether the server still holds the session (its end of the socket is open)."""
        with self._lock:
            if self.closed:
                return False
            poll = select.poll()  # (select() cannot watch descriptors past 1023)
            poll.register(self._sock, select.POLLIN)
            return not poll.poll(0)  # the server never speaks unasked: readable means end of file

    def hand_over(self, region: _Region) -> None:
        """Give the server ``region``'s descriptor, once; ConvRpcError if it refuses, OSError if the socket failed."""
        with self._lock:  # shards running at once may share a region (a weight): it goes over once
            if self in region.sessions:
                return
            if self.closed:
                raise ConnectionResetError("the shared-memory session is closed")
            self._send_and_check(shm.encode(shm.ADD, region.id), [region.fd], region.id)
            region.sessions.add(self)

    def drop(self, region: _Region) -> None:
        region.sessions.discard(self)
        with self._lock, contextlib.suppress(OSError):
            if not self.closed:
                self._sock.send(shm.encode(shm.DROP, region.id))

    def close(self) -> None:
        """Close the socket: the server ends the session and unmaps its regions."""
        with self._lock:
            self.closed = True
            self._sock.close()


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class Placement:
    """One call's tensors in shared memory: inputs by reference where they already lie in a region, the
    others copied into a staging region, and an output region for the results. A context manager for
    the call: on failure the output region is discarded (the server may still write into it)."""

    def __init__(self, pool: RegionPool, staging: _Region | None, output: _Region | None):
        self.pool, self.staging, self.output = pool, staging, output
        self.tensors: dict[str, pb.Tensor] = {}
        self.context: pb.SharedMemoryContext | None = None

    @classmethod
    def make(cls, pool: RegionPool, session: SharedMemorySession, arrays: dict[str, np.ndarray],
             out_bytes: int | None) -> "Placement | None":  # fmt: skip
        """The placement of ``arrays``, handed to ``session``; None when the pool has no room. ConvRpcError when
        the server refuses a region, OSError when the kernel has no memory for one or the socket broke."""
        spans, staged, size = {}, [], 0
        for name, array in arrays.items():
            found = pool.find(array)
            if found is None:
                staged.append((name, array, size))
                size += aligned(array.nbytes)
            else:
                spans[name] = found
        staging = output = None
        try:
            staging = pool.take(size) if staged else None
            output = pool.take(out_bytes) if out_bytes else None
            if (staged and staging is None) or (out_bytes and output is None):
                raise _NoRoom
            for region in {r.id: r for r in [r for r, _ in spans.values()] + [staging, output] if r}.values():
                session.hand_over(region)
        except BaseException as exc:
            for region in (staging, output):
                if region is not None:
                    pool.give_back(region)
            if isinstance(exc, _NoRoom):
                return None
            raise
        placement = cls(pool, staging, output)
        for name, array, offset in staged:
            np.copyto(np.frombuffer(staging.mapping, array.dtype, array.size, offset).reshape(array.shape), array)
            spans[name] = (staging, offset)
        placement.tensors = {
            name: pb.Tensor(dtype=wire.dtype_enum(a.dtype, name), shape=a.shape,
                            shared=pb.SharedSpan(region_id=spans[name][0].id, offset=spans[name][1]))
            for name, a in arrays.items()
        }  # fmt: skip
        buffer = pb.SharedBuffer(region_id=output.id, offset=0, size=output.size) if output else None
        placement.context = pb.SharedMemoryContext(session_id=session.id, output_buffer=buffer)
        return placement

    def results(self, tensors: list[tuple[str, pb.Tensor]]) -> dict[str, np.ndarray]:
        """The response's tensors as arrays: views of the output region (leased to them), or inline copies."""
        shared = [(name, msg) for name, msg in tensors if msg.WhichOneof("storage") == "shared"]
        out = {}
        if shared:
            if self.output is None:
                raise ConvRpcError(grpc.StatusCode.INTERNAL, "the server placed results but no buffer was offered")
            layout = output_layout(shared, self.output)
            out = dict(zip((name for name, _ in shared), self.pool.lease(self.output, layout)))
            self.output = None  # the arrays own it now
        try:
            for name, msg in tensors:
                if name not in out:
                    out[name] = wire.decode_tensor(msg, name).copy()
        except ConvError as exc:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed shared-memory response: {exc}") from None
        return {name: out[name] for name, _ in tensors}

    def __enter__(self) -> "Placement":
        return self

    def __exit__(self, kind, *_) -> None:
        if self.staging is not None:
            self.pool.give_back(self.staging)  # the server only reads it: safe to reuse even after a failure
        if self.output is not None:
            if kind is None:
                self.pool.give_back(self.output)  # results came inline
            else:
                self.pool.discard(self.output)


class _NoRoom(Exception):
    pass


def output_layout(results: list[tuple[str, pb.Tensor]], region: _Region) -> list[tuple[np.dtype, tuple, int]]:
    """``(dtype, shape, offset)`` of each result the server placed in ``region``; ConvRpcError(INTERNAL) if
    one lies outside it or in another region."""
    layout = []
    try:
        for name, msg in results:
            dtype, shape, nbytes = wire.tensor_layout(msg, name)
            span = msg.shared
            if span.region_id != region.id or span.offset < 0 or span.offset + nbytes > region.size:
                raise ConvRpcError(grpc.StatusCode.INTERNAL, f"{name} lies outside the offered output buffer")
            if span.offset % dtype.itemsize:
                raise ConvRpcError(grpc.StatusCode.INTERNAL, f"{name} is not aligned in the output buffer")
            layout.append((dtype, shape, span.offset))
    except ConvError as exc:
        raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed shared-memory response: {exc}") from None
    return layout
