"""Every op, forward and backward, on every backend, against torch.nn.functional and autograd."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from convrpc.core import InvalidArgumentError

torch = pytest.importorskip("torch")
F = torch.nn.functional

# torch warns that it pads a copy for 'same' with even kernels; that is the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def torch_run(op, arrays, grad_output=None, **options):
    """``op(*arrays, **options)`` in torch (None entries pass through), with the arrays' gradients
    for ``grad_output`` when it is given: (output, [grad or None per array])."""
    tensors = [None if a is None else torch.tensor(a, requires_grad=grad_output is not None) for a in arrays]
    y = op(*tensors, **options)
    if grad_output is None:
        return y.detach().numpy(), None
    y.backward(torch.tensor(grad_output))
    return y.detach().numpy(), [None if t is None else t.grad.numpy() for t in tensors]


def check_against_torch(backend_forward, backend_backward, torch_op, arrays, rng, dtype, **options):
    y = backend_forward(*arrays, **options)
    gy = rng.standard_normal(y.shape).astype(dtype)
    y_ref, grads_ref = torch_run(torch_op, arrays, gy, **options)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, what="output")
    grads = backend_backward(gy, *arrays, **options)
    for name, got, want in zip(("input", "weight", "bias"), grads, grads_ref):
        if want is None:
            assert got is None, f"{name} grad should be None"
        else:
            assert_close(got, want, dtype, what=f"{name} grad")


# -- conv2d ------------------------------------------------------------------------------------

# (input shape, weight shape, bias, options): larger than the loop tests, torch is fast.
CONV2D_CASES = {
    "plain": ((1, 1, 9, 11), (1, 1, 3, 3), False, {}),
    "batch_bias": ((3, 3, 10, 13), (5, 3, 3, 5), True, {}),
    "stride_pad": ((2, 3, 11, 10), (4, 3, 3, 3), True, dict(stride=2, padding=1)),
    "pairs": ((2, 2, 13, 12), (3, 2, 4, 3), False, dict(stride=(3, 2), padding=(2, 1), dilation=(1, 2))),
    "dilation3": ((1, 2, 15, 14), (2, 2, 3, 3), True, dict(dilation=3, padding=3)),
    "groups": ((2, 6, 9, 8), (9, 2, 3, 3), True, dict(groups=3, padding=(1, 0))),
    "depthwise": ((2, 5, 9, 9), (5, 1, 5, 5), False, dict(groups=5, padding=2)),
    "depthwise_multiplier": ((2, 4, 8, 9), (8, 1, 3, 2), True, dict(groups=4, stride=(1, 2))),
    "kernel1x1": ((2, 8, 7, 9), (6, 8, 1, 1), True, dict(stride=2)),
    "same_even": ((2, 3, 8, 9), (4, 3, 4, 2), True, dict(padding="same")),
    "same_dilated": ((1, 2, 9, 10), (3, 2, 2, 3), False, dict(padding="same", dilation=(3, 2))),
    "valid": ((2, 2, 7, 6), (2, 2, 7, 6), True, dict(padding="valid")),
    "everything": ((3, 6, 12, 11), (4, 3, 3, 2), True, dict(stride=(2, 3), padding=(2, 1), dilation=(2, 3), groups=2)),
}


@pytest.mark.parametrize("case", CONV2D_CASES.values(), ids=CONV2D_CASES.keys())
def test_conv2d(backend, dtype, rng, case):
    x_shape, w_shape, with_bias, options = case
    arrays = [
        rng.standard_normal(x_shape).astype(dtype),
        rng.standard_normal(w_shape).astype(dtype),
        rng.standard_normal(w_shape[0]).astype(dtype) if with_bias else None,
    ]
    check_against_torch(backend.conv2d, backend.conv2d_backward, F.conv2d, arrays, rng, dtype, **options)


# -- conv_transpose2d --------------------------------------------------------------------------

# (input shape, weight shape (c_in, c_out/groups, kh, kw), bias, options)
CONV_TRANSPOSE2D_CASES = {
    "plain": ((1, 1, 5, 6), (1, 1, 3, 3), False, {}),
    "batch_bias": ((3, 3, 6, 5), (3, 4, 3, 2), True, {}),
    "stride_pad_outpad": ((2, 3, 5, 6), (3, 2, 3, 3), True, dict(stride=2, padding=1, output_padding=1)),
    "pairs": ((2, 2, 5, 4), (2, 3, 4, 3), False, dict(stride=(3, 2), padding=(2, 1), output_padding=(2, 0))),
    "dilation_outpad": ((1, 2, 5, 5), (2, 2, 3, 3), True, dict(dilation=3, output_padding=2)),
    "dilation_stride": ((2, 2, 4, 5), (2, 3, 3, 2), True, dict(dilation=(2, 3), stride=(2, 3), padding=(1, 2))),
    "groups": ((2, 6, 5, 4), (6, 2, 3, 3), True, dict(groups=3, stride=2, padding=(1, 0), output_padding=(0, 1))),
    "depthwise": ((2, 4, 6, 6), (4, 1, 3, 3), False, dict(groups=4, padding=1)),
    "kernel1x1": ((2, 5, 4, 5), (5, 3, 1, 1), True, dict(stride=3, output_padding=(2, 1))),
    "pad_shrinks": ((1, 2, 7, 7), (2, 2, 3, 3), True, dict(padding=(3, 2))),
    "everything": (
        (3, 4, 4, 5), (4, 3, 3, 2), True,
        dict(stride=(2, 3), padding=(1, 2), output_padding=(1, 2), dilation=(2, 2), groups=2),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CONV_TRANSPOSE2D_CASES.values(), ids=CONV_TRANSPOSE2D_CASES.keys())
def test_conv_transpose2d(backend, dtype, rng, case):
    x_shape, w_shape, with_bias, options = case
    c_out = w_shape[1] * options.get("groups", 1)
    arrays = [
        rng.standard_normal(x_shape).astype(dtype),
        rng.standard_normal(w_shape).astype(dtype),
        rng.standard_normal(c_out).astype(dtype) if with_bias else None,
    ]
    check_against_torch(
        backend.conv_transpose2d, backend.conv_transpose2d_backward, F.conv_transpose2d, arrays, rng, dtype, **options
    )


# -- pooling -----------------------------------------------------------------------------------

# (input shape, options)
MAX_POOL_CASES = {
    "k2": ((2, 3, 8, 9), dict(kernel_size=2)),
    "k3_s2_p1": ((2, 2, 9, 10), dict(kernel_size=3, stride=2, padding=1)),
    "pairs": ((1, 3, 9, 11), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1))),
    "dilation": ((2, 2, 11, 10), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    "dilation_pair": ((1, 2, 9, 12), dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), dilation=(3, 2))),
    "k1x1": ((2, 2, 5, 6), dict(kernel_size=1, stride=2)),
    "ceil": ((2, 3, 8, 9), dict(kernel_size=3, stride=2, ceil_mode=True)),
    "ceil_pad_dilation": ((1, 2, 10, 7), dict(kernel_size=(3, 2), stride=(3, 2), padding=1, dilation=(2, 1), ceil_mode=True)),
    "unbatched_ceil": ((3, 7, 8), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
}
# No window here covers padding only: for one, torch 2.13's CPU kernel records an index outside the
# input and its backward writes out of bounds (heap corruption). test_ops_reference.py covers that case.


@pytest.mark.parametrize("case", MAX_POOL_CASES.values(), ids=MAX_POOL_CASES.keys())
@pytest.mark.parametrize("values", ["random", "ties", "nan_and_inf"])
def test_max_pool2d(backend, dtype, rng, case, values):
    x_shape, options = case
    if values == "random":
        x = rng.standard_normal(x_shape).astype(dtype)
    elif values == "ties":  # torch also sends a tied window's gradient to its first maximum in row-major order
        x = rng.integers(-1, 2, size=x_shape).astype(dtype)
    else:  # several NaNs per window (torch routes to the last NaN) and all -inf windows (to the first in-image tap)
        x = rng.choice(np.array([np.nan, -np.inf, -np.inf, 1.0], dtype=dtype), size=x_shape)
    check_against_torch(backend.max_pool2d, backend.max_pool2d_backward, F.max_pool2d, [x], rng, dtype, **options)


AVG_POOL_CASES = {
    "k2": ((2, 3, 8, 9), dict(kernel_size=2)),
    "k3_s2_p1": ((2, 2, 9, 10), dict(kernel_size=3, stride=2, padding=1)),
    "pairs": ((1, 3, 9, 11), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1))),
    "k5_s1_p2": ((2, 2, 7, 6), dict(kernel_size=5, stride=1, padding=2)),
    "k1x1": ((2, 2, 5, 6), dict(kernel_size=1, stride=2)),
    "ceil": ((2, 2, 9, 10), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    "ceil_exclude_pad": ((1, 3, 9, 11), dict(kernel_size=(2, 3), stride=(2, 2), padding=1, ceil_mode=True, count_include_pad=False)),
    "divisor_override": ((2, 2, 7, 6), dict(kernel_size=3, stride=2, padding=1, divisor_override=5)),
    "unbatched": ((2, 7, 6), dict(kernel_size=(3,), stride=(2,), ceil_mode=True)),
}


@pytest.mark.parametrize("case", AVG_POOL_CASES.values(), ids=AVG_POOL_CASES.keys())
def test_avg_pool2d(backend, dtype, rng, case):
    x_shape, options = case
    x = rng.standard_normal(x_shape).astype(dtype)
    check_against_torch(backend.avg_pool2d, backend.avg_pool2d_backward, F.avg_pool2d, [x], rng, dtype, **options)


# -- relu --------------------------------------------------------------------------------------


def test_relu(backend, dtype, rng):
    x = rng.standard_normal((3, 4, 7, 5)).astype(dtype)
    x.flat[::4] = 0.0
    check_against_torch(backend.relu, backend.relu_backward, F.relu, [x], rng, dtype)


# -- random geometries: same accept/reject decisions as torch, same values -------------------

RANDOM_OPS = ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d")
RANDOM_CASES_PER_OP = 25


def random_geometry(op, seed):
    """Arrays and options of one random call of ``op``: small sizes, every option drawn, some invalid."""
    rng = np.random.default_rng([RANDOM_OPS.index(op), seed])
    groups = int(rng.integers(1, 4))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    h, w, kh, kw = (int(v) for v in rng.integers([2, 2, 1, 1], [10, 10, 5, 5]))
    stride, dilation, padding = (tuple(int(v) for v in rng.integers(lo, hi, 2)) for lo, hi in ((1, 4), (1, 3), (0, 3)))
    x = rng.standard_normal((int(rng.integers(1, 3)), c_in, h, w))
    if op == "conv2d":
        mode = rng.choice(["pair", "same", "valid"])
        options = dict(stride=(1, 1) if mode == "same" else stride, padding=padding if mode == "pair" else str(mode))
        options.update(dilation=dilation, groups=groups)
        return [x, rng.standard_normal((c_out, c_in // groups, kh, kw)), rng.standard_normal(c_out)], options
    if op == "conv_transpose2d":
        output_padding = tuple(int(v) for v in rng.integers(0, 2, 2))
        options = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
        return [x, rng.standard_normal((c_in, c_out // groups, kh, kw)), rng.standard_normal(c_out)], options
    if seed % 4:  # mostly within the pooling rule padding <= kernel // 2, which every fourth case tests
        padding = (min(padding[0], kh // 2), min(padding[1], kw // 2))
    options = dict(kernel_size=(kh, kw), stride=stride, padding=padding, ceil_mode=bool(rng.integers(0, 2)))
    if op == "max_pool2d":
        options["dilation"] = dilation
    else:
        options["count_include_pad"] = bool(rng.integers(0, 2))
    return [x], options


@pytest.mark.parametrize("seed", range(RANDOM_CASES_PER_OP))
@pytest.mark.parametrize("op", RANDOM_OPS)
def test_random_geometry(backend, op, seed):
    arrays, options = random_geometry(op, seed)
    torch_op = getattr(F, op)
    try:
        y_ref = torch_op(*(torch.tensor(a) for a in arrays), **options).numpy()
    except RuntimeError:
        with pytest.raises(InvalidArgumentError):
            getattr(backend, op)(*arrays, **options)
        return
    assert_close(getattr(backend, op)(*arrays, **options), y_ref, what=f"{op}{options} output")
    if np.isinf(y_ref).any():
        return  # a max-pool window over padding only: torch's backward would write out of bounds
    gy = np.random.default_rng(seed).standard_normal(y_ref.shape)
    _, grads_ref = torch_run(torch_op, arrays, gy, **options)
    grads = getattr(backend, f"{op}_backward")(gy, *arrays, **options)
    for name, got, want in zip(("input", "weight", "bias"), grads, grads_ref):
        assert_close(got, want, what=f"{op}{options} {name} grad")


# -- the contract's reference experiments 1 and 2 -------------------------------------------


def test_experiment1_matches_torch(backend, dtype):
    a = np.array([[[[1, 3, 1, 4], [2, 8, 5, 1], [3, 2, 0, 3]]]], dtype=dtype)
    k = np.array([[[[1, 0], [-1, 1]]]], dtype=dtype)
    expected = np.array([[[[7, 0, -3], [1, 6, 8]]]], dtype=dtype)
    np.testing.assert_array_equal(F.conv2d(torch.tensor(a), torch.tensor(k), padding="valid").numpy(), expected)
    np.testing.assert_array_equal(backend.conv2d(a, k, padding="valid"), expected)


def test_experiment2_matches_torch(backend, dtype):
    x = np.arange(1, 10, dtype=dtype).reshape(1, 1, 3, 3)
    k = np.array([[[[1, 2], [3, 4]]]], dtype=dtype)
    expected = np.array([[[[1, 4, 7, 6], [7, 23, 33, 24], [19, 53, 63, 42], [21, 52, 59, 36]]]], dtype=dtype)
    np.testing.assert_array_equal(F.conv_transpose2d(torch.tensor(x), torch.tensor(k)).numpy(), expected)
    np.testing.assert_array_equal(backend.conv_transpose2d(x, k), expected)
    # The same numbers are the input gradient of conv2d over a 4x4 input for grad_output = x.
    x4 = torch.zeros(1, 1, 4, 4, dtype=torch.float64 if dtype == np.float64 else torch.float32, requires_grad=True)
    F.conv2d(x4, torch.tensor(k)).backward(torch.tensor(x))
    np.testing.assert_array_equal(x4.grad.numpy(), expected)
    np.testing.assert_array_equal(backend.conv2d_backward(x, np.zeros((1, 1, 4, 4), dtype), k).input, expected)
