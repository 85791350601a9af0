"""Registry entries for the trillion-parameter class (deepseek-v3, kimi-k2): pinned to commits of the real repos,
their config sizes what `plan` reports before a download, checked against a converted container's own index."""

from __future__ import annotations

import json
import re

import pytest
import tiny_models

from lmcli.errors import LmcliError
from lmcli.registry import Entry, load_registry, parse

PINNED = {"deepseek-v3": ("deepseek-ai/DeepSeek-V3", "deepseek_v3"),
          "kimi-k2": ("moonshotai/Kimi-K2-Instruct", "kimi_k2")}


def _params(c: dict) -> tuple[float, float]:
    """(total, active) parameters of a DeepSeek-V3-architecture config.json (DeepseekV3ForCausalLM's modules,
    counted by hand: MLA attention, dense first layers, routed and shared experts, untied embeddings)."""
    d, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    attn = (d * c["q_lora_rank"] + c["q_lora_rank"] + c["q_lora_rank"] * heads * qk
            + d * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"]
            + c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"]) + heads * c["v_head_dim"] * d
            + 2 * d)
    expert = 3 * d * c["moe_intermediate_size"]
    dense_layers, moe_layers = c["first_k_dense_replace"], layers - c["first_k_dense_replace"]
    router = c["n_routed_experts"] * d + c["n_routed_experts"]
    embed = c["vocab_size"] * d
    total = (layers * attn + dense_layers * 3 * d * c["intermediate_size"]
             + moe_layers * ((c["n_routed_experts"] + c["n_shared_experts"]) * expert + router) + 2 * embed + d)
    active = total - moe_layers * (c["n_routed_experts"] - c["num_experts_per_tok"]) * expert - embed
    return total, active


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_entry_is_pinned_to_a_commit_of_the_real_repo(name):
    from lmcli.hub import parse_spec
    from quant.convert import QTYPES
    from quant.hf_config import ALIASES, ARCHS

    e = load_registry()[name]
    assert (e.repo, e.arch) == PINNED[name]
    assert re.fullmatch(r"[0-9a-f]{40}", e.revision), e.revision
    assert ALIASES.get(e.arch, e.arch) == "deepseek_v3" and ALIASES.get(e.arch, e.arch) in ARCHS
    assert e.quant in QTYPES
    s = parse_spec(name)
    assert (s.repo, s.revision, s.name) == (e.repo, e.revision, name)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_config_agrees_with_the_parameter_counts_in_the_notes(name):
    """The notes ('671B total, 37B active') are the model card's; the config's sizes must give them."""
    from lmcli.doctor import registry_params

    e = load_registry()[name]
    total, active = _params(e.config)
    noted_total, noted_active = registry_params(e.notes)
    assert total == pytest.approx(noted_total, rel=0.002)
    assert active == pytest.approx(noted_active, rel=0.05)


def test_plan_for_kimi_k2_before_download_counts_every_tensor(tmp_path, monkeypatch):
    from lmcli.doctor import plan

    monkeypatch.setenv("LMCLI_HOME", str(tmp_path / "home"))
    e = load_registry()["kimi-k2"]
    total, active = _params(e.config)
    r = plan("kimi-k2", memory="64G")
    assert r["source"].startswith("registry config") and r["path"] is None
    assert (r["arch"], r["n_layer"], r["n_expert"], r["n_expert_used"]) == ("deepseek_v3", 61, 384, 8)
    # Q4_0 is 4.5 bits per weight; embeddings and output at Q8_0, norms and routers at F32 add a little
    assert 4.5 / 8 < r["file_bytes"] / total < 4.6 / 8
    assert 4.5 / 8 < r["bytes_per_token"] / active < 5.0 / 8
    assert 0 < r["dense_bytes"] < 0.02 * r["file_bytes"]  # what stays in RAM: attention, dense layers, shared experts
    assert r["dense_bytes_per_token"] + r["expert_bytes_per_token"] == r["bytes_per_token"]
    assert r["fits_in_memory"] is False and r["expert_cache_bytes"] > 0
    assert 0 < r["disk_bytes_per_token"] < r["expert_bytes_per_token"]
    assert r["kv_cache_bytes"] > 0 and r["n_ctx"] > 0
    assert not (tmp_path / "home" / "models").exists()  # nothing downloaded or written


def test_lmcli_plan_kimi_k2_from_the_command_line_says_what_stays_in_ram(tmp_path):
    """Issue 20: `lmcli plan kimi-k2 --memory 64G` before any download: disk size, dense bytes kept in RAM, bytes read
    per token, expected tokens/s."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, LMCLI_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "plan", "kimi-k2", "--memory", "64G", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    p = json.loads(r.stdout)
    assert p["model"] == "kimi-k2" and p["memory_budget_bytes"] == 64 << 30
    assert p["file_bytes"] > 500e9 and 0 < p["dense_bytes"] < 64 << 30
    assert p["dense_bytes_per_token"] < p["bytes_per_token"] < 0.05 * p["file_bytes"]
    assert 0 < p["expected_decode_tokens_per_s"] and p["weights"].startswith("mapped")
    assert not (tmp_path / "home" / "models").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny deepseek_v3 checkpoint whose config.json says model_type kimi_k2 (as Kimi K2's does), converted."""
    from quant.convert import convert_hf

    d = tiny_models.build("deepseek_v3", tmp_path_factory.mktemp("k2") / "model")
    cfg = json.loads((d / "config.json").read_text())
    ds = tmp_path_factory.mktemp("ds3") / "ds3.lmc"
    convert_hf(d, ds, "q4_0")
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    out = d.parent / "k2.lmc"
    convert_hf(d, out, "q4_0")
    return cfg, out, ds


def test_a_kimi_k2_config_converts_as_deepseek_v3(converted):
    from quant.container import Container

    _, k2, ds = converted
    a, b = Container(k2), Container(ds)
    assert a.metadata["config"] == b.metadata["config"] and a.metadata["config"]["arch"] == "deepseek_v3"
    assert {n: (t.fmt, t.shape, t.nbytes) for n, t in a.tensors.items()} == \
           {n: (t.fmt, t.shape, t.nbytes) for n, t in b.tensors.items()}


def test_registry_config_costs_equal_the_converted_containers_index(converted):
    """plan's figures from a registry config are those plan reads from the container the conversion writes."""
    from lmcli.doctor import container_costs, registry_config_costs
    from quant.container import Container

    cfg, k2, _ = converted
    sizes = {k: v for k, v in cfg.items() if isinstance(v, (int, float, bool)) and k != "model_type"}
    entry = Entry(name="tiny", repo="org/tiny", revision="0" * 40, arch="kimi_k2", quant="q4_0", config=sizes)
    got, want = registry_config_costs(entry), container_costs(k2)
    for key in ("arch", "n_layer", "n_expert", "n_expert_used", "dense_bytes", "expert_bytes", "dense_bytes_per_token",
                "expert_bytes_per_token", "bytes_per_token", "kv_bytes_per_token", "n_ctx_train", "moe_layers",
                "bundle_bytes"):
        assert got[key] == want[key], key
    c = Container(k2)
    header = min(t.offset for t in c.tensors.values())  # the header (tokenizer, template) is not in the count
    assert got["file_bytes"] == want["file_bytes"] - header


@pytest.mark.parametrize("table", ["model_type = 'llama'", "rope_scaling = { type = 'yarn' }", "layers = [1, 2]"])
def test_a_bad_config_table_is_refused(table):
    text = f'[m]\nrepo = "a/b"\nrevision = "main"\narch = "llama"\nquant = "q4_0"\n[m.config]\n{table}\n'
    with pytest.raises(LmcliError, match="config must be a table"):
        parse(text)


def test_registry_config_costs_of_a_k_mix_count_each_layers_bundles(tmp_path):
    """q4_k_m gives some layers' ffn_down_exps Q6_K (llama.cpp's use_more_bits), so their expert bundles are larger:
    plan's file size before a download sums each layer's bundles, as the conversion lays them out."""
    from lmcli.doctor import container_costs, registry_config_costs
    from quant.container import Container
    from quant.convert import convert_hf

    d = tiny_models.build("mixtral", tmp_path / "model",
                          overrides=dict(hidden_size=256, intermediate_size=256, num_hidden_layers=9,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64))
    cfg = json.loads((d / "config.json").read_text())
    out = tmp_path / "m.lmc"
    convert_hf(d, out, "q4_k_m")
    c = Container(out)
    strides = {t.stride for n, t in c.tensors.items() if n.endswith("ffn_down_exps.weight")}
    assert len(strides) == 2  # two sizes of bundle: the case this test is about
    sizes = {k: v for k, v in cfg.items() if isinstance(v, (int, float, bool)) and k != "model_type"}
    entry = Entry(name="tiny", repo="org/tiny", revision="0" * 40, arch="mixtral", quant="q4_k_m", config=sizes)
    got, want = registry_config_costs(entry), container_costs(out)
    for key in ("dense_bytes", "expert_bytes", "bytes_per_token", "bundle_bytes"):
        assert got[key] == want[key], key
    header = min(t.offset for t in c.tensors.values())
    assert got["file_bytes"] == want["file_bytes"] - header
