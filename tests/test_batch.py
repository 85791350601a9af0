"""Batched decode (issue 21): one forward over one token from each of B sequences, each with its own KV cache and
position, against transformers run on each sequence alone (the independent reference) and against the engine's
own one-sequence forward; B == 1 is that forward bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_models  # noqa: E402
from test_architectures import TIGHT, _lmcli, _ref_logits, _rel, rounded_reference  # noqa: E402

from lmcli.generate import Step, run_steps  # noqa: E402
from lmcli.sampling import SamplerParams  # noqa: E402


@pytest.fixture(scope="module", params=tiny_models.ARCHS)
def arch_model(request, tmp_path_factory):
    d = tiny_models.build(request.param, tmp_path_factory.mktemp(request.param) / "hf")
    return request.param, d, _lmcli(d, "f16", d.parent)


def _prompts(m, lengths, seed=3):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, m.config.vocab_size, n)] for n in lengths]


def test_a_batch_of_one_is_the_one_sequence_forward_bit_for_bit(arch_model):
    arch, _, m = arch_model
    tr = m.transformer
    ids = _prompts(m, [9])[0]
    a, b = tr.new_cache(), tr.new_cache()
    tr.forward(ids[:-1], a)
    tr.forward(ids[:-1], b)
    one = tr.forward([ids[-1]], a)
    batch = tr.forward_batch([ids[-1]], [b])
    assert np.array_equal(one, batch) and a.n_past == b.n_past == len(ids), arch


def test_batched_decode_equals_each_sequence_alone_and_transformers(arch_model):
    """Four sequences at different positions (prompts of 3, 11, 7 and 20 tokens) decode four steps together."""
    arch, d, m = arch_model
    tr = m.transformer
    seqs = _prompts(m, [3 + 4, 11 + 4, 7 + 4, 20 + 4])
    caches = [tr.new_cache() for _ in seqs]
    for s, c in zip(seqs, caches):
        tr.forward(s[:-4], c)
    got = [[] for _ in seqs]
    for k in range(4, 0, -1):
        logits = tr.forward_batch([s[-k] for s in seqs], caches)
        assert logits.shape == (len(seqs), m.config.vocab_size)
        for i in range(len(seqs)):
            got[i].append(logits[i])
    ref = rounded_reference(d, "f16")
    for s, c, g in zip(seqs, caches, got):
        assert c.n_past == len(s)
        alone = tr.new_cache()
        tr.forward(s[:-4], alone)
        each = np.stack([tr.forward([t], alone)[0] for t in s[-4:]])
        assert _rel(np.stack(g), each) < 1e-4, arch  # the engine's own one-sequence decode
        assert _rel(np.stack(g), _ref_logits(ref, s)[-4:]) < TIGHT, arch  # transformers on that sequence alone


def test_a_batch_refuses_a_cache_given_twice_and_a_full_cache(arch_model):
    from lmcli.errors import ContextOverflow

    _, _, m = arch_model
    tr = m.transformer
    a = tr.new_cache(4)
    with pytest.raises(ValueError, match="twice"):
        tr.forward_batch([5, 6], [a, a])
    tr.forward([5, 6, 7, 8], a)
    with pytest.raises(ContextOverflow):
        tr.forward_batch([5, 6], [a, tr.new_cache(4)])


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_greedy_generations_stepped_together_equal_each_alone(arch, tmp_path):
    """Generations driven through raw() with their steps batched by run_steps give the tokens each gives
    iterated alone, and those equal transformers' greedy tokens."""
    d = tiny_models.build(arch, tmp_path / "hf")
    m = _lmcli(d, "f16", tmp_path)
    prompts = _prompts(m, [5, 12, 8], seed=7)
    alone = [list(m.generate(p, max_tokens=12, temp=0.0, ignore_eos=True))[-1].tokens for p in prompts]
    ref = rounded_reference(d, "f16")
    for p, toks in zip(prompts, alone):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert toks == out[0, len(p):].tolist(), arch
    gens = [m.generate(p, max_tokens=12, sampler=SamplerParams(temp=0.0), ignore_eos=True) for p in prompts]
    its = [g.raw() for g in gens]
    pending = {i: next(it) for i, it in enumerate(its)}
    finals = {}
    while pending:
        steps = {}
        for i, item in list(pending.items()):
            while type(item) is not Step:  # events: go on to the next step, or the end
                if item.finish_reason is not None:
                    finals[i] = item.tokens
                    del pending[i]
                    break
                item = next(its[i])
            else:
                steps[i] = item
        if not steps:
            break
        logits = run_steps(m.transformer, list(steps.values()), m.thread_policy)
        for (i, _), lg in zip(steps.items(), logits):
            pending[i] = its[i].send(lg)
    assert [finals[i] for i in range(len(prompts))] == alone
