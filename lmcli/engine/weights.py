"""Weights: views into the container's mmap, each matrix with the kernel that multiplies by it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant import kernels
from quant.container import Container
from quant.errors import ContainerError

from ..errors import ModelFileError
from .config import ModelConfig


class Act:
    """An activation batch x (T, n) float32 and, on first use, its int16 per-32 quantization."""

    __slots__ = ("x", "_q")

    def __init__(self, x: np.ndarray):
        self.x = x
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


class Linear:
    """One (n_out, n_in) matrix in the interleaved layout; `y = lin(act, out)` computes act.x @ W.T."""

    def __init__(self, name: str, fmt_name: str, codes: np.ndarray, scales: np.ndarray, n_out: int, n_in: int):
        self.name, self.fmt, self.codes, self.scales = name, fmt_name, codes, scales
        self.n_out, self.n_in = n_out, n_in
        self.nbytes = codes.nbytes + scales.nbytes

    def __call__(self, act: Act, out: np.ndarray | None = None) -> np.ndarray:
        T = act.x.shape[0]
        if out is None:
            out = np.empty((T, self.n_out), np.float32)
        if self.fmt in ("q4_0", "q4_1"):
            kernels.matmul_q4(self.codes, self.scales, *act.quantized(), out)
        elif self.fmt == "q8_0":
            kernels.matmul_q8(self.codes, self.scales, *act.quantized(), out)
        elif self.fmt == "f16":
            kernels.matmul_f16(self.codes, act.x, out)
        else:
            kernels.matmul_f32(self.codes, act.x, out)
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows (embedding lookup) -> (len(ids), n_in) float32."""
        out = np.empty((len(ids), self.n_in), np.float32)
        kind = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}[self.fmt]
        codes = self.codes.reshape(-1).view(np.uint8)
        kernels.embed_rows(codes, self.scales, kind, np.ascontiguousarray(ids, dtype=np.int64), out)
        return out


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (n_embd,)
    wq: Linear  # (n_head * head_dim, n_embd)
    wk: Linear  # (n_head_kv * head_dim, n_embd)
    wv: Linear  # (n_head_kv * head_dim, n_embd)
    wo: Linear  # (n_embd, n_head * head_dim)
    ffn_norm: np.ndarray  # (n_embd,)
    w_gate: Linear  # (n_ff, n_embd)
    w_up: Linear  # (n_ff, n_embd)
    w_down: Linear  # (n_embd, n_ff)


@dataclass
class Weights:
    tok_embd: Linear  # (vocab, n_embd)
    layers: list[LayerWeights]
    output_norm: np.ndarray  # (n_embd,)
    output: Linear  # (vocab, n_embd); tok_embd itself when tied

    @property
    def nbytes(self) -> int:
        lins = [self.output] + [l for L in self.layers for l in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)]
        return sum(l.nbytes for l in lins)


def load_weights(c: Container, cfg: ModelConfig) -> Weights:
    """Map every tensor the config needs, checking each shape against the config."""

    def lin(name: str, n_out: int, n_in: int) -> Linear:
        t = c.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{c.path}: tensor {name} is missing")
        if t.shape != (n_out, n_in):
            raise ModelFileError(f"{c.path}: tensor {name} has shape {t.shape}, config needs {(n_out, n_in)}")
        codes, scales = c.matrix(name)
        return Linear(name, t.fmt.name, codes, scales, n_out, n_in)

    def vec(name: str, n: int) -> np.ndarray:
        t = c.tensors.get(name)
        if t is None or t.shape != (n,):
            raise ModelFileError(f"{c.path}: tensor {name} is missing or has the wrong shape")
        return c.vector(name)

    E, F, D = cfg.n_embd, cfg.n_ff, cfg.head_dim
    try:
        layers = []
        for i in range(cfg.n_layer):
            p = f"blk.{i}."
            layers.append(LayerWeights(
                attn_norm=vec(p + "attn_norm.weight", E),
                wq=lin(p + "attn_q.weight", cfg.n_head * D, E),
                wk=lin(p + "attn_k.weight", cfg.n_head_kv * D, E),
                wv=lin(p + "attn_v.weight", cfg.n_head_kv * D, E),
                wo=lin(p + "attn_output.weight", E, cfg.n_head * D),
                ffn_norm=vec(p + "ffn_norm.weight", E),
                w_gate=lin(p + "ffn_gate.weight", F, E),
                w_up=lin(p + "ffn_up.weight", F, E),
                w_down=lin(p + "ffn_down.weight", E, F),
            ))
        tok = lin("token_embd.weight", cfg.vocab_size, E)
        out = tok if cfg.tied_embeddings else lin("output.weight", cfg.vocab_size, E)
        return Weights(tok, layers, vec("output_norm.weight", E), out)
    except ContainerError as e:
        raise ModelFileError(str(e)) from None
