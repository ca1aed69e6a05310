"""The SDK's call core without any I/O: sharding, path choice and fallback, failover, ejection and return."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from convrpc import shm, wire
from convrpc.client import ConvRpcError, config
from convrpc.client.calls import BATCHED, CallCore, Gather, Sleep, Spawn, Stream, drive, merge, split
from convrpc.client.messages import Call
from convrpc.core import get_backend
from convrpc.v1 import conv_service_pb2 as pb

REF = get_backend("numpy")

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


def _call(op, shapes, options, backward=False, seed=0, deadline=None) -> Call:
    rng = np.random.default_rng(seed)
    arrays = {f: rng.standard_normal(s) for f, s in shapes.items()}
    if backward:
        arrays = {"grad_output": rng.standard_normal(getattr(REF, op)(**arrays, **options).shape), **arrays}
    return Call(op, wire.encode_op(op, **options), backward, arrays, deadline)


def _compute(call: Call) -> dict[str, np.ndarray]:
    """The reference result of a call, computed here from its arrays."""
    name, options = wire.decode_op(call.message)
    spec = wire.OP_SPECS[name]
    fields = spec.request_tensors(call.backward)
    result = getattr(REF, f"{name}_backward" if call.backward else name)(*map(call.arrays.get, fields), **options)
    results = result if isinstance(result, tuple) else (result,)
    return {f: a for f, a in zip(spec.result_tensors(call.backward, options), results) if a is not None}


def _answer(effect) -> object:
    """What a healthy server answers to a unary effect, computed with the reference backend."""
    if effect.method == "Check":
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    request = effect.request
    backward = effect.method == "Backward"
    name = wire.op_name(request.op)
    arrays = {
        f: wire.decode_tensor(getattr(request, f), f)
        for f in wire.OP_SPECS[name].request_tensors(backward)
        if request.HasField(f)
    }
    results = _compute(Call(name, request.op, backward, arrays, None))
    kind = pb.BackwardResponse if backward else pb.ForwardResponse
    return kind(**{f: wire.encode_tensor(a) for f, a in results.items()})


class _Failure(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


class Servers:
    """A driver for the core over fake replicas: ``fail[i]`` makes replica i fail every call with that code."""

    def __init__(self, fail=None):
        self.fail = dict(fail or {})
        self.calls: list[tuple[int, str]] = []
        self.slept = 0.0

    def drive(self, generator):
        return drive(generator, self._do)

    def _do(self, effect):
        if isinstance(effect, Sleep):
            self.slept += effect.seconds
            return None
        if isinstance(effect, Gather):
            return [self.drive(part) for part in effect.parts]
        if isinstance(effect, Spawn):
            return self.drive(effect.steps)
        self.calls.append((effect.replica.index, effect.method))
        code = self.fail.get(effect.replica.index)
        if code is not None:
            raise _Failure(code)
        if isinstance(effect, Stream):
            raise _Failure(grpc.StatusCode.UNIMPLEMENTED)  # an older server: no streams
        return _answer(effect)


def _same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for field, value in want.items():
        assert got[field].shape == value.shape and got[field].dtype == value.dtype, field
        assert np.max(np.abs(got[field] - value)) <= 1e-12 * max(1.0, float(np.max(np.abs(value)))), field


# -- sharding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("op, shapes, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shard_size", [1, 3])
def test_shards_merge_to_the_unsharded_result(backward, op, shapes, options, shard_size):
    call = _call(op, shapes, options, backward)
    parts = split(call, shard_size, None)
    assert len(parts) == -(-7 // shard_size)
    rows = [p.arrays["input"].shape[0] for p in parts]
    assert sum(rows) == 7 and max(rows) <= shard_size and max(rows) - min(rows) <= 1  # as even as possible
    for part in parts:  # the unbatched tensors go whole to every shard, the batched ones are views
        assert all(part.arrays[f] is call.arrays[f] for f in ("weight", "bias") if f in call.arrays)
        assert np.shares_memory(part.arrays["input"], call.arrays["input"])
    _same(merge([_compute(p) for p in parts]), _compute(call))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_shards_are_sized_to_fit_the_message_limit(backward):
    # conv_transpose2d with stride 3 makes outputs ~9x the input: the response decides the forward shards.
    op, shapes, options = CASES[1]
    call = _call(op, dict(shapes, input=(40, 4, 5, 5)), options, backward)
    limit = config.FRAMING_BYTES + 40_000
    parts = split(call, None, limit)
    assert len(parts) > 1

    def size(c):  # the request and the response of a shard, as unary messages
        request = pb.BackwardRequest if c.backward else pb.ForwardRequest
        response = pb.BackwardResponse if c.backward else pb.ForwardResponse
        tensors = {f: wire.encode_tensor(a) for f, a in c.arrays.items()}
        results = {f: wire.encode_tensor(a) for f, a in _compute(c).items()}
        return max(request(op=c.message, **tensors).ByteSize(), response(**results).ByteSize())

    assert max(size(p) for p in parts) <= limit
    # ... and no smaller than needed: one more row per shard would not fit.
    widest = max(p.arrays["input"].shape[0] for p in parts)
    one_more = call.with_arrays({f: a[: widest + 1] if f in BATCHED else a for f, a in call.arrays.items()})
    assert size(one_more) > limit - config.FRAMING_BYTES
    _same(merge([_compute(p) for p in parts]), _compute(call))


def test_calls_that_need_no_split_or_are_malformed_go_whole():
    op, shapes, options = CASES[0]
    assert len(split(_call(op, shapes, options, True), None, 2**31)) == 1
    assert len(split(_call(op, dict(shapes, input=(1, 4, 9, 8)), options), 1, None)) == 1
    assert len(split(_call(op, dict(shapes, input=(4, 9, 8)), options), 1, None)) == 1  # unbatched (C, H, W)
    bad = _call(op, shapes, options, True)
    bad.arrays["grad_output"] = bad.arrays["grad_output"][:6]  # N differs from the input's: the server says so
    assert len(split(bad, 1, None)) == 1


def test_shard_size_and_data_path_are_checked():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="shard_size"):
            CallCore(["a:1"], shard_size=bad)
    with pytest.raises(ValueError, match="data_path"):
        CallCore(["a:1"], mode="fast")


# -- failover, ejection, return ---------------------------------------------------------------------


def test_a_shard_failing_unavailable_moves_to_another_replica_and_the_replica_is_ejected():
    core = CallCore(["a:1", "b:1", "c:1"], mode="unary", shard_size=1)
    servers = Servers({0: grpc.StatusCode.UNAVAILABLE})
    call = _call(*CASES[0], backward=True)
    _same(servers.drive(core.call(call)), _compute(call))
    tried = [i for i, _ in servers.calls]
    assert tried.count(0) == 1 and len(tried) == 8  # 7 shards, one of them tried twice
    assert core.replicas[0].ejected and not core.replicas[1].ejected
    servers.calls.clear()
    servers.drive(core.call(call))
    assert 0 not in [i for i, _ in servers.calls]  # passed over while others are healthy


def test_an_ejected_replica_returns_after_a_health_check_says_serving():
    now = [0.0]
    core = CallCore(["a:1", "b:1"], mode="unary", clock=lambda: now[0])
    servers = Servers({0: grpc.StatusCode.UNAVAILABLE})
    call = _call(*CASES[4])
    for _ in range(2):
        servers.drive(core.call(call))
    assert core.replicas[0].ejected
    now[0] += config.EJECT_SECONDS / 2
    servers.drive(core.call(call))
    assert (0, "Check") not in servers.calls  # not yet due
    now[0] += config.EJECT_SECONDS
    servers.drive(core.call(call))
    assert (0, "Check") in servers.calls and core.replicas[0].ejected  # the check failed: still out, for longer
    assert core.replicas[0].ejected_until == pytest.approx(now[0] + 2 * config.EJECT_SECONDS)
    del servers.fail[0]
    now[0] += 3 * config.EJECT_SECONDS
    servers.calls.clear()
    for _ in range(4):
        servers.drive(core.call(call))
    assert not core.replicas[0].ejected and sorted({i for i, _ in servers.calls}) == [0, 1]


def test_other_errors_are_not_retried_and_all_replicas_down_is_unavailable():
    call = _call(*CASES[0])
    servers = Servers({0: grpc.StatusCode.INVALID_ARGUMENT})
    with pytest.raises(ConvRpcError) as info:
        servers.drive(CallCore(["a:1", "b:1"], mode="unary").call(call))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and servers.calls == [(0, "Forward")]
    servers = Servers({0: grpc.StatusCode.UNAVAILABLE, 1: grpc.StatusCode.UNAVAILABLE})
    with pytest.raises(ConvRpcError) as info:
        servers.drive(CallCore(["a:1", "b:1"], mode="unary").call(call))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(servers.calls) == 2 + len(config.RETRY_PAUSES) and servers.slept == sum(config.RETRY_PAUSES)


def test_the_deadline_covers_every_attempt_and_pause():
    now = [0.0]
    core = CallCore(["a:1"], mode="unary", clock=lambda: now[0])
    servers = Servers({0: grpc.StatusCode.UNAVAILABLE})
    original = servers._do

    def slow(effect):  # every attempt takes 0.04 s of the call's 0.1 s
        now[0] += 0.04
        return original(effect)

    servers._do = slow
    call = _call(*CASES[4], deadline=core.deadline(0.1))
    with pytest.raises(ConvRpcError) as info:
        servers.drive(core.call(call))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and now[0] <= 0.1 + 0.04 * 2


# -- path choice ------------------------------------------------------------------------------------


def test_auto_takes_unary_for_small_calls_and_drops_a_refused_stream_path_for_that_replica_only():
    core = CallCore(["10.0.0.1:1", "10.0.0.2:1"], mode="auto", shard_size=None)
    servers = Servers()
    small = _call("relu", dict(input=(4, 4)), {})
    big = _call("relu", dict(input=(1, 200, 200)), {})  # 320 KB: past the stream threshold
    servers.drive(core.call(small))
    assert servers.calls == [(0, "Forward")]
    servers.calls.clear()
    _same(servers.drive(core.call(big)), _compute(big))
    assert servers.calls == [(1, "ForwardStream"), (1, "Forward")]  # refused, then unary at once, same replica
    assert not core.replicas[1].stream_ok and core.replicas[0].stream_ok
    assert not core.replicas[0].ejected and not core.replicas[1].ejected  # a refusal is not a failure


def test_forced_paths_fail_instead_of_falling_back():
    servers = Servers()
    with pytest.raises(ConvRpcError) as info:
        servers.drive(CallCore(["10.0.0.1:1"], mode="stream").call(_call("relu", dict(input=(4, 4)), {})))
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED and servers.calls == [(0, "ForwardStream")]


class SharedServers(Servers):
    """Fake local replicas that open real shared-memory sessions (the server's socket side, in this process)
    but answer every shared request with ``refusal``."""

    def __init__(self, refusal, details=""):
        from convrpc.server.shared_memory import SharedMemorySessions

        super().__init__()
        self.refusal, self.refusal_details = refusal, details
        self.sessions = SharedMemorySessions(enabled=True, max_region_bytes=1 << 30)

    def _do(self, effect):
        if getattr(effect, "method", None) == "OpenSharedMemorySession":
            self.calls.append((effect.replica.index, effect.method))
            return self.sessions.open()
        if getattr(effect, "request", None) is not None and effect.request.HasField("shared_memory"):
            self.calls.append((effect.replica.index, "shared " + effect.method))
            error = _Failure(self.refusal)
            error.details = lambda: self.refusal_details
            raise error
        return super()._do(effect)


@pytest.mark.skipif(not shm.AVAILABLE, reason="needs Linux memfds and fd passing")
def test_a_call_too_large_for_the_clients_region_pool_alone_goes_over_the_network():
    core = CallCore(["127.0.0.1:1"], mode="auto", shm_pool_bytes=256 << 10)
    servers = SharedServers(grpc.StatusCode.INTERNAL)
    big = _call("relu", dict(input=(1, 200, 200)), {})  # 320 KB in, 320 KB out: over the pool
    try:
        _same(servers.drive(core.call(big)), _compute(big))
        assert [m for _, m in servers.calls] == ["OpenSharedMemorySession", "ForwardStream", "Forward"]
        assert core.replicas[0].shm_ok and core.replicas[0].session is not None  # the next call tries again
    finally:
        core.close()
        servers.sessions.close()


@pytest.mark.skipif(not shm.AVAILABLE, reason="needs Linux memfds and fd passing")
def test_a_forgotten_session_is_reopened_once_then_shared_memory_is_dropped_for_that_replica():
    core = CallCore(["127.0.0.1:1"], mode="auto")
    servers = SharedServers(grpc.StatusCode.FAILED_PRECONDITION, "shared_memory.session_id: unknown session")
    big = _call("relu", dict(input=(1, 200, 200)), {})
    try:
        _same(servers.drive(core.call(big)), _compute(big))
        assert [m for _, m in servers.calls] == [
            "OpenSharedMemorySession", "shared Forward", "OpenSharedMemorySession", "shared Forward",
            "ForwardStream", "Forward",
        ]  # fmt: skip
        assert not core.replicas[0].shm_ok and not core.replicas[0].ejected
    finally:
        core.close()
        servers.sessions.close()


def test_a_call_over_a_server_cap_is_cut_to_fit_it():
    x = np.ones((10, 2, 5, 5))
    call = Call("relu", wire.encode_op("relu"), False, {"input": x}, None)
    assert len(split(call, None, None, {"max_elements": 100})) == 5  # 50 elements a row: 2 rows a shard
    assert len(split(call, None, None, {"max_request_bytes": 1200})) == 4  # 400 bytes a row: 3 rows a shard
    assert split(call, None, None, {"max_elements": 10}) == [call]  # one row is over the cap: no cut helps


@pytest.mark.skipif(not shm.AVAILABLE, reason="needs Linux memfds and fd passing")
def test_a_shared_memory_socket_that_stops_answering_fails_the_replica_over_as_unavailable(monkeypatch):
    from convrpc.client.shared_memory import SharedMemorySession

    def frozen(self, region):
        raise TimeoutError("timed out")

    monkeypatch.setattr(SharedMemorySession, "hand_over", frozen)
    core = CallCore(["127.0.0.1:1"], mode="shm")
    servers = SharedServers(grpc.StatusCode.INTERNAL)
    try:
        with pytest.raises(ConvRpcError) as info:
            servers.drive(core.call(_call("relu", dict(input=(1, 200, 200)), {})))
        assert info.value.code is grpc.StatusCode.UNAVAILABLE and "shared-memory socket" in info.value.message
        # one fresh session per attempt (the frozen one is dropped), then the replica is ejected
        assert [m for _, m in servers.calls] == ["OpenSharedMemorySession"] * (1 + len(config.RETRY_PAUSES))
        assert core.replicas[0].session is None
    finally:
        core.close()
        servers.sessions.close()
