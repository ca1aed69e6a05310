"""Prometheus metrics of one server, in its own registry so several servers in a process never clash."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ServerMetrics"]

#: Latency buckets from sub-millisecond unary calls to hour-long training streams (seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class ServerMetrics:
    """The counters, gauges and histograms a server exports, and their HTTP endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "convrpc_requests", "RPCs finished, by method and status code", ["rpc", "code"], registry=r
        )
        self.latency = Histogram("convrpc_request_duration_seconds", "Time from an RPC's handler start to its end",
                                 ["rpc", "code"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.bytes_received = Counter("convrpc_received_bytes", "Request message bytes, by method", ["rpc"], registry=r)
        self.bytes_sent = Counter("convrpc_sent_bytes", "Response message bytes, by method", ["rpc"], registry=r)
        self.in_flight = Gauge("convrpc_in_flight_requests", "RPCs being handled now, by method", ["rpc"], registry=r)
        self.queue_depth = Gauge("convrpc_queued_rpcs", "RPCs accepted and waiting for a handler thread", registry=r)
        self.compute_slots = Gauge("convrpc_compute_slots", "Compute RPCs admitted at once at most", registry=r)
        self.train_steps = Counter("convrpc_train_steps", "Optimisation steps run by TrainKernel", registry=r)
        self.train_steps_per_second = Gauge(
            "convrpc_train_steps_per_second", "Steps per second of the most recently finished training run", registry=r
        )
        self.warm_up_seconds = Gauge("convrpc_warm_up_seconds", "Seconds the backend's JIT warm-up took", registry=r)
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
