"""Networks against PyTorch: forward, backward (float64, 1e-10) and 40-step training trajectories
(1e-8) equal torch.nn.Sequential and torch.optim with the same parameters, data and batches."""

from __future__ import annotations

import numpy as np
import pytest
from convrpc.core import available_backends, get_backend
from convrpc.core.network import (
    AvgPool2d,
    Conv2d,
    ConvTranspose2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    backward,
    forward,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

BACKENDS = available_backends()

#: Chains mixing every layer kind and option, with their input shapes.
CHAINS = {
    "strided": (
        Sequential(
            Conv2d(2, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=False),
            ReLU(),
            MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
            AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            MaxPool2d(2, stride=1, dilation=2),
            Flatten(),
            Linear(90, 7),
            ReLU(),
            Linear(7, 5, bias=False),
        ),
        (3, 2, 11, 11),
    ),
    "same": (
        Sequential(
            Conv2d(1, 3, 3, padding="same", dilation=2),
            AvgPool2d(2, divisor_override=3),
            ConvTranspose2d(3, 2, 2, dilation=2, bias=False),
            ReLU(),
            AvgPool2d((2, 3), stride=(1, 2), padding=1),
            Flatten(),
            Linear(36, 4),
        ),
        (2, 1, 7, 6),
    ),
    "dense": (Sequential(Linear(5, 6), ReLU(), Linear(6, 3)), (4, 5)),
}


def torch_module(layer):
    """The torch.nn module a spec names, with the same arguments."""
    kind = getattr(torch.nn, type(layer).__name__)
    args = {f: getattr(layer, f) for f in layer.__dataclass_fields__}
    return kind(**args)


def torch_net(net: Sequential, params: list) -> torch.nn.Sequential:
    model = torch.nn.Sequential(*map(torch_module, net)).double()
    with torch.no_grad():
        for module, entry in zip(model, params):
            for name, value in entry.items():
                getattr(module, name).copy_(torch.from_numpy(value))
    return model


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("chain", CHAINS)
def test_forward_and_backward_equal_torch_sequential(name, chain):
    net, shape = CHAINS[chain]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    params = net.init(seed=3)
    model = torch_net(net, params)
    tx = torch.from_numpy(x).requires_grad_()
    ty = model(tx)
    gy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.from_numpy(gy))

    backend = get_backend(name)
    y = forward(backend, net, x, params)
    assert y.shape == tuple(ty.shape) and y.dtype == np.float64
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=1e-10)
    grads = backward(backend, net, x, params, gy)
    np.testing.assert_allclose(grads.input, tx.grad.numpy(), rtol=0, atol=1e-10)
    assert [set(g) for g in grads.params] == [set(p) for p in params]
    for module, entry in zip(model, grads.params):
        for key, value in entry.items():
            np.testing.assert_allclose(value, getattr(module, key).grad.numpy(), rtol=0, atol=1e-10)


def test_parameter_shapes_are_torch_layouts():
    for net, _ in CHAINS.values():
        model = torch.nn.Sequential(*map(torch_module, net))
        expected = [{k: tuple(v.shape) for k, v in m.named_parameters()} for m in model]
        assert net.parameter_shapes() == expected


# -- training trajectories ----------------------------------------------------------------------

TRAIN_NET = Sequential(
    Conv2d(1, 3, 3, padding=1), ReLU(), MaxPool2d(2), ConvTranspose2d(3, 2, 2, stride=2), AvgPool2d(2),
    Flatten(), Linear(32, 3),
)  # fmt: skip

TRAIN_CASES = [
    ("sgd", dict(lr=0.05), "mse", None),
    ("sgd", dict(lr=0.05, momentum=0.9), "half_mse", 4),
    ("sgd", dict(lr=0.01, momentum=0.8, nesterov=True, weight_decay=0.01), "half_sse", None),
    ("sgd", dict(lr=0.1, weight_decay=0.1), "cross_entropy", 3),
    ("adam", dict(lr=0.01), "cross_entropy", 4),
    ("adam", dict(lr=0.02, beta1=0.3, beta2=0.9, eps=1e-6, weight_decay=0.05), "mse", None),
]


def torch_loss(name, z, y):
    if name == "cross_entropy":
        return F.cross_entropy(z, y)
    if name == "half_sse":
        return 0.5 * ((z - y) ** 2).sum()
    return (0.5 if name == "half_mse" else 1.0) * F.mse_loss(z, y)


def torch_optimizer(kind, options, parameters):
    if kind == "sgd":
        return torch.optim.SGD(parameters, **options)
    adam = dict(options)
    betas = (adam.pop("beta1", 0.9), adam.pop("beta2", 0.999))
    return torch.optim.Adam(parameters, betas=betas, **adam)


def batch_order(seed, n, batch_size, steps):
    """The documented sampler: each epoch a permutation from the second stream spawned from the seed."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    batches = []
    while len(batches) < steps:
        perm = rng.permutation(n)
        batches += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return batches[:steps]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind, options, loss, batch_size", TRAIN_CASES)
def test_40_step_training_trajectories_equal_torch_optim(name, kind, options, loss, batch_size):
    from convrpc.core.network import NetworkTrainConfig, fit_network
    from convrpc.core.optim import AdamOptions, SgdOptions

    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 1, 8, 8))
    y = rng.integers(0, 3, 6) if loss == "cross_entropy" else rng.standard_normal((6, 3))
    params = TRAIN_NET.init(seed=2)
    opt = (SgdOptions if kind == "sgd" else AdamOptions)(**options)
    config = NetworkTrainConfig(loss=loss, optimizer=opt, max_steps=40, batch_size=batch_size, seed=9)
    *_, result = fit_network(get_backend(name), TRAIN_NET, x, y, params, config)
    assert result.stop_reason == "max_steps" and result.steps == 40

    model = torch_net(TRAIN_NET, params)
    optimizer = torch_optimizer(kind, options, model.parameters())
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    order = batch_order(9, 6, batch_size, 40) if batch_size else [np.arange(6)] * 40
    losses = []
    for idx in order:
        idx = torch.from_numpy(idx)
        value = torch_loss(loss, model(tx[idx]), ty[idx])
        losses.append(value.item())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    for module, entry in zip(model, result.params):
        for key, value in entry.items():
            np.testing.assert_allclose(value, getattr(module, key).detach().numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(result.history[:-1], losses, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        final = torch_loss(loss, model(tx), ty).item()
    assert result.loss == pytest.approx(final, rel=1e-8, abs=1e-10)
    if loss == "cross_entropy":
        with torch.no_grad():
            assert result.accuracy == pytest.approx((model(tx).argmax(1) == ty).double().mean().item())
    else:
        assert result.accuracy is None
