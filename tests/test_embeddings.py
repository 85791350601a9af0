"""Embeddings: lmcli.Model.embed against transformers' final hidden states, and /v1/embeddings, /api/embed and
/api/embeddings through the openai and ollama clients."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

torch = pytest.importorskip("torch")

import tiny_models  # noqa: E402
from test_server import httpx, running  # noqa: E402  (httpx: the openai package's HTTP client)

from lmcli.server import create_app  # noqa: E402


def _f16_reference(model_dir):
    ref = tiny_models.reference_model(model_dir)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2 and not name.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.copy_(p.half().float())  # as lmcli's f16 container stores every matrix (routers stay f32)
    return ref


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_embed_is_transformers_final_hidden_state_pooled(arch, tmp_path):
    """Mean over tokens of the final-normed hidden states (transformers' last hidden_states entry), unit length;
    "last" takes the last token's."""
    import lmcli
    from quant.convert import convert_hf

    d = tiny_models.build(arch, tmp_path / "hf")
    convert_hf(d, tmp_path / "m.lmc", "f16")
    m = lmcli.load(str(tmp_path / "m.lmc"), n_ctx=64)
    ids = [int(t) for t in np.random.default_rng(5).integers(3, tiny_models.vocab_size(), 21)]
    with torch.no_grad():
        h = _f16_reference(d)(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].double().numpy()
    want = h.mean(0) / np.linalg.norm(h.mean(0))
    got = m.embed(ids)
    assert got.shape == (h.shape[1],) and abs(np.linalg.norm(got) - 1) < 1e-5
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    raw = m.embed(ids, normalize=False, pooling="last")
    assert np.abs(raw - h[-1]).max() < 2e-3 * np.abs(h[-1]).max()


@pytest.fixture(scope="module")
def server(lmcli_home):
    app = create_app("smollm2", n_ctx=512, log=lambda line: None)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def smol(lmcli_home):
    import lmcli

    return lmcli.load("smollm2", n_ctx=512)


TEXTS = ["The capital of France is Paris.", "Numbers: 1, 2, 3", "日本語"]


def test_openai_client_embeddings_equal_the_library(server, smol):
    """The openai package asks for base64 by default and decodes it; both encodings give the library's vectors."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)
    r = client.embeddings.create(model="smollm2", input=TEXTS)
    assert [e.index for e in r.data] == [0, 1, 2] and r.model == "smollm2"
    assert r.usage.prompt_tokens == sum(len(smol.tokenize(t)) for t in TEXTS)
    for e, t in zip(r.data, TEXTS):
        assert np.allclose(e.embedding, smol.embed(t), atol=1e-6)
    f = client.embeddings.create(model="smollm2", input="hello", encoding_format="float")
    assert np.allclose(f.data[0].embedding, smol.embed("hello"), atol=1e-6)
    ids = smol.tokenize("hello")
    assert np.allclose(client.embeddings.create(model="smollm2", input=ids).data[0].embedding,
                       smol.embed("hello"), atol=1e-6)


def test_base64_is_little_endian_float32(server, smol):
    r = httpx.post(f"{server}/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}, timeout=60)
    v = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    assert np.array_equal(v, smol.embed("hello"))


def test_ollama_client_embed_and_legacy_embeddings(server, smol):
    import ollama

    c = ollama.Client(host=server)
    r = c.embed(model="smollm2", input=TEXTS[:2])
    assert len(r.embeddings) == 2 and r.prompt_eval_count == sum(len(smol.tokenize(t)) for t in TEXTS[:2])
    assert np.allclose(r.embeddings[1], smol.embed(TEXTS[1]), atol=1e-6)
    legacy = c.embeddings(model="smollm2", prompt="hello")
    assert np.allclose(legacy.embedding, smol.embed("hello", normalize=False), atol=1e-4)


@pytest.mark.parametrize("body,words", [
    ({"input": ""}, "empty"),
    ({"input": []}, "input must be"),
    ({"input": [1.5]}, "input must be"),
    ({"input": [[]]}, "input must be"),
    ({"input": [10**9]}, "token ids"),
    ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "hi", "dimensions": 3}, "dimensions"),
    ({"input": "word " * 600}, "context"),
])
def test_bad_embedding_requests_are_400(server, body, words):
    r = httpx.post(f"{server}/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_an_unknown_model_is_404(server):
    r = httpx.post(f"{server}/v1/embeddings", json={"input": "hi", "model": "no-such-model"}, timeout=60)
    assert r.status_code == 404
