"""Kernel threads on a machine shared with other programs: idle threads that spin briefly, then sleep, and a decode
thread count chosen from what the machine gives right now.

Why: every decode token runs about a hundred parallel kernel launches, and each waits for all its threads. How the
idle threads wait decides both the quiet and the busy case. Spinning for long (libgomp's default, about 3 ms) beside
busy processes burns the time the neighbours compete for: SmolLM2 on 2 cores beside 2 busy processes decoded 11
tok/s (8.7-26.8) [AVX-512 VNNI]. Sleeping at once (OMP_WAIT_POLICY=passive) makes every launch wake a sleeping
thread, which on the virtual machines measured here (an idle vCPU halts; waking it is an inter-processor interrupt
through the hypervisor) costs tens of microseconds: on a quiet machine 2 threads then decoded SmolLM2 at 63 tok/s,
half of one thread's 124, against 177 with a short spin. So idle threads spin about 0.1 ms, then sleep
(configure_pool: GOMP_SPINCOUNT), and the count starts from the CPUs other programs left free (free_cpus) and keeps
being measured (ThreadPolicy): beside busy processes fewer threads are faster.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections import deque
from typing import Callable, TypeVar

R = TypeVar("R")


# libgomp's spin before an idle thread sleeps, in its own units (it estimates 100000 per ms); 10000 is about 0.1 ms:
# long enough to bridge the gaps between a token's launches, short enough that a thread left waiting beside busy
# processes soon gives its core back. Measured beside the alternatives in bench/wait_policy.py.
SPINCOUNT = "10000"


def configure_pool() -> None:
    """Let Numba's idle OpenMP threads spin briefly, then sleep, unless the user chose how they wait.

    GOMP_SPINCOUNT for libgomp (Linux), KMP_BLOCKTIME (milliseconds) for the LLVM/Intel OpenMP runtimes. Either
    runtime reads them once, when it is loaded (Numba loads it with its thread pool, on the first set or launch),
    so this must run before that: the CLI calls it first thing, lmcli.api before it sizes the pool. A user's
    OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME is left alone (GOMP_SPINCOUNT would override their policy).
    """
    if not any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")):
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        os.environ["KMP_BLOCKTIME"] = "1"


def _busy_ticks(cpus: set[int]) -> int | None:
    """Clock ticks the given CPUs spent busy since boot (/proc/stat: user, nice, system, irq, softirq and steal:
    everything but idle and iowait), or None where that is not readable."""
    total, seen = 0, 0
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if not line.startswith(b"cpu") or line[3:4] == b" ":
                    continue
                name, *vals = line.split()
                if int(name[3:]) in cpus:
                    v = [int(x) for x in vals[:8]]
                    total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
                    seen += 1
    except (OSError, ValueError, IndexError):
        return None
    return total if seen == len(cpus) else None


def _affinity() -> set[int] | None:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


def _sample(cpus: set[int] | None) -> tuple[float, int, float] | None:
    """(monotonic seconds, the CPUs' busy ticks, this process's CPU seconds), or None where /proc/stat is not there."""
    busy = _busy_ticks(cpus) if cpus else None
    if busy is None:
        return None
    t = os.times()
    return time.monotonic(), busy, t.user + t.system


_affinity_at_import = _affinity()
_EARLY = _sample(_affinity_at_import)  # when lmcli was imported: a model's load is the first span looked at


class FreeCpus:
    """How many of our CPUs other programs left free since the last look: the CPUs' busy time (/proc/stat) minus
    this process's own (all its threads), over the wall time between. The first look spans from lmcli's import (the
    model's load: nothing to wait for). None until a span of at least min_span, or where /proc is not there."""

    def __init__(self, min_span: float = 0.1):
        self.cpus = _affinity()
        self.min_span = min_span
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._mark = _EARLY if _EARLY is not None and self.cpus == _affinity_at_import else self._now()
        self.works = self._mark is not None  # /proc/stat is there (Linux)

    def _now(self) -> tuple[float, int, float] | None:
        return _sample(self.cpus)

    def __call__(self) -> float | None:
        now = self._now()
        if now is None or self._mark is None:
            self._mark = now
            return None
        (t0, b0, o0), (t1, b1, o1) = self._mark, now
        if t1 - t0 < self.min_span:
            return None
        self._mark = now
        others = max((b1 - b0) / self.hz - (o1 - o0), 0.0) / (t1 - t0)
        return max(len(self.cpus) - others, 0.0)


# A decode matmul over fewer weight bytes than this runs on the calling thread alone: one thread reads 256 KiB in
# about 20 us, and waking a sleeping thread took 8-33 us per launch here (passive waits, under load from other
# processes), so below it a second thread cannot pay for itself, and every launch is a barrier that waits for a
# thread that may be descheduled. SmolLM2-135M: 241 parallel launches per decode token before, 121 after.
SERIAL_BYTES = 256 << 10


@functools.cache
def _count_fns() -> tuple[Callable[[], int], Callable[[int], None]]:
    """Get and set the calling thread's count: Numba's own C functions when present (numba.get/set_num_threads add
    about 3 us of checks, and a decode token makes hundreds of these calls), else the public ones."""
    import numba

    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()
        return parallel._get_num_threads, parallel._set_num_threads
    except (ImportError, AttributeError):
        return numba.get_num_threads, numba.set_num_threads


def serially(fn: Callable[..., R], *args) -> R:
    """fn(*args) on the calling thread alone (a kernel too small to pay for waking the others), then the count back."""
    get, put = _count_fns()
    n = get()
    if n <= 1:
        return fn(*args)
    put(1)
    try:
        return fn(*args)
    finally:
        put(n)


def run_delay() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (the kernel's schedstat run delay,
    summed over its threads), or None where the kernel does not report it. Idle threads add nothing, so this grows
    only when other programs hold the cores our threads want. About 10 us to read."""
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[1])
            except FileNotFoundError:
                continue  # a thread that just ended
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def ladder(max_threads: int) -> list[int]:
    """The counts the policy moves between, largest first: max_threads, halving down to 1 ([2, 1], [8, 4, 2, 1])."""
    out = [max_threads]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _use(n: int) -> None:
    import numba

    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


class ThreadPolicy:
    """The thread count for each decode step: fixed (-t/--threads, LMCLI_THREADS), or adaptive.

    Adaptive starts at max_threads (a quiet machine's best). Every `interval` steps it probes a neighbouring count
    on the ladder for up to `probe_steps` consecutive steps, and compares their median with the median of the
    current count's last `window` steps. The step after a change of count is left out of every median: measured
    here beside busy processes, it is slower than its neighbours whichever way the count changed. It moves when the
    probe is faster by `margin`, or by `margin_down` to fewer threads (a wrong move down costs more than a wrong
    move up, and one thread beside busy processes starts faster than it goes on, as measured here); the new count
    is then judged afresh. A probe stops early once two steps are both clearly slower (by `clear`: that is what
    probes cost), and runs only with a full window of the current count's steps to judge by. A probe that loses at
    least doubles the interval, more when needed to keep what it lost under `budget` of the time (up to
    max_interval steps); a win resets it. When the current count's median moves by more than `drift` from where it
    settled (the load changed; a median, so that bursts of load do not count), it probes at once unless probes so
    far lost over 3x the budget.
    Each prompt starts from the count the CPUs other programs left free could hold (begin(), FreeCpus), and more
    threads are still probed from there, in case they win beside a neighbour (measured here on 2026-12-04, 2 threads
    beside one busy process: SmolLM2 0.25x of 1 thread, the synthetic MoE 0.72x; an earlier run had the MoE 1.4x).
    A probe that is `decisive` times slower in one step stops there, its transition step included (a probe up beside
    a neighbour costs one step).
    More threads than the free CPUs can hold are probed only `hold` steps after the last such probe or the start
    (free() is read when the probe is due; a neighbour that left shows there, and the probe runs at once): beside busy
    processes such a probe cost about two steps' time (SmolLM2: one step at 3-4x; the synthetic MoE: four at 1.4x)
    and lost every time it was measured here, so a short reply skips it and a long one keeps it near the budget.
    Fewer threads are probed only when ours waited for a CPU (waited(): run_delay, the kernel's count) for at least
    `contended` of their time since the last look: when every thread had its core, fewer cannot be faster, and on a
    quiet machine the probe's slow steps were pure cost (6% of a 32-token reply on the synthetic MoE). A first win
    for fewer threads moves only if a second block, a few steps later, wins too, or if it won by `decisive`: beside
    busy processes step times swing 2x in phases of a few steps, and a block can land in a fast one.
    Pure logic: `next()` says the count, `record()` takes the measured seconds; `step()` does both around a call.
    """

    def __init__(self, max_threads: int, fixed: bool = False, *, window: int = 8, probe_steps: int = 4,
                 first_interval: int = 4, max_interval: int = 1024, margin: float = 0.95, margin_down: float = 0.8,
                 clear: float = 1.5, drift: float = 1.3, budget: float = 0.02,
                 decisive: float = 3.0, waited: Callable[[], float | None] | None = None, contended: float = 0.1,
                 free: Callable[[], float | None] | None = None, hold: int = 100):
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self.max_threads, self.fixed = max_threads, fixed
        self.counts = ladder(max_threads)
        self.probe_steps, self.first_interval, self.max_interval = probe_steps, first_interval, max_interval
        self.margin, self.margin_down, self.clear = margin, margin_down, clear
        self.drift, self.budget = drift, budget
        self.waited, self.contended, self.decisive = waited, contended, decisive
        self.free = free  # CPUs other programs left free lately (FreeCpus), or None when unknown or too soon to say
        self.hold = hold
        self.steps = 0  # steps recorded
        self._since = 0  # the step of the last probe up (or of the start): a probe up into busy CPUs waits `hold`
        self.held = 0  # probes up not run (yet): the free CPUs could not hold them
        self._mark: tuple[float, float] | None = None  # (waited(), elapsed) when contention was last looked at
        self.skipped = 0  # probes of fewer threads not run: nothing waited for a CPU
        self.times = {n: deque(maxlen=window) for n in self.counts}  # recent step seconds per count (no transitions)
        self.current = max_threads
        self.probing: int | None = None  # the count under trial
        self._probe: list[float] = []  # its steps' seconds, the transition first
        self._last: int | None = None  # the count of the step before
        self.interval = first_interval  # steps between probes
        self.until_probe = first_interval
        self.settled: float | None = None  # the current count's median step time when it was last chosen
        self.elapsed = 0.0  # seconds of every step recorded
        self.lost = 0.0  # seconds probes cost over the current count
        self._down = True  # which neighbour the next probe tries, when there are two
        self._confirming, self._again = False, None  # a probe of fewer threads won once: probe `_again` to confirm
        self.switches = 0
        self._size = 1  # sequences per step (lmcli serve's batches): only steps of one size are compared

    @classmethod
    def default(cls, max_threads: int, fixed: bool = False) -> ThreadPolicy:
        """The policy lmcli decodes with: as the constructor's defaults, contention read from the kernel (run_delay)."""
        free = None if fixed else FreeCpus()
        return cls(max_threads, fixed, waited=run_delay, free=free if free is not None and free.works else None)

    @property
    def adaptive(self) -> bool:
        return not self.fixed and len(self.counts) > 1

    def next(self) -> int:
        """The thread count for the next step (starts a probe when one is due)."""
        if not self.adaptive:
            return self.current
        cur = self.times[self.current]
        if self.probing is None and self.until_probe <= 0 and len(cur) == cur.maxlen:  # a full window to judge by
            probe = self._again if self._confirming else self._neighbour()
            if probe < self.current and not self._confirming and not self._contended():
                self.until_probe = self.interval  # every thread had its core: fewer cannot be faster, look later
                self.skipped += 1
            elif probe > self.current and self._crowded(probe):
                pass  # until_probe set there
            else:
                self.probing, self._probe = probe, []
                self._since = self.steps if probe > self.current else self._since
        return self.probing if self.probing is not None else self.current

    def _contended(self) -> bool:
        """Whether our threads waited for a CPU for at least `contended` of their time since the last look (True
        when that is unknown: no waited() source, or a kernel that does not report it)."""
        if self.waited is None or self._mark is None:
            return True
        w, e = self.waited(), self.elapsed
        if w is None:
            return True
        (w0, e0), self._mark = self._mark, (w, e)
        span = (e - e0) * self.current
        return span <= 0 or (w - w0) / span >= self.contended

    def _crowded(self, probe: int) -> bool:
        """Whether a probe of `probe` threads waits: the CPUs other programs left free cannot hold it and it has not
        waited `hold` steps yet (sets until_probe). Too soon to say (free() None on a short span): one step more."""
        if self.free is None:
            return False
        f = self.free()
        if f is None:
            self.until_probe = 1
            self._down = not self._down  # the same neighbour next step
            return True
        if probe <= f + 0.25 or self.steps - self._since >= self.hold:
            return False
        self.held += 1
        self.until_probe = min(self.interval, self._since + self.hold - self.steps)
        return True

    def _neighbour(self) -> int:
        i = self.counts.index(self.current)
        lower = self.counts[i + 1] if i + 1 < len(self.counts) else None
        higher = self.counts[i - 1] if i > 0 else None
        self._down = not self._down
        if lower is None or (higher is not None and self._down):
            return higher
        return lower

    def record(self, n: int, seconds: float, size: int = 1) -> None:
        """The step just run at n threads over `size` sequences took `seconds`."""
        if not self.adaptive or n not in self.times:
            return
        if size != self._size:  # a batch of another size takes another time: not a change of load, judged afresh
            self._resize(size)
        transition, self._last = self._last is not None and n != self._last, n
        self.elapsed += seconds
        self.steps += 1
        if self._mark is None and self.waited is not None:  # after the first decode step: contention counts from here
            w = self.waited()
            self._mark = (w, self.elapsed) if w is not None else None
        if n == self.probing:
            self._probe.append(seconds)
            self._judge()
            return
        if n != self.current or transition:
            return
        self.times[n].append(seconds)
        self.until_probe -= 1
        now = statistics.median(self.times[n])
        if self.settled is None:
            if len(self.times[n]) == self.times[n].maxlen:
                self.settled = now
        elif not 1 / self.drift < now / self.settled < self.drift:  # the load changed: look again now
            self.settled = now
            if self.lost <= 3 * self.budget * self.elapsed:  # a looser cap than the interval's: loads do change
                self.until_probe = min(self.until_probe, 0)

    def _resize(self, size: int) -> None:
        """Forget the step times of the previous batch size (and a probe in flight); the count stays."""
        self._size = size
        for q in self.times.values():
            q.clear()
        self.settled, self.probing, self._probe = None, None, []
        self._confirming, self._again = False, None

    def _judge(self) -> None:
        steps = self._probe[1:]  # the transition set aside, unless it alone is `decisive` times slower
        t_cur = statistics.median(self.times[self.current])
        if not steps:
            if self._probe[0] < self.decisive * t_cur:
                return
            steps = self._probe  # beside busy processes a probe of more threads: one step at 4x ends it
        t_probe = statistics.median(steps)
        if (len(self._probe) < self.probe_steps and (len(steps) < 2 or min(steps) <= self.clear * t_cur)
                and steps[-1] < self.decisive * t_cur):
            return  # not clear yet (one slow step may be a burst of load): another step
        probe = self.probing
        self.probing = None
        self.lost += max(sum(self._probe) - len(self._probe) * t_cur, 0.0)
        wins = t_probe < (self.margin if probe > self.current else self.margin_down) * t_cur
        if wins and probe < self.current and not self._confirming and t_probe * self.decisive > t_cur:
            # a first win for fewer threads, not by `decisive`: look again after a few of the current count's steps.
            # Beside busy processes the step time swings about 2x in phases of a few steps (which of our threads
            # the scheduler leaves alone on a core), so a block of probe steps that lands in a fast phase wins by
            # chance; two blocks apart rarely both do, and a wrong move down is the costly mistake.
            self._confirming, self._again = True, probe
            self.until_probe = self.probe_steps
            return
        self._confirming, self._again = False, None
        if wins:
            self.current, self.settled = probe, t_probe
            self.times[probe].clear()  # judged afresh: one thread's first steps beside busy processes ran faster
            self.interval = self.first_interval
            self.switches += 1
        else:  # what this probe lost, over what an interval may lose
            lost = sum(self._probe) - len(self._probe) * t_cur
            self.interval = min(max(2 * self.interval, math.ceil(lost / (self.budget * t_cur))), self.max_interval)
        self.until_probe = self.interval

    def begin(self) -> None:
        """Before a prompt (prefill): start from the CPUs other programs left free since the last look (free()): the
        largest count on the ladder that fits them, every thread on a quiet machine, fewer beside busy processes,
        where a thread that shares its core holds every launch back. The prompt runs at that count, and decode
        starts there; step() goes on measuring (more threads are still probed, after `hold` steps or at once when a
        neighbour leaves)."""
        if self.adaptive and self.free is not None:
            f = self.free()
            if f is not None:
                start = next((n for n in self.counts if n <= f + 0.25), self.counts[-1])
                if start != self.current:
                    self._restart(start)
        _use(self.current if self.adaptive else self.max_threads)

    def _restart(self, n: int) -> None:
        """Move to n threads and judge every count afresh (what was measured before was another load)."""
        self.current, self.settled, self.probing, self._probe = n, None, None, []
        self._confirming, self._again, self._since = False, None, self.steps
        for q in self.times.values():
            q.clear()
        self.interval = self.until_probe = self.first_interval
        self.switches += 1

    def step(self, fn: Callable[[], R], size: int = 1) -> R:
        """fn() (a step over `size` sequences) at the count next() chooses, set for this thread, timed and
        recorded."""
        n = self.next()
        _use(n)
        t = time.perf_counter()
        out = fn()
        self.record(n, time.perf_counter() - t, size)
        return out

    def describe(self) -> str:
        """"2 (fixed)" or "1 of 2 (adaptive)", for `/show info` and `run -v`."""
        if not self.adaptive:
            return f"{self.current} (fixed)" if self.fixed else str(self.current)
        return f"{self.current} of {self.max_threads} (adaptive)"
