"""A MoE model larger than its memory: lmcli's expert cache vs llama.cpp with weights left in the mmap (no
repack; its default repack copies weights into RAM and is killed), in one v1 memory cgroup per run, at caps
of 25%, 40% and 60% of the file, 2 threads, alternating runs, medians.

Each run is a fresh process placed in the cgroup: it prefills 16 tokens, decodes N, and reports decode
tokens/s and bytes read from disk per decoded token (/proc/self/io read_bytes). Needs root.

Decoding samples (softmax at temperature 1, one seeded draw per step, the same rule on both sides): greedy
decoding on a random router settles on a few experts and flatters any cache. --base DIR adds runs of the lmcli
in another checkout (e.g. a git worktree of an older commit) beside this one: before/after in one run.

    python bench/larger_than_ram.py [--shape small] [--caps 0.25,0.4,0.6] [--reps 3] [--decode 16] [--base DIR]
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


def sample(logits, rng) -> int:
    """One draw from softmax(logits) (temperature 1), in float64."""
    import numpy as np

    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def worker(kind: str, path: str, n_decode: int, threads: int) -> dict:
    import numpy as np

    prompt = list(range(300, 316))
    rng = np.random.default_rng(1234)
    if kind.startswith("lmcli"):
        sys.path.insert(0, os.environ.get("LMCLI_BENCH_ROOT", str(ROOT)))
        import lmcli

        m = lmcli.load(path, n_ctx=64 + n_decode, threads=threads, prefetch=kind == "lmcli-prefetch")
        tr = m.transformer
        cache = tr.new_cache(64 + n_decode)
        tok = sample(tr.forward(prompt, cache)[-1], rng)
        r0, t0 = io_read(), time.perf_counter()
        for _ in range(n_decode):
            tok = sample(tr.forward([tok], cache)[-1], rng)
        dt = time.perf_counter() - t0
        ec = tr.expert_cache_stats()
        extra = {"hit_rate": ec["hit_rate"] if ec else None}
    else:
        import llama_cpp

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from compare import llama_no_repack

        kw = dict(model_path=path, n_ctx=64 + n_decode, n_threads=threads, n_threads_batch=threads, verbose=False)
        llm = llama_no_repack(**kw) if kind == "llama-mmap" else llama_cpp.Llama(**kw)
        llm.eval(prompt)
        tok = sample(llm.scores[llm.n_tokens - 1], rng)
        r0, t0 = io_read(), time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = sample(llm.scores[llm.n_tokens - 1], rng)
        dt = time.perf_counter() - t0
        extra = {}
    return {"tok_s": n_decode / dt, "read_per_token": (io_read() - r0) / n_decode, **extra}


def run_capped(kind: str, path: Path, cap: int, n_decode: int, threads: int, base: str | None = None) -> dict | None:
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
            env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
            if kind == "lmcli-base":
                env["LMCLI_BENCH_ROOT"] = base
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
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
    ap.add_argument("--base", help="another lmcli checkout to run beside this one (lmcli-base)")
    ap.add_argument("--kinds", default="lmcli,lmcli-prefetch,llama-mmap",
                    help="which runs (lmcli, lmcli-prefetch, lmcli-base, llama-mmap), alternating")
    ap.add_argument("--no-repack", action="store_true", help="skip llama.cpp's repacking run")
    a = ap.parse_args()
    d = Path(a.dir)
    lmc, gguf = d / f"{a.shape}.lmc", d / f"{a.shape}.gguf"
    if not lmc.exists() or not gguf.exists():
        raise SystemExit(f"run bench/moe_compare.py --shape {a.shape} first (it writes {lmc} and {gguf})")
    size = lmc.stat().st_size
    for frac in [float(x) for x in a.caps.split(",")]:
        cap = int(size * frac)
        kinds = a.kinds.split(",") + (["lmcli-base"] if a.base and "lmcli-base" not in a.kinds else [])
        res = {k: [] for k in kinds}
        for _ in range(a.reps):
            for kind in kinds:
                r = run_capped(kind, gguf if kind.startswith("llama") else lmc, cap, a.decode, a.threads, a.base)
                res[kind].append(r)
        repack = None if a.no_repack else run_capped("llama-repack", gguf, cap, 2, a.threads)
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
        med = {k: statistics.median([r["tok_s"] for r in rs if r]) for k, rs in res.items() if any(rs)}
        for k in ("lmcli-base", "llama-mmap"):
            if "lmcli" in med and k in med:
                print(f"  ratio lmcli / {k}: {med['lmcli'] / med[k]:.2f}x")
        if repack is not None or not a.no_repack:
            print(f"  llama.cpp default (repack into RAM): {'survived' if repack else 'killed or stalled'}")


if __name__ == "__main__":
    main()
