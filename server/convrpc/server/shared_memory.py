"""Shared-memory sessions: which client may use which regions, and the cleanup of output regions.

A client opens a session by showing the server a probe region it created (proving both see the
same /dev/shm and run as the same user). The session gets a secret id, sent with every request
and never part of a region name, and a public name prefix. The server reads only input regions
named ``<prefix>i<16 hex>`` of the session the request's id opens, so a client cannot make it read
or write anyone else's memory; it never unlinks those. It creates each response's outputs in a
fresh ``<prefix>o<16 hex>`` region that the client unlinks once mapped; a sweeper thread unlinks
outputs left unclaimed for ``output_ttl`` seconds and forgets sessions idle for ``session_ttl``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
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

__all__ = ["SharedMemorySessions"]

_PROBE = re.compile(r"cvp[0-9a-f]{24}")
_ALIGN = 64  # output tensors start on cache-line boundaries
MAX_SESSIONS = 4096
_BUFFER = "shared_memory.output_buffer"
MAPPINGS_PER_SESSION = 4  # the SDK pools two regions per session; a few more for concurrent calls


class _Mapping:
    """A client region kept mapped between requests: mapping a region afresh costs more than copying it."""

    def __init__(self, name: str):
        self.fd = shm.open_region(name, writable=True)
        try:
            self.region = shm.map_region(self.fd, writable=True, populate=True)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)
        try:
            self.region.close()
        except BufferError:  # a request still views it: the last array to go unmaps it
            pass


@dataclass
class _Session:
    prefix: str
    last_used: float
    #: Output regions created and not yet seen unlinked: name -> creation time.
    outputs: dict[str, float] = field(default_factory=dict)
    #: The client regions mapped lately, least recently used first.
    mappings: OrderedDict[str, _Mapping] = field(default_factory=OrderedDict)

    def drop_mappings(self, names) -> None:
        for name in list(names):
            mapping = self.mappings.pop(name, None)
            if mapping is not None:
                mapping.close()


class SharedMemorySessions:
    """The server's shared-memory sessions. Thread-safe; ``close()`` unlinks every unclaimed output."""

    def __init__(self, *, enabled: bool, output_ttl: float, session_ttl: float):
        self.enabled = enabled and shm.AVAILABLE
        self.output_ttl = output_ttl
        self.session_ttl = session_ttl
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None

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
            region = shm.attach(probe_region, writable=False)
        except FileNotFoundError:
            raise FailedPreconditionError(
                "probe_region",
                f"the server cannot see region {probe_region}: it is not on the client's host or IPC namespace",
            ) from None
        except PermissionError:
            raise FailedPreconditionError("probe_region", f"region {probe_region} belongs to another user") from None
        with region:
            # Some systems round a region up to whole pages: compare the nonce's bytes only.
            if len(region) < len(probe_nonce) or not secrets.compare_digest(region[: len(probe_nonce)], probe_nonce):
                raise FailedPreconditionError("probe_nonce", f"region {probe_region} does not hold the nonce")
        session_id = secrets.token_hex(16)
        session = _Session(prefix="cv" + secrets.token_hex(5), last_used=time.monotonic())
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                raise ResourceExhaustedError("session_id", f"the server holds its cap of {MAX_SESSIONS} sessions")
            self._sessions[session_id] = session
            self._start_sweeper()
        return pb.OpenSharedMemorySessionResponse(
            session_id=session_id, region_prefix=session.prefix, output_ttl_seconds=self.output_ttl
        )

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            self._retire(session)

    def _retire(self, session: _Session) -> int:
        """Unlink the session's unclaimed outputs and unmap its regions; the number of regions unlinked."""
        swept = self._unlink_outputs(session, everything=True)
        with self._lock:
            session.drop_mappings(list(session.mappings))
        return swept

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
        """The shared-memory side of one request: ``inputs(...)``, then ``outputs(...)``; mappings end with it."""
        call = _Request(self, self._session(session_id))
        try:
            yield call
        finally:
            call.release()

    def _mapping(self, session: _Session, field: str, name: str) -> mmap.mmap:
        """The session's cached read-write mapping of client region ``name``, made on first use."""
        with self._lock:
            # Forget regions the client has since unlinked: only our mapping would keep them alive.
            session.drop_mappings([n for n, m in session.mappings.items() if shm.unlinked(m.fd)])
            mapping = session.mappings.get(name)
            if mapping is not None:
                session.mappings.move_to_end(name)
                return mapping.region
        try:
            mapping = _Mapping(name)
        except FileNotFoundError:
            raise NotFoundError(f"{field}.region", f"no shared-memory region named {name!r}") from None
        except PermissionError as exc:
            raise PermissionDeniedError(f"{field}.region", str(exc)) from None
        with self._lock:
            stale = session.mappings.pop(name, None)
            session.mappings[name] = mapping
            session.drop_mappings(list(session.mappings)[:-MAPPINGS_PER_SESSION])
        if stale is not None:
            stale.close()
        return mapping.region

    # -- cleanup --------------------------------------------------------------------------------

    def _forget(self, session: _Session, name: str, *, unlink: bool) -> None:
        with self._lock:
            session.outputs.pop(name, None)
        if unlink:
            shm.unlink(name)

    def _unlink_outputs(self, session: _Session, *, everything: bool) -> int:
        """Drop outputs the client claimed; unlink those older than the TTL (all of them if ``everything``)."""
        now = time.monotonic()
        with self._lock:
            outputs = list(session.outputs.items())
        swept = 0
        for name, created in outputs:
            if not shm.exists(name):
                self._forget(session, name, unlink=False)
            elif everything or now - created > self.output_ttl:
                self._forget(session, name, unlink=True)
                swept += 1
        return swept

    def sweep(self) -> int:
        """Unlink abandoned outputs and forget idle sessions; the number of regions unlinked."""
        now = time.monotonic()
        with self._lock:
            sessions = list(self._sessions.items())
        swept = 0
        for session_id, session in sessions:
            if now - session.last_used > self.session_ttl:
                with self._lock:
                    self._sessions.pop(session_id, None)
                swept += self._retire(session)
                continue
            swept += self._unlink_outputs(session, everything=False)
            with self._lock:  # unmap regions the client has unlinked since
                session.drop_mappings([n for n, m in session.mappings.items() if shm.unlinked(m.fd)])
        if swept:
            log.warning("unlinked %d shared-memory output region(s) no client claimed", swept)
        return swept

    def _start_sweeper(self) -> None:
        if self._sweeper is None and not self._closed.is_set():
            self._sweeper = threading.Thread(target=self._sweep_loop, name="convrpc-shm-sweeper", daemon=True)
            self._sweeper.start()

    def _sweep_loop(self) -> None:
        interval = max(0.05, min(self.output_ttl / 2, 10.0))
        while not self._closed.wait(interval):
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive any one bad region
                log.exception("shared-memory sweep failed")

    def close(self) -> None:
        """Stop the sweeper and unlink every output region no client has claimed."""
        self._closed.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            self._retire(session)


class _Request:
    """One request's view of its session's client regions (mapped read-write, cached in the session)."""

    def __init__(self, sessions: SharedMemorySessions, session: _Session):
        self.sessions = sessions
        self.session = session
        self._own = re.compile(re.escape(session.prefix) + r"i[0-9a-f]{16}")
        self._regions: dict[str, mmap.mmap] = {}

    def _region(self, field: str, name: str) -> mmap.mmap:
        if not self._own.fullmatch(name):
            raise PermissionDeniedError(f"{field}.region", f"region {name!r} does not belong to this session")
        region = self._regions.get(name)
        if region is None:
            region = self._regions[name] = self.sessions._mapping(self.session, field, name)
        return region

    def inputs(self, tensors: list[tuple[str, pb.Tensor]]) -> dict[str, np.ndarray]:
        """Read-only arrays viewing the client's input regions (``Tensor.shared``), after checking their
        names and spans (the caller has checked the layouts against the caps)."""
        arrays = {}
        for name, msg in tensors:
            dtype, shape, nbytes = wire.tensor_layout(msg, name)
            span, field = msg.shared, f"{name}.shared"
            if span.offset < 0 or span.offset % dtype.itemsize:
                raise InvalidArgumentError(
                    f"{field}.offset", f"must be >= 0 and a multiple of {dtype.itemsize}, got {span.offset}"
                )
            region = self._region(field, span.region)
            if span.offset + nbytes > len(region):
                raise InvalidArgumentError(
                    f"{field}.offset",
                    f"{nbytes} bytes from offset {span.offset} run past the end of region {span.region} ({len(region)} bytes)",
                )
            array = np.frombuffer(region, dtype=dtype, count=nbytes // dtype.itemsize, offset=span.offset).reshape(shape)
            array.flags.writeable = False
            arrays[name] = array
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
            region = self._region(_BUFFER, buffer.region)
            if buffer.offset + buffer.size > len(region):
                raise InvalidArgumentError(
                    f"{_BUFFER}.size", f"the span runs past the end of region {buffer.region} ({len(region)} bytes)"
                )
            _write(region, buffer.offset, layout)
            return _shared(buffer.region, buffer.offset, layout)
        return self._new_region(layout, size)

    def _new_region(self, layout, size: int) -> dict[str, pb.Tensor]:
        session = self.session
        name = f"{session.prefix}o{secrets.token_hex(8)}"
        try:
            region = shm.create(name, max(size, _ALIGN))  # mmap cannot map 0 bytes (all results empty)
        except OSError as exc:
            raise ResourceExhaustedError(_BUFFER, f"no room for a {size}-byte output region ({exc})") from None
        with self.sessions._lock:  # tracked only once it exists, so a sweep cannot mistake it for a claimed one
            session.outputs[name] = time.monotonic()
        try:
            try:
                _write(region, 0, layout)
            finally:
                region.close()
        except BaseException:
            self.sessions._forget(session, name, unlink=True)
            raise
        return _shared(name, 0, layout)

    def release(self) -> None:
        self._regions.clear()  # the mappings stay cached in the session


def _write(region: mmap.mmap, base: int, layout) -> None:
    for _, array, offset in layout:
        np.frombuffer(region, dtype=array.dtype, count=array.size, offset=base + offset)[:] = array.reshape(-1)


def _shared(region: str, base: int, layout) -> dict[str, pb.Tensor]:
    return {
        name: pb.Tensor(dtype=wire.dtype_enum(a.dtype), shape=a.shape, shared=pb.SharedSpan(region=region, offset=base + offset))
        for name, a, offset in layout
    }
