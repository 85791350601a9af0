"""Numba kernels that compute on packed weights in the interleaved layout (never dequantize a matrix).

Legend: T tokens, n_in inputs, n_out outputs, tiles of TILE=64 output rows, groups of 32 inputs.
Activations are quantized per group of 32 to int16 (not int8 as llama.cpp does: the kernels widen to int32
lanes either way, so int16 costs no speed here and keeps the result within ~1e-5 of float math); the inner
products are integer and the per-group float scale product is applied once per (row, group).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant import simd

TILE = 64
GROUP = 32
_F16_MAGIC = np.float32(2.0**112)  # rebias f16 exponent (15) to f32 (127): 2^(127-15)
ACT_QMAX = 32767  # int16 activation codes; |sum of 32 products| < 2^31 for 4- and 8-bit weights


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


@njit(cache=True, parallel=True, fastmath=True)
def matmul_q4(codes, scales, xq, xd, xs, out):
    """4-bit grouped matmul: out (T, n_out) = x (T, n_in) @ W.T, W in Q4_0 or Q4_1 semantics.

    codes  (n_tiles, n_groups, 16, TILE) uint8: byte j of a row holds element j (low) and j+16 (high)
    scales (n_tiles, n_groups, 1 or 2, TILE) uint16 fp16: d (Q4_0: w = d*(q-8)) or d, m (Q4_1: w = d*q + m)
    Several tokens (prefill): each group is unpacked once into int16 pairs and reused for every token.
    """
    n_tiles, n_groups = codes.shape[0], codes.shape[1]
    has_min = scales.shape[2] == 2
    T, n_in = xq.shape
    n_out = out.shape[1]
    for tile in prange(n_tiles):
        acc = np.zeros((T, TILE), np.float32)
        n_valid = min(TILE, n_out - tile * TILE)
        if T == 1:
            cb, sb = tile * n_groups * 16 * TILE, tile * n_groups * scales.shape[2] * TILE
            if has_min:
                simd.tile_q4_1(codes, cb, scales, sb, n_groups, xq, 0, xd, xs, 0, acc[0])
            else:
                simd.tile_q4_0(codes, cb, scales, sb, n_groups, xq, 0, xd, xs, 0, acc[0])
            for r in range(n_valid):
                out[0, tile * TILE + r] = acc[0, r]
            continue
        isum = np.empty(TILE, np.int32)
        w = np.empty(16 * TILE, np.int32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        m = np.empty(TILE, np.float32)
        for g in range(n_groups):
            simd.pairs_q4(codes, (tile * n_groups + g) * 16 * TILE, w)
            _f16_row(scales[tile, g, 0], bits, d)
            if has_min:
                _f16_row(scales[tile, g, 1], bits, m)
            else:
                for r in range(TILE):
                    m[r] = np.float32(-8.0) * d[r]
            for t in range(T):
                simd.isum_pairs(w, xq, t * n_in + g * GROUP, isum)
                dx = xd[t, g]
                sx = np.float32(xs[t, g])
                for r in range(TILE):
                    acc[t, r] += dx * (d[r] * np.float32(isum[r]) + m[r] * sx)
        for t in range(T):
            for r in range(n_valid):
                out[t, tile * TILE + r] = acc[t, r]


@njit(cache=True, parallel=True, fastmath=True)
def matmul_q8(codes, scales, xq, xd, xs, out):
    """8-bit grouped matmul (Q8_0 semantics): codes (n_tiles, n_groups, 32, TILE) int8, scales (.., 1, TILE)."""
    n_tiles, n_groups = codes.shape[0], codes.shape[1]
    T, n_in = xq.shape
    n_out = out.shape[1]
    for tile in prange(n_tiles):
        acc = np.zeros((T, TILE), np.float32)
        n_valid = min(TILE, n_out - tile * TILE)
        if T == 1:
            simd.tile_q8_0(codes, tile * n_groups * GROUP * TILE, scales, tile * n_groups * TILE, n_groups,
                           xq, 0, xd, xs, 0, acc[0])
            for r in range(n_valid):
                out[0, tile * TILE + r] = acc[0, r]
            continue
        isum = np.empty(TILE, np.int32)
        w = np.empty(16 * TILE, np.int32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        for g in range(n_groups):
            simd.pairs_q8(codes, (tile * n_groups + g) * GROUP * TILE, w)
            _f16_row(scales[tile, g, 0], bits, d)
            for t in range(T):
                simd.isum_pairs(w, xq, t * n_in + g * GROUP, isum)
                dx = xd[t, g]
                for r in range(TILE):
                    acc[t, r] += dx * d[r] * np.float32(isum[r])
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
        for k in range(n_in):
            _f16_row(codes[tile, k], bits, wv)
            for t in range(T):
                a = x[t, k]
                for r in range(TILE):
                    acc[t, r] += wv[r] * a
        n_valid = min(TILE, n_out - tile * TILE)
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
        for k in range(n_in):
            wrow = codes[tile, k]
            for t in range(T):
                a = x[t, k]
                for r in range(TILE):
                    acc[t, r] += wrow[r] * a
        n_valid = min(TILE, n_out - tile * TILE)
        for t in range(T):
            for r in range(n_valid):
                out[t, tile * TILE + r] = acc[t, r]


@njit(cache=True)
def embed_rows(codes, scales, kind, ids, out):
    """Dequantize rows `ids` of an interleaved matrix into out (len(ids), n_in).

    kind: 0 f32, 1 f16, 2 q4_0, 3 q4_1, 8 q8_0 (GGUF type ids). For f16/f32 `codes` is passed as uint8 bytes.
    """
    n_in = out.shape[1]
    n_groups = n_in // GROUP
    b = np.empty(1, np.uint32)  # scratch for bit reinterpretation, allocated once
    for i in range(ids.shape[0]):
        row = ids[i]
        tile = row // TILE
        r = row % TILE
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
            for j in range(cb):
                c = codes[base + j * TILE + r]
                if kind == 8:
                    v = np.int32(c)
                    if v > 127:
                        v -= 256
                    out[i, g * GROUP + j] = dd * np.float32(v)
                elif kind == 2:
                    out[i, g * GROUP + j] = dd * np.float32(np.int32(c & 15) - 8)
                    out[i, g * GROUP + j + 16] = dd * np.float32(np.int32(c >> 4) - 8)
                else:
                    out[i, g * GROUP + j] = dd * np.float32(c & 15) + mm
                    out[i, g * GROUP + j + 16] = dd * np.float32(c >> 4) + mm


# --- routed experts ---------------------------------------------------------------------------------
# Expert matrices are addressed inside one flat view of the container (buf8/buf16/buf32 are uint8, uint16
# and float32 views of the same bytes) by per-expert byte offsets of their codes and scales, so that one
# parallel call covers every selected expert's tiles: Python never loops over experts.

KIND = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}


@njit(cache=True, inline="always")
def _tile_dot(buf8, buf16, buf32, kind, coff, soff, n_in, tile, xq, xd, xs, xf, t, acc, bits, d):
    """acc (TILE,) = rows [tile*TILE, +TILE) of one interleaved matrix . activation row t."""
    ng = n_in // GROUP
    for r in range(TILE):
        acc[r] = 0.0
    if kind == 2 or kind == 3 or kind == 8:
        nsc = 2 if kind == 3 else 1
        cb = coff + tile * ng * (16 if kind != 8 else 32) * TILE
        sb = (soff + tile * ng * nsc * TILE * 2) // 2
        if kind == 2:
            simd.tile_q4_0(buf8, cb, buf16, sb, ng, xq, t * n_in, xd, xs, t * ng, acc)
        elif kind == 3:
            simd.tile_q4_1(buf8, cb, buf16, sb, ng, xq, t * n_in, xd, xs, t * ng, acc)
        else:
            simd.tile_q8_0(buf8, cb, buf16, sb, ng, xq, t * n_in, xd, xs, t * ng, acc)
    elif kind == 1:
        base = coff // 2 + tile * n_in * TILE
        for k in range(n_in):
            _f16_row(buf16[base + k * TILE : base + (k + 1) * TILE], bits, d)
            a = xf[t, k]
            for r in range(TILE):
                acc[r] += d[r] * a
    else:
        base = coff // 4 + tile * n_in * TILE
        for k in range(n_in):
            a = xf[t, k]
            for r in range(TILE):
                acc[r] += buf32[base + k * TILE + r] * a


@njit(cache=True, inline="always")
def _tile_dot_rows(buf8, buf16, kind, coff, soff, n_in, tile, xq, xd, xs, rows, acc, w, isum, bits, d, m):
    """acc (len(rows), TILE) = rows [tile*TILE, +TILE) of a q4_0/q4_1/q8_0 matrix . activation rows `rows`.

    Prefill: each group's codes are unpacked once into int16 pairs w (simd.pairs_*) and reused for every token.
    """
    ng = n_in // GROUP
    nr = rows.shape[0]
    for q in range(nr):
        for r in range(TILE):
            acc[q, r] = 0.0
    nsc = 2 if kind == 3 else 1
    cbytes = 16 if kind != 8 else 32
    cb = coff + tile * ng * cbytes * TILE
    sb = (soff + tile * ng * nsc * TILE * 2) // 2
    for g in range(ng):
        if kind == 8:
            simd.pairs_q8(buf8, cb + g * GROUP * TILE, w)
        else:
            simd.pairs_q4(buf8, cb + g * 16 * TILE, w)
        s0 = sb + g * nsc * TILE
        _f16_row(buf16[s0 : s0 + TILE], bits, d)
        if kind == 3:
            _f16_row(buf16[s0 + TILE : s0 + 2 * TILE], bits, m)
        elif kind == 2:
            for r in range(TILE):
                m[r] = np.float32(-8.0) * d[r]
        else:
            for r in range(TILE):
                m[r] = 0.0
        for q in range(nr):
            t = rows[q]
            simd.isum_pairs(w, xq, t * n_in + g * GROUP, isum)
            dx = xd[t, g]
            sx = np.float32(xs[t, g])
            for r in range(TILE):
                acc[q, r] += dx * (d[r] * np.float32(isum[r]) + m[r] * sx)


@njit(cache=True, parallel=True, fastmath=True)
def moe_gate_up(buf8, buf16, buf32, kind, n_ff, n_in, g_coff, g_soff, u_coff, u_soff, sel, tok_ptr, tok_idx,
                xq, xd, xs, xf, h):
    """h[a] = silu(gate_e . x[t]) * (up_e . x[t]) for every assignment a of token t to expert e.

    sel (n_sel,) expert ids; assignments of sel[i] are tok_ptr[i]..tok_ptr[i+1] in tok_idx (token rows);
    g_coff/g_soff/u_coff/u_soff (n_expert,) byte offsets of each expert's gate/up codes and scales.
    h (n_assign, n_ff) float32. One job per (selected expert, tile of 64 FFN rows).
    """
    n_tiles = (n_ff + TILE - 1) // TILE
    for job in prange(sel.shape[0] * n_tiles):
        i = job // n_tiles
        tile = job % n_tiles
        e = sel[i]
        g = np.empty(TILE, np.float32)
        u = np.empty(TILE, np.float32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        n_valid = min(TILE, n_ff - tile * TILE)
        for a in range(tok_ptr[i], tok_ptr[i + 1]):
            t = tok_idx[a]
            _tile_dot(buf8, buf16, buf32, kind, g_coff[e], g_soff[e], n_in, tile, xq, xd, xs, xf, t, g, bits, d)
            _tile_dot(buf8, buf16, buf32, kind, u_coff[e], u_soff[e], n_in, tile, xq, xd, xs, xf, t, u, bits, d)
            for r in range(n_valid):
                x = g[r]
                h[a, tile * TILE + r] = x / (np.float32(1.0) + np.exp(-x)) * u[r]


@njit(cache=True, parallel=True, fastmath=True)
def moe_down(buf8, buf16, buf32, kind, n_out, n_in, coff, soff, sel, tok_ptr, hq, hd, hs, hf, y):
    """y[a] = down_e . h[a] for every assignment a (rows of hq/hf) of expert sel[i]; y (n_assign, n_out)."""
    n_tiles = (n_out + TILE - 1) // TILE
    for job in prange(sel.shape[0] * n_tiles):
        i = job // n_tiles
        tile = job % n_tiles
        e = sel[i]
        acc = np.empty(TILE, np.float32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        n_valid = min(TILE, n_out - tile * TILE)
        for a in range(tok_ptr[i], tok_ptr[i + 1]):
            _tile_dot(buf8, buf16, buf32, kind, coff[e], soff[e], n_in, tile, hq, hd, hs, hf, a, acc, bits, d)
            for r in range(n_valid):
                y[a, tile * TILE + r] = acc[r]


@njit(cache=True, parallel=True, fastmath=True)
def moe_gate_up_rows(buf8, buf16, kind, n_ff, n_in, g_coff, g_soff, u_coff, u_soff, sel, tok_ptr, tok_idx,
                     xq, xd, xs, h):
    """moe_gate_up for prefill (q4_0/q4_1/q8_0): each tile's code groups are unpacked once for all the
    tokens routed to the expert. Separate from the decode kernel, whose code it would slow down."""
    n_tiles = (n_ff + TILE - 1) // TILE
    for job in prange(sel.shape[0] * n_tiles):
        i = job // n_tiles
        tile = job % n_tiles
        e = sel[i]
        a0, a1 = tok_ptr[i], tok_ptr[i + 1]
        n_valid = min(TILE, n_ff - tile * TILE)
        rows = tok_idx[a0:a1]
        ga = np.empty((a1 - a0, TILE), np.float32)
        ua = np.empty((a1 - a0, TILE), np.float32)
        w = np.empty(16 * TILE, np.int32)
        isum = np.empty(TILE, np.int32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        m = np.empty(TILE, np.float32)
        _tile_dot_rows(buf8, buf16, kind, g_coff[e], g_soff[e], n_in, tile, xq, xd, xs, rows, ga, w, isum, bits, d, m)
        _tile_dot_rows(buf8, buf16, kind, u_coff[e], u_soff[e], n_in, tile, xq, xd, xs, rows, ua, w, isum, bits, d, m)
        for q in range(a1 - a0):
            for r in range(n_valid):
                x = ga[q, r]
                h[a0 + q, tile * TILE + r] = x / (np.float32(1.0) + np.exp(-x)) * ua[q, r]


@njit(cache=True, parallel=True, fastmath=True)
def moe_down_rows(buf8, buf16, kind, n_out, n_in, coff, soff, sel, tok_ptr, hq, hd, hs, y):
    """moe_down for prefill (q4_0/q4_1/q8_0), reusing each unpacked code group across the expert's tokens."""
    n_tiles = (n_out + TILE - 1) // TILE
    for job in prange(sel.shape[0] * n_tiles):
        i = job // n_tiles
        tile = job % n_tiles
        e = sel[i]
        a0, a1 = tok_ptr[i], tok_ptr[i + 1]
        n_valid = min(TILE, n_out - tile * TILE)
        rows = np.arange(a0, a1)
        ya = np.empty((a1 - a0, TILE), np.float32)
        w = np.empty(16 * TILE, np.int32)
        isum = np.empty(TILE, np.int32)
        bits = np.empty(TILE, np.uint32)
        d = np.empty(TILE, np.float32)
        m = np.empty(TILE, np.float32)
        _tile_dot_rows(buf8, buf16, kind, coff[e], soff[e], n_in, tile, hq, hd, hs, rows, ya, w, isum, bits, d, m)
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


@njit(cache=True, parallel=True)
def read_probe(a, out):
    """Read every byte of a (n, 64) uint64 once, OR-ing rows into out (n_chunks, 64): memory bandwidth with
    one vector instruction per 64 bytes (numpy's float sum is compute-bound below DRAM speed on 2 cores)."""
    n, nc = a.shape[0], out.shape[0]
    for c in prange(nc):
        acc = out[c]
        for i in range(c * n // nc, (c + 1) * n // nc):
            row = a[i]
            for k in range(64):
                acc[k] |= row[k]
