"""StopFlag: how a caller stops an op part way through (its client cancelled, its deadline passed).

The flag is one byte of a numpy array, so numba kernels can read it: they look at it once per
outer-loop iteration (an output row, a plane, a tile) and skip the rest of their work once it is
set (a ``prange`` loop cannot break, so every later iteration ``continue``\\ s past its work). The
op then returns a partial result, which :func:`stopping` turns into an error instead: a stopped op
never hands back an incomplete array. Setting the flag is safe from any thread (a gRPC callback, a
timer); kernels see it within one iteration.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numpy as np

from .errors import CallCancelled, DeadlineExceeded

__all__ = ["StopFlag", "current", "stopping"]

_CANCELLED, _EXPIRED = 1, 2


class StopFlag:
    """Set once, by ``cancel()`` or ``expire()``; the first reason wins."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        #: The byte kernels read: 0 while the op may run, else why it must stop.
        self.array = np.zeros(1, dtype=np.uint8)

    def cancel(self) -> None:
        """The op's caller went away: stop."""
        self._set(_CANCELLED)

    def expire(self) -> None:
        """The op's deadline passed: stop."""
        self._set(_EXPIRED)

    def _set(self, reason: int) -> None:
        if not self.array[0]:
            self.array[0] = reason

    def is_set(self) -> bool:
        return bool(self.array[0])

    def raise_if_set(self) -> None:
        """:class:`CallCancelled` or :class:`DeadlineExceeded` once the flag is set."""
        if self.array[0] == _CANCELLED:
            raise CallCancelled()
        if self.array[0] == _EXPIRED:
            raise DeadlineExceeded()


class _Local(threading.local):
    #: None on a thread outside any stopping() block, read as a class default (see placing._Local).
    flag: StopFlag | None = None


_local = _Local()


def current() -> StopFlag | None:
    """The flag of the calling thread's :func:`stopping` block, if any (kernel tables read it)."""
    return _local.flag


@contextlib.contextmanager
def stopping(flag: StopFlag | None) -> Iterator[StopFlag | None]:
    """Ops this thread runs in the block stop early once ``flag`` is set; on leaving the block a set
    flag raises (:class:`CallCancelled` / :class:`DeadlineExceeded`) in place of the partial result."""
    outer = current()
    _local.flag = flag
    try:
        yield flag
    finally:
        _local.flag = outer
    if flag is not None:
        flag.raise_if_set()
