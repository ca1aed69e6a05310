"""What standard gRPC tooling sees of a server: health (List, Watch, a plaintext port under mTLS),
reflection v1 and v1alpha with the proto's comments, error details, request ids, Prometheus metrics."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import types
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from convrpc import wire
from convrpc.client import ConvClient
from convrpc.core import Backend, numpy_backend
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

from certs import make_ca, make_leaf
from server_fixtures import running_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
RELU = pb.ForwardRequest(op=wire.encode_op("relu"), input=wire.encode_tensor(np.array([-1.0, 2.0], np.float32)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def details_of(error: grpc.RpcError) -> dict:
    """The google.rpc details of a failed call, by message type name."""
    status = rpc_status.from_call(error)
    found = {}
    for any_detail in status.details if status else ():
        for kind in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


def slow_backend(release: threading.Event) -> Backend:
    kernels = types.SimpleNamespace(**{k: getattr(numpy_backend, k) for k in dir(numpy_backend) if not k.startswith("_")})
    kernels.warm_up = lambda progress=None: release.wait(30)  # numba_backend.warm_up(progress) as a test double
    return Backend("slow", kernels)


def test_health_list_names_every_service_and_watch_ends_when_the_server_stops():
    with running_server(backend="numpy", warm_up=False, grace=30) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
            assert {name: s.status for name, s in listed.items()} == {"": SERVING, "convrpc.v1.ConvService": SERVING}
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == SERVING
            stopped = threading.Thread(target=srv.stop)  # 30 s of grace: an open Watch must not use it up
            stopped.start()
            assert [r.status for r in watch] == [NOT_SERVING]  # the stream then ends with OK
            assert watch.code() is grpc.StatusCode.OK
            stopped.join(60)
            assert not stopped.is_alive()


def test_during_warm_up_compute_is_refused_as_health_says_not_serving():
    release = threading.Event()
    from convrpc.server import ConvServer, Settings

    srv = ConvServer(Settings(host="127.0.0.1", port=0, warm_up=True), backend=slow_backend(release)).start()
    try:
        with grpc.insecure_channel(srv.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.ConvServiceStub(channel).Forward(RELU, timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE and "warming up" in refused.value.details()
            assert details_of(refused.value)["RetryInfo"].retry_delay.ToNanoseconds() > 0
            pb_grpc.ConvServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)  # no compute
            release.set()
            assert srv.wait_ready(10)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
            assert pb_grpc.ConvServiceStub(channel).Forward(RELU, timeout=10).output.shape == [2]
        refusals = srv.metrics.registry.get_sample_value(
            "convrpc_refused_total", {"grpc_method": "Forward", "reason": "warming_up"}
        )
        assert refusals == 1
    finally:
        release.set()
        srv.stop(0)


def test_the_plaintext_health_port_answers_probes_under_mutual_tls(tmp_path):
    ca_pem, ca = make_ca(tmp_path, "ca")
    server_pem = make_leaf(tmp_path, "server", ca, server=True)
    port = free_port()
    with running_server(backend="numpy", warm_up=False, tls_cert=server_pem.cert_path, tls_key=server_pem.key_path,
                        tls_client_ca=ca_pem.cert_path, health_port=port) as srv:  # fmt: skip
        assert srv.health_port == port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
            with pytest.raises(grpc.RpcError) as only_health:  # nothing but health in plaintext
                pb_grpc.ConvServiceStub(channel).Forward(RELU, timeout=10)
            assert only_health.value.code() is grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(srv.target) as channel:  # the gRPC port itself stays TLS-only
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        from convrpc import cli

        assert cli.main(["health", "--target", f"127.0.0.1:{port}"]) == 0


def _reflect(channel, service: str, request: reflection_pb2.ServerReflectionRequest):
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([request]), timeout=10))
    return response


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha_serve_the_schema_with_its_comments_under_a_small_message_cap(service):
    with running_server(backend="numpy", warm_up=False, max_message_bytes=2048, max_request_bytes=1024) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            listed = _reflect(channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
            names = {s.name for s in listed.list_services_response.service}
            assert names == {"convrpc.v1.ConvService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                             "grpc.reflection.v1alpha.ServerReflection"}  # fmt: skip
            found = _reflect(channel, service, reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="convrpc.v1.ConvService"))  # fmt: skip
            files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                     for b in found.file_descriptor_response.file_descriptor_proto]  # fmt: skip
            (schema,) = [f for f in files if f.name == "convrpc/v1/conv_service.proto"]
            comments = [loc.leading_comments for loc in schema.source_code_info.location if loc.leading_comments]
            assert any("applies one op" in c for c in comments), comments[:5]
            itself = _reflect(channel, service, reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"))  # fmt: skip
            (described,) = itself.file_descriptor_response.file_descriptor_proto
            assert descriptor_pb2.FileDescriptorProto.FromString(described).package == "grpc.reflection.v1"


def test_errors_carry_bad_request_and_retry_info_and_every_response_a_request_id():
    with running_server(backend="numpy", warm_up=False, max_concurrent_rpcs=1) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.ConvServiceStub(channel)
            _, call = stub.Forward.with_call(RELU, timeout=10)
            made = dict(call.trailing_metadata())["x-request-id"]
            assert len(made) == 16
            _, call = stub.Forward.with_call(RELU, timeout=10, metadata=(("x-request-id", "trace-42"),))
            assert dict(call.trailing_metadata())["x-request-id"] == "trace-42"
            bad = pb.ForwardRequest(op=wire.encode_op("conv2d", stride=0), input=RELU.input)
            with pytest.raises(grpc.RpcError) as invalid:
                stub.Forward(bad, timeout=10, metadata=(("x-request-id", "trace-43"),))
            assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            (violation,) = details_of(invalid.value)["BadRequest"].field_violations
            assert violation.field and violation.field in invalid.value.details()
            assert dict(invalid.value.trailing_metadata())["x-request-id"] == "trace-43"
            # One compute slot: a training run holds it, and the next compute call is refused.
            with ConvClient(srv.target, timeout=60) as client:
                run = client.train_kernel(np.ones((1, 1, 8, 8)), np.ones((1, 1, 6, 6)), kernel_size=3,
                                          max_steps=10**6, lr=1e-9, seed=0)  # fmt: skip
                updates = iter(run)  # kept: dropping an iteration part-way stops the run
                next(updates)
                with pytest.raises(grpc.RpcError) as busy:
                    stub.Forward(RELU, timeout=10)
                run.cancel()
            assert busy.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details_of(busy.value)["RetryInfo"].retry_delay.ToNanoseconds() > 0
            assert "x-request-id" in dict(busy.value.trailing_metadata())
            health = health_pb2_grpc.HealthStub(channel)
            _, call = health.Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
            assert "x-request-id" in dict(call.trailing_metadata())
        assert srv.metrics.registry.get_sample_value("convrpc_refused_total", {"grpc_method": "Forward", "reason": "busy"}) == 1


def test_unauthenticated_calls_say_why_in_an_error_info():
    with running_server(backend="numpy", warm_up=False, auth_tokens="s3cret") as srv:
        with grpc.insecure_channel(srv.target) as channel:
            with pytest.raises(grpc.RpcError) as missing:
                pb_grpc.ConvServiceStub(channel).Forward(RELU, timeout=10)
        assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
        info = details_of(missing.value)["ErrorInfo"]
        assert info.reason == "MISSING_TOKEN" and info.domain == "convrpc.v1"


def test_metrics_follow_the_grpc_ecosystem_names_with_process_and_build_info():
    port = free_port()
    with running_server(backend="numpy", warm_up=False, metrics_port=port) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            pb_grpc.ConvServiceStub(channel).Forward(RELU, timeout=10)
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        labels = 'grpc_method="Forward",grpc_service="convrpc.v1.ConvService",grpc_type="unary"'
        for line in (f"grpc_server_started_total{{{labels}}} 1.0",
                     f'grpc_server_handled_total{{grpc_code="OK",{labels}}} 1.0',
                     f"grpc_server_handling_seconds_count{{{labels}}} 1.0",
                     f"grpc_server_msg_received_total{{{labels}}} 1.0",
                     f"grpc_server_msg_sent_total{{{labels}}} 1.0",
                     'grpc_server_handled_total{grpc_code="OK",grpc_method="Check",grpc_service="grpc.health.v1.Health",'
                     'grpc_type="unary"} 1.0'):  # fmt: skip
            assert line in text.replace(", ", ","), line
        assert 'convrpc_build_info{backend="numpy"' in text and "process_cpu_seconds_total" in text
        assert "python_info" in text
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (Debian: apt-get install prometheus); the names were checked")
        linted = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert linted.returncode == 0 and not linted.stdout.strip() and not linted.stderr.strip(), linted
