"""Real weights: lmcli on the packaged SmolLM2 Q4_1 GGUF against transformers loading the same GGUF."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the test extra installs it; a missing extra fails loudly below
transformers = pytest.importorskip("transformers")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
    "capital of Germany. In 1969, humans first walked on the Moon; it was a remarkable achievement for "
    "science and engineering. Today, millions of people use computers to write code, send messages, "
    "and learn new things every day."
)
# Stated tolerance: lmcli quantizes activations to int16 per group of 32, so its logits differ from
# float32 math by ~1e-4 of the largest logit (measured 3.4e-4 max on this text).
MAX_REL_ERR = 2e-3

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "List three colors of the rainbow.",
]


@pytest.fixture(scope="module")
def hf(smol_gguf):
    d, f = str(smol_gguf.parent), smol_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return tok, model


@pytest.fixture(scope="module")
def lm(smol_container):
    import lmcli

    return lmcli.load(str(smol_container), n_ctx=1024)


def test_logits_agree_with_transformers_on_real_text(hf, lm):
    tok, model = hf
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > 50
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = lm.logits(ids)
    assert got.shape == ref.shape == (len(ids), 49152)
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    rel = np.abs(got - ref).max(-1) / np.abs(ref).max(-1)
    assert rel.max() < MAX_REL_ERR


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_equals_transformers_for_32_tokens(hf, lm, prompt):
    tok, model = hf
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == lm.chat_ids([{"role": "user", "content": prompt}])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    ref = out[0, len(ids):].tolist()
    # both mask end-of-text for all 32 tokens (transformers: min_new_tokens; lmcli: ignore_eos)
    events = list(lm.generate(ids, max_tokens=32, temp=0.0, ignore_eos=True))
    got = events[-1].tokens
    assert len(got) == 32
    assert got == ref


def test_logits_from_a_fresh_cache_do_not_depend_on_earlier_calls(lm):
    ids = lm.tokenize("Hello there, how are you?")
    a = lm.logits(ids)
    lm.logits(lm.tokenize("Something else entirely, and longer than before."))
    assert np.array_equal(a, lm.logits(ids))


def test_decode_with_cache_equals_full_recompute(lm):
    ids = lm.tokenize("One, two, three, four, five")
    full = lm.logits(ids)
    cache = lm.new_cache()
    lm.transformer.forward(ids[:-3], cache)
    step = [lm.transformer.forward([t], cache)[0] for t in ids[-3:]]
    np.testing.assert_allclose(np.stack(step), full[-3:], rtol=0, atol=1e-3 * np.abs(full).max())
