"""Scale-out: sharded calls reach every replica and equal the unsharded result; a lost replica costs no result."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from convrpc.client import ConvClient
from convrpc.client.aio import AsyncConvClient
from convrpc.core import get_backend
from convrpc.server.servicer import ConvService

from server_fixtures import running_server
from server_processes import server_processes

REF = get_backend("numpy")

# Splitting, merging and failover decisions are tested without servers in test_client_core.py.


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
    # 110 KB: shared memory carries it, through the same Backward handler as the unary path.
    with ConvClient([s.target for s in servers], timeout=60) as client:
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
