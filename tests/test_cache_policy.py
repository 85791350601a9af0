"""The expert cache's replacement policy offline: the replay functions, the engine's default, and
bench/policy_replay.py, which converts real routing logs and replays them."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from pathlib import Path

import pytest

from lmcli.engine.expert_cache import DEFAULT_POLICY, POLICIES, belady_hits, replay_hits

BENCH = Path(__file__).resolve().parent.parent / "bench" / "policy_replay.py"


def policy_replay():
    spec = importlib.util.spec_from_file_location("policy_replay", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_default_policy_is_what_the_engine_uses_unless_told():
    from lmcli.api import Model
    from lmcli.engine.model import Transformer

    assert DEFAULT_POLICY in POLICIES
    for fn in (Model.__init__, Transformer.__init__):
        assert inspect.signature(fn).parameters["cache_policy"].default == DEFAULT_POLICY


def test_a_capacity_below_one_steps_experts_is_refused():
    steps = [(0, [1, 2, 3]), (1, [0, 1, 2])]
    for replay in (lambda c: replay_hits(steps, c, "lru"), lambda c: replay_hits(steps, c, "lfu"),
                   lambda c: belady_hits(steps, c)):
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
        assert 0 <= row["lru"] <= row["belady"] <= 1 and 0 <= row["lfu"] <= row["belady"]
    steps, tokens = read_trace(out, {"moe_layers": [0, 1, 2, 3], "n_expert": 8}, "m")
    assert tokens == 40 and steps == pr.from_speculative_moe(rows)[0][1]


REAL = os.environ.get("LMCLI_ROUTING_TRACES")  # real routing logs, comma-separated (see bench/policy_replay.py)


@pytest.mark.skipif(not REAL, reason="set LMCLI_ROUTING_TRACES to real routing logs (none ship: no license)")
def test_on_real_routing_the_default_policy_lies_within_its_bounds():
    pr = policy_replay()
    groups = [g for p in REAL.split(",") for g in pr.load(Path(p))]
    steps = [step for _, g in groups for step in g]
    r = pr.replay(steps, pr.DEFAULT_CAPACITIES)
    for row in r["rows"]:
        assert 0 < row[DEFAULT_POLICY] <= row["belady"] < 1
        assert row["lru"] <= row["belady"] and row["lfu"] <= row["belady"]
