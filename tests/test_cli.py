"""The `convrpc` command: the README's demo end to end, and the probe commands against a live server."""

from __future__ import annotations

import subprocess
import sys

from convrpc import cli


def test_demo_fits_the_edge_kernel_and_writes_the_loss_curve(tmp_path, capsys):
    plot = tmp_path / "loss.png"
    assert cli.main(["demo", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "stopped: converged" in out
    assert "allclose(learned, true, atol=1e-2): True" in out
    assert "step      1  loss" in out  # the loss streamed while fitting
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_against_a_running_server(server, capsys):
    assert cli.main(["demo", "--target", server.target, "--plot", ""]) == 0
    assert f"at {server.target}: backend {server.backend.name}" in capsys.readouterr().out


def test_health_and_info_probe_a_server(server, capsys):
    assert cli.main(["health", "--target", server.target]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert cli.main(["info", "--target", server.target]) == 0
    assert f'backend: "{server.backend.name}"' in capsys.readouterr().out


def test_health_fails_when_nothing_listens():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing serves there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1


def test_console_script_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "convrpc.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "demo" in done.stdout and "serve" in done.stdout
