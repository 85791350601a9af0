"""Importance-weighted rounding (llama.cpp's imatrix idea): each weight's rounding error counts in proportion to how
large the activations it multiplies are on real text.

An importance matrix holds, per quantized matrix, the mean over tokens of each input column's squared activation
(per expert for routed experts); `lmcli imatrix` computes it with lmcli's own forward pass. With it, Q4_0, Q4_1, Q5_0
and Q5_1 blocks are chosen as llama.cpp's quantize_row_q4_0_impl ... q5_1_impl choose them (make_qx_quants and
make_qkx3_quants: a search over scales minimizing the weighted squared error, weight = importance *
sqrt(row variance + x^2)), and Q4_K, Q5_K, Q6_K blocks as its quantize_row_q4_K_impl ... q6_K_impl (quant.kquants),
ported operation for operation in float32 so the blocks equal llama.cpp's (tests/test_imatrix.py and
tests/test_kquants.py call ggml_quantize_chunk for the reference).

Files are .npz: "<tensor name>" -> float32 (n_in,) or (n_expert, n_in) mean squared activations, and
"<tensor name>.counts" -> int64 () or (n_expert,) tokens seen. Read with allow_pickle=False.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from numba import njit, prange

from .errors import ConvertError
from .formats import GROUP, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Format
from .kquants import encode_k, encode_q6_k, make_qkx_quants, make_qx_quants

F32 = np.float32


@njit(cache=True, parallel=True)
def _weights(x, qw, weight):
    """weight[r, j] = qw[j] * sqrt(sigma2_r + x[r, j]^2), sigma2_r the row's mean square (summed in order)."""
    R, n = x.shape
    for r in prange(R):
        s = np.float32(0.0)
        for j in range(n):
            s += x[r, j] * x[r, j]
        sigma2 = s / np.float32(n)
        for j in range(n):
            weight[r, j] = qw[j] * np.float32(np.sqrt(sigma2 + x[r, j] * x[r, j]))


@njit(cache=True, parallel=True)
def _sym(x, qw, nmax, d, L):
    """quantize_row_q4_0_impl (nmax 8) and q5_0_impl (16): per block make_qx_quants(32, nmax, rmse_type 1,
    weights)."""
    R, n = x.shape
    weight = np.empty((R, n), np.float32)
    _weights(x, qw, weight)
    for r in prange(R):
        for b in range(n // 32):
            o = b * 32
            d[r, b] = make_qx_quants(x[r, o : o + 32], nmax, L[r, b], weight[r, o : o + 32], True)


@njit(cache=True, parallel=True)
def _asym(x, qw, nmax, d, m, L):
    """quantize_row_q4_1_impl (nmax 15) and q5_1_impl (31): per block make_qkx3_quants(32, nmax, weights, rmin -0.9,
    rdelta 0.05, nstep 36); m is the stored offset (the block minimum, 0 or below)."""
    R, n = x.shape
    weight = np.empty((R, n), np.float32)
    _weights(x, qw, weight)
    for r in prange(R):
        laux = np.empty(32, np.uint8)
        for b in range(n // 32):
            o = b * 32
            d[r, b], the_min = make_qkx_quants(x[r, o : o + 32], weight[r, o : o + 32], nmax, L[r, b], laux,
                                               np.float32(-0.9), np.float32(0.05), 36, True)
            m[r, b] = -the_min


def weighted(fmt: Format) -> bool:
    """Whether fmt's rounding takes an importance matrix (llama.cpp's Q8_0 and float types ignore one too)."""
    return fmt in (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)


def encode(x: np.ndarray, fmt: Format, importance: np.ndarray) -> np.ndarray:
    """Rows x (..., n) -> GGUF block bytes (..., n // block_size * block_bytes), rounded with importance (n,)."""
    from .quantize import pack_q4, pack_q5

    x = np.ascontiguousarray(x, dtype=F32)
    shape = x.shape
    n = shape[-1]
    if not weighted(fmt):
        raise ValueError(f"{fmt.name} takes no importance matrix")
    if n % fmt.block_size:
        raise ValueError(f"row length {n} is not a multiple of {fmt.block_size}")
    qw = np.ascontiguousarray(importance, dtype=F32).reshape(-1)
    if qw.shape != (n,):
        raise ValueError(f"importance has {qw.size} values for rows of {n}")
    rows = x.reshape(-1, n)
    if fmt.block_size == 256:
        out = encode_q6_k(rows, qw) if fmt is Q6_K else encode_k(rows, 15 if fmt is Q4_K else 31, qw)
        return out.reshape(*shape[:-1], -1)
    R, nb = rows.shape[0], n // GROUP
    d = np.empty((R, nb), F32)
    L = np.empty((R, nb, GROUP), np.uint8)
    halves = lambda v: v.astype(np.float16).reshape(R * nb, 1).view(np.uint8)  # noqa: E731
    if fmt in (Q4_0, Q5_0):
        _sym(rows, qw, 8 if fmt is Q4_0 else 16, d, L)
        head = [halves(d)]
    else:
        m = np.empty((R, nb), F32)
        _asym(rows, qw, 15 if fmt is Q4_1 else 31, d, m, L)
        head = [halves(d), halves(m)]
    codes = pack_q4(L.reshape(-1, GROUP)) if fmt.name.startswith("q4") else pack_q5(L.reshape(-1, GROUP))
    return np.concatenate([*head, codes], axis=1).reshape(*shape[:-1], nb * fmt.block_bytes)


# --- collecting and storing ------------------------------------------------------------------------------


class Collector:
    """Sums of squared input activations per quantized matrix, fed by the engine's forward pass
    (lmcli.engine.weights.OBSERVER): dense(name, x) for a matrix's input rows, experts(...) per routed expert."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def _add(self, name: str, x: np.ndarray, n_expert: int = 0, e: int | None = None) -> None:
        sq = np.square(x, dtype=np.float64).sum(axis=0)
        if name not in self.sums:
            shape = (n_expert, x.shape[1]) if e is not None else (x.shape[1],)
            self.sums[name] = np.zeros(shape, np.float64)
            self.counts[name] = np.zeros(shape[:1] if e is not None else (), np.int64)
        if e is None:
            self.sums[name] += sq
            self.counts[name] += x.shape[0]
        else:
            self.sums[name][e] += sq
            self.counts[name][e] += x.shape[0]

    def dense(self, name: str, x: np.ndarray) -> None:
        self._add(name, x)

    def experts(self, layer: int, n_expert: int, sel, tok_ptr, tok_idx, h: np.ndarray, hb: np.ndarray) -> None:
        """sel: the experts chosen in this batch; assignments tok_ptr[j]..tok_ptr[j+1] are expert sel[j]'s, over
        tokens tok_idx[...] of h (gate/up input) and rows of hb (down input)."""
        p = f"blk.{layer}."
        for j, e in enumerate(sel):
            a0, a1 = int(tok_ptr[j]), int(tok_ptr[j + 1])
            if a1 == a0:
                continue
            rows = h[tok_idx[a0:a1]]
            self._add(p + "ffn_gate_exps.weight", rows, n_expert, int(e))
            self._add(p + "ffn_up_exps.weight", rows, n_expert, int(e))
            self._add(p + "ffn_down_exps.weight", hb[a0:a1], n_expert, int(e))

    def means(self) -> dict[str, np.ndarray]:
        """name -> float32 mean squared activation per input column (an expert no token chose: ones)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name]
            if s.ndim == 1:
                out[name] = (s / max(int(c), 1)).astype(F32)
            else:
                mean = s / np.maximum(c, 1)[:, None]
                mean[c == 0] = 1.0
                out[name] = mean.astype(F32)
        return out

    def save(self, path: str | os.PathLike) -> int:
        """Write the .npz atomically (temp file beside it, fsync, rename); returns the number of matrices."""
        means = self.means()
        arrays = {**means, **{f"{k}.counts": self.counts[k] for k in means}}
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(means)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An importance matrix file -> name -> float32 importances, every value checked finite and >= 0."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [k for k in z.files if not k.endswith(".counts")]
            out = {}
            for k in names:
                a = z[k]
                if a.dtype.kind != "f" or a.ndim not in (1, 2) or a.size == 0:
                    raise ConvertError(f"{path}: {k} is not a 1-D or 2-D float array")
                a = a.astype(F32)
                if not np.isfinite(a).all() or (a < 0).any():
                    raise ConvertError(f"{path}: {k} holds negative or non-finite importances")
                out[k] = a
    except ConvertError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise ConvertError(f"{path}: not an importance matrix file (.npz): {e}") from None
    if not out:
        raise ConvertError(f"{path}: holds no importances")
    return out


def for_matrix(imatrix: dict[str, np.ndarray] | None, name: str, n_in: int, expert: int | None = None,
               n_expert: int = 0) -> np.ndarray | None:
    """The importances of one matrix (or one expert's), checked against its shape; None where the file has
    none for it."""
    if imatrix is None or name not in imatrix:
        return None
    a = imatrix[name]
    want = (n_in,) if expert is None else (n_expert, n_in)
    if a.shape != want:
        raise ConvertError(f"the importance matrix has {list(a.shape)} for {name}; the model needs {list(want)} "
                           "(was it computed on another model?)")
    return a if expert is None else a[expert]
