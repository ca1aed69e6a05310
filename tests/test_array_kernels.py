"""The GPU backend's kernels run on the CPU with NumPy as the array module, against the NumPy reference."""

from __future__ import annotations

import ast
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import convrpc.core as core
from convrpc.core import Backend, BackendUnavailableError, get_backend, resolve_backend_name
from convrpc.core import array_kernels
from convrpc.core.array_kernels import make_kernels
from kernel_cases import (
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

DTYPES = [np.float32, np.float64]
#: How the conv workspace is sized: the default, one output row per tile, three rows, two whole samples.
WORKSPACES = ["default", "one_row", "three_rows", "two_samples"]


@pytest.fixture(scope="module")
def reference():
    return get_backend("numpy")


def workspace_bytes(mode: str, g, itemsize: int):
    row = array_kernels.ArrayKernels.row_bytes(g, itemsize)
    return {"default": None, "one_row": 1, "three_rows": 3 * row, "two_samples": 2 * row * g.out_h}[mode]


def array_backend(workspace=None) -> Backend:
    return Backend("arraykernels", make_kernels(np, workspace_bytes=workspace))


# -- parity with the reference --------------------------------------------------------------------


@pytest.mark.parametrize("mode", WORKSPACES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "op, case",
    [("conv2d", c) for c in CONV2D_CASES] + [("conv_transpose2d", c) for c in CONV_TRANSPOSE2D_CASES],
    ids=[f"conv2d-{i}" for i in range(len(CONV2D_CASES))]
    + [f"conv_transpose2d-{i}" for i in range(len(CONV_TRANSPOSE2D_CASES))],
)
def test_conv_matches_reference(reference, op, case, dtype, mode):
    x_shape, w_shape, options = case
    g = conv_geometry(op, (x_shape, w_shape), options)
    backend = array_backend(workspace_bytes(mode, g, np.dtype(dtype).itemsize))
    inputs, gy = make_arrays(reference, op, (x_shape, w_shape), options, dtype)
    got = op_results(backend, op, inputs, gy, options)
    assert_results_match(got, op_results(reference, op, inputs, gy, options), dtype)


@pytest.mark.parametrize("values", ["normal", "ties", "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MAX_POOL2D_CASES)
def test_max_pool2d_matches_reference_exactly(reference, case, dtype, values):
    # The forward value is a selected element and the backward routes each gradient to one tap in the
    # same tap order, so first-max ties and NaN windows must agree bit for bit.
    shape, options = case
    inputs, gy = make_arrays(reference, "max_pool2d", (shape,), options, dtype, values=values)
    got = op_results(array_backend(), "max_pool2d", inputs, gy, options)
    assert_results_match(got, op_results(reference, "max_pool2d", inputs, gy, options), dtype, exact=True)


def test_max_pool2d_routes_ties_to_the_first_max_and_nans_to_the_last_nan_like_torch():
    backend = array_backend()
    x = np.array([[[[1.0, np.nan, 2.0, np.nan], [3.0, 5.0, 5.0, 0.0], [-np.inf, -np.inf, -np.inf, -np.inf]]]])
    gy = np.array([[[[10.0], [20.0], [30.0]]]])
    y = backend.max_pool2d(x, (1, 4))
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 1, 0] == 5.0 and y[0, 0, 2, 0] == -np.inf
    gx = backend.max_pool2d_backward(gy, x, (1, 4)).input
    np.testing.assert_array_equal(gx, [[[[0, 0, 0, 10], [0, 20, 0, 0], [30, 0, 0, 0]]]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", AVG_POOL2D_CASES)
def test_avg_pool2d_matches_reference(reference, case, dtype):
    shape, options = case
    inputs, gy = make_arrays(reference, "avg_pool2d", (shape,), options, dtype)
    got = op_results(array_backend(), "avg_pool2d", inputs, gy, options)
    assert_results_match(got, op_results(reference, "avg_pool2d", inputs, gy, options), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_matches_reference(reference, dtype):
    x = np.array([[[[-1.5, 0.0, -0.0, 2.0], [np.nan, 3.0, -np.inf, np.inf]]]], dtype=dtype)
    gy = np.arange(1, 9, dtype=dtype).reshape(x.shape)
    got = op_results(array_backend(), "relu", [x], gy, {})
    assert_results_match(got, op_results(reference, "relu", [x], gy, {}), dtype, exact=True)
    np.testing.assert_array_equal(got[1], [[[[0, 0, 0, 4], [5, 6, 0, 8]]]])


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, case", TORCH_CASES, ids=TORCH_IDS)
def test_matches_torch(reference, op, case, dtype):
    *shapes, options = case
    inputs, gy = make_arrays(reference, op, tuple(shapes), options, dtype)
    got = op_results(array_backend(workspace=1), op, inputs, gy, options)
    assert_results_match(got, torch_results(op, inputs, gy, options), dtype)


def test_seed_examples():
    backend = array_backend(workspace=1)
    a = np.array([[1, 3, 1, 4], [2, 8, 5, 1], [3, 2, 0, 3]], dtype=np.float64)[None, None]
    k = np.array([[1, 0], [-1, 1]], dtype=np.float64)[None, None]
    np.testing.assert_array_equal(backend.conv2d(a, k)[0, 0], [[7, 0, -3], [1, 6, 8]])
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    k = np.array([[1, 2], [3, 4]], dtype=np.float64)[None, None]
    expected = [[1, 4, 7, 6], [7, 23, 33, 24], [19, 53, 63, 42], [21, 52, 59, 36]]
    np.testing.assert_array_equal(backend.conv_transpose2d(x, k)[0, 0], expected)


# -- workspace tiling -----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 500, 3000, 20_000, 60_000, 10**9])
def test_tiles_cover_every_sample_and_row_once(budget):
    g = conv_geometry("conv2d", ((5, 3, 12, 10), (4, 3, 3, 3)), dict(padding=1))
    kernels = make_kernels(np, workspace_bytes=budget)
    row = kernels.row_bytes(g, 8)
    seen = np.zeros((g.n, g.out_h), dtype=int)
    for n0, n1, r0, r1 in kernels.tiles(g, 8):
        seen[n0:n1, r0:r1] += 1
        # A tile stays within the budget unless it is a single row, the smallest unit there is.
        assert (n1 - n0) * (r1 - r0) * row <= budget or (n1 - n0, r1 - r0) == (1, 1)
    np.testing.assert_array_equal(seen, 1)


def test_tiles_batch_whole_samples_when_they_fit():
    g = conv_geometry("conv2d", ((5, 3, 12, 10), (4, 3, 3, 3)), {})
    kernels = make_kernels(np, workspace_bytes=2 * make_kernels(np).row_bytes(g, 8) * g.out_h)
    assert list(kernels.tiles(g, 8)) == [(0, 2, 0, g.out_h), (2, 4, 0, g.out_h), (4, 5, 0, g.out_h)]


def test_default_workspace_follows_config(monkeypatch):
    g = conv_geometry("conv2d", ((4, 3, 12, 10), (4, 3, 3, 3)), {})
    kernels = make_kernels(np)
    assert len(list(kernels.tiles(g, 8))) == 1
    monkeypatch.setattr(core.config, "WORKSPACE_BYTES", 1)
    assert len(list(kernels.tiles(g, 8))) == g.n * g.out_h


def test_kernels_never_import_numpy():
    # Everything must go through the array module, or device arrays would be dragged to the host.
    tree = ast.parse(Path(array_kernels.__file__).read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.split(".")[0] == "numpy" for name in imported)


# -- choosing the backend -------------------------------------------------------------------------


@pytest.fixture
def fresh_backends(monkeypatch):
    """An empty backend cache and a cupy_backend module imported afresh, both restored afterwards."""
    monkeypatch.setattr(core, "_cache", {})
    monkeypatch.delitem(sys.modules, "convrpc.core.cupy_backend", raising=False)
    yield
    sys.modules.pop("convrpc.core.cupy_backend", None)
    if hasattr(core, "cupy_backend"):
        delattr(core, "cupy_backend")


def fake_cupy(device_count):
    """A module named cupy that computes with NumPy and reports ``device_count`` devices (or raises it)."""

    def count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    runtime = types.SimpleNamespace(
        getDeviceCount=count, getDevice=lambda: 0, getDeviceProperties=lambda i: {"name": b"Fake GPU"}
    )
    module = types.ModuleType("cupy")
    module.__getattr__ = lambda name: getattr(np, name)
    module.asnumpy = np.asarray
    module.cuda = types.SimpleNamespace(runtime=runtime)
    return module


def test_cupy_missing_names_the_gpu_extra(fresh_backends, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install -e .\.\[gpu\]. in a clone of convrpc"):
        get_backend("cupy")
    assert "cupy" not in core.available_backends()


@pytest.mark.parametrize("device_count", [0, RuntimeError("cudaErrorNoDevice: no CUDA-capable device")])
def test_cupy_without_a_device_is_unavailable(fresh_backends, monkeypatch, device_count):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(device_count))
    with pytest.raises(BackendUnavailableError, match=r"no CUDA device.*\.\[gpu\]. in a clone of convrpc"):
        get_backend("cupy")


def test_cupy_backend_module_wires_the_array_kernels(fresh_backends, monkeypatch, reference):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(1))
    backend = get_backend("cupy")
    assert backend.name == "cupy" and backend.device == "cuda:0 Fake GPU"
    x_shape, w_shape, options = CONV2D_CASES[1]
    inputs, gy = make_arrays(reference, "conv2d", (x_shape, w_shape), options, np.float64)
    got = op_results(backend, "conv2d", inputs, gy, options)
    assert_results_match(got, op_results(reference, "conv2d", inputs, gy, options), np.float64)


def test_auto_resolves_to_a_cpu_backend_here(fresh_backends, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cupy", None)
    try:
        get_backend("numba")
        expected = "numba"
    except BackendUnavailableError:
        expected = "numpy"
    with caplog.at_level(logging.INFO, logger="convrpc.core"):
        assert resolve_backend_name("auto") == expected
    assert f"resolved to '{expected}'" in caplog.text
    assert get_backend("auto") is get_backend(expected)
    assert resolve_backend_name("numpy") == "numpy"


def test_auto_prefers_cupy_when_a_device_is_visible(fresh_backends, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(1))
    assert resolve_backend_name("auto") == "cupy"
