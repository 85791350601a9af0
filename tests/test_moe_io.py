"""Only routed experts are read: page residency (mincore) and the instrumented byte count, on a synthetic
Mixtral-shaped container whose zero router always picks experts 0 and 1."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

from quant.synthetic import write_synthetic_moe

libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(addr: int, length: int) -> np.ndarray:
    """mincore(2) over [addr, addr+length): one bool per page."""
    page = mmap.PAGESIZE
    start = addr - addr % page
    n = (addr + length - start + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * page), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return np.frombuffer(vec, np.uint8).astype(bool)


def resident_file_pages(path) -> np.ndarray:
    """Which pages of the file are in the page cache (mincore over a fresh mapping)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = np.frombuffer(mm, np.uint8)
        addr = buf.ctypes.data
        pages = resident_pages(addr, len(mm))
        del buf
    return pages


def drop_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def zero_router_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("moe") / "zero.lmc"
    write_synthetic_moe(p, n_layer=2, n_embd=256, n_ff_exp=1024, n_expert=8, n_expert_used=2, n_head=4,
                        n_head_kv=2, vocab=512, router="zero")
    return p


def test_unselected_experts_are_never_paged_in(zero_router_model):
    import lmcli

    drop_cache(zero_router_model)
    m = lmcli.load(str(zero_router_model), n_ctx=64, use_mmap=True)  # a small file is otherwise read into RAM
    assert not m.container.resident
    base = m.container._buf.ctypes.data
    layers = [L.ffn.experts for L in m.transformer.weights.layers]
    assert all(not resident_pages(base + ex.base, ex.stride * ex.n_expert).any() for ex in layers), \
        "expert pages resident before any token ran"
    events = list(m.generate(m.tokenize("hello there"), max_tokens=4, temp=0.0))
    assert events[-1].finish_reason
    for ex in layers:
        for e in range(ex.n_expert):
            pages = resident_pages(base + ex.base + e * ex.stride, ex.bundle_nbytes)
            if e < 2:
                assert pages.all(), f"routed expert {e} not read"
            else:
                assert not pages.any(), f"unrouted expert {e}: {pages.sum()} of {pages.size} pages resident"


def test_instrumented_bytes_equal_the_routed_bundles(zero_router_model):
    import lmcli

    m = lmcli.load(str(zero_router_model), n_ctx=64)
    events = list(m.generate(m.tokenize("hello"), max_tokens=5, temp=0.0, ignore_eos=True))
    tm = events[-1].timings
    ex = m.transformer.weights.layers[0].ffn.experts
    assert tm.decode_steps == 4
    assert tm.expert_bytes_per_token == 2 * 2 * ex.bundle_nbytes  # 2 layers x 2 experts, each bundle once
    hist = m.transformer.stats.hist
    assert hist[:, 2:].sum() == 0 and (hist[:, :2] > 0).all()
    # the final event's routing: every token of the prompt, then of every decode step, in experts 0 and 1 only
    st, n_prompt = events[-1].stats, len(m.tokenize("hello"))
    assert (st.hist_prefill[:, :2] == n_prompt).all() and (st.hist_decode[:, :2] == 4).all()
    assert st.hist[:, 2:].sum() == 0 and np.array_equal(st.hist, hist)  # the model's first run: all of it
    assert st.usage() == {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}
    assert st.trace == [] and st.expert_cache is None  # not traced; no expert cache on a file that fits


def test_a_run_cut_short_reports_its_figures_so_far(zero_router_model):
    import lmcli

    m = lmcli.load(str(zero_router_model), n_ctx=64, routing_trace=True)
    ids = m.tokenize("hello")
    gen = m.generate(ids, max_tokens=10, temp=0.0, ignore_eos=True)
    toks = [next(gen).token for _ in range(3)]  # the prompt's logits give the first; two decode steps the rest
    gen.close()
    st = gen.stats()
    assert st.finish_reason == "interrupted" and st.timings.completion_tokens == 3 and st.timings.decode_steps == 2
    assert (st.hist_prefill[:, :2] == len(ids)).all() and (st.hist_decode[:, :2] == 2).all()
    # one trace entry per forward call and MoE layer, at the position of the call's first token
    n = len(ids)
    assert [(pos, layer) for pos, layer, _, _ in st.trace] == [(0, 0), (0, 1), (n, 0), (n, 1), (n + 1, 0),
                                                              (n + 1, 1)]
    assert all(set(e.reshape(-1).tolist()) == {0, 1} for _, _, e, _ in st.trace)
    # the next run counts from zero, and repeats the same tokens
    final = list(m.generate(ids, max_tokens=3, temp=0.0, ignore_eos=True))[-1]
    assert final.tokens == toks and final.stats.finish_reason == "length"
    assert len(final.stats.trace) == 6 and (final.stats.hist_decode[:, :2] == 2).all()


def test_the_instrument_sees_each_phase_unnested_and_changes_nothing(zero_router_model):
    import contextlib

    import lmcli

    m = lmcli.load(str(zero_router_model), n_ctx=64)
    ids = list(range(1, 12))
    a = m.logits(ids)
    seen, depth = [], [0]

    @contextlib.contextmanager
    def instrument(phase):
        seen.append(phase)
        depth[0] += 1
        assert depth[0] == 1, "phases nest"
        yield
        depth[0] -= 1

    m.transformer.instrument = instrument
    b = m.logits(ids)
    m.transformer.instrument = None
    assert np.array_equal(a, b)
    n_layer = m.config.n_layer
    assert seen.count("attention") == seen.count("routing") == seen.count("experts") == n_layer
    assert set(seen) == {"matmul", "attention", "routing", "experts"}
    n_seen = len(seen)
    m.logits(ids)
    assert len(seen) == n_seen  # unset: not called again


def test_moe_topk_changes_the_experts_read(zero_router_model):
    import lmcli

    m = lmcli.load(str(zero_router_model), n_ctx=64, moe_topk=3)
    events = list(m.generate(m.tokenize("hello"), max_tokens=3, temp=0.0, ignore_eos=True))
    ex = m.transformer.weights.layers[0].ffn.experts
    assert events[-1].timings.expert_bytes_per_token == 2 * 3 * ex.bundle_nbytes


def test_weights_are_read_into_ram_when_the_file_fits_and_mapped_with_mmap(zero_router_model):
    """Default: the file is copied into anonymous memory (huge pages), mapped with use_mmap=True (--mmap);
    both give the same logits bit for bit, and in RAM no page of the file needs to stay cached."""
    import lmcli

    ids = list(range(1, 12))
    drop_cache(zero_router_model)
    m = lmcli.load(str(zero_router_model), n_ctx=64)
    assert m.container.resident
    a = m.logits(ids)
    drop_cache(zero_router_model)
    assert np.array_equal(a, m.logits(ids))
    assert not resident_file_pages(zero_router_model).any(), "the engine read the file again"
    b = lmcli.load(str(zero_router_model), n_ctx=64, use_mmap=True)
    assert not b.container.resident
    assert np.array_equal(a, b.logits(ids))


@pytest.mark.parametrize("k", [0, 9])
def test_moe_topk_outside_the_expert_count_is_a_usage_error(zero_router_model, k):
    import lmcli
    from lmcli.errors import UsageError

    with pytest.raises(UsageError, match="moe-topk"):
        lmcli.load(str(zero_router_model), moe_topk=k)


def _cli(*args, home):
    import subprocess
    import sys

    env = dict(os.environ, LMCLI_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "lmcli.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_routing_trace_and_json_report_the_routed_experts(zero_router_model, tmp_path):
    import json

    trace = tmp_path / "trace.jsonl"
    r = _cli("run", str(zero_router_model), "hi", "--raw", "-n", "3", "--temp", "0", "--ignore-eos", "--json",
             "--routing-trace", str(trace), home=tmp_path)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    hist = np.array(obj["routing_histogram"])
    assert hist.shape == (2, 8) and hist[:, 2:].sum() == 0
    assert obj["expert_bytes_per_token"] > 0
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    n_tokens = obj["prompt_tokens"] + obj["completion_tokens"] - 1  # the last sampled token is not run
    assert len(lines) == 2 * n_tokens
    assert all(sorted(x["experts"]) == [0, 1] and abs(sum(x["weights"]) - 1) < 1e-5 for x in lines)


def test_moe_topk_above_the_expert_count_is_one_clear_line(zero_router_model, tmp_path):
    r = _cli("run", str(zero_router_model), "hi", "--moe-topk", "9", home=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "moe-topk" in r.stderr


def test_unknown_router_kind_in_a_container_is_a_clear_error(tmp_path):

    from quant.container import Container

    p = tmp_path / "bad.lmc"
    write_synthetic_moe(p, n_layer=1, n_embd=64, n_ff_exp=64, n_expert=4, n_head=2, n_head_kv=1, vocab=300)
    raw = bytearray(p.read_bytes())
    hlen = int.from_bytes(raw[16:24], "little")
    header = raw[24 : 24 + hlen].decode().replace('"router":"softmax"', '"router":"cosine!"')
    assert len(header) == hlen
    p.write_bytes(bytes(raw[:24]) + header.encode() + bytes(raw[24 + hlen :]))
    assert Container(p).metadata["config"]["router"] == "cosine!"
    r = _cli("run", str(p), "hi", home=tmp_path)
    assert r.returncode == 1 and "unknown router" in r.stderr and "Traceback" not in r.stderr
