"""The thread policy: its decisions from injected step times (no clocks), and generation under it giving the same
greedy tokens as a fixed thread count (the kernels' results do not depend on the count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from lmcli import threads
from lmcli.threads import SERIAL_BYTES, SPINCOUNT, FreeCpus, ThreadPolicy, configure_pool, ladder, serially


def drive(pol: ThreadPolicy, cost, steps: int, start: int = 0) -> list[int]:
    """Run `steps` decode steps where a step at n threads takes cost(step, n) seconds; the counts used."""
    used = []
    for i in range(start, start + steps):
        n = pol.next()
        used.append(n)
        pol.record(n, cost(i, n))
    return used


def test_ladder_halves_from_the_maximum_down_to_one():
    assert ladder(1) == [1]
    assert ladder(2) == [2, 1]
    assert ladder(8) == [8, 4, 2, 1]
    assert ladder(6) == [6, 3, 1]


def test_a_fixed_count_never_changes_whatever_the_timings():
    pol = ThreadPolicy(2, fixed=True)
    used = drive(pol, lambda i, n: 1.0 if n == 2 else 0.001, 500)
    assert set(used) == {2} and pol.describe() == "2 (fixed)"


def test_one_core_has_nothing_to_choose():
    pol = ThreadPolicy(1)
    assert set(drive(pol, lambda i, n: 0.01, 100)) == {1} and not pol.adaptive


def test_on_a_quiet_machine_it_stays_at_every_core_and_probes_rarely():
    # quiet: 2 threads 1.6x faster than 1 (a large MoE); the probes at 1 thread back off
    pol = ThreadPolicy(2)
    used = drive(pol, lambda i, n: 0.010 if n == 2 else 0.016, 2000)
    assert used[:8] == [2] * 8  # starts at every core
    assert used[-1] == 2 and pol.switches == 0
    assert used[:64].count(1) == 3  # one probe of 3 steps in the first 64 (stopped early: clearly slower)
    assert used.count(1) <= 3 * 6  # then at intervals of 90, 180, 360, ... steps
    cost = sum(0.010 if n == 2 else 0.016 for n in used)
    assert cost < 1.01 * 2000 * 0.010


def test_beside_busy_neighbours_it_moves_to_fewer_threads_and_loses_little_probing():
    # spinning barriers beside busy processes: 2 threads 20x slower than 1 (as measured with the default wait policy)
    pol = ThreadPolicy(2)
    used = drive(pol, lambda i, n: 0.2 if n == 2 else 0.01, 2000)
    first_one = used.index(1)
    assert first_one == 8 and used[8:14] == [1] * 6  # a full window at 2, a probe block of 4, then moved
    assert pol.current == 1 and pol.describe() == "1 of 2 (adaptive)"
    cost = sum(0.2 if n == 2 else 0.01 for n in used)
    # the first window and the re-probes of 2 threads cost under 15% of the best fixed count's time, at 20x
    assert cost < 1.15 * 2000 * 0.01


def test_a_probe_block_that_lands_in_a_fast_phase_does_not_move_it_down_alone():
    # beside busy processes the step time swings about 2x in phases of a few steps (as measured here on the synthetic
    # MoE: 2 threads 40 or 67 ms, 1 thread 40 or 81). The first probe of 1 thread lands in a fast phase and wins;
    # every later step at 1 thread is slow. A second block, after a few steps at 2, must confirm before moving.
    def cost(i, n):
        return 0.067 if n == 2 else (0.040 if 8 <= i < 12 else 0.081)

    pol = ThreadPolicy(2)
    used = drive(pol, cost, 200)
    assert used[8:12] == [1] * 4 and used[12:17] == [2] * 5  # the lucky block, then the current count again
    assert used[17] == 1 and pol.switches == 0 and pol.current == 2  # the confirming block lost: no move
    assert used[30:].count(1) <= 8


def test_a_decisive_win_moves_down_without_confirming():
    pol = ThreadPolicy(2)
    used = drive(pol, lambda i, n: 0.2 if n == 2 else 0.05, 40)  # 4x: no phase of a busy machine swings that much
    assert used[8:20] == [1] * 12 and pol.switches == 1


class Waits:
    """An injected run_delay(): our threads wait for a CPU `share` of the thread-seconds the policy records."""

    def __init__(self, share: float):
        self.share, self.total, self.pol = share, 0.0, None

    def __call__(self) -> float:
        return self.total

    def drive(self, pol: ThreadPolicy, cost, steps: int) -> list[int]:
        used = []
        for i in range(steps):
            n = pol.next()
            used.append(n)
            self.total += self.share * cost(i, n) * n
            pol.record(n, cost(i, n))
        return used


def test_when_no_thread_waits_for_a_cpu_fewer_threads_are_never_probed():
    # quiet machine: 2 threads 1.5x faster than 1 (the synthetic MoE here: 26.5 vs 40 ms). Without the signal the
    # first probe of 1 thread costs 4 slow steps, 6% of a 32-token reply; with it none runs.
    cost = lambda i, n: 0.0265 if n == 2 else 0.040  # noqa: E731
    w = Waits(0.0)
    pol = ThreadPolicy(2, waited=w)
    used = w.drive(pol, cost, 2000)
    assert set(used) == {2} and pol.skipped > 0
    blind = drive(ThreadPolicy(2), cost, 32)
    assert blind.count(1) >= 3  # what the signal saves


def test_threads_that_wait_for_a_cpu_are_probed_and_moved_down_when_that_is_faster():
    w = Waits(0.5)  # beside busy processes: half of our threads' time runnable but not running
    pol = ThreadPolicy(2, waited=w)
    used = w.drive(pol, lambda i, n: 0.2 if n == 2 else 0.01, 200)
    assert used[8:14] == [1] * 6 and pol.current == 1 and pol.skipped == 0


def test_the_load_arriving_after_a_quiet_start_is_still_noticed():
    # quiet for 100 steps (no waits, probes skipped), then spinning barriers beside busy processes: 2 threads 20x slower
    busy = lambda i: i >= 100  # noqa: E731
    cost = lambda i, n: (0.2 if n == 2 else 0.01) if busy(i) else (0.010 if n == 2 else 0.016)  # noqa: E731
    w = Waits(0.0)
    pol = ThreadPolicy(2, waited=w)
    used = []
    for i in range(300):
        w.share = 0.5 if busy(i) else 0.0
        used += w.drive(pol, lambda _, n, i=i: cost(i, n), 1)
    assert set(used[:100]) == {2} and used[-50:] == [1] * 50


def test_run_delay_counts_the_time_our_threads_wait_for_a_busy_cpu():
    # a child pinned to one CPU beside a busy sibling pinned to the same CPU: its thread waits about half the time
    code = """
import os, sys, time
from lmcli.threads import run_delay
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
if os.fork() == 0:
    t = time.time()
    while time.time() - t < 1.0: pass
    os._exit(0)
w0, t = run_delay(), time.perf_counter()
while time.perf_counter() - t < 0.6: pass
print(run_delay() - w0)
os.wait()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) > 0.1  # alone on its CPU it would be near 0


def test_lmcli_decodes_with_the_contention_signal():
    from lmcli.threads import run_delay

    assert ThreadPolicy.default(2).waited is run_delay
    w0 = run_delay()
    assert w0 is not None and run_delay() >= w0  # this kernel reports it (Linux schedstat)


def test_a_larger_batch_is_not_taken_for_a_change_of_load():
    # lmcli serve: 4 sequences per step take twice the time of one; judged against one sequence's steps that is
    # "the load changed" and a probe at once (which beside a neighbour can move it down for nothing)
    pol = ThreadPolicy(2)
    for _ in range(20):
        n = pol.next()
        pol.record(n, 0.010 if n == 2 else 0.016, 1)
    assert pol.probing is None
    used = []
    for _ in range(pol.times[2].maxlen):  # a full window at the new size before anything is judged
        n = pol.next()
        used.append(n)
        pol.record(n, 0.020 if n == 2 else 0.032, 4)
    assert used == [2] * pol.times[2].maxlen and pol.current == 2


def test_a_tie_keeps_the_current_count():
    pol = ThreadPolicy(2)
    used = drive(pol, lambda i, n: 0.010 if n == 2 else 0.0099, 600)  # 1% apart: within the margin
    assert used[-1] == 2 and pol.switches == 0


def test_fewer_threads_must_win_clearly_more_threads_need_only_win():
    pol = ThreadPolicy(2)
    used = drive(pol, lambda i, n: 0.010 if n == 2 else 0.009, 600)  # 1 thread 10% faster: not enough to move down
    assert used[-1] == 2 and pol.switches == 0
    pol = ThreadPolicy(2)
    pol.current = 1
    used = drive(pol, lambda i, n: 0.009 if n == 2 else 0.010, 600)  # 2 threads 10% faster: moves up
    assert used[-1] == 2 and pol.switches == 1


def test_bursts_of_load_that_hit_every_count_alike_do_not_move_it():
    # other programs' bursts slow whatever step they land on 8x (as measured here); between them 2 threads are
    # 1.8x faster. Pairing each probe step with the next current step keeps a burst from deciding alone.
    def cost(i, n):
        burst = 8.0 if (i * 7919) % 13 < 3 else 1.0
        return burst * (0.010 if n == 2 else 0.018)

    pol = ThreadPolicy(2)
    used = drive(pol, cost, 2000)
    assert used.count(2) >= 0.97 * 2000


def test_when_the_load_arrives_and_leaves_it_follows():
    def cost(i, n):
        busy = 300 <= i < 900
        return (0.2 if n == 2 else 0.024) if busy else (0.010 if n == 2 else 0.016)

    pol = ThreadPolicy(2)
    used = drive(pol, cost, 1500)
    assert used[290:300] == [2] * 10  # quiet: every core
    assert used[330:340] == [1] * 10  # the load came: the step time at 2 drifted, a probe ran at once and won
    assert used[910:1010].count(2) >= 95  # the load went: the step time at 1 dropped, a probe of 2 won


def test_eight_cores_move_one_rung_at_a_time_to_the_best():
    pol = ThreadPolicy(8)
    best = {8: 0.05, 4: 0.02, 2: 0.01, 1: 0.015}
    used = drive(pol, lambda i, n: best[n], 1000)
    assert used[-1] == 2 and pol.current == 2
    assert set(used) == {8, 4, 2, 1}


def test_steps_at_counts_off_the_ladder_are_ignored():
    pol = ThreadPolicy(4)
    pol.record(3, 100.0)
    assert 3 not in pol.times and drive(pol, lambda i, n: 0.01, 4) == [4] * 4


def test_step_sets_numbas_count_in_the_calling_thread_and_records_it():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no thread count to adapt")
    pol = ThreadPolicy(2, first_interval=1, window=1)
    before = numba.get_num_threads()
    try:
        seen = [pol.step(numba.get_num_threads) for _ in range(2)]  # one step at 2, then the probe at 1
    finally:
        numba.set_num_threads(before)
    assert seen == [2, 1]
    assert len(pol.times[2]) == 1 and pol.probing == 1 and len(pol._probe) == 1  # the probe's first step recorded


WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@pytest.mark.parametrize("users", [("OMP_WAIT_POLICY", "active"), ("GOMP_SPINCOUNT", "0"), ("KMP_BLOCKTIME", "0")])
def test_configure_pool_keeps_a_users_wait_choice(monkeypatch, users):
    for k in WAIT_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(*users)
    configure_pool()
    assert {k: os.environ.get(k) for k in WAIT_VARS} == {k: users[1] if k == users[0] else None for k in WAIT_VARS}


def test_configure_pool_spins_briefly_then_sleeps(monkeypatch):
    for k in WAIT_VARS:
        monkeypatch.delenv(k, raising=False)
    configure_pool()
    # not OMP_WAIT_POLICY=passive: sleeping at once made every launch wake a halted vCPU (2 threads at half of 1's
    # speed on a quiet machine); not libgomp's default 3 ms spin, which starves busy neighbours
    assert os.environ.get("OMP_WAIT_POLICY") is None and os.environ["GOMP_SPINCOUNT"] == SPINCOUNT == "10000"
    assert os.environ["KMP_BLOCKTIME"] == "1"


def test_the_cli_process_runs_its_pool_under_the_short_spin(lmcli_home):
    # what libgomp reads is the process environment before Numba loads it: the CLI's own, seen from a kernel thread
    code = ("import os; from lmcli import cli; cli.main(['--version']); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.stdout.split()[-2:] == [SPINCOUNT, "None"], r.stderr


def fake_proc(monkeypatch, cpus: int):
    """FreeCpus over a fake /proc/stat and os.times: returns a function that advances the clock by `dt` seconds
    in which other programs kept `others` CPUs busy and this process `ours` CPU seconds busy."""
    state = {"t": 100.0, "busy": 0, "ours": 0.0}
    monkeypatch.setattr(threads, "_EARLY", None)  # the first look spans from the FreeCpus, not from lmcli's import
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(threads, "_busy_ticks", lambda c: state["busy"] if c == set(range(cpus)) else None)
    monkeypatch.setattr(threads.time, "monotonic", lambda: state["t"])
    monkeypatch.setattr(threads.os, "times", lambda: os.times_result((state["ours"], 0.0, 0.0, 0.0, 0.0)))
    hz = os.sysconf("SC_CLK_TCK")

    def advance(dt: float, others: float, ours: float):
        state["t"] += dt
        state["ours"] += ours
        state["busy"] += round((others * dt + ours) * hz)

    return advance


def test_free_cpus_counts_what_other_programs_used_not_this_process(monkeypatch):
    advance = fake_proc(monkeypatch, cpus=4)
    free = FreeCpus(min_span=0.1)
    advance(1.0, others=1.5, ours=2.0)  # our own threads busy on 2 CPUs do not count against us
    assert free() == pytest.approx(2.5, abs=0.02)
    advance(0.05, others=4.0, ours=0.0)
    assert free() is None  # too short a span to say: the next look spans from the last answer
    advance(0.95, others=0.0, ours=0.0)
    assert free() == pytest.approx(4 - 0.2, abs=0.02)  # 4 CPUs for 0.05 s over the whole 1 s span


def test_free_cpus_sees_a_real_busy_neighbour():
    cpus = sorted(os.sched_getaffinity(0))
    spin = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        os.sched_setaffinity(busy.pid, {cpus[0]})
        free = FreeCpus(min_span=0.1)
        free()  # the span since lmcli's import ends here
        t = time.monotonic()
        while time.monotonic() - t < 0.5:
            pass  # this process busy too: not counted
        f = free()
    finally:
        busy.kill()
        busy.wait()
    # the neighbour holds one CPU (other load on the machine can only lower what is free)
    assert f is not None and f <= len(cpus) - 0.8


def test_a_prompt_starts_from_the_cpus_left_free_and_probes_more_only_after_a_hold():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no thread count to adapt")
    free = {"now": 1.0}  # a busy neighbour holds one of the two CPUs
    pol = ThreadPolicy(2, free=lambda: free["now"])
    try:
        pol.begin()
        assert pol.current == 1 and numba.get_num_threads() == 1  # the prompt runs on the free CPU too
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    # small launches beside the neighbour: 2 threads 4x slower. A reply of 64 tokens runs no probe of 2 (it would
    # cost two tokens' time); after `hold` steps one runs, stops at its first (transition) step, decisive, and
    # probes over 2000 steps cost under 1%
    used = drive(pol, lambda i, n: 0.04 if n == 2 else 0.01, 2000)
    assert used[:pol.hold] == [1] * pol.hold and pol.held >= 1
    assert used[pol.hold:pol.hold + 10].count(2) == 1 and pol.current == 1
    assert sum(0.04 if n == 2 else 0.01 for n in used) < 1.01 * 2000 * 0.01
    # large launches (a MoE) beside the same neighbour, where 2 threads would be 1.4x faster: found after the hold
    pol = ThreadPolicy(2, free=lambda: free["now"])
    try:
        pol.begin()
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    used = drive(pol, lambda i, n: 0.07 if n == 2 else 0.1, 200)
    assert used[:pol.hold] == [1] * pol.hold and used[pol.hold:pol.hold + 8].count(2) >= 4 and pol.current == 2
    # the neighbour leaves mid-reply: the probe due next sees two CPUs free and runs at once
    pol = ThreadPolicy(2, free=lambda: free["now"])
    try:
        pol.begin()
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    drive(pol, lambda i, n: 0.01, 20)
    free["now"] = 2.0
    used = drive(pol, lambda i, n: 0.005 if n == 2 else 0.01, 20)
    assert used[:6].count(2) >= 1 and pol.current == 2
    # too soon to say (free() None): the probe waits a step and asks again
    free["now"] = None
    pol = ThreadPolicy(2, free=lambda: free["now"])
    pol._restart(1)
    assert drive(pol, lambda i, n: 0.01, 30) == [1] * 30
    free["now"] = 2.0
    assert drive(pol, lambda i, n: 0.01, 2) == [2, 2]
    pol._restart(1)
    try:
        pol.begin()  # the machine is quiet: the next prompt starts at every core
        assert pol.current == 2
        free["now"] = None
        pol.begin()  # too soon to say: keeps what it has
        assert pol.current == 2
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_the_first_look_spans_the_models_load(monkeypatch):
    advance = fake_proc(monkeypatch, cpus=2)
    monkeypatch.setattr(threads, "_affinity_at_import", set(range(2)))
    monkeypatch.setattr(threads, "_EARLY", threads._sample(set(range(2))))  # "import lmcli"
    advance(0.5, others=1.0, ours=0.5)  # the load, beside a busy neighbour
    pol = ThreadPolicy.default(2)  # the model's policy, made at the end of its load: begin() follows at once
    assert pol.free() == pytest.approx(1.0, abs=0.02)


def test_a_fixed_count_ignores_the_free_cpus():
    pol = ThreadPolicy(2, fixed=True, free=lambda: 0.5)
    pol.begin()
    assert pol.current == 2 and ThreadPolicy.default(2, fixed=True).free is None


def test_adaptive_generation_visits_both_counts_and_matches_one_thread(smol_container):
    import lmcli

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no thread count to adapt")
    m = lmcli.load(str(smol_container), n_ctx=128)
    assert m.thread_policy.adaptive
    m.thread_policy = ThreadPolicy(m.threads)  # no contention signal: it probes one thread whatever the machine
    counts = []
    step = m.thread_policy.step
    m.thread_policy.step = lambda fn, size=1: step(lambda: (counts.append(numba.get_num_threads()), fn())[1], size)
    ids = m.tokenize("The quick brown fox")
    got = list(m.generate(ids, max_tokens=40, temp=0.0, ignore_eos=True))[-1].tokens
    assert {1, 2} <= set(counts)  # the probe at step 4 ran 1 thread whatever the timings
    one = lmcli.load(str(smol_container), n_ctx=128, threads=1)
    assert not one.thread_policy.adaptive
    want = list(one.generate(ids, max_tokens=40, temp=0.0, ignore_eos=True))[-1].tokens
    assert got == want and len(got) == 40


def test_cli_default_threads_give_the_same_greedy_tokens_as_t1(lmcli_home):
    def run(*extra):
        e = dict(os.environ, LMCLI_HOME=str(lmcli_home))
        e.pop("LMCLI_THREADS", None)
        r = subprocess.run([sys.executable, "-m", "lmcli.cli", "run", "smollm2", "Tell me about the sea.", "--temp",
                            "0", "-n", "40", "--ignore-eos", "--json", "-v", *extra], capture_output=True, text=True,
                           env=e, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["tokens"], r.stderr

    (default, said), (one, said_one) = run(), run("-t", "1")
    assert default == one and len(default) == 40
    assert "threads: 1 (fixed)" in said_one
    assert f"of {numba.config.NUMBA_NUM_THREADS} (adaptive)" in said or numba.config.NUMBA_NUM_THREADS < 2


def test_serially_runs_on_one_thread_and_gives_the_count_back():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core")
    numba.set_num_threads(2)
    assert serially(numba.get_num_threads) == 1
    assert numba.get_num_threads() == 2
    with pytest.raises(ZeroDivisionError):
        serially(lambda: 1 / 0)
    assert numba.get_num_threads() == 2


def test_small_decode_matmuls_run_on_one_thread_large_ones_and_prefill_on_all(smol_container):
    import lmcli
    from lmcli.engine.weights import Act

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core")
    m = lmcli.load(str(smol_container), n_ctx=64, threads=2)
    L = m.transformer.weights.layers[0]
    small, large = L.attn.wq, L.ffn.gate
    assert small.nbytes < SERIAL_BYTES <= large.nbytes
    x = np.random.default_rng(0).standard_normal((1, small.n_in)).astype(np.float32)
    seen = {}
    for lin in (small, large):
        lin._matmul = lambda act, out, lin=lin: seen.setdefault(lin.name, []).append(numba.get_num_threads())
    small(Act(x)), large(Act(x)), small(Act(np.repeat(x, 3, axis=0)))
    assert seen[small.name] == [1, 2] and seen[large.name] == [2]
