"""Mixture of Experts: routers (pure functions of scores and a spec) and the routed-expert FFN."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from numba import njit

from quant import kernels

from . import ops, weights
from .weights import Act, FFN


@dataclass(frozen=True)
class RouterSpec:
    kind: str  # "softmax" | "sigmoid"
    top_k: int
    norm_topk_prob: bool = True
    scaling: float = 1.0  # routed_scaling_factor
    n_group: int = 1
    topk_group: int = 1


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    # (T, E) -> (T, k) indices of the k largest, largest first; ties go to the lower index as torch.topk does
    return np.argsort(-x, axis=-1, kind="stable")[:, :k]


@njit(cache=True)
def _route_softmax(z, k, norm, ids, w):
    """The softmax router in one compiled call (decode runs it once per MoE layer and token; as numpy it is a
    dozen small calls). Top-k by repeated arg-max scanning up, so ties go to the lower index, as _topk."""
    T, E = z.shape
    p = np.empty(E, np.float32)
    for t in range(T):
        m = z[t, 0]
        for e in range(1, E):
            m = max(m, z[t, e])
        s = np.float32(0.0)
        for e in range(E):
            p[e] = np.exp(z[t, e] - m)
            s += p[e]
        for e in range(E):
            p[e] = p[e] / s
        tot = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                taken = False
                for i in range(j):
                    if ids[t, i] == e:
                        taken = True
                if not taken and (best < 0 or p[e] > p[best]):
                    best = e
            ids[t, j] = best
            w[t, j] = p[best]
            tot += p[best]
        if norm:
            for j in range(k):
                w[t, j] = w[t, j] / tot


def route(logits: np.ndarray, spec: RouterSpec, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (T, n_expert) -> (expert ids (T, k) int64, weights (T, k) float32).

    softmax: weights are softmax probabilities of the chosen experts, renormalised if norm_topk_prob
      (MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock; Granite's
      softmax over the top-k logits equals the renormalised case).
    sigmoid: selection on sigmoid(logits) + bias within the topk_group best groups (a group scores the sum
      of its two best experts), weights from the uncorrected sigmoid scores, renormalised if norm_topk_prob,
      times routed_scaling_factor (DeepseekV3TopkRouter / DeepseekV3MoE.route_tokens_to_experts, Dots1).
    """
    z = np.ascontiguousarray(logits, dtype=np.float32)
    T, E = z.shape
    if spec.kind == "softmax":
        ids = np.empty((T, spec.top_k), np.int64)
        w = np.empty((T, spec.top_k), np.float32)
        _route_softmax(z, spec.top_k, spec.norm_topk_prob, ids, w)
        return ids, w
    if spec.kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        sel = s + bias[None, :] if bias is not None else s.copy()
        if spec.n_group > 1:
            g = sel.reshape(T, spec.n_group, E // spec.n_group)
            gscore = np.sort(g, axis=-1)[:, :, -2:].sum(axis=-1)  # (T, n_group)
            keep = _topk(gscore, spec.topk_group)
            mask = np.zeros((T, spec.n_group), bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            sel = np.where(np.repeat(mask, E // spec.n_group, axis=-1), sel, np.float32(-np.inf))
        ids = _topk(sel, spec.top_k)
        w = np.take_along_axis(s, ids, axis=-1)
        if spec.norm_topk_prob:
            w = w / (w.sum(axis=-1, keepdims=True) + np.float32(1e-20))
        w = w * np.float32(spec.scaling)
    else:
        raise ValueError(f"unknown router kind {spec.kind!r}")
    return ids.astype(np.int64), w.astype(np.float32)


@dataclass
class RoutingStats:
    """Cheap always-on counters: which experts ran and how many expert bytes were touched."""

    n_layer: int
    n_expert: int

    def __post_init__(self):
        self.hist = np.zeros((self.n_layer, max(self.n_expert, 1)), np.int64)  # tokens routed per (layer, expert)
        self.expert_bytes = 0  # bytes of distinct expert bundles read, summed over forward calls
        self.trace: list | None = None  # when enabled: (pos0, layer, ids (T, k), weights (T, k)) per call
        self.pos0 = 0  # position of the first token of the current forward chunk

    def reset(self) -> None:
        self.hist[:] = 0
        self.expert_bytes = 0
        if self.trace is not None:
            self.trace.clear()


def _experts(b8, b16, b32, offs, kinds, ex, sel, tok_ptr, tok_idx, a, hb, y) -> None:
    """gate/up (fused SiLU) then down for the assignments tok_ptr[0]..tok_ptr[-1] of experts `sel`; kinds: the
    kernels' kind of each matrix in these buffers (ex.kinds for ex's own, the formats' for the file's bytes)."""
    xq, xd, xs = a.quantized()
    (gc, gs), (uc, us), (dc, ds) = offs["gate"], offs["up"], offs["down"]
    g, u, dn = ex.fmts["gate"], ex.fmts["up"], ex.fmts["down"]
    gk, uk, dk = kinds["gate"], kinds["up"], kinds["down"]
    # prefill (an expert with several tokens) of integer formats takes the kernels that reuse unpacked codes
    prefill = a.x.shape[0] > 1
    a0, a1 = int(tok_ptr[0]), int(tok_ptr[-1])  # this call's assignments
    if prefill and g.expert_rows and u.expert_rows:
        kernels.moe_gate_up_rows(b8, b16, gk, uk, ex.n_ff, ex.n_embd, gc, gs, uc, us, sel, tok_ptr, tok_idx,
                                 xq, xd, xs, a.x, hb)
    else:
        h2 = np.empty((2, hb.shape[0], ex.n_ff), np.float32)  # gate, up (rows a0..a1 written)
        kernels.moe_gate_up(b8, b16, b32, gk, uk, ex.n_ff, ex.n_embd, gc, gs, uc, us, sel, tok_ptr, tok_idx,
                            xq, xd, xs, a.x, h2)
        ops.silu_mul(h2[0, a0:a1], h2[1, a0:a1], hb[a0:a1])
    ha = Act(hb[a0:a1])
    hq, hd, hs = ha.quantized()
    if prefill and dn.expert_rows:
        kernels.moe_down_rows(b8, b16, dk, ex.n_embd, ex.n_ff, dc, ds, sel, tok_ptr - a0, hq, hd, hs, ha.x,
                              y[a0:a1])
    else:
        kernels.moe_down(b8, b16, b32, dk, ex.n_embd, ex.n_ff, dc, ds, sel, tok_ptr - a0, hq, hd, hs, ha.x,
                         y[a0:a1])


_NO_PHASE = nullcontext()


def untimed(phase: str):
    """The instrument when none is set: enters nothing."""
    return _NO_PHASE


def moe_ffn(ff: FFN, h: np.ndarray, spec: RouterSpec, w, stats: RoutingStats | None, layer: int,
            cache=None, next_moe: tuple[int, FFN] | None = None, phase=untimed) -> np.ndarray:
    """Routed experts (+ shared experts) for h (T, n_embd): tokens grouped by expert, so each selected
    expert's bundle is read once per batch; two parallel kernel calls cover every selected expert.

    cache: an ExpertCache (models larger than RAM): the selected bundles are fetched into it and the kernels
    read them there; the next MoE layer's router, run on this layer's input, predicts what to prefetch.
    phase: the engine's instrument (Transformer.instrument), entered around matmuls, routing and expert kernels.
    """
    T = h.shape[0]
    a = Act(h)
    with phase("matmul"):
        logits = ff.router(a)
    with phase("routing"):
        ids, wts = route(logits, spec, ff.router_bias)
    flat_e = ids.reshape(-1)
    sel, tok_ptr, tok_idx, order = kernels.group_by_expert(ids, ff.experts.n_expert)
    wsort = wts.reshape(-1)[order]
    ex = ff.experts
    hb = np.empty((len(flat_e), ex.n_ff), np.float32)
    y = np.empty((len(flat_e), ex.n_embd), np.float32)
    if cache is None:
        with phase("experts"):
            bufs = ex.bufs if ex.tiles is not None else (w.buf8, w.buf16, w.buf32)
            _experts(*bufs, ex.offsets, ex.kinds, ex, sel, tok_ptr, tok_idx, a, hb, y)
    else:  # the cache holds the file's bundles: GGUF's rows, never repacked (see expert_cache)
        file_kinds = {k: f.kind for k, f in ex.fmts.items()}
        for i0 in range(0, len(sel), cache.max_batch):  # as many experts at a time as the cache holds
            sub = sel[i0 : i0 + cache.max_batch]
            slots, landing = cache.fetch_start(layer, sub)  # the misses' reads all start now
            if i0 == 0 and next_moe is not None:  # the reads for the next layer overlap this layer's compute
                nl, nff = next_moe
                with phase("matmul"):
                    logits = nff.router(a)
                with phase("routing"):
                    pred, _ = route(logits, spec, nff.router_bias)
                cache.prefetch(nl, np.unique(pred))
            offs = cache.offsets(layer, sub, slots, ex.n_expert)
            # compute each run of experts that has landed while the later ones are still being read
            j = 0
            while j < len(sub):
                cache.wait(landing, j)
                k = j + 1
                while k < len(sub) and cache.landed(landing, k):
                    cache.wait(landing, k)
                    k += 1
                with phase("experts"):
                    _experts(cache.buf8, cache.buf16, cache.buf32, offs, file_kinds, ex, sub[j:k],
                             tok_ptr[i0 + j : i0 + k + 1], tok_idx, a, hb, y)
                j = k
    if weights.OBSERVER is not None:  # lmcli imatrix: each expert's inputs
        weights.OBSERVER.experts(layer, ex.n_expert, sel, tok_ptr, tok_idx, h, hb)
    out = np.zeros((T, ex.n_embd), np.float32)
    kernels.combine_experts(y, tok_idx, wsort, out)
    if ff.sh_gate is not None:
        with phase("matmul"):
            g = ff.sh_gate(a)
            ops.silu_mul(g, ff.sh_up(a), g)
            sh = ff.sh_down(Act(g))
        if ff.sh_gate_inp is not None:
            sh *= (1.0 / (1.0 + np.exp(-(h @ ff.sh_gate_inp))))[:, None]
        out += sh
    if stats is not None:
        stats.hist[layer] += np.bincount(flat_e, minlength=stats.hist.shape[1])
        stats.expert_bytes += len(sel) * ex.bundle_nbytes
        if stats.trace is not None:
            stats.trace.append((stats.pos0, layer, ids, wts))
    return out
