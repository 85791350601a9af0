"""Converter throughput and peak memory on a multi-GB synthetic Hugging Face checkpoint (bf16 safetensors).

Writes a Mixtral-shaped checkpoint (per-expert w1/w2/w3 tensors, several shards + index) with random
weights, then runs `lmcli quantize` in a subprocess 3 times, reporting input MB/s (median, min, max) and the
subprocess's peak RSS (VmHWM) against the checkpoint size.

    python bench/convert_bench.py [--layers 4] [--type q4_0] [--dir /tmp/lmcli-convert]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def bf16(rng, shape, std):
    x = (rng.standard_normal(shape, dtype=np.float32) * std).view(np.uint32)
    return (x >> 16).astype(np.uint16)  # truncation to bf16 is fine for random weights


def write_checkpoint(d: Path, n_layer: int, hidden=2048, ffn=5632, n_expert=8, heads=16, kv=4) -> int:
    import tiny_models

    d.mkdir(parents=True, exist_ok=True)
    vocab = tiny_models.vocab_size()
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": n_layer, "num_attention_heads": heads,
           "num_key_value_heads": kv, "num_local_experts": n_expert, "num_experts_per_tok": 2,
           "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
           "bos_token_id": tiny_models.BOS_ID, "eos_token_id": tiny_models.EOS_ID}
    (d / "config.json").write_text(json.dumps(cfg))
    tiny_models.write_tokenizer(d)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    hd = hidden // heads
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": bf16(rng, (hidden,), 1.0), p + "post_attention_layernorm.weight": bf16(rng, (hidden,), 1.0),
             p + "self_attn.q_proj.weight": bf16(rng, (heads * hd, hidden), 0.02),
             p + "self_attn.k_proj.weight": bf16(rng, (kv * hd, hidden), 0.02),
             p + "self_attn.v_proj.weight": bf16(rng, (kv * hd, hidden), 0.02),
             p + "self_attn.o_proj.weight": bf16(rng, (hidden, heads * hd), 0.02),
             p + "block_sparse_moe.gate.weight": bf16(rng, (n_expert, hidden), 0.02)}
        for e in range(n_expert):
            q = p + f"block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = bf16(rng, (ffn, hidden), 0.02)
            t[q + "w3.weight"] = bf16(rng, (ffn, hidden), 0.02)
            t[q + "w2.weight"] = bf16(rng, (hidden, ffn), 0.02)
        if i == 0:
            t["model.embed_tokens.weight"] = bf16(rng, (vocab, hidden), 1.0)
            t["lm_head.weight"] = bf16(rng, (vocab, hidden), 0.02)
            t["model.norm.weight"] = bf16(rng, (hidden,), 1.0)
        name = f"model-{i + 1:05d}-of-{n_layer:05d}.safetensors"
        _save_bf16(t, d / name)
        weight_map.update({k: name for k in t})
        total += sum(a.nbytes for a in t.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _save_bf16(tensors: dict, path: Path) -> None:
    """A safetensors file of bf16 tensors given as uint16 arrays (numpy has no bfloat16)."""
    header, off = {}, 0
    for k, a in tensors.items():
        header[k] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--dir", default="/tmp/lmcli-convert")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    d = Path(a.dir)
    src = d / "hf"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        size = write_checkpoint(src, a.layers)
        print(f"wrote a {size / 1e9:.2f} GB bf16 checkpoint in {time.perf_counter() - t:.0f} s")
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    rates, peaks = [], []
    for r in range(a.reps):
        out = d / "out.lmc"
        out.unlink(missing_ok=True)
        code = ("import resource, sys, time, json; from quant.convert import convert_hf; t=time.perf_counter(); "
                f"s=convert_hf({str(src)!r}, {str(out)!r}, {a.type!r}); "
                "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
                "print(json.dumps({'s': time.perf_counter()-t, 'hwm_kb': int(hwm)}))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, NUMBA_NUM_THREADS="2"))
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        res = json.loads(p.stdout.strip().splitlines()[-1])
        rates.append(size / res["s"] / 1e6)
        peaks.append(res["hwm_kb"] / 1024)
    print(f"checkpoint {size / 1e9:.2f} GB bf16 -> {a.type}: {(d / 'out.lmc').stat().st_size / 1e9:.2f} GB")
    print(f"  throughput MB/s of input: median {statistics.median(rates):.0f} (min {min(rates):.0f}, max {max(rates):.0f})")
    print(f"  peak RSS MiB: median {statistics.median(peaks):.0f} (min {min(peaks):.0f}, max {max(peaks):.0f}) "
          f"= {statistics.median(peaks) / (size / 2**20):.1%} of the checkpoint")


if __name__ == "__main__":
    main()
