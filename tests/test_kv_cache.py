"""The KV cache (issue 20): MLA attention over the latent cache against the decompressed computation in float64 numpy
and against transformers' own cache; the float32 cache (the default) and the float16 one against transformers;
the cache type validated; plan and show count the new layout's bytes per token."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_models  # noqa: E402
from test_architectures import TIGHT, _ids, _ref_logits, _rel, rounded_reference  # noqa: E402

from lmcli.engine import ops  # noqa: E402


def _decompressed(q, lat, wkv_b, pos0, scale, nope, rank):
    """transformers' DeepseekV3Attention in float64: every head's key [W_uk c_kv, k_rope] and value W_uv c_kv
    decompressed from the latent rows, then causal softmax attention. q (T, H, nope + rope); lat (n, rank + rope);
    wkv_b (H, nope + dv, rank). Returns (T, H * dv)."""
    T, H, _ = q.shape
    q, lat, w = q.astype(np.float64), lat.astype(np.float64), wkv_b.astype(np.float64)
    k_nope = np.einsum("hnr,jr->hjn", w[:, :nope], lat[:, :rank])  # (H, n, nope)
    v = np.einsum("hdr,jr->hjd", w[:, nope:], lat[:, :rank])  # (H, n, dv)
    out = np.zeros((T, H, w.shape[1] - nope))
    for t in range(T):
        n = pos0 + t + 1
        for h in range(H):
            s = (k_nope[h, :n] @ q[t, h, :nope] + lat[:n, rank:] @ q[t, h, nope:]) * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ v[h, :n] / p.sum()
    return out.reshape(T, -1)


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
@pytest.mark.parametrize("H,T,pos0,nope,dv", [(4, 1, 0, 32, 24), (4, 1, 37, 32, 24), (16, 1, 300, 32, 24),
                                               (3, 6, 0, 32, 24), (8, 5, 40, 32, 24), (5, 3, 11, 18, 10)])
def test_mla_over_the_latent_cache_equals_the_decompressed_heads(kv_type, H, T, pos0, nope, dv):
    """ops.mla_query -> ops.attention over the latent rows -> ops.mla_output is DeepSeek's "absorb" form of the
    decompressed attention, on the same (float16-rounded) latent and kv_b; head sizes not a multiple of the
    kernels' four rows included."""
    rope, rank = 16, 64
    rng = np.random.default_rng(H * 100 + T + pos0)
    n_ctx = pos0 + T + 2
    q = rng.standard_normal((T, H, nope + rope)).astype(np.float32)
    lat = rng.standard_normal((n_ctx, rank + rope)).astype(np.float16)  # what the f16 cache would hold
    wkv_b = (rng.standard_normal((H, nope + dv, rank)) / 8).astype(np.float16)  # as weights.py keeps kv_b
    cache = lat[None] if kv_type == "f16" else lat[None].astype(np.float32)
    kc = cache.view(np.uint16) if kv_type == "f16" else cache
    scale = np.float32(1 / np.sqrt(nope + rope))
    ql = np.empty((T, H, rank + rope), np.float32)
    ops.mla_query(q, np.ascontiguousarray(wkv_b[:, :nope]).view(np.uint16), ql)
    att = np.full((T, H, rank), np.nan, np.float32)
    ops.attention(ql, kc, kc, pos0, scale, 0, att)
    out = np.full((T, H * dv), np.nan, np.float32)
    ops.mla_output(att, np.ascontiguousarray(wkv_b[:, nope:]).view(np.uint16), out)
    ref = _decompressed(q, lat, wkv_b, pos0, scale, nope, rank)
    assert np.abs(out - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("G,T", [(8, 1), (5, 1), (5, 3)])
def test_attention_reads_the_float16_cache_as_the_float32_one_holding_the_same_numbers(G, T):
    """The f16 cache's rows are widened exactly (every float16 is a float32): the same result bit for bit up to
    summation order, across the spans a decode step splits a head group into."""
    rng = np.random.default_rng(G + T)
    n_ctx = 50
    q = rng.standard_normal((T, 2 * G, 32)).astype(np.float32)
    k = (rng.standard_normal((2, n_ctx, 32)) * 3).astype(np.float16)
    v = rng.standard_normal((2, n_ctx, 32)).astype(np.float16)
    a, b = np.empty((T, 2 * G, 32), np.float32), np.empty((T, 2 * G, 32), np.float32)
    ops.attention(q, k.view(np.uint16), v.view(np.uint16), 20, np.float32(0.2), 0, a)
    ops.attention(q, k.astype(np.float32), v.astype(np.float32), 20, np.float32(0.2), 0, b)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


@pytest.mark.parametrize("kernel", ["_attention_rows", "_attention_rows4"])
@pytest.mark.parametrize("H,KV,span,T,pos0,window", [(8, 1, 8, 1, 0, 0), (8, 1, 3, 1, 9, 0), (12, 2, 6, 3, 30, 0),
                                                      (16, 1, 16, 2, 41, 7), (6, 2, 2, 4, 5, 3)])
def test_both_attention_kernels_match_float64_for_any_span_of_heads(kernel, H, KV, span, T, pos0, window):
    """ops.attention picks one of two kernels by the heads a job serves; each is checked on every shape (key counts
    not a multiple of four included) against tests/test_attention.py's float64 reference, on the f16 cache."""
    from test_attention import _reference

    rng = np.random.default_rng(H + span + T + pos0)
    n_ctx = pos0 + T + 1
    q = rng.standard_normal((T, H, 24)).astype(np.float32)
    kc = (rng.standard_normal((KV, n_ctx, 24)) * 2).astype(np.float16)
    vc = rng.standard_normal((KV, n_ctx, 20)).astype(np.float16)
    out = np.full((T, H, 16), np.nan, np.float32)  # the values are the first 16 entries of vc's rows
    getattr(ops, kernel)(q, kc.view(np.uint16), vc.view(np.uint16), pos0, np.float32(0.2), window, out, span)
    ref = _reference(q, kc, vc[:, :, :16], pos0, 0.2, window)
    assert np.abs(out - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    import lmcli
    from quant.convert import convert_hf

    d = tmp_path_factory.mktemp("deepseek_v3") / "hf"
    tiny_models.build("deepseek_v3", d)
    out = d.parent / "m.lmc"
    convert_hf(d, out, "f16")
    return d, out, lmcli.load(str(out), n_ctx=64, kv_type="f16")  # the compact cache: 2 bytes a number


def test_the_mla_cache_holds_what_transformers_cache_holds(deepseek):
    """Per layer and token: the normed compressed KV (transformers' cached keys) and the roped shared key
    (its cached values; lmcli rotates interleaved pairs in place where transformers de-interleaves them first, so
    the rope part is compared as a set of values per token)."""
    d, _, m = deepseek
    cfg = m.config
    ids = _ids(m, 9)
    cache = m.new_cache()
    m.transformer.forward(ids, cache)
    assert cache.k.dtype == np.float16 and cache.k.shape == (cfg.n_layer, 1, 64, cfg.kv_lora_rank +
                                                             cfg.qk_rope_head_dim)
    assert cache.v.size == 0
    ref = rounded_reference(d, "f16")
    with torch.no_grad():
        layers = ref(torch.tensor([ids]), use_cache=True).past_key_values.layers
    rank = cfg.kv_lora_rank
    for li, layer in enumerate(layers):
        got = cache.k[li, 0, : len(ids)].astype(np.float32)
        want_lat, want_rope = layer.keys[0, 0].numpy(), layer.values[0, 0].numpy()
        assert _rel(got[:, :rank], want_lat) < TIGHT, li
        assert _rel(np.sort(got[:, rank:], axis=1), np.sort(want_rope, axis=1)) < TIGHT, li


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_the_float32_cache_matches_transformers_and_the_float16_one_stays_close_to_it(arch, tmp_path):
    """Dense and MLA models, where no router flips on the f16 cache's rounding (see quant.schema.KV_TYPES)."""
    import lmcli
    from quant.convert import convert_hf

    d = tiny_models.build(arch, tmp_path / "hf")
    convert_hf(d, tmp_path / "m.lmc", "f16")
    m32 = lmcli.load(str(tmp_path / "m.lmc"), n_ctx=64)
    m16 = lmcli.load(str(tmp_path / "m.lmc"), n_ctx=64, kv_type="f16")
    assert m16.options.kv_type == "f16" and m32.options.kv_type == "f32"  # f32: the default
    assert m16.new_cache().k.dtype == np.float16 and m32.new_cache().k.dtype == np.float32
    ids = _ids(m32, 40)
    ref = _ref_logits(rounded_reference(d, "f16"), ids)
    a, b = m32.logits(ids), m16.logits(ids)
    assert _rel(a, ref) < TIGHT and _rel(b, ref) < TIGHT, arch
    assert 0 < _rel(a, b) < TIGHT  # the f16 cache rounds, within the comparison's own tolerance


def test_an_unknown_kv_type_is_one_line_and_no_traceback(deepseek, monkeypatch):
    import lmcli
    from lmcli.errors import UsageError

    _, path, _ = deepseek
    with pytest.raises(UsageError, match="KV cache type must be one of f16, f32, got 'q4'"):
        lmcli.load(str(path), n_ctx=64, kv_type="q4")
    monkeypatch.setenv("LMCLI_KV_TYPE", "f8")
    with pytest.raises(UsageError, match="got 'f8'"):
        lmcli.load(str(path), n_ctx=64)
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "run", str(path), "hi", "--kv-type", "bf16", "-n", "1"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: the KV cache type must be one of f16, f32, got 'bf16'"]


def test_plan_and_show_count_the_latent_cache_per_token(deepseek, monkeypatch, tmp_path):
    """61 layers x (512 + 64) x 2 bytes for DeepSeek-V3 (tests/test_schema.py); here the tiny model's shape, read
    by `plan --json` and `show --json` from the container header."""
    _, path, m = deepseek
    cfg = m.config
    per_token = cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # at f16
    monkeypatch.setenv("LMCLI_HOME", str(tmp_path / "home"))

    def cli(*args, **env):
        r = subprocess.run([sys.executable, "-m", "lmcli.cli", *args, "--json"], capture_output=True, text=True,
                           env={**__import__("os").environ, **env})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    p = cli("plan", str(path), "--memory", "1G", "--ctx-size", "128", "--kv-type", "f16")
    assert p["kv_type"] == "f16" and p["kv_bytes_per_token"] == per_token and p["kv_cache_bytes"] == 128 * per_token
    p32 = cli("plan", str(path), "--memory", "1G", "--ctx-size", "128")
    assert p32["kv_type"] == "f32" and p32["kv_bytes_per_token"] == 2 * per_token  # the default
    assert cli("plan", str(path), "--memory", "1G", LMCLI_KV_TYPE="f16")["kv_bytes_per_token"] == per_token
    assert cli("show", str(path))["kv_bytes_per_token"] == 2 * per_token
    assert cli("show", str(path), LMCLI_KV_TYPE="f16")["kv_bytes_per_token"] == per_token
