"""Domain errors of the compute core; the server maps each to one gRPC status code."""

from __future__ import annotations

__all__ = [
    "ConvError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "BackendUnavailableError",
    "ServerDraining",
    "ServerBusy",
    "CallEnded",
    "CallCancelled",
    "DeadlineExceeded",
    "FailedPreconditionError",
]


class ConvError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidArgumentError(ConvError, ValueError):
    """A request argument is malformed; ``field`` names it, the message says what was expected."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class ResourceExhaustedError(ConvError):
    """A request is well formed but larger than a configured cap allows.

    ``setting`` and ``limit`` name the cap when it is one of the server's settings (``max_elements``,
    ``max_request_bytes``, ``max_op_flops``): the message then says so, and a client can size its shards by them."""

    def __init__(self, field: str, message: str, *, setting: str | None = None, limit: int | None = None):
        if setting is not None:
            message = f"{message} (the server's {setting} setting)"
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message
        self.setting = setting
        self.limit = limit


class BackendUnavailableError(ConvError, RuntimeError):
    """A backend was asked for that this install or machine cannot run."""


class ServerDraining(ConvError):
    """The server is shutting down and takes no new work."""

    def __init__(self, message: str = "the server is shutting down; retry on another replica"):
        super().__init__(message)


class ServerBusy(ConvError):
    """Every compute slot is in use; the client should retry with backoff (or on another replica)."""


class CallEnded(ConvError):
    """The call's deadline passed, or its client cancelled it, before its compute began: none is done."""

    def __init__(self, message: str = "the call's deadline passed (or it was cancelled) before its compute began"):
        super().__init__(message)


class CallCancelled(ConvError):
    """The call's client cancelled it while it computed: its compute stopped part way, its result is dropped."""

    def __init__(self, message: str = "the call was cancelled while it computed; its compute stopped"):
        super().__init__(message)


class DeadlineExceeded(ConvError):
    """The call's deadline passed while it computed: its compute stopped part way, its result is dropped."""

    def __init__(self, message: str = "the call's deadline passed while it computed; its compute stopped"):
        super().__init__(message)


class _FieldError(ConvError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class FailedPreconditionError(_FieldError):
    """A request needs a state the server is not in (shared memory disabled, an unknown session, an unsealed region)."""
