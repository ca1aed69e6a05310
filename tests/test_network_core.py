"""Networks in the core (convrpc.core.network): specs, validation before compute, forward/backward
against the op surface and finite differences, caps, dtypes."""

from __future__ import annotations

import itertools
import threading

import ml_dtypes
import numpy as np
import pytest
from convrpc.core import InvalidArgumentError, ResourceExhaustedError, available_backends, get_backend
from convrpc.core.network import (
    AvgPool2d,
    Conv2d,
    ConvTranspose2d,
    Flatten,
    Linear,
    MaxPool2d,
    NetworkGradients,
    NetworkProgress,
    NetworkResult,
    NetworkTrainConfig,
    ReLU,
    Sequential,
    backward,
    check_network,
    fit_network,
    forward,
)
from convrpc.core.optim import AdamOptions, SgdOptions
from convrpc.core.training import TrainConfig, fit_kernel

BACKENDS = available_backends()
NUMPY = get_backend("numpy")

LENET = Sequential(
    Conv2d(1, 4, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(4, 6, 3), ReLU(), AvgPool2d(2, ceil_mode=True),
    Flatten(), Linear(6, 5), ReLU(), Linear(5, 3),
)  # fmt: skip


def data(shape=(3, 1, 8, 8), seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def raises(exc_type, field, call, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        call(*args, **kwargs)
    assert info.value.field == field, str(info.value)
    return str(info.value)


# -- specs --------------------------------------------------------------------------------------


def test_sequential_is_a_tuple_of_specs_with_torch_layout_repr():
    assert len(LENET) == 10 and LENET[0] == Conv2d(1, 4, 3, padding=1) and list(LENET) == list(LENET.layers)
    assert LENET[6:] == Sequential(Flatten(), Linear(6, 5), ReLU(), Linear(5, 3))
    assert repr(Sequential(ReLU(), Flatten())) == "Sequential(\n  (0): ReLU()\n  (1): Flatten()\n)"
    assert eval(repr(LENET[0])) == LENET[0]
    raises(InvalidArgumentError, "layers[1]", Sequential, ReLU(), "conv")


def test_init_draws_torch_bounds_reproducibly_and_omits_a_disabled_bias():
    net = Sequential(Conv2d(2, 4, 3, groups=2, bias=False), ConvTranspose2d(4, 6, 2, groups=2), Flatten(), Linear(6, 3))
    params = net.init(seed=5)
    assert [set(p) for p in params] == [{"weight"}, {"weight", "bias"}, set(), {"weight", "bias"}]
    for p, fan_in in zip(params, (1 * 9, 3 * 4, None, 6)):
        for a in p.values():
            assert a.dtype == np.float64 and np.abs(a).max() <= 1 / np.sqrt(fan_in)
            assert np.abs(a).max() > 0.5 / np.sqrt(fan_in)  # drawn over the whole range, not a narrower one
    again = net.init(seed=5)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(params, again) for k in a)
    as32 = net.init(seed=5, dtype=np.float32)
    assert np.array_equal(as32[0]["weight"], params[0]["weight"].astype(np.float32))
    assert net.parameter_shapes() == [{"weight": (4, 1, 3, 3)}, {"weight": (4, 3, 2, 2), "bias": (6,)}, {},
                                      {"weight": (3, 6), "bias": (3,)}]  # fmt: skip


# -- validation ---------------------------------------------------------------------------------


def test_check_network_returns_every_layer_output_shape():
    shapes = check_network(LENET, (3, 1, 8, 8))
    assert shapes[0] == (3, 4, 8, 8) and shapes[2] == (3, 4, 4, 4) and shapes[5] == (3, 6, 1, 1)
    assert shapes[-1] == (3, 3) == LENET.output_shape((3, 1, 8, 8))


@pytest.mark.parametrize(
    "net, field, words",
    [
        (Sequential(Conv2d(1, 4, 3), Conv2d(8, 2, 1)), "layers[1].in_channels", "expected 4, got 8"),
        (Sequential(Conv2d(1, 4, 3), Linear(36, 2)), "layers[1].in_features", "Flatten"),
        (Sequential(Flatten(), Conv2d(1, 4, 3)), "layers[1]", "4-d"),
        (Sequential(Conv2d(1, 4, 9)), "layers[0].kernel_size", "larger than the padded input"),
        (Sequential(Conv2d(1, 4, 3, stride=1.0)), "layers[0].stride", "pair of ints"),
        (Sequential(Conv2d(1, 4, True)), "layers[0].kernel_size", "pair of ints"),
        (Sequential(Conv2d(1, 3, 3, groups=2)), "layers[0].groups", "not divisible"),
        (Sequential(Conv2d(1, 4, 3, bias=1)), "layers[0].bias", "bool"),
        (Sequential(Conv2d(1, 0, 3)), "layers[0].out_channels", "[1,"),
        (Sequential(Conv2d(1, 4, 3, padding="full")), "layers[0].padding", "'same'"),
        (Sequential(ConvTranspose2d(1, 2, 3, stride=2, output_padding=2)), "layers[0].output_padding", "smaller"),
        (Sequential(MaxPool2d(2, padding=2)), "layers[0].padding", "half the kernel"),
        (Sequential(MaxPool2d(2, ceil_mode=0)), "layers[0].ceil_mode", "bool"),
        (Sequential(AvgPool2d(2, divisor_override=0)), "layers[0].divisor_override", "non-zero"),
        (Sequential(AvgPool2d(9)), "layers[0].kernel_size", "larger"),
        (Sequential(Flatten(), Linear(64, 2.0)), "layers[1].out_features", "int"),
        (Sequential(), "layers", "at least one"),
    ],
)
def test_a_chain_that_does_not_fit_is_refused_naming_the_layer_and_argument(net, field, words):
    message = raises(InvalidArgumentError, field, check_network, net, (3, 1, 8, 8))
    assert words in message


@pytest.mark.parametrize("shape", [(8,), (0, 1, 8, 8), (3, 1, 8, -1)])
def test_a_bad_input_shape_is_refused(shape):
    raises(InvalidArgumentError, "input.shape", check_network, LENET, shape)


def test_params_are_checked_for_count_keys_shapes_and_dtype():
    x = data()
    good = LENET.init(0)

    def with_entry(i, entry):
        return [entry if j == i else p for j, p in enumerate(good)]

    raises(InvalidArgumentError, "params", forward, NUMPY, LENET, x, good[:-1])
    raises(InvalidArgumentError, "params", forward, NUMPY, LENET, x, {"weight": 1})
    raises(InvalidArgumentError, "params[1]", forward, NUMPY, LENET, x, with_entry(1, None))
    assert "missing" in raises(InvalidArgumentError, "params[3].bias", forward, NUMPY, LENET, x,
                               with_entry(3, {"weight": good[3]["weight"]}))  # fmt: skip
    raises(InvalidArgumentError, "params[1].weight", forward, NUMPY, LENET, x, with_entry(1, {"weight": np.ones(1)}))
    message = raises(InvalidArgumentError, "params[0].weight", forward, NUMPY, LENET, x,
                     with_entry(0, {**good[0], "weight": good[0]["weight"][:2]}))  # fmt: skip
    assert "expected shape (4, 1, 3, 3), got (2, 1, 3, 3)" in message
    message = raises(InvalidArgumentError, "params[7].bias", forward, NUMPY, LENET, x,
                     with_entry(7, {**good[7], "bias": good[7]["bias"].astype(np.float32)}))  # fmt: skip
    assert "float32" in message and "float64" in message
    no_bias = Sequential(Flatten(), Linear(64, 2, bias=False))
    p = no_bias.init(0)
    p[1]["bias"] = np.zeros(2)
    assert "bias=False" in raises(InvalidArgumentError, "params[1].bias", forward, NUMPY, no_bias, x, p)
    raises(InvalidArgumentError, "input", forward, NUMPY, LENET, x.astype(np.int64), good)
    assert check_network(LENET, x.shape, good, np.float64)[-1] == (3, 3)
    raises(InvalidArgumentError, "params[0].weight", check_network, LENET, x.shape, good, np.float32)


def test_grad_output_must_have_the_output_shape_and_input_dtype():
    x, p = data(), LENET.init(0)
    raises(InvalidArgumentError, "grad_output", backward, NUMPY, LENET, x, p, np.ones((3, 4)))
    raises(InvalidArgumentError, "grad_output", backward, NUMPY, LENET, x, p, np.ones((3, 3), np.float32))


def test_element_and_cost_caps_name_the_layer_before_any_compute():
    x, p = data(), LENET.init(0)
    capped = NUMPY.with_max_elements(3 * 4 * 8 * 8 - 1)
    with pytest.raises(ResourceExhaustedError) as info:
        forward(capped, LENET, x, p)
    assert info.value.field == "layers[0]" and info.value.setting == "max_elements"
    net = Sequential(Conv2d(1, 4, 3, padding=1), ReLU(), Conv2d(4, 2, 3))
    p = net.init(0)
    conv1, conv2 = 2 * 3 * 4 * 8 * 8 * 9, 2 * 3 * 2 * 6 * 6 * 4 * 9
    with pytest.raises(ResourceExhaustedError) as info:
        forward(NUMPY.with_max_elements(None, conv2 - 1), net, x, p)
    assert info.value.field == "layers[2]" and info.value.setting == "max_op_flops"
    forward(NUMPY.with_max_elements(None, conv2), net, x, p)
    with pytest.raises(ResourceExhaustedError) as info:  # a backward costs each conv twice
        backward(NUMPY.with_max_elements(None, 2 * conv2 - 1), net, x, p, np.ones((3, 2, 6, 6)))
    assert info.value.field == "layers[2]"
    backward(NUMPY.with_max_elements(None, 2 * max(conv1, conv2)), net, x, p, np.ones((3, 2, 6, 6)))


# -- values -------------------------------------------------------------------------------------


def chained_ops(backend, x, p):
    """LENET's forward through the op surface, one call a layer (an independent composition)."""
    y = backend.relu(backend.conv2d(x, p[0]["weight"], p[0]["bias"], padding=1))
    y = backend.max_pool2d(y, 2)
    y = backend.relu(backend.conv2d(y, p[3]["weight"], p[3]["bias"]))
    y = backend.avg_pool2d(y, 2, ceil_mode=True).reshape(len(x), -1)
    y = np.maximum(y @ p[7]["weight"].T + p[7]["bias"], 0)
    return y @ p[9]["weight"].T + p[9]["bias"]


@pytest.mark.parametrize("name", BACKENDS)
def test_forward_equals_the_ops_called_one_by_one(name):
    x, p = data(), LENET.init(1)
    np.testing.assert_allclose(forward(get_backend(name), LENET, x, p), chained_ops(NUMPY, x, p), rtol=0, atol=1e-12)


def test_backward_matches_finite_differences():
    net = Sequential(Conv2d(1, 2, 2, stride=2), ReLU(), ConvTranspose2d(2, 1, 2, stride=2), AvgPool2d(2),
                     MaxPool2d(2, ceil_mode=True), Flatten(), Linear(4, 2))  # fmt: skip
    rng = np.random.default_rng(7)
    x, p = rng.standard_normal((2, 1, 6, 6)), net.init(2)
    gy = rng.standard_normal(net.output_shape(x.shape))
    grads = backward(NUMPY, net, x, p, gy)
    assert isinstance(grads, NetworkGradients)

    def loss(x, p):
        return float(np.sum(forward(NUMPY, net, x, p) * gy))

    def numeric(array, evaluate):
        out = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            old = array[i]
            array[i] = old + 1e-6
            up = evaluate()
            array[i] = old - 1e-6
            down = evaluate()
            array[i] = old
            out[i] = (up - down) / 2e-6
        return out

    np.testing.assert_allclose(grads.input, numeric(x, lambda: loss(x, p)), atol=1e-6)
    for entry, got in zip(p, grads.params):
        for key in entry:
            np.testing.assert_allclose(got[key], numeric(entry[key], lambda: loss(x, p)), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_other_dtypes_compute_in_float32_and_return_the_input_dtype(dtype):
    x, p = data(), LENET.init(1, dtype=np.float32)
    x32 = x.astype(np.float32)
    xd = x32.astype(dtype)
    pd = [{k: v.astype(dtype) for k, v in e.items()} for e in p]
    y = forward(NUMPY, LENET, xd, pd)
    assert y.dtype == np.dtype(dtype)
    widened = [{k: v.astype(np.float32) for k, v in e.items()} for e in pd]
    expected = forward(NUMPY, LENET, xd.astype(np.float32), widened).astype(dtype)
    np.testing.assert_array_equal(y, expected)
    grads = backward(NUMPY, LENET, xd, pd, np.ones((3, 3), dtype))
    assert grads.input.dtype == np.dtype(dtype) and grads.params[0]["weight"].dtype == np.dtype(dtype)


def test_inputs_are_never_written():
    x, p = data(), LENET.init(1)
    x.flags.writeable = False
    for entry in p:
        for a in entry.values():
            a.flags.writeable = False
    backward(NUMPY, LENET, x, p, np.ones((3, 3)))


# -- training -----------------------------------------------------------------------------------


def fit(net, x, y, params=None, backend=NUMPY, **config):
    *progress, result = fit_network(backend, net, x, y, params, NetworkTrainConfig(**config))
    assert all(isinstance(p, NetworkProgress) for p in progress) and isinstance(result, NetworkResult)
    return progress, result


def labels(n=3, classes=3, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("name", BACKENDS)
def test_experiment_4_as_a_one_layer_network_equals_fit_kernel(name):
    backend = get_backend(name)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, 28, 28))
    y = np.ones((3, 4, 26, 26))
    w0 = rng.standard_normal((4, 3, 3, 3))
    opt = SgdOptions(lr=0.001 * 4 * 26 * 26)
    *_, kernel = fit_kernel(backend, x, y, TrainConfig(init_weight=w0, bias=True, optimizer=opt, loss="half_mse",
                                                       tol=1e-13, max_steps=100))  # fmt: skip
    net = Sequential(Conv2d(3, 4, 3))
    _, result = fit(net, x, y, [{"weight": w0, "bias": np.zeros(4)}], backend, optimizer=opt, loss="half_mse",
                    tol=1e-13, max_steps=100)  # fmt: skip
    assert result.stop_reason == kernel.stop_reason == "converged" and result.steps == kernel.steps <= 40
    np.testing.assert_allclose(result.params[0]["weight"], kernel.weight, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.params[0]["bias"], kernel.bias, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.history, kernel.history, rtol=1e-12, atol=1e-20)
    assert np.allclose(forward(backend, net, x, result.params), y)


def test_cross_entropy_loss_and_accuracy_are_those_of_the_returned_parameters():
    x, t = data(), labels()
    progress, result = fit(LENET, x, t, loss="cross_entropy", optimizer=AdamOptions(lr=0.01), max_steps=5, seed=1)
    z = forward(NUMPY, LENET, x, result.params)
    shifted = z - z.max(axis=1, keepdims=True)
    expected = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(3), t])
    assert result.loss == pytest.approx(expected, rel=1e-12) and result.history[-1] == result.loss
    assert result.accuracy == np.mean(z.argmax(axis=1) == t)
    assert [p.step for p in progress] == [1, 2, 3, 4, 5]
    assert all(p.accuracy in (0, 1 / 3, 2 / 3, 1) and p.grad_norm > 0 for p in progress)


def test_params_none_draws_them_from_the_seed_and_given_params_are_not_written_or_aliased():
    x, t = data(), labels()
    params = LENET.init(7)
    for entry in params:
        for a in entry.values():
            a.flags.writeable = False
    _, drawn = fit(LENET, x, t, None, loss="cross_entropy", max_steps=3, seed=7)
    _, given = fit(LENET, x, t, params, loss="cross_entropy", max_steps=3, seed=7)
    for a, b, p in zip(drawn.params, given.params, params):
        assert set(a) == set(b) == set(p)
        for key in a:
            assert np.array_equal(a[key], b[key]) and not np.array_equal(a[key], p[key])
    _, at_once = fit(LENET, x, t, params, loss="cross_entropy", tol=1e9)  # converged before any update
    assert at_once.steps == 0 and at_once.stop_reason == "converged"
    assert at_once.params[0]["weight"] is not params[0]["weight"]
    assert np.array_equal(at_once.params[0]["weight"], params[0]["weight"])


def test_stop_event_cancels_before_the_next_step_keeping_the_parameters_reached():
    x, t = data(), labels()
    stop = threading.Event()
    events = fit_network(NUMPY, LENET, x, t, LENET.init(0), NetworkTrainConfig(loss="cross_entropy", max_steps=100),
                         stop_event=stop)  # fmt: skip
    first = next(events)
    stop.set()
    *rest, result = events
    assert first.step == 1 and rest == []
    assert result.stop_reason == "cancelled" and result.steps == 1
    assert result.loss == fit(LENET, x, t, LENET.init(0), loss="cross_entropy", max_steps=1)[1].loss


def test_a_diverging_update_is_rolled_back():
    x = data()
    y = np.random.default_rng(1).standard_normal((3, 3)) * 1e3
    _, result = fit(LENET, x, y, LENET.init(0), optimizer=SgdOptions(lr=1e6), max_steps=50)
    assert result.stop_reason == "diverged"
    assert np.isfinite(result.loss) and all(np.isfinite(a).all() for p in result.params for a in p.values())
    assert len(result.history) == result.steps + 1


def test_time_limit_and_report_every():
    x, t = data(), labels()
    ticks = itertools.count()
    *progress, result = fit_network(NUMPY, LENET, x, t, None,
                                    NetworkTrainConfig(loss="cross_entropy", max_seconds=6, report_every=2, seed=0),
                                    clock=lambda: float(next(ticks)))  # fmt: skip
    assert result.stop_reason == "time_limit" and 0 < result.steps < 6
    assert [p.step for p in progress] == list(range(2, result.steps + 1, 2))


def test_report_interval_holds_progress_back():
    x, t = data(), labels()
    ticks = itertools.count()  # one second per look at the clock
    *progress, result = fit_network(NUMPY, LENET, x, t, None,
                                    NetworkTrainConfig(loss="cross_entropy", max_steps=9, report_interval=2.5, seed=0),
                                    clock=lambda: float(next(ticks)))  # fmt: skip
    # Reports look at the clock at 1, 2, 3, ... after the start (0): sent at 1, 4 and 7.
    assert result.steps == 9 and [p.step for p in progress] == [1, 4, 7]


def test_mini_batches_visit_every_sample_once_an_epoch():
    x, t = data((5, 1, 8, 8)), labels(5)
    progress, result = fit(LENET, x, t, loss="cross_entropy", batch_size=2, max_steps=6, seed=3)
    # Accuracies are shares of batches of 2, 2 and 1 sample, epoch after epoch.
    for p, size in zip(progress, [2, 2, 1] * 2):
        assert round(p.accuracy * size) == p.accuracy * size
    assert result.steps == 6


@pytest.mark.parametrize(
    "target, config, field",
    [
        (np.array([0, 1, 3]), dict(loss="cross_entropy"), "target"),
        (np.array([0, -1, 2]), dict(loss="cross_entropy"), "target"),
        (np.array([0.0, 1.0, 2.0]), dict(loss="cross_entropy"), "target"),
        (np.array([0, 1]), dict(loss="cross_entropy"), "target"),
        (np.zeros((3, 4)), dict(loss="mse"), "target"),
        (np.zeros((3, 3), np.float32), dict(loss="mse"), "target"),
        (np.zeros((3, 3)), dict(loss="l1"), "loss"),
        (np.zeros((3, 3)), dict(max_steps=0), "max_steps"),
        (np.zeros((3, 3)), dict(batch_size=-1), "batch_size"),
        (np.zeros((3, 3)), dict(tol=float("nan")), "tol"),
        (np.zeros((3, 3)), dict(seed=True), "seed"),
        (np.zeros((3, 3)), dict(optimizer="adam"), "optimizer"),
        (np.zeros((3, 3)), dict(optimizer=SgdOptions(lr=0)), "lr"),
    ],
)
def test_fit_network_refuses_bad_arguments_at_call_time(target, config, field):
    raises(InvalidArgumentError, field, fit_network, NUMPY, LENET, data(), target, None, NetworkTrainConfig(**config))


def test_fit_network_checks_network_input_and_caps():
    x, t = data(), labels()
    config = NetworkTrainConfig(loss="cross_entropy")
    raises(InvalidArgumentError, "loss", fit_network, NUMPY, LENET[:6], x, t, None, config)  # 4-d logits
    raises(InvalidArgumentError, "input", fit_network, NUMPY, LENET, x.astype(np.float16), t, None, config)
    raises(InvalidArgumentError, "layers[0].in_channels", fit_network, NUMPY, LENET, data((3, 2, 8, 8)), t, None,
           config)  # fmt: skip
    raises(ResourceExhaustedError, "layers[0]", fit_network, NUMPY.with_max_elements(100), LENET, x, t, None, config)
    wide = Sequential(Flatten(), Linear(64, 3))
    raises(ResourceExhaustedError, "params[1].weight", fit_network, NUMPY.with_max_elements(100), wide, x[:1], t[:1],
           None, config)  # fmt: skip
    bad = np.full((3, 1, 8, 8), np.nan)
    raises(InvalidArgumentError, "input", fit_network, NUMPY, LENET, bad, t, None, config)
