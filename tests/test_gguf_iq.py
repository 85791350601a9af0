"""GGUF's low-bit codebook types (IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S), which the largest MoEs are published in: imported
losslessly, decoded bit for bit as gguf.quants decodes them, and run as llama.cpp runs the same file.

llama.cpp's quantizer refuses these types without an importance matrix, which its C API takes only as a C++ map; so
the files are made here tensor by tensor with llama.cpp's own ggml_quantize_chunk (importance: the mean square of
random activations) and written with gguf's writer, the rest of the F16 file copied as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import quants as gq
from test_gguf_kquant import (F32_TOL, IDS, census, import_losslessly, lmcli_logits, llama_logits, quantize, rel_err,
                              tiny_f16)  # noqa: F401 (tiny_f16: the module fixture)

llama_cpp = pytest.importorskip("llama_cpp")

IQ = {16: "iq2_xxs", 17: "iq2_xs", 18: "iq3_xxs", 19: "iq1_s"}


def test_codebooks_are_gguf_quants():
    """quant.iq_grids (the kernels' copy, so that a run does not import gguf) equals gguf.quants' grids, and KSIGNS
    its sign table."""
    from quant import iq_grids

    for cls, grid in ((gq.IQ2_XXS, iq_grids.IQ2XXS_GRID), (gq.IQ2_XS, iq_grids.IQ2XS_GRID),
                      (gq.IQ3_XXS, iq_grids.IQ3XXS_GRID), (gq.IQ1_S, iq_grids.IQ1S_GRID)):
        cls.init_grid()
        ref = np.asarray(cls.grid).reshape(cls.grid_shape).astype(np.int64)
        ours = grid.view(np.int8 if cls is gq.IQ1_S else np.uint8).reshape(cls.grid_shape).astype(np.int64)
        assert np.array_equal(ours, ref), cls.__name__
    assert np.array_equal(iq_grids.KSIGNS, np.frombuffer(gq.IQ2_XXS.ksigns, np.uint8))


# the rows kernels' types without a tile layout, and Q2_K/Q3_K, whose routed experts run on them when read through
# the expert cache (one token: dot products on the blocks, _dot_q2_k / _dot_q3_k)
ROWS_ONLY = {**IQ, 10: "q2_k", 11: "q3_k"}


@pytest.mark.parametrize("gtype", list(ROWS_ONLY), ids=list(ROWS_ONLY.values()))
def test_rows_kernels_decode_as_gguf_quants(gtype):
    """kernels.decode_gguf_row (through embed_rows, the engine's lookups) and matmul_gguf_rows (decode and prefill)
    against gguf.quants on random blocks, every byte random but the fp16 scales: bit for bit, and float64 products
    within float32 rounding; odd row counts (a part tile)."""
    from quant import kernels
    from quant.formats import BY_GGUF_TYPE, TILE

    fmt = BY_GGUF_TYPE[gtype]
    rng = np.random.default_rng(gtype)
    n_out, n_in = 70, 768
    raw = rng.integers(0, 256, (n_out, fmt.row_nbytes(n_in)), dtype=np.uint8)
    b = raw.reshape(n_out, n_in // 256, fmt.block_bytes)
    for o in fmt.half_fields:
        b[..., o:o + 2] = (rng.standard_normal(b.shape[:2]) * 0.01).astype(np.float16).view(np.uint8).reshape(
            *b.shape[:2], 2)
    ref = gq.dequantize(raw, GGMLQuantizationType(gtype)).reshape(n_out, n_in)
    nt = (n_out + TILE - 1) // TILE
    codes = np.zeros((nt * TILE, raw.shape[1]), np.uint8)
    codes[:n_out] = raw
    got = np.empty((n_out, n_in), np.float32)
    kernels.embed_rows(codes.reshape(-1), np.zeros((1, 1, 1, 1), np.uint16), gtype, np.arange(n_out), got)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    for T in (1, 3):
        x = rng.standard_normal((T, n_in)).astype(np.float32)
        out = np.empty((T, n_out), np.float32)
        kernels.matmul_gguf_rows(codes.reshape(nt, TILE, -1), gtype, x, out)
        r64 = x.astype(np.float64) @ ref.astype(np.float64).T
        assert np.abs(out - r64).max() <= 1e-5 * np.abs(r64).max(), T


def requantize_with_ggml(lib, src: Path, dst: Path, gtype: int, seed: int = 0) -> Path:
    """src (an F16 GGUF) with every matrix whose rows are whole 256-weight blocks (but the token embedding and the
    routers, as llama.cpp keeps them) quantized to gtype by llama.cpp's
    ggml_quantize_chunk (importance: the mean square of random activations per input column), the rest as it is;
    file type and metadata copied."""
    lib.ggml_quantize_init(gtype)
    rng = np.random.default_rng(seed)
    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub)
    for t in r.tensors:
        shape = [int(v) for v in reversed(t.shape)]  # numpy order: (..., n_in)
        x = gq.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        n_in = shape[-1]
        if len(shape) >= 2 and n_in % 256 == 0 and "token_embd" not in t.name and "gate_inp" not in t.name:
            rows = int(np.prod(shape[:-1]))
            qw = (rng.standard_normal((64, n_in)) ** 2).mean(0).astype(np.float32) + 1e-3
            out = np.zeros(rows * n_in // 256 * gq.GGML_QUANT_SIZES[GGMLQuantizationType(gtype)][1], np.uint8)
            got = lib.ggml_quantize_chunk(gtype, np.ascontiguousarray(x).ctypes.data, out.ctypes.data, 0, rows, n_in,
                                          qw.ctypes.data)
            assert got == out.size
            w.add_tensor(t.name, out.reshape(*shape[:-1], -1), raw_dtype=GGMLQuantizationType(gtype))
        else:
            data = np.asarray(t.data)  # quantized: bytes (..., row bytes); F32/F16: the values
            w.add_tensor(t.name, data.reshape(shape) if t.tensor_type in (0, 1) else data.reshape(*shape[:-1], -1),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


FILES = [("llama", g) for g in IQ] + [("qwen3_moe", g) for g in IQ]


@pytest.mark.parametrize("arch,gtype", FILES, ids=[f"{a}-{IQ[g]}" for a, g in FILES])
def test_codebook_file_runs_as_llama_cpp_runs_it(ggml, tiny_f16, arch, gtype, tmp_path):
    """A file whose layer matrices (the routed experts included) are in the codebook type: imported bit for bit
    (gguf.quants on every tensor), and lmcli's logits against llama.cpp's on llama.cpp's F32 dequantization of the
    same file (F32_TOL), and against llama.cpp on the file itself no further than llama.cpp's own two runs are
    apart, +10% (its 8-bit activations)."""
    q = requantize_with_ggml(ggml, tiny_f16(arch), tmp_path / "q.gguf", gtype)
    types = census(q)
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType(gtype).name, types
    if arch == "qwen3_moe":
        assert types["blk.0.ffn_gate_exps.weight"] == GGMLQuantizationType(gtype).name, types
    lmc = import_losslessly(q, tmp_path / "q.lmc")
    ours = lmcli_logits(lmc, IDS)
    ref32 = llama_logits(quantize(q, tmp_path / "f32.gguf", LlamaFileType.ALL_F32, requantize=True), IDS)
    assert rel_err(ours, ref32).max() <= F32_TOL, rel_err(ours, ref32).max()
    ref = llama_logits(q, IDS)
    own = rel_err(ref32, ref).max()
    assert rel_err(ours, ref).max() <= max(4e-2, 1.1 * own), (rel_err(ours, ref).max(), own)
