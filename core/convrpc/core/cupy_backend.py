"""The GPU backend: the array-module kernels of :mod:`convrpc.core.array_kernels` run with CuPy (cuBLAS GEMMs).

Importing this module fails with ImportError when CuPy is missing or no CUDA device is visible;
:func:`convrpc.core.get_backend` turns that into a BackendUnavailableError naming the ``[gpu]``
extra, so a misconfigured server stops at start-up rather than mid-request.
"""

from __future__ import annotations

try:
    import cupy
except ImportError:
    raise  # the [gpu] extra is not installed
except Exception as exc:  # a CuPy whose CUDA libraries fail to load
    raise ImportError(f"CuPy failed to import: {exc}") from None

from .array_kernels import make_kernels


def _device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError (no driver, no device) or a broken CUDA install
        raise ImportError(f"CuPy is installed but no CUDA device is usable: {exc}") from None


if _device_count() < 1:
    raise ImportError("CuPy is installed but no CUDA device is visible")


def DEVICE() -> str:
    """The current CUDA device as 'cuda:<id> <name>'."""
    device_id = cupy.cuda.runtime.getDevice()
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"cuda:{device_id} {name}"


_kernels = make_kernels(cupy)

xp = cupy
to_device = _kernels.to_device
to_host = _kernels.to_host
conv2d = _kernels.conv2d
conv2d_input_grad = _kernels.conv2d_input_grad
conv2d_weight_grad = _kernels.conv2d_weight_grad
max_pool2d = _kernels.max_pool2d
max_pool2d_backward = _kernels.max_pool2d_backward
avg_pool2d = _kernels.avg_pool2d
avg_pool2d_backward = _kernels.avg_pool2d_backward
relu = _kernels.relu
relu_backward = _kernels.relu_backward
