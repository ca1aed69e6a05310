"""ConvRpcError: the one exception the SDK raises."""

from __future__ import annotations

import grpc

__all__ = ["ConvRpcError"]


#: The ErrorInfo reason of a request over one of the server's size caps (see convrpc.server.status).
CAP_REASON = "OVER_SERVER_CAP"


class ConvRpcError(Exception):
    """A convrpc call failed. ``code`` is a ``grpc.StatusCode``; ``message`` is the server's text;
    ``field`` names the offending request field when the server said which (else ``None``); ``cap`` is
    ``(setting, limit)`` when the request was over one of the server's size caps (else ``None``)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None,
                 cap: tuple[str, int] | None = None):  # fmt: skip
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.cap = cap

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "ConvRpcError":
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        message = error.details() if callable(getattr(error, "details", None)) else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, message or "", *_details_of(error))


def _details_of(error) -> tuple[str | None, tuple[str, int] | None]:
    """The first BadRequest field violation and the size cap in the rich status, where the server sent them."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)
    except Exception:  # noqa: BLE001 - details are a bonus; a plain status still makes a good error
        return None, None
    field = cap = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR) and field is None:
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.reason == CAP_REASON and info.metadata.get("limit", "").isdigit():
                cap = (info.metadata.get("setting", ""), int(info.metadata["limit"]))
    return field, cap
