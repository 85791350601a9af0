"""A Hugging Face config.json -> lmcli's ModelConfig (quant/schema.py): one Arch entry per model_type says where
its values live and what its router does; adding a variant of a known architecture is one entry here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import rope
from .errors import ConvertError
from .schema import ModelConfig, SchemaError

@dataclass(frozen=True)
class Arch:
    """How one config.json model_type maps onto lmcli's config: where its values live, and what its router does."""

    defaults: tuple[tuple[str, object], ...] = ()  # that config class's defaults for keys a config.json may omit
    experts: tuple[str, ...] = ()  # config keys for the routed-expert count, first present wins; () = dense
    n_ff_exp: str = "moe_intermediate_size"  # config key of one routed expert's FFN width
    norm_topk: bool | None = None  # fixed by the architecture; None: the config's norm_topk_prob
    router: str = "softmax"
    grouped: bool = False  # e_score_correction_bias, n_group/topk_group, routed_scaling_factor
    shared: str = "none"  # "qwen2": one shared expert behind a sigmoid gate; "deepseek": n_shared_experts, ungated
    dense_layers: str = "none"  # which layers are dense: "qwen" (mlp_only_layers, decoder_sparse_step) | "first_k"
    qk_norm: str = "none"  # "head": RMSNorm over head_dim (Qwen3); "full": over all heads' q or k (OLMoE)
    attn_bias: str = "none"  # "always" (Qwen2's q/k/v) | "qkv_bias" (the Qwen2-MoE config key)
    mla: bool = False  # multi-head latent attention (DeepSeek-V3)
    granite: bool = False  # embedding/residual/attention multipliers and logits scaling
    # Which layers use sliding_window: "window": all (Mistral); else, without a layer_types list, "flag": those
    # use_sliding_window enables (Qwen2Config and kin); "max_window_layers": those from max_window_layers on
    # (Dots1Config).
    sliding: str = "none"


def _d(**kw) -> tuple[tuple[str, object], ...]:
    return tuple(kw.items())


# Each entry was checked against transformers 5.23's modeling_<arch>.py; defaults are its config class's.
ARCHS: dict[str, Arch] = {
    # LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (per-head QK-norm).
    "llama": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=2048)),
    "mistral": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=131072, sliding_window=4096), sliding="window"),
    "qwen2": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=32768), attn_bias="always", sliding="flag"),
    "qwen3": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=32768, head_dim=128), qk_norm="head", sliding="flag"),
    # MixtralTopKRouter: softmax over all experts, top-k, then the k weights are renormalised.
    "mixtral": Arch(_d(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072),
                    experts=("num_local_experts",), n_ff_exp="intermediate_size", norm_topk=True, sliding="window"),
    # Qwen2MoeTopKRouter: softmax, top-k, renormalised iff norm_topk_prob. Qwen2MoeSparseMoeBlock adds
    # sigmoid(shared_expert_gate(x)) * shared_expert(x).
    "qwen2_moe": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=32768, norm_topk_prob=False),
                      experts=("num_experts", "num_local_experts"), shared="qwen2", dense_layers="qwen",
                      attn_bias="qkv_bias", sliding="flag"),
    # Qwen3MoeTopKRouter: as Qwen2-MoE's, no shared expert; Qwen3MoeAttention normalises q and k per head.
    "qwen3_moe": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=32768, norm_topk_prob=False),
                      experts=("num_experts", "num_local_experts"), dense_layers="qwen", qk_norm="head",
                      sliding="flag"),
    # OlmoeTopKRouter: softmax, top-k, renormalised iff norm_topk_prob; OlmoeAttention's q_norm/k_norm are
    # RMSNorms over the whole projection (n_head * head_dim, n_head_kv * head_dim), before the head split.
    "olmoe": Arch(_d(rms_norm_eps=1e-5, max_position_embeddings=4096, norm_topk_prob=False),
                  experts=("num_experts", "num_local_experts"), n_ff_exp="intermediate_size", qk_norm="full"),
    # GraniteMoeTopKRouter: top-k over the logits, softmax over those k = softmax over all, top-k, renormalised.
    "granitemoe": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=2048),
                       experts=("num_local_experts",), n_ff_exp="intermediate_size", norm_topk=True, granite=True),
    # Dots1TopkRouter: sigmoid scores; the bias only chooses (group-limited top-k); weights are the unbiased
    # scores, renormalised iff norm_topk_prob, times routed_scaling_factor. Dots1Attention: per-head QK-norm.
    "dots1": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=2048, norm_topk_prob=False, first_k_dense_replace=0,
                     routed_scaling_factor=1.0, n_group=1, topk_group=1, sliding_window=4096, max_window_layers=62),
                  experts=("n_routed_experts", "num_local_experts"), router="sigmoid", grouped=True,
                  shared="deepseek", dense_layers="first_k", qk_norm="head", sliding="max_window_layers"),
    # DeepseekV3TopkRouter: as Dots1's. DeepseekV3Attention: MLA; with rope_interleave (the default) the rope
    # part rotates adjacent pairs (apply_rotary_pos_emb_interleave), as llama.cpp's DEEPSEEK2 does.
    "deepseek_v3": Arch(_d(rms_norm_eps=1e-6, max_position_embeddings=4096, norm_topk_prob=True,
                           first_k_dense_replace=3, routed_scaling_factor=2.5, n_group=8, topk_group=4, n_shared_experts=1, rope_interleave=True,
                           q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                           v_head_dim=128),
                        experts=("n_routed_experts", "num_local_experts"), router="sigmoid", grouped=True,
                        shared="deepseek", dense_layers="first_k", mla=True),
}

# model_types that name an architecture above under another name. Kimi K2 ships DeepseekV3ForCausalLM as "kimi_k2"
# so that engines can tell it apart; its deployment guide's fallback is to rename it deepseek_v3.
ALIASES = {"kimi_k2": "deepseek_v3"}

_MISSING = object()


class _HF:
    """config.json values with the architecture's defaults, type-checked as they are read."""

    def __init__(self, cfg: dict, arch: Arch):
        self.cfg, self.defaults = cfg, dict(arch.defaults)

    def get(self, key: str, default=_MISSING):
        # An absent key takes the config class's default; an explicit null takes the caller's (it means "none":
        # q_lora_rank null is attention without a query LoRA, not the class's 1536).
        v = self.cfg.get(key)
        if v is not None:
            return v
        if key not in self.cfg and self.defaults.get(key) is not None:
            return self.defaults[key]
        if default is _MISSING:
            raise ConvertError(f"config.json has no {key}")
        return default

    def first(self, keys: tuple[str, ...]):
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        raise ConvertError(f"config.json has no {' or '.join(keys)}")

    def int(self, key: str, default=_MISSING, lo: int = 1) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConvertError(f"config.json: {key} = {v!r} is not an integer >= {lo}")
        return v

    def float(self, key: str, default=_MISSING) -> float:
        v = self.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            raise ConvertError(f"config.json: {key} = {v!r} is not a number")
        return float(v)

    def bool(self, key: str, default=_MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise ConvertError(f"config.json: {key} = {v!r} is not true or false")
        return v


def _rope(hf: _HF) -> tuple[float, dict | None]:
    """rope_theta and the scaling parameters (None for plain RoPE), from transformers 5's rope_parameters or
    the older top-level rope_theta / rope_scaling."""
    params = hf.cfg.get("rope_parameters")
    if params is None:
        params = dict(hf.cfg.get("rope_scaling") or {})
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    if not isinstance(params, dict) or not isinstance(params.get("rope_theta", 10000.0), (int, float)):
        raise ConvertError("config.json: rope_parameters is not a single set of RoPE parameters")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None if kind in (None, "default") else {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and (not isinstance(kind, str) or kind not in rope.KINDS):  # named before the rest
        raise ConvertError(f"config.json: RoPE scaling {kind!r} is not supported yet "
                           f"(supported: {', '.join(rope.KINDS)})")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConvertError(f"config.json: partial_rotary_factor {partial!r} is not supported (RoPE over whole heads)")
    if kind == "yarn" and scaling.get("factor") is None and isinstance(hf.cfg.get("max_position_embeddings"), int):
        # _compute_yarn_parameters: without a factor, the ratio of the context to the original one
        old = scaling.get("original_max_position_embeddings")
        if isinstance(old, int) and not isinstance(old, bool) and old > 0:
            scaling["factor"] = hf.cfg["max_position_embeddings"] / old
    return theta, scaling


def _sliding_window(hf: _HF, arch: Arch, n_layer: int) -> int | None:
    """The attention window if every layer slides, None if none does; a mix is refused."""
    if arch.sliding == "none":
        return None
    window = hf.get("sliding_window", None) or None
    if arch.sliding == "window":
        return window and hf.int("sliding_window")
    types = hf.cfg.get("layer_types")
    if types is None:  # a config from before layer_types: rebuild the list as the config class does
        if arch.sliding == "flag" and not hf.get("use_sliding_window", False):
            window = None
        start = hf.int("max_window_layers", 0, lo=0) if arch.sliding == "max_window_layers" else 0
        if arch.sliding == "flag" and window:
            raise ConvertError("config.json: use_sliding_window without layer_types is not supported")
        types = ["sliding_attention" if window and i >= start else "full_attention" for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer:
        raise ConvertError("config.json: layer_types does not list one type per layer")
    sliding = [t == "sliding_attention" for t in types]
    if not any(sliding):
        return None
    if all(sliding):
        return hf.int("sliding_window")
    raise ConvertError("config.json: a mix of sliding-window and full-attention layers is not supported")


def _moe_layers(hf: _HF, arch: Arch, n_layer: int) -> int:
    """first_k_dense: the config's dense layers must be the first k (lmcli's engine runs that pattern)."""
    if arch.dense_layers == "first_k":
        k = hf.int("first_k_dense_replace", lo=0)
        if k > n_layer:
            raise ConvertError(f"config.json: first_k_dense_replace {k} exceeds num_hidden_layers {n_layer}")
        return k
    if arch.dense_layers == "qwen":
        # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: MoE iff not in mlp_only_layers and (i + 1) % step == 0.
        only = hf.get("mlp_only_layers", [])
        if not isinstance(only, list):
            raise ConvertError(f"config.json: mlp_only_layers {only!r} is not a list")
        step = hf.int("decoder_sparse_step", 1)
        moe = [i not in only and (i + 1) % step == 0 for i in range(n_layer)]
        k = moe.index(True) if any(moe) else n_layer
        if moe != [False] * k + [True] * (n_layer - k):
            raise ConvertError("config.json: mlp_only_layers / decoder_sparse_step give dense layers after MoE "
                               "layers; lmcli supports only the first k layers being dense")
        return k
    return 0


def fp8_blocks(cfg: dict) -> tuple[int, int] | None:
    """The (rows, cols) weight block of a block-FP8 checkpoint (quantization_config: quant_method fp8,
    weight_block_size, as DeepSeek-V3 and Kimi K2 ship them); None without a quantization_config. Any other
    quantization is refused: lmcli converts unquantized and block-FP8 checkpoints."""
    q = cfg.get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "fp8":
        raise ConvertError(f"config.json: quantization_config quant_method {method!r} is not supported "
                           "(lmcli converts unquantized and block-FP8 checkpoints)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConvertError(f"config.json: FP8 format {q.get('fmt')!r} is not supported (only e4m3)")
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConvertError(f"config.json: FP8 weight_block_size {block!r} is not [rows, cols] "
                           "(per-tensor FP8 scales are not supported)")
    return block[0], block[1]


def read_config(cfg: dict) -> ModelConfig:
    """lmcli's model config from a config.json dict, checked against the schema (and its quantization, so that a
    checkpoint lmcli cannot convert is refused before any weight is read)."""
    model_type = cfg.get("model_type")
    model_type = ALIASES.get(model_type, model_type) if isinstance(model_type, str) else model_type
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ConvertError(f"model_type {model_type!r} is not supported (supported: {', '.join([*ARCHS, *ALIASES])})")
    hf = _HF(cfg, arch)
    fp8_blocks(cfg)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"config.json: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    n_layer, n_embd, n_head = hf.int("num_hidden_layers"), hf.int("hidden_size"), hf.int("num_attention_heads")
    n_head_kv = hf.int("num_key_value_heads", n_head)
    head_dim = hf.int("head_dim", n_embd // n_head)
    theta, scaling = _rope(hf)
    out = {
        "arch": model_type,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_ff": hf.int("intermediate_size"),
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "vocab_size": hf.int("vocab_size"),
        "norm_eps": hf.float("rms_norm_eps"),
        "rope_theta": theta,
        "rope_dim": 0,
        "rope_interleaved": False,  # HF checkpoints keep Q/K unpermuted and rotate halves (rotate_half)
        "n_ctx_train": hf.int("max_position_embeddings"),
        "tied_embeddings": hf.bool("tie_word_embeddings", False),
        "attn_bias": False,
        "qk_norm": arch.qk_norm,
    }
    # Biases beyond Qwen2's q/k/v (o_proj, MLP) have no place in lmcli's config: refuse rather than drop them.
    if arch.attn_bias == "always":
        out["attn_bias"] = True
    elif arch.attn_bias == "qkv_bias":
        out["attn_bias"] = hf.bool("qkv_bias", True)
    if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
        raise ConvertError(f"config.json: attention_bias / mlp_bias are not supported for {model_type}")
    if hf.get("clip_qkv", None) is not None:
        raise ConvertError("config.json: clip_qkv is not supported")
    if arch.mla:
        nope, rope = hf.int("qk_nope_head_dim"), hf.int("qk_rope_head_dim")
        out.update(
            q_lora_rank=hf.int("q_lora_rank", 0, lo=0),  # null: q_proj straight from the hidden state
            kv_lora_rank=hf.int("kv_lora_rank"),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=hf.int("v_head_dim"),
            head_dim=nope + rope,
            rope_dim=rope,
            n_head_kv=n_head,  # kv_b_proj expands the latent into keys and values for every head
            rope_interleaved=hf.bool("rope_interleave"),
        )
    if arch.granite:
        # GraniteMoeModel: embeddings * embedding_multiplier; GraniteMoeDecoderLayer: residual + out *
        # residual_multiplier; GraniteMoeAttention: scaling = attention_multiplier; logits / logits_scaling.
        for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
            out[key] = hf.float(key, 1.0)
    if arch.experts:
        n_expert = hf.first(arch.experts)
        out.update(
            n_expert=n_expert,
            n_expert_used=hf.int("num_experts_per_tok"),
            n_ff_exp=hf.int(arch.n_ff_exp),
            first_k_dense=_moe_layers(hf, arch, n_layer),
            router=arch.router,
            norm_topk_prob=arch.norm_topk if arch.norm_topk is not None else hf.bool("norm_topk_prob"),
        )
        if not isinstance(n_expert, int) or isinstance(n_expert, bool) or n_expert < 1:
            raise ConvertError(f"config.json: expert count {n_expert!r} is not a positive integer")
        if arch.grouped:
            out.update(router_bias=True, routed_scaling_factor=hf.float("routed_scaling_factor"),
                       n_group=hf.int("n_group"), topk_group=hf.int("topk_group"))
        if arch.shared == "qwen2":
            n_ff_sh = hf.int("shared_expert_intermediate_size", 0, lo=0)
            out.update(n_expert_shared=1 if n_ff_sh else 0, n_ff_shexp=n_ff_sh, shared_expert_gate=bool(n_ff_sh))
        elif arch.shared == "deepseek":
            # DeepseekV3MoE / Dots1MoE: the shared experts are one MLP of width moe_intermediate_size * n.
            n_sh = hf.int("n_shared_experts", lo=0)
            out.update(n_expert_shared=n_sh, n_ff_shexp=out["n_ff_exp"] * n_sh)
    out["rope_scaling"] = scaling
    out["sliding_window"] = _sliding_window(hf, arch, n_layer)
    try:
        return ModelConfig.from_dict(out)
    except SchemaError as e:
        raise ConvertError(f"config.json: {e.detail}") from None
