"""Shared-memory sessions: sealed memfd regions a client hands over a Unix socket, mapped once, used in place.

OpenSharedMemorySession creates a session with a secret id (carried by every request of the session)
and a one-time connect token, and names the server's abstract-namespace SOCK_SEQPACKET socket
(``convrpc.shm`` has the protocol). The client connects, shows the token and then hands over its
regions' file descriptors. One thread (``convrpc-shm``) serves every connection with a selector.

The connection is the session: when it closes (the client closed it, exited or was SIGKILLed: the
kernel closes its sockets), the session ends, its descriptors are closed and its mappings dropped, so
the client's memory goes back to the kernel. Nothing is named anywhere, so nothing can leak.

Each descriptor is checked before it is mapped: a regular file (not a pipe, socket or directory) that
carries seals (a memfd; a disk file or a /dev/shm file cannot be sealed) including F_SEAL_SHRINK and
F_SEAL_GROW, not sealed against writes, on ordinary pages (hugetlbfs could fault when its pool runs
dry), open read-write, not empty, and at most ``max_region_bytes``. A sealed region cannot shrink, so
reading and writing the mapping can never fault past its end (no SIGBUS); a hole the client punches
reads as zeros. Requests read their inputs as numpy views of the mapping, and the backend computes
the results straight into the offered output span (``plan``, then ``outputs`` copies only a result that
did not come out there). The server touches only a request's bytes, so a sparse region costs it
nothing more.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import mmap
import os
import secrets
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from convrpc import shm, wire
from convrpc.core import config
from convrpc.core.errors import ConvError, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from convrpc.v1 import conv_service_pb2 as pb

from .status import status_for

log = logging.getLogger("convrpc.server")

__all__ = ["SharedMemorySessions"]

_ALIGN = 64  # output tensors start on cache-line boundaries
_BUFFER = "shared_memory.output_buffer"
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
#: Refusals remembered per session, so that a request naming a refused region says why.
_REFUSALS_KEPT = 64
_UNSAFE_SEALS = getattr(fcntl, "F_SEAL_WRITE", 0) | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0)


@dataclass
class _Region:
    fd: int
    mapping: mmap.mmap
    size: int

    def release(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(BufferError):  # a request still views it: unmapped when its arrays go
            self.mapping.close()


@dataclass
class _Session:
    id: str
    token: bytes
    opened: float
    connection: socket.socket | None = None
    regions: dict[int, _Region] = field(default_factory=dict)
    refused: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Connection:
    sock: socket.socket
    accepted: float
    session: _Session | None = None


class SharedMemorySessions:
    """The server's shared-memory sessions and the socket thread that receives their regions. Thread-safe."""

    def __init__(self, *, enabled: bool, max_region_bytes: int, other_users: bool = False):
        self.enabled = enabled and shm.AVAILABLE
        self.max_region_bytes = max_region_bytes
        self.other_users = other_users
        self._sessions: dict[str, _Session] = {}
        self._by_token: dict[bytes, _Session] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        #: The socket thread's connections by file descriptor (only that thread touches it).
        self._connections: dict[int, _Connection] = {}
        #: Bytes of client regions mapped, all sessions together.
        self._mapped = 0
        #: Results the backend computed straight into their output span, and results copied there.
        self.results_in_place = self.results_copied = 0
        self.address = ""

    # -- sessions -------------------------------------------------------------------------------

    def open(self) -> pb.OpenSharedMemorySessionResponse:
        if not self.enabled:
            reason = "is disabled on this server (setting shared_memory)" if shm.AVAILABLE else "is not available here"
            raise FailedPreconditionError("shared_memory", reason)
        self._start()
        session = _Session(secrets.token_hex(16), secrets.token_bytes(32), time.monotonic())
        with self._lock:
            # At the cap, the oldest session still waiting for its socket makes room: sessions opened and
            # never connected cannot lock others out; connected ones are live client processes.
            waiting = [s for s in self._sessions.values() if s.connection is None]
            if len(self._sessions) >= config.SHM_MAX_SESSIONS and not waiting:
                raise ResourceExhaustedError(
                    "session_id", f"the server holds its cap of {config.SHM_MAX_SESSIONS} shared-memory sessions"
                )
            evicted = min(waiting, key=lambda s: s.opened) if len(self._sessions) >= config.SHM_MAX_SESSIONS else None
            if evicted is not None:
                del self._sessions[evicted.id]
                self._by_token.pop(evicted.token, None)
            self._sessions[session.id] = self._by_token[session.token] = session
        return pb.OpenSharedMemorySessionResponse(
            session_id=session.id, socket_address=self.address, connect_token=session.token,
            max_region_bytes=self.max_region_bytes, max_regions=config.SHM_MAX_REGIONS,
        )  # fmt: skip

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            self._end(session)

    def _end(self, session: _Session) -> None:
        """Forget a session, close its connection and release its regions (idempotent)."""
        with self._lock:
            self._sessions.pop(session.id, None)
            self._by_token.pop(session.token, None)
        with session.lock:
            regions, session.regions = list(session.regions.values()), {}
            connection, session.connection = session.connection, None
        for region in regions:
            self._release(region)
        if connection is not None:
            self._wake()  # the socket thread unregisters and closes it

    def _release(self, region: _Region) -> None:
        region.release()
        with self._lock:
            self._mapped -= region.size

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def count_results(self, in_place: int, copied: int) -> None:
        with self._lock:
            self.results_in_place += in_place
            self.results_copied += copied
        log.debug("shared-memory results: %d computed in place, %d copied", in_place, copied)

    # -- the socket thread ----------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            name = f"convrpc-{os.getpid()}-{secrets.token_hex(8)}"
            listener.bind(shm.socket_address(name))
            listener.listen(64)
            listener.setblocking(False)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._selector = selectors.DefaultSelector()
            self._selector.register(listener, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._listener, self.address = listener, name
            self._thread = threading.Thread(target=self._serve, name="convrpc-shm", daemon=True)
            self._thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _serve(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=1.0):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif key.data is None:
                    self._accept()
                else:
                    try:
                        self._receive(key.data)
                    except Exception:  # one bad connection must never stop the others
                        log.exception("shared-memory connection failed")
                        self._drop(key.data)
            self._tidy()
        for connection in list(self._connections.values()):
            self._drop(connection)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        refusal = None
        if uid != os.getuid() and not self.other_users:
            refusal = "shared memory serves processes of the server's user only (setting shm_other_users)"
        elif len(self._connections) >= 2 * config.SHM_MAX_SESSIONS:
            refusal = "the server holds its cap of shared-memory connections"
        if refusal is not None:
            with contextlib.suppress(OSError):
                sock.send(shm.encode_reply(0, grpc.StatusCode.FAILED_PRECONDITION.value[0], refusal))
            sock.close()
            return
        sock.setblocking(False)
        connection = _Connection(sock, time.monotonic())
        self._connections[sock.fileno()] = connection
        self._selector.register(sock, selectors.EVENT_READ, connection)

    def _drop(self, connection: _Connection) -> None:
        self._connections.pop(connection.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        if connection.session is not None:
            self._end(connection.session)
        connection.sock.close()

    def _tidy(self) -> None:
        """Drop connections whose session ended elsewhere (closed by RPC), connections that never showed a
        token, and sessions never connected, after ``SHM_CONNECT_SECONDS``."""
        now = time.monotonic()
        for connection in list(self._connections.values()):
            ended = connection.session is not None and connection.session.connection is None
            late = connection.session is None and now - connection.accepted > config.SHM_CONNECT_SECONDS
            if ended or late:
                self._drop(connection)
        with self._lock:
            stale = [s for s in self._sessions.values()
                     if s.connection is None and now - s.opened > config.SHM_CONNECT_SECONDS]  # fmt: skip
        for session in stale:
            self._end(session)

    def _receive(self, connection: _Connection) -> None:
        try:
            message, fds, flags, _ = socket.recv_fds(connection.sock, shm.MAX_MESSAGE, 1)
        except BlockingIOError:
            return
        except OSError:
            message, fds, flags = b"", [], 0
        if not message and not fds:  # end of file: the client closed it, exited or was killed
            self._drop(connection)
            return
        try:
            self._handle(connection, message, fds, flags)
        finally:
            for fd in fds:  # kept ones were duplicated
                os.close(fd)

    def _handle(self, connection: _Connection, message: bytes, fds: list[int], flags: int) -> None:
        try:
            kind, region_id, token = shm.decode(message)
        except ValueError as exc:
            return self._reply(connection, 0, InvalidArgumentError("message", str(exc)), close=True)
        session = connection.session
        if session is None:
            if kind != shm.HELLO:
                return self._reply(connection, 0, FailedPreconditionError("connect_token", "must come first"), close=True)
            with self._lock:
                session = self._by_token.pop(token, None) if len(token) == 32 else None
            if session is None or session.connection is not None:
                return self._reply(connection, 0, FailedPreconditionError(
                    "connect_token", "unknown, used already or expired: open a new session"), close=True)  # fmt: skip
            with session.lock:
                session.connection = connection.sock
            connection.session = session
            return self._reply(connection, 0, None)
        if kind == shm.DROP:
            with session.lock:
                region = session.regions.pop(region_id, None)
            if region is not None:
                self._release(region)
            return None
        if kind != shm.ADD:
            return self._reply(connection, 0, InvalidArgumentError("message", "HELLO may come only once"), close=True)
        try:
            if len(fds) != 1 or flags & socket.MSG_CTRUNC:
                raise InvalidArgumentError("region", f"an ADD message carries exactly one file descriptor, got {len(fds)}")
            self._add(session, region_id, fds[0])
        except ConvError as exc:
            with session.lock:
                session.refused[region_id] = exc
                while len(session.refused) > _REFUSALS_KEPT:
                    session.refused.popitem(last=False)
            return self._reply(connection, region_id, exc)
        self._reply(connection, region_id, None)

    def _add(self, session: _Session, region_id: int, fd: int) -> None:
        with session.lock:
            if region_id in session.regions:
                raise InvalidArgumentError("region_id", f"region {region_id} is in use already: drop it first")
            if len(session.regions) >= config.SHM_MAX_REGIONS:
                raise ResourceExhaustedError("region", f"the session holds its cap of {config.SHM_MAX_REGIONS} regions")
        size = _checked_size(fd, self.max_region_bytes)
        with self._lock:  # address space, not memory: but a server out of it could allocate nothing else
            if self._mapped + size > config.SHM_MAX_MAPPED_BYTES:
                raise ResourceExhaustedError(
                    "region", f"the server maps its cap of {config.SHM_MAX_MAPPED_BYTES} bytes of client regions"
                )
            self._mapped += size
        populate = os.fstat(fd).st_blocks * 512 >= size  # fully allocated by its owner: pre-faulting commits nothing
        try:
            mapping = shm.map_region(fd, size, populate=populate)
        except OSError as exc:
            with self._lock:
                self._mapped -= size
            raise FailedPreconditionError("region", f"cannot be mapped read-write ({exc.strerror})") from None
        region = _Region(os.dup(fd), mapping, size)
        with session.lock:
            if session.connection is None:  # ended meanwhile
                self._release(region)
                return
            session.regions[region_id] = region
            session.refused.pop(region_id, None)

    def _reply(self, connection: _Connection, region_id: int, error: ConvError | None, *, close: bool = False) -> None:
        if error is None:
            reply = shm.encode_reply(region_id, 0)
        else:
            code, message, _ = status_for(error)
            reply = shm.encode_reply(region_id, code.value[0], message)
        try:
            connection.sock.send(reply)
        except OSError:  # a client that never reads its replies loses its connection
            close = True
        if close:
            self._drop(connection)

    def close(self) -> None:
        """End every session and stop the socket thread."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
        for session in sessions:
            self._end(session)
        if self._thread is not None:
            self._wake()
            self._thread.join(10)
            self._selector.close()
            self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- tensors --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, session_id: str):
        """The shared-memory side of one request: ``inputs(...)``, then ``outputs(...)``."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.connection is None:
            raise FailedPreconditionError(
                "shared_memory.session_id",
                "unknown session (it ended when its socket connection closed, or the server restarted): open a new one",
            )
        yield _Request(self, session)


def _checked_size(fd: int, max_bytes: int) -> int:
    """The size of a region the server may map, after every check (see the module docstring)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise FailedPreconditionError("region", "is not a memfd (a pipe, a socket or a directory was sent)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise FailedPreconditionError(
            "region", "cannot be sealed (a disk or /dev/shm file?): make it with memfd_create(MFD_ALLOW_SEALING)"
        ) from None
    if seals & shm.REQUIRED_SEALS != shm.REQUIRED_SEALS:
        raise FailedPreconditionError("region", "is not sealed against shrinking and growing (F_SEAL_SHRINK, F_SEAL_GROW)")
    if seals & _UNSAFE_SEALS:
        raise FailedPreconditionError("region", "is sealed against writes: the server writes results into it")
    if os.fstatvfs(fd).f_bsize != mmap.PAGESIZE:
        raise FailedPreconditionError("region", "is on huge pages (hugetlbfs): use an ordinary memfd")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise FailedPreconditionError("region", "must be open for reading and writing")
    if info.st_size == 0:
        raise InvalidArgumentError("region", "is empty")
    if info.st_size > max_bytes:
        raise ResourceExhaustedError(
            "region", f"{info.st_size} bytes exceed the server's cap of {max_bytes} (setting shm_max_region_bytes)"
        )
    return info.st_size


def _layout(nbytes: list[int]) -> tuple[list[int], int]:
    """Offsets of results of these sizes in an output span, each on a cache line, and the span's size."""
    offsets, size = [], 0
    for n in nbytes:
        offsets.append(size)
        size += -(-n // _ALIGN) * _ALIGN
    return offsets, size


def _same_memory(array: np.ndarray, slot: np.ndarray) -> bool:
    """Whether ``array`` is exactly ``slot``'s bytes (same start, C order; ``slot`` has its size)."""
    return bool(array.nbytes) and array.flags.c_contiguous and array.ctypes.data == slot.ctypes.data


class _Request:
    """One request's access to its session's regions: views of the mappings, checked span by span."""

    def __init__(self, sessions: SharedMemorySessions, session: _Session):
        self.sessions = sessions
        self.session = session

    def _region(self, field: str, region_id: int) -> _Region:
        with self.session.lock:
            region = self.session.regions.get(region_id)
            refused = self.session.refused.get(region_id)
        if region is not None:
            return region
        if refused is not None:  # the reason the socket gave, now naming the request's field
            raise type(refused)(f"{field}.region_id", f"region {region_id} was refused: {refused.description}")
        raise FailedPreconditionError(f"{field}.region_id", f"no region {region_id} in this session")

    def _span(self, field: str, region_id: int, offset: int, nbytes: int, align: int) -> np.ndarray:
        """``nbytes`` bytes of a region from ``offset`` as a uint8 view of its mapping."""
        if offset < 0 or offset % align:
            raise InvalidArgumentError(f"{field}.offset", f"must be >= 0 and a multiple of {align}, got {offset}")
        region = self._region(field, region_id)
        if offset + nbytes > region.size:
            raise InvalidArgumentError(
                f"{field}.offset",
                f"{nbytes} bytes from offset {offset} run past the end of region {region_id} ({region.size} bytes)",
            )
        try:
            return np.frombuffer(region.mapping, np.uint8, nbytes, offset)
        except ValueError:  # released meanwhile (the client dropped it or the session ended)
            raise FailedPreconditionError(f"{field}.region_id", f"region {region_id} was dropped") from None

    def inputs(self, tensors: list[tuple[str, pb.Tensor]]) -> dict[str, np.ndarray]:
        """Read-only views of the client's input spans (``Tensor.shared``), after checking them (the caller
        has checked the layouts against the caps)."""
        arrays = {}
        for name, msg in tensors:
            dtype, shape, nbytes = wire.tensor_layout(msg, name)
            span = msg.shared
            data = self._span(f"{name}.shared", span.region_id, span.offset, nbytes, dtype.itemsize)
            array = data.view(dtype).reshape(shape)
            array.flags.writeable = False
            arrays[name] = array
        return arrays

    def plan(self, results: list[tuple[tuple, np.dtype]], buffer: pb.SharedBuffer | None,
             inputs: list[tuple[str, pb.Tensor]]) -> list[np.ndarray]:  # fmt: skip
        """Writable views of ``buffer`` where :meth:`outputs` will put results of these shapes and dtypes,
        for the backend to compute into (``convrpc.core.placing``). No views when they will not fit (the
        results then go inline) or when the span overlaps an input's (the protocol allows it: the
        results are then computed aside, and copied there once every input has been read)."""
        nbytes = [math.prod(shape) * dtype.itemsize for shape, dtype in results]
        offsets, size = _layout(nbytes)
        if not results or buffer is None or buffer.size < size:
            return []
        for name, msg in inputs:
            start, region_id = msg.shared.offset, msg.shared.region_id
            stop = start + wire.tensor_layout(msg, name)[2]
            if region_id == buffer.region_id and start < buffer.offset + size and buffer.offset < stop:
                return []
        span = self._span(_BUFFER, buffer.region_id, buffer.offset, size, _ALIGN)
        return [span[o : o + n].view(dtype).reshape(shape) for o, n, (shape, dtype) in zip(offsets, nbytes, results)]

    def outputs(self, arrays: list[tuple[str, np.ndarray]], buffer: pb.SharedBuffer | None) -> dict[str, pb.Tensor]:
        """Put the results into the client's ``buffer`` if they fit (``{field: Tensor}`` with ``shared``
        spans saying where each went), else inline. A result the backend computed in its place there
        (see :meth:`plan`) is not copied."""
        offsets, size = _layout([array.nbytes for _, array in arrays])
        if buffer is None or buffer.size < size:
            return {name: wire.encode_tensor(array, name) for name, array in arrays}
        if buffer.size < 0:
            raise InvalidArgumentError(f"{_BUFFER}.size", f"must be >= 0, got {buffer.size}")
        span = self._span(_BUFFER, buffer.region_id, buffer.offset, size, _ALIGN)
        copies, out = [], {}
        for (name, array), offset in zip(arrays, offsets):
            slot = span[offset : offset + array.nbytes]
            if not _same_memory(array, slot):
                # A result elsewhere in the span (not in its own slot) moves out first: no copy may
                # overwrite a result not yet copied.
                copies.append((slot, array.copy() if np.may_share_memory(array, span) else array))
            out[name] = pb.Tensor(
                dtype=wire.dtype_enum(array.dtype), shape=array.shape,
                shared=pb.SharedSpan(region_id=buffer.region_id, offset=buffer.offset + offset),
            )  # fmt: skip
        for slot, array in copies:
            np.copyto(slot, array.reshape(-1).view(np.uint8))
        self.sessions.count_results(len(arrays) - len(copies), len(copies))
        return out
