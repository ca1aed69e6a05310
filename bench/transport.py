"""How fast convrpc moves tensors: each data path against memcpy and a raw TCP socket, in one run.

    PYTHONPATH=proto:core:server:client python bench/transport.py [--sizes 1,16,64,256] [--paths unary,stream,shm]

(``--paths`` also takes ``chunks``: the stream path with the side channel off, its bytes as gRPC chunks.)

For each payload size it times the round trip of ``relu`` (an op that costs next to nothing)
through the SDK to a server in another process, over each data path, and prints the payload
throughput (bytes of the input / round-trip time) beside, in the same run, an in-process memcpy of
those bytes, the backend's in-process relu of them (the compute every path pays), and a plain TCP
socket echo of them between two processes over loopback (receive all, send all back: the network
paths' physical limit here). With ``shm`` it also times ``shm+alloc``: the input allocated in the
client's shared memory (``client.asarray``), so that it travels with no copy. Then Forward of shape
d, conv2d (16,64,56,56) x (64,64,3,3) pad 1, end to end through each path (and ``auto+alloc``)
against the backend's in-process compute time and torch's in-process conv2d (in a child process;
skipped without torch).

Timings are medians over rounds that visit every contender in turn, after a warm-up call each,
so that load from other processes shifts them all alike. ``--grpc-defaults`` runs both ends
without convrpc's HTTP/2/TCP tuning; ``--chunk-bytes`` sets the stream chunk size of both ends.
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


def rounds_for(nbytes: int, scale: float) -> int:
    return max(3, int(scale * min(15, 256 * MiB // nbytes)))


def interleaved(contenders: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each callable, timed once per round in turn after one warm-up call each."""
    for fn in contenders.values():
        fn()  # sessions, region pools, connection windows, first-touch pages
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# -- the socket echo ------------------------------------------------------------------------------


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


class SocketEcho:
    """A TCP echo server in another process and a connection to it; ``echo(payload, into)``."""

    def __init__(self, max_bytes: int):
        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        self.process = ctx.Process(target=_echo_server, args=(ports, max_bytes), daemon=True)
        self.process.start()
        self.sock = socket.create_connection(("127.0.0.1", ports.get(timeout=60)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def echo(self, payload: np.ndarray, into: memoryview) -> None:
        n = payload.nbytes
        self.sock.sendall(n.to_bytes(8, "little"))
        self.sock.sendall(payload)
        got = 0
        while got < n:
            got += self.sock.recv_into(into[got:], n - got)

    def close(self) -> None:
        self.sock.close()
        self.process.join(5)
        self.process.kill()


# -- the server -----------------------------------------------------------------------------------


def _serve(ready, stop, backend: str, grpc_defaults: bool, chunk_bytes: int | None) -> None:
    from convrpc.server import ConvServer, Settings
    from convrpc import chunks

    if grpc_defaults:
        chunks.TRANSPORT_OPTIONS = ()

    settings = Settings(host="127.0.0.1", port=0, backend=backend, max_message_bytes=LIMIT, max_elements=LIMIT // 4)
    server = ConvServer(settings.replace(chunk_bytes=chunk_bytes)).start()
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


def _path(name: str) -> tuple[str, bool]:
    """``(data_path, side_channel)`` of a --paths entry: "chunks" is the stream path without the side channel."""
    return ("stream", False) if name == "chunks" else (name, True)


def make_client(target: str, path: str, side_channel: bool, args):
    from convrpc.client import ConvClient
    from convrpc import chunks

    grpc_defaults, chunk_bytes = args.grpc_defaults, args.chunk_bytes
    if grpc_defaults:
        chunks.TRANSPORT_OPTIONS = ()
    limits = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]
    return ConvClient(
        target, timeout=600, data_path=path, options=limits, chunk_bytes=chunk_bytes, side_channel=side_channel
    )


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
    """Median seconds of torch's conv2d of shape d in a child process, and its thread count; None without torch."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TORCH.format(reps=reps)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    seconds, threads = done.stdout.split()
    return float(seconds), int(threads)


# -- the runs -------------------------------------------------------------------------------------


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def relu_round_trips(target, backend, sizes, paths, args) -> None:
    echo = SocketEcho(max(sizes))
    clients = {p: make_client(target, *_path(p), args) for p in paths}
    timed = [*paths, "shm+alloc"] if "shm" in paths else paths
    print("\nrelu round trip: payload GB/s = input bytes / round-trip time, and each path as a share of its baseline:")
    print("shared memory of memcpy, the network paths of the socket echo; 'net' first takes off the relu compute time;")
    print("shared memory also as a multiple of the in-process relu ('shm+alloc': the input from client.asarray)")
    print(f"{'MiB':>5} {'memcpy':>7} {'relu':>7} {'socket':>7}" + "".join(f" {p:>21}" for p in timed))
    try:
        for n in sizes:
            x = np.random.default_rng(0).standard_normal(n // 4).astype(np.float32).reshape(1, 1, -1, 256)
            for p, c in clients.items():
                if not np.array_equal(c.relu(x), np.maximum(x, 0)):
                    raise SystemExit(f"relu through {p} returned wrong values")
            dst, raw, back = np.empty_like(x), x.view(np.uint8), memoryview(bytearray(n))
            contenders = {
                "memcpy": lambda dst=dst, x=x: np.copyto(dst, x),
                "relu": lambda x=x: backend.relu(x),
                "socket": lambda raw=raw, back=back: echo.echo(raw, back),
                **{p: (lambda c=c, x=x: c.relu(x)) for p, c in clients.items()},
            }
            if "shm" in clients:
                shared = clients["shm"].asarray(x)
                contenders["shm+alloc"] = lambda c=clients["shm"], x=shared: c.relu(x)
            t = interleaved(contenders, rounds_for(n, args.reps))
            cells = (
                f"{n / MiB:>5.0f} {gbps(n, t['memcpy']):>7.2f} {gbps(n, t['relu']):>7.2f} {gbps(n, t['socket']):>7.2f}"
            )
            for p in timed:
                base = t["memcpy"] if p.startswith("shm") else t["socket"]
                net = f"{base / (t[p] - t['relu']):>4.0%}" if t[p] > t["relu"] else " n/a"  # (noise: under the relu)
                cells += f" {gbps(n, t[p]):>5.2f} {base / t[p]:>5.0%} net {net}"
                if p.startswith("shm"):
                    cells += f" = {t[p] / t['relu']:.2f}x relu"
            print(cells, flush=True)
    finally:
        for c in clients.values():
            c.close()
        echo.close()


def conv_d(target: str, backend, paths: list[str], args) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64, 56, 56)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    rounds = max(3, int(8 * args.reps))
    clients = {p: make_client(target, *_path(p), args) for p in ["auto", *paths]}
    try:
        contenders = {"compute": lambda: backend.conv2d(x, w, padding=1)}
        contenders.update({p: (lambda c=c: c.conv2d(x, w, padding=1)) for p, c in clients.items()})
        shared_x = clients["auto"].asarray(x)
        contenders["auto+alloc"] = lambda c=clients["auto"]: c.conv2d(shared_x, w, padding=1)
        t = interleaved(contenders, rounds)
    finally:
        for c in clients.values():
            c.close()
    torch = torch_conv_seconds(rounds)
    print("\nForward of shape d: conv2d (16,64,56,56) x (64,64,3,3) pad 1 (12.8 MB in, 12.8 MB out)")
    print(f"  {backend.name} in-process compute  {t['compute'] * 1e3:8.1f} ms")
    if torch is None:
        print("  torch in-process             skipped (torch not installed)")
    else:
        print(f"  torch in-process             {torch[0] * 1e3:8.1f} ms ({torch[1]} threads)")
    for p in [*clients, "auto+alloc"]:
        vs_torch = f", {t[p] / torch[0]:.2f}x torch" if torch else ""
        print(f"  SDK end to end via {p:<9} {t[p] * 1e3:8.1f} ms = {t[p] / t['compute']:.2f}x {backend.name}{vs_torch}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,16,64,256", help="payload sizes in MiB (default 1,16,64,256)")
    parser.add_argument("--paths", default="unary,stream,shm",
                        help="data paths to time (default unary,stream,shm; chunks: stream without the side channel)")
    parser.add_argument("--backend", default=None, help="server backend (default numba if installed, else numpy)")
    parser.add_argument("--reps", type=float, default=1.0, help="scale the number of timed rounds")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="stream chunk size of both ends (default config)")
    parser.add_argument("--grpc-defaults", action="store_true", help="no HTTP/2/TCP tuning on either end")
    parser.add_argument("--no-relu", action="store_true", help="skip the relu round trips")
    parser.add_argument("--no-conv", action="store_true", help="skip the conv2d shape-d comparison")
    args = parser.parse_args(argv)

    from convrpc.core import available_backends, get_backend

    name = args.backend or ("numba" if "numba" in available_backends() else "numpy")
    backend = get_backend(name)
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    started = time.perf_counter()
    tuning = "gRPC's default" if args.grpc_defaults else "convrpc's"
    print(f"convrpc data paths: {os.cpu_count()} CPUs, backend {name}, {tuning} HTTP/2 and TCP options")
    process, target, stop = start_server(name, args.grpc_defaults, args.chunk_bytes)
    try:
        if not args.no_relu:
            relu_round_trips(target, backend, sizes, paths, args)
        if not args.no_conv:
            conv_d(target, backend, paths, args)
    finally:
        stop.put(None)
        process.join(30)
        if process.is_alive():
            process.kill()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
