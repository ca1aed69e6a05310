"""Prometheus metrics of one server, in its own registry so several servers in a process never clash.

The per-RPC series carry the gRPC ecosystem's names and labels (those of go-grpc-prometheus and
py-grpc-prometheus: ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`` ...), so
the standard gRPC dashboards and alerts fit; convrpc's own series are prefixed ``convrpc_``.
"""

from __future__ import annotations

import platform
from typing import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

__all__ = ["REFUSAL_REASONS", "ServerMetrics"]

#: Latency buckets from sub-millisecond unary calls to hour-long training streams (seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
#: Why the server refused an RPC before computing: no free compute slot, no or a wrong token, a request
#: over a size cap (max_request_bytes, max_elements), the kernels still compiling.
REFUSAL_REASONS = ("busy", "unauthenticated", "too_large", "warming_up")
_RPC = ("grpc_type", "grpc_service", "grpc_method")


class ServerMetrics:
    """The counters, gauges and histograms a server exports, and their HTTP endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str = "0+unknown", backend: str = ""):
        self.registry = r = registry or CollectorRegistry()
        # -- the gRPC ecosystem's series, every service (ConvService, health, reflection)
        self.started = Counter("grpc_server_started", "Total number of RPCs started on the server.", _RPC, registry=r)
        self.handled = Counter("grpc_server_handled", "Total number of RPCs completed on the server, regardless "
                               "of success or failure.", (*_RPC, "grpc_code"), registry=r)  # fmt: skip
        self.handling = Histogram("grpc_server_handling_seconds", "Histogram of response latency (seconds) of gRPC "
                                  "that had been application-level handled by the server.", _RPC,
                                  buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.msg_received = Counter("grpc_server_msg_received", "Total number of RPC stream messages received "
                                    "on the server.", _RPC, registry=r)  # fmt: skip
        self.msg_sent = Counter("grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.",
                                _RPC, registry=r)  # fmt: skip
        # -- convrpc's own
        self.bytes_received = Counter("convrpc_received_bytes", "Request message bytes, by method", ["grpc_method"],
                                      registry=r)  # fmt: skip
        self.bytes_sent = Counter("convrpc_sent_bytes", "Response message bytes, by method", ["grpc_method"], registry=r)
        self.in_flight = Gauge("convrpc_in_flight_requests", "RPCs being handled now, by method", ["grpc_method"],
                               registry=r)  # fmt: skip
        self.refused = Counter("convrpc_refused", "RPCs refused before computing, by method and reason (busy, "
                               "unauthenticated, too_large, warming_up)", ["grpc_method", "reason"], registry=r)  # fmt: skip
        self.queue_depth = Gauge("convrpc_queued_rpcs", "RPCs accepted and waiting for a handler thread", registry=r)
        self.compute_slots = Gauge("convrpc_compute_slots", "Compute RPCs admitted at once at most", registry=r)
        self.train_steps = Counter("convrpc_train_steps", "Optimisation steps run by TrainKernel and TrainNetwork", registry=r)
        self.train_steps_per_second = Gauge(
            "convrpc_train_steps_per_second", "Steps per second of the most recently finished training run", registry=r
        )
        self.warm_up_seconds = Gauge("convrpc_warm_up_seconds", "Seconds the backend's JIT warm-up took", registry=r)
        Info("convrpc_build", "The server's version, backend and Python", registry=r).info(
            {"version": version, "backend": backend, "python": platform.python_version()}
        )
        # process_* (CPU, memory, file descriptors, start time) and python_info, as every Python exporter has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._http = None

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_training(self, steps: int, elapsed: float) -> None:
        self.train_steps.inc(steps)
        if elapsed > 0:
            self.train_steps_per_second.set(steps / elapsed)

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
