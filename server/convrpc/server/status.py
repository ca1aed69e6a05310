"""The one mapping from core errors to gRPC status codes, with google.rpc error details.

Details travel in the ``grpc-status-details-bin`` trailer (grpcio-status, the standard encoding every gRPC
library reads): ``BadRequest`` naming the field on INVALID_ARGUMENT and on a size cap's RESOURCE_EXHAUSTED,
``RetryInfo`` on the refusals a client should retry (UNAVAILABLE while warming up or draining,
RESOURCE_EXHAUSTED when every compute slot is busy), ``ErrorInfo`` with a reason on UNAUTHENTICATED and,
reason ``OVER_SERVER_CAP`` with the setting's name and value, on a request over a size cap.
"""

from __future__ import annotations

import collections
import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from convrpc.core.errors import (
    BackendUnavailableError,
    CallCancelled,
    CallEnded,
    DeadlineExceeded,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServerBusy,
    ServerDraining,
)

log = logging.getLogger("convrpc.server")

#: The ``ErrorInfo.domain`` of convrpc's errors.
ERROR_DOMAIN = "convrpc.v1"
#: The ``ErrorInfo.reason`` of a request over one of the server's size caps; its metadata names the setting
#: and its value, so that a client can cut the call to fit (the SDK does).
CAP_REASON = "OVER_SERVER_CAP"
#: The wait a RetryInfo suggests: a compute slot frees within a typical call, a draining server's
#: replicas take over at once, and warm-up loads cached kernels in about a second.
RETRY_DELAY_SECONDS = 1.0

_CODES = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
    ServerDraining: grpc.StatusCode.UNAVAILABLE,
    ServerBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CallEnded: grpc.StatusCode.DEADLINE_EXCEEDED,
    CallCancelled: grpc.StatusCode.CANCELLED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(exc: Exception, field_prefix: str = "") -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    """The status code, message and rich status (with a BadRequest field violation) for a core error."""
    code = next((c for t, c in _CODES.items() if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
    field = getattr(exc, "field", None)
    if field is not None:
        field = f"{field_prefix}{field}"
        message = f"{field}: {exc.description}"
    else:
        message = str(exc)
    details = []
    if field is not None and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=exc.description)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if getattr(exc, "setting", None) is not None:  # a cap of the server's settings: say which and how big
        details.append(error_info(CAP_REASON, setting=exc.setting, limit=str(exc.limit)))
    if code is grpc.StatusCode.UNAVAILABLE:
        details.append(retry_info())
    return code, message, rich_status(code, message, *details)


def rich_status(code: grpc.StatusCode, message: str, *details) -> status_pb2.Status:
    """A google.rpc.Status of ``code`` and ``message`` carrying ``details`` (google.rpc messages)."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


def retry_info(seconds: float = RETRY_DELAY_SECONDS) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def abort_with(context: grpc.ServicerContext, status: status_pb2.Status) -> None:
    """End the RPC with ``status``, keeping the trailing metadata already set (the request id); raises."""
    encoded = rpc_status.to_status(status)
    kept = tuple(item for item in context.trailing_metadata() or () if item[0] != "grpc-status-details-bin")
    context.abort_with_status(_Status(encoded.code, encoded.details, kept + tuple(encoded.trailing_metadata)))


def abort(context: grpc.ServicerContext, exc: Exception, field_prefix: str = "") -> None:
    """End the RPC with the status for ``exc``; raises, as ``context.abort`` does."""
    _, _, status = status_for(exc, field_prefix)
    abort_with(context, status)
