"""lmcli against an earlier lmcli and llama.cpp on GGUF files made by llama.cpp's quantizer (Q5_K_M, IQ4_XS, ...):
decode and prefill tokens/s, each engine in a fresh process per repetition, the engines alternating.

    python bench/gguf_types.py --before DIR [--types Q5_K_M,IQ4_XS] [--models smollm2,moe] [--reps 5]

Files, built once under --dir: SmolLM2's F16 base (llama.cpp's F16 of the packaged Q4_1 weights, as issue 17's
quality figures were made) and the synthetic MoE of bench/moe_compare.py --shape small written in f16 and exported
(quant.gguf_export); each quantized by llama.cpp (llama_model_quantize) to every type given, then imported once
into lmcli's container, which both lmcli trees run. --before: another lmcli source tree (say `git archive <commit> |
tar -x -C DIR`). Both engines run fixed thread counts (--threads, default 2) under the CLI's wait settings
(lmcli.threads.configure_pool). llama.cpp runs with its extra buffer types off (use_extra_bufts=False: no AMX, no
repack into RAM), which this AMX virtual machine needs (bench/compare.py, amx_guard). Prints, per file, each
engine's tokens/s and the per-repetition ratios as median (min-max), and the load average seen.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MOE = dict(n_layer=8, n_embd=2048, n_ff_exp=5632, n_head=16, n_head_kv=4, n_expert=8, n_expert_used=2, vocab=32000)


def quantize(src: Path, dst: Path, ftype: int, requantize: bool = False) -> Path:
    import llama_cpp

    if not dst.exists():
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread, p.allow_requantize = ftype, 2, requantize
        tmp = dst.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p)) != 0:
            sys.exit(f"llama.cpp could not quantize {src} to file type {ftype}")
        tmp.rename(dst)
    return dst


def bases(d: Path, models: list[str]) -> dict[str, Path]:
    """model -> its F16 GGUF."""
    from gguf import LlamaFileType

    out = {}
    if "smollm2" in models:
        from lmcli.registry import load_registry
        from lmcli.store import packaged_file

        out["smollm2"] = quantize(packaged_file(load_registry()["smollm2"].packaged), d / "smollm2-f16.gguf",
                                  LlamaFileType.MOSTLY_F16, requantize=True)
    if "moe" in models:
        from quant.gguf_export import export_gguf
        from quant.synthetic import write_synthetic_moe

        gguf = d / "moe-f16.gguf"
        if not gguf.exists():
            lmc = write_synthetic_moe(d / "moe-f16.lmc", **MOE, qtype="f16", overwrite=True)
            export_gguf(lmc, gguf)
            lmc.unlink()
        out["moe"] = gguf
    return out


def build(d: Path, models: list[str], types: list[str]) -> list[tuple[str, str, Path, Path]]:
    """(model, type, GGUF, lmcli container) for every model and type."""
    from gguf import LlamaFileType

    from quant.gguf_io import import_gguf

    files = []
    for model, base in bases(d, models).items():
        for t in types:
            gguf = quantize(base, d / f"{model}-{t}.gguf", LlamaFileType[f"MOSTLY_{t}"])
            lmc = d / f"{model}-{t}.lmc"
            if not lmc.exists():
                import_gguf(gguf, lmc)
            files.append((model, t, gguf, lmc))
    return files


def worker(a) -> None:
    """One engine on one file, in this process: warm up, then prefill and decode tokens/s as JSON."""
    import numba

    from lmcli.threads import configure_pool

    configure_pool()  # as the CLI does, before anything loads libgomp (llama.cpp shares it)
    n_ctx = a.prefill + a.decode + 32
    if a.worker == "lmcli":
        import lmcli

        numba.set_num_threads(a.threads)
        tr = lmcli.load(a.file, n_ctx=n_ctx).transformer
        vocab = tr.cfg.vocab_size

        def run(prompt, n_dec):
            cache = tr.new_cache(n_ctx)
            t = time.perf_counter()
            tok = int(tr.forward(prompt, cache)[-1].argmax())
            pre = len(prompt) / (time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(n_dec):
                tok = int(tr.forward([tok], cache)[-1].argmax())
            return pre, n_dec / (time.perf_counter() - t)
    else:
        sys.path.insert(0, str(HERE))
        from compare import bench_llama, llama_no_repack

        llm = llama_no_repack(model_path=a.file, n_ctx=n_ctx, n_batch=512, n_threads=a.threads,
                              n_threads_batch=a.threads, verbose=False)
        vocab = llm.n_vocab()

        def run(prompt, n_dec):
            return bench_llama(llm, prompt, n_dec)

    prompt = [int(t) for t in np.random.default_rng(0).integers(100, vocab - 100, a.prefill)]
    run(prompt[:16], 4)  # first calls: page-in, lazy set-up
    pre, dec = run(prompt, a.decode)
    print(json.dumps({"pre": pre, "dec": dec}))


def spawn(engine: str, tree: Path, file: Path, a) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(HERE / "gguf_types.py"), "--worker", engine, "--file", str(file),
           "--prefill", str(a.prefill), "--decode", str(a.decode), "--threads", str(a.threads)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if r.returncode != 0:
        sys.exit(f"{engine} ({tree}) on {file} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lmcli-gguf-types")
    ap.add_argument("--before", help="an earlier lmcli source tree to compare with")
    ap.add_argument("--types", default="Q5_K_M,IQ4_XS")
    ap.add_argument("--models", default="smollm2,moe")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["lmcli", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    files = build(d, a.models.split(","), a.types.split(","))
    engines = [("after", "lmcli", ROOT)] + ([("before", "lmcli", Path(a.before))] if a.before else [])
    engines.append(("llama.cpp", "llama", ROOT))
    from compare import describe

    print(describe() + f"; {a.threads} threads; {a.prefill}-token prefill, {a.decode}-token decode")
    for model, t, gguf, lmc in files:
        for name, eng, tree in engines:  # untimed: compiles kernels into each tree's cache, pages the file in
            spawn(eng, tree, lmc if eng == "lmcli" else gguf, a)
        res = {name: {"pre": [], "dec": []} for name, _, _ in engines}
        loads = []
        for _ in range(a.reps):
            for name, eng, tree in engines:
                loads.append(os.getloadavg()[0])
                r = spawn(eng, tree, lmc if eng == "lmcli" else gguf, a)
                res[name]["pre"].append(r["pre"])
                res[name]["dec"].append(r["dec"])
        print(f"\n== {model} {t} ({gguf.stat().st_size / 1e6:.0f} MB), {a.reps} reps, load average "
              f"{min(loads):.2f}-{max(loads):.2f}")
        for name, _, _ in engines:
            print(f"  {name:10s} decode tok/s {spread(res[name]['dec'])}   prefill tok/s {spread(res[name]['pre'])}")
        for num, den in [("after", "before"), ("after", "llama.cpp")]:
            if den in res:
                for k, what in (("dec", "decode"), ("pre", "prefill")):
                    ratio = [x / y for x, y in zip(res[num][k], res[den][k])]
                    print(f"  {num}/{den} {what:7s} {spread(ratio)}")
        print(json.dumps({"model": model, "type": t, "loads": loads, **res}))


if __name__ == "__main__":
    main()
