"""The KV cache: preallocated per layer, filled as tokens are processed."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys (n_layer, n_kv, n_ctx, dk) and values (n_layer, n_kv, n_ctx, dv) float32; n_past tokens are valid.

    np.zeros maps untouched pages lazily, so a large context costs memory only as it fills.
    MLA layers cache decompressed per-head keys and values (n_kv = n_head), not the latent.
    """

    def __init__(self, n_layer: int, n_kv: int, n_ctx: int, dk: int, dv: int):
        self.k = np.zeros((n_layer, n_kv, n_ctx, dk), np.float32)
        self.v = np.zeros((n_layer, n_kv, n_ctx, dv), np.float32)
        self.n_ctx = n_ctx
        self.n_past = 0

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget every position >= n (for undo/regenerate and prompt-prefix reuse)."""
        self.n_past = min(self.n_past, n)
