"""Shared-memory sessions: which client may use which regions, and the cleanup of every region made for one.

A client opens a session by showing the server a probe region it created (proving both see the
same /dev/shm and run as the same user). The session gets a secret id, sent with every request
and never part of a region name, and a public name prefix. The server reads only input regions
named ``<prefix>i<16 hex>`` of the session the request's id opens, so a client cannot make it read
or write anyone else's memory. It creates each response's outputs that do not fit the client's
buffer in a fresh ``<prefix>o<16 hex>`` region that the client unlinks once mapped.

Nothing a client does to its regions can hurt the server: it never maps them, it copies exactly
the request's bytes in and the results out with ``preadv``/``pwritev`` (a truncated region gives a
short read and INVALID_ARGUMENT, where a mapping would give SIGBUS), refuses links and non-regular
files, and refuses regions larger than ``max_region_bytes``.

A session is a lease: idle for ``session_ttl`` seconds, or closed, it ends and every region named
with its prefix is unlinked, so a client killed outright (its resource tracker too) leaks nothing
for longer than that. Each server names its sessions' prefixes after a marker region
``cvs<tag>`` it holds an flock on for its lifetime; at start-up a server unlinks the regions of
every marker whose lock is free (its server died without cleaning up).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from convrpc import shm, wire
from convrpc.core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from convrpc.v1 import conv_service_pb2 as pb

log = logging.getLogger("convrpc.server")

__all__ = ["SharedMemorySessions", "sweep_stale_regions"]

_PROBE = re.compile(r"cvp[0-9a-f]{24}")
_MARKER = re.compile(r"cvs([0-9a-f]{8})")
#: A session region's name: "cv", the tag of the server that made the session, then more.
_SESSION_REGION = re.compile(r"cv([0-9a-f]{8})[0-9a-f]*[io][0-9a-f]+")
#: A probe lives for one OpenSharedMemorySession call, and a live server's marker exists before any of
#: its sessions: a probe, or a session region with no marker, this old was left by something that died.
_STALE_PROBE_SECONDS = 600.0
_ALIGN = 64  # output tensors start on cache-line boundaries
MAX_SESSIONS = 4096
_BUFFER = "shared_memory.output_buffer"


def sweep_stale_regions() -> int:
    """Unlink the regions of every server that died without cleaning up (its marker's lock is free),
    session regions older than ``_STALE_PROBE_SECONDS`` whose server's marker is gone, and probes
    abandoned by killed clients; the number of names unlinked. Linux only (elsewhere 0)."""
    swept, now = 0, time.time()
    for name in shm.names_with_prefix("cv"):
        path = os.path.join("/dev/shm", name)
        try:
            info = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        old = now - info.st_mtime > _STALE_PROBE_SECONDS
        if _PROBE.fullmatch(name) and old:
            swept += shm.unlink(name)
        session = _SESSION_REGION.fullmatch(name)
        if session and old and not os.path.lexists(os.path.join("/dev/shm", "cvs" + session.group(1))):
            swept += shm.unlink(name)  # its server is gone and so is its marker: nobody will unlink it
            continue
        marker = _MARKER.fullmatch(name)
        if marker is None:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its server is alive
            os.close(fd)
            continue
        try:
            for region in shm.names_with_prefix("cv" + marker.group(1)):
                swept += shm.unlink(region)
            shm.unlink(name)
        finally:
            os.close(fd)
    if swept:
        log.warning("unlinked %d shared-memory region(s) left by servers or clients that died", swept)
    return swept


def _locked_marker(name: str) -> int:
    """A new marker region, flocked for as long as this process lives. A sweep may find it in the instant
    between creation and lock and unlink it: then it is made again."""
    while True:
        fd = shm.create_fd(name, 1)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink == 1:
            return fd
        os.close(fd)


@dataclass
class _Session:
    prefix: str
    last_used: float
    #: Output regions created and not yet seen unlinked: name -> creation time.
    outputs: dict[str, float] = field(default_factory=dict)


class SharedMemorySessions:
    """The server's shared-memory sessions. Thread-safe; ``close()`` unlinks every region made for one."""

    def __init__(self, *, enabled: bool, output_ttl: float, session_ttl: float, max_region_bytes: int):
        self.enabled = enabled and shm.AVAILABLE
        self.output_ttl = output_ttl
        self.session_ttl = session_ttl
        self.max_region_bytes = max_region_bytes
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._tag, self._marker = secrets.token_hex(4), None
        if self.enabled:
            sweep_stale_regions()
            try:
                self._marker = _locked_marker(f"cvs{self._tag}")
            except OSError as exc:
                log.warning("shared memory disabled: cannot create the server's marker region (%s)", exc)
                self.enabled = False

    # -- sessions -------------------------------------------------------------------------------

    def open(self, probe_region: str, probe_nonce: bytes) -> pb.OpenSharedMemorySessionResponse:
        if not self.enabled:
            reason = "is disabled on this server (setting shared_memory)" if shm.AVAILABLE else "is not available here"
            raise FailedPreconditionError("shared_memory", reason)
        if not _PROBE.fullmatch(probe_region):
            raise InvalidArgumentError("probe_region", f"expected 'cvp' and 24 hex digits, got {probe_region!r}")
        if not 16 <= len(probe_nonce) <= 64:
            raise InvalidArgumentError("probe_nonce", f"expected 16 to 64 bytes, got {len(probe_nonce)}")
        try:
            fd = shm.open_region(probe_region, writable=False)
        except FileNotFoundError:
            raise FailedPreconditionError(
                "probe_region",
                f"the server cannot see region {probe_region}: it is not on the client's host or IPC namespace",
            ) from None
        except (PermissionError, ValueError) as exc:
            raise FailedPreconditionError("probe_region", str(exc)) from None
        try:
            # Some systems round a region up to whole pages: compare the nonce's bytes only.
            seen = bytearray(len(probe_nonce))
            whole = shm.read_exactly(fd, memoryview(seen), 0) == len(seen)
        finally:
            os.close(fd)
        if not whole or not secrets.compare_digest(bytes(seen), probe_nonce):
            raise FailedPreconditionError("probe_nonce", f"region {probe_region} does not hold the nonce")
        session_id = secrets.token_hex(16)
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                raise ResourceExhaustedError("session_id", f"the server holds its cap of {MAX_SESSIONS} sessions")
            taken = {s.prefix for s in self._sessions.values()}
            prefix = next(p for p in iter(lambda: f"cv{self._tag}{secrets.token_hex(5)}", None) if p not in taken)
            session = self._sessions[session_id] = _Session(prefix=prefix, last_used=time.monotonic())
            self._start_sweeper()
        return pb.OpenSharedMemorySessionResponse(
            session_id=session_id, region_prefix=session.prefix, output_ttl_seconds=self.output_ttl
        )

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            self._retire(session)

    @staticmethod
    def _retire(session: _Session) -> int:
        """Unlink every region named with the session's prefix, the client's too; the number unlinked."""
        return sum(shm.unlink(name) for name in shm.names_with_prefix(session.prefix))

    def _session(self, session_id: str) -> _Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise FailedPreconditionError(
                    "shared_memory.session_id",
                    "unknown shared-memory session (closed, expired or from before a restart); open a new one",
                )
            session.last_used = time.monotonic()
            return session

    # -- tensors --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, session_id: str):
        """The shared-memory side of one request: ``inputs(...)``, then ``outputs(...)``."""
        call = _Request(self, self._session(session_id))
        try:
            yield call
        finally:
            call.release()

    # -- cleanup --------------------------------------------------------------------------------

    def _forget(self, session: _Session, name: str, *, unlink: bool) -> None:
        with self._lock:
            session.outputs.pop(name, None)
        if unlink:
            shm.unlink(name)

    def _unlink_outputs(self, session: _Session) -> int:
        """Drop outputs the client claimed; unlink those older than the TTL."""
        now = time.monotonic()
        with self._lock:
            outputs = list(session.outputs.items())
        swept = 0
        for name, created in outputs:
            if not shm.exists(name):
                self._forget(session, name, unlink=False)
            elif now - created > self.output_ttl:
                self._forget(session, name, unlink=True)
                swept += 1
        return swept

    def sweep(self) -> int:
        """Unlink abandoned outputs and end idle sessions (unlinking their regions); the number unlinked."""
        now = time.monotonic()
        with self._lock:
            sessions = list(self._sessions.items())
        swept = 0
        for session_id, session in sessions:
            if now - session.last_used > self.session_ttl:
                with self._lock:
                    self._sessions.pop(session_id, None)
                swept += self._retire(session)
            else:
                swept += self._unlink_outputs(session)
        if swept:
            log.warning("unlinked %d shared-memory region(s) of abandoned outputs or expired sessions", swept)
        return swept

    def _start_sweeper(self) -> None:
        if self._sweeper is None and not self._closed.is_set():
            self._sweeper = threading.Thread(target=self._sweep_loop, name="convrpc-shm-sweeper", daemon=True)
            self._sweeper.start()

    def _sweep_loop(self) -> None:
        interval = max(0.05, min(self.output_ttl / 2, self.session_ttl / 2, 10.0))
        while not self._closed.wait(interval):
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive any one bad region
                log.exception("shared-memory sweep failed")

    def close(self) -> None:
        """Stop the sweeper, end every session (unlinking its regions) and drop the server's marker."""
        self._closed.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            self._retire(session)
        if self._marker is not None:
            shm.unlink(f"cvs{self._tag}")
            os.close(self._marker)
            self._marker = None


class _Request:
    """One request's access to its session's client regions: copies in and out, never a mapping."""

    def __init__(self, sessions: SharedMemorySessions, session: _Session):
        self.sessions = sessions
        self.session = session
        self._own = re.compile(re.escape(session.prefix) + r"i[0-9a-f]{16}")
        self._fds: dict[str, int] = {}

    def _region(self, field: str, name: str) -> tuple[int, int]:
        """``(fd, size)`` of a region of this session, opened once per request."""
        if not self._own.fullmatch(name):
            raise PermissionDeniedError(f"{field}.region", f"region {name!r} does not belong to this session")
        fd = self._fds.get(name)
        if fd is None:
            try:
                fd = self._fds[name] = shm.open_region(name, writable=True)
            except FileNotFoundError:
                raise NotFoundError(f"{field}.region", f"no shared-memory region named {name!r}") from None
            except PermissionError as exc:
                raise PermissionDeniedError(f"{field}.region", str(exc)) from None
            except ValueError as exc:
                raise InvalidArgumentError(f"{field}.region", str(exc)) from None
        size = os.fstat(fd).st_size
        if size > self.sessions.max_region_bytes:
            raise ResourceExhaustedError(
                f"{field}.region",
                f"region {name} of {size} bytes exceeds the server's cap of {self.sessions.max_region_bytes} "
                "(setting shm_max_region_bytes)",
            )
        return fd, size

    def inputs(self, tensors: list[tuple[str, pb.Tensor]]) -> dict[str, np.ndarray]:
        """Copies of the client's input spans (``Tensor.shared``), exactly the request's bytes, after
        checking their names and spans (the caller has checked the layouts against the caps)."""
        arrays = {}
        for name, msg in tensors:
            dtype, shape, nbytes = wire.tensor_layout(msg, name)
            span, field = msg.shared, f"{name}.shared"
            if span.offset < 0 or span.offset % dtype.itemsize:
                raise InvalidArgumentError(
                    f"{field}.offset", f"must be >= 0 and a multiple of {dtype.itemsize}, got {span.offset}"
                )
            fd, size = self._region(field, span.region)
            if span.offset + nbytes > size:
                raise InvalidArgumentError(
                    f"{field}.offset",
                    f"{nbytes} bytes from offset {span.offset} run past the end of region {span.region} ({size} bytes)",
                )
            data = np.empty(nbytes, np.uint8)
            got = shm.read_exactly(fd, memoryview(data), span.offset)
            if got < nbytes:
                raise InvalidArgumentError(
                    f"{field}.region", f"region {span.region} shrank while the server read it ({got} of {nbytes} bytes)"
                )
            arrays[name] = data.view(dtype).reshape(shape)
        return arrays

    def outputs(
        self, arrays: list[tuple[str, np.ndarray]], buffer: pb.SharedBuffer | None
    ) -> dict[str, pb.Tensor]:
        """Write host arrays into the client's ``buffer`` if they fit, else into a new output region;
        ``{field: Tensor}`` with ``shared`` spans saying where each went."""
        layout, size = [], 0
        for name, array in arrays:
            array = np.asarray(array, dtype=wire.DTYPES[wire.dtype_enum(array.dtype, name)], order="C")
            layout.append((name, array, size))
            size += -(-array.nbytes // _ALIGN) * _ALIGN
        if buffer is not None and buffer.size >= size:
            if buffer.offset < 0 or buffer.offset % _ALIGN:
                raise InvalidArgumentError(
                    f"{_BUFFER}.offset", f"must be >= 0 and a multiple of {_ALIGN}, got {buffer.offset}"
                )
            fd, region_size = self._region(_BUFFER, buffer.region)
            if buffer.offset + buffer.size > region_size:
                raise InvalidArgumentError(
                    f"{_BUFFER}.size", f"the span runs past the end of region {buffer.region} ({region_size} bytes)"
                )
            _write(fd, buffer.offset, layout)
            return _shared(buffer.region, buffer.offset, layout)
        return self._new_region(layout, max(size, _ALIGN))

    def _new_region(self, layout, size: int) -> dict[str, pb.Tensor]:
        session = self.session
        name = f"{session.prefix}o{secrets.token_hex(8)}"
        try:
            fd = shm.create_fd(name, size)  # at least _ALIGN bytes: /dev/shm reserves none for 0
        except OSError as exc:
            raise ResourceExhaustedError(_BUFFER, f"no room for a {size}-byte output region ({exc})") from None
        with self.sessions._lock:  # tracked only once it exists, so a sweep cannot mistake it for a claimed one
            session.outputs[name] = time.monotonic()
        try:
            try:
                _write(fd, 0, layout)
            finally:
                os.close(fd)
        except BaseException:
            self.sessions._forget(session, name, unlink=True)
            raise
        return _shared(name, 0, layout)

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def _write(fd: int, base: int, layout) -> None:
    try:
        for _, array, offset in layout:
            shm.write_all(fd, memoryview(array.reshape(-1).view(np.uint8)), base + offset)
    except OSError as exc:  # ENOSPC: /dev/shm is full
        raise ResourceExhaustedError(_BUFFER, f"cannot write the results to shared memory ({exc.strerror})") from None


def _shared(region: str, base: int, layout) -> dict[str, pb.Tensor]:
    return {
        name: pb.Tensor(dtype=wire.dtype_enum(a.dtype), shape=a.shape, shared=pb.SharedSpan(region=region, offset=base + offset))
        for name, a, offset in layout
    }
