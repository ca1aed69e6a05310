"""Server settings: one dataclass holding every knob, with defaults from convrpc.core.config."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from convrpc.core import config
from convrpc.core.errors import InvalidArgumentError


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told. Field names are the CLI flags' and (upper-cased, CONVRPC_-prefixed) env names."""

    host: str = config.DEFAULT_HOST
    port: int = config.DEFAULT_PORT
    backend: str = config.DEFAULT_BACKEND
    #: gRPC worker threads (concurrent RPCs being handled).
    workers: int = 8
    max_message_bytes: int = config.MAX_MESSAGE_BYTES
    max_elements: int = config.MAX_ELEMENTS
    max_train_steps: int = config.MAX_TRAIN_STEPS
    max_train_seconds: float = config.MAX_TRAIN_SECONDS
    #: Shortest interval between two streamed training progress messages (seconds).
    report_interval: float = config.MIN_REPORT_INTERVAL
    #: Seconds in-flight RPCs get to finish on shutdown.
    grace: float = 10.0
    #: Compile (or load from cache) every kernel before reporting SERVING.
    warm_up: bool = True
    #: Let clients on this host pass tensors through POSIX shared memory (same user only).
    shared_memory: bool = True
    #: Seconds a shared-memory output region no client unlinked lives before the server unlinks it.
    shm_output_ttl: float = config.SHM_OUTPUT_TTL
    #: Bytes per chunk of the ForwardStream/BackwardStream responses.
    chunk_bytes: int = config.CHUNK_BYTES

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and value < 0:
                raise InvalidArgumentError(f.name, f"must be >= 0, got {value}")
        if not 0 <= self.port <= 65535:
            raise InvalidArgumentError("port", f"must be in 0..65535, got {self.port}")
        if self.workers < 1:
            raise InvalidArgumentError("workers", f"must be >= 1, got {self.workers}")
        if not 0 < self.chunk_bytes <= self.max_message_bytes // 2:
            raise InvalidArgumentError(
                "chunk_bytes", f"must be in 1..max_message_bytes/2 ({self.max_message_bytes // 2}), got {self.chunk_bytes}"
            )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "Settings":
        """Defaults, then CONVRPC_<FIELD> environment variables, then ``overrides`` (e.g. CLI flags)."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"CONVRPC_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(field: dataclasses.Field, raw: str):
    kind = field.type
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise InvalidArgumentError(f"CONVRPC_{field.name.upper()}", f"expected a {kind}, got {raw!r}") from None
