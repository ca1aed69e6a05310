"""Every op, forward and backward, on every backend, against the plain-loop reference in loops.py."""

from __future__ import annotations

import loops
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close

# -- conv2d ------------------------------------------------------------------------------------

# (n, c_in, h, w, c_out, (kh, kw), options); odd sizes throughout, every option away from its default somewhere.
CONV2D_CASES = {
    "plain": (1, 1, 5, 7, 1, (3, 3), {}),
    "batch_channels": (2, 3, 7, 6, 4, (3, 2), {}),
    "stride2_pad1": (2, 3, 7, 6, 4, (3, 3), dict(stride=2, padding=1)),
    "stride_pair_pad_pair": (2, 2, 9, 8, 3, (3, 3), dict(stride=(2, 3), padding=(1, 2))),
    "pad_pair_tall": (1, 2, 5, 6, 2, (2, 3), dict(padding=(2, 0))),
    "dilation2": (1, 2, 9, 9, 2, (3, 3), dict(dilation=2, padding=2)),
    "dilation_pair": (2, 2, 9, 8, 3, (2, 3), dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1))),
    "groups2_bias": (2, 4, 6, 7, 6, (3, 3), dict(groups=2, bias=True)),
    "depthwise": (2, 3, 6, 6, 3, (3, 3), dict(groups=3, padding=1)),
    "depthwise_multiplier": (1, 3, 5, 7, 6, (2, 3), dict(groups=3, stride=2, bias=True)),
    "kernel1x1": (2, 4, 5, 5, 3, (1, 1), dict(stride=2, bias=True)),
    "kernel1x1_pad": (1, 2, 3, 4, 2, (1, 1), dict(padding=1)),
    "same_odd": (2, 2, 5, 6, 3, (3, 3), dict(padding="same", bias=True)),
    "same_even": (1, 2, 5, 6, 2, (2, 4), dict(padding="same")),
    "same_even_dilated": (2, 1, 7, 6, 2, (4, 2), dict(padding="same", dilation=(1, 3))),
    "same_groups": (1, 4, 5, 5, 4, (2, 2), dict(padding="same", groups=2)),
    "valid": (1, 2, 6, 5, 2, (3, 2), dict(padding="valid")),
    "kernel_fills_input": (2, 2, 3, 4, 3, (3, 4), {}),
    "stride_past_kernel": (1, 2, 8, 7, 2, (2, 2), dict(stride=3, bias=True)),
    "everything": (2, 4, 8, 9, 4, (2, 3), dict(stride=2, padding=(1, 0), dilation=2, groups=2, bias=True)),
}


def explicit_pads(padding, kernel, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for a conv2d padding argument, as torch documents it.

    'same' pads d*(k-1) in total per axis with the extra pixel of an odd total at the end.
    """
    kh, kw = kernel
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph, pw, pw)


def as_pair(v):
    """torch's reading of a size argument: an int or (v,) means (v, v)."""
    return (v, v) if isinstance(v, int) else tuple(v) * (3 - len(v))


def make_conv2d(rng, dtype, case):
    n, c_in, h, w, c_out, kernel, options = case
    options = dict(options)
    with_bias = options.pop("bias", False)
    groups = options.get("groups", 1)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    weight = rng.standard_normal((c_out, c_in // groups, *kernel)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype) if with_bias else None
    return x, weight, bias, options


def conv2d_reference_options(options, kernel):
    return dict(
        stride=as_pair(options.get("stride", 1)),
        pads=explicit_pads(options.get("padding", 0), kernel, options.get("dilation", 1)),
        dilation=as_pair(options.get("dilation", 1)),
        groups=options.get("groups", 1),
    )


@pytest.mark.parametrize("case", CONV2D_CASES.values(), ids=CONV2D_CASES.keys())
def test_conv2d_forward(backend, dtype, rng, case):
    x, weight, bias, options = make_conv2d(rng, dtype, case)
    y = backend.conv2d(x, weight, bias, **options)
    assert y.dtype == dtype
    assert_close(y, loops.conv2d(x, weight, bias, **conv2d_reference_options(options, case[5])), dtype)


@pytest.mark.parametrize("case", CONV2D_CASES.values(), ids=CONV2D_CASES.keys())
def test_conv2d_backward(backend, dtype, rng, case):
    x, weight, bias, options = make_conv2d(rng, dtype, case)
    ref = conv2d_reference_options(options, case[5])
    out_shape = loops.conv2d_output_shape(x.shape, weight.shape, ref["stride"], ref["pads"], ref["dilation"])
    gy = rng.standard_normal(out_shape).astype(dtype)
    grads = backend.conv2d_backward(gy, x, weight, bias, **options)
    gx, gw, gb = loops.conv2d_backward(gy, x, weight, bias is not None, **ref)
    assert grads.input.dtype == grads.weight.dtype == dtype
    assert_close(grads.input, gx, dtype, what="input grad")
    assert_close(grads.weight, gw, dtype, what="weight grad")
    if bias is None:
        assert grads.bias is None
    else:
        assert grads.bias.dtype == dtype
        assert_close(grads.bias, gb, dtype, what="bias grad")


# -- conv_transpose2d --------------------------------------------------------------------------

# (n, c_in, h, w, c_out, (kh, kw), options); weight is (c_in, c_out/groups, kh, kw).
CONV_TRANSPOSE2D_CASES = {
    "plain": (1, 1, 3, 4, 1, (2, 2), {}),
    "batch_channels_bias": (2, 3, 3, 5, 2, (3, 2), dict(bias=True)),
    "stride2": (2, 2, 3, 3, 3, (3, 3), dict(stride=2)),
    "stride2_pad1_outpad1": (1, 2, 4, 3, 2, (3, 3), dict(stride=2, padding=1, output_padding=1)),
    "stride_pair_outpad_pair": (2, 2, 3, 4, 3, (2, 3), dict(stride=(2, 3), padding=(0, 1), output_padding=(1, 2))),
    "dilation2": (1, 2, 4, 3, 2, (3, 2), dict(dilation=2, padding=1)),
    # output_padding below the dilation but not the stride: the output grows past the last window.
    "dilation_outpad": (2, 1, 3, 4, 2, (3, 3), dict(dilation=2, output_padding=1)),
    "groups2_bias": (2, 4, 3, 4, 6, (3, 3), dict(groups=2, stride=2, bias=True)),
    "depthwise": (1, 3, 4, 4, 3, (3, 3), dict(groups=3, padding=1)),
    "kernel1x1": (2, 3, 3, 3, 2, (1, 1), dict(stride=2, output_padding=1, bias=True)),
    "kernel1x1_pad": (1, 2, 4, 5, 2, (1, 1), dict(padding=(1, 0))),
    "pad_shrinks": (1, 2, 5, 5, 2, (3, 3), dict(padding=2)),
    "everything": (
        2, 4, 3, 4, 6, (3, 2),
        dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 1), dilation=(1, 2), groups=2, bias=True),
    ),
}  # fmt: skip


def make_conv_transpose2d(rng, dtype, case):
    n, c_in, h, w, c_out, kernel, options = case
    options = dict(options)
    with_bias = options.pop("bias", False)
    groups = options.get("groups", 1)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    weight = rng.standard_normal((c_in, c_out // groups, *kernel)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype) if with_bias else None
    return x, weight, bias, options


def conv_transpose2d_reference_options(options):
    return dict(
        stride=as_pair(options.get("stride", 1)),
        padding=as_pair(options.get("padding", 0)),
        output_padding=as_pair(options.get("output_padding", 0)),
        groups=options.get("groups", 1),
        dilation=as_pair(options.get("dilation", 1)),
    )


@pytest.mark.parametrize("case", CONV_TRANSPOSE2D_CASES.values(), ids=CONV_TRANSPOSE2D_CASES.keys())
def test_conv_transpose2d_forward(backend, dtype, rng, case):
    x, weight, bias, options = make_conv_transpose2d(rng, dtype, case)
    y = backend.conv_transpose2d(x, weight, bias, **options)
    assert y.dtype == dtype
    assert_close(y, loops.conv_transpose2d(x, weight, bias, **conv_transpose2d_reference_options(options)), dtype)


@pytest.mark.parametrize("case", CONV_TRANSPOSE2D_CASES.values(), ids=CONV_TRANSPOSE2D_CASES.keys())
def test_conv_transpose2d_backward(backend, dtype, rng, case):
    x, weight, bias, options = make_conv_transpose2d(rng, dtype, case)
    ref = conv_transpose2d_reference_options(options)
    out_shape = loops.conv_transpose2d_output_shape(
        x.shape, weight.shape, ref["stride"], ref["padding"], ref["output_padding"], ref["dilation"], ref["groups"]
    )
    gy = rng.standard_normal(out_shape).astype(dtype)
    grads = backend.conv_transpose2d_backward(gy, x, weight, bias, **options)
    gx, gw, gb = loops.conv_transpose2d_backward(gy, x, weight, bias is not None, **ref)
    assert grads.input.dtype == grads.weight.dtype == dtype
    assert_close(grads.input, gx, dtype, what="input grad")
    assert_close(grads.weight, gw, dtype, what="weight grad")
    if bias is None:
        assert grads.bias is None
    else:
        assert_close(grads.bias, gb, dtype, what="bias grad")


# -- pooling -----------------------------------------------------------------------------------

# (n, c, h, w, kernel_size, options)
MAX_POOL_CASES = {
    "k2_default_stride": (1, 1, 5, 7, 2, {}),
    "k3_s2_p1": (2, 3, 7, 6, 3, dict(stride=2, padding=1)),
    "k_pair_s_pair_p_pair": (2, 2, 6, 7, (2, 3), dict(stride=(1, 2), padding=(1, 0))),
    "k3_s1_dil2_p1": (1, 2, 7, 7, 3, dict(stride=1, padding=1, dilation=2)),
    "dil_pair": (2, 1, 6, 7, (2, 3), dict(stride=(2, 1), dilation=(2, 1))),
    "k1x1_s2": (1, 2, 5, 4, 1, dict(stride=2)),
    "k3x1_p": (1, 2, 5, 4, (3, 1), dict(stride=1, padding=(1, 0))),
    "window_is_input": (2, 2, 3, 3, 3, {}),
    # The single window reaches past the image: its last taps read padding only.
    "taps_in_padding": (1, 1, 2, 2, 2, dict(stride=1, padding=1, dilation=3)),
    "ceil": (1, 2, 7, 8, 3, dict(stride=2, ceil_mode=True)),
    "ceil_pad_dilation": (2, 1, 9, 6, (3, 2), dict(stride=(2, 3), padding=(1, 1), dilation=(2, 1), ceil_mode=True)),
    # ceil mode would add a window starting in the right padding: torch drops it.
    "ceil_drops_window_in_padding": (1, 1, 5, 5, 2, dict(stride=2, padding=1, ceil_mode=True)),
    "ceil_one_element_tuples": (1, 2, 6, 5, (2,), dict(stride=(3,), padding=(1,), ceil_mode=True)),
}

AVG_POOL_CASES = {
    "k2_default_stride": (1, 1, 5, 7, 2, {}),
    "k3_s2_p1": (2, 3, 7, 6, 3, dict(stride=2, padding=1)),
    "k_pair_s_pair_p_pair": (2, 2, 6, 7, (2, 3), dict(stride=(1, 2), padding=(1, 1))),
    "k3_s1_p1": (1, 2, 5, 5, 3, dict(stride=1, padding=1)),
    "k1x1": (2, 2, 3, 4, 1, dict(stride=1)),
    "stride_none": (1, 2, 7, 5, (3, 2), dict(stride=None)),
    "window_is_input": (2, 1, 4, 3, (4, 3), {}),
    "ceil_include_pad": (1, 2, 7, 6, 3, dict(stride=2, padding=1, ceil_mode=True)),
    "ceil_exclude_pad": (2, 1, 6, 7, (3, 2), dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    "exclude_pad": (1, 2, 5, 6, 3, dict(stride=1, padding=1, count_include_pad=False)),
    "divisor_override": (1, 2, 5, 5, 2, dict(divisor_override=3)),
    "negative_divisor_ceil": (1, 1, 5, 6, 3, dict(stride=2, ceil_mode=True, divisor_override=-2)),
}


def pool_reference_options(kernel_size, options, with_dilation=True):
    kernel = as_pair(kernel_size)
    stride = options.get("stride")
    ref = dict(
        kernel_size=kernel,
        stride=kernel if stride is None else as_pair(stride),
        padding=as_pair(options.get("padding", 0)),
    )
    if with_dilation:
        ref["dilation"] = as_pair(options.get("dilation", 1))
    ref.update({k: options[k] for k in ("ceil_mode", "count_include_pad", "divisor_override") if k in options})
    return ref


@pytest.mark.parametrize("case", MAX_POOL_CASES.values(), ids=MAX_POOL_CASES.keys())
def test_max_pool2d(backend, dtype, rng, case):
    n, c, h, w, kernel_size, options = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    ref = pool_reference_options(kernel_size, options)
    y = backend.max_pool2d(x, kernel_size, **options)
    assert y.dtype == dtype
    # A max selects an element: the result is exact in either dtype, and so are torch's flat indices.
    y_ref, indices_ref = loops.max_pool2d(x, **ref, return_indices=True)
    np.testing.assert_array_equal(y, y_ref.astype(dtype))
    y2, indices = backend.max_pool2d(x, kernel_size, **options, return_indices=True)
    np.testing.assert_array_equal(y2, y)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, indices_ref)
    gy = rng.standard_normal(y.shape).astype(dtype)
    grads = backend.max_pool2d_backward(gy, x, kernel_size, **options)
    assert grads.weight is None and grads.bias is None
    assert_close(grads.input, loops.max_pool2d_backward(gy, x, **ref), dtype)


@pytest.mark.parametrize("case", MAX_POOL_CASES.values(), ids=MAX_POOL_CASES.keys())
def test_max_pool2d_ties_go_to_first_max(backend, dtype, rng, case):
    n, c, h, w, kernel_size, options = case
    # Three distinct values on many pixels: most windows hold tied maxima.
    x = rng.integers(-1, 2, size=(n, c, h, w)).astype(dtype)
    ref = pool_reference_options(kernel_size, options)
    np.testing.assert_array_equal(backend.max_pool2d(x, kernel_size, **options), loops.max_pool2d(x, **ref))
    gy = rng.standard_normal(loops.pool_output_shape(x.shape, **ref)).astype(dtype)
    grads = backend.max_pool2d_backward(gy, x, kernel_size, **options)
    assert_close(grads.input, loops.max_pool2d_backward(gy, x, **ref), dtype)


def test_max_pool2d_nan_is_the_max(backend, dtype):
    x = np.array([[[[1.0, np.nan, 5.0], [np.nan, 2.0, 3.0], [4.0, 0.0, 7.0]]]], dtype=dtype)
    y = backend.max_pool2d(x, 2, stride=1)
    np.testing.assert_array_equal(y, loops.max_pool2d(x, (2, 2), (1, 1)))
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 1, 0]) and y[0, 0, 1, 1] == 7.0
    gy = np.arange(1, 5, dtype=dtype).reshape(1, 1, 2, 2)
    grads = backend.max_pool2d_backward(gy, x, 2, stride=1)
    np.testing.assert_array_equal(grads.input, loops.max_pool2d_backward(gy, x, (2, 2), (1, 1)))


@pytest.mark.parametrize("case", AVG_POOL_CASES.values(), ids=AVG_POOL_CASES.keys())
def test_avg_pool2d(backend, dtype, rng, case):
    n, c, h, w, kernel_size, options = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    ref = pool_reference_options(kernel_size, options, with_dilation=False)
    y = backend.avg_pool2d(x, kernel_size, **options)
    assert y.dtype == dtype
    assert_close(y, loops.avg_pool2d(x, **ref), dtype)
    gy = rng.standard_normal(y.shape).astype(dtype)
    grads = backend.avg_pool2d_backward(gy, x, kernel_size, **options)
    assert grads.weight is None and grads.bias is None
    assert_close(grads.input, loops.avg_pool2d_backward(gy, x.shape, **ref), dtype)


# -- relu --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (1, 2, 7, 3)])
def test_relu(backend, dtype, rng, shape):
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[::3] = 0.0  # exact zeros: relu(0) = 0 and no gradient flows through them
    y = backend.relu(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, loops.relu(x))
    gy = rng.standard_normal(shape).astype(dtype)
    grads = backend.relu_backward(gy, x)
    assert grads.weight is None and grads.bias is None
    np.testing.assert_array_equal(grads.input, loops.relu_backward(gy, x))


def test_relu_keeps_nan(backend, dtype):
    x = np.array([np.nan, -1.0, 0.0, 2.0], dtype=dtype).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(backend.relu(x), loops.relu(x))
    # torch's rule, "0 where the result <= 0": the NaN's result is NaN, so its gradient passes.
    np.testing.assert_array_equal(backend.relu_backward(np.ones_like(x), x).input, [[[[1, 0], [0, 1]]]])
    np.testing.assert_array_equal(loops.relu_backward(np.ones_like(x), x), [[[[1, 0], [0, 1]]]])


# -- the contract's reference experiments 1 and 2 (exact) -------------------------------------

A = [[1, 3, 1, 4], [2, 8, 5, 1], [3, 2, 0, 3]]
K = [[1, 0], [-1, 1]]
A_CONV_K = [[7, 0, -3], [1, 6, 8]]

NINE = np.arange(1, 10).reshape(3, 3)
K2 = [[1, 2], [3, 4]]
NINE_TRANSPOSED_K2 = [[1, 4, 7, 6], [7, 23, 33, 24], [19, 53, 63, 42], [21, 52, 59, 36]]


# -- unbatched inputs, empty batches, half dtypes, 0-d relu ---------------------------------------

UNBATCHED_CALLS = {
    "conv2d": lambda b, x: b.conv2d(x, np.linspace(-1, 1, 24).reshape(4, 2, 1, 3), np.arange(4.0), padding=(1,)),
    "conv_transpose2d": lambda b, x: b.conv_transpose2d(x, np.linspace(-1, 1, 18).reshape(2, 1, 3, 3), stride=2),
    "max_pool2d": lambda b, x: b.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, return_indices=True),
    "avg_pool2d": lambda b, x: b.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False),
}


def _results(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("op", UNBATCHED_CALLS)
def test_unbatched_input_gives_the_batch_of_one_result_without_its_batch_axis(backend, rng, op):
    x = rng.standard_normal((2, 5, 6))
    call = UNBATCHED_CALLS[op]
    for got, batched in zip(_results(call(backend, x)), _results(call(backend, x[None]))):
        assert got.shape == batched.shape[1:]
        np.testing.assert_array_equal(got, batched[0])
    weight = {"conv2d": np.ones((4, 2, 1, 3)), "conv_transpose2d": np.ones((2, 1, 3, 3))}.get(op)
    options = {
        "conv2d": dict(padding=(1,)), "conv_transpose2d": dict(stride=2),
        "max_pool2d": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), "avg_pool2d": dict(kernel_size=2, ceil_mode=True),
    }[op]  # fmt: skip
    tensors = [x] if weight is None else [x, weight]
    gy = rng.standard_normal(_results(call(backend, x))[0].shape)
    grads = getattr(backend, op + "_backward")(gy, *tensors, **options)
    grads_batched = getattr(backend, op + "_backward")(gy[None], x[None], *tensors[1:], **options)
    assert grads.input.shape == x.shape
    np.testing.assert_array_equal(grads.input, grads_batched.input[0])
    if weight is not None:
        np.testing.assert_array_equal(grads.weight, grads_batched.weight)


@pytest.mark.parametrize("op", UNBATCHED_CALLS)
def test_an_empty_batch_gives_empty_results_and_zero_parameter_gradients(backend, op):
    x = np.ones((0, 2, 5, 6))
    outs = _results(UNBATCHED_CALLS[op](backend, x))
    assert all(o.shape[0] == 0 for o in outs)
    assert outs[0].dtype == np.float64 and (len(outs) == 1 or outs[1].dtype == np.int64)
    if op == "conv2d":
        assert outs[0].shape == (0, 4, 7, 6)
        grads = backend.conv2d_backward(np.ones((0, 4, 7, 6)), x, np.ones((4, 2, 1, 3)), np.ones(4), padding=1)
        assert grads.input.shape == x.shape
        np.testing.assert_array_equal(grads.weight, np.zeros((4, 2, 1, 3)))
        np.testing.assert_array_equal(grads.bias, np.zeros(4))


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4, 5, 2)])
def test_relu_takes_any_shape_and_keeps_it(backend, rng, shape):
    x = np.asarray(rng.standard_normal(shape))
    y = backend.relu(x)
    assert y.shape == shape and y.dtype == x.dtype
    np.testing.assert_array_equal(y, loops.relu(x))
    gy = np.asarray(rng.standard_normal(shape))
    gx = backend.relu_backward(gy, x).input
    assert gx.shape == shape
    np.testing.assert_array_equal(gx, loops.relu_backward(gy, x))


HALF = {"float16": (np.float16, 2e-3), "bfloat16": (ml_dtypes.bfloat16, 1.6e-2)}


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("case", ["conv2d", "max_pool2d", "avg_pool2d"])
def test_half_dtypes_compute_in_float32_and_return_the_input_dtype(backend, rng, half, case):
    dtype, rtol = HALF[half]
    x = rng.standard_normal((2, 3, 6, 7)).astype(dtype)
    if case == "conv2d":
        w = rng.standard_normal((4, 3, 3, 2)).astype(dtype)
        y = backend.conv2d(x, w, stride=(2, 1), padding=1)
        ref = loops.conv2d(x, w, stride=(2, 1), pads=(1, 1, 1, 1))
        gy = rng.standard_normal(y.shape).astype(dtype)
        grads = backend.conv2d_backward(gy, x, w, stride=(2, 1), padding=1)
        grads_ref = loops.conv2d_backward(gy, x, w, stride=(2, 1), pads=(1, 1, 1, 1))[:2]
    else:
        options = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        y = getattr(backend, case)(x, **options)
        ref_options = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=True)
        ref = getattr(loops, case)(x, **ref_options)
        gy = rng.standard_normal(y.shape).astype(dtype)
        grads = getattr(backend, case + "_backward")(gy, x, **options)
        grads_ref = [
            loops.max_pool2d_backward(gy, x, **ref_options) if case == "max_pool2d"
            else loops.avg_pool2d_backward(gy, x.shape, **ref_options)
        ]  # fmt: skip
    assert y.dtype == dtype
    assert_close(y, ref, rtol=rtol, what="output")
    for got, want in zip([g for g in grads if g is not None], grads_ref):
        assert got.dtype == dtype
        assert_close(got, want, rtol=rtol, what="gradient")


def as4d(a, dtype):
    return np.asarray(a, dtype=dtype)[None, None]


def test_experiment1_conv2d(backend, dtype):
    y = backend.conv2d(as4d(A, dtype), as4d(K, dtype), padding="valid", stride=1)
    np.testing.assert_array_equal(y, as4d(A_CONV_K, dtype))
    np.testing.assert_array_equal(loops.conv2d(as4d(A, dtype), as4d(K, dtype)), as4d(A_CONV_K, dtype))


def test_experiment2_conv_transpose2d(backend, dtype):
    x, k = as4d(NINE, dtype), as4d(K2, dtype)
    y = backend.conv_transpose2d(x, k)
    np.testing.assert_array_equal(y, as4d(NINE_TRANSPOSED_K2, dtype))
    np.testing.assert_array_equal(loops.conv_transpose2d(x, k), as4d(NINE_TRANSPOSED_K2, dtype))
    # ... and it is the input gradient of the 4x4 -> 3x3 conv with that kernel, for grad_output = input.
    grads = backend.conv2d_backward(x, np.zeros((1, 1, 4, 4), dtype), k)
    np.testing.assert_array_equal(grads.input, as4d(NINE_TRANSPOSED_K2, dtype))


# -- memory layout and aliasing ----------------------------------------------------------------


def strided_copy(a):
    """The same values in a non-contiguous, negatively strided view."""
    return np.ascontiguousarray(a[..., ::-1])[..., ::-1]


def test_layout_does_not_matter_and_inputs_are_untouched(backend, dtype, rng):
    x = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
    w = rng.standard_normal((4, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    gy = rng.standard_normal((2, 4, 3, 3)).astype(dtype)
    calls = {
        "conv2d": lambda x, w, b, gy: backend.conv2d(x, w, b, stride=2, padding=1, groups=2),
        "conv2d_backward": lambda x, w, b, gy: backend.conv2d_backward(gy, x, w, b, stride=2, padding=1, groups=2),
        "conv_transpose2d": lambda x, w, b, gy: backend.conv_transpose2d(gy, w, b, stride=2, padding=1, groups=2),
        "max_pool2d_backward": lambda x, w, b, gy: backend.max_pool2d_backward(gy, x, 2),
        "avg_pool2d_backward": lambda x, w, b, gy: backend.avg_pool2d_backward(gy, x, 2),
        "relu_backward": lambda x, w, b, gy: backend.relu_backward(x, x),
    }
    for name, call in calls.items():
        expected = call(x, w, b, gy)
        args = [strided_copy(x), np.asfortranarray(w), b[::-1].copy()[::-1], np.asfortranarray(gy)]
        before = [a.copy() for a in args]
        got = call(*args)
        for a, saved in zip(args, before):
            np.testing.assert_array_equal(a, saved, err_msg=f"{name} modified an input")
        if not isinstance(expected, tuple):
            expected, got = (expected,), (got,)
        for e, g in zip(expected, got):
            if e is not None:
                np.testing.assert_array_equal(g, e, err_msg=name)
                assert not any(np.shares_memory(g, a) for a in args), f"{name} returned a view of an input"


def test_big_endian_inputs_compute_like_native_ones(backend):
    x = np.arange(-4.0, 5.0).reshape(1, 1, 3, 3)
    w = np.array([[1.0, -2.0], [0.5, 3.0]]).reshape(1, 1, 2, 2)
    got = backend.conv2d(x.astype(">f8"), w.astype(">f8"))
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, backend.conv2d(x, w))
