"""Importance-weighted 4-bit rounding (llama.cpp's imatrix idea): each weight's rounding error counts in
proportion to how large the activations it multiplies are on real text.

An importance matrix holds, per quantized matrix, the mean over tokens of each input column's squared activation
(per expert for routed experts); `lmcli imatrix` computes it with lmcli's own forward pass. With it, Q4_0 and Q4_1
blocks are chosen as llama.cpp's quantize_row_q4_0_impl / quantize_row_q4_1_impl choose them (make_qx_quants and
make_qkx3_quants: a search over scales minimizing the weighted squared error, weight = importance *
sqrt(row variance + x^2)), ported operation for operation in float32 so the blocks equal llama.cpp's
(tests/test_imatrix.py calls ggml_quantize_chunk for the reference).

Files are .npz: "<tensor name>" -> float32 (n_in,) or (n_expert, n_in) mean squared activations, and
"<tensor name>.counts" -> int64 () or (n_expert,) tokens seen. Read with allow_pickle=False.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from numba import njit

from .errors import ConvertError
from .formats import GROUP, Q4_0, Q4_1, Format

F32 = np.float32
_MAGIC = np.float32(12582912.0)


@njit(cache=True, inline="always")
def _nearest_int(v):
    # ggml's nearest_int: round half to even through the float32 add of 1.5 * 2^23
    return np.int32(np.float32(v + np.float32(12582912.0)) - np.float32(12582912.0))


@njit(cache=True)
def _weights(x, qw, weight):
    """weight[r, j] = qw[j] * sqrt(sigma2_r + x[r, j]^2), sigma2_r the row's mean square (summed in order)."""
    R, n = x.shape
    for r in range(R):
        s = np.float32(0.0)
        for j in range(n):
            s += x[r, j] * x[r, j]
        sigma2 = s / np.float32(n)
        for j in range(n):
            weight[r, j] = qw[j] * np.float32(np.sqrt(sigma2 + x[r, j] * x[r, j]))


@njit(cache=True)
def _q4_0(x, qw, d, L):
    """quantize_row_q4_0_impl: per block make_qx_quants(32, nmax 8, rmse_type 1, weights)."""
    R, n = x.shape
    weight = np.empty((R, n), np.float32)
    _weights(x, qw, weight)
    nmax = 8
    for r in range(R):
        for b in range(n // 32):
            o = b * 32
            mx = np.float32(0.0)
            amax = np.float32(0.0)
            for i in range(32):
                ax = abs(x[r, o + i])
                if ax > amax:
                    amax = ax
                    mx = x[r, o + i]
            if amax < np.float32(1e-15):
                for i in range(32):
                    L[r, b, i] = 0
                d[r, b] = 0.0
                continue
            iscale = np.float32(-nmax) / mx
            sumlx = np.float32(0.0)
            suml2 = np.float32(0.0)
            for i in range(32):
                l = _nearest_int(iscale * x[r, o + i])
                l = max(-nmax, min(nmax - 1, l))
                L[r, b, i] = l + nmax
                w = weight[r, o + i]
                fl = np.float32(l)
                sumlx += w * x[r, o + i] * fl
                suml2 += w * fl * fl
            scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
            best = scale * sumlx
            for s in range(-9, 10):
                if s == 0:
                    continue
                iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(s)) / mx
                sumlx = np.float32(0.0)
                suml2 = np.float32(0.0)
                for i in range(32):
                    l = _nearest_int(iscale * x[r, o + i])
                    l = max(-nmax, min(nmax - 1, l))
                    w = weight[r, o + i]
                    fl = np.float32(l)
                    sumlx += w * x[r, o + i] * fl
                    suml2 += w * fl * fl
                if suml2 > 0 and sumlx * sumlx > best * suml2:
                    for i in range(32):
                        l = _nearest_int(iscale * x[r, o + i])
                        L[r, b, i] = nmax + max(-nmax, min(nmax - 1, l))
                    scale = sumlx / suml2
                    best = scale * sumlx
            d[r, b] = scale


@njit(cache=True)
def _q4_1(x, qw, d, m, L):
    """quantize_row_q4_1_impl: per block make_qkx3_quants(32, nmax 15, weights, rmin -0.9, rdelta 0.05, nstep 36);
    m is the stored offset (the block minimum, 0 or below)."""
    R, n = x.shape
    weight = np.empty((R, n), np.float32)
    _weights(x, qw, weight)
    nmax = 15
    laux = np.empty(32, np.int32)
    for r in range(R):
        for b in range(n // 32):
            o = b * 32
            mn = x[r, o]
            mx = x[r, o]
            sum_w = weight[r, o]
            sum_x = sum_w * x[r, o]
            for i in range(1, 32):
                v = x[r, o + i]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
                w = weight[r, o + i]
                sum_w += w
                sum_x += w * v
            if mn > 0:
                mn = np.float32(0.0)
            if mx <= mn:
                for i in range(32):
                    L[r, b, i] = 0
                d[r, b] = 0.0
                m[r, b] = mn
                continue
            iscale = np.float32(nmax) / (mx - mn)
            scale = np.float32(1.0) / iscale
            best_mad = np.float32(0.0)
            for i in range(32):
                l = _nearest_int(iscale * (x[r, o + i] - mn))
                l = max(0, min(nmax, l))
                L[r, b, i] = l
                diff = scale * np.float32(l) + mn - x[r, o + i]
                best_mad += weight[r, o + i] * (diff * diff)
            for s in range(37):
                iscale = (np.float32(-0.9) + np.float32(0.05) * np.float32(s) + np.float32(nmax)) / (mx - mn)
                sum_l = np.float32(0.0)
                sum_l2 = np.float32(0.0)
                sum_xl = np.float32(0.0)
                for i in range(32):
                    l = _nearest_int(iscale * (x[r, o + i] - mn))
                    l = max(0, min(nmax, l))
                    laux[i] = l
                    w = weight[r, o + i]
                    fl = np.float32(l)
                    sum_l += w * fl
                    sum_l2 += w * fl * fl
                    sum_xl += w * fl * x[r, o + i]
                D = sum_w * sum_l2 - sum_l * sum_l
                if D > 0:
                    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                    if this_min > 0:
                        this_min = np.float32(0.0)
                        this_scale = sum_xl / sum_l2
                    mad = np.float32(0.0)
                    for i in range(32):
                        diff = this_scale * np.float32(laux[i]) + this_min - x[r, o + i]
                        mad += weight[r, o + i] * (diff * diff)
                    if mad < best_mad:
                        for i in range(32):
                            L[r, b, i] = laux[i]
                        best_mad = mad
                        scale = this_scale
                        mn = this_min
            d[r, b] = scale
            m[r, b] = mn


def weighted(fmt: Format) -> bool:
    """Whether fmt's rounding takes an importance matrix (llama.cpp's Q8_0 and float types ignore one too)."""
    return fmt in (Q4_0, Q4_1)


def encode(x: np.ndarray, fmt: Format, importance: np.ndarray) -> np.ndarray:
    """Rows x (..., n) -> GGUF block bytes (..., n // 32 * block_bytes), rounded with importance (n,)."""
    x = np.ascontiguousarray(x, dtype=F32)
    shape = x.shape
    n = shape[-1]
    if n % GROUP:
        raise ValueError(f"row length {n} is not a multiple of {GROUP}")
    qw = np.ascontiguousarray(importance, dtype=F32).reshape(-1)
    if qw.shape != (n,):
        raise ValueError(f"importance has {qw.size} values for rows of {n}")
    rows = x.reshape(-1, n)
    R, nb = rows.shape[0], n // GROUP
    d = np.empty((R, nb), F32)
    L = np.empty((R, nb, GROUP), np.uint8)
    if fmt is Q4_0:
        _q4_0(rows, qw, d, L)
        head = [d.astype(np.float16).reshape(R, nb, 1).view(np.uint8)]
    elif fmt is Q4_1:
        m = np.empty((R, nb), F32)
        _q4_1(rows, qw, d, m, L)
        head = [d.astype(np.float16).reshape(R, nb, 1).view(np.uint8),
                m.astype(np.float16).reshape(R, nb, 1).view(np.uint8)]
    else:
        raise ValueError(f"{fmt.name} takes no importance matrix")
    qs = (L[:, :, :16] | (L[:, :, 16:] << np.uint8(4))).astype(np.uint8)
    return np.concatenate([*head, qs], axis=2).reshape(*shape[:-1], nb * fmt.block_bytes)


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
