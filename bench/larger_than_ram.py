"""A MoE model larger than its memory: lmcli's expert cache vs llama.cpp with weights left in the mmap (no
repack; its default repack copies weights into RAM and is killed), in one v1 memory cgroup per run, at caps
of 25%, 40% and 60% of the file (DeepSeek shape: 15%, 20%, 30%), 2 threads, alternating runs, medians.

Each run is a fresh process placed in the cgroup after the page cache is dropped: it prefills 16 tokens, decodes
N, and reports decode tokens/s, bytes read from disk per decoded token (/proc/self/io read_bytes), the
effective read rate (their product), and for lmcli the time per token spent waiting on expert reads against the
rest (compute), with the reads' own time summed over those in flight (more than the wait: reads overlapped
compute or each other). The disk's own rate is measured before the runs: random O_DIRECT reads of one expert
bundle each, 1 and 4 in flight. Needs root.

Decoding samples (softmax at temperature 1, one seeded draw per step, the same rule on both sides): greedy
decoding on a random router settles on a few experts and flatters any cache. --base DIR adds runs of the lmcli
in another checkout (e.g. a git worktree of an older commit) beside this one: before/after in one run.

Shapes: small and mixtral (Mixtral-shaped, written by bench/moe_compare.py), deepseek (written here on first
use with quant.synthetic.write_synthetic_deepseek and exported to GGUF: MLA, 64 experts top-6 in 8 groups of
which 4 are kept, one shared expert, the first layer dense; 1.8 GB, 94 MB of it dense). The deepseek runs give
lmcli's automatic expert cache rule a 32 MiB headroom floor instead of its 256 MiB (--headroom-mib): the floor
is sized for real models, and this stand-in for a 380 GB one keeps the proportions of the file, not of the floor.

    python bench/larger_than_ram.py [--shape small] [--caps 0.25,0.4,0.6] [--reps 3] [--decode 16] [--base DIR]
    python bench/larger_than_ram.py --shape deepseek --caps 0.1,0.15,0.2
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
# DeepSeek-V3's proportions at 2.1 GB: hidden 2048, 64 routed experts of width 1536 (5.3 MB bundles at Q4_0)
DEEPSEEK = dict(n_layer=7, first_k_dense=1, n_embd=2048, n_ff=4096, n_ff_exp=1536, n_expert=64, n_expert_used=6,
                n_shared=1, n_group=8, topk_group=4, n_head=8, q_lora_rank=512, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab=4096)
DEFAULT_CAPS = {"deepseek": "0.15,0.2,0.3"}
DEFAULT_HEADROOM_MIB = {"deepseek": 32}


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


def disk_read_rate(path: Path, chunk: int, n_reads: int, in_flight: int, seed: int = 0) -> float:
    """GB/s of n_reads random, page-aligned reads of `chunk` bytes from the file with O_DIRECT (no page cache),
    in_flight at a time: the access pattern of expert-cache misses."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    size = path.stat().st_size
    offs = np.random.default_rng(seed).integers(0, (size - chunk) // 4096, n_reads) * 4096
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    bufs = [mmap.mmap(-1, chunk) for _ in range(in_flight)]

    def read(i):
        view, done = memoryview(bufs[i % in_flight]), 0
        while done < chunk:
            done += os.preadv(fd, [view[done:]], int(offs[i]) + done)

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as ex:
            for i0 in range(0, n_reads, in_flight):  # in_flight reads at once, each into its own buffer
                list(ex.map(read, range(i0, min(i0 + in_flight, n_reads))))
        return n_reads * chunk / (time.perf_counter() - t) / 1e9
    finally:
        os.close(fd)


def drop_caches(path: Path) -> None:
    """Empty the page cache (root), or at least drop this file from it."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def worker(kind: str, path: str, n_decode: int, threads: int) -> dict:
    import numpy as np

    prompt = list(range(300, 316))
    rng = np.random.default_rng(1234)
    if kind.startswith("lmcli"):
        sys.path.insert(0, os.environ.get("LMCLI_BENCH_ROOT", str(ROOT)))
        import lmcli
        from lmcli import memory

        if os.environ.get("LMCLI_BENCH_HEADROOM_MIB"):
            memory.HEADROOM = int(os.environ["LMCLI_BENCH_HEADROOM_MIB"]) << 20
        m = lmcli.load(path, n_ctx=64 + n_decode, threads=threads, prefetch=kind == "lmcli-prefetch")
        tr = m.transformer
        cache = tr.new_cache(64 + n_decode)
        tok = sample(tr.forward(prompt, cache)[-1], rng)
        ec0 = tr.expert_cache_stats() or {}
        r0, t0 = io_read(), time.perf_counter()
        for _ in range(n_decode):
            tok = sample(tr.forward([tok], cache)[-1], rng)
        dt = time.perf_counter() - t0
        ec = tr.expert_cache_stats()
        extra = {"hit_rate": ec["hit_rate"] if ec else None, "slots": ec["slots"] if ec else None,
                 "wait_per_token": (ec["io_wait_s"] - ec0["io_wait_s"]) / n_decode if ec else 0.0,
                 "read_time_per_token": (ec.get("io_read_s", 0) - ec0.get("io_read_s", 0)) / n_decode if ec else 0.0}
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
    return {"tok_s": n_decode / dt, "s_per_token": dt / n_decode, "read_per_token": (io_read() - r0) / n_decode,
            **extra}


def run_capped(kind: str, path: Path, cap: int, n_decode: int, threads: int, base: str | None = None,
               headroom_mib: int | None = None) -> dict | None:
    cg = CG / f"lmcli-bench-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(cap))
        drop_caches(path)
        cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", sys.executable, __file__, "--worker", kind,
               str(path), str(n_decode), str(threads)]
        limit = 300 if kind == "llama-repack" else 1800  # the repack thrashes for good under some caps
        try:
            env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
            if kind == "lmcli-base":
                env["LMCLI_BENCH_ROOT"] = base
            if headroom_mib is not None:
                env["LMCLI_BENCH_HEADROOM_MIB"] = str(headroom_mib)
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


def write_deepseek(lmc: Path, gguf: Path) -> None:
    """The DeepSeek-shaped model and its GGUF export, unless they are there."""
    sys.path.insert(0, str(ROOT))
    from quant.gguf_export import export_gguf
    from quant.synthetic import write_synthetic_deepseek

    lmc.parent.mkdir(parents=True, exist_ok=True)
    if not lmc.exists():
        t = time.perf_counter()
        write_synthetic_deepseek(lmc, **DEEPSEEK)
        print(f"wrote {lmc} ({lmc.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    if not gguf.exists():
        export_gguf(lmc, gguf)


def bundle_bytes(lmc: Path) -> int:
    """One expert's bundle (what a cache miss reads)."""
    sys.path.insert(0, str(ROOT))
    from quant.container import Container

    c = Container(lmc)
    try:
        return max(t.stride for t in c.tensors.values() if t.n_expert)
    finally:
        c.close()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small")
    ap.add_argument("--dir", default="/tmp/lmcli-bench")
    ap.add_argument("--caps", help="caps as shares of the file (default 0.25,0.4,0.6; deepseek 0.1,0.15,0.2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", help="another lmcli checkout to run beside this one (lmcli-base)")
    ap.add_argument("--kinds", default="lmcli,lmcli-prefetch,llama-mmap",
                    help="which runs (lmcli, lmcli-prefetch, lmcli-base, llama-mmap), alternating")
    ap.add_argument("--no-repack", action="store_true", help="skip llama.cpp's repacking run")
    ap.add_argument("--headroom-mib", type=int, help="lmcli's headroom floor for the automatic expert cache "
                    "(default: the product's 256; deepseek 32, see the docstring)")
    a = ap.parse_args()
    d = Path(a.dir)
    lmc, gguf = d / f"{a.shape}.lmc", d / f"{a.shape}.gguf"
    if a.shape == "deepseek":
        write_deepseek(lmc, gguf)
    if not lmc.exists() or not gguf.exists():
        raise SystemExit(f"run bench/moe_compare.py --shape {a.shape} first (it writes {lmc} and {gguf})")
    caps = a.caps or DEFAULT_CAPS.get(a.shape, "0.25,0.4,0.6")
    headroom = a.headroom_mib if a.headroom_mib is not None else DEFAULT_HEADROOM_MIB.get(a.shape)
    size = lmc.stat().st_size
    bundle = bundle_bytes(lmc)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare import describe

    print(describe())
    print(f"{lmc.name}: {size / 1e9:.2f} GB, expert bundle {bundle / 1e6:.2f} MB, {a.threads} threads, "
          f"{a.decode}-token sampled decode, page cache dropped before each run"
          + (f", lmcli headroom floor {headroom} MiB" if headroom is not None else ""))
    disk = {}
    for in_flight in (1, 4):
        drop_caches(lmc)
        disk[in_flight] = disk_read_rate(lmc, bundle, 48, in_flight)
    print(f"disk: random O_DIRECT reads of one bundle: {disk[1]:.2f} GB/s one at a time, {disk[4]:.2f} GB/s 4 in flight")
    for frac in [float(x) for x in caps.split(",")]:
        cap = int(size * frac)
        kinds = a.kinds.split(",") + (["lmcli-base"] if a.base and "lmcli-base" not in a.kinds else [])
        res = {k: [] for k in kinds}
        for _ in range(a.reps):
            for kind in kinds:
                r = run_capped(kind, gguf if kind.startswith("llama") else lmc, cap, a.decode, a.threads, a.base,
                               headroom)
                res[kind].append(r)
        repack = None if a.no_repack else run_capped("llama-repack", gguf, cap, 2, a.threads)
        for in_flight in (1, 4):  # the disk again, as the runs of this cap found it
            drop_caches(lmc)
            disk[in_flight] = disk_read_rate(lmc, bundle, 48, in_flight, seed=int(frac * 100))
        print(f"\n== cap {frac:.0%} of {size / 1e9:.2f} GB = {cap >> 20} MiB, {a.threads} threads, {a.reps} reps; "
              f"disk after: {disk[1]:.2f} GB/s one read at a time, {disk[4]:.2f} GB/s 4 in flight")
        for kind, rs in res.items():
            ok = [r for r in rs if r]
            if not ok:
                print(f"  {kind:11s} killed or failed in every run")
                continue
            ts = [r["tok_s"] for r in ok]
            rb = [r["read_per_token"] / 1e9 for r in ok]
            hr = f", hit rate {statistics.median([r['hit_rate'] for r in ok if r.get('hit_rate') is not None] or [0]):.2f}" \
                if kind.startswith("lmcli") else ""
            rate = [r["read_per_token"] * r["tok_s"] / 1e9 for r in ok]
            print(f"  {kind:16s} decode tok/s median {statistics.median(ts):.2f} (min {min(ts):.2f}, max {max(ts):.2f}); "
                  f"disk GB/token median {statistics.median(rb):.3f}; read rate GB/s median "
                  f"{statistics.median(rate):.2f} (min {min(rate):.2f}, max {max(rate):.2f}){hr}; "
                  f"{len(ok)}/{len(rs)} runs survived")
            if kind.startswith("lmcli") and ok[0].get("slots") is not None:
                spt = statistics.median([r["s_per_token"] for r in ok])
                wait = statistics.median([r["wait_per_token"] for r in ok])
                reads = statistics.median([r["read_time_per_token"] for r in ok])
                print(f"  {'':16s} per token (medians): {spt:.3f} s = waiting on reads {wait:.3f} s + the rest "
                      f"(compute) {spt - wait:.3f} s; reads took {reads:.3f} s summed over those in flight; "
                      f"cache slots {statistics.median([r['slots'] for r in ok]):.0f}")
        med = {k: statistics.median([r["tok_s"] for r in rs if r]) for k, rs in res.items() if any(rs)}
        rates = {k: statistics.median([r["read_per_token"] * r["tok_s"] / 1e9 for r in rs if r])
                 for k, rs in res.items() if any(rs)}
        for k in ("lmcli-base", "llama-mmap"):
            if "lmcli" in med and k in med:
                print(f"  ratio lmcli / {k}: tok/s {med['lmcli'] / med[k]:.2f}x, "
                      f"read rate {rates['lmcli'] / max(rates[k], 1e-9):.2f}x")
        if repack is not None or not a.no_repack:
            print(f"  llama.cpp default (repack into RAM): {'survived' if repack else 'killed or stalled'}")


if __name__ == "__main__":
    main()
