"""Failover on every data path: three `convrpc serve` replicas, one SIGKILLed mid-run, then another SIGSTOPped.

Every call must return the reference result, and a lost or frozen replica may cost a call a few seconds
(the client's keepalive fails a frozen replica's calls within ~3 s), never its deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from convrpc.client import ConvClient
from convrpc.client.aio import AsyncConvClient
from convrpc.core import get_backend

from server_processes import server_processes

pytestmark = pytest.mark.slow

REF = get_backend("numpy")
#: Calls per phase: normal, after one replica was killed, after a second one was frozen.
CALLS = 3
#: What a lost replica may add to a call: the issue's bound (the keepalive needs ~3 s for a frozen one).
SLACK = 5.0


def _case():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((96, 8, 32, 32))
    w = rng.standard_normal((8, 8, 3, 3))
    b = rng.standard_normal(8)
    return x, w, b, REF.conv2d(x, w, b, padding=1)


def _assert_reference(y, want):
    assert y.shape == want.shape and y.dtype == want.dtype
    assert np.max(np.abs(y - want)) <= 1e-12 * float(np.max(np.abs(want)))


def _disrupt(servers, sig):
    """SIGKILL or SIGSTOP the first replica still running; returns it."""
    victim = next(s for s in servers if s.process.poll() is None and not getattr(s, "stopped", False))
    os.kill(victim.process.pid, sig)
    victim.stopped = sig == signal.SIGSTOP
    return victim


def _phases(servers, timed_call):
    """Run the phases with ``timed_call() -> (result, seconds)``, disrupting a replica while a call is in flight.

    Returns the durations of the normal calls and of every call after (and across) a disruption."""
    normal = [timed_call() for _ in range(CALLS)]
    disrupted = []
    with ThreadPoolExecutor(1) as pool:
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            in_flight = pool.submit(timed_call)
            time.sleep(0.02)
            _disrupt(servers, sig)
            disrupted += [in_flight.result(timeout=60)] + [timed_call() for _ in range(CALLS)]
    return normal, disrupted


def _release(servers):
    """Never leave a stopped process behind: kill it, then let it run so that it can die."""
    for server in servers:
        if server.process.poll() is None and getattr(server, "stopped", False):
            server.process.kill()
            os.kill(server.process.pid, signal.SIGCONT)
            server.process.wait()


def _check(normal, disrupted, want):
    for y, _ in normal + disrupted:
        _assert_reference(y, want)
    usual = max(seconds for _, seconds in normal)
    slowest = max(seconds for _, seconds in disrupted)
    assert slowest < usual + SLACK, f"a call took {slowest:.2f} s, normal calls at most {usual:.2f} s"


@pytest.mark.parametrize("path", ["auto", "unary", "stream", "shm"])
def test_every_call_returns_the_reference_while_replicas_are_killed_and_frozen(path):
    x, w, b, want = _case()
    with server_processes(3, env=dict(CONVRPC_BACKEND="numpy", CONVRPC_WARM_UP="0", CONVRPC_GRACE="1")) as servers:
        try:
            with ConvClient([s.target for s in servers], timeout=30, data_path=path, shard_size=32) as client:

                def timed_call():
                    started = time.monotonic()
                    y = client.conv2d(x, w, b, padding=1)
                    return y, time.monotonic() - started

                normal, disrupted = _phases(servers, timed_call)
        finally:
            _release(servers)
    _check(normal, disrupted, want)


def test_the_asyncio_client_fails_over_too():
    x, w, b, want = _case()
    with server_processes(3, env=dict(CONVRPC_BACKEND="numpy", CONVRPC_WARM_UP="0", CONVRPC_GRACE="1")) as servers:
        try:
            loop = asyncio.new_event_loop()

            async def connect():
                return AsyncConvClient([s.target for s in servers], timeout=30, data_path="stream", shard_size=32)

            def timed_call():  # each call on the client's loop, from whichever thread asks
                async def call():
                    started = time.monotonic()
                    y = await client.conv2d(x, w, b, padding=1)
                    return y, time.monotonic() - started

                return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=60)

            with ThreadPoolExecutor(1) as runner:
                runner.submit(loop.run_forever)
                client = asyncio.run_coroutine_threadsafe(connect(), loop).result(timeout=30)
                try:
                    normal, disrupted = _phases(servers, timed_call)
                finally:
                    asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=30)
                    loop.call_soon_threadsafe(loop.stop)
        finally:
            _release(servers)
    _check(normal, disrupted, want)
