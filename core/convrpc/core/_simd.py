"""512-bit SIMD vectors for numba kernels: a vector type and the handful of operations a
register-blocked kernel needs (load, store, broadcast, fused multiply-add, interleave, and
``+``, ``-``, ``*`` of two vectors, each rounded, never fused).

LLVM's loop vectoriser keeps an accumulator in memory when it cannot prove the loop's arrays
apart, and numba has no stack arrays: a kernel that wants a block of outputs to stay in registers
across a long reduction spells its accumulators as ``Vec`` locals, which LLVM keeps in registers
(a 6 x 16 float32 block is 6 AVX-512 registers, or 12 of the 16 AVX ones). A ``Vec`` holds 16
float32 or 8 float64: one AVX-512 register, or, on a machine without AVX-512, two AVX registers
that LLVM uses side by side (the code a kernel written for pairs of 256-bit vectors had: one
kernel for both, and on AVX-512 half the instructions per flop; g's float32 forward, 7x7 stride
2, ran 15-20% faster on a Zen 4 core).

Every operation takes the element type from an array or scalar argument, so one kernel compiles for
both dtypes; ``lanes(a)`` is the vector width for ``a``'s dtype, a compile-time constant. Loads
and stores take a C-contiguous array of any rank and an offset into its elements in memory order
(no view to make); they are unaligned and unchecked: the caller keeps ``i .. i + lanes`` inside
the array.
"""

from __future__ import annotations

import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model


class Vec(types.Type):
    """One 512-bit vector of ``dtype`` (float32 or float64)."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"Vec({dtype})")


_VEC = {types.float32: Vec(types.float32), types.float64: Vec(types.float64)}


def _llvm(dtype) -> ir.VectorType:
    return ir.VectorType(ir.FloatType(), 16) if dtype == types.float32 else ir.VectorType(ir.DoubleType(), 8)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _llvm(fe_type.dtype))


def _is_float_array(a) -> bool:
    return isinstance(a, types.Array) and a.dtype in _VEC and a.layout == "C"


def _pointer(context, builder, sig, args):
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    index = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.bitcast(builder.gep(data, [index]), _llvm(sig.args[0].dtype).as_pointer())


@intrinsic
def load(typingctx, a, i):
    """a.flat[i : i + lanes(a)] as a Vec (a: a C-contiguous float array)."""
    if not (_is_float_array(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig, args), align=a.dtype.bitwidth // 8)

    return _VEC[a.dtype](a, i), codegen


@intrinsic
def store(typingctx, a, i, v):
    """a.flat[i : i + lanes(a)] = v."""
    if not (_is_float_array(a) and isinstance(i, types.Integer) and v == _VEC[a.dtype]):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig, args), align=a.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(a, i, v), codegen


@intrinsic
def splat(typingctx, x):
    """A Vec with every lane x (a float32 or float64 scalar)."""
    if x not in _VEC:
        return None

    def codegen(context, builder, sig, args):
        vty = _llvm(x)
        one = builder.insert_element(ir.Constant(vty, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count)
        return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), zeros)

    return _VEC[x](x), codegen


@intrinsic
def zeros(typingctx, a):
    """A Vec of zeros of ``a``'s dtype."""
    if not _is_float_array(a):
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(_llvm(a.dtype), None)

    return _VEC[a.dtype](a), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c lane by lane, rounded once (llvm.fma)."""
    if not (isinstance(a, Vec) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        vty = _llvm(a.dtype)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.v{vty.count}f{a.dtype.bitwidth}"
        )
        return builder.call(fn, args)

    return a(a, b, c), codegen


@intrinsic
def lanes(typingctx, a):
    """Elements of ``a``'s dtype in one Vec: 16 for float32, 8 for float64 (a constant)."""
    if not _is_float_array(a):
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), _llvm(a.dtype).count)

    return types.int64(a), codegen



def _zip_codegen(half: int):
    def codegen(context, builder, sig, args):
        n = _llvm(sig.args[0].dtype).count
        lanes = [i // 2 + half * n // 2 + (i % 2) * n for i in range(n)]
        return builder.shuffle_vector(args[0], args[1], ir.Constant(ir.VectorType(ir.IntType(32), n), lanes))

    return codegen


@intrinsic
def zip_lo(typingctx, a, b):
    """Lanes a[0], b[0], a[1], b[1], ... of a's and b's low halves (a tile's two outputs, in order)."""
    if not (isinstance(a, Vec) and a == b):
        return None
    return a(a, b), _zip_codegen(0)


@intrinsic
def zip_hi(typingctx, a, b):
    """Lanes a[n/2], b[n/2], a[n/2 + 1], b[n/2 + 1], ... of a's and b's high halves."""
    if not (isinstance(a, Vec) and a == b):
        return None
    return a(a, b), _zip_codegen(1)


def _concat(builder, parts):
    """One vector of all of ``parts`` (vectors of one type) in order, concatenated pairwise
    (shufflevector wants operands of one type; an odd one out is paired with undefined lanes, which
    callers never pick)."""
    idx = ir.IntType(32)
    while len(parts) > 1:
        width = parts[0].type.count
        if len(parts) % 2:
            parts = [*parts, ir.Constant(parts[0].type, ir.Undefined)]
        mask = ir.Constant(ir.VectorType(idx, 2 * width), list(range(2 * width)))
        parts = [builder.shuffle_vector(parts[j], parts[j + 1], mask) for j in range(0, len(parts), 2)]
    return parts[0]


@intrinsic
def load_phase(typingctx, a, i, m, s):
    """Phase s of m: a.flat[i + s + m*l] for each lane l, from the m vectors at a.flat[i : i + m*lanes]
    (m, s: integer literals; whole-vector loads and one shuffle, not a gather)."""
    if not (_is_float_array(a) and isinstance(i, types.Integer)):
        return None
    if not (isinstance(m, types.IntegerLiteral) and isinstance(s, types.IntegerLiteral)):
        return None
    mm, ss = m.literal_value, s.literal_value
    if not 0 <= ss < mm:
        return None

    def codegen(context, builder, sig, args):
        vty = _llvm(a.dtype)
        n = vty.count
        ptr = _pointer(context, builder, sig, args[:2])
        parts = [builder.load(builder.gep(ptr, [ir.Constant(ir.IntType(64), j)]), align=a.dtype.bitwidth // 8)
                 for j in range(mm)]  # fmt: skip
        whole = _concat(builder, parts)
        picks = ir.Constant(ir.VectorType(ir.IntType(32), n), [ss + mm * lane for lane in range(n)])
        return builder.shuffle_vector(whole, ir.Constant(whole.type, ir.Undefined), picks)

    return _VEC[a.dtype](a, i, m, s), codegen


@intrinsic
def store_interleaved(typingctx, a, i, vs):
    """a.flat[i + m*l + s] = vs[s][l] for each lane l and each of the m Vecs of the tuple vs: m vectors
    interleaved into m*lanes contiguous elements (load_phase's inverse; one shuffle, whole stores)."""
    if not (_is_float_array(a) and isinstance(i, types.Integer) and isinstance(vs, types.UniTuple)):
        return None
    if vs.dtype != _VEC[a.dtype] or not 2 <= vs.count <= 8:
        return None
    mm = vs.count

    def codegen(context, builder, sig, args):
        vty = _llvm(a.dtype)
        n = vty.count
        idx = ir.IntType(32)
        whole = _concat(builder, [builder.extract_value(args[2], j) for j in range(mm)])
        whole = builder.shuffle_vector(whole, ir.Constant(whole.type, ir.Undefined),
                                       ir.Constant(ir.VectorType(idx, mm * n), [(e % mm) * n + e // mm
                                                                                 for e in range(mm * n)]))  # fmt: skip
        ptr = _pointer(context, builder, sig, args[:2])
        for j in range(mm):
            chunk = builder.shuffle_vector(whole, ir.Constant(whole.type, ir.Undefined),
                                           ir.Constant(ir.VectorType(idx, n), list(range(j * n, (j + 1) * n))))
            builder.store(chunk, builder.gep(ptr, [ir.Constant(ir.IntType(64), j)]), align=a.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(a, i, vs), codegen


def _binary(instruction: str):
    @intrinsic
    def op(typingctx, a, b):
        if not (isinstance(a, Vec) and a == b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, instruction)(args[0], args[1])

        return a(a, b), codegen

    return op


add, sub, mul = _binary("fadd"), _binary("fsub"), _binary("fmul")


def _operator(op, fn) -> None:
    @overload(op)
    def impl(a, b):
        if isinstance(a, Vec) and a == b:
            return lambda a, b: fn(a, b)
        return None


_operator(operator.add, add)
_operator(operator.sub, sub)
_operator(operator.mul, mul)
