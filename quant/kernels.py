"""Numba kernels that compute on packed weights in the interleaved layout (never dequantize a matrix).

Legend: T tokens, n_in inputs, n_out outputs, tiles of TILE=64 output rows, groups of 32 inputs.
Activations are quantized per group of 32 to int16 (not int8 as llama.cpp does): the integer products are
pairwise int16 multiply-adds (vpdpwssd on AVX-512 VNNI, 32 products per instruction), which keeps the result
within ~1e-5 of float math. int8 activations would allow vpdpbusd (64 per instruction): decode is bound by
memory either way; prefill would gain (on AVX2 too: vpmaddubsw), at the accuracy cost measured on SmolLM2 by
bench/act_precision.py (1000 tokens against transformers: max logit error 8.7e-2 vs 3.4e-4, top-1 96.5% vs 100%,
mean KL 3.9e-3 vs 7e-8). The per-group
float scale product is applied once per (row, group).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, config, errors
from numba.extending import intrinsic

from .iq_grids import IQ1S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3XXS_GRID, KSIGNS

TILE = 64
GROUP = 32
_F16_MAGIC = np.float32(2.0**112)  # rebias f16 exponent (15) to f32 (127): 2^(127-15)
ACT_QMAX = 32767  # int16 activation codes; |sum of 32 products| < 2^31 for 4- and 8-bit weights


# --- integer dot products as LLVM IR (Numba @intrinsic) --------------------------------------------------
# Integer dot products of one (64 rows x 32 inputs) code group, written as LLVM IR (Numba @intrinsic).
#
# LLVM does not auto-vectorise nibble-times-activation loops written in Numba into multiply-add
# instructions: from scalar code it emits a widening multiply (vpmulld) and an add per 16 products. Here the
# inner products are pairwise int16 multiply-adds over vectors (_pmadd): vpdpwssd on AVX-512 VNNI (one
# instruction per 32 products), vpmaddwd + add on AVX-512BW, portable vector IR that LLVM lowers for any
# other target (AVX2, SSE, NEON). The arithmetic is exact integer math, so every path gives bit-identical
# results (tests/test_quant.py compiles each one).
#
# Pairing: lane r of a 32-bit vector holds two int16 weights of row r, (w[r, j], w[r, j+16]) for j < 16 of a
# group, matched with the activation pair (x[j], x[j+16]). In the 4-bit tile layout (quantize._tile_words) one
# 32-bit word per row holds the nibbles of four such pairs: a shift and a mask give each (two vector
# instructions per 32 products, one 64-byte load per 128); an 8-bit word holds two pairs, sign-extended by
# 16-bit shifts (quantize._tile_words).
# Products: |w| <= 128, |x| <= 32767, 32 products per group: |sum| < 2^31, no overflow.
#
# Intrinsics (all arrays C-contiguous; offsets are in elements of the array they index):
#   tile_q4_0/q4_1/q8_0(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out f32[64])
#       decode: 64 outputs of one tile of a matrix . one activation row, all ng groups, scales applied
#   rows_q4_0/q4_1/q8_0(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc f32[len(rows), 64])
#       prefill: the same for several activation rows, each tile's weights held in registers across the rows
#
# Kept in this file on purpose: Numba's cache key is the source file of the jitted function, so IR
# generators in another module would leave stale compiled kernels behind when only they change.

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _c64(v):
    return ir.Constant(_I64, v)


def _splat32(v):
    return ir.Constant(_vec(_I32, 16), [v] * 16)


_CODES = (types.uint8, types.int8)


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


def _vcall(builder, name, *args, ret=None):
    """A call of the LLVM intrinsic `name` on args, returning ret (default: the first argument's type)."""
    fnty = ir.FunctionType(ret or args[0].type, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(args))


def _fma(builder, a, b, c):
    """a * b + c on float vectors (llvm.fma; llvmlite's builder.fma takes scalars only)."""
    return _vcall(builder, f"llvm.fma.v{a.type.count}f32", a, b, c)


def _bcast(builder, pp, j):
    """<16 x i32> with every lane the int32 at pp[j] (one vpbroadcastd, or an {1to16} memory operand)."""
    return _splat(builder, builder.load(builder.gep(pp, [_c64(j)])), _vec(_I32, 16))


def _splat(builder, v, vt):
    """A vector of type vt with every lane v."""
    first = builder.insert_element(ir.Constant(vt, None), v, _c64(0))
    return builder.shuffle_vector(first, ir.Constant(vt, None), _splat32(0))


def _target_features() -> set:
    """The CPU features Numba compiles for: NUMBA_CPU_FEATURES when set ("" for NUMBA_CPU_NAME=generic), else
    the host's as Numba reads them (NUMBA_ENABLE_AVX=0 included). A feature missing here only means the
    portable IR is used, which is correct on any CPU."""
    from numba.core.codegen import get_host_cpu_features

    text = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return {f[1:] for f in text.split(",") if f.startswith("+")}


_FEATURES = _target_features()
_VNNI = "avx512vnni" in _FEATURES and "avx512f" in _FEATURES
_AVX512BW = "avx512bw" in _FEATURES
_AVXVNNI = "avxvnni" in _FEATURES
_AVX2 = "avx2" in _FEATURES
_F16C = "f16c" in _FEATURES


def kernel_path() -> dict:
    """The instruction-set path the kernels were compiled for (from the features Numba targets), the form of its
    integer multiply-add, and what it means for speed, in words for `lmcli doctor`."""
    if _VNNI:
        name, madd, note = "avx512-vnni", "vpdpwssd, 512-bit (32 products per instruction)", \
            "decode is bound by memory bandwidth"
    elif _AVX512BW:
        name, madd, note = "avx512bw", "vpmaddwd + vpaddd, 512-bit", "decode is bound by memory bandwidth"
    elif _AVXVNNI:
        name, madd, note = "avx-vnni", "vpdpwssd, 256-bit (VEX)", \
            "half the vector width of AVX-512: decode near memory bandwidth on 2+ cores"
    elif _AVX2:
        name, madd, note = "avx2", "vpmaddwd + vpaddd, 256-bit (16 products per multiply-add)", \
            "about 24 GB/s of weights per core (Zen 4 compiled for AVX2): bound by memory on 2+ fast cores, " \
            "by arithmetic on older or slower ones"
    else:
        name, madd, note = "portable", "plain vector IR lowered by LLVM for this CPU (NEON on ARM, SSE2 on x86-64)", \
            "not measured here (no ARM machine): expect decode below memory bandwidth"
    return {"kernel_path": name, "kernel_multiply_add": madd, "kernel_speed": note,
            "kernel_fp16_scales": "vcvtph2ps (F16C)" if _F16C else "integer exponent rebias (no F16C)"}


def _f16x16(builder, sp, off):
    """16 fp16 values at sp[off] -> <16 x float>: fpext (vcvtph2ps) with F16C. Without it, integer rebiasing
    of the exponent (subnormals through an exact int-to-float): written as "bits * 2^112" LLVM recognises the
    conversion and calls __extendhfsf2, whose calling convention differs between libgcc versions (garbage or
    a missing-symbol abort)."""
    h = _load(builder, sp, off, _I16, 16, 2)
    fvec = _vec(_F32, 16)
    if _F16C:
        return builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), 16)), fvec)
    w = builder.zext(h, _vec(_I32, 16))
    sign = builder.shl(builder.and_(w, _splat32(0x8000)), _splat32(16))
    em = builder.and_(w, _splat32(0x7FFF))
    normal = builder.add(builder.shl(em, _splat32(13)), _splat32(112 << 23))
    sub = builder.bitcast(builder.fmul(builder.sitofp(em, fvec), ir.Constant(fvec, [float(2.0**-24)] * 16)),
                          _vec(_I32, 16))  # exponent 0: em * 2^-24, exact
    bits = builder.select(builder.icmp_unsigned("<", em, _splat32(0x400)), sub, normal)
    return builder.bitcast(builder.or_(bits, sign), fvec)


def _halves(builder, v):
    """A 512-bit vector -> its two 256-bit halves (lanes 0..n/2-1, n/2..n-1)."""
    n = v.type.count
    return [builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n // 2), list(range(h * n // 2, (h + 1) * n // 2))))
            for h in (0, 1)]


def _join(builder, lo, hi):
    n = lo.type.count
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 2 * n), list(range(2 * n))))


def _pmadd(builder, acc, w, a):
    """acc + pairwise int16 products of the int16 pairs in lanes w and a (16 x i32 each).

    Named as x86 intrinsics where the CPU has them: one vpdpwssd (AVX-512 VNNI), vpmaddwd + vpaddd (AVX-512BW),
    two 256-bit vpdpwssd (AVX-VNNI: the VEX form of Intel client CPUs) or two 256-bit vpmaddwd + vpaddd (AVX2).
    Written as plain pairwise IR, LLVM's known-bits analysis saw the nibbles' zero high bits and split every
    multiply-add into two plus blends (1024 vpmaddwd + 512 vpblendw where 512 suffice, in the AVX2 assembly).
    Other CPUs (ARM, generic x86) get the plain IR of the last branch, which LLVM lowers for their vectors
    (pmaddwd on SSE2; NEON mla on 32-bit lanes, tests/test_quant.py compiles it for aarch64)."""
    v16, v32 = _vec(_I32, 16), _vec(_I16, 32)
    w16, a16 = builder.bitcast(w, v32), builder.bitcast(a, v32)
    # vpdpwssd's multiplicands as i32 vectors, the form every LLVM knows (LLVM 22 declares i16 vectors and
    # upgrades this form: the same code either way, checked)
    if _VNNI:
        return _vcall(builder, "llvm.x86.avx512.vpdpwssd.512", acc, w, a)
    if _AVXVNNI:
        parts = [_vcall(builder, "llvm.x86.avx512.vpdpwssd.256", c, x, y)
                 for c, x, y in zip(_halves(builder, acc), _halves(builder, w), _halves(builder, a))]
        return _join(builder, *parts)
    if _AVX512BW:
        return builder.add(acc, _vcall(builder, "llvm.x86.avx512.pmaddw.d.512", w16, a16, ret=v16))
    if _AVX2:
        parts = [_vcall(builder, "llvm.x86.avx2.pmadd.wd", x, y, ret=_vec(_I32, 8))
                 for x, y in zip(_halves(builder, w16), _halves(builder, a16))]
        return builder.add(acc, _join(builder, *parts))
    # each 32-bit lane's int16 halves sign-extended in place by shifts (no even/odd shuffles, which NEON lowers
    # to uzp1/uzp2 per operand): two 32-bit multiply-adds per lane
    sixteen = _splat32(16)

    def lo(v):
        return builder.ashr(builder.shl(v, sixteen), sixteen)

    return builder.add(builder.add(acc, builder.mul(lo(w), lo(a))),
                       builder.mul(builder.ashr(w, sixteen), builder.ashr(a, sixteen)))


def _word(builder, cp, u, k, memo):
    """The 64-byte load of words (u, rows 16k..16k+15) of a group (quantize._tile_words), loaded once."""
    if (u, k) not in memo:
        memo[u, k] = builder.bitcast(_load(builder, cp, (u * 4 + k) * 64, _I8, 64, 1), _vec(_I32, 16))
    return memo[u, k]


def _lanes_bits(builder, cp, j, k, memo, bits):
    # rows 16k.. of pair j = f u + s (f = 16 / bits fields per 16-bit half): word u shifted by bits * s, masked to the
    # int16 pair (element j, element j + 16)
    f = 16 // bits
    u, s = divmod(j, f)
    v = _word(builder, cp, u, k, memo)
    if s == f - 1:  # the top field of each 16-bit half: one 16-bit shift, nothing left to mask
        v16 = builder.bitcast(v, _vec(_I16, 32))
        return builder.bitcast(builder.lshr(v16, ir.Constant(_vec(_I16, 32), [16 - bits] * 32)), _vec(_I32, 16))
    mask = (1 << bits) - 1
    return builder.and_(builder.lshr(v, _splat32(bits * s)) if s else v, _splat32(mask | mask << 16))


def _lanes_q4(builder, cp, j, k, memo):
    return _lanes_bits(builder, cp, j, k, memo, 4)


def _high_bit(builder, cp, j, k, memo, u, at):
    """Bits j and j + 16 of word u (a row's word of high bits: bit j of element j, bit j + 16 of element j + 16)
    moved to bit `at` of each int16 half, the rest masked off."""
    h = _word(builder, cp, u, k, memo)
    h = builder.shl(h, _splat32(at - j)) if j < at else builder.lshr(h, _splat32(j - at)) if j > at else h
    return builder.and_(h, _splat32((1 << at) | (1 << (at + 16))))


def _lanes_q5(builder, cp, j, k, memo):
    # q5_0 (quant.repack): the q4 pair of low nibbles, and bit 4 of each int16 half from the group's qh words
    # (u = 4, after the nibble words): bit j of a row's qh is element j's fifth bit, bit j + 16 element j + 16's
    return builder.or_(_lanes_q4(builder, cp, j, k, memo), _high_bit(builder, cp, j, k, memo, 4, 4))


def _lanes_q8(builder, cp, j, k, memo):
    # rows 16k.. of pair j = 2u + s: the word's int16 halves hold bytes (e[2u], e[2u+1]) and (e[2u+16], e[2u+17]);
    # sign-extend the low bytes (s = 0) or the high bytes (s = 1) of both halves
    u, s = divmod(j, 2)
    v = builder.bitcast(_word(builder, cp, u, k, memo), _vec(_I16, 32))
    eight = ir.Constant(_vec(_I16, 32), [8] * 32)
    lanes = builder.ashr(v if s else builder.shl(v, eight), eight)
    return builder.bitcast(lanes, _vec(_I32, 16))


def _lanes_q2(builder, cp, j, k, memo):
    # q2_k (quant.repack._crumb_words): 2-bit fields, pair j = (slot j, slot j + 16)
    return _lanes_bits(builder, cp, j, k, memo, 2)


def _lanes_q3(builder, cp, j, k, memo):
    # q3_k: the q2 pair of low bits, bit 2 of each int16 half from the group's hmask word (u = 2, after the two
    # 2-bit words; bit j slot j, bit j + 16 slot j + 16), then 4 subtracted from each half: q in -4..3
    v = builder.or_(_lanes_q2(builder, cp, j, k, memo), _high_bit(builder, cp, j, k, memo, 2, 2))
    v16 = builder.bitcast(v, _vec(_I16, 32))
    return builder.bitcast(builder.sub(v16, ir.Constant(_vec(_I16, 32), [4] * 32)), _vec(_I32, 16))


# IQ4_NL's codebook (kvalues_iq4nl of ggml-common.h, gguf.quants.IQ4_NL.kvalues): the weight of 4-bit index i
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _lookup(builder, idx):
    """<64 x i8> indices 0..15 -> KVALUES[idx] (<64 x i8>): one vpshufb per 128-bit lane group (AVX-512BW: one
    512-bit; AVX2: two 256-bit); elsewhere a chain of 15 compare-and-selects (LLVM's portable IR has no variable
    byte shuffle)."""
    v8 = _vec(_I8, 64)
    table = ir.Constant(v8, [v & 255 for v in KVALUES] * 4)
    if _AVX512BW:
        return _vcall(builder, "llvm.x86.avx512.pshuf.b.512", table, idx)
    if _AVX2:
        t256 = _halves(builder, table)[0]
        return _join(builder, *[_vcall(builder, "llvm.x86.avx2.pshuf.b", t256, h) for h in _halves(builder, idx)])
    out = ir.Constant(v8, [KVALUES[0] & 255] * 64)
    for i in range(1, 16):
        hit = builder.icmp_unsigned("==", idx, ir.Constant(v8, [i] * 64))
        out = builder.select(hit, ir.Constant(v8, [KVALUES[i] & 255] * 64), out)
    return out


def _lanes_iq4(builder, cp, j, k, memo):
    # rows 16k.. of pair j = 4u + s of the IQ4 types (quant.repack: 4-bit indices in the q4 words): the word's low
    # nibbles (elements 4u, 4u+2 | 4u+16, 4u+18 by bytes) or high nibbles (4u+1, 4u+3 | 4u+17, 4u+19) mapped
    # through the codebook to int8 bytes, both kept for the four pairs of the word; then as _lanes_q8, the low
    # bytes (s < 2) or high bytes (s >= 2) of both int16 halves sign-extended
    u, s = divmod(j, 4)
    key = ("iq4", u, k, s % 2)
    if key not in memo:
        v = _word(builder, cp, u, k, memo)
        nib = builder.and_(builder.lshr(v, _splat32(4)) if s % 2 else v, _splat32(0x0F0F0F0F))
        memo[key] = builder.bitcast(_lookup(builder, builder.bitcast(nib, _vec(_I8, 64))), _vec(_I16, 32))
    t = memo[key]
    eight = ir.Constant(_vec(_I16, 32), [8] * 32)
    return builder.bitcast(builder.ashr(t if s >= 2 else builder.shl(t, eight), eight), _vec(_I32, 16))


# --- one tile row of a matrix, all groups: integer dot products and the float scale epilogue ------------



def _scaled(builder, kind, sv, isum, sxi):
    """The float side of the kernels for one group and 16 rows (<16 x float>), from the integer sums isum and the
    scale vectors sv of _group_scales: q4_1 and q5_1 w = d q + m: d isum + m sx; q4_0 w = d (q - 8) and q5_0
    w = d (q - 16), the offset taken in exact integer arithmetic: d (isum - 8 sx); q8_0 and iq4_nl (q the codebook
    value) w = d q; the K-quants and iq4_xs (integer sub-block scales sc): the sums times sc (_scale_sums), then
    _scaled_pre. The K-quants' integer products are exact in int32 (|sc isum| <= 63 * 32 * 31 * 32767 < 2^31 for
    q5_k, |m sx| < 2^26, |sc_lo isum_lo| < 2^31: iq4_xs sums each half apart for this, 32 * 16 * 127 * 32767 < 2^31,
    where one sum of 32 could reach 2^32), then each rounded once to float: as float products of products, LLVM
    reordered them differently for targets with and without F16C (results one ulp apart). sxi: the group's activation
    sum (q2_k: its two halves' sums)."""
    fvec = _vec(_F32, 16)
    if kind in _PRESCALE:
        isum, sv = _scale_sums(builder, kind, sv, isum)
        return _scaled_pre(builder, kind, sv, isum, sxi)
    if kind == "q4_1" or kind == "q5_1":
        sxv = _splat(builder, builder.sitofp(sxi, _F32), fvec)
        return _fma(builder, sv[0], builder.sitofp(isum, fvec), builder.fmul(sv[1], sxv))
    if kind == "q4_0" or kind == "q5_0":
        off = 8 if kind == "q4_0" else 16
        sx8 = _splat(builder, builder.mul(sxi, ir.Constant(_I32, off)), _vec(_I32, 16))
        return builder.fmul(sv[0], builder.sitofp(builder.sub(isum, sx8), fvec))
    return builder.fmul(sv[0], builder.sitofp(isum, fvec))


# Prefill (rows_<kind>): the K-quants' integer sub-block scales are multiplied into the unpacked weight lanes once
# per group and 16 rows (int16: |q sc| <= 31 * 63 (q5_k), 32 * 128 (q6_k), 127 * 32 (iq4_xs), 4 * 32 (q3_k), 3 * 15
# (q2_k)), instead of into each token's sums (vpmulld, two micro-ops on port 0 beside the multiply-adds); the sums are
# the same integers, so results are bit for bit those of _scaled. q6_k and iq4_xs keep their two halves apart
# (16 * 4096 * 32767 < 2^31 each, not together); q3_k and q2_k sum them.
_PRESCALE = ("q4_k", "q5_k", "q6_k", "iq4_xs", "q3_k", "q2_k")


def _prescale(builder, kind, w, sv):
    """(w, sv) for _scaled_pre: the 16 weight lanes times their rows' sub-block scale (both int16 halves), and the
    scale vectors still needed."""
    v32 = _vec(_I16, 32)

    def times(lane, sc):  # sc (<16 x i32>) into both int16 halves of each 32-bit lane, then vpmullw
        both = builder.or_(builder.and_(sc, _splat32(0xFFFF)), builder.shl(sc, _splat32(16)))
        return builder.bitcast(builder.mul(builder.bitcast(lane, v32), builder.bitcast(both, v32)), _vec(_I32, 16))

    if kind == "q4_k" or kind == "q5_k":
        d, dmin, sc, m = sv
        return [times(x, sc) for x in w], (d, dmin, m)
    if kind == "q2_k":
        d, dmin, sc_lo, sc_hi, m_lo, m_hi = sv
        return [times(x, sc_lo if j < 8 else sc_hi) for j, x in enumerate(w)], (d, dmin, m_lo, m_hi)
    d, sc_lo, sc_hi = sv
    return [times(x, sc_lo if j < 8 else sc_hi) for j, x in enumerate(w)], (d,)


def _scale_sums(builder, kind, sv, isum):
    """What _prescale does to the weight lanes, done to the integer sums instead (the decode kernels, where each
    lane meets one token): (the sums times their sub-block scales, the scale vectors _scaled_pre takes)."""
    if kind == "q4_k" or kind == "q5_k":
        d, dmin, sc, m = sv
        return builder.mul(sc, isum), (d, dmin, m)
    lo, hi = isum
    if kind == "q2_k":
        d, dmin, sc_lo, sc_hi, m_lo, m_hi = sv
        return builder.add(builder.mul(sc_lo, lo), builder.mul(sc_hi, hi)), (d, dmin, m_lo, m_hi)
    d, sc_lo, sc_hi = sv
    if kind == "q3_k":
        return builder.add(builder.mul(sc_lo, lo), builder.mul(sc_hi, hi)), (d,)
    return (builder.mul(sc_lo, lo), builder.mul(sc_hi, hi)), (d,)  # q6_k, iq4_xs: the halves apart


def _scaled_pre(builder, kind, sv, isum, sxi):
    """_scaled for lanes scaled by _prescale: the same float operations on the same integers."""
    fvec, ivec = _vec(_F32, 16), _vec(_I32, 16)
    zero = ir.Constant(_I32, 0)
    if kind == "q4_k" or kind == "q5_k":
        d, dmin, m = sv
        msx = builder.mul(m, _splat(builder, builder.sub(zero, sxi), ivec))
        return _fma(builder, d, builder.sitofp(isum, fvec), builder.fmul(dmin, builder.sitofp(msx, fvec)))
    if kind == "q2_k":
        d, dmin, m_lo, m_hi = sv
        sx_lo, sx_hi = sxi
        msx = builder.add(builder.mul(m_lo, _splat(builder, builder.sub(zero, sx_lo), ivec)),
                          builder.mul(m_hi, _splat(builder, builder.sub(zero, sx_hi), ivec)))
        return _fma(builder, d, builder.sitofp(isum, fvec), builder.fmul(dmin, builder.sitofp(msx, fvec)))
    if kind == "q3_k":
        return builder.fmul(sv[0], builder.sitofp(isum, fvec))
    lo, hi = isum  # q6_k, iq4_xs
    return _fma(builder, sv[0], builder.sitofp(hi, fvec), builder.fmul(sv[0], builder.sitofp(lo, fvec)))


def _layout(kind):
    """(code lanes, bytes of codes per group of 64 rows) of a format."""
    if kind == "q8_0" or kind == "q6_k":
        return _lanes_q8, 32 * 64
    if kind in ("q5_0", "q5_1", "q5_k"):
        return _lanes_q5, 20 * 64
    if kind == "q2_k":
        return _lanes_q2, 8 * 64
    if kind == "q3_k":
        return _lanes_q3, 12 * 64
    if kind in ("iq4_nl", "iq4_xs"):
        return _lanes_iq4, 16 * 64
    return _lanes_q4, 16 * 64


# formats whose integer sum is kept as two halves (pairs 0-7 and 8-15 of a group), scaled separately (_scaled)
_SPLIT = ("q6_k", "iq4_xs", "q2_k", "q3_k")

# Scale rows (of 64 uint16) per super-block of 8 groups in the repacked layouts of quant.repack, and where a
# group's per-row bytes start (bytes from the super-block's first row) and how many bytes a group has: q4_k and
# q5_k d, dmin (fp16), then per group its 64 rows' 6-bit sc and m as bytes; q6_k d (fp16), then per group the
# int8 scales of its two 16-weight sub-blocks; iq4_xs d (fp16), then per group its int8 scale ls - 32
_KROWS = {"q4_k": (10, 256, 128), "q5_k": (10, 256, 128), "q6_k": (9, 128, 128), "iq4_xs": (5, 128, 64),
          "q2_k": (10, 256, 128), "q3_k": (9, 128, 128)}


def _bytes16(builder, bp, off, signed):
    """The 16 bytes at bp[off] (i8*), zero- or sign-extended, as <16 x i32>."""
    v = builder.load(builder.bitcast(builder.gep(bp, [_c64(off)]), _vec(_I8, 16).as_pointer()), align=1)
    return (builder.sext if signed else builder.zext)(v, _vec(_I32, 16))


def _group_scales(builder, kind, sp0, g):
    """k -> the scale vectors of rows 16k..16k+15 of group g, for _scaled: (d,), (d, m) for q4_1 and q5_1
    (<16 x float>); (d, dmin, sc, m) for q4_k and q5_k, (d, sc_lo, sc_hi) for q6_k and (d, sc, sc) for iq4_xs, the
    fp16 scales as <16 x float>, the 6- or 8-bit sub-block scales as <16 x i32>. sp0: i16* at the tile's first
    scale row."""
    if kind in _KROWS:
        nrows, first, per = _KROWS[kind]
        base = builder.gep(sp0, [builder.mul(builder.lshr(g, _c64(3)), _c64(nrows * 64))])
        boff = builder.add(builder.mul(builder.and_(g, _c64(7)), _c64(per)), _c64(first))
        bp = builder.gep(builder.bitcast(base, _I8.as_pointer()), [boff])

        def at_k(k):
            d = _f16x16(builder, base, 16 * k)
            if kind == "q4_k" or kind == "q5_k":
                return (d, _f16x16(builder, base, 64 + 16 * k), _bytes16(builder, bp, 16 * k, False),
                        _bytes16(builder, bp, 64 + 16 * k, False))
            if kind == "iq4_xs":
                sc = _bytes16(builder, bp, 16 * k, True)
                return d, sc, sc
            if kind == "q2_k":  # the file's bytes sc | m << 4 of the two sub-blocks
                lo, hi = _bytes16(builder, bp, 16 * k, False), _bytes16(builder, bp, 64 + 16 * k, False)
                f, four = _splat32(15), _splat32(4)
                return (d, _f16x16(builder, base, 64 + 16 * k), builder.and_(lo, f), builder.and_(hi, f),
                        builder.lshr(lo, four), builder.lshr(hi, four))
            return d, _bytes16(builder, bp, 16 * k, True), _bytes16(builder, bp, 64 + 16 * k, True)

        return at_k
    nsc = 2 if kind in ("q4_1", "q5_1") else 1
    sp = builder.gep(sp0, [builder.mul(g, _c64(nsc * 64))])

    def at(k):
        d = _f16x16(builder, sp, 16 * k)
        return (d, _f16x16(builder, sp, 64 + 16 * k)) if nsc == 2 else (d,)

    return at


def _act_sums(context, builder, kind, xs_ty, xs, gi):
    """The activation sum(s) of group gi: xs[gi] (i32); for q2_k the sums of its two 16-weight halves
    (xs from act_sums16: (xs[2 gi], xs[2 gi + 1]))."""
    if kind != "q2_k":
        return builder.load(_ptr(context, builder, xs_ty, xs, gi, _I32))
    g2 = builder.mul(gi, _c64(2))
    return (builder.load(_ptr(context, builder, xs_ty, xs, g2, _I32)),
            builder.load(_ptr(context, builder, xs_ty, xs, builder.add(g2, _c64(1)), _I32)))


PREFETCH = 8192  # bytes ahead of the group being read that decode kernels prefetch (one line per 64 bytes)


def _prefetch(builder, p, off):
    """Software prefetch of the cache line at p + off into all cache levels (llvm.prefetch; never faults).
    The hardware prefetchers alone left a decode thread at 24-26 GB/s; 8 KiB ahead gave 30-32 (1 thread) and
    +5-20% at 2 threads, the best of 1-16 KiB on this machine (bench numbers in the issue 8 note)."""
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    builder.call(fn, [builder.gep(p, [_c64(off)]), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _tile_codegen(kind, pf=PREFETCH):
    """acc[r] = sum over groups g of xd[g] * (d[g, r] * isum[g, r] + m[g, r] * xs[g]) for the 64 rows r of a
    tile; d and m (q4_1 only; q4_0: m = -8 d; q8_0: m = 0) are fp16 scales converted by _f16x16 (vcvtph2ps with F16C).
    The accumulators stay in registers across groups (allocas promoted by LLVM's mem2reg)."""
    lanes, cstride = _layout(kind)
    split = kind in _SPLIT  # pairs j < 8 and j >= 8 summed apart (q6_k: different sub-blocks, act_pairs_sub16)

    def codegen(context, builder, sig, args):
        codes, cb, sc, sb, ng, xp, xoff, xd, xs, xgoff, out = args
        ta = sig.args
        fvec = _vec(_F32, 16)
        accp = [cgutils.alloca_once(builder, fvec) for _ in range(4)]
        for p in accp:
            builder.store(ir.Constant(fvec, [0.0] * 16), p)
        sp0 = _ptr(context, builder, ta[2], sc, sb, _I16)
        with cgutils.for_range(builder, ng) as loop:
            g = loop.index
            cp = _ptr(context, builder, ta[0], codes, builder.add(cb, builder.mul(g, _c64(cstride))), _I8)
            pp = _ptr(context, builder, ta[5], xp, builder.add(xoff, builder.mul(g, _c64(16))), _I32)
            scales_at = _group_scales(builder, kind, sp0, g)
            # activation pair j broadcast from memory (_bcast): no shuffles, and no shuffle-index vectors to keep
            # in registers (on AVX2 they were spilled to the stack)
            for o in range(0, cstride, 64) if pf else ():
                _prefetch(builder, cp, pf + o)
            memo = {}
            if _VNNI:
                part = [_splat32(0)] * 8  # two chains per 16-row chunk, to hide the fused multiply-add's latency
                for j in range(16):
                    b = _bcast(builder, pp, j)
                    for k in range(4):
                        c = 2 * k + (j >= 8 if split else j % 2)
                        part[c] = _pmadd(builder, part[c], lanes(builder, cp, j, k, memo), b)
                if split:
                    accs = [(part[2 * k], part[2 * k + 1]) for k in range(4)]
                else:
                    accs = [builder.add(part[2 * k], part[2 * k + 1]) for k in range(4)]
            else:
                # one chain per chunk, each word used up before the next is loaded. Where multiply and add are
                # separate instructions the add's 1-cycle latency needs no second chain; on 256-bit targets
                # (AVX2, AVX-VNNI) eight 512-bit chains took all 16 ymm registers and spilled 96-128 vectors per
                # group to the stack (AVX-VNNI: 688 -> 586 instructions per group, its 8 ymm chains of
                # vpdpwssd are independent enough)
                per = 2 if lanes is _lanes_q8 else 4  # pairs per 32-bit word (IQ4: a word's 4 pairs share lookups)
                accs = [_splat32(0)] * 4
                for u in range(16 // per):
                    if split and u * per == 8:
                        first, accs = accs, [_splat32(0)] * 4
                    bs = [_bcast(builder, pp, j) for j in range(u * per, (u + 1) * per)]
                    for k in range(4):
                        for sft in range(per):
                            accs[k] = _pmadd(builder, accs[k], lanes(builder, cp, u * per + sft, k, memo), bs[sft])
                if split:
                    accs = list(zip(first, accs))
            gi = builder.add(xgoff, g)
            dx = builder.load(_ptr(context, builder, ta[7], xd, gi, _F32))
            sxi = _act_sums(context, builder, kind, ta[8], xs, gi)
            dxv = _splat(builder, dx, fvec)
            for k in range(4):
                inner = _scaled(builder, kind, scales_at(k), accs[k], sxi)
                builder.store(_fma(builder, dxv, inner, builder.load(accp[k])), accp[k])
        op = _ptr(context, builder, ta[10], out, _c64(0), _F32)
        for k in range(4):
            builder.store(builder.load(accp[k]), builder.bitcast(builder.gep(op, [_c64(16 * k)]), fvec.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return codegen


def _tile_intrinsic(kind, pf=PREFETCH):
    def typer(typingctx, codes, cb, sc, sb, ng, xp, xoff, xd, xs, xgoff, out):
        _check(codes, _CODES, "codes")
        _check(sc, (types.uint16,), "scales")
        _check(xp, (types.int32,), "xp")
        _check(xd, (types.float32,), "xd")
        _check(xs, (types.int32,), "xs")
        _check(out, (types.float32,), "out")
        i64 = types.int64
        return types.void(codes, i64, sc, i64, i64, xp, i64, xd, xs, i64, out), _tile_codegen(kind, pf)

    typer.__name__ = f"tile_{kind}"
    return intrinsic(typer)


# tile_<kind>(codes, cb, scales, sb, n_groups, xp, xoff, xd, xs, xgoff, out f32[64]): one tile row of 64 outputs;
# cb: element offset of the tile's first code group in codes, sb: of its first scale row in scales;
# xoff: of the activation row's pairs in xp (act_pairs), xgoff: of its first group in xd and xs.
tile_q4_0 = _tile_intrinsic("q4_0")
tile_q4_1 = _tile_intrinsic("q4_1")
tile_q8_0 = _tile_intrinsic("q8_0")
tile_q5_0 = _tile_intrinsic("q5_0")  # the GGUF types repacked at load time (quant.repack)
tile_q5_1 = _tile_intrinsic("q5_1")
tile_q4_k = _tile_intrinsic("q4_k")
tile_q5_k = _tile_intrinsic("q5_k")
tile_q6_k = _tile_intrinsic("q6_k")
tile_q2_k = _tile_intrinsic("q2_k")
tile_q3_k = _tile_intrinsic("q3_k")
tile_iq4_nl = _tile_intrinsic("iq4_nl")
tile_iq4_xs = _tile_intrinsic("iq4_xs")


# --- one tile of a matrix . several activation rows (prefill): weights held in registers ----------------


def _rows_codegen(kind):
    """acc[q, r] += sum over groups of xd[t, g] * (d * isum + m * xs[t, g]) for rows t = rows[q]: for each group
    and 16-row chunk, the 16 unpacked weight vectors stay in registers while every token streams past them,
    each token costing 16 multiply-adds with its activation pairs broadcast from memory."""
    lanes, cstride = _layout(kind)
    pre = kind in _PRESCALE
    split = kind in _SPLIT and kind not in ("q3_k", "q2_k")  # prescaled q3_k/q2_k sum their halves together

    def codegen(context, builder, sig, args):
        codes, cb, sc, sb, ng, xp, rows, xd, xs, acc = args
        ta = sig.args
        fvec = _vec(_F32, 16)
        rows_arr = context.make_array(ta[6])(context, builder, rows)
        nr = builder.extract_value(rows_arr.shape, 0)
        sp0 = _ptr(context, builder, ta[2], sc, sb, _I16)
        with cgutils.for_range(builder, ng) as gl:
            g = gl.index
            cp = _ptr(context, builder, ta[0], codes, builder.add(cb, builder.mul(g, _c64(cstride))), _I8)
            scales_at = _group_scales(builder, kind, sp0, g)
            memo = {}
            for k in range(4):
                w = [lanes(builder, cp, j, k, memo) for j in range(16)]
                sv = scales_at(k)
                if pre:
                    w, sv = _prescale(builder, kind, w, sv)
                with cgutils.for_range(builder, nr) as ql:
                    q = ql.index
                    t = builder.load(_ptr(context, builder, ta[6], rows, q, _I64))
                    gi = builder.add(builder.mul(t, ng), g)  # (t, g) in xd/xs; pairs of (t, g) at gi * 16
                    pp = _ptr(context, builder, ta[5], xp, builder.mul(gi, _c64(16)), _I32)
                    part = [_splat32(0)] * 4  # four independent chains: a multiply-add has ~5 cycles latency
                    for j in range(16):
                        b = _bcast(builder, pp, j)
                        c = 2 * (j >= 8) + j % 2 if split else j % 4
                        part[c] = _pmadd(builder, part[c], w[j], b)
                    if split:
                        isum = (builder.add(part[0], part[1]), builder.add(part[2], part[3]))
                    else:
                        isum = builder.add(builder.add(part[0], part[1]), builder.add(part[2], part[3]))
                    dx = _splat(builder, builder.load(_ptr(context, builder, ta[7], xd, gi, _F32)), fvec)
                    sxi = _act_sums(context, builder, kind, ta[8], xs, gi)
                    inner = (_scaled_pre if pre else _scaled)(builder, kind, sv, isum, sxi)
                    ap = builder.bitcast(_ptr(context, builder, ta[9], acc, builder.add(builder.mul(q, _c64(64)),
                                                                                        _c64(16 * k)), _F32),
                                         fvec.as_pointer())
                    builder.store(_fma(builder, dx, inner, builder.load(ap, align=4)), ap, align=4)
        return context.get_dummy_value()

    return codegen


def _rows_intrinsic(kind):
    def typer(typingctx, codes, cb, sc, sb, ng, xp, rows, xd, xs, acc):
        _check(codes, _CODES, "codes")
        _check(sc, (types.uint16,), "scales")
        _check(xp, (types.int32,), "xp")
        _check(rows, (types.int64,), "rows")
        _check(xd, (types.float32,), "xd")
        _check(xs, (types.int32,), "xs")
        _check(acc, (types.float32,), "acc")
        i64 = types.int64
        return types.void(codes, i64, sc, i64, i64, xp, rows, xd, xs, acc), _rows_codegen(kind)

    typer.__name__ = f"rows_{kind}"
    return intrinsic(typer)


# rows_<kind>(codes, cb, scales, sb, n_groups, xp, rows, xd, xs, acc f32[len(rows), 64]): adds one tile's 64
# outputs for activation rows `rows` into acc; xp (T, n_in / 2) int32 activation pairs (see act_pairs in
# kernels.py), xd/xs (T, n_groups); cb, sb as for tile_<kind>.
rows_q4_0 = _rows_intrinsic("q4_0")
rows_q4_1 = _rows_intrinsic("q4_1")
rows_q8_0 = _rows_intrinsic("q8_0")
rows_q5_0 = _rows_intrinsic("q5_0")
rows_q5_1 = _rows_intrinsic("q5_1")
rows_q4_k = _rows_intrinsic("q4_k")
rows_q5_k = _rows_intrinsic("q5_k")
rows_q6_k = _rows_intrinsic("q6_k")
rows_q2_k = _rows_intrinsic("q2_k")
rows_q3_k = _rows_intrinsic("q3_k")
rows_iq4_nl = _rows_intrinsic("iq4_nl")
rows_iq4_xs = _rows_intrinsic("iq4_xs")


@njit(cache=True, inline="always")
def _f16_row(src, bits, dst):
    # src: (TILE,) uint16 fp16 bits -> dst: (TILE,) float32, via a uint32 buffer viewed as float32.
    # (h & 0x7fff) << 13 places exponent and mantissa; * 2^112 rebiases (subnormals included).
    for r in range(src.shape[0]):
        h = np.uint32(src[r])
        bits[r] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
    fv = bits.view(np.float32)
    for r in range(src.shape[0]):
        dst[r] = fv[r] * _F16_MAGIC


@njit(cache=True, inline="always")
def _f16_scalar(h, b):
    # one fp16 value (uint32 holding its bits) -> float32, the bit trick of _f16_row; b: (1,) uint32 scratch
    b[0] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
    return b.view(np.float32)[0] * _F16_MAGIC


@njit(cache=True, fastmath=True)
def quantize_act(x, xq, xd, xs):
    """x (T, n) float32 -> xq (T, n) int16, xd (T, n/32) float32 scales, xs (T, n/32) int32 code sums."""
    T, n = x.shape
    for t in range(T):
        for g in range(n // GROUP):
            amax = np.float32(0.0)
            for j in range(GROUP):
                v = abs(x[t, g * GROUP + j])
                if v > amax:
                    amax = v
            d = amax / np.float32(ACT_QMAX)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            s = 0
            for j in range(GROUP):
                q = np.int32(np.rint(x[t, g * GROUP + j] * inv))
                xq[t, g * GROUP + j] = q
                s += q
            xd[t, g] = d
            xs[t, g] = s


@njit(cache=True)
def act_pairs(xq, xp):
    """xq (T, n) int16 -> xp (T, n/2) int32: per group of 32, lane j holds (x[j], x[j+16]) as two int16 halves,
    the activation side of the pairwise multiply-add (rows_*), one 32-bit broadcast per pair."""
    T, n = xq.shape
    for t in range(T):
        for g in range(n // GROUP):
            for j in range(16):
                lo = np.uint32(np.uint16(xq[t, g * GROUP + j]))
                hi = np.uint32(np.uint16(xq[t, g * GROUP + j + 16]))
                xp[t, g * 16 + j] = np.int32(lo | (hi << np.uint32(16)))


@njit(cache=True)
def act_pairs_sub16(xq, xp):
    """act_pairs for q6_k (quant.repack): lane j holds (x[j], x[j+8]) for j < 8 and (x[j+8], x[j+16]) for
    8 <= j < 16, so that both halves of a lane lie in one of the group's two 16-weight sub-blocks."""
    T, n = xq.shape
    for t in range(T):
        for g in range(n // GROUP):
            for j in range(16):
                a = g * GROUP + (j if j < 8 else j + 8)
                lo = np.uint32(np.uint16(xq[t, a]))
                hi = np.uint32(np.uint16(xq[t, a + 8]))
                xp[t, g * 16 + j] = np.int32(lo | (hi << np.uint32(16)))


@njit(cache=True)
def act_sums16(xq):
    """xq (T, n) int16 -> (T, n / 16) int32: the sum of each 16 activations (q2_k's minimums apply per 16 weights)."""
    T, n = xq.shape
    out = np.empty((T, n // 16), np.int32)
    for t in range(T):
        for h in range(n // 16):
            s = np.int32(0)
            for l in range(16):
                s += np.int32(xq[t, 16 * h + l])
            out[t, h] = s
    return out


CHUNKS = 64  # jobs of a decode call are cut into at most this many runs (prange gives each thread a block of them)


@njit(cache=True, inline="always")
def _span(n_jobs, c, n_chunks):
    """Jobs [lo, hi) of chunk c. Numba's prange hands each thread one contiguous block of iterations, so a thread
    walks consecutive jobs, which for tiles of one matrix is one forward stream through memory (the prefetchers'
    best case); scratch is allocated once per chunk, not per job. (get_num_threads() inside a kernel would
    stop Numba from caching it.)"""
    return c * n_jobs // n_chunks, (c + 1) * n_jobs // n_chunks


@njit(cache=True, parallel=True, fastmath=True)
def matmul_q4(codes, scales, xq, xd, xs, out):
    """4-bit grouped matmul: out (T, n_out) = x (T, n_in) @ W.T, W in Q4_0 or Q4_1 semantics.

    codes  (n_tiles, n_groups, 16, TILE) uint8: 1024 bytes per (tile, group) in the layout of quantize._tile_words
    scales (n_tiles, n_groups, 1 or 2, TILE) uint16 fp16: d (Q4_0: w = d*(q-8)) or d, m (Q4_1: w = d*q + m)
    Several tokens (prefill): each tile's weights are unpacked once and held in registers while every
    token streams past them (rows_*).
    """
    n_tiles, n_groups = codes.shape[0], codes.shape[1]
    has_min = scales.shape[2] == 2
    T, n_in = xq.shape
    n_out = out.shape[1]
    xp = np.empty((T, n_in // 2), np.int32)
    act_pairs(xq, xp)
    if T == 1:  # decode: each thread one run of tiles (_span)
        n_chunks = min(CHUNKS, n_tiles)
        for c in prange(n_chunks):
            acc1 = np.empty(TILE, np.float32)
            lo, hi = _span(n_tiles, c, n_chunks)
            for tile in range(lo, hi):
                cb, sb = tile * n_groups * 16 * TILE, tile * n_groups * scales.shape[2] * TILE
                if has_min:
                    tile_q4_1(codes, cb, scales, sb, n_groups, xp, 0, xd, xs, 0, acc1)
                else:
                    tile_q4_0(codes, cb, scales, sb, n_groups, xp, 0, xd, xs, 0, acc1)
                for r in range(min(TILE, n_out - tile * TILE)):
                    out[0, tile * TILE + r] = acc1[r]
        return
    rows = np.arange(T)
    for tile in prange(n_tiles):
        acc = np.zeros((T, TILE), np.float32)
        n_valid = min(TILE, n_out - tile * TILE)
        cb, sb = tile * n_groups * 16 * TILE, tile * n_groups * scales.shape[2] * TILE
        if has_min:
            rows_q4_1(codes, cb, scales, sb, n_groups, xp, rows, xd, xs, acc)
        else:
            rows_q4_0(codes, cb, scales, sb, n_groups, xp, rows, xd, xs, acc)
        for t in range(T):
            for r in range(n_valid):
                out[t, tile * TILE + r] = acc[t, r]


@njit(cache=True, parallel=True, fastmath=True)
def matmul_q8(codes, scales, xq, xd, xs, out):
    """8-bit grouped matmul (Q8_0 semantics): codes (n_tiles, n_groups, 32, TILE) int8, scales (.., 1, TILE)."""
    n_tiles, n_groups = codes.shape[0], codes.shape[1]
    T, n_in = xq.shape
    n_out = out.shape[1]
    xp = np.empty((T, n_in // 2), np.int32)
    act_pairs(xq, xp)
    if T == 1:
        n_chunks = min(CHUNKS, n_tiles)
        for c in prange(n_chunks):
            acc1 = np.empty(TILE, np.float32)
            lo, hi = _span(n_tiles, c, n_chunks)
            for tile in range(lo, hi):
                tile_q8_0(codes, tile * n_groups * GROUP * TILE, scales, tile * n_groups * TILE, n_groups,
                          xp, 0, xd, xs, 0, acc1)
                for r in range(min(TILE, n_out - tile * TILE)):
                    out[0, tile * TILE + r] = acc1[r]
        return
    rows = np.arange(T)
    for tile in prange(n_tiles):
        acc = np.zeros((T, TILE), np.float32)
        n_valid = min(TILE, n_out - tile * TILE)
        rows_q8_0(codes, tile * n_groups * GROUP * TILE, scales, tile * n_groups * TILE, n_groups, xp, rows,
                       xd, xs, acc)
        for t in range(T):
            for r in range(n_valid):
                out[t, tile * TILE + r] = acc[t, r]


@njit(cache=True, inline="always")
def tile_gguf(kind, codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out):
    """tile_<format> of a matrix repacked from GGUF rows (quant.repack), by its GGUF type id `kind`."""
    if kind == 12:
        tile_q4_k(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    elif kind == 14:
        tile_q6_k(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    elif kind == 13:
        tile_q5_k(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    elif kind == 23:
        tile_iq4_xs(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    elif kind == 20:
        tile_iq4_nl(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    elif kind == 7:
        tile_q5_1(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    elif kind == 11:
        tile_q3_k(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    elif kind == 10:
        tile_q2_k(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)
    else:
        tile_q5_0(codes, cb, scales, sb, ng, xp, xoff, xd, xs, xgoff, out)


@njit(cache=True, inline="always")
def rows_gguf(kind, codes, cb, scales, sb, ng, xp, rows, xd, xs, acc):
    """rows_<format> of a matrix repacked from GGUF rows (quant.repack), by its GGUF type id `kind`."""
    if kind == 12:
        rows_q4_k(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 14:
        rows_q6_k(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 13:
        rows_q5_k(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 23:
        rows_iq4_xs(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 20:
        rows_iq4_nl(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 7:
        rows_q5_1(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 11:
        rows_q3_k(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 10:
        rows_q2_k(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)
    else:
        rows_q5_0(codes, cb, scales, sb, ng, xp, rows, xd, xs, acc)


@njit(cache=True, parallel=True, fastmath=True)
def matmul_tiles(codes, scales, kind, xq, xd, xs, out):
    """out (T, n_out) = x (T, n_in) @ W.T for W repacked from GGUF rows into tiles (quant.repack; kind: the GGUF type
    id, 6 Q5_0, 7 Q5_1, 10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K, 20 IQ4_NL, 23 IQ4_XS). codes (n_tiles, code
    rows, TILE) uint8, scales (n_tiles, scale rows, TILE) uint16, both in quant.repack's layouts; decode and prefill
    as matmul_q4."""
    n_tiles = codes.shape[0]
    cpt, spt = codes.shape[1] * TILE, scales.shape[1] * TILE
    T, n_in = xq.shape
    ng = n_in // GROUP
    n_out = out.shape[1]
    xp = np.empty((T, n_in // 2), np.int32)
    if sub16(TILED + kind):
        act_pairs_sub16(xq, xp)
    else:
        act_pairs(xq, xp)
    xsk = act_sums16(xq) if kind == 10 else xs
    if T == 1:
        n_chunks = min(CHUNKS, n_tiles)
        for c in prange(n_chunks):
            acc1 = np.empty(TILE, np.float32)
            lo, hi = _span(n_tiles, c, n_chunks)
            for tile in range(lo, hi):
                tile_gguf(kind, codes, tile * cpt, scales, tile * spt, ng, xp, 0, xd, xsk, 0, acc1)
                for r in range(min(TILE, n_out - tile * TILE)):
                    out[0, tile * TILE + r] = acc1[r]
        return
    rows = np.arange(T)
    for tile in prange(n_tiles):
        acc = np.zeros((T, TILE), np.float32)
        n_valid = min(TILE, n_out - tile * TILE)
        rows_gguf(kind, codes, tile * cpt, scales, tile * spt, ng, xp, rows, xd, xsk, acc)
        for t in range(T):
            for r in range(n_valid):
                out[t, tile * TILE + r] = acc[t, r]


@njit(cache=True, parallel=True, fastmath=True)
def matmul_f16(codes, x, out):
    """Float matmul on fp16 weights: codes (n_tiles, n_in, TILE) uint16, x (T, n_in) float32."""
    n_tiles, n_in = codes.shape[0], codes.shape[1]
    T = x.shape[0]
    n_out = out.shape[1]
    for tile in prange(n_tiles):
        acc = np.zeros((T, TILE), np.float32)
        bits = np.empty(TILE, np.uint32)
        wv = np.empty(TILE, np.float32)
        n_valid = min(TILE, n_out - tile * TILE)
        for k in range(n_in):
            _f16_row(codes[tile, k, :n_valid], bits, wv)
            for t in range(T):
                a = x[t, k]
                for r in range(n_valid):
                    acc[t, r] += wv[r] * a
        for t in range(T):
            for r in range(n_valid):
                out[t, tile * TILE + r] = acc[t, r]


@njit(cache=True, parallel=True, fastmath=True)
def matmul_f32(codes, x, out):
    """Float matmul on fp32 weights: codes (n_tiles, n_in, TILE) float32, x (T, n_in) float32."""
    n_tiles, n_in = codes.shape[0], codes.shape[1]
    T = x.shape[0]
    n_out = out.shape[1]
    for tile in prange(n_tiles):
        acc = np.zeros((T, TILE), np.float32)
        n_valid = min(TILE, n_out - tile * TILE)  # a router's 8-64 rows: read only those (the rest is padding)
        for k in range(n_in):
            wrow = codes[tile, k]
            for t in range(T):
                a = x[t, k]
                if n_valid == TILE:
                    for r in range(TILE):
                        acc[t, r] += wrow[r] * a
                else:
                    for r in range(n_valid):
                        acc[t, r] += wrow[r] * a
        for t in range(T):
            for r in range(n_valid):
                out[t, tile * TILE + r] = acc[t, r]


@njit(cache=True, fastmath=True)
def matmul_rows(w, x, out):
    """out (T, n_out) = x (T, n_in) @ w.T for a small row-major float32 w (a router): one thread, no launch."""
    T, n_in = x.shape
    for t in range(T):
        for o in range(w.shape[0]):
            s = np.float32(0.0)
            for k in range(n_in):
                s += w[o, k] * x[t, k]
            out[t, o] = s


@njit(cache=True)
def embed_rows(codes, scales, kind, ids, out):
    """Dequantize rows `ids` of an interleaved matrix into out (len(ids), n_in).

    kind: quant.formats.Format.kind (0 f32, 1 f16, 2 q4_0, 3 q4_1, 8 q8_0, the gguf_rows kinds: GGUF type ids).
    `codes` is passed as uint8 bytes for every format but q4_0/q4_1/q8_0.
    """
    n_in = out.shape[1]
    n_groups = n_in // GROUP
    b = np.empty(1, np.uint32)  # scratch for bit reinterpretation, allocated once
    for i in range(ids.shape[0]):
        row = ids[i]
        tile = row // TILE
        r = row % TILE
        if is_gguf_rows(kind):
            decode_gguf_row(kind, codes, row * gguf_row_nbytes(kind, n_in), n_in, out[i])
            continue
        if kind == 0 or kind == 1:
            esz = 4 if kind == 0 else 2
            base = tile * n_in * TILE * esz
            for k in range(n_in):
                off = base + (k * TILE + r) * esz
                if kind == 0:
                    b[0] = (np.uint32(codes[off]) | (np.uint32(codes[off + 1]) << np.uint32(8))
                            | (np.uint32(codes[off + 2]) << np.uint32(16)) | (np.uint32(codes[off + 3]) << np.uint32(24)))
                    out[i, k] = b.view(np.float32)[0]
                else:
                    out[i, k] = _f16_scalar(np.uint32(codes[off]) | (np.uint32(codes[off + 1]) << np.uint32(8)), b)
            continue
        n_sc = scales.shape[2]
        cb = 16 if kind != 8 else 32
        for g in range(n_groups):
            dd = _f16_scalar(np.uint32(scales[tile, g, 0, r]), b)
            mm = _f16_scalar(np.uint32(scales[tile, g, 1, r]), b) if n_sc == 2 else np.float32(0.0)
            base = ((tile * n_groups + g) * cb) * TILE
            if kind == 8:
                for u in range(8):  # the tile layout (quant.quantize._tile_words)
                    lane = base + ((u * 4 + r // 16) * 16 + r % 16) * 4
                    for q in range(4):
                        v = np.int32(codes[lane + q])
                        if v > 127:
                            v -= 256
                        out[i, g * GROUP + 2 * u + q % 2 + 16 * (q // 2)] = dd * np.float32(v)
                continue
            off = np.float32(-8.0) if kind == 2 else np.float32(0.0)
            for u in range(4):  # the tile layout (quant.quantize._tile_words)
                lane = base + ((u * 4 + r // 16) * 16 + r % 16) * 4
                for q in range(4):
                    c = codes[lane + q]
                    e = g * GROUP + 4 * u + 2 * (q % 2) + 16 * (q // 2)
                    out[i, e] = dd * (np.float32(c & 15) + off) + mm
                    out[i, e + 1] = dd * (np.float32(c >> 4) + off) + mm


# --- GGUF types kept in GGUF's rows (quant.formats.ROWS: K-quants, Q5_0/Q5_1, IQ4, BF16) -----------------------
# Codes (n_tiles, TILE, row bytes) hold each row's GGUF blocks as they are (padding rows are zero bytes, which
# decode to 0). A row is decoded to float32 with the operations of gguf.quants (quant.quantize's reference: the
# tests compare embed_rows with it bit for bit), then dotted with float activations. decode_gguf_row is a separate
# compiled function (not inlined into the fastmath kernels), so its arithmetic stays exactly gguf.quants'.
# Rows are decoded RB at a time and held while every token of the batch passes (prefill decodes a row once).

RB = 16  # rows decoded per step: RB * n_in floats stay in L1/L2 while the tokens stream past
_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


@njit(cache=True, inline="always")
def is_gguf_rows(kind):
    """kind (a GGUF type id) is one of the gguf_rows formats (quant.formats.ROWS)."""
    return (kind == 6 or kind == 7 or (10 <= kind <= 14) or (16 <= kind <= 20) or kind == 23 or kind == 30)


@njit(cache=True)
def gguf_row_nbytes(kind, n):
    """Bytes of one row of n weights of a gguf_rows kind (GGUF type id), as quant.formats.Format.row_nbytes."""
    if kind == 6:
        return n // 32 * 22
    if kind == 7:
        return n // 32 * 24
    if kind == 10:
        return n // 256 * 84
    if kind == 11:
        return n // 256 * 110
    if kind == 12:
        return n // 256 * 144
    if kind == 13:
        return n // 256 * 176
    if kind == 14:
        return n // 256 * 210
    if kind == 20:
        return n // 32 * 18
    if kind == 23:
        return n // 256 * 136
    if kind == 16:
        return n // 256 * 66
    if kind == 17:
        return n // 256 * 74
    if kind == 18:
        return n // 256 * 98
    if kind == 19:
        return n // 256 * 50
    return 2 * n  # 30: bf16


@njit(cache=True, inline="always")
def _h16(src, o, b):
    """The fp16 value at bytes src[o], src[o + 1] -> float32 (exact, subnormals included)."""
    return _f16_scalar(np.uint32(src[o]) | (np.uint32(src[o + 1]) << np.uint32(8)), b)


@njit(cache=True, inline="always")
def _u32(src, o):
    """The little-endian uint32 at bytes src[o:o + 4]."""
    return (np.uint32(src[o]) | (np.uint32(src[o + 1]) << np.uint32(8)) | (np.uint32(src[o + 2]) << np.uint32(16))
            | (np.uint32(src[o + 3]) << np.uint32(24)))


@njit(cache=True, inline="always")
def _signed_grid(w, e, db, g, sg):
    """w[e:e + 8] = db * weight i of grid entry g (8 bytes of a uint64), negated where bit i of sg is set."""
    for i in range(8):
        v = db * np.float32((g >> np.uint64(8 * i)) & np.uint64(255))
        w[e + i] = -v if (sg >> i) & 1 else v


@njit(cache=True, inline="always")
def _i8(v):
    return np.int32(v) - 256 if v > 127 else np.int32(v)


@njit(cache=True)
def decode_gguf_row(kind, src, off, n, w):
    """w[:n] = the row of n weights whose GGUF blocks of type `kind` start at src[off] (src: flat uint8), float32
    as gguf.quants.dequantize computes it (dequantize_row_* of ggml-quants.c; block layouts in quant.quantize)."""
    b = np.empty(1, np.uint32)
    if kind == 12 or kind == 13:  # Q4_K, Q5_K: 8 sub-blocks of 32, w = (d * sc) * q - dmin * m
        bb = 144 if kind == 12 else 176
        for i in range(n // 256):
            p = off + i * bb
            d, dmin = _h16(src, p, b), _h16(src, p + 2, b)
            qs = p + bb - 128
            for j in range(8):
                if j < 4:
                    sc, m = src[p + 4 + j] & 63, src[p + 8 + j] & 63
                else:
                    sc = (src[p + 8 + j] & 15) | ((src[p + j] >> 6) << 4)
                    m = (src[p + 8 + j] >> 4) | ((src[p + 4 + j] >> 6) << 4)
                D, M = d * np.float32(sc), dmin * np.float32(m)
                c, s, e = qs + (j // 2) * 32, 4 * (j % 2), i * 256 + j * 32
                if kind == 12:
                    for l in range(32):
                        w[e + l] = D * np.float32((src[c + l] >> s) & 15) - M
                else:
                    for l in range(32):
                        q = ((src[c + l] >> s) & 15) | (((src[p + 16 + l] >> j) & 1) << 4)
                        w[e + l] = D * np.float32(q) - M
    elif kind == 14:  # Q6_K: 16 sub-blocks of 16, w = (d * sc) * (q - 32); dequantize_row_q6_K's loop order
        for i in range(n // 256):
            p = off + i * 210
            d = _h16(src, p + 208, b)
            for h in range(2):  # halves of 128: ql[64 h + l] and ql[64 h + l + 32], qh[32 h + l], four outputs each
                ql, qh, sp, e = p + 64 * h, p + 128 + 32 * h, p + 192 + 8 * h, i * 256 + 128 * h
                for l in range(32):
                    hb = src[qh + l]
                    k = l // 16
                    w[e + l] = (d * np.float32(_i8(src[sp + k]))) * np.float32(
                        np.int32((src[ql + l] & 15) | ((hb & 3) << 4)) - 32)
                    w[e + l + 32] = (d * np.float32(_i8(src[sp + k + 2]))) * np.float32(
                        np.int32((src[ql + l + 32] & 15) | (((hb >> 2) & 3) << 4)) - 32)
                    w[e + l + 64] = (d * np.float32(_i8(src[sp + k + 4]))) * np.float32(
                        np.int32((src[ql + l] >> 4) | (((hb >> 4) & 3) << 4)) - 32)
                    w[e + l + 96] = (d * np.float32(_i8(src[sp + k + 6]))) * np.float32(
                        np.int32((src[ql + l + 32] >> 4) | (((hb >> 6) & 3) << 4)) - 32)
    elif kind == 6 or kind == 7:  # Q5_0 w = d * (q - 16), Q5_1 w = d * q + m; bit j of qh the fifth bit
        bb, qo = (22, 6) if kind == 6 else (24, 8)
        for i in range(n // 32):
            p = off + i * bb
            d = _h16(src, p, b)
            m = _h16(src, p + 2, b) if kind == 7 else np.float32(0.0)
            qh = (np.uint32(src[p + qo - 4]) | (np.uint32(src[p + qo - 3]) << np.uint32(8))
                  | (np.uint32(src[p + qo - 2]) << np.uint32(16)) | (np.uint32(src[p + qo - 1]) << np.uint32(24)))
            for j in range(16):
                v = src[p + qo + j]
                lo = np.int32(v & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                hi = np.int32(v >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
                if kind == 6:
                    w[i * 32 + j] = d * np.float32(lo - 16)
                    w[i * 32 + j + 16] = d * np.float32(hi - 16)
                else:
                    w[i * 32 + j] = d * np.float32(lo) + m
                    w[i * 32 + j + 16] = d * np.float32(hi) + m
    elif kind == 10:  # Q2_K: 16 sub-blocks of 16, w = (d * sc) * q - dmin * m; q bits 2j of qs[32 h + l]
        for i in range(n // 256):
            p = off + i * 84
            d, dmin = _h16(src, p + 80, b), _h16(src, p + 82, b)
            for s in range(16):
                h, j, l0 = s // 8, (s % 8) // 2, 16 * (s % 2)
                D, M = d * np.float32(src[p + s] & 15), dmin * np.float32(src[p + s] >> 4)
                c, e = p + 16 + 32 * h, i * 256 + 128 * h + 32 * j
                for l in range(l0, l0 + 16):
                    w[e + l] = D * np.float32((src[c + l] >> (2 * j)) & 3) - M
    elif kind == 11:  # Q3_K: 16 sub-blocks of 16, w = (d * (sc - 32)) * (q - 4 if the hmask bit is clear)
        for i in range(n // 256):
            p = off + i * 110
            d = _h16(src, p + 108, b)
            for s in range(16):
                h, j, l0 = s // 8, (s % 8) // 2, 16 * (s % 2)
                sc = (((src[p + 96 + s % 8] >> (4 * (s // 8))) & 15)
                      | (((src[p + 104 + s % 4] >> (2 * (s // 4))) & 3) << 4))
                D = d * np.float32(np.int32(sc) - 32)
                c, e, k = p + 32 + 32 * h, i * 256 + 128 * h + 32 * j, 4 * h + j
                for l in range(l0, l0 + 16):
                    q = np.int32((src[c + l] >> (2 * j)) & 3) - (0 if (src[p + l] >> k) & 1 else 4)
                    w[e + l] = D * np.float32(q)
    elif kind == 20:  # IQ4_NL: w = d * _IQ4[nibble]
        for i in range(n // 32):
            p = off + i * 18
            d = _h16(src, p, b)
            for j in range(16):
                v = src[p + 2 + j]
                w[i * 32 + j] = d * _IQ4[v & 15]
                w[i * 32 + j + 16] = d * _IQ4[v >> 4]
    elif kind == 23:  # IQ4_XS: 8 sub-blocks of 32, 6-bit scale ls, w = (d * (ls - 32)) * _IQ4[nibble]
        for i in range(n // 256):
            p = off + i * 136
            d = _h16(src, p, b)
            sh = np.int32(src[p + 2]) | (np.int32(src[p + 3]) << 8)
            for ib in range(8):
                ls = ((np.int32(src[p + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
                dl = d * np.float32(ls - 32)
                for j in range(16):
                    v = src[p + 8 + 16 * ib + j]
                    w[i * 256 + 32 * ib + j] = dl * _IQ4[v & 15]
                    w[i * 256 + 32 * ib + j + 16] = dl * _IQ4[v >> 4]
    elif kind == 16:  # IQ2_XXS: per 32 weights two u32: 4 grid bytes; 4 x 7 sign bits and a 4-bit scale
        for i in range(n // 256):
            p = off + i * 66
            d = _h16(src, p, b)
            for ib in range(8):
                q = p + 2 + 8 * ib
                a1 = _u32(src, q + 4)
                db = d * (np.float32(0.5) + np.float32(a1 >> np.uint32(28))) * np.float32(0.25)
                for l in range(4):
                    sg = KSIGNS[(a1 >> np.uint32(7 * l)) & np.uint32(127)]
                    _signed_grid(w, i * 256 + 32 * ib + 8 * l, db, IQ2XXS_GRID[src[q + l]], sg)
    elif kind == 17:  # IQ2_XS: per 8 weights a u16 (9-bit grid index, 7 sign bits); a 4-bit scale per 16 weights
        for i in range(n // 256):
            p = off + i * 74
            d = _h16(src, p, b)
            for k in range(32):
                v = np.int32(src[p + 2 + 2 * k]) | (np.int32(src[p + 3 + 2 * k]) << 8)
                sc = (np.int32(src[p + 66 + k // 4]) >> (4 * ((k // 2) % 2))) & 15
                db = d * (np.float32(0.5) + np.float32(sc)) * np.float32(0.25)
                _signed_grid(w, i * 256 + 8 * k, db, IQ2XS_GRID[v & 511], KSIGNS[v >> 9])
    elif kind == 18:  # IQ3_XXS: per 4 weights a grid byte; per 32 weights a u32 of 4 x 7 sign bits and a scale
        for i in range(n // 256):
            p = off + i * 98
            d = _h16(src, p, b)
            for ib in range(8):
                a = _u32(src, p + 66 + 4 * ib)
                db = d * (np.float32(0.5) + np.float32(a >> np.uint32(28))) * np.float32(0.5)
                for l in range(4):
                    sg = KSIGNS[(a >> np.uint32(7 * l)) & np.uint32(127)]
                    g = (np.uint64(IQ3XXS_GRID[src[p + 2 + 8 * ib + 2 * l]])
                         | (np.uint64(IQ3XXS_GRID[src[p + 3 + 8 * ib + 2 * l]]) << np.uint64(32)))
                    _signed_grid(w, i * 256 + 32 * ib + 8 * l, db, g, sg)
    elif kind == 19:  # IQ1_S: per 8 weights an 11-bit grid index (-1, 0, 1); per 32 a scale and the delta's sign
        for i in range(n // 256):
            p = off + i * 50
            d = _h16(src, p, b)
            for ib in range(8):
                qh = np.int32(src[p + 34 + 2 * ib]) | (np.int32(src[p + 35 + 2 * ib]) << 8)
                dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
                delta = np.float32(-0.125) if qh & 0x8000 else np.float32(0.125)
                for l in range(4):
                    g = IQ1S_GRID[np.int32(src[p + 2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)]
                    for k in range(8):
                        v = np.int32((g >> np.uint64(8 * k)) & np.uint64(255))
                        w[i * 256 + 32 * ib + 8 * l + k] = dl * (np.float32(v - 256 if v > 127 else v) + delta)
    else:  # 30: BF16, the high half of a float32
        wi = w.view(np.uint32)
        for k in range(n):
            wi[k] = (np.uint32(src[off + 2 * k]) | (np.uint32(src[off + 2 * k + 1]) << np.uint32(8))) << np.uint32(16)


@njit(cache=True, fastmath=True)
def _dot_k(kind, src, off, n, x, t):
    """One Q4_K/Q5_K row . x[t] without decoding it: per sub-block (d sc) sum(q x) - (dmin m) sum(x)."""
    b = np.empty(1, np.uint32)
    bb = 144 if kind == 12 else 176
    acc = np.float32(0.0)
    for i in range(n // 256):
        p = off + i * bb
        d, dmin = _h16(src, p, b), _h16(src, p + 2, b)
        for jj in range(4):  # 32 bytes of nibbles: sub-block 2 jj in the low nibbles, 2 jj + 1 in the high
            c, e = p + bb - 128 + jj * 32, i * 256 + jj * 64
            s0, s1, x0, x1 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
            if kind == 12:
                for l in range(32):
                    v = src[c + l]
                    a0, a1 = x[t, e + l], x[t, e + 32 + l]
                    s0 += np.float32(v & 15) * a0
                    s1 += np.float32(v >> 4) * a1
                    x0 += a0
                    x1 += a1
            else:
                for l in range(32):
                    v, hb = src[c + l], src[p + 16 + l] >> (2 * jj)
                    a0, a1 = x[t, e + l], x[t, e + 32 + l]
                    s0 += np.float32((v & 15) | ((hb & 1) << 4)) * a0
                    s1 += np.float32((v >> 4) | ((hb & 2) << 3)) * a1
                    x0 += a0
                    x1 += a1
            for h in range(2):
                j = 2 * jj + h
                if j < 4:
                    sc, m = src[p + 4 + j] & 63, src[p + 8 + j] & 63
                else:
                    sc = (src[p + 8 + j] & 15) | ((src[p + j] >> 6) << 4)
                    m = (src[p + 8 + j] >> 4) | ((src[p + 4 + j] >> 6) << 4)
                acc += (d * np.float32(sc)) * (s1 if h else s0) - (dmin * np.float32(m)) * (x1 if h else x0)
    return acc


@njit(cache=True, fastmath=True)
def _dot_q6_k(src, off, n, x, t):
    """One Q6_K row . x[t] without decoding it: per sub-block of 16, (d sc) sum((q - 32) x)."""
    b = np.empty(1, np.uint32)
    acc = np.float32(0.0)
    s = np.empty(4, np.float32)
    for i in range(n // 256):
        p = off + i * 210
        d = _h16(src, p + 208, b)
        for h in range(2):
            ql, qh, sp, e = p + 64 * h, p + 128 + 32 * h, p + 192 + 8 * h, i * 256 + 128 * h
            for k in range(2):  # l in [16 k, 16 k + 16): sub-blocks 8 h + k + 2 u for the four outputs u
                s[:] = 0.0
                for l in range(16 * k, 16 * k + 16):
                    hb, lo, hi = src[qh + l], src[ql + l], src[ql + l + 32]
                    s[0] += np.float32(np.int32((lo & 15) | ((hb & 3) << 4)) - 32) * x[t, e + l]
                    s[1] += np.float32(np.int32((hi & 15) | (((hb >> 2) & 3) << 4)) - 32) * x[t, e + l + 32]
                    s[2] += np.float32(np.int32((lo >> 4) | (((hb >> 4) & 3) << 4)) - 32) * x[t, e + l + 64]
                    s[3] += np.float32(np.int32((hi >> 4) | (((hb >> 6) & 3) << 4)) - 32) * x[t, e + l + 96]
                for u in range(4):
                    acc += (d * np.float32(_i8(src[sp + k + 2 * u]))) * s[u]
    return acc


@njit(cache=True, fastmath=True)
def _dot_q2_k(src, off, n, x, t):
    """One Q2_K row . x[t] without decoding it: per sub-block of 16, (d sc) sum(q x) - (dmin m) sum(x)."""
    b = np.empty(1, np.uint32)
    acc = np.float32(0.0)
    for i in range(n // 256):
        p = off + i * 84
        d, dmin = _h16(src, p + 80, b), _h16(src, p + 82, b)
        for s in range(16):
            h, j, l0 = s // 8, (s % 8) // 2, 16 * (s % 2)
            c, e = p + 16 + 32 * h, i * 256 + 128 * h + 32 * j
            sq, sx = np.float32(0.0), np.float32(0.0)
            for l in range(l0, l0 + 16):
                a = x[t, e + l]
                sq += np.float32((src[c + l] >> (2 * j)) & 3) * a
                sx += a
            acc += (d * np.float32(src[p + s] & 15)) * sq - (dmin * np.float32(src[p + s] >> 4)) * sx
    return acc


@njit(cache=True, fastmath=True)
def _dot_q3_k(src, off, n, x, t):
    """One Q3_K row . x[t] without decoding it: per sub-block of 16, (d (sc - 32)) sum(q x)."""
    b = np.empty(1, np.uint32)
    acc = np.float32(0.0)
    for i in range(n // 256):
        p = off + i * 110
        d = _h16(src, p + 108, b)
        for s in range(16):
            h, j, l0 = s // 8, (s % 8) // 2, 16 * (s % 2)
            sc = (((src[p + 96 + s % 8] >> (4 * (s // 8))) & 15)
                  | (((src[p + 104 + s % 4] >> (2 * (s // 4))) & 3) << 4))
            c, e, k = p + 32 + 32 * h, i * 256 + 128 * h + 32 * j, 4 * h + j
            sq = np.float32(0.0)
            for l in range(l0, l0 + 16):
                q = np.int32((src[c + l] >> (2 * j)) & 3) - (0 if (src[p + l] >> k) & 1 else 4)
                sq += np.float32(q) * x[t, e + l]
            acc += (d * np.float32(np.int32(sc) - 32)) * sq
    return acc


@njit(cache=True, inline="always")
def _rows_dot(src, kind, off, rb, n_rows, n_in, xf, toks, W, acc):
    """acc[q, i] = row i of a gguf_rows matrix (rows of rb bytes from byte off of src) . xf[toks[q]], i < n_rows.
    W (RB, n_in) float32 scratch: RB rows decoded, then every token passes them. One token (decode) of the
    K-quants Q4_K_M files are made of: dot products on the blocks themselves (1.5-2.3x faster than decoding)."""
    if toks.shape[0] == 1 and 10 <= kind <= 14:
        for i in range(n_rows):
            o = off + i * rb
            if kind == 14:
                acc[0, i] = _dot_q6_k(src, o, n_in, xf, toks[0])
            elif kind == 10:
                acc[0, i] = _dot_q2_k(src, o, n_in, xf, toks[0])
            elif kind == 11:
                acc[0, i] = _dot_q3_k(src, o, n_in, xf, toks[0])
            else:
                acc[0, i] = _dot_k(kind, src, o, n_in, xf, toks[0])
        return
    for i0 in range(0, n_rows, RB):
        m = min(RB, n_rows - i0)
        for i in range(m):
            decode_gguf_row(kind, src, off + (i0 + i) * rb, n_in, W[i])
        for q in range(toks.shape[0]):
            t = toks[q]
            for i in range(m):
                s = np.float32(0.0)
                for k in range(n_in):
                    s += W[i, k] * xf[t, k]
                acc[q, i0 + i] = s


@njit(cache=True, parallel=True, fastmath=True)
def matmul_gguf_rows(codes, kind, x, out):
    """out (T, n_out) = x (T, n_in) @ W.T for W in a gguf_rows format (kind: its GGUF type id).

    codes (n_tiles, TILE, row bytes) uint8: GGUF's blocks row by row, rows padded to whole tiles.
    """
    rb = codes.shape[2]
    src = codes.reshape(-1)
    T, n_in = x.shape
    n_out = out.shape[1]
    toks = np.arange(T)
    n_chunks = min(CHUNKS, n_out)
    for c in prange(n_chunks):
        lo, hi = _span(n_out, c, n_chunks)
        W = np.empty((RB, n_in), np.float32)
        acc = np.empty((T, hi - lo), np.float32)
        _rows_dot(src, kind, lo * rb, rb, hi - lo, n_in, x, toks, W, acc)
        for t in range(T):
            for r in range(hi - lo):
                out[t, lo + r] = acc[t, r]


# --- SwiGLU: silu(g) * u with a vector exp --------------------------------------------------------------
# Numba calls libm's expf once per element (no vector math library): 3.6 ns each, 41 us for one token's
# two 5632-wide expert rows. Here exp is Cephes' expf as vector IR: range reduction by k = rint(x log2 e),
# a degree-6 polynomial, 2^k from the exponent bits (within 2 ulp of libm's expf on [-87, 88]).

_LOG2E, _LN2_HI, _LN2_LO = 1.44269504088896341, 0.693359375, -2.12194440e-4
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _fconst(v, n=16):
    return ir.Constant(_vec(_F32, n), [v] * n)


def _exp16(builder, x):
    """exp of <16 x float>, arguments clamped to [-87.3, 88.3] (k = rint(x log2 e) within the normal exponents)."""
    x = _vcall(builder, "llvm.maxnum.v16f32", _vcall(builder, "llvm.minnum.v16f32", x, _fconst(88.3)), _fconst(-87.3))
    k = _vcall(builder, "llvm.rint.v16f32", builder.fmul(x, _fconst(_LOG2E)))
    r = _fma(builder, k, _fconst(-_LN2_HI), x)
    r = _fma(builder, k, _fconst(-_LN2_LO), r)
    p = _fconst(_EXP_P[0])
    for c in _EXP_P[1:]:
        p = _fma(builder, p, r, _fconst(c))
    p = _fma(builder, p, builder.fmul(r, r), builder.fadd(r, _fconst(1.0)))
    two_k = builder.shl(builder.add(builder.fptosi(k, _vec(_I32, 16)), _splat32(127)), _splat32(23))
    return builder.fmul(p, builder.bitcast(two_k, _vec(_F32, 16)))


@intrinsic
def _silu_mul16(typingctx, g, u, out, off):
    """out[off:off+16] = silu(g) * u on the flat elements of C-contiguous float32 arrays."""
    for a, what in ((g, "g"), (u, "u"), (out, "out")):
        _check(a, (types.float32,), what)

    def codegen(context, builder, sig, args):
        ga, ua, oa, o = args
        fvec = _vec(_F32, 16)
        ptr = [builder.bitcast(_ptr(context, builder, t, v, o, _F32), fvec.as_pointer())
               for t, v in zip(sig.args[:3], (ga, ua, oa))]
        x = builder.load(ptr[0], align=4)
        e = _exp16(builder, builder.fsub(_fconst(0.0), x))
        y = builder.fmul(builder.fdiv(x, builder.fadd(_fconst(1.0), e)), builder.load(ptr[1], align=4))
        builder.store(y, ptr[2], align=4)
        return context.get_dummy_value()

    return types.void(g, u, out, types.int64), codegen


@njit(cache=True)
def silu_mul(g, u, out):
    """out = silu(g) * u = g / (1 + exp(-g)) * u (SwiGLU); g, u, out (T, n) C-contiguous float32 (out may be g)."""
    T, n = g.shape
    for t in range(T):
        base = t * n
        i = 0
        while i + 16 <= n:
            _silu_mul16(g, u, out, base + i)
            i += 16
        for j in range(i, n):
            x = g[t, j]
            out[t, j] = x / (np.float32(1.0) + np.exp(-x)) * u[t, j]


# --- routed experts ---------------------------------------------------------------------------------
# Expert matrices are addressed inside one flat view of the container (buf8/buf16/buf32 are uint8, uint16
# and float32 views of the same bytes) by per-expert byte offsets of their codes and scales, so that one
# parallel call covers every selected expert's tiles: Python never loops over experts. `kind` is the weight
# format's id (quant.formats.Format.kind: its GGUF type id); gate and up may differ (gkind, ukind), and down from
# both (llama.cpp's Q4_K_M keeps some layers' ffn_down_exps in Q6_K). TILED + the GGUF id of a type quant.repack
# takes (Q5_0/Q5_1/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS) is that matrix repacked into tiles (repack_rows below,
# quant.repack): codes then scales, as matmul_tiles takes them.

TILED = 100


@njit(cache=True, inline="always")
def tiled_rows(kind, ng):
    """(code rows, scale rows) of TILE per tile of a matrix of ng groups repacked into tiles (quant.repack's
    layouts; kind its GGUF type id: 6 Q5_0, 7 Q5_1, 12 Q4_K, 13 Q5_K, 14 Q6_K, 20 IQ4_NL, 23 IQ4_XS)."""
    if kind == 12:
        return 16 * ng, 10 * (ng // 8)
    if kind == 13:
        return 20 * ng, 10 * (ng // 8)
    if kind == 14:
        return 32 * ng, 9 * (ng // 8)
    if kind == 20:
        return 16 * ng, ng
    if kind == 23:
        return 16 * ng, 5 * (ng // 8)
    if kind == 7:
        return 20 * ng, 2 * ng
    if kind == 10:
        return 8 * ng, 10 * (ng // 8)
    if kind == 11:
        return 12 * ng, 9 * (ng // 8)
    return 20 * ng, ng


@njit(cache=True, inline="always")
def _tiled_dot(buf8, buf16, kind, coff, soff, n_in, tile, xp, xd, xs, t, acc):
    """acc (TILE,) = one tile of a matrix repacked into tiles (kind TILED + GGUF id) . activation row t."""
    ng = n_in // GROUP
    cr, sr = tiled_rows(kind - TILED, ng)
    cb, sb = coff + tile * cr * TILE, (soff + tile * sr * TILE * 2) // 2
    tile_gguf(kind - TILED, buf8, cb, buf16, sb, ng, xp, t * (n_in // 2), xd, xs, t * ng, acc)


@njit(cache=True, inline="always")
def _tiled_dot_rows(buf8, buf16, kind, coff, soff, n_in, tile, xp, xd, xs, rows, acc):
    """_tiled_dot for several activation rows (prefill); acc (len(rows), TILE) zeroed by the caller."""
    ng = n_in // GROUP
    cr, sr = tiled_rows(kind - TILED, ng)
    cb, sb = coff + tile * cr * TILE, (soff + tile * sr * TILE * 2) // 2
    rows_gguf(kind - TILED, buf8, cb, buf16, sb, ng, xp, rows, xd, xs, acc)


@njit(cache=True, inline="always")
def sub16(kind):
    """kind's lanes pair weights within 16-weight sub-blocks (act_pairs_sub16): Q6_K, Q3_K, Q2_K repacked."""
    return kind == TILED + 14 or kind == TILED + 11 or kind == TILED + 10


@njit(cache=True)
def expert_pairs(xq, xs, kind_a, kind_b):
    """(xp, xp16, xs16): act_pairs of xq; act_pairs_sub16 when kind_a or kind_b pairs within sub-blocks of 16
    (else xp again); act_sums16 when one is Q2_K repacked (else xs)."""
    xp = np.empty((xq.shape[0], xq.shape[1] // 2), np.int32)
    act_pairs(xq, xp)
    xs16 = act_sums16(xq) if kind_a == TILED + 10 or kind_b == TILED + 10 else xs
    if not sub16(kind_a) and not sub16(kind_b):
        return xp, xp, xs16
    xp16 = np.empty_like(xp)
    act_pairs_sub16(xq, xp16)
    return xp, xp16, xs16


@njit(cache=True, inline="always")
def _tile_dot(buf8, buf16, buf32, kind, coff, soff, n_in, tile, xp, xd, xs, xf, t, acc, bits, d, W):
    """acc (TILE,) = rows [tile*TILE, +TILE) of one interleaved matrix . activation row t (xp: act_pairs of the
    quantized activations (act_pairs_sub16 for repacked Q6_K), xf: the float activations for f16/f32 and gguf_rows
    weights; W (RB, n_in) scratch)."""
    ng = n_in // GROUP
    for r in range(TILE):
        acc[r] = 0.0
    if kind >= TILED:
        _tiled_dot(buf8, buf16, kind, coff, soff, n_in, tile, xp, xd, xs, t, acc)
    elif is_gguf_rows(kind):
        rb = gguf_row_nbytes(kind, n_in)
        _rows_dot(buf8, kind, coff + tile * TILE * rb, rb, TILE, n_in, xf, np.full(1, t), W, acc.reshape(1, TILE))
    elif kind == 2 or kind == 3 or kind == 8:
        nsc = 2 if kind == 3 else 1
        cb = coff + tile * ng * (16 if kind != 8 else 32) * TILE
        sb = (soff + tile * ng * nsc * TILE * 2) // 2
        if kind == 2:
            tile_q4_0(buf8, cb, buf16, sb, ng, xp, t * (n_in // 2), xd, xs, t * ng, acc)
        elif kind == 3:
            tile_q4_1(buf8, cb, buf16, sb, ng, xp, t * (n_in // 2), xd, xs, t * ng, acc)
        else:
            tile_q8_0(buf8, cb, buf16, sb, ng, xp, t * (n_in // 2), xd, xs, t * ng, acc)
    elif kind == 1:
        base = coff // 2 + tile * n_in * TILE
        for k in range(n_in):
            _f16_row(buf16[base + k * TILE : base + (k + 1) * TILE], bits, d)
            a = xf[t, k]
            for r in range(TILE):
                acc[r] += d[r] * a
    else:  # f32
        base = coff // 4 + tile * n_in * TILE
        for k in range(n_in):
            a = xf[t, k]
            for r in range(TILE):
                acc[r] += buf32[base + k * TILE + r] * a


@njit(cache=True, inline="always")
def _tile_dot_rows(buf8, buf16, kind, coff, soff, n_in, tile, xp, xd, xs, xf, rows, acc, W):
    """acc (len(rows), TILE) = rows [tile*TILE, +TILE) of a q4_0/q4_1/q8_0 or gguf_rows matrix . activation rows
    `rows` (xp: act_pairs of the quantized activations; xf the float ones for gguf_rows, W (RB, n_in) scratch).
    Prefill: weights unpacked once, reused for every token."""
    ng = n_in // GROUP
    for q in range(rows.shape[0]):
        for r in range(TILE):
            acc[q, r] = 0.0
    if kind >= TILED:
        _tiled_dot_rows(buf8, buf16, kind, coff, soff, n_in, tile, xp, xd, xs, rows, acc)
        return
    if is_gguf_rows(kind):
        rb = gguf_row_nbytes(kind, n_in)
        _rows_dot(buf8, kind, coff + tile * TILE * rb, rb, TILE, n_in, xf, rows, W, acc)
        return
    nsc = 2 if kind == 3 else 1
    cb = coff + tile * ng * (16 if kind != 8 else 32) * TILE
    sb = (soff + tile * ng * nsc * TILE * 2) // 2
    if kind == 2:
        rows_q4_0(buf8, cb, buf16, sb, ng, xp, rows, xd, xs, acc)
    elif kind == 3:
        rows_q4_1(buf8, cb, buf16, sb, ng, xp, rows, xd, xs, acc)
    else:
        rows_q8_0(buf8, cb, buf16, sb, ng, xp, rows, xd, xs, acc)


@njit(cache=True, parallel=True, fastmath=True)
def moe_gate_up(buf8, buf16, buf32, gkind, ukind, n_ff, n_in, g_coff, g_soff, u_coff, u_soff, sel, tok_ptr,
                tok_idx, xq, xd, xs, xf, h2):
    """h2[0, a] = gate_e . x[t] and h2[1, a] = up_e . x[t] for every assignment a of token t to expert e (the
    caller applies SiLU(gate) * up).

    sel (n_sel,) expert ids; assignments of sel[i] are tok_ptr[i]..tok_ptr[i+1] in tok_idx (token rows);
    g_coff/g_soff/u_coff/u_soff (n_expert,) byte offsets of each expert's gate/up codes and scales.
    h2 (2, n_assign, n_ff) float32. Jobs (selected expert, gate or up, tile of 64 rows) in that order: a run
    of them reads one matrix front to back (two interleaved matrices per job read ~30% slower).
    """
    n_tiles = (n_ff + TILE - 1) // TILE
    xp, xp16, xs16 = expert_pairs(xq, xs, gkind, ukind)
    n_jobs = sel.shape[0] * 2 * n_tiles
    n_chunks = min(CHUNKS, n_jobs)
    for c in prange(n_chunks):
        acc = np.empty(TILE, np.float32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        W = np.empty((RB, n_in), np.float32)
        lo, hi = _span(n_jobs, c, n_chunks)
        for job in range(lo, hi):
            i = job // (2 * n_tiles)
            m = job // n_tiles % 2
            tile = job % n_tiles
            e = sel[i]
            coff, soff = (g_coff[e], g_soff[e]) if m == 0 else (u_coff[e], u_soff[e])
            kind = gkind if m == 0 else ukind
            n_valid = min(TILE, n_ff - tile * TILE)
            xk = xp16 if sub16(kind) else xp
            xsk = xs16 if kind == TILED + 10 else xs
            for a in range(tok_ptr[i], tok_ptr[i + 1]):
                _tile_dot(buf8, buf16, buf32, kind, coff, soff, n_in, tile, xk, xd, xsk, xf, tok_idx[a], acc, bits, d,
                          W)
                for r in range(n_valid):
                    h2[m, a, tile * TILE + r] = acc[r]


@njit(cache=True, parallel=True, fastmath=True)
def moe_down(buf8, buf16, buf32, kind, n_out, n_in, coff, soff, sel, tok_ptr, hq, hd, hs, hf, y):
    """y[a] = down_e . h[a] for every assignment a (rows of hq/hf) of expert sel[i]; y (n_assign, n_out)."""
    n_tiles = (n_out + TILE - 1) // TILE
    _, xp, hsk = expert_pairs(hq, hs, kind, kind)
    n_jobs = sel.shape[0] * n_tiles
    n_chunks = min(CHUNKS, n_jobs)
    for c in prange(n_chunks):
        acc = np.empty(TILE, np.float32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        W = np.empty((RB, n_in), np.float32)
        lo, hi = _span(n_jobs, c, n_chunks)
        for job in range(lo, hi):
            i = job // n_tiles
            tile = job % n_tiles
            e = sel[i]
            n_valid = min(TILE, n_out - tile * TILE)
            for a in range(tok_ptr[i], tok_ptr[i + 1]):
                _tile_dot(buf8, buf16, buf32, kind, coff[e], soff[e], n_in, tile, xp, hd, hsk, hf, a, acc, bits, d, W)
                for r in range(n_valid):
                    y[a, tile * TILE + r] = acc[r]


@njit(cache=True, parallel=True, fastmath=True)
def moe_gate_up_rows(buf8, buf16, gkind, ukind, n_ff, n_in, g_coff, g_soff, u_coff, u_soff, sel, tok_ptr, tok_idx,
                     xq, xd, xs, xf, h):
    """moe_gate_up for prefill (q4_0/q4_1/q8_0, repacked, gguf_rows): each tile's code groups are unpacked once for all
    the tokens routed to the expert. Separate from the decode kernel, whose code it would slow down."""
    n_tiles = (n_ff + TILE - 1) // TILE
    xp, xp16, xs16 = expert_pairs(xq, xs, gkind, ukind)
    for job in prange(sel.shape[0] * n_tiles):
        i = job // n_tiles
        tile = job % n_tiles
        e = sel[i]
        a0, a1 = tok_ptr[i], tok_ptr[i + 1]
        n_valid = min(TILE, n_ff - tile * TILE)
        rows = tok_idx[a0:a1]
        ga = np.empty((a1 - a0, TILE), np.float32)
        ua = np.empty((a1 - a0, TILE), np.float32)
        W = np.empty((RB, n_in), np.float32)
        _tile_dot_rows(buf8, buf16, gkind, g_coff[e], g_soff[e], n_in, tile, xp16 if sub16(gkind) else xp,
                       xd, xs16 if gkind == TILED + 10 else xs, xf, rows, ga, W)
        _tile_dot_rows(buf8, buf16, ukind, u_coff[e], u_soff[e], n_in, tile, xp16 if sub16(ukind) else xp,
                       xd, xs16 if ukind == TILED + 10 else xs, xf, rows, ua, W)
        for i in range(0, (a1 - a0) * TILE, 16):  # SwiGLU with the vector exp (libm's expf per element cost 3%)
            _silu_mul16(ga, ua, ga, i)
        for q in range(a1 - a0):
            for r in range(n_valid):
                h[a0 + q, tile * TILE + r] = ga[q, r]


@njit(cache=True, parallel=True, fastmath=True)
def moe_down_rows(buf8, buf16, kind, n_out, n_in, coff, soff, sel, tok_ptr, hq, hd, hs, hf, y):
    """moe_down for prefill (q4_0/q4_1/q8_0, repacked, gguf_rows), reusing each unpacked code group across the expert's
    tokens."""
    n_tiles = (n_out + TILE - 1) // TILE
    _, xp, hsk = expert_pairs(hq, hs, kind, kind)
    for job in prange(sel.shape[0] * n_tiles):
        i = job // n_tiles
        tile = job % n_tiles
        e = sel[i]
        a0, a1 = tok_ptr[i], tok_ptr[i + 1]
        n_valid = min(TILE, n_out - tile * TILE)
        rows = np.arange(a0, a1)
        ya = np.empty((a1 - a0, TILE), np.float32)
        W = np.empty((RB, n_in), np.float32)
        _tile_dot_rows(buf8, buf16, kind, coff[e], soff[e], n_in, tile, xp, hd, hsk, hf, rows, ya, W)
        for q in range(a1 - a0):
            for r in range(n_valid):
                y[a0 + q, tile * TILE + r] = ya[q, r]


@njit(cache=True)
def group_by_expert(ids, n_expert):
    """Counting sort of token->expert assignments: ids (T, k) -> (sel, tok_ptr, tok_idx, order).

    sel: the distinct experts in increasing order; assignments of sel[i] are tok_ptr[i]..tok_ptr[i+1] of tok_idx
    (token rows); order[a] is the flat (t * k + j) index of assignment a, to pick its routing weight.
    """
    T, k = ids.shape
    counts = np.zeros(n_expert, np.int64)
    for t in range(T):
        for j in range(k):
            counts[ids[t, j]] += 1
    n_sel = 0
    for e in range(n_expert):
        if counts[e] > 0:
            n_sel += 1
    sel = np.empty(n_sel, np.int64)
    tok_ptr = np.zeros(n_sel + 1, np.int64)
    start = np.zeros(n_expert, np.int64)
    i = 0
    acc = 0
    for e in range(n_expert):
        if counts[e] > 0:
            sel[i] = e
            start[e] = acc
            acc += counts[e]
            tok_ptr[i + 1] = acc
            i += 1
    tok_idx = np.empty(T * k, np.int64)
    order = np.empty(T * k, np.int64)
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            a = start[e]
            start[e] += 1
            tok_idx[a] = t
            order[a] = t * k + j
    return sel, tok_ptr, tok_idx, order


@njit(cache=True)
def combine_experts(y, tok_idx, w, out):
    """out[tok_idx[a]] += w[a] * y[a] for every assignment a (the routed experts' weighted sum)."""
    for a in range(y.shape[0]):
        t = tok_idx[a]
        wa = w[a]
        for i in range(y.shape[1]):
            out[t, i] += wa * y[a, i]


@intrinsic
def _or_reduce(typingctx, a, lo, hi):
    """OR of the uint64 words a[lo:hi] (hi - lo a multiple of 32): four 512-bit accumulators in registers,
    one load and one OR per 64 bytes, so that the loop runs at memory speed (the read-bandwidth probe)."""
    _check(a, (types.uint64,), "a")

    def codegen(context, builder, sig, args):
        vt = _vec(_I64, 8)
        accp = [cgutils.alloca_once(builder, vt) for _ in range(4)]
        for p in accp:
            builder.store(ir.Constant(vt, [0] * 8), p)
        n = builder.sdiv(builder.sub(args[2], args[1]), _c64(32))
        with cgutils.for_range(builder, n) as loop:
            p = _ptr(context, builder, sig.args[0], args[0], builder.add(args[1], builder.mul(loop.index, _c64(32))), _I64)
            for k in range(4):
                v = _load(builder, p, 8 * k, _I64, 8, 8)
                builder.store(builder.or_(builder.load(accp[k]), v), accp[k])
        acc = builder.or_(builder.or_(builder.load(accp[0]), builder.load(accp[1])),
                          builder.or_(builder.load(accp[2]), builder.load(accp[3])))
        out = builder.extract_element(acc, _c64(0))
        for i in range(1, 8):
            out = builder.or_(out, builder.extract_element(acc, _c64(i)))
        return out

    return types.uint64(a, types.int64, types.int64), codegen


@njit(cache=True, parallel=True)
def read_probe(a, out):
    """Read every byte of a (n,) uint64 (n a multiple of 32 * len(out)) once, split into len(out) chunks:
    memory bandwidth with one vector load and OR per 64 bytes (numpy's float sum is compute-bound below DRAM
    speed on 2 cores)."""
    n, nc = a.shape[0], out.shape[0]
    step = n // nc
    for c in prange(nc):
        out[c] = _or_reduce(a, c * step, (c + 1) * step)


# --- GGUF rows -> tiles (quant.repack's layouts, which its numpy reference builds; tests compare the bytes) ------
# Words of a group (quantize._tile_words): word u of tile row r at byte u * 256 + 4 r of the group's codes. 4-bit
# words hold elements (4u, 4u+1 | 4u+2, 4u+3 | 4u+16, 4u+17 | 4u+18, 4u+19), low nibble first; 8-bit words
# bytes (v[2u], v[2u+1], v[2u+16], v[2u+17]) of the slot-ordered int8 values (q6_k, repack.SLOTS).


@njit(cache=True, inline="always")
def _put_q4(dst, gb, r, q):
    """The four 4-bit words of one row's 32 codes q (int32, 0..15) into the group at dst[gb]."""
    for u in range(4):
        o = gb + u * 256 + 4 * r
        dst[o] = q[4 * u] | (q[4 * u + 1] << 4)
        dst[o + 1] = q[4 * u + 2] | (q[4 * u + 3] << 4)
        dst[o + 2] = q[4 * u + 16] | (q[4 * u + 17] << 4)
        dst[o + 3] = q[4 * u + 18] | (q[4 * u + 19] << 4)


@njit(cache=True, inline="always")
def _put_q2(dst, gb, r, q):
    """The two 2-bit words of one row's 32 codes q (int32, 0..3, element order) into the group at dst[gb], slots
    in _SLOTS order (quant.repack._crumb_words)."""
    for u in range(2):
        lo = np.int32(0)
        hi = np.int32(0)
        for s in range(8):
            lo |= q[_SLOTS[8 * u + s]] << (2 * s)
            hi |= q[_SLOTS[8 * u + s + 16]] << (2 * s)
        o = gb + u * 256 + 4 * r
        dst[o] = np.uint8(lo & 255)
        dst[o + 1] = np.uint8(lo >> 8)
        dst[o + 2] = np.uint8(hi & 255)
        dst[o + 3] = np.uint8(hi >> 8)


_SLOTS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23, 8, 9, 10, 11, 12, 13, 14, 15,
                   24, 25, 26, 27, 28, 29, 30, 31], np.int64)  # quant.repack.SLOTS


@njit(cache=True, nogil=True)
def repack_rows(kind, src, soff, n_tiles, n_in, dst, doff):
    """A Q5_0 (6), Q5_1 (7), Q2_K (10), Q3_K (11), Q4_K (12), Q5_K (13), Q6_K (14), IQ4_NL (20) or IQ4_XS (23) matrix
    of n_tiles * TILE GGUF rows at src[soff] (flat uint8) -> its tiles at dst[doff]: codes (n_tiles, code rows,
    TILE) bytes then scales (n_tiles, scale rows, TILE) uint16 (tiled_rows), quant.repack's layouts byte for byte.
    Codes and scales are copied, never rounded. nogil, so that threads can repack side by side (the expert cache of
    a mapped model does not yet: its bundles stay GGUF's rows, run by the rows kernels)."""
    rb = gguf_row_nbytes(kind, n_in)
    ng = n_in // GROUP
    cr, sr = tiled_rows(kind, ng)
    gbytes = cr // ng * TILE  # code bytes of one group of a tile
    sbase0 = doff + n_tiles * cr * TILE
    q = np.empty(32, np.int32)
    for tile in range(n_tiles):
        cbase = doff + tile * cr * TILE
        sbase = sbase0 + tile * sr * TILE * 2
        for r in range(TILE):
            p0 = soff + (tile * TILE + r) * rb
            if kind == 12 or kind == 13:
                bb = 144 if kind == 12 else 176
                for i in range(n_in // 256):
                    p = p0 + i * bb
                    s = sbase + i * 1280
                    for b in range(2):
                        dst[s + 2 * r + b] = src[p + b]  # d
                        dst[s + 128 + 2 * r + b] = src[p + 2 + b]  # dmin
                    for j in range(8):  # get_scale_min_k4
                        if j < 4:
                            sc, m = src[p + 4 + j] & 63, src[p + 8 + j] & 63
                        else:
                            sc = (src[p + 8 + j] & 15) | ((src[p + j] >> 6) << 4)
                            m = (src[p + 8 + j] >> 4) | ((src[p + 4 + j] >> 6) << 4)
                        dst[s + 256 + 128 * j + r] = sc
                        dst[s + 256 + 128 * j + 64 + r] = m
                        c, sh = p + bb - 128 + (j // 2) * 32, 4 * (j % 2)
                        for l in range(32):
                            q[l] = (np.int32(src[c + l]) >> sh) & 15
                        gb = cbase + (8 * i + j) * gbytes
                        _put_q4(dst, gb, r, q)
                        if kind == 13:  # qh word: bit l = bit j of qh[l]
                            h = np.uint32(0)
                            for l in range(32):
                                h |= np.uint32((src[p + 16 + l] >> j) & 1) << np.uint32(l)
                            for b in range(4):
                                dst[gb + 1024 + 4 * r + b] = np.uint8((h >> np.uint32(8 * b)) & np.uint32(255))
            elif kind == 14:
                for i in range(n_in // 256):
                    p = p0 + i * 210
                    s = sbase + i * 1152
                    dst[s + 2 * r] = src[p + 208]
                    dst[s + 2 * r + 1] = src[p + 209]
                    for j in range(8):
                        dst[s + 128 + 128 * j + r] = src[p + 192 + 2 * j]
                        dst[s + 128 + 128 * j + 64 + r] = src[p + 193 + 2 * j]
                        h, u = j // 4, j % 4  # group j: elements 128 h + 32 u + l (dequantize_row_q6_K)
                        ql = p + 64 * h + 32 * (u % 2)
                        qh = p + 128 + 32 * h
                        for l in range(32):
                            lo = np.int32(src[ql + l])
                            lo = lo & 15 if u < 2 else lo >> 4
                            q[l] = (lo | (((np.int32(src[qh + l]) >> (2 * u)) & 3) << 4)) - 32
                        gb = cbase + (8 * i + j) * gbytes
                        for w in range(8):
                            o = gb + w * 256 + 4 * r
                            dst[o] = np.uint8(q[_SLOTS[2 * w]] & 255)
                            dst[o + 1] = np.uint8(q[_SLOTS[2 * w + 1]] & 255)
                            dst[o + 2] = np.uint8(q[_SLOTS[2 * w + 16]] & 255)
                            dst[o + 3] = np.uint8(q[_SLOTS[2 * w + 17]] & 255)
            elif kind == 10 or kind == 11:  # Q2_K, Q3_K: 2-bit words of the slot-ordered codes (+ Q3_K's hmask word)
                bb = 84 if kind == 10 else 110
                for i in range(n_in // 256):
                    p = p0 + i * bb
                    if kind == 10:  # d, dmin, then per group the file's bytes sc | m << 4 of its two sub-blocks
                        s = sbase + i * 1280
                        for b in range(2):
                            dst[s + 2 * r + b] = src[p + 80 + b]
                            dst[s + 128 + 2 * r + b] = src[p + 82 + b]
                        for j in range(8):
                            dst[s + 256 + 128 * j + r] = src[p + 2 * j]
                            dst[s + 256 + 128 * j + 64 + r] = src[p + 2 * j + 1]
                        qo = p + 16
                    else:  # d, then per group the 6-bit scales minus 32 of its two sub-blocks (int8)
                        s = sbase + i * 1152
                        dst[s + 2 * r] = src[p + 108]
                        dst[s + 2 * r + 1] = src[p + 109]
                        for j in range(8):
                            for hb in range(2):
                                si = 2 * j + hb
                                sc = (((np.int32(src[p + 96 + si % 8]) >> (4 * (si // 8))) & 15)
                                      | (((np.int32(src[p + 104 + si % 4]) >> (2 * (si // 4))) & 3) << 4))
                                dst[s + 128 + 128 * j + 64 * hb + r] = np.uint8((sc - 32) & 255)
                        qo = p + 32
                    for j in range(8):  # group j: elements 128 h + 32 u + l, bits 2u of qs[32 h + l]
                        h, u = j // 4, j % 4
                        for l in range(32):
                            q[l] = (np.int32(src[qo + 32 * h + l]) >> (2 * u)) & 3
                        gb = cbase + (8 * i + j) * gbytes
                        _put_q2(dst, gb, r, q)
                        if kind == 11:  # hmask word: bit t = bit j of hmask[SLOTS[t]]
                            hw = np.uint32(0)
                            for t in range(32):
                                hw |= np.uint32((src[p + _SLOTS[t]] >> j) & 1) << np.uint32(t)
                            for b in range(4):
                                dst[gb + 512 + 4 * r + b] = np.uint8((hw >> np.uint32(8 * b)) & np.uint32(255))
            elif kind == 23:  # IQ4_XS: d, then per sub-block ls - 32 (dequantize_row_iq4_xs)
                for i in range(n_in // 256):
                    p = p0 + i * 136
                    s = sbase + i * 640
                    dst[s + 2 * r] = src[p]
                    dst[s + 2 * r + 1] = src[p + 1]
                    sh = np.int32(src[p + 2]) | (np.int32(src[p + 3]) << 8)
                    for ib in range(8):
                        ls = ((np.int32(src[p + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
                        dst[s + 128 + 64 * ib + r] = np.uint8((ls - 32) & 255)
                        for l in range(16):
                            v = np.int32(src[p + 8 + 16 * ib + l])
                            q[l] = v & 15
                            q[l + 16] = v >> 4
                        _put_q4(dst, cbase + (8 * i + ib) * gbytes, r, q)
            else:  # 6 Q5_0, 7 Q5_1, 20 IQ4_NL: d (| m) (| qh) | qs per group of 32
                bb, nh, qo = (22, 1, 6) if kind == 6 else (24, 2, 8) if kind == 7 else (18, 1, 2)
                for g in range(ng):
                    p = p0 + g * bb
                    for k in range(nh):  # d (, m): scale rows g nh + k
                        dst[sbase + (g * nh + k) * 128 + 2 * r] = src[p + 2 * k]
                        dst[sbase + (g * nh + k) * 128 + 2 * r + 1] = src[p + 2 * k + 1]
                    for l in range(16):
                        v = np.int32(src[p + qo + l])
                        q[l] = v & 15
                        q[l + 16] = v >> 4
                    gb = cbase + g * gbytes
                    _put_q4(dst, gb, r, q)
                    if kind != 20:
                        for b in range(4):
                            dst[gb + 1024 + 4 * r + b] = src[p + qo - 4 + b]  # qh: the fifth bits, word 4
