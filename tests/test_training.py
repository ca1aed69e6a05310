"""Kernel fitting (convrpc.core.training): the contract's experiments 3 and 4, torch.optim parity,
every stop reason, determinism and argument checking."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from convrpc.core import InvalidArgumentError, available_backends, get_backend
from convrpc.core.optim import AdamOptions, SgdOptions
from convrpc.core.samples import EDGE_KERNEL, structured_image
from convrpc.core.training import TrainConfig, TrainProgress, TrainResult, fit_kernel

BACKENDS = available_backends()


def fit(backend, x, y, **config):
    """Run a fit to the end; return (progress events, result)."""
    *progress, result = fit_kernel(backend, x, y, TrainConfig(**config))
    assert all(isinstance(p, TrainProgress) for p in progress)
    assert isinstance(result, TrainResult)
    return progress, result


def mse(backend, x, y, w, b=None, **conv) -> float:
    """The loss of (w, b), computed independently of the engine (for loss="mse")."""
    return float(np.mean((backend.conv2d(x, w, b, **conv) - y) ** 2))


# -- the contract's experiments ------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_experiment_3_recovers_the_edge_kernel(name):
    backend = get_backend(name)
    x = structured_image()[None, None]
    y = backend.conv2d(x, EDGE_KERNEL[None, None])
    progress, result = fit(
        backend, x, y, kernel_size=3, seed=0, optimizer=SgdOptions(lr=0.5), loss="half_mse",
        tol=1e-7, max_steps=10_000, report_every=100,
    )
    assert result.stop_reason == "converged"
    assert result.loss <= 1e-7
    assert result.steps < 10_000
    np.testing.assert_allclose(result.weight[0, 0], EDGE_KERNEL, atol=1e-2)
    assert result.bias is None
    losses = [p.loss for p in progress]
    assert losses == sorted(losses, reverse=True)  # plain gradient descent on a convex quadratic


@pytest.mark.parametrize("name", BACKENDS)
def test_experiment_4_batch_of_three_fits_all_ones(name):
    backend = get_backend(name)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, 28, 28))
    y = np.ones((3, 4, 26, 26))
    w0 = rng.standard_normal((4, 3, 3, 3))  # the seed's random initial kernel
    progress, result = fit(
        backend, x, y, init_weight=w0, bias=True, optimizer=SgdOptions(lr=0.001 * 4 * 26 * 26),
        loss="half_mse", tol=1e-13, max_steps=100,
    )
    assert result.stop_reason == "converged"
    assert result.steps <= 40
    z = backend.conv2d(x, result.weight, result.bias)
    assert np.allclose(z, y)  # numpy's default tolerances, as in the seed
    assert result.bias.shape == (4,)


# -- parity with torch.optim ---------------------------------------------------------------------

PARITY_CASES = [
    ("sgd", dict(lr=0.05), {}),
    ("sgd", dict(lr=0.05, momentum=0.9), dict(stride=2, padding=1)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01), dict(groups=2)),
    ("sgd", dict(lr=0.02, weight_decay=0.1), dict(dilation=2, padding=(2, 1))),
    ("adam", dict(lr=0.01), {}),
    ("adam", dict(lr=0.02, beta1=0.3, beta2=0.9, eps=1e-6, weight_decay=0.05), dict(stride=(1, 2))),
]


@pytest.mark.torch
@pytest.mark.parametrize("loss", ["mse", "half_mse", "half_sse"])
@pytest.mark.parametrize("kind, opt, conv", PARITY_CASES)
def test_trajectory_matches_torch_optim(kind, opt, conv, loss):
    torch = pytest.importorskip("torch")
    backend = get_backend("numpy")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 9, 8))
    w0 = 0.3 * rng.standard_normal((6, 4 // conv.get("groups", 1), 3, 3))
    b0 = 0.1 * rng.standard_normal(6)
    y = rng.standard_normal(backend.conv2d(x, w0, b0, **conv).shape)
    steps = 25
    options = SgdOptions(**opt) if kind == "sgd" else AdamOptions(**opt)
    progress, result = fit(
        backend, x, y, init_weight=w0, bias=True, init_bias=b0, optimizer=options, loss=loss, max_steps=steps, **conv
    )

    w = torch.tensor(w0, requires_grad=True)
    b = torch.tensor(b0, requires_grad=True)
    if kind == "sgd":
        torch_opt = torch.optim.SGD([w, b], **opt)
    else:
        betas = (opt.pop("beta1", 0.9), opt.pop("beta2", 0.999))
        torch_opt = torch.optim.Adam([w, b], betas=betas, **opt)
    xt, yt = torch.tensor(x), torch.tensor(y)
    losses, norms = [], []
    for _ in range(steps):
        torch_opt.zero_grad()
        z = torch.nn.functional.conv2d(xt, w, b, **conv)
        sq = (z - yt) ** 2
        value = {"mse": sq.mean(), "half_mse": 0.5 * sq.mean(), "half_sse": 0.5 * sq.sum()}[loss]
        value.backward()
        losses.append(value.item())
        norms.append(w.grad.norm().item())
        torch_opt.step()

    assert [p.step for p in progress] == list(range(1, steps + 1))
    np.testing.assert_allclose([p.loss for p in progress], losses, rtol=1e-10)
    np.testing.assert_allclose([p.grad_norm for p in progress], norms, rtol=1e-10)
    np.testing.assert_allclose(result.weight, w.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.bias, b.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert result.stop_reason == "max_steps" and result.steps == steps


# -- reporting semantics --------------------------------------------------------------------------


def small_problem(dtype=np.float64):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 2, 10, 10)).astype(dtype)
    y = rng.standard_normal((4, 3, 8, 8)).astype(dtype)
    w0 = (0.2 * rng.standard_normal((3, 2, 3, 3))).astype(dtype)
    return x, y, w0


def test_reports_loss_before_each_update_and_snapshots_after_it():
    backend = get_backend("numpy")
    x, y, w0 = small_problem()
    opt = SgdOptions(lr=0.1, momentum=0.5)
    progress, result = fit(
        backend, x, y, init_weight=w0, optimizer=opt, max_steps=10, report_every=3, snapshot_every=2
    )
    assert [p.step for p in progress] == [3, 6, 9]
    assert [p.weight is not None for p in progress] == [False, True, False]
    # The weight after 6 steps is what a 6-step run returns; the loss at step 7 is its loss.
    _, six = fit(backend, x, y, init_weight=w0, optimizer=opt, max_steps=6)
    np.testing.assert_array_equal(progress[1].weight, six.weight)
    first, = fit(backend, x, y, init_weight=w0, optimizer=opt, max_steps=1)[0]
    assert first.loss == pytest.approx(mse(backend, x, y, w0), rel=1e-12)
    # The result's loss is that of the returned weights, which took all 10 updates.
    assert result.steps == 10
    assert result.loss == pytest.approx(mse(backend, x, y, result.weight), rel=1e-12)
    elapsed = [p.elapsed for p in progress] + [result.elapsed]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


def test_report_interval_lets_one_plain_progress_through_per_interval_and_every_snapshot():
    backend = get_backend("numpy")
    x, y, w0 = small_problem()
    clock = itertools.count(0.0, 0.03).__next__  # each look at the clock is 30 ms later
    *progress, result = fit_kernel(backend, x, y, TrainConfig(init_weight=w0, max_steps=10, report_interval=0.1),
                                   clock=clock)  # fmt: skip
    # The clock is read at the start (0) and at each report: 0.03 (sent), 0.06 ... 0.12 (0.09 after
    # the last: held back), 0.15 (sent), and so on.
    assert [p.step for p in progress] == [1, 5, 9] and result.steps == 10
    *progress, result = fit_kernel(backend, x, y, TrainConfig(init_weight=w0, max_steps=10, report_interval=1e9,
                                                              snapshot_every=3), clock=clock)  # fmt: skip
    assert [(p.step, p.weight is not None) for p in progress] == [(1, False), (3, True), (6, True), (9, True)]
    with pytest.raises(InvalidArgumentError, match="report_interval"):
        fit_kernel(backend, x, y, TrainConfig(init_weight=w0, report_interval=-1.0))


def test_float32_stays_float32():
    backend = get_backend("numpy")
    x, y, w0 = small_problem(np.float32)
    _, result = fit(backend, x, y, kernel_size=3, bias=True, seed=1, max_steps=3)
    assert result.weight.dtype == np.float32 and result.bias.dtype == np.float32


def test_kaiming_uniform_init_and_zero_bias():
    backend = get_backend("numpy")
    x = np.zeros((1, 6, 12, 12))
    y = np.zeros((1, 8, 8, 10))
    stop = threading.Event()
    stop.set()  # stop before the first step: the result is the initial state
    config = TrainConfig(kernel_size=(5, 3), groups=2, bias=True, seed=3)
    *_, result = fit_kernel(backend, x, y, config, stop_event=stop)
    bound = 1 / np.sqrt(3 * 5 * 3)  # fan_in = in_channels/groups * kh * kw
    assert result.weight.shape == (8, 3, 5, 3)
    assert np.abs(result.weight).max() <= bound
    assert np.abs(result.weight).max() > 0.9 * bound and abs(result.weight.mean()) < 0.1 * bound
    np.testing.assert_array_equal(result.bias, np.zeros(8))
    *_, again = fit_kernel(backend, x, y, config, stop_event=stop)
    np.testing.assert_array_equal(again.weight, result.weight)


@pytest.mark.torch
def test_kaiming_bound_is_torchs_conv2d_default():
    torch = pytest.importorskip("torch")
    fan_in = 3 * 5 * 3
    gain = torch.nn.init.calculate_gain("leaky_relu", np.sqrt(5))
    assert gain * np.sqrt(3 / fan_in) == pytest.approx(1 / np.sqrt(fan_in), rel=1e-12)
    layer = torch.nn.Conv2d(6, 8, (5, 3), groups=2)
    assert layer.weight.abs().max().item() <= 1 / np.sqrt(fan_in)


# -- stop reasons ---------------------------------------------------------------------------------


def test_max_steps():
    x, y, w0 = small_problem()
    progress, result = fit(get_backend("numpy"), x, y, init_weight=w0, max_steps=7, tol=1e-30)
    assert (result.stop_reason, result.steps, len(progress)) == ("max_steps", 7, 7)


def test_converged_on_exact_fit_at_step_zero():
    backend = get_backend("numpy")
    x, _, w0 = small_problem()
    progress, result = fit(backend, x, backend.conv2d(x, w0), init_weight=w0, tol=1e-20)
    assert (result.stop_reason, result.steps, progress) == ("converged", 0, [])
    np.testing.assert_array_equal(result.weight, w0)
    assert not np.shares_memory(result.weight, w0)


def test_cancelled_within_one_step():
    x, y, w0 = small_problem()
    stop = threading.Event()
    events = fit_kernel(get_backend("numpy"), x, y, TrainConfig(init_weight=w0, max_steps=1000), stop_event=stop)
    for event in events:
        if isinstance(event, TrainProgress) and event.step == 5:
            stop.set()
        if isinstance(event, TrainResult):
            break
    assert (event.stop_reason, event.steps) == ("cancelled", 5)


def test_time_limit_with_a_fake_clock():
    ticks = itertools.count()  # every reading of the clock is one second later
    x, y, w0 = small_problem()
    events = fit_kernel(
        get_backend("numpy"), x, y, TrainConfig(init_weight=w0, max_steps=1000, max_seconds=10, report_every=1000),
        clock=lambda: float(next(ticks)),
    )
    *_, result = events
    assert result.stop_reason == "time_limit"
    assert 0 < result.steps < 10
    assert result.elapsed >= 10


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_diverged_returns_last_finite_weights_and_their_loss():
    backend = get_backend("numpy")
    x, y, w0 = small_problem()
    progress, result = fit(backend, x, y, init_weight=w0, optimizer=SgdOptions(lr=50.0), max_steps=10_000)
    assert result.stop_reason == "diverged"
    assert result.steps == progress[-1].step < 10_000
    assert np.isfinite(result.weight).all() and np.isfinite(result.loss)
    assert result.loss == progress[-1].loss  # the loss measured before the last update
    assert result.loss == pytest.approx(mse(backend, x, y, result.weight), rel=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_diverged_on_overflowing_gradient_keeps_the_initial_weights():
    # float32: the loss is small but the weight gradient (x is ~1e36) overflows to inf.
    x = np.full((1, 1, 40, 40), 1e36, dtype=np.float32)
    w0 = np.full((1, 1, 3, 3), 1e-37, dtype=np.float32)
    y = np.zeros((1, 1, 38, 38), dtype=np.float32)
    progress, result = fit(get_backend("numpy"), x, y, init_weight=w0, loss="half_sse", max_steps=5)
    assert (result.stop_reason, result.steps, progress) == ("diverged", 0, [])
    np.testing.assert_array_equal(result.weight, w0)
    assert np.isfinite(result.loss)


# -- mini-batches and determinism -----------------------------------------------------------------


def test_minibatches_of_identical_samples_follow_the_full_batch_trajectory():
    # Each mini-batch's mean loss and gradient then equal the full batch's: checks the scaling.
    backend = get_backend("numpy")
    x, y, w0 = small_problem()
    x, y = np.repeat(x[:1], 6, axis=0), np.repeat(y[:1], 6, axis=0)
    opt = AdamOptions(lr=0.01)
    cfg = dict(init_weight=w0, bias=True, optimizer=opt, max_steps=12, loss="half_mse")
    full, r_full = fit(backend, x, y, **cfg)
    mini, r_mini = fit(backend, x, y, batch_size=4, **cfg)
    np.testing.assert_allclose([p.loss for p in mini], [p.loss for p in full], rtol=1e-12)
    np.testing.assert_allclose(r_mini.weight, r_full.weight, rtol=1e-12)


def test_minibatch_runs_are_deterministic_for_a_seed():
    backend = get_backend("numpy")
    x, y, _ = small_problem()
    cfg = dict(kernel_size=3, bias=True, optimizer=SgdOptions(lr=0.05, momentum=0.9), batch_size=3, max_steps=20)
    runs = [fit(backend, x, y, seed=seed, **cfg) for seed in (5, 5, 6)]
    (p1, r1), (p2, r2), (p3, r3) = runs
    assert [p.loss for p in p1] == [p.loss for p in p2]
    np.testing.assert_array_equal(r1.weight, r2.weight)
    np.testing.assert_array_equal(r1.bias, r2.bias)
    assert not np.array_equal(r1.weight, r3.weight)
    # Batches of 3 out of 4 samples: the per-step losses are not the full batch's.
    full, _ = fit(backend, x, y, seed=5, **{**cfg, "batch_size": 0})
    assert [p.loss for p in p1] != [p.loss for p in full]
    assert r1.loss == pytest.approx(mse(backend, x, y, r1.weight, r1.bias), rel=1e-12)


def test_minibatch_convergence_is_confirmed_on_the_full_data():
    backend = get_backend("numpy")
    x, _, w0 = small_problem()
    w_true = np.random.default_rng(2).standard_normal(w0.shape)
    y = backend.conv2d(x, w_true)
    _, result = fit(
        backend, x, y, init_weight=w0, optimizer=SgdOptions(lr=0.3, momentum=0.5), batch_size=2,
        tol=1e-10, max_steps=2000, seed=0,
    )
    assert result.stop_reason == "converged"
    assert result.loss <= 1e-10
    assert mse(backend, x, y, result.weight) <= 1e-10


# -- argument checking ----------------------------------------------------------------------------

x_ok, y_ok, w_ok = small_problem()

BAD = [
    ("target", dict(target=np.ones((4, 3, 7, 8))), {}),
    ("target", dict(target=y_ok.astype(np.float32)), {}),
    ("target", dict(target=np.where(y_ok > 1, np.inf, y_ok)), {}),
    ("input", dict(input=np.where(x_ok > 1, np.nan, x_ok)), {}),
    ("input", dict(input=x_ok[0]), {}),
    ("input", dict(input=x_ok.astype(np.int64)), {}),
    ("lr", {}, dict(optimizer=SgdOptions(lr=0.0))),
    ("lr", {}, dict(optimizer=SgdOptions(lr=float("nan")))),
    ("lr", {}, dict(optimizer=AdamOptions(lr=-1.0))),
    ("momentum", {}, dict(optimizer=SgdOptions(momentum=-0.1))),
    ("nesterov", {}, dict(optimizer=SgdOptions(nesterov=True))),
    ("weight_decay", {}, dict(optimizer=SgdOptions(weight_decay=-1.0))),
    ("beta1", {}, dict(optimizer=AdamOptions(beta1=1.0))),
    ("beta2", {}, dict(optimizer=AdamOptions(beta2=-0.5))),
    ("eps", {}, dict(optimizer=AdamOptions(eps=float("inf")))),
    ("optimizer", {}, dict(optimizer="sgd")),
    ("max_steps", {}, dict(max_steps=0)),
    ("max_steps", {}, dict(max_steps=2.5)),
    ("tol", {}, dict(tol=-1.0)),
    ("loss", {}, dict(loss="l1")),
    ("batch_size", {}, dict(batch_size=-1)),
    ("report_every", {}, dict(report_every=-1)),
    ("snapshot_every", {}, dict(snapshot_every=-2)),
    ("max_seconds", {}, dict(max_seconds=float("nan"))),
    ("seed", {}, dict(seed=-1)),
    ("kernel_size", {}, dict(init_weight=None)),
    ("kernel_size", {}, dict(kernel_size=3)),
    ("kernel_size", {}, dict(init_weight=None, kernel_size=11)),
    ("init_weight", {}, dict(init_weight=w_ok[:, :1])),
    ("init_weight", {}, dict(init_weight=w_ok.astype(np.float32))),
    ("init_bias", {}, dict(init_bias=np.zeros(3))),
    ("init_bias", {}, dict(bias=True, init_bias=np.zeros(4))),
    ("bias", {}, dict(bias=1)),
    ("groups", {}, dict(init_weight=None, kernel_size=3, groups=3)),
    ("stride", {}, dict(stride=0)),
    ("padding", {}, dict(padding="full")),
]


@pytest.mark.parametrize("field, data, config", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_bad_arguments_name_the_field_before_anything_runs(field, data, config):
    args = {"input": x_ok, "target": y_ok, **data}
    with pytest.raises(InvalidArgumentError) as info:
        fit_kernel(get_backend("numpy"), args["input"], args["target"], TrainConfig(**{"init_weight": w_ok, **config}))
    assert info.value.field == field


def test_an_output_over_the_backends_element_cap_is_refused_before_anything_runs():
    from convrpc.core.errors import ResourceExhaustedError

    capped = get_backend("numpy").with_max_elements(35)
    x, y = np.ones((1, 1, 8, 8)), np.ones((1, 1, 6, 6))  # 36 output elements
    with pytest.raises(ResourceExhaustedError, match="target"):
        fit_kernel(capped, x, y, TrainConfig(kernel_size=3))
    *_, result = fit_kernel(get_backend("numpy").with_max_elements(36), x, y, TrainConfig(kernel_size=3, max_steps=2))
    assert result.steps == 2
