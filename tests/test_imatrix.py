"""Importance-weighted rounding (quant.imatrix) against llama.cpp's own: ggml_quantize_chunk with the same
importances, from the libggml that llama-cpp-python ships; and `lmcli imatrix` + `quantize --imatrix` end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tiny_models
from quant import imatrix
from quant.formats import Q4_0, Q4_1

GGML_TYPE = {"q4_0": 2, "q4_1": 3}


def _llama(lib, fmt, x, qw):
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    out = np.zeros(rows * n // 32 * fmt.block_bytes, np.uint8)
    lib.ggml_quantize_init(GGML_TYPE[fmt.name])
    got = lib.ggml_quantize_chunk(GGML_TYPE[fmt.name], x.ctypes.data, out.ctypes.data, 0, rows, n,
                                  np.ascontiguousarray(qw, np.float32).ctypes.data)
    assert got == out.size
    return out.reshape(rows, -1)


@pytest.mark.parametrize("fmt", [Q4_0, Q4_1], ids=lambda f: f.name)
@pytest.mark.parametrize("shape,kind", [((37, 96), "normal"), ((8, 256), "heavy"), ((5, 64), "sparse")])
def test_blocks_equal_llama_cpp_with_the_same_importances(ggml, fmt, shape, kind):
    """Byte for byte: rows of odd count, heavy tails, exact zeros, blocks of one sign."""
    rng = np.random.default_rng(hash((fmt.name, shape, kind)) % 2**32)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "heavy":
        x *= rng.standard_t(2, shape).astype(np.float32)
        x[:, :32] = np.abs(x[:, :32])  # a block of one sign (Q4_1's min clamps to 0)
    if kind == "sparse":
        x[rng.random(shape) < 0.5] = 0
        x[0, :32] = 0  # an all-zero block
    qw = (rng.random(shape[1]) ** 3 * 10).astype(np.float32)
    ours = imatrix.encode(x, fmt, qw)
    ref = _llama(ggml, fmt, x, qw)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{(ours != ref).any(axis=1).sum()} of {len(x)} rows differ"


def test_importance_lowers_the_weighted_error_it_targets():
    """The reason to use it: for the same bits, the error weighted by the activations' energy is lower than the
    reference rounding's (here by more than 10%)."""
    from quant.quantize import dequantize_blocks, quantize_blocks

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    act2 = (rng.random(512) ** 4 * 100).astype(np.float32)  # a few columns carry most activation energy
    for fmt in (Q4_0, Q4_1):
        plain = dequantize_blocks(quantize_blocks(x, fmt), fmt, 512)
        weighted = dequantize_blocks(imatrix.encode(x, fmt, act2), fmt, 512)
        err = lambda y: float((np.square(y - x) * act2).sum())  # noqa: E731
        assert err(weighted) < 0.9 * err(plain), fmt.name


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmcli.cli", *args], capture_output=True, text=True, timeout=600)


def test_imatrix_then_quantize_end_to_end(tmp_path):
    """lmcli imatrix on an f16 conversion of a tiny MoE, then quantize --imatrix: every q4 matrix (experts too)
    is rounded with its importances (one expert's blocks equal imatrix.encode of its source rows)."""
    from quant.container import Container
    from quant.quantize import deinterleave, dequantize_blocks

    d = tiny_models.build("qwen2_moe", tmp_path / "hf")
    f16 = tmp_path / "f16.lmc"
    assert _cli("quantize", str(d), str(f16), "--type", "f16").returncode == 0
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(tiny_models._corpus(__import__("random").Random(7))) * 3)
    imx = tmp_path / "imx.npz"
    r = _cli("imatrix", str(f16), str(text), "-o", str(imx), "--ctx", "64")
    assert r.returncode == 0, r.stderr
    imp = imatrix.load(imx)
    assert imp["blk.1.ffn_gate_exps.weight"].shape == (8, 64) and imp["blk.0.attn_q.weight"].shape == (64,)
    assert imp["blk.1.ffn_down_exps.weight"].shape == (8, 32)
    out = tmp_path / "q.lmc"
    r = _cli("quantize", str(d), str(out), "--imatrix", str(imx))
    assert r.returncode == 0, r.stderr
    assert "matrices rounded with the importance matrix" in r.stdout
    c = Container(out)
    assert "blk.1.ffn_gate_exps.weight" in c.metadata["quant"]["imatrix"]
    # one expert's matrix is exactly the weighted rounding of its source rows
    from safetensors.numpy import load_file

    st = {}
    for f in sorted(d.glob("*.safetensors")):
        st.update(load_file(f))
    src = st["model.layers.1.mlp.experts.3.gate_proj.weight"].astype(np.float32)
    want = dequantize_blocks(imatrix.encode(src, Q4_0, imp["blk.1.ffn_gate_exps.weight"][3]), Q4_0, 64)
    codes, scales = c.matrix("blk.1.ffn_gate_exps.weight", expert=3)
    got = dequantize_blocks(deinterleave(codes, scales, Q4_0, 32, 64), Q4_0, 64)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("args,words", [
    (["imatrix", "smollm2", "/nonexistent.txt", "-o", "x.npz"], "cannot read"),
    (["imatrix", "smollm2", "README.md", "-o", "x.bin"], ".npz"),
])
def test_bad_imatrix_input_is_one_line(args, words):
    r = _cli(*args)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr


def test_a_bad_importance_file_is_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"blk.0.attn_q.weight": np.array([1.0, -1.0], np.float32)})
    with pytest.raises(Exception, match="negative"):
        imatrix.load(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(Exception, match="not an importance matrix"):
        imatrix.load(junk)
