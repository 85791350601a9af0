"""The expert cache: whole expert bundles in anonymous memory, each miss one large read, for models larger
than RAM. The kernels then read experts from the cache buffer instead of the file mapping.

Measured here: page faults on a cold expert read 0.08-0.19 GB/s, one pread of the whole bundle 1.5-2.0 GB/s.
Reads use O_DIRECT where the filesystem allows, so bundles do not also fill the page cache (which counts
against a memory cgroup). A layer's misses are read together, READ_THREADS at a time (the disk works on several
requests at once; one read at a time left it idle between them), and moe_ffn computes the bundles that are
resident, then each run of landed ones, while the rest are still arriving (fetch_start). When asked (prefetch=True), a reader thread serves prefetches (the next layer's
router run on the current hidden state) while the current layer computes. Off by default: in every capped run
of bench/larger_than_ram.py it read more or ran slower than demand reads alone (25% of the file: 1.98 vs 2.48
tok/s; 60%: 9.46 vs 22.51), the reader thread competing with the two compute threads for two cores.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import LmcliError
from ..memory import env_int

POLICIES = ("lru", "lfu", "cyclic")
DEFAULT_POLICY = "cyclic"  # what lmcli.load and the engine use unless told otherwise
PREFETCH_MIN_RECALL = 0.5  # prefetch reads only while predictions name at least this share of routed experts
PREDICTION_EMA = 0.1  # weight of the latest step in the running recall
READ_THREADS = 4  # demand reads in flight at once (LMCLI_READ_THREADS overrides); they wait on the disk, not a core


class MemoryBudgetError(LmcliError):
    """The memory budget cannot hold what one token needs."""


@dataclass
class CacheStats:
    """Counters per layer plus totals; cheap enough to stay on."""

    n_layer: int
    hits: np.ndarray = field(init=False)
    misses: np.ndarray = field(init=False)
    bytes_read: int = 0  # bytes read from the file by the cache (demand + prefetch)
    prefetched: int = 0  # bundles read ahead of need
    prefetch_used: int = 0  # of those, later used
    prediction_recall: float = 1.0  # running share of routed experts the next-layer prediction named
    prefetch_skipped: int = 0  # predictions not read because recall was below PREFETCH_MIN_RECALL
    wait_s: float = 0.0  # time the forward pass spent blocked on reads
    read_s: float = 0.0  # time spent in reads, summed over the reads in flight (beyond wait_s: hidden by overlap)

    def __post_init__(self):
        self.hits = np.zeros(self.n_layer, np.int64)
        self.misses = np.zeros(self.n_layer, np.int64)

    def as_dict(self) -> dict:
        tot = self.hits + self.misses
        return {
            "hit_rate": round(float(self.hits.sum() / max(tot.sum(), 1)), 4),
            "hit_rate_per_layer": [round(float(h / t), 4) if t else None for h, t in zip(self.hits, tot)],
            "bytes_read": self.bytes_read,
            "prefetched": self.prefetched,
            "prefetch_used": self.prefetch_used,
            "prediction_recall": round(self.prediction_recall, 4),
            "prefetch_skipped": self.prefetch_skipped,
            "io_wait_s": round(self.wait_s, 6),
            "io_read_s": round(self.read_s, 6),
        }


class Policy:
    """Replacement policy over (layer, expert) keys.

    "lru": least recently used. "lfu": least frequently used (uses counted since the start, evicted keys
    included), ties by recency.
    "cyclic": decode visits the MoE layers in ascending order, over and over, so the experts whose next
    possible use is furthest away are those of the layer being run (its experts other than this step's are
    next needed one whole cycle on), then those of the layer run before it, and so on backwards; the layer
    that comes next is evicted from last. The victim is the least frequently used expert (ties: least
    recent) of the first layer in that order that has an evictable one. LRU does the opposite on this loop:
    the layer visited longest ago is the one needed next, and a cache smaller than one token's experts hits
    nothing at all. Frequency is only compared within a layer: weighing it across layers scored worse on
    real Mixtral routing (bench/policy_replay.py).

    The caller says which layer's step is starting with visit(layer) (ExpertCache.fetch and replay_hits
    do); touch() of a key also moves there. The visiting order is the ascending order of the layers seen.
    """

    def __init__(self, kind: str):
        if kind not in POLICIES:
            raise LmcliError(f"unknown expert cache policy {kind!r} (known: {', '.join(POLICIES)})")
        self.kind = kind
        self.order: OrderedDict = OrderedDict()  # lru, lfu: resident key -> None, least recent first
        self.freq: dict = {}  # key -> uses since the start
        self.by_layer: dict = {}  # cyclic: layer -> an OrderedDict like `order` of that layer's resident keys
        self.ring: list = []  # cyclic: the layers seen, in visiting (ascending) order
        self.current = None  # the layer whose step runs now

    def _keys(self, layer: int) -> OrderedDict:
        """The recency list a key of `layer` belongs in: one per layer for cyclic, one for all otherwise."""
        if self.kind != "cyclic":
            return self.order
        keys = self.by_layer.get(layer)
        if keys is None:
            keys = self.by_layer[layer] = OrderedDict()
            bisect.insort(self.ring, layer)
        return keys

    def visit(self, layer: int) -> None:
        """The step of `layer` starts: its experts are fetched next."""
        self.current = layer
        self._keys(layer)

    def touch(self, key) -> None:
        """`key` is used (and resident)."""
        self.visit(key[0])
        self.freq[key] = self.freq.get(key, 0) + 1
        keys = self._keys(key[0])
        keys.pop(key, None)
        keys[key] = None

    def admit(self, key) -> None:
        """`key` is made resident without being used (a prefetch): evictable, most recent, no use counted."""
        keys = self._keys(key[0])
        if key not in keys:
            keys[key] = None

    def remove(self, key) -> None:
        self._keys(key[0]).pop(key, None)

    @staticmethod
    def _least_frequent(keys, pinned: set, freq: dict):
        best, best_f = None, None
        for key in keys:  # least recent first, so the first minimum is the least recent among equals
            if key in pinned:
                continue
            f = freq.get(key, 0)
            if best_f is None or f < best_f:
                best, best_f = key, f
        return best

    def victim(self, pinned: set):
        if self.kind == "lru":
            for key in self.order:
                if key not in pinned:
                    return key
            return None
        if self.kind == "lfu":
            return self._least_frequent(self.order, pinned, self.freq)
        ring = self.ring
        if not ring:
            return None
        start = bisect.bisect_right(ring, self.current) - 1 if self.current is not None else len(ring) - 1
        for j in range(len(ring)):  # the current layer, then backwards; the next layer last
            key = self._least_frequent(self.by_layer[ring[(start - j) % len(ring)]], pinned, self.freq)
            if key is not None:
                return key
        return None


def _check_capacity(trace: list, capacity: int) -> None:
    widest = max((len(experts) for _, experts in trace), default=0)
    if capacity < widest:
        raise ValueError(f"a cache of {capacity} bundles cannot hold one step's {widest} experts")


def replay_hits(trace: list, capacity: int, kind: str) -> int:
    """Offline replay of a routing trace [(layer, [experts...]) per token and layer] under a policy: the
    experts of one step are pinned while it runs, as the live cache pins the experts its kernels read."""
    _check_capacity(trace, capacity)
    pol = Policy(kind)
    resident: set = set()
    hits = 0
    for layer, experts in trace:
        pol.visit(layer)
        pinned = {(layer, e) for e in experts}
        for e in experts:
            key = (layer, e)
            if key in resident:
                hits += 1
            else:
                if len(resident) >= capacity:
                    v = pol.victim(pinned)
                    resident.discard(v)
                    pol.remove(v)
                resident.add(key)
            pol.touch(key)
    return hits


def belady_hits(trace: list, capacity: int) -> int:
    """Belady's optimum (evict the key used furthest in the future): the upper bound for any policy."""
    _check_capacity(trace, capacity)
    seq = [(layer, e) for layer, experts in trace for e in experts]
    groups = [len(experts) for _, experts in trace]
    nxt = [0] * len(seq)
    last: dict = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], 1 << 60)
        last[seq[i]] = i
    resident: dict = {}  # key -> next use index
    hits, i = 0, 0
    for g in groups:
        pinned = set(seq[i : i + g])
        for j in range(i, i + g):
            key = seq[j]
            if key in resident:
                hits += 1
            elif len(resident) >= capacity:
                v = max((k for k in resident if k not in pinned), key=lambda k: resident[k])
                del resident[v]
            resident[key] = nxt[j]
        i += g
    return hits


class ExpertCache:
    """Slots of `slot_size` bytes in one anonymous mapping; (layer, expert) -> slot."""

    def __init__(self, path: str, layers: dict, capacity_bytes: int, top_k: int, policy: str = DEFAULT_POLICY,
                 prefetch: bool = False):
        # layers: layer index -> Experts (weights.Experts) of the MoE layers
        self.path = path
        self.layers = layers
        self.slot_size = max(ex.stride for ex in layers.values())
        self.n_slots = capacity_bytes // self.slot_size
        need = top_k  # one token's experts of one layer; prefetch needs top_k more and is dropped without them
        if self.n_slots < need:
            raise MemoryBudgetError(
                f"an expert cache of {capacity_bytes >> 20} MiB holds {self.n_slots} expert bundles of "
                f"{self.slot_size >> 20} MiB; one token needs at least {need} resident",
                hint="raise --expert-cache-mib")
        self.top_k = top_k
        # a batch (prefill) may select more experts than fit: moe_ffn works through them max_batch at a time,
        # keeping top_k slots for the next layer's prefetch
        self.max_batch = max(top_k, self.n_slots - top_k) if self.n_slots >= 2 * top_k else self.n_slots
        self._map = mmap.mmap(-1, self.n_slots * self.slot_size)  # anonymous, page aligned
        # the kernels get read-only views, as of a resident or mapped container: the same compiled signatures
        # (the cache's reads go through a memoryview of the mapping)
        self.buf8 = np.frombuffer(self._map, np.uint8)
        self.buf8.flags.writeable = False
        self.buf16 = self.buf8.view(np.uint16)
        self.buf32 = self.buf8.view(np.float32)
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            self.direct = bool(getattr(os, "O_DIRECT", 0))
        except OSError:  # filesystems without O_DIRECT (tmpfs)
            self.fd = os.open(path, os.O_RDONLY)
            self.direct = False
        self.slot_of: dict = {}
        self.owner: list = [None] * self.n_slots
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.policy = Policy(policy)
        self.stats = CacheStats(max(layers) + 1)
        self.pending: dict = {}  # key -> Future of an in-flight read
        self.prefetched_keys: set = set()
        self.predicted: dict = {}  # layer -> experts the last prediction named (checked when the layer runs)
        self.in_use: set = set()  # the experts the current layer's kernels are reading
        self._lock = threading.Lock()
        prefetch = prefetch and self.n_slots >= 2 * top_k
        self._io = ThreadPoolExecutor(1, thread_name_prefix="lmcli-expert-io") if prefetch else None
        n_reads = env_int("LMCLI_READ_THREADS") or READ_THREADS
        if n_reads < 1:
            raise LmcliError(f"LMCLI_READ_THREADS must be at least 1, got {n_reads}")
        self._reads = ThreadPoolExecutor(n_reads, thread_name_prefix="lmcli-expert-read")
        self._fd_lock = threading.Lock()
        self._time_lock = threading.Lock()
        # byte offsets of gate/up/down codes and scales inside a bundle (the same for every expert)
        self.inner = {}
        for li, ex in layers.items():
            base0 = ex.base
            self.inner[li] = {k: (int(c[0] - base0), int(s[0] - base0)) for k, (c, s) in ex.offsets.items()}

    # --- reads ----------------------------------------------------------------------------

    def _read(self, key, slot: int) -> int:
        t = time.perf_counter()
        n = self._read_bundle(key, slot)
        dt = time.perf_counter() - t
        with self._time_lock:  # not self._lock: its holder may be waiting for this read (_claim)
            self.stats.read_s += dt
        return n

    def _read_bundle(self, key, slot: int) -> int:
        layer, e = key
        ex = self.layers[layer]
        off = ex.base + e * ex.stride
        view = memoryview(self._map)[slot * self.slot_size : slot * self.slot_size + ex.stride]
        done = 0
        while done < ex.stride:
            fd = self.fd
            try:
                n = os.preadv(fd, [view[done:]], off + done)
            except OSError as err:
                if err.errno == 22:  # EINVAL: O_DIRECT refused here; fall back for good (once, for every reader)
                    with self._fd_lock:
                        if self.direct and self.fd == fd:
                            self.fd = os.open(self.path, os.O_RDONLY)
                            self.direct = False
                            os.close(fd)
                    if not self.direct:
                        continue
                raise
            if n <= 0:
                raise LmcliError(f"short read of expert {e} in layer {layer}: the model file changed or is truncated")
            done += n
        if not self.direct:
            os.posix_fadvise(self.fd, off, ex.stride, os.POSIX_FADV_DONTNEED)  # keep it out of the page cache
        return ex.stride

    def _claim(self, key, pinned: set) -> int:
        """A slot for key (caller holds the lock): a free one, or the policy's victim's."""
        if self.free:
            slot = self.free.pop()
        else:
            victim = self.policy.victim(pinned | set(self.pending) | self.in_use)
            if victim is None and self.pending:  # prefetches hold the rest: let them land, then evict one
                for key, fut in list(self.pending.items()):
                    self.stats.bytes_read += fut.result()
                    self.pending.pop(key)
                victim = self.policy.victim(pinned | self.in_use)
            if victim is None:
                raise MemoryBudgetError("the expert cache is too small for the experts in flight",
                                        hint="raise --expert-cache-mib")
            slot = self.slot_of.pop(victim)
            self.policy.remove(victim)
            self.prefetched_keys.discard(victim)
        self.slot_of[key] = slot
        self.owner[slot] = key
        return slot

    def prefetch(self, layer: int, experts) -> None:
        """Start reading these experts of `layer` in the background (misses only), while the prediction
        (the next layer's router on the current hidden state) has been naming the routed experts: when its
        running recall falls below PREFETCH_MIN_RECALL the reads would mostly evict useful bundles for
        nothing, so predictions are only checked until they recover."""
        if self._io is None or layer not in self.layers:
            return
        self.predicted[layer] = {int(e) for e in experts}
        if self.stats.prediction_recall < PREFETCH_MIN_RECALL:
            self.stats.prefetch_skipped += 1
            return
        with self._lock:
            for e in list(experts)[: self.top_k]:
                key = (layer, int(e))
                if key in self.slot_of or key in self.pending:
                    continue
                if not self.free and self.policy.victim(set(self.pending) | {key} | self.in_use) is None:
                    return
                slot = self._claim(key, {key})
                self.policy.admit(key)  # evictable once it has landed and its layer has run without it
                self.pending[key] = self._io.submit(self._read, key, slot)
                self.prefetched_keys.add(key)
                self.stats.prefetched += 1

    def fetch(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Slots holding `experts` of `layer`, reading misses (one pread per bundle); returns slot ids once all
        have landed."""
        slots, landing = self.fetch_start(layer, experts)
        for i in range(len(landing)):
            self.wait(landing, i)
        return slots

    def wait(self, landing: list, i: int) -> None:
        """Block until the i-th expert of a fetch_start has landed (returns at once if it has)."""
        item = landing[i]
        if item is None:
            return
        key, fut = item
        t = time.perf_counter()
        n = fut.result()
        self.stats.wait_s += time.perf_counter() - t
        with self._lock:
            if self.pending.get(key) is fut:
                self.pending.pop(key)
                self.stats.bytes_read += n
        landing[i] = None

    @staticmethod
    def landed(landing: list, i: int) -> bool:
        item = landing[i]
        return item is None or item[1].done()

    def fetch_start(self, layer: int, experts: np.ndarray) -> tuple[np.ndarray, list]:
        """Slots for `experts` of `layer`, with the reads of the misses started together: (slot ids, landing),
        landing[i] None when expert i is resident, else in flight (wait(landing, i), landed(landing, i)). The
        caller waits for every one before the next fetch of this cache."""
        keys = [(layer, int(e)) for e in experts]
        pinned = set(keys)
        pred = self.predicted.pop(layer, None)
        if pred is not None and 0 < len(keys) <= self.top_k:  # decode steps: a batch's union says little
            recall = sum(e in pred for _, e in keys) / len(keys)
            self.stats.prediction_recall += PREDICTION_EMA * (recall - self.stats.prediction_recall)
        with self._lock:
            self.in_use = pinned
            self.policy.visit(layer)
        landing: list = [None] * len(keys)
        slots = np.empty(len(keys), np.int64)
        with self._lock:
            for i, key in enumerate(keys):
                if key in self.slot_of:
                    fut = self.pending.get(key)
                    if fut is not None and not fut.done():
                        landing[i] = (key, fut)
                    elif fut is not None:  # a prefetch that has landed
                        self.stats.bytes_read += self.pending.pop(key).result()
                    if key in self.prefetched_keys:
                        self.stats.prefetch_used += 1
                        self.prefetched_keys.discard(key)
                    if fut is None or fut.done():
                        self.stats.hits[layer] += 1  # resident, or prefetched in time
                    else:
                        self.stats.misses[layer] += 1  # read in flight: a miss whose read started early
                else:
                    self.stats.misses[layer] += 1
                    slot = self._claim(key, pinned)
                    fut = self._reads.submit(self._read, key, slot)
                    self.pending[key] = fut  # pinned against eviction until it has landed
                    landing[i] = (key, fut)
                slots[i] = self.slot_of[key]
                self.policy.touch(key)
            for key in [k for k in self.pending if k[0] == layer and k not in pinned]:
                if self.pending[key].done():  # a prefetch the router did not confirm: unpinned from now on
                    self.stats.bytes_read += self.pending.pop(key).result()
        return slots, landing

    def offsets(self, layer: int, experts: np.ndarray, slots: np.ndarray, n_expert: int) -> dict:
        """Per-expert byte offsets into the cache buffer, indexed by expert id (valid for `experts` only)."""
        out = {}
        for k, (ci, si) in self.inner[layer].items():
            c = np.zeros(n_expert, np.int64)
            s = np.zeros(n_expert, np.int64)
            c[experts] = slots * self.slot_size + ci
            s[experts] = slots * self.slot_size + si
            out[k] = (c, s)
        return out

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
        self._reads.shutdown(wait=True)
        os.close(self.fd)
