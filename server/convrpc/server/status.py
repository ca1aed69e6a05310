"""The one mapping from core errors to gRPC status codes, with google.rpc.BadRequest details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from convrpc.core.errors import (
    BackendUnavailableError,
    CallEnded,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerBusy,
    ServerDraining,
)

log = logging.getLogger("convrpc.server")

_CODES = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
    ServerDraining: grpc.StatusCode.UNAVAILABLE,
    ServerBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CallEnded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
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
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if field is not None and code is grpc.StatusCode.INVALID_ARGUMENT:
        detail = any_pb2.Any()
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=exc.description)
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    return code, message, status


def abort(context: grpc.ServicerContext, exc: Exception, field_prefix: str = "") -> None:
    """End the RPC with the status for ``exc``; raises, as ``context.abort`` does."""
    _, _, status = status_for(exc, field_prefix)
    context.abort_with_status(rpc_status.to_status(status))
