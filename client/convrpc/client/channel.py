"""Channels to one or more convrpc servers, with the message limits, keepalive and methods the SDK uses."""

from __future__ import annotations

import ipaddress
import json

import grpc
from grpc_health.v1 import health_pb2

from convrpc import chunks
from convrpc.v1 import conv_service_pb2 as pb

from . import config

__all__ = ["channel_options", "credentials", "methods", "open_channels", "pinned_options", "single_address"]

# Every address a name resolves to takes calls in turn. No gRPC retry policy: the SDK's failover (see
# ``calls``) retries on another replica at once, where a channel's own retry would first wait, on the
# same replica, for a reconnection that a frozen server never completes (measured: 4.5 s instead of 3).
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# A training run's stream and its StopTraining must reach the same server: a run on a name that may
# resolve to several addresses gets a channel of its own that keeps to one of them, picked at random.
_PINNED_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]})
_SERVICE = "/convrpc.v1.ConvService/"
#: The unary methods the SDK calls, with their response types.
_UNARY = {
    "Forward": pb.ForwardResponse,
    "Backward": pb.BackwardResponse,
    "GetServerInfo": pb.GetServerInfoResponse,
    "OpenSharedMemorySession": pb.OpenSharedMemorySessionResponse,
    "CloseSharedMemorySession": pb.CloseSharedMemorySessionResponse,
    "StopTraining": pb.StopTrainingResponse,
}
_STREAMS = {"ForwardStream": pb.ForwardStreamResponse, "BackwardStream": pb.BackwardStreamResponse}


def channel_options(max_message_bytes: int = config.MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *chunks.TRANSPORT_OPTIONS,
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.keepalive_time_ms", config.KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", config.KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", config.KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.min_reconnect_backoff_ms", config.CONNECT_TIMEOUT_MS),
    ]


def credentials(root_certificates=None, private_key=None, certificate_chain=None):
    """TLS channel credentials when any certificate is given, else None (plaintext)."""
    if root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def open_channels(target, *, token, root_certificates, private_key, certificate_chain, options, grpc_module):
    """``(targets, metadata, channels)``: one channel per target, from ``grpc`` or ``grpc.aio``."""
    targets = [target] if isinstance(target, str) else list(target)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target: expected 'host:port', a gRPC name or a non-empty list of them, got {target!r}")
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    creds = credentials(root_certificates, private_key, certificate_chain)
    # gRPC honours the first of repeated arguments: the caller's options replace the defaults.
    given = {name for name, _ in options}
    opts = [o for o in channel_options() if o[0] not in given] + list(options)
    if creds is None:
        channels = [grpc_module.insecure_channel(t, opts) for t in targets]
    else:
        channels = [grpc_module.secure_channel(t, creds, opts) for t in targets]
    return targets, metadata, channels


def single_address(target: str) -> bool:
    """Whether ``target`` can only ever reach one server: an IP literal with a port, or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host, _, port = target.removeprefix("ipv4:").removeprefix("ipv6:").rpartition(":")
    if "," in target or not port.isdigit():
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name: it may resolve to several addresses
    return True


def pinned_options(options=()) -> list[tuple[str, object]]:
    """``options`` for a channel that sends every call to one address of its target."""
    return [("grpc.service_config", _PINNED_SERVICE_CONFIG)] + [o for o in options if o[0] != "grpc.service_config"]


def max_message_bytes(options=()) -> int:
    """The smaller of the send and receive limits a channel opened with ``options`` ends up with."""
    limits = {}
    for key, value in list(channel_options()) + list(options):
        if key in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
            limits[key] = int(value)
    return min((v for v in limits.values() if v > 0), default=2**31 - 1)


def _encode(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def methods(channel) -> dict:
    """The callables of every method the SDK uses on ``channel`` (a ``grpc`` or ``grpc.aio`` channel):
    streams send pre-encoded chunks and decode received ones without copying (see ``chunks``)."""
    calls = {
        name: channel.unary_unary(
            _SERVICE + name, request_serializer=_encode, response_deserializer=kind.FromString,
            _registered_method=True,
        )  # fmt: skip
        for name, kind in _UNARY.items()
    }
    calls.update(
        (name, channel.stream_stream(
            _SERVICE + name, request_serializer=_encode, response_deserializer=chunks.decoder(kind),
            _registered_method=True,
        ))  # fmt: skip
        for name, kind in _STREAMS.items()
    )
    calls.update(
        (name, channel.unary_stream(
            _SERVICE + name, request_serializer=_encode, response_deserializer=kind.FromString,
            _registered_method=True,
        ))  # fmt: skip
        for name, kind in (("TrainKernel", pb.TrainKernelResponse), ("TrainNetwork", pb.TrainNetworkResponse))
    )
    calls["Check"] = channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=_encode,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )  # fmt: skip
    return calls
