"""The side channel: a stream's bytes over a raw socket, byte-identical, with fallback to chunks; strangers refused."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import grpc
import numpy as np
import pytest
from certs import make_ca, make_leaf
from convrpc.client import ConvClient, calls
from convrpc.client.aio import AsyncConvClient
from convrpc.core import get_backend
from convrpc.v1 import conv_service_pb2 as pb
from server_fixtures import running_server
from test_transport import _cases, _same_bytes

REF = get_backend("numpy")
METHOD = "/convrpc.v1.ConvService/"
X = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def srv():
    with running_server(backend="numpy", warm_up=False, stream_idle_timeout=1.0, max_concurrent_rpcs=2) as server:
        yield server


@pytest.fixture()
def no_chunks(monkeypatch):
    """Fail any call whose bytes would travel as gRPC chunks: what passes went over the side channel."""

    def refuse(*args, **kwargs):
        raise AssertionError("the payload went as chunks, not over the side channel")

    monkeypatch.setattr(calls, "stream_messages", refuse)


def _check_ops(client, dtype):
    for op, tensors, options in _cases(dtype):
        want = getattr(REF, op)(*tensors, **options)
        _same_bytes(getattr(client, op)(*tensors, **options), want)
        gy = np.random.default_rng(3).standard_normal(want.shape).astype(dtype)
        for got, ref in zip(getattr(client, f"{op}_backward")(gy, *tensors, **options),
                            getattr(REF, f"{op}_backward")(gy, *tensors, **options)):  # fmt: skip
            assert (got is None) == (ref is None), op
            if ref is not None:
                _same_bytes(got, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_every_op_forward_and_backward_over_the_side_channel_is_byte_identical(srv, no_chunks, dtype):
    with ConvClient(srv.target, timeout=60, data_path="stream") as client:
        _check_ops(client, dtype)
        assert client._core.replicas[0].side_ok is True


def test_the_asyncio_client_uses_the_side_channel_too(srv, no_chunks):
    w = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)

    async def run():
        async with AsyncConvClient(srv.target, timeout=60, data_path="stream") as client:
            return await client.conv2d(X, w, padding=1), client._core.replicas[0].side_ok

    y, used = asyncio.run(run())
    _same_bytes(y, REF.conv2d(X, w, padding=1))
    assert used is True


def test_a_server_with_the_side_channel_off_gets_chunks_and_refuses_a_request_for_it():
    with running_server(backend="numpy", warm_up=False, side_channel=False) as server:
        with ConvClient(server.target, timeout=60, data_path="stream") as client:
            _same_bytes(client.relu(X), np.maximum(X, 0))
            assert client._core.replicas[0].side_ok is False
            client._core.replicas[0].side_ok = True  # as if it had been on: refused, then chunks
            _same_bytes(client.relu(X), np.maximum(X, 0))
            assert client._core.replicas[0].side_ok is False
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                list(_raw_stream(channel)(iter([_side_request(X)])))
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details().startswith("side_channel:") and "setting side_channel" in info.value.details()


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_an_unreachable_side_channel_sends_the_same_call_as_chunks(srv, monkeypatch):
    monkeypatch.setattr(srv.servicer.side, "port", _closed_port())  # offers a port nobody listens on
    with ConvClient(srv.target, timeout=60, data_path="stream") as client:
        for _ in range(2):
            _same_bytes(client.relu(X), np.maximum(X, 0))
        assert client._core.replicas[0].side_ok is False


# -- a hostile client on the side socket -------------------------------------------------------------


def _raw_stream(channel, method="ForwardStream"):
    return channel.stream_stream(METHOD + method, request_serializer=pb.ForwardStreamRequest.SerializeToString,
                                 response_deserializer=pb.ForwardStreamResponse.FromString)  # fmt: skip


def _side_request(x):
    header = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape)
    return pb.ForwardStreamRequest(request=pb.ForwardRequest(op=pb.Op(relu=pb.ReluOptions()), input=header),
                                   side_channel=True)  # fmt: skip


@contextlib.contextmanager
def _offered(server, x=X):
    """A raw side-channel ForwardStream: ``(call, offer)`` once the server offered its token."""
    with grpc.insecure_channel(server.target) as channel:
        call = _raw_stream(channel)(iter([_side_request(x)]), timeout=30)
        try:
            first = next(call)
            assert first.WhichOneof("message") == "side_channel"
            yield call, first.side_channel
        finally:
            call.cancel()


def _dial(offer, header: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", offer.port), timeout=10)
    sock.sendall(header)
    return sock


def _accepted(offer) -> socket.socket:
    """A connection that presented the call's token and right length, and was accepted."""
    sock = _dial(offer, offer.token + X.nbytes.to_bytes(8, "little"))
    assert sock.recv(1) == b"\x01"
    return sock


def _refused(sock) -> bool:
    """Whether the server closed the connection without accepting (no 0x01 byte)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def _serves_others(server):
    with ConvClient(server.target, timeout=30, data_path="unary") as client:
        _same_bytes(client.relu(X), np.maximum(X, 0))
    assert server.servicer.slots._used == 0


def _status(call):
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value.code(), info.value.details()


def test_a_wrong_token_is_refused_and_the_call_keeps_its_own(srv):
    with _offered(srv) as (call, offer):
        wrong = bytes(b ^ 1 for b in offer.token)
        assert _refused(_dial(offer, wrong + X.nbytes.to_bytes(8, "little")))
        sock = _accepted(offer)
        sock.sendall(X.tobytes())
        header = next(call)
        assert header.WhichOneof("message") == "response"
        length = int.from_bytes(sock.recv(8, socket.MSG_WAITALL), "little")
        got = sock.recv(length, socket.MSG_WAITALL)
        sock.close()
        assert got == np.maximum(X, 0).tobytes()
        assert list(call) == [] and call.code() is grpc.StatusCode.OK
        assert _refused(_dial(offer, offer.token + X.nbytes.to_bytes(8, "little")))  # single use
    _serves_others(srv)


def test_a_connection_that_sends_nothing_or_no_token_is_closed_within_the_idle_timeout(srv):
    started = time.monotonic()
    with _offered(srv) as (call, offer):
        silent, partial = _dial(offer), _dial(offer, offer.token[:10])
        _serves_others(srv)
        assert _refused(silent) and _refused(partial)
        assert time.monotonic() - started < 10
        code, details = _status(call)  # the real token never came: the call ends, holding nothing
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "side channel" in details
    _serves_others(srv)


def test_an_oversize_length_is_refused_before_a_payload_byte_is_read(srv):
    with _offered(srv) as (call, offer):
        sock = _dial(offer, offer.token + (1 << 40).to_bytes(8, "little"))
        assert _refused(sock)
        code, details = _status(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("side_channel.length:")
        assert str(X.nbytes) in details
    _serves_others(srv)


def test_a_truncated_payload_fails_the_call_without_taking_a_slot(srv):
    with _offered(srv) as (call, offer):
        sock = _accepted(offer)
        sock.sendall(X.tobytes()[:100])
        sock.close()
        code, details = _status(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "after 100 of" in details
    _serves_others(srv)


def test_a_stalled_payload_loses_its_call_after_the_idle_timeout_holding_no_slot(srv):
    with _offered(srv) as (call, offer):
        sock = _accepted(offer)
        sock.sendall(X.tobytes()[:100])
        _serves_others(srv)
        code, details = _status(call)
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_timeout" in details
        assert _refused(sock)  # the server closed its end
    _serves_others(srv)


def test_a_cancelled_call_closes_its_side_channel_and_its_token(srv):
    with _offered(srv) as (call, offer):
        sock = _accepted(offer)
        call.cancel()
        sock.settimeout(10)
        assert _refused(sock)
    with _offered(srv) as (call, offer):
        call.cancel()
        time.sleep(0.2)
        assert _refused(_dial(offer, offer.token + X.nbytes.to_bytes(8, "little")))
    _serves_others(srv)


# -- TLS -------------------------------------------------------------------------------------------


def test_under_tls_the_side_channel_speaks_tls_verified_with_the_channels_roots(tmp_path, no_chunks):
    ca_pem, ca = make_ca(tmp_path)
    cert = make_leaf(tmp_path, "server", ca, server=True)
    with running_server(backend="numpy", warm_up=False, tls_cert=cert.cert_path, tls_key=cert.key_path) as server:
        with ConvClient(server.target, timeout=60, data_path="stream", root_certificates=ca_pem.cert) as client:
            _same_bytes(client.relu(X), np.maximum(X, 0))
            assert client._core.replicas[0].side_ok is True
        # A plaintext dialer gets nothing: the socket wants a TLS handshake first.
        plain = socket.create_connection(("127.0.0.1", server.servicer.side.port), timeout=10)
        plain.sendall(bytes(40))
        assert _refused(plain)
        # A TLS dialer that does not trust the server's certificate cannot connect at all.
        with pytest.raises(ssl.SSLError):
            with socket.create_connection(("127.0.0.1", server.servicer.side.port), timeout=10) as raw:
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_get_server_info_reports_the_side_channel_port(srv):
    with ConvClient(srv.target, timeout=30) as client:
        stub = client._methods[0]["GetServerInfo"]
        assert stub(pb.GetServerInfoRequest(), timeout=10).side_channel_port == srv.servicer.side.port


BIG = np.random.default_rng(9).standard_normal((1, 1, 1024, 1280)).astype(np.float32)  # past MIN_POOLED_BYTES


def test_the_server_computes_a_streams_results_into_its_warm_buffers(srv, no_chunks, monkeypatch):
    handed = []
    take = srv.servicer.buffers.empty
    monkeypatch.setattr(srv.servicer.buffers, "empty", lambda shape, dtype: handed.append(take(shape, dtype)) or handed[-1])
    with ConvClient(srv.target, timeout=60, data_path="stream") as client:
        y = client.relu(BIG)
    _same_bytes(y, np.maximum(BIG, 0))
    assert [a.shape for a in handed] == [BIG.shape, BIG.shape]  # the payload's array, then the result's
    received, computed = handed
    _same_bytes(received, BIG)
    _same_bytes(computed, y)


def test_stream_results_the_caller_holds_are_never_received_into_and_freed_ones_are_reused(srv, no_chunks):
    with ConvClient(srv.target, timeout=60, data_path="stream") as client:
        held = client.relu(BIG)
        other = client.relu(-BIG)
        assert not np.shares_memory(held, other)
        _same_bytes(held, np.maximum(BIG, 0))
        warm = id(other.base)  # (no reference: it would keep the buffer from being reused)
        assert warm in [id(b) for b in client._core.buffers._buffers]  # warm memory the client keeps
        del other
        again = client.relu(BIG)
        assert id(again.base) == warm  # received into again once freed, not into fresh pages
        _same_bytes(again, np.maximum(BIG, 0))
        _same_bytes(held, np.maximum(BIG, 0))
    with ConvClient(srv.target, timeout=60, data_path="stream", stream_buffer_bytes=0) as client:
        assert client.relu(BIG).base is None  # no warm memory kept: a fresh array
