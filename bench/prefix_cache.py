"""Time to first token of a conversation's second turn, with and without prompt-prefix reuse (issue 21):
`lmcli serve` twice (--prefix-cache 4 and 0), a ~2000-token first turn, then the follow-up, streamed; medians.

    python bench/prefix_cache.py [--model smollm2] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ttft(url: str, model: str, messages: list) -> tuple[float, str]:
    """Seconds to the first content delta, and the whole answer."""
    t0, first, text = time.perf_counter(), None, []
    body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if piece:
                first = first or time.perf_counter() - t0
                text.append(piece)
    return first, "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    procs, urls = [], {}
    try:
        for label, size in (("reuse", "4"), ("no reuse", "0")):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "lmcli.cli", "serve", a.model, "--port", str(port),
                                           "--prefix-cache", size, "-c", "4096"], env=os.environ,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls[label] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
        res = {k: {"turn1": [], "turn2": []} for k in urls}
        for rep in range(a.reps):
            story = " ".join(f"Note {rep}-{i}: item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(150))
            turn1 = [{"role": "user", "content": f"{story} Which colour is item 7?"}]
            for label, url in urls.items():  # alternating
                t1, answer = ttft(url, a.model, turn1)
                turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And item 8?"}]
                t2, _ = ttft(url, a.model, turn2)
                res[label]["turn1"].append(t1)
                res[label]["turn2"].append(t2)
        for label, r in res.items():
            m1, m2 = statistics.median(r["turn1"]), statistics.median(r["turn2"])
            print(f"{label:9s} first turn TTFT median {m1:.2f} s (min {min(r['turn1']):.2f}, max {max(r['turn1']):.2f}); "
                  f"second turn {m2:.3f} s (min {min(r['turn2']):.3f}, max {max(r['turn2']):.3f}); ratio {m1 / m2:.1f}x")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
