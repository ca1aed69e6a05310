"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import logging
import zlib

import ml_dtypes
import numpy as np
import pytest
from convrpc.core import available_backends, get_backend

# ================================================================================================
# Compute core: backends, random data, tolerances, torch
# ================================================================================================

#: Every backend this install and machine can run; each core test runs once per backend.
BACKEND_NAMES = available_backends()
#: Backends that need a GPU; their parametrisations carry the `gpu` marker.
GPU_BACKENDS = {"cupy"}
#: Relative tolerance of a comparison, normalised by the largest magnitude of the expected array.
RTOL = {
    np.dtype(np.float64): 1e-10,
    np.dtype(np.float32): 1e-4,
    np.dtype(np.float16): 2e-3,
    np.dtype(ml_dtypes.bfloat16): 1.6e-2,
}
DTYPES = [np.float64, np.float32]


def _backend_param(name):
    return pytest.param(name, marks=[pytest.mark.gpu] if name in GPU_BACKENDS else [])


@pytest.fixture(params=[_backend_param(name) for name in BACKEND_NAMES])
def backend(request):
    """Each available backend in turn (numpy, numba, cupy where present)."""
    return get_backend(request.param)


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, yet different for each parametrisation."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def torch():
    """The torch module, or skip the test when PyTorch is not installed."""
    return pytest.importorskip("torch")


def tolerance(dtype) -> float:
    return RTOL[np.dtype(dtype)]


def assert_close(actual, expected, dtype=None, rtol=None, what=""):
    """``max|actual - expected| <= rtol * max|expected|`` with shapes equal; rtol from the dtype.

    Normalising by the largest magnitude (not elementwise) keeps cancellation in sums near zero
    from failing float32 comparisons while still catching any misplaced or missing term.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what} shape {actual.shape} != expected {expected.shape}"
    if dtype is None:
        dtype = actual.dtype
    if rtol is None:
        rtol = tolerance(dtype)
    if expected.size == 0:
        return
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"{what} NaN positions differ"
    finite = ~np.isnan(e)
    assert np.array_equal(a[np.isinf(e)], e[np.isinf(e)]), f"{what} infinities differ"
    finite &= ~np.isinf(e)
    if not finite.any():
        return
    scale = max(np.abs(e[finite]).max(), np.finfo(np.float64).tiny)
    err = np.abs(a[finite] - e[finite]).max()
    assert err <= rtol * scale, f"{what} max abs error {err:.3e} > {rtol:g} * max|expected| {scale:.3e}"


def pytest_collection_modifyitems(config, items):
    """Add the markers pyproject.toml declares, so ``-m "not torch"`` and friends select by need.

    `torch`: tests that use the torch fixture or live in a ``*torch*`` module; `gpu`: tests in a
    ``*gpu*`` module (cupy backend parametrisations carry it already); `slow` is set by hand with
    ``@pytest.mark.slow`` on tests that take more than a few seconds.
    """
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "")
        if "torch" in getattr(item, "fixturenames", ()) or "torch" in module:
            item.add_marker(pytest.mark.torch)
        if "gpu" in module:
            item.add_marker(pytest.mark.gpu)


# ================================================================================================
# Server and end-to-end fixtures (added by the server work) go below this line.
# ================================================================================================

from server_fixtures import client, server  # noqa: E402,F401 - fixtures for the end-to-end tests


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Undo what a test's in-process ``convrpc serve`` (configure_logging) does to the root logger: its handler
    writes to that test's captured stderr, which pytest closes, so servers of later tests logging their calls
    would print "--- Logging error --- ValueError: I/O operation on closed file"."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
