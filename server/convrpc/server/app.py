"""Builds, starts and stops a convrpc server: ConvService plus health and reflection."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from concurrent import futures
from importlib.resources import files
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._base import BaseReflectionServicer, _not_found_error

from convrpc.core import Backend, config, get_backend
from convrpc.v1 import conv_service_pb2

from . import security
from .interceptors import BearerTokenAuth, CallObserver, ComputeAdmission
from .logs import configure_logging
from .metrics import ServerMetrics
from .servicer import ConvService
from .settings import ConfigError, Settings
from .side_channel import SideChannel

log = logging.getLogger("convrpc.server")

SERVICE_NAME = conv_service_pb2.DESCRIPTOR.services_by_name["ConvService"].full_name
#: The server reflection service's two names: grpcurl, buf curl and Postman ask for v1, older tools v1alpha.
REFLECTION_V1, REFLECTION_V1ALPHA = "grpc.reflection.v1.ServerReflection", reflection.SERVICE_NAME


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("convrpc")
    except PackageNotFoundError:
        return "0+unknown"


def apply_compute_threads(threads: int) -> None:
    """Cap the threads one op computes with: numba's pool (read when the numba backend is first
    imported) and the BLAS pools numpy uses (threadpoolctl, when installed). 0 leaves the defaults."""
    if threads <= 0:
        return
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=threads)


class _HealthServicer(health.HealthServicer):
    """The standard health service with Check and List, not only Watch, on a pool of its own (probes answer
    while every RPC worker is busy), set per instance: the base class sets Watch's pool on the shared class
    function, so with two servers in a process one would use the other's pool. ``end_watches()`` closes
    every open Watch (after its NOT_SERVING), so an idle watcher never holds a shutdown for the full grace."""

    def __init__(self, pool: futures.ThreadPoolExecutor):
        super().__init__(experimental_non_blocking=True, experimental_thread_pool=pool)
        self.pool = pool
        check, watch = super().Check, super().Watch

        def probe(request, context):
            return check(request, context)

        def lister(request, context):
            with self._lock:
                statuses = dict(self._server_status)
            return health_pb2.HealthListResponse(
                statuses={name: health_pb2.HealthCheckResponse(status=state) for name, state in statuses.items()}
            )

        def watcher(request, context, send_response_callback=None):
            return watch(request, context, _closing_once(send_response_callback))

        probe.experimental_thread_pool = lister.experimental_thread_pool = watcher.experimental_thread_pool = pool
        watcher.experimental_non_blocking = True
        self.Check, self.List, self.Watch = probe, lister, watcher

    def end_watches(self) -> None:
        with self._lock:
            watchers = [send for sends in self._send_response_callbacks.values() for send in sends]
        for send in watchers:
            send(None)


def _closing_once(send):
    """``send`` (a non-blocking stream's callback; None ends the stream) passing None on only once: the
    stream ends when the server closes it, and gRPC's close callback tries again."""
    closed = threading.Lock()

    def send_once(response):
        if response is not None:
            send(response)
        elif closed.acquire(blocking=False):
            send(None)

    return send_once


def _described_files() -> dict[str, bytes]:
    """convrpc's .proto files as serialized FileDescriptorProtos *with* their comments (protoc's source
    info, which generated code drops), compiled from the shipped .proto by grpcio-tools; {} without it."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        log.debug("grpcio-tools is not installed: reflection serves the descriptors without their comments")
        return {}
    name = conv_service_pb2.DESCRIPTOR.name
    root = Path(conv_service_pb2.__file__).resolve().parents[2]  # the directory holding convrpc/v1/
    if not (root / name).is_file():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.binpb"
        argv = ["protoc", f"-I{root}", f"-I{files(grpc_tools) / '_proto'}", "--include_source_info",
                "--include_imports", f"--descriptor_set_out={out}", name]  # fmt: skip
        if protoc.main(argv) != 0:
            log.warning("could not compile %s for reflection: serving it without comments", name)
            return {}
        described = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f.SerializeToString() for f in described.file if f.name.startswith("convrpc/")}


def _reflection_v1_file() -> None:
    """Register grpc/reflection/v1/reflection.proto in the default pool, made from v1alpha's (the two are
    the same messages under another package), so reflection can describe itself under both names."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name[len(old) :]
    for method in proto.service[0].method:
        method.input_type, method.output_type = method.input_type.replace(old, new), method.output_type.replace(old, new)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.options.Clear()
    pool.Add(proto)


class _ReflectionService(BaseReflectionServicer):
    """Server reflection, v1 and v1alpha (one wire format), serving convrpc's descriptors with comments."""

    def __init__(self, service_names, described: dict[str, bytes]):
        super().__init__(service_names)
        self._described = described

    def _files(self, descriptor, request):
        seen, stack = {}, [descriptor]
        while stack:
            d = stack.pop()
            if d.name not in seen:
                seen[d.name] = d
                stack.extend(d.dependencies)
        serialized = []
        for name, d in seen.items():
            if name not in self._described:
                proto = descriptor_pb2.FileDescriptorProto()
                d.CopyToProto(proto)
                self._described[name] = proto.SerializeToString()
            serialized.append(self._described[name])
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=serialized),
            original_request=request,
        )

    def ServerReflectionInfo(self, request_iterator, context):
        for request in request_iterator:
            kind = request.WhichOneof("message_request")
            try:
                if kind == "file_by_filename":
                    yield self._files(self._pool.FindFileByName(request.file_by_filename), request)
                elif kind == "file_containing_symbol":
                    yield self._files(self._pool.FindFileContainingSymbol(request.file_containing_symbol), request)
                elif kind == "list_services":
                    yield self._list_services(request)
                elif kind == "file_containing_extension":
                    ext = request.file_containing_extension
                    yield self._file_containing_extension(request, ext.containing_type, ext.extension_number)
                elif kind == "all_extension_numbers_of_type":
                    yield self._all_extension_numbers_of_type(request, request.all_extension_numbers_of_type)
                else:
                    yield _not_found_error(request)
            except KeyError:
                yield _not_found_error(request)

    def register(self, server: grpc.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(
            self.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
             for name in (REFLECTION_V1, REFLECTION_V1ALPHA)]  # fmt: skip
        )


class ConvServer:
    """One server process's gRPC server. ``start()`` binds and serves; ``stop()`` drains and stops.

    Health reports NOT_SERVING until the backend's kernels are compiled (or loaded from the numba
    cache), and compute RPCs are refused with UNAVAILABLE meanwhile; health reports NOT_SERVING again
    from the moment shutdown begins. With ``health_port``, a second, plaintext server answers
    grpc.health.v1 alone there, for probes that cannot present the TLS the gRPC port requires.
    """

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None):
        self.settings = settings = settings or Settings()
        # Credentials first: a bad file stops start-up before anything is bound.
        credentials = security.server_credentials(settings)
        tokens = security.load_tokens(settings)
        apply_compute_threads(settings.compute_threads)
        backend = backend or get_backend(settings.backend)
        self.backend = backend.with_max_elements(settings.max_elements, settings.max_op_flops)
        self.servicer_version = version()
        self.servicer = ConvService(self.backend, settings, self.servicer_version)
        self.metrics = ServerMetrics(version=self.servicer_version, backend=self.backend.name)
        self.metrics.compute_slots.set(settings.compute_slots)
        self.health = _HealthServicer(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="convrpc-health"))
        # Refusals (no token, no free slot) run here, never queued behind the work they refuse.
        self._refusals = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="convrpc-refuse")
        interceptors = [CallObserver(self.metrics)]
        if tokens:
            interceptors.append(BearerTokenAuth(tokens, self._refusals))
        self.ready = threading.Event()
        interceptors.append(ComputeAdmission(self.servicer.slots, settings.max_request_bytes, self._refusals, self.ready))
        self._workers = workers = futures.ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="convrpc-rpc")
        self.metrics.watch_queue(lambda: workers._work_queue.qsize())
        self._server = grpc.server(
            workers,
            options=settings.channel_options(),
            interceptors=interceptors,
            # gRPC counts running and queued RPCs; past this it refuses without queueing.
            maximum_concurrent_rpcs=settings.worker_threads + settings.max_queued_rpcs,
        )
        self.servicer.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _reflection_v1_file()
        _ReflectionService((SERVICE_NAME, health.SERVICE_NAME, REFLECTION_V1, REFLECTION_V1ALPHA),
                           _described_files()).register(self._server)  # fmt: skip
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if credentials is None:
            self.port = _bind(self._server.add_insecure_port, settings.address, "port")
        else:
            self.port = _bind(lambda address: self._server.add_secure_port(address, credentials), settings.address, "port")
        self._health_server = None
        self.health_port: int | None = None
        if settings.health_port:
            self._health_server = grpc.server(self.health.pool, options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = _bind(self._health_server.add_insecure_port,
                                     _address(settings.host, settings.health_port), "health_port")  # fmt: skip
        self.metrics_port: int | None = None
        self.warm_up_seconds: float | None = None
        #: (kernel groups compiled, of how many) while warming up.
        self.warm_up_progress: tuple[int, int] = (0, 0)
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """``host:port`` the gRPC port is bound to (``0.0.0.0:50051`` listens on every interface)."""
        return _address(self.settings.host, self.port)

    @property
    def target(self) -> str:
        """``host:port`` a client on this machine can dial."""
        host = self.settings.host
        return _address("127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host, self.port)

    def _set_health(self, state) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, state)

    def start(self) -> "ConvServer":
        s = self.settings
        if s.side_channel:
            self.servicer.side = _bind(lambda address: SideChannel(
                s.host, s.side_channel_port, idle_timeout=s.stream_idle_timeout,
                token_seconds=config.SIDE_CHANNEL_TOKEN_SECONDS, ssl_context=security.side_channel_ssl(s),
            ), _address(s.host, s.side_channel_port), "side_channel_port")  # fmt: skip
        self._server.start()
        if self._health_server is not None:
            self._health_server.start()
        if s.worker_threads <= s.compute_slots:
            log.warning("workers (%d) do not exceed the compute slots (%d): admitted calls may wait for a thread, "
                        "and GetServerInfo and reflection behind them", s.worker_threads, s.compute_slots)  # fmt: skip
        if self.settings.metrics_port:
            self.metrics_port = self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
            log.info("metrics on http://%s/metrics", _address(s.host, self.metrics_port))
        if self.health_port:
            log.info("plaintext health checks on %s", _address(s.host, self.health_port))
        if self.servicer.side is not None:
            log.info("side channel for large streams on %s", _address(s.host, self.servicer.side.port))
        log.info("convrpc %s listening on %s (%s; backend %s on %s)", self.servicer_version, self.address,
                 "TLS" if s.tls else "plaintext", self.backend.name, self.backend.device)  # fmt: skip
        warm_up = getattr(self.backend.kernels, "warm_up", None)
        if s.warm_up and warm_up is not None:
            threading.Thread(target=self._warm_up, args=(warm_up,), name="convrpc-warm-up", daemon=True).start()
        else:
            self._serving(0.0)
        return self

    def _warm_up(self, warm_up) -> None:
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            self.warm_up_progress = (done, total)
            log.info("compiling kernels %d/%d (%.0f s; cached on disk for later starts)", done, total,
                     time.perf_counter() - started)  # fmt: skip

        try:
            warm_up(progress)
        except Exception:  # noqa: BLE001 - a failed warm-up leaves the server NOT_SERVING, visibly
            log.exception("warm-up of backend %s failed", self.backend.name)
            return
        self._serving(time.perf_counter() - started)

    def _serving(self, warm_up_seconds: float) -> None:
        self.warm_up_seconds = warm_up_seconds
        self.metrics.warm_up_seconds.set(self.warm_up_seconds)
        log.info("backend %s ready after %.2f s of warm-up", self.backend.name, self.warm_up_seconds)
        if not self._stopped.is_set():
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
            self.ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, end training streams, refuse new RPCs and let in-flight ones finish within ``grace``."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.health.end_watches()
        self.servicer.drain()
        grace = self.settings.grace if grace is None else grace
        stopping = [self._server.stop(grace)]
        if self._health_server is not None:
            stopping.append(self._health_server.stop(grace))
        for event in stopping:
            event.wait()
        self.servicer.close()
        self.metrics.close()
        for pool in (self._workers, self._refusals, self.health.pool):
            pool.shutdown(wait=False)
        log.info("convrpc server on %s stopped", self.address)

    def stop_now(self) -> None:
        """Cut a graceful stop short: cancel every RPC still running."""
        self._server.stop(0)
        if self._health_server is not None:
            self._health_server.stop(0)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "ConvServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)


def _address(host: str, port: int) -> str:
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(add_port, address: str, key: str) -> int:
    """``add_port(address)``: the port bound, or a ConfigError naming ``key`` when gRPC cannot bind."""
    try:
        return add_port(address)
    except (RuntimeError, OSError):  # gRPC says only "Failed to bind"; in use is by far the commonest cause
        flag = "--" + key.replace("_", "-")
        raise ConfigError(
            key, f"cannot listen on {address}: the port is in use (another convrpc serve?) or the address is not "
            f"this machine's; choose another with {flag} or --host",
        ) from None  # fmt: skip


def serve(settings: Settings) -> int:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; returns the exit code.

    The signal handlers come first: a signal while the server is still being built (imports, kernel
    loading) ends the process at once with exit code 0, as there is nothing to drain yet.
    """
    done = threading.Event()
    server: ConvServer | None = None

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if server is None:
            log.info("received %s while starting; exiting", name)
            raise SystemExit(0)
        if done.is_set():
            log.warning("received %s again; cancelling the RPCs still in flight", name)
            server.stop_now()
            return
        log.info("received %s; draining for up to %.1f s (send it again to stop at once)", name, settings.grace)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    configure_logging(settings.log_level, settings.log_format)
    server = ConvServer(settings).start()
    done.wait()
    server.stop()
    return 0
