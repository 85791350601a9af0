"""The model schema, below both the converters and the engine: the config of every architecture (one frozen
dataclass, validated), the tensors a config implies (names and shapes), and what a token costs (bytes read,
KV cache bytes). Converters (quant/hf_config.py, quant/gguf_io.py) produce a ModelConfig; the engine
(lmcli/engine/weights.py) maps exactly expected_tensors(cfg); `plan`, `show` and `bench` read token_costs.

What differs between Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, dots.llm1 and Granite is data in ModelConfig.
Tensor names are llama.cpp's (gguf.constants): token_embd, output_norm, output, blk.N.{attn_norm, attn_q,
attn_k, attn_v, attn_output, attn_{q,k,v}.bias, attn_q_norm, attn_k_norm, ffn_norm, ffn_gate, ffn_up,
ffn_down, ffn_gate_inp, exp_probs_b, ffn_{gate,up,down}_exps, ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp,
attn_q_a, attn_q_a_norm, attn_q_b, attn_kv_a_mqa, attn_kv_a_norm, attn_kv_b}.weight (biases .bias).
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Iterable

from .errors import SchemaError
from . import rope
from .formats import ALIGN, align_up

ROUTERS = ("softmax", "sigmoid")  # score function; selection and weighting are the other fields
QK_NORMS = ("none", "head", "full")  # none; RMSNorm per head (Qwen3); RMSNorm over all heads (OLMoE)
# bytes of one cached number by KV cache type (lmcli/engine/cache.py). f16 halves the cache (llama.cpp's default)
# but is not the default: its rounding flipped routers in tiny random MoE models past tests/test_architectures.py's
# tolerance against transformers (olmoe and granitemoe at Q8_0: 6.6% and 1.8% logit deviation, 2e-3 allowed)
KV_TYPES = {"f16": 2, "f32": 4}
DEFAULT_KV_TYPE = "f32"
MLA_KV_B_BYTES = 2  # the engine's float16 copy of MLA's kv_b, per weight (lmcli/engine/weights.py)


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
    rope_scaling: dict | None = None  # None: plain RoPE; {"rope_type": "linear"|"llama3"|"yarn", ...} as transformers
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
        """Build from metadata (a container's "config", or what a converter read), ignoring unknown keys; every
        size is checked. Raises SchemaError."""
        if not isinstance(d, dict):
            raise SchemaError("missing")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("sliding_window") is None:
            kw.pop("sliding_window", None)
        missing = [f.name for f in fields(cls) if f.name not in kw and f.default is MISSING]
        if missing:
            raise SchemaError(f"lacks {', '.join(missing)}")
        for f in fields(cls):
            if f.name in kw:
                kw[f.name] = _typed(f.name, f.type, kw[f.name])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        def bad(msg: str):
            raise SchemaError(msg)

        def count(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < (1 << 24):
                bad(f"{name} = {v!r} is out of range")

        for name in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "vocab_size", "n_ctx_train"):
            count(name)
        for name in ("n_expert", "n_expert_used", "n_ff_exp", "n_expert_shared", "n_ff_shexp", "first_k_dense",
                     "rope_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "sliding_window", "n_group", "topk_group"):
            count(name, 0)
        if self.n_head % self.n_head_kv:
            bad(f"{self.n_head} attention heads are not a multiple of {self.n_head_kv} KV heads")
        if self.head_dim % 2 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            bad(f"head_dim {self.head_dim} and the rotary dimension {self.rope_dim} must be even, "
                "the rotary one at most head_dim")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            bad("norm_eps and rope_theta must be positive")
        if self.qk_norm not in QK_NORMS:
            bad(f"unknown qk_norm {self.qk_norm!r} (known: {', '.join(QK_NORMS)})")
        if self.router not in ROUTERS:
            bad(f"unknown router {self.router!r} (known: {', '.join(ROUTERS)})")
        if self.n_expert:
            if not 1 <= self.n_expert_used <= self.n_expert or self.n_ff_exp < 1:
                bad(f"{self.n_expert_used} experts per token is not in [1, {self.n_expert}], or n_ff_exp < 1")
            if self.n_group < 1 or self.n_expert % self.n_group or not 1 <= self.topk_group <= self.n_group:
                bad(f"n_group {self.n_group} / topk_group {self.topk_group} do not divide {self.n_expert} experts")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(bad)
        if self.first_k_dense > self.n_layer:
            bad("first_k_dense exceeds n_layer")

    def _validate_rope_scaling(self, bad) -> None:
        p = self.rope_scaling
        kind = rope.kind(p) if isinstance(p, dict) else None
        if kind not in rope.KINDS:
            bad(f"RoPE scaling {kind!r} is not supported yet (supported: {', '.join(rope.KINDS)})")
        required, optional = rope.KINDS[kind]
        for key in required + optional:
            x = p.get(key)
            if key in optional and x is None:
                continue
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (x > 0 or (key in optional and x == 0)):
                bad(f"{kind} RoPE scaling needs a {'non-negative' if key in optional else 'positive'} {key}, "
                    f"got {_short(x)}")
        if kind == "yarn" and not isinstance(p.get("truncate", True), bool):
            bad(f"yarn RoPE scaling: truncate must be true or false, got {_short(p['truncate'])}")

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def layer_is_moe(self, i: int) -> bool:
        return self.n_expert > 0 and i >= self.first_k_dense

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        """(KV heads, key dim, value dim) of attention as the model defines it (MLA: its decompressed heads)."""
        if self.kv_lora_rank:
            return self.n_head, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        return self.n_head_kv, self.head_dim, self.head_dim

    @property
    def cache_dims(self) -> tuple[int, int, int]:
        """(KV heads, key row, value row) that one layer's cache holds per token. MLA caches one latent row, the
        normed compressed KV then the shared RoPE key (as transformers' cache and llama.cpp do); its values are
        the row's first kv_lora_rank entries, so no value row of their own."""
        if self.kv_lora_rank:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, 0
        return self.kv_dims

    def kv_bytes(self, kv_type: str = DEFAULT_KV_TYPE) -> int:
        """KV cache bytes per token with kv_type ("f16" or "f32") numbers."""
        n_kv, dk, dv = self.cache_dims
        return self.n_layer * n_kv * (dk + dv) * KV_TYPES[kv_type]

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes(DEFAULT_KV_TYPE)


def _typed(name: str, kind: str, v):
    """v as the field's type, strictly: a bool is not a number, a number not a bool; floats are finite and become
    float (an int where a float belongs would give the kernels a second specialisation to compile)."""
    if kind == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if kind == "float" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if kind == "bool" and isinstance(v, bool):
        return v
    if kind == "str" and isinstance(v, str):
        return v
    if kind == "dict | None" and (v is None or (isinstance(v, dict) and all(
            isinstance(k, str) and (isinstance(x, (str, bool, int, type(None)))
                                    or (isinstance(x, float) and math.isfinite(x)))
            for k, x in v.items()))):
        return v
    want = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
            "dict | None": "null or an object of numbers, strings and booleans"}[kind]
    raise SchemaError(f"{name} = {_short(v)} is not {want}")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def expected_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a model of this config holds, in file order, with its shape (experts: (n_expert, rows, cols))."""
    E, D, V = cfg.n_expert, cfg.n_embd, cfg.vocab_size
    H, Hkv, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    out = [("token_embd.weight", (V, D))]
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (D,)))
        if cfg.kv_lora_rank:
            qr, kvr, v = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.v_head_dim
            if qr:
                out += [(b + "attn_q_a.weight", (qr, D)), (b + "attn_q_a_norm.weight", (qr,)),
                        (b + "attn_q_b.weight", (H * hd, qr))]
            else:
                out.append((b + "attn_q.weight", (H * hd, D)))
            out += [(b + "attn_kv_a_mqa.weight", (kvr + cfg.qk_rope_head_dim, D)),
                    (b + "attn_kv_a_norm.weight", (kvr,)),
                    (b + "attn_kv_b.weight", (H * (cfg.qk_nope_head_dim + v), kvr)),
                    (b + "attn_output.weight", (D, H * v))]
        else:
            out += [(b + "attn_q.weight", (H * hd, D)), (b + "attn_k.weight", (Hkv * hd, D)),
                    (b + "attn_v.weight", (Hkv * hd, D))]
            if cfg.attn_bias:
                out += [(b + "attn_q.bias", (H * hd,)), (b + "attn_k.bias", (Hkv * hd,)),
                        (b + "attn_v.bias", (Hkv * hd,))]
            if cfg.qk_norm == "head":
                out += [(b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,))]
            elif cfg.qk_norm == "full":
                out += [(b + "attn_q_norm.weight", (H * hd,)), (b + "attn_k_norm.weight", (Hkv * hd,))]
            out.append((b + "attn_output.weight", (D, H * hd)))
        out.append((b + "ffn_norm.weight", (D,)))
        if cfg.layer_is_moe(i):
            F, Fs = cfg.n_ff_exp, cfg.n_ff_shexp
            out.append((b + "ffn_gate_inp.weight", (E, D)))
            if cfg.router_bias:
                out.append((b + "exp_probs_b.bias", (E,)))
            if cfg.n_expert_shared:
                if cfg.shared_expert_gate:
                    out.append((b + "ffn_gate_inp_shexp.weight", (D,)))
                out += [(b + "ffn_gate_shexp.weight", (Fs, D)), (b + "ffn_up_shexp.weight", (Fs, D)),
                        (b + "ffn_down_shexp.weight", (D, Fs))]
            out += [(b + "ffn_gate_exps.weight", (E, F, D)), (b + "ffn_up_exps.weight", (E, F, D)),
                    (b + "ffn_down_exps.weight", (E, D, F))]
        else:
            F = cfg.n_ff
            out += [(b + "ffn_gate.weight", (F, D)), (b + "ffn_up.weight", (F, D)), (b + "ffn_down.weight", (D, F))]
    out.append(("output_norm.weight", (D,)))
    if not cfg.tied_embeddings:
        out.append(("output.weight", (V, D)))
    return out


@dataclass(frozen=True)
class TensorSize:
    """What token_costs needs of one stored tensor; nbytes is one matrix's (one expert's, for expert tensors)."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    n_expert: int = 0
    stride: int | None = None  # a container's expert bundle stride; None: the bundle an import will lay out
    gguf_type: int | None = None  # the weight format's GGUF type id (None: not known, counted as not repacked)


def repacked_ram(tensors: Iterable[TensorSize]) -> tuple[int, int]:
    """What the engine's load-time repack (quant.repack: Q5_0/Q5_1/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS matrices into
    tiles, quant.repack.tiled_parts bytes each) adds to memory: (bytes beyond the file when it is read into RAM,
    bytes of dense tiles beside a mapped file). Read into RAM, a repacked matrix's file rows are given back except
    the token embedding's (its rows serve lookups; it is repacked only when the output head shares it), and a
    layer's experts are repacked, the others of its bundle copied, when any of them is repackable. Mapped, only
    dense matrices are repacked (experts keep GGUF's rows), into anonymous memory beside the page cache's rows."""
    from .formats import BY_GGUF_TYPE
    from .repack import repackable, tiled_parts

    def tiled(t):
        fmt = BY_GGUF_TYPE.get(t.gguf_type) if t.gguf_type is not None else None
        if fmt is None or len(t.shape) < 2 or not repackable(fmt):
            return None
        return sum(tiled_parts(fmt, *t.shape[-2:]))

    tensors = list(tensors)
    tied = not any(t.name == "output.weight" for t in tensors)
    resident, mapped, layers = 0, 0, {}
    for t in tensors:
        n = tiled(t) if tied or t.name != "token_embd.weight" else None
        if t.n_expert:
            layers.setdefault(t.name.split(".ffn_")[0], []).append((t, n))
        elif n is not None:
            mapped += n
            resident += n if t.name == "token_embd.weight" else n - t.nbytes
    for exps in layers.values():
        if any(n is not None for _, n in exps):
            resident += sum(t.n_expert * (n - t.nbytes) for t, n in exps if n is not None)
    return resident, mapped


@dataclass(frozen=True)
class TokenCosts:
    """What one token reads and holds: the figures `plan`, `show` and `bench` print."""

    params_total: int
    params_active: int
    dense_bytes: int  # every tensor but the routed experts (and MLA's float16 kv_b the engine derives)
    expert_bytes: int  # every routed expert of every layer
    dense_bytes_per_token: int  # dense tensors (the token embedding only its one row, unless the head shares it)
    expert_bytes_per_token: int  # top-k of each layer's experts
    kv_bytes_per_token: int  # with the cache type token_costs was given (default: DEFAULT_KV_TYPE)
    moe_layers: tuple[int, ...]
    layer_bundle_bytes: tuple[int, ...]  # one expert's gate, up and down of each MoE layer, page aligned

    @property
    def bytes_per_token(self) -> int:
        return self.dense_bytes_per_token + self.expert_bytes_per_token

    @property
    def bundle_bytes(self) -> int:
        """The largest layer's bundle: what one cache miss reads (a mix such as q4_k_m gives some layers' ffn_down
        more bits)."""
        return max(self.layer_bundle_bytes, default=0)


def token_costs(cfg: ModelConfig, tensors: Iterable[TensorSize], top_k: int | None = None,
                kv_type: str = DEFAULT_KV_TYPE) -> TokenCosts:
    """Bytes read per token: every dense tensor (the token embedding only its one row, unless the head
    shares it), and top_k (default: the config's) of each expert tensor's n_expert matrices; the parameters
    in all and of one token; the bytes of one expert's bundle, from a container's stride, or for a GGUF file the
    bundle its import will lay out (gate, up and down, 64-byte aligned inside, the bundle page-aligned). An MLA
    model's kv_b counts as the float16 copy the engine reads (and keeps in RAM beside the file's); the KV cache
    with kv_type numbers."""
    tensors = list(tensors)
    k = cfg.n_expert_used if top_k is None else top_k
    tied = not any(t.name == "output.weight" for t in tensors)
    total = active = dense_tok = dense_all = expert_tok = expert_all = 0
    bundle: dict[int, int] = {}  # layer -> bytes of one expert's bundle
    for t in tensors:
        n = math.prod(t.shape)
        total += n
        if t.n_expert:
            used = min(k, t.n_expert)
            active += n // t.n_expert * used
            expert_tok += t.nbytes * used
            expert_all += t.nbytes * t.n_expert
            m = re.match(r"blk\.(\d+)\.", t.name)
            layer = int(m.group(1)) if m else -1
            if t.stride is not None:  # a layer's gate, up and down share one stride
                bundle[layer] = max(bundle.get(layer, 0), t.stride)
            else:
                bundle[layer] = bundle.get(layer, 0) + align_up(t.nbytes, 64)
            continue
        active += n
        dense_all += t.nbytes
        if cfg.kv_lora_rank and t.name.endswith(".attn_kv_b.weight"):
            # the engine keeps kv_b split per head in float16 beside the file's copy, and reads that copy
            # (lmcli/engine/weights.py _split_kv_b: MLA attention over the latent cache)
            dense_all += n * MLA_KV_B_BYTES
            dense_tok += n * MLA_KV_B_BYTES
            continue
        dense_tok += t.nbytes // t.shape[0] if t.name == "token_embd.weight" and not tied else t.nbytes
    return TokenCosts(total, active, dense_all, expert_all, dense_tok, expert_tok, cfg.kv_bytes(kv_type),
                      tuple(sorted(bundle)), tuple(align_up(bundle[layer], ALIGN) for layer in sorted(bundle)))
