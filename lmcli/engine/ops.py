"""Numba kernels of the forward pass other than the weight matmuls: norms, RoPE, attention, SwiGLU."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels import silu_mul  # noqa: F401 (vector exp; the engine's SwiGLU)
from quant.rope import inv_freq as rope_freqs


@njit(cache=True, fastmath=True)
def rmsnorm(x, w, eps, out):
    """out (T, n) = x / sqrt(mean(x^2) + eps) * w   (LlamaRMSNorm; sum in float64 as a guard)."""
    T, n = x.shape
    for t in range(T):
        ss = 0.0
        for i in range(n):
            ss += np.float64(x[t, i]) * x[t, i]
        s = np.float32(1.0 / np.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * s * w[i]


def rope_table(n_ctx: int, n_rot: int, theta: float, scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_ctx, n_rot / 2) float32: angle pos * inv_freq_i, in float64, from quant.rope.inv_freq (plain,
    linear, llama3 or yarn as transformers computes them); both times its attention factor (YaRN's mscale), as
    transformers' rotary embeddings multiply cos and sin by attention_scaling."""
    inv, factor = rope_freqs(n_rot, theta, scaling)
    ang = np.arange(n_ctx, dtype=np.float64)[:, None] * inv[None, :]
    return (np.cos(ang) * factor).astype(np.float32), (np.sin(ang) * factor).astype(np.float32)


@njit(cache=True, fastmath=True)
def rope(x, pos0, cos, sin, n_rot, interleaved):
    """Rotate x (T, n_heads, head_dim) in place at positions pos0 + t.

    interleaved: pairs (2i, 2i+1) as llama.cpp's NORM mode (GGUF llama Q/K are permuted for it);
    else pairs (i, i + n_rot/2) as transformers' rotate_half (NEOX).
    """
    T, H, D = x.shape
    half = n_rot // 2
    for t in range(T):
        p = pos0 + t
        for h in range(H):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                if interleaved:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * c - b * s
                    x[t, h, 2 * i + 1] = a * s + b * c
                else:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * c - b * s
                    x[t, h, i + half] = a * s + b * c


@njit(cache=True, parallel=True, fastmath=True)
def attention(q, kc, vc, pos0, scale, window, out):
    """Causal GQA attention for T queries at positions pos0..pos0+T-1 over the cache.

    window > 0: query at position p sees keys p - window + 1 .. p only (sliding-window attention, Mistral).
    q (T, n_head, Dk); kc (n_head_kv, n_ctx, Dk), vc (n_head_kv, n_ctx, Dv) holding positions < pos0 + T;
    out (T, n_head, Dv). Query head h reads KV head h // (n_head / n_head_kv). One job per (token, KV head)
    serves all the query heads of the group, so each cached K and V row is read once, not once per head.
    """
    T, H, D = q.shape
    KV, Dv = kc.shape[0], vc.shape[2]
    group = H // KV
    for job in prange(T * KV):
        t = job // KV
        kv = job % KV
        h0 = kv * group
        n = pos0 + t + 1
        j0 = max(0, n - window) if window > 0 else 0
        cnt = n - j0
        sc = np.empty((group, cnt), np.float32)
        for j in range(cnt):
            for g in range(group):
                s = np.float32(0.0)
                for d in range(D):
                    s += q[t, h0 + g, d] * kc[kv, j0 + j, d]
                sc[g, j] = s * scale
        for g in range(group):
            mx = np.float32(-np.inf)
            for j in range(cnt):
                mx = max(mx, sc[g, j])
            tot = np.float32(0.0)
            for j in range(cnt):
                e = np.exp(sc[g, j] - mx)
                sc[g, j] = e
                tot += e
            inv = np.float32(1.0) / tot
            for j in range(cnt):
                sc[g, j] *= inv
            for d in range(Dv):
                out[t, h0 + g, d] = 0.0
        for j in range(cnt):
            for g in range(group):
                p = sc[g, j]
                for d in range(Dv):
                    out[t, h0 + g, d] += p * vc[kv, j0 + j, d]


@njit(cache=True, fastmath=True)
def add_inplace(x, y):
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += y[t, i]
