"""TrainStream: a fit (a kernel's or a network's) on a thread of its own, read by the RPC thread as a rate-limited event stream.

A streaming handler's ``yield`` blocks until gRPC has the message on the wire, and HTTP/2 flow
control holds it back while the client is slow to read (a notebook that started a run and has
not iterated it yet). A fit run on the RPC thread would wait for the network. So the fit runs on
its own thread and only publishes events; the RPC thread sends what this policy lets through:

- a plain progress event not yet sent is replaced by a newer one: a slow reader gets the freshest
  state, never a backlog, and the fit never waits (the fit itself builds at most one plain event per
  ``report_interval`` of its config: the servicer sets the server's, so the loop pays nothing per step);
- a progress event carrying a weight snapshot is never dropped; snapshots queue, and the fit waits
  for the reader only while snapshots worth ``max_pending_bytes`` are already queued;
- the result (or the fit's exception) always comes last, after everything queued before it.

If the RPC ends early (the client cancelled, its deadline passed), closing the stream sets the
stop event and waits for the fit, which stops within one step: the RPC's worker is freed only
once the compute it started is over.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Iterable, Iterator

from convrpc.core.training import TrainProgress, TrainResult

__all__ = ["MAX_PENDING_SNAPSHOT_BYTES", "TrainStream"]

#: Snapshot bytes that may wait for a slow reader before the fit waits too.
MAX_PENDING_SNAPSHOT_BYTES = 64 * 1024 * 1024
#: How often a fit held back by queued snapshots looks at its stop event (seconds).
_STOP_POLL = 0.02


class TrainStream:
    """Iterate it (on the RPC thread) for the events to send: TrainProgress..., then the TrainResult.

    ``events`` is a fit's event iterator (``fit_kernel``'s, or ``fit_network``'s with its
    ``result_type``); ``stop`` is the event that fit checks before every step. The fit starts on the first ``next()``. Past ``max_seconds`` (the
    fit's own limit) it no longer waits for a slow reader, so the fit stops at its limit.
    """

    def __init__(
        self,
        events: Iterable[TrainProgress | TrainResult],
        stop: threading.Event,
        *,
        max_seconds: float | None = None,
        max_pending_bytes: int = MAX_PENDING_SNAPSHOT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        result_type: type = TrainResult,
    ):
        self._events = events
        self._result_type = result_type
        self._stop = stop
        self._max_seconds = max_seconds or float("inf")
        self._started = 0.0
        self._max_pending_bytes = max_pending_bytes
        self._clock = clock
        self._cv = threading.Condition(threading.Lock())
        self._queue: collections.deque[TrainProgress] = collections.deque()
        self._snapshot_bytes = 0
        self._end: TrainResult | BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name="convrpc-train", daemon=True)

    # -- the fit's thread ---------------------------------------------------------------------

    def _produce(self) -> None:
        end: TrainResult | BaseException = RuntimeError("the fit ended without a result")
        try:
            for event in self._events:
                if isinstance(event, self._result_type):
                    end = event
                    break
                if getattr(event, "weight", None) is not None:
                    self._publish_snapshot(event)
                else:
                    self._publish(event)
        except BaseException as exc:  # noqa: BLE001 - handed to the RPC thread, which maps it to a status
            end = exc
        with self._cv:
            self._end = end
            self._cv.notify()

    def _publish(self, event: TrainProgress) -> None:
        with self._cv:
            if self._queue and getattr(self._queue[-1], "weight", None) is None:
                self._queue[-1] = event  # not sent yet: the newer state replaces it
            else:
                self._queue.append(event)
            self._cv.notify()

    def _publish_snapshot(self, event: TrainProgress) -> None:
        size = event.weight.nbytes
        with self._cv:
            while self._snapshot_bytes and self._snapshot_bytes + size > self._max_pending_bytes:
                if self._stop.is_set() or self._clock() - self._started >= self._max_seconds:
                    break  # stopping, or out of time: one snapshot more will not hurt, waiting for a reader might
                self._cv.wait(_STOP_POLL)
            self._queue.append(event)
            self._snapshot_bytes += size
            self._cv.notify()

    # -- the RPC thread -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[TrainProgress | TrainResult]:
        self._started = self._clock()
        self._thread.start()
        try:
            while True:
                with self._cv:
                    while not self._queue and self._end is None:
                        self._cv.wait()
                    if not self._queue:
                        break
                    event = self._queue.popleft()
                    if getattr(event, "weight", None) is not None:
                        self._snapshot_bytes -= event.weight.nbytes
                        self._cv.notify()
                yield event
            self._thread.join()
            if isinstance(self._end, BaseException):
                raise self._end
            yield self._end
        finally:
            if self._thread.is_alive():  # the RPC ended before the fit did
                self._stop.set()
                self._thread.join()
