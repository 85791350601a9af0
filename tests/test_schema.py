"""The schema (quant/schema.py) against transformers: the tensor list holds exactly the model's parameters, the KV
bytes per token are what transformers' cache holds, the active parameters are what one token's routed experts
use; and a bad config is one SchemaError naming the field, wherever it comes from."""

from __future__ import annotations

import math

import pytest
import tiny_models

from quant.errors import ConvertError, SchemaError
from quant.hf_config import read_config
from quant.schema import ModelConfig, TensorSize, expected_tensors, token_costs


@pytest.fixture(scope="module", params=tiny_models.ARCHS)
def built(request, tmp_path_factory):
    import json

    d = tiny_models.build(request.param, tmp_path_factory.mktemp(request.param) / "hf")
    cfg = read_config(json.loads((d / "config.json").read_text()))
    return d, cfg, tiny_models.reference_model(d)


def _weights(ref) -> int:
    """Every stored weight: the parameters (tied ones once, as the schema lists them once) and the router
    score-correction bias, which DeepSeek-V3-style models hold as a buffer."""
    return sum(p.numel() for p in ref.parameters()) + \
        sum(b.numel() for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias"))


def test_expected_tensors_hold_exactly_the_transformers_parameters(built):
    _, cfg, ref = built
    want = expected_tensors(cfg)
    assert len({n for n, _ in want}) == len(want)  # no name twice
    n_ref = _weights(ref)
    assert sum(math.prod(s) for _, s in want) == n_ref
    experts = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    assert sum(math.prod(s) for n, s in want if n.endswith("_exps.weight")) == experts


def test_token_costs_count_top_k_of_the_routed_experts(built):
    _, cfg, ref = built
    sizes = [TensorSize(n, s, 4 * math.prod(s[1:] if len(s) == 3 else s), s[0] if len(s) == 3 else 0)
             for n, s in expected_tensors(cfg)]
    c = token_costs(cfg, sizes)
    experts = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    total = _weights(ref)
    assert c.params_total == total
    k = cfg.n_expert_used
    assert c.params_active == total - (experts - (experts * k // cfg.n_expert if cfg.n_expert else 0))
    assert c.expert_bytes == 4 * experts and c.expert_bytes_per_token * (cfg.n_expert or 1) == 4 * experts * k
    unread = 0 if cfg.tied_embeddings else (cfg.vocab_size - 1) * cfg.n_embd  # a token reads one embedding row
    # MLA: kv_b is read as the engine's float16 per-head copy (2 bytes a weight), kept beside the file's
    kv_b = sum(p.numel() for n, p in ref.named_parameters() if n.endswith("kv_b_proj.weight"))
    assert c.dense_bytes_per_token == 4 * (total - experts - unread) - 2 * kv_b
    assert c.dense_bytes == 4 * (total - experts) + 2 * kv_b
    assert c.bytes_per_token == c.dense_bytes_per_token + c.expert_bytes_per_token
    assert list(c.moe_layers) == [i for i in range(cfg.n_layer) if cfg.layer_is_moe(i)]


def test_kv_bytes_per_token_are_what_the_transformers_cache_holds(built):
    """transformers' cache holds per token what lmcli's does: K and V per KV head, or MLA's latent and shared RoPE
    key (DynamicCache's MLA layers); lmcli keeps them as float32 (4 bytes) by default, or float16."""
    import torch

    _, cfg, ref = built
    T = 5
    with torch.no_grad():
        out = ref(torch.tensor([[3, 4, 5, 6, 7]]), use_cache=True)
    elems = sum(layer.keys.numel() + layer.values.numel() for layer in out.past_key_values.layers)
    assert cfg.kv_bytes_per_token == cfg.kv_bytes("f32") == elems // T * 4
    assert cfg.kv_bytes("f16") == elems // T * 2
    if cfg.kv_lora_rank:
        assert elems // T == cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_deepseek_v3_kv_cache_is_at_most_80_kb_per_token_at_f16():
    """Issue 20: DeepSeek-V3's real shape (config.json's own keys and values; its YaRN rope_scaling left out, a
    separate piece) caches 61 layers x (512 latent + 64 RoPE key) x 2 bytes, not 61 x 128 heads x (192 + 128) x 4."""
    cfg = read_config({
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 129280, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "max_position_embeddings": 163840, "tie_word_embeddings": False, "hidden_act": "silu",
        "num_nextn_predict_layers": 1})
    sizes = [TensorSize(n, s, math.prod(s[1:] if len(s) == 3 else s) // 2, s[0] if len(s) == 3 else 0)
             for n, s in expected_tensors(cfg)]
    kv = token_costs(cfg, sizes, kv_type="f16").kv_bytes_per_token
    assert kv == 61 * (512 + 64) * 2 == 70272 <= 80_000
    assert cfg.kv_bytes("f32") == token_costs(cfg, sizes).kv_bytes_per_token == 2 * kv
    assert 61 * 128 * (192 + 128) * 4 // kv == 142  # the decompressed float32 cache it replaces


@pytest.mark.parametrize("field,value,match", [
    ("n_head_kv", 3, "not a multiple of 3 KV heads"),
    ("n_expert_used", 9, "9 experts per token"),
    ("n_layer", 0, "n_layer = 0 is out of range"),
    ("head_dim", True, "head_dim = True"),
    ("router", "relu", "unknown router 'relu'"),
    ("rope_scaling", {"rope_type": "dynamic"}, "RoPE scaling 'dynamic'"),
    ("n_group", 3, "n_group 3 / topk_group"),
    # types as strictly as sizes (issue 19): a bool is not a number, a number not a bool, no nesting
    ("rope_theta", {}, r"rope_theta = \{\} is not a finite number"),
    ("norm_eps", float("nan"), "norm_eps = nan is not a finite number"),
    ("norm_eps", True, "norm_eps = True is not a finite number"),
    ("rope_interleaved", [], r"rope_interleaved = \[\] is not true or false"),
    ("tied_embeddings", 1, "tied_embeddings = 1 is not true or false"),
    ("n_embd", 64.0, "n_embd = 64.0 is not an integer"),
    ("arch", 5, "arch = 5 is not a string"),
    ("rope_scaling", {"rope_type": "linear", "factor": {"a": [1] * 100}}, "rope_scaling = .* is not null or an"),
    ("rope_scaling", {"rope_type": "linear"}, "linear RoPE scaling needs a positive factor, got None"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "needs a positive low_freq_factor"),
    ("sliding_window", -1, "sliding_window = -1 is out of range"),
    ("n_ctx_train", 0, "n_ctx_train = 0 is out of range"),
])
def test_a_bad_config_is_one_schema_error_naming_the_field(field, value, match):
    base = dict(arch="mixtral", n_layer=2, n_embd=64, n_ff=64, n_head=4, n_head_kv=2, head_dim=16, vocab_size=10,
                norm_eps=1e-5, n_expert=8, n_expert_used=2, n_ff_exp=32)
    ModelConfig.from_dict(base)
    with pytest.raises(SchemaError, match=match) as e:
        ModelConfig.from_dict({**base, field: value})
    assert str(e.value).startswith("model config: ") and "\n" not in str(e.value)
    with pytest.raises(SchemaError, match="lacks n_embd"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "n_embd"})


def test_numbers_are_stored_as_their_field_type():
    cfg = ModelConfig.from_dict(dict(arch="llama", n_layer=1, n_embd=64, n_ff=64, n_head=4, n_head_kv=4, head_dim=16,
                                     vocab_size=10, norm_eps=1, rope_theta=10000, routed_scaling_factor=2))
    assert type(cfg.norm_eps) is float and type(cfg.rope_theta) is float and type(cfg.routed_scaling_factor) is float


def test_converters_refuse_what_the_schema_refuses_before_writing(tmp_path):
    from quant.convert import convert_hf

    d = tiny_models.build("mixtral", tmp_path / "hf", overrides={"num_experts_per_tok": 5})
    with pytest.raises(ConvertError, match=r"config.json: 5 experts per token is not in \[1, 4\]"):
        convert_hf(d, tmp_path / "m.lmc")
    assert not (tmp_path / "m.lmc").exists()


def test_the_engine_maps_exactly_the_schema(tmp_path):
    """load_weights is driven by the schema: a container with one tensor fewer or one more is refused by name."""
    from lmcli.engine.weights import load_weights
    from lmcli.errors import ModelFileError
    from quant.container import Container
    from quant.convert import convert_hf

    d = tiny_models.build("qwen2_moe", tmp_path / "hf")
    convert_hf(d, tmp_path / "m.lmc", "f16")
    c = Container(tmp_path / "m.lmc")
    cfg = ModelConfig.from_dict(c.metadata["config"])
    assert load_weights(c, cfg).layers[1].ffn.experts is not None
    gone = c.tensors.pop("blk.1.ffn_up_shexp.weight")
    with pytest.raises(ModelFileError, match="blk.1.ffn_up_shexp.weight is missing"):
        load_weights(c, cfg)
    c.tensors["blk.1.ffn_up_shexp.weight"] = gone
    c.tensors["blk.0.mystery.weight"] = c.tensors["output_norm.weight"]
    with pytest.raises(ModelFileError, match="does not use: blk.0.mystery.weight"):
        load_weights(c, cfg)


def test_every_architecture_has_one_row_per_external_format():
    """A variant of an architecture is one row in hf_config.ARCHS and one in gguf_archs.ARCHS: every Hugging Face
    model_type lmcli converts is exportable to GGUF, and every llama.cpp architecture it imports is one it converts."""
    from quant import gguf_archs, hf_config

    assert set(hf_config.ARCHS) <= set(gguf_archs.FOR_EXPORT)
    assert {a.model_type for a in gguf_archs.ARCHS} <= set(hf_config.ARCHS)
    assert len({a.name for a in gguf_archs.ARCHS}) == len(gguf_archs.ARCHS)
