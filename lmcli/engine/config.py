"""The model config: one frozen dataclass built from the container's metadata ("config").

Every architecture is this one dataclass; what differs between Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3,
dots.llm1 and Granite is data. Converters (quant/convert.py, quant/gguf_io.py) write these keys.
Tensor names are llama.cpp's (gguf.constants): token_embd, output_norm, output, blk.N.{attn_norm, attn_q,
attn_k, attn_v, attn_output, attn_{q,k,v}.bias, attn_q_norm, attn_k_norm, ffn_norm, ffn_gate, ffn_up,
ffn_down, ffn_gate_inp, exp_probs_b, ffn_{gate,up,down}_exps, ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp,
attn_q_a, attn_q_a_norm, attn_q_b, attn_kv_a_mqa, attn_kv_a_norm, attn_kv_b}.weight (biases .bias).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from ..errors import ModelFileError

ROUTERS = ("softmax", "sigmoid")  # score function; selection and weighting are the other fields
QK_NORMS = ("none", "head", "full")  # none; RMSNorm per head (Qwen3); RMSNorm over all heads (OLMoE)


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # Hugging Face model_type (llama, mixtral, qwen2_moe, ...), or the GGUF architecture
    n_layer: int
    n_embd: int
    n_ff: int  # FFN width of dense layers
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_dim: int = 0  # 0: the whole head (MLA: qk_rope_head_dim)
    rope_interleaved: bool = False  # True: rotate adjacent pairs (llama.cpp NORM); False: halves (NEOX/HF)
    n_ctx_train: int = 2048
    tied_embeddings: bool = False
    rope_scaling: dict | None = None  # None: plain RoPE; {"rope_type": "linear"|"llama3", ...} as transformers
    sliding_window: int = 0  # 0: full causal attention; else each query sees the last sliding_window keys
    attn_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: str = "none"
    # --- Mixture of Experts (n_expert == 0: dense) ---
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # FFN width of one routed expert
    n_expert_shared: int = 0  # shared experts, fused into one FFN of width n_ff_shexp
    n_ff_shexp: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared expert
    first_k_dense: int = 0  # the first k layers are dense (DeepSeek-V3 first_k_dense_replace)
    router: str = "softmax"  # score function over the router logits
    norm_topk_prob: bool = True  # renormalise the selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited selection (DeepSeek-V3): keep topk_group groups of experts
    topk_group: int = 1
    router_bias: bool = False  # e_score_correction_bias added to scores for selection only
    # --- Granite multipliers ---
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 0.0  # 0: 1 / sqrt(head_dim)
    logits_scaling: float = 1.0  # logits are divided by this
    # --- Multi-head latent attention (DeepSeek-V3); kv_lora_rank == 0: standard attention ---
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from metadata, ignoring unknown keys; every size is checked."""
        if not isinstance(d, dict):
            raise ModelFileError("model config is missing from the container")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("sliding_window") is None:
            kw.pop("sliding_window", None)
        missing = [f.name for f in fields(cls) if f.name not in kw and f.default is MISSING]
        if missing:
            raise ModelFileError(f"model config lacks {', '.join(missing)}")
        try:
            cfg = cls(**kw)
        except TypeError as e:
            raise ModelFileError(f"bad model config: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def count(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < (1 << 24):
                raise ModelFileError(f"model config: {name} = {v!r} is out of range")

        for name in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "vocab_size"):
            count(name)
        for name in ("n_expert", "n_expert_used", "n_ff_exp", "n_expert_shared", "n_ff_shexp", "first_k_dense",
                     "rope_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            count(name, 0)
        if self.n_head % self.n_head_kv:
            raise ModelFileError("model config: n_head is not a multiple of n_head_kv")
        if self.head_dim % 2 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ModelFileError("model config: bad head_dim / rope_dim")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ModelFileError("model config: norm_eps and rope_theta must be positive")
        if self.qk_norm not in QK_NORMS:
            raise ModelFileError(f"model config: unknown qk_norm {self.qk_norm!r} (known: {', '.join(QK_NORMS)})")
        if self.router not in ROUTERS:
            raise ModelFileError(f"model config: unknown router {self.router!r} (known: {', '.join(ROUTERS)})")
        if self.n_expert:
            if not 1 <= self.n_expert_used <= self.n_expert or self.n_ff_exp < 1:
                raise ModelFileError("model config: n_expert_used must be in [1, n_expert] and n_ff_exp >= 1")
            if self.n_group < 1 or self.n_expert % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ModelFileError("model config: bad n_group / topk_group")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) \
                if isinstance(self.rope_scaling, dict) else None
            if kind not in ("linear", "llama3"):
                raise ModelFileError(f"model config: RoPE scaling {kind!r} is not supported yet (supported: linear, llama3)")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ModelFileError(f"model config: bad sliding_window {self.sliding_window!r}")
        if self.first_k_dense > self.n_layer:
            raise ModelFileError("model config: first_k_dense exceeds n_layer")

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def layer_is_moe(self, i: int) -> bool:
        return self.n_expert > 0 and i >= self.first_k_dense
