"""The numba backend: the server's default kernel table, parallel on the CPUs this process may use.

Convolutions with enough channels go through im2col into a reused, size-capped workspace plus
one BLAS matmul per tile, or, for stride-1 3x3 ones, Winograd (fewer multiplications: batched BLAS
matmuls between numba transforms; F(3x3, 3x3) forward and input gradient, F(2x2, 3x3) weight
gradient); stride-1 ones with few taps sum them straight from the padded input; small, grouped and
depthwise ones run direct numba loops. An op stops part way when its caller's stop flag is set
(``convrpc.core.stopping``): the kernels read it per row, and no further tile is started. The algorithm is chosen once per geometry (:func:`conv_algorithm`) and can be forced. Pooling and
relu are direct loops. Every parallel loop owns what it writes, so results do not depend on the
thread count or on other requests.

Threads: numba's ``workqueue`` layer aborts the process when two threads call parallel code at
once (the gRPC pool does), so an OpenMP/TBB layer is chosen before numba starts its pool, with
idle OpenMP workers polling for about 0.25 ms before they sleep (``GOMP_SPINCOUNT``; not the
runtimes' long spins, which would take the cores from the BLAS tiles' threads). Compute runs in a
bounded number of lanes (one by default): concurrent requests queue rather than oversubscribe the
cores. Compiled kernels are cached on disk (``cache=True``); set
``NUMBA_CACHE_DIR`` to choose where (containers mount it). Call :func:`warm_up` at start-up.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

# These must be in the environment before numba's OpenMP runtime loads (at its first parallel call).
# An idle OpenMP worker polls a little before it sleeps (GNU libgomp: 10,000 polls, about 0.25 ms
# here), so back-to-back kernels find it awake: waking a sleeping one cost 30-60 us a kernel (c's
# forward 0.31-0.35 -> 0.27-0.28 ms). Intel's runtime, whose default is to spin 200 ms, sleeps at
# once. OMP_WAIT_POLICY=passive (sleep at once) or any of these set by the caller wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
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

from . import _cblas  # noqa: E402
from . import _numba_kernels as _k  # noqa: E402
from . import config, stopping, winograd  # noqa: E402
from .placing import placed_empty, placed_zeros  # noqa: E402
from .params import ConvGeometry, PoolGeometry  # noqa: E402

__all__ = [
    "CONV_ALGORITHMS",
    "THREADS",
    "conv_algorithm",
    "compute_threads",
    "force_conv_algorithm",
    "last_algorithm",
    "set_workspace_limit",
    "threading_layer",
    "warm_up",
    "xp",
]

xp = np
DEVICE = f"cpu ({THREADS} threads)"

#: Largest private im2col buffer (one image, one group) of the small-conv kernels, per thread.
SMALL_COLS_BYTES = 1024 * 1024
#: im2col tiles aim at this size so a tile is still in cache when the matmul reads it.
TILE_BYTES = 4 * 1024 * 1024

# One compute lane: concurrent requests queue here instead of splitting the same cores (and the
# worker buffers below belong to whoever holds it).
_lane = threading.Lock()
#: Ops with less work than this (flops, or element-taps for pooling/relu) run on the calling thread
#: alone: waking the parallel pool costs 50-100 us here, more than such an op's whole compute
#: (conv 1x1x80x80 3x3: 115 -> 54 us forward, 100 -> 26 us grad-input, measured).
SERIAL_WORK = 1_500_000
#: Stride-1 convs on the BLAS path use im2col_wide (see _conv2d_wide).
USE_WIDE = True
_workspace_limit = int(config.WORKSPACE_BYTES)
#: The flag of no stopping block: never set.
_NEVER = np.zeros(1, dtype=np.uint8)
#: The lane holder's stop flag (a StopFlag's array): the kernels read it, _run checks it between tiles.
_stop = _NEVER
_worker_buffers: list[np.ndarray | None] = [None] * THREADS
_pool: ThreadPoolExecutor | None = None


def _configure_blas() -> bool:
    """Make BLAS single-threaded so our worker threads can each run one matmul; whether it could.

    OpenBLAS's own threads spin-wait and lose whole scheduler ticks when anything else wants the
    cores (a 0.3 ms matmul took 8 ms); our workers call single-threaded BLAS side by side instead.
    Without threadpoolctl BLAS keeps its threads and we call it from one thread only.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(1, user_api="blas")
    return True


_BLAS_SINGLE = _configure_blas()
BLAS_WORKERS = THREADS if _BLAS_SINGLE else 1
#: numpy's BLAS sgemm / dgemm for the numba kernels (see _cblas), or None: pointwise convs then run
#: numpy's matmul on the worker pool, and the weight gradients' tile sums numpy's ``+=``.
_GEMM = _cblas.gemm_addresses() if _BLAS_SINGLE else None
#: Off: the numpy paths above even where _GEMM was found (tests pin both).
USE_CBLAS = True


def to_device(a):
    a = np.asarray(a, order="C")  # not ascontiguousarray, which turns a 0-d array into shape (1,)
    return a if a.flags.writeable else _writable_alias(a)


class _Alias:
    """Exposes a read-only array's memory as writable, keeping the array alive."""

    def __init__(self, a: np.ndarray):
        self.array = a
        interface = dict(a.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def _writable_alias(a: np.ndarray) -> np.ndarray:
    """The same memory as a writable array, no copy.

    Server inputs are read-only views of request bytes, and numba compiles a separate
    specialisation of every kernel for read-only arrays (about 20 s of JIT on a first request,
    for each mix of read-only and writable arguments). The kernels never write their inputs, so an
    alias keeps one compiled signature per dtype, the one warm_up() compiled.
    """
    return np.asarray(_Alias(a))


def to_host(a):
    return a


def set_workspace_limit(nbytes: int) -> None:
    """Cap the extra memory one op's im2col workspaces may take together (default ``config.WORKSPACE_BYTES``)."""
    global _workspace_limit
    if nbytes < 1:
        raise ValueError(f"workspace limit must be positive, got {nbytes}")
    with _lane:
        _workspace_limit = int(nbytes)
        _worker_buffers[:] = [None] * THREADS
        _choices.clear()  # which algorithms fit depends on the cap


def workspace_limit() -> int:
    """The current workspace cap in bytes."""
    return _workspace_limit


def threading_layer() -> str:
    """The numba threading layer in use (after the first parallel call), e.g. ``"omp"``."""
    return numba.threading_layer()


def _buffer(worker: int, shape, dtype) -> np.ndarray:
    """Worker ``worker``'s reused scratch array of ``shape``; call only while holding the lane."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = _worker_buffers[worker]
    if buf is None or buf.nbytes < nbytes:
        buf = _worker_buffers[worker] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


class _NumbaThreads(threading.local):
    #: The numba thread count _Compute last set on this thread (numba keeps one per thread).
    count = THREADS


_numba_threads = _NumbaThreads()


class _Compute:
    """Holds the lane for one op; below SERIAL_WORK its numba kernels and BLAS tiles stay on this thread.

    The op stops early when the calling thread's stop flag (``stopping.current()``) is set. A serial op
    leaves the thread's numba thread count at 1 for the next one (convrpc's kernels are the only
    parallel code here): setting and restoring it cost 4 us a call, a tenth of a tiny conv's time."""

    __slots__ = ("serial",)

    def __init__(self, work: float):
        self.serial = work < SERIAL_WORK

    def __enter__(self):
        global _stop
        _lane.acquire()
        flag = stopping.current()
        _stop = _NEVER if flag is None else flag.array
        threads = 1 if self.serial else THREADS
        if _numba_threads.count != threads:
            numba.set_num_threads(threads)
            _numba_threads.count = threads
        return self

    def __exit__(self, *exc):
        global _stop
        _stop = _NEVER
        _lane.release()


def _run(tasks, work, workers: int) -> None:
    """Call ``work(worker, task)`` for every task, spread over ``workers`` threads (this one included),
    until the lane's stop flag is set."""
    global _pool
    workers = max(1, min(workers, len(tasks)))
    stop = _stop
    if workers == 1:
        for task in tasks:
            if stop[0]:
                return
            work(0, task)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS - 1, thread_name_prefix="convrpc-numba")
    pending = iter(tasks)
    take = threading.Lock()

    def loop(worker):
        while True:
            with take:
                task = next(pending, None)
            if task is None or stop[0]:
                return
            work(worker, task)

    futures = [_pool.submit(loop, i) for i in range(1, workers)]
    try:
        loop(0)
    finally:
        for f in futures:
            f.result()


# -- convolution --------------------------------------------------------------------------------


def _conv_args(g: ConvGeometry):
    return g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dil_h, g.dil_w


def _is_pointwise(g: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped conv: the input itself is the im2col matrix."""
    return (
        g.kh == g.kw == g.stride_h == g.stride_w == g.groups == 1
        and g.pad_top == g.pad_bottom == g.pad_left == g.pad_right == 0
    )


def _pointwise_gemms(g: ConvGeometry, *arrays) -> bool:
    """Whether a pointwise conv's matmuls run as one numba kernel calling BLAS (:func:`_k.gemm_batch`),
    which reads and writes ``arrays`` by address: each must be C-contiguous."""
    return USE_CBLAS and _GEMM is not None and g.n * g.h * g.w > 0 and all(a.flags.c_contiguous for a in arrays)


def _gemms(parts, chunks, count, ta, tb, m, n, k, a, a_step, a_part, lda, b, b_step, ldb, c, c_step, c_part, ldc,
           accumulate=False, bias=None, beta=0.0, serial=False):
    """:func:`_k.gemm_batch` (``serial``: its one-thread twin) on flat views, one compiled signature per
    dtype, under the lane's stop flag."""
    has_bias = bias is not None
    kernel = _k.gemm_batch_serial if serial else _k.gemm_batch
    kernel(_GEMM[c.itemsize == 8], parts, chunks, count, ta, tb, m, n, k, a.reshape(-1), a_step, a_part, lda,
           b.reshape(-1), b_step, ldb, c.reshape(-1), c_step, c_part, ldc, accumulate, beta,
           bias if has_bias else _NO_BIAS[c.dtype], has_bias, _stop)


def _matmul_add(c, a, bt) -> None:
    """``c += a @ bt.T`` matrix by matrix along a leading batch axis (or one matrix), on the calling
    thread: BLAS gemm with beta 1 where it can, which makes no temporary and no extra pass over c."""
    if USE_CBLAS and _GEMM is not None and all(t.flags.c_contiguous for t in (c, a, bt)):
        count, m, n = c.reshape(-1, *c.shape[-2:]).shape
        k = a.shape[-1]
        _gemms(1, count, count, _cblas.NO_TRANS, _cblas.TRANS, m, n, k, a, m * k, 0, k, bt, n * k, k,
               c, m * n, 0, n, beta=1.0, serial=True)
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs: the caller checks
            c += np.matmul(a, np.swapaxes(bt, -1, -2))


def _gemm_split(count: int, serial: bool) -> tuple[int, int]:
    """(row blocks per matrix, runs of matrices) for gemm_batch: whole matrices per thread where they
    share out evenly (M=256 runs 10% faster than two blocks of 128 rows), else row blocks."""
    if serial:
        return 1, 1
    if count % THREADS == 0:
        return 1, THREADS
    return THREADS, 1


def _use_small(g: ConvGeometry, itemsize: int) -> bool:
    """Whether one image-group's im2col block is small enough for the per-thread small kernels."""
    cols = (g.c_in // g.groups) * g.kh * g.kw * g.out_h * _wide_width(g) * itemsize
    return cols <= min(SMALL_COLS_BYTES, _workspace_limit // THREADS)


def _use_blas(g: ConvGeometry) -> bool:
    """BLAS pays off once both matmul sides are wide; direct loops win for thin or many-group convs."""
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    return g.groups <= 4 and kg >= 8 and ckk >= 16 and kg * ckk >= 256


def _few_weights(g: ConvGeometry) -> bool:
    """At most 32 weights per group: the row kernels beat im2col (a: forward 45 -> 16 us, grad-weight 46 -> 19)."""
    return (g.c_out // g.groups) * (g.c_in // g.groups) * g.kh * g.kw <= 32


class _Plan:
    """Output-row tiles (n0, images, r0, rows) for the BLAS path and the workers that run them.

    Each worker's im2col block fits its share of the workspace cap; there are enough tiles to keep
    every worker busy. ``None`` from :meth:`make` means not even one output row fits: go direct.
    """

    def __init__(self, tiles, workers, row_bytes):
        self.tiles, self.workers, self.row_bytes = tiles, workers, row_bytes

    @classmethod
    def make(cls, g: ConvGeometry, itemsize: int, pointwise: bool = False, serial: bool = False, wide: bool = False):
        """``wide``: tiles for im2col_wide, whose row also holds the padded input and the matmul output."""
        workers = 1 if serial else BLAS_WORKERS
        row_bytes = g.c_in * g.kh * g.kw * g.out_w * itemsize
        # Both im2col paths copy from padded phase planes: a row of them per output row, and a halo.
        wg, phases = _wide_width(g), g.stride_h * g.stride_w
        halo = 0 if pointwise else g.c_in * _wide_span(g, 0) * itemsize
        budget = min(TILE_BYTES, _workspace_limit // workers) - halo
        if wide:
            row_bytes = (g.c_in * g.kh * g.kw + g.c_out + g.c_in * phases) * wg * itemsize
            if row_bytes > budget:
                return None
        elif not pointwise:
            row_bytes += g.c_in * phases * wg * itemsize
        if pointwise:
            budget = TILE_BYTES  # no workspace: tiles only split the work
        elif row_bytes > budget:
            workers = 1
            budget = _workspace_limit - halo
            if row_bytes > budget:
                return None
        image_bytes = row_bytes * g.out_h
        if g.n >= 2 * workers and image_bytes <= budget:
            per = max(1, min(budget // image_bytes, -(-g.n // (2 * workers))))
            return cls([(n0, min(per, g.n - n0), 0, g.out_h) for n0 in range(0, g.n, per)], workers, row_bytes)
        pieces = max(1, -(-2 * workers // g.n))
        rows = max(1, min(budget // row_bytes, -(-g.out_h // pieces)))
        rows = -(-g.out_h // -(-g.out_h // rows))  # even tiles: 56 rows as 19+19+18, not 25+25+6
        tiles = [(n, 1, r0, min(rows, g.out_h - r0)) for n in range(g.n) for r0 in range(0, g.out_h, rows)]
        return cls(tiles, workers, row_bytes)


def _wide_width(g: ConvGeometry) -> int:
    """Width of im2col_wide's grid: every tap of every output column lies inside it."""
    return g.out_w + g.dil_w * (g.kw - 1) // g.stride_w


def _wide_span(g: ConvGeometry, rows: int) -> int:
    """Elements per channel of im2col_wide's padded input for ``rows`` output rows (stride phases, slack row)."""
    return g.stride_h * g.stride_w * (rows + g.dil_h * (g.kh - 1) // g.stride_h + 1) * _wide_width(g)


def _use_wide(g: ConvGeometry) -> bool:
    """Stride-1 BLAS convs but 1x1 ones (whose input is already the im2col matrix).

    im2col_wide handles strides too (phase planes; the test sweep passes with it on), but on g
    (7x7 stride 2) and (8,64,28,28)x(128,64,3,3) stride 2 it measured within noise of im2col,
    float64 up to 15% slower, so strided convs keep im2col.
    """
    return g.stride_h == g.stride_w == 1 and not _is_pointwise(g)


#: Forward algorithms, each forceable (``force_conv_algorithm`` or ``CONVRPC_CONV_ALGORITHM``):
#: Winograd F(2x2,3x3) / F(3x3,3x3) / F(4x4,3x3), im2col onto the padded-width grid, plain im2col
#: (pointwise: the input is the im2col matrix), direct loops over the padded-width grid (no im2col,
#: no GEMM), im2col per (image, group) with axpy loops, direct row loops.
#: "direct-winograd": direct-wide's loops with Winograd F(4, 4) along the rows, for column stride 2
#: and 7 or 8 taps a row (g's 7x7 stride 2).
CONV_ALGORITHMS = ("winograd-2x2", "winograd-3x3", "winograd-4x4", "im2col-wide", "im2col", "direct-wide",
                   "direct-winograd", "small", "direct")  # fmt: skip
#: Winograd tile per element size: F(3x3) for both. Forced side by side in one process (best of 6
#: alternating rounds, load 1.0-1.2), forward, F(2x2) / F(3x3) / F(4x4) / im2col_wide: d float32
#: 25.6 / 21.9 / 22.7 / 34.2 ms, float64 38.2 / 35.6 / 40.1 / 79.8; e float32 11.5 / 10.8 / 12.9 /
#: 17.7, float64 20.4 / 21.6 / 20.4 / 34.4 (e float64 over 12 rounds: 21.0 / 20.6, 17.5 / 17.7: a
#: tie; e's 28 rows are 10 tiles of 3, 30 rows of work). Float32 error on d and e, as a share of the
#: output's max: F(2x2) 4-6e-7, F(3x3) 3-4e-6, F(4x4) 8-11e-6, and with 256-1024 channels (14 x 14)
#: 6e-7, 4-5e-6, 1.0-1.2e-5 (im2col 3-4e-7; the parity tolerance is 1e-4). Force "winograd-2x2" or
#: "winograd-4x4" to use the others.
WINOGRAD_TILE = {4: 3, 8: 3}
#: Fewest input and output channels for an automatic Winograd choice: below, the transforms cost
#: more than the GEMM flops they save.
WINOGRAD_MIN_CHANNELS = 16
#: The weight gradient of such convs by Winograd F(2x2, 3x3) too (2.25x fewer multiplications).
WINOGRAD_WEIGHT_GRAD = True
#: BLAS convs (not pointwise, not Winograd) with at most this many taps (C*kh*kw) run "direct-wide":
#: a register-blocked kernel reads the padded input in place, where im2col copies it kh*kw times
#: over. Forced side by side (best of 7, load 0.8), forward float32 / float64, direct-wide against the
#: better of im2col and im2col_wide: (8,8,32,32)x(16,8,3,3) p1, 72 taps: 0.52 / 0.42 ms against 0.57 /
#: 0.84; (4,8,32,32)x(32,8,5,5) p2, 200: 0.51 / 0.98 against 0.83 / 1.32; (8,32,28,28)x(64,32,3,3) s2,
#: 288: 1.09 / 2.19 against 1.27 / 2.51; (4,16,32,32)x(32,16,5,5) p2, 400: 0.93 / 2.02 against 1.52 /
#: 2.80; (8,64,28,28)x(128,64,3,3) s2, 576: 3.63 / 6.26 against 3.24 / 7.42 (float32 slower).
WIDE_DIRECT_MAX_TAPS = 512
#: Largest padded image (each thread pads the one it works on) for the "direct-wide" forward: its rows
#: are read where they are used, so this bounds memory, not cache misses.
WIDE_DIRECT_BYTES = 8 << 20
#: The direct-wide weight gradient (dot products over the whole grid, 2 channels x 4 taps a pass)
#: for convs with fewer taps than this, and its largest scratch per thread (the padded image and the
#: gy grid, re-read from L2 every pass).
WIDE_DIRECT_GRAD_MAX_TAPS = 64
WIDE_DIRECT_GRAD_BYTES = 512 * 1024
_log = logging.getLogger(__name__)
_forced: str | None = os.environ.get("CONVRPC_CONV_ALGORITHM") or None
if _forced not in (None, *CONV_ALGORITHMS):
    raise ValueError(f"CONVRPC_CONV_ALGORITHM must be one of {', '.join(CONV_ALGORITHMS)}, got {_forced!r}")
_choices: dict = {}
#: direction ("forward", "grad-input", "grad-weight") -> the algorithm its last call ran (bench/core.py reports it).
last_algorithm: dict[str, str] = {}


def force_conv_algorithm(name: str | None) -> None:
    """Run every conv2d forward (and the stride-1 input gradients computed as one) with ``name``
    where its geometry allows it, else with the automatic choice; ``None`` restores the automatic choice."""
    global _forced
    if name is not None and name not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {', '.join(CONV_ALGORITHMS)} or None, got {name!r}")
    _forced = name
    _choices.clear()


def _winograd_fits(g: ConvGeometry) -> bool:
    return g.kh == g.kw == 3 and g.stride_h == g.stride_w == g.dil_h == g.dil_w == g.groups == 1


def _fits(name: str, g: ConvGeometry, itemsize: int, serial: bool) -> bool:
    """Whether algorithm ``name`` can run geometry ``g`` (within the workspace cap)."""
    if name == "direct-winograd":
        return _winograd_row_fits(g, itemsize, serial)
    if name.startswith("winograd"):
        return _winograd_fits(g) and _winograd_tasks(g, itemsize, int(name[-1]), serial) is not None
    if name == "im2col-wide":
        return not _is_pointwise(g) and _Plan.make(g, itemsize, serial=serial, wide=True) is not None
    if name == "im2col":
        return _Plan.make(g, itemsize, _is_pointwise(g), serial) is not None
    if name == "small":
        return _use_small(g, itemsize)
    if name == "direct-wide":  # per thread: an image's padded planes and their slack
        scratch = (g.c_in * _wide_span(g, g.out_h) + _k.WIDE_DIRECT_SLACK) * itemsize
        return g.groups == 1 and scratch <= min(WIDE_DIRECT_BYTES, _workspace_limit // (1 if serial else THREADS))
    return True


def _weight_grad_wide_direct_fits(g: ConvGeometry, itemsize: int) -> bool:
    """Whether a direct-wide conv's weight gradient runs direct-wide too: forced, or stride 1 with few
    taps or little work (where it was measured), and its scratch (the padded image, the gy grid)
    within WIDE_DIRECT_GRAD_BYTES."""
    few = g.c_in * g.kh * g.kw < WIDE_DIRECT_GRAD_MAX_TAPS or not _use_blas(g)
    if not (_forced == "direct-wide" or (_use_wide(g) and few)):
        return False
    scratch = (g.c_in * _wide_span(g, g.out_h) + (g.c_out + 3) * g.out_h * _wide_width(g)) * itemsize
    return scratch <= min(WIDE_DIRECT_GRAD_BYTES, _workspace_limit // THREADS)


def _auto_algorithm(g: ConvGeometry, itemsize: int, serial: bool) -> str:
    if _use_blas(g):
        m = WINOGRAD_TILE[itemsize]
        if min(g.c_in, g.c_out) >= WINOGRAD_MIN_CHANNELS and _fits(f"winograd-{m}x{m}", g, itemsize, serial):
            return f"winograd-{m}x{m}"
        few_taps = g.c_in * g.kh * g.kw <= WIDE_DIRECT_MAX_TAPS
        if few_taps and not _is_pointwise(g) and _fits("direct-wide", g, itemsize, serial):
            if WINOGRAD_ROW and _fits("direct-winograd", g, itemsize, serial):
                return "direct-winograd"
            return "direct-wide"
        if USE_WIDE and _use_wide(g) and _fits("im2col-wide", g, itemsize, serial):
            return "im2col-wide"
        if _fits("im2col", g, itemsize, serial):
            return "im2col"
    if _use_wide(g) and _fits("direct-wide", g, itemsize, serial):  # few channels or weights (a, b)
        return "direct-wide"
    return "small" if _use_small(g, itemsize) and not _few_weights(g) else "direct"


#: The bias of a conv without one, per dtype: the kernels' signature takes an array either way.
_NO_BIAS = {np.dtype(t): np.zeros(1, t) for t in (np.float32, np.float64)}


def _weight_grad_by_winograd(g: ConvGeometry, itemsize: int, serial: bool) -> bool:
    """Whether the weight gradient runs Winograd F(2x2, 3x3): where the forward would (or is forced to)."""
    forced = _forced is not None and _forced.startswith("winograd")
    if not (forced or (WINOGRAD_WEIGHT_GRAD and _use_blas(g) and min(g.c_in, g.c_out) >= WINOGRAD_MIN_CHANNELS)):
        return False
    return _winograd_fits(g) and _winograd_tasks(g, itemsize, 2, serial) is not None


def conv_algorithm(g: ConvGeometry, itemsize: int, serial: bool = False) -> str:
    """The forward algorithm for geometry ``g`` and element size ``itemsize``: chosen once per shape, then cached."""
    key = (g, itemsize, serial)
    name = _choices.get(key)
    if name is None:
        forced = _forced
        name = forced if forced is not None and _fits(forced, g, itemsize, serial) else _auto_algorithm(g, itemsize, serial)
        if len(_choices) >= 4096:
            _choices.clear()
        _choices[key] = name
        _log.debug("conv2d %s itemsize %d%s: %s", g, itemsize, " serial" if serial else "", name)
    return name


def conv2d(x, w, b, g: ConvGeometry):
    """y (N, K, OH, OW) = conv2d(x (N, C, H, W), w (K, C/groups, kh, kw)) + b (K,) or None."""
    with _Compute(g.flops) as run:
        return _conv2d(x, w, b, g, run.serial)


def _conv2d(x, w, b, g: ConvGeometry, serial: bool = False):
    """conv2d's body; the caller holds the lane. Padding may be negative (a crop): the kernels clip."""
    y = placed_empty(g.output_shape, x.dtype)  # the op's result (conv2d's, or the flipped input gradient's)
    name = conv_algorithm(g, x.itemsize, serial)
    last_algorithm["forward"] = "pointwise" if name == "im2col" and _is_pointwise(g) else name
    if name.startswith("winograd"):
        if _conv2d_winograd(x, w, b, g, int(name[-1]), serial, y):
            return y
        # A non-finite value reached a tile (and spread over it): the exact im2col path decides.
        name = last_algorithm["forward"] = "im2col" if _fits("im2col", g, x.itemsize, serial) else "direct"
    if name == "direct-winograd":
        if _conv2d_winograd_row(x, w, b, g, y, serial):
            return y
        # A non-finite value reached an output (the transforms make NaN of inf): direct-wide decides.
        name = last_algorithm["forward"] = "direct-wide" if _fits("direct-wide", g, x.itemsize, serial) else "direct"
    if name == "im2col-wide":
        return _conv2d_wide(x, w, b, g, _Plan.make(g, x.itemsize, serial=serial, wide=True), y)
    if name == "direct-wide":
        return _conv2d_wide_direct(x, w, b, g, y, serial)
    if name in ("small", "direct"):
        bias = b if b is not None else _NO_BIAS[x.dtype]
        direct = _k.conv2d_small if name == "small" else _k.conv2d_direct
        direct(x, w, bias, b is not None, y, g.groups, *_conv_args(g), _stop)
        return y
    pointwise = _is_pointwise(g)
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    wm = w.reshape(g.groups, kg, ckk)
    y3 = y.reshape(g.n, g.c_out, g.out_h * g.out_w)
    x3 = x.reshape(g.n, g.c_in, g.h * g.w)
    if pointwise and _pointwise_gemms(g, wm, x3, y3):
        parts, p = _gemm_split(g.n, serial)[0], g.h * g.w
        rows = -(-g.c_out // parts)  # y[i] = w @ x[i], in blocks of output channels
        _gemms(parts, g.n, g.n, _cblas.NO_TRANS, _cblas.NO_TRANS, g.c_out, p, g.c_in,
               wm[0], 0, rows * g.c_in, g.c_in, x3, g.c_in * p, p, y3, g.c_out * p, rows * p, p, bias=b)
        return y
    plan = _Plan.make(g, x.itemsize, pointwise, serial)

    def tile(worker, t):
        n0, tn, r0, nr = t
        p0, p1 = r0 * g.out_w, (r0 + nr) * g.out_w
        if pointwise:
            np.matmul(wm[0], x3[n0 : n0 + tn, :, p0:p1], out=y3[n0 : n0 + tn, :, p0:p1])
            return
        cols = _im2col_block(worker, x, g, t)
        for grp in range(g.groups):
            b_mat = cols[grp * ckk : (grp + 1) * ckk].transpose(1, 0, 2)  # (images, ckk, P)
            np.matmul(wm[grp], b_mat, out=y3[n0 : n0 + tn, grp * kg : (grp + 1) * kg, p0:p1])
        if b is not None:
            y3[n0 : n0 + tn, :, p0:p1] += b[:, None]

    _run(plan.tiles, tile, plan.workers)
    if b is not None and pointwise:
        y3 += b[:, None]
    return y


def _conv2d_wide(x, w, b, g: ConvGeometry, plan: _Plan, y):
    """The BLAS path for stride 1: im2col_wide, one matmul per group onto the grid, valid columns to y."""
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    wm = w.reshape(g.groups, kg, ckk)
    wg = _wide_width(g)
    span = _wide_span(g, max(nr for _, _, _, nr in plan.tiles))

    def tile(worker, t):
        n0, tn, r0, nr = t
        length = nr * wg
        sizes = (g.c_in * g.kh * g.kw * tn * length, tn * g.c_out * length, g.c_in * span)
        flat = _buffer(worker, (sum(sizes),), x.dtype)
        cols = flat[: sizes[0]].reshape(g.c_in * g.kh * g.kw, tn, length)
        out = flat[sizes[0] : sizes[0] + sizes[1]].reshape(tn, g.c_out, length)
        xpad = flat[sizes[0] + sizes[1] :].reshape(g.c_in, span)
        _k.im2col_wide(x, xpad, cols, n0, 0, r0, g.kh, g.kw, *_conv_args(g), wg, g.out_w, False)
        if g.groups == 1:
            # One GEMM over all the tile's images, not one per image: c float64 1.43 -> 1.21 ms of matmul.
            by_channel = out.reshape(g.c_out, tn, nr, wg)
            np.matmul(wm[0], cols.reshape(ckk, tn * length), out=by_channel.reshape(g.c_out, tn * length))
            src = by_channel.transpose(1, 0, 2, 3)[:, :, :, : g.out_w]
        else:
            for grp in range(g.groups):
                b_mat = cols[grp * ckk : (grp + 1) * ckk].transpose(1, 0, 2)  # (images, ckk, grid)
                np.matmul(wm[grp], b_mat, out=out[:, grp * kg : (grp + 1) * kg])
            src = out.reshape(tn, g.c_out, nr, wg)[:, :, :, : g.out_w]
        dst = y[n0 : n0 + tn, :, r0 : r0 + nr]
        if b is not None:
            np.add(src, b[:, None, None], out=dst)
        else:
            dst[...] = src

    _run(plan.tiles, tile, plan.workers)
    return y


def _wide_direct_shape(g: ConvGeometry) -> tuple[int, int]:
    """(K', T'): the channels rounded up to pairs and the taps to fours (the direct-wide weight gradient's layout)."""
    return -(-g.c_out // 2) * 2, -(-(g.c_in * g.kh * g.kw) // 4) * 4


@functools.lru_cache(maxsize=4096)
def _wide_direct_taps(g: ConvGeometry):
    """(each tap's start in an image's padded planes, grid width, span): made once per geometry."""
    wg, span = _wide_width(g), _wide_span(g, g.out_h)
    taps = _wide_direct_shape(g)[1]
    offs = _k.wide_direct_taps(g.c_in, g.kh, g.kw, g.stride_h, g.stride_w, g.dil_h, g.dil_w, span, wg, taps)
    offs.flags.writeable = False
    return offs, wg, span


def _conv2d_wide_direct(x, w, b, g: ConvGeometry, y, serial: bool):
    """y = conv2d by register-blocked loops over im2col_wide's grid (one group); each of the kernel's
    threads pads its images into a reused scratch, one at a time. A serial call runs the kernel's
    serial twin on this thread (no parallel launch)."""
    offs, wg, span = _wide_direct_taps(g)
    w2 = np.ascontiguousarray(w.reshape(g.c_out, g.c_in * g.kh * g.kw))
    bias = b if b is not None else _NO_BIAS[x.dtype]
    kernel = _k.conv2d_wide_direct_serial if serial else _k.conv2d_wide_direct
    chunks = 1 if serial else THREADS
    xpad = _buffer(0, (chunks, g.c_in * span + _k.WIDE_DIRECT_SLACK), x.dtype)  # per chunk: a padded image
    args = (offs, wg, span, chunks, g.stride_h, g.stride_w, g.pad_top, g.pad_left, _stop)
    kernel(x, w2, bias, b is not None, y, xpad, *args)
    return y


def _avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (32 vector registers: direct-winograd's 28
    accumulators fit; on AVX2 each is two of 16 registers and they would spill)."""
    features = numba.config.CPU_FEATURES
    if features is None:
        if numba.config.CPU_NAME is not None:
            return False  # a named target without its features: assume the narrower one
        from llvmlite import binding

        features = binding.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


#: Choose "direct-winograd" automatically where it fits. Forced side by side with direct-wide on g
#: (7x7 stride 2, 3 -> 64 channels), interleaved, 25th percentile of 25, 2 threads: on a Zen 4 core
#: with AVX-512, float32 1.094 -> 0.857 ms (1 thread: 2.18 -> 1.55), float64 2.17 -> 1.54; on a Zen 3
#: core (AVX2), by position, 6 channels a block: float32 2.24 -> 1.97 and 2.24 -> 2.24, float64 4.15 ->
#: 3.96 and 4.61 -> 4.06 (4 channels a block: float32 2.25 -> 2.05, 2.39 -> 2.23, 2.43 -> 2.47).
WINOGRAD_ROW = True
#: Where a vector is two of 16 AVX registers, sum direct-winograd's 7 transformed positions one at a
#: time, 6 output channels a block (6 accumulators: 12 registers), instead of 4 channels x 7 positions
#: in 28 accumulators: those spilled (Zen 3, g float32: 3.1-3.5 ms, 1.4x direct-wide's time; two
#: positions of 4 channels at a time, 16 registers, spilled too: 4.3 ms).
WINOGRAD_ROW_BY_POSITION = not _avx512()
#: F(4, 4)'s G (points 0, 1, -1, 2, -2, 1/2, infinity; B^T's and A^T's rows scaled to small
#: integers), applied to the weights in float64.
_G_ROW = np.array([[1 / 4, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 1 / 6], [1 / 18, -1 / 18, 1 / 18, -1 / 18],
                   [1 / 72, 1 / 36, 1 / 18, 1 / 9], [1 / 120, -1 / 60, 1 / 30, -1 / 15],
                   [4 / 45, 2 / 45, 1 / 45, 1 / 90], [0, 0, 0, 1 / 2]])  # fmt: skip
_ROW_CONSTS = {np.dtype(t): np.array([1, -1, 2, -2, 4, 8, -8], dtype=t) for t in (np.float32, np.float64)}
#: B^T's entries, in the order _k._bt_rows indexes them.
_ROW_BT = {np.dtype(t): np.array([4, -8, -5, 10, 1, -2, -4, 9, -1, 12, -7, -3, 2, 3, 5, 8, -10], dtype=t)
           for t in (np.float32, np.float64)}  # fmt: skip


def _winograd_row_fits(g: ConvGeometry, itemsize: int, serial: bool) -> bool:
    if not (g.groups == 1 and g.stride_w == 2 and g.dil_w == 1 and g.kw in (7, 8) and g.out_w % 4 == 0):
        return False
    if g.out_h * (g.out_w // 4) < 64 // itemsize:  # not one vector of tiles
        return False
    return _winograd_row_plan(g, itemsize)[2] * itemsize * (1 if serial else THREADS) <= _workspace_limit


#: Output rows of one band of conv2d_winograd_row: its transformed input rows (7 per plane row, column
#: phase and input channel: 200 KB for g's 16 rows and their taps' 5 more, float32) stay in L2 while
#: its blocks read them (whole images, 1.1 MB, measured 6-7% slower).
WINOGRAD_ROW_BAND = 16


@functools.lru_cache(maxsize=256)
def _winograd_row_plan(g: ConvGeometry, itemsize: int):
    """(blocks a band, plane rows of a band's u, elements of one thread's scratch, plane rows of the
    image, plane rows a block's taps reach below its output row) of conv2d_winograd_row."""
    t, lanes = g.out_w // 4, 64 // itemsize
    reach = g.dil_h * (g.kh - 1) // g.stride_h
    prow = g.out_h + reach
    band = max(1, WINOGRAD_ROW_BAND * t // lanes)
    urows = min(prow, -(-band * lanes // t) + 2 + reach)
    scratch = g.c_in * g.stride_h * 14 * urows * t + 24 * (t + 2) + (g.c_in * g.kh * 14 + 1 + 42) * lanes
    return band, urows, scratch, prow, reach


@functools.lru_cache(maxsize=256)
def _winograd_row_taps(g: ConvGeometry):
    """(RT, 2): row tap (c, i, b)'s first transformed row (of 7) in u, and the plane rows it lies below its output row."""
    taps = np.empty((g.c_in * g.kh * 2, 2), dtype=np.int64)
    for c in range(g.c_in):
        for i in range(g.kh):
            a, rise = (i * g.dil_h) % g.stride_h, (i * g.dil_h) // g.stride_h
            for b in range(2):
                taps[(c * g.kh + i) * 2 + b] = ((c * g.stride_h + a) * 2 + b) * 7, rise
    taps.setflags(write=False)
    return taps


def _conv2d_winograd_row(x, w, b, g: ConvGeometry, y, serial: bool) -> bool:
    """y = conv2d by conv2d_winograd_row; False (y unreliable) when an output came out non-finite."""
    band, urows, size, prow, reach = _winograd_row_plan(g, x.itemsize)
    v = np.empty((g.c_out, g.c_in * g.kh * 2, 7), dtype=x.dtype)
    _k.winograd_row_weights(w, _G_ROW, v)  # 27 us for g (numpy's batched matmul of the taps: 140-165)
    chunks = 1 if serial else THREADS
    scratch = _buffer(0, (chunks, size), x.dtype)
    status = np.zeros(chunks)
    bias = b if b is not None else _NO_BIAS[x.dtype]
    _k.conv2d_winograd_row(x, v, bias, b is not None, y, scratch, _winograd_row_taps(g), _ROW_CONSTS[x.dtype],
                           _ROW_BT[x.dtype], band, urows, prow, g.stride_h, g.pad_top, g.pad_left, reach,
                           WINOGRAD_ROW_BY_POSITION, chunks, status, _stop)  # fmt: skip
    return bool(np.isfinite(status).all())


def _weight_grad_wide_direct(x, gy, g: ConvGeometry, serial: bool):
    """gw by conv2d_weight_grad_wide_direct; None when it is not finite (the exact path then decides)."""
    offs, wg, span = _wide_direct_taps(g)
    partial = np.empty((1 if serial else max(1, min(THREADS, g.n)), *_wide_direct_shape(g)), dtype=x.dtype)
    kernel = _k.conv2d_weight_grad_wide_direct_serial if serial else _k.conv2d_weight_grad_wide_direct
    kernel(x, gy, partial, offs, wg, span, g.stride_h, g.stride_w, g.pad_top, g.pad_left, _stop)
    gw = (partial[0] if serial else partial.sum(axis=0))[: g.c_out, : g.c_in * g.kh * g.kw].reshape(g.weight_shape)
    return gw if np.isfinite(gw).all() else None


def _winograd_row_width(tiles_w: int, itemsize: int) -> int:
    """Tiles a row of the Winograd transforms' scratch holds: tiles_w, or one _simd vector (64 bytes) if wider."""
    return max(tiles_w, 64 // itemsize)


def _winograd_sizes(g: ConvGeometry, m: int, tn: int, nth: int, tiles_w: int, itemsize: int) -> tuple[int, ...]:
    """Elements of one Winograd task's buffers: V, M, padded input rows, row transforms, output tile rows, column
    transforms. The last four hold rows of tiles widened to a _simd vector (64 bytes) where narrower (rounding
    every row up measured 1.5x slower on d: the scratch outgrew L1), and M is followed by one vector's slack,
    which the output transform's last vector may read."""
    a, p = m + 2, tn * nth * tiles_w
    rows, lanes, tw = nth * m + 2, 64 // itemsize, _winograd_row_width(tiles_w, itemsize)
    return (a * a * g.c_in * p, a * a * g.c_out * p + lanes, rows * m * (tw + 1), rows * a * tw, nth * m * m * tw,
            m * a * tw)  # fmt: skip


def _winograd_tasks(g: ConvGeometry, itemsize: int, m: int, serial: bool):
    """(tasks (n0, images, tile row 0, tile rows), workers) with each task's buffers within its share of the cap, or None."""
    workers = 1 if serial else BLAS_WORKERS
    tiles_h, tiles_w = -(-g.out_h // m), -(-g.out_w // m)
    row_bytes = sum(_winograd_sizes(g, m, 1, 1, tiles_w, itemsize)) * itemsize
    budget = min(TILE_BYTES, _workspace_limit // workers)
    if row_bytes > budget:
        workers, budget = 1, _workspace_limit
        if row_bytes > budget:
            return None
    image_rows = budget // row_bytes
    if image_rows >= tiles_h and g.n >= 2 * workers:
        per = max(1, min(image_rows // tiles_h, -(-g.n // (2 * workers))))
        return [(n0, min(per, g.n - n0), 0, tiles_h) for n0 in range(0, g.n, per)], workers
    pieces = max(1, -(-2 * workers // g.n))
    rows = max(1, min(image_rows, -(-tiles_h // pieces)))
    rows = -(-tiles_h // -(-tiles_h // rows))  # even pieces
    return [(n, 1, r0, min(rows, tiles_h - r0)) for n in range(g.n) for r0 in range(0, tiles_h, rows)], workers


def _winograd_buffers(worker: int, g: ConvGeometry, m: int, task, tiles_w: int, dtype):
    """A Winograd task's buffers in the worker's scratch: V (a*a, C, P), M (a*a, K, P), the padded input
    rows and the output tile rows in column phases, the row transforms, the column transforms."""
    _, tn, _, nth = task
    a, p = m + 2, tn * nth * tiles_w
    itemsize = np.dtype(dtype).itemsize
    sizes, tw = _winograd_sizes(g, m, tn, nth, tiles_w, itemsize), _winograd_row_width(tiles_w, itemsize)
    flat = _buffer(worker, (sum(sizes),), dtype)
    shapes = ((a * a, g.c_in, p), (a * a, g.c_out, p), (nth * m + 2, m, tw + 1), (nth * m + 2, a, tw),
              (nth * m, m, tw), (m, a, tw))  # fmt: skip
    parts, start = [], 0
    for size, shape in zip(sizes, shapes):
        parts.append(flat[start : start + math.prod(shape)].reshape(shape))
        start += size
    return parts


def _conv2d_winograd(x, w, b, g: ConvGeometry, m: int, serial: bool, y) -> bool:
    """y = conv2d by Winograd F(m x m, 3x3); False (y incomplete) when an output came out non-finite."""
    tasks, workers = _winograd_tasks(g, x.itemsize, m, serial)
    tiles_w = -(-g.out_w // m)
    u = winograd.filter_transform(w, m)
    consts = np.array([2, 4, 5, 8], dtype=x.dtype)
    bias = b if b is not None else np.zeros(1, x.dtype)
    finite = [True] * len(tasks)

    def task(worker, i):
        n0, tn, th0, nth = tasks[i]
        v, mm, xq, rt, yq, ct = _winograd_buffers(worker, g, m, tasks[i], tiles_w, x.dtype)
        winograd.input_transform(x, v, xq, rt, consts, n0, tn, th0, nth, tiles_w, g.pad_top, g.pad_left, m)
        np.matmul(u, v, out=mm)  # a*a GEMMs (K x C) @ (C x tiles)
        finite[i] = winograd.output_transform(mm, bias, b is not None, y, yq, ct, consts, n0, tn, th0, nth, tiles_w, m)

    _run(list(range(len(tasks))), task, workers)
    return all(finite)


def _weight_grad_winograd(x, gy, g: ConvGeometry, serial: bool):
    """gw by Winograd F(2x2, 3x3): per task V = B^T d B and A dY A^T, 16 GEMMs dU += (A dY A^T) V^T,
    then G^T dU G; None when a non-finite value reached a tile (the exact path then decides)."""
    tasks, workers = _winograd_tasks(g, x.itemsize, 2, serial)
    tiles_w = -(-g.out_w // 2)
    consts = np.array([2, 4, 5, 8], dtype=x.dtype)
    partial = np.zeros((workers, 16, g.c_out, g.c_in), dtype=x.dtype)

    def task(worker, i):
        n0, tn, th0, nth = tasks[i]
        v, wv, xq, rt, gp, ct = _winograd_buffers(worker, g, 2, tasks[i], tiles_w, x.dtype)
        winograd.input_transform(x, v, xq, rt, consts, n0, tn, th0, nth, tiles_w, g.pad_top, g.pad_left, 2)
        gp = gp.reshape(-1)[: nth * 4 * tiles_w].reshape(nth * 2, tiles_w * 2)  # unpadded, as it reads them
        ct = ct.reshape(-1)[: 8 * tiles_w].reshape(2, 4, tiles_w)
        winograd.grad_output_transform(gy, wv, gp, ct, n0, tn, th0, nth, tiles_w)
        _matmul_add(partial[worker], wv, v)  # 16 GEMMs (K x tiles) @ (tiles x C); non-finite: the caller falls back

    _run(list(range(len(tasks))), task, workers)
    with np.errstate(invalid="ignore", over="ignore"):
        gw = winograd.filter_gradient(partial.sum(axis=0), 2, x.dtype)
    return gw if np.isfinite(gw).all() else None


def _adjoint_as_forward(w, g: ConvGeometry):
    """The stride-1 input gradient as a forward conv: (flipped, in/out-swapped weight, its geometry).

    gx[c, ih] = sum over k, i of gy[k, ih + pt - i*dh] * w[k, c, i]; with i' = kh-1-i that is a conv
    of gy with w'[c, k, i'] = w[k, c, kh-1-i'] and top padding dh*(kh-1) - pt (negative: a crop,
    which the forward kernels clip like any padding). Groups map to groups; out_h/out_w are the
    input's, so an explicit conv_transpose2d output size is honoured.
    """
    kg, cg = g.c_out // g.groups, g.c_in // g.groups
    wt = w.reshape(g.groups, kg, cg, g.kh, g.kw)[:, :, :, ::-1, ::-1].transpose(0, 2, 1, 3, 4)
    wt = np.ascontiguousarray(wt).reshape(g.c_in, kg, g.kh, g.kw)
    return wt, _adjoint_geometry(g)


@functools.lru_cache(maxsize=4096)
def _adjoint_geometry(g: ConvGeometry) -> ConvGeometry:
    """The geometry of :func:`_adjoint_as_forward`'s conv, made once per geometry (dataclasses.replace
    of ConvGeometry's 19 fields takes longer than a tiny conv's kernel)."""
    pt, pl = g.dil_h * (g.kh - 1) - g.pad_top, g.dil_w * (g.kw - 1) - g.pad_left
    return dataclasses.replace(
        g, c_in=g.c_out, h=g.out_h, w=g.out_w, c_out=g.c_in,
        pad_top=pt, pad_left=pl,
        pad_bottom=g.h - 1 + g.dil_h * (g.kh - 1) - pt - (g.out_h - 1),
        pad_right=g.w - 1 + g.dil_w * (g.kw - 1) - pl - (g.out_w - 1),
        out_h=g.h, out_w=g.w,
    )


def _im2col_block(worker, x, g, tile):
    """The im2col block (C*kh*kw, images, rows*OW) of a tile, in the worker's buffer (followed by
    the padded phase planes it is copied from)."""
    n0, tn, r0, nr = tile
    size, wg = g.c_in * g.kh * g.kw * tn * nr * g.out_w, _wide_width(g)
    flat = _buffer(worker, (size + g.c_in * _wide_span(g, nr),), x.dtype)
    cols = flat[:size].reshape(g.c_in * g.kh * g.kw, tn, nr * g.out_w)
    xpad = flat[size:].reshape(g.c_in, -1)
    _k.im2col_phased(x, xpad, cols, n0, 0, r0, g.kh, g.kw, *_conv_args(g), wg, g.out_w)
    return cols


def _input_row_tiles(g: ConvGeometry, plan: _Plan):
    """Re-cut a plan's row tiles by INPUT rows: (n0, images, r0, rows, ih_lo, ih_hi) per tile.

    A worker owns input rows [ih_lo, ih_hi) of its images and computes every output row that
    reaches them, so col2im never adds into rows another worker writes.
    """
    if all(r0 == 0 and nr == g.out_h for _, _, r0, nr in plan.tiles):
        return [(n0, tn, 0, g.out_h, 0, g.h) for n0, tn, _, _ in plan.tiles]
    rows_out = max(nr for _, _, _, nr in plan.tiles)
    reach = (g.kh - 1) * g.dil_h
    rows_in = max(1, (rows_out - 1) * g.stride_h + 1 - reach)
    tiles = []
    for n in range(g.n):
        for a in range(0, g.h, rows_in):
            b = min(g.h, a + rows_in)
            lo = max(0, -(-(a + g.pad_top - reach) // g.stride_h))
            hi = min(g.out_h, (b - 1 + g.pad_top) // g.stride_h + 1)
            if hi > lo:
                tiles.append((n, 1, lo, hi - lo, a, b))
    return tiles


def conv2d_input_grad(gy, w, g: ConvGeometry):
    """gx (N, C, H, W): the adjoint of conv2d applied to gy (N, K, OH, OW); also conv_transpose2d."""
    with _Compute(g.flops) as run:
        gx, name = _conv2d_input_grad(gy, w, g, run.serial)
    last_algorithm["grad-input"] = name
    return gx


def _conv2d_input_grad(gy, w, g: ConvGeometry, serial: bool):
    """(gx, the algorithm that ran); the caller holds the lane."""
    forced_winograd = _forced is not None and _forced.startswith("winograd") and _winograd_fits(g)
    if g.stride_h == g.stride_w == 1 and conv_algorithm(g, gy.itemsize, serial) == "direct-wide":
        wt, gt = _adjoint_as_forward(w, g)  # few input channels: the flipped conv has few outputs
        if _fits("direct-wide", gt, gy.itemsize, serial):
            return _conv2d_wide_direct(gy, wt, None, gt, placed_empty(g.input_shape, gy.dtype), serial), "flipped direct-wide"
    if g.stride_h == g.stride_w == 1 and not _is_pointwise(g) and (
        forced_winograd or _use_blas(_adjoint_geometry(g))
    ):
        # A forward conv runs im2col + one matmul per tile (or Winograd), no zero-fill and no
        # scatter-add: about twice the rate of col2im here.
        wt, gt = _adjoint_as_forward(w, g)
        gx = _conv2d(gy, wt, None, gt, serial)
        return gx, "flipped " + last_algorithm["forward"]
    plan = _Plan.make(g, gy.itemsize, _is_pointwise(g), serial) if _use_blas(g) else None
    if plan is not None and not _is_pointwise(g):
        tiles = _input_row_tiles(g, plan)
        biggest = max(t[1] * t[3] for t in tiles) * plan.row_bytes
        if biggest * plan.workers > _workspace_limit:
            plan = None  # stride 1 with a tall kernel: the re-cut tiles would overrun the cap
    if plan is None and g.stride_h == g.stride_w == 1 and g.c_out // g.groups >= 4:
        # Small stride-1 convs: the flipped-weight forward on the small kernel measured
        # 0.15 -> 0.09 ms on b; with one output channel (a) the row gather below is 2x faster.
        wt, gt = _adjoint_as_forward(w, g)
        if _use_small(gt, gy.itemsize):
            gx = _conv2d(gy, wt, None, gt, serial)
            return gx, "flipped " + last_algorithm["forward"]
    if plan is None:
        gx = placed_empty(g.input_shape, gy.dtype)
        # The row-gather kernel: measured no slower than conv2d_input_grad_small on small shapes
        # and 4x faster on 1x1x80x80, where the small kernel's zero-fill and col2im dominate.
        _k.conv2d_input_grad_direct(gy, w, gx, g.groups, *_conv_args(g), _stop)
        return gx, "row-gather"
    if USE_WIDE and _use_wide(g):
        wide = _Plan.make(g, gy.itemsize, serial=serial, wide=True)
        # Whole images per tile (col2im_wide owns them), and a finite weight: the grid's
        # overhang is then exactly 0 (0 * NaN is not).
        if wide is not None and all(nr == g.out_h for _, _, _, nr in wide.tiles) and np.isfinite(w).all():
            return _input_grad_wide(gy, w, g, wide), "col2im-wide"
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    wm = w.reshape(g.groups, kg, ckk)
    gy3 = gy.reshape(g.n, g.c_out, g.out_h * g.out_w)
    if _is_pointwise(g):
        gx = placed_empty(g.input_shape, gy.dtype)
        gx3 = gx.reshape(g.n, g.c_in, -1)
        if _pointwise_gemms(g, wm, gy3, gx3):
            parts, p = _gemm_split(g.n, serial)[0], g.h * g.w
            rows = -(-g.c_in // parts)  # gx[i] = w.T @ gy[i], in blocks of input channels (w's columns)
            _gemms(parts, g.n, g.n, _cblas.TRANS, _cblas.NO_TRANS, g.c_in, p, g.c_out,
                   wm[0], 0, rows, g.c_in, gy3, g.c_out * p, p, gx3, g.c_in * p, rows * p, p)
            return gx, "pointwise"

        def tile(worker, t):
            n0, tn, r0, nr = t
            p0, p1 = r0 * g.out_w, (r0 + nr) * g.out_w
            np.matmul(wm[0].T, gy3[n0 : n0 + tn, :, p0:p1], out=gx3[n0 : n0 + tn, :, p0:p1])

        _run(plan.tiles, tile, plan.workers)
        return gx, "pointwise"
    # col2im adds into gx: placed in a client's shared memory, a client writing there meanwhile can only
    # spoil its own result.
    gx = placed_zeros(g.input_shape, gy.dtype)

    def tile(worker, t):
        n0, tn, r0, nr, ih_lo, ih_hi = t
        cols = _buffer(worker, (g.c_in * g.kh * g.kw, tn, nr * g.out_w), gy.dtype)
        p0, p1 = r0 * g.out_w, (r0 + nr) * g.out_w
        for grp in range(g.groups):
            out = cols[grp * ckk : (grp + 1) * ckk].transpose(1, 0, 2)
            np.matmul(wm[grp].T, gy3[n0 : n0 + tn, grp * kg : (grp + 1) * kg, p0:p1], out=out)
        _k.col2im_add(cols, gx, n0, 0, r0, ih_lo, ih_hi, g.kh, g.kw, *_conv_args(g), g.out_w)

    _run(tiles, tile, plan.workers)
    return gx, "col2im"


def _input_grad_wide(gy, w, g: ConvGeometry, plan: _Plan):
    """Stride-1 input gradient by whole images: gy on im2col_wide's grid, one matmul, col2im_wide."""
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    wm = w.reshape(g.groups, kg, ckk)
    wg = _wide_width(g)
    length, span = g.out_h * wg, _wide_span(g, g.out_h)
    gx = placed_empty(g.input_shape, gy.dtype)

    def tile(worker, t):
        n0, tn, _, _ = t
        sizes = (g.c_in * g.kh * g.kw * tn * length, g.c_out * tn * length, g.c_in * span)
        flat = _buffer(worker, (sum(sizes),), gy.dtype)
        cols = flat[: sizes[0]].reshape(g.c_in * g.kh * g.kw, tn, length)
        gyw = flat[sizes[0] : sizes[0] + sizes[1]].reshape(g.c_out, tn, g.out_h, wg)
        xpad = flat[sizes[0] + sizes[1] :].reshape(g.c_in, span)
        gyw[:, :, :, : g.out_w] = gy[n0 : n0 + tn].transpose(1, 0, 2, 3)
        gyw[:, :, :, g.out_w :] = 0.0
        gym = gyw.reshape(g.c_out, tn * length)
        for grp in range(g.groups):
            out = cols[grp * ckk : (grp + 1) * ckk].reshape(ckk, tn * length)
            np.matmul(wm[grp].T, gym[grp * kg : (grp + 1) * kg], out=out)
        _k.col2im_wide(cols, xpad, gx, n0, 0, g.kh, g.kw, g.pad_top, g.pad_left, g.dil_h, g.dil_w, wg)

    _run(plan.tiles, tile, plan.workers)
    return gx


def conv2d_weight_grad(x, gy, g: ConvGeometry):
    """gw (K, C/groups, kh, kw): the weight gradient of conv2d for input x and output gradient gy."""
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    with _Compute(g.flops) as run:
        if conv_algorithm(g, x.itemsize, run.serial) == "direct-wide" and _weight_grad_wide_direct_fits(g, x.itemsize):
            gw = _weight_grad_wide_direct(x, gy, g, run.serial)
            if gw is not None:
                last_algorithm["grad-weight"] = "direct-wide"
                return gw
        if _weight_grad_by_winograd(g, x.itemsize, run.serial):
            gw = _weight_grad_winograd(x, gy, g, run.serial)
            if gw is not None:
                last_algorithm["grad-weight"] = "winograd-2x2"
                return gw
        pointwise = _is_pointwise(g)
        plan = _Plan.make(g, x.itemsize, pointwise, run.serial) if _use_blas(g) else None
        if plan is None and _use_small(g, x.itemsize) and not _few_weights(g):
            chunks = 1 if run.serial else max(1, min(THREADS, g.n * g.groups))
            partial = np.empty((chunks, g.c_out, ckk), dtype=x.dtype)
            _k.conv2d_weight_grad_small(x, gy, partial, g.groups, g.kh, g.kw, *_conv_args(g), _stop)
            last_algorithm["grad-weight"] = "small"
            return partial.sum(axis=0).reshape(g.weight_shape)
        if plan is None:
            gw = placed_empty(g.weight_shape, x.dtype)
            _k.conv2d_weight_grad_direct(x, gy, gw, g.groups, *_conv_args(g), _stop)
            last_algorithm["grad-weight"] = "direct"
            return gw
        if USE_WIDE and _use_wide(g) and ckk >= 64:  # measured: d, e 5-15% faster; c (ckk 27) 8% slower
            wide = _Plan.make(g, x.itemsize, serial=run.serial, wide=True)
            if wide is not None:
                last_algorithm["grad-weight"] = "im2col-wide"
                return _weight_grad_wide(x, gy, g, wide)
        last_algorithm["grad-weight"] = "pointwise" if pointwise else "im2col"
        gw = placed_empty(g.weight_shape, x.dtype) if pointwise and _pointwise_gemms(g, x, gy) else None
        if gw is not None and gw.flags.c_contiguous:
            # gw = sum_i gy[i] @ x[i].T: a run of images per thread into its own sum, or a block of rows each.
            (parts, chunks), p = _gemm_split(g.n, run.serial), g.h * g.w
            rows = -(-g.c_out // parts)
            sums = gw if chunks == 1 else _buffer(0, (chunks, g.c_out, g.c_in), x.dtype)  # reused: no page faults
            _gemms(parts, chunks, g.n, _cblas.NO_TRANS, _cblas.TRANS, g.c_out, g.c_in, p, gy, g.c_out * p, rows * p, p,
                   x, g.c_in * p, p, sums, g.c_out * g.c_in, rows * g.c_in, g.c_in, accumulate=True)
            if chunks > 1:
                np.sum(sums, axis=0, out=gw.reshape(g.c_out, g.c_in))
            return gw
        # One accumulator per worker, summed at the end: no two threads add into the same gradient.
        partial = np.zeros((plan.workers, g.groups, kg, ckk), dtype=x.dtype)
        gy3 = gy.reshape(g.n, g.c_out, g.out_h * g.out_w)
        x3 = x.reshape(g.n, g.c_in, g.h * g.w)

        def tile(worker, t):
            n0, tn, r0, nr = t
            p0, p1 = r0 * g.out_w, (r0 + nr) * g.out_w
            acc = partial[worker]
            if pointwise:
                for n in range(n0, n0 + tn):
                    acc[0] += gy3[n, :, p0:p1] @ x3[n, :, p0:p1].T
                return
            cols = _im2col_block(worker, x, g, t)
            for grp in range(g.groups):
                # (kg, images*P) against (ckk, images*P): one matmul over the whole tile.
                gyt = np.ascontiguousarray(gy3[n0 : n0 + tn, grp * kg : (grp + 1) * kg, p0:p1].transpose(1, 0, 2))
                _matmul_add(acc[grp], gyt.reshape(kg, -1), cols[grp * ckk : (grp + 1) * ckk].reshape(ckk, -1))

        _run(plan.tiles, tile, plan.workers)
    return partial.sum(axis=0).reshape(g.weight_shape)


def _weight_grad_wide(x, gy, g: ConvGeometry, plan: _Plan):
    """Stride-1 weight gradient on im2col_wide's grid: gy laid on the same grid, zero where it overhangs."""
    kg, ckk = g.c_out // g.groups, (g.c_in // g.groups) * g.kh * g.kw
    wg = _wide_width(g)
    span = _wide_span(g, max(nr for _, _, _, nr in plan.tiles))
    partial = np.zeros((plan.workers, g.groups, kg, ckk), dtype=x.dtype)

    def tile(worker, t):
        n0, tn, r0, nr = t
        length = nr * wg
        sizes = (g.c_in * g.kh * g.kw * tn * length, g.c_out * tn * length, g.c_in * span)
        flat = _buffer(worker, (sum(sizes),), x.dtype)
        cols = flat[: sizes[0]].reshape(g.c_in * g.kh * g.kw, tn, length)
        gyw = flat[sizes[0] : sizes[0] + sizes[1]].reshape(g.c_out, tn, nr, wg)
        xpad = flat[sizes[0] + sizes[1] :].reshape(g.c_in, span)
        _k.im2col_wide(x, xpad, cols, n0, 0, r0, g.kh, g.kw, *_conv_args(g), wg, g.out_w, True)
        gyw[:, :, :, : g.out_w] = gy[n0 : n0 + tn, :, r0 : r0 + nr].transpose(1, 0, 2, 3)
        gyw[:, :, :, g.out_w :] = 0.0
        acc = partial[worker]
        gym = gyw.reshape(g.c_out, tn * length)
        for grp in range(g.groups):
            _matmul_add(acc[grp], gym[grp * kg : (grp + 1) * kg], cols[grp * ckk : (grp + 1) * ckk].reshape(ckk, -1))

    _run(plan.tiles, tile, plan.workers)
    return partial.sum(axis=0).reshape(g.weight_shape)


# -- pooling and relu ---------------------------------------------------------------------------


def _pool_args(g: PoolGeometry):
    return g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w


def max_pool2d(x, g: PoolGeometry):
    """(y (N, C, OH, OW), int64 flat indices): the first maximum of each window (padding is -inf, NaN wins)."""
    y = placed_empty(g.output_shape, x.dtype)
    arg = placed_empty(g.output_shape, np.int64)
    with _Compute(y.size * g.kh * g.kw):
        _k.max_pool2d(x, y, arg, *_pool_args(g), _stop)
    return y, arg


def max_pool2d_backward(gy, x, g: PoolGeometry):
    """gx (N, C, H, W): each window's gradient added at its first maximum."""
    y = np.empty(g.output_shape, dtype=x.dtype)
    arg = np.empty(g.output_shape, dtype=np.int64)
    gx = placed_empty(g.input_shape, x.dtype)
    with _Compute(y.size * g.kh * g.kw):
        _k.max_pool2d(x, y, arg, *_pool_args(g), _stop)
        _k.max_pool2d_backward(gy, arg, gx, *_pool_args(g), _stop)
    return gx


def avg_pool2d(x, g: PoolGeometry):
    """y (N, C, OH, OW): window sums over torch's divisors (count_include_pad, divisor_override)."""
    y = placed_empty(g.output_shape, x.dtype)
    with _Compute(y.size * g.kh * g.kw):
        _k.avg_pool2d(x, y, g.divisors(np).astype(x.dtype), g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, _stop)
    return y


def avg_pool2d_backward(gy, g: PoolGeometry):
    """gx (N, C, H, W): each window's gradient spread over its in-image taps, divided like the forward."""
    gx = placed_empty(g.input_shape, gy.dtype)
    with _Compute(gy.size * g.kh * g.kw):
        div = g.divisors(np).astype(gy.dtype)
        _k.avg_pool2d_backward(gy, gx, div, g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, _stop)
    return gx


def relu(x):
    """max(x, 0) elementwise (NaN stays NaN)."""
    y = placed_empty(x.shape, x.dtype)
    with _Compute(10 * x.size):  # elementwise: serial below 150k elements
        _k.relu(x.reshape(-1), y.reshape(-1))
    return y


def relu_backward(gy, x):
    """0 where x <= 0, else gy (torch's rule: a NaN input passes gy through)."""
    gx = placed_empty(gy.shape, gy.dtype)
    with _Compute(10 * x.size):  # elementwise: serial below 150k elements
        _k.relu_backward(gy.reshape(-1), x.reshape(-1), gx.reshape(-1))
    return gx


# -- start-up -----------------------------------------------------------------------------------


#: The conv cases warm_up compiles, per dtype: (input shape, weight shape, options).
_WARM_UP_CONVS = (
    ((2, 2, 6, 7), (2, 1, 3, 3), dict(stride=2, padding=1, groups=2)),  # row kernels (few weights)
    ((2, 4, 6, 7), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2)),  # small im2col kernels
    ((2, 4, 6, 6), (16, 4, 5, 5), dict(padding=2)),  # im2col_wide, col2im_wide + BLAS (stride 1)
    ((1, 4, 7, 7), (16, 4, 3, 3), dict(stride=2, padding=1)),  # im2col, col2im + BLAS
    ((2, 3, 6, 6), (16, 3, 3, 3), dict(padding=1)),  # direct loops on the wide grid (few taps)
    ((1, 16, 3, 3), (16, 16, 1, 1), {}),  # pointwise
)


def warm_up(progress: Callable[[int, int], None] | None = None) -> None:
    """Compile (or load from the on-disk cache) every kernel for float32 and float64.

    The server calls this before reporting SERVING; afterwards no request pays for compilation.
    ``progress(done, total)`` is called after each group of kernels (a first compile takes minutes).
    """
    from . import params

    total, done = 2 * (len(_WARM_UP_CONVS) + len(winograd.TRANSFORMS) + 1), 0  # per dtype: convs, Winograd tiles, the rest

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        for x_shape, w_shape, kw in _WARM_UP_CONVS:
            x = rng.standard_normal(x_shape).astype(dtype)
            w = rng.standard_normal(w_shape).astype(dtype)
            b = rng.standard_normal(w_shape[0]).astype(dtype)
            g = params.conv2d_geometry(x.shape, w.shape, b.shape, **kw)
            y = conv2d(x, w, b, g)
            conv2d_input_grad(y, w, g)
            conv2d_weight_grad(x, y, g)
            conv2d(x, w, None, g)
            # The row kernels serve only convs too big for the small ones; compile them too.
            _k.conv2d_direct(x, w, b, True, y, g.groups, *_conv_args(g), _NEVER)
            _k.conv2d_weight_grad_direct(x, y, np.empty_like(w), g.groups, *_conv_args(g), _NEVER)
            advance()
        x = rng.standard_normal((1, 2, 5, 6)).astype(dtype)
        w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
        g = params.conv2d_geometry(x.shape, w.shape, None, padding=1)
        for m in winograd.TRANSFORMS:  # every Winograd tile: WINOGRAD_TILE chooses some, the others may be forced
            with _lane:
                _conv2d_winograd(x, w, w[:, 0, 0, 0].copy(), g, m, True, np.empty(g.output_shape, dtype))
                if m == 2:  # and the weight gradient's
                    _weight_grad_winograd(x, np.ones(g.output_shape, dtype), g, True)
            advance()
        with _lane:  # direct-wide, parallel and its serial twin (tiny calls); direct-winograd
            for serial in (False, True):
                _conv2d_wide_direct(x, w, w[:, 0, 0, 0].copy(), g, np.empty(g.output_shape, dtype), serial)
                _weight_grad_wide_direct(x, np.ones(g.output_shape, dtype), g, serial)
            xr, wr = rng.standard_normal((1, 2, 9, 31)).astype(dtype), rng.standard_normal((3, 2, 7, 7)).astype(dtype)
            gr = params.conv2d_geometry(xr.shape, wr.shape, None, stride=2, padding=3)
            _conv2d_winograd_row(xr, wr, wr[:, 0, 0, 0].copy(), gr, np.empty(gr.output_shape, dtype), False)
        pg = params.pool2d_geometry(x.shape, 2, 1, 1)
        y, _ = max_pool2d(x, pg)
        max_pool2d_backward(y, x, pg)
        avg_pool2d_backward(avg_pool2d(x, pg), pg)
        relu_backward(relu(x), x)
        advance()
