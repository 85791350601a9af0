"""The KV cache: preallocated per layer, filled as tokens are processed."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


class KVCache:
    """Keys and values (n_layer, n_head_kv, n_ctx, head_dim) float32; n_past tokens are valid.

    np.zeros maps untouched pages lazily, so a large context costs memory only as it fills.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.n_ctx = n_ctx
        self.n_past = 0

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget every position >= n (for undo/regenerate and prompt-prefix reuse)."""
        self.n_past = min(self.n_past, n)
