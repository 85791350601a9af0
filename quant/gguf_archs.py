"""llama.cpp's architectures as lmcli reads and writes them: one row per architecture, used by GGUF import
(quant/gguf_io.py) and export (quant/gguf_export.py) alike. A variant of a known architecture is one row here.

What llama.cpp fixes per architecture (rope pairing, routing, required tensors, which keys size what) was read in
the llama.cpp that llama-cpp-python 0.3.36 vendors: src/llama-model.cpp (llama_model_rope_type, load_hparams),
src/models/*.cpp (each architecture's loader and graph), src/llama-graph.cpp (build_moe_ffn) and conversion/*.py
(what its converter writes).
"""

from __future__ import annotations

from dataclasses import dataclass

_SOFTMAX_ROUTING = (("router", "softmax"), ("routed_scaling_factor", 1.0), ("router_bias", False))


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp's (gguf.MODEL_ARCH_NAMES)
    model_type: str  # lmcli's architecture (the Hugging Face model_type) a file of this one imports as
    exported_from: tuple[str, ...] = ()  # further lmcli architectures written as this one (Mistral, Mixtral: llama)
    rope_pairs: bool = False  # llama_model_rope_type NORM: rotate adjacent pairs; else NEOX: halves, as HF does
    norm_topk: bool = True  # renormalise the top-k weights when the file has no expert_weights_norm key
    # Routing the graph hard-codes (build_moe_ffn arguments) rather than reads: another config is refused at export.
    fixed_routing: tuple[tuple[str, object], ...] | None = None
    ff_is_expert: bool = False  # feed_forward_length sizes the expert matrices (no expert_feed_forward_length)
    shexp_length: bool = False  # the shared expert's width travels as expert_shared_feed_forward_length
    deepseek_moe: bool = False  # shared count, leading dense layers, group-limited routing, gating function keys
    needs_output: bool = False  # the loader requires output.weight (no fallback to a tied token_embd)
    # No grouped-query attention in the loader (dots1 sizes K and V by n_head, olmoe attn_k_norm by n_embd): a GQA
    # model goes with each KV head repeated for its query heads (whole rows: lossless; an RMS norm over repeated
    # heads has the same mean square), so the result is the same model.
    kv_as_mha: bool = False
    sigmoid_default: bool = False  # expert_gating_func 0 (absent) means sigmoid
    mla: bool = False  # multi-head latent attention, in llama.cpp's split form (attn_k_b / attn_v_b)
    granite: bool = False  # Granite's multipliers under llama.cpp's *_scale names
    llama3_rope: bool = False  # Llama 3 rope scaling travels as the rope_freqs tensor

    @property
    def names(self) -> tuple[str, ...]:
        """The lmcli architectures exported as this one (llama.cpp's own name too: GGUF-origin containers)."""
        return (self.model_type, *self.exported_from, self.name)


ARCHS = (
    GGUFArch("llama", "llama", ("mistral", "mixtral"), rope_pairs=True, llama3_rope=True, ff_is_expert=True,
             fixed_routing=(("norm_topk_prob", True), *_SOFTMAX_ROUTING)),
    GGUFArch("qwen2", "qwen2"),
    GGUFArch("qwen3", "qwen3"),
    GGUFArch("qwen2moe", "qwen2_moe", norm_topk=False, shexp_length=True, needs_output=True,
             fixed_routing=(("norm_topk_prob", False), *_SOFTMAX_ROUTING)),
    GGUFArch("qwen3moe", "qwen3_moe", fixed_routing=(("norm_topk_prob", True), *_SOFTMAX_ROUTING)),
    GGUFArch("olmoe", "olmoe", norm_topk=False, ff_is_expert=True, needs_output=True, kv_as_mha=True,
             fixed_routing=(("norm_topk_prob", False), *_SOFTMAX_ROUTING)),
    GGUFArch("granitemoe", "granitemoe", rope_pairs=True, ff_is_expert=True, shexp_length=True, granite=True,
             fixed_routing=(("norm_topk_prob", True), *_SOFTMAX_ROUTING)),
    GGUFArch("deepseek2", "deepseek_v3", rope_pairs=True, deepseek_moe=True, mla=True),
    GGUFArch("dots1", "dots1", deepseek_moe=True, needs_output=True, kv_as_mha=True, sigmoid_default=True),
)

BY_NAME = {a.name: a for a in ARCHS}  # import: the file's general.architecture
FOR_EXPORT = {n: a for a in ARCHS for n in a.names}  # export: the container's arch
