"""train_kernel's argument errors name the argument, as torch's do, and are raised before anything is sent:
the client below points at a port where no server listens, so a request that went out would fail UNAVAILABLE."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from convrpc.client import ConvClient, ConvRpcError

X, Y = np.ones((1, 1, 8, 8)), np.ones((1, 1, 6, 6))


@pytest.fixture(scope="module")
def nowhere():
    with ConvClient("127.0.0.1:1", timeout=5) as client:
        yield client


@pytest.mark.parametrize(
    "kwargs, field, says",
    [
        (dict(lr="0.1"), "lr", "expected a real number, got '0.1'"),
        (dict(lr=0.0), "lr", "> 0"),
        (dict(lr=float("nan")), "lr", "finite"),
        (dict(lr=True), "lr", "real number"),
        (dict(seed=-1), "seed", ">= 0"),
        (dict(seed=1.5), "seed", "an int"),
        (dict(seed=2**64), "seed", "<= 18446744073709551615"),
        (dict(optimizer="adam", betas=(0.9,)), "betas", "a pair (beta1, beta2), got (0.9,)"),
        (dict(optimizer="adam", betas=(0.9, 1.0)), "betas", "in [0, 1)"),
        (dict(optimizer="adam", betas="ab"), "betas", "a pair"),
        (dict(optimizer="adam", momentum=0.9), "momentum", "not used by optimizer='adam'"),
        (dict(optimizer="adam", nesterov=True), "nesterov", "not used by optimizer='adam'"),
        (dict(optimizer="adam", eps=0), "eps", "> 0"),
        (dict(nesterov=True), "nesterov", "momentum > 0"),
        (dict(optimizer="lbfgs"), "optimizer", "'sgd' or 'adam'"),
        (dict(momentum=-0.5), "momentum", ">= 0"),
        (dict(weight_decay="x"), "weight_decay", "real number"),
        (dict(max_steps=0), "max_steps", ">= 1"),
        (dict(max_steps=10.0), "max_steps", "an int"),
        (dict(report_every=0), "report_every", ">= 1"),
        (dict(snapshot_every=-1), "snapshot_every", ">= 0"),
        (dict(batch_size=0), "batch_size", ">= 1"),
        (dict(tol=-1e-3), "tol", ">= 0"),
        (dict(max_seconds=0), "max_seconds", "> 0"),
        (dict(bias="yes"), "bias", "a bool"),
        (dict(loss="l1"), "loss", "one of"),
        (dict(timeout=-1), "timeout", "seconds > 0"),
    ],
)
def test_a_bad_argument_is_named_before_any_request_is_sent(nowhere, kwargs, field, says):
    with pytest.raises(ConvRpcError) as info:
        nowhere.train_kernel(X, Y, **{"kernel_size": 3, **kwargs})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}: ") and says in info.value.message, info.value.message


def test_good_arguments_of_every_kind_pass_the_checks(nowhere):
    """The same client builds runs from good values (numpy scalars too); only the stream would fail."""
    run = nowhere.train_kernel(
        X, Y, kernel_size=(3,), lr=np.float32(0.1), seed=np.uint64(2**64 - 1), optimizer="adam",
        betas=[0.5, 0.9], max_steps=np.int64(3), bias=np.bool_(True), max_seconds=1, tol=0,
    )  # fmt: skip
    with pytest.raises(ConvRpcError) as info:
        run.result()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
