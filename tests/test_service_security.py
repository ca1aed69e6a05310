"""TLS, mutual TLS and bearer tokens, on unary and streaming RPCs, with health and reflection open to probes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from certs import make_ca, make_leaf
from convrpc import cli
from convrpc.client import ConvClient, ConvRpcError
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc
from server_fixtures import running_server

X = np.array([[[[-1.0, 2.0], [3.0, -4.0]]]])
SERVER = dict(backend="numpy", warm_up=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca_pem, ca = make_ca(directory, "ca")
    rogue_pem, rogue = make_ca(directory, "rogue-ca")
    return {
        "ca": ca_pem,
        "rogue_ca": rogue_pem,
        "server": make_leaf(directory, "server", ca, server=True),
        "client": make_leaf(directory, "client", ca, server=False),
        "rogue_client": make_leaf(directory, "rogue-client", rogue, server=False),
    }


def exercise(target, **client_kwargs):
    """One unary call and one training stream; returns the status code (OK or the first failure's)."""
    try:
        with ConvClient(target, timeout=10, **client_kwargs) as client:
            np.testing.assert_array_equal(client.relu(X), np.maximum(X, 0))
            result = client.train_kernel(X, X, kernel_size=1, max_steps=3, lr=0.1).result()
            assert result.steps == 3
        return grpc.StatusCode.OK
    except ConvRpcError as error:
        return error.code


def stream_code(target, **client_kwargs):
    """The status of a training stream alone (so streaming is checked even when unary fails first)."""
    try:
        with ConvClient(target, timeout=10, **client_kwargs) as client:
            client.train_kernel(X, X, kernel_size=1, max_steps=3, lr=0.1).result()
        return grpc.StatusCode.OK
    except ConvRpcError as error:
        return error.code


def probe_health(target, credentials=None):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_tls_serves_clients_that_trust_its_ca_and_no_one_else(pki):
    server = pki["server"]
    with running_server(tls_cert=server.cert_path, tls_key=server.key_path, **SERVER) as srv:
        assert exercise(srv.target, root_certificates=pki["ca"].cert) is grpc.StatusCode.OK
        assert exercise(srv.target) is grpc.StatusCode.UNAVAILABLE  # plaintext client
        assert stream_code(srv.target) is grpc.StatusCode.UNAVAILABLE
        assert exercise(srv.target, root_certificates=pki["rogue_ca"].cert) is grpc.StatusCode.UNAVAILABLE
        assert probe_health(srv.target, grpc.ssl_channel_credentials(pki["ca"].cert)) == 1  # SERVING
        assert cli.main(["health", "--target", srv.target, "--tls-ca", pki["ca"].cert_path]) == 0
        assert cli.main(["health", "--target", srv.target]) == 1


def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(pki):
    server, client = pki["server"], pki["client"]
    settings = dict(tls_cert=server.cert_path, tls_key=server.key_path, tls_client_ca=pki["ca"].cert_path, **SERVER)
    with running_server(**settings) as srv:
        ca = pki["ca"].cert
        ok = exercise(srv.target, root_certificates=ca, private_key=client.key, certificate_chain=client.cert)
        assert ok is grpc.StatusCode.OK
        assert exercise(srv.target, root_certificates=ca) is grpc.StatusCode.UNAVAILABLE
        assert stream_code(srv.target, root_certificates=ca) is grpc.StatusCode.UNAVAILABLE
        rogue = pki["rogue_client"]
        assert exercise(srv.target, root_certificates=ca, private_key=rogue.key, certificate_chain=rogue.cert) is (
            grpc.StatusCode.UNAVAILABLE
        )
        assert cli.main(["health", "--target", srv.target, "--tls-ca", pki["ca"].cert_path,
                         "--tls-cert", client.cert_path, "--tls-key", client.key_path]) == 0  # fmt: skip


def test_bearer_tokens_guard_every_conv_rpc_but_leave_health_and_reflection_open(tmp_path, capsys):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\nalpha-token-1\n\nbeta-token-2\n")
    with running_server(auth_tokens_file=str(tokens), auth_tokens="gamma-3", **SERVER) as srv:
        for token in ("alpha-token-1", "beta-token-2", "gamma-3"):
            assert exercise(srv.target, token=token) is grpc.StatusCode.OK
        for token in (None, "alpha-token-2", "alpha-token-1x", "# operators"):
            assert exercise(srv.target, token=token) is grpc.StatusCode.UNAUTHENTICATED, token
            assert stream_code(srv.target, token=token) is grpc.StatusCode.UNAUTHENTICATED, token
        with ConvClient(srv.target, timeout=10) as client:
            with pytest.raises(ConvRpcError, match="missing bearer token"):
                client.server_info()
        with grpc.insecure_channel(srv.target) as channel:  # a token under another scheme
            stub = pb_grpc.ConvServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=(("authorization", "Basic alpha-token-1"),))
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            assert "convrpc.v1.ConvService" in {s.name for r in replies for s in r.list_services_response.service}
        assert probe_health(srv.target) == 1  # SERVING, no token needed
        assert cli.main(["info", "--target", srv.target, "--token", "beta-token-2"]) == 0
        assert "\nbackend            numpy\n" in capsys.readouterr().out
        refused = srv.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_type": "unary", "grpc_service": "convrpc.v1.ConvService", "grpc_method": "Forward",
             "grpc_code": "UNAUTHENTICATED"},
        )
        assert refused == 4


def test_tls_and_tokens_together(pki):
    server = pki["server"]
    with running_server(tls_cert=server.cert_path, tls_key=server.key_path, auth_tokens="s3cret", **SERVER) as srv:
        ca = pki["ca"].cert
        assert exercise(srv.target, root_certificates=ca, token="s3cret") is grpc.StatusCode.OK
        assert exercise(srv.target, root_certificates=ca, token="guess") is grpc.StatusCode.UNAUTHENTICATED
        assert exercise(srv.target, token="s3cret") is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("data_path,rpcs", [("stream", ("ForwardStream",)),
                                            ("shm", ("OpenSharedMemorySession", "Forward"))])  # fmt: skip
def test_bearer_tokens_guard_the_bulk_data_paths(data_path, rpcs):
    big = np.random.default_rng(0).standard_normal((1, 1, 200, 200))  # 320 KB: past the unary threshold
    with running_server(auth_tokens="s3cret", **SERVER) as srv:
        with ConvClient(srv.target, timeout=10, token="s3cret", data_path=data_path) as client:
            np.testing.assert_array_equal(client.relu(big), np.maximum(big, 0))
        for rpc in rpcs:  # the bulk path carried it, past the auth interceptor
            served = srv.metrics.registry.get_sample_value("grpc_server_handled_total", {
                "grpc_type": "bidi_stream" if rpc.endswith("Stream") else "unary",
                "grpc_service": "convrpc.v1.ConvService", "grpc_method": rpc, "grpc_code": "OK"})  # fmt: skip
            assert served == 1
        with ConvClient(srv.target, timeout=10, token="wrong", data_path=data_path) as client:
            with pytest.raises(ConvRpcError) as info:
                client.relu(big)
            assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
