"""The CuPy backend on a real GPU: parity with the NumPy reference and PyTorch, and arrays kept on the device.

Skipped as a whole unless CuPy imports and a CUDA device is visible; the same kernels are tested on
the CPU with NumPy as the array module in test_array_kernels.py.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")


def _device_visible() -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


if not _device_visible():
    pytest.skip("no CUDA device is visible", allow_module_level=True)

from convrpc.core import Backend, get_backend, resolve_backend_name  # noqa: E402
from convrpc.core.array_kernels import make_kernels  # noqa: E402
from kernel_cases import (  # noqa: E402
    AVG_POOL2D_CASES,
    CONV2D_CASES,
    CONV_TRANSPOSE2D_CASES,
    MAX_POOL2D_CASES,
    TORCH_CASES,
    TORCH_IDS,
    assert_results_match,
    conv_geometry,
    make_arrays,
    op_results,
    torch_results,
)

pytestmark = pytest.mark.gpu

DTYPES = [np.float32, np.float64]
CONV_CASES = [("conv2d", c) for c in CONV2D_CASES] + [("conv_transpose2d", c) for c in CONV_TRANSPOSE2D_CASES]
CONV_IDS = [f"{op}-{i}" for op, cases in (("conv2d", CONV2D_CASES), ("conv_transpose2d", CONV_TRANSPOSE2D_CASES))
            for i in range(len(cases))]  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    return get_backend("numpy")


@pytest.fixture(scope="module")
def gpu():
    return get_backend("cupy")


def device_results(backend, op, inputs, gy, options):
    """Run on device arrays and check every result comes back as a device array of the input dtype."""

    def get(a):
        assert isinstance(a, cupy.ndarray), f"{op} returned {type(a).__name__}, not a device array"
        assert a.dtype == inputs[0].dtype
        return cupy.asnumpy(a)

    return op_results(backend, op, inputs, gy, options, put=cupy.asarray, get=get)


@pytest.mark.parametrize("tiling", ["default", "one_row", "two_samples"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, case", CONV_CASES, ids=CONV_IDS)
def test_conv_matches_reference_on_device(gpu, reference, op, case, dtype, tiling):
    x_shape, w_shape, options = case
    g = conv_geometry(op, (x_shape, w_shape), options)
    row = make_kernels(cupy).row_bytes(g, np.dtype(dtype).itemsize)
    budget = {"default": None, "one_row": 1, "two_samples": 2 * row * g.out_h}[tiling]
    backend = gpu if budget is None else Backend("cupy", make_kernels(cupy, workspace_bytes=budget), gpu.device)
    inputs, gy = make_arrays(reference, op, (x_shape, w_shape), options, dtype)
    got = device_results(backend, op, inputs, gy, options)
    assert_results_match(got, op_results(reference, op, inputs, gy, options), dtype)


@pytest.mark.parametrize("values", ["normal", "ties", "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MAX_POOL2D_CASES)
def test_max_pool2d_matches_reference_on_device(gpu, reference, case, dtype, values):
    shape, options = case
    inputs, gy = make_arrays(reference, "max_pool2d", (shape,), options, dtype, values=values)
    got = device_results(gpu, "max_pool2d", inputs, gy, options)
    expected = op_results(reference, "max_pool2d", inputs, gy, options)
    np.testing.assert_array_equal(got[0], expected[0])  # a selected element, NaN where a window has one
    assert_results_match(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", AVG_POOL2D_CASES)
def test_avg_pool2d_matches_reference_on_device(gpu, reference, case, dtype):
    shape, options = case
    inputs, gy = make_arrays(reference, "avg_pool2d", (shape,), options, dtype)
    got = device_results(gpu, "avg_pool2d", inputs, gy, options)
    assert_results_match(got, op_results(reference, "avg_pool2d", inputs, gy, options), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_matches_reference_on_device(gpu, reference, dtype):
    x = np.array([[[[-1.5, 0.0, -0.0, 2.0], [np.nan, 3.0, -np.inf, np.inf]]]], dtype=dtype)
    gy = np.arange(1, 9, dtype=dtype).reshape(x.shape)
    got = device_results(gpu, "relu", [x], gy, {})
    assert_results_match(got, op_results(reference, "relu", [x], gy, {}), dtype, exact=True)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, case", TORCH_CASES, ids=TORCH_IDS)
def test_matches_torch_on_device(gpu, reference, op, case, dtype):
    *shapes, options = case
    inputs, gy = make_arrays(reference, op, tuple(shapes), options, dtype)
    assert_results_match(device_results(gpu, op, inputs, gy, options), torch_results(op, inputs, gy, options), dtype)


def test_host_arrays_in_give_host_arrays_out(gpu):
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = np.ones((4, 3, 3, 3), dtype=np.float32)
    y = gpu.conv2d(x, w)
    grads = gpu.conv2d_backward(np.ones_like(y), x, w)
    assert all(isinstance(a, np.ndarray) for a in (y, grads.input, grads.weight))


def test_auto_picks_cupy_and_names_the_device(gpu):
    assert resolve_backend_name("auto") == "cupy"
    assert gpu.device.startswith("cuda:")
