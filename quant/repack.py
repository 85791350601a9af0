"""GGUF rows (Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) repacked at load time into tiles for
quant.kernels.matmul_tiles.

The container keeps these types as GGUF's own blocks (quant.formats.ROWS: lossless import, byte-exact export); a
dense matrix in one of them is repacked here into anonymous RAM once, as llama.cpp repacks Q4_0/Q4_K for its
CPU kernels, so that it is multiplied like Q4_0/Q8_0: 64 rows side by side per group of 32 weights, int16
activations, exact integer multiply-adds. Nothing is rounded: the repacked codes and scales are the file's
(codes q as 4-bit words, 6-bit scales and mins as bytes, fp16 d as fp16), and a weight is the same float32
product d * sc * q - dmin * m as gguf.quants' dequantization. The IQ4 types keep their 4-bit indices: the kernels
map them through the codebook (IQ4_NL's kvalues, int8) in registers, so a weight costs the file's 4 bits, not 8.

Layouts, per tile of TILE = 64 rows (row r of the tile in lane r; words as quant.quantize._tile_words):
  q5_0  codes (n_tiles, 20 n_groups, TILE) uint8: per group the 4-bit words of the low nibbles (quantize._q4_tile)
        then one 32-bit word per row of qh (bit j the fifth bit of element j); scales (n_tiles, n_groups, TILE)
        fp16 d. w = d (q - 16).
  q5_1  codes as q5_0; scales (n_tiles, 2 n_groups, TILE): per group d[64 rows], m[64 rows] (fp16). w = d q + m.
  q4_k  codes (n_tiles, 16 n_groups, TILE) uint8: per group (a 32-weight sub-block) its 4-bit words; scales
        (n_tiles, 10 n_superblocks, TILE) uint16: per super-block of 256 weights d, dmin (fp16), then per group
        the bytes sc[64 rows], m[64 rows]. w = (d sc) q - (dmin m).
  q5_k  codes as q5_0 (the qh word of group j of a super-block: bit l = bit j of the block's qh[l]); scales as
        q4_k. w = (d sc) q - (dmin m).
  q6_k  codes (n_tiles, 32 n_groups, TILE) uint8: per group the 8-bit words (quantize._q8_tile) of q - 32 (int8)
        in slot order SLOTS, so that each int16 lane pairs two weights of one 16-weight sub-block (the kernel
        pairs activations to match, kernels.act_pairs_sub16); scales (n_tiles, 9 n_superblocks, TILE): per
        super-block d (fp16), then per group the int8 scales of its two sub-blocks, sc_lo[64], sc_hi[64].
        w = (d sc) (q - 32).
  q2_k  codes (n_tiles, 8 n_groups, TILE) uint8: per group the two 2-bit words (_crumb_words) of the codes q in slot
        order SLOTS, as q6_k; scales (n_tiles, 10 n_superblocks, TILE): per super-block d, dmin (fp16), then per
        group the file's scale bytes (sc | m << 4) of its two 16-weight sub-blocks, lo[64], hi[64].
        w = (d sc) q - (dmin m); the kernels take the activation sums of each 16 weights (kernels.act_sums16).
  q3_k  codes (n_tiles, 12 n_groups, TILE) uint8: per group the 2-bit words of the low bits, then one 32-bit word per
        row of hmask bits (bit s: slot s), as q5_0's fifth bit; v = low | hmask bit << 2 is q + 4 (the kernels
        subtract 4); scales as q6_k's, the 6-bit scales minus 32 as int8. w = (d sc) q.
  iq4_nl  codes as q4_k (the 4-bit indices i); scales (n_tiles, n_groups, TILE) fp16 d. w = d KVALUES[i].
  iq4_xs  codes as q4_k; scales (n_tiles, 5 n_superblocks, TILE): per super-block d (fp16), then per group the
        int8 sub-block scale ls - 32 of its 64 rows (64 bytes). w = (d (ls - 32)) KVALUES[i].
"""

from __future__ import annotations

import numpy as np

from .formats import GROUP, TILE, Format

# q6_k: slot s of a group holds element SLOTS[s]; slots j and j + 16 (one int16 lane) are elements (j, j + 8) for
# j < 8 (sub-block 0) and (j + 8, j + 16) for 8 <= j < 16 (sub-block 1)
SLOTS = np.r_[0:8, 16:24, 8:16, 24:32]


_q4_tile = _q8_tile = _tile_words = None


def _tile_helpers() -> None:
    """quant.quantize's tile layout helpers, imported on the first repack: a run of a model with no K-quant matrix
    never imports the encoders (tests/test_startup.py)."""
    global _q4_tile, _q8_tile, _tile_words
    if _tile_words is None:
        from .quantize import _q4_tile, _q8_tile, _tile_words  # noqa: F811


def _half(b: np.ndarray) -> np.ndarray:
    """Two bytes (..., 2) -> their little-endian uint16 (...,)."""
    return np.ascontiguousarray(b).view(np.uint16)[..., 0]


def _scale_rows(halves: list[np.ndarray], per_group: np.ndarray) -> np.ndarray:
    """Scales of a super-block layout: halves, each (nt, TILE, nsb) uint16, then per group P bytes per row,
    per_group (nt, TILE, nsb, 8, P) uint8 -> (nt, (len(halves) + 4 P) nsb, TILE) uint16."""
    nt, _, nsb = halves[0].shape
    P = per_group.shape[-1]
    s = np.empty((nt, nsb, len(halves) + 4 * P, TILE), np.uint16)
    for i, h in enumerate(halves):
        s[:, :, i] = h.transpose(0, 2, 1)
    b = np.ascontiguousarray(per_group.transpose(0, 2, 3, 4, 1)).reshape(nt, nsb, 4 * P, 2 * TILE)
    s[:, :, len(halves):] = b.view(np.uint16)
    return s.reshape(nt, -1, TILE)


def _q5(rows: np.ndarray, n_in: int, with_min: bool):
    """Q5_0 (d | qh | qs) or Q5_1 (d | m | qh | qs)."""
    nt, ng = rows.shape[0] // TILE, n_in // GROUP
    o = 4 if with_min else 2  # qh
    b = rows.reshape(nt, TILE, ng, o + 20)
    nib = _q4_tile(np.ascontiguousarray(b[..., o + 4:]))  # the low nibbles are ordered as Q4_0's
    qh = _tile_words(np.ascontiguousarray(b[..., o:o + 4]).reshape(nt, TILE, ng, 1, 4))
    codes = np.concatenate([nib, qh], axis=2).reshape(nt, ng * 20, TILE)
    halves = [_half(b[..., 0:2])] + ([_half(b[..., 2:4])] if with_min else [])
    return codes, np.ascontiguousarray(np.stack(halves, axis=-1).transpose(0, 2, 3, 1)).reshape(nt, -1, TILE)


def _k_scales(s: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K/Q5_K blocks (..., 12) -> (..., 8, 2): per sub-block (sc, m), 6 bits each
    (get_scale_min_k4 of ggml-quants.c)."""
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return np.stack([sc, m], axis=-1)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K qs (nt, TILE, nsb, 128) -> codes of the low 4 bits (nt, 16 n_groups, TILE): sub-block 2 jj is in
    the low nibbles of bytes 32 jj.., 2 jj + 1 in the high ones."""
    nt, _, nsb, _ = qs.shape
    qs = qs.reshape(nt, TILE, nsb, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=4).reshape(nt, TILE, nsb * 8, 32)
    return _q4_tile(q[..., :16] | (q[..., 16:] << 4)).reshape(nt, nsb * 8 * 16, TILE)


def _q4_k(rows: np.ndarray, n_in: int):
    nt, nsb = rows.shape[0] // TILE, n_in // 256
    b = rows.reshape(nt, TILE, nsb, 144)
    return _k_nibbles(b[..., 16:]), _scale_rows([_half(b[..., 0:2]), _half(b[..., 2:4])], _k_scales(b[..., 4:16]))


def _q5_k(rows: np.ndarray, n_in: int):
    nt, nsb = rows.shape[0] // TILE, n_in // 256
    b = rows.reshape(nt, TILE, nsb, 176)
    nib = _k_nibbles(b[..., 48:]).reshape(nt, nsb * 8, 16, TILE)
    bits = (b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (.., sub-block j, element l)
    word = (bits.astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    qh = _tile_words(np.ascontiguousarray(word).view(np.uint8).reshape(nt, TILE, nsb * 8, 1, 4))
    codes = np.concatenate([nib, qh], axis=2).reshape(nt, nsb * 8 * 20, TILE)
    return codes, _scale_rows([_half(b[..., 0:2]), _half(b[..., 2:4])], _k_scales(b[..., 4:16]))


def _iq4_nl(rows: np.ndarray, n_in: int):
    nt, ng = rows.shape[0] // TILE, n_in // GROUP
    b = rows.reshape(nt, TILE, ng, 18)
    codes = _q4_tile(np.ascontiguousarray(b[..., 2:])).reshape(nt, ng * 16, TILE)  # qs ordered as Q4_0's
    return codes, np.ascontiguousarray(_half(b[..., :2]).transpose(0, 2, 1))


def _iq4_xs(rows: np.ndarray, n_in: int):
    nt, nsb = rows.shape[0] // TILE, n_in // 256
    b = rows.reshape(nt, TILE, nsb, 136)
    codes = _q4_tile(np.ascontiguousarray(b[..., 8:]).reshape(nt, TILE, nsb * 8, 16)).reshape(nt, -1, TILE)
    ib = np.arange(8)
    lo = (b[..., 4 + ib // 2] >> (4 * (ib % 2))).astype(np.uint8) & 15
    hi = (_half(b[..., 2:4])[..., None] >> (2 * ib)).astype(np.uint8) & 3
    ls = (lo | (hi << 4)).astype(np.int16) - 32  # dequantize_row_iq4_xs: int8 ls - 32
    return codes, _scale_rows([_half(b[..., 0:2])], ls.astype(np.int8).view(np.uint8)[..., None])


def _q6_k(rows: np.ndarray, n_in: int):
    nt, nsb = rows.shape[0] // TILE, n_in // 256
    b = rows.reshape(nt, TILE, nsb, 210)
    ql = b[..., :128].reshape(nt, TILE, nsb, 2, 2, 32)  # [half h][c][l]: ql[64 h + 32 c + l]
    qh = b[..., 128:192].reshape(nt, TILE, nsb, 2, 32)
    # element 128 h + 32 u + l (dequantize_row_q6_K)
    q = np.stack([(ql[..., 0, :] & 15) | ((qh & 3) << 4), (ql[..., 1, :] & 15) | (((qh >> 2) & 3) << 4),
                  (ql[..., 0, :] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 1, :] >> 4) | (((qh >> 6) & 3) << 4)],
                 axis=4)
    w = (q.astype(np.int16) - 32).astype(np.int8).reshape(nt, TILE, nsb * 8, 32)[..., SLOTS]
    codes = _q8_tile(np.ascontiguousarray(w).view(np.uint8)).view(np.uint8).reshape(nt, nsb * 8 * 32, TILE)
    sc = b[..., 192:208].reshape(nt, TILE, nsb, 8, 2)
    return codes, _scale_rows([_half(b[..., 208:210])], sc)


def _crumb_words(v: np.ndarray) -> np.ndarray:
    """2-bit values in slot order (..., 32) -> (..., 2, 4) bytes of two 32-bit words: word u holds slots 8u..8u+7 in
    its low 16 bits (bits 2s) and slots 8u+16..8u+23 in its high 16 bits, so (word >> 2s) & 0x00030003 is the pair
    (slot j, slot j + 16), j = 8u + s."""
    v = v.astype(np.uint32).reshape(*v.shape[:-1], 2, 2, 8)  # [half][u][s]
    w = (v << (2 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    return np.ascontiguousarray(w[..., 0, :] | (w[..., 1, :] << np.uint32(16))).view(np.uint8).reshape(
        *v.shape[:-3], 2, 4)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K qs (nt, TILE, nsb, 64) -> codes per group (nt, TILE, 8 nsb, 32), slot order: element 128 h + 32 u + l
    is bits 2u of qs[32 h + l] (dequantize_row_q2_K)."""
    nt, _, nsb, _ = qs.shape
    q = (qs.reshape(nt, TILE, nsb, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)) & np.uint8(3)
    return q.reshape(nt, TILE, nsb * 8, 32)[..., SLOTS]


def _q2_k(rows: np.ndarray, n_in: int):
    nt, nsb = rows.shape[0] // TILE, n_in // 256
    b = rows.reshape(nt, TILE, nsb, 84)
    codes = _tile_words(_crumb_words(_crumbs(b[..., 16:80]))).reshape(nt, nsb * 64, TILE)
    return codes, _scale_rows([_half(b[..., 80:82]), _half(b[..., 82:84])], b[..., :16].reshape(nt, TILE, nsb, 8, 2))


def _q3_k(rows: np.ndarray, n_in: int):
    nt, nsb = rows.shape[0] // TILE, n_in // 256
    b = rows.reshape(nt, TILE, nsb, 110)
    low = _tile_words(_crumb_words(_crumbs(b[..., 32:96])))  # (nt, ng, 8, TILE)
    h = (b[..., None, :32] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & np.uint8(1)  # element 32 k + l: group k
    h = h.reshape(nt, TILE, nsb * 8, 32)[..., SLOTS].astype(np.uint32)
    word = (h << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    hw = _tile_words(np.ascontiguousarray(word).view(np.uint8).reshape(nt, TILE, nsb * 8, 1, 4))
    codes = np.concatenate([low, hw], axis=2).reshape(nt, nsb * 8 * 12, TILE)
    s = np.arange(16)
    lo = (b[..., 96 + s % 8] >> (4 * (s // 8)).astype(np.uint8)) & np.uint8(15)
    hi = (b[..., 104 + s % 4] >> (2 * (s // 4)).astype(np.uint8)) & np.uint8(3)
    sc = ((lo | (hi << np.uint8(4))).astype(np.int16) - 32).astype(np.int8).view(np.uint8)
    return codes, _scale_rows([_half(b[..., 108:110])], sc.reshape(nt, TILE, nsb, 8, 2))


_REPACK = {6: lambda r, n: _q5(r, n, False), 7: lambda r, n: _q5(r, n, True), 10: _q2_k, 11: _q3_k, 12: _q4_k,
           13: _q5_k, 14: _q6_k, 20: _iq4_nl, 23: _iq4_xs}
TILED = 100  # kernels.TILED: the expert kernels' kind of a matrix repacked here is TILED + its GGUF type id


def repackable(fmt: Format) -> bool:
    return fmt.gguf_rows and fmt.gguf_type in _REPACK


def repack(fmt: Format, codes: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """A gguf_rows matrix's codes (n_tiles, TILE, row bytes) -> (codes, scales) for kernels.matmul_tiles (numpy:
    the reference that kernels.repack_rows, which the engine runs, is tested against byte for byte)."""
    _tile_helpers()
    rows = np.asarray(codes, dtype=np.uint8).reshape(-1, fmt.row_nbytes(n_in))
    c, s = _REPACK[fmt.gguf_type](rows, n_in)
    return np.ascontiguousarray(c), np.ascontiguousarray(s)


def tiled_rows(fmt: Format, n_in: int) -> tuple[int, int]:
    """(code rows, scale rows) of TILE bytes / uint16 per tile of the repacked layout (kernels.tiled_rows)."""
    ng, nsb = n_in // GROUP, n_in // GROUP // 8
    return {6: (20 * ng, ng), 7: (20 * ng, 2 * ng), 10: (8 * ng, 10 * nsb), 11: (12 * ng, 9 * nsb),
            12: (16 * ng, 10 * nsb), 13: (20 * ng, 10 * nsb),
            14: (32 * ng, 9 * nsb), 20: (16 * ng, ng), 23: (16 * ng, 5 * nsb)}[fmt.gguf_type]


def tiled_parts(fmt: Format, n_out: int, n_in: int) -> tuple[int, int]:
    """Bytes of (codes, scales) of an (n_out, n_in) matrix repacked into tiles."""
    nt = (n_out + TILE - 1) // TILE
    cr, sr = tiled_rows(fmt, n_in)
    return nt * cr * TILE, nt * sr * TILE * 2


def repack_into(fmt: Format, src: np.ndarray, soff: int, n_out: int, n_in: int, dst: np.ndarray, doff: int) -> None:
    """The matrix whose GGUF rows start at byte soff of src (flat uint8) -> its tiles (codes then scales) at byte
    doff of dst (flat uint8, doff even), by kernels.repack_rows."""
    from . import kernels

    kernels.repack_rows(fmt.gguf_type, src, soff, (n_out + TILE - 1) // TILE, n_in, dst, doff)


def repack_matrix(fmt: Format, codes: np.ndarray, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """repack()'s result by kernels.repack_rows (what the engine uses: numpy's temporaries cost 10-30x the time):
    (codes (n_tiles, code rows, TILE) uint8, scales (n_tiles, scale rows, TILE) uint16), one allocation."""
    cb, sb = tiled_parts(fmt, n_out, n_in)
    buf = np.empty(cb + sb, np.uint8)
    repack_into(fmt, np.ascontiguousarray(codes).reshape(-1).view(np.uint8), 0, n_out, n_in, buf, 0)
    nt = (n_out + TILE - 1) // TILE
    return buf[:cb].reshape(nt, -1, TILE), buf[cb:].view(np.uint16).reshape(nt, -1, TILE)
