"""PyTorch's own test inputs through the SDK: every OpInfo and ModuleInfo sample of our five ops (see
``torch_samples``), in float16, bfloat16, float32 and float64, is sent to a live server exactly as torch's
call spells it and must match torch's output, indices and every gradient, in the input's dtype.

Samples take turns over the data paths (unary, stream, shared memory) and over the sync and asyncio
clients, so every feature crosses each of them; identical samples are sent once, and a thread pool keeps
several calls in flight. No sample may be refused: a refusal is a failure like a wrong value.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from torch_samples import DTYPES, ENTRIES, calls_of, compare, torch_results

from convrpc.client import ConvClient
from convrpc.client.aio import AsyncConvClient

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::UserWarning")]

#: How the samples travel, in turn: sync clients forced onto each data path, then the asyncio client.
ROUTES = ("unary", "stream", "shm", "asyncio")
IN_FLIGHT = 8


class AsyncBridge:
    """The asyncio client behind blocking methods of the same names: its coroutines run on one event-loop
    thread, so the comparison that drives a ConvClient drives it unchanged."""

    def __init__(self, target: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self._wait(self._open(target))

    async def _open(self, target):
        return AsyncConvClient(target, timeout=120)  # its channel belongs to this loop

    def _wait(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def __getattr__(self, name):
        method = getattr(self.client, name)
        return lambda *args, **kwargs: self._wait(method(*args, **kwargs))

    def close(self):
        self._wait(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def clients(server):
    made = {path: ConvClient(server.target, timeout=120, data_path=path) for path in ROUTES[:3]}
    made["asyncio"] = AsyncBridge(server.target)
    try:
        yield made
    finally:
        for client in made.values():
            client.close()


def _key(call) -> str:
    """What makes two samples the same call: the op, every argument (arrays by dtype, shape and bytes)."""
    digest = hashlib.sha1(call.op.encode())
    for a in [*call.args, sorted(call.kwargs.items())]:
        if isinstance(a, np.ndarray):
            digest.update(f"{a.dtype}{a.shape}".encode())
            digest.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
        else:
            digest.update(repr(a).encode())
    return digest.hexdigest()


def _unique(calls) -> dict:
    return {_key(c): c for c in calls}


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("kind, name", ENTRIES, ids=[name for _, name in ENTRIES])
def test_every_sample_through_the_sdk_matches_torch(clients, kind, name, dtype_name, record_property):
    dtype = DTYPES[dtype_name]
    calls = calls_of(kind, name, dtype)
    assert calls, "torch offers no samples"
    unique = list(_unique(calls).items())
    # torch's side runs here, one sample after another; the SDK's calls then run several at once.
    references = [torch_results(c, dtype, np.random.default_rng(zlib.crc32(k.encode()))) for k, c in unique]

    def run(i: int) -> str | None:
        route, (_, call) = ROUTES[i % len(ROUTES)], unique[i]
        try:
            compare(clients[route], call, dtype, references[i])
        except Exception as exc:  # every sample is checked, all failures reported together
            return f"{route} {call!r}: {type(exc).__name__}: {str(exc)[:300]}"
        return None

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        failures = [f for f in pool.map(run, range(len(unique))) if f is not None]
    record_property("samples", len(calls))
    print(f"{name} {dtype_name}: {len(calls)} samples, {len(unique)} distinct sent, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(unique)} failed:\n" + "\n".join(failures[:10])


def test_identical_samples_are_sent_once_and_distinct_ones_never_merge():
    """The dedupe above may only drop true repeats: it must tell apart samples differing in one option."""
    (call,) = [c for c in calls_of("op", "nn.functional.relu", DTYPES["float32"])][:1]
    same = type(call)(call.op, [a.copy() if isinstance(a, np.ndarray) else a for a in call.args], dict(call.kwargs),
                      call.torch_fn, call.tensors)  # fmt: skip
    other = type(call)(call.op, call.args, {"inplace": False}, call.torch_fn, call.tensors)
    assert len(_unique([call, same])) == 1 and len(_unique([call, other])) == 2
