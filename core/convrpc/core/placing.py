"""Output placement: an op's final results computed straight into memory its caller planned for them.

A caller that knows, before an op runs, where its results will go (the server: a span of a client's
shared memory) and what shapes they will have, runs the op inside ``placing(views)``. The kernel
tables allocate each of the op's final results with :func:`placed_empty`, in result order: the n-th
call takes the n-th planned view when its shape and dtype match, else a fresh ``np.empty``. The
caller then finds a result already in place (its memory *is* the view) and copies only the others.
Kernels may read what they wrote there (col2im adds into its result, a bias is added in place): in
memory a client shares with the server, a client writing meanwhile can spoil only its own result.
Outside a ``placing`` block, or on another thread, nothing changes. Like :mod:`.stopping`, the plan
is thread-local: the kernel tables read it where they allocate, and no signature changes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import numpy as np

__all__ = ["Placement", "placed_empty", "placed_zeros", "placing"]


class Placement:
    """The planned views of one op's results, handed out in order; ``placed`` counts those used."""

    __slots__ = ("views", "taken", "placed")

    def __init__(self, views: Sequence[np.ndarray]):
        self.views = list(views)
        self.taken = 0
        self.placed = 0

    def take(self, shape: tuple, dtype) -> np.ndarray | None:
        """The next planned view as an array of ``shape`` and ``dtype``, or None when it does not fit."""
        if self.taken >= len(self.views):
            return None
        view = self.views[self.taken]
        self.taken += 1
        if view.dtype != dtype:
            return None  # a half-precision result computed in float32: rounded later, into a new array
        if view.shape != shape:
            # An unbatched call computes (1, C, H, W) and hands back (C, H, W): the same bytes.
            if shape != (1, *view.shape):
                return None
            view = view.reshape(shape)
        self.placed += 1
        return view


class _Local(threading.local):
    #: A class default, so a thread that never set it reads None without the AttributeError that
    #: getattr(local, name, None) raises and catches (1 us, a tenth of a tiny conv's call).
    plan: Placement | None = None


_local = _Local()


@contextlib.contextmanager
def placing(views: Sequence[np.ndarray]) -> Iterator[Placement]:
    """Ops this thread runs in the block compute their final results into ``views`` (writable, C-contiguous,
    in result order) where shape and dtype match. Run one op per block: the views are used once."""
    outer = _local.plan
    _local.plan = plan = Placement(views)
    try:
        yield plan
    finally:
        _local.plan = outer


def _planned(shape, dtype) -> np.ndarray | None:
    plan = _local.plan
    return None if plan is None else plan.take(tuple(shape), np.dtype(dtype))


def placed_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array for an op's next final result: the planned view when one fits, else ``np.empty``."""
    view = _planned(shape, dtype)
    return np.empty(shape, dtype) if view is None else view


def placed_zeros(shape, dtype) -> np.ndarray:
    """Like :func:`placed_empty`, zero-filled (for results the kernels accumulate into), else ``np.zeros``."""
    view = _planned(shape, dtype)
    if view is None:
        return np.zeros(shape, dtype)
    view.fill(0)
    return view
