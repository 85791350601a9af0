"""Synthetic models: the DeepSeek-shaped writer's container runs in lmcli as transformers' DeepseekV3 runs the same
weights, built from the config.json the writer leaves in the container's metadata."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quant.container import Container  # noqa: E402
from quant.quantize import dequantize_interleaved  # noqa: E402
from quant.synthetic import write_synthetic_deepseek  # noqa: E402

# Tiny, with the features of the real shape: 64 experts top-6 in 8 groups of which 4 are kept, 2 shared experts,
# the first layer dense, a query LoRA (or none), rope and nope halves of the heads.
TINY = dict(n_layer=3, first_k_dense=1, n_embd=128, n_ff=256, n_ff_exp=64, n_expert=64, n_expert_used=6, n_shared=2,
            n_group=8, topk_group=4, n_head=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
            qk_rope_head_dim=32, v_head_dim=32, vocab=512)
# lmcli's int16 activations and float32 summation order are all that differ (tests/test_architectures.py TIGHT)
TIGHT = 2e-3

# container name (after blk.N.) -> transformers' DeepseekV3 parameter (after model.layers.N.)
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight", "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight", "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def _dequantized(c: Container, name: str, expert: int | None = None) -> np.ndarray:
    t = c.info(name)
    if len(t.shape) == 1:
        return np.array(c.vector(name))
    return dequantize_interleaved(*c.matrix(name, expert), t.fmt, *t.shape[-2:])


def transformers_twin(path):
    """transformers' DeepseekV3ForCausalLM from the container's config.json, its weights the container's, decoded
    by the formats' numpy reference; experts in transformers 5's fused tensors (gate_up_proj: gate rows first)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    c = Container(path)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**c.metadata["source"]["config_json"])).float().eval()
    state = {}
    for name, t in c.tensors.items():
        if name in _GLOBAL:
            state[_GLOBAL[name]] = _dequantized(c, name)
            continue
        _, layer, rest = name.split(".", 2)
        p = f"model.layers.{layer}."
        if rest == "ffn_down_exps.weight":
            state[p + "mlp.experts.down_proj"] = np.stack([_dequantized(c, name, e) for e in range(t.n_expert)])
        elif rest == "ffn_gate_exps.weight":
            up = f"blk.{layer}.ffn_up_exps.weight"
            state[p + "mlp.experts.gate_up_proj"] = np.stack(
                [np.concatenate([_dequantized(c, name, e), _dequantized(c, up, e)]) for e in range(t.n_expert)])
        elif rest != "ffn_up_exps.weight":
            state[p + _LAYER[rest]] = _dequantized(c, name)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    c.close()
    return model


@pytest.mark.parametrize("qtype,q_lora_rank", [("q4_0", 64), ("q8_0", 0)])
def test_the_deepseek_shaped_synthetic_model_runs_as_transformers_deepseek_v3(tmp_path, qtype, q_lora_rank):
    import lmcli

    path = write_synthetic_deepseek(tmp_path / "ds.lmc", qtype=qtype, seed=3, **{**TINY, "q_lora_rank": q_lora_rank})
    ids = [int(t) for t in np.random.default_rng(0).integers(0, TINY["vocab"] - 1, 40)]
    with torch.no_grad():
        ref = transformers_twin(path)(torch.tensor([ids])).logits[0].numpy()
    got = lmcli.load(str(path)).logits(ids)
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < TIGHT


def test_the_writer_keeps_the_shape_it_is_given(tmp_path):
    import lmcli

    m = lmcli.load(str(write_synthetic_deepseek(tmp_path / "ds.lmc", **TINY)))
    cfg = m.config
    assert (cfg.arch, cfg.n_expert, cfg.n_expert_used, cfg.n_group, cfg.topk_group) == ("deepseek_v3", 64, 6, 8, 4)
    assert (cfg.first_k_dense, cfg.n_expert_shared, cfg.n_ff_shexp, cfg.router, cfg.router_bias) == \
        (1, 2, 128, "sigmoid", True)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.routed_scaling_factor) == (64, 64, 2.5)
