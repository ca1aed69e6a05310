"""A tour of the SDK against a running server: every op, its gradients, and a kernel fit.

    convrpc serve &            # or any server: pass its address as the first argument
    python examples/sdk_tour.py 127.0.0.1:50051
"""

import sys

import numpy as np

from convrpc.client import ConvClient, ConvRpcError

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 16, 16))
w = rng.standard_normal((4, 3, 3, 3))

with ConvClient(target, timeout=60) as client:
    info = client.server_info()
    print(f"convrpc {info.version}: backend {info.backend} on {info.device}")

    y = client.conv2d(x, w, padding=1)
    print("conv2d", x.shape, "*", w.shape, "->", y.shape)
    grads = client.conv2d_backward(np.ones_like(y), x, w, padding=1)
    print("conv2d_backward -> input", grads.input.shape, "weight", grads.weight.shape)
    print("conv_transpose2d ->", client.conv_transpose2d(y, w, stride=2).shape)
    print("max_pool2d ->", client.max_pool2d(y, 2).shape, " avg_pool2d ->", client.avg_pool2d(y, 3, 1, 1).shape)
    print("relu: fraction positive", float((client.relu(y) > 0).mean()))

    try:
        client.conv2d(x, w, stride=0)
    except ConvRpcError as e:
        print("a bad request fails cleanly:", e.code.name, e.field)

    target_y = client.conv2d(x, w)
    result = client.train_kernel(x, target_y, kernel_size=3, optimizer="adam", lr=0.05, max_steps=500, seed=1).result()
    print(f"fit: {result.stop_reason} after {result.steps} steps, loss {result.loss:.2e}, "
          f"max |w - true| = {np.abs(result.weight - w).max():.3f}")
