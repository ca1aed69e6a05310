"""Request pieces built on the client side: tensors and op options, failing as ConvRpcError."""

from __future__ import annotations

import grpc
import numpy as np

from convrpc import wire
from convrpc.core.errors import ConvError
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError

__all__ = ["as_array", "as_tensor", "from_tensor", "op_message"]


def as_array(array, field: str) -> np.ndarray:
    """A C-contiguous little-endian float32/float64 array: those pass as they are (no copy when
    already laid out so), other real numbers become float64, float16 becomes float32."""
    a = np.asarray(array)
    if a.dtype.kind in "biu":
        a = a.astype(np.float64)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    try:
        return np.ascontiguousarray(a, dtype=wire.DTYPES[wire.dtype_enum(a.dtype)])
    except ConvError:
        raise ConvRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{field}: dtype must be float32 or float64, got {a.dtype}", field
        ) from None


def as_tensor(array, field: str) -> pb.Tensor:
    """Encode an array-like as a ``Tensor`` (see ``as_array``)."""
    return wire.encode_tensor(as_array(array, field))


def from_tensor(msg: pb.Tensor) -> np.ndarray:
    """Decode a response tensor into a fresh, writable array."""
    return wire.decode_tensor(msg, "output").copy()


def op_message(name: str, options: dict) -> pb.Op:
    try:
        return wire.encode_op(name, **options)
    except (ConvError, TypeError, ValueError) as exc:
        raise ConvRpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), getattr(exc, "field", None)) from None
