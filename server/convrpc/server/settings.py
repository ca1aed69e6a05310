"""Server settings: one dataclass holding every knob, read from defaults < TOML file < CONVRPC_* env < CLI flags.

A knob has one name everywhere: the field ``max_elements`` is the TOML key ``max_elements``, the
environment variable ``CONVRPC_MAX_ELEMENTS`` and the flag ``--max-elements``. Secrets
(``auth_tokens``) have no flag, since command lines are visible to every user of the machine.
A wrong value raises :class:`ConfigError` naming the key and where the value came from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from convrpc import chunks
from convrpc.core import config

__all__ = ["ConfigError", "Settings", "env_name", "flag_name"]

BACKENDS = ("auto", "numpy", "numba", "cupy")
LOG_FORMATS = ("plain", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Handler threads kept beyond the compute slots, so refusals, GetServerInfo and reflection always find one.
SPARE_WORKERS = 4
#: The least the server may send in one message (gRPC's own default send limit), whatever max_message_bytes says.
MIN_SEND_BYTES = 4 * 1024 * 1024


class ConfigError(ValueError):
    """A setting has a wrong value; ``key`` names it (as the source spelled it: key, env var or flag)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.description = message


def knob(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; see the module docstring for how each knob is named."""

    # -- network
    host: str = knob(config.DEFAULT_HOST, "address to bind; 0.0.0.0 or :: listens on every interface")
    port: int = knob(config.DEFAULT_PORT, "gRPC port; 0 picks a free one")
    # -- compute
    backend: str = knob(config.DEFAULT_BACKEND, "compute backend; auto picks cupy, then numba, then numpy",
                        choices=BACKENDS)  # fmt: skip
    compute_threads: int = knob(0, "threads one op computes with (numba and BLAS); 0 uses every CPU the process may")
    warm_up: bool = knob(True, "compile (or load from the numba cache) every kernel before reporting SERVING")
    # -- admission
    max_concurrent_rpcs: int = knob(
        config.MAX_CONCURRENT_RPCS,
        "compute RPCs (Forward, Backward, TrainKernel, TrainNetwork) admitted at once; more get RESOURCE_EXHAUSTED at once; "
        f"0 means one per CPU the process may use (at least {config.MIN_COMPUTE_SLOTS}), for the lowest latency",
    )
    workers: int = knob(0, f"gRPC handler threads; best above the compute slots; 0 means the slots + {SPARE_WORKERS}")
    max_queued_rpcs: int = knob(
        config.MAX_QUEUED_RPCS, "RPCs that may wait for a handler thread; beyond that gRPC answers RESOURCE_EXHAUSTED"
    )
    # -- limits
    max_message_bytes: int = knob(config.MAX_MESSAGE_BYTES, "largest gRPC message received or sent (bytes)")
    max_request_bytes: int = knob(
        config.MAX_MESSAGE_BYTES, "most tensor bytes one request may carry, all tensors together"
    )
    max_elements: int = knob(config.MAX_ELEMENTS, "most elements of any one tensor, in a request or an op's output")
    max_op_flops: float = knob(
        config.MAX_OP_FLOPS, "most floating-point operations one op call (or one training step) may cost, estimated "
        "from its geometry before anything is allocated; more get RESOURCE_EXHAUSTED"
    )
    max_train_steps: int = knob(config.MAX_TRAIN_STEPS, "most steps one TrainKernel or TrainNetwork run may take")
    max_train_seconds: float = knob(config.MAX_TRAIN_SECONDS, "longest wall time of one TrainKernel or TrainNetwork run (seconds)")
    report_interval: float = knob(
        config.MIN_REPORT_INTERVAL, "shortest interval between two training progress messages (seconds)"
    )
    # -- security
    tls_cert: str = knob(
        "", "PEM certificate chain of the server; with tls_key, the server speaks only TLS", metavar="PATH"
    )
    tls_key: str = knob("", "PEM private key of tls_cert", metavar="PATH")
    tls_client_ca: str = knob(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)", metavar="PATH"
    )
    auth_tokens_file: str = knob(
        "", "file of accepted bearer tokens, one per line (# comments); health and reflection stay open", metavar="PATH"
    )
    auth_tokens: str = knob(
        "", "accepted bearer tokens, comma-separated (env or TOML only: never a flag)", secret=True, flag=False
    )
    # -- operations
    metrics_port: int = knob(0, "port of the Prometheus /metrics endpoint, bound to host; 0 disables it")
    log_format: str = knob("plain", "log line format", choices=LOG_FORMATS)
    log_level: str = knob("info", "lowest level logged", choices=LOG_LEVELS)
    grace: float = knob(config.GRACE_SECONDS, "seconds in-flight RPCs get to finish on SIGTERM/SIGINT")
    # -- keepalive (the SDK pings every second during calls to notice a frozen replica within seconds)
    keepalive_time: float = knob(
        30.0, "seconds between the server's pings on a connection, so a vanished client's training run is cancelled"
    )
    keepalive_timeout: float = knob(10.0, "seconds a ping may go unanswered before the server drops the connection")
    min_client_ping_interval: float = knob(
        0.5, "shortest interval between client pings the server counts as fair (seconds; the SDK pings every "
        "second during calls); see max_ping_strikes"
    )
    max_ping_strikes: int = knob(
        0, "client pings sooner than min_client_ping_interval tolerated before GOAWAY too_many_pings; 0 tolerates any"
    )
    # -- connections and streams: what a client withholds is bounded (see the README's "Security")
    max_connection_idle: float = knob(
        config.MAX_CONNECTION_IDLE, "seconds a connection without calls stays open before the server closes it; 0 never"
    )
    max_connection_age: float = knob(
        0.0, "seconds after which the server asks a client to reconnect (GOAWAY; calls in flight may finish within "
        "max_train_seconds + stream_idle_timeout); 0 never"
    )
    stream_idle_timeout: float = knob(
        config.STREAM_IDLE_TIMEOUT, "seconds a stream may wait on its client (a message that does not come, a "
        "response it does not read) before the server cancels it"
    )
    stream_max_seconds: float = knob(
        config.STREAM_MAX_SECONDS, "longest a ForwardStream/BackwardStream call may take, receiving to last chunk sent"
    )
    # -- data paths (see the README's "Moving tensors fast")
    shared_memory: bool = knob(
        True, "let clients on this host pass tensors in sealed memfd regions handed over a Unix socket"
    )
    shm_other_users: bool = knob(
        False, "let processes of other users use shared memory (the socket's SO_PEERCRED uid is checked otherwise)"
    )
    shm_max_region_bytes: int = knob(
        config.SHM_MAX_REGION_BYTES, "largest shared-memory region the server maps for a client (bytes)"
    )
    chunk_bytes: int = knob(
        config.CHUNK_BYTES, "bytes per chunk of the ForwardStream/BackwardStream responses (at most max_message_bytes/2)"
    )
    # -- operations (added later; fields are never reordered)
    health_port: int = knob(
        0, "port of a plaintext server answering grpc.health.v1 alone (for probes under TLS), bound to host; 0: none"
    )
    # -- data paths (added later)
    side_channel: bool = knob(
        True, "offer large ForwardStream/BackwardStream calls a raw TCP socket for their bytes (TLS when the "
        "server has tls_cert; one-time tokens); off: chunks on the stream only"
    )
    side_channel_port: int = knob(0, "TCP port of the side channel, bound to host; 0 picks a free one")
    stream_buffer_bytes: int = knob(
        config.STREAM_BUFFER_BYTES, "warm memory kept to receive large stream payloads and compute their results "
        "into, instead of fresh pages each call (bytes); 0 keeps none"
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _KINDS[f.type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f.name, f"expected {_A[f.type]}, got {value!r}")
            if kind in (int, float) and not value >= 0:
                raise ConfigError(f.name, f"must be >= 0, got {value}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f.name, f"expected one of {', '.join(choices)}, got {value!r}")
        for name in ("port", "metrics_port", "health_port", "side_channel_port"):
            if getattr(self, name) > 65535:
                raise ConfigError(name, f"must be in 0..65535, got {getattr(self, name)}")
        for name in ("max_message_bytes", "max_request_bytes", "max_elements", "max_train_steps",
                     "shm_max_region_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_key" if self.tls_cert else "tls_cert", "tls_cert and tls_key must be given together")
        if self.keepalive_time <= 0 or self.keepalive_timeout <= 0:
            key = "keepalive_time" if self.keepalive_time <= 0 else "keepalive_timeout"
            raise ConfigError(key, f"must be > 0, got {getattr(self, key)}")
        for name in ("stream_idle_timeout", "stream_max_seconds", "max_op_flops"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.chunk_bytes < 1:
            raise ConfigError("chunk_bytes", f"must be >= 1, got {self.chunk_bytes}")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca", "mutual TLS needs the server's own tls_cert and tls_key")

    # -- derived values

    @property
    def stream_chunk_bytes(self) -> int:
        """chunk_bytes, kept to half a message so a chunk and its framing always fit."""
        return max(1, min(self.chunk_bytes, self.max_message_bytes // 2))

    def channel_options(self) -> list[tuple[str, int]]:
        """The gRPC server options: message limits, bulk-tensor tuning and keepalive (names as grpc spells them)."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Reflection's descriptors with their comments and error details must always fit, whatever
            # max_message_bytes says: the server sends at least gRPC's own default limit.
            ("grpc.max_send_message_length", max(self.max_message_bytes, MIN_SEND_BYTES)),
            *chunks.TRANSPORT_OPTIONS,
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", round(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # The server's side of the SDK's pings; gRPC's defaults (5 min, 2 strikes) would answer its
            # one-second pings with GOAWAY too_many_pings. The interval applies with and without data.
            ("grpc.http2.min_ping_interval_without_data_ms", round(self.min_client_ping_interval * 1000)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            *self._connection_limits(),
        ]

    def _connection_limits(self) -> list[tuple[str, int]]:
        """gRPC's idle and age limits, when set; a call in flight at the age limit may still finish."""
        options = []
        if self.max_connection_idle:
            options.append(("grpc.max_connection_idle_ms", _millis(self.max_connection_idle)))
        if self.max_connection_age:
            grace = self.max_train_seconds + self.stream_idle_timeout
            options += [("grpc.max_connection_age_ms", _millis(self.max_connection_age)),
                        ("grpc.max_connection_age_grace_ms", _millis(grace))]  # fmt: skip
        return options

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def compute_slots(self) -> int:
        """Compute RPCs admitted at once: ``max_concurrent_rpcs``, or one per usable CPU."""
        return self.max_concurrent_rpcs or max(config.MIN_COMPUTE_SLOTS, usable_cpus())

    @property
    def worker_threads(self) -> int:
        """gRPC handler threads: ``workers``, or the compute slots plus a few spare."""
        return self.workers or self.compute_slots + SPARE_WORKERS

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    # -- sources

    @classmethod
    def load(cls, config_file: str | None = None, environ: Mapping[str, str] | None = None,
             flags: Mapping[str, Any] | None = None) -> "Settings":  # fmt: skip
        """Defaults, then the TOML ``config_file``, then ``CONVRPC_*`` variables of ``environ``
        (default ``os.environ``), then ``flags`` (field name -> value; None means not given).

        The result's ``sources`` maps each field that is not a default to where its value came from.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if config_file:
            for name, value in _read_toml(config_file).items():
                values[name], sources[name] = value, f"{config_file}: {name}"
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                values[f.name], sources[f.name] = _parse(f, raw), env_name(f.name)
        for name, value in (flags or {}).items():
            if value is not None:
                flag = flag_name(name) if value is not False else flag_name(f"no_{name}")
                values[name], sources[name] = value, flag
        try:
            settings = cls(**values)
        except ConfigError as exc:
            where = sources.get(exc.key)
            raise ConfigError(where or exc.key, exc.description) from None
        object.__setattr__(settings, "sources", sources)
        return settings

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        """Defaults, then ``CONVRPC_*`` environment variables, then ``overrides`` (e.g. CLI flags)."""
        return cls.load(environ=environ, flags=overrides)

    def to_toml(self) -> str:
        """The effective settings as a TOML file (secrets masked), each non-default value's source in a comment."""
        sources = getattr(self, "sources", {})
        lines = ["# convrpc serve: effective settings (defaults < --config < CONVRPC_* < flags)"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            text = _toml_value(value)
            notes = [sources[f.name]] if f.name in sources else []
            if value == 0 and f.name in _AUTO:
                notes.append(f"0 = auto: {getattr(self, _AUTO[f.name])}")
            note = f"  # {'; '.join(notes)}" if notes else ""
            lines.append(f"{f.name} = {text}{note}")
        return "\n".join(lines) + "\n"


_KINDS = {"str": str, "int": int, "float": float, "bool": bool}
#: Knobs whose 0 means "derive it"; the property holding the derived value.
_AUTO = {"max_concurrent_rpcs": "compute_slots", "workers": "worker_threads"}
_A = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _millis(seconds: float) -> int:
    """A duration as gRPC's int32 milliseconds (longer ones are as good as forever)."""
    return min(round(seconds * 1000), 2**31 - 1)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # "<quota> <period>" or "max <period>"
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def env_name(name: str) -> str:
    return f"CONVRPC_{name.upper()}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(Settings)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: {key}", f"unknown setting; expected one of {', '.join(known)}")
        kind = _KINDS[known[key].type]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, data[key] = True, float(value)
        if not ok:
            raise ConfigError(f"{path}: {key}", f"expected {_A[known[key].type]}, got {value!r}")
    return data


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type
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
        raise ConfigError(env_name(f.name), f"expected {_A[kind]}, got {raw!r}") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
