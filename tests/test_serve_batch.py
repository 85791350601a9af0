"""Continuous batching in `lmcli serve` (issue 21): requests served together, one batched forward pass per token,
give the answers the library gives each alone and the answers of a server running one request at a time; a client
that leaves mid-batch stops its own generation within one step and leaves the others intact."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

pytest.importorskip("torch")

import tiny_models  # noqa: E402
from test_server import httpx, running  # noqa: E402

from lmcli.server import create_app  # noqa: E402

PROMPTS = ["the model reads a page of memory", "red green blue north", "a small cat and a large dog",
           "expert router token layer cache weight"]


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def tiny(request, tmp_path_factory):
    """(arch, container path, the library's model) of a tiny random dense model and a tiny MoE, f16."""
    import lmcli
    from quant.convert import convert_hf

    d = tmp_path_factory.mktemp(request.param)
    path = d / "m.lmc"
    convert_hf(tiny_models.build(request.param, d / "hf"), path, "f16")
    return request.param, path, lmcli.load(str(path), n_ctx=256)


def _library(m, prompt: str, n: int) -> str:
    return "".join(e.text for e in m.generate(m.tokenize(prompt), max_tokens=n, temp=0.0, ignore_eos=True))


def hold(app):
    """Make the app's worker wait on a job of its own until the returned release() (30 s at most), so that the
    requests sent meanwhile queue up and start together."""
    ev = threading.Event()
    app.state.engine.submit(lambda: ev.wait(30), force=True)
    deadline = time.monotonic() + 10
    while app.state.stats.running != 1:  # the worker is in ev.wait
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return ev.set


def _wait_queued(app, n):
    deadline = time.monotonic() + 20
    while app.state.stats.waiting < n:
        assert time.monotonic() < deadline, "the requests did not arrive"
        time.sleep(0.005)


def _complete(url, prompt, n, **extra):
    r = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("parallel", [4, 1])
def test_concurrent_greedy_answers_equal_the_library_alone(tiny, parallel):
    arch, path, m = tiny
    want = [_library(m, p, 24) for p in PROMPTS]
    app = create_app(str(path), n_ctx=256, parallel=parallel, log=lambda line: None)
    with running(app) as url:
        release = hold(app)
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            futs = [pool.submit(_complete, url, p, 24) for p in PROMPTS]
            _wait_queued(app, len(PROMPTS))
            release()
            got = [f.result()["choices"][0]["text"] for f in futs]
        st = app.state.stats
    assert got == want, arch
    assert st.max_batch == min(parallel, len(PROMPTS))  # they did decode together (or, at 1, one at a time)
    assert st.running == 0 and st.waiting == 0


def test_logprobs_json_schema_and_stop_strings_keep_working_per_request_in_a_batch(tiny):
    """Four different kinds of request decoding together answer exactly as a server running one at a time."""
    arch, path, _ = tiny
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"]}
    bodies = [
        ("completions", {"prompt": PROMPTS[0], "max_tokens": 12, "logprobs": 3}),
        ("chat/completions", {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 60,
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
        ("completions", {"prompt": PROMPTS[2], "max_tokens": 40, "stop": [" the", " a"]}),
        ("chat/completions", {"messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 16,
                              "logprobs": True, "top_logprobs": 2, "stream": False, "frequency_penalty": 1.5}),
    ]

    def ask(url, path_, body):
        r = httpx.post(f"{url}/v1/{path_}", json={"temperature": 0, **body}, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        return out["choices"][0], out["usage"]

    answers = {}
    for parallel in (1, 4):
        app = create_app(str(path), n_ctx=256, parallel=parallel, prefix_cache=0, log=lambda line: None)
        with running(app) as url:
            release = hold(app)
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                futs = [pool.submit(ask, url, p, b) for p, b in bodies]
                _wait_queued(app, len(bodies))
                release()
                answers[parallel] = [f.result() for f in futs]
            assert app.state.stats.max_batch == (1 if parallel == 1 else len(bodies))
    assert answers[4] == answers[1], arch
    import json

    doc = json.loads(answers[4][1][0]["message"]["content"])  # a document the schema accepts
    assert set(doc) == {"name", "ok"} and isinstance(doc["ok"], bool)
    assert answers[4][0][0]["logprobs"]["top_logprobs"][0] and answers[4][3][0]["logprobs"]["content"]


def test_a_client_that_leaves_mid_batch_stops_alone_and_the_others_finish_intact(tiny):
    arch, path, m = tiny
    want = [_library(m, p, 200) for p in PROMPTS[:2]]
    app = create_app(str(path), n_ctx=256, parallel=4, log=lambda line: None)
    with running(app) as url:

        def leave():
            body = {"prompt": PROMPTS[2], "max_tokens": 230, "temperature": 0, "ignore_eos": True, "stream": True}
            with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                first = next(x for x in lines if x.startswith("data: "))
                for _ in range(3):
                    next(lines)
            import json

            return json.loads(first[6:])["id"]

        release = hold(app)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            others = [pool.submit(_complete, url, p, 200) for p in PROMPTS[:2]]
            gone = pool.submit(leave)
            _wait_queued(app, 3)
            release()
            rid = gone.result()
            got = [f.result()["choices"][0]["text"] for f in others]
        st = app.state.stats
        stat = st.requests[rid]
        deadline = time.monotonic() + 20
        while not stat.done:
            assert time.monotonic() < deadline, "the generation did not stop"
            time.sleep(0.01)
    assert got == want, arch
    assert stat.finish_reason == "cancelled" and stat.tokens < 230
    assert stat.tokens_at_cancel is not None and stat.tokens - stat.tokens_at_cancel <= 1  # within one step
    assert st.max_batch == 3


def test_a_prompt_joining_a_decoding_batch_leaves_the_thread_policy_alone(tiny):
    """ThreadPolicy.begin() (a prompt's start from the CPUs other programs left free, every count judged afresh) runs
    only when nothing decodes: a request that joins mid-decode does not restart the others' measured thread count."""
    arch, path, _ = tiny
    app = create_app(str(path), n_ctx=256, parallel=4, log=lambda line: None)
    with running(app) as url:
        body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(x for x in lines if x.startswith("data: "))  # the first request decodes
            pol = app.state.engine.model.thread_policy
            calls, begin = [], pol.begin
            pol.begin = lambda: (calls.append(1), begin())[-1]
            _complete(url, PROMPTS[1], 2)  # the second is prefilled while the first decodes
            assert sum(1 for x in lines if x.startswith("data: ")) > 100  # the first went on to its end
        st = app.state.stats
    assert st.max_batch == 2, arch  # they did decode together
    assert calls == [], arch
