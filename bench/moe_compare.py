"""Synthetic Mixtral-shaped MoE: lmcli vs llama.cpp (llama-cpp-python) on the same weights, side by side.

Writes the model straight into lmcli's container (random Q4_0 weights), exports the same weights as a GGUF
(`quant.gguf_export`), and measures decode and prefill tokens/s of both, alternating runs, medians of N,
plus lmcli's roofline fraction: (bytes read per decode token) x tokens/s / measured read bandwidth.

    python bench/moe_compare.py --shape small   # hidden 2048, expert FFN 5632, 8 experts, top-2, 8 layers (~1.5 GB)
    python bench/moe_compare.py --shape mixtral # hidden 4096, expert FFN 14336, 6 layers (~5.3 GB)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import bench_llama, busy_neighbours, describe, fmt, llama_no_repack, med, read_bandwidth  # noqa: E402

SHAPES = {
    "small": dict(n_layer=8, n_embd=2048, n_ff_exp=5632, n_head=16, n_head_kv=4),
    "mixtral": dict(n_layer=6, n_embd=4096, n_ff_exp=14336, n_head=32, n_head_kv=8),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=SHAPES)
    ap.add_argument("--dir", default="/tmp/lmcli-bench")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-repack", action="store_true", help="also run llama.cpp with its weights left in the mmap")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound neighbour processes running beside both engines")
    a = ap.parse_args()
    with busy_neighbours(a.busy):
        run(a)


def run(a):

    import numba

    import lmcli
    from llama_cpp import Llama
    from quant.gguf_export import export_gguf
    from quant.synthetic import write_synthetic_moe

    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    lmc, gguf = d / f"{a.shape}.lmc", d / f"{a.shape}.gguf"
    if not lmc.exists():
        t = time.perf_counter()
        write_synthetic_moe(lmc, **SHAPES[a.shape], n_expert=8, n_expert_used=2, vocab=32000)
        print(f"wrote {lmc} ({lmc.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
    if not gguf.exists():
        export_gguf(lmc, gguf)
    print(describe() + (f"; {a.busy} busy neighbour process(es)" if a.busy else ""))
    numba.set_num_threads(a.threads)
    m = lmcli.load(str(lmc), n_ctx=a.prefill + a.decode + 16, threads=a.threads)
    tr = m.transformer
    kw = dict(model_path=str(gguf), n_ctx=a.prefill + a.decode + 16, n_threads=a.threads,
              n_threads_batch=a.threads, n_batch=512, verbose=False)
    llm = Llama(**kw)
    llm_map = llama_no_repack(**kw) if a.no_repack else None
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(300, 31000, a.prefill)]

    def run_lmcli():
        cache = tr.new_cache(a.prefill + a.decode + 8)
        t = time.perf_counter()
        logits = tr.forward(prompt, cache)
        pre = a.prefill / (time.perf_counter() - t)
        tok = int(logits[-1].argmax())
        c0 = tr.counters()
        t = time.perf_counter()
        for _ in range(a.decode):
            tok = int(tr.forward([tok], cache)[-1].argmax())
        dec = a.decode / (time.perf_counter() - t)
        return pre, dec, (tr.counters() - c0).expert_bytes / a.decode

    run_lmcli()
    bench_llama(llm, prompt[:16], 4)
    if llm_map is not None:
        bench_llama(llm_map, prompt[:16], 4)
    L = {"pre": [], "dec": []}
    C = {"pre": [], "dec": []}
    M = {"pre": [], "dec": []}
    ebytes = []
    for _ in range(a.reps):
        p, dd, eb = run_lmcli()
        L["pre"].append(p)
        L["dec"].append(dd)
        ebytes.append(eb)
        p, dd = bench_llama(llm, prompt, a.decode)
        C["pre"].append(p)
        C["dec"].append(dd)
        if llm_map is not None:
            p, dd = bench_llama(llm_map, prompt, a.decode)
            M["pre"].append(p)
            M["dec"].append(dd)
    dense = tr.weights.nbytes_dense if hasattr(tr.weights, "nbytes_dense") else None
    per_tok = statistics.median(ebytes) + (dense or 0)
    bw = read_bandwidth(a.threads, 3)
    print(f"\n== {a.shape}: {lmc.stat().st_size / 1e9:.2f} GB, {a.threads} threads, {a.reps} reps")
    print(f"  lmcli     decode  tok/s {fmt(L['dec'])}")
    print(f"  llama.cpp decode  tok/s {fmt(C['dec'])}")
    print(f"  lmcli     prefill tok/s {fmt(L['pre'])}")
    print(f"  llama.cpp prefill tok/s {fmt(C['pre'])}")
    print(f"  ratio lmcli/llama.cpp: decode {med(L['dec']) / med(C['dec']):.2f}x, prefill {med(L['pre']) / med(C['pre']):.2f}x")
    if llm_map is not None:
        print(f"  llama.cpp no repack decode  tok/s {fmt(M['dec'])}")
        print(f"  llama.cpp no repack prefill tok/s {fmt(M['pre'])}")
        print(f"  ratio lmcli/llama.cpp no repack: decode {med(L['dec']) / med(M['dec']):.2f}x, "
              f"prefill {med(L['pre']) / med(M['pre']):.2f}x")
    print(f"  bytes read per decode token: {per_tok / 1e6:.1f} MB (experts {statistics.median(ebytes) / 1e6:.1f} MB)")
    print(f"  read bandwidth {med(bw):.1f} GB/s -> lmcli roofline fraction "
          f"{per_tok * med(L['dec']) / 1e9 / med(bw):.0%}")


if __name__ == "__main__":
    main()
