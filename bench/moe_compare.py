"""Synthetic Mixtral-shaped MoE: lmcli vs llama.cpp (llama-cpp-python) on the same weights, side by side.

Writes the model straight into lmcli's container (random Q4_0 weights), exports the same weights as a GGUF
(`quant.gguf_export`), and measures decode and prefill tokens/s of both, alternating runs, medians of N,
plus lmcli's roofline fraction: (bytes read per decode token) x tokens/s / measured read bandwidth.

    python bench/moe_compare.py --shape small   # hidden 2048, expert FFN 5632, 8 experts, top-2, 8 layers (~1.5 GB)
    python bench/moe_compare.py --shape mixtral # hidden 4096, expert FFN 14336, 6 layers (~5.3 GB)

--threads auto,1,2 --busy N: lmcli's default thread policy against its fixed counts, and llama.cpp's default
against its own, every configuration alternating within each repetition, beside N CPU-bound processes (as
bench/compare.py does; the bandwidth and roofline figures are those of the last count given).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (POLICY_RUNS, bench_llama, busy_neighbours, describe, fmt, llama_no_repack,  # noqa: E402
                     llama_threads, med, note_policy, parse_threads, read_bandwidth, report_threads, thread_policy)

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
    ap.add_argument("--threads", default="auto,1,2", help="configurations: auto (the default policy) and counts")
    ap.add_argument("--no-repack", action="store_true", help="also run llama.cpp with its weights left in the mmap")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound neighbour processes running beside both engines")
    a = ap.parse_args()
    from lmcli.threads import configure_pool

    configure_pool()  # as the CLI does, before anything loads libgomp
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
    configs = parse_threads(a.threads)
    last = int(configs[-1]) if configs[-1] != "auto" else numba.config.NUMBA_NUM_THREADS
    m = lmcli.load(str(lmc), n_ctx=a.prefill + a.decode + 16)
    tr = m.transformer
    kw = dict(model_path=str(gguf), n_ctx=a.prefill + a.decode + 16, n_batch=512, verbose=False)
    llm = Llama(**kw)
    llm_map = llama_no_repack(**kw) if a.no_repack else None
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(300, 31000, a.prefill)]

    def run_lmcli(th):
        pol = thread_policy(th)
        cache = tr.new_cache(a.prefill + a.decode + 8)
        pol.begin()
        start = pol.current
        t = time.perf_counter()
        logits = tr.forward(prompt, cache)
        pre = a.prefill / (time.perf_counter() - t)
        tok = int(logits[-1].argmax())
        c0 = tr.counters()
        t = time.perf_counter()
        for _ in range(a.decode):
            tok = int(pol.step(lambda: tr.forward([tok], cache))[-1].argmax())
        dec = a.decode / (time.perf_counter() - t)
        note_policy(th, pol, start)
        return pre, dec, (tr.counters() - c0).expert_bytes / a.decode

    for th in configs:  # warm up
        run_lmcli(th)
        for x in (llm, llm_map) if llm_map is not None else (llm,):
            llama_threads(x, th)
            bench_llama(x, prompt[:16], 4)
    POLICY_RUNS.clear()
    LL = {th: {"pre": [], "dec": []} for th in configs}
    CC = {th: {"pre": [], "dec": []} for th in configs}
    M = {"pre": [], "dec": []}
    ebytes = []
    for r in range(a.reps):  # alternate engines and configurations so machine noise hits all alike; each
        for th in configs[r % len(configs):] + configs[:r % len(configs)]:  # rep starts one later (no fixed order)
            p, dd, eb = run_lmcli(th)
            LL[th]["pre"].append(p)
            LL[th]["dec"].append(dd)
            ebytes.append(eb)
            llama_threads(llm, th)
            p, dd = bench_llama(llm, prompt, a.decode)
            CC[th]["pre"].append(p)
            CC[th]["dec"].append(dd)
        if llm_map is not None:
            llama_threads(llm_map, configs[-1])
            p, dd = bench_llama(llm_map, prompt, a.decode)
            M["pre"].append(p)
            M["dec"].append(dd)
    L, C = LL[configs[-1]], CC[configs[-1]]
    dense = tr.weights.nbytes_dense if hasattr(tr.weights, "nbytes_dense") else None
    per_tok = statistics.median(ebytes) + (dense or 0)
    bw = read_bandwidth(last, 3)
    print(f"\n{a.shape}: {lmc.stat().st_size / 1e9:.2f} GB, {a.reps} reps, {a.prefill}-token prefill, "
          f"{a.decode}-token decode, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    report_threads(LL, CC, configs)
    print(f"\n== {a.shape}: threads {configs[-1]}")
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
