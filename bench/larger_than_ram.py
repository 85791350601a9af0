"""A MoE model larger than its memory: lmcli's expert cache vs llama.cpp with weights left in the mmap (no
repack; its default repack copies weights into RAM and is killed), in one v1 memory cgroup per run, at caps
of 25%, 40% and 60% of the file, 2 threads, alternating runs, medians.

Each run is a fresh process placed in the cgroup: it prefills 16 tokens, decodes N, and reports decode
tokens/s and bytes read from disk per decoded token (/proc/self/io read_bytes). Needs root.

    python bench/larger_than_ram.py [--shape small] [--caps 0.25,0.4,0.6] [--reps 3] [--decode 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

CG = Path("/sys/fs/cgroup/memory")
ROOT = Path(__file__).resolve().parents[1]


def io_read() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def worker(kind: str, path: str, n_decode: int, threads: int) -> dict:
    prompt = list(range(300, 316))
    if kind in ("lmcli", "lmcli-prefetch"):
        sys.path.insert(0, str(ROOT))
        import lmcli

        m = lmcli.load(path, n_ctx=64, threads=threads, prefetch=kind == "lmcli-prefetch")
        tr = m.transformer
        cache = tr.new_cache(64)
        tok = int(tr.forward(prompt, cache)[-1].argmax())
        r0, t0 = io_read(), time.perf_counter()
        for _ in range(n_decode):
            tok = int(tr.forward([tok], cache)[-1].argmax())
        dt = time.perf_counter() - t0
        ec = tr.expert_cache_stats()
        extra = {"hit_rate": ec["hit_rate"] if ec else None}
    else:
        import llama_cpp
        import numpy as np

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from compare import llama_no_repack

        kw = dict(model_path=path, n_ctx=64, n_threads=threads, n_threads_batch=threads, verbose=False)
        llm = llama_no_repack(**kw) if kind == "llama-mmap" else llama_cpp.Llama(**kw)
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        r0, t0 = io_read(), time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        dt = time.perf_counter() - t0
        extra = {}
    return {"tok_s": n_decode / dt, "read_per_token": (io_read() - r0) / n_decode, **extra}


def run_capped(kind: str, path: Path, cap: int, n_decode: int, threads: int) -> dict | None:
    cg = CG / f"lmcli-bench-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(cap))
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", sys.executable, __file__, "--worker", kind,
               str(path), str(n_decode), str(threads)]
        limit = 300 if kind == "llama-repack" else 1800  # the repack thrashes for good under some caps
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                               env=dict(os.environ, NUMBA_NUM_THREADS=str(threads)))
        except subprocess.TimeoutExpired:
            print(f"  [{kind} stalled: no result in {limit} s, stopped]", flush=True)
            return None
        if p.returncode != 0:  # killed (OOM) or failed
            print(f"  [{kind} exited {p.returncode}: {p.stderr.strip().splitlines()[-1:] or 'killed'}]", flush=True)
            return None
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        for _ in range(100):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small")
    ap.add_argument("--dir", default="/tmp/lmcli-bench")
    ap.add_argument("--caps", default="0.25,0.4,0.6")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    d = Path(a.dir)
    lmc, gguf = d / f"{a.shape}.lmc", d / f"{a.shape}.gguf"
    if not lmc.exists() or not gguf.exists():
        raise SystemExit(f"run bench/moe_compare.py --shape {a.shape} first (it writes {lmc} and {gguf})")
    size = lmc.stat().st_size
    for frac in [float(x) for x in a.caps.split(",")]:
        cap = int(size * frac)
        res = {"lmcli": [], "lmcli-prefetch": [], "llama-mmap": []}
        for _ in range(a.reps):
            for kind, path in (("lmcli", lmc), ("lmcli-prefetch", lmc), ("llama-mmap", gguf)):
                r = run_capped(kind, path, cap, a.decode, a.threads)
                res[kind].append(r)
        repack = run_capped("llama-repack", gguf, cap, 2, a.threads)
        print(f"\n== cap {frac:.0%} of {size / 1e9:.2f} GB = {cap >> 20} MiB, {a.threads} threads, {a.reps} reps")
        for kind, rs in res.items():
            ok = [r for r in rs if r]
            if not ok:
                print(f"  {kind:11s} killed or failed in every run")
                continue
            ts = [r["tok_s"] for r in ok]
            rb = [r["read_per_token"] / 1e9 for r in ok]
            hr = f", hit rate {statistics.median([r['hit_rate'] for r in ok if r.get('hit_rate') is not None] or [0]):.2f}" \
                if kind.startswith("lmcli") else ""
            print(f"  {kind:16s} decode tok/s median {statistics.median(ts):.2f} (min {min(ts):.2f}, max {max(ts):.2f}); "
                  f"disk GB/token median {statistics.median(rb):.3f}{hr}; {len(ok)}/{len(rs)} runs survived")
        if res["lmcli"][0] and res["llama-mmap"][0]:
            lt = statistics.median([r["tok_s"] for r in res["lmcli"] if r])
            ct = statistics.median([r["tok_s"] for r in res["llama-mmap"] if r])
            print(f"  ratio lmcli / llama.cpp (mmap): {lt / ct:.2f}x")
        print(f"  llama.cpp default (repack into RAM): {'survived' if repack else 'killed or stalled'}")


if __name__ == "__main__":
    main()
