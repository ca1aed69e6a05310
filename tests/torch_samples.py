"""PyTorch's own test inputs of our five ops, as calls spelled exactly as torch spells them.

Every OpInfo sample of ``op_db`` (nn.functional.conv2d, conv_transpose2d, max_pool2d, avg_pool2d, relu and
max_pool2d_with_indices_backward) and every ModuleInfo input of ``module_db`` (nn.Conv2d, ConvTranspose2d,
MaxPool2d, AvgPool2d, ReLU), with torch's CPU result, and the comparison both acceptance suites use: on the
core's backends (test_torch_opinfo.py) and through the SDK (test_torch_opinfo_sdk.py). Importing this
module skips the importing test module when torch (or expecttest, which torch's test internals import) is
missing.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402


DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}

#: OpInfo name -> our op.
OPS = {
    "nn.functional.conv2d": "conv2d",
    "nn.functional.conv_transpose2d": "conv_transpose2d",
    "nn.functional.max_pool2d": "max_pool2d",
    "nn.functional.avg_pool2d": "avg_pool2d",
    "nn.functional.relu": "relu",
    "max_pool2d_with_indices_backward": "max_pool2d_backward",
}
MODULES = ("Conv2d", "ConvTranspose2d", "MaxPool2d", "AvgPool2d", "ReLU")
#: The defaults of the OpInfo's wrapper function (``max_pool2d_backward`` in common_methods_invocations).
_WITH_INDICES_BACKWARD_DEFAULTS = dict(kernel_size=(), stride=(), padding=(0,), dilation=(1,), ceil_mode=False)


def to_numpy(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()


def to_torch(a, dtype):
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.asarray(a, order="C").view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.asarray(a, order="C"))  # 0-d stays 0-d


class Call:
    """One sample: our op with its arguments as torch spells them, and torch's function of the same tensors.

    ``torch_fn(*leaves)`` recomputes torch's result from fresh leaf tensors (input, weight, bias, in
    that order), so autograd gives the gradient of each.
    """

    def __init__(self, op, args, kwargs, torch_fn, tensors):
        self.op, self.args, self.kwargs = op, _np_args(args), kwargs
        self.torch_fn, self.tensors = torch_fn, tensors

    def __repr__(self):
        shapes = [tuple(a.shape) if isinstance(a, np.ndarray) else a for a in self.args]
        return f"{self.op}{shapes} {self.kwargs}"


def _np_args(args):
    return [to_numpy(a) if isinstance(a, torch.Tensor) else a for a in args]


def _with_leaves(args, leaves):
    """``args`` with each tensor replaced, in order, by the next of ``leaves``."""
    leaves = iter(leaves)
    return [next(leaves) if isinstance(a, torch.Tensor) else a for a in args]


def op_calls(name: str, dtype) -> list[Call]:
    """Every OpInfo sample of ``name`` in ``dtype``."""
    (info,) = [o for o in op_db if o.name == name and o.variant_test_name == ""]
    calls = []
    for s in info.sample_inputs("cpu", dtype, requires_grad=True):
        args = [s.input, *s.args]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        kwargs = dict(s.kwargs)
        if name == "max_pool2d_with_indices_backward":
            kwargs = {**_WITH_INDICES_BACKWARD_DEFAULTS, **kwargs}
            kwargs.pop("return_indices", None)  # the wrapper swallows it

        def torch_fn(*leaves, args=args, s=s):
            return info.op(*_with_leaves(args, leaves), **s.kwargs)

        calls.append(Call(OPS[name], args, kwargs, torch_fn, tensors))
    return calls


def _module_call(m, x) -> tuple[str, list, dict]:
    """The functional call torch's module makes in forward: (our op, positional args, keyword args)."""
    kind = type(m).__name__
    if kind == "Conv2d":
        assert m.padding_mode == "zeros"
        return "conv2d", [x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups], {}
    if kind == "ConvTranspose2d":
        return "conv_transpose2d", [x, m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation], {}
    if kind == "MaxPool2d":
        options = dict(ceil_mode=m.ceil_mode, return_indices=m.return_indices)
        return "max_pool2d", [x, m.kernel_size, m.stride, m.padding, m.dilation], options
    if kind == "AvgPool2d":
        return "avg_pool2d", [x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override], {}
    assert kind == "ReLU" and not m.inplace
    return "relu", [x], {}


def module_calls(name: str, dtype) -> list[Call]:
    """Every ModuleInfo input of ``torch.nn.<name>`` in ``dtype``; torch's side runs the module itself."""
    (info,) = [m for m in module_db if m.module_cls.__name__ == name]
    calls = []
    for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True):
        torch.manual_seed(0)
        m = info.module_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs).to(dtype)
        (x,) = mi.forward_input.args
        op, args, kwargs = _module_call(m, x)
        names = [n for n in ("weight", "bias") if getattr(m, n, None) is not None]

        def torch_fn(x, *params, m=m, names=names):
            return torch.func.functional_call(m, dict(zip(names, params)), (x,))

        calls.append(Call(op, args, kwargs, torch_fn, [a for a in args if isinstance(a, torch.Tensor)]))
    return calls


def _np_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == torch.bfloat16 else _NUMPY[dtype]


def torch_results(call: Call, dtype, rng):
    """(output, indices or None, grad_output or None, [grad per leaf]) from torch on the CPU."""
    leaves = [t.detach().clone().requires_grad_(True) for t in call.tensors]
    out = call.torch_fn(*leaves)
    y, idx = out if isinstance(out, tuple) else (out, None)
    if call.op == "max_pool2d_backward":
        return y, None, None, []  # the entry's output is itself a gradient (of a sum of outputs)
    gy = to_torch(rng.standard_normal(tuple(y.shape)).astype(_np_dtype(dtype)), dtype)
    y.backward(gy)
    return y, idx, gy, [t.grad for t in leaves]


def our_results(backend, call: Call, gy):
    """(output, indices or None, [gradients]) of ``call`` on ``backend`` (a core backend or an SDK client:
    their methods are named, ordered and defaulted alike)."""
    if call.op == "max_pool2d_backward":
        # torch's wrapper: the input gradient of max_pool2d for grad_output = ones.
        y = backend.max_pool2d(*call.args, **call.kwargs)
        return backend.max_pool2d_backward(np.ones_like(y), *call.args, **call.kwargs).input, None, []
    out = getattr(backend, call.op)(*call.args, **call.kwargs)
    y, idx = out if isinstance(out, tuple) else (out, None)
    grads = getattr(backend, call.op + "_backward")(to_numpy(gy), *call.args, **call.kwargs)
    return y, idx, [g for g in grads if g is not None]


def compare(backend, call: Call, dtype, reference) -> None:
    """``call`` on ``backend`` against torch's ``reference`` (from ``torch_results``): output, indices and
    every gradient within the dtype's tolerance, each in the input's dtype."""
    y_ref, idx_ref, gy, grads_ref = reference
    y, idx, grads = our_results(backend, call, gy)
    want = np.dtype(_np_dtype(dtype))
    assert y.dtype == want, f"output dtype {y.dtype}, expected {want}"
    assert_close(y, to_numpy(y_ref), want, what="output")
    if idx_ref is not None:
        assert idx is not None and idx.dtype == np.int64, "indices missing or not int64"
        np.testing.assert_array_equal(idx, idx_ref.numpy(), err_msg="indices")
    grads_ref = [g for g in grads_ref if g is not None]
    assert len(grads) == len(grads_ref), f"{len(grads)} gradients, torch has {len(grads_ref)}"
    for name, got, ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert got.dtype == want, f"{name} grad dtype {got.dtype}"
        assert_close(got, to_numpy(ref), want, what=f"{name} grad")


ENTRIES = [("op", name) for name in OPS] + [("module", name) for name in MODULES]


def calls_of(kind: str, name: str, dtype) -> list[Call]:
    return op_calls(name, dtype) if kind == "op" else module_calls(name, dtype)
