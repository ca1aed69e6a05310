"""TLS credentials and bearer tokens from the settings; unreadable or empty files stop start-up."""

from __future__ import annotations

import ssl

import grpc

from .settings import ConfigError, Settings

__all__ = ["load_tokens", "server_credentials", "side_channel_ssl"]


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not data.strip():
        raise ConfigError(key, f"{path} is empty")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual TLS when ``tls_client_ca`` is set), or None for plaintext."""
    if not settings.tls:
        return None
    cert = _read("tls_cert", settings.tls_cert)
    key = _read("tls_key", settings.tls_key)
    for name, pem, marker in (("tls_cert", cert, b"CERTIFICATE"), ("tls_key", key, b"PRIVATE KEY")):
        if b"-----BEGIN" not in pem or marker not in pem:
            raise ConfigError(name, f"expected a PEM {marker.decode().lower()} in {getattr(settings, name)}")
    ca = _read("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def side_channel_ssl(settings: Settings) -> ssl.SSLContext | None:
    """The side channel's TLS (the gRPC port's certificate and key), or None for plaintext. No client
    certificate is asked for under mutual TLS too: the one-time token proves the call's authentication."""
    if not settings.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls_cert", f"cannot load {settings.tls_cert} with {settings.tls_key}: {exc}") from None
    return context


def load_tokens(settings: Settings) -> tuple[bytes, ...]:
    """The accepted bearer tokens (``auth_tokens`` plus the lines of ``auth_tokens_file``); empty: no auth."""
    tokens = [(t.strip(), "auth_tokens") for t in settings.auth_tokens.split(",") if t.strip()]
    if settings.auth_tokens_file:
        text = _read("auth_tokens_file", settings.auth_tokens_file).decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines()]
        tokens += [(line, "auth_tokens_file") for line in lines if line and not line.startswith("#")]
        if not any(key == "auth_tokens_file" for _, key in tokens):
            raise ConfigError("auth_tokens_file", f"{settings.auth_tokens_file} holds no token")
    for token, key in tokens:
        # A token travels in an HTTP/2 header: printable ASCII without spaces.
        if not all(33 <= ord(c) < 127 for c in token):
            raise ConfigError(key, "tokens must be printable ASCII without spaces")
    return tuple(token.encode() for token, _ in tokens)
