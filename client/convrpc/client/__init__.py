"""convrpc.client: the Python SDK. numpy arrays in and out, one method per op, ConvRpcError on failure.

    from convrpc.client import ConvClient
    with ConvClient("127.0.0.1:50051") as client:
        y = client.conv2d(x, w, padding=1)
        grads = client.conv2d_backward(dy, x, w, padding=1)   # Gradients(input, weight, bias)
        run = client.train_kernel(x, target, kernel_size=3, lr=0.5, loss="half_mse", progress=True)
        result = run.result()
"""

from convrpc.core.backend import Gradients

from .conv_client import ConvClient
from .errors import ConvRpcError
from .server_info import ServerInfo
from .training import History, TrainingRun, TrainProgress, TrainResult

__all__ = [
    "ConvClient", "ConvRpcError", "Gradients", "History", "ServerInfo", "TrainProgress", "TrainResult", "TrainingRun",
]  # fmt: skip
