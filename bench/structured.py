"""Structured output's per-token cost: the time llguidance's mask and token acceptance add to each decode step,
against the step's own time (the forward pass and sampling), on the same generations.

Both are timed inside one run (the grammar calls wrapped with a clock), so load from other processes slows both
alike; the ratio is the figure. Also checks every output against its schema with `jsonschema`.

    python bench/structured.py [--model smollm2] [--requests 20] [--temp 0.9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--temp", type=float, default=0.9)
    ap.add_argument("--max-tokens", type=int, default=300)
    a = ap.parse_args()

    import jsonschema

    import json_schemas
    import lmcli
    from lmcli import structured

    m = lmcli.load(a.model, n_ctx=1024)
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper
    structured.Constraint.mask = timed(structured.Constraint.mask)
    structured.Constraint.accept = timed(structured.Constraint.accept)

    ratios, invalid, tokens, finished = [], 0, 0, 0
    m.constraint(structured.JSON_OBJECT)  # builds the vocabulary once, outside the timings
    for i in range(a.requests):
        schema = json_schemas.schema(i)
        ids = m.chat_ids([{"role": "user", "content": f"Fill in record #{i} as JSON."}])
        spent[0] = 0.0
        t0 = time.perf_counter()
        evs = list(m.generate(ids, max_tokens=a.max_tokens, json_schema=schema, temp=a.temp, seed=i))
        total = time.perf_counter() - t0
        final = evs[-1]
        n = len(final.tokens)
        tokens += n
        step = (total - final.timings.prefill_s - spent[0]) / max(n, 1)  # a step without the grammar
        ratios.append(spent[0] / max(n, 1) / step)
        if final.finish_reason == "stop":
            finished += 1
            try:
                jsonschema.validate(json.loads("".join(e.text for e in evs)), schema)
            except (ValueError, jsonschema.ValidationError):
                invalid += 1
    print(json.dumps({"model": a.model, "requests": a.requests, "finished": finished, "invalid": invalid,
                      "tokens": tokens, "grammar_overhead_median": round(statistics.median(ratios), 4),
                      "grammar_overhead_max": round(max(ratios), 4)}))


if __name__ == "__main__":
    main()
