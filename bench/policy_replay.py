"""Expert cache replacement policies replayed on real routing traces: LRU and LFU (the kinds
`lmcli.engine.expert_cache.Policy` implements) against Belady's optimum, at several cache sizes.

    python bench/policy_replay.py TRACE.jsonl [TRACE.jsonl ...] [--capacity 0.25,0.4,0.6] [--json]
    python bench/policy_replay.py SOURCE.jsonl --write-trace OUT.jsonl   # then: lmcli plan MODEL --trace OUT.jsonl

Each input file is one of two JSON-lines formats, told apart by its first line:

- lmcli's own, as `lmcli run --routing-trace FILE` writes it: {"pos", "layer", "experts", "weights"} per token
  and layer, already in the order the engine visits them; replayed as it stands.
- the routing logs of github.com/Mario928/speculative-moe: {"dataset", "problem_id", "layer", "token_idx",
  "experts", "gating_probs"}, layer-major within each problem (every token of layer 0, then layer 1, ...).
  They are reordered into decode order, token by token and layer by layer within a token, problems one after
  the other in file order, as a chat session would run them.

A replay is the engine's cache in miniature: one global cache of `capacity` whole expert bundles over
(layer, expert) keys, cold at the start, the experts of the step being run pinned. Capacities are given as
fractions of all routed experts (n_layer x n_expert). The `static` column is a reference for pinning: the
`capacity` experts the whole trace uses most, loaded before it starts and never evicted (it needs the future,
and it pays no cold misses, so it can exceed Belady's cold-start figure by up to the distinct-expert count).

The real trace measured:

    source   github.com/Mario928/speculative-moe, commit 216e26eb86ee09fa46bb0e8c000be7e9758e10b6
             (2025-12-09, "Reorganize repo: ..."), files routing_data_collected/humaneval_2_routing.jsonl
             (HumanEval problems 0-1, 83 + 255 decode tokens) and routing_data_collected/gsm8k_2_routing.jsonl
             (GSM8K problems 0-1, 168 + 79 decode tokens); later commits moved them to Git LFS.
    model    Mixtral-8x7B-Instruct-v0.1 in FP8 under vLLM, greedy decoding, max 256 new tokens; 32 MoE layers,
             8 experts, top-2. Decode tokens only (the collector drops the prefill and vLLM's padding rows).
    license  the repository declares none (no LICENSE file, none in its README), so no excerpt of the data is
             redistributed here; fetch the files from that commit to reproduce:
                 git -C speculative-moe show 216e26eb:routing_data_collected/humaneval_2_routing.jsonl > he.jsonl

Hit rates on it, the four problems as one session (585 decode tokens, 37,336 expert uses, 256 experts):

    share of experts  bundles    lru     lfu   belady  static   (uniform routing would give the share)
          25%            64     37.4%   29.7%  60.3%   32.2%
          40%           102     42.2%   45.9%  74.8%   48.7%
          60%           154     66.0%   66.5%  87.2%   68.8%

Per problem (each from a cold cache) the ordering holds: LRU ahead of LFU at 25% (by 2.6-9.1 points), LFU
ahead at 40% (by 0.7-9.9) and at 60% (by 0.8-5.9); both 16-36 points below Belady. `lmcli plan MODEL --trace` on the converted session and a
32-layer, 8-expert container gives the same LRU figures (it replays with the same functions).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from lmcli.engine.expert_cache import DEFAULT_POLICY, POLICIES, belady_hits, replay_hits

DEFAULT_CAPACITIES = (0.25, 0.40, 0.60)


def from_speculative_moe(rows: list[dict]) -> list[tuple[str, list]]:
    """Mario928/speculative-moe rows -> one (name, steps) per (dataset, problem) in file order, each step
    (layer, [experts]) in decode order: token 0 through every layer, then token 1, ... A (layer, token) the
    log lacks (its collector drops rows it takes for padding) is skipped."""
    problems: dict = {}
    for r in rows:
        key = (r.get("dataset", "?"), int(r["problem_id"]))
        problems.setdefault(key, {})[(int(r["token_idx"]), int(r["layer"]))] = [int(e) for e in r["experts"]]
    out = []
    for (dataset, pid), cells in problems.items():
        steps = [(layer, cells[(tok, layer)]) for tok, layer in sorted(cells)]
        out.append((f"{dataset}/{pid}", steps))
    return out


def load(path: Path) -> list[tuple[str, list]]:
    """(name, steps) groups from one file of either format."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: empty")
    if "token_idx" in rows[0] and "problem_id" in rows[0]:
        return [(f"{path.name}:{name}", steps) for name, steps in from_speculative_moe(rows)]
    if "pos" in rows[0]:
        return [(path.name, [(int(r["layer"]), [int(e) for e in r["experts"]]) for r in rows])]
    raise SystemExit(f"{path}: neither lmcli's routing trace nor speculative-moe's routing log")


def static_hits(steps: list, capacity: int) -> int:
    """Hits of the `capacity` most used experts, resident from the start and never evicted."""
    counts = Counter((layer, e) for layer, experts in steps for e in experts)
    return sum(n for _, n in counts.most_common(capacity))


def replay(steps: list, fractions, n_expert: int | None = None) -> dict:
    layers = sorted({layer for layer, _ in steps})
    n_exp = n_expert or 1 + max(e for _, experts in steps for e in experts)
    uses = sum(len(experts) for _, experts in steps)
    tokens = max(Counter(layer for layer, _ in steps).values())
    rows = []
    for f in fractions:
        cap = max(round(f * len(layers) * n_exp), max(len(e) for _, e in steps))
        h = {k: replay_hits(steps, cap, k) for k in POLICIES}
        h["belady"] = belady_hits(steps, cap)
        h["static"] = static_hits(steps, cap)
        rows.append({"fraction": f, "capacity": cap, **{k: round(v / uses, 4) for k, v in h.items()}})
    return {"layers": len(layers), "n_expert": n_exp, "tokens": tokens, "uses": uses,
            "distinct": len({(layer, e) for layer, experts in steps for e in experts}), "rows": rows}


def write_trace(path: Path, steps: list, n_layers: int) -> None:
    """lmcli's routing-trace format, for `lmcli plan MODEL --trace` (weights are not in the replay: equal)."""
    lines = (json.dumps({"pos": i // n_layers, "layer": layer, "experts": experts,
                         "weights": [round(1 / len(experts), 6)] * len(experts)}) + "\n"
             for i, (layer, experts) in enumerate(steps))
    with open(path, "w") as f:
        f.writelines(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--capacity", default=",".join(str(c) for c in DEFAULT_CAPACITIES),
                    help="cache sizes as fractions of all routed experts, comma-separated")
    ap.add_argument("--n-expert", type=int, default=None, help="experts per layer (default: largest id + 1)")
    ap.add_argument("--write-trace", type=Path, default=None, help="write the whole session in lmcli's format")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    fractions = [float(x) for x in args.capacity.split(",") if x.strip()]
    groups = [g for p in args.files for g in load(p)]
    session = [s for _, steps in groups for s in steps]
    results = {name: replay(steps, fractions, args.n_expert) for name, steps in groups}
    if len(groups) > 1:
        results["all, one session"] = replay(session, fractions, args.n_expert)
    if args.write_trace:
        write_trace(args.write_trace, session, len({layer for layer, _ in session}))
    if args.json:
        print(json.dumps({"default_policy": DEFAULT_POLICY, "results": results}))
        return 0
    cols = [*POLICIES, "belady", "static"]
    for name, r in results.items():
        print(f"\n{name}: {r['tokens']} tokens x {r['layers']} layers, {r['n_expert']} experts per layer, "
              f"{r['uses']} expert uses, {r['distinct']} distinct experts")
        print("  share  bundles  " + "  ".join(f"{c:>7}" for c in cols))
        for row in r["rows"]:
            print(f"  {row['fraction']:>5.0%}  {row['capacity']:>7}  " + "  ".join(f"{row[c]:>7.1%}" for c in cols))
    print(f"\nhit rates; the engine's default policy is {DEFAULT_POLICY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
