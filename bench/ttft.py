"""Warm start to first token: seconds from launching `lmcli run MODEL PROMPT` to its first byte on stdout.

    python bench/ttft.py [--model smollm2] [--reps 9] [--prompt "What is the capital of France?"] [--base DIR]

Each run is a fresh process (as a user's command is) of the checkout this script is in; one run first, not
counted, so that Numba's cache and the page cache are warm. Prints the median with min and max, the CPU seconds
of the whole (one-token) run, and the load average the runs saw (wall figures depend on what else the machine runs).
--base DIR: another checkout (say, `git worktree add DIR main`), run alternately with this one, so that both see
the same machine.

PYTHONDONTWRITEBYTECODE=1 (set in some shells and containers) makes every run compile lmcli's own sources again,
which an installed lmcli does not do: this script unsets it, so that both checkouts keep their bytecode.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def first_byte_seconds(cmd: list[str], checkout: Path) -> tuple[float, float]:
    """(seconds to the first byte on stdout, CPU seconds of the whole process)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(checkout)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=checkout, env=env)
    first = p.stdout.read(1)
    dt = time.perf_counter() - t
    p.stdout.read()
    if p.wait() != 0 or not first:
        raise SystemExit(f"{' '.join(cmd)} in {checkout} failed (exit {p.returncode})")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dt, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--base", type=Path, default=None, help="another checkout, run alternately with this one")
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "lmcli.cli", "run", a.model, a.prompt, "-n", "1", "--temp", "0"]
    here = Path(__file__).resolve().parents[1]
    checkouts = ([a.base.resolve()] if a.base else []) + [here]
    for c in checkouts:
        first_byte_seconds(cmd, c)  # warms the caches
    load0 = os.getloadavg()[0]
    res: dict = {c: [] for c in checkouts}
    for _ in range(a.reps):
        for c in checkouts:
            res[c].append(first_byte_seconds(cmd, c))
    load1 = os.getloadavg()[0]
    print(f"warm start to first token, `lmcli run {a.model} {a.prompt!r}`, {a.reps} runs each, load average "
          f"{load0:.1f} -> {load1:.1f}")
    for c in checkouts:
        wall, cpu = [r[0] for r in res[c]], [r[1] for r in res[c]]
        print(f"  {str(c):40s} first token {fmt(wall)}; CPU of the run {fmt(cpu)}")
        print("    " + " ".join(f"{t:.2f}" for t in wall))


if __name__ == "__main__":
    main()
