"""Builds, starts and stops a convrpc server: ConvService plus health and reflection."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from convrpc.core import Backend, get_backend
from convrpc.v1 import conv_service_pb2

from . import security
from .interceptors import BearerTokenAuth, CallObserver, ComputeAdmission
from .logs import configure_logging
from .metrics import ServerMetrics
from .servicer import ConvService
from .settings import Settings

log = logging.getLogger("convrpc.server")

SERVICE_NAME = conv_service_pb2.DESCRIPTOR.services_by_name["ConvService"].full_name


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
    """The standard health service with Check, not only Watch, on a pool of its own (probes answer while
    every RPC worker is busy), set per instance: the base class sets Watch's pool on the shared class
    function, so with two servers in a process one would use the other's pool."""

    def __init__(self, pool: futures.ThreadPoolExecutor):
        super().__init__(experimental_non_blocking=True, experimental_thread_pool=pool)
        self.pool = pool
        check, watch = super().Check, super().Watch

        def probe(request, context):
            return check(request, context)

        def watcher(request, context, send_response_callback=None):
            return watch(request, context, send_response_callback)

        probe.experimental_thread_pool = watcher.experimental_thread_pool = pool
        watcher.experimental_non_blocking = True
        self.Check, self.Watch = probe, watcher


class ConvServer:
    """One server process's gRPC server. ``start()`` binds and serves; ``stop()`` drains and stops.

    Health reports NOT_SERVING until the backend's kernels are compiled (or loaded from the numba
    cache), and again from the moment shutdown begins.
    """

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None):
        self.settings = settings = settings or Settings()
        # Credentials first: a bad file stops start-up before anything is bound.
        credentials = security.server_credentials(settings)
        tokens = security.load_tokens(settings)
        apply_compute_threads(settings.compute_threads)
        backend = backend or get_backend(settings.backend)
        self.backend = backend.with_max_elements(settings.max_elements, settings.max_op_flops)
        self.servicer = ConvService(self.backend, settings, version())
        self.metrics = ServerMetrics()
        self.metrics.compute_slots.set(settings.compute_slots)
        self.health = _HealthServicer(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="convrpc-health"))
        # Refusals (no token, no free slot) run here, never queued behind the work they refuse.
        self._refusals = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="convrpc-refuse")
        interceptors = [CallObserver(self.metrics)]
        if tokens:
            interceptors.append(BearerTokenAuth(tokens, self._refusals))
        interceptors.append(ComputeAdmission(self.servicer.slots, settings.max_request_bytes, self._refusals))
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
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if credentials is None:
            self.port = self._server.add_insecure_port(settings.address)
        else:
            self.port = self._server.add_secure_port(settings.address, credentials)
        self.metrics_port: int | None = None
        self.ready = threading.Event()
        self.warm_up_seconds: float | None = None
        self._stopped = threading.Event()

    @property
    def target(self) -> str:
        """``host:port`` a client on this machine can dial."""
        host = self.settings.host
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self.port}" if ":" not in host else f"[{host.strip('[]')}]:{self.port}"

    def _set_health(self, state) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, state)

    def start(self) -> "ConvServer":
        self._server.start()
        s = self.settings
        if s.worker_threads <= s.compute_slots:
            log.warning("workers (%d) do not exceed the compute slots (%d): admitted calls may wait for a thread, "
                        "and GetServerInfo and reflection behind them", s.worker_threads, s.compute_slots)  # fmt: skip
        if self.settings.metrics_port:
            self.metrics_port = self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        log.info("convrpc %s listening on %s (%s; backend %s on %s)", version(), self.target,
                 "TLS" if self.settings.tls else "plaintext", self.backend.name, self.backend.device)  # fmt: skip
        threading.Thread(target=self._warm_up, name="convrpc-warm-up", daemon=True).start()
        return self

    def _warm_up(self) -> None:
        started = time.perf_counter()
        warm_up = getattr(self.backend.kernels, "warm_up", None)
        if self.settings.warm_up and warm_up is not None:
            try:
                warm_up()
            except Exception:  # noqa: BLE001 - a failed warm-up leaves the server NOT_SERVING, visibly
                log.exception("warm-up of backend %s failed", self.backend.name)
                return
        self.warm_up_seconds = time.perf_counter() - started
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
        self.servicer.drain()
        self._server.stop(self.settings.grace if grace is None else grace).wait()
        self.servicer.close()
        self.metrics.close()
        for pool in (self._workers, self._refusals, self.health.pool):
            pool.shutdown(wait=False)
        log.info("convrpc server on %s stopped", self.target)

    def stop_now(self) -> None:
        """Cut a graceful stop short: cancel every RPC still running."""
        self._server.stop(0)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "ConvServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)


def serve(settings: Settings) -> int:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    configure_logging(settings.log_level, settings.log_format)
    server = ConvServer(settings).start()
    done = threading.Event()

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if done.is_set():
            log.warning("received %s again; cancelling the RPCs still in flight", name)
            server.stop_now()
            return
        log.info("received %s; draining for up to %.1f s (send it again to stop at once)", name, settings.grace)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    done.wait()
    server.stop()
    return 0
