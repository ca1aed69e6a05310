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


def open_shm_session(open_session):
    """Open a shared-memory session by hand, as the SDK does: show the server a probe region holding a nonce.
    ``open_session`` is the OpenSharedMemorySession callable (a stub's method, or a raw channel's)."""
    import secrets

    from convrpc import shm
    from convrpc.v1 import conv_service_pb2 as pb

    probe, nonce = "cvp" + secrets.token_hex(12), secrets.token_bytes(32)
    region = shm.create(probe, len(nonce))
    region[:] = nonce
    try:
        return open_session(pb.OpenSharedMemorySessionRequest(probe_region=probe, probe_nonce=nonce), timeout=30)
    finally:
        region.close()
        shm.unlink(probe)
