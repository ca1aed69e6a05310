"""Networks through a real server on 127.0.0.1: forward, backward and training of a Sequential in one call.

Results equal the core's (``convrpc.core.network`` on the server's backend) bit for bit on every data
path the request can take (inline, stream chunks, shared memory, sharded along N), and torch.nn's to
1e-10 in float64; a chain that does not fit is refused naming the layer and the argument before any
compute; TrainNetwork streams progress and keeps the parameters reached when stopped.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from convrpc import networks, wire
from convrpc.client import ConvClient, ConvRpcError
from convrpc.client.aio import AsyncConvClient
from convrpc.client.nn import (
    AvgPool2d, Conv2d, ConvTranspose2d, Flatten, Linear, MaxPool2d, NetworkGradients, NetworkTrainResult, ReLU,
    Sequential,
)  # fmt: skip
from convrpc.core import get_backend, network
from convrpc.core.optim import AdamOptions
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc
from server_fixtures import server_backend

#: Every layer kind, with options, on a (5, 2, 9, 9) input.
NET = Sequential(
    Conv2d(2, 4, 3, padding=1, groups=2), ReLU(), MaxPool2d(2, ceil_mode=True),
    ConvTranspose2d(4, 3, 3, stride=2, padding=1, bias=False), AvgPool2d(3, stride=2, count_include_pad=False),
    Flatten(), Linear(48, 6), ReLU(), Linear(6, 4),
)  # fmt: skip
SHAPE = (5, 2, 9, 9)
#: A small classifier and its data: 24 samples of 3 classes, told apart by where their bright pixel is.
CLASSIFIER = Sequential(Conv2d(1, 4, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(), Linear(4 * 3 * 3, 3))


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE), NET.init(seed=seed + 1)


def _classes(n: int = 24):
    rng = np.random.default_rng(5)
    labels = np.arange(n, dtype=np.int64) % 3
    x = 0.1 * rng.standard_normal((n, 1, 6, 6))
    x[np.arange(n), 0, 1, 2 * labels] += 3.0
    return x, labels


def _same_gradients(got: NetworkGradients, expected: NetworkGradients) -> None:
    np.testing.assert_array_equal(got.input, expected.input)
    assert [set(p) for p in got.params] == [set(p) for p in expected.params]
    for g, e in zip(got.params, expected.params):
        for key in e:
            assert g[key].dtype == e[key].dtype
            np.testing.assert_array_equal(g[key], e[key])


@pytest.fixture(scope="module")
def backend():
    return get_backend(server_backend())


@pytest.mark.parametrize("path", ["unary", "stream", "shm"])
def test_forward_and_backward_equal_the_core_bit_for_bit_on_every_data_path(server, backend, path):
    x, params = _data()
    with ConvClient(server.target, data_path=path, timeout=120) as client:
        y = client.forward(NET, x, params)
        expected = network.forward(backend, NET, x, params)
        assert y.dtype == np.float64 and y.shape == expected.shape == (5, 4)
        np.testing.assert_array_equal(y, expected)
        gy = np.random.default_rng(2).standard_normal(y.shape)
        _same_gradients(client.backward(NET, x, params, gy), network.backward(backend, NET, x, params, gy))


def test_a_sharded_call_concatenates_outputs_and_sums_parameter_gradients(server, backend):
    x, params = _data(3)
    gy = np.random.default_rng(4).standard_normal((5, 4))
    with ConvClient(server.target, shard_size=2, timeout=120) as client:
        np.testing.assert_array_equal(client.forward(NET, x, params), network.forward(backend, NET, x, params))
        got, expected = client.backward(NET, x, params, gy), network.backward(backend, NET, x, params, gy)
    # smaller batches round differently in the kernels' blocked sums, and the parameter gradients are sums
    # over three shards instead of one batch: equal up to rounding
    np.testing.assert_allclose(got.input, expected.input, rtol=1e-12, atol=1e-16)
    for g, e in zip(got.params, expected.params):
        for key in e:
            np.testing.assert_allclose(g[key], e[key], rtol=1e-12, atol=1e-13)


def test_float32_parameters_travel_and_come_back_in_float32(client, backend):
    x, params = _data()
    x32 = x.astype(np.float32)
    p32 = [{k: v.astype(np.float32) for k, v in p.items()} for p in params]
    grads = client.backward(NET, x32, p32, np.ones((5, 4), np.float32))
    assert grads.input.dtype == np.float32 and all(v.dtype == np.float32 for p in grads.params for v in p.values())
    _same_gradients(grads, network.backward(backend, NET, x32, p32, np.ones((5, 4), np.float32)))


def test_forward_and_backward_equal_torch_in_float64(client):
    pytest.importorskip("torch")
    import torch
    from test_network_torch import torch_net

    x, params = _data(7)
    model = torch_net(NET, params)
    tx = torch.from_numpy(x).requires_grad_()
    ty = model(tx)
    gy = np.random.default_rng(8).standard_normal(tuple(ty.shape))
    ty.backward(torch.from_numpy(gy))
    np.testing.assert_allclose(client.forward(NET, x, params), ty.detach().numpy(), rtol=0, atol=1e-10)
    grads = client.backward(NET, x, params, gy)
    np.testing.assert_allclose(grads.input, tx.grad.numpy(), rtol=0, atol=1e-10)
    for module, entry in zip(model, grads.params):
        for key, value in entry.items():
            np.testing.assert_allclose(value, getattr(module, key).grad.numpy(), rtol=0, atol=1e-10)


# -- refusals, before any compute -------------------------------------------------------------------


def _refused(call) -> ConvRpcError:
    with pytest.raises(ConvRpcError) as info:
        call()
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    return info.value


def test_the_sdk_refuses_a_chain_that_does_not_fit_naming_the_layer_and_argument(client):
    x, params = _data()
    bad = Sequential(Conv2d(2, 4, 3), ReLU(), Conv2d(3, 2, 3))
    error = _refused(lambda: client.forward(bad, x, bad.init(seed=0)))
    assert error.field == "network.layers[2].in_channels" and "expected 4, got 3" in error.message
    no_flatten = Sequential(Conv2d(2, 4, 3), Linear(4 * 7 * 7, 2))  # Linear acts on the last axis, as torch's
    error = _refused(lambda: client.forward(no_flatten, x, no_flatten.init(seed=0)))
    assert error.field == "network.layers[1].linear.in_features" and "expected 7, got 196" in error.message
    wrong = [dict(p) for p in params]
    wrong[6] = {"weight": params[6]["weight"][:, :-1], "bias": params[6]["bias"]}
    assert _refused(lambda: client.forward(NET, x, wrong)).field == "params[6].weight"
    error = _refused(lambda: client.backward(NET, x, params, np.ones((5, 3))))
    assert error.field == "grad_output"


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ConvServiceStub(channel)


def _request(net: Sequential, x, params, **fields) -> pb.ForwardRequest:
    tensors = {f: wire.encode_tensor(a, f) for f, a in networks.param_arrays(params).items()}
    request = pb.ForwardRequest(network=networks.encode_network(net), input=wire.encode_tensor(x), **fields)
    return wire.fill_tensors(request, tensors, len(net))


def _server_refusal(stub, request) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request, timeout=60)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def test_the_server_refuses_a_bad_network_naming_the_request_field(stub):
    x, params = _data()
    bad = Sequential(Conv2d(2, 4, 3), ReLU(), MaxPool2d(2), Conv2d(3, 2, 3, stride=2))
    details = _server_refusal(stub, _request(bad, x, bad.init(seed=0)))
    assert details == "network.layers[3].in_channels: expected 4, got 3"
    request = _request(NET, x, params)
    request.network.layers[2].max_pool2d.stride.height = -1
    assert _server_refusal(stub, request).startswith("network.layers[2].max_pool2d.stride")
    request = _request(NET, x, params)
    request.network.layers[2].max_pool2d.return_indices = True
    assert _server_refusal(stub, request).startswith("network.layers[2].max_pool2d.return_indices")
    request = _request(NET, x, params)
    request.network.layers[1].in_channels = 3
    assert _server_refusal(stub, request).startswith("network.layers[1].in_channels: is for conv layers only")
    request = _request(NET, x, params)
    del request.params[-1]
    assert _server_refusal(stub, request).startswith("params: expected 9 entries")
    request = _request(NET, x, params, weight=wire.encode_tensor(params[0]["weight"]))
    assert _server_refusal(stub, request).startswith("weight: a network takes its parameters in params")
    assert _server_refusal(stub, pb.ForwardRequest(network=pb.Network(), input=request.input)).startswith(
        "network.layers: expected at least one layer"
    )


# -- training ---------------------------------------------------------------------------------------


def test_train_streams_progress_and_ends_with_the_cores_result(server, backend):
    x, labels = _classes()
    params = CLASSIFIER.init(seed=1)
    with ConvClient(server.target) as client:
        run = client.train(CLASSIFIER, x, labels, params=params, loss="cross_entropy", optimizer="adam", lr=0.05,
                           max_steps=30, batch_size=8, seed=2)  # fmt: skip
        updates = list(run)
        result = run.result()
    config = network.NetworkTrainConfig(loss="cross_entropy", optimizer=AdamOptions(lr=0.05), max_steps=30,
                                        batch_size=8, seed=2)  # fmt: skip
    *_, expected = network.fit_network(backend, CLASSIFIER, x, labels, params, config)
    assert isinstance(result, NetworkTrainResult) and result.stop_reason == "max_steps" and result.steps == 30
    assert updates and all(u.accuracy is not None and 0 <= u.accuracy <= 1 for u in updates)
    assert [u.step for u in updates] == sorted({u.step for u in updates})
    assert [set(p) for p in result.params] == [set(p) for p in params]
    for got, want in zip(result.params, expected.params):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.history.loss, expected.history, rtol=1e-12)
    assert result.loss == pytest.approx(expected.loss, rel=1e-12) and result.accuracy == expected.accuracy


def test_a_cancelled_run_keeps_the_parameters_it_reached(client):
    x, labels = _classes()
    run = client.train(CLASSIFIER, x, labels, seed=0, loss="cross_entropy", lr=0.01, max_steps=100_000)
    for update in run:
        if update.step >= 3:
            run.cancel()
    result = run.result()
    assert result.stop_reason == "cancelled" and 3 <= result.steps < 100_000
    assert [{k: v.shape for k, v in p.items()} for p in result.params] == [
        {k: tuple(s) for k, s in p.items()} for p in CLASSIFIER.parameter_shapes()
    ]
    assert len(result.history) == result.steps + 1 and result.history.loss[-1] == result.loss


def test_leaving_the_loop_stops_the_run_and_keeps_its_result(client):
    x, labels = _classes()
    run = client.train(CLASSIFIER, x, labels, seed=0, loss="cross_entropy", max_steps=100_000)
    for update in run:
        break
    result = run.result()
    assert result.stop_reason == "cancelled" and result.steps < 100_000 and len(result.params) == len(CLASSIFIER)


def test_train_fits_a_regression_target_from_parameters_drawn_on_the_server(client):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 1, 3, 2))
    weight, bias = rng.standard_normal((2, 6)), rng.standard_normal(2)
    target = x.reshape(16, 6) @ weight.T + bias  # a hidden Linear(6, 2): the fit must find it
    net = Sequential(Flatten(), Linear(6, 2))
    result = client.train(net, x, target, seed=4, loss="half_mse", lr=0.5, max_steps=2000, tol=1e-16).result()
    assert result.stop_reason == "converged" and result.accuracy is None and result.params[0] == {}
    np.testing.assert_allclose(result.params[1]["weight"], weight, atol=1e-6)
    np.testing.assert_allclose(result.params[1]["bias"], bias, atol=1e-6)


def test_train_refuses_bad_arguments_naming_them(client):
    x, labels = _classes()
    bad = Sequential(Conv2d(1, 4, 3), Flatten(), Linear(35, 3))
    assert _refused(lambda: client.train(bad, x, labels, loss="cross_entropy")).field == "network.layers[2].linear.in_features"
    assert _refused(lambda: client.train(CLASSIFIER, x, labels, loss="hinge")).field == "loss"
    assert _refused(lambda: client.train(CLASSIFIER, x, labels, lr=0)).field == "lr"
    assert _refused(lambda: client.train_kernel(x, x, kernel_size=1, loss="cross_entropy")).field == "loss"
    with pytest.raises(ConvRpcError) as info:  # the server's check of the target, when the run is consumed
        client.train(CLASSIFIER, x, labels.astype(np.float64), loss="cross_entropy").result()
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and info.value.field.startswith("target")


def test_the_asyncio_client_has_the_same_network_methods(server, backend):
    x, params = _data()
    gy = np.ones((5, 4))
    xs, labels = _classes()

    async def main():
        async with AsyncConvClient(server.target, timeout=120) as client:
            y = await client.forward(NET, x, params)
            grads = await client.backward(NET, x, params, gy)
            run = client.train(CLASSIFIER, xs, labels, seed=0, loss="cross_entropy", max_steps=100_000)
            async for update in run:
                if update.step >= 2:
                    run.cancel()
            return y, grads, await run.result()

    y, grads, result = asyncio.run(main())
    np.testing.assert_array_equal(y, network.forward(backend, NET, x, params))
    _same_gradients(grads, network.backward(backend, NET, x, params, gy))
    assert result.stop_reason == "cancelled" and len(result.params) == len(CLASSIFIER)


def test_the_seed_batch_experiment_runs_as_a_one_layer_network_with_train_kernels_result(client):
    """Seed experiment 4: a 3 -> 4 channel 3x3 conv with a bias fitted to all-ones targets, lr 0.001 on
    half the sum of squares per sample (``half_mse`` with lr 0.001 * 4*26*26)."""
    rng = np.random.default_rng(4)
    x, target = rng.standard_normal((3, 3, 28, 28)), np.ones((3, 4, 26, 26))
    weight, bias = rng.standard_normal((4, 3, 3, 3)) * 0.1, np.zeros(4)
    options = dict(loss="half_mse", lr=0.001 * 4 * 26 * 26, max_steps=200, tol=1e-12)
    kernel = client.train_kernel(x, target, init_weight=weight, bias=True, init_bias=bias, **options).result()
    net = Sequential(Conv2d(3, 4, 3))
    fit = client.train(net, x, target, params=[{"weight": weight, "bias": bias}], **options).result()
    assert fit.stop_reason == kernel.stop_reason == "converged" and fit.steps == kernel.steps < 100
    np.testing.assert_allclose(fit.history.loss, kernel.history.loss, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(fit.params[0]["weight"], kernel.weight, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fit.params[0]["bias"], kernel.bias, rtol=1e-9, atol=1e-12)
    assert np.allclose(client.forward(net, x, fit.params), target, atol=1e-5)


def test_a_network_over_the_element_cap_in_a_middle_layer_is_cut_along_n_to_fit(backend):
    from server_fixtures import running_server

    net = Sequential(ConvTranspose2d(1, 8, 4, stride=4), ReLU(), AvgPool2d(4), Flatten(), Linear(8 * 6 * 6, 2))
    x = np.random.default_rng(9).standard_normal((12, 1, 6, 6))
    params = net.init(seed=0)
    # The (12, 8, 24, 24) activation of layer 0 is over the cap of 20000 elements; 3 rows of it fit.
    with running_server(backend=server_backend(), warm_up=False, max_elements=20_000) as srv:
        with ConvClient(srv.target, timeout=120) as client:
            np.testing.assert_allclose(client.forward(net, x, params), network.forward(backend, net, x, params),
                                       rtol=1e-12, atol=1e-14)  # fmt: skip
            assert client._core.caps == {"max_elements": 20_000}
        with grpc.insecure_channel(srv.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.ConvServiceStub(channel).Forward(_request(net, x, params), timeout=60)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("network.layers[0]: its output (12, 8, 24, 24)"), info.value.details()


def test_training_a_network_keeps_to_the_servers_step_time_and_cost_caps():
    from server_fixtures import running_server

    x, labels = _classes()
    caps = dict(max_train_steps=50, max_train_seconds=30, max_op_flops=5e4)
    with running_server(backend=server_backend(), warm_up=False, **caps) as srv:
        with ConvClient(srv.target, timeout=120) as client:
            with pytest.raises(ConvRpcError) as info:
                client.train(CLASSIFIER, x, labels, loss="cross_entropy", max_steps=51).result()
            assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "max_steps"
            with pytest.raises(ConvRpcError) as info:  # conv 24x4x6x6x9 multiply-adds, forward and backward
                client.train(CLASSIFIER, x, labels, loss="cross_entropy", max_steps=5).result()
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.field == "network.layers[0]"
            with pytest.raises(ConvRpcError) as info:
                client.train(Sequential(Flatten(), Linear(36, 3)), x, labels, loss="cross_entropy", max_steps=5,
                             max_seconds=31).result()
            assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "max_seconds"
