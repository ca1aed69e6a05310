"""Sealed memfd regions of the co-located data path and the socket protocol that hands them over.

A client makes each region with ``memfd_create``, sizes it, and seals it against shrinking and
growing; it passes the file descriptor to the server over a Unix socket (SCM_RIGHTS). A region that
cannot shrink can be mapped safely: no access within its size can ever fault past its end, so the
server maps each region once and reads and writes tensors in place, whatever its owner does (a
truncate fails with EPERM; a punched hole reads as zeros). Nothing is ever named in /dev/shm: a
region lives while some process holds its descriptor or a mapping, so a client that dies leaves
nothing behind.

The socket is SOCK_SEQPACKET (one message per send, boundaries kept; end of file when the peer
goes) in Linux's abstract namespace, which belongs to the network namespace: a client on another
host or in another container cannot connect and takes the network path instead. Messages:

- client -> server: ``H`` + connect token (first, once); ``A`` + region id (u64 LE) with the
  region's fd as SCM_RIGHTS; ``D`` + region id (the client is done with it; no answer).
- server -> client: ``R`` + region id (0 for ``H``) + gRPC status code (u32 LE) + UTF-8 message,
  answering ``H`` and every ``A`` in order.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct

__all__ = [
    "ADD",
    "AVAILABLE",
    "DROP",
    "HELLO",
    "MAX_MESSAGE",
    "REPLY",
    "REQUIRED_SEALS",
    "create_region",
    "decode",
    "decode_reply",
    "encode",
    "encode_reply",
    "map_region",
    "socket_address",
]

#: Whether this platform has sealed memfds and fd passing (Linux).
AVAILABLE = all(
    hasattr(m, n)
    for m, n in [(os, "memfd_create"), (os, "MFD_ALLOW_SEALING"), (fcntl, "F_ADD_SEALS"), (socket, "send_fds"),
                 (socket, "SOCK_SEQPACKET"), (mmap, "MAP_SHARED")]
)  # fmt: skip
HELLO, ADD, DROP, REPLY = b"H", b"A", b"D", b"R"
#: The largest message either side sends (a reply's message is cut to fit).
MAX_MESSAGE = 4096
#: The seals a region must carry: without SHRINK a mapping of it could SIGBUS its reader.
REQUIRED_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)
_ID = struct.Struct("<Q")
_REPLY = struct.Struct("<QI")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def socket_address(name: str) -> bytes:
    """The bind/connect address of an abstract-namespace socket called ``name``."""
    return b"\0" + name.encode()


def create_region(size: int) -> int:
    """A new sealed memfd of ``size`` bytes, its pages reserved (OSError now rather than a fault later).

    The caller owns the descriptor (close-on-exec) and closes it."""
    fd = os.memfd_create("convrpc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_region(fd: int, size: int, *, populate: bool = False) -> mmap.mmap:
    """Map ``size`` bytes of a region read-write; ``populate`` pre-faults its pages in one system call."""
    flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def encode(kind: bytes, region_id: int = 0, token: bytes = b"") -> bytes:
    """A client message: ``HELLO`` with its token, or ``ADD``/``DROP`` of a region id."""
    return kind + (token if kind == HELLO else _ID.pack(region_id))


def decode(message: bytes) -> tuple[bytes, int, bytes]:
    """``(kind, region id, token)`` of a client message; ValueError if it is none of them."""
    kind, body = message[:1], message[1:]
    if kind == HELLO:
        return kind, 0, body
    if kind in (ADD, DROP) and len(body) == _ID.size:
        return kind, _ID.unpack(body)[0], b""
    raise ValueError(f"not a message of the shared-memory protocol ({len(message)} bytes)")


def encode_reply(region_id: int, code: int, message: str = "") -> bytes:
    text = message.encode()[: MAX_MESSAGE - 1 - _REPLY.size]
    return REPLY + _REPLY.pack(region_id, code) + text


def decode_reply(message: bytes) -> tuple[int, int, str]:
    """``(region id, gRPC status code, message)``; ValueError if ``message`` is not a reply."""
    if message[:1] != REPLY or len(message) < 1 + _REPLY.size:
        raise ValueError(f"not a reply of the shared-memory protocol ({len(message)} bytes)")
    region_id, code = _REPLY.unpack_from(message, 1)
    return region_id, code, message[1 + _REPLY.size :].decode(errors="replace")
