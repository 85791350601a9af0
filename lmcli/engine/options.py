"""How to run a model, as one value: from the command line (or lmcli.load's keywords) to the expert cache."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .expert_cache import DEFAULT_POLICY


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings, not properties of the model; None leaves the choice to the engine."""

    # tokens of context; None: LMCLI_CTX_SIZE, else 4096 capped at the training context (lmcli.api resolves it)
    n_ctx: int | None = None
    threads: int | None = None  # kernel threads; None: LMCLI_THREADS, else adaptive up to every core (lmcli.threads)
    moe_topk: int | None = None  # experts per token; None: the model's own
    # expert cache size; None: automatic (on when the file does not fit in memory), 0: off
    expert_cache_mib: int | None = None
    cache_policy: str = DEFAULT_POLICY  # "cyclic", "lru" or "lfu": lmcli.engine.expert_cache.Policy
    # True reads the next layer's predicted experts ahead; it lost to demand reads in every capped run of
    # bench/larger_than_ram.py
    prefetch: bool = False
    # None: read the weights into RAM when the file fits in memory, else map it; True: always map; False: always read
    use_mmap: bool | None = None
    # the KV cache's numbers: "f16" (half the memory; computed in float32) or "f32"; None: LMCLI_KV_TYPE, else f32
    kv_type: str | None = None
    routing_trace: bool = False  # record every routing decision; a generation's final event carries them

    @classmethod
    def of(cls, base: EngineOptions | None = None, **changes) -> EngineOptions:
        """base (default: all defaults) with the fields in changes; TypeError naming an unknown field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown engine option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return replace(base if base is not None else cls(), **changes)
