"""Sampling against numpy float64 references: greedy, temperature, top-k/top-p/min-p filters, penalty, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from lmcli.errors import UsageError
from lmcli.sampling import Sampler, SamplerParams


def _freqs(params, logits, n=4000, history=None):
    s = Sampler(params)
    counts = np.zeros(len(logits))
    for _ in range(n):
        counts[s(logits, history)] += 1
    return counts / n


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert Sampler(SamplerParams(temp=0.0))(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = np.zeros(50, np.float32)
    p = SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    s1, s2, s3 = Sampler(p), Sampler(p), Sampler(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=124))
    r1 = [s1(logits) for _ in range(30)]
    assert r1 == [s2(logits) for _ in range(30)]
    assert r1 != [s3(logits) for _ in range(30)]


def test_unfiltered_sampling_follows_the_softmax_of_logits_over_temperature():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    f = _freqs(SamplerParams(temp=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=1), logits, n=20000)
    ref = _softmax(logits.astype(np.float64) / 0.7)
    assert np.abs(f - ref).max() < 0.015


def test_top_k_keeps_only_the_k_most_likely():
    logits = np.array([3.0, 2.9, 2.8, 0.0, -1.0, 2.7], np.float32)
    f = _freqs(SamplerParams(temp=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=2), logits)
    assert set(np.nonzero(f)[0]) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    f = _freqs(SamplerParams(temp=1.0, top_k=0, top_p=0.75, min_p=0.0, seed=3), logits)
    assert set(np.nonzero(f)[0]) == {0, 1}  # 0.5 < 0.75 <= 0.8
    assert abs(f[0] - 0.5 / 0.8) < 0.03


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    f = _freqs(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.1, seed=4), logits)
    assert set(np.nonzero(f)[0]) == {0, 1}  # 0.05 < 0.1 * 0.6


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_of_recent_tokens():
    logits = np.array([2.0, 1.9, -1.0, -1.1], np.float32)
    greedy = SamplerParams(temp=0.0, repeat_penalty=1.5)
    assert Sampler(greedy)(logits, history=[0]) == 1  # 2.0 / 1.5 < 1.9
    logits2 = np.array([-1.0, -1.2, -5.0], np.float32)
    assert Sampler(greedy)(logits2, history=[0]) == 1  # -1.0 * 1.5 < -1.2


def test_presence_and_frequency_penalties_follow_openais_formula_over_the_generated_tokens():
    # OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c[j] = times j was generated
    rng = np.random.default_rng(5)
    for _ in range(200):
        logits = rng.standard_normal(12).astype(np.float32)
        generated = list(rng.integers(0, 12, rng.integers(0, 8)))
        prompt = list(rng.integers(0, 12, 5))  # never counted
        fp, pp = rng.uniform(-2, 2), rng.uniform(-2, 2)
        c = np.bincount(np.asarray(generated, dtype=np.int64), minlength=12)
        ref = logits.astype(np.float64) - c * fp - (c > 0) * pp
        s = Sampler(SamplerParams(temp=0.0, frequency_penalty=fp, presence_penalty=pp))
        assert s(logits, prompt + generated, generated) == int(np.argmax(ref))


def test_penalties_shape_the_sampled_distribution_too():
    logits = np.array([1.0, 1.0, 0.0], np.float32)
    p = SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=6, frequency_penalty=0.5, presence_penalty=0.25)
    s = Sampler(p)
    counts = np.zeros(3)
    for _ in range(20000):
        counts[s(logits, [0, 0], [0, 0])] += 1
    ref = _softmax(np.array([1.0 - 2 * 0.5 - 0.25, 1.0, 0.0]))
    assert np.abs(counts / 20000 - ref).max() < 0.015


@pytest.mark.parametrize("kw", [{"temp": -1.0}, {"temp": float("nan")}, {"top_p": 1.5}, {"min_p": -0.1},
                                {"top_k": -3}, {"repeat_penalty": 0.0}, {"seed": -1},
                                {"presence_penalty": 2.5}, {"frequency_penalty": -3.0},
                                {"frequency_penalty": float("inf")}])
def test_out_of_range_parameters_are_usage_errors(kw):
    with pytest.raises(UsageError):
        Sampler(SamplerParams(**kw))
