"""StreamWatch: cancels streams that wait on their client too long or outlive their time limit.

gRPC Python has no timeout of its own on a stream's messages: a handler waiting for a message that
never comes, or for room to send to a client that stopped reading, waits forever and holds a worker
thread. One watcher thread looks at every watched stream a few times a second and cancels the call
of one that has waited on its client for ``idle_timeout`` seconds or run for its ``max_seconds``;
cancelling wakes the handler (its read raises, its send returns), which then ends as usual.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from grpc._cython import cygrpc

__all__ = ["StreamWatch"]

log = logging.getLogger("convrpc.server")


class _Watched:
    def __init__(self, context, rpc: str, max_seconds: float):
        self.context, self.rpc, self.max_seconds = context, rpc, max_seconds
        self.started = time.monotonic()
        self.waiting_since: float | None = None
        self.cancelled: str | None = None

    @contextlib.contextmanager
    def _waiting(self):
        self.waiting_since = time.monotonic()
        try:
            yield
        finally:
            self.waiting_since = None

    def reading(self, requests):
        """``requests`` (the call's request iterator), timed while each message is awaited."""
        while True:
            with self._waiting():
                message = next(requests, StopIteration)
            if message is StopIteration:
                return
            yield message

    def sending(self, responses):
        """``responses``, timed while gRPC sends each one (the generator is suspended meanwhile)."""
        for response in responses:
            with self._waiting():
                yield response


class StreamWatch:
    """Thread-safe; ``close()`` stops the watcher thread."""

    def __init__(self, idle_timeout: float):
        self.idle_timeout = idle_timeout
        self._calls: set[_Watched] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, context, rpc: str, max_seconds: float):
        """Watch one call for the block; yields the ``_Watched`` whose ``reading``/``sending`` time it."""
        call = _Watched(context, rpc, max_seconds)
        with self._lock:
            self._calls.add(call)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._loop, name="convrpc-stream-watch", daemon=True)
                self._thread.start()
        try:
            yield call
        finally:
            with self._lock:
                self._calls.discard(call)

    def _loop(self) -> None:
        while not self._closed.wait(min(0.25, self.idle_timeout / 4)):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                waiting = call.waiting_since
                if call.cancelled:
                    continue
                if now - call.started > call.max_seconds:
                    self._cancel(call, f"ran past its limit of {call.max_seconds:g} s")
                elif waiting is not None and now - waiting > self.idle_timeout:
                    self._cancel(call, f"waited on its client for {self.idle_timeout:g} s (setting stream_idle_timeout)")

    @staticmethod
    def _cancel(call: _Watched, why: str) -> None:
        call.cancelled = why
        log.warning("%s cancelled: the stream %s", call.rpc, why)
        try:  # the public cancel() tells the client only CANCELLED; the core call can say why
            call.context._rpc_event.call.cancel(cygrpc.StatusCode.deadline_exceeded, f"the stream {why}")
        except Exception:  # noqa: BLE001 - a gRPC without that private API still cancels
            call.context.cancel()

    def close(self) -> None:
        self._closed.set()
