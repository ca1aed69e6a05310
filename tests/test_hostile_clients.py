"""Clients doing what issue #12's table lists, against a real server: it survives, refuses with a clear
status, leaks nothing, and serves other clients correctly throughout."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
from convrpc import shm
from convrpc.client import ConvClient, ConvRpcError
from convrpc.core import available_backends
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc
from server_fixtures import RawSession, memfd, running_server
from server_processes import server_processes

pytestmark = pytest.mark.skipif(not shm.AVAILABLE, reason="needs Linux memfds and fd passing")

SERVER_ENV = {"CONVRPC_BACKEND": "numpy", "CONVRPC_WARM_UP": "0"}
X = np.arange(1024, dtype=np.float32) - 512  # 4 KiB
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int, kind: str = "VmRSS") -> int:
    """A process's resident bytes: all of them, or of one kind ("RssShmem": shared memory it has mapped)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(kind + ":"))


class Session(RawSession):
    """A shared-memory session opened by hand with raw stubs, as a hostile client would."""

    def __init__(self, stub):
        super().__init__(stub.OpenSharedMemorySession)
        self.stub = stub

    def relu(self, region_id: int, *, offset: int = 0, buffer_size: int = 4096, timeout: float = 30):
        request = pb.ForwardRequest(
            op=pb.Op(relu=pb.ReluOptions()),
            input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=X.shape,
                            shared=pb.SharedSpan(region_id=region_id, offset=offset)),
            shared_memory=pb.SharedMemoryContext(
                session_id=self.id, output_buffer=pb.SharedBuffer(region_id=region_id, offset=8192, size=buffer_size)
            ),
        )  # fmt: skip
        return self.stub.Forward(request, timeout=timeout)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class Bystander:
    """Another client making correct calls on every path for as long as a hostile one is at work."""

    def __init__(self, target: str):
        self.target, self.done, self.calls, self.errors = target, threading.Event(), 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        x = np.random.default_rng(0).standard_normal((2, 3, 40, 40)).astype(np.float32)
        with ConvClient(self.target, timeout=60) as client:
            while not self.done.is_set():
                for path in ("unary", "stream", "shm"):
                    try:
                        got = client.relu(x) if path == "unary" else _on_path(self.target, path, x)
                        np.testing.assert_array_equal(got, np.maximum(x, 0))
                        self.calls += 1
                    except Exception as exc:  # noqa: BLE001 - reported by stop()
                        self.errors.append(f"{path}: {exc!r}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(120)
        assert not self.errors, self.errors[:3]
        assert self.calls > 0


_PATH_CLIENTS: dict[tuple[str, str], ConvClient] = {}


def _on_path(target: str, path: str, x: np.ndarray) -> np.ndarray:
    client = _PATH_CLIENTS.get((target, path))
    if client is None:
        client = _PATH_CLIENTS[(target, path)] = ConvClient(target, timeout=60, data_path=path)
    return client.relu(x)


@pytest.fixture(autouse=True)
def _close_path_clients():
    yield
    while _PATH_CLIENTS:
        _PATH_CLIENTS.popitem()[1].close()


@pytest.fixture(scope="module")
def proc():
    with server_processes(1, env=SERVER_ENV) as (server,):
        yield server


@pytest.fixture()
def stub(proc):
    with grpc.insecure_channel(proc.target) as channel:
        yield pb_grpc.ConvServiceStub(channel)


# -- row 1: a sealed region cannot shrink, so a client cannot truncate the server into SIGBUS ----------


def test_a_client_cannot_truncate_or_grow_its_sealed_region_and_the_server_lives_on(proc, stub):
    session = Session(stub)
    fd = memfd(1 << 20, X.tobytes())
    try:
        assert session.add(1, fd) == (0, "")
        assert _code(lambda: session.relu(1)) is grpc.StatusCode.OK
        for size in (0, 4096, 2 << 20):
            with pytest.raises(PermissionError):  # EPERM: F_SEAL_SHRINK, F_SEAL_GROW
                os.ftruncate(fd, size)
        stop = threading.Event()

        def punch():  # punch the region's pages out as fast as possible while calls read and write it
            while not stop.is_set():
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
                os.pwrite(fd, X.tobytes(), 0)

        puncher = threading.Thread(target=punch, daemon=True)
        with Bystander(proc.target):
            puncher.start()
            try:
                codes = {_code(lambda: session.relu(1)) for _ in range(300)}
            finally:
                stop.set()
                puncher.join()
        assert codes == {grpc.StatusCode.OK}, codes  # a punched hole reads as zeros: wrong values, no crash
        assert os.fstat(fd).st_size == 1 << 20
        assert proc.process.poll() is None, proc.output()
    finally:
        os.close(fd)
        session.close()


# -- row 2: a huge sparse region costs the server only the request's bytes --------------------------


def test_a_sparse_region_far_larger_than_its_tensor_commits_only_the_tensors_bytes(proc, stub):
    session = Session(stub)
    fd = memfd(512 << 20, X.tobytes())
    try:
        assert session.add(1, fd) == (0, "")
        before = _rss(proc.process.pid)
        for _ in range(20):
            out = session.relu(1)
        assert out.output.shared.region_id == 1
        got = np.empty_like(X)
        os.preadv(fd, [memoryview(got).cast("B")], out.output.shared.offset)
        np.testing.assert_array_equal(got, np.maximum(X, 0))
        assert os.fstat(fd).st_blocks * 512 < 1 << 20, "the server committed pages of the region it did not need"
        assert _rss(proc.process.pid) - before < 50 << 20
    finally:
        os.close(fd)
        session.close()


def test_a_region_larger_than_the_cap_is_refused_naming_the_setting():
    with running_server(backend="numpy", warm_up=False, shm_max_region_bytes=1 << 20) as server:
        with grpc.insecure_channel(server.target) as channel:
            session = Session(pb_grpc.ConvServiceStub(channel))
            fd = memfd(2 << 20, X.tobytes())
            try:
                code, message = session.add(1, fd)
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "shm_max_region_bytes" in message
                with pytest.raises(grpc.RpcError) as info:  # a request naming it says why, naming its field
                    session.relu(1)
                assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert info.value.details().startswith("input.shared.region_id: region 1 was refused")
                assert "shm_max_region_bytes" in info.value.details()
            finally:
                os.close(fd)
                session.close()


def test_the_server_maps_a_bounded_total_of_client_regions_and_frees_it_with_each_session(monkeypatch):
    from convrpc.core import config

    monkeypatch.setattr(config, "SHM_MAX_MAPPED_BYTES", 3 << 20)
    with running_server(backend="numpy", warm_up=False) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ConvServiceStub(channel)
            fds = [memfd(2 << 20, X.tobytes()) for _ in range(2)]
            try:
                first, second = Session(stub), Session(stub)
                assert first.add(1, fds[0]) == (0, "")
                code, message = second.add(1, fds[1])
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "client regions" in message
                first.close()  # its mapping goes with its session, and the other may map now
                deadline = time.monotonic() + 10
                while (code := second.add(2, fds[1])[0]) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert code == 0 and _code(lambda: second.relu(2)) is grpc.StatusCode.OK
                second.close()
            finally:
                for fd in fds:
                    os.close(fd)


# -- row 9: only sealed memfds are mapped; anything else is refused -----------------------------------


def _dev_shm_file():  # what shm_open makes: a tmpfs file, which cannot take seals
    path = f"/dev/shm/convrpc-test-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.unlink(path)
    os.ftruncate(fd, 1 << 20)
    return fd


def _disk_file(tmp_path):
    fd = os.open(tmp_path / "region", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 20)
    return fd


def _read_only():
    fd = memfd(1 << 20, X.tobytes())
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind, code, words", [
    ("unsealed memfd", "FAILED_PRECONDITION", "not sealed against shrinking"),
    ("write-sealed memfd", "FAILED_PRECONDITION", "sealed against writes"),
    ("disk file", "FAILED_PRECONDITION", "cannot be sealed"),
    ("/dev/shm file", "FAILED_PRECONDITION", "not sealed against shrinking"),
    ("read-only memfd", "FAILED_PRECONDITION", "reading and writing"),
    ("pipe", "FAILED_PRECONDITION", "not a memfd"),
    ("socket", "FAILED_PRECONDITION", "not a memfd"),
    ("directory", "FAILED_PRECONDITION", "not a memfd"),
    ("empty memfd", "INVALID_ARGUMENT", "empty"),
])  # fmt: skip
def test_anything_but_a_sealed_writable_memfd_is_refused_naming_the_field(proc, stub, tmp_path, kind, code, words):
    opened, session = [], Session(stub)
    if kind == "unsealed memfd":
        opened.append(memfd(1 << 20, X.tobytes(), seals=0))
    elif kind == "write-sealed memfd":
        opened.append(memfd(1 << 20, X.tobytes(), seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE))
    elif kind == "disk file":
        opened.append(_disk_file(tmp_path))
    elif kind == "/dev/shm file":
        opened.append(_dev_shm_file())
    elif kind == "read-only memfd":
        opened.append(_read_only())
    elif kind == "pipe":
        opened.extend(os.pipe())
    elif kind == "socket":
        pair = socket.socketpair()
        opened.extend(s.detach() for s in pair)
    elif kind == "directory":
        opened.append(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    else:
        opened.append(memfd(0))
    try:
        got, message = session.add(7, opened[0])
        assert got == getattr(grpc.StatusCode, code).value[0] and message.startswith("region:") and words in message
        with pytest.raises(grpc.RpcError) as info:
            session.relu(7)
        assert info.value.code() is getattr(grpc.StatusCode, code), info.value.details()
        assert info.value.details().startswith("input.shared.region_id: region 7 was refused") and words in info.value.details()
        fd = memfd(1 << 20, X.tobytes())  # the session goes on
        try:
            assert session.add(8, fd) == (0, "")
            assert _code(lambda: session.relu(8)) is grpc.StatusCode.OK
        finally:
            os.close(fd)
    finally:
        for fd in opened:
            os.close(fd)
        session.close()


def test_a_session_reaches_only_the_regions_it_was_handed(proc, stub):
    victim, attacker = Session(stub), Session(stub)
    fd = memfd(1 << 20, X.tobytes())
    try:
        assert victim.add(1, fd) == (0, "")
        assert _code(lambda: victim.relu(1)) is grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as info:
            attacker.relu(1)  # the same region id, in its own session: there is no such region
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details().startswith("input.shared.region_id: no region 1")
    finally:
        os.close(fd)
        victim.close()
        attacker.close()


# -- row 8: the session is the socket: a client killed outright leaves nothing ---------------------

_KILLED_CLIENT = """
import sys, time, numpy as np
from convrpc.client import ConvClient
client = ConvClient(sys.argv[1], data_path="shm")
held = [client.relu(np.ones((4, 1 << 20), np.float32) * -i) for i in range(4)]  # 4 x 16 MiB of results
print(client._core.replicas[0].session.id, flush=True)
time.sleep(600)
"""


def _settled(measure, baseline: int, slack: int, seconds: float = 30) -> int:
    deadline = time.monotonic() + seconds
    while measure() > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.05)
    return measure()


def test_a_client_killed_with_its_whole_process_group_leaves_nothing(proc):
    pid = proc.process.pid
    with ConvClient(proc.target, timeout=60, data_path="shm") as warm:  # the socket thread and first mappings
        warm.relu(X)
    files, rss, shared = _open_files(pid), _rss(pid), _rss(pid, "RssShmem")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    client = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_CLIENT), proc.target],
        stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        assert len(client.stdout.readline().strip()) == 32
        assert _open_files(pid) > files and _rss(pid, "RssShmem") > shared + (32 << 20)  # mapped while it lives
        with Bystander(proc.target):
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
        while _PATH_CLIENTS:  # the bystander's own sessions
            _PATH_CLIENTS.popitem()[1].close()
        assert _settled(lambda: _open_files(pid), files, 0) <= files
        assert _settled(lambda: _rss(pid, "RssShmem"), shared, 1 << 20) - shared < 1 << 20  # every mapping gone
        assert _rss(pid) - rss < 50 << 20
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
        client.stdout.close()
    with ConvClient(proc.target, timeout=60, data_path="shm") as other:
        np.testing.assert_array_equal(other.relu(X), np.maximum(X, 0))


def test_a_session_never_connected_or_closed_holds_nothing(proc, stub):
    session = Session(stub)
    fd = memfd(1 << 20, X.tobytes())
    try:
        assert session.add(1, fd) == (0, "")
        stub.CloseSharedMemorySession(pb.CloseSharedMemorySessionRequest(session_id=session.id), timeout=30)
        assert session.sock.recv(shm.MAX_MESSAGE) == b""  # the server hung up
        assert _code(lambda: session.relu(1)) is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        os.close(fd)
        session.close()


# -- rows 3 and 4: nothing a client withholds holds the server ---------------------------------------

METHOD = "/convrpc.v1.ConvService/"


def _raw_stream(channel, method="ForwardStream"):
    return channel.stream_stream(
        METHOD + method,
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=lambda raw: raw,
    )


def _relu_header(shape):
    return pb.ForwardStreamRequest(
        request=pb.ForwardRequest(op=pb.Op(relu=pb.ReluOptions()), input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape))
    )


def test_streams_that_send_nothing_hold_no_slot_and_end_after_the_idle_timeout():
    held = threading.Event()

    def silent(header: bool):  # a stream that sends its header (or nothing at all) and then nothing
        if header:
            yield _relu_header((250,))
        held.wait(120)

    with running_server(backend="numpy", warm_up=False, max_concurrent_rpcs=2, workers=16,
                        stream_idle_timeout=1.0) as server:  # fmt: skip
        with grpc.insecure_channel(server.target) as channel:
            try:
                calls = [_raw_stream(channel)(silent(i % 2 == 0)) for i in range(8)]
                with ConvClient(server.target, timeout=60) as client:
                    for _ in range(20):  # every slot stays free for the others
                        np.testing.assert_array_equal(client.relu(X), np.maximum(X, 0))
                codes = {call.code() for call in calls}
                assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
                assert all("stream_idle_timeout" in call.details() for call in calls)
            finally:
                held.set()


def _wait_logged(caplog, text: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"never logged: {text}"
        time.sleep(0.05)


def test_a_client_that_stops_reading_a_stream_loses_it_and_holds_no_slot(caplog):
    x = np.ones(4 << 20, np.float32)  # 16 MiB each way: far beyond what flow control lets through unread
    with running_server(backend="numpy", warm_up=False, max_concurrent_rpcs=1, stream_idle_timeout=1.0) as server:
        with grpc.insecure_channel(server.target) as channel:
            header = _relu_header(x.shape)
            data = x.tobytes()
            messages = [header] + [
                pb.ForwardStreamRequest(chunk=pb.TensorChunk(offset=o, data=data[o : o + (1 << 20)]))
                for o in range(0, len(data), 1 << 20)
            ]
            call = _raw_stream(channel)(iter(messages))
            next(call)  # the response header; then it reads no more
            with ConvClient(server.target, timeout=60) as client:
                for _ in range(5):
                    np.testing.assert_array_equal(client.relu(X), np.maximum(X, 0))
            _wait_logged(caplog, "ForwardStream cancelled")
            with pytest.raises(grpc.RpcError) as info:  # reading again, it finds the stream cut short
                for _ in call:
                    pass
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stream_idle_timeout" in info.value.details()


def test_a_training_run_stops_at_max_seconds_whatever_its_reader_does():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 128, 5, 5))
    y = rng.standard_normal((1, 128, 3, 3))
    with running_server(backend="numpy", warm_up=False, stream_idle_timeout=30.0) as server:
        with ConvClient(server.target, timeout=120) as client:
            # every step a 1.2 MB weight snapshot: the queue of unread snapshots fills within a second
            run = client.train_kernel(x, y, kernel_size=3, max_steps=10**6, lr=1e-6, max_seconds=1.0,
                                      snapshot_every=1)  # fmt: skip
            updates = iter(run)
            next(updates)
            time.sleep(4)  # a reader that stops reading for four times the run's limit
            result = run.result()
    assert result.stop_reason == "time_limit", result.stop_reason
    assert result.elapsed < 3, result.elapsed


# -- row 7: undecodable bytes ---------------------------------------------------------------------

GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length far past the end


@pytest.mark.parametrize("method", ["Forward", "Backward", "TrainKernel", "ForwardStream", "GetServerInfo",
                                    "OpenSharedMemorySession"])  # fmt: skip
def test_undecodable_bytes_get_invalid_argument_logged_once_and_hold_no_slot(caplog, method):
    with running_server(backend="numpy", warm_up=False, max_concurrent_rpcs=1) as server:
        with grpc.insecure_channel(server.target) as channel, ConvClient(server.target, timeout=60) as client:
            identity = {"request_serializer": lambda m: m, "response_deserializer": lambda m: m}
            if method == "ForwardStream":
                call = lambda: list(channel.stream_stream(METHOD + method, **identity)(iter([GARBAGE]), timeout=30))
            elif method == "TrainKernel":
                call = lambda: list(channel.unary_stream(METHOD + method, **identity)(GARBAGE, timeout=30))
            else:
                call = lambda: channel.unary_unary(METHOD + method, **identity)(GARBAGE, timeout=30)
            for _ in range(50):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
                assert info.value.details().startswith("request: 6 bytes that are not a valid ")
                np.testing.assert_array_equal(client.relu(X), np.maximum(X, 0))  # the one slot is free at once
    logged = [r for r in caplog.records if "not a valid" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None, [r.getMessage() for r in logged]
    assert not any("deserializing" in r.getMessage() for r in caplog.records)


# -- row 10: idle connections are closed ------------------------------------------------------------


def test_idle_connections_are_closed_after_max_connection_idle():
    with server_processes(1, env={**SERVER_ENV, "CONVRPC_MAX_CONNECTION_IDLE": "1"}) as (server,):
        before = _open_files(server.process.pid)
        channels = [grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(100)]  # fmt: skip
        try:
            for channel in channels:
                pb_grpc.ConvServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            assert _open_files(server.process.pid) >= before + 50  # (the first may be closed already)
            deadline = time.monotonic() + 30
            while _open_files(server.process.pid) > before + 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _open_files(server.process.pid) <= before + 5
            with ConvClient(server.target, timeout=60) as client:  # and the server serves on
                np.testing.assert_array_equal(client.relu(X), np.maximum(X, 0))
        finally:
            for channel in channels:
                channel.close()


# -- row 6: TrainKernel's kernel size is checked before anything is allocated for it ------------------


@pytest.mark.parametrize("size, code", [(5000, grpc.StatusCode.INVALID_ARGUMENT),
                                        (30000, grpc.StatusCode.RESOURCE_EXHAUSTED),
                                        (2**40, grpc.StatusCode.INVALID_ARGUMENT)])  # fmt: skip
def test_a_huge_kernel_size_is_refused_before_allocating(proc, stub, size, code):
    x = np.ones((1, 1, 16, 16))
    request = pb.TrainKernelRequest(
        input=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=x.shape, data=x.tobytes()),
        target=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=(1, 1, 14, 14), data=bytes(14 * 14 * 8)),
        kernel_size=pb.Size2(height=size, width=size), max_steps=1,
    )  # fmt: skip
    assert request.ByteSize() < 5000
    before = _rss(proc.process.pid)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.TrainKernel(request, timeout=60))
        assert info.value.code() is code and info.value.details().startswith("kernel_size:"), info.value.details()
    assert _rss(proc.process.pid) - before < 50 << 20


# -- row 5: work that would hold a slot for hours is refused up front ---------------------------------


def test_work_over_the_cost_cap_is_refused_before_anything_is_allocated_naming_the_setting():
    x = np.ones((1, 4, 512, 512), np.float32)  # 4 MiB; a 256 x 256 window at stride 1: ~1.1e12 flops
    with running_server(backend="numpy", warm_up=False) as server:  # the default cap
        with ConvClient(server.target, timeout=60) as client, Bystander(server.target):
            for call in (lambda: client.max_pool2d(x, 256, stride=1),
                         lambda: client.max_pool2d_backward(np.ones((1, 4, 257, 257), np.float32), x, 256, stride=1)):
                with pytest.raises(ConvRpcError) as info:
                    call()
                assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert info.value.message.startswith("op: ") and "max_op_flops" in info.value.message
                assert info.value.cap == ("max_op_flops", int(server.settings.max_op_flops))
            np.testing.assert_array_equal(client.max_pool2d(x, 2), np.ones((1, 4, 256, 256), np.float32))


#: A max_pool2d of ~1e10 window taps: under the default cost cap (6e11 of its 1e12 flops), and 30 s
#: or more of the numba kernel on 2 cores.
HEAVY_POOL = (np.ones((1, 4, 512, 512), np.float32), 128)


def _heavy_pool_request() -> pb.ForwardRequest:
    x, k = HEAVY_POOL
    return pb.ForwardRequest(
        op=pb.Op(max_pool2d=pb.MaxPool2dOptions(kernel_size=pb.Size2(height=k, width=k), stride=pb.Size2(height=1, width=1))),
        input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes()),
    )


@pytest.mark.skipif("numba" not in available_backends(), reason="the reference backend cannot stop part way")
@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_call_that_ends_while_computing_stops_and_frees_its_slot(how):
    """The only compute slot, taken by a heavy call that then expires or is cancelled, serves another
    call long before the heavy one's compute would have finished (its kernels stop between rows)."""
    x = np.ones((1, 4, 64, 64), np.float32)
    with running_server(backend="numba", max_concurrent_rpcs=1) as server:
        with grpc.insecure_channel(server.target) as channel:
            forward = pb_grpc.ConvServiceStub(channel).Forward
            heavy = forward.future(_heavy_pool_request(), timeout=1.0 if how == "deadline" else 120)
            if how == "cancel":
                time.sleep(1.0)  # let it reach its compute
                heavy.cancel()
            else:
                with pytest.raises(grpc.RpcError) as info:
                    heavy.result()
                assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # The slot frees within a kernel row, not after the tens of seconds the pooling takes: a
            # call needing it succeeds once it is back (busy refusals until then are expected).
            with ConvClient(server.target, timeout=60) as client:
                give_up = time.monotonic() + 10
                while True:
                    try:
                        got = client.max_pool2d(x, 2)
                        break
                    except ConvRpcError as exc:
                        assert exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in exc.message, exc
                        assert time.monotonic() < give_up, "the stopped call still holds the only slot"
                        time.sleep(0.05)
                np.testing.assert_array_equal(got, np.ones((1, 4, 32, 32), np.float32))


@pytest.mark.parametrize("option", ["stride", "padding", "dilation"])
def test_geometry_integers_past_int32_are_refused_naming_the_field(proc, option):
    with ConvClient(proc.target, timeout=60, data_path="unary") as client:
        with pytest.raises(ConvRpcError) as info:
            client.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2)), **{option: 2**31})
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message.startswith(f"op.conv2d.{option}"), info.value.message
