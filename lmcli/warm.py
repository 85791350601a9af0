"""Compile the kernels a model needs before its first token, in parallel processes, once per CPU.

Numba compiles each kernel on its first call and keeps the machine code in its on-disk cache (cache=True), so
only the first run on a machine pays (about 35 s for SmolLM2 on 2 cores). Numba compiles under one lock per
process, so threads do not overlap; processes do: each worker compiles its share of the signatures into the
shared cache, and the model's own process then loads them from there in milliseconds.

A signature is written out exactly as the engine's call passes it (array dtype, dimensions, layout, read-only
flag), from the loaded model's own arrays (numba.typeof), so a worker compiles the very specialisation the
forward pass looks up. A call this module does not foresee still works: Numba compiles it in-process on first use,
as before; tests/test_warm.py checks that a warmed model's forward pass compiles nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

# Measured seconds to compile (AVX-512 VNNI machine, loaded): the heaviest first, to balance the workers.
_COST = {"matmul_q4": 9.6, "_attention_rows": 8.8, "embed_rows": 8.5, "matmul_q8": 6.2, "moe_gate_up": 6.0,
         "moe_down": 5.0, "moe_gate_up_rows": 5.0, "moe_down_rows": 4.0, "_attention_rows4": 8.0,
         "matmul_gguf_rows": 6.0, "matmul_tiles": 4.7, "matmul_f16": 3.0, "mla_query": 2.0, "mla_output": 2.0}


def _typeof(a):
    import numba

    return numba.typeof(a)


def _arr(dtype, ndim: int):
    return _typeof(np.empty((1,) * ndim, dtype))


def _disp(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def model_calls(tf) -> list[tuple[str, str, tuple]]:
    """(module, kernel, argument types) of every Numba kernel call tf's forward pass makes (decode and prefill)."""
    import numba.types as nt

    from .engine import ops
    from .engine.weights import Linear

    f32_1, f32_2, f32_3 = _arr(np.float32, 1), _arr(np.float32, 2), _arr(np.float32, 3)
    i16_2, i32_2, i64_1, i64_2 = _arr(np.int16, 2), _arr(np.int32, 2), _arr(np.int64, 1), _arr(np.int64, 2)
    K, O, M = "quant.kernels", "lmcli.engine.ops", "lmcli.engine.moe"
    calls: dict = {}

    def add(module: str, name: str, *args) -> None:
        calls[(module, name, tuple(args))] = None

    def lin(x: Linear | None) -> None:
        if x is None:
            return
        if x.rows_f32 is not None:
            add(K, "matmul_rows", _typeof(x.rows_f32), f32_2, f32_2)
        elif x.tiles is not None:  # GGUF rows repacked at load (quant.repack)
            add(K, "quantize_act", f32_2, i16_2, f32_2, i32_2)
            add(K, "matmul_tiles", _typeof(x.tiles[0]), _typeof(x.tiles[1]), nt.int64, i16_2, f32_2, i32_2, f32_2)
        elif x.fmt.int_act:
            add(K, "quantize_act", f32_2, i16_2, f32_2, i32_2)
            add(K, x.fmt.matmul_name, _typeof(x.codes), _typeof(x.scales), i16_2, f32_2, i32_2, f32_2)
        elif x.fmt.gguf_rows:
            add(K, x.fmt.matmul_name, _typeof(x.codes), nt.int64, f32_2, f32_2)
        else:
            add(K, x.fmt.matmul_name, _typeof(x.codes), f32_2, f32_2)

    def embed(x: Linear) -> None:
        add(K, "embed_rows", _typeof(x.codes.reshape(-1).view(np.uint8)), _typeof(x.scales), nt.int64, i64_1, f32_2)

    cfg, w = tf.cfg, tf.weights
    kv = _arr(np.float32 if tf.kv_type == "f32" else np.uint16, 3)
    embed(w.tok_embd)
    lin(w.output)
    add(O, "rmsnorm", f32_2, _typeof(w.output_norm), nt.float64, f32_2)
    add(O, "add_inplace", f32_2, f32_2)
    attn = ["_attention_rows"]
    for L in w.layers:
        at, ff = L.attn, L.ffn
        add(O, "rmsnorm", f32_2, _typeof(L.attn_norm), nt.float64, f32_2)
        for norm in (at.q_norm, at.k_norm, at.q_a_norm, at.kv_a_norm):
            if norm is not None:
                add(O, "rmsnorm", f32_2, _typeof(norm), nt.float64, f32_2)
        for x in (at.wq, at.wk, at.wv, at.wo, at.wq_a, at.wq_b, at.wkv_a):
            lin(x)
        if at.wk_b is not None:
            add(O, "mla_query", f32_3, _typeof(at.wk_b), f32_3)
            add(O, "mla_output", f32_3, _typeof(at.wv_b), f32_2)
        for x in (ff.gate, ff.up, ff.down, ff.router, ff.sh_gate, ff.sh_up, ff.sh_down):
            lin(x)
        if ff.gate is not None or ff.sh_gate is not None or ff.experts is not None:
            add(K, "silu_mul", f32_2, f32_2, f32_2)
        if ff.experts is not None:
            add(K, "group_by_expert", i64_2, nt.int64)
            add(K, "combine_experts", f32_2, i64_1, f32_1, f32_2)
            if tf.router.kind == "softmax":
                add(M, "_route_softmax", f32_2, nt.int64, nt.boolean, i64_2, f32_2)
            add(K, "quantize_act", f32_2, i16_2, f32_2, i32_2)
            b8, b16, b32 = _typeof(w.buf8), _typeof(w.buf16), _typeof(w.buf32)
            i7, i5 = (nt.int64,) * 4, (nt.int64,) * 3
            xs = (i16_2, f32_2, i32_2, f32_2)
            add(K, "moe_gate_up", b8, b16, b32, *i7, *(i64_1,) * 7, *xs, f32_3)
            add(K, "moe_down", b8, b16, b32, *i5, *(i64_1,) * 4, *xs, f32_2)
            if all(f.expert_rows for f in ff.experts.fmts.values()):
                add(K, "moe_gate_up_rows", b8, b16, *i7, *(i64_1,) * 7, *xs, f32_2)
                add(K, "moe_down_rows", b8, b16, *i5, *(i64_1,) * 4, *xs, f32_2)
    add(O, "rope", f32_3, nt.int64, _typeof(tf.cos), _typeof(tf.sin), nt.int64, nt.boolean)
    group = cfg.n_head if cfg.kv_lora_rank else cfg.n_head // max(1, cfg.n_head_kv)  # MLA: one latent head
    if group >= ops.BLOCKED_GROUP:
        attn.append("_attention_rows4")
    for name in attn:
        add(O, name, f32_3, kv, kv, nt.int64, nt.float32, nt.int64, f32_3, nt.int64)
    return list(calls)


REPORT: Callable[[int, int], None] | None = None  # the CLI's progress line on a first run (lmcli.cli sets it)


def _is_cached(disp, sig: tuple) -> bool:
    """Whether Numba's on-disk cache holds disp's code for sig on this CPU (its index, not its data, is read)."""
    try:
        cache = disp._cache
        key = cache._index_key(sig, disp.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # a Numba without these internals: assume not, and compile (the result is the same)
        return False


def missing(calls: list[tuple[str, str, tuple]]) -> list[tuple[str, str, tuple]]:
    """The calls whose compiled code is neither in this process nor in the on-disk cache."""
    out = []
    for module, name, sig in calls:
        disp = _disp(module, name)
        if sig in disp.overloads or _is_cached(disp, sig):
            continue
        out.append((module, name, sig))
    return out


def _encode(t) -> list:
    import numba.types as nt

    if isinstance(t, nt.Array):
        return ["A", str(t.dtype), t.ndim, t.layout, not t.mutable]
    return ["S", str(t)]


def _decode(e: list):
    import numba.types as nt

    if e[0] == "A":
        return nt.Array(getattr(nt, e[1]), int(e[2]), str(e[3]), readonly=bool(e[4]))
    return nt.boolean if e[1] == "bool" else getattr(nt, e[1])


def _shares(calls: list, n: int) -> list[list]:
    """calls split into n lists of about equal cost (largest first), every signature of one kernel in one list
    (two processes saving one kernel's cache index at once could lose an entry)."""
    by_kernel: dict = {}
    for c in calls:
        by_kernel.setdefault(c[:2], []).append(c)
    groups = sorted(by_kernel.values(), key=lambda g: -_COST.get(g[0][1], 1.0) * len(g))
    shares, load = [[] for _ in range(n)], [0.0] * n
    for g in groups:
        i = load.index(min(load))
        shares[i] += g
        load[i] += _COST.get(g[0][1], 1.0) * len(g)
    return [s for s in shares if s]


def compile_parallel(calls: list[tuple[str, str, tuple]], jobs: int,
                     progress: Callable[[int, int], None] | None = None) -> float:
    """Compile calls into Numba's on-disk cache in `jobs` worker processes; returns the seconds taken.

    progress(done, total) is called as each kernel finishes. A worker that fails leaves its kernels to be compiled
    on first use, as without this module."""
    t0 = time.perf_counter()
    shares = _shares(calls, max(1, jobs))
    procs = []
    for share in shares:
        spec = json.dumps([[m, n, [_encode(t) for t in sig]] for m, n, sig in share])
        p = subprocess.Popen([sys.executable, "-c", _worker_code()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env={**os.environ, "LMCLI_WARM_WORKER": "1"})
        p.stdin.write(spec)
        p.stdin.close()
        procs.append(p)
    done, total = 0, len(calls)
    if progress is not None:
        progress(0, total)  # the line shows at once, and its clock starts
    lines: queue.Queue = queue.Queue()  # one line per kernel compiled, None when a worker ends: read as they come

    def read(p) -> None:
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    readers = [threading.Thread(target=read, args=(p,), daemon=True) for p in procs]
    for r in readers:
        r.start()
    try:
        ended = 0
        while ended < len(procs):
            if lines.get() is None:
                ended += 1
                continue
            done += 1
            if progress is not None:
                progress(done, total)
        for p in procs:
            p.wait()
        if progress is not None and done < total:  # a worker failed: its kernels compile on first use, the line ends
            progress(total, total)
    finally:
        getattr(progress, "stop", lambda: None)()  # a line that redraws itself (the CLI's) stops, whatever ended it
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return time.perf_counter() - t0


def _worker_code() -> str:
    """A worker's command: lmcli.warm imported from where this process imported lmcli and quant. Numba keys its cache
    by each kernel's source file, and `python -m lmcli.warm` would import the working directory's copy first: run from
    a clone of the repository (as the README's install does), the workers compiled the clone's kernels and this
    process, running the installed copy, compiled its own again (11 s more on the first run of SmolLM2)."""
    roots: list[str] = []
    for name in ("lmcli", "quant"):
        where = getattr(importlib.import_module(name), "__file__", None)
        if where is None:  # not a regular package (frozen, namespace): the worker finds it as Python does
            continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(where)))
        if root not in roots:
            roots.append(root)
    return f"import sys; sys.path[:0] = {roots!r}; from lmcli.warm import _worker; _worker()"


def warm_model(tf, jobs: int | None = None, progress: Callable[[int, int], None] | None = None) -> int:
    """Compile, in parallel, the kernels tf's forward pass needs and the cache lacks; returns how many there were.
    Does nothing inside a worker, on one core, or when LMCLI_NO_PARALLEL_COMPILE is set."""
    if os.environ.get("LMCLI_WARM_WORKER") or os.environ.get("LMCLI_NO_PARALLEL_COMPILE"):
        return 0
    from .doctor import usable_cores

    jobs = jobs or usable_cores()
    if jobs < 2:
        return 0  # one core: a worker would only add its start-up to the same compile
    todo = missing(model_calls(tf))
    if len(todo) < 2:
        return 0  # one kernel: compiling it here is as fast
    compile_parallel(todo, jobs, progress)
    return len(todo)


def _worker() -> None:
    """Compile the signatures read as JSON from stdin; print one line per kernel compiled."""
    for module, name, sig in json.loads(sys.stdin.read()):
        _disp(module, name).compile(tuple(_decode(e) for e in sig))
        print(name, flush=True)
