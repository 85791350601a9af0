"""MLA decode at a long context: one token's attention over a full KV cache, whatever layout the engine on
PYTHONPATH keeps (issue 20: run it once with today's tree and once with the one before the latent cache, alternating).

Builds a DeepSeek-shaped model with the real attention shape (kv_lora_rank 512, qk_rope 64, qk_nope 128, v 128,
n_head heads; a small hidden size and FFN, so attention dominates), Q4_0, fills its cache with random numbers up to
--ctx - 1 tokens (a prefill of 4096 tokens would take minutes and the values do not change the time), and times
decode steps: the whole step, and the engine's "attention" phase (ops.attention, plus ops.mla_query/mla_output
where the engine has them; the older tree decompresses with kv_b in its "matmul" phase instead, which the step
time includes), wall and CPU time, medians of --reps. Prints one JSON line.

    PYTHONPATH=. python bench/mla_decode.py --heads 16 --ctx 4096
    PYTHONPATH=/path/to/older/tree python bench/mla_decode.py --heads 16 --ctx 4096 --dir /tmp/mla-bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path


def build(d: Path, heads: int, layers: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import tiny_models
    from quant.convert import convert_hf

    lmc = d / f"mla-h{heads}-l{layers}.lmc"
    if not lmc.exists():
        hf = tiny_models.build("deepseek_v3", d / f"hf-h{heads}-l{layers}", overrides=dict(
            hidden_size=1024, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8, first_k_dense_replace=1,
            max_position_embeddings=16384))
        convert_hf(hf, lmc, "q4_0")
    return lmc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=16, help="16: Moonlight / DeepSeek-V2-Lite; 128: DeepSeek-V3")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens (fresh cache)")
    ap.add_argument("--kv-type", default=None, help="f16 or f32 (a tree before the KV cache types takes neither)")
    ap.add_argument("--dir", default="/tmp/lmcli-mla-bench")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    lmc = build(d, a.heads, a.layers)

    import numpy as np

    import lmcli

    m = lmcli.load(str(lmc), n_ctx=a.ctx, threads=a.threads, **({"kv_type": a.kv_type} if a.kv_type else {}))
    tr = m.transformer
    cache = tr.new_cache()
    rng = np.random.default_rng(0)
    for arr in (cache.k, cache.v):  # fill layer by layer: the float32 decompressed cache is large
        for li in range(arr.shape[0]):
            arr[li] = rng.standard_normal(arr.shape[1:], dtype=np.float32)
    kv_bytes = cache.k.nbytes + cache.v.nbytes
    phases: dict[str, float] = defaultdict(float)  # wall and CPU seconds of the attention phase

    @contextmanager
    def timed(name):
        t, c = time.perf_counter(), time.process_time()
        yield
        phases[name] += time.perf_counter() - t
        phases[name + " cpu"] += time.process_time() - c

    tr.instrument = timed
    step, attn, attn_cpu = [], [], []
    for r in range(a.reps + 1):  # the first warms up
        cache.n_past = a.ctx - 1
        phases.clear()
        t = time.perf_counter()
        tr.forward([5], cache)
        if r:
            step.append(time.perf_counter() - t)
            attn.append(phases["attention"])
            attn_cpu.append(phases["attention cpu"])
    res = {}
    if a.prefill:
        tr.instrument = None
        ids = [int(i) for i in rng.integers(3, m.config.vocab_size, a.prefill)]
        walls, cpus = [], []
        for _ in range(3):
            cache.n_past = 0
            t, c = time.perf_counter(), time.process_time()
            tr.forward(ids, cache)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        res = {"prefill_tokens": a.prefill, "prefill_ms": round(min(walls) * 1e3, 1),
               "prefill_cpu_ms": round(min(cpus) * 1e3, 1)}
    print(json.dumps({**res,
        "tree": str(Path(lmcli.__file__).resolve().parent.parent), "heads": a.heads, "layers": a.layers,
        "ctx": a.ctx, "threads": a.threads, "kv_cache_bytes": kv_bytes, "kv_dtype": str(cache.k.dtype),
        "step_ms": round(statistics.median(step) * 1e3, 2),
        "attention_ms_per_layer": round(statistics.median(attn) * 1e3 / a.layers, 2),
        "attention_ms_min_per_layer": round(min(attn) * 1e3 / a.layers, 2),
        # CPU time (all threads) is steadier than wall time on a loaded machine; with --threads 1 it is the work
        "attention_cpu_ms_per_layer": round(statistics.median(attn_cpu) * 1e3 / a.layers, 2)}))


if __name__ == "__main__":
    main()
