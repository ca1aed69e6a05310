"""ConvService: translates RPCs to core calls (proto <-> arrays, errors <-> status codes) and nothing more."""

from __future__ import annotations

import functools
import logging
import threading

import grpc

from convrpc import wire
from convrpc.core import OPS, SUPPORTED_DTYPES, Backend
from convrpc.core.errors import ConvError, InvalidArgumentError, ServerDraining
from convrpc.core.optim import AdamOptions, SgdOptions
from convrpc.core.training import TrainConfig, TrainResult, fit_kernel
from convrpc.v1 import conv_service_pb2 as pb
from convrpc.v1 import conv_service_pb2_grpc as pb_grpc

from . import status
from .logs import request_id as current_request_id
from .settings import Settings
from .train_stream import TrainStream

log = logging.getLogger("convrpc.server")

_STOP_REASONS = {
    "converged": pb.STOP_REASON_CONVERGED,
    "max_steps": pb.STOP_REASON_MAX_STEPS,
    "cancelled": pb.STOP_REASON_CANCELLED,
    "diverged": pb.STOP_REASON_DIVERGED,
    "time_limit": pb.STOP_REASON_TIME_LIMIT,
}
_LOSSES = {pb.LOSS_UNSPECIFIED: "mse", pb.LOSS_MSE: "mse", pb.LOSS_HALF_MSE: "half_mse", pb.LOSS_HALF_SSE: "half_sse"}


_OPTIMIZER_FIELDS = ("lr", "momentum", "nesterov", "weight_decay", "beta1", "beta2", "eps")


def _field_prefix(exc: ConvError, request) -> str:
    """Core errors name torch arguments; point option errors at their place in the request."""
    field = getattr(exc, "field", None)
    if isinstance(request, pb.TrainKernelRequest):
        if field in wire.OP_OPTIONS["conv2d"]:
            return "conv."
        if field in _OPTIMIZER_FIELDS:
            return f"{request.WhichOneof('optimizer') or 'sgd'}."
        return ""
    return status.option_prefix(exc, request.op.WhichOneof("op") if hasattr(request, "op") else None)


def _translate_errors(method):
    """Turn core errors into their status codes and anything unexpected into INTERNAL, never UNKNOWN."""

    def fail(exc, request, context):
        if isinstance(exc, ConvError):
            status.abort(context, exc, _field_prefix(exc, request))
        request_id = current_request_id()
        log.exception("unexpected error in %s (request id %s)", method.__name__, request_id)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error must become a status
            fail(exc, request, context)

    @functools.wraps(method)
    def streaming(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            fail(exc, request, context)

    return streaming if method.__name__ == "TrainKernel" else unary


class ConvService(pb_grpc.ConvServiceServicer):
    """The ConvService RPCs over one compute backend."""

    def __init__(self, backend: Backend, settings: Settings, version: str):
        self.backend = backend
        self.settings = settings
        self.version = version
        self._lock = threading.Lock()
        self._runs: set[threading.Event] = set()
        self._draining = False

    def drain(self) -> None:
        """Stop every running training loop (each ends with stop reason "cancelled") and refuse new ones."""
        with self._lock:
            self._draining = True
            for cancel in self._runs:
                cancel.set()

    def _tensor(self, request, field: str, *, required: bool):
        if not request.HasField(field):
            if required:
                raise InvalidArgumentError(field, "is required")
            return None
        return wire.decode_tensor(getattr(request, field), field, max_elements=self.settings.max_elements)

    def _op_inputs(self, request, op: str, fields: tuple[str, ...]):
        """Decode the op's tensors (input, then weight and bias for convs); refuse tensors it does not take."""
        takes = wire.OP_TENSORS[op]
        for field in fields:
            if field not in takes and request.HasField(field):
                raise InvalidArgumentError(field, f"{op} takes no {field}")
        return [self._tensor(request, f, required=(f != "bias")) for f in takes]

    @_translate_errors
    def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        op, options = wire.decode_op(request.op)
        inputs = self._op_inputs(request, op, ("input", "weight", "bias"))
        output = getattr(self.backend, op)(*inputs, **options)
        return pb.ForwardResponse(output=wire.encode_tensor(output))

    @_translate_errors
    def Backward(self, request: pb.BackwardRequest, context) -> pb.BackwardResponse:
        op, options = wire.decode_op(request.op)
        grad_output = self._tensor(request, "grad_output", required=True)
        inputs = self._op_inputs(request, op, ("input", "weight", "bias"))
        grads = getattr(self.backend, f"{op}_backward")(grad_output, *inputs, **options)
        response = pb.BackwardResponse()
        for field, value in zip(("grad_input", "grad_weight", "grad_bias"), grads):
            if value is not None:
                getattr(response, field).CopyFrom(wire.encode_tensor(value))
        return response

    @_translate_errors
    def TrainKernel(self, request: pb.TrainKernelRequest, context):
        config = self._train_config(request)
        x = self._tensor(request, "input", required=True)
        y = self._tensor(request, "target", required=True)
        cancelled = threading.Event()
        run = fit_kernel(self.backend, x, y, config, stop_event=cancelled)  # validates; nothing runs yet
        if not context.add_callback(cancelled.set):
            cancelled.set()  # the client is already gone
        with self._lock:
            if self._draining:
                raise ServerDraining()
            self._runs.add(cancelled)
        try:
            for event in TrainStream(run, cancelled, min_interval=self.settings.report_interval):
                if isinstance(event, TrainResult):
                    yield pb.TrainKernelResponse(result=self._result_message(event))
                    return
                yield pb.TrainKernelResponse(progress=self._progress_message(event))
        finally:
            with self._lock:
                self._runs.discard(cancelled)

    def _train_config(self, request: pb.TrainKernelRequest) -> TrainConfig:
        s = self.settings
        max_steps = request.max_steps
        if max_steps <= 0:
            raise InvalidArgumentError("max_steps", f"must be > 0, got {max_steps}")
        if max_steps > s.max_train_steps:
            raise InvalidArgumentError("max_steps", f"must be at most the server's cap {s.max_train_steps}, got {max_steps}")
        max_seconds = request.max_seconds or s.max_train_seconds
        if max_seconds < 0:
            raise InvalidArgumentError("max_seconds", f"must be >= 0, got {request.max_seconds}")
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
        if request.loss not in _LOSSES:
            raise InvalidArgumentError("loss", f"unknown loss enum value {request.loss}")
        return TrainConfig(
            init_weight=self._tensor(request, "init_weight", required=False),
            kernel_size=(request.kernel_size.height, request.kernel_size.width) if request.HasField("kernel_size") else None,
            bias=request.bias,
            init_bias=self._tensor(request, "init_bias", required=False),
            **wire.decode_conv_options(request.conv),
            optimizer=optimizer,
            loss=_LOSSES[request.loss],
            max_steps=max_steps,
            tol=request.tol,
            report_every=max(1, request.report_every),
            snapshot_every=request.snapshot_every,
            seed=request.seed if request.HasField("seed") else None,
            batch_size=request.batch_size or None,
            max_seconds=min(max_seconds, s.max_train_seconds),
        )

    def _progress_message(self, event) -> pb.TrainProgress:
        msg = pb.TrainProgress(step=event.step, loss=event.loss, elapsed_seconds=event.elapsed, grad_norm=event.grad_norm)
        if event.weight is not None:
            msg.weight.CopyFrom(wire.encode_tensor(event.weight))
        return msg

    def _result_message(self, result) -> pb.TrainResult:
        msg = pb.TrainResult(
            weight=wire.encode_tensor(result.weight),
            steps=result.steps,
            loss=result.loss,
            stop_reason=_STOP_REASONS[result.stop_reason],
            elapsed_seconds=result.elapsed,
        )
        if result.bias is not None:
            msg.bias.CopyFrom(wire.encode_tensor(result.bias))
        return msg

    @_translate_errors
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
            dtypes=[wire._ENUM_OF[d] for d in SUPPORTED_DTYPES],
            compute_threads=threads,
        )

