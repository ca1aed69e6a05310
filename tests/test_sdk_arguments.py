"""The SDK takes torch.nn.functional's arguments with torch's meaning on every data path, and refuses what
torch refuses before anything is sent, naming the argument."""

from __future__ import annotations

import asyncio
import socket

import grpc
import ml_dtypes
import numpy as np
import pytest
from convrpc import shm
from convrpc.client import ConvClient, ConvRpcError
from convrpc.client.aio import AsyncConvClient
from convrpc.core import get_backend

from test_transport import clients, srv  # noqa: F401 - the data paths' server and clients (numpy backend)

pytestmark = pytest.mark.skipif(not shm.AVAILABLE, reason="needs POSIX shared memory")

REF = get_backend("numpy")
PATHS = ("unary", "stream", "shm")
HALF_AND_SINGLE = [np.float16, ml_dtypes.bfloat16, np.float32]


def _cases(dtype):
    """Calls that use what torch accepts beyond the plain batched call: indices, ceil mode, divisors, ``(v,)``
    sizes, unbatched inputs, empty batches, 0-d and zero-size relu."""
    rng = np.random.default_rng(5)
    x, w, wt, b = (rng.standard_normal(shape).astype(dtype) for shape in ((3, 4, 9, 8), (6, 2, 3, 2), (4, 3, 3, 3), 6))
    return [
        ("max_pool2d", (x, 3, 2), dict(ceil_mode=True, return_indices=True)),
        ("max_pool2d", (x[0], (2,)), dict(padding=(1,), dilation=(1, 2), return_indices=True)),
        ("avg_pool2d", (x, 3, 2, 1, True, False)),
        ("avg_pool2d", (x[0], 2), dict(divisor_override=3, ceil_mode=True, stride=(3,))),
        ("conv2d", (x[:0], w, b), dict(groups=2)),
        ("conv2d", (x[1], w), dict(padding=(1,), groups=2, stride=(2,))),
        ("conv_transpose2d", (x[2], wt, b[:3]), dict(stride=(2,), output_padding=(1,))),
        ("relu", (x[0, 0, 0, 0],), {}),
        ("relu", (x[:, :0],), {}),
    ]


def _parts(result):
    return result if isinstance(result, tuple) else (result,)


def _same(got, want, what):
    got, want = _parts(got), _parts(want)
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        if w is None:
            assert g is None, what
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, (what, g.dtype, g.shape, w.shape)
        assert g.tobytes() == w.tobytes(), what


def _check(client, op, args, options, dtype):
    want = getattr(REF, op)(*args, **options)
    _same(getattr(client, op)(*args, **options), want, op)
    gy = np.random.default_rng(1).standard_normal(_parts(want)[0].shape).astype(dtype)
    _same(getattr(client, f"{op}_backward")(gy, *args, **options), getattr(REF, f"{op}_backward")(gy, *args, **options),
          f"{op}_backward")  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=lambda d: np.dtype(d).name)
def test_torch_arguments_give_the_cores_bytes_on_every_path(clients, path, dtype):
    for op, args, *options in _cases(dtype):
        _check(clients[path], op, args, options[0] if options else {}, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_sharding_keeps_indices_per_plane_and_never_cuts_an_unbatched_input_along_c(srv, path):
    x = np.random.default_rng(2).standard_normal((5, 3, 7, 6)).astype(np.float32)
    w = np.random.default_rng(3).standard_normal((2, 3, 2, 2)).astype(np.float32)
    with ConvClient(srv.target, timeout=60, data_path=path, shard_size=2) as client:
        _check(client, "max_pool2d", (x, 3, 2), dict(ceil_mode=True, return_indices=True), np.float32)
        _check(client, "conv2d", (x[0], w), {}, np.float32)  # cut along C, this would not even be valid
        _check(client, "max_pool2d", (x[0], 2), dict(return_indices=True), np.float32)


def test_asyncio_client_returns_indices_and_keeps_0d_and_half_types(srv):
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(ml_dtypes.bfloat16)

    async def main():
        async with AsyncConvClient(srv.target, timeout=60) as client:
            return await asyncio.gather(client.max_pool2d(x, 2, return_indices=True), client.relu(np.float16(-2.0)))

    (y, idx), r = asyncio.run(main())
    _same((y, idx), REF.max_pool2d(x, 2, return_indices=True), "max_pool2d")
    assert r.shape == () and r.dtype == np.float16 and r == 0


def test_relu_inplace_writes_into_the_callers_array_as_torch_does(clients):
    x = np.array([[-1.0, 2.0], [3.0, -4.0]], np.float32)
    out = clients["unary"].relu(x, inplace=True)
    assert out is x and x.tolist() == [[0.0, 2.0], [3.0, 0.0]]
    y = np.array([-1.0, 1.0])
    assert clients["unary"].relu(y, False) is not y and y[0] == -1.0
    frozen = np.array([-1.0])
    frozen.flags.writeable = False
    with pytest.raises(ConvRpcError) as info:
        clients["unary"].relu(frozen, inplace=True)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "input"


X, W = np.ones((1, 2, 6, 6)), np.ones((4, 2, 3, 3))
#: What torch refuses, with the field our refusal names; each is refused before the request is sent.
REFUSED = [
    ("conv2d", (X, W), dict(stride=1.5), "op.conv2d.stride"),
    ("conv2d", (X, W), dict(padding=True), "op.conv2d.padding"),
    ("conv2d", (X, W), dict(groups=2.0), "op.conv2d.groups"),
    ("conv2d", (X, W), dict(dilation=(1, 2, 3)), "op.conv2d.dilation"),
    ("conv_transpose2d", (X, W.transpose(1, 0, 2, 3)), dict(output_padding=0.5), "op.conv_transpose2d.output_padding"),
    ("max_pool2d", (X,), dict(kernel_size="2"), "op.max_pool2d.kernel_size"),
    ("max_pool2d", (X,), dict(kernel_size=2.5), "op.max_pool2d.kernel_size"),
    ("max_pool2d", (X,), dict(kernel_size=2, ceil_mode=1), "op.max_pool2d.ceil_mode"),
    ("avg_pool2d", (X,), dict(kernel_size=2, divisor_override=0), "op.avg_pool2d.divisor_override"),
    ("avg_pool2d", (X,), dict(kernel_size=2, divisor_override=1.5), "op.avg_pool2d.divisor_override"),
    ("avg_pool2d", (X,), dict(kernel_size=2, count_include_pad=None), "op.avg_pool2d.count_include_pad"),
    ("conv2d", (X.astype(np.int64), W), {}, "input"),
    ("conv2d", (X, W.astype(np.float16)), {}, "weight"),
    ("max_pool2d", (np.ones((2, 6, 6, 1, 1)),), dict(kernel_size=2), "input"),
]  # fmt: skip
#: Refused though torch computes it: integer tensors are never converted (torch's relu takes ints).
REFUSED_BY_DESIGN = [("relu", (np.array([1, -2], np.int32),), {}, "input")]


@pytest.fixture(scope="module")
def nowhere():
    """A client of a port nobody listens on: any call that reached the network would fail UNAVAILABLE."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ConvClient(f"127.0.0.1:{port}", timeout=5) as client:
        yield client


@pytest.mark.parametrize("op,args,options,field,torch_refuses",
                         [(*c, True) for c in REFUSED] + [(*c, False) for c in REFUSED_BY_DESIGN],
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(REFUSED + REFUSED_BY_DESIGN)])  # fmt: skip
def test_what_torch_refuses_is_refused_before_sending_naming_the_argument(nowhere, op, args, options, field,
                                                                          torch_refuses):  # fmt: skip
    with pytest.raises(ConvRpcError) as info:
        getattr(nowhere, op)(*args, **options)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert info.value.field == field and info.value.message.startswith(field + ":"), info.value
    if not torch_refuses:
        return
    torch = pytest.importorskip("torch")
    with pytest.raises((TypeError, RuntimeError, ValueError)):  # torch refuses it too
        tensors = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
        getattr(torch.nn.functional, op)(*tensors, **options)
