"""The numba backend: the server's default kernel table, parallel on the CPUs this process may use.

Convolutions with enough channels go through im2col into a reused, size-capped workspace plus
one BLAS matmul per tile; small, grouped and depthwise ones run direct numba loops. Pooling and
relu are direct loops. Every parallel loop owns what it writes, so results do not depend on the
thread count or on other requests.

Threads: numba's ``workqueue`` layer aborts the process when two threads call parallel code at
once (the gRPC pool does), so an OpenMP/TBB layer is chosen before numba starts its pool, with
``OMP_WAIT_POLICY=passive`` so idle OpenMP workers sleep instead of spinning against OpenBLAS's
threads. Compute runs in a bounded number of lanes (one by default): concurrent requests queue
rather than oversubscribe the cores. Compiled kernels are cached on disk (``cache=True``); set
``NUMBA_CACHE_DIR`` to choose where (containers mount it). Call :func:`warm_up` at start-up.
"""

from __future__ import annotations

import math
import os
import threading

# Both must be in the environment before numba's OpenMP runtime loads (at its first parallel call).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
if os.environ.get("NUMBA_THREADING_LAYER", "threadsafe") not in ("omp", "tbb", "threadsafe"):
    os.environ["NUMBA_THREADING_LAYER"] = "threadsafe"


def compute_threads() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota, or NUMBA_NUM_THREADS."""
    explicit = os.environ.get("NUMBA_NUM_THREADS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


THREADS = compute_threads()
os.environ["NUMBA_NUM_THREADS"] = str(THREADS)

import numba  # noqa: E402  (after the environment above)
import numpy as np  # noqa: E402

numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
numba.config.reload_config()

from . import _numba_kernels as _k  # noqa: E402
from . import config  # noqa: E402
from .params import ConvGeometry, PoolGeometry  # noqa: E402

__all__ = [
    "THREADS",
    "compute_threads",
    "set_workspace_limit",
    "threading_layer",
    "warm_up",
    "xp",
]

xp = np
DEVICE = f"cpu ({THREADS} threads)"

#: Requests that may compute at once; more would only split the same cores and thrash caches.
LANES = 1
#: im2col tiles aim at this size so a tile is still in cache when the matmul reads it.
TILE_BYTES = 8 * 1024 * 1024

_lane = threading.BoundedSemaphore(LANES)
_workspace_limit = int(config.WORKSPACE_BYTES)
_free_workspaces: list[np.ndarray] = []
_workspace_lock = threading.Lock()


def to_device(a):
    return np.ascontiguousarray(a)


def to_host(a):
    return a


def set_workspace_limit(nbytes: int) -> None:
    """Cap the extra memory one op's im2col workspace may take (default ``config.WORKSPACE_BYTES``)."""
    global _workspace_limit
    if nbytes < 1:
        raise ValueError(f"workspace limit must be positive, got {nbytes}")
    with _workspace_lock:
        _workspace_limit = int(nbytes)
        _free_workspaces.clear()


def workspace_limit() -> int:
    """The current workspace cap in bytes."""
    return _workspace_limit


def threading_layer() -> str:
    """The numba threading layer in use (after the first parallel call), e.g. ``"omp"``."""
    return numba.threading_layer()


class _Workspace:
    """A byte buffer borrowed for one op and returned for the next: no page faults on every call."""

    def __init__(self, nbytes: int):
        with _workspace_lock:
            fits = [b for b in _free_workspaces if b.nbytes >= nbytes]
            if fits:
                self.buf = min(fits, key=lambda b: b.nbytes)
                _free_workspaces.remove(self.buf)
            else:
                self.buf = np.empty(nbytes, dtype=np.uint8)

    def array(self, shape, dtype) -> np.ndarray:
        count = math.prod(shape)
        return self.buf[: count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with _workspace_lock:
            if len(_free_workspaces) < LANES and self.buf.nbytes <= _workspace_limit:
                _free_workspaces.append(self.buf)


# -- convolution --------------------------------------------------------------------------------


def _conv_args(g: ConvGeometry):
    return g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dil_h, g.dil_w


def _is_pointwise(g: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped conv: the input itself is the im2col matrix."""
    return (
        g.kh == g.kw == g.stride_h == g.stride_w == g.groups == 1
        and g.pad_top == g.pad_bottom == g.pad_left == g.pad_right == 0
    )


def _tiles(g: ConvGeometry, itemsize: int):
    """(n0, images, r0, rows) tiles whose im2col block fits the workspace cap, or None if no row fits."""
    row_bytes = g.c_in * g.kh * g.kw * g.out_w * itemsize
    if row_bytes > _workspace_limit:
        return None
    budget = min(_workspace_limit, TILE_BYTES)
    image_bytes = row_bytes * g.out_h
    if image_bytes <= budget:
        per = max(1, min(g.n, _workspace_limit // image_bytes, budget // image_bytes))
        return [(n0, min(per, g.n - n0), 0, g.out_h) for n0 in range(0, g.n, per)]
    rows = max(1, min(g.out_h, budget // row_bytes))
    return [(n, 1, r0, min(rows, g.out_h - r0)) for n in range(g.n) for r0 in range(0, g.out_h, rows)]


def _use_blas(g: ConvGeometry) -> bool:
    """BLAS pays off once both matmul sides are wide; direct loops win for thin or many-group convs."""
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    return g.groups <= 4 and kg >= 8 and ckk >= 16 and kg * ckk >= 256


def conv2d(x, w, b, g: ConvGeometry):
    """y (N, K, OH, OW) = conv2d(x (N, C, H, W), w (K, C/groups, kh, kw)) + b (K,) or None."""
    y = np.empty(g.output_shape, dtype=x.dtype)
    with _lane:
        tiles = _tiles(g, x.itemsize) if _use_blas(g) else None
        if _is_pointwise(g) and _use_blas(g):
            np.matmul(w.reshape(g.c_out, g.c_in), x.reshape(g.n, g.c_in, -1), out=y.reshape(g.n, g.c_out, -1))
        elif tiles is None:
            bias = b if b is not None else np.zeros(1, x.dtype)
            _k.conv2d_direct(x, w, bias, b is not None, y, g.groups, *_conv_args(g))
            return y
        else:
            _conv2d_tiled(x, w, y, g, tiles)
        if b is not None:
            _k.add_bias(y, b)
    return y


def _im2col_block(ws, x, g, n0, tn, r0, nr):
    """The im2col block (C*kh*kw, images, rows*OW) of a tile, in the workspace."""
    cols = ws.array((g.c_in * g.kh * g.kw, tn, nr * g.out_w), x.dtype)
    _k.im2col(x, cols, n0, r0, g.kh, g.kw, *_conv_args(g), g.out_w)
    return cols


def _conv2d_tiled(x, w, y, g, tiles):
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    wm = w.reshape(g.groups, kg, ckk)
    y3 = y.reshape(g.n, g.c_out, g.out_h * g.out_w)
    with _Workspace(_tile_nbytes(g, tiles, x.itemsize)) as ws:
        for n0, tn, r0, nr in tiles:
            cols = _im2col_block(ws, x, g, n0, tn, r0, nr)
            p0, p1 = r0 * g.out_w, (r0 + nr) * g.out_w
            for grp in range(g.groups):
                b_mat = cols[grp * ckk : (grp + 1) * ckk].transpose(1, 0, 2)  # (images, ckk, P)
                np.matmul(wm[grp], b_mat, out=y3[n0 : n0 + tn, grp * kg : (grp + 1) * kg, p0:p1])


def _tile_nbytes(g, tiles, itemsize):
    return max(tn * nr for _, tn, _, nr in tiles) * g.c_in * g.kh * g.kw * g.out_w * itemsize


def conv2d_input_grad(gy, w, g: ConvGeometry):
    """gx (N, C, H, W): the adjoint of conv2d applied to gy (N, K, OH, OW); also conv_transpose2d."""
    gx = np.empty(g.input_shape, dtype=gy.dtype)
    with _lane:
        tiles = _tiles(g, gy.itemsize) if _use_blas(g) else None
        if _is_pointwise(g) and _use_blas(g):
            np.matmul(w.reshape(g.c_out, g.c_in).T, gy.reshape(g.n, g.c_out, -1), out=gx.reshape(g.n, g.c_in, -1))
        elif tiles is None:
            _k.conv2d_input_grad_direct(gy, w, gx, g.groups, *_conv_args(g))
        else:
            gx[...] = 0
            kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
            wm = w.reshape(g.groups, kg, ckk)
            gy3 = gy.reshape(g.n, g.c_out, g.out_h * g.out_w)
            with _Workspace(_tile_nbytes(g, tiles, gy.itemsize)) as ws:
                for n0, tn, r0, nr in tiles:
                    cols = ws.array((g.c_in * g.kh * g.kw, tn, nr * g.out_w), gy.dtype)
                    p0, p1 = r0 * g.out_w, (r0 + nr) * g.out_w
                    for grp in range(g.groups):
                        out = cols[grp * ckk : (grp + 1) * ckk].transpose(1, 0, 2)
                        np.matmul(wm[grp].T, gy3[n0 : n0 + tn, grp * kg : (grp + 1) * kg, p0:p1], out=out)
                    _k.col2im_add(cols, gx, n0, r0, g.kh, g.kw, *_conv_args(g), g.out_w)
    return gx


def conv2d_weight_grad(x, gy, g: ConvGeometry):
    """gw (K, C/groups, kh, kw): the weight gradient of conv2d for input x and output gradient gy."""
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    with _lane:
        tiles = _tiles(g, x.itemsize) if _use_blas(g) else None
        if _is_pointwise(g) and _use_blas(g):
            x3, gy3 = x.reshape(g.n, g.c_in, -1), gy.reshape(g.n, g.c_out, -1)
            gw = gy3[0] @ x3[0].T
            for n in range(1, g.n):
                gw += gy3[n] @ x3[n].T
            return gw.reshape(g.weight_shape)
        if tiles is None:
            gw = np.empty(g.weight_shape, dtype=x.dtype)
            _k.conv2d_weight_grad_direct(x, gy, gw, g.groups, *_conv_args(g))
            return gw
        gw = np.zeros((g.groups, kg, ckk), dtype=x.dtype)
        gy3 = gy.reshape(g.n, g.c_out, g.out_h * g.out_w)
        with _Workspace(_tile_nbytes(g, tiles, x.itemsize)) as ws:
            for n0, tn, r0, nr in tiles:
                cols = _im2col_block(ws, x, g, n0, tn, r0, nr)
                p0, p1 = r0 * g.out_w, (r0 + nr) * g.out_w
                for grp in range(g.groups):
                    # (kg, images*P) against (ckk, images*P): one matmul over the whole tile.
                    gyt = np.ascontiguousarray(gy3[n0 : n0 + tn, grp * kg : (grp + 1) * kg, p0:p1].transpose(1, 0, 2))
                    a = cols[grp * ckk : (grp + 1) * ckk].reshape(ckk, -1)
                    gw[grp] += gyt.reshape(kg, -1) @ a.T
    return gw.reshape(g.weight_shape)


# -- pooling and relu ---------------------------------------------------------------------------


def _pool_args(g: PoolGeometry):
    return g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w


def max_pool2d(x, g: PoolGeometry):
    """y (N, C, OH, OW): the first maximum of each window (padding is -inf, NaN wins)."""
    y = np.empty(g.output_shape, dtype=x.dtype)
    arg = np.empty(g.output_shape, dtype=np.int32)
    with _lane:
        _k.max_pool2d(x, y, arg, *_pool_args(g))
    return y


def max_pool2d_backward(gy, x, g: PoolGeometry):
    """gx (N, C, H, W): each window's gradient added at its first maximum."""
    y = np.empty(g.output_shape, dtype=x.dtype)
    arg = np.empty(g.output_shape, dtype=np.int32)
    gx = np.empty(g.input_shape, dtype=x.dtype)
    with _lane:
        _k.max_pool2d(x, y, arg, *_pool_args(g))
        _k.max_pool2d_backward(gy, arg, gx, *_pool_args(g))
    return gx


def avg_pool2d(x, g: PoolGeometry):
    """y (N, C, OH, OW): window sums over kh*kw, zero padding counted."""
    y = np.empty(g.output_shape, dtype=x.dtype)
    with _lane:
        _k.avg_pool2d(x, y, g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w)
    return y


def avg_pool2d_backward(gy, g: PoolGeometry):
    """gx (N, C, H, W): each window's gradient spread evenly over its kh*kw taps."""
    gx = np.empty(g.input_shape, dtype=gy.dtype)
    with _lane:
        _k.avg_pool2d_backward(gy, gx, g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w)
    return gx


def relu(x):
    """max(x, 0) elementwise (NaN stays NaN)."""
    y = np.empty_like(x)
    with _lane:
        _k.relu(x.reshape(-1), y.reshape(-1))
    return y


def relu_backward(gy, x):
    """gy where x > 0, else 0."""
    gx = np.empty_like(gy)
    with _lane:
        _k.relu_backward(gy.reshape(-1), x.reshape(-1), gx.reshape(-1))
    return gx


# -- start-up -----------------------------------------------------------------------------------


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel for float32 and float64.

    The server calls this before reporting SERVING; afterwards no request pays for compilation.
    """
    from . import params

    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        for x_shape, w_shape, kw in (
            ((2, 2, 6, 7), (2, 1, 3, 3), dict(stride=2, padding=1, groups=2)),  # direct kernels
            ((1, 4, 6, 6), (16, 4, 3, 3), dict(padding=1)),  # im2col + BLAS
            ((1, 16, 3, 3), (16, 16, 1, 1), {}),  # pointwise
        ):
            x = rng.standard_normal(x_shape).astype(dtype)
            w = rng.standard_normal(w_shape).astype(dtype)
            b = rng.standard_normal(w_shape[0]).astype(dtype)
            g = params.conv2d_geometry(x.shape, w.shape, b.shape, **kw)
            y = conv2d(x, w, b, g)
            conv2d_input_grad(y, w, g)
            conv2d_weight_grad(x, y, g)
            conv2d(x, w, None, g)
        pg = params.pool2d_geometry(x.shape, 2, 1, 1)
        y = max_pool2d(x, pg)
        max_pool2d_backward(y, x, pg)
        avg_pool2d_backward(avg_pool2d(x, pg), pg)
        relu_backward(relu(x), x)
