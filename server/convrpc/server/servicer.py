"""ConvService: translates RPCs to core calls (proto <-> arrays, errors <-> status codes) and nothing more.

Every compute RPC runs one pipeline: decode the request's tensors by their storage (inline bytes,
a span of the request's shared-memory session, or chunks that follow on the stream, or their bytes
over the side channel), call one backend function (the torch-named op or ``<op>_backward``), and
encode the results into the request's storage (shared memory when the request has a session, chunks
on a stream or the side channel it used, inline otherwise). ``add_to_server`` registers every RPC of
the service in one table.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading

import grpc
import numpy as np

from convrpc import chunks, networks, wire
from convrpc.buffers import WarmBuffers
from convrpc.core import DTYPES, OPS, Backend, network
from convrpc.core.backend import common_dtype
from convrpc.core.errors import (
    CallEnded, ConvError, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError, ServerDraining,
)  # fmt: skip
from convrpc.core.optim import AdamOptions, SgdOptions
from convrpc.core.placing import placing
from convrpc.core.stopping import StopFlag, stopping
from convrpc.core.training import TrainConfig, TrainResult, fit_kernel
from convrpc.v1 import conv_service_pb2 as pb

from . import status
from .decoding import Undecodable, UndecodableLog, UndecodableRequest, lenient
from .interceptors import ComputeSlots
from .logs import request_id as current_request_id
from .settings import Settings
from .shared_memory import SharedMemorySessions
from .side_channel import SideCall, SideChannel
from .stream_watch import StreamWatch
from .train_stream import TrainStream

log = logging.getLogger("convrpc.server")

__all__ = ["ConvService", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConvService"].full_name
#: The longest run_id a TrainKernelRequest may carry (the SDK sends 32 hex digits).
_MAX_RUN_ID = 64
#: A call that ends with at most this many seconds left ended at its deadline (gRPC reports 0 then).
_DEADLINE_SLACK = 0.01
_OPTIMIZER_FIELDS = ("lr", "momentum", "nesterov", "weight_decay", "beta1", "beta2", "eps")
#: (response message, stream response message) of the forward and the backward pipeline.
_RESPONSES = {False: (pb.ForwardResponse, pb.ForwardStreamResponse),
              True: (pb.BackwardResponse, pb.BackwardStreamResponse)}  # fmt: skip


def _serialize(message) -> bytes:
    """Pre-encoded chunks pass as they are; everything else is a protobuf message."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _field_prefix(exc: ConvError, request) -> str:
    """The training RPCs' core errors name conv2d and optimizer arguments; point them at their request fields.
    (The op RPCs place their option errors where they compute, with ``wire.option_field``.)"""
    if not isinstance(request, (pb.TrainKernelRequest, pb.TrainNetworkRequest)):
        return ""
    field = getattr(exc, "field", None)
    if isinstance(request, pb.TrainKernelRequest) and field in wire.OP_SPECS["conv2d"].option_names:
        return "conv."
    if field in _OPTIMIZER_FIELDS:
        return f"{request.WhichOneof('optimizer') or 'sgd'}."
    return ""


def _rpc(method):
    """Every error becomes a status: core errors by ``status.abort``, anything else INTERNAL with the
    request id the logs show, never UNKNOWN. Wraps unary and streaming methods alike."""

    def fail(self, exc, request, context):
        if isinstance(exc, UndecodableRequest):
            self.undecodable.report(context.peer(), method.__name__, exc)
        if isinstance(exc, ConvError):
            status.abort(context, exc, _field_prefix(exc, request))
        if not context.is_active():  # the client went away mid-stream: nothing to report to
            return
        request_id = current_request_id()
        log.exception("unexpected error in %s (request id %s)", method.__name__, request_id)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error must become a status
                fail(self, exc, request, context)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            fail(self, exc, request, context)

    return unary


class ConvService:
    """Every RPC of ConvService over one compute backend."""

    def __init__(self, backend: Backend, settings: Settings, version: str):
        self.backend = backend
        self.settings = settings
        self.version = version
        self.sessions = SharedMemorySessions(
            enabled=settings.shared_memory,
            max_region_bytes=settings.shm_max_region_bytes,
            other_users=settings.shm_other_users,
        )
        self.slots = ComputeSlots(settings.compute_slots)
        self.streams = StreamWatch(settings.stream_idle_timeout)
        self.buffers = WarmBuffers(settings.stream_buffer_bytes)
        self.undecodable = UndecodableLog()
        self._lock = threading.Lock()
        #: The stop event of every running training run (TrainKernel or TrainNetwork), by its run_id (or a
        #: private key without one): StopTraining serves both.
        self._runs: dict[object, threading.Event] = {}
        self._draining = False
        #: The raw socket large streams may move their bytes over (the server opens it); None: chunks only.
        self.side: SideChannel | None = None

    def add_to_server(self, server: grpc.Server) -> None:
        """Serve every RPC on ``server`` (before it starts). The stream RPCs use the chunk codecs of
        ``convrpc.chunks``: pre-encoded chunks are sent untouched and received chunks are handed over
        as views of the received bytes, without protobuf copying them."""
        unary, stream, bidi = (grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler,
                               grpc.stream_stream_rpc_method_handler)  # fmt: skip

        def handler(make, method, message, deserialize=None):
            decode = lenient(deserialize or message.FromString, message.DESCRIPTOR.name)
            return make(method, request_deserializer=decode, response_serializer=_serialize)

        server.add_registered_method_handlers(SERVICE_NAME, {
            "Forward": handler(unary, self.Forward, pb.ForwardRequest),
            "Backward": handler(unary, self.Backward, pb.BackwardRequest),
            "ForwardStream": handler(bidi, self.ForwardStream, pb.ForwardStreamRequest,
                                     chunks.decoder(pb.ForwardStreamRequest)),
            "BackwardStream": handler(bidi, self.BackwardStream, pb.BackwardStreamRequest,
                                      chunks.decoder(pb.BackwardStreamRequest)),
            "TrainKernel": handler(stream, self.TrainKernel, pb.TrainKernelRequest),
            "TrainNetwork": handler(stream, self.TrainNetwork, pb.TrainNetworkRequest),
            "StopTraining": handler(unary, self.StopTraining, pb.StopTrainingRequest),
            "GetServerInfo": handler(unary, self.GetServerInfo, pb.GetServerInfoRequest),
            "OpenSharedMemorySession": handler(unary, self.OpenSharedMemorySession, pb.OpenSharedMemorySessionRequest),
            "CloseSharedMemorySession": handler(
                unary, self.CloseSharedMemorySession, pb.CloseSharedMemorySessionRequest),
        })  # fmt: skip

    def drain(self) -> None:
        """Stop every running training loop (each ends with stop reason "cancelled") and refuse new ones."""
        with self._lock:
            self._draining = True
            for cancel in self._runs.values():
                cancel.set()

    def close(self) -> None:
        """End every shared-memory session (unmapping its regions); stop watching streams."""
        self.sessions.close()
        self.streams.close()
        if self.side is not None:
            self.side.close()

    # -- the op pipeline ------------------------------------------------------------------------

    @_rpc
    def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        return next(self._run(request, None, context, backward=False))

    @_rpc
    def Backward(self, request: pb.BackwardRequest, context) -> pb.BackwardResponse:
        return next(self._run(request, None, context, backward=True))

    @_rpc
    def ForwardStream(self, requests, context):
        yield from self._stream(requests, context, "ForwardStream", backward=False)

    @_rpc
    def BackwardStream(self, requests, context):
        yield from self._stream(requests, context, "BackwardStream", backward=True)

    def _stream(self, requests, context, rpc: str, *, backward: bool):
        """A chunked call, cancelled when it waits on its client for ``stream_idle_timeout`` seconds
        (a chunk that does not come, a response it does not read) or runs ``stream_max_seconds``.
        With ``side_channel`` set in its first message, the payload and results travel over the
        side channel (``SideCall``) instead of as chunks."""
        with self.streams.watch(context, rpc, self.settings.stream_max_seconds) as watched:
            requests = watched.reading(requests)
            first = _first_message(requests, rpc)
            payload = requests
            if first.side_channel:
                if self.side is None:
                    raise FailedPreconditionError(
                        "side_channel", "this server offers no side channel (setting side_channel is off): "
                        "send the payload as chunks")  # fmt: skip
                if first.request.HasField("shared_memory"):
                    raise InvalidArgumentError("side_channel", "cannot be combined with the request's shared_memory")
                payload = SideCall(self.side, context, _RESPONSES[backward][1])
            yield from watched.sending(self._run(first.request, payload, context, backward=backward))

    def _run(self, request, chunked, context, *, backward: bool):
        """Decode by storage -> compute -> encode into the request's storage. ``chunked`` is the rest of a
        stream (its chunks), a ``SideCall``, or None on a unary RPC; yields the response message(s)."""
        if request.WhichOneof("computation") == "network":
            net = networks.decode_network(request.network)
            fields, layers = self._check_network_tensors(request, net, backward), len(net)
            compute = functools.partial(self._compute_network, net, backward=backward)
            planned = lambda arrays: []  # noqa: E731 - not placed: the chain's layers would take the views
        else:
            name, options = wire.decode_op(request.op)
            spec = wire.OP_SPECS[name]
            fields, layers = self._check_tensors(request, spec, backward), 0
            compute = lambda arrays: self._compute(spec, options, arrays, backward)  # noqa: E731
            planned = lambda arrays: _planned_results(spec, options, arrays, backward)  # noqa: E731
        kind, stream_kind = _RESPONSES[backward]

        def response(tensors: dict):
            return wire.fill_tensors(kind(), tensors, layers)

        # A compute slot is taken once the request's bytes are here (a stream's chunks received), and
        # given back before the results are sent: a client that withholds either holds no slot.
        if request.HasField("shared_memory"):
            placement = request.shared_memory
            with self.sessions.request(placement.session_id) as call:
                arrays, shared = yield from self._decode(request, fields, chunked, call)
                _check_alive(context)
                with self.slots.held():
                    arrays.update(call.inputs(shared))
                    buffer = placement.output_buffer if placement.HasField("output_buffer") else None
                    views = call.plan(planned(arrays), buffer, shared)
                    results = _until_ended(context, compute, arrays, views)
                    del arrays, views
                    placed = response(call.outputs(results, buffer))
            yield placed if chunked is None else stream_kind(response=placed)
            return
        arrays, _ = yield from self._decode(request, fields, chunked, None)
        _check_alive(context)
        with self.slots.held():
            # A stream's results are computed into warm buffers too: fresh pages would cost the op their faults.
            warm = [] if chunked is None else [self.buffers.empty(*result) for result in planned(arrays)]
            results = _until_ended(context, compute, arrays, warm)
        del arrays, warm
        if chunked is None:
            yield response({f: wire.encode_tensor(a, f) for f, a in results})
            return
        header = stream_kind(response=response({f: wire.tensor_header(a, f) for f, a in results}))
        if isinstance(chunked, SideCall):
            yield from chunked.send(header, [a for _, a in results])
            return
        yield header
        yield from chunks.iter_chunks([a for _, a in results], self.settings.stream_chunk_bytes)

    def _check_tensors(self, request, spec: wire.OpSpec, backward: bool) -> list[tuple[str, pb.Tensor]]:
        """``[(field, Tensor)]`` of an op request, after refusing one the op does not take, then a missing one."""
        takes = spec.request_tensors(backward)
        if request.params:
            raise InvalidArgumentError("params", f"{spec.name} takes no params (a network's parameters)")
        for f in request.DESCRIPTOR.fields:
            if f.message_type is pb.Tensor.DESCRIPTOR and f.name not in takes and request.HasField(f.name):
                raise InvalidArgumentError(f.name, f"{spec.name} takes no {f.name}")
        for f in ("grad_output", *spec.required) if backward else spec.required:
            if not request.HasField(f):
                raise InvalidArgumentError(f, "is required")
        return [(f, getattr(request, f)) for f in takes if request.HasField(f)]

    def _check_network_tensors(self, request, net, backward: bool) -> list[tuple[str, pb.Tensor]]:
        """``[(path, Tensor)]`` of a network request, after refusing an op's weight or bias, a missing
        input or grad_output, and params that are not one entry per layer."""
        for f in ("weight", "bias"):
            if request.HasField(f):
                raise InvalidArgumentError(f, "a network takes its parameters in params, one entry per layer")
        for f in ("grad_output", "input") if backward else ("input",):
            if not request.HasField(f):
                raise InvalidArgumentError(f, "is required")
        if len(request.params) != len(net):
            raise InvalidArgumentError(
                "params", f"expected {len(net)} entries (one per layer, empty for a layer without parameters), "
                f"got {len(request.params)}",
            )  # fmt: skip
        return wire.tensor_fields(request)

    def _decode(self, request, fields: list[tuple[str, pb.Tensor]], chunked, call):
        """The request's inline and streamed tensors as ``{field: array}``, and ``[(field, Tensor)]`` of
        those in shared memory, for ``call.inputs`` to read. Each tensor's layout and caps (elements
        each, bytes all together) are checked before any shared or streamed tensor is read or allocated.
        A generator: over the side channel it yields the offer before receiving."""
        s = self.settings
        arrays, shared, streamed, total = {}, [], [], 0
        for f, tensor in fields:
            storage = tensor.WhichOneof("storage")
            if storage == "shared" or (storage is None and chunked is not None):
                if storage == "shared" and call is None:
                    raise InvalidArgumentError(f"{f}.shared", "needs the request's shared_memory session")
                total += wire.tensor_layout(tensor, f, max_elements=s.max_elements)[2]
                (shared if storage == "shared" else streamed).append((f, tensor))
            else:  # inline; on a unary RPC a tensor without storage is one without its bytes
                arrays[f] = wire.decode_tensor(tensor, f, max_elements=s.max_elements)
                total += arrays[f].nbytes
        if total > s.max_request_bytes:
            raise ResourceExhaustedError("request", f"tensors of {total} bytes exceed the server's cap of {s.max_request_bytes}",
                                         setting="max_request_bytes", limit=s.max_request_bytes)  # fmt: skip
        if chunked is not None:
            arrays.update((yield from self._receive(streamed, chunked)))
        return arrays, shared

    def _receive(self, headers, requests):
        assembler = chunks.PayloadAssembler(
            headers, max_elements=self.settings.max_elements, allocate=self.buffers.empty)
        if isinstance(requests, SideCall):
            yield from requests.receive(assembler)
            return assembler.finish()
        for message in requests:
            if isinstance(message, tuple):  # a chunk, decoded without copying its data
                assembler.add(*message)
                continue
            if isinstance(message, Undecodable):
                raise message.error()
            kind = message.WhichOneof("message")
            if kind == "request":
                raise InvalidArgumentError("request", "only the first message of a stream may carry the request")
            if kind is None:
                raise InvalidArgumentError("chunk", "a message carries neither a request nor a chunk")
            assembler.add(message.chunk.offset, message.chunk.data)
        return assembler.finish()

    def _compute(self, spec: wire.OpSpec, options: dict, arrays: dict, backward: bool):
        """``[(response field, host array)]`` of the op or its backward (max_pool2d's indices too, with
        return_indices); core errors naming an option are pointed at ``op.<op>.<option>``."""
        method = getattr(self.backend, f"{spec.name}_backward" if backward else spec.name)
        try:
            result = method(*(arrays.get(f) for f in spec.request_tensors(backward)), **options)
        except ConvError as exc:
            if getattr(exc, "field", None):
                exc.field = wire.option_field(spec.name, exc.field)
            raise
        results = result if isinstance(result, tuple) else (result,)
        fields = spec.result_tensors(backward, options)
        return [(f, self._host(a)) for f, a in zip(fields, results) if a is not None]

    def _compute_network(self, net, arrays: dict, *, backward: bool):
        """``[(response path, host array)]`` of a network's forward (the output) or backward (grad_input, then
        ``grad_params[i].weight``/``.bias``); core errors are pointed at the request's fields."""
        x, params = arrays["input"], networks.params_of(arrays, len(net))
        try:
            if backward:
                grads = network.backward(self.backend, net, x, params, arrays["grad_output"])
                results = [("grad_input", grads.input), *networks.param_arrays(grads.params, "grad_params").items()]
            else:
                results = [("output", network.forward(self.backend, net, x, params))]
        except ConvError as exc:
            if getattr(exc, "field", None):
                exc.field = networks.request_field(net, exc.field)
            raise
        return [(f, self._host(a)) for f, a in results if a is not None]

    def _host(self, array) -> np.ndarray:
        a = self.backend.kernels.to_host(array)
        return np.asarray(a, dtype=wire.DTYPES[wire.dtype_enum(a.dtype)], order="C")

    # -- shared-memory sessions -----------------------------------------------------------------

    @_rpc
    def OpenSharedMemorySession(self, request, context) -> pb.OpenSharedMemorySessionResponse:
        return self.sessions.open()

    @_rpc
    def CloseSharedMemorySession(self, request, context) -> pb.CloseSharedMemorySessionResponse:
        self.sessions.close_session(request.session_id)
        return pb.CloseSharedMemorySessionResponse()

    # -- training -------------------------------------------------------------------------------

    def _tensor(self, request, field: str, *, required: bool):
        if not request.HasField(field):
            if required:
                raise InvalidArgumentError(field, "is required")
            return None
        return wire.decode_tensor(getattr(request, field), field, max_elements=self.settings.max_elements)

    @_rpc
    def TrainKernel(self, request: pb.TrainKernelRequest, context):
        config = self._train_config(request)
        x = self._tensor(request, "input", required=True)
        y = self._tensor(request, "target", required=True)
        _check_run_id(request)
        cancelled = threading.Event()
        run = fit_kernel(self.backend, x, y, config, stop_event=cancelled)  # validates; nothing runs yet
        for event in self._stream_run("TrainKernel", request, context, run, cancelled, config.max_seconds, TrainResult):
            if isinstance(event, TrainResult):
                yield pb.TrainKernelResponse(result=self._result_message(event))
            else:
                yield pb.TrainKernelResponse(progress=self._progress_message(event))

    @_rpc
    def TrainNetwork(self, request: pb.TrainNetworkRequest, context):
        if not request.HasField("network"):
            raise InvalidArgumentError("network", "is required")
        net = networks.decode_network(request.network)
        common = self._run_options(request)
        x = self._tensor(request, "input", required=True)
        y = self._tensor(request, "target", required=True)
        _check_run_id(request)
        seed = request.seed if request.HasField("seed") else None
        config = network.NetworkTrainConfig(
            **common, tol=request.tol, batch_size=request.batch_size or None, seed=seed,
            report_every=max(1, request.report_every),
        )  # fmt: skip
        cancelled = threading.Event()
        try:
            params = self._network_params(request, net)
            # validates the chain, the data and the parameters; nothing runs yet
            run = network.fit_network(self.backend, net, x, y, params, config, stop_event=cancelled)
        except ConvError as exc:
            if getattr(exc, "field", None):
                exc.field = networks.request_field(net, exc.field)
            raise
        for event in self._stream_run("TrainNetwork", request, context, run, cancelled, config.max_seconds,
                                      network.NetworkResult):  # fmt: skip
            if isinstance(event, network.NetworkResult):
                yield pb.TrainNetworkResponse(result=self._network_result_message(event, len(net)))
            else:
                yield pb.TrainNetworkResponse(progress=self._progress_message(event))

    def _network_params(self, request: pb.TrainNetworkRequest, net) -> list[dict] | None:
        """The request's starting parameters; None when none are sent (the fit draws them from the seed)."""
        if not request.params:
            return None
        if len(request.params) != len(net):
            raise InvalidArgumentError(
                "params", f"expected {len(net)} entries (one per layer) or none, got {len(request.params)}"
            )
        cap = self.settings.max_elements
        arrays = {f: wire.decode_tensor(t, f, max_elements=cap) for f, t in wire.tensor_fields(request)
                  if f.startswith("params[")}  # fmt: skip
        return networks.params_of(arrays, len(net))

    def _stream_run(self, rpc: str, request, context, run, cancelled: threading.Event, max_seconds: float, result_type):
        """A validated fit's events as its stream sends them (TrainStream's throttling), the run registered
        under its run_id for StopTraining, and stopped when the RPC ends or the server drains."""
        # A cancelled RPC stops the run too (its result has nobody to go to); StopTraining stops it
        # and lets the stream end with the result.
        if not context.add_callback(cancelled.set):
            cancelled.set()  # the client is already gone
        key = request.run_id or object()
        with self._lock:
            if self._draining:
                raise ServerDraining()
            if key in self._runs:
                raise InvalidArgumentError("run_id", "is already used by a running run: draw a fresh one per run")
            self._runs[key] = cancelled
        limit = max_seconds + self.settings.stream_idle_timeout  # a reader that stops reading loses it
        try:
            with self.slots.held(), self.streams.watch(context, rpc, limit) as watched:
                events = TrainStream(run, cancelled, max_seconds=max_seconds, result_type=result_type)
                for event in watched.sending(events):
                    yield event
                    if isinstance(event, result_type):
                        return
        finally:
            with self._lock:
                self._runs.pop(key, None)

    @_rpc
    def StopTraining(self, request: pb.StopTrainingRequest, context) -> pb.StopTrainingResponse:
        with self._lock:
            cancel = self._runs.get(request.run_id) if request.run_id else None
        if cancel is not None:
            cancel.set()
        return pb.StopTrainingResponse(stopped=cancel is not None)

    def _run_options(self, request) -> dict:
        """The options TrainKernel and TrainNetwork share, checked against the server's caps: optimizer,
        loss, max_steps, max_seconds (0: the server's cap) and the server's progress interval."""
        s = self.settings
        max_steps = request.max_steps
        if max_steps <= 0:
            raise InvalidArgumentError("max_steps", f"must be > 0, got {max_steps}")
        if max_steps > s.max_train_steps:
            raise InvalidArgumentError("max_steps", f"must be at most the server's cap {s.max_train_steps}, got {max_steps}")
        max_seconds = request.max_seconds or s.max_train_seconds
        if max_seconds < 0:
            raise InvalidArgumentError("max_seconds", f"must be >= 0, got {request.max_seconds}")
        if max_seconds > s.max_train_seconds:  # refused like max_steps, never silently clamped
            raise InvalidArgumentError(
                "max_seconds", f"must be at most the server's cap {s.max_train_seconds:g}, got {max_seconds:g}"
            )
        if request.WhichOneof("optimizer") == "adam":
            m = request.adam
            optimizer = AdamOptions(
                lr=m.lr,
                beta1=m.beta1 if m.HasField("beta1") else 0.9,
                beta2=m.beta2 if m.HasField("beta2") else 0.999,
                eps=m.eps if m.HasField("eps") else 1e-8,
                weight_decay=m.weight_decay,
            )
        elif request.HasField("sgd"):
            m = request.sgd
            optimizer = SgdOptions(lr=m.lr, momentum=m.momentum, nesterov=m.nesterov, weight_decay=m.weight_decay)
        else:
            optimizer = SgdOptions()
        if request.loss not in wire.LOSS_NAMES:
            raise InvalidArgumentError("loss", f"unknown loss enum value {request.loss}")
        return dict(optimizer=optimizer, loss=wire.LOSS_NAMES[request.loss], max_steps=max_steps,
                    max_seconds=max_seconds, report_interval=s.report_interval)  # fmt: skip

    def _train_config(self, request: pb.TrainKernelRequest) -> TrainConfig:
        return TrainConfig(
            init_weight=self._tensor(request, "init_weight", required=False),
            kernel_size=(request.kernel_size.height, request.kernel_size.width) if request.HasField("kernel_size") else None,
            bias=request.bias,
            init_bias=self._tensor(request, "init_bias", required=False),
            **wire.decode_conv_options(request.conv),
            **self._run_options(request),
            tol=request.tol,
            report_every=max(1, request.report_every),
            snapshot_every=request.snapshot_every,
            seed=request.seed if request.HasField("seed") else None,
            batch_size=request.batch_size or None,
        )

    def _progress_message(self, event) -> pb.TrainProgress:
        msg = pb.TrainProgress(step=event.step, loss=event.loss, elapsed_seconds=event.elapsed, grad_norm=event.grad_norm)
        if getattr(event, "weight", None) is not None:
            msg.weight.CopyFrom(wire.encode_tensor(event.weight))
        if getattr(event, "accuracy", None) is not None:
            msg.accuracy = event.accuracy
        return msg

    @staticmethod
    def _end_fields(result) -> dict:
        """The fields every training result message has, from a core result."""
        return dict(steps=result.steps, loss=result.loss, stop_reason=wire.STOP_REASONS[result.stop_reason],
                    elapsed_seconds=result.elapsed, loss_history=wire.encode_tensor(result.history))  # fmt: skip

    def _network_result_message(self, result, layers: int) -> pb.TrainNetworkResult:
        msg = pb.TrainNetworkResult(**self._end_fields(result))
        if result.accuracy is not None:
            msg.accuracy = result.accuracy
        tensors = {f: wire.encode_tensor(self._host(a), f) for f, a in networks.param_arrays(result.params).items()}
        return wire.fill_tensors(msg, tensors, layers)

    def _result_message(self, result) -> pb.TrainResult:
        msg = pb.TrainResult(weight=wire.encode_tensor(result.weight), **self._end_fields(result))
        if result.bias is not None:
            msg.bias.CopyFrom(wire.encode_tensor(result.bias))
        return msg

    # -- description ----------------------------------------------------------------------------

    @_rpc
    def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        s = self.settings
        threads = getattr(self.backend.kernels, "compute_threads", lambda: 1)()
        return pb.GetServerInfoResponse(
            version=self.version,
            backend=self.backend.name,
            device=self.backend.device,
            max_message_bytes=s.max_message_bytes,
            max_elements=s.max_elements,
            max_train_steps=s.max_train_steps,
            max_train_seconds=s.max_train_seconds,
            ops=list(OPS),
            dtypes=[wire.dtype_enum(d) for d in DTYPES],
            compute_threads=threads,
            side_channel_port=0 if self.side is None else self.side.port,
        )


def _until_ended(context, compute, arrays: dict, views: list = ()):
    """``compute(arrays)``, stopped part way when the call ends under it (its client cancelled, its deadline
    passed: gRPC runs the callback either way), so its slot frees within a kernel's tile; its results
    computed into ``views`` where they fit (``convrpc.core.placing``)."""
    flag = StopFlag()
    if not context.add_callback(functools.partial(_stop_when_ended, context, flag)):
        flag.cancel()  # already over
    with stopping(flag), placing(views):
        return compute(arrays)


def _planned_results(spec: wire.OpSpec, options: dict, arrays: dict, backward: bool) -> list[tuple[tuple, np.dtype]]:
    """(shape, dtype) of each result of an op, in response order, worked out before it runs; none for a
    request compute will refuse (compute then says why, naming the request's fields)."""
    try:
        dtype = common_dtype({f: arrays.get(f) for f in spec.request_tensors(backward)})
        return spec.result_shapes({f: a.shape for f, a in arrays.items()}, options, dtype, backward)
    except ConvError:
        return []


def _stop_when_ended(context, flag: StopFlag) -> None:
    """An RPC-termination callback: a call that ends with time left was cancelled, else it expired."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK:
        flag.expire()
    else:
        flag.cancel()


def _check_run_id(request) -> None:
    if len(request.run_id) > _MAX_RUN_ID:
        raise InvalidArgumentError("run_id", f"must be at most {_MAX_RUN_ID} characters, got {len(request.run_id)}")


def _check_alive(context) -> None:
    """No compute for a call whose deadline passed (or that was cancelled) while its bytes arrived."""
    if not context.is_active():
        raise CallEnded()


def _first_message(requests, rpc: str):
    """A stream's first message; INVALID_ARGUMENT when it carries no request."""
    first = next(requests, None)
    if isinstance(first, Undecodable):
        raise first.error()
    if first is None or isinstance(first, tuple) or first.WhichOneof("message") != "request":
        raise InvalidArgumentError("request", f"the first message of a {rpc} must carry the request")
    return first
