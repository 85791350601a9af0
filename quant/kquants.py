"""llama.cpp's Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 encoders (ggml-quants.c), ported to Numba in float32 operation for
operation, so that the block bytes equal ggml_quantize_chunk's (tests/test_kquants.py calls it for the reference).

Without an importance matrix: quantize_row_q4_K_ref / q5_K_ref (make_qkx2_quants per 32 weights, 6-bit scales
and mins by rounding against the largest), quantize_row_q6_K_ref (make_qx_quants per 16, int8 scales),
quantize_row_q5_0_ref / q5_1_ref (numpy, in quant.quantize). With one (importance qw (n,)): quantize_row_q4_K_impl /
q5_K_impl (make_qkx3_quants, the 6-bit scales and mins chosen by make_qp_quants), quantize_row_q6_K_impl
(make_qx_quants weighted by qw itself), quantize_row_q5_0_impl / q5_1_impl (make_qx_quants / make_qkx3_quants per
32, as quant.imatrix's Q4_0 / Q4_1).

A super-block's fp16 scale d is stored, then its codes are rounded against the stored (fp16) value: Numba has no
fp16 on the CPU, so each encoder runs in two passes, the fp16 rounding (numpy's, round to nearest even as ggml's
GGML_FP32_TO_FP16) between them. The ports keep C's order of float32 operations (no fused multiply-add: ggml-base,
which holds these functions, is compiled without one; Numba contracts none without fastmath).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

F32 = np.float32
QK_K = 256
EPS = np.float32(1e-15)  # GROUP_MAX_EPS


@njit(cache=True, inline="always")
def _nearest_int(v):
    # ggml's nearest_int: round half to even through the float32 add of 1.5 * 2^23
    return np.int32(np.float32(v + np.float32(12582912.0)) - np.float32(12582912.0))


# --- ggml-quants.c's helpers, on one group x (n,) writing its codes into L (n,) -------------------------------


@njit(cache=True)
def make_qx_quants(x, nmax, L, qw, weighted):
    """make_qx_quants(n, nmax, x, L, rmse_type 1, qw or NULL): symmetric codes L = nmax + clamp(round(x / d));
    the weight of x[i] is qw[i] if weighted, else x[i]^2. Returns the scale d."""
    n = x.shape[0]
    mx = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / mx
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = qw[i] if weighted else x[i] * x[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else F32(0.0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(s)) / mx
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
            w = qw[i] if weighted else x[i] * x[i]
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def make_qkx_quants(x, weights, nmax, L, Laux, rmin, rdelta, nstep, qkx3):
    """make_qkx2_quants (qkx3 False) and make_qkx3_quants (True), use_mad false: codes L in 0..nmax with a scale and
    an offset min <= 0 (x ~ scale * L + min), searched over nstep + 1 trial scales minimizing the weighted squared
    error. Returns (scale, -min). The two differ only where all of x is one value: qkx2 tests max == min, qkx3
    max <= min."""
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F32(0.0)
    if (mx <= mn) if qkx3 else (mx == mn):
        for i in range(n):
            L[i] = 0
        return F32(0.0), -mn
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1.0) / iscale
    best = F32(0.0)
    for i in range(n):
        L[i] = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn))))
        diff = scale * F32(L[i]) + mn - x[i]
        best += weights[i] * (diff * diff)
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * F32(s) + F32(nmax)) / (mx - mn)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn))))
            Laux[i] = l
            w = weights[i]
            fl = F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            err = F32(0.0)
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                err += weights[i] * (diff * diff)
            if err < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = err
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True)
def make_qp_quants(x, nmax, L, qw):
    """make_qp_quants: codes L (uint8) in 0..nmax of non-negative x (a super-block's scales or mins) against one
    scale, searched over 9 trial scales then refined code by code, each error weighted by qw. Returns the scale."""
    n = x.shape[0]
    mx = F32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(nmax) / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i])  # uint8 store, as C's
    scale = F32(1.0) / iscale
    best = F32(0.0)
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best += qw[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_s = (F32(0.1) * F32(s) + F32(nmax)) / mx
        scale_s = F32(1.0) / iscale_s
        mse = F32(0.0)
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_s * x[i]))
            diff = x[i] - scale_s * F32(l)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_s
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = l
        w = qw[i]
        sumlx += w * x[i] * F32(l)
        suml2 += w * F32(l) * F32(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            fl = F32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = F32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else F32(0.0)


# --- Q4_K / Q5_K: super-blocks of 8 groups of 32, 6-bit scale and min per group --------------------------------


@njit(cache=True, parallel=True)
def _k_scales(x, qw, weighted, nmax, d, dmin, ls, lm, L):
    """Pass 1 of quantize_row_q{4,5}_K_ref (weighted False) or _impl (True) over rows x (R, n): per super-block the
    float d and dmin (R, nb), the 6-bit scales ls and mins lm (R, nb, 8) and the group search's codes L (R, n)."""
    R, n = x.shape
    for r in prange(R):
        weights = np.empty(32, F32)
        Laux = np.empty(32, np.uint8)
        scales = np.empty(8, F32)
        mins = np.empty(8, F32)
        sw = np.empty(8, F32)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        for b in range(n // QK_K):
            o = b * QK_K
            sigma2 = F32(0.0)
            if weighted:
                sum_x2 = F32(0.0)
                for i in range(QK_K):
                    sum_x2 += x[r, o + i] * x[r, o + i]
                sigma2 = F32(2.0) * sum_x2 / F32(QK_K)
            max_scale = F32(0.0)
            max_min = F32(0.0)
            for j in range(8):
                g = o + 32 * j
                xs = x[r, g : g + 32]
                if weighted:
                    for i in range(32):
                        weights[i] = qw[g + i] * np.float32(np.sqrt(sigma2 + xs[i] * xs[i]))
                    sumw = F32(0.0)
                    for i in range(32):
                        sumw += weights[i]
                    sw[j] = sumw
                    scales[j], mins[j] = make_qkx_quants(xs, weights, nmax, L[r, g : g + 32], Laux, F32(-0.9),
                                                         F32(0.05), 36, True)
                else:
                    sum_x2 = F32(0.0)
                    for i in range(32):
                        sum_x2 += xs[i] * xs[i]
                    av_x = np.float32(np.sqrt(sum_x2 / F32(32.0)))
                    for i in range(32):
                        weights[i] = av_x + abs(xs[i])
                    if nmax == 15:
                        scales[j], mins[j] = make_qkx_quants(xs, weights, nmax, L[r, g : g + 32], Laux, F32(-1.0),
                                                             F32(0.1), 20, False)
                    else:
                        scales[j], mins[j] = make_qkx_quants(xs, weights, nmax, L[r, g : g + 32], Laux, F32(-0.5),
                                                             F32(0.1), 15, False)
                    if scales[j] > max_scale:
                        max_scale = scales[j]
                    if mins[j] > max_min:
                        max_min = mins[j]
            if weighted:
                d[r, b] = make_qp_quants(scales, 63, Ls, sw)
                dmin[r, b] = make_qp_quants(mins, 63, Lm, sw)
                for j in range(8):
                    ls[r, b, j] = min(63, Ls[j]) if nmax == 31 else Ls[j]  # q5_K_impl clamps, q4_K_impl does not
                    lm[r, b, j] = min(63, Lm[j]) if nmax == 31 else Lm[j]
            else:
                inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
                inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
                for j in range(8):
                    ls[r, b, j] = min(63, _nearest_int(inv_scale * scales[j]) & 255)  # uint8_t, then MIN(63)
                    lm[r, b, j] = min(63, _nearest_int(inv_min * mins[j]) & 255)
                d[r, b] = max_scale / F32(63.0)
                dmin[r, b] = max_min / F32(63.0)


@njit(cache=True, parallel=True)
def _k_codes(x, d, dmin, ls, lm, nmax, L):
    """Pass 2: each group's codes rounded against the stored d * scale and dmin * min (d, dmin as fp16 read back);
    a group whose scale is 0 keeps pass 1's codes."""
    R, n = x.shape
    for r in prange(R):
        for b in range(n // QK_K):
            for j in range(8):
                dd = d[r, b] * F32(ls[r, b, j])
                if dd == 0:
                    continue
                dm = dmin[r, b] * F32(lm[r, b, j])
                g = b * QK_K + 32 * j
                for i in range(32):
                    L[r, g + i] = max(0, min(nmax, _nearest_int((x[r, g + i] + dm) / dd)))


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins (N, 8) -> Q4_K/Q5_K's 12 scale bytes (N, 12) (the inverse of get_scale_min_k4)."""
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def encode_k(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> np.ndarray:
    """Rows x (R, n), n a multiple of 256 -> Q4_K (nmax 15) or Q5_K (nmax 31) bytes (R, n // 256 * 144 or 176)."""
    R, n = x.shape
    nb = n // QK_K
    d, dmin = np.empty((R, nb), F32), np.empty((R, nb), F32)
    ls, lm = np.empty((R, nb, 8), np.uint8), np.empty((R, nb, 8), np.uint8)
    L = np.empty((R, n), np.uint8)
    weighted = qw is not None
    _k_scales(x, qw if weighted else np.empty(0, F32), weighted, nmax, d, dmin, ls, lm, L)
    with np.errstate(over="ignore"):  # an infinite scale is refused by the caller (quantize.quantize_matrix)
        d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    _k_codes(x, d16.astype(F32), dmin16.astype(F32), ls, lm, nmax, L)
    q = L.reshape(R * nb, 4, 2, 32)  # (block, pair of groups, group in the pair, element)
    qs = (q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)  # (block, 4, 32): 128 bytes
    head = [d16.reshape(-1, 1).view(np.uint8), dmin16.reshape(-1, 1).view(np.uint8),
            _pack_k_scales(ls.reshape(-1, 8), lm.reshape(-1, 8))]
    if nmax == 31:  # bit 2k (k-th pair's first group) and 2k + 1 of qh[l]: the fifth bit of element l of each group
        hi = (q >> 4).astype(np.uint8).reshape(R * nb, 8, 32)
        head.append(np.bitwise_or.reduce(hi << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
    return np.concatenate([*head, qs.reshape(R * nb, 128)], axis=1).reshape(R, -1)


# --- Q6_K: super-blocks of 16 groups of 16, int8 scale per group -----------------------------------------------


@njit(cache=True, parallel=True)
def _q6_scales(x, qw, weighted, d, sc, L):
    """Pass 1 of quantize_row_q6_K_ref / _impl: the float d (R, nb) (NaN marks an all-zero super-block), int8
    scales sc (R, nb, 16) and make_qx_quants' codes L (R, n)."""
    R, n = x.shape
    for r in prange(R):
        scales = np.empty(16, F32)
        for b in range(n // QK_K):
            max_scale = F32(0.0)
            max_abs = F32(0.0)
            for j in range(16):
                g = b * QK_K + 16 * j
                s = make_qx_quants(x[r, g : g + 16], 32, L[r, g : g + 16], qw[g : g + 16] if weighted else qw,
                                   weighted)
                scales[j] = s
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
            if max_abs < EPS:
                d[r, b] = np.nan
                continue
            iscale = F32(-128.0) / max_scale
            d[r, b] = F32(1.0) / iscale
            for j in range(16):
                sc[r, b, j] = min(127, _nearest_int(iscale * scales[j]))


@njit(cache=True, parallel=True)
def _q6_codes(x, d, sc, L):
    """Pass 2: codes rounded against the stored d (fp16 read back) times each group's scale."""
    R, n = x.shape
    for r in prange(R):
        for b in range(n // QK_K):
            for j in range(16):
                dd = d[r, b] * F32(sc[r, b, j])
                if dd == 0:
                    continue
                g = b * QK_K + 16 * j
                for i in range(16):
                    L[r, g + i] = max(-32, min(31, _nearest_int(x[r, g + i] / dd))) + 32


def encode_q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Rows x (R, n), n a multiple of 256 -> Q6_K bytes (R, n // 256 * 210)."""
    R, n = x.shape
    nb = n // QK_K
    d, sc, L = np.empty((R, nb), F32), np.zeros((R, nb, 16), np.int8), np.empty((R, n), np.uint8)
    weighted = qw is not None
    _q6_scales(x, qw if weighted else np.empty(0, F32), weighted, d, sc, L)
    zero = np.isnan(d)
    with np.errstate(over="ignore"):
        d16 = np.where(zero, np.float32(0), d).astype(np.float16)
    _q6_codes(x, d16.astype(F32), sc, L)
    q = L.reshape(R * nb, 2, 4, 32)  # (block, half of 128, quarter, element)
    ql = (q[:, :, :2] & 15) | ((q[:, :, 2:] & 15) << 4)  # (block, half, 2, 32): ql[l], ql[l + 32] of each half
    qh = np.bitwise_or.reduce((q >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None], axis=2)
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.reshape(-1, 16).view(np.uint8),
                          d16.reshape(-1, 1).view(np.uint8)], axis=1)
    out[zero.reshape(-1)] = 0  # memset: an all-zero super-block is all zero bytes
    return out.reshape(R, -1)
