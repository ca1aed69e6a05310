"""TrainStream's policy without a network: the fit never waits for a slow reader, plain progress is
coalesced, snapshots are never dropped, the result comes last, an early close stops the fit."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from convrpc.core.training import TrainProgress, TrainResult
from convrpc.server.train_stream import TrainStream

RESULT = TrainResult(np.zeros((1, 1, 1, 1)), None, 0.0, 0, "max_steps", 0.0)


def progress(step: int, snapshot: bool = False) -> TrainProgress:
    return TrainProgress(step, 1.0 / step, 0.0, 1.0, np.full((2, 2), float(step)) if snapshot else None)


def fit(events, finished: threading.Event, stop: threading.Event | None = None):
    """A stand-in for fit_kernel: yields ``events`` (stopping early once ``stop`` is set), then RESULT."""
    for event in events:
        if stop is not None and stop.is_set():
            break
        yield event
    finished.set()
    yield RESULT


def test_the_fit_runs_to_the_end_while_nobody_reads_and_the_reader_gets_the_latest_state():
    finished = threading.Event()
    stream = iter(TrainStream(fit(map(progress, range(1, 10_001)), finished), threading.Event()))
    first = next(stream)
    assert finished.wait(10), "the fit waited for the reader"
    rest = list(stream)
    assert rest[-1] is RESULT
    assert rest[-2].step == 10_000  # the freshest progress is kept, older unsent ones were replaced
    assert len(rest) < 10_000 - first.step


def test_snapshots_are_never_dropped_nor_reordered():
    finished = threading.Event()
    events = [progress(s, snapshot=s % 10 == 0) for s in range(1, 101)]
    stream = iter(TrainStream(fit(events, finished), threading.Event()))
    next(stream)
    assert finished.wait(10)
    sent = [e for e in stream if e is not RESULT]
    assert [e.step for e in sent if e.weight is not None] == list(range(10, 101, 10))
    assert all(a.step < b.step for a, b in zip(sent, sent[1:]))
    for e in sent:
        if e.weight is not None:
            assert np.all(e.weight == e.step)


def test_queued_snapshots_over_the_byte_budget_hold_the_fit_until_read_or_stopped():
    finished, stop = threading.Event(), threading.Event()
    events = (progress(s, snapshot=True) for s in range(1, 1_000_001))
    nbytes = progress(1, snapshot=True).weight.nbytes
    stream = iter(TrainStream(fit(events, finished, stop), stop, max_pending_bytes=3 * nbytes))
    assert next(stream).step == 1
    assert not finished.wait(0.3), "the snapshots were not bounded"
    assert [next(stream).step for _ in range(3)] == [2, 3, 4]  # reading makes room, nothing was dropped
    stop.set()
    assert finished.wait(10), "a stopping fit must not wait for the reader"
    assert list(stream)[-1] is RESULT


def test_an_error_in_the_fit_reaches_the_reader_after_what_came_before():
    def failing():
        yield progress(1)
        raise MemoryError("out of memory")

    stream = iter(TrainStream(failing(), threading.Event()))
    assert next(stream).step == 1
    with pytest.raises(MemoryError, match="out of memory"):
        next(stream)


def test_closing_the_stream_early_stops_the_fit_and_waits_for_it():
    finished, stop = threading.Event(), threading.Event()
    stream = iter(TrainStream(fit(map(progress, itertools.count(1)), finished, stop), stop))
    next(stream)
    stream.close()  # what gRPC does when the client has gone away
    assert stop.is_set() and finished.is_set()
    assert not [t for t in threading.enumerate() if t.name == "convrpc-train"]
