"""The forward pass, one for every architecture: embeddings, then per layer RMSNorm -> attention (GQA with
RoPE, optional biases and QK-norm, or MLA) -> RMSNorm -> FFN (dense SwiGLU, or routed experts plus shared
experts), then the head. Differences between architectures are data in ModelConfig.

Python walks the layers; every per-row loop is a Numba kernel (quant.kernels for matmuls, .ops for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np

from quant.container import Container
from quant.rope import mla_softmax_mscale
from quant.schema import ModelConfig, repacked_ram, token_costs

from ..errors import ContextOverflow, UsageError
from ..memory import available, kv_cache_type, residency
from . import ops
from .cache import KVCache
from .moe import RouterSpec, RoutingStats, moe_ffn, untimed
from .options import EngineOptions
from .weights import Act, Attention, FFN, Weights, load_weights

PREFILL_CHUNK = 256  # tokens per batched pass: bounds activation memory for long prompts


@dataclass(frozen=True)
class Counters:
    """The engine's running totals since load; what one run did is the difference of two."""

    hist: np.ndarray  # (n_layer, n_expert) tokens routed per expert
    expert_bytes: int  # bytes of routed-expert bundles the kernels read
    disk_bytes: int  # bytes the expert cache read from the file
    traced: int  # routing trace entries recorded

    def __sub__(self, o: Counters) -> Counters:
        return Counters(self.hist - o.hist, self.expert_bytes - o.expert_bytes, self.disk_bytes - o.disk_bytes,
                        self.traced - o.traced)


class Transformer:
    """A decoder-only transformer over the container's weights (read into RAM, or mapped).

    instrument: None, or a function phase -> context manager that the forward pass enters around each phase
    ("matmul": dense matrices, "attention", "routing", "experts": routed-expert kernels); `lmcli bench` times
    them so. The phases do not nest.
    """

    def __init__(self, container: Container, cfg: ModelConfig, opts: EngineOptions):
        """opts.n_ctx is the context to allocate for (lmcli.api.Model resolves a None to its default)."""
        self.container = container
        self.cfg = cfg
        self.options = opts
        self.instrument: Callable[[str], ContextManager] | None = None
        max_ctx, moe_topk, expert_cache_mib, use_mmap = opts.n_ctx, opts.moe_topk, opts.expert_cache_mib, opts.use_mmap
        # measured before the dense weights are read in (they count in a cgroup); lmcli plan applies the same rule
        self.kv_type = kv_cache_type(opts.kv_type)
        # with what the load-time repack of GGUF-row matrices adds (quant.schema.repacked_ram)
        ram_extra, dense_tiles = repacked_ram(container.tensor_sizes())
        self.residency = residency(file_bytes=container.file_size + ram_extra,
                                   kv_bytes=cfg.kv_bytes(self.kv_type) * max_ctx,
                                   dense_bytes=token_costs(cfg, container.tensor_sizes()).dense_bytes + dense_tiles,
                                   avail=available(), is_moe=cfg.is_moe, use_mmap=use_mmap,
                                   expert_cache_mib=expert_cache_mib)
        if self.residency.resident:
            container.load_resident()
        self.weights: Weights = load_weights(container, cfg)
        self.max_ctx = max_ctx
        self.cos, self.sin = ops.rope_table(max_ctx, cfg.n_rot, cfg.rope_theta, cfg.rope_scaling)
        top_k = cfg.n_expert_used
        if moe_topk is not None:
            if not cfg.is_moe:
                raise UsageError("--moe-topk applies to Mixture-of-Experts models; this model is dense")
            if not 1 <= moe_topk <= cfg.n_expert:
                raise UsageError(f"--moe-topk must be between 1 and {cfg.n_expert} (the expert count), got {moe_topk}")
            top_k = moe_topk
        self.router = RouterSpec(cfg.router, top_k, cfg.norm_topk_prob, cfg.routed_scaling_factor,
                                 cfg.n_group, cfg.topk_group)
        self.stats = RoutingStats(cfg.n_layer, cfg.n_expert)  # the engine's own: read counters() instead
        self.trace_routing(opts.routing_trace)
        self.attn_scale = np.float32(cfg.attention_multiplier or 1.0 / np.sqrt(cfg.kv_dims[1]))
        if cfg.kv_lora_rank:  # DeepseekV3Attention: YaRN's mscale_all_dim also scales the softmax
            self.attn_scale *= np.float32(mla_softmax_mscale(cfg.rope_scaling))
        self.expert_cache = self._make_cache(top_k, opts.cache_policy, opts.prefetch)
        moe = [i for i, L in enumerate(self.weights.layers) if L.ffn.experts is not None]
        self._next_moe = {a: (b, self.weights.layers[b].ffn) for a, b in zip(moe, moe[1:])}
        from .. import warm

        warm.warm_model(self, progress=warm.REPORT)  # a first run compiles its kernels in parallel processes

    def _make_cache(self, top_k: int, policy: str, prefetch: bool):
        """The expert cache residency() decided on, over the mapping's MoE layers; None without one."""
        from .expert_cache import ExpertCache

        layers = {i: L.ffn.experts for i, L in enumerate(self.weights.layers) if L.ffn.experts is not None}
        if not layers or self.residency.expert_cache_bytes is None:
            return None
        return ExpertCache(str(self.container.path), layers, self.residency.expert_cache_bytes, top_k, policy,
                           prefetch)

    # --- what the engine did (generation reads these; faces read the generation's events) ----------

    def trace_routing(self, on: bool = True) -> None:
        """Record (or stop recording) every routing decision: (first position, layer, expert ids (T, k),
        weights (T, k)) per forward chunk and MoE layer; routing_trace(since) returns them."""
        self.stats.trace = [] if on else None

    def routing_trace(self, since: int = 0) -> list:
        return list(self.stats.trace[since:]) if self.stats.trace is not None else []

    def counters(self) -> Counters:
        ec, st = self.expert_cache, self.stats
        return Counters(st.hist.copy(), st.expert_bytes, ec.stats.bytes_read if ec is not None else 0,
                        len(st.trace) if st.trace is not None else 0)

    def expert_cache_stats(self) -> dict | None:
        """The expert cache's size and counters since load (hit rate, bytes read, ...); None without one."""
        ec = self.expert_cache
        if ec is None:
            return None
        return {"slots": ec.n_slots, "slot_bytes": ec.slot_size, **ec.stats.as_dict()}

    # --- the forward pass ------------------------------------------------------------------------

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        n_kv, dk, dv = self.cfg.cache_dims
        return KVCache(self.cfg.n_layer, n_kv, min(n_ctx or self.max_ctx, self.max_ctx), dk, dv, self.kv_type)

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

    def forward_batch(self, tokens, caches: list[KVCache]) -> np.ndarray:
        """One decode step for B sequences: tokens[i] at position caches[i].n_past of its own cache; returns logits
        (B, vocab). Every matrix runs once over the B rows (routed experts grouped by expert, so each chosen
        expert's weights are read once for all the sequences that chose it); RoPE and attention run per sequence,
        over its own cache. B == 1 is forward() itself."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(ids) != len(caches) or not len(ids):
            raise ValueError(f"{len(ids)} tokens for {len(caches)} caches")
        if len(ids) == 1:
            return self.forward(ids, caches[0])
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a KV cache appears twice in one batch")
        for c in caches:
            if c.n_past + 1 > c.n_ctx:
                raise ContextOverflow(f"{c.n_past + 1} tokens do not fit in the context of {c.n_ctx}",
                                      hint="raise --ctx-size or shorten the prompt")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError("token id out of range")
        return self._head(self._forward_chunk(ids, caches))

    def hidden_states(self, ids, cache: KVCache) -> np.ndarray:
        """The final-normed hidden states (T, n_embd) of token ids at positions cache.n_past... (what the head
        reads): the per-token vectors that embeddings pool."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if cache.n_past + len(ids) > cache.n_ctx:
            raise ContextOverflow(f"{cache.n_past + len(ids)} tokens do not fit in the context of {cache.n_ctx}")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError("token id out of range")
        outs = []
        for s in range(0, len(ids), PREFILL_CHUNK):
            h = self._forward_chunk(ids[s : s + PREFILL_CHUNK], cache)
            x = np.empty_like(h)
            ops.rmsnorm(h, self.weights.output_norm, self.cfg.norm_eps, x)
            outs.append(x)
        return np.concatenate(outs, axis=0)

    def _head(self, h: np.ndarray) -> np.ndarray:
        w = self.weights
        x = np.empty_like(h)
        ops.rmsnorm(h, w.output_norm, self.cfg.norm_eps, x)
        with (self.instrument or untimed)("matmul"):
            logits = w.output(Act(x))
        if self.cfg.logits_scaling != 1.0:
            logits /= np.float32(self.cfg.logits_scaling)  # Granite divides logits by logits_scaling
        return logits

    def _forward_chunk(self, ids: np.ndarray, cache: KVCache | list[KVCache]) -> np.ndarray:
        """Hidden states of ids: consecutive tokens of one sequence (cache), or one token of each of len(ids)
        sequences (a list of caches, forward_batch)."""
        cfg, w = self.cfg, self.weights
        T, E = len(ids), cfg.n_embd
        # segments (cache, first position, first row, rows): the rows of one sequence, which RoPE and attention
        # take together
        segs = [(cache, cache.n_past, 0, T)] if isinstance(cache, KVCache) else \
            [(c, c.n_past, i, 1) for i, c in enumerate(cache)]
        self.stats.pos0 = segs[0][1]
        x = w.tok_embd.rows(ids)  # (T, n_embd) residual stream
        if cfg.embedding_multiplier != 1.0:
            x *= np.float32(cfg.embedding_multiplier)
        rm = np.float32(cfg.residual_multiplier)
        hbuf = np.empty((T, E), np.float32)
        for li, L in enumerate(w.layers):
            ops.rmsnorm(x, L.attn_norm, cfg.norm_eps, hbuf)
            if cfg.kv_lora_rank:
                o = self._mla(L.attn, hbuf, segs, li)
            else:
                o = self._gqa(L.attn, hbuf, segs, li)
            if rm != 1.0:
                o *= rm
            ops.add_inplace(x, o)
            ops.rmsnorm(x, L.ffn_norm, cfg.norm_eps, hbuf)
            if L.ffn.experts is not None:
                f = moe_ffn(L.ffn, hbuf, self.router, w, self.stats, li, self.expert_cache, self._next_moe.get(li),
                            self.instrument or untimed)
            else:
                f = self._dense(L.ffn, hbuf)
            if rm != 1.0:
                f *= rm
            ops.add_inplace(x, f)
        for c, pos0, _, n in segs:
            c.n_past = pos0 + n
        return x

    def _dense(self, ff: FFN, h: np.ndarray) -> np.ndarray:
        with (self.instrument or untimed)("matmul"):
            a = Act(h)
            g = ff.gate(a)
            ops.silu_mul(g, ff.up(a), g)
            return ff.down(Act(g))

    def _rope(self, x: np.ndarray, pos0: int) -> None:
        ops.rope(x, pos0, self.cos, self.sin, self.cfg.n_rot, self.cfg.rope_interleaved)

    def _gqa(self, at: Attention, h: np.ndarray, segs: list, li: int) -> np.ndarray:
        cfg = self.cfg
        T, H, KV, D = h.shape[0], cfg.n_head, cfg.n_head_kv, cfg.head_dim
        a = Act(h)
        with (self.instrument or untimed)("matmul"):
            q, k, v = at.wq(a), at.wk(a), at.wv(a)
        if cfg.qk_norm == "full":  # OLMoE: RMSNorm over all heads' q (and k) before the split
            ops.rmsnorm(q, at.q_norm, cfg.norm_eps, q)
            ops.rmsnorm(k, at.k_norm, cfg.norm_eps, k)
        elif cfg.qk_norm == "head":  # Qwen3: RMSNorm over each head's head_dim
            q2, k2 = q.reshape(T * H, D), k.reshape(T * KV, D)
            ops.rmsnorm(q2, at.q_norm, cfg.norm_eps, q2)
            ops.rmsnorm(k2, at.k_norm, cfg.norm_eps, k2)
        q, k, v = q.reshape(T, H, D), k.reshape(T, KV, D), v.reshape(T, KV, D)
        att = np.empty((T, H, cfg.cache_dims[2]), np.float32)
        for cache, pos0, r0, n in segs:
            self._rope(q[r0 : r0 + n], pos0)
            self._rope(k[r0 : r0 + n], pos0)
            self._attend(q[r0 : r0 + n], k[r0 : r0 + n], v[r0 : r0 + n], cache, li, pos0, att[r0 : r0 + n])
        with (self.instrument or untimed)("matmul"):
            return at.wo(Act(att.reshape(T, -1)))

    def _mla(self, at: Attention, h: np.ndarray, segs: list, li: int) -> np.ndarray:
        """DeepSeek-V3 multi-head latent attention (DeepseekV3Attention): queries through an optional low-rank
        bottleneck; the cache holds each token's normed latent and its one shared RoPE key, and attention reads
        it directly, kv_b folded into the queries and the output (ops.mla_query, ops.mla_output)."""
        cfg = self.cfg
        T, H = h.shape[0], cfg.n_head
        nope, rope, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        a = Act(h)
        phase = self.instrument or untimed
        with phase("matmul"):
            if at.wq_a is not None:
                qa = at.wq_a(a)
                ops.rmsnorm(qa, at.q_a_norm, cfg.norm_eps, qa)
                q = at.wq_b(Act(qa))
            else:
                q = at.wq(a)
            kva = at.wkv_a(a)  # (T, rank + rope): the latent, then the shared RoPE key
        q = q.reshape(T, H, nope + rope)
        ckv = np.ascontiguousarray(kva[:, :rank])
        ops.rmsnorm(ckv, at.kv_a_norm, cfg.norm_eps, ckv)
        kva[:, :rank] = ckv
        kpe = np.ascontiguousarray(kva[:, rank:]).reshape(T, 1, rope)
        qpe = np.ascontiguousarray(q[:, :, nope:])
        for _, pos0, r0, n in segs:
            self._rope(qpe[r0 : r0 + n], pos0)
            self._rope(kpe[r0 : r0 + n], pos0)
        q[:, :, nope:] = qpe
        kva[:, rank:] = kpe.reshape(T, rope)
        with phase("attention"):
            ql = np.empty((T, H, rank + rope), np.float32)
            ops.mla_query(q, at.wk_b, ql)
            lat = np.empty((T, H, rank), np.float32)
            for cache, pos0, r0, n in segs:
                cache.k[li, 0, pos0 : pos0 + n] = kva[r0 : r0 + n]
                lat_c, _ = cache.layer(li)  # (1, n_ctx, rank + rope)
                ops.attention(ql[r0 : r0 + n], lat_c, lat_c, pos0, self.attn_scale, self.cfg.sliding_window,
                              lat[r0 : r0 + n])
            o = np.empty((T, H * cfg.v_head_dim), np.float32)
            ops.mla_output(lat, at.wv_b, o)
        with phase("matmul"):
            return at.wo(Act(o))

    def _attend(self, q, k, v, cache: KVCache, li: int, pos0: int, att: np.ndarray) -> None:
        """One sequence's T rows: their keys and values into its cache, then att (T, H, dv) over it."""
        T = q.shape[0]
        cache.k[li, :, pos0 : pos0 + T] = k.transpose(1, 0, 2)
        cache.v[li, :, pos0 : pos0 + T] = v.transpose(1, 0, 2)
        kc, vc = cache.layer(li)  # (n_kv, n_ctx, dk), (n_kv, n_ctx, dv)
        with (self.instrument or untimed)("attention"):
            ops.attention(q, kc, vc, pos0, self.attn_scale, self.cfg.sliding_window, att)
