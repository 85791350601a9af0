"""Generation, layered as mlx-lm does: a token loop, then a stream of typed events (text, then the finish with
the run's statistics). Its collaborators (transformer, tokenizer, sampler, KV cache) are handed in, as in
llama2.c's generate()."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .sampling import Sampler
from .threads import ThreadPolicy


@dataclass
class Timings:
    """Token counts, times and bytes of one generation, prompt (prefill) and completion (decode) apart."""

    prompt_tokens: int
    completion_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int  # single-token forward passes
    expert_bytes_prefill: int  # bytes of routed-expert bundles the kernels read
    expert_bytes_decode: int
    disk_bytes_decode: int  # bytes the expert cache read from the file during decode

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

    def speeds(self) -> tuple[str, str]:
        """"N tokens, X tokens/s" for the prompt and for the completion, as `run -v` and chat print them."""
        return (f"{self.prompt_tokens} tokens, {self.prefill_tps:.1f} tokens/s",
                f"{self.completion_tokens} tokens, {self.decode_tps:.1f} tokens/s")

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
class RunStats:
    """What one generation did, built once for every face: timings, routing, the expert cache."""

    finish_reason: str  # "stop", "length", or "interrupted" for a run cut short
    timings: Timings
    hist_prefill: np.ndarray | None  # (n_layer, n_expert) tokens routed per expert for the prompt; None: dense
    hist_decode: np.ndarray | None  # the same while decoding
    expert_cache: dict | None  # the expert cache's size and counters since load; None without one
    trace: list  # the run's routing decisions when tracing is on (Transformer.trace_routing)

    @property
    def hist(self) -> np.ndarray | None:
        """Tokens routed per (layer, expert) over the whole run."""
        return None if self.hist_prefill is None else self.hist_prefill + self.hist_decode

    def usage(self) -> dict:
        """Token counts as the OpenAI API reports them."""
        p, c = self.timings.prompt_tokens, self.timings.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def summary(self, model: str, load_s: float) -> dict:
        """The end-of-generation summary (`run --json`): finish, token counts and timings, routing, expert cache."""
        out = {"model": model, "finish_reason": self.finish_reason, **self.timings.as_dict(),
               "load_s": round(load_s, 6), "routing_histogram": self.hist.tolist() if self.hist is not None else []}
        if self.expert_cache is not None:
            out["expert_cache"] = self.expert_cache
        return out


@dataclass
class Event:
    """One step of a generation: a token and its text piece, or the final event with finish_reason."""

    token: int | None
    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" (max tokens or context)
    stats: RunStats | None = None  # on the final event: what the run did
    tokens: list[int] = field(default_factory=list)  # on the final event: every generated token id
    # with top_logprobs set: (logprob of token, [(id, logprob) of the most likely ids, best first]), from a
    # float64 log-softmax of the model's own logits (before penalties, temperature and any grammar)
    logprobs: tuple[float, list[tuple[int, float]]] | None = None

    @property
    def timings(self) -> Timings | None:
        return self.stats.timings if self.stats is not None else None


@dataclass(eq=False)
class Step:
    """A forward pass a generation needs: ids fed into its cache at cache.n_past (the prompt, or the token just
    sampled); it goes on once it is sent the logits (vocab,) of the last id. Generation runs its own steps; a
    driver that batches the steps of many generations (lmcli.server) takes them from Generation.raw()."""

    ids: list[int]
    cache: object
    prompt: bool  # the prompt's prefill (compute-bound, every thread), else one decode step


def run_steps(transformer, steps: list[Step], threads: ThreadPolicy | None = None) -> list[np.ndarray]:
    """The logits each step asks for: prompts one at a time, then every single-token step in one batched forward
    (Transformer.forward_batch; one step alone is Transformer.forward)."""
    out: list = [None] * len(steps)
    one = [i for i, s in enumerate(steps) if len(s.ids) == 1]
    for i, s in enumerate(steps):
        if len(s.ids) != 1:
            if threads is not None:
                threads.begin()
            out[i] = transformer.forward(s.ids, s.cache)[-1]
    if one:
        def fwd():
            return transformer.forward_batch([steps[i].ids[0] for i in one], [steps[i].cache for i in one])
        if threads is None:
            logits = fwd()
        elif all(steps[i].prompt for i in one):
            threads.begin()
            logits = fwd()
        else:
            logits = threads.step(fwd, len(one))
        for j, i in enumerate(one):
            out[i] = logits[j]
    return out


def held_back(text: str, stops) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (not yet safe to emit)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def _logprobs(logits: np.ndarray, tok: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """log-softmax in float64: the chosen id's value and the n largest, best first (ties by id)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max()
    lse = m + np.log(np.exp(z - m).sum())
    top = np.argsort(-z, kind="stable")[:n] if n else []
    return float(z[tok] - lse), [(int(i), float(z[i] - lse)) for i in top]


class Generation:
    """One completion of prompt_ids into cache: iterate for Events until EOS, a stop string, max_tokens or a full
    context. The final event carries the run's statistics; stats() gives them for a run cut short as well.

    ignore_eos masks the end-of-text tokens out of sampling (llama.cpp's --ignore-eos).
    threads: the thread count for each step, set in the thread that iterates (Numba's count is per thread); None
    leaves it as it is.
    constraint (lmcli.structured.Constraint) masks what a grammar forbids and ends the run when it is complete.
    top_logprobs: None for no log-probabilities, else how many alternatives each token event lists.
    """

    def __init__(self, transformer, tokenizer, sampler: Sampler, cache, prompt_ids: list[int], *, max_tokens: int,
                 stop: list[str] | None = None, ignore_eos: bool = False, constraint=None,
                 top_logprobs: int | None = None, threads: ThreadPolicy | None = None):
        self.transformer, self.prompt_tokens, self.threads = transformer, len(prompt_ids), threads
        self.out_ids: list[int] = []
        self.decode_steps = 0  # single-token forward passes
        self._marks: list = []  # (time, engine counters) at the start, after the prompt, at the end
        self._events = self._run(tokenizer, sampler, cache, list(prompt_ids), max_tokens,
                                 [s for s in (stop or []) if s], ignore_eos, constraint, top_logprobs)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        item = next(self._events)
        while type(item) is Step:
            item = self._events.send(run_steps(self.transformer, [item], self.threads)[0])
        return item

    def raw(self) -> Iterator[Event | Step]:
        """The events with the Steps between them, for a driver that runs the steps itself: send() each Step its
        logits (run_steps computes them); do not mix with iterating the Generation."""
        return self._events

    def close(self) -> None:
        self._events.close()

    def _mark(self) -> None:
        self._marks.append((time.perf_counter(), self.transformer.counters()))

    def stats(self, finish_reason: str = "interrupted") -> RunStats:
        """The run's figures: final once the last event is out, else up to now."""
        tr = self.transformer
        now = (time.perf_counter(), tr.counters())
        (t0, c0), (t1, c1), (t2, c2) = (self._marks + [now] * 3)[:3]  # a mark not reached yet is now
        pre, dec = c1 - c0, c2 - c1
        tm = Timings(prompt_tokens=self.prompt_tokens, completion_tokens=len(self.out_ids), prefill_s=t1 - t0,
                     decode_s=t2 - t1, decode_steps=self.decode_steps, expert_bytes_prefill=pre.expert_bytes,
                     expert_bytes_decode=dec.expert_bytes, disk_bytes_decode=dec.disk_bytes)
        moe = tr.cfg.is_moe
        return RunStats(finish_reason, tm, pre.hist if moe else None, dec.hist if moe else None,
                        tr.expert_cache_stats(), tr.routing_trace(c0.traced)[: c2.traced - c0.traced])

    def _run(self, tokenizer, sampler, cache, history, max_tokens, stops, ignore_eos, constraint,
             top_logprobs) -> Iterator[Event]:
        out_ids = self.out_ids
        self._mark()
        logits = yield Step(list(history), cache, True)
        self._mark()
        dec = tokenizer.stream()
        text = ""  # generated text not yet emitted
        finish = "length"
        stopped_by_string = False
        eos = np.fromiter(tokenizer.eos_ids, dtype=np.int64)
        while len(out_ids) < max_tokens:
            if constraint is not None and constraint.stopped:  # the document is complete
                finish = "stop"
                break
            raw = logits
            if constraint is not None:
                logits = constraint.mask(logits)
            if ignore_eos and eos.size:
                logits = logits.copy()
                logits[eos] = -np.inf
            tok = sampler(logits, history, out_ids)
            if tok in tokenizer.eos_ids:
                finish = "stop"
                break
            if constraint is not None:
                constraint.accept(tok)
            lp = _logprobs(raw, tok, top_logprobs) if top_logprobs is not None else None
            out_ids.append(tok)
            history.append(tok)
            text += dec.push(tok)
            hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                if hit or lp is not None:
                    yield Event(tok, text[:hit], logprobs=lp)
                text = ""
                finish = "stop"
                stopped_by_string = True
                break
            keep = held_back(text, stops)
            piece, text = text[: len(text) - keep], text[len(text) - keep:]
            yield Event(tok, piece, logprobs=lp)
            if len(out_ids) >= max_tokens or cache.n_past >= cache.n_ctx:
                break
            logits = yield Step([tok], cache, False)
            self.decode_steps += 1
        self._mark()
        if not stopped_by_string:
            text += dec.flush()
        if text:
            yield Event(None, text)
        yield Event(None, "", finish, self.stats(finish), list(out_ids))
