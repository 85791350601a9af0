"""Prompt-prefix reuse: KV caches of recent requests, kept with the token ids they hold, so a request whose prompt
starts the same way (the next turn of a conversation: OpenAI clients resend the whole history) prefills only
what is new. The REPL keeps one conversation's cache the same way (lmcli.repl)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

DEFAULT_SIZE = 4  # caches kept per server; each costs only the pages its tokens filled (KVCache maps lazily)


def common_prefix(a, b) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable(held, ids) -> int:
    """Positions of a cache holding `held` that a prompt `ids` can keep: the common prefix, leaving at least one
    prompt token to feed (its logits start the answer)."""
    return min(common_prefix(held, ids), len(ids) - 1)


class PrefixCache:
    """At most `size` KV caches (least recently used dropped first), each with the ids it holds; a cache serves
    one request at a time (take removes it, give puts it back)."""

    def __init__(self, size: int = DEFAULT_SIZE):
        self.size = size
        self._entries: OrderedDict = OrderedDict()  # serial -> (model key, ids, cache)
        self._serial = 0

    def take(self, model_key: str, ids: list[int], new_cache: Callable[[], object]) -> tuple[object, int]:
        """(cache, reused positions) for a prompt: the held cache sharing the longest prefix with ids, truncated
        to it, or a new one (0 reused)."""
        best, best_n = None, 0
        for serial, (key, held, _) in self._entries.items():
            n = reusable(held, ids) if key == model_key else 0
            if n > best_n:
                best, best_n = serial, n
        if best is None:
            return new_cache(), 0
        _, _, cache = self._entries.pop(best)
        cache.truncate(best_n)
        return cache, best_n

    def give(self, model_key: str, held: list[int], cache) -> None:
        """Keep cache, which holds the ids `held` (its first cache.n_past positions)."""
        if self.size <= 0:
            return
        self._serial += 1
        self._entries[self._serial] = (model_key, list(held[: cache.n_past]), cache)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, model_key: str | None = None) -> None:
        """Forget the caches of a model (all with None): its weights were unloaded."""
        for serial in [s for s, (k, _, _) in self._entries.items() if model_key is None or k == model_key]:
            del self._entries[serial]

    def __len__(self) -> int:
        return len(self._entries)
