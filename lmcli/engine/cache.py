"""The KV cache: preallocated per layer, filled as tokens are processed."""

from __future__ import annotations

import numpy as np

from quant.schema import DEFAULT_KV_TYPE, KV_TYPES

DTYPES = {"f16": np.float16, "f32": np.float32}  # the numpy type of each of quant.schema.KV_TYPES
assert set(DTYPES) == set(KV_TYPES)


class KVCache:
    """Keys (n_layer, n_kv, n_ctx, dk) and values (n_layer, n_kv, n_ctx, dv) of kv_type (float16 or float32);
    n_past tokens are valid. Kernels compute in float32 and read layer(li).

    np.zeros maps untouched pages lazily, so a large context costs memory only as it fills.
    MLA layers cache one latent row per token (n_kv 1, dk kv_lora_rank + qk_rope_head_dim, dv 0: the values are
    the row's first kv_lora_rank entries; quant.schema.ModelConfig.cache_dims).
    """

    def __init__(self, n_layer: int, n_kv: int, n_ctx: int, dk: int, dv: int, kv_type: str = DEFAULT_KV_TYPE):
        dtype = DTYPES[kv_type]
        self.kv_type = kv_type
        self.k = np.zeros((n_layer, n_kv, n_ctx, dk), dtype)
        self.v = np.zeros((n_layer, n_kv, n_ctx, dv), dtype)
        self.n_ctx = n_ctx
        self.n_past = 0

    def layer(self, li: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer li's keys and values as the kernels take them: float32, or the float16 bits as uint16 (Numba
        has no float16 on CPU; ops widens each row as it reads it)."""
        k, v = self.k[li], self.v[li]
        if k.dtype == np.float16:
            return k.view(np.uint16), v.view(np.uint16)
        return k, v

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget every position >= n (for undo/regenerate and prompt-prefix reuse)."""
        self.n_past = min(self.n_past, n)
