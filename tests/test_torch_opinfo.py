"""PyTorch's own test inputs as the acceptance suite of the core: every OpInfo and ModuleInfo sample of our
five ops (see ``torch_samples``) is called on our backends exactly as torch's call spells it (the same
positional and keyword arguments, tensors as numpy arrays), in float16, bfloat16, float32 and float64.
The output (and max-pool indices) and every gradient must match torch's CPU result within the dtype's
tolerance, relative to the largest magnitude, in the input's dtype. No sample may be refused.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from convrpc.core import get_backend
from torch_samples import DTYPES, ENTRIES, calls_of, compare, torch_results

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::UserWarning")]

#: Backends every sample runs on: the reference and the server's default (cupy: tests/test_cupy_gpu.py).
BACKENDS = ("numpy", "numba")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("kind, name", ENTRIES, ids=[name for _, name in ENTRIES])
def test_every_sample_matches_torch(kind, name, dtype_name, record_property):
    dtype = DTYPES[dtype_name]
    calls = calls_of(kind, name, dtype)
    assert calls, "torch offers no samples"
    failures = []
    for backend_name in BACKENDS:
        backend = get_backend(backend_name)
        for i, call in enumerate(calls):
            rng = np.random.default_rng(zlib.crc32(f"{name}-{dtype_name}-{i}".encode()))
            try:
                compare(backend, call, dtype, torch_results(call, dtype, rng))
            except Exception as exc:  # every sample is checked, all failures reported together
                failures.append(f"{backend_name} {call!r}: {type(exc).__name__}: {str(exc)[:300]}")
    record_property("samples", len(calls))
    print(f"{name} {dtype_name}: {len(calls)} samples x {len(BACKENDS)} backends, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(calls) * len(BACKENDS)} failed:\n" + "\n".join(failures[:10])
