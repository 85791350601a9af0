"""`lmcli doctor` reports the machine; `lmcli plan` prices a model from its header or the registry, loading nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmcli.doctor import (DISK_GBPS, REGISTRY_BITS_PER_WEIGHT, cgroup_memory_limit, container_costs, numba_cache_dirs,
                          numba_cache_files, parse_size, plan, report)
from lmcli.engine.expert_cache import DEFAULT_POLICY, POLICIES, replay_hits
from lmcli.errors import ModelNotFound, UsageError


def lmcli(*args, home, env=None):
    env = dict(os.environ, LMCLI_HOME=str(home), **(env or {}))
    return subprocess.run([sys.executable, "-m", "lmcli.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory) -> Path:
    from quant.synthetic import write_synthetic_moe

    return write_synthetic_moe(tmp_path_factory.mktemp("moe") / "tiny-moe.lmc", n_layer=2, n_embd=256, n_ff_exp=512,
                               n_expert=8, n_head=4, n_head_kv=2, vocab=512)


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LMCLI_HOME", str(home))
    return home


def index_bytes_per_token(path: Path) -> int:
    """Bytes one decode step reads, from the container's tensor index: each dense tensor (one row of the token
    embedding, which a separate output head leaves to lookups), and n_expert_used of each expert tensor."""
    from quant.container import Container

    c = Container(path)
    used = c.metadata["config"]["n_expert_used"]
    tied = "output.weight" not in c.tensors
    total = 0
    for t in c.tensors.values():
        if t.n_expert:
            total += used * t.nbytes
        elif t.name == "token_embd.weight" and not tied:
            total += t.nbytes // t.shape[0]
        else:
            total += t.nbytes
    c.close()
    return total


# --- doctor ----------------------------------------------------------------------------------------


def test_doctor_reports_plausible_plain_values():
    r = report()
    assert json.loads(json.dumps(r)) == r  # plain JSON types only
    assert r["cores"] == os.cpu_count() and 1 <= r["cores_usable"] <= r["cores"]
    assert r["ram_total_bytes"] >= r["ram_available_bytes"] > 0
    assert r["store_free_bytes"] > 0 and isinstance(r["numba_cache_files"], int)
    assert r["read_bandwidth_gbps"] > 0
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert r["avx2"] == ("avx2" in flags) and r["avx512"] == ("avx512f" in flags)
    assert r["vnni"] == bool({"avx512_vnni", "avx_vnni"} & flags)


def test_doctor_names_the_kernel_path_of_the_cpu_it_compiles_for(tmp_path):
    """The host's path follows /proc/cpuinfo's flags; a build for an AVX2 target (NUMBA_CPU_NAME) says avx2."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    want = ("avx512-vnni" if {"avx512_vnni", "avx512f"} <= flags else "avx512bw" if "avx512bw" in flags
            else "avx-vnni" if "avx_vnni" in flags else "avx2" if "avx2" in flags else "portable")
    assert report()["kernel_path"] == want
    if "avx2" not in flags:
        return  # an AVX2 build cannot run on this CPU (the instruction-set test checks its code)
    env = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx2,+fma,+f16c,+sse4.2,+popcnt,+avx",
           "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    r = lmcli("doctor", "--json", home=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["kernel_path"] == "avx2" and "vpmaddwd" in obj["kernel_multiply_add"]
    assert obj["kernel_fp16_scales"].startswith("vcvtph2ps")


def test_doctor_json_on_the_command_line(tmp_path):
    r = lmcli("doctor", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    for key in ("avx2", "avx512", "vnni", "cores", "ram_total_bytes", "ram_available_bytes",
                "cgroup_memory_limit_bytes", "store_free_bytes", "numba_cache_files", "read_bandwidth_gbps"):
        assert key in obj


def test_cgroup_limits_v2_and_v1(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/app\n")
    v2 = tmp_path / "v2"
    (v2 / "user.slice" / "app").mkdir(parents=True)
    (v2 / "user.slice" / "app" / "memory.max").write_text("1073741824\n")
    assert cgroup_memory_limit(v2, proc) == 1 << 30
    (v2 / "user.slice" / "app" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(v2, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    proc.write_text("4:memory:/x\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    assert cgroup_memory_limit(v1, proc) == 512 << 20
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_memory_limit(v1, proc) is None
    assert cgroup_memory_limit(tmp_path / "none", tmp_path / "missing") is None


def test_numba_cache_counts_index_and_code_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    (tmp_path / "sub").mkdir()
    for name in ("k.f-1.py311.nbi", "sub/k.f-1.py311.1.nbc", "readme.txt"):
        (tmp_path / name).write_text("x")
    assert numba_cache_dirs() == [tmp_path]
    assert numba_cache_files(numba_cache_dirs()) == 2
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    dirs = numba_cache_dirs()
    assert {d.parent.name for d in dirs} == {"quant", "engine"} and all(d.name == "__pycache__" for d in dirs)


# --- plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,n", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("8GB", 8 * 10**9),
                                    ("64k", 64 << 10), ("2048", 2048), (" 2 T ", 2 << 40)])
def test_memory_sizes_parse(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "lots", "8X", "-1G", "0", "G", "1.2.3G", "5iB"])
def test_bad_memory_sizes_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_plan_bad_memory_is_one_line_and_exit_2(tmp_path):
    r = lmcli("plan", "mixtral", "--memory", "8X", home=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --memory must be a size")


def test_plan_unknown_model_raises_model_not_found(empty_home):
    with pytest.raises(ModelNotFound):
        plan("no-such-model")


def test_plan_for_mixtral_before_download_uses_the_registry_notes(empty_home):
    bpw = REGISTRY_BITS_PER_WEIGHT / 8
    r = plan("mixtral", memory="64G")
    assert r["source"].startswith("registry notes") and r["path"] is None
    assert (r["n_expert"], r["n_expert_used"]) == (8, 2)
    assert r["file_bytes"] == int(46.7e9 * bpw) and r["bytes_per_token"] == int(12.9e9 * bpw)
    assert r["fits_in_memory"] is True and r["disk_read_gbps"] is None
    assert r["expected_decode_tokens_per_s"] == pytest.approx(r["read_bandwidth_gbps"] * 1e9 / r["bytes_per_token"],
                                                              rel=0.02)
    small = plan("mixtral", memory="8G")
    assert small["fits_in_memory"] is False and small["disk_read_gbps"] == DISK_GBPS
    assert any(f"{DISK_GBPS} GB/s" in a for a in small["assumptions"])
    assert 0 < small["disk_bytes_per_token"] < small["bytes_per_token"]
    assert small["expected_decode_tokens_per_s"] < DISK_GBPS * 1e9 / small["disk_bytes_per_token"]
    assert not (empty_home / "models").exists()  # nothing downloaded or written


def test_plan_for_a_moe_container_reads_its_index(empty_home, moe_path):
    r = plan(str(moe_path))
    assert r["source"] == "container header" and r["file_bytes"] == moe_path.stat().st_size
    assert r["bytes_per_token"] == index_bytes_per_token(moe_path)
    assert r["dense_bytes_per_token"] + r["expert_bytes_per_token"] == r["bytes_per_token"]
    assert r["fits_in_memory"] is True and r["resident_expert_share"] == 1.0 and r["disk_bytes_per_token"] == 0
    tight = plan(str(moe_path), memory=str(r["file_bytes"] + r["kv_cache_bytes"]))
    assert tight["fits_in_memory"] is True
    short = plan(str(moe_path), memory="1M")
    assert short["fits_in_memory"] is False and 0 < short["disk_bytes_per_token"] <= short["bytes_per_token"]
    assert short["expected_decode_tokens_per_s"] < r["expected_decode_tokens_per_s"]


def test_plan_expert_bytes_match_what_the_engine_reads(moe_path):
    """The engine's own counter of expert bundle bytes per decode step agrees with the plan from the header."""
    from lmcli.api import load

    m = load(str(moe_path))
    final = list(m.generate(m.tokenize("hello"), max_tokens=6, temp=0.0))[-1]
    planned = container_costs(moe_path)["expert_bytes_per_token"]
    # the engine reads whole bundles (gate, up, down and their 64-byte alignment gaps)
    assert final.timings.expert_bytes_per_token == pytest.approx(planned, rel=0.01)


def test_plan_for_the_packaged_model_reads_the_gguf_header_without_importing(empty_home, smol_container):
    r = plan("smollm2")
    assert r["source"].startswith("GGUF header") and r["path"].endswith(".gguf")
    assert not (empty_home / "models").exists()
    assert r["n_expert"] == 0 and r["fits_in_memory"] is True
    # the same bytes per token as the container the import makes of it
    assert r["bytes_per_token"] == container_costs(smol_container)["bytes_per_token"]


# --- plan --trace: routing replayed through the expert cache ------------------------------------------


def lru_hits(steps, capacity: int) -> int:
    """A plain LRU over (layer, expert) keys, written apart from the engine's: a list, most recent last; the
    experts of the step being run are never the victim."""
    order, hits = [], 0
    for layer, experts in steps:
        keys = [(layer, e) for e in experts]
        for k in keys:
            if k in order:
                hits += 1
                order.remove(k)
            elif len(order) >= capacity:
                order.remove(next(o for o in order if o not in keys))
            order.append(k)
    return hits


def write_trace(path: Path, steps, n_moe_layers: int) -> Path:
    """The format `lmcli run --routing-trace` writes: one JSON line per (token, layer)."""
    lines = [json.dumps({"pos": i // n_moe_layers, "layer": layer, "experts": experts,
                         "weights": [round(1 / len(experts), 6)] * len(experts)})
             for i, (layer, experts) in enumerate(steps)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def skewed_steps(n_tok=120, n_layer=2, n_expert=8, k=2, seed=3):
    """Zipf-like routing: in each layer a few experts take most tokens (a different few per layer)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_expert + 1) ** 1.3
    p /= p.sum()
    perms = [rng.permutation(n_expert) for _ in range(n_layer)]
    return [(layer, [int(perms[layer][e]) for e in rng.choice(n_expert, k, replace=False, p=p)])
            for _ in range(n_tok) for layer in range(n_layer)]


def header_sizes(path: Path) -> tuple[int, int, int]:
    """(bytes of the non-expert tensors, bytes of one expert bundle, KV cache bytes at the default context),
    from the container index and config."""
    from lmcli.api import DEFAULT_CTX
    from quant.container import Container

    c = Container(path)
    cfg = c.metadata["config"]
    dense = sum(t.nbytes for t in c.tensors.values() if not t.n_expert)
    stride = max(t.stride for t in c.tensors.values() if t.n_expert)
    n_ctx = min(DEFAULT_CTX, cfg["n_ctx_train"])
    kv = cfg["n_layer"] * cfg["n_head_kv"] * 2 * (cfg["n_embd"] // cfg["n_head"]) * 4 * n_ctx
    c.close()
    return dense, stride, kv


def test_plan_with_a_trace_reports_the_hit_rate_of_replaying_it(empty_home, moe_path, tmp_path):
    dense, stride, kv = header_sizes(moe_path)
    steps = skewed_steps()
    trace = write_trace(tmp_path / "trace.jsonl", steps, 2)
    slots = 5  # of 16 bundles
    r = plan(str(moe_path), memory=str(kv + dense + slots * stride + stride // 2), trace=str(trace))
    assert r["routing"] == "trace" and r["fits_in_memory"] is False and r["trace_tokens"] == 120
    assert r["expert_bundle_bytes"] == stride and r["expert_cache_bundles"] == slots
    uses = sum(len(e) for _, e in steps)
    assert r["policy_hit_rates"]["lru"] == pytest.approx(lru_hits(steps, slots) / uses, abs=5e-5)
    # the estimate is the engine's default policy's replay (tests/test_cache_policy.py checks the replays)
    hits = replay_hits(steps, slots, DEFAULT_POLICY)
    assert r["expert_cache_policy"] == DEFAULT_POLICY
    assert r["expected_hit_rate"] == pytest.approx(hits / uses, abs=5e-5)
    assert r["policy_hit_rates"][DEFAULT_POLICY] == r["expected_hit_rate"]
    assert r["disk_bytes_per_token"] == int((uses - hits) * stride / 120)  # the dense weights fit
    assert r["expected_hit_rate"] <= r["belady_hit_rate"] <= 1
    assert r["belady_disk_bytes_per_token"] <= r["disk_bytes_per_token"]
    bw = r["read_bandwidth_gbps"] * 1e9
    mem = r["dense_bytes_per_token"] + hits * stride / 120
    want = 1 / (mem / bw + r["disk_bytes_per_token"] / (DISK_GBPS * 1e9))
    assert r["expected_decode_tokens_per_s"] == pytest.approx(want, rel=0.02)
    assert r["belady_decode_tokens_per_s"] >= r["expected_decode_tokens_per_s"]
    # the same budget without the trace: uniform routing, as before
    u = plan(str(moe_path), memory=str(kv + dense + slots * stride + stride // 2))
    assert u["routing"] == "uniform" and u["trace_tokens"] is None and u["belady_hit_rate"] is None
    assert u["expert_cache_bundles"] == slots


def test_a_trace_whose_experts_all_fit_misses_only_on_first_use(empty_home, moe_path, tmp_path):
    dense, stride, kv = header_sizes(moe_path)
    # 3 experts per layer in turn, 6 in all: a 6-bundle cache misses each once, and never again
    steps = [(layer, [t % 3, (t + 1) % 3]) for t in range(50) for layer in (0, 1)]
    trace = write_trace(tmp_path / "trace.jsonl", steps, 2)
    r = plan(str(moe_path), memory=str(kv + dense + 6 * stride), trace=trace)
    assert r["expert_cache_bundles"] == 6
    assert r["expected_hit_rate"] == pytest.approx(1 - 6 / 200, abs=5e-5) == r["belady_hit_rate"]
    assert r["disk_bytes_per_token"] == int(6 * stride / 50)
    # and when the whole model fits, the trace changes nothing
    big = plan(str(moe_path), memory="1G", trace=trace)
    assert big["fits_in_memory"] is True and big["routing"] == "trace" and big["disk_bytes_per_token"] == 0
    assert big["expected_hit_rate"] == 1.0 and big["expert_cache_bundles"] == 16


def test_a_trace_the_engine_wrote_is_read_by_plan(empty_home, moe_path, tmp_path):
    from lmcli.api import load
    from lmcli.cli import _write_trace

    m = load(str(moe_path), routing_trace=True)
    final = list(m.generate(m.tokenize("hello there"), max_tokens=4, temp=0.0, ignore_eos=True))[-1]
    path = tmp_path / "engine.jsonl"
    _write_trace(path, final.stats.trace)
    dense, stride, kv = header_sizes(moe_path)
    r = plan(str(moe_path), memory=str(kv + dense + 8 * stride), trace=path)
    assert r["routing"] == "trace" and r["trace_tokens"] >= 5
    assert 0 <= r["expected_hit_rate"] <= r["belady_hit_rate"] <= 1


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"pos": 0, "layer": 0, "experts": [1, 2]}\n{"pos": 1, "layer": 0, "experts": [1,\n', "line 2 is not JSON"),
    ('{"pos": 0, "layer": 2, "experts": [1, 2]}\n', "layer 2 has no routed experts"),
    ('{"pos": 0, "layer": -1, "experts": [1, 2]}\n', "layer -1 has no routed experts"),
    ('{"pos": 0, "layer": 1, "experts": [1, 8]}\n', "expert 8 is out of range"),
    ('{"pos": 0, "layer": 1, "experts": [3, 3]}\n', "listed twice"),
    ('{"pos": 0, "layer": 1}\n', 'integer "layer" and a list of integer "experts"'),
    ('[0, [1, 2]]\n', 'integer "layer" and a list of integer "experts"'),
    ('{"layer": "0", "experts": [1, 2]}\n', 'integer "layer"'),
])
def test_a_bad_trace_is_one_error_line_and_exit_2(tmp_path, moe_path, content, message):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(content)
    r = lmcli("plan", str(moe_path), "--memory", "6M", "--trace", str(trace), "--json", home=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --trace") and message in r.stderr


def test_plan_trace_missing_file_or_without_a_model_index(tmp_path, moe_path):
    r = lmcli("plan", str(moe_path), "--trace", str(tmp_path / "nope.jsonl"), home=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read it" in r.stderr
    trace = write_trace(tmp_path / "t.jsonl", [(0, [0, 1])], 1)
    r = lmcli("plan", "mixtral", "--trace", str(trace), home=tmp_path)  # a registry entry: no tensor index yet
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "registry entry" in r.stderr


def test_plan_trace_on_the_command_line_prints_json(tmp_path, moe_path):
    trace = write_trace(tmp_path / "t.jsonl", skewed_steps(n_tok=30), 2)
    r = lmcli("plan", str(moe_path), "--memory", "10M", "--trace", str(trace), "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["routing"] == "trace" and obj["trace_tokens"] == 30
    assert set(obj["policy_hit_rates"]) == set(POLICIES)


@pytest.mark.parametrize("mib,n_ctx,verdict", [(1024, 64, "read into RAM"), (7.2, 64, "read into RAM"),
                                               (10, 4096, "mapped from the file"), (4.0, 64, "expert cache"),
                                               (2.5, 64, "expert cache"), (1.0, 64, "refused")])
def test_plan_says_what_run_decides_for_each_memory_size(moe_path, monkeypatch, mib, n_ctx, verdict):
    """One rule (lmcli.memory.residency): for the same available memory, plan's verdict on where the weights live
    and how large the expert cache is equals what loading the model does. HEADROOM is lowered so that a model of a
    few MB crosses every branch: read into RAM, mapped, mapped with an expert cache of a few bundles, refused."""
    import lmcli.engine.model as engine_model
    import lmcli.memory as memory
    from lmcli.api import load
    from lmcli.engine.expert_cache import MemoryBudgetError
    from lmcli.engine.options import EngineOptions

    monkeypatch.setattr(memory, "HEADROOM", 0)
    avail = int(mib * (1 << 20))
    monkeypatch.setattr(engine_model, "available", lambda: avail)
    opts = EngineOptions(n_ctx=n_ctx)
    p = plan(str(moe_path), memory=str(avail), options=opts)
    assert verdict in p["weights"] or verdict == "refused"
    try:
        tr = load(str(moe_path), opts).transformer
    except MemoryBudgetError:
        assert verdict == "refused"
        assert "run refuses" in p["weights_why"] and p["expert_cache_bundles"] < p["n_expert_used"]
        return
    assert verdict != "refused" and "run refuses" not in p["weights_why"]
    assert tr.container.resident == (p["weights"] == "read into RAM")
    cache = tr.expert_cache
    assert (cache is None) == (p["expert_cache_bytes"] is None)
    if cache is not None:
        assert cache.n_slots == p["expert_cache_bundles"] and cache.slot_size == p["expert_bundle_bytes"]
        assert p["fits_in_memory"] == (cache.n_slots >= 16)
    elif tr.container.resident:
        assert p["fits_in_memory"] and p["disk_bytes_per_token"] == 0


def test_the_memory_cgroup_of_this_process_gives_limit_and_usage(tmp_path):
    from lmcli.memory import cgroup_memory

    proc = tmp_path / "cgroup"
    proc.write_text("12:cpu:/a\n4:memory:/lmcli/run1\n0::/\n")
    own = tmp_path / "memory" / "lmcli" / "run1"
    own.mkdir(parents=True)
    (own / "memory.limit_in_bytes").write_text("1073741824\n")
    (own / "memory.usage_in_bytes").write_text("268435456\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    assert cgroup_memory(tmp_path, proc) == (1 << 30, 1 << 28)  # its own cgroup first, as the engine reads it


def test_a_bad_lmcli_ctx_size_is_refused_by_plan_as_by_run(empty_home, moe_path, monkeypatch):
    """One context rule (lmcli.memory.context_size): plan used to ignore a bad LMCLI_CTX_SIZE that run refuses."""
    from lmcli.api import load

    monkeypatch.setenv("LMCLI_CTX_SIZE", "lots")
    for call in (lambda: plan(str(moe_path), memory="1G"), lambda: load(str(moe_path))):
        with pytest.raises(UsageError, match="LMCLI_CTX_SIZE must be an integer, got 'lots'"):
            call()
    monkeypatch.setenv("LMCLI_CTX_SIZE", "256")
    assert plan(str(moe_path), memory="1G")["n_ctx"] == 256 == load(str(moe_path)).n_ctx
