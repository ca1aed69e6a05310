"""Every op of the numba backend called from 8 threads at once gives the same results as alone.

numba's workqueue layer aborts the process here; the backend must pick a threadsafe layer, keep
its reused workspaces per worker and serialise compute without mixing requests up.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from convrpc.core import get_backend

pytest.importorskip("convrpc.core.numba_backend")

THREADS = 8
ROUNDS = 3


def _cases(seed: int):
    """(name, callable(backend) -> tuple of arrays) for every op, forward and backward."""
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x_wide, w_wide, b_wide = r(3, 8, 11, 10), r(16, 8, 3, 3), r(16)  # im2col + BLAS path
    x_dw, w_dw = r(2, 4, 9, 7), r(4, 1, 3, 3)  # depthwise: direct kernels
    gy_wide = r(3, 16, 6, 10)
    gy_dw = r(2, 4, 9, 7)
    x_t, w_t, gy_t = r(2, 4, 5, 6), r(4, 3, 3, 3), r(2, 3, 11, 14)
    x_p, gy_p = r(2, 3, 10, 9), r(2, 3, 5, 4)
    conv_wide = dict(stride=(2, 1), padding=1)
    conv_dw = dict(padding="same", groups=4)
    tr = dict(stride=2, padding=0, output_padding=(0, 1))
    return [
        ("conv2d", lambda be: (be.conv2d(x_wide, w_wide, b_wide, **conv_wide),)),
        ("conv2d_backward", lambda be: be.conv2d_backward(gy_wide, x_wide, w_wide, b_wide, **conv_wide)),
        ("conv2d depthwise", lambda be: (be.conv2d(x_dw, w_dw, None, **conv_dw),)),
        ("conv2d depthwise backward", lambda be: be.conv2d_backward(gy_dw, x_dw, w_dw, None, **conv_dw)[:2]),
        ("conv_transpose2d", lambda be: (be.conv_transpose2d(x_t, w_t, None, **tr),)),
        ("conv_transpose2d_backward", lambda be: be.conv_transpose2d_backward(gy_t, x_t, w_t, None, **tr)[:2]),
        ("max_pool2d", lambda be: (be.max_pool2d(x_p, 2),)),
        ("max_pool2d_backward", lambda be: be.max_pool2d_backward(gy_p, x_p, 2)[:1]),
        ("avg_pool2d", lambda be: (be.avg_pool2d(x_p, 2),)),
        ("avg_pool2d_backward", lambda be: be.avg_pool2d_backward(gy_p, x_p, 2)[:1]),
        ("relu", lambda be: (be.relu(x_p),)),
        ("relu_backward", lambda be: be.relu_backward(x_p, x_p)[:1]),
    ]


def test_every_op_from_eight_threads_at_once():
    nb, ref = get_backend("numba"), get_backend("numpy")
    per_thread = [_cases(seed) for seed in range(THREADS)]
    expected = [[fn(ref) for _, fn in cases] for cases in per_thread]
    start = threading.Barrier(THREADS)
    failures: list[str] = []

    def worker(t: int):
        try:
            start.wait()
            for _ in range(ROUNDS):
                for (name, fn), want in zip(per_thread[t], expected[t]):
                    for got, ref_arr in zip(fn(nb), want):
                        tol = 1e-4 if ref_arr.dtype == np.float32 else 1e-10
                        err = np.max(np.abs(got - ref_arr)) / max(np.max(np.abs(ref_arr)), 1e-30)
                        if not err <= tol:
                            failures.append(f"thread {t} {name}: relative error {err:.3g}")
        except Exception as exc:  # noqa: BLE001 - report every thread's failure, not just the first
            failures.append(f"thread {t}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a worker hung"
    assert not failures, "\n".join(failures)
