"""Op cases and helpers shared by the array-kernel parity tests (CPU) and the CuPy tests (GPU).

Each case is an op name, the shapes of its tensor inputs and its keyword options; the helpers run
an op forward and backward on a backend and bring every result back to the host.
"""

from __future__ import annotations

import numpy as np

from convrpc.core import params

# (input shape, weight shape, options): N = 3 so a two-sample workspace really tiles the batch.
CONV2D_CASES = [
    ((3, 3, 7, 6), (4, 3, 3, 3), {}),
    ((3, 4, 9, 8), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 2), groups=2)),
    ((3, 3, 10, 9), (2, 3, 3, 2), dict(stride=2, padding=2, dilation=(2, 3))),
    ((3, 4, 8, 8), (8, 1, 3, 3), dict(padding="same", groups=4)),  # depthwise, channel multiplier 2
    ((3, 2, 7, 6), (3, 2, 2, 4), dict(padding="same", dilation=(1, 2))),  # even kernel: odd pad bottom/right
    ((3, 3, 6, 7), (3, 3, 2, 2), dict(padding="valid", stride=3)),  # windows skip the last rows
    ((3, 6, 5, 5), (6, 1, 1, 1), dict(groups=6)),
]

# (input shape, weight shape (C_in, K/groups, kh, kw), options).
CONV_TRANSPOSE2D_CASES = [
    ((3, 3, 4, 5), (3, 2, 3, 3), {}),
    ((3, 4, 3, 4), (4, 3, 3, 2), dict(stride=2, padding=1, output_padding=1, groups=2)),
    ((3, 2, 4, 4), (2, 2, 2, 3), dict(stride=(3, 2), output_padding=(2, 1), dilation=(1, 2))),
    # output_padding below the dilation but not below the stride: the padded input reaches past the last window.
    ((3, 4, 5, 3), (4, 1, 3, 3), dict(padding=1, output_padding=(1, 0), groups=4, dilation=2)),
]

MAX_POOL2D_CASES = [
    ((2, 3, 7, 8), dict(kernel_size=2)),
    ((2, 2, 9, 7), dict(kernel_size=(3, 2), stride=(2, 1), padding=1)),
    ((1, 3, 10, 9), dict(kernel_size=3, stride=2, padding=1, dilation=(2, 1))),
    ((2, 2, 7, 8), dict(kernel_size=3, stride=2, ceil_mode=True, return_indices=True)),
    ((1, 3, 9, 6), dict(kernel_size=(3, 2), stride=(2, 3), padding=1, dilation=(2, 1), ceil_mode=True, return_indices=True)),
    ((2, 3, 7), dict(kernel_size=(2,), stride=(2,), padding=(1,), ceil_mode=True, return_indices=True)),  # unbatched
]

AVG_POOL2D_CASES = [
    ((2, 3, 7, 8), dict(kernel_size=2)),
    ((2, 2, 9, 7), dict(kernel_size=(3, 2), stride=(2, 1), padding=1)),
    ((1, 3, 10, 9), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 2, 7, 8), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((2, 2, 7, 8), dict(kernel_size=(3, 2), stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ((1, 3, 6, 9), dict(kernel_size=2, stride=(1, 2), divisor_override=-3, ceil_mode=True)),
    ((0, 2, 5, 5), dict(kernel_size=2)),  # an empty batch
]

TORCH_CASES = (
    [("conv2d", c) for c in CONV2D_CASES]
    + [("conv_transpose2d", c) for c in CONV_TRANSPOSE2D_CASES]
    + [("max_pool2d", c) for c in MAX_POOL2D_CASES]
    + [("avg_pool2d", c) for c in AVG_POOL2D_CASES]
    + [("relu", ((2, 3, 5, 4), {}))]
)
TORCH_IDS = [f"{op}-{i}" for i, (op, _) in enumerate(TORCH_CASES)]


def tolerance(dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-4) if np.dtype(dtype) == np.float32 else dict(rtol=1e-10, atol=1e-10)


def conv_geometry(op: str, shapes, options) -> params.ConvGeometry:
    """The geometry the kernels see for a conv case (the adjoint conv2d's for conv_transpose2d)."""
    if op == "conv2d":
        return params.conv2d_geometry(shapes[0], shapes[1], None, **options)
    return params.conv_transpose2d_geometry(shapes[0], shapes[1], None, **options)


def make_arrays(reference, op: str, shapes, options, dtype, seed: int = 0, values: str = "normal"):
    """Random host inputs of ``op`` (a bias for convs) and a random gradient shaped like its output.

    ``values``: "normal" draws N(0, 1); "ties" draws from {-2..2} so windows hold equal maxima;
    "nan" is "ties" with about one element in six NaN, so some windows hold several NaNs.
    """
    rng = np.random.default_rng(seed)
    inputs = []
    for shape in shapes:
        if values == "normal":
            a = rng.standard_normal(shape)
        else:
            a = rng.integers(-2, 3, size=shape).astype(float)
            if values == "nan":
                a[rng.random(shape) < 1 / 6] = np.nan
        inputs.append(a.astype(dtype))
    if op in ("conv2d", "conv_transpose2d"):
        out_channels = shapes[1][0] if op == "conv2d" else shapes[1][1] * options.get("groups", 1)
        inputs.append(rng.standard_normal(out_channels).astype(dtype))
    y = getattr(reference, op)(*inputs, **{k: v for k, v in options.items() if k != "return_indices"})
    return inputs, rng.standard_normal(y.shape).astype(dtype)


def op_results(backend, op: str, inputs, grad_output, options, put=lambda a: a, get=np.asarray) -> list:
    """[output, *gradients] of ``op`` on ``backend``; ``put`` moves inputs there, ``get`` brings results back."""
    args = [put(a) for a in inputs]
    out = getattr(backend, op)(*args, **options)
    outs = list(out) if isinstance(out, tuple) else [out]  # (output, indices) with return_indices
    grads = getattr(backend, op + "_backward")(put(grad_output), *args, **options)
    return [get(o) for o in outs] + [get(g) for g in grads if g is not None]


def torch_results(op: str, inputs, grad_output, options) -> list:
    """[output, *gradients] of ``op`` from torch.nn.functional and autograd on the CPU (skips without torch)."""
    import pytest

    torch = pytest.importorskip("torch")
    tensors = [torch.from_numpy(a.copy()).requires_grad_(True) for a in inputs]
    out = getattr(torch.nn.functional, op)(*tensors, **options)
    outs = list(out) if isinstance(out, tuple) else [out]  # (output, indices) with return_indices
    outs[0].backward(torch.from_numpy(grad_output))
    return [o.detach().numpy() for o in outs] + [t.grad.numpy() for t in tensors]


def assert_results_match(got, expected, dtype, exact: bool = False) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, equal_nan=True, **tolerance(dtype))
