"""End to end through a real server on 127.0.0.1: every SDK method, errors as ConvRpcError, the server surviving them."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from convrpc import wire
from convrpc.client import ConvClient, ConvRpcError, Gradients
from convrpc.client.aio import AsyncConvClient
from convrpc.core import get_backend
from convrpc.core.samples import EDGE_KERNEL, structured_image
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

REF = get_backend("numpy")


def _close(a, b, dtype=np.float64):
    tol = 1e-10 if dtype == np.float64 else 1e-4
    scale = max(1.0, float(np.max(np.abs(b))))
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.max(np.abs(a - b)) <= tol * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_op_and_its_backward_match_the_reference(client, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 8)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 2)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    conv = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    y = client.conv2d(x, w, b, **conv)
    _close(y, REF.conv2d(x, w, b, **conv), dtype)
    gy = rng.standard_normal(y.shape).astype(dtype)
    grads = client.conv2d_backward(gy, x, w, b, **conv)
    assert isinstance(grads, Gradients)
    for got, want in zip(grads, REF.conv2d_backward(gy, x, w, b, **conv)):
        _close(got, want, dtype)
    assert client.conv2d(x, w[:, :, :, :], padding="same", groups=2).shape == (2, 6, 9, 8)

    wt = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    tconv = dict(stride=2, padding=1, output_padding=1, groups=1, dilation=1)
    yt = client.conv_transpose2d(x, wt, b[:3], **tconv)
    _close(yt, REF.conv_transpose2d(x, wt, b[:3], **tconv), dtype)
    gyt = rng.standard_normal(yt.shape).astype(dtype)
    for got, want in zip(client.conv_transpose2d_backward(gyt, x, wt, b[:3], **tconv),
                         REF.conv_transpose2d_backward(gyt, x, wt, b[:3], **tconv)):  # fmt: skip
        _close(got, want, dtype)

    for op, options in (("max_pool2d", dict(kernel_size=3, stride=2, padding=1, dilation=1)),
                        ("avg_pool2d", dict(kernel_size=(2, 3), stride=None, padding=(1, 1))),
                        ("relu", {})):  # fmt: skip
        out = getattr(client, op)(x, **options)
        _close(out, getattr(REF, op)(x, **options), dtype)
        g = rng.standard_normal(out.shape).astype(dtype)
        grads = getattr(client, f"{op}_backward")(g, x, **options)
        assert grads.weight is None and grads.bias is None
        _close(grads.input, getattr(REF, f"{op}_backward")(g, x, **options).input, dtype)


def test_outputs_are_writable_arrays_and_lists_are_accepted(client):
    a = [[1.0, 3, 1, 4], [2, 8, 5, 1], [3, 2, 0, 3]]
    y = client.conv2d([[a]], np.array([[1.0, 0], [-1, 1]])[None, None])
    np.testing.assert_array_equal(y[0, 0], [[7, 0, -3], [1, 6, 8]])
    y += 1  # a fresh array, not a view of the response buffer


def test_integer_tensors_are_refused_naming_the_tensor_never_converted(client):
    x, w = np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))
    for kwargs, field in ((dict(input=x.astype(np.int64), weight=w), "input"),
                          (dict(input=x, weight=w.astype(np.int32)), "weight"),
                          (dict(input=x, weight=w.astype(np.float32)), "weight")):  # fmt: skip
        with pytest.raises(ConvRpcError) as info:
            client.conv2d(**kwargs)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and info.value.field == field, info.value


def test_reference_experiment_2_transposed_conv_is_the_input_gradient(client):
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    k = np.array([[1.0, 2.0], [3.0, 4.0]])[None, None]
    want = [[1, 4, 7, 6], [7, 23, 33, 24], [19, 53, 63, 42], [21, 52, 59, 36]]
    np.testing.assert_array_equal(client.conv_transpose2d(x, k)[0, 0], want)
    grads = client.conv2d_backward(x, np.zeros((1, 1, 4, 4)), k)
    np.testing.assert_array_equal(grads.input[0, 0], want)


BAD_CALLS = [
    ("conv2d", dict(input=np.zeros((1, 3, 5, 5)), weight=np.zeros((2, 2, 3, 3))), "weight"),
    ("conv2d", dict(input=np.zeros((1, 4, 5, 5)), weight=np.zeros((2, 2, 3, 3)), groups=3), "op.conv2d.groups"),
    ("conv2d", dict(input=np.zeros((1, 1, 2, 2)), weight=np.zeros((1, 1, 3, 3))), "weight"),
    ("conv2d", dict(input=np.zeros((1, 1, 5, 5)), weight=np.zeros((1, 1, 3, 3)), stride=0), "op.conv2d.stride"),
    ("conv2d", dict(input=np.zeros((1, 1, 5, 5)), weight=np.zeros((1, 1, 3, 3)), padding="same", stride=2), "op.conv2d.padding"),
    ("conv2d", dict(input=np.zeros((1, 1, 5, 5)), weight=np.zeros((1, 1, 3, 3)), bias=np.zeros(2)), "bias"),
    ("conv2d", dict(input=np.zeros((5, 5)), weight=np.zeros((1, 1, 3, 3))), "input"),
    ("conv2d", dict(input=np.zeros((1, 1, 5, 5), np.float32), weight=np.zeros((1, 1, 3, 3))), "weight"),
    ("conv_transpose2d", dict(input=np.zeros((1, 1, 5, 5)), weight=np.zeros((1, 1, 3, 3)), stride=2, output_padding=2),
     "op.conv_transpose2d.output_padding"),
    ("max_pool2d", dict(input=np.zeros((1, 1, 5, 5)), kernel_size=2, padding=2), "op.max_pool2d.padding"),
    ("avg_pool2d", dict(input=np.zeros((1, 1, 2, 2)), kernel_size=3), "op.avg_pool2d.kernel_size"),
]  # fmt: skip


@pytest.mark.parametrize("op,kwargs,field", BAD_CALLS, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_requests_are_invalid_argument_naming_the_field_and_the_server_keeps_serving(client, op, kwargs, field):
    with pytest.raises(ConvRpcError) as info:
        getattr(client, op)(**kwargs)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field
    assert field in info.value.message
    np.testing.assert_array_equal(client.relu(np.array([[-1.0, 2.0]])), [[0.0, 2.0]])


def test_grad_output_of_the_wrong_shape_is_refused(client):
    with pytest.raises(ConvRpcError) as info:
        client.relu_backward(np.ones((1, 3)), np.ones((1, 2)))
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "grad_output"


def _raw_forward(server, request):
    with grpc.insecure_channel(server.target) as channel:
        return pb_grpc.ConvServiceStub(channel).Forward(request, timeout=30)


def _relu_request(**tensor):
    return pb.ForwardRequest(op=pb.Op(relu=pb.ReluOptions()), input=pb.Tensor(**tensor))


RAW_BAD = [
    (pb.ForwardRequest(input=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1], data=bytes(8))), "op"),
    (pb.ForwardRequest(op=pb.Op(relu=pb.ReluOptions())), "input"),
    (_relu_request(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=bytes(8)), "input.dtype"),
    (_relu_request(dtype=7, shape=[1], data=bytes(8)), "input.dtype"),
    (pb.ForwardRequest(op=wire.encode_op("max_pool2d", kernel_size=2),
                       input=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1, 0, 2, 2], data=b"")), "input"),
    (_relu_request(dtype=pb.DTYPE_INT64, shape=[1], data=bytes(8)), "input"),
    (_relu_request(dtype=pb.DTYPE_FLOAT64, shape=[-1, 4], data=bytes(8)), "input.shape"),
    (_relu_request(dtype=pb.DTYPE_FLOAT64, shape=[2**40, 2**40], data=bytes(8)), "input.shape"),
    (_relu_request(dtype=pb.DTYPE_FLOAT32, shape=[2**31, 2**31], data=bytes(1024)), "input.data"),
    (_relu_request(dtype=pb.DTYPE_FLOAT64, shape=[3], data=bytes(16)), "input.data"),
    (_relu_request(dtype=pb.DTYPE_FLOAT64, shape=[1], data=bytes(16)), "input.data"),
    (pb.ForwardRequest(op=pb.Op(max_pool2d=pb.MaxPool2dOptions()),
                       input=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1, 1, 2, 2], data=bytes(32))),
     "op.max_pool2d.kernel_size"),
    (pb.ForwardRequest(op=pb.Op(relu=pb.ReluOptions()), input=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1], data=bytes(8)),
                       weight=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1], data=bytes(8))), "weight"),
]  # fmt: skip


@pytest.mark.parametrize("request_,field", RAW_BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(RAW_BAD)])
def test_malformed_wire_messages_are_invalid_argument_with_bad_request_details(server, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        _raw_forward(server, request_)
    error = ConvRpcError.from_rpc_error(info.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.field == field, error
    ok = _raw_forward(server, _relu_request(dtype=pb.DTYPE_FLOAT64, shape=[1], data=np.float64(-3).tobytes()))
    assert ok.output.data == np.float64(0).tobytes()


def test_outputs_over_the_element_cap_are_resource_exhausted():
    from server_fixtures import running_server

    with running_server(backend="numpy", max_elements=1000, warm_up=False) as srv, ConvClient(srv.target) as c:
        with pytest.raises(ConvRpcError) as info:
            c.conv_transpose2d(np.ones((1, 1, 10, 10)), np.ones((1, 1, 3, 3)), stride=10)
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(ConvRpcError) as info:  # one row of 1001: no cut along the first axis fits
            c.relu(np.ones((1, 1001)))
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.cap == ("max_elements", 1000)
        assert c.relu(np.ones(1000)).shape == (1000,)
        assert c.relu(-np.ones(1001)).tolist() == [0.0] * 1001  # cut along its first axis to fit the cap


def test_server_info_describes_the_server(client, server):
    info = client.server_info()
    assert info.backend == server.backend.name
    assert list(info.ops) == ["conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "relu"]
    assert set(info.dtypes) == {"float32", "float64", "float16", "bfloat16"}
    assert info.max_message_bytes > 0 and info.max_elements > 0 and info.max_train_steps > 0
    assert info.compute_threads >= 1


def test_health_serving_and_reflection_lists_the_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        for service in ("", "convrpc.v1.ConvService"):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"convrpc.v1.ConvService", "grpc.health.v1.Health"} <= names


def test_reference_experiment_3_fits_the_edge_kernel_through_train_kernel(client):
    image = structured_image(80)[None, None]
    target = client.conv2d(image, EDGE_KERNEL[None, None])
    run = client.train_kernel(image, target, kernel_size=3, lr=0.5, loss="half_mse", tol=1e-7, max_steps=10000, seed=0)
    updates = list(run)
    result = run.result()
    assert result.stop_reason == "converged" and result.loss < 1e-7
    assert result.steps < 10000
    np.testing.assert_allclose(result.weight[0, 0], EDGE_KERNEL, atol=1e-2)
    assert result.bias is None
    assert updates and updates[0].step == 1
    assert np.all(np.diff(result.history.step) > 0)
    # At thousands of steps a second only a few rate-limited updates arrive; the first is step 1.
    assert result.history.loss[0] > result.loss


def test_reference_experiment_4_batch_training_with_bias_converges(client):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, 28, 28))
    y = np.ones((3, 4, 26, 26))
    w0 = rng.standard_normal((4, 3, 3, 3)) * 0.1
    run = client.train_kernel(x, y, init_weight=w0, bias=True, loss="half_mse", lr=0.001 * 4 * 26 * 26, max_steps=60,
                              tol=1e-12)  # fmt: skip
    result = run.result()
    assert result.bias.shape == (4,)
    out = client.conv2d(x, result.weight, result.bias)
    np.testing.assert_allclose(out, y, atol=1e-2)


def test_bad_training_requests_are_invalid_argument(client):
    x = np.ones((1, 1, 8, 8))
    cases = [
        (dict(target=np.ones((1, 1, 5, 5)), kernel_size=3), "target"),
        (dict(target=np.ones((1, 1, 6, 6)), kernel_size=3, lr=0.0), "lr"),
        (dict(target=np.ones((1, 1, 6, 6)), kernel_size=3, max_steps=0), "max_steps"),
        (dict(target=np.full((1, 1, 6, 6), np.nan), kernel_size=3), "target"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ConvRpcError) as info:
            client.train_kernel(x, **kwargs).result()
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert field in info.value.message, (field, info.value.message)


def test_asyncio_client_has_the_same_methods(server):
    async def main():
        async with AsyncConvClient(server.target, timeout=60) as c:
            x = np.arange(-4.0, 5.0).reshape(1, 1, 3, 3)
            y = await c.relu(x)
            g = await c.relu_backward(np.ones_like(x), x)
            run = c.train_kernel(x, await c.conv2d(x, np.ones((1, 1, 2, 2))), kernel_size=2, lr=0.01, max_steps=5)
            steps = [u.step async for u in run]
            result = await run.result()
            with pytest.raises(ConvRpcError):
                await c.conv2d(x, np.ones((1, 2, 2, 2)))
            return y, g, steps, result

    y, g, steps, result = asyncio.run(main())
    np.testing.assert_array_equal(y, np.maximum(np.arange(-4.0, 5.0), 0).reshape(1, 1, 3, 3))
    np.testing.assert_array_equal(g.input, (np.arange(-4.0, 5.0) > 0).reshape(1, 1, 3, 3).astype(float))
    assert steps and result.steps == 5 and result.stop_reason == "max_steps"


def test_a_list_of_targets_spreads_calls_round_robin(server):
    with ConvClient([server.target, server.target], timeout=30) as c:
        assert len({id(c._run_methods()[0]) for _ in range(4)}) == 2  # where training runs go, in turn
        assert c.relu(np.array([-1.0]))[0] == 0.0
