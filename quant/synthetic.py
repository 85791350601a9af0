"""Synthetic models written straight into the container: realistic shapes, random weights (for benchmarks
and for tests that need exact control of routing). Written tensor by tensor and expert by expert, so a file of
any size needs about one tensor's memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .container import ContainerWriter
from .errors import ConvertError
from .formats import F32, FORMATS, Q8_0, matrix_parts


def _byte_tokens() -> list[str]:
    # GPT-2's byte-to-unicode table, so that the byte-level BPE tokenizer can encode any text.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


# spread of a random 4-bit weight in units of its scale d: the standard deviation of q - 8 for q uniform on 0..15
_Q4_SPREAD = float(np.sqrt((16**2 - 1) / 12))


def _tokenizer(vocab: int) -> dict:
    """A byte-level BPE vocabulary of `vocab` ids: the 256 bytes, one merge, unused fillers, <|endoftext|> last."""
    toks = _byte_tokens()
    toks += ["ĠĠ"] + [f"<unused{i}>" for i in range(vocab - len(toks) - 2)] + ["<|endoftext|>"]
    return {"model": "gpt2", "tokens": toks, "token_type": [1] * (vocab - 1) + [3],
            "merges": ["Ġ Ġ"],  # llama.cpp refuses a BPE vocabulary without merges
            "eos_token_id": vocab - 1, "bos_token_id": vocab - 1}


def _random_matrix(rng, fmt, n_out, n_in, scale):
    """(codes, scales) of a random (n_out, n_in) matrix in fmt. Block formats: random codes and fp16 scales around
    `scale` (d and, for q4_1, m), so that activations keep a sane magnitude through layers. Float formats: random
    normal weights with the spread of those 4-bit ones, encoded by the format's codec (random bytes would be
    random floats, NaN, inf and 1e38 among them, which llama.cpp's quantizer refuses as invalid data)."""
    if not fmt.quantized:
        from .quantize import quantize_matrix

        w = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(scale * _Q4_SPREAD)
        return quantize_matrix(w, fmt)
    cb, sb = matrix_parts(fmt, n_out, n_in)
    codes = rng.integers(0, 256, cb, dtype=np.uint8)
    sc = (rng.random(sb // 2, dtype=np.float32) * scale + scale * 0.5).astype(np.float16)
    return codes, sc.view(np.uint16)


def write_synthetic_moe(path: str | os.PathLike, *, n_layer: int = 8, n_embd: int = 2048, n_ff_exp: int = 5632,
                        n_expert: int = 8, n_expert_used: int = 2, n_head: int = 16, n_head_kv: int = 4,
                        vocab: int = 32000, qtype: str = "q4_0", seed: int = 0, router: str = "random",
                        overwrite: bool = False) -> Path:
    """A Mixtral-shaped container (arch mixtral: softmax router, top-k renormalised) with random weights.

    router="zero": router weights are zero, so every token picks experts 0..k-1 (ties go to the lower id).
    qtype: one of lmcli's own formats (q4_0, q4_1, q8_0, f16, f32); GGUF's other types come from llama.cpp's
    quantizer run on this model's export.
    """
    fmt = FORMATS[qtype]
    if fmt.gguf_rows:
        raise ConvertError(f"a synthetic model is written in lmcli's own formats, not {qtype}: write it in f16, "
                           "export it (quant.gguf_export) and quantize that with llama.cpp")
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    cfg = {
        "arch": "mixtral", "n_layer": n_layer, "n_embd": n_embd, "n_ff": n_ff_exp, "n_head": n_head,
        "n_head_kv": n_head_kv, "head_dim": head_dim, "vocab_size": vocab, "norm_eps": 1e-5,
        "rope_theta": 1e6, "n_ctx_train": 4096, "n_expert": n_expert, "n_expert_used": n_expert_used,
        "n_ff_exp": n_ff_exp, "router": "softmax", "norm_topk_prob": True,
    }
    meta = {
        "config": cfg,
        "tokenizer": _tokenizer(vocab),
        "chat_template": None,
        "quant": {"type": qtype, "synthetic": True},
        "source": {"format": "synthetic", "seed": seed, "router": router},
    }
    mats = []
    emb = fmt if not fmt.quantized else Q8_0  # a float model is float throughout (a base for llama.cpp's quantizer)
    with ContainerWriter(path, overwrite=overwrite) as w:
        w.plan("token_embd.weight", emb, (vocab, n_embd))
        w.plan("output.weight", emb, (vocab, n_embd))
        w.plan("output_norm.weight", F32, (n_embd,))
        for i in range(n_layer):
            p = f"blk.{i}."
            for n in ("attn_norm", "ffn_norm"):
                w.plan(p + n + ".weight", F32, (n_embd,))
            for n, shape in (("attn_q", (n_head * head_dim, n_embd)), ("attn_k", (n_head_kv * head_dim, n_embd)),
                             ("attn_v", (n_head_kv * head_dim, n_embd)), ("attn_output", (n_embd, n_head * head_dim))):
                w.plan(p + n + ".weight", fmt, shape)
                mats.append((p + n + ".weight", shape))
            w.plan(p + "ffn_gate_inp.weight", F32, (n_expert, n_embd))
            w.plan_experts([(p + "ffn_gate_exps.weight", fmt, (n_ff_exp, n_embd)),
                            (p + "ffn_up_exps.weight", fmt, (n_ff_exp, n_embd)),
                            (p + "ffn_down_exps.weight", fmt, (n_embd, n_ff_exp))], n_expert)
        w.begin(meta)
        s_in = 1.0 / np.sqrt(n_embd) / 4
        for name in ("token_embd.weight", "output.weight"):
            w.write(name, *_random_matrix(rng, emb, vocab, n_embd, 0.01))
        w.write("output_norm.weight", np.ones(n_embd, np.float32))
        for i in range(n_layer):
            p = f"blk.{i}."
            w.write(p + "attn_norm.weight", np.ones(n_embd, np.float32))
            w.write(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
            for name, (n_out, n_in) in [m for m in mats if m[0].startswith(p)]:
                w.write(name, *_random_matrix(rng, fmt, n_out, n_in, s_in))
            r = np.zeros((n_expert, n_embd), np.float32) if router == "zero" else \
                rng.standard_normal((n_expert, n_embd), dtype=np.float32)
            from .quantize import quantize_matrix

            w.write(p + "ffn_gate_inp.weight", *quantize_matrix(r, F32))
            for e in range(n_expert):
                w.write(p + "ffn_gate_exps.weight", *_random_matrix(rng, fmt, n_ff_exp, n_embd, s_in), expert=e)
                w.write(p + "ffn_up_exps.weight", *_random_matrix(rng, fmt, n_ff_exp, n_embd, s_in), expert=e)
                w.write(p + "ffn_down_exps.weight", *_random_matrix(rng, fmt, n_embd, n_ff_exp, 1.0 / np.sqrt(n_ff_exp) / 4),
                        expert=e)
        return w.finish()


# --- DeepSeek-shaped (deepseek_v3: MLA, many small experts, shared experts, dense first layers) ----------------

# Standard deviation of a random code, so that a scale d gives weights of std d * _CODE_STD: Q4_0's nibbles are
# uniform on 0..15 (less 8), Q8_0's bytes uniform int8.
_CODE_STD = {"q4_0": float(np.sqrt((16**2 - 1) / 12)), "q8_0": float(np.sqrt((256**2 - 1) / 12))}


def deepseek_config(*, n_layer: int = 4, first_k_dense: int = 1, n_embd: int = 512, n_ff: int = 1024,
                    n_ff_exp: int = 256, n_expert: int = 64, n_expert_used: int = 6, n_shared: int = 1,
                    n_group: int = 8, topk_group: int = 4, routed_scaling_factor: float = 2.5, n_head: int = 8,
                    q_lora_rank: int = 256, kv_lora_rank: int = 128, qk_nope_head_dim: int = 64,
                    qk_rope_head_dim: int = 32, v_head_dim: int = 64, vocab: int = 1024, rope_theta: float = 10000.0,
                    n_ctx: int = 4096) -> dict:
    """A deepseek_v3 config.json (transformers' DeepseekV3Config keys) of this shape: multi-head latent attention
    (q_lora_rank 0: no query LoRA), n_expert routed experts of width n_ff_exp, n_expert_used per token, chosen by
    the sigmoid router with its correction bias within the topk_group best of n_group groups, weights renormalised
    and scaled by routed_scaling_factor, n_shared shared experts, the first first_k_dense layers dense (width
    n_ff)."""
    return {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": vocab,
        "hidden_size": n_embd, "intermediate_size": n_ff, "moe_intermediate_size": n_ff_exp,
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_head,
        "n_shared_experts": n_shared, "n_routed_experts": n_expert, "num_experts_per_tok": n_expert_used,
        "n_group": n_group, "topk_group": topk_group, "routed_scaling_factor": routed_scaling_factor,
        "norm_topk_prob": True, "first_k_dense_replace": first_k_dense, "q_lora_rank": q_lora_rank or None,
        "kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": qk_nope_head_dim, "qk_rope_head_dim": qk_rope_head_dim,
        "v_head_dim": v_head_dim, "hidden_act": "silu", "max_position_embeddings": n_ctx, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}, "rope_interleave": True,
        "attention_bias": False, "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
        "bos_token_id": vocab - 1, "eos_token_id": vocab - 1,
    }


def _random_weights(rng, fmt, n_out: int, n_in: int, std: float) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of a random (n_out, n_in) matrix whose weights have about this std: random codes under
    random fp16 scales (0.5x..1.5x the mean) for Q4_0/Q8_0, as fast as the bytes can be drawn; normal values
    rounded to the format otherwise."""
    from .quantize import interleave, quantize_matrix

    std_code = _CODE_STD.get(fmt.name)
    if std_code is None:
        return quantize_matrix(rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(std), fmt)
    nb = n_in // fmt.block_size
    raw = rng.integers(0, 256, (n_out, nb, fmt.block_bytes), dtype=np.uint8)
    d = ((rng.random((n_out, nb), dtype=np.float32) + np.float32(0.5)) * np.float32(std / std_code))
    raw[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    return interleave(raw.reshape(n_out, nb * fmt.block_bytes), fmt, n_out, n_in)


def _vector(rng, name: str, n: int) -> np.ndarray:
    """Norm weights around 1 (+-0.1), the router's correction bias around 0 (+-0.1): both matter to the output."""
    v = np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)
    return v if name.endswith(".bias") else v + np.float32(1)


def write_synthetic_deepseek(path: str | os.PathLike, *, qtype: str = "q4_0", seed: int = 0, overwrite: bool = False,
                             **shape) -> Path:
    """A DeepSeek-shaped container (deepseek_config(**shape)) with random weights: the tensors quant.schema lists
    for the config read from that config.json (as a conversion reads it), at quant.hf_tensors' precision policy
    (routers and vectors F32, embeddings and output at least Q8_0, qtype elsewhere). Weights have std
    1/sqrt(fan-in) (embeddings 1), so activations keep unit scale through the layers. The config.json goes in the
    metadata (source.config_json): transformers' DeepseekV3 runs the same weights from it."""
    from .hf_config import read_config
    from .hf_tensors import tensor_format
    from .quantize import quantize_matrix
    from .schema import expected_tensors

    if qtype not in ("q4_0", "q8_0"):
        raise ValueError(f"synthetic weights are drawn as q4_0 or q8_0 codes, not {qtype}")
    fmt = FORMATS[qtype]
    hf = deepseek_config(**shape)
    cfg = read_config(hf)
    rng = np.random.default_rng(seed)
    meta = {
        "config": cfg.as_dict(),
        "tokenizer": _tokenizer(cfg.vocab_size),
        "chat_template": None,
        "quant": {"type": qtype, "synthetic": True},
        "source": {"format": "synthetic", "seed": seed, "config_json": hf},
    }
    tensors = expected_tensors(cfg)
    fmts = {name: tensor_format(name, shp, fmt) for name, shp in tensors}
    with ContainerWriter(path, overwrite=overwrite) as w:
        for name, shp in tensors:
            if len(shp) != 3:
                w.plan(name, fmts[name], shp)
            elif name.endswith("ffn_gate_exps.weight"):  # gate, up and down of one expert: one bundle
                b = name[: -len("gate_exps.weight")]
                n_expert, n_ff_exp, n_embd = shp
                w.plan_experts([(b + k + "_exps.weight", fmts[b + k + "_exps.weight"], rows_cols)
                                for k, rows_cols in (("gate", (n_ff_exp, n_embd)), ("up", (n_ff_exp, n_embd)),
                                                     ("down", (n_embd, n_ff_exp)))], n_expert)
        w.begin(meta)
        for name, shp in tensors:
            if len(shp) == 1:
                w.write(name, _vector(rng, name, shp[0]))
            elif name.endswith("ffn_gate_inp.weight"):  # the router, F32
                r = rng.standard_normal(shp, dtype=np.float32) / np.float32(np.sqrt(shp[1]))
                w.write(name, *quantize_matrix(r, fmts[name]))
            elif len(shp) == 2:
                std = 1.0 if name == "token_embd.weight" else 1.0 / np.sqrt(shp[1])
                w.write(name, *_random_weights(rng, fmts[name], *shp, std))
            else:
                n_expert, n_out, n_in = shp
                for e in range(n_expert):
                    w.write(name, *_random_weights(rng, fmts[name], n_out, n_in, 1.0 / np.sqrt(n_in)), expert=e)
        return w.finish()
