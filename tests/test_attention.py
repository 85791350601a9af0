"""ops.attention against float64 numpy: GQA groups, sliding windows, K and V of different widths, one token
(decode, positions split into spans and merged) and several (prefill)."""

from __future__ import annotations

import numpy as np
import pytest

from lmcli.engine import ops


def _reference(q, kc, vc, pos0, scale, window):
    T, H, _ = q.shape
    KV = kc.shape[0]
    out = np.zeros((T, H, vc.shape[2]))
    for t in range(T):
        n = pos0 + t + 1
        j0 = max(0, n - window) if window > 0 else 0
        for h in range(H):
            kv = h // (H // KV)
            s = kc[kv, j0:n].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ vc[kv, j0:n].astype(np.float64) / p.sum()
    return out


@pytest.mark.parametrize("H,KV,Dk,Dv", [(6, 2, 32, 32), (4, 4, 24, 16), (8, 1, 16, 16)])
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 7), (1, 700), (5, 0), (4, 300)])
@pytest.mark.parametrize("window", [0, 50])
def test_attention_matches_float64(H, KV, Dk, Dv, T, pos0, window):
    rng = np.random.default_rng(H * 1000 + pos0 + T + window)
    n_ctx = pos0 + T + 3
    q = rng.standard_normal((T, H, Dk)).astype(np.float32)
    kc = (rng.standard_normal((KV, n_ctx, Dk)) * 2).astype(np.float32)
    vc = rng.standard_normal((KV, n_ctx, Dv)).astype(np.float32)
    scale = np.float32(1 / np.sqrt(Dk))
    out = np.full((T, H, Dv), np.nan, np.float32)
    ops.attention(q, kc, vc, pos0, scale, window, out)
    ref = _reference(q, kc, vc, pos0, scale, window)
    assert np.abs(out - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max())
