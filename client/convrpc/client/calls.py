"""How the SDK runs a call, decided once and without I/O: sharding, data path, sessions, retries, failover.

The core is written in the sans-I/O style of h11 and hyper-h2: ``CallCore.call`` is a generator that
yields what to do next (``Unary``, ``Stream``, ``Sleep``, ``Gather``, ``Spawn``) and is sent what came
of it, or has the ``grpc.RpcError`` thrown in. ``ConvClient`` drives it with blocking calls and
threads, ``AsyncConvClient`` with awaits and tasks; neither decides anything.

- **Sharding.** A batch larger than ``shard_size``, or too large for one message on the unary path,
  is cut along N into shards that run at once; outputs and input gradients are concatenated back,
  weight and bias gradients (sums over the batch) are summed. A shard travels on any path.
- **Data path**, per replica and shard: ``"auto"`` takes the unary RPC up to
  ``STREAM_THRESHOLD_BYTES``, shared memory above ``SHM_THRESHOLD_BYTES`` to a server on this host,
  the chunked streams otherwise; a path a server refuses is dropped for that replica and the call
  falls back at once (and a call that finds the client's region pool full takes the network alone).
  ``"unary"``, ``"stream"``, ``"shm"`` force a path and fail rather than fall back.
  A stream moves its bytes over the server's side channel (a raw socket the stream's RPC hands out,
  see ``side_channel``) when GetServerInfo reports one, and as chunks when the server has none or it
  cannot be reached (then also for that replica's later calls); one that closes on the token, stalls
  or breaks mid-transfer fails the attempt UNAVAILABLE (failover). A shared-memory session (a socket
  to the server) is opened per replica on first use and reopened once if it ended.
- **Failover.** A call or shard failing with UNAVAILABLE (a replica killed, draining, unreachable, or
  frozen: the channels' keepalive fails its calls within ~3 s, see ``config``) is sent to the next
  replica at once, and after one attempt per replica twice more after short pauses, each attempt
  with what is left of the call's deadline. The replica is ejected: passed over while others are
  healthy until a background health check answers SERVING again (after 1 s, doubling up to 30 s).
  Ops are pure functions, so repeating one is safe. TrainKernel runs on one replica (``pick``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generator, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from convrpc import shm, wire
from convrpc.buffers import WarmBuffers
from convrpc.core import network
from convrpc.core.errors import ConvError
from convrpc.v1 import conv_service_pb2 as pb

from . import config
from .errors import ConvRpcError
from .messages import (
    Call, StreamReader, inline_request, inline_results, request, result_tensors, stream_messages, stream_request,
)  # fmt: skip
from .shared_memory import Placement, RegionPool, SharedMemorySession, aligned
from .side_channel import SideChannelFailed, SideConnector, SideTransfer

__all__ = [
    "PATHS", "CallCore", "Gather", "Replica", "Sleep", "Spawn", "Steps", "Stream", "Unary",
    "drive", "is_local", "merge", "split",
]  # fmt: skip

PATHS = ("auto", "unary", "stream", "shm")
#: Codes that mean "this replica cannot take the call now; another one may".
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
#: Codes that mean "this server will not use that path", as opposed to "this call is wrong".
REFUSALS = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION})
#: The request fields cut along N; the others (weight, bias, a network's params) go whole to every shard.
BATCHED = ("grad_output", "input")
#: The result fields that are sums over the batch: summed over the shards, not concatenated.
SUMMED = ("grad_weight", "grad_bias")


def _summed(field: str) -> bool:
    return field in SUMMED or field.startswith("grad_params[")  # a network's parameter gradients


class Unreachable(grpc.RpcError):
    """A replica that failed outside gRPC (its shared-memory socket): UNAVAILABLE, so the call fails over."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


# -- what the drivers do ----------------------------------------------------------------------------


@dataclass
class Unary:
    """Call unary ``method`` on ``replica`` and send back the response."""

    replica: "Replica"
    method: str
    request: object
    timeout: float | None


@dataclass
class Stream:
    """Call stream ``method`` on ``replica`` with ``messages``, passing each response message to ``receive``;
    ``blocking``: ``receive`` does blocking I/O (the asyncio driver runs it in a thread); ``on_end`` is
    called (any thread) when the RPC ends, however it ends."""

    replica: "Replica"
    method: str
    messages: Iterator
    timeout: float | None
    receive: Callable[[object], None]
    blocking: bool = False
    on_end: Callable[[], None] | None = None


@dataclass
class Sleep:
    seconds: float


@dataclass
class Gather:
    """Drive every generator of ``parts`` at once (at most SHARDS_IN_FLIGHT) and send back their results in order;
    the first failure is raised and the other parts are cancelled."""

    parts: list[Generator]


@dataclass
class Spawn:
    """Drive ``steps`` in the background; nobody waits for it and its failures are its own."""

    steps: Generator


class Steps:
    """One core generator being driven: ``next()`` gives the next effect (None once done, with ``value``
    set); before the following ``next()`` the driver sets ``reply`` or ``error`` from doing it."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.reply = self.error = self.value = None

    def next(self):
        reply, error, self.reply, self.error = self.reply, self.error, None, None
        try:
            return self.generator.send(reply) if error is None else self.generator.throw(error)
        except StopIteration as done:
            self.value = done.value
            return None


def drive(generator: Generator, do: Callable):
    """Drive a core generator to its end without awaiting: ``do(effect)`` returns the reply or raises
    ``grpc.RpcError`` (or, for a Gather, the ``ConvRpcError`` of a part), which goes back into the generator.
    The generator is closed however it ends (a failed region is never reused)."""
    steps = Steps(generator)
    with contextlib.closing(generator):
        while (effect := steps.next()) is not None:
            try:
                steps.reply = do(effect)
            except (grpc.RpcError, ConvRpcError) as exc:
                steps.error = exc
    return steps.value


# -- replicas -------------------------------------------------------------------------------------


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


class Replica:
    """What the client knows about one target: the paths it takes, its shared-memory session, its health."""

    def __init__(self, index: int, target: str, mode: str):
        self.index = index
        self.target = target
        self.stream_ok = True
        #: Whether the server's side channel carries this replica's streams: None until GetServerInfo said.
        self.side_ok: bool | None = None
        self.shm_ok = shm.AVAILABLE and (mode == "shm" or (mode == "auto" and is_local(target)))
        self.session: SharedMemorySession | None = None
        #: When an ejected replica may be health-checked (``time.monotonic()``); None while healthy.
        self.ejected_until: float | None = None
        self.eject_seconds = config.EJECT_SECONDS
        self.probing = False

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def __repr__(self) -> str:
        return f"Replica({self.target!r}{', ejected' if self.ejected else ''})"


# -- sharding -------------------------------------------------------------------------------------


def _batch(call: Call) -> int | None:
    """N when every batched field is set with the same N > 1 (and a batch axis), else None: the call goes whole."""
    sizes = set()
    for field in BATCHED:
        array = call.arrays.get(field)
        if array is not None:
            if array.ndim != 4 and not (call.op == "relu" and array.ndim >= 1) and call.net is None:
                return None  # (C, H, W) is one unbatched sample (a network's input is always a batch)
            sizes.add(array.shape[0])
    return sizes.pop() if len(sizes) == 1 and "input" in call.arrays else None


def _output_bytes(call: Call) -> int:
    """Bytes of a forward call's results, from its tensors' shapes (raises what the arguments break)."""
    x = call.arrays["input"]
    if call.net is not None:
        return math.prod(call.net.output_shape(x.shape)) * x.dtype.itemsize
    name, options = wire.decode_op(call.message)
    return wire.output_bytes(name, options, {f: a.shape for f, a in call.arrays.items()}, x.dtype)


def _fit_rows(call: Call, n: int, max_bytes: int) -> int | None:
    """The most rows whose request and response fit one message of ``max_bytes``; None if unknown."""
    batched = sum(call.arrays[f].nbytes for f in BATCHED if f in call.arrays)
    fixed = call.nbytes - batched
    x = call.arrays["input"]
    if call.backward:
        out_row, out_fixed = x.nbytes // n, fixed
    else:
        try:
            out_row, out_fixed = _output_bytes(call) // n, 0
        except (ConvError, TypeError, ValueError):
            return None  # the server will say what is wrong
    budget = max_bytes - config.FRAMING_BYTES
    fits = [(budget - base) // row for row, base in ((batched // n, fixed), (out_row, out_fixed)) if row]
    return max(1, min(fits)) if fits else None


def _rows_under_cap(call: Call, n: int, setting: str, limit: int) -> int | None:
    """The most rows whose tensors stay within a server cap the server reported (None: no cut helps):
    ``max_elements`` bounds every tensor and the output, ``max_request_bytes`` the request's tensors."""
    if setting == "max_request_bytes":
        batched = sum(call.arrays[f].nbytes for f in BATCHED if f in call.arrays)
        room = limit - (call.nbytes - batched)
        return room // (batched // n) if room > 0 and batched else None
    if setting != "max_elements":
        return None
    per_row = [call.arrays[f].size // n for f in BATCHED if f in call.arrays]
    if any(call.arrays[f].size > limit for f in call.arrays if f not in BATCHED):
        return None  # a weight over the cap: no cut along N helps
    try:
        if call.net is not None:  # every layer's output is under the cap, forward and backward alike
            shape = call.arrays["input"].shape
            per_row.extend(math.prod(s) // n for s in network.check_network(call.net, shape))
        elif not call.backward:
            per_row.append(_output_bytes(call) // call.arrays["input"].dtype.itemsize // n)
    except (ConvError, TypeError, ValueError):
        return None
    per_row = [r for r in per_row if r]
    rows = min(limit // r for r in per_row) if per_row else None
    return rows or None


def split(
    call: Call, shard_size: int | None, max_bytes: int | None, caps: dict[str, int] | None = None
) -> list[Call]:
    """``call`` cut along N into shards as even as possible, of at most ``shard_size`` rows, (with
    ``max_bytes``) few enough that each request and response fits one message, and within the server
    ``caps`` ({setting: limit}) refusals reported; ``[call]`` for no cut.
    A malformed call goes whole, so that the server answers it with the precise error."""
    n = _batch(call)
    if n is None or n < 2:
        return [call]
    rows = min(n, shard_size) if shard_size else n
    fit = _fit_rows(call, n, max_bytes) if max_bytes else None
    rows = min(rows, fit) if fit else rows
    for setting, limit in (caps or {}).items():
        under = _rows_under_cap(call, n, setting, limit)
        rows = min(rows, under) if under else rows
    count = -(-n // rows)
    if count == 1:
        return [call]
    bounds = [(n * i // count, n * (i + 1) // count) for i in range(count)]
    return [
        call.with_arrays({f: a[start:stop] if f in BATCHED else a for f, a in call.arrays.items()})
        for start, stop in bounds
    ]


def merge(results: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One result from the shards' results, in shard order: batch sums summed, the rest concatenated along N."""
    if len(results) == 1:
        return results[0]
    merged = {}
    for field in results[0]:
        parts = [r[field] for r in results]
        if _summed(field):
            total = parts[0].copy()
            for part in parts[1:]:
                total += part
            merged[field] = total
        else:
            merged[field] = np.concatenate(parts)
    return merged


# -- the core ---------------------------------------------------------------------------------------


class CallCore:
    """The decisions of one client over its replicas (see the module docstring). Thread-safe."""

    def __init__(
        self, targets: Sequence[str], *, mode: str = "auto", chunk_bytes: int | None = None,
        shard_size: int | None = None, max_message_bytes: int = config.MAX_MESSAGE_BYTES,
        shm_pool_bytes: int = config.SHM_POOL_BYTES, side: SideConnector | None = None,
        stream_buffer_bytes: int = config.STREAM_BUFFER_BYTES, clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        if mode not in PATHS:
            raise ValueError(f"data_path: expected one of {', '.join(PATHS)}, got {mode!r}")
        if shard_size is not None and (type(shard_size) is not int or shard_size < 1):
            raise ValueError(f"shard_size: expected None or an int >= 1, got {shard_size!r}")
        self.mode = mode
        self.chunk_bytes = chunk_bytes or config.CHUNK_BYTES
        self.shard_size = shard_size
        #: How to reach the servers' side channels; None: streams move their bytes as chunks only.
        self.side = side
        # Streams and shared memory have no message limit; only a call that may go unary is sized by it.
        self.max_message_bytes = max_message_bytes if mode in ("auto", "unary") else None
        self.replicas = [Replica(i, t, mode) for i, t in enumerate(targets)]
        #: The client's shared-memory regions, handed to each replica's session as calls need them.
        self.pool = RegionPool(shm_pool_bytes)
        #: Warm memory the results of streams are received into (reused once the caller freed them).
        self.buffers = WarmBuffers(stream_buffer_bytes)
        #: Size caps the servers reported when refusing a call ({setting: limit}); calls are cut to fit them.
        self.caps: dict[str, int] = {}
        self._clock = clock
        self._turn = itertools.count()
        self._lock = threading.Lock()

    # -- entry points (each a generator for a driver) ---------------------------------------------

    def deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else self._clock() + timeout

    def call(self, call: Call) -> Generator:
        """Run a Forward or Backward; returns ``{result field: array}``."""
        yield from self._probes()
        parts = split(call, self.shard_size, self.max_message_bytes, self.caps)
        while True:
            try:
                return (yield from self._run_parts(call, parts))
            except ConvRpcError as exc:
                if exc.cap is None:
                    raise
                # Over one of the server's size caps: remember it (later calls are cut to fit at once) and cut
                # this batch to fit; say what to do when no cut along N fits.
                setting, limit = exc.cap
                with self._lock:
                    self.caps[setting] = min(limit, self.caps.get(setting, limit))
                smaller = split(call, self.shard_size, self.max_message_bytes, self.caps)
                if len(smaller) <= len(parts):
                    hint = "the call cannot be cut along its batch to fit: send smaller tensors or raise it"
                    raise ConvRpcError(exc.code, f"{exc.message}; {hint}", exc.field, exc.cap) from None
                parts = smaller

    def _run_parts(self, call: Call, parts: list[Call]) -> Generator:
        if len(parts) == 1:
            return (yield from self._failover(call.deadline, lambda replica: self._send(replica, parts[0])))
        results = yield Gather([self._failover(p.deadline, lambda r, p=p: self._send(r, p)) for p in parts])
        return merge(results)

    def unary(self, method: str, message, deadline: float | None) -> Generator:
        """Run an idempotent unary RPC (GetServerInfo) with failover; returns its response."""
        yield from self._probes()

        def attempt(replica):
            return (yield Unary(replica, method, message, self._left(deadline)))

        return (yield from self._failover(deadline, attempt))

    def pick(self) -> Replica:
        """The replica for a call that cannot move (TrainKernel): the next healthy one in turn."""
        return self._next(next(self._turn), {})

    def close(self) -> None:
        """End every shared-memory session (closing its socket ends it on the server) and free the idle
        regions; regions that results view stay until those arrays are freed."""
        for replica in self.replicas:
            session, replica.session = replica.session, None
            if session is not None:
                session.close()
        self.pool.close()

    # -- failover ---------------------------------------------------------------------------------

    def _left(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - self._clock()
        if left <= 0:
            raise ConvRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call was answered")
        return left

    def _next(self, start: int, tries: dict) -> Replica:
        """The replica for the next attempt: fewest tries by this call first, healthy before ejected, in turn."""
        n = len(self.replicas)
        ring = [self.replicas[(start + i) % n] for i in range(n)]
        return min(ring, key=lambda r: (tries.get(r.index, 0), r.ejected))

    def _failover(self, deadline: float | None, attempt: Callable[[Replica], Generator]) -> Generator:
        start, tries = next(self._turn), {}
        attempts = len(self.replicas) + len(config.RETRY_PAUSES)
        for i in range(attempts):
            if i >= len(self.replicas):
                pause = config.RETRY_PAUSES[i - len(self.replicas)]
                left = self._left(deadline)
                yield Sleep(pause if left is None else min(pause, left))
            replica = self._next(start, tries)
            tries[replica.index] = tries.get(replica.index, 0) + 1
            try:
                result = yield from attempt(replica)
            except grpc.RpcError as error:
                if error.code() not in FAILOVER_CODES or i == attempts - 1:
                    raise ConvRpcError.from_rpc_error(error) from None
                self._eject(replica)
                continue
            self._admit(replica)
            return result

    def _eject(self, replica: Replica) -> None:
        with self._lock:
            if not replica.ejected:
                replica.ejected_until = self._clock() + replica.eject_seconds

    def _admit(self, replica: Replica) -> None:
        with self._lock:
            replica.ejected_until = None
            replica.eject_seconds = config.EJECT_SECONDS

    def _probes(self) -> Generator:
        """Start a health check of every ejected replica whose time has come."""
        now = self._clock()
        with self._lock:
            due = [r for r in self.replicas if r.ejected and not r.probing and now >= r.ejected_until]
            for replica in due:
                replica.probing = True
        for replica in due:
            yield Spawn(self._probe(replica))

    def _probe(self, replica: Replica) -> Generator:
        try:
            response = yield Unary(replica, "Check", health_pb2.HealthCheckRequest(), config.PROBE_TIMEOUT)
            healthy = response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            healthy = False
        if healthy:
            self._admit(replica)
        else:
            with self._lock:
                replica.eject_seconds = min(2 * replica.eject_seconds, config.EJECT_MAX_SECONDS)
                replica.ejected_until = self._clock() + replica.eject_seconds
        replica.probing = False

    # -- one attempt on one replica ---------------------------------------------------------------

    def _path(self, replica: Replica, call: Call, *, shared: bool = True) -> str:
        if self.mode != "auto":
            return self.mode
        if call.nbytes > config.SHM_THRESHOLD_BYTES and replica.shm_ok and shared:
            return "shm"
        if call.nbytes > config.STREAM_THRESHOLD_BYTES and replica.stream_ok:
            return "stream"
        return "unary"

    def _send(self, replica: Replica, call: Call) -> Generator:
        path = self._path(replica, call)
        if path == "shm":
            result = yield from self._shared(replica, call)
            if result is not None:
                return result
            path = self._path(replica, call, shared=False)
        if path == "stream":
            result = yield from self._streamed(replica, call)
            if result is not None:
                return result
        response = yield Unary(replica, call.method, inline_request(call), self._left(call.deadline))
        return inline_results(response)

    def _streamed(self, replica: Replica, call: Call) -> Generator:
        if self.side is not None and replica.side_ok is not False:
            result = yield from self._side_channel(replica, call)
            if result is not None:
                return result
        reader = StreamReader(self.buffers.empty)
        messages = stream_messages(call, self.chunk_bytes)
        try:
            yield Stream(replica, call.method + "Stream", messages, self._left(call.deadline), reader.add)
        except grpc.RpcError as error:
            if self.mode == "auto" and error.code() is grpc.StatusCode.UNIMPLEMENTED:
                replica.stream_ok = False  # a server from before the streams: unary it is
                return None
            raise
        return reader.finish()

    def _side_channel(self, replica: Replica, call: Call) -> Generator:
        """The result over the replica's side channel, or None when the call should go as chunks instead."""
        if replica.side_ok is None:
            info = yield Unary(replica, "GetServerInfo", pb.GetServerInfoRequest(), self._left(call.deadline))
            replica.side_ok = info.side_channel_port != 0
            if not replica.side_ok:
                return None
        timeout = self._left(call.deadline)
        transfer = SideTransfer(self.side, replica.target, list(call.arrays.values()), timeout, self.buffers.empty)
        try:
            yield Stream(replica, call.method + "Stream", iter([stream_request(call, side_channel=True)]), timeout,
                         transfer.add, blocking=True, on_end=transfer.close)  # fmt: skip
        except SideChannelFailed:
            replica.side_ok = False  # a firewall, a NAT, another replica behind one name: chunks from now on
            return None
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.FAILED_PRECONDITION and (error.details() or "").startswith(
                "side_channel:"
            ):
                replica.side_ok = False  # the server turned it off since
                return None
            if getattr(error, "refused", False):
                replica.side_ok = False  # dead, or another server behind the name: fail over, then chunks
            raise
        finally:
            transfer.close()
        return transfer.finish()

    def _shared(self, replica: Replica, call: Call) -> Generator:
        """The result by shared memory, or None when this call should take the network instead (auto)."""
        for attempt in range(2):
            session = yield from self._session(replica, call.deadline)
            if session is None:
                return None
            try:
                placement = Placement.make(self.pool, session, call.arrays, result_bytes(call))
            except ConvRpcError as refusal:  # the server refused a region (too large, too many)
                return self._no_room(refusal.message, refusal.code)
            except (ConnectionError, TimeoutError) as exc:  # the session's socket broke, or the server is frozen
                self._forget(replica, session)
                if attempt == 0 and not isinstance(exc, TimeoutError):
                    continue  # it ended (a restart): open a new one once
                raise Unreachable(f"the shared-memory socket of {replica.target} failed: {exc!r}") from None
            except OSError as exc:  # no memory for a region here
                return self._no_room(f"no room for a shared-memory region: {exc}")
            if placement is None:
                return self._no_room("the client's region pool is full (shm_pool_bytes)")
            try:
                with placement:
                    message = request(call, placement.tensors, placement.context)
                    response = yield Unary(replica, call.method, message, self._left(call.deadline))
                    return placement.results(result_tensors(response))
            except grpc.RpcError as error:
                code = error.code()
                if code is grpc.StatusCode.FAILED_PRECONDITION and attempt == 0:
                    self._forget(replica, session)  # the session ended (a server restart): open a new one once
                    continue
                if self.mode == "auto" and code in REFUSALS:
                    replica.shm_ok = False
                    return None
                raise
        return None

    def _no_room(self, reason: str, code=grpc.StatusCode.RESOURCE_EXHAUSTED) -> None:
        """This call takes the network (auto), or fails (shm); later calls try shared memory again."""
        if self.mode == "shm":
            raise ConvRpcError(code, reason)

    def _session(self, replica: Replica, deadline: float | None) -> Generator:
        session = replica.session
        if session is not None and not session.alive():  # the server ended it (a restart, a close)
            self._forget(replica, session)
        if replica.session is not None:
            return replica.session
        if replica.shm_ok:
            try:
                message = pb.OpenSharedMemorySessionRequest()
                response = yield Unary(replica, "OpenSharedMemorySession", message, self._left(deadline))
                session = SharedMemorySession(response)
            except grpc.RpcError as error:
                if self.mode != "auto" or error.code() not in REFUSALS:
                    raise
                replica.shm_ok = False
            except (OSError, ConvRpcError) as exc:
                replica.shm_ok = False
                return self._no_session(
                    f"cannot reach the server's shared-memory socket ({exc}): it is on another host or in "
                    "another network namespace"
                )
            else:
                with self._lock:
                    mine = replica.session is None
                    if mine:
                        replica.session = session
                if not mine:  # another shard opened one meanwhile
                    session.close()
                return replica.session
        return self._no_session("the server refused a session")

    def _no_session(self, reason: str) -> None:
        if self.mode == "shm":
            raise ConvRpcError(grpc.StatusCode.FAILED_PRECONDITION, f"shared memory is not usable: {reason}")

    def _forget(self, replica: Replica, session: SharedMemorySession) -> None:
        with self._lock:
            if replica.session is session:
                replica.session = None
        session.close()


def result_bytes(call: Call) -> int | None:
    """Bytes of the results of ``call`` laid out as the server places them (each on 64 bytes); None when
    the call is malformed (the server will say how)."""
    try:
        if call.net is None:
            _, options = wire.decode_op(call.message)
            shapes = {f: a.shape for f, a in call.arrays.items()}
            results = wire.OP_SPECS[call.op].result_shapes(shapes, options, call.arrays["input"].dtype, call.backward)
            sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in results]
        elif call.backward:  # the input's and every parameter's gradient
            sizes = [a.nbytes for f, a in call.arrays.items() if f != "grad_output"]
        else:
            sizes = [_output_bytes(call)]
    except (ConvError, KeyError, TypeError, ValueError):
        return None
    return sum(aligned(n) for n in sizes)
