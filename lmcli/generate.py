"""Generation, layered as mlx-lm does: a token loop, then a stream of typed events (text, timings, finish)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .sampling import Sampler


@dataclass
class Timings:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    load_s: float = 0.0
    decode_steps: int = 0  # single-token forward passes
    expert_bytes_prefill: int = 0  # bytes of routed-expert bundles the kernels read
    expert_bytes_decode: int = 0
    disk_bytes_decode: int = 0  # bytes the expert cache read from the file during decode

    @property
    def expert_bytes_per_token(self) -> float:
        return self.expert_bytes_decode / self.decode_steps if self.decode_steps else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # The first completion token comes from the prefill's logits; decode time covers the rest.
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tokens_per_s": round(self.prefill_tps, 3),
            "decode_tokens_per_s": round(self.decode_tps, 3),
            "expert_bytes_per_token": round(self.expert_bytes_per_token),
            "expert_bytes_prefill": self.expert_bytes_prefill,
            "disk_bytes_per_token": round(self.disk_bytes_decode / self.decode_steps) if self.decode_steps else 0,
        }


@dataclass
class Event:
    """One step of a generation: a token and its text piece, or the final event with finish_reason."""

    token: int | None
    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" (max tokens or context)
    timings: Timings | None = None
    tokens: list[int] = field(default_factory=list)  # on the final event: every generated token id


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (not yet safe to emit)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def generate_events(model, cache, prompt_ids: list[int], sampler: Sampler, *, max_tokens: int,
                    stop: list[str] | None = None, ignore_eos: bool = False) -> Iterator[Event]:
    """Prefill prompt_ids into cache, then sample until EOS, a stop string, max_tokens or a full context.

    ignore_eos masks the end-of-text tokens out of sampling (llama.cpp's --ignore-eos).
    """
    stops = [s for s in (stop or []) if s]
    tm = Timings(prompt_tokens=len(prompt_ids))
    stats = model.transformer.stats
    b0 = stats.expert_bytes
    t0 = time.perf_counter()
    logits = model.transformer.forward(prompt_ids, cache)[-1]
    tm.prefill_s = time.perf_counter() - t0
    b1 = stats.expert_bytes
    tm.expert_bytes_prefill = b1 - b0
    ec = model.transformer.expert_cache
    d1 = ec.stats.bytes_read if ec is not None else 0
    history = list(prompt_ids)
    out_ids: list[int] = []
    dec = model.tokenizer.stream()
    text = ""  # generated text not yet emitted
    finish = "length"
    stopped_by_string = False
    t1 = time.perf_counter()
    eos = np.fromiter(model.tokenizer.eos_ids, dtype=np.int64)
    while len(out_ids) < max_tokens:
        if ignore_eos and eos.size:
            logits = logits.copy()
            logits[eos] = -np.inf
        tok = sampler(logits, history)
        if tok in model.tokenizer.eos_ids:
            finish = "stop"
            break
        out_ids.append(tok)
        history.append(tok)
        tm.completion_tokens = len(out_ids)
        text += dec.push(tok)
        hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            if hit:
                yield Event(tok, text[:hit])
            text = ""
            finish = "stop"
            stopped_by_string = True
            break
        keep = _held_back(text, stops)
        piece, text = text[: len(text) - keep], text[len(text) - keep:]
        yield Event(tok, piece)
        if len(out_ids) >= max_tokens or cache.n_past >= cache.n_ctx:
            break
        logits = model.transformer.forward([tok], cache)[-1]
        tm.decode_steps += 1
    tm.decode_s = time.perf_counter() - t1
    tm.expert_bytes_decode = stats.expert_bytes - b1
    tm.disk_bytes_decode = (ec.stats.bytes_read - d1) if ec is not None else 0
    if not stopped_by_string:
        text += dec.flush()
    if text:
        yield Event(None, text)
    tm.completion_tokens = len(out_ids)
    yield Event(None, "", finish, tm, out_ids)
