"""Scale-out: a sharded call equals the unsharded one, shards reach every replica, a lost replica costs no result."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from convrpc import wire
from convrpc.client import ConvClient, ConvRpcError
from convrpc.client.aio import AsyncConvClient
from convrpc.client.sharding import FRAMING_BYTES, ShardedCalls, max_message_bytes, merge, shard, shard_bounds
from convrpc.core import get_backend
from convrpc.server import Settings
from convrpc.server.servicer import ConvService
from convrpc.v1 import conv_service_pb2 as pb

from server_fixtures import running_server
from server_processes import server_processes

REF = get_backend("numpy")
SERVICE = ConvService(REF, Settings(backend="numpy"), "test")

# (op, input shapes, options): every op, with options that make per-sample geometry non-trivial.
CASES = [
    ("conv2d", dict(input=(7, 4, 9, 8), weight=(6, 2, 3, 2), bias=(6,)),
     dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)),
    ("conv_transpose2d", dict(input=(7, 4, 5, 5), weight=(4, 3, 3, 3), bias=(3,)),
     dict(stride=3, padding=1, output_padding=1, groups=1, dilation=1)),
    ("max_pool2d", dict(input=(7, 3, 9, 9)), dict(kernel_size=3, stride=2, padding=1, dilation=1)),
    ("avg_pool2d", dict(input=(7, 3, 9, 9)), dict(kernel_size=(2, 3), stride=None, padding=(1, 1))),
    ("relu", dict(input=(7, 3, 4, 4)), {}),
]  # fmt: skip


def _request(method, op, shapes, options, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {f: rng.standard_normal(s) for f, s in shapes.items()}
    tensors = {f: wire.encode_tensor(a) for f, a in arrays.items()}
    if method == "Forward":
        return pb.ForwardRequest(op=wire.encode_op(op, **options), **tensors)
    out = getattr(REF, op)(**arrays, **options)
    gy = wire.encode_tensor(rng.standard_normal(out.shape))
    return pb.BackwardRequest(op=wire.encode_op(op, **options), grad_output=gy, **tensors)


def _assert_same(got, want):
    """Equal responses: the same fields set, every tensor equal to 1e-12 of its scale (float64)."""
    assert [f.name for f, _ in got.ListFields()] == [f.name for f, _ in want.ListFields()]
    for field, value in want.ListFields():
        a = wire.decode_tensor(getattr(got, field.name), field.name)
        b = wire.decode_tensor(value, field.name)
        assert a.shape == b.shape and a.dtype == b.dtype, field.name
        assert np.max(np.abs(a - b)) <= 1e-12 * max(1.0, float(np.max(np.abs(b)))), field.name


def _local(method, request):
    return getattr(SERVICE, method)(request, None)


# -- splitting and merging, against the servicer on one process ----------------------------------


@pytest.mark.parametrize("method", ["Forward", "Backward"])
@pytest.mark.parametrize("op, shapes, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shard_size", [1, 3])
def test_shards_merge_to_the_unsharded_response(method, op, shapes, options, shard_size):
    request = _request(method, op, shapes, options)
    bounds = shard_bounds(method, request, shard_size, max_message_bytes())
    assert len(bounds) == math.ceil(7 / shard_size)
    assert bounds[0][0] == 0 and bounds[-1][1] == 7 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < b - a <= shard_size for a, b in bounds)
    merged = merge(method, [_local(method, shard(method, request, a, b)) for a, b in bounds])
    _assert_same(merged, _local(method, request))


@pytest.mark.parametrize("method", ["Forward", "Backward"])
def test_shards_are_sized_to_fit_the_message_limit(method):
    # conv_transpose2d with stride 3 makes outputs ~9x the input: the response decides the forward shards.
    op, shapes, options = CASES[1]
    request = _request(method, op, dict(shapes, input=(40, 4, 5, 5)), options)
    limit = FRAMING_BYTES + 40_000
    bounds = shard_bounds(method, request, None, limit)
    assert len(bounds) > 1
    parts = [shard(method, request, a, b) for a, b in bounds]
    responses = [_local(method, p) for p in parts]
    assert max(p.ByteSize() for p in parts + responses) <= limit
    # ... and no smaller than needed: one more row per shard would not fit.
    widest = max(b - a for a, b in bounds)
    one_more = shard(method, request, 0, widest + 1)
    assert max(one_more.ByteSize(), _local(method, one_more).ByteSize()) > limit - FRAMING_BYTES
    _assert_same(merge(method, responses), _local(method, request))


def test_requests_that_need_no_split_or_are_malformed_go_whole():
    op, shapes, options = CASES[0]
    request = _request("Backward", op, shapes, options)
    assert len(shard_bounds("Backward", request, None, max_message_bytes())) == 1
    single = _request("Forward", op, dict(shapes, input=(1, 4, 9, 8)), options)
    assert len(shard_bounds("Forward", single, 1, max_message_bytes())) == 1
    bad = pb.BackwardRequest()
    bad.CopyFrom(request)
    bad.grad_output.shape[0] = 6  # N differs from the input's: the server must see it and say so
    assert len(shard_bounds("Backward", bad, 1, max_message_bytes())) == 1


def test_max_message_bytes_follows_channel_options():
    assert max_message_bytes() == Settings().max_message_bytes
    assert max_message_bytes([("grpc.max_receive_message_length", 1000)]) == 1000


# -- running shards: failover over fake replicas -------------------------------------------------


class _Failure(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


class _Replica:
    """A stub answering Forward/Backward with the servicer, or always failing with ``fail``."""

    def __init__(self, fail=None):
        self.fail = fail
        self.calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, method):
        def call(request, timeout=None, metadata=None):
            with self._lock:
                self.calls += 1
            if self.fail is not None:
                raise _Failure(self.fail)
            return _local(method, request)

        return call


def test_a_shard_failing_unavailable_moves_to_another_replica():
    replicas = [_Replica(grpc.StatusCode.UNAVAILABLE), _Replica(), _Replica()]
    calls = ShardedCalls(replicas, None, shard_size=1)
    try:
        request = _request("Backward", *CASES[0])
        _assert_same(calls("Backward", request, timeout=30), _local("Backward", request))
    finally:
        calls.close()
    assert replicas[0].calls >= 1 and replicas[1].calls + replicas[2].calls == 7


def test_other_errors_are_not_retried_and_all_replicas_down_is_unavailable():
    request = _request("Forward", *CASES[0])
    bad = _Replica(grpc.StatusCode.INVALID_ARGUMENT)
    with contextlib.closing(ShardedCalls([bad, _Replica()], None)) as calls:
        with pytest.raises(ConvRpcError) as info:
            calls("Forward", request, timeout=30)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.calls == 1
    down = [_Replica(grpc.StatusCode.UNAVAILABLE), _Replica(grpc.StatusCode.UNAVAILABLE)]
    with contextlib.closing(ShardedCalls(down, None, shard_size=2)) as calls:
        with pytest.raises(ConvRpcError) as info:
            calls("Forward", request, timeout=30)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # The deadline covers every attempt and pause of the call.
    with contextlib.closing(ShardedCalls(down, None)) as calls:
        started = time.monotonic()
        with pytest.raises(ConvRpcError) as info:
            calls("Forward", request, timeout=0.1)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 0.25


# -- three in-process servers: every replica gets work -------------------------------------------


@pytest.fixture()
def counted_servers(monkeypatch):
    """Three numpy servers on 127.0.0.1 and a function returning how many Forward/Backward calls each got."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    for name in ("Forward", "Backward"):
        original = getattr(ConvService, name)

        def counted(self, request, context, _original=original):
            with lock:
                counts[id(self)] = counts.get(id(self), 0) + 1
            return _original(self, request, context)

        monkeypatch.setattr(ConvService, name, counted)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running_server(backend="numpy")) for _ in range(3)]

        def calls():
            with lock:
                return [counts.get(id(s.servicer), 0) for s in servers]

        yield servers, calls


def _conv_case(n=12, c=3, size=12, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, size, size))
    w = rng.standard_normal((5, c, 3, 3))
    b = rng.standard_normal(5)
    gy = rng.standard_normal((n, 5, size, size))
    return x, w, b, gy


def _check_conv(got_y, got_grads, x, w, b, gy):
    def close(a, e):
        assert a.shape == e.shape and np.max(np.abs(a - e)) <= 1e-12 * max(1.0, float(np.max(np.abs(e))))

    close(got_y, REF.conv2d(x, w, b, padding=1))
    for got, want in zip(got_grads, REF.conv2d_backward(gy, x, w, b, padding=1)):
        close(got, want)


@pytest.mark.parametrize("by_name", [False, True], ids=["target-list", "one-grpc-name"])
def test_sharded_calls_reach_every_replica_and_equal_the_unsharded_result(counted_servers, by_name):
    servers, calls = counted_servers
    targets = [s.target for s in servers]
    # A list opens one channel per target; an ipv4: name is one channel balancing round_robin over its addresses.
    target = "ipv4:" + ",".join(targets) if by_name else targets
    x, w, b, gy = _conv_case()
    with ConvClient(target, timeout=60, shard_size=2) as client:
        client.server_info(timeout=10)
        y = client.conv2d(x, w, b, padding=1)
        grads = client.conv2d_backward(gy, x, w, b, padding=1)
    _check_conv(y, grads, x, w, b, gy)
    assert sum(calls()) == 12 and min(calls()) > 0, calls()


def test_unsharded_calls_are_one_rpc(counted_servers):
    servers, calls = counted_servers
    x, w, b, gy = _conv_case()
    # The unary path (shared memory would carry this local call, past the counted handlers).
    with ConvClient([s.target for s in servers], timeout=60, data_path="unary") as client:
        client.conv2d_backward(gy, x, w, b, padding=1)
    assert sorted(calls()) == [0, 0, 1]


def test_asyncio_client_gathers_shards_over_every_replica(counted_servers):
    servers, calls = counted_servers
    x, w, b, gy = _conv_case(n=9)

    async def run():
        async with AsyncConvClient([s.target for s in servers], timeout=60, shard_size=2) as client:
            y = client.conv2d(x, w, b, padding=1)
            return await asyncio.gather(y, client.conv2d_backward(gy, x, w, b, padding=1))

    y, grads = asyncio.run(run())
    _check_conv(y, grads, x, w, b, gy)
    assert sum(calls()) == 10 and min(calls()) > 0, calls()


# -- three `convrpc serve` processes: a replica lost mid-call ------------------------------------


def test_three_server_processes_survive_a_replica_killed_mid_call():
    x, w, b, gy = _conv_case(n=12)
    started = time.monotonic()
    with server_processes(3, env=dict(CONVRPC_BACKEND="numpy", CONVRPC_GRACE="2")) as servers:
        targets = [s.target for s in servers]
        with ConvClient(targets, timeout=60, shard_size=2) as client, ThreadPoolExecutor(1) as pool:
            _check_conv(client.conv2d(x, w, b, padding=1), client.conv2d_backward(gy, x, w, b, padding=1), x, w, b, gy)

            # Freeze a replica so that it holds its shards, then kill it: the call must still finish, correctly.
            victim = servers[0]
            os.kill(victim.process.pid, signal.SIGSTOP)
            call = pool.submit(client.conv2d_backward, gy, x, w, b, padding=1)
            time.sleep(0.5)
            assert not call.done(), "the frozen replica should still hold its shards"
            victim.kill()
            _check_conv(client.conv2d(x, w, b, padding=1), call.result(timeout=30), x, w, b, gy)

        # The same through one gRPC name listing every replica, the dead one included. Shards of over
        # 256 KiB are past gRPC's own transparent retries (its retry buffer), so the SDK's failover is what counts.
        x, w, b, gy = _conv_case(n=8, c=8, size=64)
        with ConvClient("ipv4:" + ",".join(targets), timeout=60, shard_size=2) as client, ThreadPoolExecutor(1) as pool:
            client.server_info(timeout=10)
            victim = servers[1]
            os.kill(victim.process.pid, signal.SIGSTOP)
            call = pool.submit(client.conv2d, x, w, b, padding=1)
            time.sleep(0.5)
            assert not call.done()
            victim.kill()
            _check_conv(call.result(timeout=30), client.conv2d_backward(gy, x, w, b, padding=1), x, w, b, gy)
    # Every process is gone; the one left was stopped by SIGTERM and drained cleanly.
    assert [s.process.returncode for s in servers] == [-signal.SIGKILL, -signal.SIGKILL, 0]
    assert time.monotonic() - started < 60
