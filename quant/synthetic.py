"""Synthetic models written straight into the container: realistic shapes, random weights (for benchmarks
and for tests that need exact control of routing)."""

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
    toks = _byte_tokens()
    toks += ["ĠĠ"] + [f"<unused{i}>" for i in range(vocab - len(toks) - 2)] + ["<|endoftext|>"]
    cfg = {
        "arch": "mixtral", "n_layer": n_layer, "n_embd": n_embd, "n_ff": n_ff_exp, "n_head": n_head,
        "n_head_kv": n_head_kv, "head_dim": head_dim, "vocab_size": vocab, "norm_eps": 1e-5,
        "rope_theta": 1e6, "n_ctx_train": 4096, "n_expert": n_expert, "n_expert_used": n_expert_used,
        "n_ff_exp": n_ff_exp, "router": "softmax", "norm_topk_prob": True,
    }
    meta = {
        "config": cfg,
        "tokenizer": {"model": "gpt2", "tokens": toks, "token_type": [1] * (vocab - 1) + [3], "merges": ["Ġ Ġ"],  # llama.cpp refuses a BPE vocabulary without merges
                      "eos_token_id": vocab - 1, "bos_token_id": vocab - 1},
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
