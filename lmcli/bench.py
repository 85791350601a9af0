"""`lmcli bench`: prefill and decode speed, bytes read per token against the measured read bandwidth
(the roofline), time per phase, and a thread sweep. Figures are medians of repetitions."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import numpy as np


def measure_read_bandwidth(threads: int, mib: int = 512, reps: int = 3) -> float:
    """Median GB/s of `reps` single passes of doctor's probe over `mib` MiB (beyond any cache)."""
    from .doctor import measure_bandwidth

    return statistics.median(measure_bandwidth(mib << 20, seconds=0.0, threads=threads) for _ in range(reps))


# the engine's phases (Transformer.instrument) as the report names them
PHASE_NAMES = {"matmul": "matrix kernels", "attention": "attention", "routing": "routing", "experts": "expert kernels"}


class PhaseTimer:
    """An instrument for the engine (Transformer.instrument): wall time summed per phase, by report name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            name = PHASE_NAMES.get(phase, phase)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


@contextmanager
def instrumented(transformer, timer: PhaseTimer):
    """The transformer's phases timed by timer for the duration."""
    transformer.instrument = timer
    try:
        yield timer
    finally:
        transformer.instrument = None


def run_bench(model_name: str, *, prompt_tokens: int = 128, gen_tokens: int = 64, threads=(1, 2), reps: int = 3,
              engine=None) -> dict:
    """engine: EngineOptions for the model (its context and thread count are the bench's own)."""
    from .api import load, set_threads
    from .engine.options import EngineOptions
    from .sampling import Sampler, SamplerParams

    m = load(model_name, EngineOptions.of(engine, n_ctx=prompt_tokens + gen_tokens + 8))
    tr = m.transformer
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, m.config.vocab_size, prompt_tokens)]
    sampler = Sampler(SamplerParams(temp=0.0))
    dense = tr.weights.nbytes_dense
    res = {"model": model_name, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "reps": reps,
           "file_bytes": m.container.file_size, "threads": {}}
    for th in threads:
        set_threads(th)
        bw = measure_read_bandwidth(th)
        pre, dec, ebytes, samp = [], [], [], []
        for r in range(reps + 1):  # the first repetition warms up (kernel specialisations, page cache)
            cache = tr.new_cache()
            t = time.perf_counter()
            logits = tr.forward(prompt, cache)[-1]
            p_s = time.perf_counter() - t
            c0 = tr.counters()
            s_t = 0.0
            t = time.perf_counter()
            for _ in range(gen_tokens):
                ts = time.perf_counter()
                tok = sampler(logits)
                s_t += time.perf_counter() - ts
                logits = tr.forward([tok], cache)[-1]
            d_s = time.perf_counter() - t
            if r:
                pre.append(prompt_tokens / p_s)
                dec.append(gen_tokens / d_s)
                ebytes.append((tr.counters() - c0).expert_bytes / gen_tokens)
                samp.append(s_t / gen_tokens)
        per_tok = dense + statistics.median(ebytes)
        cache = tr.new_cache()
        tr.forward(prompt[:8], cache)
        with instrumented(tr, PhaseTimer()) as timer:
            t = time.perf_counter()
            tok = 0
            for _ in range(gen_tokens):
                tok = int(np.argmax(tr.forward([tok], cache)[-1]))
            total = time.perf_counter() - t
        acc = timer.seconds
        phases = {k: round(v / gen_tokens * 1e3, 4) for k, v in acc.items()}
        phases["sampling"] = round(statistics.median(samp) * 1e3, 4)
        phases["python and other"] = round(max(total / gen_tokens * 1e3 - sum(acc.values()) / gen_tokens * 1e3, 0), 4)
        dmed = statistics.median(dec)
        res["threads"][th] = {
            "prefill_tokens_per_s": _mmm(pre),
            "decode_tokens_per_s": _mmm(dec),
            "bytes_per_token": int(per_tok),
            "effective_gb_per_s": round(per_tok * dmed / 1e9, 3),
            "read_bandwidth_gb_per_s": round(bw, 3),
            "roofline_fraction": round(per_tok * dmed / 1e9 / bw, 4),
            "decode_ms_per_phase": phases,
        }
    return res


def _mmm(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def format_bench(r: dict) -> str:
    lines = [f"{r['model']}: {r['file_bytes'] / 1e9:.2f} GB, prompt {r['prompt_tokens']} tokens, "
             f"{r['gen_tokens']} generated, {r['reps']} repetitions (median [min-max])"]
    for th, x in r["threads"].items():
        p, d = x["prefill_tokens_per_s"], x["decode_tokens_per_s"]
        lines += [
            f"  threads {th}",
            f"    prefill   {p['median']:9.1f} tok/s  [{p['min']:.1f}-{p['max']:.1f}]",
            f"    decode    {d['median']:9.1f} tok/s  [{d['min']:.1f}-{d['max']:.1f}]",
            f"    read/token {x['bytes_per_token'] / 1e6:8.1f} MB -> {x['effective_gb_per_s']:.1f} GB/s of "
            f"{x['read_bandwidth_gb_per_s']:.1f} GB/s measured ({x['roofline_fraction']:.0%} of the roofline)",
            "    decode ms/token by phase: " + ", ".join(f"{k} {v:.3f}" for k, v in x["decode_ms_per_phase"].items()),
        ]
    return "\n".join(lines)
