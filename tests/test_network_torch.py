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
