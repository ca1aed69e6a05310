"""Limits and admission: bad inputs answered INVALID_ARGUMENT with BadRequest details, memory bombs refused
before allocation, oversize messages and overload RESOURCE_EXHAUSTED, and random requests never UNKNOWN/INTERNAL."""

from __future__ import annotations

import threading
import time
import types
from concurrent import futures

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convrpc import wire
from convrpc.client import ConvClient, ConvRpcError
from convrpc.core import Backend, get_backend, numpy_backend
from convrpc.core.errors import ServerBusy
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc
from server_fixtures import running_server

F32, F64 = pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64


@pytest.fixture(scope="module")
def srv():
    with running_server(backend="numpy", warm_up=False, max_elements=1 << 16, max_train_steps=50,
                        max_concurrent_rpcs=40, report_interval=0.0) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.target) as channel:
        yield pb_grpc.ConvServiceStub(channel)


def t(a=None, *, dtype=None, shape=None, data=None) -> pb.Tensor:
    """A Tensor message from an array, with any part overridden to build a malformed one."""
    msg = wire.encode_tensor(np.asarray(a)) if a is not None else pb.Tensor()
    if dtype is not None:
        msg.dtype = dtype
    if shape is not None:
        del msg.shape[:]
        msg.shape.extend(shape)
    if data is not None:
        msg.data = data
    return msg


def conv_op(**options) -> pb.Op:
    return wire.encode_op("conv2d", **options)


X = np.arange(50.0).reshape(1, 2, 5, 5)
W = np.ones((3, 2, 3, 3))


def fwd(op=None, **tensors) -> pb.ForwardRequest:
    return pb.ForwardRequest(op=op if op is not None else conv_op(), **tensors)


def train(**fields) -> pb.TrainKernelRequest:
    base = dict(input=t(X), target=t(np.ones((1, 3, 3, 3))), kernel_size=pb.Size2(height=3, width=3), max_steps=3,
                sgd=pb.SgdOptions(lr=0.01))  # fmt: skip
    base.update(fields)
    return pb.TrainKernelRequest(**base)


# (kind, request, the field the BadRequest detail must name)
BAD_INPUTS = [
    ("missing input tensor", fwd(weight=t(W)), "input"),
    ("missing weight tensor", fwd(input=t(X)), "weight"),
    ("dtype UNSPECIFIED", fwd(input=t(X, dtype=pb.DTYPE_UNSPECIFIED), weight=t(W)), "input.dtype"),
    ("dtype unknown", fwd(input=t(X, dtype=42), weight=t(W)), "input.dtype"),
    ("zero spatial dim (the wire carries it, conv2d refuses it)",
     fwd(input=t(X, shape=[1, 2, 0, 5], data=b""), weight=t(W)), "input"),
    ("negative dim", fwd(input=t(X, shape=[1, -2, 5, 5]), weight=t(W)), "input.shape"),
    ("shape product overflows int64", fwd(input=t(X, shape=[2**62, 2**62, 1, 1]), weight=t(W)), "input.shape"),
    ("data shorter than the shape", fwd(input=t(X, data=bytes(8 * 49)), weight=t(W)), "input.data"),
    ("data longer than the shape", fwd(input=t(X, data=bytes(8 * 51)), weight=t(W)), "input.data"),
    ("rank 2 input", fwd(input=t(X[0, 0]), weight=t(W)), "input"),  # 3-d is unbatched, as in torch
    ("rank 5 weight", fwd(input=t(X), weight=t(W[None])), "weight"),
    ("channel mismatch", fwd(input=t(X), weight=t(np.ones((3, 1, 3, 3)))), "weight"),
    ("groups not dividing channels", fwd(conv_op(groups=3), input=t(X), weight=t(np.ones((3, 1, 3, 3)))),
     "op.conv2d.groups"),
    ("groups zero", fwd(conv_op(groups=0), input=t(X), weight=t(W)), "op.conv2d.groups"),
    ("kernel larger than padded input", fwd(input=t(X), weight=t(np.ones((3, 2, 8, 8))), op=conv_op(padding=1)),
     "weight"),
    ("stride zero", fwd(conv_op(stride=0), input=t(X), weight=t(W)), "op.conv2d.stride"),
    ("stride negative", fwd(conv_op(stride=(1, -1)), input=t(X), weight=t(W)), "op.conv2d.stride"),
    ("dilation zero", fwd(conv_op(dilation=0), input=t(X), weight=t(W)), "op.conv2d.dilation"),
    ("padding negative", fwd(conv_op(padding=-1), input=t(X), weight=t(W)), "op.conv2d.padding"),
    ("padding mode unknown", fwd(pb.Op(conv2d=pb.Conv2dOptions(padding=pb.Padding(mode=9))), input=t(X), weight=t(W)),
     "op.conv2d.padding.mode"),
    ("output_padding >= stride",
     fwd(wire.encode_op("conv_transpose2d", stride=2, output_padding=2), input=t(X), weight=t(np.ones((2, 1, 3, 3)))),
     "op.conv_transpose2d.output_padding"),
    ("bias of the wrong length", fwd(input=t(X), weight=t(W), bias=t(np.ones(2))), "bias"),
    ("dtypes differ", fwd(input=t(X.astype(np.float32)), weight=t(W)), "weight"),
    ("no op set in the oneof", pb.ForwardRequest(op=pb.Op(), input=t(X), weight=t(W)), "op"),
    ("pool without kernel_size", fwd(pb.Op(max_pool2d=pb.MaxPool2dOptions()), input=t(X)), "op.max_pool2d.kernel_size"),
    ("tensor an op does not take", fwd(pb.Op(relu=pb.ReluOptions()), input=t(X), weight=t(W)), "weight"),
    ("grad_output of the wrong shape",
     pb.BackwardRequest(op=conv_op(), grad_output=t(np.ones((1, 3, 2, 2))), input=t(X), weight=t(W)), "grad_output"),
    ("NaN in a training target", train(target=t(np.full((1, 3, 3, 3), np.nan))), "target"),
    ("NaN in a training input", train(input=t(np.where(X > 3, np.nan, X))), "input"),
    ("max_steps zero", train(max_steps=0), "max_steps"),
    ("max_steps over the cap", train(max_steps=51), "max_steps"),
    ("max_seconds over the cap", train(max_seconds=1e9), "max_seconds"),
    ("max_seconds negative", train(max_seconds=-1.0), "max_seconds"),
    ("learning rate zero", train(sgd=pb.SgdOptions(lr=0.0)), "sgd.lr"),
    ("training stride zero", train(conv=pb.Conv2dOptions(stride=pb.Size2(height=0, width=1))), "conv.stride"),
    ("training target of the wrong shape", train(target=t(np.ones((1, 3, 4, 4)))), "target"),
]  # fmt: skip


def call(stub, request, timeout=30):
    """Send any request; the response(s), or raise grpc.RpcError."""
    if isinstance(request, pb.ForwardRequest):
        return stub.Forward(request, timeout=timeout)
    if isinstance(request, pb.BackwardRequest):
        return stub.Backward(request, timeout=timeout)
    return list(stub.TrainKernel(request, timeout=timeout))


def error_of(stub, request) -> ConvRpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(stub, request)
    return ConvRpcError.from_rpc_error(info.value)


def assert_serving(stub):
    """A valid conv2d right after: the server answers it with the reference's values."""
    out = stub.Forward(fwd(input=t(X), weight=t(W)), timeout=30)
    np.testing.assert_allclose(wire.decode_tensor(out.output, "output"), get_backend("numpy").conv2d(X, W))


def test_the_bad_input_matrix_covers_at_least_fifteen_kinds():
    assert len({kind for kind, _, _ in BAD_INPUTS}) >= 15


@pytest.mark.parametrize("kind,request_,field", BAD_INPUTS, ids=[k.replace(" ", "-") for k, _, _ in BAD_INPUTS])
def test_bad_input_is_invalid_argument_with_a_field_violation_then_a_good_request_succeeds(stub, kind, request_, field):
    error = error_of(stub, request_)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT, (kind, error)
    assert error.field is not None and error.field.endswith(field), (kind, error.field, error.message)
    assert field in error.message
    assert_serving(stub)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_memory_bombs_are_refused_before_allocating(srv, stub):
    """Requests of 1 KiB claiming 2^62 elements, or asking for outputs of ~2^62 elements, allocate nothing."""
    claims = fwd(pb.Op(relu=pb.ReluOptions()), input=t(dtype=F32, shape=[2**31, 2**31], data=bytes(1024)))
    tiny = np.ones((1, 1, 2, 2))
    huge_output = fwd(
        wire.encode_op("conv_transpose2d", stride=2**31 - 1), input=t(tiny), weight=t(np.ones((1, 1, 1, 1)))
    )
    assert_serving(stub)
    before = _rss_bytes()
    with futures.ThreadPoolExecutor(20) as pool:
        errors = list(pool.map(lambda r: error_of(stub, r), [claims] * 20 + [huge_output] * 20))
    growth = _rss_bytes() - before
    assert {e.code for e in errors[:20]} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert {e.field for e in errors[:20]} == {"input.data"}
    assert {e.code for e in errors[20:]} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert_serving(stub)


@pytest.mark.parametrize("data_path", ["auto", "unary", "stream", "shm"])
def test_a_batch_over_the_element_cap_is_cut_to_fit_it_on_every_path(srv, data_path):
    """The issue's 335 MB relu at scale: twice the server's max_elements in one call comes back whole."""
    x = np.random.default_rng(1).standard_normal((8, 1, 128, 128)).astype(np.float32)  # 2 x 2**16 elements
    w = np.ones((2, 1, 3, 3), np.float32)
    with ConvClient(srv.target, timeout=30, data_path=data_path) as client:
        np.testing.assert_array_equal(client.relu(x), np.maximum(x, 0))
        assert client._core.caps == {"max_elements": 1 << 16}
        grads = client.conv2d_backward(np.ones((8, 2, 126, 126), np.float32), x, w)  # output and grad over it too
        assert grads.weight.shape == w.shape and grads.input.shape == x.shape
        with pytest.raises(ConvRpcError) as info:  # one sample over the cap: refused, saying what to do
            client.relu(np.ones((1, 1, 300, 300), np.float32))
        assert info.value.field == "input.shape" and "max_elements setting" in info.value.message
        assert "send smaller tensors or raise it" in info.value.message


def test_oversize_messages_and_requests_are_resource_exhausted():
    with running_server(backend="numpy", warm_up=False, max_message_bytes=64 * 1024, max_request_bytes=4000) as server:
        with ConvClient(server.target, timeout=30) as client:
            with pytest.raises(ConvRpcError) as info:
                client.max_pool2d(np.ones((1, 1, 160, 80)), 2)  # a 100 KiB message of one sample: no cut helps
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            # A batch over the request cap is cut to fit it: the server's refusal names the cap, the SDK re-splits.
            x = np.random.default_rng(0).standard_normal((60, 1, 4, 4))  # 7680 bytes: three shards of 2560
            np.testing.assert_array_equal(client.relu(x), np.maximum(x, 0))
            assert client._core.caps == {"max_request_bytes": 4000}
            with pytest.raises(
                ConvRpcError
            ) as info:  # two tensors of 2560 bytes: under the message cap, over the request cap
                client.conv2d(np.ones((1, 1, 16, 20)), np.ones((1, 1, 16, 20)))
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "4000" in info.value.message
            assert info.value.cap == ("max_request_bytes", 4000) and "max_request_bytes setting" in info.value.message
            assert "cannot be cut along its batch" in info.value.message
            with pytest.raises(ConvRpcError) as info:  # an answer larger than the message cap
                client.conv_transpose2d(np.ones((1, 1, 4, 4)), np.ones((1, 4, 60, 60)))
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert client.relu(np.array([-1.0, 1.0])).tolist() == [0.0, 1.0]


class Gate:
    """A test backend's relu blocks here until opened, so 'long' requests are long by construction."""

    def __init__(self):
        self.opened = threading.Event()
        self._lock = threading.Lock()
        self.waiting = 0

    def backend(self) -> Backend:
        kernels = types.SimpleNamespace(
            **{k: getattr(numpy_backend, k) for k in dir(numpy_backend) if not k.startswith("_")}
        )

        def relu(x):
            with self._lock:
                self.waiting += 1
            assert self.opened.wait(60)
            return numpy_backend.relu(x)

        kernels.relu = relu
        return Backend("gated-numpy", kernels, "cpu")


def test_overload_refuses_the_excess_at_once_then_everything_succeeds():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    slots, extra = 3, 5
    gate = Gate()
    x = np.array([-2.0, 3.0])
    with running_server(compute=gate.backend(), backend="numpy", warm_up=False, max_concurrent_rpcs=slots) as server:
        with ConvClient(server.target, timeout=60) as client, futures.ThreadPoolExecutor(slots + extra) as pool:
            calls = [pool.submit(client.relu, x) for _ in range(slots + extra)]
            deadline = time.monotonic() + 30
            while not (sum(f.done() for f in calls) >= extra and gate.waiting >= slots):
                assert time.monotonic() < deadline, "the excess was not refused at once"
                time.sleep(0.01)
            refused = [f for f in calls if f.done()]
            assert len(refused) == extra and gate.waiting == slots
            for f in refused:
                assert f.exception().code is grpc.StatusCode.RESOURCE_EXHAUSTED, f.exception()
            # While every slot computes: streams are refused too, and probes and GetServerInfo still answer.
            with pytest.raises(ConvRpcError) as info:
                client.train_kernel(np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2)), kernel_size=3).result()
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            with grpc.insecure_channel(server.target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert client.server_info(timeout=5).backend == "gated-numpy"
            gate.opened.set()
            for f in calls:
                if f not in refused:
                    np.testing.assert_array_equal(f.result(timeout=30), [0.0, 3.0])
        with ConvClient(server.target, timeout=60) as client, futures.ThreadPoolExecutor(slots) as pool:
            assert all(np.array_equal(y, [0.0, 3.0]) for y in pool.map(client.relu, [x] * (slots + extra)))
            assert client.train_kernel(np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2)), kernel_size=3,
                                       max_steps=2).result().steps == 2  # fmt: skip


def test_a_call_holds_a_slot_only_while_its_handler_computes():
    """Admission takes no slot: a call gRPC drops before its handler runs (cancelled while it waited for
    a worker, undecodable) holds none; a full server refuses new calls as they arrive."""
    from convrpc.server.interceptors import ComputeAdmission, ComputeSlots

    slots = ComputeSlots(1)
    admission = ComputeAdmission(slots, 1 << 20, futures.ThreadPoolExecutor(1))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    details = types.SimpleNamespace(method="/convrpc.v1.ConvService/Forward", invocation_metadata=())

    def refused() -> bool:
        return hasattr(admission.intercept_service(lambda d: handler, details).unary_unary, "experimental_thread_pool")

    assert not refused() and not refused()  # two admitted, never run: no slot taken
    with slots.held():
        assert refused()
        with pytest.raises(ServerBusy):
            with slots.held():
                pass
    assert not refused()


def test_a_cancelled_training_stream_frees_its_slot():
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16))
    with running_server(backend="numpy", warm_up=False, max_concurrent_rpcs=1) as server:
        with ConvClient(server.target, timeout=30) as client:
            run = client.train_kernel(x, x[:, :, 1:-1, 1:-1], kernel_size=3, max_steps=10**6, lr=1e-4)
            updates = iter(run)  # kept: dropping an iteration part-way cancels the run
            next(updates)
            with pytest.raises(ConvRpcError) as info:
                client.relu(x)
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            run.cancel()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert client.relu(np.array([-1.0]))[0] == 0.0
                    break
                except ConvRpcError as error:
                    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.05)


# -- property test: random well-typed requests ---------------------------------------------------------------

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
REF = get_backend("numpy")
pads = st.sampled_from([0, 0, 1, 2, -1])
dilations = st.sampled_from([1, 1, 1, 2, 0])


@st.composite
def arrays(draw, shape, dtype):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return rng.standard_normal(shape).astype(dtype)


@st.composite
def op_calls(draw):
    """(op name, torch-style options, input, weight, bias): mostly consistent, sometimes not, occasionally huge."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    name = draw(st.sampled_from(["conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "relu"]))
    n, c = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    h, w = draw(st.sampled_from([1, 2, 3, 5, 8, 8, 2000])), draw(st.sampled_from([1, 2, 3, 5, 8]))
    x = draw(arrays((n, c, h, w), dtype))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.sampled_from([1, 1, 2, 3, 0])), draw(st.sampled_from([1, 1, 2, 200])))
    options, weight, bias = {}, None, None
    if name in ("conv2d", "conv_transpose2d"):
        groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
        k = draw(st.integers(1, 3)) * draw(st.sampled_from([groups, 1]))
        wshape = (k, max(1, c // groups), kh, kw) if name == "conv2d" else (c, max(1, k // groups), kh, kw)
        weight = draw(arrays(wshape, dtype))
        if draw(st.booleans()):
            bias = draw(arrays((draw(st.sampled_from([k, k, k + 1])),), dtype))
        options = dict(stride=stride, padding=draw(pads), dilation=draw(dilations), groups=groups)
        if name == "conv2d" and draw(st.booleans()):
            options.update(padding=draw(st.sampled_from(["same", "valid"])), stride=1)
        if name == "conv_transpose2d":
            options["output_padding"] = draw(st.integers(0, 2))
    elif name != "relu":
        options = dict(kernel_size=(kh, kw), stride=draw(st.sampled_from([None, stride])), padding=draw(pads))
        if name == "max_pool2d":
            options["dilation"] = draw(dilations)
    return name, options, x, weight, bias


def _tensors(**arrays_):
    return {k: wire.encode_tensor(v) for k, v in arrays_.items() if v is not None}


@st.composite
def requests(draw):
    name, options, x, weight, bias = draw(op_calls())
    kind = draw(st.sampled_from(["forward", "backward", "train"]))
    if kind == "forward":
        request = pb.ForwardRequest(op=wire.encode_op(name, **options), **_tensors(input=x, weight=weight, bias=bias))
    elif kind == "backward":
        try:  # the gradient of the output the reference computes, or any shape when the call is invalid
            out_shape = getattr(REF, name)(*[a for a in (x, weight, bias) if a is not None], **options).shape
        except Exception:  # noqa: BLE001
            out_shape = x.shape
        gy = draw(arrays(out_shape, x.dtype))
        request = pb.BackwardRequest(op=wire.encode_op(name, **options),
                                     **_tensors(grad_output=gy, input=x, weight=weight, bias=bias))  # fmt: skip
    else:
        conv = {k: v for k, v in options.items() if k in ("stride", "padding", "dilation", "groups")}
        kernel = weight if weight is not None and name == "conv2d" else np.ones((2, x.shape[1], 2, 2), x.dtype)
        try:
            target = REF.conv2d(x, kernel, **conv) + 1
        except Exception:  # noqa: BLE001
            target = x
        request = pb.TrainKernelRequest(
            **_tensors(input=x, target=target, init_weight=kernel if draw(st.booleans()) else None),
            kernel_size=pb.Size2(height=kernel.shape[2], width=kernel.shape[3]) if draw(st.integers(0, 3)) else None,
            conv=wire.encode_op("conv2d", **conv).conv2d, bias=draw(st.booleans()),
            max_steps=draw(st.sampled_from([1, 2, 3, 5, 0])),
            sgd=pb.SgdOptions(lr=draw(st.sampled_from([0.01, 0.5, 1e6, 0.0]))),
            loss=draw(st.sampled_from([0, 1, 2, 3, 4])), batch_size=draw(st.sampled_from([0, 0, 1, 2, -1])),
            report_every=draw(st.integers(-1, 2)),
        )  # fmt: skip
    return _mutate(draw, request)


def _mutate(draw, request):
    """Now and then break one tensor at the wire level (dtype, shape or byte length)."""
    fields = [
        f.name for f, _ in request.ListFields() if f.message_type and f.message_type.full_name == "convrpc.v1.Tensor"
    ]
    how = draw(st.sampled_from(["none"] * 6 + ["dtype", "shape", "data"]))
    if how == "none" or not fields:
        return request
    tensor = getattr(request, draw(st.sampled_from(fields)))
    if how == "dtype":
        tensor.dtype = draw(st.sampled_from([pb.DTYPE_UNSPECIFIED, F32, F64, 3]))
    elif how == "shape":
        tensor.shape[draw(st.integers(0, len(tensor.shape) - 1))] = draw(st.sampled_from([-1, 0, 2**40, 7]))
    else:
        tensor.data = tensor.data[: draw(st.integers(0, len(tensor.data)))] + bytes(draw(st.integers(0, 8)))
    return request


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_random_well_typed_requests_get_ok_invalid_argument_or_resource_exhausted(stub, request):
    try:
        call(stub, request)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    assert code in ALLOWED, (code, request)


def test_the_server_survives_the_property_test(stub):
    assert_serving(stub)
