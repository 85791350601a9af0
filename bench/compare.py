"""lmcli vs llama.cpp (llama-cpp-python) on the same weights, side by side in one process, medians of N.

Measures, for lmcli's default thread policy and 1 and 2 threads: decode tokens/s, 128-token prefill tokens/s,
and their ratios; a 4-bit matvec kernel on a 14336x4096 matrix in GB/s against the machine's measured read
bandwidth; warm start to first token (a fresh `lmcli run` process with the Numba cache present).

    python bench/compare.py [--model smollm2] [--gguf FILE] [--reps 5] [--decode 64] [--prefill 128]

AVX2 figures on a machine that has AVX-512 (like for like): lmcli's kernels compiled for an AVX2 CPU and a
llama.cpp built for AVX2 only, in its own venv, loaded through LLAMA_CPP_LIB_PATH:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
        -DGGML_AVX_VNNI=OFF" pip install --no-cache-dir llama-cpp-python          # in a second venv
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma,+f16c,+sse4.2,+popcnt,+avx NUMBA_CACHE_DIR=/tmp/nb-avx2 \
        LLAMA_CPP_LIB_PATH=<that venv>/lib/python3.11/site-packages/llama_cpp/lib python bench/compare.py

Both sides print the instruction set they run (lmcli's kernel path, llama.cpp's system info).

Threads on a busy machine (issue 18): --threads auto,1,2 --busy N measures lmcli's default ("auto": the adaptive
ThreadPolicy, fresh each repetition as in a new `lmcli run`) against its fixed counts, and llama.cpp's default
(llama-cpp-python: decode on cpu_count // 2 threads, prefill on all) against its fixed counts, every configuration
of both engines alternating within each repetition, beside N CPU-bound processes. The process sets the CLI's
wait settings (lmcli.threads.configure_pool: a 0.1 ms spin, GOMP_SPINCOUNT) unless OMP_WAIT_POLICY, GOMP_SPINCOUNT
or KMP_BLOCKTIME is set; both engines share the one libgomp, so llama.cpp runs under the same settings, not its
own default (a 3 ms spin): to give it that, run the bench again with GOMP_SPINCOUNT=300000.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def med(xs):
    return statistics.median(xs)


def fmt(xs):
    return f"median {med(xs):8.2f}  (min {min(xs):.2f}, max {max(xs):.2f})"


def read_bandwidth(threads: int, reps: int) -> list[float]:
    """GB/s of reading 1 GiB split across `threads` numpy reductions (lmcli bench's probe), `reps` times."""
    from lmcli.bench import measure_read_bandwidth

    return [measure_read_bandwidth(threads, mib=1024, reps=1) for _ in range(reps)]


def kernel_gbs(threads: int, reps: int) -> list[float]:
    """GB/s of the 4-bit matvec on 14336x4096 Q4_0 matrices, cycling through 8 of them (264 MB) so that
    every call reads its weights from DRAM, not from the last-level cache."""
    import numba

    from quant import kernels

    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n_out, n_in = 14336, 4096
    nt, ng = n_out // 64, n_in // 32
    mats = [(rng.integers(0, 256, (nt, ng, 16, 64), dtype=np.uint8),
             (rng.random((nt, ng, 1, 64), dtype=np.float32) * 0.01).astype(np.float16).view(np.uint16))
            for _ in range(8)]
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    xq, xd, xs = np.empty((1, n_in), np.int16), np.empty((1, ng), np.float32), np.empty((1, ng), np.int32)
    kernels.quantize_act(x, xq, xd, xs)
    out = np.empty((1, n_out), np.float32)
    kernels.matmul_q4(*mats[0], xq, xd, xs, out)
    nbytes = mats[0][0].nbytes + mats[0][1].nbytes
    res = []
    for _ in range(reps):
        ts = []
        for i in range(16):
            t = time.perf_counter()
            kernels.matmul_q4(*mats[i % 8], xq, xd, xs, out)
            ts.append(time.perf_counter() - t)
        res.append(nbytes / med(ts) / 1e9)
    return res


@contextlib.contextmanager
def busy_neighbours(n: int):
    """n CPU-bound processes beside the measurement (a desktop with a browser or a build going), stopped after."""
    spin = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(10**6): pass"  # ends with us
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def amx_guard() -> bool:
    """On a CPU that lists amx_tile, llama.cpp's extra buffer types (AMX and repacked weights) off, as
    tests/conftest.py does: llama-cpp-python 0.3.36 dies at its first AMX instruction (ldtilecfg) on such virtual
    machines. It then runs its plain CPU kernels (slower than with repacking: say so beside its figures). Not when
    LLAMA_CPP_LIB_PATH names another build (say, AVX2-only, which has no AMX code). True when it was turned off."""
    try:
        with open("/proc/cpuinfo") as f:
            if "amx_tile" not in f.read() or os.environ.get("LLAMA_CPP_LIB_PATH"):
                return False
        import llama_cpp
        import llama_cpp.llama
    except (OSError, ImportError):
        return False
    base = llama_cpp.llama_model_default_params

    def params():
        p = base()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = llama_cpp.llama.llama_cpp.llama_model_default_params = params
    return True


AMX_GUARD = amx_guard()


def describe() -> str:
    """The instruction sets both sides were built for, for the report's first line."""
    import llama_cpp

    from quant.kernels import kernel_path

    return (f"lmcli kernels: {kernel_path()['kernel_path']}; llama.cpp: "
            f"{llama_cpp.llama_print_system_info().decode().strip()}"
            + ("; llama.cpp's extra buffer types (AMX, repack) off on this AMX CPU" if AMX_GUARD else ""))


def thread_policy(threads):
    """lmcli's policy for a configuration: "auto" is the default (adaptive over every core), a number is -t N."""
    import numba

    from lmcli.threads import ThreadPolicy

    if threads == "auto":
        return ThreadPolicy.default(numba.config.NUMBA_NUM_THREADS)
    return ThreadPolicy.default(int(threads), fixed=True)


def parse_threads(spec: str) -> list:
    """"auto,1,2" -> ["auto", 1, 2]."""
    return [t if t == "auto" else int(t) for t in (x.strip() for x in spec.split(",")) if t]


def llama_threads(llm, threads) -> None:
    """Set llama.cpp's decode and batch threads for a configuration ("auto": llama-cpp-python's defaults)."""
    import multiprocessing

    n = multiprocessing.cpu_count()
    dec, batch = (max(n // 2, 1), n) if threads == "auto" else (int(threads), int(threads))
    llm._ctx.set_n_threads(dec, batch)


def bench_lmcli(model, threads, prompt_ids, n_decode):
    """Prefill and decode tokens/s; threads: a count, or "auto" (a fresh ThreadPolicy), as Generation runs them."""
    pol = thread_policy(threads)
    tr = model.transformer
    cache = tr.new_cache(len(prompt_ids) + n_decode + 8)
    pol.begin()
    start = pol.current
    t = time.perf_counter()
    logits = tr.forward(prompt_ids, cache)
    pre = len(prompt_ids) / (time.perf_counter() - t)
    tok = int(logits[-1].argmax())
    t = time.perf_counter()
    for _ in range(n_decode):
        tok = int(pol.step(lambda: tr.forward([tok], cache))[-1].argmax())
    dec = n_decode / (time.perf_counter() - t)
    note_policy(threads, pol, start)
    return pre, dec


POLICY_RUNS: list[str] = []  # the default policy's runs: the count it started at (from the free CPUs) -> ended at


def note_policy(threads, pol, start: int) -> None:
    """Keep a default ("auto") run's start and end counts for report_threads."""
    if threads == "auto":
        POLICY_RUNS.append(f"{start}->{pol.current}" + (f" ({pol.switches} moves)" if pol.switches else ""))


def report_threads(L, C, configs) -> dict:
    """Print each configuration's decode and prefill of both engines, and lmcli's default against the best fixed
    counts of both (medians); the summary as a dict."""
    for th in configs:
        print(f"\n== threads {th}")
        print(f"  lmcli     decode  tok/s {fmt(L[th]['dec'])}")
        print(f"  llama.cpp decode  tok/s {fmt(C[th]['dec'])}")
        print(f"  lmcli     prefill tok/s {fmt(L[th]['pre'])}")
        print(f"  llama.cpp prefill tok/s {fmt(C[th]['pre'])}")
    out = {}
    fixed = [t for t in configs if t != "auto"]
    if "auto" in configs and fixed:
        best_l = max(fixed, key=lambda t: med(L[t]["dec"]))
        best_c = max(configs, key=lambda t: med(C[t]["dec"]))
        auto = med(L["auto"]["dec"])
        out = {"default_over_best_fixed": auto / med(L[best_l]["dec"]), "best_fixed": best_l,
               "default_over_llama_default": auto / med(C["auto"]["dec"]),
               "default_over_llama_best": auto / med(C[best_c]["dec"]), "llama_best": best_c}
        print(f"\n  lmcli default's thread counts, start->end per run: {', '.join(POLICY_RUNS)}")
        print(f"  lmcli default decode / lmcli best fixed (-t {best_l}): {out['default_over_best_fixed']:.2f}x; "
              f"/ llama.cpp default: {out['default_over_llama_default']:.2f}x; / llama.cpp best ({best_c}): "
              f"{out['default_over_llama_best']:.2f}x")
    return out


def llama_no_repack(**kw):
    """A llama_cpp.Llama whose weights stay in the file mapping (use_extra_bufts off: no repack into RAM),
    the only way llama.cpp runs a model larger than RAM."""
    import llama_cpp

    base = llama_cpp.llama_model_default_params

    def params():
        p = base()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = llama_cpp.llama.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(**kw)
    finally:
        llama_cpp.llama_model_default_params = llama_cpp.llama.llama_cpp.llama_model_default_params = base


def bench_llama(llm, prompt_ids, n_decode):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids)
    pre = len(prompt_ids) / (time.perf_counter() - t)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    dec = n_decode / (time.perf_counter() - t)
    return pre, dec


def warm_start(model_name: str, reps: int) -> list[float]:
    """Seconds from process start to the first generated token of `lmcli run` (Numba cache warm)."""
    out = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "lmcli.cli", "run", model_name, "Hi", "-n", "1", "--temp", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.read(1)
        out.append(time.perf_counter() - t)
        p.wait()
    return out[1:]  # the first run may populate the cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the packaged SmolLM2)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--threads", default="auto,1,2", help="configurations: auto (the default policy) and counts")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound neighbour processes running beside both engines")
    ap.add_argument("--decode-only", action="store_true", help="skip the kernel, bandwidth and warm-start figures")
    a = ap.parse_args()
    from lmcli.threads import configure_pool

    configure_pool()  # as the CLI does, before anything loads libgomp
    with busy_neighbours(a.busy):
        run(a)


def run(a):

    import lmcli
    from lmcli.store import packaged_file
    from lmcli.registry import load_registry

    from llama_cpp import Llama

    gguf = a.gguf or str(packaged_file(load_registry()["smollm2"].packaged))
    model = lmcli.load(a.model if not a.gguf else a.gguf, n_ctx=a.prefill + a.decode + 16)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, model.config.vocab_size - 100, a.prefill)]
    results = {"model": a.model, "gguf": gguf, "reps": a.reps, "isa": describe(), "busy": a.busy}
    print(results["isa"] + (f"; {a.busy} busy neighbour process(es)" if a.busy else ""))
    configs = parse_threads(a.threads)
    llm = Llama(model_path=gguf, n_ctx=a.prefill + a.decode + 16, n_batch=512, logits_all=False, verbose=False)
    for th in configs:  # warm up both
        bench_lmcli(model, th, prompt[:16], 4)
        llama_threads(llm, th)
        bench_llama(llm, prompt[:16], 4)
    POLICY_RUNS.clear()
    L = {th: {"pre": [], "dec": []} for th in configs}
    C = {th: {"pre": [], "dec": []} for th in configs}
    for r in range(a.reps):  # alternate engines and configurations so machine noise hits all alike; each
        for th in configs[r % len(configs):] + configs[:r % len(configs)]:  # rep starts one later (no fixed order)
            p, d = bench_lmcli(model, th, prompt, a.decode)
            L[th]["pre"].append(p)
            L[th]["dec"].append(d)
            llama_threads(llm, th)
            p, d = bench_llama(llm, prompt, a.decode)
            C[th]["pre"].append(p)
            C[th]["dec"].append(d)
    print(f"{a.prefill}-token prefill, {a.decode}-token decode, {a.reps} reps, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    for th in configs:
        results[f"t{th}"] = {"lmcli": L[th], "llama_cpp": C[th],
                             "decode_ratio": med(L[th]["dec"]) / med(C[th]["dec"]),
                             "prefill_ratio": med(L[th]["pre"]) / med(C[th]["pre"])}
    results["threads_summary"] = report_threads(L, C, configs)
    if a.decode_only:
        if a.json:
            print(json.dumps(results))
        return
    for th in (1, 2):
        bw = read_bandwidth(th, a.reps)
        kg = kernel_gbs(th, a.reps)
        results[f"kernel_t{th}"] = {"read_bw_gbs": bw, "kernel_gbs": kg}
        print(f"\n== kernel 14336x4096 q4 matvec, {th} thread(s)")
        print(f"  read bandwidth GB/s {fmt(bw)}")
        print(f"  kernel         GB/s {fmt(kg)}  -> {med(kg) / med(bw):.0%} of read bandwidth")
    ws = warm_start(a.model, a.reps)
    results["warm_start_s"] = ws
    print(f"\n== warm start to first token (`lmcli run {a.model}`): seconds {fmt(ws)}")
    if a.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
