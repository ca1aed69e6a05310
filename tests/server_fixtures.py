"""Fixtures that start real convrpc servers on 127.0.0.1 and a free port, always stopped afterwards."""

from __future__ import annotations

import contextlib

import pytest

from convrpc.core import available_backends


def server_backend() -> str:
    """The backend the end-to-end tests serve with: the server's default when this install has it."""
    return "numba" if "numba" in available_backends() else "numpy"


@contextlib.contextmanager
def running_server(compute=None, **settings):
    """A started, warmed-up ConvServer on 127.0.0.1:<free port>; stopped on exit.

    ``compute`` is a Backend object to serve with instead of the one ``backend`` names (a test double)."""
    from convrpc.server import ConvServer, Settings

    settings.setdefault("backend", server_backend())
    server = ConvServer(Settings(host="127.0.0.1", port=0, **settings), backend=compute).start()
    try:
        assert server.wait_ready(timeout=600), "server warm-up did not finish"
        yield server
    finally:
        server.stop(0)


@pytest.fixture(scope="session")
def server():
    with running_server() as srv:
        yield srv


@pytest.fixture()
def client(server):
    from convrpc.client import ConvClient

    with ConvClient(server.target, timeout=120) as c:
        yield c


def memfd(size: int, data: bytes = b"", *, seals: int | None = None) -> int:
    """A memfd of ``size`` bytes holding ``data``, sealed as the SDK seals its regions (or with ``seals``)."""
    import fcntl
    import os

    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    if seals is None:
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class RawSession:
    """A shared-memory session opened by hand, as a hostile client would: the RPC, then the socket and its token.
    ``open_session`` is the OpenSharedMemorySession callable (a stub's method, or a raw channel's)."""

    def __init__(self, open_session):
        import socket

        from convrpc import shm
        from convrpc.v1 import conv_service_pb2 as pb

        self.opened = open_session(pb.OpenSharedMemorySessionRequest(), timeout=30)
        self.id = self.opened.session_id
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(30)
        self.sock.connect(shm.socket_address(self.opened.socket_address))
        self.sock.send(shm.encode(shm.HELLO, token=self.opened.connect_token))
        assert shm.decode_reply(self.sock.recv(shm.MAX_MESSAGE))[1] == 0

    def add(self, region_id: int, fd: int) -> tuple[int, str]:
        """Hand over ``fd`` as ``region_id``: the server's ``(gRPC status code, message)``."""
        import socket

        from convrpc import shm

        socket.send_fds(self.sock, [shm.encode(shm.ADD, region_id)], [fd])
        got, code, message = shm.decode_reply(self.sock.recv(shm.MAX_MESSAGE))
        assert got == region_id
        return code, message

    def close(self) -> None:
        self.sock.close()
