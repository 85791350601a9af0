"""Continuous batching in `lmcli serve` (issue 21): aggregate decode tokens/s of 4 concurrent clients against 1
client, on the synthetic MoE of bench/moe_compare.py (Mixtral-shaped, 8 experts top-2, random Q4_0) and SmolLM2;
optionally beside llama.cpp's llama-server -np 4 on the same weights exported to GGUF.

Each configuration is a server in its own process (`lmcli serve --parallel 4`, `--parallel 1`, llama-server), driven
by streaming /v1/completions clients (greedy, ignore_eos, distinct short prompts); configurations alternate within
each repetition so machine noise hits all alike. Aggregate decode tokens/s = the clients' tokens after their first,
over the time from the first client's first token to the last client's last (the other clients' prompts are
prefilled inside it); beside it, the tokens/s while every client decodes (the batched decode alone); medians (min, max).

    python bench/serve_batch.py --model synthetic --model smollm2 [--reps 5] [--decode 64]
        [--llama-server PATH/llama-server]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import fmt, med  # noqa: E402

WORDS = ("river stone cloud light dark red green blue north south east west small large cat dog bird tree the a of "
         "model expert router token layer cache").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int, rep: int) -> str:
    """A distinct ~24-word prompt per client and repetition (no shared prefix for a prefix cache to reuse)."""
    import random

    r = random.Random(1000 * rep + i)
    return f"Story {rep}.{i}: " + " ".join(r.choice(WORDS) for _ in range(24))


def stream(url: str, text: str, n: int) -> list[float]:
    """The arrival times of the text chunks (one per token, but for text held back) of one streamed greedy
    completion of n tokens."""
    body = {"prompt": text, "max_tokens": n, "n_predict": n, "temperature": 0, "ignore_eos": True, "stream": True}
    times = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and obj["choices"][0].get("text"):
                times.append(time.perf_counter())
    return times


def aggregate(url: str, clients: int, n: int, rep: int) -> tuple[float, float]:
    """(aggregate, all decoding) tokens/s of `clients` concurrent streamed completions of n tokens each.

    aggregate: every client's tokens after its first, over the time from the first client's first token to the last
    client's last (the other clients' prompts are prefilled inside it). All decoding: the chunks that arrived while
    every client was past its prompt and not yet done, over that span (the batched decode alone; 0 when no span)."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda i: stream(url, prompt(i, rep), n), range(clients)))
    t0, t1 = min(r[0] for r in res), max(r[-1] for r in res)
    a, b = max(r[0] for r in res), min(r[-1] for r in res)
    inside = sum(a < t <= b for r in res for t in r)
    return clients * (n - 1) / (t1 - t0), (inside / (b - a) if b > a else 0.0)


def wait_ready(url: str, proc: subprocess.Popen, what: str) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not start")


def synthetic(d: Path) -> Path:
    """bench/moe_compare.py's "small" shape: 8 layers, hidden 2048, expert FFN 5632, 8 experts top-2, Q4_0."""
    from quant.synthetic import write_synthetic_moe

    p = d / "small.lmc"
    if not p.exists():
        d.mkdir(parents=True, exist_ok=True)
        write_synthetic_moe(p, n_layer=8, n_embd=2048, n_ff_exp=5632, n_head=16, n_head_kv=4, n_expert=8,
                            n_expert_used=2, vocab=32000)
    return p


def gguf_of(spec: str, lmc: Path | None, d: Path) -> Path:
    """The same weights as a GGUF for llama-server: the packaged file of a registry model, or an export."""
    if lmc is None:
        from lmcli.registry import load_registry
        from lmcli.store import packaged_file

        return packaged_file(load_registry()[spec].packaged)
    from quant.gguf_export import export_gguf

    out = d / (lmc.stem + ".gguf")
    if not out.exists():
        export_gguf(lmc, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="synthetic (the MoE) or a model name/path; repeatable")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/lmcli-bench-serve")
    ap.add_argument("--llama-server", help="a llama-server binary: also run it with -np CLIENTS on the same weights")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    from quant.kernels import kernel_path

    print(f"lmcli kernels: {kernel_path()['kernel_path']}; {os.cpu_count()} CPUs; {a.decode} tokens per client, "
          f"{a.reps} reps, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '10000 (lmcli default)')}")
    for spec in a.model or ["synthetic", "smollm2"]:
        run(a, spec)


def run(a, spec: str) -> None:
    d = Path(a.dir)
    lmc = synthetic(d) if spec == "synthetic" else None
    model = str(lmc) if lmc is not None else spec
    ctx = 4 * (a.decode + 64)
    servers: dict[str, tuple[str, list[int]]] = {}  # label -> (url, client counts to run)
    procs = []
    try:
        for np_ in (a.clients, 1):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "lmcli.cli", "serve", model, "--port", str(port),
                                           "--parallel", str(np_), "-c", str(ctx), "--prefix-cache", "0"],
                                          env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, procs[-1], f"lmcli serve --parallel {np_}")
            servers[f"lmcli --parallel {np_}"] = (url, [1, a.clients] if np_ > 1 else [a.clients])
        if a.llama_server:
            gguf = gguf_of(spec, lmc, d)
            port = free_port()
            procs.append(subprocess.Popen([a.llama_server, "-m", str(gguf), "--port", str(port), "-np", str(a.clients),
                                           "-c", str(ctx * a.clients), "-t", str(a.threads), "--no-webui"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, procs[-1], "llama-server")
            servers[f"llama-server -np {a.clients}"] = (url, [1, a.clients])
        for url, counts in servers.values():  # warm up: compile, fault in the weights
            for c in counts:
                aggregate(url, c, 8, -1)
        res = {(label, c): [] for label, (_, counts) in servers.items() for c in counts}
        steady = {k: [] for k in res}
        for rep in range(a.reps):
            for (label, c) in res:
                agg, dec = aggregate(servers[label][0], c, a.decode, rep)
                res[(label, c)].append(agg)
                steady[(label, c)].append(dec)
        print(f"\n== {spec}: aggregate decode tokens/s (prompts inside the span) | while all clients decode")
        for (label, c), xs in res.items():
            dec = fmt(steady[(label, c)]) if any(steady[(label, c)]) else "-  (one at a time: never all decoding)"
            print(f"  {label:24s} {c} client{'s' if c > 1 else ' '}  {fmt(xs)} | {dec}")
        base = med(res[(f"lmcli --parallel {a.clients}", 1)])
        for (label, c), xs in res.items():
            if c > 1:
                dec = med(steady[(label, c)]) / med(steady[(f"lmcli --parallel {a.clients}", 1)])
                print(f"  {label} with {c} clients over lmcli with 1 client: {med(xs) / base:.2f}x"
                      + (f"; while all decode: {dec:.2f}x" if dec else ""))
        ls = f"llama-server -np {a.clients}"
        if (ls, a.clients) in res:
            print(f"  lmcli over llama-server at {a.clients} clients: "
                  f"{med(res[(f'lmcli --parallel {a.clients}', a.clients)]) / med(res[(ls, a.clients)]):.2f}x; "
                  f"at 1 client: {base / med(res[(ls, 1)]):.2f}x")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
