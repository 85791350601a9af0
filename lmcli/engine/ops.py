"""Numba kernels of the forward pass other than the weight matmuls: norms, RoPE, attention, SwiGLU."""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from quant.kernels import _f16_row
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


@njit(cache=True, inline="always")
def _widen(src, bits, dst):
    """dst[:n] = the n = len(src) cached numbers as float32: src float32, or uint16 float16 bits (the f16 cache)."""
    if src.itemsize == 2:
        _f16_row(src, bits, dst)
    else:
        for i in range(src.shape[0]):
            dst[i] = src[i]


BLOCKED_GROUP = 8  # query heads per job from which the 4-row kernel wins (measured: MLA's 16 heads 2.8 vs 4.5 ms)


def attention(q, kc, vc, pos0, scale, window, out):
    """Causal GQA attention for T queries at positions pos0..pos0+T-1 over the cache.

    window > 0: query at position p sees keys p - window + 1 .. p only (sliding-window attention, Mistral).
    q (T, n_head, Dk); kc (n_head_kv, n_ctx, Dk), vc (n_head_kv, n_ctx, >= Dv) holding positions < pos0 + T, float32
    or uint16 float16 bits (each row is widened to float32 as it is read); out (T, n_head, Dv): the values are the
    first Dv entries of vc's rows, so MLA passes its latent cache as both kc and vc. Query head h reads KV head
    h // (n_head / n_head_kv). One job per (token, KV head) serves the query heads of the group, so each cached row
    is read once, not once per head; when tokens x KV heads are fewer than the threads (decode with few KV heads,
    MLA's one latent head), the group is split into spans of heads, one job each. Spans of BLOCKED_GROUP heads or
    more take rows four at a time (_attention_rows4): each query and accumulator load then serves four rows.
    """
    T, H, _ = q.shape
    KV = kc.shape[0]
    group = H // KV
    n_span = min(group, max(1, -(-get_num_threads() // (T * KV))))
    span = -(-group // n_span)
    (_attention_rows4 if span >= BLOCKED_GROUP else _attention_rows)(q, kc, vc, pos0, scale, window, out, span)


@njit(cache=True, inline="always")
def _job(job, T, H, KV, pos0, window, span):
    """(token, KV head, first query head, heads, first key position, keys) of one job."""
    group = H // KV
    n_span = -(-group // span)
    t = job // (KV * n_span)
    kv = job // n_span % KV
    g0 = job % n_span * span
    n = pos0 + t + 1
    j0 = max(0, n - window) if window > 0 else 0
    return t, kv, kv * group + g0, min(span, group - g0), j0, n - j0


@njit(cache=True, parallel=True, fastmath=True)
def _attention_rows(q, kc, vc, pos0, scale, window, out, span):
    """ops.attention one cached row at a time, for spans of a few heads."""
    T, H, D = q.shape
    KV, Dv = kc.shape[0], out.shape[2]
    for job in prange(T * KV * -(-(H // KV) // span)):
        t, kv, h0, G, j0, cnt = _job(job, T, H, KV, pos0, window, span)
        sc = np.empty((G, cnt), np.float32)
        row = np.empty(max(D, Dv), np.float32)
        bits = np.empty(max(D, Dv), np.uint32)
        for j in range(cnt):
            _widen(kc[kv, j0 + j], bits, row)
            for g in range(G):
                s = np.float32(0.0)
                for d in range(D):
                    s += q[t, h0 + g, d] * row[d]
                sc[g, j] = s * scale
        for g in range(G):
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
            _widen(vc[kv, j0 + j, :Dv], bits, row)
            for g in range(G):
                p = sc[g, j]
                for d in range(Dv):
                    out[t, h0 + g, d] += p * row[d]


@njit(cache=True, parallel=True, fastmath=True)
def _attention_rows4(q, kc, vc, pos0, scale, window, out, span):
    """ops.attention four cached rows at a time (rows past the last are zero, their weights zero), for spans of
    many heads: the dot products and the weighted sums load each query and accumulator once per four rows."""
    T, H, D = q.shape
    KV, Dv = kc.shape[0], out.shape[2]
    W = max(D, Dv)
    for job in prange(T * KV * -(-(H // KV) // span)):
        t, kv, h0, G, j0, cnt = _job(job, T, H, KV, pos0, window, span)
        n4 = -(-cnt // 4) * 4
        sc = np.zeros((n4, G), np.float32)  # (key, head)
        qs = np.empty((G, D), np.float32)  # the span's queries, scaled
        for g in range(G):
            for d in range(D):
                qs[g, d] = q[t, h0 + g, d] * scale
        rows = np.zeros((4, W), np.float32)
        bits = np.empty(W, np.uint32)
        for jb in range(0, cnt, 4):
            m = min(4, cnt - jb)
            for i in range(m):
                _widen(kc[kv, j0 + jb + i], bits, rows[i])
            rows[m:] = 0.0
            for g in range(G):
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for d in range(D):
                    a = qs[g, d]
                    s0 += a * rows[0, d]
                    s1 += a * rows[1, d]
                    s2 += a * rows[2, d]
                    s3 += a * rows[3, d]
                sc[jb, g], sc[jb + 1, g], sc[jb + 2, g], sc[jb + 3, g] = s0, s1, s2, s3
        mx = np.full(G, -np.inf, np.float32)
        for j in range(cnt):
            for g in range(G):
                mx[g] = max(mx[g], sc[j, g])
        tot = np.zeros(G, np.float32)
        for j in range(cnt):
            for g in range(G):
                e = np.exp(sc[j, g] - mx[g])
                sc[j, g] = e
                tot[g] += e
        sc[cnt:] = 0.0
        acc = np.zeros((G, Dv), np.float32)
        for jb in range(0, cnt, 4):
            m = min(4, cnt - jb)
            for i in range(m):
                _widen(vc[kv, j0 + jb + i, :Dv], bits, rows[i])
            rows[m:] = 0.0
            for g in range(G):
                p0, p1, p2, p3 = sc[jb, g], sc[jb + 1, g], sc[jb + 2, g], sc[jb + 3, g]
                for d in range(Dv):
                    acc[g, d] += p0 * rows[0, d] + p1 * rows[1, d] + p2 * rows[2, d] + p3 * rows[3, d]
        for g in range(G):
            inv = np.float32(1.0) / tot[g]
            for d in range(Dv):
                out[t, h0 + g, d] = acc[g, d] * inv


# MLA in DeepSeek's "absorb" form (DeepSeek-V3 inference/model.py, llama.cpp's deepseek2 graph): the key half of
# kv_b turns each head's no-RoPE query into a query over the latent, q_lat = W_uk[h]^T q_nope, so scores read the
# latent cache directly: q_lat . c_kv + q_rope . k_rope equals q_nope . (W_uk c_kv) + q_rope . k_rope; the value
# half turns the attention-weighted latent into the head's output, W_uv[h] (sum_j p_j c_kv_j).


@njit(cache=True, parallel=True, fastmath=True)
def mla_query(q, wk, out):
    """out[t, h] = (W_uk[h]^T q_nope[t, h], q_rope[t, h]): q (T, H, nope + rope) float32, wk (H, nope, rank) float16
    bits (uint16), out (T, H, rank + rope). Four rows of W_uk at a time: one load and store of out per four."""
    T, H, _ = q.shape
    nope, rank = wk.shape[1], wk.shape[2]
    rope = out.shape[2] - rank
    for h in prange(H):
        rows = np.zeros((4, rank), np.float32)
        bits = np.empty(rank, np.uint32)
        for t in range(T):
            for r in range(rank):
                out[t, h, r] = 0.0
            for r in range(rope):
                out[t, h, rank + r] = q[t, h, nope + r]
        for i0 in range(0, nope, 4):
            m = min(4, nope - i0)
            for i in range(m):
                _f16_row(wk[h, i0 + i], bits, rows[i])
            rows[m:] = 0.0
            for t in range(T):
                a0 = q[t, h, i0]
                a1 = q[t, h, i0 + 1] if m > 1 else np.float32(0.0)
                a2 = q[t, h, i0 + 2] if m > 2 else np.float32(0.0)
                a3 = q[t, h, i0 + 3] if m > 3 else np.float32(0.0)
                for r in range(rank):
                    out[t, h, r] += a0 * rows[0, r] + a1 * rows[1, r] + a2 * rows[2, r] + a3 * rows[3, r]


@njit(cache=True, parallel=True, fastmath=True)
def mla_output(lat, wv, out):
    """out[t, h * dv + d] = W_uv[h, d] . lat[t, h]: lat (T, H, rank) float32, wv (H, dv, rank) float16 bits (uint16),
    out (T, H * dv). Four rows of W_uv at a time: one load of lat per four products."""
    T, H, rank = lat.shape
    dv = wv.shape[1]
    for h in prange(H):
        rows = np.zeros((4, rank), np.float32)
        bits = np.empty(rank, np.uint32)
        for d0 in range(0, dv, 4):
            m = min(4, dv - d0)
            for i in range(m):
                _f16_row(wv[h, d0 + i], bits, rows[i])
            rows[m:] = 0.0
            for t in range(T):
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for r in range(rank):
                    x = lat[t, h, r]
                    s0 += rows[0, r] * x
                    s1 += rows[1, r] * x
                    s2 += rows[2, r] * x
                    s3 += rows[3, r] * x
                out[t, h * dv + d0] = s0
                if m > 1:
                    out[t, h * dv + d0 + 1] = s1
                if m > 2:
                    out[t, h * dv + d0 + 2] = s2
                if m > 3:
                    out[t, h * dv + d0 + 3] = s3


@njit(cache=True, fastmath=True)
def add_inplace(x, y):
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += y[t, i]
