"""A seeded, bounded fuzz of every RPC: captured request bytes, mutated, sent raw. The server answers each
with a status a client can act on, never INTERNAL or UNKNOWN, never dies, and leaks nothing."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import grpc
import numpy as np
import pytest
from convrpc import chunks, wire
from convrpc.client import ConvClient
from convrpc.v1 import conv_service_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fixtures import RawSession, memfd, running_server

METHOD = "/convrpc.v1.ConvService/"
#: What a mutated request may get, shared-memory requests included (a mutated session or region id is
#: FAILED_PRECONDITION).
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED}  # fmt: skip
#: Varints a mutation plants: the edges of int32/int64 and the sizes kernels multiply.
EDGES = [0, 1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1, 2**70]

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 9, 9))
W = rng.standard_normal((4, 3, 3, 3))
T = wire.encode_tensor


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _forward(op, **tensors) -> bytes:
    return pb.ForwardRequest(op=op, **tensors).SerializeToString()


def _corpus(session_id: str, region_id: int) -> list[tuple[str, list[bytes]]]:
    """(RPC, its request messages' bytes) for every RPC and op."""
    conv = wire.encode_op("conv2d", stride=2, padding=1, dilation=1, groups=1)
    convt = wire.encode_op("conv_transpose2d", stride=2, padding=1, output_padding=1)
    pool = wire.encode_op("max_pool2d", kernel_size=3, stride=2, padding=1)
    avg = wire.encode_op("avg_pool2d", kernel_size=2)
    relu = wire.encode_op("relu")
    y = np.ones((2, 4, 5, 5))
    unary = [
        ("Forward", [_forward(conv, input=T(X), weight=T(W), bias=T(np.ones(4)))]),
        ("Forward", [_forward(convt, input=T(X), weight=T(np.ones((3, 2, 3, 3))))]),
        ("Forward", [_forward(pool, input=T(X))]),
        ("Forward", [_forward(avg, input=T(X))]),
        ("Backward", [pb.BackwardRequest(op=conv, input=T(X), weight=T(W), grad_output=T(y)).SerializeToString()]),
        ("Backward", [pb.BackwardRequest(op=pool, input=T(X), grad_output=T(np.ones((2, 3, 5, 5)))).SerializeToString()],
         ),
        ("TrainKernel", [pb.TrainKernelRequest(input=T(X), target=T(np.ones((2, 4, 7, 7))), kernel_size=pb.Size2(
            height=3, width=3), max_steps=3, sgd=pb.SgdOptions(lr=0.01), snapshot_every=1).SerializeToString()]),
        ("GetServerInfo", [pb.GetServerInfoRequest().SerializeToString()]),
        ("OpenSharedMemorySession", [pb.OpenSharedMemorySessionRequest().SerializeToString()]),
        ("CloseSharedMemorySession", [pb.CloseSharedMemorySessionRequest(session_id="0" * 32).SerializeToString()]),
    ]  # fmt: skip
    header = pb.ForwardStreamRequest(request=pb.ForwardRequest(op=relu, input=wire.tensor_header(X)))
    data = X.tobytes()
    stream = [header.SerializeToString()] + [chunks.encode_chunk(o, data[o : o + 500]) for o in range(0, len(data), 500)]
    back = pb.BackwardStreamRequest(request=pb.BackwardRequest(
        op=relu, input=wire.tensor_header(X), grad_output=wire.tensor_header(X)))  # fmt: skip
    shared = pb.ForwardRequest(
        op=relu, input=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=X.shape,
                                 shared=pb.SharedSpan(region_id=region_id, offset=0)),
        shared_memory=pb.SharedMemoryContext(session_id=session_id, output_buffer=pb.SharedBuffer(
            region_id=region_id, offset=1 << 16, size=1 << 16)),
    )  # fmt: skip
    return unary + [
        ("ForwardStream", stream),
        ("BackwardStream", [back.SerializeToString()] + [chunks.encode_chunk(o, (data * 2)[o : o + 700])
                                                         for o in range(0, 2 * len(data), 700)]),
        ("Forward", [shared.SerializeToString()]),
    ]


@st.composite
def mutations(draw, message: bytes) -> bytes:
    """``message`` with a few of: a byte flipped, a varint planted, bytes cut or duplicated."""
    data = bytearray(message)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "varint", "cut", "dup", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "varint":
            edge = draw(st.sampled_from(EDGES))
            data[at : at + draw(st.integers(1, 10))] = _varint(edge)
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def target():
    limits = dict(max_elements=1 << 16, max_request_bytes=1 << 20, max_op_flops=1e9, max_train_steps=20,
                  max_train_seconds=2.0, stream_idle_timeout=5.0)  # fmt: skip
    with running_server(**limits) as server:
        with grpc.insecure_channel(server.target) as channel:
            yield server, channel


@pytest.fixture(scope="module")
def session(target):
    _, channel = target
    opened = RawSession(channel.unary_unary(
        METHOD + "OpenSharedMemorySession", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.OpenSharedMemorySessionResponse.FromString))  # fmt: skip
    fd = memfd(1 << 17, X.tobytes())
    assert opened.add(1, fd) == (0, "")
    yield opened.id, 1
    os.close(fd)
    opened.close()


def _send(channel, rpc: str, messages: list[bytes]) -> grpc.StatusCode:
    identity = {"request_serializer": lambda m: m, "response_deserializer": lambda m: m}
    try:
        if rpc in ("ForwardStream", "BackwardStream"):
            list(channel.stream_stream(METHOD + rpc, **identity)(iter(messages), timeout=60))
        elif rpc == "TrainKernel":
            list(channel.unary_stream(METHOD + rpc, **identity)(messages[0], timeout=60))
        else:
            channel.unary_unary(METHOD + rpc, **identity)(messages[0], timeout=60)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _warm_float32(target: str) -> None:
    """Run every kernel in float32 too: a mutated dtype must not count numba's first compile as a leak."""
    x, w, ones = X.astype(np.float32), W.astype(np.float32), lambda *shape: np.ones(shape, np.float32)
    with ConvClient(target, timeout=600, data_path="unary") as c:
        c.conv2d(x, w, ones(4), stride=2, padding=1)
        c.conv2d_backward(ones(2, 4, 5, 5), x, w, ones(4), stride=2, padding=1)
        c.conv_transpose2d(x, ones(3, 2, 3, 3), stride=2, padding=1, output_padding=1)
        c.max_pool2d(x, 3, 2, 1)
        c.max_pool2d_backward(ones(2, 3, 5, 5), x, 3, 2, 1)
        c.avg_pool2d(x, 2)
        c.avg_pool2d_backward(ones(2, 3, 4, 4), x, 2)
        c.relu_backward(x, c.relu(x))
        c.train_kernel(x, ones(2, 4, 7, 7), kernel_size=3, max_steps=2, snapshot_every=1).result()


def test_mutated_requests_of_every_rpc_get_only_actionable_statuses_and_leak_nothing(target, session):
    server, channel = target
    corpus = _corpus(*session)
    for rpc, messages in corpus:  # the unmutated corpus is served (and warms everything up)
        assert _send(channel, rpc, messages) is grpc.StatusCode.OK, rpc
    _warm_float32(server.target)
    threads, fds, rss = threading.active_count(), _fds(), _rss()
    seen: dict[str, set] = {}

    @settings(max_examples=int(os.environ.get("CONVRPC_FUZZ_EXAMPLES", "1000")), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.data())
    def fuzz(data):
        rpc, messages = data.draw(st.sampled_from(corpus))
        which = data.draw(st.integers(0, len(messages) - 1))
        mutated = list(messages)
        mutated[which] = data.draw(mutations(messages[which]))
        code = _send(channel, rpc, mutated)
        seen.setdefault(rpc, set()).add(code)
        assert code in ALLOWED, (rpc, code, mutated[which].hex())

    fuzz()
    for rpc, messages in corpus:  # and served correctly afterwards
        assert _send(channel, rpc, messages) is grpc.StatusCode.OK, rpc
    assert set(seen) == {rpc for rpc, _ in corpus}
    assert threading.active_count() <= threads + 2
    assert _fds() <= fds + 10
    assert _rss() - rss < 50 << 20


def test_mutated_side_channel_handshakes_and_payloads_get_only_actionable_statuses_and_leak_nothing():
    """A real offer each time, then the bytes a client sends on the side socket (token, length, payload), mutated."""
    x = X.astype(np.float32)
    header = pb.ForwardStreamRequest(request=pb.ForwardRequest(op=pb.Op(relu=pb.ReluOptions()),
                                     input=wire.tensor_header(x, "input")), side_channel=True)  # fmt: skip
    with running_server(backend="numpy", warm_up=False, stream_idle_timeout=1.0) as server:
        with grpc.insecure_channel(server.target) as channel, ConvClient(server.target, timeout=60) as client:
            stream = channel.stream_stream(
                METHOD + "ForwardStream", request_serializer=pb.ForwardStreamRequest.SerializeToString,
                response_deserializer=pb.ForwardStreamResponse.FromString)  # fmt: skip
            with ConvClient(server.target, timeout=60, data_path="stream") as warm:
                for _ in range(3):  # the stream watcher and a few handler threads start
                    np.testing.assert_array_equal(warm.relu(x), np.maximum(x, 0))
            threads, fds = threading.active_count(), _fds()

            @settings(max_examples=max(20, int(os.environ.get("CONVRPC_FUZZ_EXAMPLES", "1000")) // 25), deadline=None,
                      derandomize=True, database=None, suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(st.data())
            def fuzz(data):
                call = stream(iter([header]), timeout=30)
                offer = next(call).side_channel
                sent = offer.token + x.nbytes.to_bytes(8, "little") + x.tobytes()
                answer = b""
                with socket.create_connection(("127.0.0.1", offer.port), timeout=10) as sock:
                    with contextlib.suppress(OSError):  # the server may close on us mid-send
                        sock.sendall(data.draw(mutations(sent)))
                        sock.shutdown(socket.SHUT_WR)  # nothing more comes: a stall is test_side_channel's
                        while chunk := sock.recv(1 << 16):
                            answer += chunk
                if not answer.startswith(b"\x01"):
                    call.cancel()  # token or length refused: the call would wait out the token's life
                    return
                try:
                    for _ in call:
                        pass
                except grpc.RpcError as exc:
                    assert exc.code() in ALLOWED, (exc.code(), exc.details())

            fuzz()
            np.testing.assert_array_equal(client.relu(x), np.maximum(x, 0))
            assert server.servicer.slots._used == 0
            assert threading.active_count() <= threads + 2, [t.name for t in threading.enumerate()]
            assert _fds() <= fds + 10
