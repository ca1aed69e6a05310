"""ConvRpcError: the one exception the SDK raises."""

from __future__ import annotations

import grpc

__all__ = ["ConvRpcError"]


class ConvRpcError(Exception):
    """A convrpc call failed. ``code`` is a ``grpc.StatusCode``; ``message`` is the server's text;
    ``field`` names the offending request field when the server said which (else ``None``)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "ConvRpcError":
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        message = error.details() if callable(getattr(error, "details", None)) else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, message or "", _field_of(error))


def _field_of(error) -> str | None:
    """The first BadRequest field violation in the rich status, if the server sent one."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)
    except Exception:  # noqa: BLE001 - details are a bonus; a plain status still makes a good error
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                return bad.field_violations[0].field
    return None
