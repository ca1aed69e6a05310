"""Networks on the wire, shared by server and SDK: ``Sequential`` <-> ``Network``, params <-> ``LayerParams``.

A layer travels as the options message of its op (``wire.OP_SPECS`` encodes and decodes them, so a
layer's options are checked exactly as the op's are) plus, for the conv layers, the channel counts,
kernel size and bias that torch.nn takes and the op options do not carry. Parameters travel as one
``LayerParams`` per layer; a tensor of a request or response is named by its path
(``params[2].weight``, ``grad_params[0].bias``; see ``wire.tensor_fields``), which is the name
errors, stream payloads and shared-memory placements use for it.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from convrpc import wire
from convrpc.core import network as nn
from convrpc.core.errors import InvalidArgumentError
from convrpc.v1 import conv_service_pb2 as pb

__all__ = [
    "KINDS", "PARAM_KEYS", "decode_network", "encode_network", "param_arrays", "params_of", "request_field",
]  # fmt: skip

#: Layer spec class -> its ``Layer.kind`` field (the op of the same name, or flatten / linear).
KINDS = {nn.Conv2d: "conv2d", nn.ConvTranspose2d: "conv_transpose2d", nn.MaxPool2d: "max_pool2d",
         nn.AvgPool2d: "avg_pool2d", nn.ReLU: "relu", nn.Flatten: "flatten", nn.Linear: "linear"}  # fmt: skip
_SPECS = {kind: cls for cls, kind in KINDS.items()}
_CONV = ("conv2d", "conv_transpose2d")
#: The keys of a layer's parameter dict, in field order.
PARAM_KEYS = ("weight", "bias")
_LAYER_FIELD = re.compile(r"layers\[(\d+)\](?:\.(\w+)(.*))?")


def _kind(layer) -> str | None:
    """The ``Layer.kind`` of a layer spec; None for anything else."""
    return next((kind for cls, kind in KINDS.items() if isinstance(layer, cls)), None)


def _options(layer, kind: str) -> dict:
    """The op options of a layer spec, by the op's torch argument names."""
    return {name: getattr(layer, name) for name in wire.OP_SPECS[kind].option_names if hasattr(layer, name)}


def encode_layer(layer) -> pb.Layer:
    kind = _kind(layer)
    if kind is None:
        raise InvalidArgumentError("", f"expected one of {', '.join(c.__name__ for c in KINDS)}, got {layer!r}")
    if kind == "flatten":
        return pb.Layer(flatten=pb.FlattenOptions())
    if kind == "linear":
        return pb.Layer(linear=pb.LinearOptions(in_features=layer.in_features, out_features=layer.out_features,
                                                bias=bool(layer.bias)))  # fmt: skip
    msg = pb.Layer(**{kind: getattr(wire.encode_op(kind, **_options(layer, kind)), kind)})
    if kind in _CONV:
        msg.in_channels, msg.out_channels, msg.bias = layer.in_channels, layer.out_channels, bool(layer.bias)
        msg.kernel_size.CopyFrom(wire.encode_op("max_pool2d", kernel_size=layer.kernel_size).max_pool2d.kernel_size)
    return msg


def encode_network(net: nn.Sequential) -> pb.Network:
    """A ``Network`` message of a ``Sequential``; INVALID_ARGUMENT naming ``layers[i]...`` for an option the
    wire cannot carry (the chain itself is checked by ``nn.check_network``)."""
    layers = []
    for i, layer in enumerate(net):
        try:
            layers.append(encode_layer(layer))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"layers[{i}]" + (exc.field and f".{exc.field}"), exc.description) from None
    return pb.Network(layers=layers)


def _decode_layer(msg: pb.Layer, i: int):
    where = f"network.layers[{i}]"
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidArgumentError(where, f"no layer kind is set; expected one of {', '.join(_SPECS)}")
    if kind == "flatten":
        return nn.Flatten()
    if kind == "relu":
        return nn.ReLU()
    if kind == "linear":
        m = msg.linear
        return nn.Linear(m.in_features, m.out_features, bias=m.bias if m.HasField("bias") else True)
    try:
        _, options = wire.decode_op(pb.Op(**{kind: getattr(msg, kind)}))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(exc.field.replace("op.", f"{where}.", 1), exc.description) from None
    if kind == "max_pool2d" and options.pop("return_indices"):
        raise InvalidArgumentError(f"{where}.max_pool2d.return_indices", "must be false in a network")
    if kind not in _CONV:
        return _SPECS[kind](**options)
    if not msg.HasField("kernel_size"):
        raise InvalidArgumentError(f"{where}.kernel_size", f"is required for a {kind} layer")
    kernel = (msg.kernel_size.height, msg.kernel_size.width)
    bias = msg.bias if msg.HasField("bias") else True
    return _SPECS[kind](msg.in_channels, msg.out_channels, kernel, **options, bias=bias)


def decode_network(msg: pb.Network) -> nn.Sequential:
    """The ``Sequential`` a ``Network`` describes, its options decoded as the ops' are (the chain is checked
    by ``nn.check_network`` against the input); INVALID_ARGUMENT naming ``network.layers[i]...``."""
    if not msg.layers:
        raise InvalidArgumentError("network.layers", "expected at least one layer")
    for i, layer in enumerate(msg.layers):
        kind = layer.WhichOneof("kind")
        for name in () if kind in _CONV else ("in_channels", "out_channels", "kernel_size", "bias"):
            if layer.HasField(name) if name in ("kernel_size", "bias") else getattr(layer, name):
                raise InvalidArgumentError(f"network.layers[{i}].{name}", f"is for conv layers only, not {kind}")
    return nn.Sequential(*(_decode_layer(layer, i) for i, layer in enumerate(msg.layers)))


def request_field(net: nn.Sequential, field: str | None) -> str | None:
    """The request field a core error about ``net`` names: ``layers[i].<option>`` is in the layer's options
    message (``network.layers[i].conv2d.stride``, ``network.layers[i].linear.in_features``), the conv
    layers' own arguments are on the layer (``network.layers[i].in_channels``); other fields
    (``params[i].weight``, ``input``) are request fields already."""
    match = _LAYER_FIELD.fullmatch(field or "")
    if match is None or int(match[1]) >= len(net):
        return field
    i, name, rest = int(match[1]), match[2], match[3]
    kind = _kind(net[i])
    if name is not None and (kind == "linear" or (kind in wire.OP_SPECS and name in wire.OP_SPECS[kind].option_names)):
        return f"network.layers[{i}].{kind}.{name}{rest}"
    return f"network.{field}"


def param_arrays(params: Sequence[Mapping[str, np.ndarray]], prefix: str = "params") -> dict[str, np.ndarray]:
    """A params list as ``{path: array}``, in payload order."""
    return {f"{prefix}[{i}].{k}": entry[k] for i, entry in enumerate(params) for k in PARAM_KEYS if k in entry}


def params_of(arrays: Mapping[str, np.ndarray], layers: int, prefix: str = "params") -> list[dict]:
    """``{path: array}`` back as a params list of ``layers`` entries (``{}`` for a layer without parameters)."""
    return [{k: arrays[f"{prefix}[{i}].{k}"] for k in PARAM_KEYS if f"{prefix}[{i}].{k}" in arrays}
            for i in range(layers)]  # fmt: skip
