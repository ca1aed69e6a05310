"""Benchmark the compute core's conv2d (forward, grad-input, grad-weight) against PyTorch on the CPU.

PyTorch runs in a child process with as many threads as ours: two OpenMP runtimes in one process
slow each other down, which would flatter either side. BLAS matmul peaks are measured in the same
run, so "of peak" compares with what this machine's BLAS reaches now. On a shared machine load
comes and goes, so both sides are timed in ``--rounds`` alternating rounds (ours, torch, ours,
torch, ...) and each figure is the best sample of all rounds. Prints a markdown table with the
algorithm each case ran (the numba backend's ``last_algorithm``); forward and backward rows
compare forward, and forward + grad-input + grad-weight: the 28 rows of issue #14.

    PYTHONPATH=proto:core:server:client python bench/core.py [--backend numba] [--shapes abcdefg]
        [--dtypes float32,float64] [--repeat 7] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

#: name -> (input shape, weight shape, conv2d options), as in issue #3.
SHAPES = {
    "a": ((1, 1, 80, 80), (1, 1, 3, 3), {}),
    "b": ((3, 3, 28, 28), (4, 3, 3, 3), {}),
    "c": ((32, 3, 32, 32), (16, 3, 3, 3), {"padding": 1}),
    "d": ((16, 64, 56, 56), (64, 64, 3, 3), {"padding": 1}),
    "e": ((8, 128, 28, 28), (128, 128, 3, 3), {"padding": 1}),
    "f": ((8, 256, 14, 14), (256, 256, 1, 1), {}),
    "g": ((1, 3, 224, 224), (64, 3, 7, 7), {"stride": 2, "padding": 3}),
}
DIRECTIONS = ("forward", "grad-input", "grad-weight")


def time_call(fn, repeat: int, min_sample_s: float = 0.02) -> list[float]:
    """Per-call seconds for ``repeat`` samples; each sample averages enough calls to last min_sample_s."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, min(1000, int(min_sample_s / max(once, 1e-7))))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return samples


def inputs(name: str, dtype: str):
    x_shape, w_shape, opts = SHAPES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    return x, w, opts


def torch_child(spec: dict) -> dict:
    """Time PyTorch's conv2d forward and both backward directions; runs in the child process."""
    import torch

    torch.set_num_threads(spec["threads"])
    out = {}
    for name in spec["shapes"]:
        for dtype in spec["dtypes"]:
            x, w, opts = inputs(name, dtype)
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            stride = opts.get("stride", 1)
            padding = opts.get("padding", 0)
            s, p = [stride, stride], [padding, padding]
            with torch.no_grad():
                y = torch.nn.functional.conv2d(xt, wt, None, s, p)
                gy = torch.randn(y.shape, dtype=y.dtype)
                conv_bw = torch.ops.aten.convolution_backward
                fns = {
                    "forward": lambda: torch.nn.functional.conv2d(xt, wt, None, s, p),
                    "grad-input": lambda: conv_bw(gy, xt, wt, None, s, p, [1, 1], False, [0, 0], 1, [True, False, False]),
                    "grad-weight": lambda: conv_bw(gy, xt, wt, None, s, p, [1, 1], False, [0, 0], 1, [False, True, False]),
                }
                for direction, fn in fns.items():
                    out[f"{name}/{dtype}/{direction}"] = time_call(fn, spec["repeat"])
    return out


#: The environment as this process found it, before our backend tuned it (e.g. OMP_WAIT_POLICY):
#: PyTorch gets its own defaults, not ours.
_ORIGINAL_ENV = dict(os.environ)


def run_torch(shapes, dtypes, repeat, threads) -> dict | None:
    spec = json.dumps({"shapes": shapes, "dtypes": dtypes, "repeat": repeat, "threads": threads})
    proc = subprocess.run(
        [sys.executable, __file__, "--torch-child"],
        input=spec, capture_output=True, text=True, check=False, env=_ORIGINAL_ENV,
    )
    if proc.returncode != 0:
        print(f"(PyTorch not timed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return None
    return json.loads(proc.stdout)


def gemm_peak(dtype: str, threads: int, size: int = 1536) -> float:
    """Best GFLOP/s of an n x n x n matmul in this process's BLAS on ``threads`` threads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # BLAS keeps whatever threads it started with
        from contextlib import nullcontext as threadpool_limits
    with threadpool_limits(threads, user_api="blas"):
        return _gemm_peak(dtype, size)


def _gemm_peak(dtype: str, size: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    c = np.empty_like(a)
    best = min(time_call(lambda: np.matmul(a, b, out=c), 5, 0.0))
    return 2 * size**3 / best / 1e9


def our_timings(backend_name, shapes, dtypes, repeat) -> tuple[dict, dict, dict, int]:
    from convrpc.core import get_backend, params

    backend = get_backend(backend_name)
    k = backend.kernels
    threads = getattr(k, "THREADS", os.cpu_count() or 1)
    if hasattr(k, "warm_up"):
        k.warm_up()
    out, flops, algorithms = {}, {}, {}
    taken = getattr(k, "last_algorithm", {})
    for name in shapes:
        for dtype in dtypes:
            x, w, opts = inputs(name, dtype)
            g = params.conv2d_geometry(x.shape, w.shape, None, **opts)
            x, w = k.to_device(x), k.to_device(w)
            gy = k.to_device(np.random.default_rng(1).standard_normal(g.output_shape).astype(dtype))
            sync = getattr(k, "synchronize", lambda: None)
            fns = {
                "forward": lambda: (k.conv2d(x, w, None, g), sync()),
                "grad-input": lambda: (k.conv2d_input_grad(gy, w, g), sync()),
                "grad-weight": lambda: (k.conv2d_weight_grad(x, gy, g), sync()),
            }
            for direction, fn in fns.items():
                out[f"{name}/{dtype}/{direction}"] = time_call(fn, repeat)
                flops[f"{name}/{dtype}/{direction}"] = g.flops
                algorithms[f"{name}/{dtype}/{direction}"] = taken.get(direction, "–")
    return out, flops, algorithms, threads


def _merge(into: dict | None, more: dict | None) -> dict | None:
    if into is None or more is None:
        return more if into is None else into
    return {key: into[key] + more.get(key, []) for key in into}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numba", choices=("numba", "numpy", "cupy"))
    ap.add_argument("--shapes", default="".join(SHAPES), help="letters of the shapes to run, e.g. 'de'")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--repeat", type=int, default=7, help="timed samples per case and round (the best is reported)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and torch's timings")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_child:
        json.dump(torch_child(json.load(sys.stdin)), sys.stdout)
        return 0
    shapes = [s for s in args.shapes if s in SHAPES]
    dtypes = args.dtypes.split(",")

    t_start = time.perf_counter()
    ours = theirs = None
    for _ in range(max(1, args.rounds)):
        mine, flops, algorithms, threads = our_timings(args.backend, shapes, dtypes, args.repeat)
        ours = _merge(ours, mine)
        if not args.no_torch:
            theirs = _merge(theirs, run_torch(shapes, dtypes, args.repeat, threads))
    peaks = {dt: max(gemm_peak(dt, threads), gemm_peak(dt, threads)) for dt in dtypes}

    print(f"backend {args.backend}, {threads} threads, best of {args.rounds} rounds x {args.repeat} samples; "
          "BLAS matmul peak: " + ", ".join(f"{dt} {p:.0f} GFLOP/s" for dt, p in peaks.items()))
    print()
    print("| shape | dtype | pass | algorithm | ours ms | torch ms | torch/ours | GFLOP/s | of peak |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    ratios = {}
    for name in shapes:
        for dtype in dtypes:
            key = f"{name}/{dtype}/"
            for label, directions in (("fwd", ("forward",)), ("fwd+bwd", DIRECTIONS)):
                mine = sum(min(ours[key + d]) for d in directions)
                work = sum(flops[key + d] for d in directions)
                algorithm = " / ".join(algorithms[key + d] for d in directions)
                gflops = work / mine / 1e9
                torch_ms, ratio = "–", "–"
                if theirs and all(key + d in theirs for d in directions):
                    t = sum(min(theirs[key + d]) for d in directions)
                    ratios[key + label] = t / mine
                    torch_ms, ratio = f"{t * 1e3:.3f}", f"{t / mine:.2f}"
                print(f"| {name} | {dtype} | {label} | {algorithm} | {mine * 1e3:.3f} | {torch_ms} | {ratio} "
                      f"| {gflops:.1f} | {gflops / peaks[dtype]:.0%} |")  # fmt: skip
    if ratios:
        geo = math.exp(statistics.fmean(math.log(r) for r in ratios.values()))
        f32 = [r for key, r in ratios.items() if "/float32/" in key]
        print(f"\ngeometric mean of torch/ours over {len(ratios)} rows: {geo:.2f} (target >= 1.3); "
              f"worst {min(ratios.values()):.2f} (target >= 0.9); worst float32 "
              f"{min(f32) if f32 else float('nan'):.2f} (target >= 1.0)")  # fmt: skip
    print(f"(total bench time {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
