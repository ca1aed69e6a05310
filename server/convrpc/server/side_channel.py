"""SideChannel: a raw TCP socket for the bytes of large ForwardStream/BackwardStream calls.

gRPC Python's receive path, not the socket, bounds the chunked streams (see the README's "Moving
tensors fast"). So a stream whose first message asks for it gets a ``SideChannelOffer``: a port on
the gRPC port's host and a token, random and good for that call only, once, for a few seconds. The
client connects (TLS when the server has a certificate), sends the token and the payload's length,
waits for one accepting byte and sends the payload; the call's handler receives it straight into the
arrays it preallocated after checking every header against the caps, computes, answers on the
stream and writes the results back on the same connection. The RPC stays the control path: auth,
caps, admission and status codes are the stream's own, the connection closes when the RPC ends, and
a connection that breaks fails the RPC.

A connection holds nothing but a short-lived handshake thread (at most ``max_handshakes`` at once;
more are closed at once) until it presents a live token, and is closed if it has not within the
token's lifetime or ``stream_idle_timeout``, whichever is shorter. No compute slot is taken before
every byte of the payload arrived; every read and write after that waits at most ``stream_idle_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import threading
import time
from typing import Sequence

from convrpc import chunks
from convrpc.core.errors import CallEnded, InvalidArgumentError
from convrpc.v1 import conv_service_pb2 as pb

__all__ = ["HEADER_BYTES", "SideCall", "SideChannel", "SideConnection", "TOKEN_BYTES"]

log = logging.getLogger("convrpc.server")

TOKEN_BYTES = chunks.SIDE_TOKEN_BYTES
#: What a client sends first: the token, then the payload's length (8 bytes, little-endian).
HEADER_BYTES = TOKEN_BYTES + 8


class SideConnection:
    """One call's accepted connection: ``receive`` the payload into place, ``send`` the results."""

    def __init__(self, sock, length: int, idle_timeout: float):
        self.sock, self.length, self.idle_timeout = sock, length, idle_timeout
        self._closed = threading.Lock()

    def _timed_out(self) -> CallEnded:
        return CallEnded(
            f"the side channel waited on its client for {self.idle_timeout:g} s (setting stream_idle_timeout)")

    def receive(self, views: Sequence[memoryview], total: int) -> None:
        """Fill ``views`` (``total`` bytes in all, the length the client announced) from the connection."""
        self.sock.settimeout(self.idle_timeout)
        try:
            self.sock.sendall(chunks.SIDE_ACCEPTED)
            chunks.recv_views(self.sock, views)
        except TimeoutError:
            raise self._timed_out() from None
        except ConnectionError as exc:
            raise InvalidArgumentError("side_channel", str(exc)) from None
        except OSError as exc:
            raise CallEnded(f"the side channel broke before {total} bytes arrived ({exc})") from None

    def send(self, views: Sequence[memoryview]) -> None:
        """Write the results' length and bytes, then wait for the client to close (it has every byte:
        the RPC, which ends next, never overtakes them), and close."""
        total = sum(len(v) for v in views)
        try:
            self.sock.sendall(total.to_bytes(8, "little"))
            chunks.send_views(self.sock, views)
            if self.sock.recv(1):
                raise InvalidArgumentError("side_channel", "the client sent bytes after its payload")
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise CallEnded(f"the side channel broke while sending the results ({exc})") from None
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent and thread-safe: the RPC's end (any thread) and the handler may both close."""
        if not self._closed.acquire(blocking=False):
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class _Pending:
    """A token offered to a call, waiting for its connection; handed over at most once, never after the RPC ended."""

    def __init__(self, expires: float):
        self.expires = expires
        self.ready = threading.Event()
        self.connection: SideConnection | None = None
        self.ended = False
        self._lock = threading.Lock()

    def hand(self, connection: SideConnection) -> bool:
        with self._lock:
            if self.ended or self.connection is not None or time.monotonic() > self.expires:
                return False
            self.connection = connection
        self.ready.set()
        return True

    def end(self) -> None:
        """The RPC ended (any thread): wake its handler and close the connection, taken or not."""
        with self._lock:
            self.ended = True
            connection = self.connection
        self.ready.set()
        if connection is not None:
            connection.close()


class SideChannel:
    """The listener, its handshake threads and the tokens on offer. ``close()`` stops it."""

    def __init__(self, host: str, port: int, *, idle_timeout: float, token_seconds: float,
                 ssl_context: ssl.SSLContext | None = None, max_handshakes: int = 32):  # fmt: skip
        self.idle_timeout, self.token_seconds, self.ssl_context = idle_timeout, token_seconds, ssl_context
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # "::" takes IPv4 clients too, as gRPC's "[::]" does.
        dualstack = host == "::" and socket.has_dualstack_ipv6()
        self._listener = socket.create_server((host, port), family=family, backlog=128, dualstack_ipv6=dualstack)
        self.port = self._listener.getsockname()[1]
        #: The host an offer names: empty for an unspecified address (the client uses the host it dialled).
        self.host = "" if host in ("0.0.0.0", "::", "") else host
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
        self._handshakes = threading.BoundedSemaphore(max_handshakes)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="convrpc-side-channel", daemon=True)
        self._thread.start()

    # -- the call's side

    def offer(self) -> tuple[bytes, _Pending]:
        """A fresh token and what its connection will be handed to."""
        token = secrets.token_bytes(TOKEN_BYTES)
        pending = _Pending(time.monotonic() + self.token_seconds)
        with self._lock:
            now = time.monotonic()
            for stale in [t for t, p in self._pending.items() if p.expires < now]:
                del self._pending[stale]
            self._pending[token] = pending
        return token, pending

    def connection(self, token: bytes, pending: _Pending, total: int) -> SideConnection:
        """Wait for the connection that presents ``token`` (the call's payload of ``total`` bytes)."""
        try:
            pending.ready.wait(max(0.0, pending.expires - time.monotonic()))
            if pending.ended:
                raise CallEnded("the call ended before its side channel connected")
            if pending.connection is None:
                raise CallEnded(f"the client did not connect to the side channel within {self.token_seconds:g} s")
        finally:
            with self._lock:
                self._pending.pop(token, None)
        connection = pending.connection
        if connection.length != total:
            connection.close()
            raise InvalidArgumentError(
                "side_channel.length",
                f"expected the {total} bytes the request's tensors declare, got {connection.length}")
        return connection

    # -- the listener's side

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # out of files: let handshakes finish
                continue
            if not self._handshakes.acquire(blocking=False):
                sock.close()  # too many connections without a token: refused before reading a byte
                continue
            threading.Thread(target=self._handshake, args=(sock,), name="convrpc-side-handshake", daemon=True).start()

    def _handshake(self, sock: socket.socket) -> None:
        handed = False
        try:
            deadline = time.monotonic() + min(self.idle_timeout, self.token_seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            header = chunks.recv_exactly(sock, HEADER_BYTES, deadline)
            token, length = header[:TOKEN_BYTES], int.from_bytes(header[TOKEN_BYTES:], "little")
            with self._lock:
                pending = self._pending.pop(token, None)  # single use, whatever happens next
            handed = pending is not None and pending.hand(SideConnection(sock, length, self.idle_timeout))
        except (OSError, ssl.SSLError, ValueError):
            pass  # a port scan, a wrong certificate, a stall: nothing was handed over
        finally:
            if not handed:
                with contextlib.suppress(OSError):
                    sock.close()
            self._handshakes.release()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.end()


class SideCall:
    """One stream call's payload over the side channel, in place of its chunks: ``receive`` (a generator
    yielding the offer) fills an assembler, ``send`` yields the response header and writes the results."""

    def __init__(self, channel: SideChannel, context, stream_response):
        self.channel, self.context, self.stream_response = channel, context, stream_response
        self.connection: SideConnection | None = None

    def receive(self, assembler: chunks.PayloadAssembler):
        token, pending = self.channel.offer()
        if not self.context.add_callback(pending.end):  # a closed RPC closes the connection
            pending.end()
        offer = pb.SideChannelOffer(host=self.channel.host, port=self.channel.port, token=token)
        yield self.stream_response(side_channel=offer)
        self.connection = self.channel.connection(token, pending, assembler.total)
        assembler.fill(self.connection.receive)

    def send(self, header, arrays):
        yield header
        self.connection.send(chunks.byte_views(arrays))
