"""RoPE scaling as transformers defines it (modeling_rope_utils ROPE_INIT_FUNCTIONS): which parameters each kind
takes, the inverse frequencies and the factor on cos/sin, and MLA's softmax mscale. The schema validates with KINDS,
the engine builds its tables from inv_freq, the GGUF export and import translate the same parameters."""

from __future__ import annotations

import math

import numpy as np

# kind -> (required positive numbers, optional non-negative numbers); "truncate" (yarn) is an optional boolean.
KINDS = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")),
}


def kind(scaling: dict | None) -> str | None:
    """The scaling kind of a rope_scaling dict (transformers 5's rope_type, or the older type); None: plain RoPE."""
    return None if not scaling else scaling.get("rope_type", scaling.get("type"))


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (transformers get_mscale / yarn_get_mscale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(p: dict) -> float:
    """The factor on cos and sin (_compute_yarn_parameters): attention_factor if given, else from mscale and
    mscale_all_dim when both are set, else get_mscale(factor)."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor, m, m_all = float(p["factor"]), p.get("mscale"), p.get("mscale_all_dim")
    if m and m_all:
        return get_mscale(factor, float(m)) / get_mscale(factor, float(m_all))
    return get_mscale(factor)


def inv_freq(n_rot: int, theta: float, scaling: dict | None) -> tuple[np.ndarray, float]:
    """(inverse frequencies (n_rot / 2,) in float64, factor on cos and sin) for plain RoPE or a scaling kind."""
    inv = theta ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    k = kind(scaling)
    if k is None:
        return inv, 1.0
    factor = float(scaling["factor"])
    if k == "linear":
        return inv / factor, 1.0
    if k == "llama3":  # _compute_llama3_parameters: low frequencies / factor, high ones kept, a blend between
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, blended, scaled), 1.0
    if k == "yarn":  # _compute_yarn_parameters: interpolate below beta_slow rotations, extrapolate above beta_fast
        old = float(scaling["original_max_position_embeddings"])
        fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

        def dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the old context
            return n_rot * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim(fast), dim(slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, n_rot - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        # transformers builds the ramp in float32; the same here keeps its band edges bit-identical
        ramp = np.clip((np.arange(n_rot // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolate = 1.0 - ramp.astype(np.float64)
        return inv / factor * (1 - extrapolate) + inv * extrapolate, yarn_attention_factor(scaling)
    raise ValueError(f"unknown RoPE scaling {k!r}")  # the schema refuses it first


def mla_softmax_mscale(scaling: dict | None) -> float:
    """DeepseekV3Attention's yarn_apply_mscale: with any RoPE scaling that names mscale_all_dim, the softmax scale
    is multiplied by get_mscale(factor, mscale_all_dim) squared."""
    if kind(scaling) is None or not scaling.get("mscale_all_dim"):
        return 1.0
    return get_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
