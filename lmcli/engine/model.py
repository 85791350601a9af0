"""The forward pass: embeddings, then per layer RMSNorm -> GQA attention with RoPE -> SwiGLU FFN, then the head.

Python walks the layers; every per-row loop is a Numba kernel (quant.kernels for matmuls, .ops for the rest).
"""

from __future__ import annotations

import numpy as np

from quant.container import Container

from ..errors import ContextOverflow
from . import ops
from .cache import KVCache
from .config import ModelConfig
from .weights import Act, Weights, load_weights

PREFILL_CHUNK = 256  # tokens per batched pass: bounds activation memory for long prompts


class Transformer:
    """A decoder-only transformer over mmapped weights."""

    def __init__(self, container: Container, cfg: ModelConfig, max_ctx: int):
        self.container = container
        self.cfg = cfg
        self.weights: Weights = load_weights(container, cfg)
        self.max_ctx = max_ctx
        self.cos, self.sin = ops.rope_table(max_ctx, cfg.n_rot, cfg.rope_theta)

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        return KVCache(self.cfg, min(n_ctx or self.max_ctx, self.max_ctx))

    def forward(self, ids, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Process token ids at positions cache.n_past...; returns logits (T, vocab) or (1, vocab) for the last."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if cache.n_past + len(ids) > cache.n_ctx:
            raise ContextOverflow(
                f"{cache.n_past + len(ids)} tokens do not fit in the context of {cache.n_ctx}",
                hint="raise --ctx-size or shorten the prompt",
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError("token id out of range")
        outs = []
        for s in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[s : s + PREFILL_CHUNK]
            last = s + PREFILL_CHUNK >= len(ids)
            h = self._forward_chunk(chunk, cache)
            if all_logits:
                outs.append(self._head(h))
            elif last:
                outs.append(self._head(h[-1:]))
        return np.concatenate(outs, axis=0)

    def _head(self, h: np.ndarray) -> np.ndarray:
        w = self.weights
        x = np.empty_like(h)
        ops.rmsnorm(h, w.output_norm, self.cfg.norm_eps, x)
        return w.output(Act(x))

    def _forward_chunk(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        cfg, w = self.cfg, self.weights
        T = len(ids)
        H, KV, D, E = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_embd
        pos0 = cache.n_past
        x = w.tok_embd.rows(ids)  # (T, n_embd) residual stream
        hbuf = np.empty((T, E), np.float32)
        att = np.empty((T, H, D), np.float32)
        scale = np.float32(1.0 / np.sqrt(D))
        for li, L in enumerate(w.layers):
            ops.rmsnorm(x, L.attn_norm, cfg.norm_eps, hbuf)
            a = Act(hbuf)
            q = L.wq(a).reshape(T, H, D)
            k = L.wk(a).reshape(T, KV, D)
            v = L.wv(a).reshape(T, KV, D)
            ops.rope(q, pos0, self.cos, self.sin, cfg.n_rot, cfg.rope_interleaved)
            ops.rope(k, pos0, self.cos, self.sin, cfg.n_rot, cfg.rope_interleaved)
            kc, vc = cache.k[li], cache.v[li]  # (n_head_kv, n_ctx, head_dim)
            kc[:, pos0 : pos0 + T] = k.transpose(1, 0, 2)
            vc[:, pos0 : pos0 + T] = v.transpose(1, 0, 2)
            ops.attention(q, kc, vc, pos0, scale, att)
            ops.add_inplace(x, L.wo(Act(att.reshape(T, H * D))))
            ops.rmsnorm(x, L.ffn_norm, cfg.norm_eps, hbuf)
            a = Act(hbuf)
            g = L.w_gate(a)
            u = L.w_up(a)
            ops.silu_mul(g, u, g)
            ops.add_inplace(x, L.w_down(Act(g)))
        cache.n_past = pos0 + T
        return x
