"""Byte-exact NumPy ports of ggml's K-quant quantizers (ggml/src/ggml-quants.c), as ggml_quantize_chunk runs them.

Without an importance matrix quantize_q*_K falls through to quantize_row_q*_K_ref; with one it runs
quantize_row_q*_K_impl row by row. Both paths are ported here, vectorised over super-blocks (QK_K = 256); the
search helpers and the numeric conventions live in kquants_common.
"""

from __future__ import annotations

import numpy as np

from gguf_tools.quants.kquants_common import (
    F32,
    GROUP_MAX_EPS,
    LIMIT,
    ZERO,
    abs_max_pm,
    first_abs_max,
    fp16_round,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nan_skipping_max,
    nint,
    qx_levels,
    run_blocks,
    seqsum,
)

QK_K = 256
# super-blocks per vectorised batch: big enough to amortise NumPy's per-call cost over the in-block loops
CHUNK_BLOCKS = {"Q2_K": 1024, "Q3_K": 2048, "Q4_K": 1024, "Q5_K": 2048, "Q6_K": 1024}


def _pos(a: np.ndarray, p: int) -> np.ndarray:
    """Position-major (p, S) copy of a (cb, 256) chunk cut into groups of p."""
    return np.ascontiguousarray(a.reshape(-1, p).T)


def _blocks(L: np.ndarray, cb: int) -> np.ndarray:
    """Position-major levels (p, S) back to (cb, 256) element order."""
    return np.ascontiguousarray(L.T).reshape(cb, QK_K)


def _superblock_sigma2(xc: np.ndarray, factor: int) -> np.ndarray:
    """factor*sum(x^2)/QK_K over each super-block, summed left to right as the *_impl functions do."""
    sumx2 = seqsum(np.ascontiguousarray((xc * xc).T))
    return F32(factor) * sumx2 / F32(QK_K)  # 1*s is exact, so Q2_K's plain sumx2/QK_K is covered


def _impl_weights(xc: np.ndarray, qwc: np.ndarray, factor: int, p: int) -> np.ndarray:
    """qw * sqrt(sigma2 + x^2), position-major."""
    sigma2 = _superblock_sigma2(xc, factor)
    return _pos(qwc * np.sqrt(sigma2[:, None] + xc * xc), p)


def _requant(x, d, off, lo, hi, L, base=0):
    """Re-pick levels with the stored (fp16-rounded) sub-scales: nearest_int((x + off)/d) clamped to [lo, hi],
    plus `base`, as uint8 (p, S). Sub-blocks with d == 0 keep the search's levels L (already offset by base):
    `if (!d) continue;`. rint stands in for nearest_int unless some |t| reaches 2^22 (or is inf/NaN)."""
    t = np.add(x, off) if off is not None else x.copy()
    np.divide(t, d, out=t)
    if np.abs(t).max() < LIMIT:
        np.rint(t, out=t)
        np.clip(t, F32(lo), F32(hi), out=t)
        t += F32(base)
        q = t.astype(np.uint8)
    else:
        q = (np.clip(nint(t), lo, hi) + base).astype(np.uint8)
    skip = np.flatnonzero(d.ravel() == 0)
    if skip.size:
        q[:, skip] = L[:, skip]
    return q


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs[64]: per 128-element half, byte l holds elements l, l+32, l+64, l+96 at shifts 0, 2, 4, 6."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """12-byte 6-bit scale/min packing of Q4_K/Q5_K; values wider than 6 bits wrap like the C uint8 stores."""
    ls, lm = ls.astype(np.int32), lm.astype(np.int32)
    out = np.empty((ls.shape[0], 12), np.int32)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (out & 0xFF).astype(np.uint8)


def _unpack_scale_min_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for all 8 sub-blocks: (sc, m) as (cb, 8) int32."""
    b = b.astype(np.int32)
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _fp16_bytes(h: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(h.astype(np.float16)).view(np.uint8).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------------ Q2_K
# Q2_K block (84 B): scales[16] (low nibble scale, high nibble min) | qs[64] 2-bit | d fp16 | dmin fp16
def _q2_k(xc: np.ndarray, qwc: np.ndarray | None) -> np.ndarray:
    cb = xc.shape[0]
    x = _pos(xc, 16)
    if qwc is None:  # quantize_row_q2_K_ref: |x| weights, MAD error, scales relative to their maxima
        sc, mn, L = make_qkx_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
        sc, mn = sc.reshape(cb, 16), mn.reshape(cb, 16)
        max_scale = nan_skipping_max(sc, 1)
        max_min = nan_skipping_max(mn, 1)
        ps, pm = max_scale > 0, max_min > 0
        q_s = np.where(ps[:, None], nint((F32(15) / max_scale)[:, None] * sc) & 0xFF, 0)
        q_m = np.where(pm[:, None], nint((F32(15) / max_min)[:, None] * mn), 0)
        byte = (q_s | (q_m << 4)) & 0xFF
        d16, d = fp16_round(np.where(ps, max_scale / F32(15), ZERO))
        m16, dmin = fp16_round(np.where(pm, max_min / F32(15), ZERO))
    else:  # quantize_row_q2_K_impl: imatrix weights, squared error, make_qp_quants for the 4-bit scales
        w = _impl_weights(xc, qwc, 1, 16)
        sw = seqsum(w).reshape(cb, 16)
        sc, mn, L = make_qkx_quants(x, w, 3, -0.9, 0.05, 36, False)
        swT = np.ascontiguousarray(sw.T)
        dm, Ls = make_qp_quants(np.ascontiguousarray(sc.reshape(cb, 16).T), 15, swT)
        mm, Lm = make_qp_quants(np.ascontiguousarray(mn.reshape(cb, 16).T), 15, swT)
        byte = (Ls.T | (Lm.T << 4)) & 0xFF
        d16, d = fp16_round(dm)
        m16, dmin = fp16_round(mm)
    dsub = (d[:, None] * (byte & 0xF).astype(F32)).reshape(1, -1)
    msub = (dmin[:, None] * (byte >> 4).astype(F32)).reshape(1, -1)
    L = _blocks(_requant(x, dsub, msub, 0, 3, L), cb)
    return np.concatenate([byte.astype(np.uint8), _pack_2bit(L), _fp16_bytes(d16), _fp16_bytes(m16)], axis=1)


# ------------------------------------------------------------------------------------------------------ Q3_K
# Q3_K block (110 B): hmask[32] (bit j//32 of byte j%32 = high bit) | qs[64] low 2 bits | scales[12] 6-bit+32 | d
def _pack_q3_scales(ls: np.ndarray) -> np.ndarray:
    out = np.empty((ls.shape[0], 12), np.int32)
    out[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(-1, 4, 4)
    out[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return (out & 0xFF).astype(np.uint8)


def _q3_k(xc: np.ndarray, qwc: np.ndarray | None) -> np.ndarray:
    cb = xc.shape[0]
    x = _pos(xc, 16)
    if qwc is None:  # quantize_row_q3_K_ref: make_q3_quants, then 6-bit scales against the largest |scale|
        sc, L = make_q3_quants(x, 4)
        sc = sc.reshape(cb, 16)
        _, max_scale = first_abs_max(sc)
        nz = max_scale != 0
        iscale = np.where(nz, F32(-32) / np.where(nz, max_scale, F32(1)), ZERO)
        ls = np.clip(nint(iscale[:, None] * sc).astype(np.int8).astype(np.int32), -32, 31) + 32
        ls = np.where(nz[:, None], ls, 0)  # memset(scales, 0) when max_scale == 0
        d16, d = fp16_round(np.where(nz, F32(1) / iscale, ZERO))
    else:  # quantize_row_q3_K_impl: weighted make_qx_quants per 16 and again over the 16 scales
        w = _impl_weights(xc, qwc, 2, 16)
        sw = seqsum(w).reshape(cb, 16)
        sc, L = make_qx_quants(x, 4, w)
        sc = np.ascontiguousarray(sc.reshape(cb, 16))
        d_block, Ls = make_qx_quants(np.ascontiguousarray(sc.T), 32, np.ascontiguousarray(sw.T))
        ls = Ls.T
        d16, d = fp16_round(d_block)
    dsub = (d[:, None] * (ls - 32).astype(F32)).reshape(1, -1)
    L = _blocks(_requant(x, dsub, None, -4, 3, L, 4), cb)  # 0..7; bit 2 is the hmask bit
    hm = (L >> 2).reshape(cb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    hmask = np.bitwise_or.reduce(hm, axis=1)
    L &= 3
    return np.concatenate([hmask, _pack_2bit(L), _pack_q3_scales(ls), _fp16_bytes(d16)], axis=1)


# ------------------------------------------------------------------------------------------------ Q4_K / Q5_K
def _qk_scale_min(xc, qwc, nmax: int, ref_args: tuple, clamp_impl: bool):
    """Shared front half of Q4_K/Q5_K (ref or impl): returns the levels after re-quantization (cb, 256) uint8,
    the packed 12 scale bytes and d/dmin as fp16."""
    cb = xc.shape[0]
    x = _pos(xc, 32)
    if qwc is None:  # quantize_row_q{4,5}_K_ref: weights sqrt(mean x^2 of the 32) + |x|
        av_x = np.sqrt(seqsum(x * x) / F32(32))
        sc, mn, L = make_qkx_quants(x, av_x[None, :] + np.abs(x), nmax, *ref_args, False)
        sc, mn = sc.reshape(cb, 8), mn.reshape(cb, 8)
        max_scale = nan_skipping_max(sc, 1)
        max_min = nan_skipping_max(mn, 1)
        inv_s = np.where(max_scale > 0, F32(63) / max_scale, ZERO)
        inv_m = np.where(max_min > 0, F32(63) / max_min, ZERO)
        ls = np.minimum(nint(inv_s[:, None] * sc) & 0xFF, 63)
        lm = np.minimum(nint(inv_m[:, None] * mn) & 0xFF, 63)
        d16, _ = fp16_round(max_scale / F32(63))
        m16, _ = fp16_round(max_min / F32(63))
    else:  # quantize_row_q{4,5}_K_impl: imatrix weights, make_qkx3_quants, make_qp_quants(63) for scales/mins
        w = _impl_weights(xc, qwc, 2, 32)
        swT = np.ascontiguousarray(seqsum(w).reshape(cb, 8).T)
        sc, mn, L = make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, False)
        d_block, Ls = make_qp_quants(np.ascontiguousarray(sc.reshape(cb, 8).T), 63, swT)
        m_block, Lm = make_qp_quants(np.ascontiguousarray(mn.reshape(cb, 8).T), 63, swT)
        ls, lm = Ls.T, Lm.T
        if clamp_impl:  # only the Q5_K impl re-applies MIN(63, .)
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        d16, _ = fp16_round(d_block)
        m16, _ = fp16_round(m_block)
    packed = _pack_scale_min_k4(ls, lm)
    s, m = _unpack_scale_min_k4(packed)
    dsub = (d16.astype(F32)[:, None] * s.astype(F32)).reshape(1, -1)
    msub = (m16.astype(F32)[:, None] * m.astype(F32)).reshape(1, -1)
    L = _blocks(_requant(x, dsub, msub, 0, nmax, L), cb)
    return L, packed, d16, m16


# Q4_K block (144 B): d fp16 | dmin fp16 | scales[12] | qs[128] (per 64: low nibble elem l, high elem l+32)
def _q4_k(xc: np.ndarray, qwc: np.ndarray | None) -> np.ndarray:
    L, packed, d16, m16 = _qk_scale_min(xc, qwc, 15, (-1.0, 0.1, 20), False)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_fp16_bytes(d16), _fp16_bytes(m16), packed, qs], axis=1)


# Q5_K block (176 B): d | dmin | scales[12] | qh[32] (bits 2c, 2c+1 = 5th bit of elems 64c+l, 64c+32+l) | qs[128]
def _q5_k(xc: np.ndarray, qwc: np.ndarray | None) -> np.ndarray:
    L, packed, d16, m16 = _qk_scale_min(xc, qwc, 31, (-0.5, 0.1, 15), True)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hb = (q >> 4).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(hb, axis=1)
    return np.concatenate([_fp16_bytes(d16), _fp16_bytes(m16), packed, qh, qs], axis=1)


# ------------------------------------------------------------------------------------------------------ Q6_K
# Q6_K block (210 B): ql[128] low nibbles | qh[64] high 2 bits | scales int8[16] | d fp16
_NIB = np.uint32(0x0F0F0F0F)
_TWO = np.uint32(0x03030303)


def _q6_k(xc: np.ndarray, qwc: np.ndarray | None) -> np.ndarray:
    cb = xc.shape[0]
    x = _pos(xc, 16)
    # quantize_row_q6_K_ref uses x^2 weights; quantize_row_q6_K_impl passes the imatrix itself as weights
    # (handed in position-major by _pm_weights).
    w = x * x if qwc is None else qwc
    xmax = abs_max_pm(x)
    sc, isc = make_qx_quants(x, 32, w, levels=False, amax_mx=xmax)
    amax, max_scale = abs_max_pm(np.ascontiguousarray(sc.reshape(cb, 16).T))
    zero = amax < GROUP_MAX_EPS  # whole super-block written as zero bytes
    iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d16, d = fp16_round(F32(1) / iscale)
    scales = np.minimum(nint(iscale[:, None] * sc.reshape(cb, 16)), 127).astype(np.int8)
    dsub = (d[:, None] * scales.astype(F32)).reshape(-1, 1)
    # Re-quantize with the stored scales in element order (groups of 16 are rows here): no transpose back.
    xg = xc.reshape(-1, 16)
    t = np.divide(xg, dsub)
    skip = np.flatnonzero(dsub.ravel() == 0)  # `if (!d) continue;`: keep the search's levels there
    live = np.ones(len(dsub), bool)
    live[skip] = False
    with np.errstate(all="ignore"):
        bound = xmax[0] / np.abs(dsub.ravel())  # >= max |x/d| over the group: division is monotone
    if bool(np.all(bound[live] < LIMIT)) and bool(np.isfinite(xg).all()):  # (amax skips NaN)
        np.rint(t, out=t)
        np.clip(t, F32(-32), F32(31), out=t)
        L = t.astype(np.int8)
    else:  # some |x/d| reaches 2^22: nearest_int's own wrap-around
        L = np.clip(nint(t), -32, 31).astype(np.int8)
    L += np.int8(32)
    if skip.size:
        xs = np.ascontiguousarray(x[:, skip])
        Ls = qx_levels(xs, isc[skip], 32, bool(np.isfinite(xs).all())) + F32(32)
        Ls[:, abs_max_pm(xs)[0] < GROUP_MAX_EPS] = 0  # make_qx_quants leaves an all-zero group at L = 0
        L[skip] = Ls.T.astype(np.int8)
    # Pack 4 levels per uint32 word: per 128-element half, quarter k holds elements 32k..32k+31.
    W = L.view(np.uint32).reshape(cb, 2, 4, 8)
    ql = np.empty((cb, 2, 2, 8), np.uint32)
    np.bitwise_or(W[:, :, 0] & _NIB, (W[:, :, 2] & _NIB) << 4, out=ql[:, :, 0])
    np.bitwise_or(W[:, :, 1] & _NIB, (W[:, :, 3] & _NIB) << 4, out=ql[:, :, 1])
    H = (W >> 4) & _TWO
    qh = H[:, :, 0] | (H[:, :, 1] << 2) | (H[:, :, 2] << 4) | (H[:, :, 3] << 6)
    out = np.concatenate(
        [
            ql.view(np.uint8).reshape(cb, 128),
            qh.view(np.uint8).reshape(cb, 64),
            scales.view(np.uint8),
            _fp16_bytes(d16),
        ],
        axis=1,
    )
    out[zero] = 0
    return out


_BLOCK_FNS = {
    "Q2_K": (_q2_k, 84),
    "Q3_K": (_q3_k, 110),
    "Q4_K": (_q4_k, 144),
    "Q5_K": (_q5_k, 176),
    "Q6_K": (_q6_k, 210),
}


# block functions that take their imatrix weights already position-major, (p, cb*256/p)
_PM_WEIGHTS = {"Q6_K": 16}


def _pm_weights(qw: np.ndarray, p: int, chunk_blocks: int):
    """qw_chunk for run_blocks: the imatrix table (period, 256) transposed once to position-major groups of p
    and repeated along the blocks, so that the weights of blocks c0..c1 (block i uses row i % period) are one
    contiguous slice of every row -- the same values _pos(qw.take(...), p) gives, at the cost of a copy."""
    period, g = len(qw), QK_K // p
    table = np.ascontiguousarray(qw.reshape(period, g, p).transpose(2, 0, 1)).reshape(p, -1)
    table = np.tile(table, (1, 1 + -(-chunk_blocks // period)))

    def chunk(c0: int, c1: int) -> np.ndarray:
        r = c0 % period
        return np.ascontiguousarray(table[:, r * g : (r + c1 - c0) * g])

    return chunk


def _make(name: str):
    fn, nbytes = _BLOCK_FNS[name]

    def quantize_rows(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """rows: float32 (n, row_len), row_len % 256 == 0 -> uint8 (n, row_len/256*block_bytes)."""
        n, k = rows.shape
        x = np.ascontiguousarray(rows, dtype=F32).reshape(-1, QK_K)
        # quant_weights is indexed within the row: super-block i of every row uses imatrix[256*i : 256*(i+1)]
        qw = None if imatrix is None else np.asarray(imatrix, F32).reshape(k // QK_K, QK_K)
        chunk_w = None
        if qw is not None and name in _PM_WEIGHTS:
            chunk_w = _pm_weights(qw, _PM_WEIGHTS[name], CHUNK_BLOCKS[name])
        return run_blocks(x, qw, fn, nbytes, CHUNK_BLOCKS[name], chunk_w).reshape(n, -1)

    quantize_rows.__name__ = f"quantize_{name.lower()}"
    return quantize_rows


quantize_q2_k = _make("Q2_K")
quantize_q3_k = _make("Q3_K")
quantize_q4_k = _make("Q4_K")
quantize_q5_k = _make("Q5_K")
quantize_q6_k = _make("Q6_K")
