"""lmcli's Q4_K, Q5_K, Q6_K, Q5_0, Q5_1 and Q8_0 encoders (quant.kquants, quant.quantize, quant.imatrix) against
llama.cpp's own: ggml_quantize_chunk from the libggml that llama-cpp-python ships, byte for byte, without and with
an importance matrix."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from quant import imatrix
from quant.formats import Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from quant.quantize import dequantize_blocks, quantize_blocks

FORMATS = [Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0]


def llama_blocks(lib, fmt, x, qw=None):
    """ggml_quantize_chunk(type, rows x, importance qw or NULL) -> block bytes (rows, row bytes)."""
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    out = np.zeros(rows * fmt.row_nbytes(n), np.uint8)
    lib.ggml_quantize_init(fmt.gguf_type)
    imp = None if qw is None else np.ascontiguousarray(qw, np.float32)
    got = lib.ggml_quantize_chunk(fmt.gguf_type, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                  None if imp is None else imp.ctypes.data)
    assert got == out.size
    return out.reshape(rows, -1)


def matrix(kind: str, shape, seed: int) -> np.ndarray:
    """Random rows: normal; heavy tails with a block of one sign; sparse with an all-zero block and super-block;
    tiny values (scales near fp16's smallest normal) and a constant block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "heavy":
        x *= rng.standard_t(2, shape).astype(np.float32)
        x[:, :32] = np.abs(x[:, :32])
    elif kind == "sparse":
        x[rng.random(shape) < 0.6] = 0
        x[0, :256] = 0
        x[-1, 32:64] = 0
    elif kind == "tiny":
        x *= np.float32(1e-4)
        x[:, 64:96] = np.float32(0.25)
    return x


SHAPES = [((37, 256), "normal"), ((5, 768), "heavy"), ((8, 512), "sparse"), ((3, 256), "tiny"), ((64, 1024), "normal")]


def _id(fmt, shape, kind):
    return f"{fmt.name}-{shape[0]}x{shape[1]}-{kind}"


CASES = [(f, s, k) for f in FORMATS for s, k in SHAPES]


@pytest.mark.parametrize("fmt,shape,kind", CASES, ids=[_id(*c) for c in CASES])
def test_blocks_equal_llama_cpp_without_importance(ggml, fmt, shape, kind):
    """quantize_row_*_ref: rows of odd count, row lengths of 1, 2, 3 and 4 super-blocks."""
    x = matrix(kind, shape, hash((fmt.name, shape, kind)) % 2**32)
    ours = quantize_blocks(x, fmt)
    ref = llama_blocks(ggml, fmt, x)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{(ours != ref).any(axis=1).sum()} of {len(x)} rows differ"


WEIGHTED = [(f, s, k) for f in FORMATS if f is not Q8_0 for s, k in SHAPES]


@pytest.mark.parametrize("fmt,shape,kind", WEIGHTED, ids=[_id(*c) for c in WEIGHTED])
def test_blocks_equal_llama_cpp_with_the_same_importances(ggml, fmt, shape, kind):
    """quantize_row_*_impl with quant_weights: importances spanning four orders of magnitude, some exactly 0."""
    x = matrix(kind, shape, hash((fmt.name, shape, kind, "w")) % 2**32)
    rng = np.random.default_rng(shape[1])
    qw = (rng.random(shape[1]) ** 3 * 10).astype(np.float32)
    qw[::17] = 0
    ours = imatrix.encode(x, fmt, qw)
    ref = llama_blocks(ggml, fmt, x, qw)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{(ours != ref).any(axis=1).sum()} of {len(x)} rows differ"


def test_importance_lowers_the_weighted_error_of_k_quants():
    """As for Q4_0/Q4_1: rounded with the activations' energy, the error weighted by it is lower than the plain
    rounding's (by more than 10%)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    act2 = (rng.random(512) ** 4 * 100).astype(np.float32)
    for fmt in (Q4_K, Q5_K, Q6_K):
        plain = dequantize_blocks(quantize_blocks(x, fmt), fmt, 512)
        weighted = dequantize_blocks(imatrix.encode(x, fmt, act2), fmt, 512)
        err = lambda y: float((np.square(y - x) * act2).sum())  # noqa: E731
        assert err(weighted) < 0.9 * err(plain), fmt.name


# --- the q4_k_m / q5_k_m mixes against llama.cpp's quantizer ---------------------------------------------------

# (arch, config overrides, file type): rows of 256 (the K-quants kept) and of 64 or 32 (llama.cpp's fallbacks);
# tied and untied output; dense, 8 experts (llama.cpp's n_expert == 8 rules: attn_v, attn_k Q8_0, attn_output
# Q5_K), 4 experts, shared experts, 9 layers (use_more_bits picks layers 0, 2, 5, 8); MLA (DeepSeek-V3)
W256 = {"hidden_size": 256, "intermediate_size": 256, "head_dim": 64}
MIX_CASES = [
    ("llama", W256, "q4_k_m"),
    ("llama", {}, "q4_k_m"),
    ("qwen3", {**W256, "num_hidden_layers": 9}, "q4_k_m"),
    ("qwen3_moe", {**W256, "moe_intermediate_size": 256}, "q4_k_m"),
    ("qwen3_moe", {}, "q5_k_m"),
    ("mixtral", {"hidden_size": 256, "intermediate_size": 256}, "q5_k_m"),
    ("qwen2_moe", {"mlp_only_layers": []}, "q4_k_m"),
    ("deepseek_v3", {}, "q4_k_m"),
]


def _llama_cpp_quantize(src, dst, ftype: str):
    import llama_cpp
    from gguf import LlamaFileType

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = getattr(LlamaFileType, "MOSTLY_" + ftype.upper()), 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return dst


@pytest.mark.parametrize("arch,over,ftype", MIX_CASES, ids=[f"{a}-{i}-{f}" for i, (a, _, f) in enumerate(MIX_CASES)])
def test_file_type_mix_equals_llama_cpp_tensor_for_tensor(arch, over, ftype, tmp_path):
    """The same float16 weights quantized by llama.cpp (llama_model_quantize of lmcli's f16 export) and by lmcli
    (quantize --type q4_k_m from the checkpoint, then exported): every tensor has the same type and the same bytes.
    The checkpoint is float16 so that both start from the same values. DeepSeek-V3's attn_kv_b is the exception
    by construction: lmcli keeps one matrix (llama.cpp's attn_v-like attn_kv_b: Q6_K in use_more_bits layers,
    Q8_0 with 8 experts), its export splits it into attn_k_b / attn_v_b, which llama.cpp's rules do not name."""
    import tiny_models
    from gguf import GGUFReader

    from quant.convert import convert_hf
    from quant.gguf_export import export_gguf

    src = tiny_models.build(arch, tmp_path / "hf", overrides=over, dtype="float16")
    convert_hf(src, tmp_path / "f16.lmc", "f16")
    ref = _llama_cpp_quantize(export_gguf(tmp_path / "f16.lmc", tmp_path / "f16.gguf"), tmp_path / "ref.gguf", ftype)
    summary = convert_hf(src, tmp_path / "q.lmc", ftype)
    ours = {t.name: t for t in GGUFReader(str(export_gguf(tmp_path / "q.lmc", tmp_path / "ours.gguf"))).tensors}
    theirs = {t.name: t for t in GGUFReader(str(ref)).tensors}
    split = {n for n in theirs if n.endswith(("attn_k_b.weight", "attn_v_b.weight"))}
    assert set(ours) == set(theirs) and (not split or arch == "deepseek_v3")
    for name in sorted(set(theirs) - split):
        a, b = theirs[name], ours[name]
        assert b.tensor_type == a.tensor_type, (name, b.tensor_type.name, a.tensor_type.name)
        assert np.asarray(b.data).tobytes() == np.asarray(a.data).tobytes(), name
    # the matrices whose rows are not whole super-blocks are reported with the type they fell back to
    for name, fmt in summary["fallback"].items():
        assert theirs[name].tensor_type.name.lower() == fmt and int(theirs[name].shape[0]) % 256, name


# --- end to end: lmcli quantize --type q4_k_m, then run ---------------------------------------------------------

TIGHT = 2e-3  # tests/test_architectures.py, tests/test_mix.py: lmcli against transformers on the same rounded weights


def _llama_rounded_reference(model_dir, container, lib):
    """transformers' model with every matrix rounded as the container stores it: in the container's type for that
    matrix, by llama.cpp (ggml_quantize_chunk) and dequantized by gguf.quants; routers, norms and biases float32."""
    import json

    import tiny_models
    import torch
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    from quant.container import Container
    from quant.formats import F16, F32
    from quant.hf_config import read_config
    from quant.hf_tensors import _assignments

    cfg = read_config(json.loads((model_dir / "config.json").read_text()))
    c = Container(container)
    ref = tiny_models.reference_model(model_dir)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim < 2:
                continue
            fmts = {c.info(t).fmt for t, _, _ in _assignments(name, tuple(p.shape), cfg, range(0))}
            assert len(fmts) == 1, (name, fmts)  # gate and up of fused experts share one type
            fmt = fmts.pop()
            if fmt is F32:
                continue
            a = p.detach().float().numpy()
            flat = a.reshape(-1, a.shape[-1])
            if fmt is F16:
                w = flat.astype(np.float16).astype(np.float32)
            else:
                raw = llama_blocks(lib, fmt, flat)
                w = gq.dequantize(raw, GGMLQuantizationType(fmt.gguf_type)).reshape(flat.shape)
            p.copy_(torch.from_numpy(w.reshape(a.shape).astype(np.float32)))
    c.close()
    return ref


@pytest.mark.parametrize("arch,over", [("llama", W256), ("qwen3_moe", {**W256, "moe_intermediate_size": 256})],
                         ids=["llama", "qwen3_moe"])
def test_quantize_q4_k_m_cli_runs_as_transformers_on_llama_cpp_rounded_weights(ggml, arch, over, tmp_path):
    """`lmcli quantize DIR OUT --type q4_k_m`: the summary and `show` name the type; the engine runs the K-quant
    matrices on the tiles it repacks them into at load (not the rows kernels); its logits (prefill and decode) match
    transformers with every matrix rounded by llama.cpp into the type the container holds it in."""
    import json
    import subprocess
    import sys

    import tiny_models
    import torch
    from test_gguf_kquant import lmcli_logits, runs_repacked

    d = tiny_models.build(arch, tmp_path / "hf", overrides=over)
    out = tmp_path / "m.lmc"
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(d), str(out), "--type", "q4_k_m"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "kept at" not in r.stdout  # rows of 256: no fallback
    show = json.loads(subprocess.run([sys.executable, "-m", "lmcli.cli", "show", str(out), "--json"],
                                     capture_output=True, text=True, timeout=300).stdout)
    assert show["quant"] == "q4_k_m (llama.cpp mix)", show["quant"]
    assert runs_repacked(out) == {"Q4_K"}
    ids = [int(t) for t in np.random.default_rng(1).integers(3, tiny_models.vocab_size(), 24)]
    got = lmcli_logits(out, ids)
    with torch.no_grad():
        want = _llama_rounded_reference(d, out, ggml)(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < TIGHT
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_quantize_q4_k_m_with_an_importance_matrix_writes_llama_cpps_weighted_blocks(ggml, tmp_path):
    """`lmcli imatrix`, then `quantize --type q4_k_m --imatrix`: an expert's Q4_K gate rows and a Q6_K ffn_down
    expert are byte for byte what llama.cpp's ggml_quantize_chunk writes with that expert's importances."""
    import random
    import subprocess
    import sys

    import tiny_models
    from safetensors.numpy import load_file

    from quant.container import Container

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "lmcli.cli", *args], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return r.stdout

    d = tiny_models.build("qwen3_moe", tmp_path / "hf", overrides={**W256, "moe_intermediate_size": 256})
    cli("quantize", str(d), str(tmp_path / "f16.lmc"), "--type", "f16")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(tiny_models._corpus(random.Random(7))) * 3)
    cli("imatrix", str(tmp_path / "f16.lmc"), str(text), "-o", str(tmp_path / "imx.npz"), "--ctx", "64")
    imp = imatrix.load(tmp_path / "imx.npz")
    out = tmp_path / "q.lmc"
    assert "matrices rounded with the importance matrix" in cli("quantize", str(d), str(out), "--type", "q4_k_m",
                                                               "--imatrix", str(tmp_path / "imx.npz"))
    c = Container(out)
    st = load_file(next(d.glob("*.safetensors")))
    for layer, part, fmt in [(0, "gate", Q4_K), (1, "down", Q6_K)]:  # use_more_bits(1 of 2 layers): Q6_K
        name = f"blk.{layer}.ffn_{part}_exps.weight"
        assert c.info(name).fmt is fmt and name in c.metadata["quant"]["imatrix"]
        rows = st[f"model.layers.{layer}.mlp.experts.3.{part}_proj.weight"].astype(np.float32)
        codes, _ = c.matrix(name, expert=3)
        ours = codes.reshape(-1, fmt.row_nbytes(rows.shape[1]))[: rows.shape[0]]
        assert np.array_equal(ours, llama_blocks(ggml, fmt, rows, imp[name][3])), name


@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k"])
def test_uniform_k_types_run_as_transformers_on_llama_cpp_rounded_weights(ggml, qtype, tmp_path):
    """--type q4_k / q5_k / q6_k: every layer matrix in that type, the token embedding at 8 bits (lmcli's uniform
    policy); a 64-wide model's rows fall back per tensor as llama.cpp's do (Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0). Logits against transformers on the same weights rounded by llama.cpp."""
    import tiny_models
    import torch
    from test_gguf_kquant import lmcli_logits

    from quant.container import Container
    from quant.convert import convert_hf
    from quant.formats import FORMATS

    fmt = FORMATS[qtype]
    for over, want in [(W256, fmt), ({}, {"q4_k": Q5_0, "q5_k": Q5_1, "q6_k": Q8_0}[qtype])]:
        d = tiny_models.build("llama", tmp_path / f"hf{len(over)}", overrides=over)
        out = tmp_path / f"m{len(over)}.lmc"
        summary = convert_hf(d, out, qtype)
        c = Container(out)
        layer = {t.fmt for n, t in c.tensors.items() if n.startswith("blk.") and len(t.shape) == 2}
        assert layer == {want} and c.info("token_embd.weight").fmt is Q8_0, (qtype, layer)
        assert set(summary["fallback"].values()) == ({want.name} if want is not fmt else set())
        c.close()
        ids = [int(t) for t in np.random.default_rng(2).integers(3, tiny_models.vocab_size(), 20)]
        got = lmcli_logits(out, ids)
        with torch.no_grad():
            ref = _llama_rounded_reference(d, out, ggml)(torch.tensor([ids])).logits[0].float().numpy()
        assert np.abs(got - ref).max() / np.abs(ref).max() < TIGHT, (qtype, over)
