"""convrpc.client.nn: networks as a service. Layer specs named and argued like torch.nn, and Sequential.

These are the compute core's own definitions (one definition for SDK, server and core)::

    from convrpc.client import ConvClient
    from convrpc.client.nn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential

    net = Sequential(Conv2d(1, 8, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(), Linear(8 * 4 * 4, 10))
    params = net.init(seed=0)                       # one dict per layer, torch's layouts
    with ConvClient("127.0.0.1:50051") as client:
        logits = client.forward(net, x, params)
        grads = client.backward(net, x, params, grad_logits)   # NetworkGradients(input, params)
        result = client.train(net, x, labels, loss="cross_entropy", optimizer="adam", lr=1e-2).result()
"""

from convrpc.core.network import (
    AvgPool2d,
    Conv2d,
    ConvTranspose2d,
    Flatten,
    Linear,
    MaxPool2d,
    NetworkGradients,
    ReLU,
    Sequential,
)

from .network_methods import NetworkTrainResult

__all__ = [
    "AvgPool2d", "Conv2d", "ConvTranspose2d", "Flatten", "Linear", "MaxPool2d", "NetworkGradients",
    "NetworkTrainResult", "ReLU", "Sequential",
]  # fmt: skip
