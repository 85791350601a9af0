"""Models larger than RAM: the expert cache under a real memory cgroup, and its policy against offline bounds."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from lmcli.engine.expert_cache import POLICIES, belady_hits, replay_hits
from quant.synthetic import write_synthetic_moe

CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _trace(seed=0, n_tok=200, n_layer=4, n_expert=16, k=2, skew=1.2):
    """A routing trace with the skew real routers show (a few experts popular per layer)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_expert + 1) ** skew
    p /= p.sum()
    perms = [rng.permutation(n_expert) for _ in range(n_layer)]
    out = []
    for _ in range(n_tok):
        for layer in range(n_layer):
            out.append((layer, [int(perms[layer][e]) for e in rng.choice(n_expert, k, replace=False, p=p)]))
    return out


@pytest.mark.parametrize("capacity", [8, 16, 32])
def test_policies_lie_between_zero_and_beladys_optimum(capacity):
    trace = _trace()
    opt = belady_hits(trace, capacity)
    for kind in POLICIES:
        h = replay_hits(trace, capacity, kind)
        assert 0 <= h <= opt
    # on skewed routing, frequency beats recency
    assert replay_hits(trace, capacity, "lfu") >= replay_hits(trace, capacity, "lru")


@pytest.mark.parametrize("kind", POLICIES)
def test_the_live_cache_counts_the_same_hits_as_the_offline_replay(tmp_path, kind):
    import lmcli

    p = tmp_path / "m.lmc"
    write_synthetic_moe(p, n_layer=3, n_embd=256, n_ff_exp=512, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    m = lmcli.load(str(p), expert_cache_mib=3, prefetch=False, cache_policy=kind, routing_trace=True)
    assert m.transformer.expert_cache.policy.kind == kind
    ec = m.transformer.expert_cache
    final = list(m.generate(m.tokenize("the quick brown fox"), max_tokens=12, temp=0.0, ignore_eos=True))[-1]
    # per forward call and layer, the distinct experts the cache fetched, in order
    trace = [(layer, sorted(set(ids.reshape(-1).tolist()))) for _, layer, ids, _ in final.stats.trace]
    hits = int(ec.stats.hits.sum())
    assert hits == replay_hits(trace, ec.n_slots, kind)
    assert int(ec.stats.hits.sum() + ec.stats.misses.sum()) == sum(len(e) for _, e in trace)
    # the final event reports the same cache (the whole run: the cache was new)
    assert final.stats.expert_cache["slots"] == ec.n_slots
    assert final.stats.expert_cache["hit_rate"] == round(hits / sum(len(e) for _, e in trace), 4)


def test_prefetched_experts_the_router_did_not_confirm_stay_evictable(tmp_path):
    import lmcli

    p = tmp_path / "m.lmc"
    write_synthetic_moe(p, n_layer=3, n_embd=256, n_ff_exp=512, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    for kind in POLICIES:
        m = lmcli.load(str(p), expert_cache_mib=3, prefetch=True, cache_policy=kind)
        ec = m.transformer.expert_cache
        list(m.generate(m.tokenize("the quick brown fox jumps over"), max_tokens=30, temp=0.0, ignore_eos=True))
        assert ec.stats.prefetched > ec.stats.prefetch_used  # some prefetches were never used
        # every resident expert is one the policy may evict: none holds its slot for good
        known = set(ec.policy.order) | {k for keys in ec.policy.by_layer.values() for k in keys}
        assert set(ec.slot_of) == known, kind
        ec.close()


def test_prefetch_reads_pause_while_predictions_miss_and_resume_when_they_recover(tmp_path):
    import lmcli
    from lmcli.engine.expert_cache import PREDICTION_EMA, PREFETCH_MIN_RECALL

    assert (PREFETCH_MIN_RECALL, PREDICTION_EMA) == (0.5, 0.1)  # the hand-worked numbers below assume these
    p = tmp_path / "m.lmc"
    write_synthetic_moe(p, n_layer=3, n_embd=256, n_ff_exp=512, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    m = lmcli.load(str(p), expert_cache_mib=3, prefetch=True)
    ec = m.transformer.expert_cache
    # seven wrong predictions: recall 0.9^7 = 0.478 < 0.5; each of them was still read
    for i in range(7):
        ec.prefetch(1, [0, 1])
        ec.fetch(1, np.array([6, 7]))
        ec.fetch(2, np.array([4, 5]))  # another layer runs in between, as in decode
    assert abs(ec.stats.prediction_recall - 0.9**7) < 1e-9
    assert ec.stats.prefetch_skipped == 0
    read = ec.stats.prefetched
    ec.prefetch(1, [2, 3])  # recall too low: checked, not read
    assert (ec.stats.prefetch_skipped, ec.stats.prefetched) == (1, read)
    ec.fetch(1, np.array([2, 3]))  # it was right: 0.478 + 0.1 * (1 - 0.478) = 0.530
    assert abs(ec.stats.prediction_recall - (0.9**7 + 0.1 * (1 - 0.9**7))) < 1e-9
    ec.fetch(2, np.array([4, 5]))
    ec.prefetch(1, [0, 3])
    assert ec.stats.prefetch_skipped == 1  # reading again
    ec.close()


def test_a_budget_too_small_for_one_token_is_a_clear_error_before_running(tmp_path):
    import lmcli
    from lmcli.engine.expert_cache import MemoryBudgetError

    p = tmp_path / "m.lmc"
    write_synthetic_moe(p, n_layer=2, n_embd=256, n_ff_exp=4096, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    with pytest.raises(MemoryBudgetError, match="expert-cache-mib|bundles"):
        lmcli.load(str(p), expert_cache_mib=1)


def _cgroup_ok() -> bool:
    return os.geteuid() == 0 and (CGROUP_V1 / "memory.limit_in_bytes").exists()


NO_CGROUP = "needs root and the cgroup v1 memory controller (/sys/fs/cgroup/memory), which this machine lacks"


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A fresh v1 memory cgroup capped at `limit` bytes (swap included where accounted); removed afterwards."""
    cg = CGROUP_V1 / f"lmcli-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        try:
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swap escape, where accounted
        except OSError:
            pass
        yield cg
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _drop_from_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


@pytest.mark.skipif(not _cgroup_ok(), reason=NO_CGROUP)
def test_a_model_2_5x_larger_than_its_memory_cgroup_generates_the_same_tokens(tmp_path):
    model = tmp_path / "big.lmc"
    # 16 layers x 16 experts x 4.9 MB bundles: 1.26 GB of experts, small dense part
    write_synthetic_moe(model, n_layer=16, n_embd=1024, n_ff_exp=2816, n_expert=16, n_expert_used=2, n_head=8,
                        n_head_kv=2, vocab=1024)
    size = model.stat().st_size
    limit = int(size / 2.6)
    env = dict(os.environ, LMCLI_HOME=str(tmp_path / "home"), NUMBA_NUM_THREADS="2")
    args = [sys.executable, "-m", "lmcli.cli", "run", str(model), "hello world", "--raw", "-n", "12", "--temp", "0",
            "--ignore-eos", "--json"]
    free = subprocess.run(args + ["--expert-cache-mib", "0"], capture_output=True, text=True, env=env, timeout=600)
    assert free.returncode == 0, free.stderr
    ref = json.loads(free.stdout)

    with memory_cgroup(limit) as cg:
        _drop_from_page_cache(model)  # so that the capped run really reads it from disk
        wrapped = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"] + args  # automatic cache
        capped = subprocess.run(wrapped, capture_output=True, text=True, env=env, timeout=900)
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        failcnt = int((cg / "memory.failcnt").read_text())
    assert capped.returncode == 0, f"killed or failed under a {limit >> 20} MiB cap: {capped.stderr[-500:]}"
    got = json.loads(capped.stdout)
    assert got["tokens"] == ref["tokens"]
    assert "expert_cache" in got and got["expert_cache"]["bytes_read"] > 0
    assert peak <= limit
    print(f"file {size >> 20} MiB, cap {limit >> 20} MiB, peak {peak >> 20} MiB, failcnt {failcnt}, "
          f"decode {got['decode_tokens_per_s']} tok/s, disk/token {got['disk_bytes_per_token'] >> 20} MiB, "
          f"hit rate {got['expert_cache']['hit_rate']}")


# A DeepSeek-shaped model small enough for a test (45 MB: 3 MoE layers of 64 experts top-6, 216 KB bundles, 2.8 MB
# dense), run by a process that joins its memory cgroup once started: the interpreter, numpy, Numba and the
# compiled kernels (about 100 MB, the same for any model; warmed on a tiny model of the same formats, through an
# expert cache) stay charged outside, and everything the model takes (its mapped dense weights, the expert cache,
# the KV cache, activations) is charged to the cap. The expert cache is sized by hand: the automatic rule keeps
# 256 MiB of headroom, more than this whole file.
DEEPSEEK_TEST = dict(n_layer=4, n_embd=512, n_ff=512, n_ff_exp=256, vocab=512, n_head=4, q_lora_rank=128,
                     kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)
_CAPPED_RUN = """
import json, os, sys
import lmcli
path, warm, cgroup, cache_mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
w = lmcli.load(warm, expert_cache_mib=1)
list(w.generate(list(range(40, 52)), max_tokens=4, temp=1.0, seed=1, ignore_eos=True))
del w
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
if cgroup:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
m = lmcli.load(path, expert_cache_mib=cache_mib)
final = list(m.generate(list(range(300, 316)), max_tokens=24, temp=1.0, seed=7, ignore_eos=True))[-1]
print(json.dumps({"tokens": final.tokens, "expert_cache": final.stats.expert_cache}))
"""


@pytest.mark.skipif(not _cgroup_ok(), reason=NO_CGROUP)
def test_a_deepseek_shaped_model_5x_larger_than_its_memory_cgroup_samples_the_same_tokens(tmp_path):
    """Sampled decoding (temperature 1, seeded): routing spreads over the experts as it would not on a random
    router's greedy path, so the cache keeps missing and reading."""
    from quant.synthetic import write_synthetic_deepseek

    model = write_synthetic_deepseek(tmp_path / "ds.lmc", **DEEPSEEK_TEST)
    warm = write_synthetic_deepseek(tmp_path / "warm.lmc", n_layer=2, n_embd=128, n_ff=128, n_ff_exp=64, n_head=2,
                                    q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                                    v_head_dim=32, vocab=300)
    size = model.stat().st_size
    limit, cache_mib = size // 5, max(size // 15 >> 20, 1)
    env = dict(os.environ, LMCLI_HOME=str(tmp_path / "home"), NUMBA_NUM_THREADS="2")

    def run(cgroup="", mib=0):
        p = subprocess.run([sys.executable, "-c", _CAPPED_RUN, str(model), str(warm), str(cgroup), str(mib)],
                           capture_output=True, text=True, env=env, timeout=300)
        return p.returncode, p.stdout, p.stderr

    rc, out, err = run()  # held in RAM, no cache
    assert rc == 0, err
    ref = json.loads(out)
    assert ref["expert_cache"] is None
    with memory_cgroup(limit) as cg:
        rc, out, err = run(cg, cache_mib)
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
    assert rc == 0, f"killed or failed (exit {rc}) under a {limit >> 10} KiB cap: {err[-500:]}"
    got = json.loads(out)
    assert got["tokens"] == ref["tokens"]
    ec = got["expert_cache"]
    assert ec["slots"] < 64 * 3 // 5 and ec["bytes_read"] > size  # read again and again: the file does not fit
    assert peak <= limit


@pytest.mark.parametrize("read_threads", ["1", "4"])
def test_reads_in_flight_and_compute_as_they_land_give_the_resident_logits(tmp_path, monkeypatch, read_threads):
    """A cache of a few bundles: every step misses, its reads run together and the experts are computed in runs
    as they land; the logits equal those of the model held in RAM (prefill and decode)."""
    import lmcli

    monkeypatch.setenv("LMCLI_READ_THREADS", read_threads)
    p = tmp_path / "m.lmc"
    write_synthetic_moe(p, n_layer=3, n_embd=256, n_ff_exp=512, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    ids = list(range(5, 45))

    def decode(m):  # a prompt, then single-token steps (the decode kernels)
        cache = m.new_cache()
        m.transformer.forward(ids[:10], cache)
        return np.stack([m.transformer.forward([t], cache)[-1] for t in ids[10:20]])

    resident = lmcli.load(str(p))
    ref, ref_steps = resident.logits(ids), decode(resident)
    m = lmcli.load(str(p), expert_cache_mib=3, prefetch=False)
    ec = m.transformer.expert_cache
    assert ec is not None and ec.n_slots < 8 * 3  # far from all experts resident
    np.testing.assert_allclose(m.logits(ids), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode(m), ref_steps, rtol=1e-5, atol=1e-5)
    assert ec.stats.misses.sum() > 0 and not ec.pending  # every read waited for


def test_a_layers_misses_are_read_together_and_computed_as_they_land(tmp_path, monkeypatch):
    """A reader that holds back every bundle of a fetch but the first one asked for until some expert has been
    computed after that fetch started: the forward pass gets through only by computing what has landed while the
    rest are still in flight (a held-back read gives up after 10 s and is counted as stalled), and the reads in
    flight reach LMCLI_READ_THREADS at once, not one at a time. The DeepSeek shape: 6 misses per layer and step."""
    import threading

    import lmcli
    from lmcli.engine import moe
    from quant.synthetic import write_synthetic_deepseek

    monkeypatch.setenv("LMCLI_READ_THREADS", "4")
    path = write_synthetic_deepseek(tmp_path / "ds.lmc", **DEEPSEEK_TEST)
    m = lmcli.load(str(path), expert_cache_mib=2, prefetch=False)
    ec = m.transformer.expert_cache
    cond = threading.Condition()
    st = {"computed": 0, "first": None, "since": 0, "in_flight": 0, "most": 0, "held": 0, "stalled": 0}
    real_experts, real_fetch, real_read = moe._experts, ec.fetch_start, ec._read_bundle

    def experts(*args):
        real_experts(*args)
        with cond:
            st["computed"] += 1
            cond.notify_all()

    def fetch_start(layer, sel):
        with cond:
            st["first"], st["since"] = (layer, int(sel[0])), st["computed"]
        return real_fetch(layer, sel)

    def read(key, slot):
        with cond:
            st["in_flight"] += 1
            st["most"] = max(st["most"], st["in_flight"])
            if key != st["first"] and not st["stalled"]:
                st["held"] += 1
                since = st["since"]
                if not cond.wait_for(lambda: st["computed"] > since, timeout=10):
                    st["stalled"] += 1  # computed nothing while this read was held: the pass waited for it
        try:
            return real_read(key, slot)
        finally:
            with cond:
                st["in_flight"] -= 1

    monkeypatch.setattr(moe, "_experts", experts)
    monkeypatch.setattr(ec, "fetch_start", fetch_start)
    monkeypatch.setattr(ec, "_read_bundle", read)
    list(m.generate(list(range(300, 306)), max_tokens=4, temp=1.0, seed=3, ignore_eos=True))
    assert st["stalled"] == 0 and st["held"] > 0
    assert st["most"] == 4
    ec.close()
