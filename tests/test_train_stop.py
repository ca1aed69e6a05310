"""Stopping a fit keeps it: cancel(), leaving the loop, Ctrl-C, an interrupt inside result() and
``timeout=`` each stop the run on the server (StopTraining), and ``result()`` returns the weights of the
last step with stop reason "cancelled". Also the whole loss curve and the progress bar's end."""

from __future__ import annotations

import asyncio
import io
import signal
import threading

import numpy as np
import pytest
from server_fixtures import running_server

from convrpc.client import ConvClient
from convrpc.client.aio import AsyncConvClient
from convrpc.client.channel import single_address
from convrpc.core import get_backend
from convrpc.core.samples import EDGE_KERNEL, structured_image
from convrpc.v1 import conv_service_pb2 as pb

IMAGE = structured_image(24)[None, None]
TARGET = get_backend("numpy").conv2d(IMAGE, EDGE_KERNEL[None, None])
#: A run that would go on for minutes: only a stop ends it early. max_seconds bounds a broken stop.
ENDLESS = dict(kernel_size=3, lr=0.01, loss="half_mse", seed=0, max_steps=1_000_000, max_seconds=60)


@pytest.fixture(scope="module")
def numpy_server():
    with running_server(backend="numpy") as server:
        yield server


@pytest.fixture()
def client(numpy_server):
    with ConvClient(numpy_server.target, timeout=30) as c:
        yield c


def fit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "convrpc-train"]


def assert_kept(result, client) -> None:
    """A stopped run: cancelled after some steps, with usable weights whose loss is the result's."""
    assert result.stop_reason == "cancelled"
    assert 0 < result.steps < ENDLESS["max_steps"]
    assert result.weight.shape == (1, 1, 3, 3) and np.all(np.isfinite(result.weight))
    assert not fit_threads()  # the fit is over on the server, not left running
    z = client.conv2d(IMAGE, result.weight)
    np.testing.assert_allclose(0.5 * np.mean((z - TARGET) ** 2), result.loss, rtol=1e-9)
    assert len(result.history) == result.steps + 1 and result.history.loss[-1] == result.loss


def test_cancel_returns_the_weights_of_the_last_step(client):
    run = client.train_kernel(IMAGE, TARGET, **ENDLESS)
    updates = iter(run)
    for _ in range(3):
        next(updates)
    run.cancel()
    run.cancel()  # a second cancel does nothing
    assert_kept(run.result(), client)
    assert run.result() is run.result()


def test_leaving_the_loop_stops_the_run_and_result_returns_it(client):
    run = client.train_kernel(IMAGE, TARGET, **ENDLESS, progress=False)
    for update in run:
        if update.step >= 2:
            break
    assert_kept(run.result(), client)


def test_the_context_manager_stops_an_unfinished_run(client):
    with client.train_kernel(IMAGE, TARGET, **ENDLESS) as run:
        next(iter(run))
    assert_kept(run.result(), client)


def test_ctrl_c_in_the_loop_body_stops_the_run_and_result_returns_it(client):
    run = client.train_kernel(IMAGE, TARGET, **ENDLESS)
    with pytest.raises(KeyboardInterrupt):
        for update in run:
            if update.step >= 2:
                raise KeyboardInterrupt  # what Ctrl-C does while the loop body runs
    assert_kept(run.result(), client)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_ctrl_c_while_waiting_in_result_stops_the_run_and_a_second_result_returns_it(client):
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    run = client.train_kernel(IMAGE, TARGET, **ENDLESS)
    updates = iter(run)  # kept: dropping an iteration part-way stops the run
    next(updates)  # running: the interrupt lands while result() waits for the stream
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            run.result()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert_kept(run.result(), client)


def test_an_explicit_timeout_stops_the_run_and_keeps_it(client):
    result = client.train_kernel(IMAGE, TARGET, **ENDLESS, timeout=0.5).result()
    assert_kept(result, client)


def test_the_clients_default_timeout_does_not_bound_a_run(numpy_server):
    """timeout=0.2 on the client is every op's deadline, not a training run's: the run ends on its own."""
    with ConvClient(numpy_server.target, timeout=0.2) as client:
        result = client.train_kernel(IMAGE, TARGET, **dict(ENDLESS, max_steps=1_000_000, max_seconds=1.0)).result()
    assert result.stop_reason == "time_limit" and result.elapsed >= 1.0


def test_async_cancel_and_leaving_the_loop_return_the_fit(numpy_server):
    async def main():
        async with AsyncConvClient(numpy_server.target, timeout=30) as client:
            run = client.train_kernel(IMAGE, TARGET, **ENDLESS)
            async for update in run:
                if update.step >= 2:
                    break
            left = await run.result()
            run = client.train_kernel(IMAGE, TARGET, **ENDLESS, timeout=0.5)
            timed = await run.result()
            return left, timed

    left, timed = asyncio.run(main())
    with ConvClient(numpy_server.target) as client:
        assert_kept(left, client)
        assert_kept(timed, client)


def test_stop_training_names_a_run_by_its_secret_id_only(numpy_server):
    """An unknown id stops nothing; the run started with an id stops when that id is named."""
    import grpc

    from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(numpy_server.target) as channel:
        stub = pb_grpc.ConvServiceStub(channel)
        with ConvClient(numpy_server.target) as client:
            request = client_request(client)
        request.run_id = "a" * 32
        stream = stub.TrainKernel(request, timeout=60)
        assert next(stream).HasField("progress")
        assert not stub.StopTraining(pb.StopTrainingRequest(run_id="b" * 32)).stopped
        assert not stub.StopTraining(pb.StopTrainingRequest()).stopped
        assert stub.StopTraining(pb.StopTrainingRequest(run_id="a" * 32)).stopped
        last = list(stream)[-1]
        assert last.result.stop_reason == pb.STOP_REASON_CANCELLED
        assert not stub.StopTraining(pb.StopTrainingRequest(run_id="a" * 32)).stopped  # over: forgotten


def client_request(client) -> pb.TrainKernelRequest:
    from convrpc.client.training import train_request

    return train_request(IMAGE, TARGET, **ENDLESS)


def test_two_running_runs_cannot_share_an_id(numpy_server):
    import grpc

    from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

    request = client_request(None)
    request.run_id = "c" * 32
    with grpc.insecure_channel(numpy_server.target) as channel:
        stub = pb_grpc.ConvServiceStub(channel)
        first = stub.TrainKernel(request, timeout=60)
        next(first)
        with pytest.raises(grpc.RpcError) as info:
            next(stub.TrainKernel(request, timeout=60))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "run_id" in info.value.details()
        stub.StopTraining(pb.StopTrainingRequest(run_id="c" * 32))
        assert list(first)[-1].result.stop_reason == pb.STOP_REASON_CANCELLED


def test_a_run_on_a_name_of_several_servers_is_stopped_on_its_own_server():
    """ipv4:a,b spreads calls round-robin; a run's stream and its stop must still reach one server."""
    with running_server(backend="numpy") as one, running_server(backend="numpy") as two:
        target = f"ipv4:127.0.0.1:{one.port},127.0.0.1:{two.port}"
        assert not single_address(target)
        with ConvClient(target, timeout=30) as client:
            for _ in range(6):  # round-robin would send every other stop to the wrong server
                run = client.train_kernel(IMAGE, TARGET, **dict(ENDLESS, max_seconds=20))
                updates = iter(run)
                next(updates)
                run.cancel()
                result = run.result()
                assert result.stop_reason == "cancelled", result


@pytest.mark.parametrize(
    "target, single",
    [("127.0.0.1:50051", True), ("[::1]:50051", True), ("unix:/tmp/s.sock", True), ("ipv4:10.0.0.1:5", True),
     ("localhost:50051", False), ("dns:///svc:50051", False), ("ipv4:10.0.0.1:5,10.0.0.2:5", False),
     ("convrpc:50051", False)],
)  # fmt: skip
def test_only_an_ip_literal_or_a_socket_counts_as_one_server(target, single):
    assert single_address(target) is single


# -- the loss curve -----------------------------------------------------------------------------


@pytest.mark.parametrize("reason, kwargs", [
    ("converged", dict(lr=0.5, tol=1e-7, max_steps=10_000)),
    ("max_steps", dict(lr=0.5, max_steps=37)),
    ("diverged", dict(lr=1e6, max_steps=1000)),
])  # fmt: skip
def test_the_result_holds_every_steps_loss_and_ends_at_its_loss(client, numpy_server, reason, kwargs):
    from convrpc.core.optim import SgdOptions
    from convrpc.core.training import TrainConfig, fit_kernel

    config = dict(kernel_size=3, loss="half_mse", seed=0, **kwargs)
    result = client.train_kernel(IMAGE, TARGET, **config).result()
    assert result.stop_reason == reason
    h = result.history
    assert len(h) == result.steps + 1 and h.loss.dtype == np.float64
    np.testing.assert_array_equal(h.step, np.arange(result.steps + 1))
    assert h.loss[-1] == result.loss
    # The same curve as the fit computes in this process (the server's numpy backend, same seed).
    *_, local = fit_kernel(get_backend("numpy"), IMAGE, TARGET, TrainConfig(
        **{k: v for k, v in config.items() if k != "lr"}, optimizer=SgdOptions(lr=kwargs["lr"])))
    np.testing.assert_array_equal(h.loss, local.history)
    # Step s's loss is the loss of the weights after s updates: the first is the starting weights'.
    for u in client.train_kernel(IMAGE, TARGET, **config):
        assert u.loss == h.loss[u.step - 1]  # each update's loss (measured before its step) is on the curve


# -- the progress bar ---------------------------------------------------------------------------


def captured_bars(monkeypatch) -> list:
    """Make progress=True draw std tqdm bars into a string buffer, and collect them."""
    tqdm = pytest.importorskip("tqdm")
    bars = []

    class Bar(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)
            bars.append(self)

    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    return bars


def test_a_converged_run_fills_the_bar_green_and_names_the_reason(client, monkeypatch):
    bars = captured_bars(monkeypatch)
    result = client.train_kernel(
        IMAGE, TARGET, kernel_size=3, lr=0.5, loss="half_mse", tol=1e-7, max_steps=10_000, seed=0, progress=True
    ).result()
    (bar,) = bars
    assert result.stop_reason == "converged" and result.steps < 10_000
    assert bar.n == bar.total == result.steps and bar.colour == "green"
    final = bar.fp.getvalue().split("\r")[-1]
    assert "converged" in final and f"{result.steps}/{result.steps}" in final and "100%" in final, final


def test_a_cancelled_run_leaves_its_bar_short_and_says_so(client, monkeypatch):
    bars = captured_bars(monkeypatch)
    run = client.train_kernel(IMAGE, TARGET, **ENDLESS, progress=True)
    for update in run:
        if update.step >= 2:
            run.cancel()
    (bar,) = bars
    assert run.result().stop_reason == "cancelled"
    assert bar.total == ENDLESS["max_steps"] and bar.n == run.result().steps and bar.colour != "green"
    assert "cancelled" in bar.fp.getvalue().split("\r")[-1]


def test_the_notebook_bar_of_a_converged_run_ends_full(client, monkeypatch):
    """tqdm.notebook shows a red bar when closed short of its total; a converged run must end green."""
    notebook = pytest.importorskip("tqdm.notebook")
    pytest.importorskip("ipywidgets")
    bars = []

    class Bar(notebook.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, display=False, **kwargs)
            bars.append(self)

    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    client.train_kernel(
        IMAGE, TARGET, kernel_size=3, lr=0.5, loss="half_mse", tol=1e-7, max_steps=10_000, seed=0, progress=True
    ).result()
    (bar,) = bars
    widget = bar.container.children[1]
    assert widget.max == widget.value == bar.n and widget.bar_style == "success"
