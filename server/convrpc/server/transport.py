"""The bulk-data RPCs: chunked ForwardStream/BackwardStream and the shared-memory ones.

``DataPathService.register`` installs them over the generated (unimplemented) handlers, with
codecs that pass pre-encoded chunks through untouched and hand received chunks over as views of
the received bytes (see ``convrpc.chunks``).
Like ConvService they only translate: messages to arrays, the same backend calls, errors to
status codes through ``status``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid

import grpc
import numpy as np
from convrpc import chunks, wire
from convrpc.core import Backend, config
from convrpc.core.errors import ConvError, InvalidArgumentError
from convrpc.v1 import conv_service_pb2 as pb

from . import status
from .settings import Settings
from .shared_memory import SharedMemorySessions

log = logging.getLogger("convrpc.server")

__all__ = ["DataPathService"]

SERVICE_NAME = "convrpc.v1.ConvService"
_FORWARD_TENSORS = ("input", "weight", "bias")
_BACKWARD_TENSORS = ("grad_output", "input", "weight", "bias")
_GRADIENTS = ("grad_input", "grad_weight", "grad_bias")


def _serialize(message) -> bytes:
    """Pre-encoded chunks pass as they are; everything else is a protobuf message."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _fail(exc: Exception, context, method: str) -> None:
    if isinstance(exc, ConvError):
        status.abort(context, exc)
    if not context.is_active():  # the client went away mid-stream: nothing to report to
        return
    request_id = uuid.uuid4().hex[:12]
    log.exception("unexpected error in %s (request id %s)", method, request_id)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


def _rpc(method):
    """Every error becomes a status: core errors by ``status``, anything else INTERNAL, never UNKNOWN."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error must become a status
                _fail(exc, context, method.__name__)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _fail(exc, context, method.__name__)

    return unary


def _tensor_fields(message, op: str, fields: tuple[str, ...]) -> list[str]:
    """The tensor fields set in ``message``, checked against what ``op`` takes (input and weight required)."""
    takes = wire.OP_TENSORS[op]
    present = []
    for name in fields:
        if message.HasField(name):
            if name not in takes and name != "grad_output":
                raise InvalidArgumentError(name, f"{op} takes no {name}")
            present.append(name)
        elif name != "bias" and (name in takes or name == "grad_output"):
            raise InvalidArgumentError(name, "is required")
    return present


def _first_header(requests, what: str):
    first = next(requests, None)
    if first is None or isinstance(first, tuple) or first.WhichOneof("message") != "header":
        raise InvalidArgumentError("header", f"the first message of a {what} must carry the header")
    return first.header


class DataPathService:
    """ForwardStream, BackwardStream and the shared-memory RPCs over one backend."""

    def __init__(self, backend: Backend, settings: Settings):
        self.backend = backend
        self.settings = settings
        self.sessions = SharedMemorySessions(
            enabled=settings.shared_memory,
            output_ttl=settings.shm_output_ttl,
            session_ttl=config.SHM_SESSION_TTL,
            max_elements=settings.max_elements,
            max_bytes=settings.max_request_bytes,
        )

    def register(self, server: grpc.Server) -> None:
        """Serve these RPCs on ``server`` (before it starts), replacing the generated handlers."""
        stream, unary = grpc.stream_stream_rpc_method_handler, grpc.unary_unary_rpc_method_handler

        def plain(method, request_type):
            return unary(method, request_deserializer=request_type.FromString, response_serializer=_serialize)

        server.add_registered_method_handlers(
            SERVICE_NAME,
            {
                "ForwardStream": stream(
                    self.ForwardStream, request_deserializer=chunks.decoder(pb.ForwardStreamRequest),
                    response_serializer=_serialize,
                ),
                "BackwardStream": stream(
                    self.BackwardStream, request_deserializer=chunks.decoder(pb.BackwardStreamRequest),
                    response_serializer=_serialize,
                ),
                "OpenSharedMemorySession": plain(self.OpenSharedMemorySession, pb.OpenSharedMemorySessionRequest),
                "ForwardSharedMemory": plain(self.ForwardSharedMemory, pb.ForwardSharedMemoryRequest),
                "BackwardSharedMemory": plain(self.BackwardSharedMemory, pb.BackwardSharedMemoryRequest),
                "CloseSharedMemorySession": plain(self.CloseSharedMemorySession, pb.CloseSharedMemorySessionRequest),
            },
        )  # fmt: skip

    def close(self) -> None:
        self.sessions.close()

    # -- compute ----------------------------------------------------------------------------------

    def _apply(self, method: str, op: str, args: list, options: dict):
        try:
            return getattr(self.backend, method)(*args, **options)
        except ConvError as exc:  # option errors name torch arguments; point them into the request
            prefix = status.option_prefix(exc, op)
            if prefix:
                exc.field = prefix + exc.field
            raise

    def _host(self, array) -> np.ndarray:
        a = self.backend.kernels.to_host(array)
        return np.ascontiguousarray(a, dtype=wire.DTYPES[wire.dtype_enum(a.dtype)])

    def _forward(self, op: str, options: dict, arrays: dict) -> np.ndarray:
        output = self._apply(op, op, [arrays.get(f) for f in wire.OP_TENSORS[op]], options)
        return self._host(output)

    def _backward(self, op: str, options: dict, arrays: dict) -> list[tuple[str, np.ndarray]]:
        args = [arrays["grad_output"], *(arrays.get(f) for f in wire.OP_TENSORS[op])]
        grads = self._apply(f"{op}_backward", op, args, options)
        return [(name, self._host(g)) for name, g in zip(_GRADIENTS, grads) if g is not None]

    # -- chunked streams ------------------------------------------------------------------------

    def _receive(self, header, fields: list[str], requests) -> dict[str, np.ndarray]:
        assembler = chunks.PayloadAssembler(
            [(f, getattr(header, f)) for f in fields],
            max_elements=self.settings.max_elements,
            max_bytes=self.settings.max_request_bytes,
        )
        for message in requests:
            if isinstance(message, tuple):  # a chunk, decoded without copying its data
                assembler.add(*message)
                continue
            kind = message.WhichOneof("message")
            if kind == "header":
                raise InvalidArgumentError("header", "only the first message may carry a header")
            if kind is None:
                raise InvalidArgumentError("chunk", "a message carries neither a header nor a chunk")
            assembler.add(message.chunk.offset, message.chunk.data)
        return assembler.finish()

    @_rpc
    def ForwardStream(self, requests, context):
        header = _first_header(requests, "ForwardStream")
        op, options = wire.decode_op(header.op)
        arrays = self._receive(header, _tensor_fields(header, op, _FORWARD_TENSORS), requests)
        output = self._forward(op, options, arrays)
        del arrays
        yield pb.ForwardStreamResponse(header=pb.ForwardStreamOutput(output=chunks.tensor_spec(output)))
        yield from chunks.iter_chunks([output], self.settings.stream_chunk_bytes)

    @_rpc
    def BackwardStream(self, requests, context):
        header = _first_header(requests, "BackwardStream")
        op, options = wire.decode_op(header.op)
        arrays = self._receive(header, _tensor_fields(header, op, _BACKWARD_TENSORS), requests)
        grads = self._backward(op, options, arrays)
        del arrays
        specs = {name: chunks.tensor_spec(g) for name, g in grads}
        yield pb.BackwardStreamResponse(header=pb.BackwardStreamGradients(**specs))
        yield from chunks.iter_chunks([g for _, g in grads], self.settings.stream_chunk_bytes)

    # -- shared memory --------------------------------------------------------------------------

    @_rpc
    def OpenSharedMemorySession(self, request, context):
        return self.sessions.open(request.probe_region, request.probe_nonce)

    @_rpc
    def CloseSharedMemorySession(self, request, context):
        self.sessions.close_session(request.session_id)
        return pb.CloseSharedMemorySessionResponse()

    def _shared(self, request, fields: tuple[str, ...], compute) -> dict[str, pb.SharedTensor]:
        """Map the request's inputs, ``compute(op, options, arrays)`` -> [(field, array)], place the results."""
        op, options = wire.decode_op(request.op)
        present = _tensor_fields(request, op, fields)
        buffer = request.output_buffer if request.HasField("output_buffer") else None
        with self.sessions.request(request.session_id) as call:
            results = compute(op, options, call.inputs([(f, getattr(request, f)) for f in present]))
            return call.outputs(results, buffer)

    @_rpc
    def ForwardSharedMemory(self, request, context):
        shared = self._shared(request, _FORWARD_TENSORS, lambda *a: [("output", self._forward(*a))])
        return pb.ForwardSharedMemoryResponse(**shared)

    @_rpc
    def BackwardSharedMemory(self, request, context):
        return pb.BackwardSharedMemoryResponse(**self._shared(request, _BACKWARD_TENSORS, self._backward))
