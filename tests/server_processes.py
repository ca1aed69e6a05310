"""Real `convrpc serve` processes on 127.0.0.1, configured by CONVRPC_* variables as in a container; always stopped."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from convrpc import cli

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = [str(ROOT / d) for d in ("proto", "core", "server", "client")]


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for 127.0.0.1:0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """One server process; ``log`` holds what it wrote to stdout and stderr."""

    process: subprocess.Popen
    port: int
    log: BinaryIO

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def healthy(self) -> bool:
        """What the container HEALTHCHECK asks: ``convrpc health --target ...`` exits 0."""
        with redirect_stdout(io.StringIO()):
            return cli.main(["health", "--target", self.target, "--timeout", "1"]) == 0

    def terminate(self) -> None:
        """SIGTERM, what ``docker stop`` and Kubernetes send first."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 15.0) -> int:
        """The exit code; SIGKILL first if the process outlives ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def _spawn(env: dict[str, str]) -> ServerProcess:
    port = free_port()
    environ = dict(os.environ, **env, CONVRPC_HOST="127.0.0.1", CONVRPC_PORT=str(port))
    environ["PYTHONPATH"] = os.pathsep.join(SOURCE_DIRS + [p for p in [os.environ.get("PYTHONPATH")] if p])
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "convrpc.cli", "serve"], env=environ, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    return ServerProcess(process, port, log)


@contextlib.contextmanager
def server_processes(count: int, *, env: dict[str, str] | None = None, ready_timeout: float = 60.0):
    """``count`` started, healthy server processes; every one is stopped (or killed) on exit.

    Each gets a free port; one that exits before it is healthy (its port was taken meanwhile) is
    started again on another port, at most twice.
    """
    env = dict(env or {})
    servers: list[ServerProcess] = []
    try:
        servers = [_spawn(env) for _ in range(count)]
        retries = 2 * count
        deadline = time.monotonic() + ready_timeout
        waiting = list(range(count))
        while waiting:
            for i in list(waiting):
                if servers[i].process.poll() is not None:
                    assert retries > 0, f"server exited with {servers[i].process.returncode}:\n{servers[i].output()}"
                    retries -= 1
                    servers[i] = _spawn(env)
                elif servers[i].healthy():
                    waiting.remove(i)
            late = [servers[i].output() for i in waiting]
            assert time.monotonic() < deadline, "servers not healthy in time:\n" + "\n".join(late)
            if waiting:
                time.sleep(0.1)
        yield servers
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait()
            server.log.close()
