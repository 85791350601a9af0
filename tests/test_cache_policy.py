"""The expert cache's replacement policy offline: the replay functions, the engine's default, and
bench/policy_replay.py, which converts real routing logs and replays them."""

from __future__ import annotations

import importlib.util
import inspect
import json
import random
from pathlib import Path

import pytest

from lmcli.engine.expert_cache import (
    DEFAULT_POLICY,
    POLICIES,
    ExpertCache,
    Policy,
    belady_hits,
    replay_hits,
)

BENCH = Path(__file__).resolve().parent.parent / "bench" / "policy_replay.py"


def policy_replay():
    spec = importlib.util.spec_from_file_location("policy_replay", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_default_policy_is_what_the_engine_uses_unless_told(tmp_path):
    import lmcli
    from lmcli.engine.options import EngineOptions
    from quant.synthetic import write_synthetic_moe

    assert DEFAULT_POLICY in POLICIES
    # lmcli.load and the CLI build the engine from one EngineOptions, which hands cache_policy on to the cache
    assert EngineOptions().cache_policy == DEFAULT_POLICY
    assert inspect.signature(ExpertCache.__init__).parameters["policy"].default == DEFAULT_POLICY
    p = tmp_path / "m.lmc"
    write_synthetic_moe(p, n_layer=2, n_embd=256, n_ff_exp=512, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    m = lmcli.load(str(p), expert_cache_mib=3)
    assert m.options.cache_policy == DEFAULT_POLICY and m.transformer.expert_cache.policy.kind == DEFAULT_POLICY


def test_a_capacity_below_one_steps_experts_is_refused():
    steps = [(0, [1, 2, 3]), (1, [0, 1, 2])]
    for replay in (*(lambda c, k=k: replay_hits(steps, c, k) for k in POLICIES), lambda c: belady_hits(steps, c)):
        with pytest.raises(ValueError, match="3 experts"):
            replay(2)
        assert replay(3) == 0  # six distinct experts through three slots: every use a miss


def test_speculative_moe_logs_become_decode_order_steps():
    pr = policy_replay()
    # layer-major within a problem, as that repository writes them; one cell missing (a dropped row)
    rows = [{"dataset": "d", "problem_id": p, "layer": layer, "token_idx": t, "experts": [p, layer + t],
             "gating_probs": [0.6, 0.4]}
            for p in (0, 1) for layer in range(3) for t in range(2) if (p, layer, t) != (1, 2, 0)]
    groups = pr.from_speculative_moe(rows)
    assert [name for name, _ in groups] == ["d/0", "d/1"]
    assert groups[0][1] == [(0, [0, 0]), (1, [0, 1]), (2, [0, 2]), (0, [0, 1]), (1, [0, 2]), (2, [0, 3])]
    assert groups[1][1] == [(0, [1, 0]), (1, [1, 1]), (0, [1, 1]), (1, [1, 2]), (2, [1, 3])]


def test_the_bench_reports_bounded_rates_and_writes_a_trace_plan_reads(tmp_path, capsys):
    from lmcli.doctor import read_trace

    pr = policy_replay()
    rows = [{"dataset": "d", "problem_id": 0, "layer": layer, "token_idx": t,
             "experts": [(t * 3 + layer) % 8, (t * 3 + layer + 1 + t % 7) % 8], "gating_probs": [0.6, 0.4]}
            for layer in range(4) for t in range(40)]
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "trace.jsonl"
    assert pr.main([str(src), "--json", "--write-trace", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["default_policy"] == DEFAULT_POLICY
    (r,) = res["results"].values()
    assert (r["layers"], r["n_expert"], r["tokens"], r["uses"]) == (4, 8, 40, 320)
    assert [row["capacity"] for row in r["rows"]] == [8, 13, 19]  # 25%, 40%, 60% of 32
    for row in r["rows"]:
        assert all(0 <= row[k] <= row["belady"] <= 1 for k in POLICIES)
    steps, tokens = read_trace(out, {"moe_layers": [0, 1, 2, 3], "n_expert": 8}, "m")
    assert tokens == 40 and steps == pr.from_speculative_moe(rows)[0][1]


def test_cyclic_evicts_the_layer_run_now_then_backwards_and_the_next_layer_last():
    pol = Policy("cyclic")
    for layer in range(4):
        for e in (0, 1):
            pol.touch((layer, e))
    pol.touch((1, 1))  # expert 1 of layer 1 used twice: within its layer, expert 0 goes first
    pol.visit(2)  # layer 2's step starts, expert 1 of it pinned
    order = []
    while (v := pol.victim({(2, 1)})) is not None:
        order.append(v)
        pol.remove(v)
    assert order == [(2, 0), (1, 0), (1, 1), (0, 0), (0, 1), (3, 0), (3, 1)]


def test_cyclic_on_a_loop_through_too_few_slots_keeps_what_comes_next():
    # three layers, one expert each, three tokens; two slots. Worked by hand:
    # token 0: all three miss; at layer 2 the cache holds (0,0),(1,0), nothing of layer 2 to evict, so the
    #   layer before goes: (1,0). token 1: layer 0 hits; layer 1 misses and evicts (0,0) (layer 1 has nothing,
    #   layer 0 is the one before); layer 2 hits. token 2: layer 0 misses and evicts (2,0) (backwards from 0
    #   is 2); layer 1 hits; layer 2 misses. 3 hits, Belady's 3; LRU evicts the key needed next every time: 0.
    steps = [(layer, [0]) for _ in range(3) for layer in range(3)]
    assert replay_hits(steps, 2, "cyclic") == 3 == belady_hits(steps, 2)
    assert replay_hits(steps, 2, "lru") == 0


def test_cyclic_evicts_the_least_frequent_expert_of_the_layer_even_if_more_recent():
    # two layers, one expert a step, three slots. Worked by hand:
    # t0: (0,0) (1,0) miss.  t1: both hit, (0,0) used twice.  t2: (0,1) misses into the free slot, (1,0) hits.
    # t3: (0,2) misses with the cache full in layer 0's step: layer 0 holds (0,0) (2 uses, last at t1) and
    #   (0,1) (1 use, last at t2): (0,1) goes; (1,0) hits.  t4: (0,0) and (1,0) hit.
    # hits 2 + 1 + 1 + 2 = 6; global LRU evicts (0,0) at t3 and misses it at t4: 5; Belady 6.
    steps = [(0, [0]), (1, [0]), (0, [0]), (1, [0]), (0, [1]), (1, [0]), (0, [2]), (1, [0]), (0, [0]), (1, [0])]
    assert replay_hits(steps, 3, "cyclic") == 6 == belady_hits(steps, 3)
    assert replay_hits(steps, 3, "lru") == 5


def test_cyclic_keeps_the_other_experts_of_the_step_pinned():
    # two layers of top-2 over three experts, four slots. t0: four misses fill the cache. t1 layer 0 [0, 2]:
    # (0,0) hits, (0,2) misses; layer 0's evictable expert is (0,1) ((0,0) is this step's). Layer 1 [1, 2]:
    # (1,1) hits, (1,2) misses and evicts (1,0). t2: the same experts, all four hit. 6 hits.
    steps = [(0, [0, 1]), (1, [0, 1]), (0, [0, 2]), (1, [1, 2]), (0, [0, 2]), (1, [1, 2])]
    assert replay_hits(steps, 4, "cyclic") == 6


@pytest.mark.parametrize("seed", range(40))
def test_every_policy_stays_within_beladys_bound_on_random_traces(seed):
    rng = random.Random(seed)
    layers = sorted(rng.sample(range(6), rng.randint(1, 4)))  # MoE layers need not start at 0 nor be contiguous
    n_expert, top_k = rng.randint(2, 6), rng.randint(1, 2)
    skew = [rng.random() ** 2 for _ in range(n_expert)]
    steps = []
    for _ in range(rng.randint(5, 40)):
        for layer in layers:
            experts = set()
            while len(experts) < top_k:
                experts.add(rng.choices(range(n_expert), skew)[0])
            steps.append((layer, sorted(experts)))
    distinct = len({(layer, e) for layer, es in steps for e in es})
    for cap in range(top_k, distinct + 1):
        best = belady_hits(steps, cap)
        for kind in POLICIES:
            assert 0 <= replay_hits(steps, cap, kind) <= best, (kind, cap)
    for kind in POLICIES:  # everything fits: only first uses miss
        assert replay_hits(steps, distinct, kind) == sum(len(es) for _, es in steps) - distinct


def test_on_uniform_routing_cyclic_nears_the_share_held_where_lru_gets_nothing(capsys):
    pr = policy_replay()
    assert pr.main(["--uniform", "4,8,2,300", "--capacity", "0.2,0.5", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["results"].values()
    low, half = r["rows"]  # 6 and 16 of 32 bundles: below one token's 8 experts, and half
    assert low["lru"] == 0  # the loop's worst case: every expert is evicted just before its layer comes round
    # the step being run holds 2 of the 6 slots, so between (6 - 2) / 32 and the 6 / 32 held
    assert 4 / 32 <= low["cyclic"] <= 6 / 32 and low["cyclic"] > low["lfu"]
    assert half["cyclic"] == pytest.approx(0.5, abs=0.03) and half["cyclic"] > max(half["lru"], half["lfu"])
