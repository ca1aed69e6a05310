"""Request pieces built on the client side: tensors and op options, failing as ConvRpcError."""

from __future__ import annotations

import grpc
import numpy as np

from convrpc import networks, wire
from convrpc.core import network
from convrpc.core.backend import common_dtype
from convrpc.core.errors import ConvError, InvalidArgumentError
from convrpc.v1 import conv_service_pb2 as pb

from .errors import ConvRpcError

__all__ = ["as_array", "as_tensor", "checked_network", "checked_op", "from_tensor", "op_message"]


def _invalid(exc: ConvError, field: str | None = None) -> ConvRpcError:
    """A core error raised here, as the server would have reported it (the same field and message)."""
    field = field or getattr(exc, "field", None)
    description = getattr(exc, "description", str(exc))
    return ConvRpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}" if field else description, field)


def as_array(array, field: str) -> np.ndarray:
    """An array-like as the wire carries it: C-contiguous, little-endian, in its own dtype (no copy when
    already laid out so; a 0-d array stays 0-d). A dtype the wire does not carry is refused, never converted."""
    a = np.asarray(array)
    try:
        return np.asarray(a, dtype=wire.DTYPES[wire.dtype_enum(a.dtype, field)], order="C")
    except ConvError as exc:
        raise _invalid(exc) from None


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
        raise _invalid(exc) from None


def checked_op(name: str, arrays: dict[str, np.ndarray], options: dict) -> pb.Op:
    """The ``Op`` of a call, once its tensors (by request field) and options pass the core's own checks:
    one dtype of the four float types, and every argument as torch takes it (no float, bool or string
    where an int goes; ``(v,)`` means ``(v, v)``). What the server would refuse is refused here, before
    anything is sent, naming the same field (``op.<op>.<option>`` for an option)."""
    try:
        common_dtype(arrays)
        wire.OP_SPECS[name].output_shape({f: a.shape for f, a in arrays.items()}, options)
    except ConvError as exc:
        raise _invalid(exc, wire.option_field(name, exc.field)) from None
    return op_message(name, options)


def checked_network(net, input: np.ndarray, params, grad_output: np.ndarray | None = None) -> pb.Network:
    """The ``Network`` of a call, once the chain, the input's shape and the parameters (when given: keys,
    shapes, the input's dtype) and ``grad_output``'s shape pass the core's own checks (``check_network``).
    What the server would refuse is refused here, before anything is sent, naming the same request field
    (``network.layers[3].in_channels``, ``params[2].weight``)."""
    try:
        shapes = network.check_network(net, input.shape, params, dtype=input.dtype)
        if grad_output is not None and tuple(grad_output.shape) != shapes[-1]:
            raise InvalidArgumentError(
                "grad_output", f"expected shape {shapes[-1]} (the network's output), got {tuple(grad_output.shape)}"
            )
        return networks.encode_network(net)
    except ConvError as exc:
        raise _invalid(exc, networks.request_field(net, getattr(exc, "field", None))) from None
