"""The numba backend against the NumPy reference (and PyTorch when installed): values and gradients.

A seeded random sweep of at least 200 configurations per op covers odd sizes, stride larger than
the kernel, dilation, grouped and depthwise convs, 1x1 and 7x7 kernels, batch 1 and 17, every
padding form and both dtypes, and reaches both the direct kernels and the im2col + BLAS path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from convrpc.core import InvalidArgumentError, get_backend, params

numba_backend = pytest.importorskip("convrpc.core.numba_backend")

N_CONFIGS = 200
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


@pytest.fixture(scope="module")
def nb():
    numba_backend.warm_up()
    return get_backend("numba")


@pytest.fixture(scope="module")
def ref():
    return get_backend("numpy")


def rel_err(got, want) -> float:
    """Max-abs error normalised by the reference's max-abs value."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(float(np.max(np.abs(want))), np.finfo(want.dtype).tiny)
    return float(np.max(np.abs(got - want))) / scale


def assert_close(got, want, what=""):
    err = rel_err(got, want)
    assert err <= TOL[want.dtype], f"{what}: relative error {err:.3g} > {TOL[want.dtype]:g}"


# -- configuration generators ---------------------------------------------------------------


def _conv_config(i: int):
    """A valid random conv2d configuration; every fifth is wide enough for the BLAS path."""
    rng = np.random.default_rng(1000 + i)
    while True:
        dtype = (np.float32, np.float64)[i % 2]
        kind = rng.choice(["plain", "grouped", "depthwise", "wide", "pointwise"], p=[0.3, 0.15, 0.15, 0.3, 0.1])
        n = int(rng.choice([1, 2, 3, 17], p=[0.35, 0.3, 0.2, 0.15]))
        if kind == "depthwise":
            groups = int(rng.integers(1, 6))
            cin, cout = groups, groups * int(rng.integers(1, 3))
        elif kind == "grouped":
            groups = int(rng.integers(2, 4))
            cin, cout = groups * int(rng.integers(1, 4)), groups * int(rng.integers(1, 4))
        elif kind in ("wide", "pointwise"):
            groups = int(rng.choice([1, 1, 2]))
            cin, cout = groups * int(rng.integers(4, 9)), groups * int(rng.integers(8, 17))
        else:
            groups, cin, cout = 1, int(rng.integers(1, 4)), int(rng.integers(1, 5))
        if kind == "pointwise":
            kh = kw = 1
        else:
            kh, kw = (int(k) for k in rng.choice([1, 2, 3, 5, 7], size=2, p=[0.15, 0.2, 0.35, 0.15, 0.15]))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4))) if rng.random() < 0.6 else (1, 1)
        if rng.random() < 0.15:
            stride = (kh + 1, kw + 2)  # stride larger than the kernel: some input pixels are skipped
        dilation = (int(rng.integers(1, 4)), int(rng.integers(1, 3))) if rng.random() < 0.35 else (1, 1)
        mode = rng.choice(["int", "pair", "valid", "same"])
        padding = {
            "int": int(rng.integers(0, 4)),
            "pair": (int(rng.integers(0, 4)), int(rng.integers(0, 3))),
            "valid": "valid",
            "same": "same",
        }[mode]
        if padding == "same":
            stride = (1, 1)
        h, w = int(rng.integers(1, 14)), int(rng.integers(1, 14))
        if n == 17:
            h, w = min(h, 7), min(w, 7)
        bias = bool(rng.random() < 0.6)
        try:
            params.conv2d_geometry((n, cin, h, w), (cout, cin // groups, kh, kw), None, stride, padding, dilation, groups)
        except InvalidArgumentError:
            continue
        x = rng.standard_normal((n, cin, h, w)).astype(dtype)
        wt = rng.standard_normal((cout, cin // groups, kh, kw)).astype(dtype)
        b = rng.standard_normal(cout).astype(dtype) if bias else None
        return x, wt, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _transpose_config(i: int):
    rng = np.random.default_rng(5000 + i)
    while True:
        dtype = (np.float32, np.float64)[i % 2]
        groups = int(rng.choice([1, 1, 2, 3]))
        wide = rng.random() < 0.3
        cin = groups * int(rng.integers(4, 9) if wide else rng.integers(1, 4))
        cout = groups * int(rng.integers(8, 17) if wide else rng.integers(1, 4))
        n = int(rng.choice([1, 2, 17], p=[0.45, 0.4, 0.15]))
        kh, kw = (int(k) for k in rng.choice([1, 2, 3, 4, 7], size=2))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dilation = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        padding = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        output_padding = (int(rng.integers(0, max(stride[0], dilation[0]))), int(rng.integers(0, max(stride[1], dilation[1]))))
        h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        if n == 17:
            h, w = min(h, 5), min(w, 5)
        opts = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
        try:
            params.conv_transpose2d_geometry((n, cin, h, w), (cin, cout // groups, kh, kw), None, **opts)
        except InvalidArgumentError:
            continue
        x = rng.standard_normal((n, cin, h, w)).astype(dtype)
        wt = rng.standard_normal((cin, cout // groups, kh, kw)).astype(dtype)
        b = rng.standard_normal(cout).astype(dtype) if rng.random() < 0.5 else None
        return x, wt, b, opts


def _pool_config(i: int, with_dilation: bool):
    rng = np.random.default_rng(9000 + i)
    while True:
        dtype = (np.float32, np.float64)[i % 2]
        n = int(rng.choice([1, 2, 17], p=[0.4, 0.45, 0.15]))
        c = int(rng.integers(1, 5))
        h, w = int(rng.integers(1, 16)), int(rng.integers(1, 16))
        k = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        stride = None if rng.random() < 0.3 else (int(rng.integers(1, 7)), int(rng.integers(1, 4)))
        padding = (int(rng.integers(0, k[0] // 2 + 1)), int(rng.integers(0, k[1] // 2 + 1)))
        opts = dict(kernel_size=k, stride=stride, padding=padding)
        if with_dilation:
            opts["dilation"] = (int(rng.integers(1, 4)), int(rng.integers(1, 3)))
        try:
            params.pool2d_geometry((n, c, h, w), **opts)
        except InvalidArgumentError:
            continue
        return rng.standard_normal((n, c, h, w)).astype(dtype), opts


# -- the sweep --------------------------------------------------------------------------------


def check_conv2d_config(nb, ref, i: int) -> None:
    """conv2d and its gradients of sweep configuration ``i``: the numba backend against the reference."""
    x, w, b, opts = _conv_config(i)
    y = ref.conv2d(x, w, b, **opts)
    assert_close(nb.conv2d(x, w, b, **opts), y, "conv2d")
    gy = np.random.default_rng(i).standard_normal(y.shape).astype(x.dtype)
    got, want = nb.conv2d_backward(gy, x, w, b, **opts), ref.conv2d_backward(gy, x, w, b, **opts)
    assert_close(got.input, want.input, "grad input")
    assert_close(got.weight, want.weight, "grad weight")
    if b is not None:
        assert_close(got.bias, want.bias, "grad bias")


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_conv2d_sweep(nb, ref, i):
    check_conv2d_config(nb, ref, i)


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_conv_transpose2d_sweep(nb, ref, i):
    x, w, b, opts = _transpose_config(i)
    y = ref.conv_transpose2d(x, w, b, **opts)
    assert_close(nb.conv_transpose2d(x, w, b, **opts), y, "conv_transpose2d")
    gy = np.random.default_rng(i).standard_normal(y.shape).astype(x.dtype)
    got, want = nb.conv_transpose2d_backward(gy, x, w, b, **opts), ref.conv_transpose2d_backward(gy, x, w, b, **opts)
    assert_close(got.input, want.input, "grad input")
    assert_close(got.weight, want.weight, "grad weight")


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_max_pool2d_sweep(nb, ref, i):
    x, opts = _pool_config(i, with_dilation=True)
    y = ref.max_pool2d(x, **opts)
    np.testing.assert_array_equal(nb.max_pool2d(x, **opts), y)
    gy = np.random.default_rng(i).standard_normal(y.shape).astype(x.dtype)
    assert_close(nb.max_pool2d_backward(gy, x, **opts).input, ref.max_pool2d_backward(gy, x, **opts).input, "grad")


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_avg_pool2d_sweep(nb, ref, i):
    x, opts = _pool_config(i, with_dilation=False)
    y = ref.avg_pool2d(x, **opts)
    assert_close(nb.avg_pool2d(x, **opts), y, "avg_pool2d")
    gy = np.random.default_rng(i).standard_normal(y.shape).astype(x.dtype)
    assert_close(nb.avg_pool2d_backward(gy, x, **opts).input, ref.avg_pool2d_backward(gy, x, **opts).input, "grad")


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_relu_sweep(nb, ref, i):
    rng = np.random.default_rng(i)
    dtype = (np.float32, np.float64)[i % 2]
    shape = (int(rng.choice([1, 17])), int(rng.integers(1, 4)), int(rng.integers(1, 20)), int(rng.integers(1, 20)))
    x = rng.standard_normal(shape).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_array_equal(nb.relu(x), ref.relu(x))
    np.testing.assert_array_equal(nb.relu_backward(gy, x).input, ref.relu_backward(gy, x).input)


# -- edge semantics -----------------------------------------------------------------------------


def test_max_pool2d_nan_and_ties_follow_the_first_maximum(nb, ref):
    x = np.array([[[[1.0, 3.0, 3.0, np.nan], [3.0, 0.0, -np.inf, 2.0], [np.nan, 5.0, 5.0, np.nan]]]])
    opts = dict(kernel_size=2, stride=1, padding=1)
    np.testing.assert_array_equal(nb.max_pool2d(x, **opts), ref.max_pool2d(x, **opts))
    gy = np.arange(1.0, 1.0 + ref.max_pool2d(x, **opts).size).reshape(ref.max_pool2d(x, **opts).shape)
    np.testing.assert_array_equal(nb.max_pool2d_backward(gy, x, **opts).input, ref.max_pool2d_backward(gy, x, **opts).input)


def test_relu_keeps_nan(nb):
    out = nb.relu(np.array([[[[np.nan, -1.0, 2.0]]]]))
    assert np.isnan(out[0, 0, 0, 0]) and out[0, 0, 0, 1] == 0.0 and out[0, 0, 0, 2] == 2.0


def test_seed_examples(nb):
    a = np.array([[1, 3, 1, 4], [2, 8, 5, 1], [3, 2, 0, 3]], dtype=np.float64)[None, None]
    k = np.array([[1, 0], [-1, 1]], dtype=np.float64)[None, None]
    np.testing.assert_array_equal(nb.conv2d(a, k)[0, 0], [[7, 0, -3], [1, 6, 8]])
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    w = np.array([[1.0, 2.0], [3.0, 4.0]])[None, None]
    want = [[1, 4, 7, 6], [7, 23, 33, 24], [19, 53, 63, 42], [21, 52, 59, 36]]
    np.testing.assert_array_equal(nb.conv_transpose2d(x, w)[0, 0], want)


# -- workspace, threads -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [64 * 1024, 12000, 100])
def test_tiny_workspace_forces_tiles_and_keeps_results(nb, ref, limit):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 8, 21, 19))
    w = rng.standard_normal((16, 8, 3, 3))
    opts = dict(stride=(2, 1), padding=2, dilation=(1, 2))
    g = params.conv2d_geometry(x.shape, w.shape, None, **opts)
    y, gy = ref.conv2d(x, w, **opts), rng.standard_normal(g.output_shape)
    want = ref.conv2d_backward(gy, x, w, **opts)
    old = numba_backend.workspace_limit()
    numba_backend.set_workspace_limit(limit)
    try:
        plan = numba_backend._Plan.make(g, x.itemsize)
        if limit == 64 * 1024:
            assert plan is not None and len(plan.tiles) >= 10  # many row tiles, still the BLAS path
        if limit == 100:
            assert plan is None  # not even one output row fits: the direct kernels take over
        assert_close(nb.conv2d(x, w, **opts), y, "conv2d")
        got = nb.conv2d_backward(gy, x, w, **opts)
        assert_close(got.input, want.input, "grad input")
        assert_close(got.weight, want.weight, "grad weight")
    finally:
        numba_backend.set_workspace_limit(old)


def test_blas_path_is_taken_for_wide_convs():
    g = params.conv2d_geometry((2, 16, 9, 9), (32, 16, 3, 3), None, padding=1)
    assert numba_backend._use_blas(g) and numba_backend._Plan.make(g, 8) is not None


#: Pointwise convs on the BLAS path: whole images per thread (n even), blocks of rows (n odd, n=1), serial ones.
POINTWISE = [
    ((4, 64, 12, 12), (64, 64, 1, 1)),
    ((3, 64, 14, 14), (48, 64, 1, 1)),
    ((1, 128, 12, 12), (72, 128, 1, 1)),
    ((8, 32, 5, 7), (24, 32, 1, 1)),
    ((5, 20, 3, 3), (16, 20, 1, 1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shapes", POINTWISE)
def test_pointwise_convs_call_blas_from_the_numba_kernel(nb, ref, dtype, shapes, monkeypatch):
    """Forward, input and weight gradient by gemm_batch; numpy's matmul on the worker pool gives the same."""
    rng = np.random.default_rng(11)
    x, w = (rng.standard_normal(s).astype(dtype) for s in shapes)
    b = rng.standard_normal(w.shape[0]).astype(dtype)
    gy = rng.standard_normal((x.shape[0], w.shape[0], *x.shape[2:])).astype(dtype)
    want_y, want = ref.conv2d(x, w, b), ref.conv2d_backward(gy, x, w, b)
    calls = []
    real = numba_backend._gemms
    monkeypatch.setattr(numba_backend, "_gemms", lambda *a, **k: (calls.append(a[:3]), real(*a, **k)))
    for use in (True, False):
        monkeypatch.setattr(numba_backend, "USE_CBLAS", use)
        calls.clear()
        assert_close(nb.conv2d(x, w, b), want_y, "conv2d")
        got = nb.conv2d_backward(gy, x, w, b)
        assert_close(got.input, want.input, "grad input")
        assert_close(got.weight, want.weight, "grad weight")
        assert_close(got.bias, want.bias, "grad bias")
        assert numba_backend.last_algorithm == {"forward": "pointwise", "grad-input": "pointwise", "grad-weight": "pointwise"}
        assert len(calls) == (3 if use and numba_backend._GEMM is not None else 0)


def test_numpys_own_openblas_is_called_from_the_kernels():
    """numpy's wheels ship OpenBLAS with 64-bit-int symbols: the pointwise path must find them, not fall back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not any("scipy_openblas64" in lib["filepath"] for lib in threadpoolctl.threadpool_info()):
        pytest.skip("numpy's BLAS here is not the wheel's OpenBLAS")
    assert numba_backend._GEMM is not None


def test_threading_layer_is_threadsafe(nb):
    nb.relu(np.ones((1, 1, 2, 2)))  # the layer is chosen at the first parallel call
    assert numba_backend.threading_layer() in ("omp", "tbb")
    assert numba_backend.THREADS == numba_backend.compute_threads() >= 1


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, ("10000", "0", None)),  # idle OpenMP workers poll briefly (GNU), Intel's runtime sleeps at once
        ({"OMP_WAIT_POLICY": "passive"}, (None, None, "passive")),  # the caller's policy decides
        ({"GOMP_SPINCOUNT": "50"}, ("50", "0", None)),
    ],
)
def test_openmp_wait_settings_leave_the_callers_alone(env, want):
    """Set on import, before numba's OpenMP runtime loads; never over a value the caller chose."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    code = (
        "import os, convrpc.core.numba_backend; "
        "print([os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'KMP_BLOCKTIME', 'OMP_WAIT_POLICY')])"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(list(want))


@pytest.mark.torch
def test_against_torch(nb):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for i in range(0, N_CONFIGS, 4):
        x, w, b, opts = _conv_config(i)
        xt = torch.from_numpy(x).requires_grad_()
        wt = torch.from_numpy(w).requires_grad_()
        yt = F.conv2d(xt, wt, None if b is None else torch.from_numpy(b), **opts)
        gy = np.random.default_rng(i).standard_normal(tuple(yt.shape)).astype(x.dtype)
        yt.backward(torch.from_numpy(gy))
        assert_close(nb.conv2d(x, w, b, **opts), yt.detach().numpy(), f"conv2d {i}")
        got = nb.conv2d_backward(gy, x, w, b, **opts)
        assert_close(got.input, xt.grad.numpy(), f"grad input {i}")
        assert_close(got.weight, wt.grad.numpy(), f"grad weight {i}")
        x, w, b, opts = _transpose_config(i)
        yt = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b), **opts)
        assert_close(nb.conv_transpose2d(x, w, b, **opts), yt.numpy(), f"conv_transpose2d {i}")
        x, popts = _pool_config(i, with_dilation=True)
        assert_close(nb.max_pool2d(x, **popts), F.max_pool2d(torch.from_numpy(x), **popts).numpy(), f"max_pool2d {i}")


@pytest.mark.parametrize("i", range(0, N_CONFIGS, 5))
def test_conv2d_direct_kernels(nb, ref, i, monkeypatch):
    """The row-wise direct kernels, which serve convs whose im2col block is too big for a thread."""
    monkeypatch.setattr(numba_backend, "SMALL_COLS_BYTES", 0)
    monkeypatch.setattr(numba_backend, "_use_blas", lambda g: False)
    monkeypatch.setattr(numba_backend, "_choices", {})  # choices cached under the real _use_blas
    check_conv2d_config(nb, ref, i)


def test_read_only_inputs_reuse_the_warmed_up_kernels():
    """Server inputs are read-only views of request bytes; they must not trigger new JIT specialisations."""
    from numba.core.registry import CPUDispatcher

    from convrpc.core import _numba_kernels, numba_backend

    numba_backend.warm_up()

    def compiled():
        return sum(len(f.signatures) for f in vars(_numba_kernels).values() if isinstance(f, CPUDispatcher))

    before = compiled()
    nb = get_backend("numba")
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        def ro(*shape):
            a = rng.standard_normal(shape).astype(dtype)
            return np.frombuffer(a.tobytes(), dtype=dtype).reshape(shape)

        x, w, b = ro(2, 4, 9, 9), ro(6, 2, 3, 3), ro(6)
        y = nb.conv2d(x, w, b, padding=1, groups=2)
        np.testing.assert_allclose(y, get_backend("numpy").conv2d(x, w, b, padding=1, groups=2), rtol=1e-4, atol=1e-4)
        nb.conv2d_backward(ro(*y.shape), x, w, b, padding=1, groups=2)
        nb.conv_transpose2d(x, ro(4, 3, 3, 3), stride=2)
        nb.max_pool2d_backward(ro(2, 4, 4, 4), x, 2)
        nb.avg_pool2d_backward(ro(2, 4, 4, 4), x, 2)
        nb.relu_backward(ro(2, 4, 9, 9), x)
        assert not x.flags.writeable  # the caller's array is untouched
    assert compiled() == before


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("reason", ["cancel", "expire"])
def test_an_op_whose_stop_flag_is_set_raises_instead_of_returning_a_partial_result(backend, reason):
    from convrpc.core.errors import CallCancelled, DeadlineExceeded
    from convrpc.core.stopping import StopFlag, stopping

    b = get_backend(backend)
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9))
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    calls = (lambda: b.conv2d(x, w), lambda: b.conv2d_backward(np.ones((2, 4, 7, 7)), x, w),
             lambda: b.max_pool2d(x, 2), lambda: b.avg_pool2d_backward(np.ones((2, 3, 4, 4)), x, 2))  # fmt: skip
    for call in calls:
        flag = StopFlag()
        getattr(flag, reason)()
        with pytest.raises(CallCancelled if reason == "cancel" else DeadlineExceeded):
            with stopping(flag):
                call()
        with stopping(StopFlag()):  # an unset flag changes nothing, and the next op runs in full
            np.testing.assert_allclose(b.conv2d(x, w), get_backend("numpy").conv2d(x, w), rtol=1e-10, atol=1e-12)


def _views_in_a_mapping(results):
    """Writable views of one anonymous mapping (as the server's of a client region) shaped like ``results``."""
    import mmap

    sizes = [r.nbytes for r in results]
    memory = np.frombuffer(mmap.mmap(-1, sum(sizes) + 64 * len(sizes)), np.uint8)
    views, start = [], 0
    for r, n in zip(results, sizes):
        views.append(memory[start : start + n].view(r.dtype).reshape(r.shape))
        start += -(-n // 64) * 64
    return views


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("batched", [True, False])
def test_results_are_computed_into_planned_views_where_shape_and_dtype_match(backend, dtype, batched):
    from numba.core.registry import CPUDispatcher

    from convrpc.core import _numba_kernels
    from convrpc.core.placing import placing

    def compiled():
        return sum(len(f.signatures) for f in vars(_numba_kernels).values() if isinstance(f, CPUDispatcher))

    numba_backend.warm_up()
    before = compiled()
    b = get_backend(backend)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 9, 8) if batched else (4, 9, 8)).astype(dtype)
    w, wt, bias = (rng.standard_normal(s).astype(dtype) for s in ((6, 2, 3, 3), (4, 3, 3, 3), (6,)))
    calls = [
        ("conv2d", (x, w, bias), dict(padding=1, groups=2)),  # im2col + BLAS or Winograd
        ("conv2d", (x, w[:, :, :1, :1]), dict(stride=2, groups=2)),  # direct kernels
        ("conv_transpose2d", (x, wt, bias[:3]), dict(stride=2, padding=1)),
        ("max_pool2d", (x, 3), dict(stride=2, padding=1, return_indices=True)),
        ("avg_pool2d", (x, 2), {}),
        ("relu", (x,), {}),
    ]
    for op, args, options in calls:
        for name in (op, f"{op}_backward"):
            if name.endswith("_backward"):
                out = getattr(b, op)(*args, **options)
                gy = rng.standard_normal((out[0] if isinstance(out, tuple) else out).shape).astype(dtype)
                args_of = (gy, *args)
            else:
                args_of = args
            want = getattr(b, name)(*args_of, **options)
            want = [a for a in (want if isinstance(want, tuple) else (want,)) if a is not None]
            views = _views_in_a_mapping(want)
            with placing(views) as plan:
                got = getattr(b, name)(*args_of, **options)
            got = [a for a in (got if isinstance(got, tuple) else (got,)) if a is not None]
            for g, v, wnt in zip(got, views, want):
                assert g.dtype == wnt.dtype and g.shape == wnt.shape and g.tobytes() == wnt.tobytes(), name
            # The op's first result (its output, its input gradient) is computed in place, unless it is
            # a half type (computed in float32, rounded into a new array) or the reference's non-relu kernels.
            placed = np.dtype(dtype) != np.float16 and (backend == "numba" or name == "relu")
            assert np.shares_memory(got[0], views[0]) == placed, name
            assert plan.placed >= placed
            for i, g in enumerate(got):  # a result is in its own view or in none
                assert not any(np.shares_memory(g, v) for j, v in enumerate(views) if j != i), name
    assert compiled() == before  # views of a mapping are ordinary arrays to numba: no new specialisations


def test_a_stop_flag_still_stops_an_op_computing_into_planned_views():
    from convrpc.core.errors import CallCancelled
    from convrpc.core.placing import placing
    from convrpc.core.stopping import StopFlag, stopping

    b = get_backend("numba")
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9))
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    (view,) = _views_in_a_mapping([np.empty((2, 4, 7, 7))])
    flag = StopFlag()
    flag.cancel()
    with pytest.raises(CallCancelled):
        with stopping(flag), placing([view]):
            b.conv2d(x, w)
    with placing([view]) as plan:  # the next op places its result as planned, in full
        y = b.conv2d(x, w)
    assert plan.placed == 1 and np.shares_memory(y, view)
    np.testing.assert_allclose(y, get_backend("numpy").conv2d(x, w), rtol=1e-10, atol=1e-12)
