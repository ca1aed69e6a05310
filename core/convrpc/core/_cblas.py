"""numpy's own BLAS ``gemm``, called from inside numba kernels.

A batch of matmuls dispatched from Python costs a pool wake-up, the GIL and numpy's call overhead
for every tile: on (8,256,14,14)x(256,256,1,1) the helper thread started its first matmul 40-60 us
after the caller and the op took 1.11-1.29 ms for 1.01 ms of matmul. From a numba ``prange`` the
same matmuls start within microseconds on the OpenMP workers (1.04-1.05 ms).

Only an OpenBLAS with 64-bit integer symbols (``*cblas_?gemm64_``, what numpy's wheels ship) is
used: its names say its ABI. Any other BLAS returns ``None`` here and the caller keeps numpy's matmul.
"""

from __future__ import annotations

import ctypes

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def gemm_addresses() -> tuple[int, int] | None:
    """(sgemm, dgemm): addresses of ``cblas_?gemm`` with 64-bit ints in a BLAS this process loaded, or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for lib in threadpool_info():
        if lib.get("user_api") != "blas" or lib.get("internal_api") != "openblas":
            continue
        try:
            cdll = ctypes.CDLL(lib["filepath"])
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            try:
                s, d = getattr(cdll, f"{prefix}cblas_sgemm64_"), getattr(cdll, f"{prefix}cblas_dgemm64_")
            except AttributeError:
                continue
            return ctypes.cast(s, ctypes.c_void_p).value, ctypes.cast(d, ctypes.c_void_p).value
    return None


@intrinsic
def gemm(typingctx, fn, like, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """Row-major ``C = op(A) @ op(B) + beta * C`` by the cblas gemm at address ``fn``; ``a``, ``b``, ``c``
    are addresses, ``like`` an array of the element type (float32: sgemm's, float64: dgemm's)."""
    if not isinstance(like, types.Array) or like.dtype not in (types.float32, types.float64):
        return None

    single = like.dtype == types.float32

    def codegen(context, builder, signature, args):
        fn_, _, ta, tb, m_, n_, k_, a_, lda_, b_, ldb_, beta_, c_, ldc_ = args
        real = ir.FloatType() if single else ir.DoubleType()
        i32, i64, ptr = ir.IntType(32), ir.IntType(64), ir.PointerType(real)
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64])
        arguments = [
            ir.Constant(i32, ROW_MAJOR), builder.trunc(ta, i32), builder.trunc(tb, i32), m_, n_, k_,
            ir.Constant(real, 1.0), builder.inttoptr(a_, ptr), lda_, builder.inttoptr(b_, ptr), ldb_,
            builder.fptrunc(beta_, real) if single else beta_, builder.inttoptr(c_, ptr), ldc_,
        ]
        builder.call(builder.inttoptr(fn_, fnty.as_pointer()), arguments)
        return context.get_dummy_value()

    i = types.int64
    sig = types.none(i, like, i, i, i, i, i, i, i, i, i, types.float64, i, i)
    return sig, codegen
