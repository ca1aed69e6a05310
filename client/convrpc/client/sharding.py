"""Batch sharding: a Forward or Backward too big for one call is split along N, run on replicas at once, reassembled.

Every op is independent per sample, so a request can be cut into row ranges of its batch dimension N:
forward outputs and input gradients are concatenated back in order, and weight and bias gradients,
being sums over the batch, are summed over the shards. A request is cut when its batch exceeds the
client's ``shard_size``, or when it or its response would not fit in one gRPC message.

Each call (sharded or not) goes to the next channel in turn; one failing with UNAVAILABLE (a replica
gone, draining or refusing connections) is sent again on the next channel, so losing a replica mid-call
costs time, not results. Once every channel was tried, a few more attempts follow after short pauses:
within one channel whose name resolves to several addresses, gRPC's round_robin policy then picks an
address that is still up. The deadline covers the whole call.
TrainKernel is never sharded: its stream and the optimizer state live on one replica.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Sequence

import grpc
import numpy as np

from convrpc import wire
from convrpc.core import params
from convrpc.core.errors import ConvError
from convrpc.v1 import conv_service_pb2 as pb

from .channel import channel_options
from .errors import ConvRpcError

__all__ = ["AsyncShardedCalls", "ShardedCalls", "max_message_bytes", "merge", "shard", "shard_bounds"]

#: Shards of one call in flight at once: a server admits 8 compute RPCs by default, so even a single
#: replica never turns one client's shards away as busy.
SHARDS_IN_FLIGHT = 8
#: Bytes of a message kept free for framing, shapes and op options when sizing shards by the message limit.
FRAMING_BYTES = 64 * 1024
#: Status codes that mean "this replica cannot take the call now; another one may".
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
#: Pauses (seconds) before the attempts that follow one attempt per channel: time for a channel to
#: notice that a replica is gone, so that its load balancer stops picking it.
RETRY_PAUSES = (0.05, 0.25)

#: The request fields cut along N, per RPC; the others (weight, bias, op) go whole to every shard.
_BATCHED = {"Forward": ("input",), "Backward": ("grad_output", "input")}


def max_message_bytes(options: Sequence[tuple[str, object]] = ()) -> int:
    """The smaller of the send and receive limits a channel opened with ``options`` ends up with."""
    limits = {}
    for key, value in list(channel_options()) + list(options):
        if key in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
            limits[key] = int(value)
    return min((v for v in limits.values() if v > 0), default=2**31 - 1)


# -- planning -------------------------------------------------------------------------------------


def _batch_rows(method: str, request) -> int | None:
    """N when every batched field is set and consistent (shape[0] == N, byte length right), else None."""
    n = None
    for field in _BATCHED[method]:
        if not request.HasField(field):
            return None
        t = getattr(request, field)
        dtype = wire.DTYPES.get(t.dtype)
        if dtype is None or not t.shape or any(d <= 0 for d in t.shape):
            return None
        if len(t.data) != math.prod(t.shape) * dtype.itemsize or (n is not None and t.shape[0] != n):
            return None
        n = t.shape[0]
    return n


def _output_row_bytes(request: pb.ForwardRequest) -> int | None:
    """Bytes per sample of a Forward's output, from the op's geometry; None if the request is invalid."""
    x = request.input
    shapes = [tuple(x.shape)]
    shapes += [tuple(getattr(request, f).shape) if request.HasField(f) else None for f in ("weight", "bias")]
    try:
        name, options = wire.decode_op(request.op)
        if name == "conv2d":
            out = params.conv2d_geometry(*shapes, **options).output_shape
        elif name == "conv_transpose2d":
            out = params.conv_transpose2d_geometry(*shapes, **options).input_shape
        elif name in ("max_pool2d", "avg_pool2d"):
            out = params.pool2d_geometry(shapes[0], **options).output_shape
        else:
            out = shapes[0]
    except (ConvError, TypeError, ValueError):
        return None
    return math.prod(out[1:]) * wire.DTYPES[x.dtype].itemsize


def shard_bounds(method: str, request, shard_size: int | None, max_bytes: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of N, one per shard, as even as possible; one range means "do not split".

    Shards have at most ``shard_size`` rows, and few enough that each request and its response fit in
    ``max_bytes``. A request that is malformed, or whose single sample cannot fit, goes unsplit so the
    server can answer it with the precise error.
    """
    n = _batch_rows(method, request)
    if n is None or n < 2:
        return [(0, n or 0)]
    rows = min(n, shard_size) if shard_size else n
    batched = [getattr(request, f) for f in _BATCHED[method]]
    request_row = sum(len(t.data) // n for t in batched)
    if method == "Forward":
        response_row, response_fixed = _output_row_bytes(request), 0
    else:  # the input gradient is shaped like the input; weight and bias gradients like theirs
        response_row = len(request.input.data) // n
        response_fixed = len(request.weight.data) + len(request.bias.data)
    budget = max_bytes - FRAMING_BYTES
    for per_row, fixed in ((request_row, request.ByteSize() - n * request_row), (response_row, response_fixed)):
        if per_row:
            fit = (budget - fixed) // per_row
            if fit >= 1:
                rows = min(rows, fit)
    count = -(-n // rows)
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def _rows(t: pb.Tensor, start: int, stop: int) -> pb.Tensor:
    row = len(t.data) // t.shape[0]
    return pb.Tensor(dtype=t.dtype, shape=[stop - start, *t.shape[1:]], data=t.data[start * row : stop * row])


def shard(method: str, request, start: int, stop: int):
    """The request restricted to samples ``start:stop``; the unbatched fields are copied whole."""
    part = type(request)()
    for field, value in request.ListFields():
        if field.name in _BATCHED[method]:
            getattr(part, field.name).CopyFrom(_rows(value, start, stop))
        else:
            getattr(part, field.name).CopyFrom(value)
    return part


def _concat(tensors: list[pb.Tensor]) -> pb.Tensor:
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    return pb.Tensor(dtype=first.dtype, shape=[rows, *first.shape[1:]], data=b"".join(t.data for t in tensors))


def _sum(tensors: list[pb.Tensor], field: str) -> pb.Tensor:
    total = np.array(wire.decode_tensor(tensors[0], field))
    for t in tensors[1:]:
        total += wire.decode_tensor(t, field)
    return wire.encode_tensor(total)


def merge(method: str, responses: list):
    """One response from the shards' responses, in shard order: outputs and input gradients
    concatenated along N, weight and bias gradients summed."""
    if len(responses) == 1:
        return responses[0]
    if method == "Forward":
        return pb.ForwardResponse(output=_concat([r.output for r in responses]))
    merged = pb.BackwardResponse()
    if responses[0].HasField("grad_input"):
        merged.grad_input.CopyFrom(_concat([r.grad_input for r in responses]))
    for field in ("grad_weight", "grad_bias"):
        if responses[0].HasField(field):
            getattr(merged, field).CopyFrom(_sum([getattr(r, field) for r in responses], field))
    return merged


# -- running --------------------------------------------------------------------------------------


class _Replicas:
    """Stubs taken in turn; a call tries each of them, then a few more after pauses (see module docstring)."""

    def __init__(self, stubs: Sequence, metadata, shard_size: int | None, max_bytes: int):
        if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
            raise ValueError(f"shard_size: expected None or an int >= 1, got {shard_size!r}")
        self.stubs = list(stubs)
        self.metadata = metadata
        self.shard_size = shard_size
        self.max_bytes = max_bytes
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def attempts(self) -> list[tuple[object, float]]:
        """``(stub, pause before it)`` for the attempts of one call: the next stub in turn, the others, then more."""
        with self._lock:
            first = next(self._turn)
        n = len(self.stubs)
        pauses = [0.0] * n + list(RETRY_PAUSES)
        return [(self.stubs[(first + i) % n], pause) for i, pause in enumerate(pauses)]

    def plan(self, method: str, request) -> list:
        bounds = shard_bounds(method, request, self.shard_size, self.max_bytes)
        return [request] if len(bounds) == 1 else [shard(method, request, a, b) for a, b in bounds]


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise ConvRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before every shard was answered")
    return left


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class ShardedCalls(_Replicas):
    """Forward and Backward for :class:`ConvClient`: shards run on a thread pool, failed ones move on."""

    def __init__(self, stubs, metadata, shard_size=None, max_bytes=None):
        super().__init__(stubs, metadata, shard_size, max_bytes or max_message_bytes())
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, method: str, request, timeout: float | None):
        deadline = _deadline(timeout)
        shards = self.plan(method, request)
        if len(shards) == 1:
            return self._send(method, shards[0], deadline)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SHARDS_IN_FLIGHT, thread_name_prefix="convrpc-shard")
        futures = [self._pool.submit(self._send, method, s, deadline) for s in shards]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f in done and f.exception() is not None:
                raise f.exception()
        return merge(method, [f.result() for f in futures])

    def _send(self, method: str, request, deadline):
        tries = self.attempts()
        for i, (stub, pause) in enumerate(tries):
            if pause:
                time.sleep(min(pause, _remaining(deadline) or pause))
            try:
                return getattr(stub, method)(request, timeout=_remaining(deadline), metadata=self.metadata)
            except grpc.RpcError as error:
                if error.code() not in FAILOVER_CODES or i == len(tries) - 1:
                    raise ConvRpcError.from_rpc_error(error) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class AsyncShardedCalls(_Replicas):
    """Forward and Backward for :class:`AsyncConvClient`: shards are gathered, at most SHARDS_IN_FLIGHT at once."""

    def __init__(self, stubs, metadata, shard_size=None, max_bytes=None):
        super().__init__(stubs, metadata, shard_size, max_bytes or max_message_bytes())
        # Shared by every call of the client, like the sync client's pool; bound to the loop at first use.
        self._slots = asyncio.Semaphore(SHARDS_IN_FLIGHT)

    async def __call__(self, method: str, request, timeout: float | None):
        deadline = _deadline(timeout)
        shards = self.plan(method, request)
        if len(shards) == 1:
            return await self._send(method, shards[0], deadline)

        async def run(part):
            async with self._slots:
                return await self._send(method, part, deadline)

        tasks = [asyncio.ensure_future(run(s)) for s in shards]
        try:
            responses = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return merge(method, list(responses))

    async def _send(self, method: str, request, deadline):
        tries = self.attempts()
        for i, (stub, pause) in enumerate(tries):
            if pause:
                await asyncio.sleep(min(pause, _remaining(deadline) or pause))
            try:
                return await getattr(stub, method)(request, timeout=_remaining(deadline), metadata=self.metadata)
            except grpc.RpcError as error:
                if error.code() not in FAILOVER_CODES or i == len(tries) - 1:
                    raise ConvRpcError.from_rpc_error(error) from None
