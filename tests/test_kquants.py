"""lmcli's Q4_K, Q5_K, Q6_K, Q5_0, Q5_1 and Q8_0 encoders (quant.kquants, quant.quantize, quant.imatrix) against
llama.cpp's own: ggml_quantize_chunk from the libggml that llama-cpp-python ships, byte for byte, without and with
an importance matrix."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from quant import imatrix
from quant.formats import Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from quant.quantize import dequantize_blocks, quantize_blocks

FORMATS = [Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0]


@pytest.fixture(scope="module")
def ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def llama_blocks(lib, fmt, x, qw=None):
    """ggml_quantize_chunk(type, rows x, importance qw or NULL) -> block bytes (rows, row bytes)."""
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    out = np.zeros(rows * fmt.row_nbytes(n), np.uint8)
    lib.ggml_quantize_init(fmt.gguf_type)
    imp = None if qw is None else np.ascontiguousarray(qw, np.float32)
    got = lib.ggml_quantize_chunk(fmt.gguf_type, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                  None if imp is None else imp.ctypes.data)
    assert got == out.size
    return out.reshape(rows, -1)


def matrix(kind: str, shape, seed: int) -> np.ndarray:
    """Random rows: normal; heavy tails with a block of one sign; sparse with an all-zero block and super-block;
    tiny values (scales near fp16's smallest normal) and a constant block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "heavy":
        x *= rng.standard_t(2, shape).astype(np.float32)
        x[:, :32] = np.abs(x[:, :32])
    elif kind == "sparse":
        x[rng.random(shape) < 0.6] = 0
        x[0, :256] = 0
        x[-1, 32:64] = 0
    elif kind == "tiny":
        x *= np.float32(1e-4)
        x[:, 64:96] = np.float32(0.25)
    return x


SHAPES = [((37, 256), "normal"), ((5, 768), "heavy"), ((8, 512), "sparse"), ((3, 256), "tiny"), ((64, 1024), "normal")]


def _id(fmt, shape, kind):
    return f"{fmt.name}-{shape[0]}x{shape[1]}-{kind}"


CASES = [(f, s, k) for f in FORMATS for s, k in SHAPES]


@pytest.mark.parametrize("fmt,shape,kind", CASES, ids=[_id(*c) for c in CASES])
def test_blocks_equal_llama_cpp_without_importance(ggml, fmt, shape, kind):
    """quantize_row_*_ref: rows of odd count, row lengths of 1, 2, 3 and 4 super-blocks."""
    x = matrix(kind, shape, hash((fmt.name, shape, kind)) % 2**32)
    ours = quantize_blocks(x, fmt)
    ref = llama_blocks(ggml, fmt, x)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{(ours != ref).any(axis=1).sum()} of {len(x)} rows differ"


WEIGHTED = [(f, s, k) for f in FORMATS if f is not Q8_0 for s, k in SHAPES]


@pytest.mark.parametrize("fmt,shape,kind", WEIGHTED, ids=[_id(*c) for c in WEIGHTED])
def test_blocks_equal_llama_cpp_with_the_same_importances(ggml, fmt, shape, kind):
    """quantize_row_*_impl with quant_weights: importances spanning four orders of magnitude, some exactly 0."""
    x = matrix(kind, shape, hash((fmt.name, shape, kind, "w")) % 2**32)
    rng = np.random.default_rng(shape[1])
    qw = (rng.random(shape[1]) ** 3 * 10).astype(np.float32)
    qw[::17] = 0
    ours = imatrix.encode(x, fmt, qw)
    ref = llama_blocks(ggml, fmt, x, qw)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{(ours != ref).any(axis=1).sum()} of {len(x)} rows differ"


def test_importance_lowers_the_weighted_error_of_k_quants():
    """As for Q4_0/Q4_1: rounded with the activations' energy, the error weighted by it is lower than the plain
    rounding's (by more than 10%)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    act2 = (rng.random(512) ** 4 * 100).astype(np.float32)
    for fmt in (Q4_K, Q5_K, Q6_K):
        plain = dequantize_blocks(quantize_blocks(x, fmt), fmt, 512)
        weighted = dequantize_blocks(imatrix.encode(x, fmt, act2), fmt, 512)
        err = lambda y: float((np.square(y - x) * act2).sum())  # noqa: E731
        assert err(weighted) < 0.9 * err(plain), fmt.name
