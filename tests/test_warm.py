"""A first run compiles the model's kernels in parallel worker processes (lmcli.warm), so that the model's own process
compiles nothing: checked with Numba's own compile events, in a fresh process over an empty kernel cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models
from quant.convert import convert_hf

ROOT = Path(__file__).resolve().parents[1]

# Loads each model (which warms it), then generates with a listener on Numba's compile events: every kernel that the
# forward pass still had to compile in this process is reported, with the number of worker-compiled kernels.
_PROBE = r"""
import json, sys
from numba.core import event
import lmcli
from lmcli import warm

compiled, counts = [], []
warm.REPORT = lambda done, total: counts.append(total)

class Listener(event.Listener):
    def on_start(self, ev):
        d = ev.data["dispatcher"]
        if d.py_func.__module__.startswith(("lmcli", "quant")):
            compiled.append(d.py_func.__qualname__)
    def on_end(self, ev):
        pass

out = {}
for spec in json.loads(sys.argv[1]):
    path, kv = spec
    counts.clear()
    m = lmcli.load(path, kv_type=kv, n_ctx=64)
    listener = Listener()
    event.register("numba:compile", listener)
    text = "".join(e.text for e in m.generate("the model expert cache", max_tokens=3, temp=0))
    event.unregister("numba:compile", listener)
    out[f"{path}:{kv}"] = {"compiled_here": sorted(set(compiled)), "warmed": max(counts, default=0)}
    compiled.clear()
print(json.dumps(out))
"""


def _probe(specs: list, cache_dir: Path, **env) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(specs)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT), **env},
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _llama_cpp_q4_k_m(root: Path) -> Path:
    """A tiny MoE quantized to Q4_K_M by llama.cpp and imported: its matrices and experts run repacked into tiles."""
    import ctypes

    import llama_cpp

    from quant.gguf_export import export_gguf
    from quant.gguf_io import import_gguf

    d = tiny_models.build("qwen3_moe", root / "kq", overrides={"hidden_size": 256, "moe_intermediate_size": 256,
                                                                "head_dim": 64})
    convert_hf(d, root / "kq-f16.lmc", "f16")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = 15, 2  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    src, q = export_gguf(root / "kq-f16.lmc", root / "kq-f16.gguf"), root / "kq.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(q).encode(), ctypes.byref(p)) == 0
    return import_gguf(q, root / "kq.lmc")


@pytest.fixture(scope="module")
def models(tmp_path_factory, smol_container) -> list:
    """The packaged SmolLM2 (Q4_1/Q8_0), a softmax-routed MoE with QK-norm, an MLA model with a sigmoid router, and
    a llama.cpp Q4_K_M MoE (GGUF rows repacked into tiles at load)."""
    root = tmp_path_factory.mktemp("warm")
    specs = [[str(smol_container), "f32"]]
    for arch, qtype, kv in (("qwen3_moe", "q4_0", "f16"), ("deepseek_v3", "q8_0", "f32")):
        d = tiny_models.build(arch, root / arch)
        out = root / f"{arch}.lmc"
        convert_hf(d, out, qtype)
        specs.append([str(out), kv])
    specs.append([str(_llama_cpp_q4_k_m(root)), "f32"])
    return specs


def test_first_run_compiles_nothing_in_process(models, tmp_path):
    """Over an empty kernel cache, the workers compile every kernel each model's forward pass calls (prefill and
    decode): Numba's compile events in the model's process name none of lmcli's or quant's kernels."""
    res = _probe(models, tmp_path / "numba")
    for key, r in res.items():
        assert r["compiled_here"] == [], f"{key}: compiled in-process: {r['compiled_here']}"
    first = res[f"{models[0][0]}:f32"]
    assert first["warmed"] >= 5  # the workers did compile the first model's kernels


def test_without_parallel_compile_the_process_compiles(models, tmp_path):
    """The control: with the workers off (LMCLI_NO_PARALLEL_COMPILE), the same probe sees the model's kernels
    compiled in-process, so the check above can fail."""
    res = _probe(models[:1], tmp_path / "numba", LMCLI_NO_PARALLEL_COMPILE="1")
    r = res[f"{models[0][0]}:f32"]
    assert r["warmed"] == 0 and {"matmul_q4", "embed_rows", "rmsnorm"} <= set(r["compiled_here"])


def test_workers_compile_the_copy_of_lmcli_this_process_runs(models, tmp_path):
    """An installed lmcli run from a clone of its repository (the README's install): the working directory holds
    another copy of lmcli and quant. Numba caches a kernel by its source file, so workers that imported the working
    directory's copy compiled kernels this process never looks up, and it compiled them all again in-process."""
    import shutil

    installed = tmp_path / "site-packages"
    for pkg in ("lmcli", "quant"):
        shutil.copytree(ROOT / pkg, installed / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-P", "-c", _PROBE, json.dumps(models[:1])], capture_output=True, text=True,
                       cwd=ROOT,  # the clone: `python -m` would put it first on a worker's sys.path
                       env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": str(installed)},
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])[f"{models[0][0]}:f32"]
    assert res["warmed"] >= 5 and res["compiled_here"] == [], res
