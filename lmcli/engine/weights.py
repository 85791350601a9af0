"""Weights: views into the container's mmap, each matrix with the kernel that multiplies by it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quant import kernels, repack
from quant.container import Container, huge_buffer
from quant.formats import ALIGN, TILE, Format, align_up, matrix_parts
from quant.schema import ModelConfig, expected_tensors

from ..errors import ModelFileError, model_file_errors
from ..threads import SERIAL_BYTES, serially


class Act:
    """An activation batch x (T, n) float32 and, on first use, its int16 per-32 quantization."""

    __slots__ = ("x", "_q")

    def __init__(self, x: np.ndarray):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self._q = None

    def quantized(self):
        if self._q is None:
            T, n = self.x.shape
            xq = np.empty((T, n), np.int16)
            xd = np.empty((T, n // 32), np.float32)
            xs = np.empty((T, n // 32), np.int32)
            kernels.quantize_act(self.x, xq, xd, xs)
            self._q = (xq, xd, xs)
        return self._q


# Set while `lmcli imatrix` runs: a quant.imatrix.Collector that sees every matrix's input rows (dense(name, x))
# and every routed expert's (experts(...), from moe_ffn).
OBSERVER = None


class Linear:
    """One (n_out, n_in) matrix in the interleaved layout; `y = lin(act)` computes act.x @ W.T (+ bias)."""

    def __init__(self, name: str, fmt: Format, codes: np.ndarray, scales: np.ndarray, n_out: int, n_in: int,
                 bias: np.ndarray | None = None, repack_tiles: bool = True):
        self.name, self.fmt, self.codes, self.scales = name, fmt, codes, scales
        self.n_out, self.n_in = n_out, n_in
        self.bias = bias  # (n_out,) or None
        self.nbytes = codes.nbytes + scales.nbytes
        # Q5_0/Q5_1/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS (GGUF's rows in the file): repacked once into tiles in RAM,
        # (codes, scales) for kernels.matmul_tiles (quant.repack), unless the matrix is never multiplied
        # (repack_tiles False: an untied token embedding); the file's rows still serve rows() (embedding lookups)
        self.tiles = None
        if repack_tiles and repack.repackable(fmt):
            self.tiles = repack.repack_matrix(fmt, codes, n_out, n_in)
            self.nbytes = self.tiles[0].nbytes + self.tiles[1].nbytes
        # a router (8-64 float rows, padded to a 64-row tile in the file): a compact float32 copy, so a token reads
        # its rows (64 KiB, L2-resident) instead of one strided 512 KiB tile on one thread (20 us per layer)
        self.rows_f32 = None
        if not fmt.quantized and n_out < TILE:
            self.rows_f32 = np.ascontiguousarray(fmt.codec.decode(codes[0, :, :n_out], n_out).T, dtype=np.float32)

    def __call__(self, act: Act, out: np.ndarray | None = None) -> np.ndarray:
        if OBSERVER is not None:
            OBSERVER.dense(self.name, act.x)
        T = act.x.shape[0]
        if out is None:
            out = np.empty((T, self.n_out), np.float32)
        if T == 1 and self.rows_f32 is None and self.nbytes < SERIAL_BYTES:  # not worth a parallel launch
            serially(self._matmul, act, out)
        else:
            self._matmul(act, out)
        if self.bias is not None:
            out += self.bias
        return out

    def _matmul(self, act: Act, out: np.ndarray) -> None:
        if self.rows_f32 is not None:
            kernels.matmul_rows(self.rows_f32, act.x, out)
        elif self.fmt.int_act:
            self.fmt.matmul(self.codes, self.scales, *act.quantized(), out)
        elif self.tiles is not None:
            kernels.matmul_tiles(*self.tiles, self.fmt.kind, *act.quantized(), out)
        elif self.fmt.gguf_rows:
            self.fmt.matmul(self.codes, self.fmt.kind, act.x, out)
        else:
            self.fmt.matmul(self.codes, act.x, out)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows (embedding lookup) -> (len(ids), n_in) float32."""
        out = np.empty((len(ids), self.n_in), np.float32)
        codes = self.codes.reshape(-1).view(np.uint8)
        kernels.embed_rows(codes, self.scales, self.fmt.kind, np.ascontiguousarray(ids, dtype=np.int64), out)
        return out


@dataclass
class Experts:
    """A layer's routed experts: gate/up/down of every expert inside one bundle per expert (byte offsets)."""

    fmts: dict  # "gate"/"up"/"down" -> Format (GGUF mixes such as Q4_K_M store ffn_down in a wider type)
    n_expert: int
    n_ff: int
    n_embd: int
    offsets: dict  # "gate"/"up"/"down" -> (codes offsets (n_expert,), scales offsets (n_expert,)) int64
    bundle_nbytes: int  # bytes of one expert's gate + up + down
    stride: int
    base: int  # byte offset of expert 0's bundle
    kinds: dict = None  # "gate"/"up"/"down" -> the expert kernels' kind: Format.kind, TILED + it once repacked
    tiles: np.ndarray | None = field(repr=False, default=None)  # repacked bundles (then `offsets` index these bytes)

    def __post_init__(self):
        if self.kinds is None:
            self.kinds = {k: f.kind for k, f in self.fmts.items()}

    @property
    def bufs(self) -> tuple:
        """(uint8, uint16, float32) views of the repacked bundles for the expert kernels (tiles set)."""
        t = self.tiles
        return t, t[: len(t) // 2 * 2].view(np.uint16), t[: len(t) // 4 * 4].view(np.float32)


def repacked_layout(ex: Experts) -> tuple[dict, int] | None:
    """Where each matrix of an expert's repacked bundle goes: ({"gate"/"up"/"down": (codes offset, scales offset,
    repacked)}, bundle bytes, bundle stride), or None when no matrix of the layer is repackable (quant.repack). Matrices that are
    not repackable are copied as they are. Parts start on 64 bytes, bundles on pages."""
    if not any(repack.repackable(f) for f in ex.fmts.values()):
        return None
    shapes = {"gate": (ex.n_ff, ex.n_embd), "up": (ex.n_ff, ex.n_embd), "down": (ex.n_embd, ex.n_ff)}
    where, pos = {}, 0
    for k in ("gate", "up", "down"):
        fmt = ex.fmts[k]
        tiled = repack.repackable(fmt)
        cb, sb = repack.tiled_parts(fmt, *shapes[k]) if tiled else matrix_parts(fmt, *shapes[k])
        where[k] = (pos, align_up(pos + cb, 64), tiled)
        pos = align_up(where[k][1] + sb, 64)
    return where, pos, align_up(pos, ALIGN)


def repacked_nbytes(ex: Experts) -> int:
    """Bytes of a layer's experts once repacked (repack_experts); the file's bytes when nothing is repacked."""
    lay = repacked_layout(ex)
    return ex.n_expert * (lay[2] if lay else ex.stride)


def repack_experts(c: Container, ex: Experts) -> None:
    """Repack a layer's experts (the types quant.repack takes) into tiles in a buffer of their own (huge pages), as dense matrices
    are (Linear), and give the resident file's copy of them back: the peak is the file plus one layer's bundles.
    For files read into RAM only: over a mapping this would read every expert in and hold a second copy beside
    the page cache (models larger than RAM keep GGUF's rows, read by the rows kernels)."""
    lay = repacked_layout(ex)
    if lay is None or not c.resident:
        return
    where, used, stride = lay
    shapes = {"gate": (ex.n_ff, ex.n_embd), "up": (ex.n_ff, ex.n_embd), "down": (ex.n_embd, ex.n_ff)}
    tiles = huge_buffer(ex.n_expert * stride)[1]  # the array keeps its mapping alive
    src = c._buf
    offsets, kinds = {}, {}
    for k, (co, so, tiled) in where.items():
        fmt, (n_out, n_in) = ex.fmts[k], shapes[k]
        cb, sb = matrix_parts(fmt, n_out, n_in)
        for e in range(ex.n_expert):
            d, s0 = e * stride + co, int(ex.offsets[k][0][e])
            if tiled:
                repack.repack_into(fmt, src, s0, n_out, n_in, tiles, d)
            else:
                tiles[d : d + cb] = src[s0 : s0 + cb]
                tiles[e * stride + so : e * stride + so + sb] = src[s0 + cb : s0 + cb + sb]
        first = np.arange(ex.n_expert, dtype=np.int64) * stride
        offsets[k] = (first + co, first + so)
        kinds[k] = fmt.kind + repack.TILED if tiled else fmt.kind
    c.release(ex.base, (ex.n_expert - 1) * ex.stride + ex.bundle_nbytes)
    tiles.flags.writeable = False
    ex.offsets, ex.kinds, ex.tiles, ex.stride, ex.bundle_nbytes = offsets, kinds, tiles, stride, used


@dataclass
class Attention:
    wq: Linear | None = None  # (n_head * head_dim, n_embd); MLA without q-LoRA: (n_head * qk_dim, n_embd)
    wk: Linear | None = None  # (n_head_kv * head_dim, n_embd)
    wv: Linear | None = None  # (n_head_kv * head_dim, n_embd)
    wo: Linear | None = None  # (n_embd, n_head * v_dim)
    q_norm: np.ndarray | None = None  # (head_dim,) per-head or (n_head * head_dim,) full
    k_norm: np.ndarray | None = None
    # MLA (DeepSeek-V3)
    wq_a: Linear | None = None  # (q_lora_rank, n_embd)
    q_a_norm: np.ndarray | None = None  # (q_lora_rank,)
    wq_b: Linear | None = None  # (n_head * qk_dim, q_lora_rank)
    wkv_a: Linear | None = None  # (kv_lora_rank + qk_rope_head_dim, n_embd)
    kv_a_norm: np.ndarray | None = None  # (kv_lora_rank,)
    wkv_b: Linear | None = None  # (n_head * (qk_nope_head_dim + v_head_dim), kv_lora_rank)
    # kv_b split per head for attention over the latent cache (ops.mla_query, ops.mla_output), float16 bits
    wk_b: np.ndarray | None = None  # (n_head, qk_nope_head_dim, kv_lora_rank) uint16
    wv_b: np.ndarray | None = None  # (n_head, v_head_dim, kv_lora_rank) uint16


@dataclass
class FFN:
    gate: Linear | None = None  # dense (n_ff, n_embd)
    up: Linear | None = None
    down: Linear | None = None  # (n_embd, n_ff)
    router: Linear | None = None  # (n_expert, n_embd) f32
    router_bias: np.ndarray | None = None  # (n_expert,) e_score_correction_bias
    experts: Experts | None = None
    sh_gate: Linear | None = None  # shared experts, fused: (n_ff_shexp, n_embd)
    sh_up: Linear | None = None
    sh_down: Linear | None = None
    sh_gate_inp: np.ndarray | None = None  # (n_embd,) Qwen2-MoE sigmoid gate of the shared expert


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (n_embd,)
    attn: Attention
    ffn_norm: np.ndarray  # (n_embd,)
    ffn: FFN


@dataclass
class Weights:
    tok_embd: Linear  # (vocab, n_embd)
    layers: list[LayerWeights]
    output_norm: np.ndarray  # (n_embd,)
    output: Linear  # (vocab, n_embd); tok_embd itself when tied
    buf8: np.ndarray = field(repr=False, default=None)  # the whole container, for the expert kernels
    buf16: np.ndarray = field(repr=False, default=None)
    buf32: np.ndarray = field(repr=False, default=None)

    @property
    def nbytes_dense(self) -> int:
        """Bytes of every matrix a token reads besides routed experts (attention, dense/shared FFN, head)."""
        lins, n = [self.output], 0
        for L in self.layers:
            for obj in (L.attn, L.ffn):
                lins += [v for v in vars(obj).values() if isinstance(v, Linear) and v is not L.attn.wkv_b]
            if L.attn.wk_b is not None:  # MLA reads kv_b's float16 per-head halves, not the file's matrix
                n += L.attn.wk_b.nbytes + L.attn.wv_b.nbytes
        return n + sum(lin.nbytes for lin in lins)


class _Loader:
    """Maps the container's tensors by name; every shape is the schema's (quant.schema.expected_tensors)."""

    def __init__(self, c: Container, cfg: ModelConfig):
        self.c = c
        self.want = dict(expected_tensors(cfg))
        self.used: set[str] = set()

    def _info(self, name: str):
        shape = self.want[name]  # a KeyError here is an engine bug: it asked for a tensor the schema lacks
        t = self.c.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.c.path}: tensor {name} is missing")
        if t.shape != shape:
            raise ModelFileError(f"{self.c.path}: tensor {name} has shape {t.shape}, config needs {shape}")
        self.used.add(name)
        return t

    def lin(self, name: str, bias: str | None = None, repack_tiles: bool = True) -> Linear:
        t = self._info(name)
        n_out, n_in = t.shape
        codes, scales = self.c.matrix(name)
        b = self.vec(bias) if bias is not None else None
        return Linear(name, t.fmt, codes, scales, n_out, n_in, b, repack_tiles)

    def vec(self, name: str) -> np.ndarray:
        self._info(name)
        return self.c.vector(name)

    def experts(self, prefix: str) -> Experts:
        infos = {k: self._info(f"{prefix}ffn_{k}_exps.weight") for k in ("gate", "up", "down")}
        E, F, D = infos["gate"].shape
        strides = {t.stride for t in infos.values()}
        if len(strides) != 1:
            raise ModelFileError(f"{self.c.path}: {prefix} expert tensors differ in bundle stride")
        stride = strides.pop()
        offsets = {}
        for k, t in infos.items():
            n_out, n_in = t.shape[1:]
            cb, _ = matrix_parts(t.fmt, n_out, n_in)
            co = t.offset + np.arange(E, dtype=np.int64) * stride
            if not t.fmt.quantized and co[0] % 4:  # the float expert kernels read 16/32-bit views
                raise ModelFileError(f"{self.c.path}: {k} experts are misaligned")
            offsets[k] = (co, co + cb)
        base = min(t.offset for t in infos.values())
        end = max(t.offset + t.nbytes for t in infos.values())
        ex = Experts({k: t.fmt for k, t in infos.items()}, E, F, D, offsets, end - base, stride, base)
        repack_experts(self.c, ex)
        return ex


def _split_kv_b(lin: Linear, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """kv_b's per-head key and value halves, dequantized to float16 bits: (n_head, nope, rank), (n_head, dv, rank).

    Each head's rows are its nope key rows then its dv value rows (transformers' kv_b_proj, viewed as
    (n_head, nope + dv, rank)). float16 holds an F16 matrix exactly and Q8_0/Q4 codes times their fp16 scale to
    within 2^-11; it costs 2 bytes per weight beside the file's copy, which the latent cache repays many times."""
    H, nope, dv = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim
    w = lin.rows(np.arange(lin.n_out, dtype=np.int64)).reshape(H, nope + dv, lin.n_in).astype(np.float16)
    return np.ascontiguousarray(w[:, :nope]).view(np.uint16), np.ascontiguousarray(w[:, nope:]).view(np.uint16)


def _repacked_linears(w: Weights) -> list[Linear]:
    """The matrices with tiles whose file rows nothing reads after load: all but the token embedding (rows()),
    MLA's kv_b included (split at load)."""
    lins = {id(w.output): w.output}
    for L in w.layers:
        for obj in (L.attn, L.ffn):
            lins.update((id(v), v) for v in vars(obj).values() if isinstance(v, Linear))
    lins.pop(id(w.tok_embd), None)
    return [v for v in lins.values() if v.tiles is not None]


def load_weights(c: Container, cfg: ModelConfig) -> Weights:
    """Map every tensor the schema lists for this config, each shape checked, and none left over on either side."""
    L = _Loader(c, cfg)
    c.advise("random")  # before any page is touched (a router's compact copy is made here): no readahead into experts
    with model_file_errors():
        layers = []
        for i in range(cfg.n_layer):
            p = f"blk.{i}."
            at = Attention()
            if cfg.kv_lora_rank:
                if cfg.q_lora_rank:
                    at.wq_a = L.lin(p + "attn_q_a.weight")
                    at.q_a_norm = L.vec(p + "attn_q_a_norm.weight")
                    at.wq_b = L.lin(p + "attn_q_b.weight")
                else:
                    at.wq = L.lin(p + "attn_q.weight")
                at.wkv_a = L.lin(p + "attn_kv_a_mqa.weight")
                at.kv_a_norm = L.vec(p + "attn_kv_a_norm.weight")
                at.wkv_b = L.lin(p + "attn_kv_b.weight")
                at.wk_b, at.wv_b = _split_kv_b(at.wkv_b, cfg)
            else:
                bias = (lambda n: p + f"attn_{n}.bias") if cfg.attn_bias else (lambda n: None)
                at.wq = L.lin(p + "attn_q.weight", bias("q"))
                at.wk = L.lin(p + "attn_k.weight", bias("k"))
                at.wv = L.lin(p + "attn_v.weight", bias("v"))
                if cfg.qk_norm != "none":
                    at.q_norm = L.vec(p + "attn_q_norm.weight")
                    at.k_norm = L.vec(p + "attn_k_norm.weight")
            at.wo = L.lin(p + "attn_output.weight")
            ff = FFN()
            if cfg.layer_is_moe(i):
                ff.router = L.lin(p + "ffn_gate_inp.weight")
                if cfg.router_bias:
                    ff.router_bias = L.vec(p + "exp_probs_b.bias")
                ff.experts = L.experts(p)
                if cfg.n_expert_shared:
                    ff.sh_gate = L.lin(p + "ffn_gate_shexp.weight")
                    ff.sh_up = L.lin(p + "ffn_up_shexp.weight")
                    ff.sh_down = L.lin(p + "ffn_down_shexp.weight")
                    if cfg.shared_expert_gate:
                        ff.sh_gate_inp = L.vec(p + "ffn_gate_inp_shexp.weight")
            else:
                ff.gate = L.lin(p + "ffn_gate.weight")
                ff.up = L.lin(p + "ffn_up.weight")
                ff.down = L.lin(p + "ffn_down.weight")
            layers.append(LayerWeights(L.vec(p + "attn_norm.weight"), at, L.vec(p + "ffn_norm.weight"), ff))
        tok = L.lin("token_embd.weight", repack_tiles=cfg.tied_embeddings)  # untied, it only serves lookups
        out = tok if cfg.tied_embeddings else L.lin("output.weight")
        w = Weights(tok, layers, L.vec("output_norm.weight"), out)
    unmapped = set(L.want) - L.used
    assert not unmapped, f"the engine does not map {sorted(unmapped)[:4]}, which the schema lists"
    extra = sorted(set(c.tensors) - L.used)
    if extra:
        raise ModelFileError(f"{c.path}: tensors the config does not use: {', '.join(extra[:4])}",
                             hint="the container's config and tensors disagree")
    for lin in _repacked_linears(w):  # read through their tiles from now on (rows() only serves tok_embd)
        c.release(lin.codes.ctypes.data - c._buf.ctypes.data, lin.codes.nbytes)
    for t in c.tensors.values():
        if t.n_expert == 0:
            c.advise("willneed", t.offset, t.nbytes)  # dense weights stay resident: one large read each
    buf = c._buf
    w.buf8 = buf
    w.buf16 = buf[: len(buf) // 2 * 2].view(np.uint16)
    w.buf32 = buf[: len(buf) // 4 * 4].view(np.float32)
    return w
