"""The package as users import it: top-level re-exports and ``__version__``, loaded lazily so that the core
never pulls in grpc; typed (py.typed) SDK, core and server; ServerInfo with named fields."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import convrpc

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_top_level_names_are_the_sdks():
    from convrpc.client import ConvClient, ConvRpcError, ServerInfo, TrainResult
    from convrpc.client.aio import AsyncConvClient

    assert convrpc.ConvClient is ConvClient and convrpc.ConvRpcError is ConvRpcError
    assert convrpc.ServerInfo is ServerInfo and convrpc.TrainResult is TrainResult
    assert convrpc.AsyncConvClient is AsyncConvClient
    assert convrpc.__version__ == version("convrpc")
    assert set(convrpc.__all__) <= set(dir(convrpc))


def test_importing_the_core_imports_no_grpc():
    out = run_python("import sys, convrpc.core, convrpc; print('grpc' in sys.modules, 'convrpc.client' in sys.modules)")
    assert out.split() == ["False", "False"]
    out = run_python("import sys; from convrpc import ConvClient; print('grpc' in sys.modules)")
    assert out.split() == ["True"]


def test_every_source_directory_is_part_of_the_one_package():
    dirs = {Path(p).resolve() for p in convrpc.__path__}
    assert {ROOT / d / "convrpc" for d in ("proto", "core", "server", "client")} <= dirs


def test_an_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        convrpc.Nope  # noqa: B018


def test_the_packages_are_marked_typed():
    for d in ("client/convrpc/client", "core/convrpc/core", "server/convrpc/server"):
        assert (ROOT / d / "py.typed").is_file()


def test_server_info_has_named_fields_and_prints_one_per_line():
    from convrpc.client import ServerInfo
    from convrpc.v1 import conv_service_pb2 as pb

    response = pb.GetServerInfoResponse(
        version="1.2", backend="numba", device="cpu", max_message_bytes=10, max_elements=20, max_train_steps=30,
        max_train_seconds=4.5, ops=["conv2d", "relu"], dtypes=[pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16], compute_threads=2,
    )  # fmt: skip
    info = ServerInfo.from_response(response)
    assert (info.version, info.backend, info.max_train_seconds) == ("1.2", "numba", 4.5)
    assert info.ops == ("conv2d", "relu") and info.dtypes == ("float32", "bfloat16")
    assert str(info).splitlines()[1].split() == ["backend", "numba"]
    assert "dtypes             float32, bfloat16" in str(info)


def test_results_and_gradients_print_shapes_not_arrays():
    import numpy as np

    from convrpc.client import Gradients, History, TrainResult

    big = np.zeros((64, 3, 32, 32))
    g = Gradients(big, np.zeros((8, 3, 3, 3), np.float32), None)
    assert repr(g) == "Gradients(input=<float64 (64, 3, 32, 32)>, weight=<float32 (8, 3, 3, 3)>, bias=None)"
    h = History(np.arange(3), np.array([1.0, 0.5, 0.25]), np.full(3, np.nan), np.full(3, np.nan))
    r = TrainResult(np.zeros((1, 1, 3, 3)), None, 0.25, 2, "max_steps", h, 1.5)
    assert repr(r) == (
        "TrainResult(stop_reason='max_steps', steps=2, loss=0.25, weight=<float64 (1, 1, 3, 3)>, bias=None, "
        "elapsed=1.5s)"
    )
    assert repr(h) == "History(3 points, steps 0..2, last loss 0.25)"


def test_a_closed_client_refuses_every_call_with_a_conv_rpc_error():
    import asyncio

    import grpc
    import numpy as np
    import pytest

    from convrpc.client import ConvClient, ConvRpcError
    from convrpc.client.aio import AsyncConvClient

    with ConvClient("127.0.0.1:1") as client:
        pass
    calls = [
        lambda: client.relu(np.ones(3)),
        lambda: client.conv2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))),
        lambda: client.server_info(),
        lambda: client.train_kernel(np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2)), kernel_size=3),
    ]
    for call in calls:
        with pytest.raises(ConvRpcError) as info:
            call()
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION and "is closed" in info.value.message

    async def closed_async():
        async with AsyncConvClient("127.0.0.1:1") as c:
            pass
        with pytest.raises(ConvRpcError, match="is closed"):
            await c.relu(np.ones(3))
        with pytest.raises(ConvRpcError, match="is closed"):
            c.train_kernel(np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2)), kernel_size=3)

    asyncio.run(closed_async())
