"""Server interceptors: per-call observation (request id, log line, metrics), bearer-token auth, admission control.

Order matters: observation is outermost so refusals by the others are logged and counted too.
Health and reflection pass auth and admission untouched (probes need no token and keep their own thread
pool), but are observed like every RPC: counted, and given a request id.
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

__all__ = ["BearerTokenAuth", "CallObserver", "ComputeAdmission", "ComputeSlots", "OPEN_SERVICES", "REQUEST_ID_KEY",
           "Undecodable"]  # fmt: skip

log = logging.getLogger("convrpc.server.calls")

SERVICE_PREFIX = "/convrpc.v1.ConvService/"
#: RPCs that compute, and so take one of the server's compute slots.
COMPUTE_RPCS = frozenset(
    {"Forward", "Backward", "TrainKernel", "TrainNetwork", "ForwardStream", "BackwardStream"}
)
#: Services reachable without a token: probes and tooling must work before credentials are handed out.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")  # fmt: skip
#: The metadata key of a call's request id: the client's, when it sends one, else the server's; it comes
#: back in every response's trailing metadata and tags every log line of the call.
REQUEST_ID_KEY = "x-request-id"
#: ConvService's RPCs that are not unary-unary, by handler kind: an auth refusal must know the kind
#: without asking the inner interceptors (that would admit the call).
STREAMING_RPCS = {"TrainKernel": "unary_stream", "TrainNetwork": "unary_stream", "ForwardStream": "stream_stream",
                  "BackwardStream": "stream_stream"}  # fmt: skip
_TENSOR = "convrpc.v1.Tensor"
#: The grpc_type label of each handler kind, as the gRPC ecosystem's metrics spell it.
_GRPC_TYPES = {"unary_unary": "unary", "unary_stream": "server_stream", "stream_unary": "client_stream",
               "stream_stream": "bidi_stream"}  # fmt: skip


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


def _kind(handler) -> str | None:
    """The attribute of ``handler`` holding its behavior: ``unary_unary``, ``unary_stream``, ..."""
    return next((k for k in _GRPC_TYPES if getattr(handler, k, None) is not None), None)


def _wrap(handler, wrap):
    """``handler`` with its behavior replaced by ``wrap(behavior, kind)``, whatever its kind."""
    kind = _kind(handler)
    if kind is None:
        return handler
    return handler._replace(**{kind: wrap(getattr(handler, kind), kind)})


def _refusal(kind: str, code: grpc.StatusCode, message: str, pool: futures.ThreadPoolExecutor, reason: str,
             *details):  # fmt: skip
    """A handler of ``kind`` that ends the call with ``code`` and ``details`` at once, run on ``pool``: a
    refusal must not wait behind the work queued for the RPC workers. It never reads the request, so it
    needs no deserializer. ``reason`` (one of metrics.REFUSAL_REASONS) is what the observer counts."""
    rich = status.rich_status(code, message, *details)

    def refuse(request, context):
        status.abort_with(context, rich)

    refuse.experimental_thread_pool = pool
    refuse.refusal_reason = reason
    return getattr(grpc, f"{kind}_rpc_method_handler")(refuse)


def _metadata(details, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v
    return None


class CallObserver(grpc.ServerInterceptor):
    """Gives each call a request id (the client's ``x-request-id`` or a fresh one) and returns it in the
    trailing metadata, logs one line when a ConvService call ends (method, status code, duration) and
    feeds the server's metrics, the gRPC ecosystem's and convrpc's own."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        kind = _kind(handler)
        if kind is None:
            return handler
        behavior = getattr(handler, kind)
        if getattr(behavior, "experimental_non_blocking", False):
            return handler  # health's Watch answers through a callback, long after the handler returned
        service, _, method = details.method.lstrip("/").rpartition("/")
        given = _metadata(details, REQUEST_ID_KEY)
        rid = given if given and len(given) <= 64 and given.isprintable() else new_request_id()
        call = _Call(self, (_GRPC_TYPES[kind], service, method), _rpc_name(details), rid,
                     getattr(behavior, "refusal_reason", None))  # fmt: skip
        return _wrap(handler, call.wrap)


class _Call:
    """One call's observation: what the wrappers of its behavior share."""

    def __init__(self, observer: CallObserver, labels: tuple[str, str, str], rpc: str | None, rid: str,
                 refusal: str | None):  # fmt: skip
        self.metrics = observer.metrics
        self.labels, self.rpc, self.rid, self.refusal = labels, rpc, rid, refusal
        self.method = labels[2]

    def wrap(self, behavior, kind):
        return {"unary_unary": self._unary, "unary_stream": self._stream, "stream_stream": self._bidi,
                "stream_unary": self._client_stream}[kind](behavior)  # fmt: skip

    def _begin(self, context, request) -> float:
        REQUEST_ID.set(self.rid)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.rid),))
        m = self.metrics
        m.started.labels(*self.labels).inc()
        m.in_flight.labels(self.method).inc()
        if request is not None and self.refusal is None:  # a refusal's request stays undecoded bytes
            m.msg_received.labels(*self.labels).inc()
            m.bytes_received.labels(self.method).inc(_size(request))
        return time.perf_counter()

    def _received(self, request_iterator):
        received, count = self.metrics.bytes_received.labels(self.method), self.metrics.msg_received.labels(*self.labels)
        for request in request_iterator:
            count.inc()
            received.inc(_size(request))
            yield request

    def _sent(self, response) -> int:
        self.metrics.msg_sent.labels(*self.labels).inc()
        return _size(response)

    def _end(self, context, started, code, sent) -> None:
        elapsed = time.perf_counter() - started
        m = self.metrics
        m.in_flight.labels(self.method).dec()
        m.handled.labels(*self.labels, code.name).inc()
        m.handling.labels(*self.labels).observe(elapsed)
        m.bytes_sent.labels(self.method).inc(sent)
        reason = self.refusal or ("too_large" if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None)
        if reason:
            m.refused.labels(self.method, reason).inc()
        if self.rpc is None:
            return  # health and reflection: counted, not logged
        level = logging.ERROR if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s %.1f ms", self.rpc, code.name, elapsed * 1e3,
                    extra={"rpc": self.rpc, "code": code.name, "duration_ms": round(elapsed * 1e3, 3),
                           "peer": context.peer(), "bytes_out": sent})  # fmt: skip

    @staticmethod
    def _code(context, raised: bool) -> grpc.StatusCode:
        code = context.code()
        if code is None:
            return grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
        return code

    def _unary(self, behavior):
        @functools.wraps(behavior)
        def observed(request, context):
            started = self._begin(context, request)
            sent, raised = 0, True
            try:
                response = behavior(request, context)
                raised = False
                if response is not None and context.code() in (None, grpc.StatusCode.OK):
                    sent = self._sent(response)
                return response
            finally:
                self._end(context, started, self._code(context, raised), sent)

        return observed

    def _client_stream(self, behavior):
        @functools.wraps(behavior)
        def observed(request_iterator, context):
            started = self._begin(context, None)
            sent, raised = 0, True
            try:
                response = behavior(self._received(request_iterator), context)
                sent, raised = self._sent(response), False
                return response
            finally:
                self._end(context, started, self._code(context, raised), sent)

        return observed

    def _stream(self, behavior):
        @functools.wraps(behavior)
        def observed(request, context):
            started = self._begin(context, request)
            yield from self._responses(lambda: behavior(request, context), context, started)

        return observed

    def _bidi(self, behavior):
        @functools.wraps(behavior)
        def observed(request_iterator, context):
            started = self._begin(context, None)
            yield from self._responses(lambda: behavior(self._received(request_iterator), context), context, started)

        return observed

    def _responses(self, respond, context, started):
        """Yield what ``respond()`` returns, counting it; a handler that fails before it returns an iterator
        (a refusal aborts at once) is counted too."""
        sent, code, delivered = 0, None, False
        try:
            for response in respond():
                sent += self._sent(response)
                if self.rpc in ("TrainKernel", "TrainNetwork") and response.WhichOneof("event") == "result":
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
            self._end(context, started, code or self._code(context, False), sent)


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
        reason = status.error_info("INVALID_TOKEN" if header else "MISSING_TOKEN")
        kind = STREAMING_RPCS.get(_rpc_name(details), "unary_unary")
        return _refusal(kind, grpc.StatusCode.UNAUTHENTICATED, message, self._refusals, "unauthenticated", reason)


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
    """Refuses a compute RPC when it arrives, before it waits for a worker thread, so a full server builds
    no queue: with RESOURCE_EXHAUSTED while every slot is in use (the handler takes its slot later,
    ``ComputeSlots.held``, so a call admitted here may still be refused there in a burst), and until
    ``ready`` is set (the kernels are compiled) with UNAVAILABLE, as health says NOT_SERVING meanwhile.
    Both refusals carry a RetryInfo. Requests whose inline tensors exceed ``max_request_bytes`` are
    refused as well."""

    def __init__(self, slots: ComputeSlots, max_request_bytes: int, refusals: futures.ThreadPoolExecutor,
                 ready: threading.Event | None = None):  # fmt: skip
        self.slots = slots
        self.max_request_bytes = max_request_bytes
        self._refusals = refusals
        self._ready = ready

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        rpc = _rpc_name(details)
        if handler is None or rpc not in COMPUTE_RPCS:
            return handler
        kind = _kind(handler)
        if self._ready is not None and not self._ready.is_set():
            message = "server warming up: its kernels are being compiled; retry shortly or use another replica"
            return _refusal(kind, grpc.StatusCode.UNAVAILABLE, message, self._refusals, "warming_up", status.retry_info())
        if self.slots.full():
            return _refusal(kind, grpc.StatusCode.RESOURCE_EXHAUSTED, self.slots.busy, self._refusals, "busy",
                            status.retry_info())  # fmt: skip
        # A chunked stream's size is checked from its first message, by the pipeline.
        wrappers = {"unary_unary": self._unary, "unary_stream": self._stream}
        return _wrap(handler, lambda behavior, k: wrappers.get(k, lambda b: b)(behavior))

    def _check_size(self, request, context) -> None:
        carried = sum(
            len(v.data) for f, v in request.ListFields() if f.message_type and f.message_type.full_name == _TENSOR
        )
        if carried > self.max_request_bytes:
            message = f"tensors of {carried} bytes exceed the server's cap of {self.max_request_bytes}"
            exc = ResourceExhaustedError("request", message, setting="max_request_bytes", limit=self.max_request_bytes)
            status.abort(context, exc)

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
