"""Q4_0 / Q4_1 / Q5_0 / Q5_1 as ggml_quantize_chunk writes them (ggml/src/ggml-quants.c).

Without an imatrix quantize_q4_0 & co. run the closed-form quantize_row_*_ref, which gguf-py already reproduces
bit for bit, so we delegate. With an imatrix they switch to quantize_row_*_impl: weights qw*sqrt(sigma2 + x^2)
with sigma2 the mean of x^2 over the *whole row*, then make_qx_quants (Q4_0/Q5_0, symmetric) or
make_qkx3_quants (Q4_1/Q5_1, scale + min) per 32 values; no re-quantization pass.
"""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
from gguf import GGMLQuantizationType as Q

from gguf_tools.quants.kquants_common import (
    F32,
    fp16_round,
    make_qkx_quants,
    make_qx_quants,
    run_blocks,
    seqsum,
)

QK = 32
CHUNK_GROUPS = 16384  # 32-value groups per vectorised batch


def _qh(L: np.ndarray) -> np.ndarray:
    """Q5 high bits: bit j of the little-endian u32 = 5th bit of element j."""
    bits = (L >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """qs[16]: low nibble = element j, high nibble = element j+16."""
    L = L.astype(np.uint8)
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def _fp16_bytes(h: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(h).view(np.uint8).reshape(-1, 2)


def _symmetric(nmax: int, five_bit: bool):
    # Q4_0 block (18 B): d fp16 | qs[16];  Q5_0 block (22 B): d fp16 | qh u32 | qs[16]
    def block(xc: np.ndarray, wc: np.ndarray) -> np.ndarray:
        d, L = make_qx_quants(np.ascontiguousarray(xc.T), nmax, np.ascontiguousarray(wc.T))
        L = np.ascontiguousarray(L.T)
        parts = [_fp16_bytes(fp16_round(d)[0])] + ([_qh(L)] if five_bit else []) + [_nibbles(L)]
        return np.concatenate(parts, axis=1)

    return block


def _affine(nmax: int, five_bit: bool):
    # Q4_1 block (20 B): d | m | qs[16];  Q5_1 block (24 B): d | m | qh u32 | qs[16]   (x = q*d + m)
    def block(xc: np.ndarray, wc: np.ndarray) -> np.ndarray:
        d, the_min, L = make_qkx_quants(
            np.ascontiguousarray(xc.T), np.ascontiguousarray(wc.T), nmax, -0.9, 0.05, 36, False
        )
        L = np.ascontiguousarray(L.T)
        parts = [_fp16_bytes(fp16_round(d)[0]), _fp16_bytes(fp16_round(-the_min)[0])]
        parts += ([_qh(L)] if five_bit else []) + [_nibbles(L)]
        return np.concatenate(parts, axis=1)

    return block


_IMPL = {
    Q.Q4_0: _symmetric(8, False),
    Q.Q5_0: _symmetric(16, True),
    Q.Q4_1: _affine(15, False),
    Q.Q5_1: _affine(31, True),
}


def _make(qtype: Q):
    block_fn = _IMPL[qtype]
    nbytes = gq.GGML_QUANT_SIZES[qtype][1]

    def quantize_rows(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=F32)
        n, k = rows.shape
        if imatrix is None:
            out = gq.quantize(rows, qtype).reshape(n, k // QK, nbytes)
            if qtype in (Q.Q4_0, Q.Q5_0):
                # quantize_row_q4_0_ref/q5_0_ref start from max = +0.0, so an all-zero block (even all -0.0)
                # stores d = 0.0/-8 = -0.0 (fp16 0x8000); gguf-py takes the block's own zero and can store +0.0.
                zero = ~(np.abs(rows.reshape(n, k // QK, QK)) > 0).any(axis=-1)
                out[zero, 0], out[zero, 1] = 0x00, 0x80
            return out.reshape(n, -1)
        with np.errstate(all="ignore"):
            sigma2 = seqsum(np.ascontiguousarray((rows * rows).T)) / F32(k)
            w = np.asarray(imatrix, F32)[None, :] * np.sqrt(sigma2[:, None] + rows * rows)
        out = run_blocks(rows.reshape(-1, QK), w.reshape(-1, QK), block_fn, nbytes, CHUNK_GROUPS)
        return out.reshape(n, -1)

    quantize_rows.__name__ = f"quantize_{qtype.name.lower()}"
    return quantize_rows


quantize_q4_0 = _make(Q.Q4_0)
quantize_q4_1 = _make(Q.Q4_1)
quantize_q5_0 = _make(Q.Q5_0)
quantize_q5_1 = _make(Q.Q5_1)
