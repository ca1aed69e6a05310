"""Operations: health through warm-up and drain, graceful shutdown of `convrpc serve`, metrics, logs, keepalive."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from convrpc import wire
from convrpc.client import ConvClient, ConvRpcError
from convrpc.core import Backend, get_backend, numpy_backend
from convrpc.server.logs import configure_logging
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc
from server_fixtures import running_server

ROOT = Path(__file__).resolve().parents[1]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_health_is_not_serving_during_warm_up_and_after_stop():
    from convrpc.server import ConvServer, Settings

    release = threading.Event()
    kernels = types.SimpleNamespace(
        **{k: getattr(numpy_backend, k) for k in dir(numpy_backend) if not k.startswith("_")}
    )
    kernels.warm_up = lambda progress=None: release.wait(30)  # numba_backend.warm_up(progress) as a test double
    server = ConvServer(Settings(host="127.0.0.1", port=0, warm_up=True), backend=Backend("slow", kernels)).start()
    try:
        assert health(server.target) == NOT_SERVING
        with grpc.insecure_channel(server.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == NOT_SERVING
            release.set()
            assert next(watch).status == SERVING
            watch.cancel()
        assert server.wait_ready(10) and health(server.target) == SERVING
        assert server.metrics.registry.get_sample_value("convrpc_warm_up_seconds") >= 0
    finally:
        server.stop(0)
    assert server.health._server_status[""] == NOT_SERVING


def test_metrics_count_calls_codes_latency_bytes_and_training(tmp_path):
    ports = free_port(), free_port()
    with running_server(backend="numpy", warm_up=False, metrics_port=ports[0], max_concurrent_rpcs=5) as srv, \
            running_server(backend="numpy", warm_up=False, metrics_port=ports[1]) as other:  # fmt: skip
        assert srv.metrics_port == ports[0] and other.metrics_port == ports[1]
        good = pb.ForwardRequest(op=wire.encode_op("relu"), input=wire.encode_tensor(np.array([-1.0, 2.0])))
        bad = pb.ForwardRequest(op=wire.encode_op("relu"))
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.ConvServiceStub(channel)
            reply = stub.Forward(good, timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Forward(bad, timeout=10)
        with ConvClient(srv.target, timeout=30) as client:
            result = client.train_kernel(
                np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), kernel_size=3, max_steps=7
            ).result()
        # The client has the result message a moment before the server's handler returns.
        _wait_for(lambda: _gauge(ports[0], "grpc_server_handled_total", grpc_type="server_stream", grpc_service="convrpc.v1.ConvService", grpc_method="TrainKernel",
                                    grpc_code="OK") == 1, 10, "the stream's end")
        text = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=10).read().decode()
        other_text = urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    forward = dict(grpc_type="unary", grpc_service="convrpc.v1.ConvService", grpc_method="Forward")
    train = dict(grpc_type="server_stream", grpc_service="convrpc.v1.ConvService", grpc_method="TrainKernel")
    assert value("grpc_server_started_total", **forward) == 2
    assert value("grpc_server_handled_total", **forward, grpc_code="OK") == 1
    assert value("grpc_server_handled_total", **forward, grpc_code="INVALID_ARGUMENT") == 1
    assert value("grpc_server_handled_total", **train, grpc_code="OK") == 1
    assert value("grpc_server_handling_seconds_count", **forward) == 2
    assert value("grpc_server_handling_seconds_bucket", **forward, le="+Inf") == 2
    assert value("grpc_server_msg_received_total", **forward) == 2
    assert value("grpc_server_msg_sent_total", **forward) == 1
    assert value("grpc_server_msg_sent_total", **train) > 1  # progress messages and the result
    assert value("convrpc_received_bytes_total", grpc_method="Forward") == good.ByteSize() + bad.ByteSize()
    assert value("convrpc_sent_bytes_total", grpc_method="Forward") == reply.ByteSize()
    assert value("convrpc_in_flight_requests", grpc_method="Forward") == 0
    assert value("convrpc_queued_rpcs") == 0
    assert value("convrpc_compute_slots") == 5
    assert value("convrpc_train_steps_total") == result.steps == 7
    assert value("convrpc_train_steps_per_second") > 0
    assert value("convrpc_warm_up_seconds") >= 0
    assert 'grpc_method="Forward"' not in other_text  # each server has its own registry


def test_json_logs_carry_the_request_id_and_errors_are_internal_never_unknown():
    kernels = types.SimpleNamespace(
        **{k: getattr(numpy_backend, k) for k in dir(numpy_backend) if not k.startswith("_")}
    )

    def broken_relu(x):
        raise RuntimeError("kernel bug")

    kernels.relu = broken_relu
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("info", "json", stream)
    try:
        with running_server(compute=Backend("broken", kernels), backend="numpy", warm_up=False) as srv:
            with grpc.insecure_channel(srv.target) as channel:
                stub = pb_grpc.ConvServiceStub(channel)
                x = wire.encode_tensor(np.ones(2))
                stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=(("x-request-id", "req-42"),), timeout=10)
                with pytest.raises(grpc.RpcError) as info:
                    stub.Forward(pb.ForwardRequest(op=wire.encode_op("relu"), input=x),
                                 metadata=(("x-request-id", "req-43"),), timeout=10)  # fmt: skip
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert info.value.code() is grpc.StatusCode.INTERNAL and "req-43" in info.value.details()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    calls = {entry["request_id"]: entry for entry in lines if "rpc" in entry}
    assert calls["req-42"]["rpc"] == "GetServerInfo" and calls["req-42"]["code"] == "OK"
    assert calls["req-42"]["duration_ms"] >= 0
    assert calls["req-43"]["code"] == "INTERNAL" and calls["req-43"]["level"] == "error"
    crash = [e for e in lines if e["request_id"] == "req-43" and "exception" in e]
    assert crash and "kernel bug" in crash[0]["exception"]


def test_keepalive_pings_of_the_sdk_are_accepted_on_a_long_quiet_stream(monkeypatch):
    """Scaled down 200x: the SDK pings every 5 ms during a 3 s stream that sends nothing; a server that
    refused pings that often would answer GOAWAY too_many_pings and the stream would fail UNAVAILABLE."""
    from convrpc.client import config as client_config

    monkeypatch.setattr(client_config, "KEEPALIVE_TIME_MS", client_config.KEEPALIVE_TIME_MS // 200)
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16))
    with running_server(backend="numpy", warm_up=False, report_interval=60.0) as srv, ConvClient(srv.target) as client:
        run = client.train_kernel(x, x[:, :, 1:-1, 1:-1], kernel_size=3, max_steps=10**6, lr=1e-4, max_seconds=3.0)
        updates = list(run)
        result = run.result()
    assert result.stop_reason == "time_limit" and len(updates) <= 2


def test_the_server_accepts_client_pings_every_second_by_default():
    from convrpc.server import Settings

    options = dict(Settings().channel_options())
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= 1000
    assert options["grpc.http2.max_ping_strikes"] == 0 and options["grpc.keepalive_permit_without_calls"] == 1


# -- graceful shutdown of the real command --------------------------------------------------------------------


def _serve(*flags: str) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / d) for d in ("proto", "core", "server", "client")))
    proc = subprocess.Popen([sys.executable, "-m", "convrpc.cli", "serve", *flags], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def _wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _gauge(metrics_port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_sigterm_lets_unary_calls_finish_ends_streams_with_a_result_and_exits_zero():
    metrics_port = free_port()
    proc, lines = _serve("--port", "0", "--backend", "numpy", "--no-warm-up", "--log-format", "json",
                         "--metrics-port", str(metrics_port), "--grace", "30")  # fmt: skip
    try:
        _wait_for(lambda: any("listening on" in line for line in lines), what="the server to listen")
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1)
        target = f"127.0.0.1:{port}"
        _wait_for(lambda: health(target) == SERVING, what="SERVING")
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((2, 32, 96, 96)), rng.standard_normal((32, 32, 7, 7))
        with ConvClient(target, timeout=120, data_path="unary") as client, futures.ThreadPoolExecutor(2) as pool:
            run = client.train_kernel(x[:1, :1, :16, :16], x[:1, :1, :14, :14], kernel_size=3, max_steps=10**6, lr=1e-4)
            updates = iter(run)  # kept: dropping an iteration part-way cancels the run
            first = next(updates)
            unary = pool.submit(client.conv2d, x, w, padding=3)
            _wait_for(lambda: _gauge(metrics_port, "convrpc_in_flight_requests", grpc_method="Forward") == 1, what="Forward")
            proc.send_signal(signal.SIGTERM)
            result = run.result()
            y = unary.result(timeout=60)
            _wait_for(lambda: proc.poll() is not None or _refused(target), what="new calls to be refused")
            assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first.step == 1 and result.stop_reason == "cancelled" and result.steps >= 1
    np.testing.assert_allclose(y, get_backend("numpy").conv2d(x, w, padding=3), rtol=1e-10)
    log = [json.loads(line) for line in lines]
    assert any("SIGTERM" in e["message"] for e in log)
    assert {e["rpc"] for e in log if e.get("code") == "OK"} >= {"Forward", "TrainKernel"}


def _refused(target: str) -> bool:
    try:
        with ConvClient(target, timeout=2) as client:
            client.relu(np.ones(1))
    except ConvRpcError as error:
        return error.code is grpc.StatusCode.UNAVAILABLE
    return False
