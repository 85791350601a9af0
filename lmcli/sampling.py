"""Sampling: penalties (repeat, presence, frequency), then greedy at temperature 0, else temperature -> top-k ->
top-p -> min-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError


@dataclass(frozen=True)
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every id already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time an id was generated

    def validate(self) -> "SamplerParams":
        """Raise UsageError for values outside their range (never clamp silently)."""
        def finite(name, v, lo, hi):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
                raise UsageError(f"--{name} must be between {lo} and {hi}, got {v!r}")
        finite("temp", self.temp, 0.0, 100.0)
        finite("top-p", self.top_p, 0.0, 1.0)
        finite("min-p", self.min_p, 0.0, 1.0)
        finite("repeat-penalty", self.repeat_penalty, 0.0, 100.0)
        finite("presence-penalty", self.presence_penalty, -2.0, 2.0)
        finite("frequency-penalty", self.frequency_penalty, -2.0, 2.0)
        if self.repeat_penalty == 0:
            raise UsageError("--repeat-penalty must be positive")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"--top-k must be a non-negative integer, got {self.top_k!r}")
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < 0:
            raise UsageError("--repeat-last-n must be a non-negative integer")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise UsageError(f"--seed must be a non-negative integer, got {self.seed!r}")
        return self


class Sampler:
    """Picks the next token from logits; owns its seeded RNG so runs with one seed repeat exactly."""

    def __init__(self, params: SamplerParams):
        self.p = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None,
                 generated: list[int] | None = None) -> int:
        """history: prompt and generated ids (the repeat penalty's window); generated: the completion's ids alone
        (the presence and frequency penalties count only those, as OpenAI's do)."""
        p = self.p
        z = np.asarray(logits, dtype=np.float64).copy()
        if p.repeat_penalty != 1.0 and history:
            # llama.cpp's penalty: divide positive logits, multiply negative ones, over the last n tokens.
            recent = np.unique(np.asarray(history[-p.repeat_last_n:] if p.repeat_last_n else [], dtype=np.int64))
            if recent.size:
                v = z[recent]
                z[recent] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated:
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            z[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if p.temp == 0:
            return int(np.argmax(z))
        idx = np.argsort(-z, kind="stable")
        if p.top_k > 0:
            idx = idx[: p.top_k]
        zz = z[idx] / p.temp
        probs = np.exp(zz - zz.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep]
        if p.min_p > 0.0:
            m = probs >= p.min_p * probs[0]
            idx, probs = idx[m], probs[m]
        probs = probs / probs.sum()
        return int(idx[self.rng.choice(len(idx), p=probs)])
