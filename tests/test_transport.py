"""The bulk data paths: chunked streams and shared memory give the unary path's bytes, refuse bad input, leak nothing."""

from __future__ import annotations

import asyncio
import gc
import mmap
import os
import socket
import subprocess
import sys
import textwrap
import time

import grpc
import ml_dtypes
import numpy as np
import pytest
from convrpc import chunks, shm
from convrpc.client import ConvClient, ConvRpcError
from convrpc.client.aio import AsyncConvClient
from convrpc.client.calls import CallCore, is_local
from convrpc.core import get_backend
from convrpc.v1 import conv_service_pb2 as pb
from server_fixtures import RawSession, memfd, running_server
from test_server_e2e import BAD_CALLS

pytestmark = pytest.mark.skipif(not shm.AVAILABLE, reason="needs Linux memfds and fd passing")

REF = get_backend("numpy")
CHUNK = 1000  # not a multiple of any itemsize: chunks split elements and span tensor boundaries
METHOD = "/convrpc.v1.ConvService/"


def _wait_no_sessions(server, seconds: float = 10) -> int:
    deadline = time.monotonic() + seconds
    while server.servicer.sessions.session_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.servicer.sessions.session_count()


@pytest.fixture(scope="module")
def srv():
    with running_server(backend="numpy", chunk_bytes=777, warm_up=False) as server:
        yield server
        assert _wait_no_sessions(server) == 0, "shared-memory sessions left behind"


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_shared_memory_results_are_computed_straight_into_the_clients_span(server, dtype):
    """On the numba backend every op's output and input gradient is computed into the output span the
    request offers (no copy: the server counts them), but half types, computed in float32 and rounded
    into a new array, which are copied; the bytes are the unary path's either way."""
    sessions = server.servicer.sessions
    with ConvClient(server.target, timeout=120, data_path="unary") as unary, \
         ConvClient(server.target, timeout=120, data_path="shm") as shared:  # fmt: skip
        cases = _cases(np.float32)
        cases.append(("max_pool2d", cases[2][1], dict(cases[2][2], return_indices=True)))
        for op, tensors, options in cases:
            tensors = tuple(t.astype(dtype) for t in tensors)
            want = getattr(unary, op)(*tensors, **options)
            results = 2 if options.get("return_indices") else 1
            before = sessions.results_in_place
            got = getattr(shared, op)(*tensors, **options)
            placed = sessions.results_in_place - before
            for g, w in zip(got if results == 2 else [got], want if results == 2 else [want]):
                _same_bytes(g, w)
            # max_pool2d's indices are int64 whatever the dtype: they are always placed
            assert placed == (results if np.dtype(dtype).itemsize >= 4 else results - 1), op
            gy = np.random.default_rng(3).standard_normal((want[0] if results == 2 else want).shape).astype(dtype)
            want_grads = getattr(unary, f"{op}_backward")(gy, *tensors, **options)
            before = sessions.results_in_place
            got_grads = getattr(shared, f"{op}_backward")(gy, *tensors, **options)
            assert (sessions.results_in_place > before) == (np.dtype(dtype).itemsize >= 4), op  # grad_input at least
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


def test_results_view_the_clients_region_which_is_recycled_once_every_view_is_freed(srv):
    x = np.random.default_rng(4).standard_normal((4, 2, 64, 64))
    with ConvClient(srv.target, timeout=60, data_path="shm") as client:
        pool = client._core.pool
        y = client.relu(x)
        _same_bytes(y, np.maximum(x, 0))
        region, _ = pool.find(y)
        tail = y[2:]
        del y
        gc.collect()
        assert pool.find(tail)[0] is region  # a view keeps the region leased
        tail[...] = 0  # results are ordinary writable arrays
        del tail
        gc.collect()
        again = client.relu(x)  # the freed region is the one the next result goes to
        assert pool.find(again)[0] is region
        _same_bytes(again, np.maximum(x, 0))


def test_an_input_in_shared_memory_is_sent_by_reference(srv, monkeypatch):
    from convrpc.client import shared_memory

    staged = []
    take = shared_memory.RegionPool.take
    monkeypatch.setattr(shared_memory.RegionPool, "take", lambda self, size: staged.append(size) or take(self, size))
    x = np.random.default_rng(5).standard_normal((3, 2, 50, 50)).astype(np.float32)
    with ConvClient(srv.target, timeout=60, data_path="shm") as client:
        a = client.asarray(x)
        assert client.asarray(a) is a and client._core.pool.find(a) is not None
        staged.clear()
        y = client.relu(a)
        assert staged == [shared_memory.aligned(y.nbytes)]  # an output region only: no staging copy of the input
        staged.clear()
        z = client.relu(y)  # a result is an input by reference too
        assert staged == [shared_memory.aligned(z.nbytes)]
        _same_bytes(z, np.maximum(x, 0))
        _same_bytes(y, np.maximum(x, 0))
        _same_bytes(client.relu(a[1:]), np.maximum(x[1:], 0))  # a contiguous slice of one, too


def test_shards_of_a_batch_in_shared_memory_go_by_reference_with_the_weight_they_share(srv):
    x = np.random.default_rng(8).standard_normal((6, 2, 20, 20))
    w = np.random.default_rng(9).standard_normal((3, 2, 3, 3))
    with ConvClient(srv.target, timeout=60, data_path="shm", shard_size=1) as client:
        for _ in range(2):  # six shards at once hand over the one weight region once, then reuse it
            _same_bytes(client.conv2d(client.asarray(x), client.asarray(w), padding=1), REF.conv2d(x, w, padding=1))


def test_a_full_pool_or_no_memory_sends_only_that_call_over_the_network(srv, monkeypatch):
    stream = CallCore._streamed
    streamed = []
    monkeypatch.setattr(CallCore, "_streamed", lambda self, *a: streamed.append(1) or stream(self, *a))
    small = np.random.default_rng(6).standard_normal((3, 50, 50))  # 60 KB
    big = np.random.default_rng(6).standard_normal((3, 400, 400))  # 3.8 MB: over the pool
    with ConvClient(srv.target, timeout=60, shm_pool_bytes=2 << 20) as client:
        _same_bytes(client.relu(small * 2), np.maximum(small * 2, 0))
        _same_bytes(client.relu(big), np.maximum(big, 0))
        assert streamed == [1] and client._core.replicas[0].shm_ok  # only this call went elsewhere
        assert type(client.empty((1 << 20,))) is np.ndarray  # an ordinary array past the pool
        monkeypatch.setattr(shm, "create_region", lambda size: (_ for _ in ()).throw(OSError(12, "Cannot allocate")))
        _same_bytes(client.relu(big[:1]), np.maximum(big[:1], 0))
        assert streamed == [1, 1] and client._core.replicas[0].shm_ok
    with ConvClient(srv.target, timeout=60, data_path="shm", shm_pool_bytes=2 << 20) as client:
        with pytest.raises(ConvRpcError) as info:
            client.relu(big)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "shm_pool_bytes" in info.value.message


def test_a_region_whose_call_timed_out_is_never_reused(srv, monkeypatch):
    from convrpc.client import shared_memory
    from convrpc.server.servicer import ConvService

    compute = ConvService._compute
    monkeypatch.setattr(ConvService, "_compute", lambda self, *a: time.sleep(0.5) or compute(self, *a))
    placements = []
    make = shared_memory.Placement.make.__func__
    monkeypatch.setattr(shared_memory.Placement, "make",
                        classmethod(lambda cls, *a: placements.append(make(cls, *a)) or placements[-1]))  # fmt: skip
    x = np.full((3, 100, 100), -1.0)
    with ConvClient(srv.target, timeout=60, data_path="shm") as client:
        with pytest.raises(ConvRpcError) as info:
            client.relu(x, timeout=0.2)  # the server goes on and writes its result 0.3 s later
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        (failed,) = placements
        assert failed.output.fd == -1 and failed.output not in client._core.pool._idle  # closed, never reused
        monkeypatch.setattr(ConvService, "_compute", compute)
        y = np.arange(30000.0).reshape(3, 100, 100)
        for _ in range(3):  # while the late write lands, calls use other regions
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
            _same_bytes(await client.conv2d(client.asarray(x), w, padding=1), y)  # by reference on shm
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


def _session(srv) -> RawSession:
    channel = grpc.insecure_channel(srv.target)
    call = channel.unary_unary(
        METHOD + "OpenSharedMemorySession",
        request_serializer=pb.OpenSharedMemorySessionRequest.SerializeToString,
        response_deserializer=pb.OpenSharedMemorySessionResponse.FromString,
    )
    try:
        return RawSession(call)
    finally:
        channel.close()


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


def _relu_shared(session_id, region_id=1, offset=0, shape=(4,)):
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=shape, shared=pb.SharedSpan(region_id=region_id, offset=offset))
    return pb.ForwardRequest(
        op=pb.Op(relu=pb.ReluOptions()), input=tensor, shared_memory=pb.SharedMemoryContext(session_id=session_id)
    )


@pytest.fixture()
def two_sessions(srv):
    """Two sessions; the first holds region 1 (4 KiB, starting [-2, -1, 1, 2]), the second region 2."""
    first, second = _session(srv), _session(srv)
    fds = [memfd(4096, np.array([-2.0, -1, 1, 2]).tobytes()), memfd(4096)]
    try:
        assert first.add(1, fds[0]) == (0, "") and second.add(2, fds[1]) == (0, "")
        yield first, second, mmap.mmap(fds[0], 4096)
    finally:
        for fd in fds:
            os.close(fd)
        first.close()
        second.close()


def test_a_raw_shared_request_is_answered_in_the_offered_span_or_inline(srv, two_sessions):
    first, _, region = two_sessions
    request = _relu_shared(first.id)
    request.shared_memory.output_buffer.CopyFrom(pb.SharedBuffer(region_id=1, offset=64, size=64))
    out = _shared_forward(srv, request).output
    assert (out.shared.region_id, out.shared.offset) == (1, 64)
    assert np.frombuffer(region, np.float64, 4, 64).tolist() == [0, 0, 1, 2]
    # No span offered, or one too small: the results come inline.
    for size in (None, 16):
        request = _relu_shared(first.id)
        if size:
            request.shared_memory.output_buffer.CopyFrom(pb.SharedBuffer(region_id=1, offset=64, size=size))
        out = _shared_forward(srv, request).output
        assert np.frombuffer(out.data, np.float64).tolist() == [0, 0, 1, 2]


def test_an_output_span_overlapping_the_input_span_still_gets_the_right_result(srv, two_sessions):
    """The protocol allows an output span over the input's (an in-place relu): the result is then computed
    aside and copied; a span apart (or just after) gets it computed in place."""
    first, _, region = two_sessions
    sessions = srv.servicer.sessions
    # (input offset, output offset, computed in place): apart, adjacent, the input's own bytes, half over them
    for at, to, in_place in ((64, 192, True), (64, 0, True), (64, 64, False), (96, 64, False)):
        np.frombuffer(region, np.float64, 8, at)[:] = [-2, -1, 1, 2, -3, -4, 3, 4]
        request = _relu_shared(first.id, offset=at, shape=(8,))
        request.shared_memory.output_buffer.CopyFrom(pb.SharedBuffer(region_id=1, offset=to, size=64))
        before = sessions.results_in_place, sessions.results_copied
        out = _shared_forward(srv, request).output
        assert out.shared.offset == to
        assert np.frombuffer(region, np.float64, 8, to).tolist() == [0, 0, 1, 2, 0, 0, 3, 4]
        counts = sessions.results_in_place - before[0], sessions.results_copied - before[1]
        assert counts == ((1, 0) if in_place else (0, 1)), (at, to)


def test_shared_requests_for_foreign_missing_or_short_spans_are_refused(srv, two_sessions):
    first, second, _ = two_sessions
    region, offset, session = "input.shared.region_id", "input.shared.offset", "shared_memory.session_id"
    cases = [
        (_relu_shared(first.id, region_id=2), "FAILED_PRECONDITION", region, "no region 2"),  # the other session's
        (_relu_shared(second.id, region_id=1), "FAILED_PRECONDITION", region, "no region 1"),
        (_relu_shared("0" * 32), "FAILED_PRECONDITION", session, "unknown"),
        (_relu_shared(first.id, offset=4096 - 16), "INVALID_ARGUMENT", offset, "past the end"),
        (_relu_shared(first.id, offset=4), "INVALID_ARGUMENT", offset, "multiple of 8"),
        (_relu_shared(first.id, offset=-8), "INVALID_ARGUMENT", offset, ">= 0"),
        (_relu_shared(first.id, shape=(2**40,)), "RESOURCE_EXHAUSTED", "input.shape", "cap"),
    ]
    buffer = "shared_memory.output_buffer"
    for span, code, field, words in [
        (pb.SharedBuffer(region_id=2, offset=0, size=64), "FAILED_PRECONDITION", f"{buffer}.region_id", "no region"),
        (pb.SharedBuffer(region_id=1, offset=32, size=64), "INVALID_ARGUMENT", f"{buffer}.offset", "multiple of 64"),
        (pb.SharedBuffer(region_id=1, offset=4096, size=64), "INVALID_ARGUMENT", f"{buffer}.offset", "past the end"),
    ]:
        request = _relu_shared(first.id)
        request.shared_memory.output_buffer.CopyFrom(span)
        cases.append((request, code, field, words))
    for request, code, field, words in cases:
        error = _shared_refusal(srv, request)
        assert error.code is getattr(grpc.StatusCode, code), (field, error)
        assert error.message.startswith(field + ":") and words in error.message, error


def test_a_session_socket_needs_its_one_time_token(srv):
    session = _session(srv)
    session.close()
    for token in (b"x" * 32, session.opened.connect_token):  # a wrong token; the right one used already
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(30)
            sock.connect(shm.socket_address(session.opened.socket_address))
            sock.send(shm.encode(shm.HELLO, token=token))
            _, code, message = shm.decode_reply(sock.recv(shm.MAX_MESSAGE))
            assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and message.startswith("connect_token:")
            assert sock.recv(shm.MAX_MESSAGE) == b""  # and the server hangs up


# -- cleanup --------------------------------------------------------------------------------------


_DYING_CLIENT = """
import os, sys, numpy as np
from convrpc.client import ConvClient
client = ConvClient(sys.argv[1], data_path="shm")
keep = client.relu(np.ones(100_000))
print(client._core.replicas[0].session.id, flush=True)
if sys.argv[2] == "die":
    os._exit(1)
client.close()
"""


@pytest.mark.parametrize("ending", ["die", "close"])
def test_a_client_process_that_ends_ends_its_session_and_leaves_no_warning(srv, ending):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DYING_CLIENT), srv.target, ending],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    session_id = done.stdout.strip()
    assert len(session_id) == 32, done.stderr
    deadline = time.monotonic() + 10  # the kernel closed its socket: the server ends the session
    while session_id in srv.servicer.sessions._sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_id not in srv.servicer.sessions._sessions
    if ending == "close":
        assert done.returncode == 0 and done.stderr == "", done.stderr


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
