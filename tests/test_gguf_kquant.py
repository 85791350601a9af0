"""GGUF files made by llama.cpp's own quantizer (llama_cpp.llama_model_quantize) in the types lmcli keeps in GGUF's
rows (K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS, BF16): imported losslessly, and run as llama.cpp runs them.

References: gguf.quants' dequantization of every tensor of the file, and llama.cpp (llama-cpp-python) on the same
file and on llama.cpp's own F32 dequantization of it.
"""

from __future__ import annotations

import collections
import ctypes

import numpy as np
import pytest
import tiny_models
from gguf import GGUFReader, LlamaFileType
from gguf import quants as gq

llama_cpp = pytest.importorskip("llama_cpp")

# Stated tolerances, as max |lmcli - llama.cpp| / max |llama.cpp| over a position's logits.
# Against llama.cpp on the F32 weights it dequantized from the file (llama.cpp's activations in float; lmcli's in
# int16 per 32 for Q8_0 and for the Q5_0/Q5_1/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS matrices it repacks into tiles, dense ones
# and routed experts read into RAM, in float for BF16's rows): measured <= 4.4e-4 (tiny MoE), 1.7e-4 (tiny llama).
F32_TOL = 2e-3
# Against llama.cpp on the quantized file itself: llama.cpp quantizes activations to 8 bits (Q8_K / Q8_0) for
# these weights, lmcli does not, so they differ by that rounding (measured 5e-3 to 7e-3 on the tiny llama,
# 1.5e-2 to 2.7e-2 on the tiny MoE; its F32 dequantization differs from the quantized run by the same amount).
SAME_FILE_TOL = 4e-2
IDS = list(range(5, 29))
# SmolLM2 on real text: llama.cpp keeps its KV cache in F16 (measured 1.4e-3 (Q4_K_M) to 3.3e-3 (IQ4_XS) against
# lmcli on the F32 weights), and its 8-bit activations move this small model's logits by a tenth of their scale
# (measured 0.105 to 0.174 between llama.cpp's own runs of the Q4_K_M, Q5_K_M, IQ4_XS files and of their F32
# dequantizations; 0.110 to 0.161 against lmcli), which changes its top token at 1 to 4 of 39 positions.
SMOL_F32_TOL = 5e-3
SMOL_SAME_FILE_TOL = 0.2
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital of "
        "Germany. In 1969, humans first walked on the Moon.")

F = LlamaFileType
# Rows are multiples of 256 so that llama.cpp keeps the K-quant (a row of SmolLM2's 576 falls back to Q5_0).
TINY = {"llama": {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64},
        "qwen3_moe": {"hidden_size": 256, "moe_intermediate_size": 256, "head_dim": 64}}


def quantize(src, dst, ftype: int, *, requantize: bool = False):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = ftype, 2, requantize
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return dst


def census(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def llama_logits(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def lmcli_logits(container, ids) -> np.ndarray:
    """Prefill of all but the last three tokens, then three decode steps (the one-token kernels)."""
    import lmcli

    m = lmcli.load(str(container))
    cache = m.new_cache()
    head = m.transformer.forward(ids[:-3], cache, all_logits=True)
    return np.concatenate([head] + [m.transformer.forward([t], cache) for t in ids[-3:]])


def runs_repacked(container) -> set[str]:
    """GGUF type names of layer 0's gate matrix (dense, or the routed experts) as the loaded engine runs it from
    tiles repacked at load; empty when it runs GGUF's rows."""
    import lmcli
    from gguf import GGMLQuantizationType

    from quant.kernels import TILED

    ff = lmcli.load(str(container)).transformer.weights.layers[0].ffn
    if ff.experts is not None:
        k = ff.experts.kinds["gate"]
        return {GGMLQuantizationType(k - TILED).name} if k >= TILED else set()
    return {GGMLQuantizationType(ff.gate.fmt.gguf_type).name} if ff.gate.tiles is not None else set()


def rel_err(ours, ref) -> np.ndarray:
    return np.abs(ours - ref).max(-1) / np.abs(ref).max(-1)


def import_losslessly(gguf_path, dst):
    """Import, then check every tensor of the container (every expert) against gguf.quants' dequantization of the
    file's tensor, bit for bit. Returns the container's path."""
    from quant.container import Container
    from quant.gguf_io import import_gguf
    from quant.quantize import dequantize_interleaved

    c = Container(import_gguf(gguf_path, dst))
    for t in GGUFReader(str(gguf_path)).tensors:
        ref = gq.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        info = c.info(t.name)
        if len(info.shape) == 1:
            got = c.vector(t.name)
        elif len(info.shape) == 2:
            got = dequantize_interleaved(*c.matrix(t.name), info.fmt, *info.shape)
        else:
            got = np.stack([dequantize_interleaved(*c.matrix(t.name, e), info.fmt, *info.shape[1:])
                            for e in range(info.shape[0])])
        assert np.array_equal(got.reshape(ref.shape), ref), t.name
    c.close()
    return dst


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    """arch -> an F16 GGUF of a tiny random model of it (lmcli's export of its f16 conversion), built once."""
    from quant.convert import convert_hf
    from quant.gguf_export import export_gguf

    built = {}

    def get(arch):
        if arch not in built:
            d = tmp_path_factory.mktemp(f"kq_{arch}")
            src = tiny_models.build(arch, d / "hf", overrides=TINY[arch])
            convert_hf(src, d / "f16.lmc", "f16")
            built[arch] = export_gguf(d / "f16.lmc", d / "f16.gguf")
        return built[arch]

    return get


# (arch, llama.cpp file type): every imported type on the dense model, the K-quant mixes and IQ4_XS on the MoE
CASES = [("llama", f) for f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M, F.MOSTLY_Q6_K, F.MOSTLY_Q5_0, F.MOSTLY_Q5_1,
                                F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS, F.MOSTLY_BF16, F.MOSTLY_Q3_K_M, F.MOSTLY_Q2_K)]
CASES += [("qwen3_moe", f) for f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M, F.MOSTLY_Q6_K, F.MOSTLY_IQ4_XS,
                                     F.MOSTLY_Q3_K_M, F.MOSTLY_Q2_K)]
# the type each file must hold for most of its layer matrices (what the test is about)
MAIN = {F.MOSTLY_Q4_K_M: "Q4_K", F.MOSTLY_Q5_K_M: "Q5_K", F.MOSTLY_Q6_K: "Q6_K", F.MOSTLY_Q5_0: "Q5_0",
        F.MOSTLY_Q5_1: "Q5_1", F.MOSTLY_IQ4_NL: "IQ4_NL", F.MOSTLY_IQ4_XS: "IQ4_XS", F.MOSTLY_BF16: "BF16",
        F.MOSTLY_Q3_K_M: "Q3_K", F.MOSTLY_Q2_K: "Q2_K"}


@pytest.mark.parametrize("arch,ftype", CASES, ids=[f"{a}-{f.name[7:]}" for a, f in CASES])
def test_llama_cpp_quantized_file_runs_as_llama_cpp_runs_it(tiny_f16, arch, ftype, tmp_path):
    q = quantize(tiny_f16(arch), tmp_path / "q.gguf", ftype)
    types = census(q)
    layer = [v for k, v in types.items() if k.startswith("blk.") and k.endswith(".weight") and "norm" not in k
             and "gate_inp" not in k]
    assert collections.Counter(layer).most_common(1)[0][0] == MAIN[ftype], types
    if arch == "qwen3_moe":  # the expert tensors themselves are in the K/IQ type
        assert types["blk.0.ffn_gate_exps.weight"] == MAIN[ftype], types
    lmc = import_losslessly(q, tmp_path / "q.lmc")
    if MAIN[ftype] != "BF16":  # the others run on tiles repacked at load (quant.repack), not on the rows kernels
        assert runs_repacked(lmc) == {MAIN[ftype]}
    ours = lmcli_logits(lmc, IDS)
    ref32 = llama_logits(quantize(q, tmp_path / "f32.gguf", F.ALL_F32, requantize=True), IDS)
    assert rel_err(ours, ref32).max() <= F32_TOL, (arch, ftype.name, rel_err(ours, ref32).max())
    ref = llama_logits(q, IDS)
    # llama.cpp's 8-bit activations move its Q2_K MoE's logits by half their scale (0.547 between its runs of the
    # file and of the file's F32 dequantization; lmcli is 3e-4 from the latter): there, the same distance, +10%
    own = rel_err(ref32, ref).max()
    assert rel_err(ours, ref).max() <= max(SAME_FILE_TOL, 1.1 * own), (arch, ftype.name, rel_err(ours, ref).max(), own)
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= min(0.9, np.mean(ref32.argmax(-1) == ref.argmax(-1)))


def test_q4_k_m_keeps_a_wider_ffn_down_for_some_expert_layers(tiny_f16, tmp_path):
    """llama.cpp's Q4_K_M stores some layers' ffn_down_exps in another type than gate/up: one layer, two formats
    (the test above runs such a file)."""
    types = census(quantize(tiny_f16("qwen3_moe"), tmp_path / "q.gguf", F.MOSTLY_Q4_K_M))
    assert any(types[f"blk.{i}.ffn_down_exps.weight"] != types[f"blk.{i}.ffn_gate_exps.weight"] for i in range(2))


# SmolLM2 files as llama.cpp's quantizer makes them, and the types each holds: its 576-wide rows are not whole
# 256-weight super-blocks, so they fall back (Q4_K_M: Q5_0 and Q8_0; Q5_K_M: Q5_1 and Q8_0; IQ4_XS: IQ4_NL)
SMOL = {F.MOSTLY_Q4_K_M: {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}, F.MOSTLY_Q5_K_M: {"Q5_K", "Q6_K", "Q5_1", "Q8_0"},
        F.MOSTLY_IQ4_XS: {"IQ4_XS", "IQ4_NL"}}


@pytest.mark.parametrize("ftype", list(SMOL), ids=[f.name[7:] for f in SMOL])
def test_smollm2_llama_cpp_file_imports_losslessly_and_agrees_with_llama_cpp(smol_gguf, ftype, tmp_path):
    """Issue 17's files: SmolLM2 quantized by llama.cpp (from the packaged Q4_1 weights, which llama.cpp dequantizes
    first) to Q4_K_M, Q5_K_M and IQ4_XS, each with its fallback types for the 576-wide rows."""
    import lmcli

    q = quantize(smol_gguf, tmp_path / "q.gguf", ftype, requantize=True)
    assert SMOL[ftype] <= set(census(q).values()), census(q)
    lmc = import_losslessly(q, tmp_path / "q.lmc")
    ids = lmcli.load(str(lmc)).tokenize(TEXT)
    ours = lmcli_logits(lmc, ids)
    ref32 = llama_logits(quantize(q, tmp_path / "f32.gguf", F.ALL_F32, requantize=True), ids)
    assert rel_err(ours, ref32).max() <= SMOL_F32_TOL, rel_err(ours, ref32).max()
    ref = llama_logits(q, ids)
    assert rel_err(ours, ref).max() <= SMOL_SAME_FILE_TOL, rel_err(ours, ref).max()
    top1 = lambda a, b: np.mean(a.argmax(-1) == b.argmax(-1))  # noqa: E731
    assert top1(ours, ref32) >= 0.97
    # with the file itself (8-bit activations in llama.cpp), lmcli agrees on the top token as often as llama.cpp's
    # own F32 run of it does, within one position
    assert top1(ours, ref) >= top1(ref32, ref) - 1 / len(ids), (top1(ours, ref), top1(ref32, ref))


def test_imported_k_quant_file_exports_to_the_same_tensor_bytes(tiny_f16, tmp_path):
    """The container keeps GGUF's blocks: lmcli's export of an imported Q4_K_M MoE file gives back every tensor's
    type, shape and bytes (experts included)."""
    from quant.gguf_export import export_gguf
    from quant.gguf_io import import_gguf

    q = quantize(tiny_f16("qwen3_moe"), tmp_path / "q.gguf", F.MOSTLY_Q4_K_M)
    out = export_gguf(import_gguf(q, tmp_path / "q.lmc"), tmp_path / "back.gguf")
    src, back = GGUFReader(str(q)), GGUFReader(str(out))
    assert sorted(t.name for t in back.tensors) == sorted(t.name for t in src.tensors)
    by = {t.name: t for t in back.tensors}
    for a in src.tensors:
        b = by[a.name]
        assert (b.tensor_type, list(b.shape)) == (a.tensor_type, list(a.shape)), a.name
        assert np.asarray(b.data).tobytes() == np.asarray(a.data).tobytes(), a.name


# every GGUF type quant.repack takes, by GGUF type id
REPACKED = {6: "q5_0", 7: "q5_1", 10: "q2_k", 11: "q3_k",
            12: "q4_k", 13: "q5_k", 14: "q6_k", 20: "iq4_nl", 23: "iq4_xs"}
# (n_out, n_in): a tile and a part, and odd shapes: fewer rows than a tile, one row past a tile, an odd number of
# blocks (three 32-weight groups, or three 256-weight super-blocks)
SHAPES = [(150, 512), (7, 96), (65, 160)]
K_SHAPES = [(150, 512), (7, 768), (65, 256)]


def _shapes(gtype):
    from quant.formats import BY_GGUF_TYPE

    return K_SHAPES if BY_GGUF_TYPE[gtype].block_size == 256 else SHAPES


def _quantized_act(x):
    from quant import kernels

    T, n = x.shape
    xq, xd, xs = np.empty((T, n), np.int16), np.empty((T, n // 32), np.float32), np.empty((T, n // 32), np.int32)
    kernels.quantize_act(x, xq, xd, xs)
    return xq, xd, xs


def _padded(fmt, raw):
    """GGUF rows (n_out, row bytes) padded with zero rows to whole tiles: (n_tiles, TILE, row bytes)."""
    from quant.formats import TILE

    nt = (raw.shape[0] + TILE - 1) // TILE
    rows = np.zeros((nt * TILE, raw.shape[1]), np.uint8)
    rows[: raw.shape[0]] = raw
    return rows.reshape(nt, TILE, -1)


@pytest.mark.parametrize("gtype", list(REPACKED), ids=list(REPACKED.values()))
def test_repacked_tile_kernel_matches_gguf_dequantization(gtype):
    """quant.repack + kernels.matmul_tiles (decode and prefill) against float64 x @ W.T with W from gguf.quants'
    dequantization of random blocks (int16 activations: within 1e-4 of the float result), odd shapes included."""
    from quant import kernels, repack
    from quant.formats import BY_GGUF_TYPE

    rng = np.random.default_rng(gtype)
    fmt = BY_GGUF_TYPE[gtype]
    for n_out, n_in in _shapes(gtype):
        rows, w = _random_rows(rng, fmt, n_out, n_in)
        codes, scales = repack.repack(fmt, rows, n_in)
        for T in (1, 5):
            x = rng.standard_normal((T, n_in)).astype(np.float32)
            out = np.full((T, n_out), np.nan, np.float32)
            kernels.matmul_tiles(codes, scales, gtype, *_quantized_act(x), out)
            ref = x.astype(np.float64) @ w.T
            assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4, (fmt.name, n_out, n_in, T)


@pytest.mark.parametrize("gtype", list(REPACKED), ids=list(REPACKED.values()))
def test_repacked_tile_kernel_integer_sums_do_not_overflow(gtype):
    """Blocks of one repeated byte (0x00, 0x80, 0xFF: the largest codes, scales and mins each type can hold, e.g.
    Q5_K's sc 63 and q 31, Q6_K's sc -128, IQ4_XS's scale -32 with the codebook's -127) against activations at
    the int16 limit, all of one sign: the exact integer sums stay in int32 (float64 reference by gguf.quants)."""
    from gguf import GGMLQuantizationType

    from quant import kernels, repack
    from quant.formats import BY_GGUF_TYPE

    fmt = BY_GGUF_TYPE[gtype]
    n_out, n_in = 64, 512
    for byte in (0x00, 0x80, 0xFF):
        raw = np.full((n_out, fmt.row_nbytes(n_in)), byte, np.uint8)
        b = raw.reshape(n_out, n_in // fmt.block_size, fmt.block_bytes)
        for o in fmt.half_fields:
            b[..., o:o + 2] = np.array([0.01], np.float16).view(np.uint8)
        w = gq.dequantize(raw, GGMLQuantizationType(gtype)).astype(np.float64).reshape(n_out, n_in)
        codes, scales = repack.repack(fmt, _padded(fmt, raw), n_in)
        for sign in (1, -1):
            x = np.full((2, n_in), sign, np.float32)
            out = np.empty((2, n_out), np.float32)
            kernels.matmul_tiles(codes, scales, gtype, *_quantized_act(x), out)
            ref = x.astype(np.float64) @ w.T
            assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), (fmt.name, byte, sign)


def _random_rows(rng, fmt, n_out, n_in):
    """Random GGUF blocks of fmt (finite fp16 scales), rows padded with zero bytes to whole tiles:
    (rows (n_tiles, TILE, row bytes), float64 weights (n_out, n_in) by gguf.quants)."""
    from gguf import GGMLQuantizationType

    raw = rng.integers(0, 256, (n_out, fmt.row_nbytes(n_in)), dtype=np.uint8)
    b = raw.reshape(n_out, n_in // fmt.block_size, fmt.block_bytes)
    for o in fmt.half_fields:
        b[..., o:o + 2] = (rng.random(b.shape[:2]) * 0.01).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    w = gq.dequantize(raw, GGMLQuantizationType(fmt.gguf_type)).astype(np.float64).reshape(n_out, n_in)
    return _padded(fmt, raw), w


@pytest.mark.parametrize("gtype", list(REPACKED), ids=list(REPACKED.values()))
def test_compiled_repack_writes_the_numpy_reference_bytes(gtype):
    """kernels.repack_rows (what the engine runs) gives quant.repack's numpy layout byte for byte, padding rows
    included, odd shapes included."""
    from quant import repack
    from quant.formats import BY_GGUF_TYPE

    fmt = BY_GGUF_TYPE[gtype]
    rng = np.random.default_rng(gtype + 1)
    for n_out, n_in in _shapes(gtype):
        rows, _ = _random_rows(rng, fmt, n_out, n_in)
        c0, s0 = repack.repack(fmt, rows, n_in)
        c1, s1 = repack.repack_matrix(fmt, rows, n_out, n_in)
        assert c1.dtype == np.uint8 and np.array_equal(c0.view(np.uint8), c1), (fmt.name, n_out, n_in)
        assert np.array_equal(s0, s1), (fmt.name, n_out, n_in)


def test_repacked_layout_sizes_are_the_kernels():
    """quant.repack's table of repacked sizes (the memory accounting's, quant.schema.repacked_ram) is the
    kernels' (kernels.tiled_rows) and the reference repack's arrays, for every repacked type."""
    from quant import kernels, repack
    from quant.formats import BY_GGUF_TYPE

    for gtype in REPACKED:
        fmt = BY_GGUF_TYPE[gtype]
        n_in = 768 if fmt.block_size == 256 else 96
        rows, _ = _random_rows(np.random.default_rng(0), fmt, 64, n_in)
        c, s = repack.repack(fmt, rows, n_in)
        assert repack.tiled_rows(fmt, n_in) == kernels.tiled_rows(gtype, n_in // 32) == (c.shape[1], s.shape[1])


# (gate and up, down) GGUF types of the expert test: each repacked type in both places, and Q4_K_M's mixes
EXPERT_MIXES = [(t, t) for t in REPACKED] + [(12, 6), (12, 14), (13, 14), (23, 20), (10, 11), (11, 12), (11, 13)]


@pytest.mark.parametrize("gate_up,down", EXPERT_MIXES, ids=[f"{REPACKED[a]}-{REPACKED[b]}" for a, b in EXPERT_MIXES])
def test_repacked_expert_kernels_match_gguf_dequantization(gate_up, down):
    """Routed experts repacked into tiles (gate/up in one type, down in the same or another, as llama.cpp's mixes
    store them): the decode kernels (moe_gate_up, moe_down) and the prefill ones (moe_*_rows, SwiGLU fused) against
    float64 with weights from gguf.quants' dequantization, for tokens routed to 2 of 3 experts."""
    from quant import kernels, repack
    from quant.formats import BY_GGUF_TYPE

    rng = np.random.default_rng(down + 7 * gate_up)
    E, n_embd, n_ff = 3, 512, 256
    fmts = {"gate": BY_GGUF_TYPE[gate_up], "up": BY_GGUF_TYPE[gate_up], "down": BY_GGUF_TYPE[down]}
    shapes = {"gate": (n_ff, n_embd), "up": (n_ff, n_embd), "down": (n_embd, n_ff)}
    # every expert's three matrices, each 64-aligned, in one buffer
    parts, pos, ref = {}, 0, {k: [] for k in fmts}
    for k, fmt in fmts.items():
        cb, sb = repack.tiled_parts(fmt, *shapes[k])
        parts[k] = [(pos + e * (cb + sb), pos + e * (cb + sb) + cb) for e in range(E)]
        pos += E * (cb + sb) + 64
    buf = np.zeros(pos, np.uint8)
    for k, fmt in fmts.items():
        for e in range(E):
            rows, w = _random_rows(rng, fmt, *shapes[k])
            ref[k].append(w)
            repack.repack_into(fmt, rows.reshape(-1), 0, *shapes[k], buf, parts[k][e][0])
    off = {k: (np.array([p[0] for p in v], np.int64), np.array([p[1] for p in v], np.int64)) for k, v in parts.items()}
    kind = {k: f.gguf_type + kernels.TILED for k, f in fmts.items()}
    b16, b32 = buf.view(np.uint16), buf[: len(buf) // 4 * 4].view(np.float32)
    for T in (1, 6):
        x = rng.standard_normal((T, n_embd)).astype(np.float32)
        ids = np.array([[2, 0], [0, 1], [2, 1], [0, 2], [1, 0], [2, 0]][:T], np.int64)
        sel, tok_ptr, tok_idx, _ = kernels.group_by_expert(ids, E)
        xq, xd, xs = (np.empty((T, n_embd), np.int16), np.empty((T, n_embd // 32), np.float32),
                      np.empty((T, n_embd // 32), np.int32))
        kernels.quantize_act(x, xq, xd, xs)
        n_a = len(tok_idx)
        h = np.empty((n_a, n_ff), np.float32)
        if T == 1:
            h2 = np.empty((2, n_a, n_ff), np.float32)
            kernels.moe_gate_up(buf, b16, b32, kind["gate"], kind["up"], n_ff, n_embd, *off["gate"], *off["up"], sel,
                                tok_ptr, tok_idx, xq, xd, xs, x, h2)
            kernels.silu_mul(h2[0], h2[1], h)
        else:
            kernels.moe_gate_up_rows(buf, b16, kind["gate"], kind["up"], n_ff, n_embd, *off["gate"], *off["up"], sel,
                                     tok_ptr, tok_idx, xq, xd, xs, x, h)
        a_exp = np.repeat(sel, np.diff(tok_ptr))  # expert of each assignment
        x64 = x.astype(np.float64)[tok_idx]
        g = np.einsum("ai,afi->af", x64, np.stack(ref["gate"])[a_exp])
        u = np.einsum("ai,afi->af", x64, np.stack(ref["up"])[a_exp])
        with np.errstate(over="ignore"):  # exp(-g) of a large negative g: inf, h_ref 0 as it should be
            h_ref = g / (1 + np.exp(-g)) * u
        assert np.abs(h - h_ref).max() / np.abs(h_ref).max() <= 1e-4, T
        hq, hd, hs = (np.empty((n_a, n_ff), np.int16), np.empty((n_a, n_ff // 32), np.float32),
                      np.empty((n_a, n_ff // 32), np.int32))
        kernels.quantize_act(h, hq, hd, hs)
        y = np.empty((n_a, n_embd), np.float32)
        fn = kernels.moe_down if T == 1 else kernels.moe_down_rows
        args = (buf, b16, b32) if T == 1 else (buf, b16)
        fn(*args, kind["down"], n_embd, n_ff, *off["down"], sel, tok_ptr, hq, hd, hs, h, y)
        y_ref = np.einsum("af,aef->ae", h.astype(np.float64), np.stack(ref["down"])[a_exp])
        assert np.abs(y - y_ref).max() / np.abs(y_ref).max() <= 1e-4, T


def test_repacked_experts_run_as_the_files_rows_and_free_their_file_copy(tiny_f16, tmp_path):
    """A Q4_K_M MoE read into RAM runs its experts repacked (weights.repack_experts), mapped it runs the file's rows
    (the rows kernels, float activations), and through the expert cache the same rows: the logits agree within the
    int16 activation rounding (1e-3 of their scale), and the resident copy of the repacked bundles reads as zeros
    (given back to the system)."""
    import lmcli

    lmc = import_losslessly(quantize(tiny_f16("qwen3_moe"), tmp_path / "q.gguf", F.MOSTLY_Q4_K_M), tmp_path / "q.lmc")
    ram = lmcli.load(str(lmc))
    ex = ram.transformer.weights.layers[0].ffn.experts
    assert ex.tiles is not None and ex.kinds["gate"] == 112
    assert not ram.transformer.container._buf[ex.base + 4096 : ex.base + 8192].any()
    mapped = lmcli.load(str(lmc), use_mmap=True)
    assert mapped.transformer.weights.layers[0].ffn.experts.tiles is None
    cached = lmcli.load(str(lmc), expert_cache_mib=64)
    assert cached.transformer.expert_cache is not None
    ours = lmcli_logits(lmc, IDS)
    for other in (mapped, cached):
        c = other.new_cache()
        ref = np.concatenate([other.transformer.forward(IDS[:-3], c, all_logits=True)]
                             + [other.transformer.forward([t], c) for t in IDS[-3:]])
        assert rel_err(ours, ref).max() <= 1e-3, rel_err(ours, ref).max()


def test_synthetic_f16_moe_is_valid_data_for_llama_cpp(tmp_path):
    """quant.synthetic's MoE written in f16 (the base the benchmarks quantize with llama.cpp): every exported weight
    is finite and of the 4-bit synthetic's spread, and llama.cpp's quantizer, which validates each tensor's data,
    accepts the file (random bytes as f16 values held NaN and inf: "attn_k has invalid data")."""
    from quant.gguf_export import export_gguf
    from quant.synthetic import write_synthetic_moe

    lmc = write_synthetic_moe(tmp_path / "f16.lmc", n_layer=2, n_embd=256, n_ff_exp=256, n_expert=4, n_head=4,
                              n_head_kv=2, vocab=512, qtype="f16")
    src = export_gguf(lmc, tmp_path / "f16.gguf")
    for t in GGUFReader(str(src)).tensors:
        w = gq.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        assert np.isfinite(w).all() and np.abs(w).max() < 10, t.name
    quantize(src, tmp_path / "q.gguf", F.MOSTLY_Q4_K_M)
    assert "Q4_K" in census(tmp_path / "q.gguf").values()


@pytest.mark.parametrize("arch,ftype", [("llama", F.MOSTLY_IQ4_XS), ("qwen3_moe", F.MOSTLY_Q5_K_M)],
                         ids=["llama-IQ4_XS", "qwen3_moe-Q5_K_M"])
def test_repacked_ram_counts_what_the_engine_allocates(tiny_f16, arch, ftype, tmp_path):
    """quant.schema.repacked_ram (the figure the residency rule and `plan` add to the file) against the engine's own
    arrays once loaded: the dense tiles to the byte, less the file rows given back (all but the token embedding's),
    plus each layer's repacked expert bundles less the file's, within their page alignment. An untied token
    embedding only serves lookups and is not repacked (the MoE's); a tied one is the output head (the llama's)."""
    import lmcli
    from lmcli.engine.weights import Linear

    from quant.schema import repacked_ram

    lmc = import_losslessly(quantize(tiny_f16(arch), tmp_path / "q.gguf", ftype), tmp_path / "q.lmc")
    tf = lmcli.load(str(lmc)).transformer
    extra, dense = repacked_ram(tf.container.tensor_sizes())
    w = tf.weights
    lins = {id(x): x for x in [w.tok_embd, w.output] + [v for L in w.layers for o in (L.attn, L.ffn)
                                                        for v in vars(o).values() if isinstance(v, Linear)]}
    tiled = [x for x in lins.values() if x.tiles is not None]
    assert (w.tok_embd.tiles is not None) == tf.cfg.tied_embeddings
    assert dense == sum(x.tiles[0].nbytes + x.tiles[1].nbytes for x in tiled) > 0
    ours = dense - sum(x.codes.nbytes for x in tiled if x is not w.tok_embd)
    slack = 0
    for i, L in enumerate(w.layers):
        ex = L.ffn.experts
        if ex is not None:
            assert ex.tiles is not None
            ours += ex.tiles.nbytes - ex.n_expert * tf.container.tensors[f"blk.{i}.ffn_gate_exps.weight"].stride
            slack += ex.n_expert * 4096
    assert abs(extra - ours) <= slack, (extra, ours, slack)
