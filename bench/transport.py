"""How fast convrpc moves tensors: each data path against memcpy and a raw TCP socket, in one run.

    PYTHONPATH=proto:core:server:client python bench/transport.py [--sizes 1,16,64,256] [--paths unary,stream,shm]

For each payload size it times the round trip of ``relu`` (an op that costs next to nothing)
through the SDK to a server in another process, over each data path, and prints the payload
throughput (bytes of the input / round-trip time) beside the same run's in-process memcpy of those
bytes and a plain TCP socket echo of them between two processes over loopback (the network
path's physical limit here). Then Forward of shape d, conv2d (16,64,56,56) x (64,64,3,3) pad 1,
end to end through each path against the server backend's own compute time and torch's in-process
conv2d (in a child process; skipped without torch). Medians of ``--reps`` timed calls after a
warm-up call. ``--grpc-defaults`` runs both ends without convrpc's HTTP/2/TCP tuning, for comparison.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

MiB = 1 << 20
LIMIT = 1 << 30  # message cap for this run, so that unary can carry 256 MiB at all


def median_time(fn, reps: int) -> float:
    fn()  # warm-up: sessions, region pools, connection windows, first-touch pages
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reps_for(nbytes: int, scale: float) -> int:
    return max(3, int(scale * min(20, 256 * MiB // nbytes)))


# -- baselines ------------------------------------------------------------------------------------


def memcpy_seconds(nbytes: int, reps: int) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    return median_time(lambda: np.copyto(dst, src), reps)


def _echo_server(port_queue, max_bytes: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = memoryview(bytearray(max_bytes))
    header = bytearray(8)
    while conn.recv_into(header, 8, socket.MSG_WAITALL) == 8:
        n, got = int.from_bytes(header, "little"), 0
        while got < n:
            got += conn.recv_into(buffer[got:n], n - got)
        conn.sendall(buffer[:n])


def socket_echo_seconds(sizes: list[int], reps_scale: float) -> dict[int, float]:
    """Round trip of each size through a TCP echo server in another process (receive all, send back)."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_echo_server, args=(ports, max(sizes)), daemon=True)
    server.start()
    sock = socket.create_connection(("127.0.0.1", ports.get(timeout=60)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    try:
        for n in sizes:
            payload = np.ones(n, np.uint8)
            back = memoryview(bytearray(n))

            def echo():
                sock.sendall(n.to_bytes(8, "little"))
                sock.sendall(payload)
                got = 0
                while got < n:
                    got += sock.recv_into(back[got:], n - got)

            out[n] = median_time(echo, reps_for(n, reps_scale))
    finally:
        sock.close()
        server.join(5)
        server.kill()
    return out


# -- the server -----------------------------------------------------------------------------------


def _serve(ready, stop, backend: str, grpc_defaults: bool, chunk_bytes: int | None) -> None:
    from convrpc.core import config

    if grpc_defaults:
        config.TRANSPORT_OPTIONS = ()
    from convrpc.server import ConvServer, Settings

    settings = Settings(host="127.0.0.1", port=0, backend=backend, max_message_bytes=LIMIT, max_elements=LIMIT // 4)
    settings = settings.replace(chunk_bytes=chunk_bytes)
    server = ConvServer(settings).start()
    server.wait_ready(600)
    ready.put(server.target)
    try:
        stop.get()  # until the parent says stop
    finally:
        server.stop(0)


def start_server(backend: str, grpc_defaults: bool, chunk_bytes: int | None = None):
    """A ConvServer in a child process: ``(process, target, stop queue)``."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=_serve, args=(ready, stop, backend, grpc_defaults, chunk_bytes), daemon=True)
    process.start()
    return process, ready.get(timeout=900), stop


def client(target: str, path: str, grpc_defaults: bool, chunk_bytes: int | None):
    from convrpc.client import ConvClient
    from convrpc.core import config

    if grpc_defaults:
        config.TRANSPORT_OPTIONS = ()
    limits = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]
    return ConvClient(target, timeout=300, data_path=path, options=limits, chunk_bytes=chunk_bytes)


# -- torch ----------------------------------------------------------------------------------------

_TORCH = """
import statistics, time, torch
import torch.nn.functional as F
x = torch.randn(16, 64, 56, 56); w = torch.randn(64, 64, 3, 3)
F.conv2d(x, w, padding=1)
times = []
for _ in range({reps}):
    t = time.perf_counter(); F.conv2d(x, w, padding=1); times.append(time.perf_counter() - t)
print(statistics.median(times), torch.get_num_threads())
"""


def torch_conv_seconds(reps: int) -> tuple[float, int] | None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TORCH.format(reps=reps)], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    seconds, threads = done.stdout.split()
    return float(seconds), int(threads)


# -- main -----------------------------------------------------------------------------------------


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,16,64,256", help="payload sizes in MiB (default 1,16,64,256)")
    parser.add_argument("--paths", default="unary,stream,shm", help="data paths to time (default unary,stream,shm)")
    parser.add_argument("--backend", default=None, help="server backend (default numba if installed, else numpy)")
    parser.add_argument("--reps", type=float, default=1.0, help="scale the number of timed calls")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="stream chunk size of both ends (default config)")
    parser.add_argument("--grpc-defaults", action="store_true", help="no HTTP/2/TCP tuning on either end")
    parser.add_argument("--no-conv", action="store_true", help="skip the conv2d shape-d comparison")
    args = parser.parse_args(argv)

    from convrpc.core import available_backends

    backend = args.backend or ("numba" if "numba" in available_backends() else "numpy")
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    started = time.perf_counter()
    print(f"convrpc data paths, {os.cpu_count()} CPUs, backend {backend}, "
          f"{'gRPC default' if args.grpc_defaults else 'tuned'} HTTP/2 options")  # fmt: skip

    memcpy = {n: memcpy_seconds(n, reps_for(n, args.reps)) for n in sizes}
    echo = socket_echo_seconds(sizes, args.reps)
    process, target, stop = start_server(backend, args.grpc_defaults, args.chunk_bytes)
    try:
        rows = []
        for n in sizes:
            x = np.random.default_rng(0).standard_normal(n // 4).astype(np.float32).reshape(1, 1, -1, 256)
            row = {"memcpy": memcpy[n], "echo": echo[n]}
            for path in paths:
                with client(target, path, args.grpc_defaults, args.chunk_bytes) as c:
                    expected = np.maximum(x, 0)
                    if not np.array_equal(c.relu(x), expected):
                        raise SystemExit(f"relu through {path} returned wrong values")
                    row[path] = median_time(lambda: c.relu(x), reps_for(n, args.reps))
            rows.append((n, row))
        print()
        print(
            "relu round trip, payload GB/s (input bytes / round-trip time); % of memcpy for shm, of socket echo otherwise"
        )
        header = f"{'MiB':>5} {'memcpy':>8} {'socket':>8}" + "".join(f" {p:>15}" for p in paths)
        print(header)
        for n, row in rows:
            cells = f"{n / MiB:>5.0f} {gbps(n, row['memcpy']):>8.2f} {gbps(n, row['echo']):>8.2f}"
            for p in paths:
                base = row["memcpy"] if p == "shm" else row["echo"]
                cells += f" {gbps(n, row[p]):>7.2f} ({base / row[p]:>4.0%})"
            print(cells)

        if not args.no_conv:
            conv_d(target, backend, paths, args)
    finally:
        stop.put(None)
        process.join(30)
        if process.is_alive():
            process.kill()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


def conv_d(target: str, backend_name: str, paths: list[str], args) -> None:
    from convrpc.core import get_backend

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64, 56, 56)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    reps = max(3, int(10 * args.reps))
    backend = get_backend(backend_name)
    compute = median_time(lambda: backend.conv2d(x, w, padding=1), reps)
    torch = torch_conv_seconds(reps)
    print()
    print("Forward of shape d: conv2d (16,64,56,56) x (64,64,3,3) pad 1 (12.8 MB in, 12.8 MB out)")
    print(f"  {backend_name} in-process compute: {compute * 1e3:8.1f} ms")
    if torch is None:
        print("  torch in-process:            skipped (torch not installed)")
    else:
        print(f"  torch in-process:            {torch[0] * 1e3:8.1f} ms ({torch[1]} threads)")
    for path in ["auto", *paths]:
        with client(target, path, args.grpc_defaults, args.chunk_bytes) as c:
            seconds = median_time(lambda: c.conv2d(x, w, padding=1), reps)
        vs_torch = f", {seconds / torch[0]:.2f}x torch" if torch else ""
        print(
            f"  SDK end to end via {path:<7} {seconds * 1e3:8.1f} ms = {seconds / compute:.2f}x {backend_name} compute{vs_torch}"
        )


if __name__ == "__main__":
    sys.exit(main())
