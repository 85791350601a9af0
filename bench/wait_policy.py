"""How the kernel threads wait between parallel launches: decode tokens/s of lmcli's default thread policy under
several OpenMP wait settings, on a quiet machine and beside busy neighbours, each setting in its own process
(libgomp reads them once, when Numba loads it), settings alternating within each repetition.

    python bench/wait_policy.py [--model smollm2] [--reps 5] [--decode 64] [--busy 0,1,2]
        [--settings "passive;spin=10000;spin=1000;default"]

A setting: "passive" (OMP_WAIT_POLICY=passive: idle threads sleep at once), "active" (they spin),
"spin=N" (GOMP_SPINCOUNT=N: spin about N iterations, then sleep; libgomp's estimate is 100000 per ms),
"default" (neither set: libgomp spins about 3 ms when there are no more threads than CPUs),
"cli" (what the checkout's configure_pool sets, as `lmcli run` runs).
A suffix ",t=N" runs -t N (fixed) instead of the default adaptive policy: "passive,t=1"; a last suffix
",src=DIR" runs another checkout of lmcli (say, `git worktree add DIR main` before a change): "cli,src=/tmp/old".
Prints each setting's median (min, max) per load, and every setting's ratio to the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import busy_neighbours  # noqa: E402

CHILD = r"""
import json, sys, time
import lmcli, lmcli.api
if sys.argv[3] == "default":
    lmcli.api.configure_pool = lambda: None  # leave libgomp's own default (no OMP_WAIT_POLICY)
from lmcli.threads import ThreadPolicy
import numba
m = lmcli.load(sys.argv[1])
tr = m.transformer
n = int(sys.argv[2])
ids = m.tokenizer.encode("The history of the city begins")
out = []
for rep in range(2):  # the first pass warms caches and the thread pool
    cache = tr.new_cache(len(ids) + n + 8)
    t_fixed = sys.argv[4]
    pol = (ThreadPolicy.default(numba.config.NUMBA_NUM_THREADS) if t_fixed == "auto"
           else ThreadPolicy.default(int(t_fixed), fixed=True))
    pol.begin()
    tok = int(tr.forward(ids, cache)[-1].argmax())
    t = time.perf_counter()
    for _ in range(n):
        tok = int(pol.step(lambda: tr.forward([tok], cache))[-1].argmax())
    out.append(n / (time.perf_counter() - t))
print(json.dumps([out[-1], pol.describe()]))
"""


def env_for(setting: str) -> dict:
    setting, _, src = setting.partition(",src=")
    setting = setting.split(",")[0]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env["PYTHONPATH"] = src or str(Path(__file__).resolve().parents[1])
    if setting == "cli":
        pass  # what the checkout's lmcli.threads.configure_pool sets
    elif setting in ("passive", "active"):
        env["OMP_WAIT_POLICY"] = setting
    elif setting.startswith("spin="):
        env["GOMP_SPINCOUNT"] = setting[5:]
    elif setting != "default":
        raise SystemExit(f"unknown setting {setting!r}")
    return env


def run(model: str, n: int, setting: str) -> tuple[float, str]:
    wait, _, threads = setting.split(",src=")[0].partition(",t=")
    env = env_for(setting)  # the child runs in the checkout: `-c` puts the working directory first on sys.path
    r = subprocess.run([sys.executable, "-c", CHILD, model, str(n), wait, threads or "auto"], capture_output=True,
                       text=True, env=env, cwd=env["PYTHONPATH"], timeout=1800)
    if r.returncode:
        raise SystemExit(f"{setting}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    tps, threads = json.loads(r.stdout.strip().splitlines()[-1])
    return float(tps), threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--busy", default="0,1,2")
    ap.add_argument("--settings", default="passive;spin=10000;spin=1000;default")
    a = ap.parse_args()
    settings = [s.strip() for s in a.settings.split(";") if s.strip()]
    from quant.kernels import kernel_path

    print(f"lmcli kernels: {kernel_path()['kernel_path']}; model {a.model}; {os.cpu_count()} CPUs")
    results = {}
    for busy in [int(b) for b in a.busy.split(",")]:
        res, ended = {s: [] for s in settings}, {}
        load0 = os.getloadavg()[0]
        with busy_neighbours(busy):
            time.sleep(0.5 if busy else 0)
            for _ in range(a.reps):
                for s in settings:
                    tps, th = run(a.model, a.decode, s)
                    res[s].append(tps)
                    ended.setdefault(s, []).append(th)
        print(f"\n== {busy} busy neighbour(s) (load average before: {load0:.2f})")
        base = statistics.median(res[settings[0]])
        for s in settings:
            m = statistics.median(res[s])
            print(f"  {s:12s} decode tok/s median {m:7.2f} (min {min(res[s]):.2f}, max {max(res[s]):.2f})"
                  f"  {m / base:.2f}x of {settings[0]}; threads at the end: {', '.join(ended[s])}")
        results[busy] = res
    print(json.dumps(results))


if __name__ == "__main__":
    main()
