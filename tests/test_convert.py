"""HF conversion: every tensor of every architecture against transformers' own weights, the config against
transformers' config, streaming memory, and a clear refusal (with nothing written) for every bad input."""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import tiny_models
from tiny_models import ARCHS, CHATML

from quant.container import Container
from quant.convert import convert_hf
from quant.errors import ConvertError
from quant.formats import ALIGN, F16, F32, FORMATS, Q8_0
from quant.quantize import dequantize_interleaved, quantize_matrix

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """build(arch, **kw) -> a tiny model directory, built once per set of arguments in this module."""
    cache: dict[str, Path] = {}

    def get(arch: str, **kw) -> Path:
        key = f"{arch}-{sorted(kw.items())!r}"
        if key not in cache:
            cache[key] = tiny_models.build(arch, tmp_path_factory.mktemp(arch) / "model", **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """convert(arch, qtype, **build_kw) -> (model dir, container path, summary), converted once."""
    cache: dict[str, tuple] = {}

    def get(arch: str, qtype: str, **kw):
        key = f"{arch}-{qtype}-{sorted(kw.items())!r}"
        if key not in cache:
            src = models(arch, **kw)
            out = tmp_path_factory.mktemp("out") / f"{arch}.lmc"
            cache[key] = (src, out, convert_hf(src, out, qtype))
        return cache[key]

    return get


# --- the reference: transformers' weights, named by gguf-py's TensorNameMap -------------------------

G = gguf.MODEL_ARCH
GGUF_ARCH = {"llama": G.LLAMA, "mistral": G.LLAMA, "mixtral": G.LLAMA, "qwen2": G.QWEN2, "qwen3": G.QWEN3,
             "qwen2_moe": G.QWEN2MOE, "qwen3_moe": G.QWEN3MOE, "olmoe": G.OLMOE, "granitemoe": G.GRANITE_MOE,
             "dots1": G.DOTS1, "deepseek_v3": G.DEEPSEEK2}


def reference_tensors(model) -> dict[str, np.ndarray]:
    """Container name -> float32 weight, from the loaded transformers model's state_dict (its in-memory layout:
    fused 3-D experts), named as llama.cpp names them."""
    c = model.config
    maps = [gguf.get_tensor_name_map(GGUF_ARCH[c.model_type], c.num_hidden_layers),
            gguf.get_tensor_name_map(G.LLAMA, c.num_hidden_layers)]
    out = {}
    for hf_name, t in model.state_dict().items():
        w = t.detach().float().numpy()
        m = re.match(r"model\.layers\.(\d+)\.", hf_name)
        blk = f"blk.{m.group(1)}." if m else ""
        if hf_name.endswith("experts.gate_up_proj"):
            f = w.shape[1] // 2  # MixtralExperts and kin: gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)
            out[blk + "ffn_gate_exps.weight"], out[blk + "ffn_up_exps.weight"] = w[:, :f], w[:, f:]
        elif hf_name.endswith("experts.down_proj"):
            out[blk + "ffn_down_exps.weight"] = w
        elif hf_name.endswith("block_sparse_moe.router.weight"):  # GraniteMoeTopKRouter
            out[blk + "ffn_gate_inp.weight"] = w
        elif hf_name.endswith("e_score_correction_bias"):
            out[blk + "exp_probs_b.bias"] = w
        elif hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        else:
            name = next(filter(None, (mp.get_name(hf_name, try_suffixes=(".weight", ".bias")) for mp in maps)), None)
            assert name is not None, f"no gguf name for {hf_name}"
            out[name] = w.reshape(-1) if name.endswith("ffn_gate_inp_shexp.weight") else w
    return out


def reference_format(name: str, w: np.ndarray, qtype: str):
    """The stated precision policy: vectors and routers F32; token_embd/output Q8_0 under 4-bit; else qtype."""
    if w.ndim == 1 or ".ffn_gate_inp" in name:
        return F32
    if name in ("token_embd.weight", "output.weight") and qtype in ("q4_0", "q4_1"):
        return Q8_0
    return FORMATS[qtype]


def container_weight(c: Container, name: str) -> np.ndarray:
    info = c.info(name)
    if len(info.shape) == 1:
        return np.array(c.vector(name))
    if len(info.shape) == 2:
        return dequantize_interleaved(*c.matrix(name), info.fmt, *info.shape)
    return np.stack([dequantize_interleaved(*c.matrix(name, e), info.fmt, *info.shape[1:])
                     for e in range(info.shape[0])])


def assert_matches_reference(container: Path, model_dir: Path, qtype: str) -> None:
    c = Container(container)
    ref = reference_tensors(tiny_models.reference_model(model_dir))
    assert sorted(c.tensors) == sorted(ref)
    for name, w in ref.items():
        fmt = reference_format(name, w, qtype)
        assert c.info(name).fmt is fmt, name
        assert c.info(name).shape == w.shape, name
        got = container_weight(c, name)
        if fmt is F32:
            assert np.array_equal(got, w), name
            continue
        mats = w if w.ndim == 3 else w[None]
        want = np.stack([dequantize_interleaved(*quantize_matrix(m, fmt), fmt, *m.shape) for m in mats])
        assert np.array_equal(got.reshape(want.shape), want), name
        if fmt is F16:  # and, stated directly: F16 is the plain fp16 cast
            assert np.array_equal(got, w.astype(np.float16).astype(np.float32)), name


# --- every architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_equals_the_reference_quantization_of_the_transformers_weight(converted, arch, qtype):
    src, out, _ = converted(arch, qtype)
    assert_matches_reference(out, src, qtype)


def expected_config(c) -> dict:
    """lmcli config values, read independently from the transformers config object (class defaults applied)."""
    arch = c.model_type
    exp = dict(arch=arch, n_layer=c.num_hidden_layers, n_embd=c.hidden_size, n_ff=c.intermediate_size,
               n_head=c.num_attention_heads, vocab_size=c.vocab_size, norm_eps=c.rms_norm_eps,
               rope_theta=c.rope_parameters["rope_theta"], n_ctx_train=c.max_position_embeddings,
               tied_embeddings=c.tie_word_embeddings, attn_bias=arch in ("qwen2", "qwen2_moe"),
               qk_norm={"qwen3": "head", "qwen3_moe": "head", "dots1": "head", "olmoe": "full"}.get(arch, "none"),
               n_expert=0, first_k_dense=0, n_expert_shared=0, router_bias=False, rope_interleaved=False,
               embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=0.0, logits_scaling=1.0)
    if arch == "deepseek_v3":
        exp.update(head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim, n_head_kv=c.num_attention_heads,
                   rope_dim=c.qk_rope_head_dim, rope_interleaved=c.rope_interleave, q_lora_rank=c.q_lora_rank or 0,
                   kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                   qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim)
    else:
        exp.update(head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   n_head_kv=c.num_key_value_heads, rope_dim=0, kv_lora_rank=0)
    n_expert = next((getattr(c, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                     if getattr(c, k, None)), 0)
    if n_expert:
        exp.update(n_expert=n_expert, n_expert_used=c.num_experts_per_tok,
                   n_ff_exp=getattr(c, "moe_intermediate_size", None) or c.intermediate_size,
                   router="sigmoid" if arch in ("dots1", "deepseek_v3") else "softmax",
                   # MixtralTopKRouter and GraniteMoeTopKRouter always renormalise the top-k weights.
                   norm_topk_prob=True if arch in ("mixtral", "granitemoe") else c.norm_topk_prob)
    if arch in ("dots1", "deepseek_v3"):
        exp.update(first_k_dense=c.first_k_dense_replace, router_bias=True, n_group=c.n_group,
                   topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor,
                   n_expert_shared=c.n_shared_experts, n_ff_shexp=c.moe_intermediate_size * c.n_shared_experts)
    if arch == "qwen2_moe":
        exp.update(first_k_dense=len(c.mlp_only_layers), n_expert_shared=1, shared_expert_gate=True,
                   n_ff_shexp=c.shared_expert_intermediate_size)
    if arch == "granitemoe":
        exp.update(embedding_multiplier=c.embedding_multiplier, residual_multiplier=c.residual_multiplier,
                   attention_multiplier=c.attention_multiplier, logits_scaling=c.logits_scaling)
    return exp


@pytest.mark.parametrize("arch", ARCHS)
def test_config_equals_the_transformers_config(converted, arch):
    from transformers import AutoConfig

    from quant.schema import ModelConfig

    src, out, _ = converted(arch, "q4_0")
    cfg = ModelConfig.from_dict(Container(out).metadata["config"])
    for key, want in expected_config(AutoConfig.from_pretrained(src)).items():
        assert getattr(cfg, key) == want, key


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_set_is_complete_with_one_bundle_per_expert_per_moe_layer(converted, arch):
    src, out, summary = converted(arch, "q4_0")
    c = Container(out)
    cfg = c.metadata["config"]
    n_layer, first_dense = cfg["n_layer"], cfg.get("first_k_dense", 0)
    moe_layers = [i for i in range(n_layer) if cfg.get("n_expert") and i >= first_dense]
    assert sorted(int(n.split(".")[1]) for n in c.tensors if n.endswith("ffn_gate_exps.weight")) == moe_layers
    assert all(f"blk.{i}.ffn_gate.weight" in c.tensors for i in range(n_layer) if i not in moe_layers)
    for i in moe_layers:
        gate, up, down = (c.info(f"blk.{i}.ffn_{p}_exps.weight") for p in ("gate", "up", "down"))
        assert gate.shape[0] == cfg["n_expert"] and gate.stride == up.stride == down.stride
        assert gate.offset % ALIGN == 0 and gate.stride % ALIGN == 0
        assert gate.offset < up.offset < down.offset and down.offset + down.nbytes <= gate.offset + gate.stride
    has = lambda suffix: [i for i in range(n_layer) if f"blk.{i}.{suffix}" in c.tensors]  # noqa: E731
    assert has("attn_q.bias") == ([*range(n_layer)] if arch in ("qwen2", "qwen2_moe") else [])
    assert has("ffn_up_shexp.weight") == (moe_layers if arch in ("qwen2_moe", "dots1", "deepseek_v3") else [])
    assert has("ffn_gate_inp_shexp.weight") == (moe_layers if arch == "qwen2_moe" else [])
    assert has("exp_probs_b.bias") == (moe_layers if arch in ("dots1", "deepseek_v3") else [])
    assert ("output.weight" in c.tensors) != cfg["tied_embeddings"]
    assert summary["tensors"] == len(c.tensors)
    assert c.metadata["source"] == {"format": "hf", "dir": src.name, "model_type": arch}


# --- layouts and precisions -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "granitemoe", "qwen3_moe"])
def test_fused_expert_checkpoint_converts_like_the_per_expert_one(models, converted, tmp_path, arch):
    _, per_expert, _ = converted(arch, "q4_0")
    from safetensors import safe_open

    fused_dir = models(arch, original_format=False)
    with safe_open(fused_dir / "model.safetensors", "np") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    out = convert_hf(fused_dir, tmp_path / "fused.lmc", "q4_0")
    a, b = Container(per_expert), Container(tmp_path / "fused.lmc")
    assert sorted(a.tensors) == sorted(b.tensors)
    assert all(np.array_equal(a.raw(n), b.raw(n)) for n in a.tensors)
    assert out["tensors"] == len(a.tensors)


def test_sharded_checkpoint_with_an_index_converts_like_a_single_file(models, converted, tmp_path):
    sharded = models("deepseek_v3", max_shard_size="64KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    _, single, _ = converted("deepseek_v3", "q4_0")
    convert_hf(sharded, tmp_path / "s.lmc", "q4_0")
    a, b = Container(single), Container(tmp_path / "s.lmc")
    assert all(np.array_equal(a.raw(n), b.raw(n)) for n in a.tensors) and a.tensors.keys() == b.tensors.keys()


def test_bf16_checkpoint_converts_exactly(converted):
    from safetensors import safe_open

    src, out, _ = converted("deepseek_v3", "f16", dtype="bfloat16")
    with safe_open(src / "model.safetensors", "np") as f:
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "BF16"
    # transformers widens bf16 to float32 exactly; F32 tensors (router, norms) must equal that bit for bit.
    assert_matches_reference(out, src, "f16")


def test_deepseek_without_query_lora_has_a_plain_query_projection(converted):
    src, out, _ = converted("deepseek_v3", "q4_0", overrides={"q_lora_rank": None})
    c = Container(out)
    assert c.metadata["config"]["q_lora_rank"] == 0
    assert "blk.0.attn_q.weight" in c.tensors and "blk.0.attn_q_a.weight" not in c.tensors
    assert_matches_reference(out, src, "q4_0")


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_other_quant_types_follow_the_policy(converted, qtype):
    src, out, _ = converted("qwen2_moe", qtype)
    assert_matches_reference(out, src, qtype)
    assert Container(out).metadata["quant"]["type"] == qtype


def test_summary_reports_bytes_and_rms_error(converted):
    from safetensors import safe_open

    src, out_f16, s16 = converted("mixtral", "f16")
    _, _, s4 = converted("mixtral", "q4_0")
    with safe_open(src / "model.safetensors", "np") as f:
        input_bytes = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert s16["input_bytes"] == s4["input_bytes"] == input_bytes
    assert s16["output_bytes"] == out_f16.stat().st_size
    assert set(s16["rms_error"]) == set(Container(out_f16).tensors)
    assert s16["rms_error"]["blk.0.attn_norm.weight"] == 0.0
    w = s4["rms_error"]["blk.0.ffn_gate_exps.weight"]
    assert 0 < s16["rms_error"]["blk.0.ffn_gate_exps.weight"] < 1e-3 < w < 0.05


def test_progress_counts_up_to_every_tensor_and_byte(models, tmp_path):
    calls = []
    s = convert_hf(models("qwen2_moe"), tmp_path / "p.lmc", "q4_0", progress=lambda *a: calls.append(a))
    assert calls[-1] == (s["tensors"], s["tensors"], s["input_bytes"], s["input_bytes"])
    assert all(a[0] <= b[0] and a[2] <= b[2] for a, b in zip(calls, calls[1:]))


# --- tokenizer, chat template, config variants -----------------------------------------------------


def test_tokenizer_json_metadata_encodes_like_transformers(converted):
    from transformers import AutoTokenizer

    from lmcli.tokenizer import Tokenizer

    src, out, _ = converted("llama", "q4_0")
    meta = Container(out).metadata
    tok, hf = Tokenizer.from_metadata(meta["tokenizer"]), AutoTokenizer.from_pretrained(src)
    for text in ["hello world", "<|im_start|>user\nWhy the model?<|im_end|>\n", "Ünïcode 1234 (ok)"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert meta["tokenizer"]["bos_token_id"] == tiny_models.BOS_ID and tiny_models.EOS_ID in tok.eos_ids
    assert meta["chat_template"] == CHATML


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("where", ["tokenizer_config", "jinja_file", "named_list"])
def test_chat_template_is_found_where_hugging_face_keeps_it(models, tmp_path, where):
    d = _copy(models("llama"), tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    if where == "jinja_file":
        del tc["chat_template"]
        (d / "chat_template.jinja").write_text(CHATML)
    elif where == "named_list":
        tc["chat_template"] = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": CHATML}]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    convert_hf(d, tmp_path / "o.lmc", "q4_0")
    assert Container(tmp_path / "o.lmc").metadata["chat_template"] == CHATML


def test_sentencepiece_only_tokenizer_becomes_llama_cpp_style_fields(models, tmp_path):
    import sentencepiece as spm

    from lmcli.tokenizer import Tokenizer

    d = _copy(models("llama"), tmp_path / "m")
    (d / "tokenizer.json").unlink()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_models._corpus(random.Random(1))))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=360,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}))
    convert_hf(d, tmp_path / "o.lmc", "q4_0")
    meta = Container(tmp_path / "o.lmc").metadata["tokenizer"]
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    n = sp.vocab_size()
    assert meta["model"] == "llama" and len(meta["tokens"]) == tiny_models.vocab_size()
    assert meta["tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert meta["tokens"][n:] == [f"[PAD{i}]" for i in range(n, len(meta["tokens"]))]
    assert np.allclose(meta["scores"][:n], [sp.get_score(i) for i in range(n)])
    assert meta["token_type"][meta["tokens"].index("<0x41>")] == gguf.TokenType.BYTE
    assert meta["token_type"][sp.unk_id()] == gguf.TokenType.UNKNOWN
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["add_bos_token"]) == (sp.bos_id(), sp.eos_id(), True)
    tok = Tokenizer.from_metadata(meta)
    for text in ["hello world", "the model of a cat 42"]:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text


def test_legacy_top_level_rope_theta_and_scaling_are_read(models, tmp_path):
    d = _copy(models("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 12345.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 128}
    (d / "config.json").write_text(json.dumps(cfg))
    convert_hf(d, tmp_path / "o.lmc", "q4_0")
    got = Container(tmp_path / "o.lmc").metadata["config"]
    assert got["rope_theta"] == 12345.0 and got["rope_scaling"]["rope_type"] == "llama3"


# --- streaming -------------------------------------------------------------------------------------

# Peak RSS of the conversion alone. ru_maxrss cannot tell: Linux carries the forking parent's high-water mark
# (pytest with torch loaded) across exec. VmHWM can be reset (clear_refs 5) once imports and a warm-up are done.
_PEAK_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import numpy, sentencepiece, tokenizers  # imported before the baseline: they are fixed overhead
    from quant.convert import convert_hf
    status = lambda key: int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    warm, big, out = sys.argv[1:4]
    convert_hf(warm, out + ".warm", "q4_0")  # first-use allocations (numpy, tokenizer) happen here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    s = convert_hf(big, out, "q4_0")
    print(json.dumps({"delta_bytes": status("VmHWM") - base, "input_bytes": s["input_bytes"]}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_conversion_streams_with_peak_memory_far_below_the_model_size(models, tmp_path):
    big = tiny_models.build("mixtral", tmp_path / "big", max_shard_size="24MB", overrides=dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=10, num_local_experts=8, head_dim=64))
    limit = 16 << 20
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(models("mixtral")), str(big), str(tmp_path / "b.lmc")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["input_bytes"] > 8 * limit
    assert m["delta_bytes"] < limit, m


# --- bad input: one clear ConvertError each, and nothing written ------------------------------------


def _safetensors(path: Path, entries: dict, data: bytes, hlen: int | None = None) -> None:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header) if hlen is None else hlen) + header + data)


def _truncate(d):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _huge_header(d):
    p = d / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:])


def _overlap(d):
    f32 = lambda b, e: {"dtype": "F32", "shape": [(e - b) // 4], "data_offsets": [b, e]}  # noqa: E731
    _safetensors(d / "model.safetensors", {"a": f32(0, 256), "b": f32(128, 384)}, bytes(384))


def _dtype(d):
    _safetensors(d / "model.safetensors", {"model.norm.weight": {"dtype": "F64", "shape": [64],
                                                                  "data_offsets": [0, 512]}}, bytes(512))


def _index_escape(d):
    shutil.copy(d / "model.safetensors", d.parent / "x.safetensors")
    index = {"weight_map": {"model.norm.weight": "../x.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _symlink_escape(d):
    (d / "model.safetensors").rename(d.parent / "elsewhere.safetensors")
    (d / "model.safetensors").symlink_to(d.parent / "elsewhere.safetensors")


def _model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))


def _only_pickle(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")


def _unknown_tensor(d):
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "model.safetensors")
    save_file({**t, "model.layers.0.mlp.mystery.weight": np.zeros((4, 64), np.float32)}, d / "model.safetensors")


def _duplicate_across_shards(d):
    from safetensors.numpy import save_file

    save_file({"model.norm.weight": np.ones(64, np.float32)}, d / "extra.safetensors")


def _nan_in_last_tensor(d):  # found after the header is written: the temporary file must go
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "model.safetensors")
    t["model.norm.weight"][3] = np.nan
    save_file(t, d / "model.safetensors")


def _huge_weight(d):  # finite, but beyond the fp16 scale of q4_0 (max / 8 > 65504): an infinite scale before
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][1, 2] = 6e5
    save_file(t, d / "model.safetensors")


_DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 levels deep (issue 19, item 6)


def _deep_config(d):
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg.rstrip()[:-1] + ', "deep": ' + _DEEP + "}")


def _deep_safetensors_header(d):
    header = ('{"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}, "x": ' + _DEEP
              + "}").encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(256))


BAD_INPUTS = {
    "truncated_shard": (_truncate, "truncated"),
    "header_length_2_40": (_huge_header, "header length 1099511627776"),
    "overlapping_offsets": (_overlap, "overlap"),
    "unknown_dtype": (_dtype, "F64"),
    "missing_config": (lambda d: (d / "config.json").unlink(), "config.json"),
    "missing_tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer"),
    "index_names_a_file_outside": (_index_escape, r"\.\./x\.safetensors"),
    "symlink_outside": (_symlink_escape, "symlink"),
    "unsupported_model_type": (_model_type, "gpt_neox.*supported: llama"),
    "only_pytorch_bin": (_only_pickle, "pickle"),
    "unknown_tensor_name": (_unknown_tensor, "model.layers.0.mlp.mystery.weight"),
    "tensor_in_two_shards": (_duplicate_across_shards, "model.norm.weight appears in both"),
    "non_finite_weight": (_nan_in_last_tensor, "non-finite"),
    "config_nested_100000_deep": (_deep_config, "config.json is not valid JSON .nested too deeply"),
    "safetensors_header_nested_100000_deep": (_deep_safetensors_header, "nested too deeply"),
    "weight_beyond_the_fp16_scale": (_huge_weight, "model.layers.0.mlp.up_proj.weight: values up to 6e.05 overflow "
                                                   "q4_0's 16-bit scales"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_error_and_writes_nothing(models, tmp_path, case):
    mutate, match = BAD_INPUTS[case]
    d = _copy(models("llama"), tmp_path / "src" / "m")
    mutate(d)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConvertError, match=match) as e:
        convert_hf(d, out_dir / "m.lmc", "q4_0")
    assert "\n" not in str(e.value)
    assert list(out_dir.iterdir()) == []


def test_f16_refuses_a_value_beyond_half_precision_and_q8_0_holds_it(models, tmp_path):
    d = _copy(models("llama"), tmp_path / "src" / "m")
    _huge_weight(d)
    with pytest.raises(ConvertError, match="overflow f16's 16-bit values"):
        convert_hf(d, tmp_path / "f16.lmc", "f16")
    assert not (tmp_path / "f16.lmc").exists()
    convert_hf(d, tmp_path / "q8.lmc", "q8_0")
    c = Container(tmp_path / "q8.lmc")
    w = dequantize_interleaved(*c.matrix("blk.0.ffn_up.weight"), c.info("blk.0.ffn_up.weight").fmt, 64, 64)
    assert abs(w[1, 2] - 6e5) < 6e5 / 127


def test_existing_output_is_kept_unless_overwrite(models, tmp_path):
    out = tmp_path / "m.lmc"
    out.write_bytes(b"precious")
    with pytest.raises(ConvertError, match="exists"):
        convert_hf(models("llama"), out, "q4_0")
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["m.lmc"]
    convert_hf(models("llama"), out, "q4_0", overwrite=True)
    assert Container(out).metadata["source"]["model_type"] == "llama"


def test_matrix_rows_that_are_not_whole_blocks_fall_back_to_f16_and_experts_say_how(tmp_path):
    """Issue 17: `quantize` refused any row length not a multiple of 32, even at f16. A dense matrix now falls
    back to f16 per tensor (reported by the CLI); expert matrices, which share one format per layer, are refused
    at q4_0 with what to do, and convert at f16."""
    d = tiny_models.build("llama", tmp_path / "m", overrides={"intermediate_size": 48})
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(d), str(tmp_path / "o.lmc"), "--type",
                        "q4_0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ("2 matrices kept at f16, their rows not whole q4_0 blocks: blk.0.ffn_down.weight, "
            "blk.1.ffn_down.weight") in r.stdout
    c = Container(tmp_path / "o.lmc")
    assert c.info("blk.0.ffn_down.weight").fmt is F16 and c.info("blk.0.ffn_up.weight").fmt.name == "q4_0"
    moe = tiny_models.build("mixtral", tmp_path / "moe", overrides={"intermediate_size": 48})
    with pytest.raises(ConvertError, match="blk.0.ffn_down_exps.weight: row length 48 is not a multiple of 32 "
                                           r"\(experts of q4_0 need whole blocks; convert with --type f16\)"):
        convert_hf(moe, tmp_path / "moe.lmc", "q4_0")
    assert not (tmp_path / "moe.lmc").exists()
    assert convert_hf(moe, tmp_path / "moe.lmc", "f16")["fallback"] == {}
