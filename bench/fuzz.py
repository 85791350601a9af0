"""Mutation fuzzing of the file readers (GGUF import, container + weight map, safetensors headers), longer than
CI's 300 per reader: python bench/fuzz.py [--n 20000] [--seed 1] [--kinds gguf,container,safetensors]

A mutated file that raises anything but the reader's typed error stops the run and is kept as
<dir>/crash.<kind> with the exception printed."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fuzz_readers  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", default=",".join(sorted(fuzz_readers.READERS)))
    ap.add_argument("--dir", default=None, help="where seeds and crashes go (default: a new temp directory)")
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="lmcli-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = fuzz_readers.seeds(work)
    for kind in a.kinds.split(","):
        t = time.perf_counter()
        counts = fuzz_readers.run(kind, seeds[kind], work, a.n, a.seed)
        print(f"{kind:12s} {a.n} mutations: {counts['read']} read, {counts['refused']} refused, "
              f"{time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
