"""Every backward pass against central finite differences of its forward pass (float64).

The loss is ``L = sum(op(inputs) * R)`` for a fixed random ``R``, so ``dL/dinput`` is the op's
backward applied to ``grad_output = R``; each partial derivative is then
``(L(t + eps) - L(t - eps)) / (2 eps)`` one element at a time. Every op here is piecewise linear,
so away from kinks the difference quotient is exact up to rounding: inputs are chosen so that no
perturbation crosses a max-pool tie or a relu zero.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

EPS = 1e-6
#: Rounding in L(t +- eps) is ~1e-16 * |L| / eps relative: well inside this bound.
RTOL = 1e-7


def numerical_gradient(loss, tensor):
    """d loss / d tensor by central differences, perturbing ``tensor`` in place and restoring it."""
    grad = np.zeros_like(tensor)
    for idx in np.ndindex(*tensor.shape):
        saved = tensor[idx]
        tensor[idx] = saved + EPS
        up = loss()
        tensor[idx] = saved - EPS
        down = loss()
        tensor[idx] = saved
        grad[idx] = (up - down) / (2 * EPS)
    return grad


def check(forward, grads, tensors, r):
    """Compare each named tensor's analytic gradient with the numerical one of ``sum(forward() * r)``."""

    def loss():
        return float(np.sum(forward() * r))

    for name, tensor in tensors.items():
        assert_close(getattr(grads, name), numerical_gradient(loss, tensor), rtol=RTOL, what=f"{name} grad")


CONV2D_CASES = {
    "plain_bias": ((2, 2, 5, 4), (3, 2, 3, 2), dict()),
    "stride_pad_dilation": ((1, 2, 7, 6), (2, 2, 2, 3), dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1))),
    "groups": ((2, 4, 5, 5), (4, 2, 3, 3), dict(groups=2, padding=1, stride=2)),
    "same_even": ((1, 2, 5, 4), (2, 2, 2, 2), dict(padding="same")),
}


@pytest.mark.parametrize("case", CONV2D_CASES.values(), ids=CONV2D_CASES.keys())
def test_conv2d_gradients(backend, rng, case):
    x_shape, w_shape, options = case
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    r = rng.standard_normal(backend.conv2d(x, w, b, **options).shape)
    grads = backend.conv2d_backward(r, x, w, b, **options)
    check(lambda: backend.conv2d(x, w, b, **options), grads, {"input": x, "weight": w, "bias": b}, r)


CONV_TRANSPOSE2D_CASES = {
    "plain_bias": ((2, 2, 3, 4), (2, 3, 2, 2), dict()),
    "stride_pad_outpad": ((1, 2, 3, 3), (2, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    "dilation_outpad": ((1, 1, 3, 2), (1, 2, 2, 3), dict(dilation=2, output_padding=(1, 0))),
    "groups": ((2, 4, 3, 3), (4, 1, 2, 3), dict(groups=2, stride=(1, 2), padding=(0, 1))),
}


@pytest.mark.parametrize("case", CONV_TRANSPOSE2D_CASES.values(), ids=CONV_TRANSPOSE2D_CASES.keys())
def test_conv_transpose2d_gradients(backend, rng, case):
    x_shape, w_shape, options = case
    groups = options.get("groups", 1)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[1] * groups)
    r = rng.standard_normal(backend.conv_transpose2d(x, w, b, **options).shape)
    grads = backend.conv_transpose2d_backward(r, x, w, b, **options)
    check(lambda: backend.conv_transpose2d(x, w, b, **options), grads, {"input": x, "weight": w, "bias": b}, r)


def distinct_values(rng, shape):
    """A shuffled arithmetic sequence: all values differ by far more than 2*EPS, so max pools have no ties."""
    return rng.permutation(np.arange(int(np.prod(shape))) * 0.1 - 1.0).reshape(shape)


POOL_CASES = {
    "default_stride": ((2, 2, 5, 5), 2, dict()),
    "stride_pad": ((1, 2, 6, 5), 3, dict(stride=2, padding=1)),
    "overlapping_pairs": ((1, 1, 5, 6), (2, 3), dict(stride=(1, 2), padding=(1, 1))),
}


@pytest.mark.parametrize("case", POOL_CASES.values(), ids=POOL_CASES.keys())
@pytest.mark.parametrize("dilation", [1, 2])
def test_max_pool2d_gradients(backend, rng, case, dilation):
    x_shape, kernel_size, options = case
    x = distinct_values(rng, x_shape)
    r = rng.standard_normal(backend.max_pool2d(x, kernel_size, dilation=dilation, **options).shape)
    grads = backend.max_pool2d_backward(r, x, kernel_size, dilation=dilation, **options)
    check(lambda: backend.max_pool2d(x, kernel_size, dilation=dilation, **options), grads, {"input": x}, r)


@pytest.mark.parametrize("case", POOL_CASES.values(), ids=POOL_CASES.keys())
def test_avg_pool2d_gradients(backend, rng, case):
    x_shape, kernel_size, options = case
    x = rng.standard_normal(x_shape)
    r = rng.standard_normal(backend.avg_pool2d(x, kernel_size, **options).shape)
    grads = backend.avg_pool2d_backward(r, x, kernel_size, **options)
    check(lambda: backend.avg_pool2d(x, kernel_size, **options), grads, {"input": x}, r)


def test_relu_gradients(backend, rng):
    x = rng.standard_normal((2, 3, 4, 3))
    x += np.where(x >= 0, 0.1, -0.1)  # keep every element well away from the kink at zero
    r = rng.standard_normal(x.shape)
    check(lambda: backend.relu(x), backend.relu_backward(r, x), {"input": x}, r)
