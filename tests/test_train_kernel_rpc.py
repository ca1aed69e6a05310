"""TrainKernel through a real server and the SDK: every stop reason, cancellation timing, streaming
policy, determinism, optimizer choice, snapshots, bad requests, and the notebook-facing SDK (history,
progress bar, plot, asyncio). Stopping a run and keeping its result: test_train_stop.py."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import grpc
import numpy as np
import pytest
from server_fixtures import running_server

from convrpc.client import ConvClient, ConvRpcError, History
from convrpc.client.training import train_request
from convrpc.client.aio import AsyncConvClient
from convrpc.core import get_backend
from convrpc.core.optim import SgdOptions
from convrpc.core.samples import EDGE_KERNEL, structured_image
from convrpc.core.training import TrainConfig, fit_kernel
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

#: Slack on top of "one step + 100 ms" for a loaded 2-core CI machine; a worker that is not freed
#: stays busy for the whole run (minutes), so the bound still separates right from wrong by far.
SLACK = 0.3

IMAGE = structured_image(40)[None, None]
TARGET = get_backend("numpy").conv2d(IMAGE, EDGE_KERNEL[None, None])
EXP3 = dict(kernel_size=3, lr=0.5, loss="half_mse", seed=0)


@pytest.fixture(scope="module")
def solo():
    """A server with one RPC worker: a request waits for it until the previous one lets go."""
    with running_server(backend="numpy", workers=1) as server:
        yield server


def fit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "convrpc-train"]


def local_fit(server, x, y, **config):
    """The same fit run by the server's backend in this process, without the RPC."""
    *progress, result = fit_kernel(server.backend, x, y, TrainConfig(**config))
    return progress, result


def request_latency(client) -> float:
    started = time.perf_counter()
    client.relu(np.ones(4))
    return time.perf_counter() - started


def idle_latency(client) -> float:
    return statistics.median(request_latency(client) for _ in range(5))


# -- stop reasons --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(EXP3, tol=1e-7, max_steps=10_000), "converged"),
        (dict(EXP3, max_steps=7), "max_steps"),
        (dict(EXP3, max_steps=1_000_000, max_seconds=0.3), "time_limit"),
        (dict(EXP3, lr=1e6, max_steps=1000), "diverged"),
    ],
)
def test_every_stop_reason_reaches_the_client(client, kwargs, reason):
    result = client.train_kernel(IMAGE, TARGET, **kwargs).result()
    assert result.stop_reason == reason
    assert np.isfinite(result.loss) and np.all(np.isfinite(result.weight))
    if reason == "converged":
        assert result.loss <= 1e-7 and result.steps < 10_000
        np.testing.assert_allclose(result.weight[0, 0], EDGE_KERNEL, atol=1e-2)
    if reason == "max_steps":
        assert result.steps == 7
    if reason == "time_limit":
        assert 0.3 <= result.elapsed < 5 and 0 < result.steps < 1_000_000
    if reason == "diverged":
        assert result.steps < 1000  # it stopped on the non-finite loss, not at the end


def raw_train(target, *, timeout=None, **kwargs):
    """A TrainKernel stream opened without the SDK (no run_id: only cancelling the RPC stops it)."""
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.ConvServiceStub(channel)
    return channel, stub.TrainKernel(train_request(IMAGE, TARGET, **kwargs), timeout=timeout)


def test_a_cancelled_rpc_frees_the_only_worker_within_a_step(solo):
    with ConvClient(solo.target, timeout=60) as client:
        idle = idle_latency(client)
        channel, stream = raw_train(solo.target, **dict(EXP3, max_steps=1_000_000))
        with channel:
            progress = [next(stream).progress for _ in range(3)]
            started = time.perf_counter()
            stream.cancel()
            client.relu(np.ones(4))  # queued behind the run on the only worker
            freed = time.perf_counter() - started
            assert not fit_threads()
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
    assert info.value.code() is grpc.StatusCode.CANCELLED
    step = progress[-1].elapsed_seconds / progress[-1].step
    assert freed < step + 0.1 + idle + SLACK, (freed, idle)


def test_a_passed_deadline_frees_the_only_worker_within_a_step_even_when_the_run_reports_nothing(solo):
    with ConvClient(solo.target, timeout=60) as client:
        idle = idle_latency(client)
        probe = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=20)).result()
        step = probe.elapsed / probe.steps
        # No progress message would ever fail to send: only the deadline can stop this run.
        channel, stream = raw_train(solo.target, timeout=0.5, **dict(EXP3, max_steps=1_000_000), report_every=10**9)
        with channel:
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            started = time.perf_counter()
            client.relu(np.ones(4))
            freed = time.perf_counter() - started
            assert not fit_threads()
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert freed < step + 0.1 + idle + SLACK, (freed, idle)


def test_server_drain_ends_a_run_with_stop_reason_cancelled():
    with running_server(backend="numpy") as server, ConvClient(server.target, timeout=60) as client:
        run = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=1_000_000))
        updates = iter(run)
        next(updates)
        stopper = threading.Thread(target=server.stop, args=(10,))
        stopper.start()
        rest = list(updates)
        stopper.join()
    result = run.result()
    assert result.stop_reason == "cancelled"
    assert 0 < result.steps < 1_000_000
    assert len(rest) < len(result.history) == result.steps + 1


# -- streaming policy ----------------------------------------------------------------------------


def test_progress_is_rate_limited_by_the_report_interval_and_report_every():
    with running_server(backend="numpy", report_interval=0.1) as server, ConvClient(server.target) as client:
        run = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=1_000_000, max_seconds=0.8), report_every=3)
        updates = list(run)
        result = run.result()
    h = History(*map(np.array, zip(*[(u.step, u.loss, u.elapsed, u.grad_norm) for u in updates])))
    assert result.stop_reason == "time_limit" and result.steps > 3 * len(h)
    assert np.all(h.step % 3 == 0) and np.all(np.diff(h.step) > 0)
    assert np.all(np.diff(h.elapsed) >= 0.1 - 1e-3)  # server-side times: one message per interval at most
    assert len(h) >= 4  # ...and the messages still come: about one per interval


def test_snapshots_are_never_dropped_and_hold_the_weights_of_their_step(server, client):
    run = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=12), snapshot_every=3)
    snapshots = {u.step: u.weight for u in run if u.weight is not None}
    assert sorted(snapshots) == [3, 6, 9, 12]
    sgd = SgdOptions(lr=0.5)
    progress, _ = local_fit(server, IMAGE, TARGET, kernel_size=3, seed=0, optimizer=sgd, loss="half_mse", max_steps=12,
                            snapshot_every=3)  # fmt: skip
    for event in progress:
        if event.weight is not None:
            np.testing.assert_array_equal(snapshots[event.step], event.weight)
    np.testing.assert_array_equal(snapshots[12], run.result().weight)


def test_a_slow_stream_never_slows_the_fit():
    # Every step is reported and each message takes 20 ms to go out (a slow network or reader):
    # sending on the fit's thread would take 300 * 20 ms = 6 s.
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((1, 1, 6, 6)), rng.standard_normal((1, 1, 5, 5))
    with running_server(backend="numpy", report_interval=0.0) as server, ConvClient(server.target) as client:
        encode = server.servicer._progress_message

        def slow_encode(event):
            time.sleep(0.02)
            return encode(event)

        server.servicer._progress_message = slow_encode
        run = client.train_kernel(x, y, kernel_size=2, lr=0.01, max_steps=300, seed=0)
        steps = [u.step for u in run]
        result = run.result()
    assert result.steps == 300 and result.stop_reason == "max_steps"
    assert result.elapsed < 3.0, result.elapsed
    assert len(steps) < 150  # progress that could not go out in time was replaced by newer progress
    assert np.all(np.diff(steps) > 0)


# -- determinism, optimizers, bad requests ---------------------------------------------------------


def test_same_seed_same_weights_bit_for_bit_and_equal_to_the_core_run(server, client):
    kwargs = dict(kernel_size=3, lr=0.3, loss="mse", max_steps=40, momentum=0.9)
    first = client.train_kernel(IMAGE, TARGET, seed=7, **kwargs).result()
    again = client.train_kernel(IMAGE, TARGET, seed=7, **kwargs).result()
    other = client.train_kernel(IMAGE, TARGET, seed=8, **kwargs).result()
    np.testing.assert_array_equal(first.weight, again.weight)
    assert first.loss == again.loss
    assert not np.array_equal(first.weight, other.weight)
    sgd = SgdOptions(lr=0.3, momentum=0.9)
    _, local = local_fit(server, IMAGE, TARGET, kernel_size=3, seed=7, optimizer=sgd, loss="mse", max_steps=40)
    np.testing.assert_array_equal(first.weight, local.weight)


def test_adam_with_bias_through_the_rpc_follows_torch_optim_adam(client):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 10, 10))
    y = rng.standard_normal((2, 4, 8, 8))
    w0 = rng.standard_normal((4, 3, 3, 3)) * 0.1
    b0 = rng.standard_normal(4) * 0.1
    adam = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    result = client.train_kernel(x, y, init_weight=w0, bias=True, init_bias=b0, optimizer="adam", max_steps=25,
                                 **adam).result()  # fmt: skip
    sgd = client.train_kernel(x, y, init_weight=w0, bias=True, init_bias=b0, lr=0.05, max_steps=25).result()
    assert not np.allclose(result.weight, sgd.weight)
    torch = pytest.importorskip("torch")
    w = torch.tensor(w0, requires_grad=True)
    b = torch.tensor(b0, requires_grad=True)
    opt = torch.optim.Adam([w, b], **adam)
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.mse_loss(torch.nn.functional.conv2d(torch.tensor(x), w, b), torch.tensor(y)).backward()
        opt.step()
    np.testing.assert_allclose(result.weight, w.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.bias, b.detach().numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target=np.ones((1, 1, 5, 5)), kernel_size=3), "target"),
        (dict(kernel_size=3, lr=0.0), "lr"),
        (dict(kernel_size=3, lr=-1.0, optimizer="adam"), "lr"),
        (dict(kernel_size=3, momentum=-0.5), "momentum"),
        (dict(kernel_size=3, stride=0), "conv.stride"),
        (dict(kernel_size=3, groups=2), "conv.groups"),
        (dict(kernel_size=3, max_steps=0), "max_steps"),
        (dict(kernel_size=3, max_steps=-5), "max_steps"),
        (dict(kernel_size=3, max_steps=10**9), "max_steps"),
        (dict(input=np.where(np.eye(8) > 0, np.nan, 1.0)[None, None], kernel_size=3), "input"),
        (dict(target=np.full((1, 1, 6, 6), np.inf), kernel_size=3), "target"),
        (dict(kernel_size=3, max_seconds=-1.0), "max_seconds"),
    ],
)
def test_bad_training_requests_are_invalid_argument_naming_the_field(client, kwargs, field):
    kwargs = {"input": np.ones((1, 1, 8, 8)), "target": np.ones((1, 1, 6, 6)), **kwargs}
    with pytest.raises(ConvRpcError) as info:
        client.train_kernel(kwargs.pop("input"), kwargs.pop("target"), **kwargs).result()
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field, info.value.message
    assert info.value.message.startswith(field), info.value.message
    assert client.relu(np.array([-1.0, 2.0])).tolist() == [0.0, 2.0]  # the server keeps serving


# -- the SDK in a notebook ------------------------------------------------------------------------


def test_history_holds_the_updates_while_live_and_the_whole_curve_at_the_end(client):
    run = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=30), report_every=5)
    updates = []
    for update in run:
        updates.append(update)
        live = run.history
        assert live.step.dtype == np.int64 and live.loss.dtype == np.float64 and live.elapsed.dtype == np.float64
        np.testing.assert_array_equal(live.step, [u.step for u in updates])
        np.testing.assert_array_equal(live.loss, [u.loss for u in updates])
    h = run.result().history
    assert len(h) == 31 and run.history is h
    np.testing.assert_array_equal(h.step, np.arange(31))
    for u in updates:  # an update's loss was measured before its step: the curve's point one step earlier
        assert h.loss[u.step - 1] == u.loss and h.elapsed[u.step] == u.elapsed and h.grad_norm[u.step] == u.grad_norm
    assert np.isnan(h.elapsed[0]) and np.isnan(h.grad_norm[0])


def test_progress_bar_shows_step_loss_and_eta(client, capsys):
    pytest.importorskip("tqdm")
    result = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=50), progress=True).result()
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "train_kernel" in final and "50/50" in final, final
    assert f"loss={result.loss:.3e}" in final and "train_kernel: max_steps" in final, final
    assert "<" in final  # tqdm's elapsed<remaining (the ETA)


def test_plot_draws_the_loss_curve_on_a_log_scale(client):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=40)).result()
    ax = result.plot()
    try:
        assert ax.get_yscale() == "log"
        (line,) = ax.get_lines()
        np.testing.assert_array_equal(line.get_xdata(), result.history.step)
        np.testing.assert_array_equal(line.get_ydata(), result.history.loss)
    finally:
        plt.close(ax.figure)


def test_async_for_streams_updates_and_leaving_early_stops_the_run(server):
    async def main():
        async with AsyncConvClient(server.target, timeout=60) as client:
            run = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=20), report_every=4)
            steps = [update.step async for update in run]
            result = await run.result()
            endless = client.train_kernel(IMAGE, TARGET, **dict(EXP3, max_steps=1_000_000))
            async for update in endless:
                if update.step >= 2:
                    break
            return steps, result, await endless.result()

    steps, result, stopped = asyncio.run(main())
    assert steps[0] == 4 and all(s % 4 == 0 for s in steps) and steps == sorted(set(steps))
    assert result.stop_reason == "max_steps" and result.steps == 20
    assert stopped.stop_reason == "cancelled" and 2 <= stopped.steps < 1_000_000
    assert not fit_threads()
