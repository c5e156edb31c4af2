"""IQ4_NL and IQ4_XS quantizers, byte-identical with llama.cpp's `ggml_quantize_chunk`.

`ggml_quantize_chunk` (ggml/src/ggml.c) sends IQ4_NL to `quantize_iq4_nl` and IQ4_XS to
`quantize_iq4_xs` (ggml/src/ggml-quants.c); both run `quantize_row_iq4_nl_impl` with ntry = 7 on every
block (32 values for IQ4_NL, 256 for IQ4_XS), with or without an importance matrix. That is *not*
`quantize_row_iq4_nl_ref` (ntry = -1, no scale search): we follow the chunk path, which is what
llama-quantize writes.

Exactness rules kept here (see shared/reference/gguf-quantization.md, sections 0-1):
- all arithmetic in np.float32, in the C expression order, never upcast;
- every C sum is a left-to-right loop over in-block positions, so ours loops over positions too,
  vectorised across blocks (arrays are laid out [position, block] so each step is contiguous);
- `nearest_int` is reproduced with its own 1.5*2^23 bit trick (also defines the NaN/huge cases);
- fp32->fp16 is round-to-nearest-even with ggml's NaN encoding (sign | 0x7E00).

Inputs must be finite-or-infinite floats; rows containing NaN are not supported (ggml's own result
then depends on the position of the NaN inside its running max).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32

# kvalues_iq4nl (ggml-common.h): the 16 non-linear levels, ascending.
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KF = KVALUES.astype(F32)

GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: blocks whose max |x| is below this get scale 0
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7
QK4_NL, QK_K = 32, 256
BLOCK_BYTES_NL, BLOCK_BYTES_XS = 18, 136

# --- best_index_int8(16, kvalues, x) as a table lookup -------------------------------------------
# The C function picks between the two neighbouring levels with `x - lo < hi - x` in float. Rounding
# could only flip that within a few ulps of a midpoint, and there |x| >= 4.5 while both differences
# are <= 12 < 2 * 2^floor(log2|x|): they are exact multiples of ulp(x). So the result is exactly
# "number of midpoints <= x" (ties go up). Twice every midpoint is an integer, hence that count only
# depends on floor(2x), and 2x is exact: one table lookup per value. NaN lands on the top level (the
# C search never takes its `x < val` branch), -inf on 0. test_iq4.py checks this against a literal
# transcription of the C search around every midpoint and level.
_MID2 = KVALUES[:-1].astype(np.int64) + KVALUES[1:].astype(np.int64)  # 2 * midpoints, ascending
_CELL_LO, _CELL_HI = int(_MID2[0]) - 1, int(_MID2[-1])
_CELL_L = np.searchsorted(_MID2, np.arange(_CELL_LO, _CELL_HI + 1), side="right").astype(np.uint8)
_CELL_Q = _KF[_CELL_L]
_F_LO, _F_HI, _TWO = F32(_CELL_LO), F32(_CELL_HI), F32(2)


def _cells(al2: np.ndarray) -> np.ndarray:
    """Table index for already-doubled scaled values `al2` (modified in place)."""
    np.fmin(al2, _F_HI, out=al2)  # fmin also maps NaN to the top cell
    np.maximum(al2, _F_LO, out=al2)
    np.floor(al2, out=al2)
    al2 -= _F_LO  # small integers: exact
    return al2.astype(np.intp)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml-quants.c nearest_int: add 1.5*2^23, keep the low 23 mantissa bits (round half to even)."""
    bits = (v.astype(F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def fp32_to_fp16_bits(v: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_fp16: RNE, overflow to inf, any NaN -> sign | 0x7E00."""
    v = np.asarray(v, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = v.astype(np.float16).view(np.uint16).copy()
    nan = np.isnan(v)
    if nan.any():
        h[nan] = ((v.view(np.uint32)[nan] >> 16) & 0x8000).astype(np.uint16) | np.uint16(0x7E00)
    return h


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """C's `s = 0; for j: s += a[j]` over axis 0, vectorised over axis 1 (not numpy's pairwise sum)."""
    s = np.zeros(a.shape[1:], dtype=F32)
    for row in a:
        s += row
    return s


def _sums(xT: np.ndarray, w: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum over j of w*q*x and of w*q*q; C evaluates both as (w*q)*x and (w*q)*q."""
    wq = w * q
    return _seq_sum(wq * xT), _seq_sum(wq * q)


def _block_scales(xT: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-32-value scale search of quantize_row_iq4_nl_impl (ntry = 7). xT, w: [32, nblocks]."""
    ax = np.abs(xT)
    imax = ax.argmax(axis=0)  # first index of the largest |x|, like the strict `ax > amax` scan
    cols = np.arange(xT.shape[1])
    amax = ax[imax, cols]
    mx = xT[imax, cols]
    # Start: d = -max / values[0], levels from id = 1/d, then the weighted least-squares scale.
    d = (-mx) / _KF[0]
    id_ = F32(1) / d
    q = _CELL_Q.take(_cells((id_ * xT) * _TWO), mode="clip")
    sumqx, sumq2 = _sums(xT, w, q)
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    # Then 15 alternative inverse scales (values[0] + itry) / max, keeping the first strict improvement.
    for itry in range(-NTRY, NTRY + 1):
        id_ = F32(itry + int(KVALUES[0])) / mx
        q = _CELL_Q.take(_cells((id_ * xT) * _TWO), mode="clip")
        sumqx, sumq2 = _sums(xT, w, q)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, F32(0), d)


def _weights(xT: np.ndarray, qwT: np.ndarray | None, sigma2: np.ndarray | None) -> np.ndarray:
    """weight[j] = qw[j] * sqrtf(sigma2 + x*x) with an imatrix, else x*x (quantize_row_iq4_nl_impl)."""
    sq = xT * xT
    if qwT is None:
        return sq
    return qwT * np.sqrt(sigma2 + sq)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """L: [32, n] level indices -> [n, 16] bytes: byte j = L[j] | L[j+16] << 4."""
    return (L[:16] | (L[16:] << 4)).T


def _check(rows: np.ndarray, block: int, imatrix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    rows = np.ascontiguousarray(rows, dtype=F32)
    if rows.ndim != 2 or rows.shape[1] % block:
        raise ValueError(f"rows must be [n, k*{block}] float32, got {rows.shape}")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=F32).reshape(-1)
        if imatrix.size != rows.shape[1]:
            raise ValueError(f"imatrix has {imatrix.size} values for rows of {rows.shape[1]}")
    return rows, imatrix


# Blocks of 32 per vectorised step: big enough to hide numpy's per-call cost, small enough for L2.
_CHUNK = 8192


def quantize_iq4_nl(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """[n, row_len] float32 -> [n, row_len/32*18] uint8, as ggml_quantize_chunk(GGML_TYPE_IQ4_NL)."""
    rows, imatrix = _check(rows, QK4_NL, imatrix)
    n, row_len = rows.shape
    bpr = row_len // QK4_NL
    blocks = rows.reshape(-1, QK4_NL)
    qw = None if imatrix is None else imatrix.reshape(bpr, QK4_NL)
    out = np.empty((blocks.shape[0], BLOCK_BYTES_NL), dtype=np.uint8)
    with np.errstate(all="ignore"):
        for s in range(0, blocks.shape[0], _CHUNK):
            e = min(s + _CHUNK, blocks.shape[0])
            xT = np.ascontiguousarray(blocks[s:e].T)
            qwT = sigma2 = None
            if qw is not None:
                qwT = np.ascontiguousarray(qw[np.arange(s, e) % bpr].T)
                # sigma2 = (sum of x^2 over the block) * 2/32
                sigma2 = _seq_sum(xT * xT) * F32(2.0 / QK4_NL)
            scale = _block_scales(xT, _weights(xT, qwT, sigma2))
            # One sub-block per super-block: d = scales[0] stored as is, levels redone with 1/d (or 0).
            id_ = np.where(scale != 0, F32(1) / scale, F32(0))
            L = _CELL_L.take(_cells((id_ * xT) * _TWO), mode="clip")
            out[s:e, 0:2] = fp32_to_fp16_bits(scale).view(np.uint8).reshape(-1, 2)
            out[s:e, 2:] = _pack_nibbles(L)
    return out.reshape(n, bpr * BLOCK_BYTES_NL)


def quantize_iq4_xs(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """[n, row_len] float32 -> [n, row_len/256*136] uint8, as ggml_quantize_chunk(GGML_TYPE_IQ4_XS)."""
    rows, imatrix = _check(rows, QK_K, imatrix)
    n, row_len = rows.shape
    spr = row_len // QK_K
    supers = rows.reshape(-1, QK_K)
    qw = None if imatrix is None else imatrix.reshape(spr, 8, 32)
    nsub = QK_K // 32
    out = np.empty((supers.shape[0], BLOCK_BYTES_XS), dtype=np.uint8)
    chunk = max(1, _CHUNK // nsub)
    with np.errstate(all="ignore"):
        for s in range(0, supers.shape[0], chunk):
            e = min(s + chunk, supers.shape[0])
            m = e - s
            # [32 positions, m super-blocks, 8 sub-blocks]; columns of the 2-D view are (sb, ib).
            x3 = np.ascontiguousarray(supers[s:e].reshape(m, nsub, 32).transpose(2, 0, 1))
            xT = x3.reshape(32, m * nsub)
            qwT = sigma2 = None
            if qw is not None:
                qwT = np.ascontiguousarray(qw[np.arange(s, e) % spr].transpose(2, 0, 1)).reshape(32, m * nsub)
                # sigma2 sums x^2 over all 256 values in memory order (sub-block, then position).
                sq3 = x3 * x3
                sigma2 = np.zeros(m, dtype=F32)
                for ib in range(nsub):
                    for p in range(32):
                        sigma2 += sq3[p, :, ib]
                sigma2 = np.repeat(sigma2 * F32(2.0 / QK_K), nsub)
            scales = _block_scales(xT, _weights(xT, qwT, sigma2)).reshape(m, nsub)
            # Super-block scale: the sub-scale with the largest |d| (first wins), d = -max_scale/32.
            amax_s = np.zeros(m, dtype=F32)
            max_s = np.zeros(m, dtype=F32)
            for ib in range(nsub):
                a = np.abs(scales[:, ib])
                up = a > amax_s
                amax_s = np.where(up, a, amax_s)
                max_s = np.where(up, scales[:, ib], max_s)
            d = -max_s / F32(32)  # all-zero super-block: -0.0, stored as fp16 0x8000
            id_ = np.where(d != 0, F32(1) / d, F32(0))
            ls = np.clip(_nearest_int(id_[:, None] * scales), -32, 31)
            dl = d[:, None] * ls.astype(F32)
            idl = np.where(dl != 0, F32(1) / dl, F32(0)).reshape(1, m * nsub)
            L = _CELL_L.take(_cells((idl * xT) * _TWO), mode="clip")
            # Pack: d, scales_h (2 high bits of ls+32 per sub-block), scales_l (low nibbles), qs.
            ls = (ls + 32).astype(np.uint16)
            sh = np.zeros(m, dtype=np.uint16)
            for ib in range(nsub):
                sh |= (ls[:, ib] >> 4) << (2 * ib)
            lo = (ls & 0xF).astype(np.uint8)
            blk = out[s:e]
            blk[:, 0:2] = fp32_to_fp16_bits(d).view(np.uint8).reshape(-1, 2)
            blk[:, 2:4] = sh.astype("<u2").view(np.uint8).reshape(-1, 2)
            blk[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
            blk[:, 8:] = _pack_nibbles(L).reshape(m, nsub * 16)
    return out.reshape(n, spr * BLOCK_BYTES_XS)
