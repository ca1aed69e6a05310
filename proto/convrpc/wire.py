"""The wire codec shared by server and SDK: numpy arrays <-> ``Tensor`` messages, op options <-> ``Op``.

Decoding validates before it allocates: the shape product is computed with an overflow check and the
byte length must match it exactly, so a tiny message cannot claim a huge tensor. Decoded arrays are
zero-copy, read-only views of the message's bytes.
"""

from __future__ import annotations

import numpy as np

from convrpc.core.errors import InvalidArgumentError, ResourceExhaustedError
from convrpc.v1 import conv_service_pb2 as pb

__all__ = [
    "DTYPES",
    "check_elements",
    "dtype_enum",
    "tensor_layout",
    "OP_OPTIONS",
    "OP_TENSORS",
    "decode_op",
    "decode_tensor",
    "encode_op",
    "encode_tensor",
    "op_name",
]

INT64_MAX = 2**63 - 1

#: Wire dtype enum <-> little-endian numpy dtype.
DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT64: np.dtype("<f8")}
_ENUM_OF = {np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.float64): pb.DTYPE_FLOAT64}

#: Each op's options, in torch.nn.functional's argument order (after the tensors).
OP_OPTIONS = {
    "conv2d": ("stride", "padding", "dilation", "groups"),
    "conv_transpose2d": ("stride", "padding", "output_padding", "groups", "dilation"),
    "max_pool2d": ("kernel_size", "stride", "padding", "dilation"),
    "avg_pool2d": ("kernel_size", "stride", "padding"),
    "relu": (),
}
#: Each op's tensor inputs, in order; the first is required, the others optional (weight required for convs).
OP_TENSORS = {
    "conv2d": ("input", "weight", "bias"),
    "conv_transpose2d": ("input", "weight", "bias"),
    "max_pool2d": ("input",),
    "avg_pool2d": ("input",),
    "relu": ("input",),
}

_PAD_MODES = {"valid": pb.PADDING_MODE_VALID, "same": pb.PADDING_MODE_SAME}
_PAD_NAMES = {v: k for k, v in _PAD_MODES.items()}


# -- tensors --------------------------------------------------------------------------------------


def encode_tensor(array) -> pb.Tensor:
    """A float32/float64 array as a ``Tensor`` (little-endian, C order)."""
    a = np.asarray(array)
    enum = _ENUM_OF.get(a.dtype.newbyteorder("="))
    if enum is None:
        raise InvalidArgumentError("tensor", f"dtype must be float32 or float64, got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=DTYPES[enum])
    return pb.Tensor(dtype=enum, shape=a.shape, data=a.tobytes())


def dtype_enum(dtype) -> int:
    """The wire enum of a float32/float64 numpy dtype (either byte order)."""
    enum = _ENUM_OF.get(np.dtype(dtype).newbyteorder("="))
    if enum is None:
        raise InvalidArgumentError("tensor", f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    return enum


def tensor_layout(dtype_enum: int, shape, field: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, element count)`` of a described tensor, checked: a known dtype, dims > 0, no overflow."""
    dtype = DTYPES.get(dtype_enum)
    if dtype is None:
        name = pb.DType.Name(dtype_enum) if dtype_enum in pb.DType.values() else str(dtype_enum)
        raise InvalidArgumentError(f"{field}.dtype", f"expected DTYPE_FLOAT32 or DTYPE_FLOAT64, got {name}")
    shape = tuple(shape)
    count = 1
    for i, dim in enumerate(shape):
        if dim <= 0:
            raise InvalidArgumentError(f"{field}.shape", f"every dimension must be > 0, got {dim} at index {i}")
        count *= dim
        if count > INT64_MAX:
            raise InvalidArgumentError(f"{field}.shape", f"the product of {list(shape)} overflows int64")
    return dtype, shape, count


def check_elements(count: int, field: str, max_elements: int | None) -> None:
    """RESOURCE_EXHAUSTED when a tensor has more elements than the cap (None: no cap)."""
    if max_elements is not None and count > max_elements:
        raise ResourceExhaustedError(f"{field}.shape", f"{count} elements exceed the server's cap of {max_elements}")


def decode_tensor(msg: pb.Tensor, field: str, *, max_elements: int | None = None) -> np.ndarray:
    """A read-only array viewing ``msg.data``, after checking dtype, shape and byte length."""
    dtype, shape, count = tensor_layout(msg.dtype, msg.shape, field)
    expected = count * dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidArgumentError(
            f"{field}.data",
            f"expected {expected} bytes (shape {list(shape)} x {dtype.itemsize}-byte elements), got {len(msg.data)}",
        )
    check_elements(count, field, max_elements)
    return np.frombuffer(msg.data, dtype=dtype).reshape(shape)


# -- options --------------------------------------------------------------------------------------


def _size2(value) -> pb.Size2 | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return None
        if len(value) != 2:
            raise InvalidArgumentError("size", f"expected an int or a pair of ints, got {value!r}")
        h, w = value
    else:
        h = w = value
    return pb.Size2(height=int(h), width=int(w))


def _from_size2(parent, field: str, default):
    if not parent.HasField(field):
        return default
    size = getattr(parent, field)
    return (size.height, size.width)


def encode_op(name: str, **options) -> pb.Op:
    """An ``Op`` message for op ``name`` with torch-style keyword options (ints, pairs or None)."""
    if name not in OP_OPTIONS:
        raise InvalidArgumentError("op", f"unknown op {name!r}; expected one of {', '.join(OP_OPTIONS)}")
    unknown = set(options) - set(OP_OPTIONS[name])
    if unknown:
        raise InvalidArgumentError("op", f"{name} takes no option(s) {sorted(unknown)}")
    fields = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "groups":
            fields[key] = int(value)
        elif key == "padding" and name == "conv2d":
            if isinstance(value, str):
                if value not in _PAD_MODES:
                    raise InvalidArgumentError("padding", f"expected 'valid', 'same', an int or a pair, got {value!r}")
                fields[key] = pb.Padding(mode=_PAD_MODES[value])
            else:
                fields[key] = pb.Padding(size=_size2(value))
        else:
            size = _size2(value)
            if size is not None:
                fields[key] = size
    message_type = {
        "conv2d": pb.Conv2dOptions,
        "conv_transpose2d": pb.ConvTranspose2dOptions,
        "max_pool2d": pb.MaxPool2dOptions,
        "avg_pool2d": pb.AvgPool2dOptions,
        "relu": pb.ReluOptions,
    }[name]
    return pb.Op(**{name: message_type(**fields)})


def op_name(op: pb.Op) -> str:
    """The op selected in an ``Op`` message; INVALID_ARGUMENT if none is."""
    name = op.WhichOneof("op")
    if name is None:
        raise InvalidArgumentError("op", f"no op is set; expected one of {', '.join(OP_OPTIONS)}")
    return name


def decode_op(op: pb.Op) -> tuple[str, dict]:
    """``(name, options)`` with the torch.nn.functional keyword arguments of the op, defaults filled in."""
    name = op_name(op)
    msg = getattr(op, name)
    options: dict = {}
    if name == "conv2d":
        options["stride"] = _from_size2(msg, "stride", 1)
        options["padding"] = _decode_padding(msg)
        options["dilation"] = _from_size2(msg, "dilation", 1)
        options["groups"] = msg.groups if msg.HasField("groups") else 1
    elif name == "conv_transpose2d":
        options["stride"] = _from_size2(msg, "stride", 1)
        options["padding"] = _from_size2(msg, "padding", 0)
        options["output_padding"] = _from_size2(msg, "output_padding", 0)
        options["groups"] = msg.groups if msg.HasField("groups") else 1
        options["dilation"] = _from_size2(msg, "dilation", 1)
    elif name in ("max_pool2d", "avg_pool2d"):
        if not msg.HasField("kernel_size"):
            raise InvalidArgumentError(f"op.{name}.kernel_size", "is required")
        options["kernel_size"] = (msg.kernel_size.height, msg.kernel_size.width)
        options["stride"] = _from_size2(msg, "stride", None)
        options["padding"] = _from_size2(msg, "padding", 0)
        if name == "max_pool2d":
            options["dilation"] = _from_size2(msg, "dilation", 1)
    return name, options


def _decode_padding(msg: pb.Conv2dOptions):
    if not msg.HasField("padding"):
        return 0
    kind = msg.padding.WhichOneof("kind")
    if kind == "size":
        return (msg.padding.size.height, msg.padding.size.width)
    if kind == "mode":
        mode = msg.padding.mode
        if mode not in _PAD_NAMES:
            raise InvalidArgumentError("op.conv2d.padding.mode", f"expected VALID or SAME, got {mode}")
        return _PAD_NAMES[mode]
    return 0


def decode_conv_options(msg: pb.Conv2dOptions | None) -> dict:
    """conv2d keyword options from a ``Conv2dOptions`` message (unset message: all defaults)."""
    return decode_op(pb.Op(conv2d=msg if msg is not None else pb.Conv2dOptions()))[1]
