"""Prompt-prefix reuse in the server (issue 21): the next turn of a conversation prefills only its new tokens and
answers exactly as a server without the cache does."""

from __future__ import annotations

import time

import httpx
import pytest

from lmcli.prefix_cache import PrefixCache, common_prefix, reusable
from test_server import running


class FakeCache:  # what PrefixCache needs of a KV cache: how many positions it holds, and truncation
    def __init__(self, n):
        self.n_past = n

    def truncate(self, n):
        self.n_past = min(self.n_past, n)


def test_the_longest_shared_prefix_of_the_same_model_is_taken_and_the_oldest_dropped():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and reusable([1, 2, 3], [1, 2, 3]) == 2
    pc = PrefixCache(2)
    a, b = FakeCache(4), FakeCache(3)
    pc.give("m", [1, 2, 3, 4, 99], a)  # the last sampled token was never fed: not held
    pc.give("m", [1, 2, 7], b)
    cache, n = pc.take("m", [1, 2, 3, 4, 5, 6], lambda: FakeCache(0))
    assert cache is a and n == 4 and len(pc) == 1
    cache, n = pc.take("other", [1, 2, 7, 8], lambda: FakeCache(0))
    assert n == 0 and cache not in (a, b)  # another model's cache is never used
    pc.give("m", [5], FakeCache(1))
    pc.give("m", [6], FakeCache(1))
    assert len(pc) == 2  # b, the least recently given, was dropped
    cache, n = pc.take("m", [1, 2, 7, 8], lambda: FakeCache(0))
    assert n == 0


@pytest.fixture(scope="module")
def servers(lmcli_home):
    from lmcli.server import create_app

    with running(create_app("smollm2", n_ctx=4096, log=lambda line: None)) as url, \
            running(create_app("smollm2", n_ctx=4096, prefix_cache=0, log=lambda line: None)) as plain:
        yield url, plain


def _chat(url, messages, n=24):
    t = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                   json={"model": "smollm2", "messages": messages, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"], time.perf_counter() - t


def test_a_second_turn_prefills_only_its_new_tokens_and_answers_the_same(servers):
    url, plain = servers
    story = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(200))
    turn1 = [{"role": "user", "content": f"Here is a list. {story} Which colour is item 7?"}]
    a1, u1, _ = _chat(url, turn1)
    assert u1["prompt_tokens"] > 1500 and u1["prompt_tokens_details"]["cached_tokens"] == 0
    turn2 = turn1 + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And item 8?"}]
    a2, u2, _ = _chat(url, turn2)
    cached = u2["prompt_tokens_details"]["cached_tokens"]
    assert cached >= u1["prompt_tokens"] and u2["prompt_tokens"] - cached < 60  # only the new turn was fed
    b2, v2, _ = _chat(plain, turn2)  # the same turn on a server without the cache
    assert a2 == b2 and v2["prompt_tokens"] == u2["prompt_tokens"]
    assert v2["prompt_tokens_details"]["cached_tokens"] == 0
