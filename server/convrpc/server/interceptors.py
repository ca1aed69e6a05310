"""Server interceptors: per-call observation (request id, log line, metrics), bearer-token auth, admission control.

Order matters: observation is outermost so refusals by the others are logged and counted too.
Health and reflection pass through untouched (probes need no token and keep their own thread pool).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import threading
import time
from concurrent import futures

import grpc

from convrpc.core.errors import ResourceExhaustedError, ServerBusy

from . import status
from .decoding import Undecodable
from .logs import REQUEST_ID, new_request_id
from .metrics import ServerMetrics

__all__ = ["BearerTokenAuth", "CallObserver", "ComputeAdmission", "ComputeSlots", "OPEN_SERVICES", "Undecodable"]

log = logging.getLogger("convrpc.server.calls")

SERVICE_PREFIX = "/convrpc.v1.ConvService/"
#: RPCs that compute, and so take one of the server's compute slots.
COMPUTE_RPCS = frozenset(
    {"Forward", "Backward", "TrainKernel", "ForwardStream", "BackwardStream"}
)
#: RPCs that answer a single request with a stream.
STREAMING_RPCS = frozenset({"TrainKernel"})
#: RPCs that stream both ways (the chunked data path).
BIDI_RPCS = frozenset({"ForwardStream", "BackwardStream"})
#: Services reachable without a token: probes and tooling must work before credentials are handed out.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")  # fmt: skip
_TENSOR = "convrpc.v1.Tensor"


def _rpc_name(details) -> str | None:
    method = details.method
    return method[len(SERVICE_PREFIX) :] if method.startswith(SERVICE_PREFIX) else None


def _size(item) -> int:
    """Bytes of a request or response: a message, pre-encoded bytes, or a decoded chunk (offset, view)."""
    if isinstance(item, (bytes, memoryview)):
        return len(item)
    if isinstance(item, tuple):
        return len(item[1])
    return item.ByteSize()


def _wrap(handler, wrap_unary, wrap_stream, wrap_bidi):
    """``handler`` with its behavior wrapped, whichever of ConvService's three kinds of RPC it serves."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    if handler.stream_stream is not None:
        return handler._replace(stream_stream=wrap_bidi(handler.stream_stream))
    return handler


def _kind(rpc: str | None) -> str:
    return "bidi" if rpc in BIDI_RPCS else "stream" if rpc in STREAMING_RPCS else "unary"


def _refusal(kind: str, code: grpc.StatusCode, message: str, pool: futures.ThreadPoolExecutor):
    """A handler that ends the call with ``code`` at once, run on ``pool``: a refusal must not wait behind
    the work queued for the RPC workers. It never reads the request, so it needs no deserializer."""

    def refuse(request, context):
        context.abort(code, message)

    refuse.experimental_thread_pool = pool
    make = {
        "unary": grpc.unary_unary_rpc_method_handler,
        "stream": grpc.unary_stream_rpc_method_handler,
        "bidi": grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(refuse)


def _metadata(details, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v
    return None


class CallObserver(grpc.ServerInterceptor):
    """Gives each ConvService call a request id (the client's ``x-request-id`` or a fresh one), logs one
    line when it ends (method, status code, duration) and feeds the server's metrics."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        rpc = _rpc_name(details)
        if rpc is None or handler is None:
            return handler
        given = _metadata(details, "x-request-id")
        rid = given if given and len(given) <= 64 and given.isprintable() else new_request_id()
        return _wrap(
            handler,
            lambda b: self._unary(rpc, rid, b),
            lambda b: self._stream(rpc, rid, b),
            lambda b: self._bidi(rpc, rid, b),
        )

    def _begin(self, rpc, rid, request) -> float:
        REQUEST_ID.set(rid)
        self.metrics.in_flight.labels(rpc).inc()
        if request is not None:  # a refusal's request stays undecoded bytes
            self.metrics.bytes_received.labels(rpc).inc(_size(request))
        return time.perf_counter()

    def _end(self, rpc, context, started, code, sent) -> None:
        elapsed = time.perf_counter() - started
        m = self.metrics
        m.in_flight.labels(rpc).dec()
        m.requests.labels(rpc, code.name).inc()
        m.latency.labels(rpc, code.name).observe(elapsed)
        m.bytes_sent.labels(rpc).inc(sent)
        level = logging.ERROR if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s %.1f ms", rpc, code.name, elapsed * 1e3,
                    extra={"rpc": rpc, "code": code.name, "duration_ms": round(elapsed * 1e3, 3),
                           "peer": context.peer(), "bytes_out": sent})  # fmt: skip

    @staticmethod
    def _code(context, raised: bool) -> grpc.StatusCode:
        code = context.code()
        if code is None:
            return grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
        return code

    def _unary(self, rpc, rid, behavior):
        @functools.wraps(behavior)
        def observed(request, context):
            started = self._begin(rpc, rid, request)
            sent, raised = 0, True
            try:
                response = behavior(request, context)
                sent, raised = response.ByteSize(), False
                return response
            finally:
                self._end(rpc, context, started, self._code(context, raised), sent)

        return observed

    def _stream(self, rpc, rid, behavior):
        @functools.wraps(behavior)
        def observed(request, context):
            started = self._begin(rpc, rid, request)
            sent, code, delivered = 0, None, False
            try:
                for response in behavior(request, context):
                    sent += response.ByteSize()
                    if rpc == "TrainKernel" and response.WhichOneof("event") == "result":
                        self.metrics.observe_training(response.result.steps, response.result.elapsed_seconds)
                        delivered = True
                    yield response
            except GeneratorExit:  # the client went away: mid-stream, or (fine) once it had its result
                code = grpc.StatusCode.OK if delivered else grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = self._code(context, True)
                raise
            finally:
                self._end(rpc, context, started, code or self._code(context, False), sent)

        return observed

    def _bidi(self, rpc, rid, behavior):
        @functools.wraps(behavior)
        def observed(request_iterator, context):
            started = self._begin(rpc, rid, None)
            received = self.metrics.bytes_received.labels(rpc)

            def counted():
                for request in request_iterator:
                    received.inc(_size(request))
                    yield request

            sent, code = 0, None
            try:
                for response in behavior(counted(), context):
                    sent += _size(response)
                    yield response
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = self._code(context, True)
                raise
            finally:
                self._end(rpc, context, started, code or self._code(context, False), sent)

        return observed


class BearerTokenAuth(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` with one of ``tokens`` on every RPC but health and reflection."""

    def __init__(self, tokens: tuple[bytes, ...], refusals: futures.ThreadPoolExecutor):
        if not tokens:
            raise ValueError("BearerTokenAuth needs at least one token")
        self._tokens = tokens
        self._refusals = refusals

    def _accepts(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = given.strip().encode()
        ok = False
        for token in self._tokens:  # every token is compared, so timing does not tell which one matched
            ok |= hmac.compare_digest(token, given)
        return ok

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_SERVICES):
            return continuation(details)
        header = _metadata(details, "authorization")
        if self._accepts(header):
            return continuation(details)
        message = (
            "invalid bearer token" if header else "missing bearer token: send metadata 'authorization: Bearer <token>'"
        )
        # The refusal only needs the method's kind; asking the inner interceptors for it would admit the call.
        return _refusal(_kind(_rpc_name(details)), grpc.StatusCode.UNAUTHENTICATED, message, self._refusals)


class ComputeSlots:
    """The server's compute slots. A handler takes one (``held()``) only once its request's bytes have
    arrived (a unary message, a stream's chunks), so a client that withholds them holds none."""

    def __init__(self, count: int):
        self.count = count
        self._used = 0
        self._lock = threading.Lock()
        self.busy = f"server busy: all {count} compute slots are in use; retry with backoff"

    def full(self) -> bool:
        return self._used >= self.count

    @contextlib.contextmanager
    def held(self):
        """One slot for the block; ServerBusy (RESOURCE_EXHAUSTED) at once if none is free."""
        with self._lock:
            if self._used >= self.count:
                raise ServerBusy(self.busy)
            self._used += 1
        try:
            yield
        finally:
            with self._lock:
                self._used -= 1


class ComputeAdmission(grpc.ServerInterceptor):
    """Refuses a compute RPC with RESOURCE_EXHAUSTED when it arrives while every slot is in use, before
    it waits for a worker thread, so a full server builds no queue; the handler takes its slot later
    (``ComputeSlots.held``), and a call admitted here may still be refused there in a burst. Requests
    whose inline tensors exceed ``max_request_bytes`` are refused as well."""

    def __init__(self, slots: ComputeSlots, max_request_bytes: int, refusals: futures.ThreadPoolExecutor):
        self.slots = slots
        self.max_request_bytes = max_request_bytes
        self._refusals = refusals

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        rpc = _rpc_name(details)
        if handler is None or rpc not in COMPUTE_RPCS:
            return handler
        if self.slots.full():
            return _refusal(_kind(rpc), grpc.StatusCode.RESOURCE_EXHAUSTED, self.slots.busy, self._refusals)
        # A chunked stream's size is checked from its header, by the data path.
        return _wrap(handler, self._unary, self._stream, lambda behavior: behavior)

    def _check_size(self, request, context) -> None:
        carried = sum(
            len(v.data) for f, v in request.ListFields() if f.message_type and f.message_type.full_name == _TENSOR
        )
        if carried > self.max_request_bytes:
            message = f"tensors of {carried} bytes exceed the server's cap of {self.max_request_bytes}"
            status.abort(context, ResourceExhaustedError("request", message))

    def _unary(self, behavior):
        @functools.wraps(behavior)
        def admitted(request, context):
            if not isinstance(request, Undecodable):
                self._check_size(request, context)
            return behavior(request, context)

        return admitted

    def _stream(self, behavior):
        @functools.wraps(behavior)
        def admitted(request, context):
            if not isinstance(request, Undecodable):
                self._check_size(request, context)
            yield from behavior(request, context)

        return admitted
