"""The bulk data paths: chunked streams and shared memory give the unary path's bytes, refuse bad input, leak nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
from convrpc import chunks, shm
from convrpc.client import ConvClient, ConvRpcError
from convrpc.client.aio import AsyncConvClient
from convrpc.client.calls import CallCore, is_local
from convrpc.core import get_backend
from convrpc.v1 import conv_service_pb2 as pb
from server_fixtures import running_server
from test_server_e2e import BAD_CALLS

pytestmark = pytest.mark.skipif(not shm.AVAILABLE, reason="needs POSIX shared memory")

REF = get_backend("numpy")
CHUNK = 1000  # not a multiple of any itemsize: chunks split elements and span tensor boundaries
METHOD = "/convrpc.v1.ConvService/"


def _ours() -> set[str]:
    """convrpc's names in /dev/shm (probe 'cvp...', session regions 'cv<10 hex><i|o>...')."""
    return {n for n in shm.names_with_prefix("cv")}


@pytest.fixture(scope="module", autouse=True)
def no_region_leaks():
    before = _ours()
    yield
    deadline = time.monotonic() + 5
    while _ours() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ours() - before == set(), "shared-memory regions left behind"


@pytest.fixture(scope="module")
def srv():
    with running_server(backend="numpy", chunk_bytes=777, warm_up=False) as server:
        yield server


@pytest.fixture(scope="module")
def clients(srv):
    with (
        ConvClient(srv.target, timeout=60, data_path="unary") as unary,
        ConvClient(srv.target, timeout=60, data_path="stream", chunk_bytes=CHUNK) as stream,
        ConvClient(srv.target, timeout=60, data_path="stream", chunk_bytes=CHUNK, side_channel=False) as chunked,
        ConvClient(srv.target, timeout=60, data_path="shm") as shared,
    ):
        yield {"unary": unary, "stream": stream, "chunks": chunked, "shm": shared}


def _cases(dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 9, 8)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 2)).astype(dtype)
    wt = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    return [
        ("conv2d", (x, w, b), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)),
        ("conv_transpose2d", (x, wt, b[:3]), dict(stride=2, padding=1, output_padding=1)),
        ("max_pool2d", (x,), dict(kernel_size=3, stride=2, padding=1)),
        ("avg_pool2d", (x,), dict(kernel_size=(2, 3), padding=(1, 1))),
        ("relu", (x,), {}),
    ]


def _same_bytes(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("path", ["stream", "chunks", "shm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_op_forward_and_backward_is_byte_identical_to_unary(clients, path, dtype):
    for op, tensors, options in _cases(dtype):
        want = getattr(clients["unary"], op)(*tensors, **options)
        _same_bytes(want, getattr(REF, op)(*tensors, **options))  # the unary path itself is right
        got = getattr(clients[path], op)(*tensors, **options)
        _same_bytes(got, want)
        assert got.flags.writeable
        gy = np.random.default_rng(3).standard_normal(want.shape).astype(dtype)
        want_grads = getattr(clients["unary"], f"{op}_backward")(gy, *tensors, **options)
        got_grads = getattr(clients[path], f"{op}_backward")(gy, *tensors, **options)
        for got_g, want_g in zip(got_grads, want_grads):
            assert (got_g is None) == (want_g is None), op
            if want_g is not None:
                _same_bytes(got_g, want_g)


@pytest.mark.parametrize("op,kwargs,field", BAD_CALLS, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_calls_fail_the_same_way_on_every_path(clients, op, kwargs, field):
    for path, client in clients.items():
        with pytest.raises(ConvRpcError) as info:
            getattr(client, op)(**kwargs)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, path
        assert field in info.value.message, (path, info.value.message)


def test_auto_picks_shared_memory_for_a_local_server_and_unary_for_small_requests(srv):
    x = np.random.default_rng(0).standard_normal((4, 65, 64)).astype(np.float32)  # just over 64 KiB
    with ConvClient(srv.target, timeout=60) as client:
        _same_bytes(client.relu(np.ones((2, 2))), np.ones((2, 2)))
        assert client._core.replicas[0].session is None  # small: the unary RPC, no session opened
        _same_bytes(client.relu(x), np.maximum(x, 0))
        assert client._core.replicas[0].session is not None


def test_auto_falls_back_to_streams_when_the_server_refuses_shared_memory():
    x = np.random.default_rng(0).standard_normal((8, 64, 64)).astype(np.float32)
    with running_server(backend="numpy", shared_memory=False, warm_up=False) as server:
        with ConvClient(server.target, timeout=60) as client:
            _same_bytes(client.relu(x), np.maximum(x, 0))
            replica = client._core.replicas[0]
            assert not replica.shm_ok and replica.session is None and replica.stream_ok
        with ConvClient(server.target, timeout=60, data_path="shm") as client:
            with pytest.raises(ConvRpcError) as info:
                client.relu(x)
            assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
            assert "shared_memory" in info.value.message


def test_an_output_larger_than_the_offered_span_comes_in_a_server_region_the_client_unlinks(srv, monkeypatch):
    from convrpc.server.shared_memory import _Request

    created = []
    new_region = _Request._new_region
    monkeypatch.setattr(_Request, "_new_region", lambda self, *a: created.append(1) or new_region(self, *a))
    x = np.random.default_rng(4).standard_normal((1, 2, 32, 32))  # 16 KiB in, 1.5 MiB out: over the 1 MiB region
    w = np.random.default_rng(5).standard_normal((2, 3, 8, 8))
    with ConvClient(srv.target, timeout=60, data_path="shm") as client:
        for _ in range(2):  # the second call offers the larger span it learnt it needs
            y = client.conv_transpose2d(x, w, stride=8)
            _same_bytes(y, REF.conv_transpose2d(x, w, stride=8))
            prefix = client._core.replicas[0].session.prefix
            assert shm.names_with_prefix(prefix + "o") == []  # claimed, unlinked at once
            y[...] = 0  # results are ordinary writable arrays, even when they view a claimed region
    assert created == [1]  # a server region the first time only


def test_a_full_dev_shm_sends_the_call_over_the_network_instead(srv, monkeypatch):
    def full(fd, size):
        raise OSError(28, "No space left on device")

    stream = CallCore._streamed
    x = np.random.default_rng(6).standard_normal((3, 100, 100))
    with ConvClient(srv.target, timeout=60) as client:
        client.relu(x)  # a session and a pooled region, made while there is room
        monkeypatch.setattr(shm, "reserve", full)
        big = np.random.default_rng(6).standard_normal((3, 400, 400))  # needs a new region: none can be made
        streamed = []
        monkeypatch.setattr(CallCore, "_streamed", lambda self, *a: streamed.append(1) or stream(self, *a))
        _same_bytes(client.relu(big), np.maximum(big, 0))
        assert streamed == [1] and client._core.replicas[0].shm_ok  # only this call went elsewhere
    with ConvClient(srv.target, timeout=60, data_path="shm") as client, pytest.raises(ConvRpcError) as info:
        client.relu(x)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "No space" in info.value.message


def test_a_region_whose_call_timed_out_is_never_reused(srv, monkeypatch):
    from convrpc.server.servicer import ConvService

    compute = ConvService._compute
    monkeypatch.setattr(ConvService, "_compute", lambda self, *a: time.sleep(0.5) or compute(self, *a))
    x = np.full((3, 100, 100), -1.0)
    with ConvClient(srv.target, timeout=60, data_path="shm") as client:
        with pytest.raises(ConvRpcError) as info:
            client.relu(x, timeout=0.2)  # the server goes on and writes its result 0.3 s later
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        session = client._core.replicas[0].session
        assert session._idle == [] and shm.names_with_prefix(session.prefix) == []
        monkeypatch.setattr(ConvService, "_compute", compute)
        y = np.arange(30000.0).reshape(3, 100, 100)
        for _ in range(3):  # while the late write lands, calls use a fresh region
            _same_bytes(client.relu(y), y)
            time.sleep(0.2)


def test_an_expired_session_is_reopened_transparently(srv, clients):
    client = clients["shm"]
    x = np.arange(-8.0, 8.0).reshape(2, 8)
    client.relu(x)
    old = client._core.replicas[0].session
    srv.servicer.sessions.close_session(old.id)  # as a server restart or the idle TTL would
    _same_bytes(client.relu(x), np.maximum(x, 0))
    assert client._core.replicas[0].session is not old


def test_asyncio_client_streams_and_shares_memory(srv):
    x = np.random.default_rng(2).standard_normal((3, 2, 17, 19))
    w = np.random.default_rng(3).standard_normal((4, 2, 3, 3))

    async def run(path):
        async with AsyncConvClient(srv.target, timeout=60, data_path=path, chunk_bytes=CHUNK) as client:
            y = await client.conv2d(x, w, padding=1)
            grads = await client.conv2d_backward(np.ones_like(y), x, w, padding=1)
            return y, grads

    for path in ("stream", "shm"):
        y, grads = asyncio.run(run(path))
        _same_bytes(y, REF.conv2d(x, w, padding=1))
        for got, want in zip(grads, REF.conv2d_backward(np.ones_like(y), x, w, padding=1)):
            assert (got is None) == (want is None)
            if want is not None:
                _same_bytes(got, want)


@pytest.mark.parametrize("target,local", [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:5", True), ("unix:/tmp/s", True),
    ("ipv4:127.0.0.1:9", True), ("10.0.0.2:50051", False), ("dns:///svc:50051", False), ("example.com", False),
])  # fmt: skip
def test_is_local(target, local):
    assert is_local(target) is local


# -- malformed chunk streams ----------------------------------------------------------------------


def _stream_call(srv, messages, method="ForwardStream"):
    response_type = pb.ForwardStreamResponse if method == "ForwardStream" else pb.BackwardStreamResponse
    with grpc.insecure_channel(srv.target) as channel:
        call = channel.stream_stream(
            METHOD + method,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        return list(call(iter(messages), timeout=30))


def _relu_header(shape=(250,), dtype=pb.DTYPE_FLOAT32):
    return pb.ForwardStreamRequest(
        request=pb.ForwardRequest(op=pb.Op(relu=pb.ReluOptions()), input=pb.Tensor(dtype=dtype, shape=shape))
    )


def _chunk(offset, data):
    return pb.ForwardStreamRequest(chunk=pb.TensorChunk(offset=offset, data=data))


def _refusal(srv, messages, method="ForwardStream") -> ConvRpcError:
    with pytest.raises(grpc.RpcError) as info:
        _stream_call(srv, messages, method)
    return ConvRpcError.from_rpc_error(info.value)


PAYLOAD = np.linspace(-1, 1, 250, dtype=np.float32).tobytes()  # 1000 bytes


def test_a_well_formed_raw_stream_is_answered_in_chunks(srv):
    replies = _stream_call(srv, [_relu_header(), _chunk(0, PAYLOAD[:333]), _chunk(333, PAYLOAD[333:])])
    assert replies[0].WhichOneof("message") == "response"
    output = replies[0].response.output
    assert list(output.shape) == [250] and output.WhichOneof("storage") is None  # its bytes follow as chunks
    assert [r.chunk.offset for r in replies[1:]] == [0, 777]  # the server's chunk_bytes
    body = b"".join(r.chunk.data for r in replies[1:])
    assert body == np.maximum(np.frombuffer(PAYLOAD, np.float32), 0).tobytes()


@pytest.mark.parametrize("messages,code,field,words", [
    ([_relu_header(), _chunk(0, PAYLOAD[:600])], "INVALID_ARGUMENT", "chunk", "ended after 600 of the 1000 bytes"),
    ([_relu_header()], "INVALID_ARGUMENT", "chunk", "ended after 0 of the 1000 bytes"),
    ([_relu_header(), _chunk(0, PAYLOAD[:400]), _chunk(500, PAYLOAD[500:])], "INVALID_ARGUMENT", "chunk.offset",
     "expected 400"),
    ([_relu_header(), _chunk(0, PAYLOAD[:400]), _chunk(0, PAYLOAD[:400])], "INVALID_ARGUMENT", "chunk.offset",
     "expected 400"),
    ([_relu_header(), _chunk(0, PAYLOAD), _chunk(1000, b"x")], "INVALID_ARGUMENT", "chunk.data", "more than the 1000"),
    ([_relu_header(), _chunk(0, PAYLOAD + b"extra")], "INVALID_ARGUMENT", "chunk.data", "more than the 1000"),
    ([_relu_header(), _chunk(0, b"")], "INVALID_ARGUMENT", "chunk.data", "must not be empty"),
    ([_chunk(0, PAYLOAD)], "INVALID_ARGUMENT", "request", "first message"),
    ([], "INVALID_ARGUMENT", "request", "first message"),
    ([_relu_header(), _relu_header()], "INVALID_ARGUMENT", "request", "only the first"),
    ([_relu_header(), pb.ForwardStreamRequest()], "INVALID_ARGUMENT", "chunk", "neither"),
    ([_relu_header(shape=(2**40,))], "RESOURCE_EXHAUSTED", "input.shape", "cap"),
    ([_relu_header(shape=(2**40, 2**40))], "INVALID_ARGUMENT", "input.shape", "overflows"),
    ([_relu_header(shape=(4, -1))], "INVALID_ARGUMENT", "input.shape", ">= 0"),
    ([_relu_header(dtype=pb.DTYPE_UNSPECIFIED)], "INVALID_ARGUMENT", "input.dtype", "DTYPE_FLOAT32"),
])  # fmt: skip
def test_malformed_streams_are_refused_with_a_clear_status(srv, messages, code, field, words):
    error = _refusal(srv, messages)
    assert error.code is getattr(grpc.StatusCode, code), error
    assert error.message.startswith(field + ":") and words in error.message, error


def test_backward_stream_refuses_a_missing_grad_output_and_extra_tensors(srv):
    spec = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4])
    request = pb.BackwardRequest(op=pb.Op(relu=pb.ReluOptions()), input=spec)
    error = _refusal(srv, [pb.BackwardStreamRequest(request=request)], "BackwardStream")
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.message.startswith("grad_output: is required")
    request = pb.BackwardRequest(op=pb.Op(relu=pb.ReluOptions()), grad_output=spec, input=spec, weight=spec)
    error = _refusal(srv, [pb.BackwardStreamRequest(request=request)], "BackwardStream")
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and "relu takes no weight" in error.message


# -- shared memory refusals -----------------------------------------------------------------------


def _open_session(srv):
    from convrpc.client.shared_memory import probe_region

    with grpc.insecure_channel(srv.target) as channel, probe_region() as (name, nonce):
        call = channel.unary_unary(
            METHOD + "OpenSharedMemorySession",
            request_serializer=pb.OpenSharedMemorySessionRequest.SerializeToString,
            response_deserializer=pb.OpenSharedMemorySessionResponse.FromString,
        )
        return call(pb.OpenSharedMemorySessionRequest(probe_region=name, probe_nonce=nonce), timeout=30)


def _shared_forward(srv, request) -> pb.ForwardResponse:
    with grpc.insecure_channel(srv.target) as channel:
        call = channel.unary_unary(
            METHOD + "Forward",
            request_serializer=pb.ForwardRequest.SerializeToString,
            response_deserializer=pb.ForwardResponse.FromString,
        )
        return call(request, timeout=30)


def _shared_refusal(srv, request) -> ConvRpcError:
    with pytest.raises(grpc.RpcError) as info:
        _shared_forward(srv, request)
    return ConvRpcError.from_rpc_error(info.value)


def _relu_shared(session_id, region, offset=0, shape=(4,)):
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=shape, shared=pb.SharedSpan(region=region, offset=offset))
    return pb.ForwardRequest(
        op=pb.Op(relu=pb.ReluOptions()), input=tensor, shared_memory=pb.SharedMemoryContext(session_id=session_id)
    )


@pytest.fixture()
def two_sessions(srv):
    """Two sessions, and an input region of the first holding [-2, -1, 1, 2]."""
    first, second = _open_session(srv), _open_session(srv)
    name = f"{first.region_prefix}i{'ab' * 8}"
    region = shm.create(name, 4096)
    np.frombuffer(region, np.float64, 4)[:] = [-2, -1, 1, 2]
    try:
        yield first, second, name
    finally:
        region.close()
        shm.unlink(name)
        for session in (first, second):
            srv.servicer.sessions.close_session(session.session_id)


def test_a_raw_shared_request_works_and_its_output_region_is_handed_over(srv, two_sessions):
    first, _, name = two_sessions
    reply = _shared_forward(srv, _relu_shared(first.session_id, name))
    out = reply.output.shared
    assert out.region.startswith(first.region_prefix + "o") and shm.exists(out.region)
    region = shm.attach(out.region, writable=False)
    shm.unlink(out.region)  # the client's job once mapped
    assert np.frombuffer(region, np.float64, 4, out.offset).tolist() == [0, 0, 1, 2]
    # Offered a span of the client's own region, the server writes the output there instead.
    request = _relu_shared(first.session_id, name)
    request.shared_memory.output_buffer.CopyFrom(pb.SharedBuffer(region=name, offset=64, size=64))
    out = _shared_forward(srv, request).output.shared
    assert (out.region, out.offset) == (name, 64)


def test_a_server_without_room_for_an_output_region_says_so(srv, two_sessions, monkeypatch):
    first, _, name = two_sessions
    monkeypatch.setattr(shm, "reserve", lambda fd, size: (_ for _ in ()).throw(OSError(28, "No space left")))
    error = _shared_refusal(srv, _relu_shared(first.session_id, name))
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message.startswith("shared_memory.output_buffer: no room")


def test_shared_requests_for_foreign_missing_or_short_regions_are_refused(srv, two_sessions):
    first, second, name = two_sessions
    mine, theirs = first.session_id, second.session_id
    region, shared, session = "input.shared.region", "input.shared.offset", "shared_memory.session_id"
    cases = [
        (_relu_shared(theirs, name), "PERMISSION_DENIED", region, "does not belong"),
        (_relu_shared(mine, "psm_secret"), "PERMISSION_DENIED", region, "does not belong"),
        (_relu_shared(mine, f"{first.region_prefix}i{'cd' * 8}"), "NOT_FOUND", region, "no "),
        (_relu_shared("0" * 32, name), "FAILED_PRECONDITION", session, "unknown"),
        (_relu_shared(mine, name, offset=4096 - 16), "INVALID_ARGUMENT", shared, "past the end"),
        (_relu_shared(mine, name, offset=4), "INVALID_ARGUMENT", shared, "multiple of 8"),
        (_relu_shared(mine, name, shape=(2**40,)), "RESOURCE_EXHAUSTED", "input.shape", "cap"),
    ]
    request = _relu_shared(first.session_id, name)
    request.shared_memory.output_buffer.CopyFrom(
        pb.SharedBuffer(region=f"{second.region_prefix}i{'ef' * 8}", offset=0, size=64)
    )
    cases.append((request, "PERMISSION_DENIED", "shared_memory.output_buffer.region", "does not belong"))
    for request, code, field, words in cases:
        error = _shared_refusal(srv, request)
        assert error.code is getattr(grpc.StatusCode, code), (field, error)
        assert error.message.startswith(field + ":") and words in error.message, error


def test_a_session_needs_a_probe_the_server_can_read(srv):
    with grpc.insecure_channel(srv.target) as channel:
        call = channel.unary_unary(
            METHOD + "OpenSharedMemorySession",
            request_serializer=pb.OpenSharedMemorySessionRequest.SerializeToString,
            response_deserializer=pb.OpenSharedMemorySessionResponse.FromString,
        )
        for request, code in [
            (
                pb.OpenSharedMemorySessionRequest(probe_region="cvp" + "0" * 24, probe_nonce=bytes(32)),
                "FAILED_PRECONDITION",
            ),
            (
                pb.OpenSharedMemorySessionRequest(probe_region="../etc/passwd", probe_nonce=bytes(32)),
                "INVALID_ARGUMENT",
            ),
            (
                pb.OpenSharedMemorySessionRequest(probe_region="cvp" + "0" * 24, probe_nonce=b"short"),
                "INVALID_ARGUMENT",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() is getattr(grpc.StatusCode, code), info.value.details()
        from convrpc.client.shared_memory import probe_region

        with probe_region() as (name, _), pytest.raises(grpc.RpcError) as info:
            call(pb.OpenSharedMemorySessionRequest(probe_region=name, probe_nonce=bytes(32)), timeout=30)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "nonce" in info.value.details()


# -- cleanup --------------------------------------------------------------------------------------


def test_unclaimed_outputs_are_swept_after_the_ttl_and_on_close():
    with running_server(backend="numpy", shm_output_ttl=0.2, warm_up=False) as server:
        session = _open_session(server)
        name = f"{session.region_prefix}i{'12' * 8}"
        region = shm.create(name, 64)
        try:
            abandoned = _shared_forward(server, _relu_shared(session.session_id, name)).output.shared.region
            assert shm.exists(abandoned)
            deadline = time.monotonic() + 10
            while shm.exists(abandoned) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not shm.exists(abandoned), "the sweeper left an abandoned output region"
            assert shm.exists(name), "the server must never unlink a client's region"
            kept = _shared_forward(server, _relu_shared(session.session_id, name)).output.shared.region
        finally:
            region.close()
            shm.unlink(name)
    assert not shm.exists(kept), "stopping the server must unlink its unclaimed outputs"


_DYING_CLIENT = """
import os, sys, numpy as np
from convrpc.client import ConvClient
client = ConvClient(sys.argv[1], data_path="shm")
client.relu(np.ones(100_000))
print(client._core.replicas[0].session.prefix, flush=True)
if sys.argv[2] == "die":
    os._exit(1)
client.close()
"""


@pytest.mark.parametrize("ending", ["die", "close"])
def test_a_client_process_leaves_no_region_and_no_tracker_warning(srv, ending):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DYING_CLIENT), srv.target, ending],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    prefix = done.stdout.strip()
    assert prefix.startswith("cv"), done.stderr
    deadline = time.monotonic() + 10  # after a crash the resource tracker unlinks the client's regions
    while shm.names_with_prefix(prefix + "i") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shm.names_with_prefix(prefix) == []
    if ending == "close":
        assert "leaked" not in done.stderr and "resource_tracker" not in done.stderr, done.stderr


# -- the codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 300, 2**31, 2**33 + 5, 2**62])
def test_hand_encoded_chunks_are_exactly_protobufs_encoding_and_decode_without_copying(offset):
    data = bytes(range(256)) * 3
    encoded = chunks.encode_chunk(offset, memoryview(data))
    assert encoded == pb.ForwardStreamRequest(chunk=pb.TensorChunk(offset=offset, data=data)).SerializeToString()
    got_offset, view = chunks.decoder(pb.ForwardStreamRequest)(encoded)
    assert got_offset == offset and isinstance(view, memoryview) and view.tobytes() == data
    # Any other valid encoding (fields reordered, repeated) is parsed by protobuf, with its semantics.
    inner = b"\x12\x03abc" + b"\x08\x05" + b"\x12\x01z"  # data, offset, data again: the last one wins
    reordered = b"\x12" + bytes([len(inner)]) + inner
    message = chunks.decoder(pb.ForwardStreamRequest)(reordered)
    assert (message.chunk.offset, message.chunk.data) == (5, b"z")


def test_the_assembler_has_no_32_bit_limits():
    # 5 GiB declared: allocated lazily, never touched, so this costs no memory.
    spec = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[5, 2**28])
    assembler = chunks.PayloadAssembler([("input", spec)])
    assert assembler.total == 5 * 2**30 and assembler.arrays["input"].nbytes == 5 * 2**30
    assembler.add(0, b"\x00" * 8)
    with pytest.raises(Exception, match="expected 8"):
        assembler.add(2**32 + 8, b"\x00")
    with pytest.raises(Exception, match=f"after 8 of the {5 * 2**30} bytes"):
        assembler.finish()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CONVRPC_TEST_HUGE") != "1", reason="needs ~16 GB of RAM: set CONVRPC_TEST_HUGE=1")
@pytest.mark.parametrize("path", ["stream", "shm"])
def test_a_tensor_over_4_gib_round_trips(path):
    n = (4 * 2**30 + 4096) // 4  # float32 elements: just over 4 GiB, past any 32-bit length
    step = 2**24  # one marked element per 64 MiB keeps the input's pages mostly untouched (no memory)
    with (
        running_server(backend="numpy", max_elements=n, warm_up=False) as server,
        ConvClient(server.target, timeout=1800, data_path=path) as client,
    ):
        x = np.zeros(n, np.float32)
        x[::step] = -1
        x[1::step] = 2
        x[-1] = 3
        y = client.relu(x)
        del x
        assert y.shape == (n,) and y.dtype == np.float32
        marked = np.zeros(n, bool)
        marked[1::step] = True
        assert np.all(y[1::step] == 2) and y[-1] == 3 and np.count_nonzero(y) == np.count_nonzero(marked) + 1
