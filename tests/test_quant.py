"""The interleaved repack and the Numba kernels against numpy float64 (codecs vs gguf.quants: test_formats.py)."""

from __future__ import annotations

import numpy as np
import pytest
from quant import kernels
from quant.formats import F16, F32, Q4_0, Q4_1, Q8_0, TILE
from quant.quantize import deinterleave, dequantize_interleaved, interleave, quantize_blocks, quantize_matrix


def _data(rng, n_out, n_in):
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[1, 5] = 40.0  # an outlier
    w[2, :32] = -1.5  # a constant block (Q4_1 d = 0)
    return w


@pytest.mark.parametrize("fmt", [Q4_0, Q4_1, Q8_0, F16, F32], ids=lambda f: f.name)
@pytest.mark.parametrize("n_out", [64, 100, 130])
def test_interleave_round_trips_exactly(fmt, n_out):
    rng = np.random.default_rng(3)
    w = _data(rng, n_out, 96)
    if fmt is F32:
        raw = w
    elif fmt is F16:
        raw = w.astype(np.float16)
    else:
        raw = quantize_blocks(w, fmt)
    codes, scales = interleave(raw, fmt, n_out, 96)
    assert codes.shape[0] == (n_out + TILE - 1) // TILE
    back = deinterleave(codes, scales, fmt, n_out, 96)
    assert np.array_equal(back.view(np.uint8), np.ascontiguousarray(raw).view(np.uint8))


def _act(x):
    T, n = x.shape
    xq = np.empty((T, n), np.int16)
    xd = np.empty((T, n // 32), np.float32)
    xs = np.empty((T, n // 32), np.int32)
    kernels.quantize_act(x, xq, xd, xs)
    return xq, xd, xs


def test_activation_quantization_error_is_below_float16_precision():
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32) * 5
    xq, xd, xs = _act(x)
    back = (xq.reshape(3, 8, 32) * xd[:, :, None]).reshape(3, 256)
    assert np.abs(back - x).max() <= np.abs(x).max() / 32767 * 0.51 + 1e-7
    assert np.array_equal(xs, xq.reshape(3, 8, 32).sum(-1))


@pytest.mark.parametrize("fmt", [Q4_0, Q4_1, Q8_0, F16, F32], ids=lambda f: f.name)
@pytest.mark.parametrize("T", [1, 5])
def test_matmul_kernel_matches_float64_reference(fmt, T):
    rng = np.random.default_rng(5)
    n_out, n_in = 150, 192
    w = _data(rng, n_out, n_in)
    codes, scales = quantize_matrix(w, fmt)
    wd = dequantize_interleaved(codes, scales, fmt, n_out, n_in).astype(np.float64)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    out = np.full((T, n_out), np.nan, np.float32)
    if fmt.int_act:
        fmt.matmul(codes, scales, *_act(x), out)
    else:
        fmt.matmul(codes, x, out)
    ref = x.astype(np.float64) @ wd.T
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("fmt", [Q4_0, Q4_1, Q8_0, F16, F32], ids=lambda f: f.name)
def test_embedding_rows_equal_reference_dequantization(fmt):
    rng = np.random.default_rng(6)
    w = _data(rng, 130, 64)
    codes, scales = quantize_matrix(w, fmt)
    ref = dequantize_interleaved(codes, scales, fmt, 130, 64)
    ids = np.array([0, 1, 2, 63, 64, 129], np.int64)
    out = np.empty((len(ids), 64), np.float32)
    kernels.embed_rows(codes.reshape(-1).view(np.uint8), scales, fmt.kind, ids, out)
    assert np.array_equal(out, ref[ids])


def test_silu_mul_matches_float64():
    """SwiGLU with the vector exp (kernels._exp16): within a few float32 ulps of float64 over the range
    activations take, exact limits at the ends of the float range, and the scalar tail (n % 16)."""
    rng = np.random.default_rng(8)
    g = np.concatenate([rng.standard_normal((2, 203)) * s for s in (0.1, 3, 30)], axis=1).astype(np.float32)
    g[0, :6] = [0.0, -0.0, 80.0, -80.0, 1e-20, -1e-20]
    u = rng.standard_normal(g.shape).astype(np.float32)
    out = np.empty_like(g)
    kernels.silu_mul(g, u, out)
    g64 = g.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u
    assert np.all(np.abs(out - ref) <= 4e-7 * np.abs(ref) + 1e-38)
    big = np.array([[-1000.0, -100.0, 100.0, 1000.0] * 4], np.float32)
    out = np.empty_like(big)
    kernels.silu_mul(big, np.ones_like(big), out)
    assert np.all(np.abs(out[big < 0]) < 1e-35) and np.array_equal(out[big > 0], big[big > 0])
    kernels.silu_mul(g, u, g)  # in place, as the engine calls it
    assert np.all(np.abs(g - ref) <= 4e-7 * np.abs(ref) + 1e-38)


_ISA_SCRIPT = r"""
import collections, hashlib, json, re, sys
import numba
import numpy as np
from quant import kernels
from quant.formats import Q4_0, Q4_1, Q8_0
from quant.quantize import dequantize_interleaved, quantize_matrix
run = sys.argv[1] == "run"
rng = np.random.default_rng(7)
n_out, n_in = 150, 192
res = {"vnni": kernels._VNNI, "avxvnni": kernels._AVXVNNI, "avx512bw": kernels._AVX512BW, "avx2": kernels._AVX2,
       "f16c": kernels._F16C, "err": 0.0, "asm": {}, "err_tiles": 0.0, "asm_tiles": {}}
digest = hashlib.sha256()
mnemonic = re.compile(r"^\s+(?:\{vex\}\s+)?([a-z]\w*)\s+(.*)$", re.M)
for fmt in (Q4_0, Q4_1, Q8_0):
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    codes, scales = quantize_matrix(w, fmt)
    wd = dequantize_interleaved(codes, scales, fmt, n_out, n_in).astype(np.float64)
    fn = fmt.matmul
    for T in (1, 5):
        x = rng.standard_normal((T, n_in)).astype(np.float32)
        xq, xd, xs = np.empty((T, n_in), np.int16), np.empty((T, n_in // 32), np.float32), np.empty((T, n_in // 32), np.int32)
        out = np.full((T, n_out), np.nan, np.float32)
        args = (codes, scales, xq, xd, xs, out)
        sig = tuple(numba.typeof(a) for a in args)
        fn.compile(sig)  # compiling never executes: every path compiles on every CPU
        # instructions that operate on vector registers, by mnemonic and register width
        ops = collections.Counter(f"{m.group(1)}:{'zmm' if 'zmm' in m.group(2) else 'ymm' if 'ymm' in m.group(2) else 'x'}"
                                  for m in mnemonic.finditer(fn.inspect_asm(sig)))
        for k, v in ops.items():
            res["asm"][k] = res["asm"].get(k, 0) + v
        if run:
            kernels.quantize_act(x, xq, xd, xs)
            fn(*args)
            ref = x.astype(np.float64) @ wd.T
            res["err"] = max(res["err"], float(np.abs(out - ref).max() / np.abs(ref).max()))
            digest.update(out.tobytes())
# GGUF's Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS rows repacked into tiles (quant.repack) and run by
# matmul_tiles (tile_* and rows_*)
from gguf import GGMLQuantizationType, quants
from quant import repack
from quant.formats import BY_GGUF_TYPE
n_in = 512
for gtype in (6, 7, 10, 11, 12, 13, 14, 20, 23):
    fmt = BY_GGUF_TYPE[gtype]
    raw = rng.integers(0, 256, (n_out, fmt.row_nbytes(n_in)), dtype=np.uint8)
    b = raw.reshape(n_out, n_in // fmt.block_size, fmt.block_bytes)
    for o in fmt.half_fields:  # finite fp16 scales
        b[..., o:o + 2] = (rng.random(b.shape[:2]) * 0.01).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    wd = quants.dequantize(raw, GGMLQuantizationType(gtype)).astype(np.float64).reshape(n_out, n_in)
    nt = (n_out + 63) // 64
    rows = np.zeros((nt * 64, raw.shape[1]), np.uint8)
    rows[:n_out] = raw
    codes, scales = repack.repack(fmt, rows.reshape(nt, 64, -1), n_in)
    fn = kernels.matmul_tiles
    for T in (1, 5):
        x = rng.standard_normal((T, n_in)).astype(np.float32)
        xq, xd, xs = np.empty((T, n_in), np.int16), np.empty((T, n_in // 32), np.float32), np.empty((T, n_in // 32), np.int32)
        out = np.full((T, n_out), np.nan, np.float32)
        args = (codes, scales, gtype, xq, xd, xs, out)
        sig = tuple(numba.typeof(a) for a in args)
        if sig not in fn.overloads:
            fn.compile(sig)
            ops = collections.Counter(f"{m.group(1)}:{'zmm' if 'zmm' in m.group(2) else 'ymm' if 'ymm' in m.group(2) else 'x'}"
                                      for m in mnemonic.finditer(fn.inspect_asm(sig)))
            for k, v in ops.items():
                res["asm_tiles"][k] = res["asm_tiles"].get(k, 0) + v
        if run:
            kernels.quantize_act(x, xq, xd, xs)
            fn(*args)
            ref = x.astype(np.float64) @ wd.T
            res["err_tiles"] = max(res["err_tiles"], float(np.abs(out - ref).max() / np.abs(ref).max()))
            digest.update(out.tobytes())
if run:
    g = (rng.standard_normal((3, 211)) * 20).astype(np.float32)
    u = rng.standard_normal((3, 211)).astype(np.float32)
    out = np.empty_like(g)
    kernels.silu_mul(g, u, out)
    g64 = g.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u
    res["silu_err"] = float((np.abs(out - ref) / (np.abs(ref) + 1e-30)).max())
    digest.update(out.tobytes())
    res["digest"] = digest.hexdigest()
print(json.dumps(res))
"""

_X86 = "+avx2,+fma,+sse4.2,+popcnt,+avx"
_AVX512 = "+avx512f,+avx512bw,+avx512vl,+avx512dq," + _X86
# name: (environment, the flags kernels.py must read from it (vnni, avxvnni, avx512bw, avx2, f16c), the multiply-add
# instructions its assembly must contain as "mnemonic:register width", instructions it must not contain). LLVM's
# tuning for a CPU may turn some vpdpwssd into vpmaddwd + vpaddd where that schedules better on it (Ice Lake,
# Alder Lake), so a VNNI path must contain vpdpwssd, not only it.
_ISAS = {
    "avx512vnni": ({"NUMBA_CPU_NAME": "icelake-server", "NUMBA_CPU_FEATURES": _AVX512 + ",+avx512vnni,+f16c"},
                   (True, False, True, True, True), {"vpdpwssd:zmm"}, {"vpmaddwd:ymm"}),
    "avx512bw": ({"NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": _AVX512 + ",+f16c"},
                 (False, False, True, True, True), {"vpmaddwd:zmm"}, {"vpdpwssd:zmm"}),
    # AVX-VNNI: Intel client CPUs since Alder Lake (256-bit, VEX). LLVM's tuning for Alder Lake keeps some
    # multiply-adds as vpmaddwd + vpaddd where that schedules better, so vpdpwssd need not be the only form.
    "avxvnni": ({"NUMBA_CPU_NAME": "alderlake", "NUMBA_CPU_FEATURES": _X86 + ",+f16c,+avxvnni"},
                (False, True, False, True, True), {"vpdpwssd:ymm"}, {"vpdpwssd:zmm", "vpmaddwd:zmm"}),
    # AVX2 + FMA + F16C (AMD Zen 1-3, Intel Haswell to Comet Lake): 256-bit vpmaddwd, each multiply-add once (the
    # plain IR gave twice as many vpmaddwd plus vpblendw)
    "avx2": ({"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": _X86 + ",+f16c"},
             (False, False, False, True, True), {"vpmaddwd:ymm", "vcvtph2ps:ymm"}, {"vpblendw:ymm", "vpdpwssd:ymm"}),
    # AVX-512 without F16C in the feature list: fp16 scales by the integer bit trick instead of vcvtph2ps
    "no-f16c": ({"NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": _AVX512},
                (False, False, True, True, False), {"vpmaddwd:zmm"}, {"vcvtph2ps:zmm", "vcvtph2ps:ymm"}),
    # Numba's portable target (NUMBA_CPU_NAME=generic): plain vector IR (SSE2 on x86-64), no F16C
    "generic": ({"NUMBA_CPU_NAME": "generic"}, (False, False, False, False, False), {"pmaddwd:x"}, set()),
}
# the IQ4 types' codebook lookup in matmul_tiles' assembly: one vpshufb per 64 indices with AVX-512BW, two 256-bit
# ones with AVX2; the portable path compares and selects (no byte shuffle in SSE2)
_LOOKUP = {"avx512vnni": "vpshufb:zmm", "avx512bw": "vpshufb:zmm", "avxvnni": "vpshufb:ymm", "avx2": "vpshufb:ymm",
           "no-f16c": "vpshufb:zmm"}


def _host_features() -> set:
    from numba.core.codegen import get_host_cpu_features

    return {f[1:] for f in get_host_cpu_features().split(",") if f.startswith("+")}


def test_kernels_agree_across_instruction_sets(tmp_path):
    """Every instruction-set path (of the Q4_0/Q4_1/Q8_0 matmuls and of matmul_tiles on Q5_0/Q5_1/Q4_K/Q5_K/Q6_K/
    IQ4_NL/IQ4_XS repacked from GGUF rows, against gguf.quants' dequantization) compiles on every CPU, each in a fresh process for its target, and its assembly
    holds the expected multiply-add form (vpdpwssd on AVX-512 VNNI and AVX-VNNI, vpmaddwd on AVX-512BW and AVX2,
    pmaddwd on the portable target). The paths this CPU can execute are run: each matches the float64 reference,
    and all give bit-identical results (exact integer arithmetic, one activation scheme). Paths the CPU cannot
    run (AVX-512 on an AVX2 machine) are checked by their assembly only: executing them would be SIGILL."""
    import json
    import os
    import subprocess
    import sys

    import platform

    host = _host_features()
    digests = {}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    for isa, (extra, flags, want, avoid) in _ISAS.items():
        if not x86 and isa != "generic":
            continue  # an x86 CPU name does not compile for another architecture's host
        need = {f[1:] for f in extra.get("NUMBA_CPU_FEATURES", "").split(",") if f}
        runnable = need <= host
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / isa), **extra)
        r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, "run" if runnable else "compile"], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (isa, r.returncode, r.stderr[-2000:])
        got = json.loads(r.stdout)
        assert (got["vnni"], got["avxvnni"], got["avx512bw"], got["avx2"], got["f16c"]) == flags, isa
        for asm in (got["asm"], got["asm_tiles"]):  # Q4_0/Q4_1/Q8_0, and the repacked GGUF types
            assert want <= set(asm), (isa, sorted(asm))
            assert not avoid & set(asm), (isa, avoid & set(asm))
        if isa in _LOOKUP:
            assert _LOOKUP[isa] in got["asm_tiles"], (isa, sorted(got["asm_tiles"]))
        if runnable:
            assert got["err"] <= 1e-4, isa
            assert got["err_tiles"] <= 1e-4, isa
            assert got["silu_err"] <= 1e-6, isa
            digests[isa] = got["digest"]
    # the host's own compile (no NUMBA_CPU_* set) always runs, and the portable path runs on any x86-64
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "host"))
    for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, "run"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    digests["host"] = json.loads(r.stdout)["digest"]
    assert "generic" in digests
    assert len(set(digests.values())) == 1, f"instruction-set paths disagree: {digests}"


_AARCH64_SCRIPT = r"""
import collections, json, re
import llvmlite.binding as llvm
import numba
import numpy as np
from quant import kernels
from quant.formats import Q4_0, Q8_0
from quant.quantize import quantize_matrix

def strip_x86(txt):
    # Numba's runtime helpers (reference counting) were optimised for the host into x86 atomics: keep them as
    # declarations, the kernels' code is what is compiled for the other architecture
    out, pos = [], 0
    for m in re.finditer(r"^define ([^\n]*?)\{\n(.*?)^\}\n", txt, re.M | re.S):
        head, body = m.group(1), m.group(2)
        if "llvm.x86." not in body:
            continue
        head = re.sub(r"^(linkonce_odr|internal|private|weak_odr|linkonce)\s+", "", head)
        head = re.sub(r"\s%[\w.\"]+(?=[,)])", "", head)
        head = re.sub(r"\)\s.*$", ")", head)
        out.append(txt[pos:m.start()] + "declare " + head + "\n")
        pos = m.end()
    return "".join(out) + txt[pos:]

llvm.initialize_all_targets()
llvm.initialize_all_asmprinters()
tm = llvm.Target.from_triple("aarch64-unknown-linux-gnu").create_target_machine(cpu="neoverse-n1", features="+neon",
                                                                                opt=3)
ops = collections.Counter()
for fmt, fn in ((Q4_0, kernels.matmul_q4), (Q8_0, kernels.matmul_q8)):
    c, s = quantize_matrix(np.ones((64, 64), np.float32), fmt)
    args = (c, s, np.zeros((1, 64), np.int16), np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int32),
            np.zeros((1, 64), np.float32))
    sig = tuple(numba.typeof(a) for a in args)
    fn.compile(sig)
    txt = str(fn.overloads[sig].library._final_module)
    txt = re.sub(r'target triple = ".*"', 'target triple = "aarch64-unknown-linux-gnu"', txt)
    txt = re.sub(r'target datalayout = ".*"', "", txt)
    txt = re.sub(r'"target-(cpu|features)"="[^"]*"', "", txt)
    mod = llvm.parse_assembly(strip_x86(txt))
    mod.data_layout = str(tm.target_data)
    for m in re.finditer(r"^\s+([a-z][\w.]*)\s+([^\n]*)", tm.emit_assembly(mod), re.M):
        arr = re.search(r"\.(\d+[bhsd])\b", m.group(2))
        ops[m.group(1) + (":" + arr.group(1) if arr else "")] += 1
print(json.dumps(ops))
"""


def test_portable_kernels_compile_to_neon_multiply_adds_for_aarch64(tmp_path):
    """ARM gets the portable IR (no x86 intrinsics): compiled by Numba for the generic target, its LLVM module
    retargeted to aarch64 emits NEON 32-bit multiply-accumulates (mla/smlal on .4s lanes) for the integer dot
    products and fmla for the float epilogue, without the even/odd de-interleaving shuffles (uzp1/uzp2) the
    pairwise form cost. Compiled only: no ARM machine here to run or time it."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="generic")
    env.pop("NUMBA_CPU_FEATURES", None)
    r = subprocess.run([sys.executable, "-c", _AARCH64_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ops = json.loads(r.stdout)
    assert ops.get("mla:4s", 0) + ops.get("smlal:4s", 0) >= 512, sorted(ops.items(), key=lambda kv: -kv[1])[:20]
    assert ops.get("fmla:4s", 0) > 0
    assert not any(k.startswith(("uzp1", "uzp2")) for k in ops), [k for k in ops if k.startswith("uzp")]
