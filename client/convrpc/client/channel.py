"""Channels to one or more convrpc servers, with the message limits and keepalive the server expects."""

from __future__ import annotations

import json

import grpc

from convrpc.core import config

__all__ = ["channel_options", "credentials", "open_channels"]

# Retries UNAVAILABLE (a replica restarting or draining) for the idempotent unary RPCs.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [
                    {"service": "convrpc.v1.ConvService", "method": "Forward"},
                    {"service": "convrpc.v1.ConvService", "method": "Backward"},
                    {"service": "convrpc.v1.ConvService", "method": "GetServerInfo"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel_options(max_message_bytes: int = config.MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    return [
        *config.transport_options(max_message_bytes),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        # Pings keep long, quiet training streams open; the server accepts this rate (see config).
        ("grpc.keepalive_time_ms", config.KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", config.KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
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
