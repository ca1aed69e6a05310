"""Load benchmark: many concurrent clients on loopback against a `convrpc serve` subprocess.

Mixed Forward / Backward / TrainKernel traffic, bounded by a request count and a wall time. Prints
throughput, p50/p99 latency per RPC, answers by status code, and the server's RSS before and after,
and checks the targets of issue #6: no errors but deliberate RESOURCE_EXHAUSTED, RSS growth < 50 MB,
p99 of a small Forward under load <= 20x its unloaded p50. Exit code 1 when a target is missed.

    python bench/load.py                       # 64 clients, 10000 requests or 120 s, backend auto
    python bench/load.py --clients 16 --requests 2000 --backend numpy
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / d) for d in ("proto", "core", "server", "client")]

from convrpc.client import ConvClient, ConvRpcError  # noqa: E402

#: Share of each kind of call in the mix.
MIX = (("Forward", 0.6), ("Backward", 0.3), ("TrainKernel", 0.1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args) -> tuple[subprocess.Popen, str]:
    port, args.metrics_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path[:4]))
    cmd = [sys.executable, "-m", "convrpc.cli", "serve", "--port", str(port), "--backend", args.backend,
           "--log-level", "warning", "--metrics-port", str(args.metrics_port)]  # fmt: skip
    if args.slots:
        cmd += ["--max-concurrent-rpcs", str(args.slots)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    target = f"127.0.0.1:{port}"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 600
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited with {proc.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return proc, target
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                sys.exit("server did not become SERVING")
            time.sleep(0.1)


class Workload:
    """The three calls of the mix, on small fixed tensors."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
        self.w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
        self.gy = rng.standard_normal((1, 8, 14, 14)).astype(np.float32)
        self.image = rng.standard_normal((1, 1, 16, 16)).astype(np.float32)
        self.goal = rng.standard_normal((1, 1, 14, 14)).astype(np.float32)

    def call(self, client: ConvClient, rpc: str):
        if rpc == "Forward":
            return client.conv2d(self.x, self.w)
        if rpc == "Backward":
            return client.conv2d_backward(self.gy, self.x, self.w)
        return client.train_kernel(self.image, self.goal, kernel_size=3, max_steps=20, lr=0.01, seed=1).result()


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def client_process(target: str, threads: int, first: int, budget, ready, seconds: float, results) -> None:
    """One process of client threads (processes, so 64 clients are not 64 threads behind one GIL)."""
    work = Workload()
    latencies = collections.defaultdict(list)  # rpc -> seconds, OK answers only
    codes = collections.Counter()  # (rpc, code name)
    lock = threading.Lock()
    names, weights = zip(*MIX)

    def client_loop(index: int):
        rng = random.Random(index)
        backoff = 0.002
        with ConvClient(target, timeout=60) as client:
            while time.time() < deadline:
                with budget.get_lock():
                    if budget.value <= 0:
                        return
                    budget.value -= 1
                rpc = rng.choices(names, weights)[0]
                started = time.perf_counter()
                try:
                    work.call(client, rpc)
                    code = "OK"
                except ConvRpcError as error:
                    code = error.code.name
                elapsed = time.perf_counter() - started
                with lock:
                    codes[(rpc, code)] += 1
                    if code == "OK":
                        latencies[rpc].append(elapsed)
                if code == "RESOURCE_EXHAUSTED":  # back off as a well-behaved client does: exponential, jittered
                    time.sleep(rng.uniform(0.5, 1.0) * backoff)
                    backoff = min(backoff * 2, 0.1)
                else:
                    backoff = 0.002

    ready.wait()  # every process has imported and built its workload: start together
    began = time.time()
    deadline = began + seconds
    pool = [threading.Thread(target=client_loop, args=(first + i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    results.put((dict(latencies), codes, began, time.time()))


def run_load(target: str, args):
    ctx = multiprocessing.get_context("spawn")
    budget = ctx.Value("q", args.requests)
    results = ctx.Queue()
    procs = max(1, min(args.procs, args.clients))
    shares = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
    ready = ctx.Barrier(procs)
    workers = [
        ctx.Process(target=client_process, args=(target, n, sum(shares[:i]), budget, ready, args.seconds, results))
        for i, n in enumerate(shares)
    ]
    for w in workers:
        w.start()
    latencies, codes, spans = collections.defaultdict(list), collections.Counter(), []
    for _ in workers:
        part_latencies, part_codes, began, ended = results.get()
        for rpc, values in part_latencies.items():
            latencies[rpc].extend(values)
        codes.update(part_codes)
        spans.append((began, ended))
    for w in workers:
        w.join()
    return max(e for _, e in spans) - min(b for b, _ in spans), latencies, codes


def scrape(metrics_port: int):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return list(text_string_to_metric_families(text))


def server_latency(families, rpc: str) -> tuple[float, float]:
    """p50 and p99 (ms, bucket upper bounds) of the server's grpc_server_handling_seconds histogram for ``rpc`` (every code)."""
    buckets = sorted((float(s.labels["le"]), s.value) for f in families for s in f.samples
                     if s.name == "grpc_server_handling_seconds_bucket" and s.labels.get("grpc_method") == rpc)  # fmt: skip
    total = buckets[-1][1] if buckets else 0
    quantile = lambda q: next((le * 1e3 for le, n in buckets if n >= q * total), float("nan"))  # noqa: E731
    return quantile(0.5), quantile(0.99)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10_000, help="total calls, all clients together")
    parser.add_argument("--seconds", type=float, default=120.0, help="wall-time bound of the loaded phase")
    parser.add_argument("--backend", default="auto", choices=("auto", "numpy", "numba", "cupy"))
    parser.add_argument("--slots", type=int, default=0, help="the server's --max-concurrent-rpcs (0: its default)")
    parser.add_argument("--procs", type=int, default=8, help="client processes the clients are spread over")
    args = parser.parse_args(argv)

    proc, target = start_server(args)
    work = Workload()
    try:
        with ConvClient(target, timeout=60) as client:
            info = client.server_info()
            for rpc, _ in MIX:  # first calls pay one-off costs (channel, caches)
                work.call(client, rpc)
            unloaded = []
            for _ in range(300):
                t0 = time.perf_counter()
                work.call(client, "Forward")
                unloaded.append(time.perf_counter() - t0)
        rss_before = rss_mib(proc.pid)
        wall, latencies, codes = run_load(target, args)
        rss_after = rss_mib(proc.pid)
        families = scrape(args.metrics_port)
        on_server = {rpc: server_latency(families, rpc) for rpc, _ in MIX}
        slots = next(int(s.value) for f in families for s in f.samples if s.name == "convrpc_compute_slots")
    finally:
        proc.terminate()
        exit_code = proc.wait(timeout=60)

    total = sum(codes.values())
    ok = sum(n for (_, code), n in codes.items() if code == "OK")
    print(f"convrpc {info.version}, backend {info.backend} on {info.device}; {args.clients} clients in "
          f"{args.procs} processes, {slots} compute slots, loopback, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"unloaded small Forward (1x4x16x16 * 8x4x3x3, float32): p50 {percentile(unloaded, 50):.2f} ms, "
          f"p99 {percentile(unloaded, 99):.2f} ms")  # fmt: skip
    print(f"loaded: {total} calls in {wall:.1f} s = {total / wall:.0f} calls/s, {ok / wall:.0f} OK/s")
    print("latency of OK calls as the clients saw it, and as the server's histogram saw it (bucket bounds)")
    print(f"{'rpc':<12}{'OK':>7}{'p50 ms':>9}{'p99 ms':>9}{'server p50':>12}{'server p99':>12}   other answers")
    for rpc, _ in MIX:
        others = ", ".join(f"{code} {n}" for (r, code), n in sorted(codes.items()) if r == rpc and code != "OK") or "-"
        lat = latencies[rpc]
        print(f"{rpc:<12}{len(lat):>7}{percentile(lat, 50):>9.2f}{percentile(lat, 99):>9.2f}"
              f"{on_server[rpc][0]:>12.1f}{on_server[rpc][1]:>12.1f}   {others}")  # fmt: skip
    print(f"server RSS: {rss_before:.1f} MiB before, {rss_after:.1f} MiB after ({rss_after - rss_before:+.1f} MiB); "
          f"server exit code {exit_code}")  # fmt: skip

    errors = {k: n for k, n in codes.items() if k[1] not in ("OK", "RESOURCE_EXHAUSTED")}
    ratio = percentile(latencies["Forward"], 99) / percentile(unloaded, 50)
    checks = [
        ("no errors but deliberate RESOURCE_EXHAUSTED", not errors, f"{errors or 'none'}"),
        ("RSS growth < 50 MB", rss_after - rss_before < 50, f"{rss_after - rss_before:+.1f} MiB"),
        ("p99 small Forward under load <= 20x unloaded p50", ratio <= 20, f"{ratio:.1f}x"),
        ("server exits 0 on SIGTERM", exit_code == 0, str(exit_code)),
    ]
    for name, passed, detail in checks:
        print(f"[{'pass' if passed else 'FAIL'}] {name}: {detail}")
    return 0 if all(passed for _, passed, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
