"""Expert cache replacement policies replayed on real routing traces: LRU, LFU and cyclic (the kinds
`lmcli.engine.expert_cache.Policy` implements) against Belady's optimum, at several cache sizes.

    python bench/policy_replay.py TRACE.jsonl [TRACE.jsonl ...] [--capacity 0.25,0.4,0.6] [--json]
    python bench/policy_replay.py [TRACE.jsonl ...] --uniform 32,8,2,585   # and synthetic uniform routing
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

    share of experts  bundles    lru     lfu   cyclic  belady  static   (uniform routing would give the share)
          25%            64     37.4%   29.7%  37.5%   60.3%   32.2%
          40%           102     42.2%   45.9%  51.7%   74.8%   48.7%
          60%           154     66.0%   66.5%  70.3%   87.2%   68.8%

Per problem (each from a cold cache), min / median / max over the four:

    share       lru                 lfu                 cyclic              belady
     25%   34.1/35.0/41.0%     29.7/30.8/31.9%     34.1/35.0/40.9%     56.7/58.9/62.0%
     40%   37.3/38.5/47.1%     45.4/47.4/48.0%     49.4/50.7/55.4%     71.3/73.4/75.5%
     60%   61.3/65.5/66.7%     65.5/67.5/68.1%     69.0/70.1/72.2%     83.7/85.8/87.0%

Cyclic (evict from the layer whose next visit is furthest away: the one being run, then backwards) is
ahead of both LRU and LFU at 40% and 60% in every problem, by 1.9-7.6 points over the better of the two.
At 25% it ties LRU: 64 bundles are exactly one token's 32 x 2 experts, and both then keep the previous
token's experts in every layer (within one hit of LRU per problem, +17 of 37,336 on the session). Below
one token's experts LRU hits nothing (each layer's experts are evicted just before the loop comes back to
them): at 10% and 20% the session gives LRU 0.0 / 0.2%, LFU 12.1 / 23.9%, cyclic 14.5 / 29.6%, Belady
33.2 / 53.1%; in the same order 37.4 / 35.5 / 42.6 / 66.0% at 30%, 55.7 / 56.5 / 61.2 / 81.8% at 50%,
84.3 / 84.5 / 86.1 / 95.2% at 80%.

On synthetic uniform routing (`--uniform 32,8,2,585`) cyclic gets the share of experts held (24.9 / 40.1 /
60.3% at 25 / 40 / 60%), which no online policy can beat when every use is an independent draw; LRU
gets 24.9 / 24.9 / 56.2%, LFU 23.4 / 38.1 / 58.7%. The rest of the gap to Belady on the real trace is the future it
knows: an expert a layer used for the previous token is used again with probability 0.38 (0.25 if uniform),
older ones 0.15-0.26, and expert popularity within a layer is nearly flat (the most used expert of a layer
takes 14-22% of its uses, the least 5-11%), so an online policy has little to go on. Variants tried and
dropped: evicting from the previous layer before the current one's unused experts (33.1% at 25%), weighing
frequency across layers (31-36% at 25%, at most 0.2 points ahead at 40%), a reuse probability learned online
by age and frequency rank (37.3 / 52.7 / 71.0%: within a point, below LRU at 25%, and O(experts) work per
step), least recently used within the layer instead of least frequently (37.5 / 51.5 / 69.5%).

`lmcli plan MODEL --trace` on the converted session and a 32-layer, 8-expert container gives the same
figures (it replays with the same functions).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
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


def uniform(n_layer: int, n_expert: int, top_k: int, tokens: int, seed: int = 0) -> list[tuple[str, list]]:
    """Synthetic routing: each token and layer picks top_k distinct experts uniformly at random, in decode order."""
    rng = random.Random(seed)
    steps = [(layer, rng.sample(range(n_expert), top_k)) for _ in range(tokens) for layer in range(n_layer)]
    return [(f"uniform {n_layer}x{n_expert} top-{top_k}, seed {seed}", steps)]


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
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--uniform", default=None, metavar="L,E,K,T",
                    help="also replay synthetic uniform routing: L layers, E experts, top-K, T tokens (seed 0)")
    ap.add_argument("--capacity", default=",".join(str(c) for c in DEFAULT_CAPACITIES),
                    help="cache sizes as fractions of all routed experts, comma-separated")
    ap.add_argument("--n-expert", type=int, default=None, help="experts per layer (default: largest id + 1)")
    ap.add_argument("--write-trace", type=Path, default=None, help="write the whole session in lmcli's format")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    fractions = [float(x) for x in args.capacity.split(",") if x.strip()]
    if not args.files and not args.uniform:
        ap.error("give routing files, --uniform, or both")
    groups = [g for p in args.files for g in load(p)]
    session = [s for _, steps in groups for s in steps]
    results = {name: replay(steps, fractions, args.n_expert) for name, steps in groups}
    if len(groups) > 1:
        results["all, one session"] = replay(session, fractions, args.n_expert)
    spread = None
    if len(groups) > 2:  # each policy's hit rate over the problems replayed one by one
        spread = [{"fraction": f, **{c: [round(q(results[name]["rows"][i][c] for name, _ in groups), 4)
                                         for q in (min, statistics.median, max)] for c in (*POLICIES, "belady")}}
                  for i, f in enumerate(fractions)]
    if args.uniform:
        shape = [int(x) for x in args.uniform.split(",")]
        for name, steps in uniform(*shape):
            results[name] = replay(steps, fractions, shape[1])
    if args.write_trace:
        write_trace(args.write_trace, session, len({layer for layer, _ in session}))
    if args.json:
        print(json.dumps({"default_policy": DEFAULT_POLICY, "results": results, "spread": spread}))
        return 0
    cols = [*POLICIES, "belady", "static"]
    for name, r in results.items():
        print(f"\n{name}: {r['tokens']} tokens x {r['layers']} layers, {r['n_expert']} experts per layer, "
              f"{r['uses']} expert uses, {r['distinct']} distinct experts")
        print("  share  bundles  " + "  ".join(f"{c:>7}" for c in cols))
        for row in r["rows"]:
            print(f"  {row['fraction']:>5.0%}  {row['capacity']:>7}  " + "  ".join(f"{row[c]:>7.1%}" for c in cols))
    if spread:
        print(f"\nper problem, each from a cold cache: min / median / max over {len(groups)}")
        print("  share  " + "  ".join(f"{c:>20}" for c in (*POLICIES, "belady")))
        for row in spread:
            print(f"  {row['fraction']:>5.0%}  " + "  ".join(
                f"{'/'.join(f'{x:.1%}' for x in row[c]):>20}" for c in (*POLICIES, "belady")))
    print(f"\nhit rates; the engine's default policy is {DEFAULT_POLICY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
