"""Bad arguments raise InvalidArgumentError naming the offending field, on every backend, before any compute."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from convrpc.core import InvalidArgumentError


def t(*shape, dtype=np.float64):
    return np.ones(shape, dtype=dtype)


X = t(1, 2, 5, 5)  # a valid conv / pool input
W = t(3, 2, 3, 3)  # a valid conv2d weight for X (and conv_transpose2d weight shape (2, 3, 3, 3) below)
WT = t(2, 3, 3, 3)

# id -> (call on a backend, field the error must name)
BAD_CALLS = {
    # rank and zero dims
    "conv2d_input_rank2": (lambda b: b.conv2d(t(5, 5), W), "input"),
    "conv2d_input_rank5": (lambda b: b.conv2d(t(1, 1, 2, 5, 5), W), "input"),
    "conv2d_weight_rank2": (lambda b: b.conv2d(X, t(3, 3)), "weight"),
    "conv2d_input_zero_channels": (lambda b: b.conv2d(t(1, 0, 5, 5), t(3, 0, 3, 3)), "input"),
    "conv2d_unbatched_input_zero_height": (lambda b: b.conv2d(t(2, 0, 5), W), "input"),
    "conv2d_input_zero_width": (lambda b: b.conv2d(t(1, 2, 5, 0), W), "input"),
    "conv2d_weight_zero_dim": (lambda b: b.conv2d(X, t(0, 2, 3, 3)), "weight"),
    "conv_transpose2d_input_rank5": (lambda b: b.conv_transpose2d(t(1, 1, 2, 5, 5), WT), "input"),
    "conv_transpose2d_weight_zero": (lambda b: b.conv_transpose2d(X, t(2, 3, 0, 3)), "weight"),
    "max_pool2d_input_rank2": (lambda b: b.max_pool2d(t(5, 5), 2), "input"),
    "avg_pool2d_input_zero": (lambda b: b.avg_pool2d(t(1, 0, 5, 5), 2), "input"),
    # groups
    "conv2d_groups_not_dividing_input": (lambda b: b.conv2d(t(1, 3, 5, 5), t(4, 1, 3, 3), groups=2), "groups"),
    "conv2d_groups_not_dividing_output": (lambda b: b.conv2d(t(1, 4, 5, 5), t(3, 2, 3, 3), groups=2), "groups"),
    "conv2d_groups_zero": (lambda b: b.conv2d(X, W, groups=0), "groups"),
    "conv2d_groups_not_int": (lambda b: b.conv2d(X, W, groups=1.0), "groups"),
    "conv_transpose2d_groups_not_dividing": (
        lambda b: b.conv_transpose2d(t(1, 3, 5, 5), t(3, 1, 3, 3), groups=2),
        "groups",
    ),
    # channel mismatch
    "conv2d_weight_channels": (lambda b: b.conv2d(X, t(3, 3, 3, 3)), "weight"),
    "conv2d_weight_channels_grouped": (lambda b: b.conv2d(t(1, 4, 5, 5), t(4, 4, 3, 3), groups=2), "weight"),
    "conv_transpose2d_weight_channels": (lambda b: b.conv_transpose2d(X, t(3, 2, 3, 3)), "weight"),
    # kernel larger than the padded input
    "conv2d_kernel_too_large": (lambda b: b.conv2d(X, t(3, 2, 6, 3)), "weight"),
    "conv2d_dilated_kernel_too_large": (lambda b: b.conv2d(X, W, dilation=3), "weight"),
    "conv2d_kernel_too_large_after_padding": (lambda b: b.conv2d(X, t(3, 2, 3, 8), padding=1), "weight"),
    "max_pool2d_window_too_large": (lambda b: b.max_pool2d(X, 3, dilation=3), "kernel_size"),
    "avg_pool2d_window_too_large": (lambda b: b.avg_pool2d(t(1, 1, 2, 5), 3, padding=0), "kernel_size"),
    "conv_transpose2d_padding_eats_output": (lambda b: b.conv_transpose2d(t(1, 2, 1, 1), WT, padding=2), "padding"),
    # stride, dilation, kernel_size <= 0 or malformed
    "conv2d_stride_zero": (lambda b: b.conv2d(X, W, stride=0), "stride"),
    "conv2d_stride_negative_pair": (lambda b: b.conv2d(X, W, stride=(1, -1)), "stride"),
    "conv2d_stride_triple": (lambda b: b.conv2d(X, W, stride=(1, 1, 1)), "stride"),
    "conv2d_stride_string": (lambda b: b.conv2d(X, W, stride="2"), "stride"),
    "conv2d_stride_bool": (lambda b: b.conv2d(X, W, stride=True), "stride"),
    "conv2d_dilation_zero": (lambda b: b.conv2d(X, W, dilation=0), "dilation"),
    "conv_transpose2d_stride_zero": (lambda b: b.conv_transpose2d(X, WT, stride=0), "stride"),
    "conv_transpose2d_dilation_zero": (lambda b: b.conv_transpose2d(X, WT, dilation=(0, 1)), "dilation"),
    "max_pool2d_stride_zero": (lambda b: b.max_pool2d(X, 2, stride=0), "stride"),
    "max_pool2d_dilation_zero": (lambda b: b.max_pool2d(X, 2, dilation=0), "dilation"),
    "max_pool2d_kernel_zero": (lambda b: b.max_pool2d(X, 0), "kernel_size"),
    "avg_pool2d_stride_negative": (lambda b: b.avg_pool2d(X, 2, stride=-1), "stride"),
    # non-integer geometry is refused, never truncated (as in torch)
    "conv2d_stride_float": (lambda b: b.conv2d(X, W, stride=1.5), "stride"),
    "conv2d_stride_integral_float": (lambda b: b.conv2d(X, W, stride=2.0), "stride"),
    "conv2d_padding_bool": (lambda b: b.conv2d(X, W, padding=True), "padding"),
    "conv2d_padding_numpy_bool": (lambda b: b.conv2d(X, W, padding=np.True_), "padding"),
    "conv2d_dilation_float_in_pair": (lambda b: b.conv2d(X, W, dilation=(1, 1.5)), "dilation"),
    "max_pool2d_kernel_float": (lambda b: b.max_pool2d(X, 2.5), "kernel_size"),
    "max_pool2d_stride_string": (lambda b: b.max_pool2d(X, 2, stride="2"), "stride"),
    "avg_pool2d_padding_empty_tuple": (lambda b: b.avg_pool2d(X, 2, padding=()), "padding"),
    "conv2d_stride_over_bound": (lambda b: b.conv2d(X, W, stride=2**31), "stride"),
    "conv_transpose2d_padding_over_bound": (lambda b: b.conv_transpose2d(X, WT, padding=(0, 2**40)), "padding"),
    "conv2d_groups_over_bound": (lambda b: b.conv2d(X, W, groups=2**31), "groups"),
    # pooling flags and divisors
    "max_pool2d_ceil_mode_int": (lambda b: b.max_pool2d(X, 2, ceil_mode=1), "ceil_mode"),
    "max_pool2d_return_indices_string": (lambda b: b.max_pool2d(X, 2, return_indices="yes"), "return_indices"),
    "max_pool2d_backward_ceil_mode_none": (lambda b: b.max_pool2d_backward(t(1, 2, 2, 2), X, 2, ceil_mode=None), "ceil_mode"),
    "avg_pool2d_count_include_pad_int": (lambda b: b.avg_pool2d(X, 2, count_include_pad=0), "count_include_pad"),
    "avg_pool2d_divisor_zero": (lambda b: b.avg_pool2d(X, 2, divisor_override=0), "divisor_override"),
    "avg_pool2d_divisor_float": (lambda b: b.avg_pool2d(X, 2, divisor_override=1.5), "divisor_override"),
    "avg_pool2d_divisor_bool": (lambda b: b.avg_pool2d(X, 2, divisor_override=True), "divisor_override"),
    "avg_pool2d_backward_divisor_zero": (
        lambda b: b.avg_pool2d_backward(t(1, 2, 2, 2), X, 2, divisor_override=0),
        "divisor_override",
    ),
    # unbatched calls: grad_output is unbatched too
    "max_pool2d_backward_unbatched_grad_batched": (lambda b: b.max_pool2d_backward(t(1, 2, 2, 2), X[0], 2), "grad_output"),
    "conv2d_backward_unbatched_grad_batched": (lambda b: b.conv2d_backward(t(1, 3, 3, 3), X[0], W), "grad_output"),
    # padding
    "conv2d_padding_negative": (lambda b: b.conv2d(X, W, padding=-1), "padding"),
    "conv2d_padding_negative_pair": (lambda b: b.conv2d(X, W, padding=(1, -1)), "padding"),
    "conv2d_padding_unknown_mode": (lambda b: b.conv2d(X, W, padding="full"), "padding"),
    "conv2d_same_with_stride": (lambda b: b.conv2d(X, W, padding="same", stride=2), "padding"),
    "conv2d_same_with_stride_pair": (lambda b: b.conv2d(X, W, padding="same", stride=(1, 2)), "padding"),
    "conv_transpose2d_padding_negative": (lambda b: b.conv_transpose2d(X, WT, padding=-1), "padding"),
    "conv_transpose2d_padding_string": (lambda b: b.conv_transpose2d(X, WT, padding="same"), "padding"),
    "max_pool2d_padding_negative": (lambda b: b.max_pool2d(X, 2, padding=-1), "padding"),
    "max_pool2d_padding_over_half_kernel": (lambda b: b.max_pool2d(X, 3, padding=2), "padding"),
    "max_pool2d_padding_over_half_kernel_w": (lambda b: b.max_pool2d(X, (3, 2), padding=(1, 2)), "padding"),
    "avg_pool2d_padding_over_half_kernel": (lambda b: b.avg_pool2d(X, 2, padding=2), "padding"),
    # output_padding must be below stride or dilation
    "output_padding_equals_stride": (lambda b: b.conv_transpose2d(X, WT, stride=2, output_padding=2), "output_padding"),
    "output_padding_without_stride": (lambda b: b.conv_transpose2d(X, WT, output_padding=1), "output_padding"),
    "output_padding_w_too_large": (
        lambda b: b.conv_transpose2d(X, WT, stride=(2, 2), dilation=(1, 3), output_padding=(1, 3)),
        "output_padding",
    ),
    "output_padding_negative": (lambda b: b.conv_transpose2d(X, WT, stride=2, output_padding=-1), "output_padding"),
    # bias
    "conv2d_bias_length": (lambda b: b.conv2d(X, W, t(2)), "bias"),
    "conv2d_bias_rank": (lambda b: b.conv2d(X, W, t(1, 3)), "bias"),
    # conv_transpose2d bias has out_channels = weight.shape[1] * groups entries
    "conv_transpose2d_bias_length": (lambda b: b.conv_transpose2d(X, WT, t(2)), "bias"),
    "conv_transpose2d_bias_length_grouped": (lambda b: b.conv_transpose2d(X, t(2, 3, 3, 3), t(3), groups=2), "bias"),
    "conv2d_backward_bias_length": (lambda b: b.conv2d_backward(t(1, 3, 3, 3), X, W, t(4)), "bias"),
    # grad_output must have the op's output shape
    "conv2d_backward_grad_output": (lambda b: b.conv2d_backward(t(1, 3, 3, 4), X, W), "grad_output"),
    "conv_transpose2d_backward_grad_output_rank": (
        lambda b: b.conv_transpose2d_backward(t(1, 3, 7, 7, 1), X, WT),
        "grad_output",
    ),
    "conv_transpose2d_backward_grad_output_channels": (
        lambda b: b.conv_transpose2d_backward(t(1, 2, 7, 7), X, WT),
        "grad_output",
    ),
    "max_pool2d_backward_grad_output": (lambda b: b.max_pool2d_backward(t(1, 2, 3, 3), X, 2), "grad_output"),
    "avg_pool2d_backward_grad_output": (lambda b: b.avg_pool2d_backward(t(1, 2, 2, 3), X, 2), "grad_output"),
    "relu_backward_grad_output": (lambda b: b.relu_backward(t(1, 2, 5, 4), X), "grad_output"),
    # dtypes: float16, bfloat16, float32 or float64, one per call; integers are refused, never converted
    "conv2d_mixed_weight_dtype": (lambda b: b.conv2d(X, W.astype(np.float32)), "weight"),
    "conv2d_mixed_bias_dtype": (lambda b: b.conv2d(X, W, t(3, dtype=np.float32)), "bias"),
    "conv2d_backward_mixed_input_dtype": (lambda b: b.conv2d_backward(t(1, 3, 3, 3), X.astype(np.float32), W), "input"),
    "conv2d_backward_mixed_grad_output_dtype": (
        lambda b: b.conv2d_backward(t(1, 3, 3, 3, dtype=np.float32), X, W),
        "grad_output",
    ),
    "relu_backward_mixed_dtype": (lambda b: b.relu_backward(X, X.astype(np.float32)), "grad_output"),  # a tie: input sets it
    "conv2d_integer_input": (lambda b: b.conv2d(X.astype(np.int64), W), "input"),
    "conv2d_integer_weight": (lambda b: b.conv2d(X, W.astype(np.int32)), "weight"),
    "conv_transpose2d_int16_input": (lambda b: b.conv_transpose2d(X.astype(np.int16), WT), "input"),
    "conv2d_python_int_list_input": (lambda b: b.conv2d(X.astype(int).tolist(), W), "input"),
    "conv2d_half_weight_for_float64_input": (lambda b: b.conv2d(X, W.astype(np.float16)), "weight"),
    "max_pool2d_integer_input": (lambda b: b.max_pool2d(X.astype(np.int32), 2), "input"),
    "avg_pool2d_complex_input": (lambda b: b.avg_pool2d(X.astype(np.complex128), 2), "input"),
    "relu_bool_input": (lambda b: b.relu(X.astype(bool)), "input"),
}


@pytest.mark.parametrize("call, field", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_argument_names_its_field(backend, call, field):
    with pytest.raises(InvalidArgumentError) as info:
        call(backend)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ") and info.value.description


def test_invalid_argument_is_a_value_error():
    """Callers that only know Python's conventions can still catch it."""
    assert issubclass(InvalidArgumentError, ValueError)


# The boundaries just inside each rule are accepted, so the checks above are not over-eager.
GOOD_CALLS = {
    "kernel_equals_padded_input": lambda b: b.conv2d(X, t(3, 2, 7, 7), padding=1),
    "output_padding_below_dilation": lambda b: b.conv_transpose2d(X, WT, dilation=2, output_padding=1),
    "output_padding_below_stride": lambda b: b.conv_transpose2d(X, WT, stride=3, output_padding=2),
    "pool_padding_half_kernel": lambda b: b.max_pool2d(X, 3, padding=1),
    "pool_padding_half_even_kernel": lambda b: b.avg_pool2d(X, (2, 4), padding=(1, 2)),
    "same_with_stride_one_pair": lambda b: b.conv2d(X, W, padding="same", stride=(1, 1)),
    "numpy_int_arguments": lambda b: b.conv2d(X, W, stride=np.int64(2), padding=(np.int32(1), 0), groups=np.int8(1)),
    "stride_empty_means_kernel": lambda b: b.max_pool2d(X, 2, stride=()),
    "float32_everywhere": lambda b: b.conv2d(X.astype(np.float32), W.astype(np.float32), t(3, dtype=np.float32)),
    "depthwise": lambda b: b.conv2d(X, t(4, 1, 3, 3), groups=2),
    "one_element_tuples": lambda b: b.conv2d(X, W, stride=(1,), padding=(1,), dilation=[1]),
    "pool_one_element_tuples": lambda b: b.max_pool2d(X, (2,), stride=(1,), padding=(1,), dilation=(1,)),
    "unbatched": lambda b: b.conv2d(X[0], W),
    "empty_batch": lambda b: b.conv2d(t(0, 2, 5, 5), W),
    "float16": lambda b: b.conv_transpose2d(X.astype(np.float16), WT.astype(np.float16)),
    "bfloat16": lambda b: b.avg_pool2d(X.astype(ml_dtypes.bfloat16), 2, ceil_mode=True, divisor_override=-3),
    "numpy_bool_flags": lambda b: b.max_pool2d(X, 2, ceil_mode=np.True_, return_indices=np.False_),
    "geometry_at_the_bound": lambda b: b.max_pool2d(X, 2, stride=2**31 - 1),
}


@pytest.mark.parametrize("call", GOOD_CALLS.values(), ids=GOOD_CALLS.keys())
def test_boundary_arguments_are_accepted(backend, call):
    assert np.all(np.isfinite(call(backend)))


def test_validation_comes_before_any_allocation(backend, monkeypatch):
    """A bad option fails before the half input is widened or moved (no astype, no to_device)."""
    calls = []
    monkeypatch.setattr(backend.kernels, "to_device", lambda a: calls.append(a) or a, raising=True)
    x = X.astype(np.float16)
    with pytest.raises(InvalidArgumentError):
        backend.max_pool2d(x, 2, stride=1.5)
    assert calls == []


def test_an_output_too_big_to_address_is_refused_before_allocating(backend):
    from convrpc.core import ResourceExhaustedError

    with pytest.raises(ResourceExhaustedError) as info:
        backend.conv_transpose2d(t(1, 2, 2, 2), t(2, 1, 1, 1), stride=2**31 - 1, output_padding=2**31 - 2)
    assert info.value.field == "output"
