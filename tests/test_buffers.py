"""WarmBuffers hand a warm buffer out again only once nothing of an earlier call refers to it."""

from __future__ import annotations

import numpy as np
from convrpc.buffers import MIN_POOLED_BYTES, WarmBuffers

SHAPE = (MIN_POOLED_BYTES // 4,)


def test_a_buffer_is_reused_only_after_every_array_on_it_is_gone():
    pool = WarmBuffers(4 * MIN_POOLED_BYTES)
    a = pool.empty(SHAPE, np.float32)
    b = pool.empty(SHAPE, np.float32)
    assert not np.shares_memory(a, b)  # a is still alive
    view = a[::2]  # a result that is a view of its input keeps the input's buffer
    del a
    c = pool.empty(SHAPE, np.float32)
    assert not np.shares_memory(c, view) and not np.shares_memory(c, b)
    del view, c
    d = pool.empty(SHAPE, np.float64)[: SHAPE[0] // 2]  # any dtype fitting the bytes
    assert d.dtype == np.float64 and d.flags.c_contiguous and d.flags.writeable


def test_the_pool_never_holds_more_than_its_cap_and_small_or_huge_arrays_bypass_it():
    pool = WarmBuffers(2 * MIN_POOLED_BYTES)
    held = [pool.empty(SHAPE, np.float32) for _ in range(3)]  # the third is allocated outside the pool
    assert sum(b.nbytes for b in pool._buffers) <= 2 * MIN_POOLED_BYTES
    assert pool.empty((10,), np.float32).base is None
    assert pool.empty((MIN_POOLED_BYTES,), np.float32).base is None  # over the cap: np.empty
    del held
    again = pool.empty(SHAPE, np.float32)
    assert any(np.shares_memory(again, b) for b in pool._buffers)
