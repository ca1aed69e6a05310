"""The wire codec shared by server and SDK: numpy arrays <-> ``Tensor`` messages, op options <-> ``Op``.

Two tables drive it. ``DTYPES`` holds every dtype the wire carries (a wire value missing from it is
refused naming the field, so supporting a new one is one entry). ``OP_SPECS`` describes
each op once: its options message, its torch-named options with their defaults, its tensor
fields and its output-shape rule; encoding, decoding, field checks and the SDK's output-size
estimate all read it instead of branching per op.

A request's or response's tensors are named by their path (``input``, ``params[2].weight`` of a
network's ``LayerParams``): ``tensor_fields`` lists them in payload order and ``fill_tensors`` places
them, so every storage handles an op's tensors and a network's alike.

Decoding validates before it allocates: the shape product is computed with an overflow check and
the byte length must match it exactly, so a tiny message cannot claim a huge tensor. Decoded arrays
are zero-copy, read-only views of the message's bytes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from convrpc.core import params
from convrpc.core.config import MAX_GEOMETRY_INT
from convrpc.core.errors import InvalidArgumentError, ResourceExhaustedError
from convrpc.v1 import conv_service_pb2 as pb

__all__ = [
    "DTYPES",
    "LOSSES",
    "LOSS_NAMES",
    "OP_SPECS",
    "OpSpec",
    "Option",
    "STOP_REASONS",
    "STOP_REASON_NAMES",
    "decode_op",
    "decode_tensor",
    "dtype_enum",
    "encode_op",
    "encode_tensor",
    "fill_tensors",
    "op_name",
    "option_field",
    "output_bytes",
    "tensor_fields",
    "tensor_header",
    "tensor_layout",
]

INT64_MAX = 2**63 - 1

# -- dtypes ---------------------------------------------------------------------------------------

#: The wire dtypes, with their little-endian numpy dtype: the four float types ops compute in (a result
#: has its inputs' dtype) and int64, which carries max-pool indices out and class labels in. Which
#: tensor may have which dtype is the core's rule (an op refuses int64 input, naming the field).
DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_ENUM_OF = {dtype.newbyteorder("="): enum for enum, dtype in DTYPES.items()}


def _refuse(field: str, got: str, expected) -> None:
    """The one refusal of a dtype the wire does not carry, whether a wire enum or a numpy array names it."""
    raise InvalidArgumentError(field, f"expected one of {', '.join(expected)}, got {got}")


def _numpy_dtype(enum: int, field: str) -> np.dtype:
    if enum not in DTYPES:
        _refuse(field, pb.Dtype.Name(enum) if enum in pb.Dtype.values() else str(enum), map(pb.Dtype.Name, DTYPES))
    return DTYPES[enum]


def dtype_enum(dtype, field: str = "tensor") -> int:
    """The wire enum of a numpy dtype (either byte order); INVALID_ARGUMENT naming ``field`` if unsupported."""
    dtype = np.dtype(dtype)
    enum = _ENUM_OF.get(dtype.newbyteorder("="))
    if enum is None:
        _refuse(f"{field}.dtype", dtype.name, (d.name for d in DTYPES.values()))
    return enum


# -- tensors --------------------------------------------------------------------------------------


def encode_tensor(array, field: str = "tensor") -> pb.Tensor:
    """An array as a ``Tensor`` with inline data (little-endian, C order); a 0-d array keeps shape ()."""
    a = np.asarray(array)
    enum = dtype_enum(a.dtype, field)
    return pb.Tensor(dtype=enum, shape=a.shape, data=np.asarray(a, dtype=DTYPES[enum], order="C").tobytes())


def tensor_header(array, field: str = "tensor") -> pb.Tensor:
    """An array's dtype and shape as a ``Tensor`` without storage (its bytes travel elsewhere)."""
    a = np.asarray(array)
    return pb.Tensor(dtype=dtype_enum(a.dtype, field), shape=a.shape)


def tensor_layout(msg: pb.Tensor, field: str, *, max_elements: int | None = None) -> tuple[np.dtype, tuple, int]:
    """``(dtype, shape, nbytes)`` of a described tensor, checked before anything is allocated for it:
    a supported dtype, dims >= 0 (which may be 0 is the op's rule), a shape product without int64
    overflow and at most ``max_elements`` elements (RESOURCE_EXHAUSTED beyond; None means no cap)."""
    dtype = _numpy_dtype(msg.dtype, f"{field}.dtype")
    shape = tuple(msg.shape)
    count = 1
    for i, dim in enumerate(shape):
        if dim < 0:
            raise InvalidArgumentError(f"{field}.shape", f"every dimension must be >= 0, got {dim} at index {i}")
        count *= dim
        if count > INT64_MAX:
            raise InvalidArgumentError(f"{field}.shape", f"the product of {list(shape)} overflows int64")
    _check_cap(count, field, max_elements)
    return dtype, shape, count * dtype.itemsize


def _check_cap(count: int, field: str, max_elements: int | None) -> None:
    if max_elements is not None and count > max_elements:
        raise ResourceExhaustedError(f"{field}.shape", f"{count} elements exceed the server's cap of {max_elements}",
                                     setting="max_elements", limit=max_elements)  # fmt: skip


def decode_tensor(msg: pb.Tensor, field: str, *, max_elements: int | None = None) -> np.ndarray:
    """A read-only array viewing ``msg.data`` (inline storage), after checking dtype, shape and byte length."""
    dtype, shape, nbytes = tensor_layout(msg, field)
    if len(msg.data) != nbytes:
        raise InvalidArgumentError(
            f"{field}.data",
            f"expected {nbytes} bytes (shape {list(shape)} x {dtype.itemsize}-byte elements), got {len(msg.data)}",
        )
    _check_cap(nbytes // dtype.itemsize, field, max_elements)
    return np.frombuffer(msg.data, dtype=dtype).reshape(shape)


def tensor_fields(message) -> list[tuple[str, pb.Tensor]]:
    """Every set Tensor of a request or response by its path, in payload order: the message's own Tensor
    fields by field number, then each ``LayerParams`` entry's (``params[i].weight`` before ``params[i].bias``)."""
    found = []
    for f, value in message.ListFields():
        if f.message_type is pb.Tensor.DESCRIPTOR:
            found.append((f.name, value))
        elif f.message_type is pb.LayerParams.DESCRIPTOR:
            for i, entry in enumerate(value):
                found.extend((f"{f.name}[{i}].{g.name}", t) for g, t in entry.ListFields())
    return found


def fill_tensors(message, tensors: Mapping[str, pb.Tensor], layers: int = 0):
    """Set ``tensors`` (by path) on ``message``; its repeated ``LayerParams`` fields get ``layers`` entries
    at least (one per layer, empty for a layer without parameters). Returns ``message``."""
    for path, tensor in tensors.items():
        name, _, rest = path.partition("[")
        if not rest:
            getattr(message, name).CopyFrom(tensor)
            continue
        index, _, key = rest.partition("].")
        entries = getattr(message, name)
        while len(entries) <= int(index):
            entries.add()
        getattr(entries[int(index)], key).CopyFrom(tensor)
    for f in message.DESCRIPTOR.fields if layers else ():
        if f.message_type is pb.LayerParams.DESCRIPTOR:
            entries = getattr(message, f.name)
            while len(entries) < layers:
                entries.add()
    return message


# -- the op table ---------------------------------------------------------------------------------


def _int(value, field: str) -> int:
    """An int as torch takes it: no bools, no floats."""
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
        raise InvalidArgumentError(field, f"expected an int, got {value!r}")
    return operator.index(value)


def _encode_pair(value, field: str) -> pb.Size2 | None:
    """A size as ``Size2``, read by the core's rule (an int, a pair or torch's ``(v,)``); an empty
    sequence is torch's "unset" (max_pool2d's ``stride=()``) and travels as no field. Ranges are the
    op's to check (the SDK does before it encodes; the server does again)."""
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return None
    height, width = params.pair(value, field, minimum=-MAX_GEOMETRY_INT)
    return pb.Size2(height=height, width=width)


_PAD_MODES = {"valid": pb.PADDING_MODE_VALID, "same": pb.PADDING_MODE_SAME}
_PAD_NAMES = {v: k for k, v in _PAD_MODES.items()}


def _encode_padding(value, field: str) -> pb.Padding | None:
    if isinstance(value, str):
        if value not in _PAD_MODES:
            raise InvalidArgumentError(field, f"expected 'valid', 'same', an int or a pair, got {value!r}")
        return pb.Padding(mode=_PAD_MODES[value])
    size = _encode_pair(value, field)
    return None if size is None else pb.Padding(size=size)


def _decode_padding(padding: pb.Padding, field: str):
    kind = padding.WhichOneof("kind")
    if kind == "size":
        return (padding.size.height, padding.size.width)
    if kind == "mode":
        if padding.mode not in _PAD_NAMES:
            raise InvalidArgumentError(f"{field}.mode", f"expected VALID or SAME, got {padding.mode}")
        return _PAD_NAMES[padding.mode]
    return 0


#: How each kind of option travels: (encode torch value -> proto value, decode proto value -> torch value).
_KINDS: dict[str, tuple[Callable, Callable]] = {
    "pair": (_encode_pair, lambda size, field: (size.height, size.width)),
    "padding": (_encode_padding, _decode_padding),
    "int": (_int, lambda value, field: value),
    "bool": (params.flag, lambda value, field: value),
}


@dataclass(frozen=True)
class Option:
    """One torch argument of an op: the options-message field of the same name, its kind and torch's default."""

    name: str
    kind: str
    default: Any


@dataclass(frozen=True)
class OpSpec:
    """Everything the wire needs to know about one op."""

    name: str
    #: The options message of the ``Op`` oneof.
    options_type: type
    #: The torch arguments after the tensors, in torch.nn.functional's order.
    options: tuple[Option, ...]
    #: The forward inputs, in torch's order (also their order in ForwardRequest); the last may be optional.
    tensors: tuple[str, ...]
    #: The tensors a request must carry.
    required: tuple[str, ...]
    #: ``shape(input_shape, weight_shape, bias_shape, **options) -> output shape``, checking the arguments.
    shape: Callable[..., tuple]

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def request_tensors(self, backward: bool) -> tuple[str, ...]:
        """The tensor fields of this op's ForwardRequest or BackwardRequest, in field order."""
        return ("grad_output", *self.tensors) if backward else self.tensors

    def result_tensors(self, backward: bool, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The response fields this op's results fill, in field order (``indices`` with return_indices)."""
        if backward:
            return tuple(f"grad_{t}" for t in self.tensors)
        return ("output", "indices") if options.get("return_indices") else ("output",)

    def output_shape(self, shapes: Mapping[str, tuple | None], options: Mapping[str, Any]) -> tuple:
        """The forward output's shape as the caller gets it (unbatched in, unbatched out) from the inputs'
        shapes (by field), checking every argument with the core's rules."""
        return tuple(self.shape(*(shapes.get(t) for t in self.tensors), **options))

    def result_shapes(
        self, shapes: Mapping[str, tuple | None], options: Mapping[str, Any], dtype: np.dtype, backward: bool,
    ) -> list[tuple[tuple, np.dtype]]:  # fmt: skip
        """``(shape, dtype)`` of each result in response order, from the request tensors' shapes (by field),
        checking the arguments: a gradient per input the request has (backward), or the output and, with
        return_indices, its int64 indices. The server plans where results go from this, the SDK sizes spans."""
        if backward:
            return [(tuple(shapes[t]), dtype) for t in self.tensors if shapes.get(t) is not None]
        shape = self.output_shape(shapes, options)
        indices = [(shape, DTYPES[pb.DTYPE_INT64])] if options.get("return_indices") else []
        return [(shape, dtype), *indices]


def _user_shape(geometry, shape) -> tuple:
    return tuple(shape[1:]) if geometry.unbatched else tuple(shape)


def _conv_shape(input, weight=None, bias=None, **options) -> tuple:
    g = params.conv2d_geometry(input, weight, bias, **options)
    return _user_shape(g, g.output_shape)


def _conv_transpose_shape(input, weight=None, bias=None, **options) -> tuple:
    g = params.conv_transpose2d_geometry(input, weight, bias, **options)
    return _user_shape(g, g.input_shape)


def _pool_shape(input, weight=None, bias=None, return_indices=False, **options) -> tuple:
    params.flag(return_indices, "return_indices")
    g = params.pool2d_geometry(input, **options)
    return _user_shape(g, g.output_shape)


_CONV_OPTIONS = (Option("stride", "pair", 1), Option("padding", "padding", 0), Option("dilation", "pair", 1),
                 Option("groups", "int", 1))  # fmt: skip
_POOL_OPTIONS = (Option("kernel_size", "pair", None), Option("stride", "pair", None), Option("padding", "pair", 0))
_CONV_TENSORS = dict(tensors=("input", "weight", "bias"), required=("input", "weight"))

#: One description per op, in the contract's order.
OP_SPECS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("conv2d", pb.Conv2dOptions, _CONV_OPTIONS, **_CONV_TENSORS, shape=_conv_shape),
        OpSpec("conv_transpose2d", pb.ConvTranspose2dOptions,
               (Option("stride", "pair", 1), Option("padding", "pair", 0), Option("output_padding", "pair", 0),
                Option("groups", "int", 1), Option("dilation", "pair", 1)), **_CONV_TENSORS,
               shape=_conv_transpose_shape),
        OpSpec("max_pool2d", pb.MaxPool2dOptions,
               (*_POOL_OPTIONS, Option("dilation", "pair", 1), Option("ceil_mode", "bool", False),
                Option("return_indices", "bool", False)),
               tensors=("input",), required=("input",), shape=_pool_shape),
        OpSpec("avg_pool2d", pb.AvgPool2dOptions,
               (*_POOL_OPTIONS, Option("ceil_mode", "bool", False), Option("count_include_pad", "bool", True),
                Option("divisor_override", "int", None)),
               tensors=("input",), required=("input",), shape=_pool_shape),
        OpSpec("relu", pb.ReluOptions, (), tensors=("input",), required=("input",),
               shape=lambda input, weight=None, bias=None: tuple(input)),
    )
}  # fmt: skip


def _spec(name: str) -> OpSpec:
    spec = OP_SPECS.get(name)
    if spec is None:
        raise InvalidArgumentError("op", f"unknown op {name!r}; expected one of {', '.join(OP_SPECS)}")
    return spec


def option_field(op: str | None, field: str) -> str:
    """The request field a core error names: ``op.<op>.<field>`` for an option of ``op``, else ``field`` itself
    (core errors name torch arguments; this is the one rule that places them in the request)."""
    spec = OP_SPECS.get(op) if op else None
    return f"op.{op}.{field}" if spec is not None and field in spec.option_names else field


def encode_op(name: str, **options) -> pb.Op:
    """An ``Op`` for op ``name`` with torch keyword options; None (or an omitted option) means torch's default."""
    spec = _spec(name)
    unknown = set(options) - set(spec.option_names)
    if unknown:
        raise InvalidArgumentError("op", f"{name} takes no option(s) {sorted(unknown)}")
    fields = {}
    for option in spec.options:
        value = options.get(option.name)
        if value is not None:
            encoded = _KINDS[option.kind][0](value, option.name)
            if encoded is not None:
                fields[option.name] = encoded
    return pb.Op(**{name: spec.options_type(**fields)})


def op_name(op: pb.Op) -> str:
    """The op selected in an ``Op`` message; INVALID_ARGUMENT if none is."""
    name = op.WhichOneof("op")
    if name is None:
        raise InvalidArgumentError("op", f"no op is set; expected one of {', '.join(OP_SPECS)}")
    return name


def decode_op(op: pb.Op) -> tuple[str, dict]:
    """``(name, options)``: the torch keyword arguments the core computes, defaults filled in (an unset
    ``divisor_override`` is None, told apart from 0 by the field's presence)."""
    name = op_name(op)
    spec = OP_SPECS[name]
    msg = getattr(op, name)
    fields = msg.DESCRIPTOR.fields_by_name
    options: dict = {}
    for option in spec.options:
        field = f"op.{name}.{option.name}"
        if fields[option.name].has_presence and not msg.HasField(option.name):
            options[option.name] = option.default
        else:
            options[option.name] = _KINDS[option.kind][1](getattr(msg, option.name), field)
    if name in ("max_pool2d", "avg_pool2d") and options["kernel_size"] is None:
        raise InvalidArgumentError(f"op.{name}.kernel_size", "is required")
    return name, options


def decode_conv_options(msg: pb.Conv2dOptions | None) -> dict:
    """conv2d keyword options from a ``Conv2dOptions`` message (unset: all defaults), as TrainKernel takes them."""
    return decode_op(pb.Op(conv2d=msg if msg is not None else pb.Conv2dOptions()))[1]


def output_bytes(name: str, options: Mapping[str, Any], shapes: Mapping[str, tuple | None], dtype: np.dtype) -> int:
    """Bytes of op ``name``'s forward results (the output, and int64 indices with return_indices) for
    inputs of these shapes (by field) and dtype, checking the arguments."""
    results = OP_SPECS[name].result_shapes(shapes, options, np.dtype(dtype), backward=False)
    return sum(math.prod(shape) * d.itemsize for shape, d in results)


# -- training enums -------------------------------------------------------------------------------


def _enum_table(enum, prefix: str) -> dict[str, int]:
    return {n[len(prefix) :].lower(): v for n, v in enum.items() if not n.endswith("_UNSPECIFIED")}


#: Loss name ("mse", "half_mse", "half_sse") -> wire enum, from the proto's Loss.
LOSSES = _enum_table(pb.Loss, "LOSS_")
#: Wire enum -> loss name; LOSS_UNSPECIFIED means mse.
LOSS_NAMES = {pb.LOSS_UNSPECIFIED: "mse", **{v: k for k, v in LOSSES.items()}}
#: Stop reason name ("converged", "max_steps", ...) -> wire enum, from the proto's StopReason.
STOP_REASONS = _enum_table(pb.StopReason, "STOP_REASON_")
#: Wire enum -> stop reason name.
STOP_REASON_NAMES = {v: k for k, v in STOP_REASONS.items()}
