"""Kernel-fitting throughput: steps/s of the core loop, of a run through the SDK, and of PyTorch's loop.

For each case, in one run of this script:

- core: ``fit_kernel`` called directly, in this process (what the server's loop costs);
- SDK: ``ConvClient.train_kernel(...).result()`` against a server in a child process, with
  streaming on (``report_every=1``, the server's 50 ms rate limit) and off (one report per run);
  "server" is the loop rate the server measured itself, "wall" includes the request and result
  transfer as the client sees it; a third, streaming-off run beside each pair gives "off / off",
  how far two identical runs differ on this machine (the noise of the on / off figure);
- torch: the same loop in PyTorch (same data, initial weight, optimizer, loss, stop test and
  thread count), timed in a child process: two OpenMP runtimes in one process slow each other down.

Every figure is the median of ``--repeat`` runs, interleaved so that load on the machine hits all
alike. Prints a markdown table.

The network case ``lenet`` (issue #17) times ``fit_network`` on the digits of scikit-learn (80% of
the 1797 8x8 images, a LeNet-like CNN, cross_entropy, Adam, mini-batches of 64) against the same
loop in torch (torch.nn.Sequential + torch.optim.Adam, same initial parameters, the same batches
from the same permutations, the same per-step loss read-back), and reports the held-out accuracy
the core's run reached.

    PYTHONPATH=proto:core:server:client python bench/train.py [--backend numba] [--steps 300]
        [--cases exp3,c,lenet] [--dtype float32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

#: The environment as this process found it, before convrpc's backend tuned it (OpenMP's wait settings):
#: the torch children get their own defaults. Inheriting ours (OMP_WAIT_POLICY=passive until December
#: 2026) made torch's loops 2-3x slower (lenet 160-190 steps/s against 430-650, exp 3 1600-1930 against 3000-4700).
_ORIGINAL_ENV = dict(os.environ)

#: Targets of issues #4 and #17: steps/s over torch's.
TARGETS = {"exp3": 3.0, "c": 1.0, "lenet": 1.0}


@dataclass(frozen=True)
class Case:
    title: str
    input_shape: tuple
    out_channels: int
    padding: int
    lr: float = 0.5
    loss: str = "half_mse"


CASES = {
    "exp3": Case("exp 3: (1,1,80,80) -> 1, 3x3", (1, 1, 80, 80), 1, 0),
    "c": Case("shape c: (32,3,32,32) -> 16, 3x3, pad 1", (32, 3, 32, 32), 16, 1),
}


def case_data(name: str, dtype: str):
    """(input, target, initial weight) of a case: the edge-kernel image for exp3, random data for c."""
    from convrpc.core import get_backend
    from convrpc.core.samples import EDGE_KERNEL, structured_image
    from convrpc.core.training import kaiming_uniform

    case = CASES[name]
    rng = np.random.default_rng(0)
    numpy_backend = get_backend("numpy")
    c_in = case.input_shape[1]
    if name == "exp3":
        x = structured_image(80)[None, None]
        true_weight = EDGE_KERNEL[None, None]
    else:
        x = rng.standard_normal(case.input_shape)
        true_weight = rng.standard_normal((case.out_channels, c_in, 3, 3)) * 0.2
    y = numpy_backend.conv2d(x, true_weight, padding=case.padding)
    w0 = kaiming_uniform((case.out_channels, c_in, 3, 3), c_in * 9, rng)
    return x.astype(dtype), y.astype(dtype), w0.astype(dtype)


# -- the network case ----------------------------------------------------------------------------

#: The digits network, a LeNet for 8x8 images (two conv + pool stages, two fully connected layers), as
#: (layer name, arguments) that the core's specs and torch.nn both take.
LENET = (
    ("Conv2d", (1, 8, 3), {"padding": 1}), ("ReLU", (), {}), ("MaxPool2d", (2,), {}),
    ("Conv2d", (8, 16, 3), {"padding": 1}), ("ReLU", (), {}), ("MaxPool2d", (2,), {}),
    ("Flatten", (), {}), ("Linear", (64, 64), {}), ("ReLU", (), {}), ("Linear", (64, 10), {}),
)  # fmt: skip
NET_BATCH, NET_LR, NET_SEED = 64, 0.01, 0


def lenet(module=None):
    """The digits network built from ``module``'s layer classes (default: the core's specs, in a Sequential)."""
    if module is not None:
        return module.Sequential(*(getattr(module, name)(*args, **kw) for name, args, kw in LENET))
    from convrpc.core import network

    return lenet(network)


def digits(dtype: str):
    """(train images (N, 1, 8, 8) in [0, 1], train labels, test images, test labels): a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, t = (d.images / 16.0).astype(dtype)[:, None], d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], t[perm[:cut]], x[perm[cut:]], t[perm[cut:]]


def network_core_rate(backend, x, t, params, steps: int):
    """(steps/s, result) of one fit_network run."""
    from convrpc.core.network import NetworkTrainConfig, fit_network
    from convrpc.core.optim import AdamOptions

    config = NetworkTrainConfig(loss="cross_entropy", optimizer=AdamOptions(lr=NET_LR), max_steps=steps,
                                batch_size=NET_BATCH, seed=NET_SEED, report_every=steps)  # fmt: skip
    started = time.perf_counter()
    *_, result = fit_network(backend, lenet(), x, t, params, config)
    return result.steps / (time.perf_counter() - started), result


def torch_network_child(spec: dict) -> dict:
    """fit_network's loop in torch: batch, loss (read back, the core's stop test), backward, Adam step."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    data = np.load(spec["data"])
    x, t = torch.from_numpy(data["x"]), torch.from_numpy(data["t"])
    model = lenet(torch.nn).to(x.dtype)
    initial = [torch.from_numpy(data[f"p{i}"]) for i in range(len(list(model.parameters())))]
    # The core's sampler: each epoch a permutation from the second stream spawned from the seed.
    order_rng = np.random.default_rng(np.random.SeedSequence(NET_SEED).spawn(2)[1])
    batches = []
    while len(batches) < spec["steps"]:
        perm = order_rng.permutation(len(x))
        batches += [torch.from_numpy(perm[i : i + NET_BATCH]) for i in range(0, len(x), NET_BATCH)]
    rates = []
    for _ in range(spec["repeat"] + 1):  # the first run warms up
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), initial):
                p.copy_(p0)
        opt = torch.optim.Adam(model.parameters(), lr=NET_LR)
        started = time.perf_counter()
        steps = 0
        for idx in batches[: spec["steps"]]:
            loss = F.cross_entropy(model(x[idx]), t[idx])
            if not loss.item() > 0.0:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        with torch.no_grad():  # the core's run ends measuring the full-data loss
            F.cross_entropy(model(x), t).item()
        rates.append(steps / (time.perf_counter() - started))
    return {"steps_per_s": statistics.median(rates[1:]), "threads": torch.get_num_threads(), "version": torch.__version__}


def network_rows(backend, args, threads: int, tmp: str) -> list:
    """The lenet row: core and torch steps/s (medians of interleaved runs) and the core run's test accuracy."""
    from convrpc.core.network import forward

    x, t, x_test, t_test = digits(args.dtype)
    params = lenet().init(seed=NET_SEED, dtype=args.dtype)
    data_path = os.path.join(tmp, "lenet.npz")
    flat = [a for entry in params for a in entry.values()]
    np.savez(data_path, x=x, t=t, **{f"p{i}": a for i, a in enumerate(flat)})
    spec = dict(data=data_path, steps=args.steps, repeat=args.repeat, threads=threads)
    proc = subprocess.run([sys.executable, __file__, "--torch-network-child", json.dumps(spec)], capture_output=True,
                          text=True, env=_ORIGINAL_ENV)  # fmt: skip
    if proc.returncode != 0 and "No module named 'torch'" not in proc.stderr:
        raise RuntimeError(f"torch child failed:\n{proc.stderr}")
    torch = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    network_core_rate(backend, x, t, params, 20)  # warm-up (numba compiles on first use)
    rates = []
    for _ in range(args.repeat):
        rate, result = network_core_rate(backend, x, t, params, args.steps)
        rates.append(rate)
    accuracy = float(np.mean(forward(backend, lenet(), x_test, result.params).argmax(axis=1) == t_test))
    return [(statistics.median(rates), torch, accuracy, result)]


# -- PyTorch, in a child process -------------------------------------------------------------------


def torch_child(spec: dict) -> dict:
    """The PyTorch twin of the core loop: loss of the current weight, stop if <= tol, backward, step."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    data = np.load(spec["data"])
    x, y, w0 = (torch.from_numpy(data[k]) for k in ("x", "y", "w0"))
    case = CASES[spec["case"]]
    scale = 0.5 if case.loss == "half_mse" else 1.0
    rates = []
    for _ in range(spec["repeat"] + 1):  # the first run warms up
        w = w0.clone().requires_grad_()
        opt = torch.optim.SGD([w], lr=case.lr)
        started = time.perf_counter()
        steps = 0
        for _ in range(spec["steps"]):
            loss = scale * F.mse_loss(F.conv2d(x, w, None, 1, case.padding), y)
            if not loss.item() > 0.0:  # the core's stop test: converged at loss <= tol = 0, or non-finite
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        rates.append(steps / (time.perf_counter() - started))
    return {
        "steps_per_s": statistics.median(rates[1:]),
        "threads": torch.get_num_threads(),
        "version": torch.__version__,
    }


def run_torch(case: str, data_path: str, args, threads: int) -> dict | None:
    spec = dict(case=case, data=data_path, steps=args.steps, repeat=args.repeat, threads=threads)
    proc = subprocess.run([sys.executable, __file__, "--torch-child", json.dumps(spec)], capture_output=True, text=True,
                          env=_ORIGINAL_ENV)  # fmt: skip
    if proc.returncode != 0:
        if "No module named 'torch'" in proc.stderr:
            return None
        raise RuntimeError(f"torch child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the server, in a child process ----------------------------------------------------------------


def serve_child(backend: str) -> None:
    """Start a server on 127.0.0.1:<free port>, print the port once ready, serve until stdin closes."""
    from convrpc.server import ConvServer, Settings

    server = ConvServer(Settings(host="127.0.0.1", port=0, backend=backend)).start()
    server.wait_ready()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop(0)


class ServerProcess:
    def __init__(self, backend: str):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-child", backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the server child exited before it was ready")
        self.target = f"127.0.0.1:{int(line)}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# -- this process ------------------------------------------------------------------------------------


def core_rate(backend, x, y, w0, case: Case, steps: int) -> float:
    from convrpc.core.optim import SgdOptions
    from convrpc.core.training import TrainConfig, fit_kernel

    config = TrainConfig(init_weight=w0, padding=case.padding, optimizer=SgdOptions(lr=case.lr), loss=case.loss,
                         max_steps=steps, report_every=steps)  # fmt: skip
    started = time.perf_counter()
    *_, result = fit_kernel(backend, x, y, config)
    return result.steps / (time.perf_counter() - started)


def sdk_rates(client, x, y, w0, case: Case, steps: int, report_every: int) -> tuple[float, float]:
    """(steps/s the client saw, steps/s of the server's loop) of one run through the SDK."""
    started = time.perf_counter()
    run = client.train_kernel(x, y, init_weight=w0, padding=case.padding, lr=case.lr, loss=case.loss, max_steps=steps,
                              report_every=report_every)  # fmt: skip
    result = run.result()
    wall = time.perf_counter() - started
    return result.steps / wall, result.steps / result.elapsed


def default_backend() -> str:
    from convrpc.core import available_backends

    return "numba" if "numba" in available_backends() else "numpy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="compute backend (default: numba if importable, else numpy)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per timed run (default 300)")
    parser.add_argument("--cases", default="exp3,c,lenet", help=f"comma-separated, from {','.join(TARGETS)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure; medians are shown")
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", help=argparse.SUPPRESS)
    parser.add_argument("--torch-network-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        print(json.dumps(torch_child(json.loads(args.torch_child))))
        return 0
    if args.torch_network_child:
        print(json.dumps(torch_network_child(json.loads(args.torch_network_child))))
        return 0
    if args.serve_child:
        serve_child(args.serve_child)
        return 0

    from convrpc.core import get_backend

    backend = get_backend(args.backend or default_backend())
    threads = getattr(backend.kernels, "compute_threads", lambda: 1)()
    warm_up = getattr(backend.kernels, "warm_up", None)
    if warm_up is not None:
        warm_up()
    cases = args.cases.split(",")
    unknown = [name for name in cases if name not in TARGETS]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; expected some of {', '.join(TARGETS)}")
    kernel_cases = [name for name in cases if name in CASES]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        net_rows = network_rows(backend, args, threads, tmp) if "lenet" in cases else []
        if kernel_cases:
            rows = kernel_rows(backend, kernel_cases, args, threads, tmp)
    print(f"\nbackend {backend.name} on {backend.device}, {threads} compute thread(s), {args.dtype}, "
          f"{args.steps} steps per run, median of {args.repeat}; torch with the same thread count\n")  # fmt: skip
    if rows:
        print_kernel_rows(rows)
    for core, torch, accuracy, result in net_rows:
        t = torch["steps_per_s"] if torch else float("nan")
        print("| network case | core | torch | core / torch | target | held-out accuracy after the run |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| lenet: digits (1437, 1, 8, 8), batch {NET_BATCH}, Adam | {core:.0f} | {t:.0f} | {core / t:.2f}x "
              f"| >= {TARGETS['lenet']:.0f}x | {accuracy:.1%} ({result.steps} steps) |")  # fmt: skip
    torch = (rows and rows[0][3]) or (net_rows and net_rows[0][1])
    if torch:
        print(f"torch {torch['version']} with {torch['threads']} thread(s)")
    return 0


def kernel_rows(backend, cases, args, threads: int, tmp: str) -> list:
    """Per kernel-fitting case, the medians of core, SDK (streaming on and off) and torch steps/s."""
    from convrpc.client import ConvClient

    server = ServerProcess(backend.name)
    rows = []
    try:
        with ConvClient(server.target, timeout=600) as client:
            for name in cases:
                case = CASES[name]
                x, y, w0 = case_data(name, args.dtype)
                data_path = os.path.join(tmp, f"{name}.npz")
                np.savez(data_path, x=x, y=y, w0=w0)
                torch = run_torch(name, data_path, args, threads)
                # Warm-up runs, then interleaved timed ones.
                core_rate(backend, x, y, w0, case, 20)
                sdk_rates(client, x, y, w0, case, 20, 1)
                core, on_wall, on_server, off_wall, off_server, control = ([] for _ in range(6))
                for i in range(args.repeat):
                    core.append(core_rate(backend, x, y, w0, case, args.steps))
                    for streaming in (True, False) if i % 2 == 0 else (False, True):
                        wall, loop = sdk_rates(client, x, y, w0, case, args.steps, 1 if streaming else 10**9)
                        (on_wall if streaming else off_wall).append(wall)
                        (on_server if streaming else off_server).append(loop)
                    # A second streaming-off run: off / off shows how far two identical runs differ here.
                    control.append(sdk_rates(client, x, y, w0, case, args.steps, 10**9)[1] / off_server[-1])
                med = {k: statistics.median(v) for k, v in dict(core=core, on_wall=on_wall, on_server=on_server,
                                                                off_wall=off_wall, off_server=off_server).items()}  # fmt: skip
                # On/off from back-to-back pairs: load that drifts over the run cancels out.
                med["wall_ratio"] = statistics.median(a / b for a, b in zip(on_wall, off_wall))
                med["loop_ratio"] = statistics.median(a / b for a, b in zip(on_server, off_server))
                med["control"] = statistics.median(control)
                rows.append((name, case, med, torch))
    finally:
        server.close()
    return rows


def print_kernel_rows(rows) -> None:
    print("| case | core | SDK, streaming on (wall / server loop) | SDK, streaming off (wall / server loop) "
          "| torch | core / torch | SDK / torch | streaming on / off | off / off | target |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, case, m, torch in rows:
        t = torch["steps_per_s"] if torch else float("nan")
        print(
            f"| {case.title} | {m['core']:.0f} | {m['on_wall']:.0f} / {m['on_server']:.0f} "
            f"| {m['off_wall']:.0f} / {m['off_server']:.0f} | {t:.0f} | {m['core'] / t:.2f}x | {m['on_wall'] / t:.2f}x "
            f"| {m['wall_ratio']:.1%} / {m['loop_ratio']:.1%} | {m['control']:.1%} | >= {TARGETS[name]:.0f}x |"
        )
    print("\nsteps/s; 'SDK' wall rates include sending the request and receiving the result;"
          " 'streaming on / off' is the median ratio of back-to-back runs, wall / server loop;"
          " 'off / off' the same for two streaming-off runs (server loop): the noise of the on / off figure.\n")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
