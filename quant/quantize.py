"""Numpy reference codecs: GGUF block semantics (llama.cpp's reference rounding) and the interleaved repack.

Block byte layouts follow ggml-common.h:
  Q4_0: d f16 | qs[16]      (w = d * (q - 8), low nibble = element j, high nibble = element j + 16)
  Q4_1: d f16 | m f16 | qs[16]   (w = d * q + m)
  Q8_0: d f16 | qs[32] int8      (w = d * q)
GGUF types kept in GGUF's blocks row by row (formats.ROWS; Q5_0, Q5_1 encoded here, Q4_K, Q5_K, Q6_K by
quant.kquants, as llama.cpp's ggml_quantize_chunk; the others imported only), decoded here with the
float32 operations of gguf.quants (dequantize_row_* of ggml-quants.c), so the kernels can be checked bit for bit:
  Q5_0: d | qh u32 | qs[16]      (w = d * (q - 16), q = nibble | bit j of qh << 4)
  Q5_1: d | m | qh u32 | qs[16]  (w = d * q + m)
  Q2_K: scales[16] | qs[64] | d | dmin   16 sub-blocks of 16, 4-bit scale and min each (w = d sc q - dmin m)
  Q3_K: hmask[32] | qs[64] | scales[12] | d   16 sub-blocks of 16, 6-bit scale minus 32; q = 2 low bits - 4 when
        the hmask bit is clear (w = d sc q)
  Q4_K: d | dmin | scales[12] | qs[128]   8 sub-blocks of 32, 6-bit scale and min each (w = d sc q - dmin m)
  Q5_K: d | dmin | scales[12] | qh[32] | qs[128]   as Q4_K, bit j of qh[l] the fifth bit of sub-block j
  Q6_K: ql[128] | qh[64] | scales int8[16] | d     16 sub-blocks of 16 (w = d sc (q - 32))
  IQ4_NL: d | qs[16]             (w = d * KVALUES[nibble])
  IQ4_XS: d | scales_h u16 | scales_l[4] | qs[128]   8 sub-blocks of 32, 6-bit scale minus 32
  BF16: the high half of a float32
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ConvertError
from .formats import GROUP, TILE, Format


@dataclass(frozen=True)
class Codec:
    """A format's numpy reference (formats.Format.codec): GGUF row-major data <-> float32, and its codes <->
    the tile layout. encode(x (..., n)) -> data (..., n // GROUP * block_bytes bytes, or n elements of a float
    format); decode(data, n) -> float32 (..., n); tile/untile: see interleave (None for float formats, whose
    elements are transposed, not packed). encode is None for the types lmcli imports but does not write."""

    encode: Callable[[np.ndarray], np.ndarray] | None
    decode: Callable[[np.ndarray, int], np.ndarray]
    tile: Callable[[np.ndarray], np.ndarray] | None = None
    untile: Callable[[np.ndarray], np.ndarray] | None = None


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % GROUP:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {GROUP}")
    return x.reshape(-1, GROUP)


def pack_q4(q: np.ndarray) -> np.ndarray:
    """Codes (n_blocks, 32) uint8 in 0..15 -> (n_blocks, 16): element j in the low nibble, j + 16 in the high."""
    return (q[:, :16] | (q[:, 16:] << np.uint8(4))).astype(np.uint8)


def pack_q5(q: np.ndarray) -> np.ndarray:
    """Codes (n_blocks, 32) uint8 in 0..31 -> Q5_0/Q5_1's qh u32 (bit j: the fifth bit of element j) then qs[16]."""
    qh = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    qh = np.bitwise_or.reduce(qh, axis=1).astype("<u4").reshape(-1, 1).view(np.uint8)
    return np.concatenate([qh, pack_q4(q & np.uint8(15))], axis=1)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)


def _rows_of_blocks(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Blocks (N, block_bytes) of rows of `shape` -> (..., n // GROUP * block_bytes)."""
    return out.reshape(*shape[:-1], shape[-1] // GROUP * out.shape[1])


def _encode_q4_0(x: np.ndarray) -> np.ndarray:
    # quantize_row_q4_0_ref: d = max / -8 where max is the signed value of largest magnitude.
    b = _blocks(x)
    imax = np.abs(b).argmax(axis=1)[:, None]
    mx = np.take_along_axis(b, imax, axis=1)
    d = mx / np.float32(-8)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    q = np.trunc(b * inv + np.float32(8.5)).astype(np.float32)
    q = np.clip(q, 0, 15).astype(np.uint8)
    return _rows_of_blocks(np.concatenate([d.astype(np.float16).view(np.uint8), pack_q4(q)], axis=1), x.shape)


def _encode_q4_1(x: np.ndarray) -> np.ndarray:
    # quantize_row_q4_1_ref: d = (max - min) / 15, m = min.
    b = _blocks(x)
    lo = b.min(axis=1, keepdims=True)
    hi = b.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    q = np.trunc((b - lo) * inv + np.float32(0.5)).astype(np.float32)
    q = np.clip(q, 0, 15).astype(np.uint8)
    out = np.concatenate(
        [d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8), pack_q4(q)], axis=1
    )
    return _rows_of_blocks(out, x.shape)


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    # quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) (half away from zero).
    b = _blocks(x)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    v = b * inv
    a = np.abs(v)
    fl = np.floor(a)  # roundf without the float error of floor(a + 0.5)
    q = (np.sign(v) * (fl + np.floor(np.float32(2) * (a - fl)))).astype(np.int8)
    return _rows_of_blocks(np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1), x.shape)


def _encode_q5_0(x: np.ndarray) -> np.ndarray:
    # quantize_row_q5_0_ref: d = max / -16 where max is the signed value of largest magnitude, q = (int8)(x/d + 16.5)
    b = _blocks(x)
    imax = np.abs(b).argmax(axis=1)[:, None]
    d = np.take_along_axis(b, imax, axis=1) / np.float32(-16)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    q = np.minimum(np.trunc(b * inv + np.float32(16.5)), 31).astype(np.uint8)
    return _rows_of_blocks(np.concatenate([d.astype(np.float16).view(np.uint8), pack_q5(q)], axis=1), x.shape)


def _encode_q5_1(x: np.ndarray) -> np.ndarray:
    # quantize_row_q5_1_ref: d = (max - min) / 31, m = min, q = (uint8)((x - min)/d + 0.5).
    b = _blocks(x)
    lo = b.min(axis=1, keepdims=True)
    d = (b.max(axis=1, keepdims=True) - lo) / np.float32(31)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    q = np.trunc((b - lo) * inv + np.float32(0.5)).astype(np.uint8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8), pack_q5(q)],
                         axis=1)
    return _rows_of_blocks(out, x.shape)


def _super_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % 256:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of 256")
    return x.reshape(-1, x.shape[-1])


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    from .kquants import encode_k  # quantize_row_q4_K_ref

    return encode_k(_super_rows(x), 15, None).reshape(*x.shape[:-1], -1)


def _encode_q5_k(x: np.ndarray) -> np.ndarray:
    from .kquants import encode_k  # quantize_row_q5_K_ref

    return encode_k(_super_rows(x), 31, None).reshape(*x.shape[:-1], -1)


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    from .kquants import encode_q6_k  # quantize_row_q6_K_ref

    return encode_q6_k(_super_rows(x), None).reshape(*x.shape[:-1], -1)


def _block_rows(raw: np.ndarray, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(..., n_blocks * block_bytes) bytes -> (blocks (N, block_bytes), d (N, 1) float32)."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    return b, b[:, 0:2].copy().view(np.float16).astype(np.float32)


def _decode_q4_0(raw: np.ndarray, n: int) -> np.ndarray:
    b, d = _block_rows(raw, 18)
    return (d * (_unpack_nibbles(b[:, 2:]).astype(np.float32) - 8)).reshape(*raw.shape[:-1], n)


def _decode_q4_1(raw: np.ndarray, n: int) -> np.ndarray:
    b, d = _block_rows(raw, 20)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (d * _unpack_nibbles(b[:, 4:]).astype(np.float32) + m).reshape(*raw.shape[:-1], n)


def _decode_q8_0(raw: np.ndarray, n: int) -> np.ndarray:
    b, d = _block_rows(raw, 34)
    return (d * b[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(*raw.shape[:-1], n)


# --- GGUF types kept in GGUF's rows (formats.ROWS) --------------------------------------------------------

IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _halves(b: np.ndarray, off: int) -> np.ndarray:
    """The fp16 field at byte off of every block (N, block_bytes) -> (N, 1) float32."""
    return b[:, off : off + 2].copy().view(np.float16).astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(N, k * 32) bytes -> (N, 2k, 32): for each 32 bytes, the low nibbles then the high ones (K-quant order)."""
    q = qs.reshape(qs.shape[0], -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(15)).reshape(qs.shape[0], -1, 32)


def _fifth_bit(b: np.ndarray, off: int) -> np.ndarray:
    """The little-endian u32 qh at byte off of each Q5_0/Q5_1 block -> (N, 32) bit j of qh << 4, as uint8."""
    qh = b[:, off : off + 4].copy().view("<u4")
    return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes (N, 12) -> 6-bit (scale, min) (N, 8) each (get_scale_min_k4)."""
    lo, mid, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    s = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return s.astype(np.float32), m.astype(np.float32)


def _decode_q5_0(raw: np.ndarray, n: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 22)
    q = np.concatenate([b[:, 6:] & np.uint8(15), b[:, 6:] >> np.uint8(4)], axis=1) | _fifth_bit(b, 2)
    return (_halves(b, 0) * (q.astype(np.float32) - np.float32(16))).reshape(*raw.shape[:-1], n)


def _decode_q5_1(raw: np.ndarray, n: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 24)
    q = np.concatenate([b[:, 8:] & np.uint8(15), b[:, 8:] >> np.uint8(4)], axis=1) | _fifth_bit(b, 4)
    return (_halves(b, 0) * q.astype(np.float32) + _halves(b, 2)).reshape(*raw.shape[:-1], n)


def _decode_k(raw: np.ndarray, n: int, bb: int) -> np.ndarray:
    """Q4_K (bb 144) and Q5_K (bb 176): w = (d * sc) * q - dmin * m per sub-block of 32."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, bb)
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles32(b[:, bb - 128 :])  # (N, 8, 32)
    if bb == 176:
        q = q | ((b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)) << np.uint8(4)
    d = (_halves(b, 0) * sc)[..., None]
    dm = (_halves(b, 2) * mn)[..., None]
    return (d * q.astype(np.float32) - dm).reshape(*raw.shape[:-1], n)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 2-bit codes (N, 64) bytes -> (N, 256): element 128 h + 32 j + l is bits 2j of qs[32 h + l]."""
    q = qs.reshape(qs.shape[0], 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & np.uint8(3)).reshape(qs.shape[0], 256)


def _decode_q2_k(raw: np.ndarray, n: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 84)
    N = b.shape[0]
    dl = _halves(b, 80) * (b[:, :16] & np.uint8(15)).astype(np.float32)  # (N, 16)
    ml = _halves(b, 82) * (b[:, :16] >> np.uint8(4)).astype(np.float32)
    q = _crumbs(b[:, 16:80]).reshape(N, 16, 16).astype(np.float32)
    return (dl[..., None] * q - ml[..., None]).reshape(*raw.shape[:-1], n)


def _decode_q3_k(raw: np.ndarray, n: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 110)
    N = b.shape[0]
    s = np.arange(16)
    lo = (b[:, 96 + s % 8] >> (4 * (s // 8)).astype(np.uint8)) & np.uint8(15)
    hi = (b[:, 104 + s % 4] >> (2 * (s // 4)).astype(np.uint8)) & np.uint8(3)
    dl = _halves(b, 108) * ((lo | (hi << np.uint8(4))).astype(np.int32) - 32).astype(np.float32)  # (N, 16)
    h = (b[:, None, :32] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)  # element 32 k + l
    q = _crumbs(b[:, 32:96]).astype(np.int32) - 4 * (1 - h.reshape(N, 256).astype(np.int32))
    return (dl[..., None] * q.reshape(N, 16, 16).astype(np.float32)).reshape(*raw.shape[:-1], n)


def _decode_q6_k(raw: np.ndarray, n: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 210)
    N = b.shape[0]
    # element e = 128 h + p: low nibbles from ql[64 h + p % 64] >> 4 (p // 64), high bits from qh[32 h + p % 32]
    ql = (b[:, :128].reshape(N, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
    qh = (b[:, 128:192].reshape(N, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = (ql.reshape(N, 256) | (qh.reshape(N, 256) << np.uint8(4))).astype(np.float32) - np.float32(32)
    d = _halves(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)  # (N, 16)
    return (d[..., None] * q.reshape(N, 16, 16)).reshape(*raw.shape[:-1], n)


def _decode_iq4_nl(raw: np.ndarray, n: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 18)
    q = np.concatenate([b[:, 2:] & np.uint8(15), b[:, 2:] >> np.uint8(4)], axis=1)
    return (_halves(b, 0) * IQ4_VALUES[q].astype(np.float32)).reshape(*raw.shape[:-1], n)


def _decode_iq4_xs(raw: np.ndarray, n: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 136)
    N = b.shape[0]
    sh = b[:, 2:4].copy().view("<u2").astype(np.int32)  # (N, 1)
    j = np.arange(8)
    ls = ((b[:, 4 + j // 2] >> (4 * (j % 2)).astype(np.uint8)) & 15).astype(np.int32) | (((sh >> (2 * j)) & 3) << 4)
    dl = _halves(b, 0) * (ls - 32).astype(np.float32)  # (N, 8)
    qs = b[:, 8:].reshape(N, 8, 16)
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=2)  # (N, 8, 32)
    return (dl[..., None] * IQ4_VALUES[q].astype(np.float32)).reshape(*raw.shape[:-1], n)


def _decode_bf16(raw: np.ndarray, n: int) -> np.ndarray:
    h = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << np.uint32(16)
    return h.view(np.float32).reshape(*raw.shape[:-1], n)


def gguf_rows_finite(raw: np.ndarray, fmt: Format) -> bool:
    """Every fp16 field of a gguf_rows format's blocks (every value of BF16) is finite."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, fmt.block_bytes)
    if not fmt.half_fields:  # bf16: exponent all ones is inf or nan
        return not np.any((b.view(np.uint16) & 0x7F80) == 0x7F80)
    return all(np.isfinite(b[:, o : o + 2].copy().view(np.float16)).all() for o in fmt.half_fields)


def quantize_blocks(x: np.ndarray, fmt: Format) -> np.ndarray:
    """Quantize rows of x (..., n) into GGUF block bytes (..., n // 32 * block_bytes), as llama.cpp's reference."""
    if not fmt.quantized or fmt.codec.encode is None:
        raise ValueError(f"lmcli does not write {fmt.name} blocks")
    return fmt.codec.encode(x)


def dequantize_blocks(raw: np.ndarray, fmt: Format, n: int) -> np.ndarray:
    """GGUF block bytes (..., n // 32 * block_bytes) -> float32 (..., n)."""
    if not fmt.quantized:
        raise ValueError(f"{fmt.name} is not a block format")
    return fmt.codec.decode(raw, n)


# --- interleaved layout -------------------------------------------------------------------------


def _pad_rows(a: np.ndarray, n_tiles: int) -> np.ndarray:
    n_out = a.shape[0]
    if n_out == n_tiles * TILE:
        return a
    pad = np.zeros((n_tiles * TILE - n_out, *a.shape[1:]), dtype=a.dtype)
    return np.concatenate([a, pad], axis=0)


def interleave(raw: np.ndarray, fmt: Format, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major GGUF data of one matrix -> (codes, scales) in the interleaved layout.

    raw: for block formats (n_out, n_in // 32 * block_bytes) uint8; for F16/F32 (n_out, n_in) of that dtype.
    codes: (n_tiles, n_groups, code_bytes, TILE) in the tile layout (_tile_words), or (n_tiles, n_in, TILE) for
    F16/F32.
    scales: (n_tiles, n_groups, scale_count, TILE) uint16 fp16 bits (empty for F16/F32).
    """
    n_tiles = (n_out + TILE - 1) // TILE
    n_groups = n_in // GROUP
    if fmt.gguf_rows:  # GGUF's rows as they are, zero rows padding the last tile; no separate scales
        a = _pad_rows(np.ascontiguousarray(raw, dtype=np.uint8).reshape(n_out, fmt.row_nbytes(n_in)), n_tiles)
        return a.reshape(fmt.codes_shape(n_out, n_in)), np.zeros((0, 1, 1, TILE), np.uint16)
    if not fmt.quantized:
        a = _pad_rows(np.ascontiguousarray(raw).view(fmt.code_dtype).reshape(n_out, n_in), n_tiles)
        codes = np.ascontiguousarray(a.reshape(n_tiles, TILE, n_in).transpose(0, 2, 1))
        return codes, np.zeros((0, 1, 1, TILE), np.uint16)  # no scales; 4-D so kernels type uniformly
    bb = fmt.block_bytes
    b = _pad_rows(np.ascontiguousarray(raw, dtype=np.uint8).reshape(n_out, n_groups, bb), n_tiles)
    b = b.reshape(n_tiles, TILE, n_groups, bb)
    hdr = 2 * fmt.scale_count
    codes = fmt.codec.tile(b[..., hdr:])  # (n_tiles, n_groups, code_bytes, TILE)
    sc = np.ascontiguousarray(b[..., :hdr]).view(np.uint16)  # (n_tiles, TILE, n_groups, scale_count)
    scales = np.ascontiguousarray(sc.transpose(0, 2, 3, 1))  # (n_tiles, n_groups, scale_count, TILE)
    return codes, scales


# Codes of one (tile, group), 4-bit and 8-bit alike: [u][k 0..3][r 0..15][b 0..3], row R = 16k + r: one 32-bit
# word per (u, row), and a 64-byte load covers 16 rows; the loads of a group run in address order. The word
# holds the weights that meet the activation pairs (x[j], x[j+16]) in the pairwise int16 multiply-add:
#   4-bit (u < 4): bytes 0, 1 elements 4u..4u+3, bytes 2, 3 elements 4u+16..4u+19 (low nibble first), so
#         (word >> 4s) & 0x000F000F is the pair (element j, element j+16), j = 4u + s;
#   8-bit (u < 8): bytes (e[2u], e[2u+1], e[2u+16], e[2u+17]); as two int16, (w << 8) >> 8 (arithmetic) is the
#         pair for j = 2u, w >> 8 the pair for j = 2u + 1.


def _tile_words(nb: np.ndarray) -> np.ndarray:
    """Per-row words (n_tiles, TILE, n_groups, U, 4) -> codes (n_tiles, n_groups, 4 U, TILE) in the layout above."""
    nt, _, ng, U, _ = nb.shape
    w = nb.reshape(nt, 4, 16, ng, U, 4).transpose(0, 3, 4, 1, 2, 5)  # (tile, group, u, k, r, b)
    return np.ascontiguousarray(w).reshape(nt, ng, 4 * U, TILE)


def _row_words(codes: np.ndarray, U: int) -> np.ndarray:
    """Inverse of _tile_words."""
    nt, ng = codes.shape[:2]
    w = codes.view(np.uint8).reshape(nt, ng, U, 4, 16, 4).transpose(0, 3, 4, 1, 2, 5)
    return w.reshape(nt, TILE, ng, U, 4)


def _q4_tile(qs: np.ndarray) -> np.ndarray:
    """GGUF nibble bytes (n_tiles, TILE, n_groups, 16) (byte j: element j low, j + 16 high) -> codes."""
    nt, _, ng, _ = qs.shape
    lo = (qs & np.uint8(15)).reshape(nt, TILE, ng, 4, 4)  # [.., u, i]: element 4u + i
    hi = (qs >> np.uint8(4)).reshape(nt, TILE, ng, 4, 4)  # element 4u + i + 16
    return _tile_words(np.stack([lo[..., 0] | (lo[..., 1] << 4), lo[..., 2] | (lo[..., 3] << 4),
                                 hi[..., 0] | (hi[..., 1] << 4), hi[..., 2] | (hi[..., 3] << 4)], axis=-1))


def _q4_rows(codes: np.ndarray) -> np.ndarray:
    """Inverse of _q4_tile -> GGUF nibble bytes (n_tiles, TILE, n_groups, 16)."""
    nb = _row_words(codes, 4)
    lo = np.stack([nb[..., 0] & 15, nb[..., 0] >> 4, nb[..., 1] & 15, nb[..., 1] >> 4], axis=-1)
    hi = np.stack([nb[..., 2] & 15, nb[..., 2] >> 4, nb[..., 3] & 15, nb[..., 3] >> 4], axis=-1)
    return (lo | (hi << 4)).astype(np.uint8).reshape(*nb.shape[:3], 16)


def _q8_tile(qs: np.ndarray) -> np.ndarray:
    """GGUF int8 codes as bytes (n_tiles, TILE, n_groups, 32) -> codes (int8)."""
    nt, _, ng, _ = qs.shape
    pairs = np.concatenate([qs[..., :16].reshape(nt, TILE, ng, 8, 2), qs[..., 16:].reshape(nt, TILE, ng, 8, 2)],
                           axis=-1)
    return _tile_words(pairs).view(np.int8)


def _q8_rows(codes: np.ndarray) -> np.ndarray:
    """Inverse of _q8_tile -> bytes (n_tiles, TILE, n_groups, 32)."""
    nb = _row_words(codes, 8)
    lead = nb.shape[:3]
    return np.concatenate([nb[..., :2].reshape(*lead, 16), nb[..., 2:].reshape(*lead, 16)], axis=-1)


def deinterleave(codes: np.ndarray, scales: np.ndarray, fmt: Format, n_out: int, n_in: int) -> np.ndarray:
    """Inverse of interleave: back to row-major GGUF data (bytes for block formats)."""
    n_tiles = codes.shape[0]
    if fmt.gguf_rows:
        return np.ascontiguousarray(codes.reshape(n_tiles * TILE, -1)[:n_out])
    if not fmt.quantized:
        a = codes.transpose(0, 2, 1).reshape(n_tiles * TILE, n_in)[:n_out]
        return np.ascontiguousarray(a)
    c = fmt.codec.untile(codes)  # (n_tiles, TILE, n_groups, code_bytes)
    s = scales.transpose(0, 3, 1, 2).copy().view(np.uint8)  # (n_tiles, TILE, n_groups, 2 * scale_count)
    b = np.concatenate([s, c], axis=-1).reshape(n_tiles * TILE, -1)[:n_out]
    return np.ascontiguousarray(b)


def dequantize_interleaved(codes: np.ndarray, scales: np.ndarray, fmt: Format, n_out: int, n_in: int) -> np.ndarray:
    """Reference dequantization of an interleaved matrix -> float32 (n_out, n_in)."""
    return fmt.codec.decode(deinterleave(codes, scales, fmt, n_out, n_in), n_in)


def quantize_matrix(w: np.ndarray, fmt: Format, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float matrix (n_out, n_in) -> interleaved (codes, scales) in fmt. A value beyond what the format's 16-bit
    scales (or, for f16, values) hold is a ConvertError, never an infinite scale written silently.
    importance (n_in,): round as llama.cpp does with an importance matrix (quant.imatrix) where fmt takes one."""
    n_out, n_in = w.shape
    if importance is not None:
        from . import imatrix

        raw = imatrix.encode(w, fmt, importance) if imatrix.weighted(fmt) else fmt.codec.encode(w)
    else:
        raw = fmt.codec.encode(w)
    codes, scales = interleave(raw, fmt, n_out, n_in)
    halves = scales if fmt.quantized else codes if fmt.bits == 16 else None
    if (not gguf_rows_finite(raw, fmt) if fmt.gguf_rows else
            halves is not None and halves.size and not np.isfinite(halves.view(np.float16)).all()):
        what = "scales" if fmt.quantized else "values"
        raise ConvertError(f"values up to {float(np.max(np.abs(w))):.4g} overflow {fmt.name}'s 16-bit {what} "
                           "(a larger scale or a wider type is needed: try --type q8_0)")
    return codes, scales


# --- the codec of each format (formats.Format.codec_name) ----------------------------------------------


def _encode_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _decode_f32(raw: np.ndarray, n: int) -> np.ndarray:
    return raw.astype(np.float32)


def _encode_f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)  # fp16 bits


def _decode_f16(raw: np.ndarray, n: int) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


F32_CODEC = Codec(_encode_f32, _decode_f32)
F16_CODEC = Codec(_encode_f16, _decode_f16)
Q4_0_CODEC = Codec(_encode_q4_0, _decode_q4_0, _q4_tile, _q4_rows)
Q4_1_CODEC = Codec(_encode_q4_1, _decode_q4_1, _q4_tile, _q4_rows)
Q8_0_CODEC = Codec(_encode_q8_0, _decode_q8_0, _q8_tile, _q8_rows)
Q5_0_CODEC = Codec(_encode_q5_0, _decode_q5_0)
Q5_1_CODEC = Codec(_encode_q5_1, _decode_q5_1)
Q2_K_CODEC = Codec(None, _decode_q2_k)
Q3_K_CODEC = Codec(None, _decode_q3_k)
Q4_K_CODEC = Codec(_encode_q4_k, lambda raw, n: _decode_k(raw, n, 144))
Q5_K_CODEC = Codec(_encode_q5_k, lambda raw, n: _decode_k(raw, n, 176))
Q6_K_CODEC = Codec(_encode_q6_k, _decode_q6_k)
IQ4_NL_CODEC = Codec(None, _decode_iq4_nl)
IQ4_XS_CODEC = Codec(None, _decode_iq4_xs)
BF16_CODEC = Codec(None, _decode_bf16)


def _gguf_quants(gguf_type: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """The low-bit IQ types' reference: gguf.quants' own dequantization (their codebooks are gguf's data)."""

    def decode(raw: np.ndarray, n: int) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        return dequantize(raw, GGMLQuantizationType(gguf_type)).astype(np.float32).reshape(*raw.shape[:-1], n)

    return decode


IQ2_XXS_CODEC = Codec(None, _gguf_quants(16))
IQ2_XS_CODEC = Codec(None, _gguf_quants(17))
IQ3_XXS_CODEC = Codec(None, _gguf_quants(18))
IQ1_S_CODEC = Codec(None, _gguf_quants(19))
