"""Dequantization of raw GGUF blocks inside a Triton kernel: `dequant_tile`, called by the GEMM,
grouped-MoE and vocabulary kernels.

Every element of the tile finds its block, its quant bits and its scale bytes itself (integer ops
on [1, BLOCK_K] column offsets, broadcast over the rows). The float work is the same IEEE float32
operations in the same order as gguf_tools/quants/torch_dequant.py (the bit-exact reference), so
under the interpreter the values are bit-identical. On a GPU Triton may contract `a*b - c` into
an FMA (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K), which moves those values by at most an ulp.

Byte layouts: ggml-common.h, summarised in shared/reference/gguf-quantization.md section 1.2.
fp16 scales are loaded through a cast pointer: every fp16 field sits at an even offset in a
block of even size, and rows of every type are a whole number of blocks, so such loads stay
2-byte aligned as long as the tensor's storage is (torch allocations are).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from engine.kernels import KERNEL_QTYPES

_F32 = tl.constexpr(int(Q.F32))
_F16 = tl.constexpr(int(Q.F16))
_BF16 = tl.constexpr(int(Q.BF16))
_Q8_0 = tl.constexpr(int(Q.Q8_0))
_Q4_0 = tl.constexpr(int(Q.Q4_0))
_Q4_1 = tl.constexpr(int(Q.Q4_1))
_Q5_0 = tl.constexpr(int(Q.Q5_0))
_Q5_1 = tl.constexpr(int(Q.Q5_1))
_Q2_K = tl.constexpr(int(Q.Q2_K))
_Q3_K = tl.constexpr(int(Q.Q3_K))
_Q4_K = tl.constexpr(int(Q.Q4_K))
_Q5_K = tl.constexpr(int(Q.Q5_K))
_Q6_K = tl.constexpr(int(Q.Q6_K))
_IQ4_NL = tl.constexpr(int(Q.IQ4_NL))
_IQ4_XS = tl.constexpr(int(Q.IQ4_XS))
_MXFP4 = tl.constexpr(int(Q.MXFP4))

# lut layout: 16 IQ4 levels (ggml kvalues_iq4nl), then 16 MXFP4 levels (kvalues_mxfp4, E2M1 doubled)
_IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
_LUT_MXFP4 = tl.constexpr(16)
_luts: dict[str, torch.Tensor] = {}


def lut(device: torch.device | str) -> torch.Tensor:
    """The float32 level table dequant_tile's `lut_ptr` points at, one cached copy per device."""
    device = torch.device(device)
    key = str(device)
    t = _luts.get(key)
    if t is None:
        t = _luts[key] = torch.tensor(_IQ4_KVALUES + _MXFP4_KVALUES, dtype=torch.float32, device=device)
    return t


def row_bytes(qtype: Q, k: int) -> int:
    """Bytes of one stored row of `k` elements."""
    qtype = Q(qtype)
    if qtype not in KERNEL_QTYPES:
        raise NotImplementedError(f"no triton kernel for {qtype.name}")
    block, size = GGML_QUANT_SIZES[qtype]
    if k % block:
        raise ValueError(f"row of {k} elements is not a whole number of {qtype.name} blocks of {block}")
    return k // block * size


# ---- helpers (inlined by triton). Few and coarse: under the interpreter every call of a device
# function re-patches triton.language (about a millisecond), which shows in the tests' time.
@triton.jit
def _nibble(qs, j):
    """Element j of the 4-bit quants at byte pointer(s) qs, in ggml's order: per 32 elements, the 16
    low nibbles, then the 16 high ones."""
    jj = j % 32
    return (tl.load(qs + (j // 32) * 16 + jj % 16).to(tl.int32) >> ((jj // 16) * 4)) & 0x0F


@triton.jit
def _run_starts(k, G: tl.constexpr):
    """[1, BK] contiguous tile indices -> [1, BK // G]: the first index of each aligned run of G."""
    BK: tl.constexpr = k.shape[1]
    return tl.min(tl.reshape(k, (BK // G, G)), axis=1)[None, :]


@triton.jit
def _spread(v, G: tl.constexpr):
    """[BN, NB] values, one per run of G elements -> [BN, NB * G]."""
    BN: tl.constexpr = v.shape[0]
    NB: tl.constexpr = v.shape[1]
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BN, NB, G)), (BN, NB * G))


@triton.jit
def dequant_tile(w_ptr, lut_ptr, row_off, k_offs, QTYPE: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_K] tile of W.

    w_ptr: the raw uint8 tensor; row_off: int64 [BLOCK_N, 1], byte offset of each row's start from
    w_ptr (3-D expert tensors: (expert * N + n) * row_bytes); k_offs: [1, BLOCK_K] element indices
    within the row, k0 + tl.arange(0, BLOCK_K) with k0 a multiple of BLOCK_K (BLOCK_K >= 16, a
    power of two); lut_ptr: lut(device). No masks: callers keep every row in bounds (clamp row
    indices, mask the store) and K % BLOCK_K == 0.

    Scales are read once per run of G elements that share them ([BLOCK_N, BLOCK_K // G] loads, then
    spread), which relies on k_offs being contiguous and aligned; quant bits are read per element,
    contiguous along K so the loads vectorise."""
    f16 = tl.pointer_type(tl.float16)
    i8 = tl.pointer_type(tl.int8)
    BK: tl.constexpr = k_offs.shape[1]
    G32: tl.constexpr = 32 if BK >= 32 else BK  # runs sharing a 32-element block's / sub-block's scale
    w = w_ptr + row_off.to(tl.int64)  # [BLOCK_N, 1] row starts; column offsets are [1, BLOCK_K]
    k = k_offs
    # float types: cast the row pointers first and index in elements, so the compiler sees loads
    # contiguous along K and vectorises them
    if QTYPE == _F32:
        v = tl.load(w.to(tl.pointer_type(tl.float32)) + k)
    elif QTYPE == _F16:
        v = tl.load(w.to(f16) + k).to(tl.float32)
    elif QTYPE == _BF16:
        # bf16 -> fp32 widening is exact: the 16 bits become the top of the fp32 word
        h = tl.load(w.to(tl.pointer_type(tl.uint16)) + k)
        v = (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif QTYPE == _Q8_0:
        # d fp16 . qs int8[32]
        bs = w + (_run_starts(k, G32) // 32) * 34
        d = _spread(tl.load(bs.to(f16)).to(tl.float32), G32)
        q = tl.load((w + (k // 32) * 34 + 2 + k % 32).to(i8)).to(tl.float32)
        v = q * d
    elif QTYPE == _Q4_0:
        # d . qs[16]
        bs = w + (_run_starts(k, G32) // 32) * 18
        d = _spread(tl.load(bs.to(f16)).to(tl.float32), G32)
        q = _nibble(w + (k // 32) * 18 + 2, k % 32) - 8
        v = d * q.to(tl.float32)
    elif QTYPE == _Q4_1:
        # d . m . qs[16]
        bs = w + (_run_starts(k, G32) // 32) * 20
        d = _spread(tl.load(bs.to(f16)).to(tl.float32), G32)
        m = _spread(tl.load((bs + 2).to(f16)).to(tl.float32), G32)
        q = _nibble(w + (k // 32) * 20 + 4, k % 32).to(tl.float32)
        v = d * q + m
    elif QTYPE == _Q5_0:
        # d . qh u32 (bit j = high bit of element j) . qs[16]
        bs = w + (_run_starts(k, G32) // 32) * 22
        d = _spread(tl.load(bs.to(f16)).to(tl.float32), G32)
        qh = (tl.load(bs + 2).to(tl.int32) | (tl.load(bs + 3).to(tl.int32) << 8)
              | (tl.load(bs + 4).to(tl.int32) << 16) | (tl.load(bs + 5).to(tl.int32) << 24))
        j = k % 32
        q = (_nibble(w + (k // 32) * 22 + 6, j) | (((_spread(qh, G32) >> j) & 1) << 4)) - 16
        v = d * q.to(tl.float32)
    elif QTYPE == _Q5_1:
        # d . m . qh u32 . qs[16]
        bs = w + (_run_starts(k, G32) // 32) * 24
        d = _spread(tl.load(bs.to(f16)).to(tl.float32), G32)
        m = _spread(tl.load((bs + 2).to(f16)).to(tl.float32), G32)
        qh = (tl.load(bs + 4).to(tl.int32) | (tl.load(bs + 5).to(tl.int32) << 8)
              | (tl.load(bs + 6).to(tl.int32) << 16) | (tl.load(bs + 7).to(tl.int32) << 24))
        j = k % 32
        q = (_nibble(w + (k // 32) * 24 + 8, j) | (((_spread(qh, G32) >> j) & 1) << 4)).to(tl.float32)
        v = d * q + m
    elif QTYPE == _Q2_K:
        # scales[16] (low nibble scale, high nibble min) . qs[64] . d . dmin; runs of 16 share a scale
        ks = _run_starts(k, 16)
        bs = w + (ks // 256) * 84
        sc = tl.load(bs + (ks % 256) // 16).to(tl.int32)
        dl = _spread(tl.load((bs + 80).to(f16)).to(tl.float32) * (sc & 0x0F).to(tl.float32), 16)
        ml = _spread(tl.load((bs + 82).to(f16)).to(tl.float32) * (sc >> 4).to(tl.float32), 16)
        # per 128-value half: byte l holds elements l, l+32, l+64, l+96 at shifts 0, 2, 4, 6
        j = k % 256
        r = j % 128
        q = (tl.load(w + (k // 256) * 84 + 16 + (j // 128) * 32 + r % 32).to(tl.int32) >> ((r // 32) * 2)) & 3
        v = dl * q.to(tl.float32) - ml
    elif QTYPE == _Q3_K:
        # hmask[32] . qs[64] . scales[12] . d; 16 six-bit scales: low 4 bits from bytes 0-7 (low
        # nibble for sub-blocks 0-7, high for 8-15), top 2 bits from bytes 8-11
        ks = _run_starts(k, 16)
        bs = w + (ks // 256) * 110
        s = (ks % 256) // 16
        lo = (tl.load(bs + 96 + s % 8).to(tl.int32) >> ((s // 8) * 4)) & 0x0F
        hi = (tl.load(bs + 104 + s % 4).to(tl.int32) >> ((s // 4) * 2)) & 0x03
        dl = _spread(tl.load((bs + 108).to(f16)).to(tl.float32) * ((lo | (hi << 4)) - 32).to(tl.float32), 16)
        j = k % 256
        r = j % 128
        b = w + (k // 256) * 110
        ql = (tl.load(b + 32 + (j // 128) * 32 + r % 32).to(tl.int32) >> ((r // 32) * 2)) & 3
        qh = (tl.load(b + j % 32).to(tl.int32) >> (j // 32)) & 1
        v = dl * (ql - ((qh ^ 1) << 2)).to(tl.float32)  # high bit clear => -4
    elif QTYPE == _Q4_K or QTYPE == _Q5_K:  # noqa: SIM109 (constexpr compare in a jit function)
        # Q4_K: d . dmin . scales[12] . qs[128]; Q5_K: d . dmin . scales[12] . qh[32] . qs[128].
        # 8 six-bit (scale, min) pairs: sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7; 4-7 in
        # the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7
        TS: tl.constexpr = 144 if QTYPE == _Q4_K else 176
        QS: tl.constexpr = 16 if QTYPE == _Q4_K else 48
        ks = _run_starts(k, G32)
        bs = w + (ks // 256) * TS
        s = (ks % 256) // 32
        s4 = s % 4
        a = tl.load(bs + 4 + s4).to(tl.int32)
        bb = tl.load(bs + 8 + s4).to(tl.int32)
        c = tl.load(bs + 12 + s4).to(tl.int32)
        sc = tl.where(s < 4, a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)).to(tl.float32)
        mn = tl.where(s < 4, bb & 0x3F, (c >> 4) | ((bb >> 2) & 0x30)).to(tl.float32)
        dl = _spread(tl.load(bs.to(f16)).to(tl.float32) * sc, G32)
        ml = _spread(tl.load((bs + 2).to(f16)).to(tl.float32) * mn, G32)
        # per 64 values: 32 bytes, low nibbles then high ones
        j = k % 256
        b = w + (k // 256) * TS
        q = (tl.load(b + QS + (j // 64) * 32 + j % 32).to(tl.int32) >> (((j // 32) % 2) * 4)) & 0x0F
        if QTYPE == _Q5_K:
            q = q | (((tl.load(b + 16 + j % 32).to(tl.int32) >> (j // 32)) & 1) << 4)
        v = dl * q.to(tl.float32) - ml
    elif QTYPE == _Q6_K:
        # ql[128] . qh[64] . scales int8[16] . d; per 128 values: 64 ql bytes (low nibbles, then
        # high), 32 qh bytes at shifts 0, 2, 4, 6; runs of 16 share a scale
        ks = _run_starts(k, 16)
        bs = w + (ks // 256) * 210
        sc = tl.load((bs + 192 + (ks % 256) // 16).to(i8)).to(tl.float32)
        dl = _spread(tl.load((bs + 208).to(f16)).to(tl.float32) * sc, 16)
        j = k % 256
        h = j // 128
        r = j % 128
        b = w + (k // 256) * 210
        ql = (tl.load(b + h * 64 + r % 64).to(tl.int32) >> ((r // 64) * 4)) & 0x0F
        qh = (tl.load(b + 128 + h * 32 + r % 32).to(tl.int32) >> ((r // 32) * 2)) & 3
        v = dl * ((ql | (qh << 4)) - 32).to(tl.float32)
    elif QTYPE == _IQ4_NL:
        # d . qs[16], 4-bit indices into the non-linear levels
        bs = w + (_run_starts(k, G32) // 32) * 18
        d = _spread(tl.load(bs.to(f16)).to(tl.float32), G32)
        v = d * tl.load(lut_ptr + _nibble(w + (k // 32) * 18 + 2, k % 32))
    elif QTYPE == _IQ4_XS:
        # d . scales_h u16 . scales_l[4] . qs[128]; six-bit sub-scale = low nibble | 2 high bits << 4, -32
        ks = _run_starts(k, G32)
        bs = w + (ks // 256) * 136
        s = (ks % 256) // 32
        hi = (tl.load(bs + 2 + s // 4).to(tl.int32) >> ((s % 4) * 2)) & 3
        lo = (tl.load(bs + 4 + s // 2).to(tl.int32) >> ((s % 2) * 4)) & 0x0F
        dl = _spread(tl.load(bs.to(f16)).to(tl.float32) * ((lo | (hi << 4)) - 32).to(tl.float32), G32)
        v = dl * tl.load(lut_ptr + _nibble(w + (k // 256) * 136 + 8, k % 256))
    elif QTYPE == _MXFP4:
        # e (E8M0) . qs[16]; scale 2^(e-128) from bits: (e-1) << 23 for e >= 2, else the
        # subnormals 2^-128, 2^-127 (0x00200000 << e), as torch_dequant builds it
        e = tl.load(w + (_run_starts(k, G32) // 32) * 17).to(tl.int32)
        d = _spread(tl.where(e < 2, 0x00200000 << tl.minimum(e, 1), (e - 1) << 23).to(tl.float32, bitcast=True), G32)
        v = d * tl.load(lut_ptr + _LUT_MXFP4 + _nibble(w + (k // 32) * 17 + 1, k % 32))
    else:
        tl.static_assert(False, "dequant_tile: unsupported QTYPE")
    return v
