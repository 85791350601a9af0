"""Integer dot products of one (64 rows x 32 inputs) code group, written as LLVM IR (Numba @intrinsic).

LLVM does not auto-vectorise the nibble-times-activation loops of kernels.py into multiply-add
instructions: from scalar code it emits a widening multiply (vpmulld) and an add per 16 products. Written
here as a pairwise int16 multiply-add over vectors, LLVM's x86 backend matches it to vpmaddwd, and on CPUs
with AVX-512 VNNI (or AVX-VNNI) folds the accumulation into vpdpwssd: one instruction per 32 products.
The IR is target-independent (LLVM lowers it for AVX2, SSE or NEON too) and the arithmetic is exact integer
math, so results are bit-identical to the scalar loops on every CPU.

Pairing: lane r of a 32-bit vector holds two int16 weights of row r, (w[r, j], w[r, j+16]) for j < 16 of a
group, matched with the activation pair (x[j], x[j+16]). For the 4-bit layout that is exactly the two nibbles
of code byte j of row r (low: element j, high: element j+16); for 8-bit codes it is rows j and j+16.
Products: |w| <= 128, |x| <= 32767, 32 products per group: |sum| < 2^31, no overflow.

Intrinsics (all arrays C-contiguous; offsets are in elements of the array they index):
  tile_q4_0/q4_1/q8_0(codes, cb, scales, sb, ng, xq, xoff, xd, xs, xgoff, out f32[64])
      decode: 64 outputs of one tile of a matrix . one activation row, all ng groups, scales applied
  pairs_q4(codes, coff, w i32[1024]) / pairs_q8(...)
      prefill: one code group (4-bit: 16 x 64 bytes, 8-bit: 32 x 64 at coff) unpacked into pair lanes w[j*64 + r]
  isum_pairs(w, xq, xoff, isum i32[64])
      prefill: the group's integer dot products with one activation row, from the unpacked pairs
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _vec(t, n):
    return ir.VectorType(t, n)


def _c64(v):
    return ir.Constant(_I64, v)


def _splat32(v):
    return ir.Constant(_vec(_I32, 16), [v] * 16)


def _check(arr, dtypes, what):
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype in dtypes):
        raise errors.TypingError(f"{what}: expected a C-contiguous array of {dtypes}, got {arr}")


def _ptr(context, builder, aty, aval, off, elt):
    """Address of element `off` of C-contiguous array aval, as a pointer to `elt`."""
    arr = context.make_array(aty)(context, builder, aval)
    esz = context.get_abi_sizeof(context.get_data_type(aty.dtype))
    base = builder.ptrtoint(arr.data, _I64)
    return builder.inttoptr(builder.add(base, builder.mul(off, _c64(esz))), elt.as_pointer())


def _load(builder, p, off, t, n, align):
    q = builder.gep(p, [_c64(off)])
    return builder.load(builder.bitcast(q, _vec(t, n).as_pointer()), align=align)


def _act_pairs(builder, xp):
    """The group's 32 int16 activations -> 16 int32 lanes (x[j], x[j+16])."""
    lo = _load(builder, xp, 0, _I16, 16, 2)
    hi = _load(builder, xp, 16, _I16, 16, 2)
    mask = ir.Constant(_vec(_I32, 32), [i // 2 + (16 if i % 2 else 0) for i in range(32)])
    return builder.bitcast(builder.shuffle_vector(lo, hi, mask), _vec(_I32, 16))


def _fma(builder, a, b, c):
    """a * b + c on float vectors (llvm.fma; llvmlite's builder.fma takes scalars only)."""
    n = a.type.count
    fnty = ir.FunctionType(a.type, [a.type] * 3)
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{n}f32")
    return builder.call(fn, [a, b, c])


def _splat(builder, v, vt):
    """A vector of type vt with every lane v."""
    first = builder.insert_element(ir.Constant(vt, None), v, _c64(0))
    return builder.shuffle_vector(first, ir.Constant(vt, None), _splat32(0))


def _pmadd(builder, acc, w, a):
    """acc + pairwise int16 products of lanes w and a: LLVM's pattern for vpmaddwd (+ add -> vpdpwssd)."""
    w16, a16 = builder.bitcast(w, _vec(_I16, 32)), builder.bitcast(a, _vec(_I16, 32))
    even = ir.Constant(_vec(_I32, 16), [2 * i for i in range(16)])
    odd = ir.Constant(_vec(_I32, 16), [2 * i + 1 for i in range(16)])

    def half(v, m):
        return builder.sext(builder.shuffle_vector(v, v, m), _vec(_I32, 16))

    prod = builder.add(builder.mul(half(w16, even), half(a16, even)), builder.mul(half(w16, odd), half(a16, odd)))
    return builder.add(acc, prod)


def _lanes_q4(builder, cp, j, k):
    # 16 code bytes of rows 16k.. (input j) -> lanes (low nibble, high nibble) as int16 pairs
    c = builder.zext(_load(builder, cp, j * 64 + k * 16, _I8, 16, 1), _vec(_I32, 16))
    return builder.and_(builder.or_(c, builder.shl(c, _splat32(12))), _splat32(0x000F000F))


def _lanes_q8(builder, cp, j, k):
    # signed bytes of rows j and j+16 (inputs j, j+16) for rows 16k.. -> int16 pairs
    a = builder.sext(_load(builder, cp, j * 64 + k * 16, _I8, 16, 1), _vec(_I32, 16))
    b = builder.sext(_load(builder, cp, (j + 16) * 64 + k * 16, _I8, 16, 1), _vec(_I32, 16))
    return builder.or_(builder.and_(a, _splat32(0xFFFF)), builder.shl(b, _splat32(16)))


def _isum_codegen(lanes):
    def codegen(context, builder, sig, args):
        cp = _ptr(context, builder, sig.args[0], args[0], args[1], _I8)
        xp = _ptr(context, builder, sig.args[2], args[2], args[3], _I16)
        ip = _ptr(context, builder, sig.args[4], args[4], _c64(0), _I32)
        pairs = _act_pairs(builder, xp)
        accs = [_splat32(0)] * 4
        for j in range(16):
            b = builder.shuffle_vector(pairs, pairs, _splat32(j))
            for k in range(4):
                accs[k] = _pmadd(builder, accs[k], lanes(builder, cp, j, k), b)
        for k in range(4):
            builder.store(accs[k], builder.bitcast(builder.gep(ip, [_c64(16 * k)]), _vec(_I32, 16).as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return codegen


def _pairs_codegen(lanes):
    def codegen(context, builder, sig, args):
        cp = _ptr(context, builder, sig.args[0], args[0], args[1], _I8)
        wp = _ptr(context, builder, sig.args[2], args[2], _c64(0), _I32)
        for j in range(16):
            for k in range(4):
                q = builder.bitcast(builder.gep(wp, [_c64(j * 64 + k * 16)]), _vec(_I32, 16).as_pointer())
                builder.store(lanes(builder, cp, j, k), q, align=4)
        return context.get_dummy_value()

    return codegen


_CODES = (types.uint8, types.int8)


@intrinsic
def pairs_q4(typingctx, codes, coff, w):
    _check(codes, _CODES, "codes")
    _check(w, (types.int32,), "w")
    return types.void(codes, types.int64, w), _pairs_codegen(_lanes_q4)


@intrinsic
def pairs_q8(typingctx, codes, coff, w):
    _check(codes, _CODES, "codes")
    _check(w, (types.int32,), "w")
    return types.void(codes, types.int64, w), _pairs_codegen(_lanes_q8)


@intrinsic
def isum_pairs(typingctx, w, xq, xoff, isum):
    _check(w, (types.int32,), "w")
    _check(xq, (types.int16,), "xq")
    _check(isum, (types.int32,), "isum")

    def codegen(context, builder, sig, args):
        wp = _ptr(context, builder, sig.args[0], args[0], _c64(0), _I32)
        xp = _ptr(context, builder, sig.args[1], args[1], args[2], _I16)
        ip = _ptr(context, builder, sig.args[3], args[3], _c64(0), _I32)
        pairs = _act_pairs(builder, xp)
        accs = [_splat32(0)] * 4
        for j in range(16):
            b = builder.shuffle_vector(pairs, pairs, _splat32(j))
            for k in range(4):
                accs[k] = _pmadd(builder, accs[k], _load(builder, wp, j * 64 + k * 16, _I32, 16, 4), b)
        for k in range(4):
            builder.store(accs[k], builder.bitcast(builder.gep(ip, [_c64(16 * k)]), _vec(_I32, 16).as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return types.void(w, xq, types.int64, isum), codegen


# --- one tile row of a matrix, all groups: integer dot products and the float scale epilogue ------------

_F32 = ir.FloatType()


def _tile_codegen(kind):
    """acc[r] = sum over groups g of xd[g] * (d[g, r] * isum[g, r] + m[g, r] * xs[g]) for the 64 rows r of a
    tile; d and m (q4_1 only; q4_0: m = -8 d; q8_0: m = 0) are fp16 scales converted with fpext (vcvtph2ps).
    The accumulators stay in registers across groups (allocas promoted by LLVM's mem2reg)."""
    lanes = _lanes_q8 if kind == "q8_0" else _lanes_q4
    cstride = 32 * 64 if kind == "q8_0" else 16 * 64
    nsc = 2 if kind == "q4_1" else 1

    def codegen(context, builder, sig, args):
        codes, cb, sc, sb, ng, xq, xoff, xd, xs, xgoff, out = args
        ta = sig.args
        fvec = _vec(_F32, 16)
        accp = [cgutils.alloca_once(builder, fvec) for _ in range(4)]
        for p in accp:
            builder.store(ir.Constant(fvec, [0.0] * 16), p)
        with cgutils.for_range(builder, ng) as loop:
            g = loop.index
            cp = _ptr(context, builder, ta[0], codes, builder.add(cb, builder.mul(g, _c64(cstride))), _I8)
            xp = _ptr(context, builder, ta[5], xq, builder.add(xoff, builder.mul(g, _c64(32))), _I16)
            sp = _ptr(context, builder, ta[2], sc, builder.add(sb, builder.mul(g, _c64(nsc * 64))), _I16)
            pairs = _act_pairs(builder, xp)
            accs = [_splat32(0)] * 4
            for j in range(16):
                b = builder.shuffle_vector(pairs, pairs, _splat32(j))
                for k in range(4):
                    accs[k] = _pmadd(builder, accs[k], lanes(builder, cp, j, k), b)
            gi = builder.add(xgoff, g)
            dx = builder.load(_ptr(context, builder, ta[7], xd, gi, _F32))
            sxi = builder.load(_ptr(context, builder, ta[8], xs, gi, _I32))
            dxv = _splat(builder, dx, fvec)
            sxv = _splat(builder, builder.sitofp(sxi, _F32), fvec)
            sx8 = _splat(builder, builder.mul(sxi, ir.Constant(_I32, 8)), _vec(_I32, 16))
            for k in range(4):
                d = builder.fpext(builder.bitcast(_load(builder, sp, 16 * k, _I16, 16, 2), _vec(ir.HalfType(), 16)),
                                  fvec)
                if kind == "q4_1":
                    m = builder.fpext(builder.bitcast(_load(builder, sp, 64 + 16 * k, _I16, 16, 2),
                                                      _vec(ir.HalfType(), 16)), fvec)
                    inner = _fma(builder, d, builder.sitofp(accs[k], fvec), builder.fmul(m, sxv))
                elif kind == "q4_0":
                    # w = d (q - 8): d * (isum - 8 sx), the offset taken in exact integer arithmetic
                    inner = builder.fmul(d, builder.sitofp(builder.sub(accs[k], sx8), fvec))
                else:
                    inner = builder.fmul(d, builder.sitofp(accs[k], fvec))
                builder.store(_fma(builder, dxv, inner, builder.load(accp[k])), accp[k])
        op = _ptr(context, builder, ta[10], out, _c64(0), _F32)
        for k in range(4):
            builder.store(builder.load(accp[k]), builder.bitcast(builder.gep(op, [_c64(16 * k)]), fvec.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return codegen


def _tile_intrinsic(kind):
    def typer(typingctx, codes, cb, sc, sb, ng, xq, xoff, xd, xs, xgoff, out):
        _check(codes, _CODES, "codes")
        _check(sc, (types.uint16,), "scales")
        _check(xq, (types.int16,), "xq")
        _check(xd, (types.float32,), "xd")
        _check(xs, (types.int32,), "xs")
        _check(out, (types.float32,), "out")
        i64 = types.int64
        return types.void(codes, i64, sc, i64, i64, xq, i64, xd, xs, i64, out), _tile_codegen(kind)

    typer.__name__ = f"tile_{kind}"
    return intrinsic(typer)


# tile_<kind>(codes, cb, scales, sb, n_groups, xq, xoff, xd, xs, xgoff, out f32[64]): one tile row of 64 outputs;
# cb: element offset of the tile's first code group in codes, sb: of its first scale row in scales;
# xoff: of the activation row in xq, xgoff: of its first group in xd and xs.
tile_q4_0 = _tile_intrinsic("q4_0")
tile_q4_1 = _tile_intrinsic("q4_1")
tile_q8_0 = _tile_intrinsic("q8_0")
