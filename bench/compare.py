"""lmcli vs llama.cpp (llama-cpp-python) on the same weights, side by side in one process, medians of N.

Measures, for 1 and 2 threads: decode tokens/s, 128-token prefill tokens/s, and their ratios; a 4-bit
matvec kernel on a 14336x4096 matrix in GB/s against the machine's measured read bandwidth; warm start to
first token (a fresh `lmcli run` process with the Numba cache present).

    python bench/compare.py [--model smollm2] [--gguf FILE] [--reps 5] [--decode 64] [--prefill 128]

AVX2 figures on a machine that has AVX-512 (like for like): lmcli's kernels compiled for an AVX2 CPU and a
llama.cpp built for AVX2 only, in its own venv, loaded through LLAMA_CPP_LIB_PATH:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
        -DGGML_AVX_VNNI=OFF" pip install --no-cache-dir llama-cpp-python          # in a second venv
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma,+f16c,+sse4.2,+popcnt,+avx NUMBA_CACHE_DIR=/tmp/nb-avx2 \
        LLAMA_CPP_LIB_PATH=<that venv>/lib/python3.11/site-packages/llama_cpp/lib python bench/compare.py

Both sides print the instruction set they run (lmcli's kernel path, llama.cpp's system info).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def describe() -> str:
    """The instruction sets both sides were built for, for the report's first line."""
    import llama_cpp

    from quant.kernels import kernel_path

    return (f"lmcli kernels: {kernel_path()['kernel_path']}; llama.cpp: "
            f"{llama_cpp.llama_print_system_info().decode().strip()}")


def bench_lmcli(model, threads, prompt_ids, n_decode):
    import numba

    numba.set_num_threads(threads)
    tr = model.transformer
    cache = tr.new_cache(len(prompt_ids) + n_decode + 8)
    t = time.perf_counter()
    logits = tr.forward(prompt_ids, cache)
    pre = len(prompt_ids) / (time.perf_counter() - t)
    tok = int(logits[-1].argmax())
    t = time.perf_counter()
    for _ in range(n_decode):
        tok = int(tr.forward([tok], cache)[-1].argmax())
    dec = n_decode / (time.perf_counter() - t)
    return pre, dec


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
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound neighbour processes running beside both engines")
    a = ap.parse_args()
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
    for th in [int(t) for t in a.threads.split(",")]:
        llm = Llama(model_path=gguf, n_ctx=a.prefill + a.decode + 16, n_threads=th, n_threads_batch=th,
                    n_batch=512, logits_all=False, verbose=False)
        bench_lmcli(model, th, prompt[:16], 4)  # warm up both
        bench_llama(llm, prompt[:16], 4)
        L = {"pre": [], "dec": []}
        C = {"pre": [], "dec": []}
        for _ in range(a.reps):  # alternate so machine noise hits both alike
            p, d = bench_lmcli(model, th, prompt, a.decode)
            L["pre"].append(p)
            L["dec"].append(d)
            p, d = bench_llama(llm, prompt, a.decode)
            C["pre"].append(p)
            C["dec"].append(d)
        del llm
        results[f"t{th}"] = {"lmcli": L, "llama_cpp": C,
                             "decode_ratio": med(L["dec"]) / med(C["dec"]),
                             "prefill_ratio": med(L["pre"]) / med(C["pre"])}
        print(f"\n== {th} thread(s), {a.prefill}-token prefill, {a.decode}-token decode, {a.reps} reps")
        print(f"  lmcli     decode  tok/s {fmt(L['dec'])}")
        print(f"  llama.cpp decode  tok/s {fmt(C['dec'])}")
        print(f"  lmcli     prefill tok/s {fmt(L['pre'])}")
        print(f"  llama.cpp prefill tok/s {fmt(C['pre'])}")
        print(f"  ratio lmcli/llama.cpp: decode {results[f't{th}']['decode_ratio']:.2f}x, "
              f"prefill {results[f't{th}']['prefill_ratio']:.2f}x")
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
