"""`lmcli bench` reports what it promises: medians with min/max, bytes per token, roofline, phases."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from quant.synthetic import write_synthetic_moe


def test_bench_json_on_a_moe_model(tmp_path):
    p = tmp_path / "m.lmc"
    write_synthetic_moe(p, n_layer=2, n_embd=256, n_ff_exp=512, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    env = dict(os.environ, LMCLI_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "bench", str(p), "-p", "8", "-n", "4", "-t", "1", "-r", "2",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    x = res["threads"]["1"]
    assert x["decode_tokens_per_s"]["min"] <= x["decode_tokens_per_s"]["median"] <= x["decode_tokens_per_s"]["max"]
    from lmcli.api import load

    m = load(str(p))
    ex = m.transformer.weights.layers[0].ffn.experts
    # dense matrices plus two experts per layer for every token
    assert x["bytes_per_token"] == m.transformer.weights.nbytes_dense + 2 * 2 * ex.bundle_nbytes
    assert 0 < x["roofline_fraction"] < 2
    assert {"matrix kernels", "attention", "routing", "expert kernels", "sampling"} <= set(x["decode_ms_per_phase"])
    assert all(x["decode_ms_per_phase"][k] > 0 for k in ("matrix kernels", "attention", "routing", "expert kernels"))


def test_bench_rejects_bad_thread_lists(tmp_path):
    env = dict(os.environ, LMCLI_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "bench", "smollm2", "-t", "one"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
