"""The client end of a server's side channel: a stream's payload and results over a raw TCP socket.

A ForwardStream/BackwardStream that asks for it (``side_channel`` in its first message) gets a
``SideChannelOffer`` instead of waiting for chunks (see ``convrpc.server.side_channel``). The SDK
connects to the offered port on the host it dialled (TLS verified with the channel's root certificates
when the channel uses TLS), presents the token and the payload's length, waits for the server's
accepting byte, sends the tensors' bytes straight from the caller's arrays, and receives the results
straight into arrays preallocated from the response's headers. A side channel it cannot reach raises
``SideChannelFailed``: the call core sends the same call as chunks instead. One that closes on the
token, stalls for ``config.SIDE_CHANNEL_STALL_SECONDS`` or breaks mid-transfer raises
``SideChannelBroken``, an UNAVAILABLE ``grpc.RpcError``: the replica is in trouble (killed, frozen) or
is not the one that offered the token, and the call fails over as after any UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Sequence

import grpc
import numpy as np

from convrpc import chunks
from convrpc.core.errors import ConvError

from . import config
from .errors import ConvRpcError

__all__ = ["SideChannelBroken", "SideChannelFailed", "SideConnector", "SideTransfer", "target_host"]


class SideChannelFailed(ConvRpcError):
    """The side channel cannot be reached from here (a firewall, a NAT, an unpublished container port):
    this call and later ones to that replica go as chunks."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class SideChannelBroken(grpc.RpcError):
    """The side channel stalled, broke mid-transfer, or closed on its token: UNAVAILABLE, as gRPC says of a
    connection that fails. ``refused``: it closed before accepting the token (a server that died, or
    another one behind the same name), so later calls to that replica go as chunks."""

    def __init__(self, message: str, *, refused: bool = False):
        super().__init__(message)
        self._message = message
        self.refused = refused

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message


def target_host(target: str) -> str | None:
    """The host of a ``host:port`` target (``dns:///``, ``ipv4:``, ``ipv6:`` and ``[v6]`` too); None for
    a Unix socket or a list of addresses, which have no one host to dial."""
    if target.startswith(("unix:", "unix-abstract:")) or "," in target:
        return None
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    if target.startswith("["):
        return target[1 : target.find("]")]
    host, _, port = target.rpartition(":")
    return host if host and port.isdigit() else None


class SideConnector:
    """How this client dials its servers' side channels: plaintext, or TLS verified against
    ``root_certificates`` (the system's roots when None) for ``server_name`` or the target's host."""

    def __init__(self, *, tls: bool, root_certificates: bytes | None = None, server_name: str | None = None):
        self.server_name = server_name
        self.ssl_context = None
        if tls:
            cadata = root_certificates.decode("ascii") if root_certificates else None
            self.ssl_context = ssl.create_default_context(cadata=cadata)
            self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2

    def connect(self, target: str, offer, timeout: float) -> socket.socket:
        """A connection to ``offer``'s port on ``target``'s host (or the offer's), whose reads and writes
        wait at most ``timeout`` seconds each."""
        host = target_host(target)
        if host is None:
            raise OSError(f"{target} has no one host to dial")
        # A port a firewall or proxy swallows fails within the SDK's connect timeout, not the call's.
        connect = config.CONNECT_TIMEOUT_MS / 1000
        sock = socket.create_connection((offer.host or host, offer.port), timeout=min(timeout, connect))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:  # the handshake too
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_name or host)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return sock


class SideTransfer:
    """One call over a side channel: ``add`` takes every response message of its stream (blocking on the
    socket: the asyncio client runs it in a thread), ``finish`` returns the results, ``close`` (any thread,
    also when the RPC ends) drops the connection."""

    def __init__(self, connector: SideConnector, target: str, arrays: Sequence[np.ndarray], timeout: float | None,
                 allocate=np.empty):  # fmt: skip
        self.connector, self.target, self.arrays, self.timeout = connector, target, list(arrays), timeout
        self.allocate = allocate  # (shape, dtype) -> the array a result is received into
        self.assembler: chunks.PayloadAssembler | None = None
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    def add(self, message) -> None:
        kind = None if isinstance(message, tuple) else message.WhichOneof("message")
        if kind == "side_channel" and self.sock is None and not self._closed:
            self._send(message.side_channel)
        elif kind == "response" and self.sock is not None and self.assembler is None:
            self._receive(message.response)
        else:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed response: unexpected {kind or 'chunk'} on a "
                               "side-channel stream")  # fmt: skip

    def _send(self, offer) -> None:
        where = f"{offer.host or target_host(self.target)}:{offer.port}"
        payload = chunks.byte_views(self.arrays)
        total = sum(len(v) for v in payload)
        try:
            sock = self.connector.connect(self.target, offer, self._stall_timeout())
        except (OSError, ssl.SSLError) as exc:
            raise SideChannelFailed(f"cannot reach the side channel at {where}: {exc}") from None
        try:
            with self._lock:
                if self._closed:  # the RPC ended while we connected
                    sock.close()
                    raise ConnectionError("the call ended")
                self.sock = sock
            sock.sendall(bytes(offer.token) + total.to_bytes(8, "little"))
            accepted = sock.recv(1) == chunks.SIDE_ACCEPTED
        except TimeoutError:
            raise SideChannelBroken(f"the side channel at {where} did not answer its token") from None
        except OSError:
            accepted = False  # reset: not this server's token (or not a server)
        if not accepted:
            raise SideChannelBroken(f"the side channel at {where} closed on the call's token", refused=True)
        try:
            chunks.send_views(self.sock, payload)
        except OSError as exc:
            raise SideChannelBroken(f"the side channel at {where} broke while sending: {exc}") from None

    def _receive(self, response) -> None:
        try:
            self.assembler = chunks.PayloadAssembler(chunks.streamed_tensors(response), allocate=self.allocate)
        except ConvError as exc:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed response: {exc}") from None
        try:
            length = int.from_bytes(chunks.recv_exactly(self.sock, 8), "little")
            if length != self.assembler.total:
                raise ConvRpcError(grpc.StatusCode.INTERNAL, f"malformed response: the side channel announced "
                                   f"{length} bytes for results of {self.assembler.total}")  # fmt: skip
            self.assembler.fill(lambda views, total: chunks.recv_views(self.sock, views))
            self.close()  # the server ends the RPC once it sees this
        except OSError as exc:
            raise SideChannelBroken(f"the side channel broke while receiving the results: {exc}") from None

    def _stall_timeout(self) -> float:
        """Longest wait for one read or write: a live server on the other end never pauses this long."""
        stall = config.SIDE_CHANNEL_STALL_SECONDS
        return stall if self.timeout is None else min(stall, self.timeout)

    def finish(self) -> dict[str, np.ndarray]:
        if self.assembler is None:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, "the side-channel stream ended without a response")
        try:
            return self.assembler.finish()
        except ConvError as exc:
            raise ConvRpcError(grpc.StatusCode.DATA_LOSS, f"malformed response: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._closed, sock = True, self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
