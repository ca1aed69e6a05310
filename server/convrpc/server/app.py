"""Builds, starts and stops a convrpc server: ConvService plus health and reflection."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from convrpc.core import config, get_backend
from convrpc.v1 import conv_service_pb2, conv_service_pb2_grpc

from .servicer import ConvService
from .settings import Settings
from .transport import DataPathService

log = logging.getLogger("convrpc.server")

SERVICE_NAME = conv_service_pb2.DESCRIPTOR.services_by_name["ConvService"].full_name


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("convrpc")
    except PackageNotFoundError:
        return "0+unknown"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options the server uses; the SDK mirrors the message limits."""
    return [*config.transport_options(max_message_bytes), ("grpc.so_reuseport", 0)]


class ConvServer:
    """One server process's gRPC server. ``start()`` binds and serves; ``stop()`` drains and stops.

    Health reports NOT_SERVING until the backend's kernels are compiled (or loaded from the numba
    cache), and again from the moment shutdown begins.
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings = settings or Settings()
        self.backend = get_backend(settings.backend).with_max_elements(settings.max_elements)
        self.servicer = ConvService(self.backend, settings, version())
        # Health gets its own thread so probes answer even when every RPC worker is busy.
        self.health = health.HealthServicer(
            experimental_non_blocking=True,
            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="convrpc-health"),
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="convrpc-rpc"),
            options=channel_options(settings.max_message_bytes),
        )
        conv_service_pb2_grpc.add_ConvServiceServicer_to_server(self.servicer, self._server)
        self.data_path = DataPathService(self.backend, settings)
        self.data_path.register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(settings.address)
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
        log.info("convrpc %s listening on %s (backend %s on %s)", version(), self.target, self.backend.name, self.backend.device)
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
        self.data_path.close()
        log.info("convrpc server on %s stopped", self.target)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "ConvServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)


def serve(settings: Settings) -> int:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    server = ConvServer(settings).start()
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s; draining for up to %.1f s", signal.Signals(signum).name, settings.grace)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    done.wait()
    server.stop()
    return 0
