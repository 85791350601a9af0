"""The OpenAI-compatible server: a real uvicorn on a free port, driven by the openai package and raw HTTP.

References: the library itself (lmcli.load("smollm2") generating at temperature 0) for texts and token counts,
and OpenAI's API shapes as the openai client parses them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import os
import re
import socket
import threading
import time

import numpy as np
import openai
import pytest
import uvicorn

try:
    import httpx
except ImportError:  # the openai package here depends on httpx2, an httpx fork with the same API
    import httpx2 as httpx

from lmcli.errors import UsageError
from lmcli.sampling import SamplerParams
from lmcli.server import create_app, model_id, serve

KEY = "sk-test-0123456789"
ORIGIN = "http://localhost:5173"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@contextlib.contextmanager
def running(app):
    """app served by uvicorn on a free 127.0.0.1 port in a background thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def log_lines():
    return []


@pytest.fixture(scope="module")
def main(lmcli_home, log_lines):
    """smollm2 behind an API key, with CORS for one origin; (base URL, app)."""
    app = create_app("smollm2", api_key=KEY, cors_origin=ORIGIN, n_ctx=2048, log=log_lines.append)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def busy(lmcli_home):
    """smollm2 without a key, a 512-token context, one generation at a time and room for one waiting request;
    (base URL, app)."""
    app = create_app("smollm2", queue_size=1, parallel=1, n_ctx=512, log=lambda line: None)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(main):
    return openai.OpenAI(base_url=f"{main[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref(lmcli_home):
    """The same model in this process: the reference for texts and token counts."""
    import lmcli

    return lmcli.load("smollm2", n_ctx=2048)


def _ref_generate(model, ids, max_tokens):
    evs = list(model.generate(ids, max_tokens=max_tokens, sampler=SamplerParams(temp=0.0)))
    return "".join(e.text for e in evs), evs[-1]


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


# --- answers -------------------------------------------------------------------------------------

def test_chat_completion_answers_the_question(client):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=30)
    assert r.object == "chat.completion" and r.model == "smollm2"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_streamed_chunks_join_to_the_non_streamed_text(client):
    msgs = [{"role": "user", "content": "Name three colors of the rainbow."}]
    whole = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=40,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_continues_a_prompt_as_the_library_does(client, ref):
    prompt = "The three primary colors are"
    text, final = _ref_generate(ref, ref.tokenize(prompt), 12)
    r = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.choices[0].finish_reason == final.finish_reason
    streamed = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_usage_counts_equal_the_tokenizer_counts(client, ref):
    ids = ref.chat_ids(QUESTION)
    _, final = _ref_generate(ref, ids, 20)
    u = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20).usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(ids), len(final.tokens))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    u = client.completions.create(model="smollm2", prompt="Hello there", temperature=0, max_tokens=5).usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(ref.tokenize("Hello there")), 5)


def test_include_usage_ends_the_stream_with_a_usage_chunk(client):
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


# Log-probabilities: the reference is a float64 log-softmax of the library's logits over the whole sequence in one
# forward; the server's come from step-by-step decoding (measured: equal within 3e-15 on SmolLM2).
LOGPROB_TOL = 1e-6


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def test_chat_logprobs_are_the_log_softmax_of_the_models_logits(client, ref):
    ids = ref.chat_ids(QUESTION)
    _, final = _ref_generate(ref, ids, 10)
    gen = final.tokens
    lz = _log_softmax(ref.logits(ids + gen)[len(ids) - 1: len(ids) - 1 + len(gen)])  # row k predicts gen[k]
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=10,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [ref.detokenize([t]) for t in gen]
    for k, (c, t) in enumerate(zip(content, gen)):
        top = np.argsort(-lz[k], kind="stable")[:3]
        assert abs(c.logprob - lz[k, t]) < LOGPROB_TOL
        assert [a.token for a in c.top_logprobs] == [ref.detokenize([i]) for i in top]
        assert np.abs(np.array([a.logprob for a in c.top_logprobs]) - lz[k, top]).max() < LOGPROB_TOL
        assert c.bytes == list(c.token.encode())
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=10,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [c.model_dump() for c in content]
    plain = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=10)
    assert plain.choices[0].logprobs is None


def test_logprobs_without_alternatives_and_top_logprobs_alone(client, main):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=3, logprobs=True)
    assert len(r.choices[0].logprobs.content) == 3 and all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    body = {"model": "smollm2", "messages": QUESTION, "top_logprobs": 2}
    r = httpx.post(f"{main[0]}/v1/chat/completions", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_penalties_change_a_greedy_answer_as_the_sampler_does(client, ref):
    """A penalty strong enough changes the text; the server's equals the library's with the same penalties."""
    msgs = [{"role": "user", "content": "Repeat the word 'yes' ten times."}]
    base, _ = _ref_generate(ref, ref.chat_ids(msgs), 20)
    evs = list(ref.generate(ref.chat_ids(msgs), max_tokens=20,
                            sampler=SamplerParams(temp=0.0, frequency_penalty=1.5, presence_penalty=0.5)))
    want = "".join(e.text for e in evs)
    r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=20,
                                       frequency_penalty=1.5, presence_penalty=0.5)
    assert r.choices[0].message.content == want != base


def test_model_list_has_the_store_and_the_default(client, lmcli_home):
    from lmcli.store import list_models

    ids = {m.id for m in client.models.list().data}
    assert "smollm2" in ids and {m["name"] for m in list_models()} <= ids
    assert client.models.retrieve("smollm2").id == "smollm2"


def test_a_default_given_as_a_path_is_listed_by_its_stem():
    assert model_id("/home/me/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert model_id("/home/me/.lmcli/models/mixtral/model.lmc") == "mixtral"


def test_a_chat_template_in_the_request_is_ignored(client):
    kw = dict(model="smollm2", messages=QUESTION, temperature=0, max_tokens=10)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    hostile = client.chat.completions.create(
        **kw, extra_body={"chat_template": "{{ raise_exception('from the request') }}"}).choices[0].message.content
    assert hostile == plain


def test_health_answers_without_a_key(main):
    r = httpx.get(f"{main[0]}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_a_model_named_in_the_request_is_loaded_from_the_store_in_place_of_the_last(busy, lmcli_home):
    src, alias = lmcli_home / "models" / "smollm2", lmcli_home / "models" / "smol-alias"
    alias.mkdir()
    try:
        for f in src.iterdir():
            os.link(f, alias / f.name)
        url, app = busy
        body = {"messages": QUESTION, "temperature": 0, "max_tokens": 8}
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "smol-alias"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "smol-alias"
        assert app.state.engine.model_id == "smol-alias"
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.json()["model"] == "smollm2" and app.state.engine.model_id == "smollm2"
    finally:
        for f in alias.iterdir():
            f.unlink()
        alias.rmdir()


def test_a_model_with_a_hostile_template_cannot_hold_the_worker(busy, lmcli_home):
    """Issue 19 (1): a template that loops for minutes used to wedge the only worker for good. It is stopped by its
    budget within seconds, answered as an error, and the next client is served."""
    import shutil
    import struct

    src, bad = lmcli_home / "models" / "smollm2", lmcli_home / "models" / "hostile"
    bad.mkdir()
    try:
        shutil.copy(src / "manifest.json", bad / "manifest.json")
        raw = bytearray((src / "model.lmc").read_bytes())
        hlen = struct.unpack_from("<Q", raw, 16)[0]
        header = json.loads(raw[24:24 + hlen])
        header["metadata"]["chat_template"] = ("{% for i in range(100000) %}{% for j in range(100000) %}"
                                               "{% endfor %}{% endfor %}x")
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        assert len(new) <= hlen
        raw[24:24 + hlen] = new + b" " * (hlen - len(new))  # same length: the tensors stay where they are
        (bad / "model.lmc").write_bytes(bytes(raw))
        url, _ = busy
        t = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "hostile", "messages": QUESTION}, timeout=60)
        assert time.monotonic() - t < 20 and r.status_code in (400, 422, 500), r.text
        assert "chat template" in r.json()["error"]["message"]
        body = {"messages": QUESTION, "temperature": 0, "max_tokens": 8}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        shutil.rmtree(bad)


# --- the queue and disconnects -----------------------------------------------------------------------

def test_concurrent_requests_are_queued_and_all_answered(client):
    def ask(_):
        r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
        return r.choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert len(set(answers)) == 1 and "Paris" in answers[0]  # greedy: one engine, no cross-talk


def test_a_full_queue_answers_503_with_retry_after(busy):
    url, app = busy
    long = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(timeout=60) as a:
        with a.stream("POST", f"{url}/v1/completions", json=long) as running_one:
            assert running_one.status_code == 200
            lines = running_one.iter_lines()  # kept: dropping a half-read iterator closes the connection
            next(line for line in lines if line.startswith("data: "))  # it is generating
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=60,
                                      json={"messages": QUESTION, "temperature": 0, "max_tokens": 8})
                deadline = time.monotonic() + 10
                while app.state.stats.waiting < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                r = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8})
                assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "server_overloaded"
                running_one.close()  # the long one stops; the waiting one runs
                assert waiting.result().status_code == 200


def test_a_client_that_disconnects_mid_stream_stops_the_generation(client, main):
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=1500,
                                            stream=True, extra_body={"ignore_eos": True})
    for i, chunk in enumerate(stream):
        if i == 5:
            break
    stream.close()
    stat = main[1].state.stats.requests[chunk.id]
    deadline = time.monotonic() + 20
    while not stat.done:
        assert time.monotonic() < deadline, "the generation did not stop"
        time.sleep(0.01)
    assert stat.finish_reason == "cancelled" and stat.tokens < 150  # of 1500 asked for
    # within one step: at most the token whose forward pass was under way when the disconnect came
    assert stat.tokens_at_cancel is not None and stat.tokens - stat.tokens_at_cancel <= 1


def test_a_client_that_gives_up_on_a_whole_answer_stops_the_generation(main):
    stats = main[1].state.stats
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{main[0]}/v1/completions", headers=_auth(), timeout=0.5,
                   json={"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True})
    stat = next(reversed(stats.requests.values()))
    deadline = time.monotonic() + 20
    while not stat.done:
        assert time.monotonic() < deadline, "the generation did not stop"
        time.sleep(0.01)
    assert stat.finish_reason == "cancelled" and stat.tokens < 1000
    assert stat.tokens_at_cancel is not None and stat.tokens - stat.tokens_at_cancel <= 1


def test_each_request_logs_one_line(client, log_lines):
    n = len(log_lines)
    t0 = datetime.datetime.now(datetime.timezone.utc)
    client.completions.create(model="smollm2", prompt="Hi", temperature=0, max_tokens=3)
    deadline = time.monotonic() + 5  # the line is written once the response has gone out
    line_re = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) 127\.0\.0\.1:\d+ "
                         r"POST /v1/completions 200 3 tokens \d+ ms")
    while not any(line_re.fullmatch(line) for line in log_lines[n:]):
        assert time.monotonic() < deadline, log_lines[n:]
        time.sleep(0.01)
    assert all(line.endswith(" ms") for line in log_lines[n:])
    when = next(line_re.fullmatch(x) for x in log_lines[n:] if line_re.fullmatch(x)).group(1)
    at = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    assert t0 - datetime.timedelta(seconds=1) <= at <= datetime.datetime.now(datetime.timezone.utc)


# --- abuse -------------------------------------------------------------------------------------------

def test_a_wrong_api_key_is_401(main):
    bad = openai.OpenAI(base_url=f"{main[0]}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    r = httpx.post(f"{main[0]}/v1/chat/completions", json={"messages": QUESTION})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("host,status", [
    ("evil.example", 403), ("evil.example:80", 403), ("127.0.0.1.evil.example", 403), ("localhost:x", 403),
    ("localhost:11435", 200), ("[::1]:8080", 200), ("127.0.0.1", 200), ("LOCALHOST", 200),
])
def test_only_loopback_host_headers_are_served(main, host, status):
    r = httpx.get(f"{main[0]}/v1/models", headers={**_auth(), "Host": host})
    assert r.status_code == status
    if status == 403:
        assert r.json()["error"]["type"] == "permission_error"


def test_a_non_loopback_bind_with_a_key_also_serves_its_own_host(lmcli_home):
    app = create_app("smollm2", api_key=KEY, host="192.168.1.10", log=lambda line: None)
    with running(app) as url:
        for host, status in [("192.168.1.10:11435", 200), ("localhost", 200), ("evil.example", 403)]:
            assert httpx.get(f"{url}/v1/models", headers={**_auth(), "Host": host}).status_code == status


def test_a_50_mb_body_is_413(main):
    # A raw socket: the server must refuse from Content-Length alone, before the body is sent (httpx racing a
    # 50 MB upload against the early 413 and the connection close made this flaky).
    host, port = main[0].split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {50 << 20}\r\n\r\n").encode() + b"x" * 4096)
        resp = b""
        while b"\r\n\r\n" not in resp or len(resp.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"413", head
    assert b"request_too_large" in body


def test_a_streamed_body_without_a_length_is_cut_at_the_cap(main):
    chunks = (b" " * (64 << 10) for _ in range(40))  # 2.5 MiB, chunked: no Content-Length to check up front
    r = httpx.post(f"{main[0]}/v1/chat/completions", content=chunks, headers=_auth(), timeout=60)
    assert r.status_code == 413


@pytest.mark.parametrize("field,value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", "10"), ("max_tokens", True),
    ("max_tokens", 4096), ("max_completion_tokens", 10 ** 12),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.1), ("temperature", 2.5),
    ("temperature", "0.5"), ("top_p", 0), ("top_p", 1.5), ("seed", 1.5), ("seed", -1), ("seed", "42"),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", 7), ("n", 2), ("stream", "yes"), ("messages", []),
    ("frequency_penalty", 2.5), ("presence_penalty", "1"), ("logprobs", "yes"), ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}),
    ("top_logprobs", 21),
])
def test_bad_parameters_are_400(main, field, value):
    body = {"model": "smollm2", "messages": QUESTION, field: value}
    r = httpx.post(f"{main[0]}/v1/chat/completions", content=json.dumps(body), headers=_auth(), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_is_400(main):
    r = httpx.post(f"{main[0]}/v1/chat/completions", content=b"{not json", headers=_auth())
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_an_unknown_model_is_404_and_no_path_leaks(client, main):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    for name in ("/etc/passwd", "../smollm2", "x.gguf"):
        r = httpx.post(f"{main[0]}/v1/chat/completions", json={"model": name, "messages": QUESTION}, headers=_auth())
        assert r.status_code == 404 and "/" not in r.json()["error"]["message"]
        assert "Traceback" not in r.text


def test_a_prompt_longer_than_the_context_is_400(busy):
    r = httpx.post(f"{busy[0]}/v1/completions", json={"prompt": "word " * 1000, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_is_capped_by_the_context_left_after_the_prompt(busy, ref):
    prompt = "word " * 400
    n_prompt = len(ref.tokenize(prompt))
    r = httpx.post(f"{busy[0]}/v1/completions", timeout=60,
                   json={"prompt": prompt, "max_tokens": 500, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 512 - n_prompt
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_cors_headers_only_for_the_configured_origin(main, busy):
    allow = "access-control-allow-origin"
    r = httpx.get(f"{main[0]}/v1/models", headers={**_auth(), "Origin": ORIGIN})
    assert r.headers.get(allow) == ORIGIN
    r = httpx.get(f"{main[0]}/v1/models", headers={**_auth(), "Origin": "http://evil.example"})
    assert allow not in r.headers
    pre = httpx.options(f"{main[0]}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers.get(allow) == ORIGIN
    r = httpx.get(f"{busy[0]}/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and allow not in r.headers


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_a_non_loopback_bind_without_a_key_is_refused_before_binding(monkeypatch, host):
    def no_bind(*a, **k):
        raise AssertionError("serve() bound a socket")
    monkeypatch.setattr("lmcli.server._bind", no_bind)
    with pytest.raises(UsageError) as e:
        serve("smollm2", host=host, port=11435)
    assert "--api-key" in e.value.hint


# --- the Ollama API (issue 21), driven by the ollama package's own client ------------------------------------------


def test_ollama_clients_chat_generate_stream_and_list(busy, ref):
    import ollama

    url, _ = busy
    client = ollama.Client(host=url, timeout=120)
    names = [m.model for m in client.list().models]
    assert "smollm2" in names
    r = client.chat(model="smollm2", messages=QUESTION, stream=False, options={"temperature": 0, "num_predict": 24})
    want, final = _ref_generate(ref, ref.chat_ids(QUESTION), 24)
    assert r.message.role == "assistant" and r.message.content == want and "Paris" in want
    assert r.done and r.eval_count == final.stats.usage()["completion_tokens"]
    assert r.prompt_eval_count == len(ref.chat_ids(QUESTION))
    parts = list(client.chat(model="smollm2", messages=QUESTION, stream=True,
                             options={"temperature": 0, "num_predict": 24}))
    assert "".join(p.message.content for p in parts) == want and parts[-1].done and not parts[0].done
    g = client.generate(model="smollm2", prompt="The capital of France is", raw=True,
                        options={"temperature": 0, "num_predict": 8})
    want, _ = _ref_generate(ref, ref.tokenize("The capital of France is"), 8)
    assert g.response == want and g.done
    with pytest.raises(ollama.ResponseError):
        client.chat(model="smollm2", messages=QUESTION, options={"mirostat": 2})
    assert client.chat(model="smollm2", messages=QUESTION, stream=False,
                       options={"temperature": 0, "num_predict": 4}).done_reason == "length"


def test_ollama_streams_ndjson_by_default_as_ollama_does(busy):
    url, _ = busy
    r = httpx.post(f"{url}/api/generate", json={"model": "smollm2", "prompt": "Hi", "options": {"num_predict": 3}},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.strip().split("\n")]
    assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True] and len(lines) >= 2
    assert lines[-1]["eval_count"] == 3 and lines[-1]["done_reason"] == "length" and "response" in lines[0]
    assert httpx.get(f"{url}/api/version", timeout=10).json()["version"]


def test_ollama_show_and_ps_describe_the_model(busy, smol_gguf):
    import ollama
    from gguf import GGUFReader

    url, _ = busy
    client = ollama.Client(host=url, timeout=120)
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 1})  # loaded now
    show = client.show("smollm2")
    r = GGUFReader(str(smol_gguf))  # the reference: the GGUF the store entry was imported from
    field = lambda k: r.fields[k].contents()  # noqa: E731
    arch = field("general.architecture")
    info = show.modelinfo
    assert show.details.family == arch == info["general.architecture"]
    assert info[f"{arch}.context_length"] == field(f"{arch}.context_length")
    assert info[f"{arch}.block_count"] == field(f"{arch}.block_count")
    assert info[f"{arch}.embedding_length"] == field(f"{arch}.embedding_length")
    assert show.template == field("tokenizer.chat_template") and show.details.parameter_size == "135M"
    with pytest.raises(ollama.ResponseError):
        client.show("no-such-model")
    ps = client.ps().models
    assert [m.model for m in ps] == ["smollm2"] and ps[0].size > 0 and ps[0].context_length == 512


def _scrape(url):
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_count_requests_tokens_and_queue(busy):
    url, _ = busy
    before = _scrape(url)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 7, "temperature": 0},
                   timeout=60).json()
    after = _scrape(url)
    length = ("lmcli_requests_total", (("finish_reason", "length"),))
    assert after[length] - before.get(length, 0) == 1
    done = after[("lmcli_completion_tokens_total", ())] - before[("lmcli_completion_tokens_total", ())]
    assert done == r["usage"]["completion_tokens"] == 7
    prompt = after[("lmcli_prompt_tokens_total", ())] - before[("lmcli_prompt_tokens_total", ())]
    cached = after[("lmcli_prompt_cached_tokens_total", ())] - before[("lmcli_prompt_cached_tokens_total", ())]
    assert cached == r["usage"]["prompt_tokens_details"]["cached_tokens"]  # a kept KV cache held these
    assert prompt + cached == r["usage"]["prompt_tokens"] and prompt >= 1
    assert after[("lmcli_decode_tokens_total", ())] - before[("lmcli_decode_tokens_total", ())] == 6
    assert after[("lmcli_decode_seconds_total", ())] > before[("lmcli_decode_seconds_total", ())]
    assert after[("lmcli_decode_tokens_per_second", ())] > 0
    assert after[("lmcli_queue_waiting", ())] == 0 and after[("lmcli_requests_running", ())] == 0


def test_serve_warms_up_before_it_listens(lmcli_home):
    lines = []
    seen = threading.Event()

    def log(line):
        lines.append(line)
        if "serving" in line:
            seen.set()
            raise KeyboardInterrupt  # stop serve() right after it has bound, before it serves
    with pytest.raises(KeyboardInterrupt):
        serve("smollm2", port=0, n_ctx=256, log=log)
    assert seen.is_set()
    warm = [i for i, x in enumerate(lines) if x.startswith("lmcli: warmed up smollm2 in ")]
    assert warm and warm[0] < next(i for i, x in enumerate(lines) if "serving" in x)


def test_lmcli_ps_lists_what_the_server_holds(busy, lmcli_home):
    import subprocess
    import sys

    url, _ = busy
    httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    port = url.rsplit(":", 1)[1]
    env = dict(os.environ, LMCLI_HOME=str(lmcli_home))
    run = lambda *a: subprocess.run([sys.executable, "-m", "lmcli.cli", "ps", *a], capture_output=True,  # noqa: E731
                                    text=True, env=env, timeout=120)
    r = run("--port", port)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert rows[0].split() == ["NAME", "SIZE", "CONTEXT"] and rows[1].split()[0] == "smollm2"
    assert rows[1].split()[-1] == "512"
    assert json.loads(run("--port", port, "--json").stdout) == httpx.get(f"{url}/api/ps", timeout=10).json()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = str(s.getsockname()[1])
    r = run("--port", free)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.startswith("error: no lmcli server answers")
    assert len(r.stderr.strip().splitlines()) == 1


def test_metrics_report_the_expert_cache_of_an_moe_model(tmp_path, lmcli_home):
    from quant.synthetic import write_synthetic_moe

    p = tmp_path / "moe.lmc"
    write_synthetic_moe(p, n_layer=2, n_embd=256, n_ff_exp=512, n_expert=8, n_head=4, n_head_kv=2, vocab=512)
    app = create_app(str(p), n_ctx=128, expert_cache_mib=3, log=lambda line: None)
    with running(app) as url:
        assert ("lmcli_expert_cache_hit_ratio", ()) not in _scrape(url)  # nothing loaded yet
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a b c", "max_tokens": 8, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200, r.text
        m = _scrape(url)
        st = app.state.engine.model.transformer.expert_cache.stats  # hits and misses per layer
        hits, lookups = int(st.hits.sum()), int(st.hits.sum() + st.misses.sum())
        assert lookups > 0 and m[("lmcli_expert_cache_hit_ratio", ())] == pytest.approx(hits / lookups, abs=1e-4)
        assert m[("lmcli_expert_cache_read_bytes_total", ())] == st.bytes_read > 0


def test_ollama_logprobs_are_the_log_softmax_of_the_models_logits(busy, ref):
    import ollama

    url, _ = busy
    client = ollama.Client(host=url, timeout=120)
    ids = ref.chat_ids(QUESTION)
    _, final = _ref_generate(ref, ids, 6)
    gen = final.tokens
    lz = _log_softmax(ref.logits(ids + gen)[len(ids) - 1: len(ids) - 1 + len(gen)])
    opts = {"temperature": 0, "num_predict": 6}
    r = client.chat(model="smollm2", messages=QUESTION, options=opts, logprobs=True, top_logprobs=2)
    assert [x.token for x in r.logprobs] == [ref.detokenize([t]) for t in gen]
    for k, (x, t) in enumerate(zip(r.logprobs, gen)):
        top = np.argsort(-lz[k], kind="stable")[:2]
        assert abs(x.logprob - lz[k, t]) < LOGPROB_TOL
        assert [a.token for a in x.top_logprobs] == [ref.detokenize([i]) for i in top]
    parts = list(client.chat(model="smollm2", messages=QUESTION, options=opts, logprobs=True, top_logprobs=2,
                             stream=True))
    assert [x.model_dump() for p in parts for x in (p.logprobs or [])] == [x.model_dump() for x in r.logprobs]
    assert client.chat(model="smollm2", messages=QUESTION, options=opts).logprobs is None


def test_text_completion_logprobs_in_the_legacy_shape(client, ref):
    prompt = "The three primary colors are"
    ids = ref.tokenize(prompt)
    _, final = _ref_generate(ref, ids, 6)
    gen = final.tokens
    lz = _log_softmax(ref.logits(ids + gen)[len(ids) - 1: len(ids) - 1 + len(gen)])
    r = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=6, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [ref.detokenize([t]) for t in gen] and "".join(lp.tokens) == r.choices[0].text
    assert np.abs(np.array(lp.token_logprobs) - lz[np.arange(len(gen)), gen]).max() < LOGPROB_TOL
    for k, alts in enumerate(lp.top_logprobs):
        top = np.argsort(-lz[k], kind="stable")[:3]
        assert alts == pytest.approx({ref.detokenize([i]): lz[k, i] for i in top}, abs=LOGPROB_TOL)
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(gen))]
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=6, logprobs=3,
                                            stream=True))
    got = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((g.tokens for g in got), []) == lp.tokens and sum((g.text_offset for g in got), []) == lp.text_offset
