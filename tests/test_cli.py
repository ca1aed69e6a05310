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
    out = capsys.readouterr().out
    assert f"\nbackend            {server.backend.name}\n" in out and "\nops                conv2d, " in out, out


def test_health_fails_when_nothing_listens():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing serves there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1


def test_console_script_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "convrpc.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "demo" in done.stdout and "serve" in done.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_on_a_port_in_use_says_so_in_one_line(capsys):
    import socket

    import pytest

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            cli.main(["serve", "--host", "127.0.0.1", "--port", str(port), "--backend", "numpy", "--no-warm-up"])
    message = str(info.value.code)
    assert message.startswith(f"convrpc serve: port: cannot listen on 127.0.0.1:{port}: the port is in use"), message
    assert "\n" not in message and "--port" in message


def test_demo_at_a_stopped_server_says_so_in_one_line(capsys):
    port = _free_port()  # nothing listens there
    assert cli.main(["demo", "--target", f"127.0.0.1:{port}", "--plot", "", "--timeout", "3"]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"convrpc demo: no convrpc server answers at 127.0.0.1:{port} (UNAVAILABLE"), line
    assert "Traceback" not in captured.out + captured.err


def test_the_demo_prints_the_warm_up_progress_until_the_server_is_ready(capsys):
    class Warming:  # a local server three polls away from ready
        def __init__(self):
            self.polls, self.warm_up_progress = 0, (0, 0)

        def wait_ready(self, timeout=None):
            self.polls += 1
            self.warm_up_progress = (min(self.polls, 3), 3)
            return self.polls > 3

    cli._wait_warm(Warming())
    lines = [line.split("(")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert lines == ["compiling kernels 1/3", "compiling kernels 2/3", "compiling kernels 3/3"]


def test_a_numba_server_reports_its_warm_up_progress(server, caplog):
    import pytest

    if server.backend.name != "numba":
        pytest.skip("only the numba backend compiles kernels")
    assert server.warm_up_progress == (20, 20)


def test_health_and_info_help_show_their_defaults(capsys):
    import pytest

    for command in ("health", "info"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        timeout = {"health": "3.0", "info": "10.0"}[command]
        assert "(default: 127.0.0.1:50051)" in out and f"(default: {timeout})" in out, out
