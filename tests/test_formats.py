"""Each weight format is complete (codec, kernels, GGUF mapping) and its numpy codec is GGUF's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gq

from quant import kernels
from quant.formats import BY_GGUF_TYPE, FORMATS, GROUP, ROWS, TILE, matrix_parts
from quant.quantize import (Codec, deinterleave, dequantize_blocks, dequantize_interleaved, interleave,
                            quantize_blocks, quantize_matrix)

ALL = list(FORMATS.values())
BLOCK = [f for f in ALL if f.quantized and not f.gguf_rows]  # the block formats lmcli writes


def _data(rng, n_out, n_in):
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[1, 5] = 40.0  # an outlier
    w[2, :32] = -1.5  # a constant block (Q4_1 d = 0)
    return w


def _qt(fmt) -> GGMLQuantizationType:
    return GGMLQuantizationType(fmt.gguf_type)


def _random_rows(rng, fmt, n_out, n_in) -> np.ndarray:
    """GGUF data of a gguf_rows format as llama.cpp's files hold it: random code and scale bytes, with finite fp16
    scales of a sane size (some zero, some negative) and, for BF16, the bfloat16 halves of normal floats."""
    if not fmt.half_fields:
        v = rng.standard_normal((n_out, n_in)).astype(np.float32)
        return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_out, -1)
    raw = rng.integers(0, 256, (n_out, fmt.row_nbytes(n_in)), dtype=np.uint8)
    b = raw.reshape(-1, fmt.block_bytes)
    for o in fmt.half_fields:
        h = (rng.standard_normal((b.shape[0], 1)) * 0.02).astype(np.float16)
        h[::7] = 0  # d = 0 (an all-zero block) and dmin = 0
        b[:, o : o + 2] = h.view(np.uint8)
    return raw


def _matrix(rng, fmt, n_out, n_in):
    """(codes, scales) of an (n_out, n_in) matrix in fmt and its weights as gguf.quants dequantizes them."""
    if fmt.gguf_rows:
        raw = _random_rows(rng, fmt, n_out, n_in)
        return (*interleave(raw, fmt, n_out, n_in), gq.dequantize(raw, _qt(fmt)))
    codes, scales = quantize_matrix(_data(rng, n_out, n_in), fmt)
    return codes, scales, dequantize_interleaved(codes, scales, fmt, n_out, n_in)


# --- the codec against gguf.quants (llama.cpp's reference rounding) ---------------------------------------


@pytest.mark.parametrize("fmt", BLOCK, ids=lambda f: f.name)
def test_quantize_is_bit_exact_with_gguf_quants(fmt):
    w = _data(np.random.default_rng(1), 67, 256)
    ours = quantize_blocks(w, fmt)
    ref = gq.quantize(w, _qt(fmt))
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("fmt", BLOCK, ids=lambda f: f.name)
def test_dequantize_equals_gguf_quants(fmt):
    w = _data(np.random.default_rng(2), 40, 128)
    raw = gq.quantize(w, _qt(fmt))
    assert np.array_equal(dequantize_blocks(raw, fmt, 128), gq.dequantize(raw, _qt(fmt)))


@pytest.mark.parametrize("fmt", [f for f in ALL if not f.gguf_rows], ids=lambda f: f.name)
@pytest.mark.parametrize("n_out", [64, 100])
def test_matrix_codec_round_trips_as_gguf_quants(fmt, n_out):
    """Format.codec through the interleaved layout: encode -> interleave -> decode equals gguf.quants'
    quantize -> dequantize of the same matrix (float formats included: GGUF's F16/F32 are plain casts)."""
    w = _data(np.random.default_rng(3), n_out, 96)
    raw = gq.quantize(w, _qt(fmt))
    assert np.array_equal(np.ascontiguousarray(fmt.codec.encode(w)).view(np.uint8), raw.view(np.uint8))
    codes, scales = quantize_matrix(w, fmt)
    assert codes.shape == fmt.codes_shape(n_out, 96) and codes.dtype == np.dtype(fmt.code_dtype)
    assert codes.nbytes + scales.nbytes == sum(matrix_parts(fmt, n_out, 96))
    assert np.array_equal(dequantize_interleaved(codes, scales, fmt, n_out, 96), gq.dequantize(raw, _qt(fmt)))


@pytest.mark.parametrize("fmt", ROWS, ids=lambda f: f.name)
@pytest.mark.parametrize("n_out", [1, 37, 64, 129])
def test_gguf_rows_codec_equals_gguf_quants_and_keeps_the_bytes(fmt, n_out):
    """Imported-only types: the numpy decoder equals gguf.quants bit for bit on random blocks (odd row counts, rows
    of several blocks), and the container layout keeps GGUF's bytes (interleave -> deinterleave is the identity)."""
    n_in = 3 * fmt.block_size if fmt.block_size > 1 else 70
    raw = _random_rows(np.random.default_rng(n_out), fmt, n_out, n_in)
    ref = gq.dequantize(raw, _qt(fmt))
    assert np.array_equal(dequantize_blocks(raw, fmt, n_in), ref)
    codes, scales = interleave(raw, fmt, n_out, n_in)
    assert codes.shape == fmt.codes_shape(n_out, n_in)
    assert codes.nbytes + scales.nbytes == sum(matrix_parts(fmt, n_out, n_in))
    assert np.array_equal(deinterleave(codes, scales, fmt, n_out, n_in), raw)
    assert np.array_equal(dequantize_interleaved(codes, scales, fmt, n_out, n_in), ref)
    assert not codes.reshape(-1)[raw.size :].any()  # padding rows are zero bytes (they decode to 0)


@pytest.mark.parametrize("fmt", ROWS, ids=lambda f: f.name)
@pytest.mark.parametrize("T", [1, 2, 17])
def test_gguf_rows_matmul_matches_float64_of_gguf_dequantization(fmt, T):
    """One token (decode: the K-quants dot their blocks without decoding them) and several (prefill: rows decoded
    once), against float64 numpy of gguf.quants' weights; 131 rows (not whole tiles)."""
    rng = np.random.default_rng(T)
    n_out, n_in = 131, 2 * max(GROUP, fmt.row_multiple)
    codes, _, wd = _matrix(rng, fmt, n_out, n_in)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    out = np.full((T, n_out), np.nan, np.float32)
    fmt.matmul(codes, fmt.kind, x, out)
    ref = x.astype(np.float64) @ wd.T.astype(np.float64)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


# the GGUF row types lmcli also writes (llama.cpp's encoders: quant.quantize, quant.kquants, tests/test_kquants.py)
WRITTEN_ROWS = {"q5_0", "q5_1", "q4_k", "q5_k", "q6_k"}


@pytest.mark.parametrize("fmt", [f for f in ROWS if f.name not in WRITTEN_ROWS], ids=lambda f: f.name)
def test_gguf_rows_formats_lmcli_only_imports_refuse_to_encode(fmt):
    with pytest.raises(ValueError, match="does not write"):
        quantize_blocks(np.zeros((1, 256), np.float32), fmt)


# --- every format has every part ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_format_has_its_gguf_mapping(fmt):
    qt = _qt(fmt)  # raises for an id gguf does not know
    assert qt.name.lower() == fmt.name
    assert BY_GGUF_TYPE[fmt.gguf_type] is fmt
    assert GGML_QUANT_SIZES[qt] == (fmt.block_size, fmt.block_bytes)
    up = fmt.name.upper()  # a K-quant's file type is its _M mix (Q4_K_M: mostly Q4_K)
    assert LlamaFileType(fmt.file_type).name in (f"MOSTLY_{up}", f"ALL_{up}", f"MOSTLY_{up}_M")
    n = 4 * max(GROUP, fmt.row_multiple)
    assert fmt.row_nbytes(n) * 8 == n * fmt.bits


def test_formats_are_told_apart_by_every_id():
    for field in ("name", "gguf_type", "file_type", "kind"):
        assert len({getattr(f, field) for f in ALL}) == len(ALL), field


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_format_has_its_codec_and_kernels(fmt):
    """A half-defined format fails here: codec parts, the matmul and the any-format kernels (embed_rows, the
    expert kernels, by fmt.kind) must all exist and agree with the codec's dequantization."""
    assert isinstance(fmt.codec, Codec) and fmt.codec.decode
    assert (fmt.codec.encode is not None) == (not fmt.gguf_rows or fmt.name in WRITTEN_ROWS)
    assert (fmt.codec.tile is not None and fmt.codec.untile is not None) == (fmt.quantized and not fmt.gguf_rows)
    rng = np.random.default_rng(5)
    n_out, n_in, T = 130, max(64, 2 * fmt.row_multiple), 3
    codes, scales, wd = _matrix(rng, fmt, n_out, n_in)

    x = rng.standard_normal((T, n_in)).astype(np.float32)
    xq, xd = np.empty((T, n_in), np.int16), np.empty((T, n_in // GROUP), np.float32)
    xs = np.empty((T, n_in // GROUP), np.int32)
    kernels.quantize_act(x, xq, xd, xs)
    out = np.full((T, n_out), np.nan, np.float32)
    if fmt.int_act:
        fmt.matmul(codes, scales, xq, xd, xs, out)
    elif fmt.gguf_rows:
        fmt.matmul(codes, fmt.kind, x, out)
    else:
        fmt.matmul(codes, x, out)
    ref = x.astype(np.float64) @ wd.T.astype(np.float64)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()

    ids = np.array([0, 1, 63, 64, 129], np.int64)
    rows = np.empty((len(ids), n_in), np.float32)
    kernels.embed_rows(codes.reshape(-1).view(np.uint8), scales, fmt.kind, ids, rows)
    assert np.array_equal(rows, wd[ids])

    # one expert whose bundle is this matrix, at byte 0 of a buffer, as the engine lays experts out
    buf8 = np.zeros(codes.nbytes + scales.nbytes + 64, np.uint8)
    buf8[: codes.nbytes] = codes.reshape(-1).view(np.uint8)
    buf8[codes.nbytes : codes.nbytes + scales.nbytes] = scales.reshape(-1).view(np.uint8)
    coff, soff = np.array([0], np.int64), np.array([codes.nbytes], np.int64)
    sel, tok_ptr = np.array([0], np.int64), np.array([0, T], np.int64)
    y = np.full((T, n_out), np.nan, np.float32)
    kernels.moe_down(buf8, buf8.view(np.uint16), buf8.view(np.float32), fmt.kind, n_out, n_in, coff, soff, sel,
                     tok_ptr, xq, xd, xs, x, y)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    if fmt.expert_rows:
        y = np.full((T, n_out), np.nan, np.float32)
        kernels.moe_down_rows(buf8, buf8.view(np.uint16), fmt.kind, n_out, n_in, coff, soff, sel, tok_ptr,
                              xq, xd, xs, x, y)
        assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_importing_formats_loads_no_kernels():
    """The table is read at import by the CLI; codecs and kernels resolve on first use."""
    import subprocess
    import sys

    code = "import sys, quant.formats; print('numba' in sys.modules, 'numpy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "False"]


def test_interleaved_codes_keep_their_tile_count():
    for fmt in ALL:
        assert fmt.codes_shape(130, 64)[0] == (130 + TILE - 1) // TILE


def test_the_kernels_gguf_row_table_is_the_formats_geometry():
    """quant.kernels keeps the gguf_rows types' row sizes as literals (Numba's cache is keyed by kernels.py's own
    source, so a table read from quant.formats could go stale in a cache): they must equal the formats'."""
    from quant import kernels

    for fmt in FORMATS.values():
        assert bool(kernels.is_gguf_rows(fmt.kind)) == fmt.gguf_rows, fmt.name
        for n in (fmt.block_size, 256 * 3, 256 * 11):
            if fmt.gguf_rows and n % fmt.block_size == 0:
                assert kernels.gguf_row_nbytes(fmt.kind, n) == fmt.row_nbytes(n), (fmt.name, n)
