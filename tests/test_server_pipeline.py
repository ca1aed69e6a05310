"""The one server pipeline, driven with raw stubs: the same request answered inline, as stream chunks and
through shared memory gives byte-identical results, and the same bad request the same code and field."""

from __future__ import annotations

import mmap
import os

import grpc
import ml_dtypes
import numpy as np
import pytest

from convrpc import chunks, networks, wire
from convrpc.core import network as nn
from convrpc.core import get_backend
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc
from server_fixtures import RawSession, memfd, running_server

PATHS = ("inline", "stream", "shm")
REF = get_backend("numpy")


@pytest.fixture(scope="module")
def srv():
    with running_server(backend="numpy", warm_up=False, max_elements=1 << 16, chunk_bytes=1000) as server:
        yield server


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.target) as channel:
        yield pb_grpc.ConvServiceStub(channel)


class Session(RawSession):
    """A shared-memory session opened by hand, as the SDK would, with one 4 MiB region (id 1) mapped here."""

    def __init__(self, stub):
        super().__init__(stub.OpenSharedMemorySession)
        self.region_id, fd = 1, memfd(1 << 22)
        assert self.add(self.region_id, fd) == (0, "")
        self.region = mmap.mmap(fd, 1 << 22)
        os.close(fd)
        self.stub = stub

    def close(self):
        self.stub.CloseSharedMemorySession(pb.CloseSharedMemorySessionRequest(session_id=self.id))
        super().close()


@pytest.fixture(scope="module")
def session(stub):
    s = Session(stub)
    yield s
    s.close()


def _tensor_fields(message):
    return [f.name for f in message.DESCRIPTOR.fields if f.message_type is pb.Tensor.DESCRIPTOR]


def _inline(response) -> dict[str, tuple]:
    return {f: (t.dtype, tuple(t.shape), t.data) for f in _tensor_fields(response) if response.HasField(f)
            for t in [getattr(response, f)]}  # fmt: skip


def send(stub, path, request, session=None, *, output_buffer=True):
    """``{response field: (dtype, shape, bytes)}`` of ``request`` (inline tensors) sent on ``path``."""
    backward = isinstance(request, pb.BackwardRequest)
    rpc = "Backward" if backward else "Forward"
    if path == "inline":
        return _inline(getattr(stub, rpc)(request, timeout=30))
    request = type(request).FromString(request.SerializeToString())
    if path == "stream":
        payload = b""
        for f in _tensor_fields(request):
            if request.HasField(f):
                payload += getattr(request, f).data
                getattr(request, f).ClearField("data")
        message = pb.BackwardStreamRequest if backward else pb.ForwardStreamRequest
        pieces = [message(chunk=pb.TensorChunk(offset=i, data=payload[i : i + 700])) for i in range(0, len(payload), 700)]
        replies = list(getattr(stub, rpc + "Stream")(iter([message(request=request), *pieces]), timeout=30))
        first = replies[0].response
        data = b"".join(r.chunk.data for r in replies[1:])
        out, at = {}, 0
        for f, t in chunks.streamed_tensors(first):
            nbytes = wire.tensor_layout(t, f)[2]
            out[f] = (t.dtype, tuple(t.shape), data[at : at + nbytes])
            at += nbytes
        assert at == len(data)
        return out
    offset = 0
    for f in _tensor_fields(request):
        if request.HasField(f):
            t = getattr(request, f)
            size = len(t.data)
            session.region[offset : offset + size] = t.data
            t.shared.CopyFrom(pb.SharedSpan(region_id=session.region_id, offset=offset))  # clears t.data
            offset += -(-size // 64) * 64
    request.shared_memory.session_id = session.id
    if output_buffer:
        buffer = pb.SharedBuffer(region_id=session.region_id, offset=2 << 20, size=2 << 20)
        request.shared_memory.output_buffer.CopyFrom(buffer)
    response = getattr(stub, rpc)(request, timeout=30)
    if not output_buffer:  # no room offered: the results come inline
        return _inline(response)
    out = {}
    for f in _tensor_fields(response):
        if response.HasField(f):
            t = getattr(response, f)
            assert t.WhichOneof("storage") == "shared" and t.shared.region_id == session.region_id
            nbytes = wire.tensor_layout(t, f)[2]
            out[f] = (t.dtype, tuple(t.shape), bytes(session.region[t.shared.offset : t.shared.offset + nbytes]))
    return out


rng = np.random.default_rng(7)
X = rng.standard_normal((2, 4, 9, 9))
CASES = [
    ("conv2d", dict(input=X, weight=rng.standard_normal((6, 2, 3, 3)), bias=rng.standard_normal(6)),
     dict(stride=2, padding=1, groups=2)),
    ("conv2d", dict(input=X, weight=rng.standard_normal((3, 4, 2, 2))), dict(padding="same", dilation=2)),
    ("conv_transpose2d", dict(input=X, weight=rng.standard_normal((4, 3, 3, 3)), bias=rng.standard_normal(3)),
     dict(stride=2, output_padding=1)),
    ("max_pool2d", dict(input=X), dict(kernel_size=3, stride=2, padding=1)),
    ("avg_pool2d", dict(input=X), dict(kernel_size=2)),
    ("relu", dict(input=X), {}),
    # torch's whole surface: indices as a second result, ceil mode, divisors, unbatched, empty and 0-d tensors
    ("max_pool2d", dict(input=X), dict(kernel_size=2, stride=2, ceil_mode=True, return_indices=True)),
    ("max_pool2d", dict(input=X[0]), dict(kernel_size=(3,), padding=1, return_indices=True)),
    ("avg_pool2d", dict(input=X[0]), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avg_pool2d", dict(input=X), dict(kernel_size=2, divisor_override=-3)),
    ("conv2d", dict(input=X[:0], weight=rng.standard_normal((3, 4, 2, 2)), bias=rng.standard_normal(3)), {}),
    ("conv_transpose2d", dict(input=X[1], weight=rng.standard_normal((4, 3, 3, 3))), dict(stride=2)),
    ("relu", dict(input=X[0, 0, 0, 0]), {}),
    ("relu", dict(input=X[:, :0]), {}),
]  # fmt: skip


def requests(name, arrays, options, dtype):
    arrays = {f: a.astype(dtype) for f, a in arrays.items()}
    tensors = {f: wire.encode_tensor(a) for f, a in arrays.items()}
    out = getattr(REF, name)(**arrays, **options)
    out = out[0] if isinstance(out, tuple) else out
    grad = wire.encode_tensor(rng.standard_normal(out.shape).astype(dtype))
    op = wire.encode_op(name, **options)
    return pb.ForwardRequest(op=op, **tensors), pb.BackwardRequest(op=op, grad_output=grad, **tensors)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,arrays,options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_op_is_byte_identical_inline_streamed_and_in_shared_memory(stub, session, name, arrays, options, dtype):
    for request in requests(name, arrays, options, dtype):
        results = {path: send(stub, path, request, session) for path in PATHS}
        results["shm, inline results"] = send(stub, "shm", request, session, output_buffer=False)
        assert results["stream"] == results["inline"] == results["shm"] == results["shm, inline results"]
        inline = results["inline"]
        if isinstance(request, pb.ForwardRequest):
            expected = getattr(REF, name)(**{f: wire.decode_tensor(getattr(request, f), f) for f in wire.OP_SPECS[name].tensors
                                             if request.HasField(f)}, **options)  # fmt: skip
            expected = expected if isinstance(expected, tuple) else (expected,)
            assert list(inline) == ["output", "indices"][: len(expected)]
            for (enum, shape, data), want in zip(inline.values(), expected):
                assert wire.DTYPES[enum] == want.dtype and shape == want.shape
                np.testing.assert_array_equal(np.frombuffer(data, dtype=want.dtype).reshape(shape), want)
        else:
            wanted = {"grad_input", "grad_weight", "grad_bias"} if "weight" in arrays else {"grad_input"}
            if "weight" in arrays and "bias" not in arrays:
                wanted.discard("grad_bias")
            assert set(inline) == wanted


def _bad(request, change):
    request = type(request).FromString(request.SerializeToString())
    change(request)
    return request


FWD, BWD = requests(*CASES[0], np.float64)
BAD = [
    ("op option the core refuses", _bad(FWD, lambda r: r.op.conv2d.stride.CopyFrom(pb.Size2(height=0, width=1))),
     "INVALID_ARGUMENT", "op.conv2d.stride"),
    ("divisor_override of 0 (unset is None)",
     pb.ForwardRequest(op=wire.encode_op("avg_pool2d", kernel_size=2, divisor_override=0), input=FWD.input),
     "INVALID_ARGUMENT", "op.avg_pool2d.divisor_override"),
    ("int64 input (never converted)", _bad(FWD, lambda r: setattr(r.input, "dtype", pb.DTYPE_INT64)),
     "INVALID_ARGUMENT", "input"),
    ("a dtype of the other tensors' size", _bad(FWD, lambda r: setattr(r.weight, "dtype", pb.DTYPE_INT64)),
     "INVALID_ARGUMENT", "weight"),
    ("unknown dtype", _bad(FWD, lambda r: setattr(r.input, "dtype", 99)), "INVALID_ARGUMENT", "input.dtype"),
    ("negative dimension", _bad(FWD, lambda r: r.input.shape.__setitem__(0, -2)), "INVALID_ARGUMENT", "input.shape"),
    ("tensor the op does not take", pb.ForwardRequest(op=wire.encode_op("relu"), input=FWD.input, weight=FWD.weight),
     "INVALID_ARGUMENT", "weight"),
    ("missing weight", _bad(FWD, lambda r: r.ClearField("weight")), "INVALID_ARGUMENT", "weight"),
    ("missing grad_output", _bad(BWD, lambda r: r.ClearField("grad_output")), "INVALID_ARGUMENT", "grad_output"),
    ("channel mismatch", _bad(FWD, lambda r: r.weight.CopyFrom(wire.encode_tensor(np.ones((6, 3, 3, 3))))),
     "INVALID_ARGUMENT", "weight"),
    ("grad_output of the wrong shape", _bad(BWD, lambda r: r.grad_output.CopyFrom(wire.encode_tensor(np.ones((1, 6, 5, 5))))),
     "INVALID_ARGUMENT", "grad_output"),
    ("more elements than the cap", pb.ForwardRequest(op=wire.encode_op("relu"), input=wire.encode_tensor(np.ones((1 << 16) + 1))),
     "RESOURCE_EXHAUSTED", "input.shape"),
]  # fmt: skip


@pytest.mark.parametrize("kind,request_,code,field", BAD, ids=[b[0].replace(" ", "-") for b in BAD])
def test_a_bad_request_gets_the_same_code_and_field_on_every_path(stub, session, kind, request_, code, field):
    from convrpc.client import ConvRpcError

    seen = set()
    for path in PATHS:
        with pytest.raises(grpc.RpcError) as info:
            send(stub, path, request_, session)
        error = ConvRpcError.from_rpc_error(info.value)
        seen.add((error.code.name, error.field, error.message))
    assert len(seen) == 1, seen
    (got_code, got_field, message), = seen
    assert got_code == code and message.startswith(field + ":"), seen
    assert got_field == field  # BadRequest details name it, size refusals included


def test_an_internal_error_reports_the_logged_request_id_on_every_path(monkeypatch, stub, session, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel bug")

    monkeypatch.setattr(REF.__class__, "relu", broken)
    request = pb.ForwardRequest(op=wire.encode_op("relu"), input=wire.encode_tensor(np.ones(3)))
    with running_server(backend="numpy", warm_up=False) as server, grpc.insecure_channel(server.target) as channel:
        raw = pb_grpc.ConvServiceStub(channel)
        s = Session(raw)
        try:
            for path in PATHS:
                rid = f"req-{path}"
                wrapped = _with_metadata(raw, [("x-request-id", rid)])
                with pytest.raises(grpc.RpcError) as info:
                    send(wrapped, path, request, s)
                assert info.value.code() is grpc.StatusCode.INTERNAL
                assert info.value.details() == f"internal error (request id {rid})", path
        finally:
            s.close()


class _with_metadata:
    """A stub whose every call carries ``metadata``."""

    def __init__(self, stub, metadata):
        self._stub, self._metadata = stub, metadata

    def __getattr__(self, name):
        method = getattr(self._stub, name)
        return lambda request, **kw: method(request, metadata=self._metadata, **kw)


def test_a_shared_tensor_without_a_session_is_refused_naming_it(stub, session):
    request = type(FWD).FromString(FWD.SerializeToString())
    request.input.shared.CopyFrom(pb.SharedSpan(region_id=session.region_id, offset=0))
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("input.shared:")


def test_a_stream_whose_first_message_has_no_request_is_refused(stub):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ForwardStream(iter([pb.ForwardStreamRequest(chunk=pb.TensorChunk(offset=0, data=b"x"))]), timeout=30))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("request:")


def test_the_servicer_registers_exactly_the_rpcs_of_the_proto(srv):
    from convrpc.server.servicer import ConvService

    service = pb.DESCRIPTOR.services_by_name["ConvService"]
    assert len(service.methods) == 10
    for method in service.methods:
        assert callable(getattr(ConvService, method.name)), method.name


def test_every_rpc_needs_the_token_and_is_counted_in_the_metrics():
    """Auth and metrics sit in front of all 10 RPCs, the shared-memory and stream paths included."""
    token = [("authorization", "Bearer s3cret")]
    request = pb.ForwardRequest(op=wire.encode_op("relu"), input=wire.encode_tensor(np.array([-1.0, 2.0])))
    backward = pb.BackwardRequest(op=request.op, input=request.input, grad_output=request.input)
    train = pb.TrainKernelRequest(input=wire.encode_tensor(X[:1, :1]), target=wire.encode_tensor(X[:1, :1, 1:-1, 1:-1]),
                                  kernel_size=pb.Size2(height=3, width=3), max_steps=2)  # fmt: skip
    with running_server(backend="numpy", warm_up=False, auth_tokens="s3cret") as server:
        with grpc.insecure_channel(server.target) as channel:
            raw = pb_grpc.ConvServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                raw.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            stub = _with_metadata(raw, token)
            s = Session(stub)
            try:
                for path in PATHS:
                    with pytest.raises(grpc.RpcError) as info:
                        send(raw, path, request, s)
                    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, path
                for path in PATHS:
                    assert send(stub, path, request, s) == send(stub, "inline", request)
                    assert send(stub, path, backward, s) == send(stub, "inline", backward)
            finally:
                s.close()
            assert list(stub.TrainKernel(train, timeout=30))[-1].WhichOneof("event") == "result"
            net = networks.encode_network(nn.Sequential(nn.Flatten(), nn.Linear(4, 1)))
            fit = pb.TrainNetworkRequest(network=net, input=wire.encode_tensor(X[:2, 0, 0, :4]),
                                         target=wire.encode_tensor(X[:2, 0, 0, :1]), max_steps=2)  # fmt: skip
            assert list(stub.TrainNetwork(fit, timeout=30))[-1].WhichOneof("event") == "result"
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            stop = pb.StopTrainingRequest(run_id="0" * 32)
            with pytest.raises(grpc.RpcError) as info:
                raw.StopTraining(stop, timeout=30)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert not stub.StopTraining(stop, timeout=30).stopped

        def handled(method, code):
            kind = {(False, False): "unary", (False, True): "server_stream", (True, True): "bidi_stream"}[
                (method.client_streaming, method.server_streaming)]
            return server.metrics.registry.get_sample_value("grpc_server_handled_total", {
                "grpc_type": kind, "grpc_service": "convrpc.v1.ConvService", "grpc_method": method.name,
                "grpc_code": code})  # fmt: skip

        methods = pb.DESCRIPTOR.services_by_name["ConvService"].methods_by_name
        for method in methods.values():
            assert handled(method, "OK") >= 1, method.name
        assert handled(methods["ForwardStream"], "UNAUTHENTICATED") == 1


def test_admission_covers_exactly_the_computing_rpcs():
    from convrpc.server.interceptors import COMPUTE_RPCS

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["ConvService"].methods}
    assert COMPUTE_RPCS == {"Forward", "Backward", "ForwardStream", "BackwardStream", "TrainKernel", "TrainNetwork"} <= methods
