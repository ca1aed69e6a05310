"""Request bytes protobuf cannot parse: INVALID_ARGUMENT for the client, one log line per client per interval.

gRPC's own answer to a deserializer that raises is INTERNAL "Exception deserializing request!", with
a full traceback logged per message: a fuzzing client floods the log. Wrapped deserializers return an
``Undecodable`` instead, which the handler answers like any other bad request, at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from convrpc.core.errors import InvalidArgumentError

__all__ = ["Undecodable", "UndecodableLog", "UndecodableRequest", "lenient"]

log = logging.getLogger("convrpc.server")

#: Clients whose last undecodable request is remembered (the oldest is forgotten first).
_REMEMBERED_CLIENTS = 1024


class Undecodable:
    """Stands for a received message that did not parse as ``message``."""

    def __init__(self, message: str, size: int, reason: str):
        self.message, self.size, self.reason = message, size, reason

    def ByteSize(self) -> int:  # counted in the metrics like any message
        return self.size

    def error(self) -> "UndecodableRequest":
        return UndecodableRequest(f"{self.size} bytes that are not a valid {self.message} ({self.reason})")


class UndecodableRequest(InvalidArgumentError):
    def __init__(self, message: str):
        super().__init__("request", message)


def lenient(deserializer, message: str):
    """``deserializer`` returning an ``Undecodable`` where it would raise."""

    def decode(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a hostile encoding provokes
            return Undecodable(message, len(raw), str(exc) or type(exc).__name__)

    return decode


class UndecodableLog:
    """Logs an undecodable request once per client host per ``interval`` seconds, without a traceback."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self._last: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def report(self, peer: str, rpc: str, error: UndecodableRequest) -> None:
        host = peer.rpartition(":")[0] or peer  # "ipv4:127.0.0.1:54321": every connection of one host
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(host, -float("inf")) < self.interval:
                return
            self._last[host] = now
            self._last.move_to_end(host)
            while len(self._last) > _REMEMBERED_CLIENTS:
                self._last.popitem(last=False)
        log.warning("%s from %s: %s; more from this client within %.0f s are not logged",
                    rpc, host, error.description, self.interval)  # fmt: skip
