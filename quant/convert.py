"""Hugging Face model directory (safetensors, config, tokenizer) -> lmcli container, streaming one tensor at a time."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .container import Container, ContainerWriter
from .errors import ContainerError, ConvertError
from .formats import F32, FORMATS, GROUP, Q4_0, Q4_1, Q8_0, TILE, Format
from .quantize import dequantize_interleaved, quantize_matrix
from .safetensors_io import DTYPES, TensorEntry, TensorSource, TensorTable, collect_entries, open_model_dir

QTYPES = ("q4_0", "q4_1", "q8_0", "f16")
CHUNK_BYTES = 8 << 20  # float32 rows quantized at a time: bounds the temporaries of one large matrix


# --- architectures ------------------------------------------------------------------------------


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


def read_config(cfg: dict) -> dict:
    """lmcli's model config (lmcli/engine/config.py's ModelConfig keys) from a config.json dict."""
    model_type = cfg.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ConvertError(f"model_type {model_type!r} is not supported (supported: {', '.join(ARCHS)})")
    hf = _HF(cfg, arch)
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
    _check(out)
    # Not (yet) fields of lmcli's ModelConfig: recorded for the engine to honour or refuse.
    out["rope_scaling"] = scaling
    out["sliding_window"] = _sliding_window(hf, arch, n_layer)
    return out


def _check(cfg: dict) -> None:
    """The consistency lmcli's engine needs, checked now rather than when the container is loaded."""
    if cfg["n_head"] % cfg["n_head_kv"]:
        raise ConvertError(f"config.json: {cfg['n_head']} attention heads are not a multiple of "
                           f"{cfg['n_head_kv']} KV heads")
    if cfg["head_dim"] % 2 or cfg["rope_dim"] % 2:
        raise ConvertError(f"config.json: head_dim {cfg['head_dim']} and the rotary dimension must be even")
    if cfg.get("n_expert"):
        if not 1 <= cfg["n_expert_used"] <= cfg["n_expert"]:
            raise ConvertError(f"config.json: num_experts_per_tok {cfg['n_expert_used']} is not in "
                               f"[1, {cfg['n_expert']}]")
        n_group, topk_group = cfg.get("n_group", 1), cfg.get("topk_group", 1)
        if cfg["n_expert"] % n_group or not 1 <= topk_group <= n_group:
            raise ConvertError(f"config.json: n_group {n_group} / topk_group {topk_group} do not divide "
                               f"{cfg['n_expert']} experts")


# --- tensor names -------------------------------------------------------------------------------

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {  # suffix after "model.layers.N." -> name after "blk.N." (llama.cpp's, gguf.constants)
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",  # Mixtral
    "block_sparse_moe.router.layer.weight": "ffn_gate_inp.weight",  # Granite as saved
    "block_sparse_moe.router.weight": "ffn_gate_inp.weight",  # Granite as held in memory
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# One expert's matrix: Mixtral's w1 (gate), w3 (up), w2 (down); the others' gate_proj, up_proj, down_proj.
_EXPERT_RE = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# All experts in one 3-D tensor: transformers 5's in-memory gate_up_proj (n_expert, 2 * n_ff_exp, n_embd), first
# half gate (MixtralExperts: .chunk(2, dim=-1)), and down_proj (n_expert, n_embd, n_ff_exp); GraniteMoe saves
# them as input_linear / output_linear (conversion_mapping renames them to gate_up_proj / down_proj).
_FUSED = {
    "mlp.experts.gate_up_proj": "gate_up", "block_sparse_moe.experts.gate_up_proj": "gate_up",
    "block_sparse_moe.input_linear.weight": "gate_up",
    "mlp.experts.down_proj": "down", "block_sparse_moe.experts.down_proj": "down",
    "block_sparse_moe.output_linear.weight": "down",
}


@dataclass(frozen=True)
class Piece:
    """Rows [row0, row0 + n_rows) of a source tensor viewed as 2-D (-1, row_len)."""

    src: str
    row0: int
    n_rows: int
    row_len: int


@dataclass(frozen=True)
class Out:
    """One container tensor: its name, shape, format, and where its data comes from (one piece per expert)."""

    name: str
    shape: tuple[int, ...]  # (n,) vector, (n_out, n_in) matrix, (n_expert, n_out, n_in) expert matrices
    fmt: Format
    pieces: tuple[Piece, ...]


def _assignments(name: str, shape: tuple[int, ...], cfg: dict, ignore_layers: range):
    """Where one source tensor goes: a list of (container name, expert or None, piece); None if unknown;
    [] if deliberately dropped."""
    if not 1 <= len(shape) <= 3:
        return None
    whole = Piece(name, 0, shape[0] if len(shape) == 2 else 1, shape[-1])
    if len(shape) == 3 and not name.endswith(tuple(_FUSED)):
        return None  # only the fused expert tensors are 3-D
    if name in _GLOBAL:
        target = _GLOBAL[name]
        if target == "output.weight" and cfg["tied_embeddings"]:
            return []  # tied: HF ignores a stored lm_head too
        return [(target, None, whole)]
    m = _LAYER_RE.fullmatch(name)
    if m is None:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if rest.endswith("rotary_emb.inv_freq") or i in ignore_layers:
        return []  # a recomputed buffer; DeepSeek-V3's multi-token-prediction layers (not used for decoding)
    if i >= cfg["n_layer"]:
        return None
    if rest in _LAYER:
        return [(f"blk.{i}.{_LAYER[rest]}", None, whole)]
    m = _EXPERT_RE.fullmatch(rest)
    if m is not None:
        return [(f"blk.{i}.ffn_{_EXPERT_PART[m.group(2)]}_exps.weight", int(m.group(1)), whole)]
    kind = _FUSED.get(rest)
    if kind is None or len(shape) != 3:
        return None
    n_expert, n_rows, n_in = shape
    if kind == "down":
        return [(f"blk.{i}.ffn_down_exps.weight", e, Piece(name, e * n_rows, n_rows, n_in)) for e in range(n_expert)]
    if n_rows % 2:
        raise ConvertError(f"tensor {name} {list(shape)}: gate_up rows must be an even count (gate, then up)")
    half = n_rows // 2
    return [(f"blk.{i}.ffn_{part}_exps.weight", e, Piece(name, e * n_rows + k * half, half, n_in))
            for e in range(n_expert) for k, part in enumerate(("gate", "up"))]


def _format(name: str, shape: tuple[int, ...], qtype: Format) -> Format:
    """The precision policy (as llama.cpp and mlx-lm): vectors and routers F32; embeddings and output at least
    8-bit; everything else qtype."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return F32
    if name in ("token_embd.weight", "output.weight") and qtype in (Q4_0, Q4_1):
        return Q8_0
    return qtype


def expected_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the container must hold for this config, in file order, with its shape."""
    E, D, V = cfg.get("n_expert", 0), cfg["n_embd"], cfg["vocab_size"]
    H, Hkv, hd = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]
    out = [("token_embd.weight", (V, D))]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (D,)))
        if cfg.get("kv_lora_rank"):
            qr, kvr, v = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["v_head_dim"]
            if qr:
                out += [(b + "attn_q_a.weight", (qr, D)), (b + "attn_q_a_norm.weight", (qr,)),
                        (b + "attn_q_b.weight", (H * hd, qr))]
            else:
                out.append((b + "attn_q.weight", (H * hd, D)))
            out += [(b + "attn_kv_a_mqa.weight", (kvr + cfg["qk_rope_head_dim"], D)),
                    (b + "attn_kv_a_norm.weight", (kvr,)),
                    (b + "attn_kv_b.weight", (H * (cfg["qk_nope_head_dim"] + v), kvr)),
                    (b + "attn_output.weight", (D, H * v))]
        else:
            out += [(b + "attn_q.weight", (H * hd, D)), (b + "attn_k.weight", (Hkv * hd, D)),
                    (b + "attn_v.weight", (Hkv * hd, D))]
            if cfg["attn_bias"]:
                out += [(b + "attn_q.bias", (H * hd,)), (b + "attn_k.bias", (Hkv * hd,)),
                        (b + "attn_v.bias", (Hkv * hd,))]
            if cfg["qk_norm"] == "head":
                out += [(b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,))]
            elif cfg["qk_norm"] == "full":
                out += [(b + "attn_q_norm.weight", (H * hd,)), (b + "attn_k_norm.weight", (Hkv * hd,))]
            out.append((b + "attn_output.weight", (D, H * hd)))
        out.append((b + "ffn_norm.weight", (D,)))
        if E and i >= cfg["first_k_dense"]:
            F, Fs = cfg["n_ff_exp"], cfg.get("n_ff_shexp", 0)
            out.append((b + "ffn_gate_inp.weight", (E, D)))
            if cfg.get("router_bias"):
                out.append((b + "exp_probs_b.bias", (E,)))
            if cfg.get("n_expert_shared"):
                if cfg.get("shared_expert_gate"):
                    out.append((b + "ffn_gate_inp_shexp.weight", (D,)))
                out += [(b + "ffn_gate_shexp.weight", (Fs, D)), (b + "ffn_up_shexp.weight", (Fs, D)),
                        (b + "ffn_down_shexp.weight", (D, Fs))]
            out += [(b + "ffn_gate_exps.weight", (E, F, D)), (b + "ffn_up_exps.weight", (E, F, D)),
                    (b + "ffn_down_exps.weight", (E, D, F))]
        else:
            F = cfg["n_ff"]
            out += [(b + "ffn_gate.weight", (F, D)), (b + "ffn_up.weight", (F, D)), (b + "ffn_down.weight", (D, F))]
    out.append(("output_norm.weight", (D,)))
    if not cfg["tied_embeddings"]:
        out.append(("output.weight", (V, D)))
    return out


def plan_tensors(src: TensorTable, cfg: dict, qtype: Format, hf_cfg: dict) -> list[Out]:
    """Match every source tensor to a container tensor and check every name and shape (nanoGPT's habit):
    an unknown or unexpected source tensor, a missing one, or a shape mismatch is an error."""
    mtp = int(hf_cfg.get("num_nextn_predict_layers") or 0) if cfg["arch"] == "deepseek_v3" else 0
    ignore = range(cfg["n_layer"], cfg["n_layer"] + mtp)
    want = dict(expected_tensors(cfg))
    given: dict[str, dict] = {}
    for name in src.names():
        shape = src.shape(name)
        found = _assignments(name, shape, cfg, ignore)
        if found is None:
            raise ConvertError(f"tensor {name} {list(shape)} is not part of a {cfg['arch']} model lmcli knows")
        for target, expert, piece in found:
            if target not in want:
                raise ConvertError(f"tensor {name} (-> {target}) does not belong in this model's config")
            slot = given.setdefault(target, {})
            if expert in slot:
                raise ConvertError(f"{target}{'' if expert is None else f' expert {expert}'} is given twice "
                                   f"({slot[expert].src} and {name})")
            slot[expert] = piece
    plan = []
    for target, shape in want.items():
        slot = given.get(target)
        if not slot:
            raise ConvertError(f"no source tensor for {target}")
        if len(shape) == 3:
            if sorted(slot, key=lambda e: -1 if e is None else e) != list(range(shape[0])):
                have = sorted(e for e in slot if e is not None)
                raise ConvertError(f"{target}: experts {have[:8]}{'...' if len(have) > 8 else ''} given, "
                                   f"{shape[0]} expected")
            pieces = tuple(slot[e] for e in range(shape[0]))
            n_out, n_in = shape[1:]
        else:
            pieces = (slot[None],)
            n_out, n_in = (1, shape[0]) if len(shape) == 1 else shape
        for p in pieces:
            if (p.n_rows, p.row_len) != (n_out, n_in) or (len(shape) == 2 and src.shape(p.src) != shape):
                raise ConvertError(f"tensor {p.src} has shape {list(src.shape(p.src))}; {target} needs "
                                   f"{list(shape)}")
        if len(shape) > 1 and shape[-1] % GROUP:
            raise ConvertError(f"{target}: row length {shape[-1]} is not a multiple of {GROUP}")
        plan.append(Out(target, shape, _format(target, shape, qtype), pieces))
    return plan


# --- tokenizer and chat template ----------------------------------------------------------------

# GGUF token types (llama.cpp's llama_token_type), as convert_hf_to_gguf.py writes them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path.parent.name} has no {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path.name} is not a JSON object")
    return data


def _token_text(entry) -> str | None:
    """tokenizer_config's bos_token / eos_token: a string, or a serialized AddedToken {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _ids(value) -> list:
    return list(value) if isinstance(value, list) else ([] if value is None else [value])


def _check_id(v, n: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise ConvertError(f"{what} {v!r} is not a token id of this vocabulary ({n} tokens)")
    return v


def _special_ids(lookup: Callable[[str], int | None], n: int, tc: dict, gen: dict, cfg: dict):
    """bos id and eos ids: tokenizer_config's tokens first, then generation_config, then config.json
    (gguf.SpecialVocab's order); every eos that generation_config lists ends generation too."""

    def by_text(key):
        text = _token_text(tc.get(key))
        if text is None:
            return None
        tid = lookup(text)
        if tid is None:
            raise ConvertError(f"tokenizer_config.json: {key} {text!r} is not in the vocabulary")
        return tid

    bos = by_text("bos_token")
    if bos is None:
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is not None:
        bos = _check_id(bos, n, "bos_token_id")
    eos = _ids(by_text("eos_token")) + _ids(gen.get("eos_token_id"))
    if not eos:
        eos = _ids(cfg.get("eos_token_id"))
    eos = list(dict.fromkeys(_check_id(e, n, "eos_token_id") for e in eos))
    return bos, (eos[0] if len(eos) == 1 else eos or None)


def _adds_bos(tok_json: dict, bos_text: str | None) -> bool:
    """Whether the fast tokenizer's post-processor prepends BOS (gguf.SpecialVocab's reading of
    TemplateProcessing), for configs without add_bos_token."""
    post = tok_json.get("post_processor") or {}
    for proc in post.get("processors", [post]) if isinstance(post, dict) else []:
        single = proc.get("single") if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing" else None
        if isinstance(single, list) and len(single) > 1 and isinstance(single[0], dict):
            first = (single[0].get("SpecialToken") or {}).get("id")
            if first is not None and first == bos_text:
                return True
    return False


def _hf_tokenizer(directory: Path, tc: dict, gen: dict, cfg: dict) -> dict:
    import tokenizers

    path = directory / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
        backend = tokenizers.Tokenizer.from_str(text)
        tok_json = json.loads(text)
    except Exception as e:  # OSError, bad UTF-8 or JSON; the Rust library raises plain Exception
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"tokenizer.json cannot be read ({why})") from None
    n = backend.get_vocab_size(with_added_tokens=True)
    bos, eos = _special_ids(backend.token_to_id, n, tc, gen, cfg)
    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _adds_bos(tok_json, _token_text(tc.get("bos_token")))
    return {"json": text, "bos_token_id": bos, "eos_token_id": eos, "add_bos_token": add_bos, "_n": n}


def _spm_tokenizer(directory: Path, tc: dict, gen: dict, cfg: dict, vocab_size: int) -> dict:
    """A SentencePiece tokenizer.model as GGUF tokenizer fields, the way llama.cpp's convert_hf_to_gguf.py
    (_create_vocab_sentencepiece) writes them: pieces, scores, types, added tokens, [PADn] up to vocab_size."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(directory / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"tokenizer.model cannot be read ({e})") from None
    n_sp = sp.vocab_size()
    if n_sp > vocab_size:
        raise ConvertError(f"tokenizer.model has {n_sp} pieces, more than the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(n_sp):
        tokens[i], scores[i] = sp.IdToPiece(i), float(sp.GetScore(i))
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    added = _read_json(directory / "added_tokens.json")
    decoder = tc.get("added_tokens_decoder") or {}
    entries = [(tid, text, False) for text, tid in added.items()]
    entries += [(int(tid), d.get("content"), bool(d.get("special")))
                for tid, d in decoder.items() if isinstance(d, dict) and str(tid).isdigit()]
    for tid, text, special in entries:
        if not isinstance(tid, int) or not 0 <= tid < vocab_size or not isinstance(text, str) or not text:
            raise ConvertError(f"added token {text!r} has id {tid!r}, outside the vocabulary of {vocab_size}")
        tokens[tid], scores[tid], types[tid] = text, -1000.0, CONTROL if special else USER_DEFINED
    if len(set(tokens)) != len(tokens):
        raise ConvertError("tokenizer.model and its added tokens name the same token twice")
    index = {t: i for i, t in enumerate(tokens)}
    bos, eos = _special_ids(index.get, vocab_size, tc, gen, cfg)
    if bos is None and sp.bos_id() >= 0:
        bos = sp.bos_id()
    if eos is None and sp.eos_id() >= 0:
        eos = sp.eos_id()
    # SentencePiece's add_dummy_prefix, read from behaviour (no protobuf needed): a leading "▁" on plain text.
    pieces = sp.EncodeAsPieces("a")
    add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
    return {
        "model": "llama",
        "pre": "default",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "unk_token_id": sp.unk_id() if sp.unk_id() >= 0 else None,
        "pad_token_id": cfg.get("pad_token_id") if isinstance(cfg.get("pad_token_id"), int) else None,
        "add_bos_token": add_bos if isinstance(add_bos, bool) else True,
        "add_eos_token": add_eos if isinstance(add_eos, bool) else False,
        "add_space_prefix": bool(pieces) and pieces[0].startswith("\u2581"),
        "_n": vocab_size,
    }


def read_tokenizer(directory: Path, cfg: dict, vocab_size: int) -> dict:
    """Tokenizer metadata for lmcli.tokenizer.Tokenizer.from_metadata: tokenizer.json as text with its special
    ids, or (SentencePiece only) GGUF-style fields."""
    tc = _read_json(directory / "tokenizer_config.json")
    gen = _read_json(directory / "generation_config.json")
    if (directory / "tokenizer.json").is_file():
        tok = _hf_tokenizer(directory, tc, gen, cfg)
    elif (directory / "tokenizer.model").is_file():
        tok = _spm_tokenizer(directory, tc, gen, cfg, vocab_size)
    else:
        raise ConvertError(f"{directory.name} has no tokenizer (tokenizer.json or tokenizer.model)")
    n = tok.pop("_n")
    if n > vocab_size:
        raise ConvertError(f"the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    return tok


def read_chat_template(directory: Path) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list whose "default" entry is taken), else
    chat_template.jinja, else chat_template.json (gguf.SpecialVocab's order)."""
    template = _read_json(directory / "tokenizer_config.json").get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ConvertError("chat_template is neither a string nor a list of {name, template}")
    return template


# --- conversion ---------------------------------------------------------------------------------


def _convert_rows(src: TensorSource, p: Piece, fmt: Format,
                  measure: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """One matrix (a piece of a source tensor) -> interleaved (codes, scales) and its summed squared error
    (0.0 unless measure).

    Rows are quantized in chunks of whole tiles, so the result equals quantizing the matrix at once while the
    float32 temporaries stay bounded.
    """
    step = max(TILE, CHUNK_BYTES // (4 * p.row_len) // TILE * TILE)
    codes, scales, sq = [], [], 0.0
    for r in range(0, p.n_rows, step):
        n = min(step, p.n_rows - r)
        w = src.read_rows(p.src, p.row0 + r, p.row0 + r + n)  # (n, n_in)
        if not np.isfinite(w).all():
            raise ConvertError(f"tensor {p.src} has non-finite values")
        c, s = quantize_matrix(w, fmt)
        if measure and fmt is not F32:
            sq += float(np.sum(np.square(dequantize_interleaved(c, s, fmt, n, p.row_len) - w, dtype=np.float64)))
        codes.append(c)
        scales.append(s)
    return np.concatenate(codes), np.concatenate(scales), sq


def _piece_bytes(src: TensorSource, p: Piece) -> int:
    return p.n_rows * p.row_len * DTYPES[src.dtype(p.src)][0]


def convert_hf(src_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "q4_0", *,
               overwrite: bool = False, progress: Callable[[int, int, int, int], None] | None = None) -> dict:
    """Convert a local Hugging Face model directory into an lmcli container at out_path (written atomically).

    progress(done_tensors, total_tensors, done_bytes, total_bytes) counts container tensors and source bytes;
    it is called after each tensor and, inside an expert layer, after each expert.
    Returns {"tensors", "input_bytes", "output_bytes", "seconds", "rms_error": {name: float}}.
    """
    t0 = time.perf_counter()
    directory, out = Path(src_dir), Path(out_path)
    if qtype not in QTYPES:
        raise ConvertError(f"unknown quantization type {qtype!r} (choose from {', '.join(QTYPES)})")
    fmt = FORMATS[qtype]
    if not directory.is_dir():
        raise ConvertError(f"{directory} is not a directory")
    if out.suffix == ".gguf":
        raise ConvertError(f"{out.name}: an lmcli container is never named .gguf (llama.cpp cannot read it)")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} exists (refusing to overwrite)")
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent} is not a directory")
    hf_cfg = _read_json(directory / "config.json", required=True)
    cfg = read_config(hf_cfg)
    metadata = _metadata(directory, hf_cfg, cfg, {"format": "hf", "dir": directory.resolve().name})
    with open_model_dir(directory) as src:
        plan = plan_tensors(src, cfg, fmt, hf_cfg)
        metadata["quant"] = _quant_info(plan, qtype)
        total_bytes = sum(_piece_bytes(src, p) for o in plan for p in o.pieces)
        try:
            rms = _write(src, plan, out, overwrite, metadata, progress, total_bytes)
        except ContainerError as e:
            raise ConvertError(str(e)) from None
        except OSError as e:
            raise ConvertError(f"cannot write {out}: {e.strerror or e}") from None
    return {"tensors": len(plan), "input_bytes": total_bytes, "output_bytes": out.stat().st_size,
            "seconds": time.perf_counter() - t0, "rms_error": rms}


def _metadata(directory: Path, hf_cfg: dict, cfg: dict, source: dict) -> dict:
    """The container's metadata but for "quant" (known once the tensors are planned)."""
    return {
        "config": cfg,
        "tokenizer": read_tokenizer(directory, hf_cfg, cfg["vocab_size"]),
        "chat_template": read_chat_template(directory),
        "quant": None,
        "source": {**source, "model_type": cfg["arch"]},
    }


def _quant_info(plan: list[Out], qtype: str) -> dict:
    fmt = FORMATS[qtype]
    formats: dict[str, int] = {}
    for o in plan:
        formats[o.fmt.name] = formats.get(o.fmt.name, 0) + 1
    embd_fmt = _format("token_embd.weight", (2, GROUP), fmt).name
    return {
        "type": qtype,
        "policy": {"vectors": "f32", "ffn_gate_inp": "f32", "token_embd": embd_fmt, "output": embd_fmt,
                   "other": qtype},
        "formats": formats,
        "source_format": "hf",
    }


def _plan_writer(w: ContainerWriter, plan: list[Out]) -> None:
    k = 0
    while k < len(plan):  # the three expert tensors of a layer are consecutive: one bundle per expert
        o = plan[k]
        if len(o.shape) == 3:
            group = plan[k:k + 3]
            w.plan_experts([(g.name, g.fmt, g.shape[1:]) for g in group], o.shape[0])
            k += 3
        else:
            w.plan(o.name, o.fmt, o.shape)
            k += 1


def _write(src, plan: list[Out], out: Path, overwrite: bool, metadata: dict, progress, total_bytes: int) -> dict:
    rms: dict[str, float] = {}
    done_t = done_b = 0
    with ContainerWriter(out, overwrite=overwrite) as w:
        _plan_writer(w, plan)
        w.begin(metadata)
        k = 0
        while k < len(plan):
            o = plan[k]
            if len(o.shape) == 1:
                p = o.pieces[0]
                vec = src.read_rows(p.src, 0, 1).reshape(-1)
                if not np.isfinite(vec).all():
                    raise ConvertError(f"tensor {p.src} has non-finite values")
                w.write(o.name, vec)
                rms[o.name] = 0.0
                group = [o]
            elif len(o.shape) == 2:
                codes, scales, sq = _convert_rows(src, o.pieces[0], o.fmt)
                w.write(o.name, codes, scales)
                rms[o.name] = float(np.sqrt(sq / (o.shape[0] * o.shape[1])))
                group = [o]
            else:
                group = plan[k:k + 3]
                sq = {g.name: 0.0 for g in group}
                for e in range(o.shape[0]):  # expert by expert: one bundle's reads, then its write
                    for g in group:
                        codes, scales, s = _convert_rows(src, g.pieces[e], g.fmt)
                        w.write(g.name, codes, scales, expert=e)
                        sq[g.name] += s
                        done_b += _piece_bytes(src, g.pieces[e])
                    if progress is not None and e + 1 < o.shape[0]:
                        progress(done_t, len(plan), done_b, total_bytes)
                for g in group:
                    rms[g.name] = float(np.sqrt(sq[g.name] / np.prod(g.shape)))
            if len(o.shape) < 3:
                done_b += _piece_bytes(src, o.pieces[0])
            k += len(group)
            done_t += len(group)
            if progress is not None:
                progress(done_t, len(plan), done_b, total_bytes)
        w.finish()
    return rms


# --- shard by shard: converting while a model downloads (lmcli pull) -----------------------------


@dataclass(frozen=True)
class ShardJob:
    """A conversion planned before any shard is read, from the small files (config, tokenizer) and every shard's
    header: the container's metadata and tensors, and which tensors (or experts of one) each shard fills.

    A container tensor may draw on several shards (the experts of one layer spread over two files); each of its
    experts is written when the shard that holds it arrives.
    """

    qtype: str
    metadata: dict
    plan: tuple[Out, ...]
    table: TensorTable  # every source tensor, as the headers describe it
    units: dict[str, tuple[tuple[int, int | None], ...]]  # shard file -> (plan index, expert or None), in order


def plan_shards(src_dir: str | os.PathLike, headers: dict[str, list[TensorEntry]], weight_map: dict[str, str] | None,
                qtype: str, source: dict) -> ShardJob:
    """Plan a conversion from a directory holding config.json and the tokenizer files, and the validated headers
    of every shard (safetensors_io.parse_header); `source` goes into the container's metadata."""
    if qtype not in QTYPES:
        raise ConvertError(f"unknown quantization type {qtype!r} (choose from {', '.join(QTYPES)})")
    directory = Path(src_dir)
    hf_cfg = _read_json(directory / "config.json", required=True)
    cfg = read_config(hf_cfg)
    metadata = _metadata(directory, hf_cfg, cfg, {"format": "hf", **source})
    table = TensorTable(collect_entries([headers[s] for s in sorted(headers)], weight_map))
    plan = plan_tensors(table, cfg, FORMATS[qtype], hf_cfg)
    metadata["quant"] = _quant_info(plan, qtype)
    units: dict[str, list] = {s: [] for s in headers}
    for i, o in enumerate(plan):
        for e, p in enumerate(o.pieces):
            units[table.entry(p.src).shard].append((i, e if len(o.shape) == 3 else None))
    return ShardJob(qtype, metadata, tuple(plan), table, {s: tuple(u) for s, u in units.items()})


def start_container(job: ShardJob, path: str | os.PathLike) -> Path:
    """Create (atomically, replacing any) the container file of a job: its header, every tensor's place, no data."""
    try:
        with ContainerWriter(path, overwrite=True) as w:
            _plan_writer(w, list(job.plan))
            w.begin(job.metadata)
            return w.presize()
    except ContainerError as e:
        raise ConvertError(str(e)) from None


def resumable(job: ShardJob, path: str | os.PathLike) -> bool:
    """Whether a file started by start_container holds this job's layout (so its written tensors can be kept)."""
    try:
        c = Container(path)
    except ContainerError:
        return False
    try:
        want = [(o.name, o.fmt.name, tuple(o.shape)) for o in job.plan]
        have = [(t.name, t.fmt.name, t.shape) for t in c.tensors.values()]
        return sorted(have) == sorted(want) and c.metadata == json.loads(json.dumps(job.metadata))
    finally:
        c.close()


def convert_shard(job: ShardJob, path: str | os.PathLike, shard_dir: str | os.PathLike, shard: str, *,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Convert every tensor (or expert) that one downloaded shard holds into the job's container at path, in place,
    and fsync it. The shard's header must be the one the job was planned from.

    progress(done, total) counts this shard's pieces. OSError (a full disk) is raised as is.
    """
    if shard not in job.units:
        raise ConvertError(f"{shard} is not a shard of this model")
    with TensorSource(shard_dir, files=[shard]) as src:
        planned = sorted((e for e in job.table.entries() if e.shard == shard), key=lambda e: e.start)
        found = sorted((src.entry(n) for n in src.names()), key=lambda e: e.start)
        if found != planned:
            raise ConvertError(f"{shard}: its header differs from the one the conversion was planned from")
        try:
            c = Container(path)
        except ContainerError as e:
            raise ConvertError(str(e)) from None
        places = {name: (t.offset, t.stride, t.nbytes) for name, t in c.tensors.items()}
        c.close()
        units = job.units[shard]
        fd = os.open(path, os.O_WRONLY)
        try:
            for k, (i, expert) in enumerate(units):
                o = job.plan[i]
                p = o.pieces[expert or 0]
                if len(o.shape) == 1:
                    vec = src.read_rows(p.src, 0, 1).reshape(-1)
                    if not np.isfinite(vec).all():
                        raise ConvertError(f"tensor {p.src} has non-finite values")
                    data = vec.tobytes()
                else:
                    codes, scales, _ = _convert_rows(src, p, o.fmt, measure=False)
                    data = codes.tobytes() + scales.tobytes()
                offset, stride, nbytes = places[o.name]
                if len(data) != nbytes:
                    raise ConvertError(f"tensor {o.name}: {len(data)} bytes converted, {nbytes} planned")
                _pwrite_all(fd, data, offset + (expert or 0) * stride)
                if progress is not None:
                    progress(k + 1, len(units))
            os.fsync(fd)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
