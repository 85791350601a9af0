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


@pytest.fixture(scope="module")
def models(tmp_path_factory, smol_container) -> list:
    """The packaged SmolLM2 (Q4_1/Q8_0), a softmax-routed MoE with QK-norm and an MLA model with a sigmoid router."""
    root = tmp_path_factory.mktemp("warm")
    specs = [[str(smol_container), "f32"]]
    for arch, qtype, kv in (("qwen3_moe", "q4_0", "f16"), ("deepseek_v3", "q8_0", "f32")):
        d = tiny_models.build(arch, root / arch)
        out = root / f"{arch}.lmc"
        convert_hf(d, out, qtype)
        specs.append([str(out), kv])
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
