"""GGUF block dequantizers in torch, bit-identical with gguf-py 0.19.0's numpy `dequantize`.

Each `dequantize_blocks_<TYPE>(raw)` takes a uint8 tensor [n_blocks, type_size] on any device and
returns float32 [n_blocks, block_size] on the same device. The float work is the same IEEE float32
operations in the same order as gguf-py (gguf/quants.py `<TYPE>.dequantize_blocks`), e.g. Q4_K is
`(d*sc)*q - dmin*m`, never fused: eager torch runs one kernel per op, so nothing is contracted into
an FMA. Only integer unpacking differs in style. The byte layouts are ggml's (ggml-common.h,
`dequantize_row_*` in ggml-quants.c); see shared/reference/gguf-quantization.md section 1.2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

QK_K = 256
_IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 x 2 (ggml kvalues_mxfp4)


def _f16(raw: torch.Tensor, off: int) -> torch.Tensor:
    """Little-endian fp16 at byte `off` of each block -> float32 [n, 1] (exact widening)."""
    return raw[:, off : off + 2].contiguous().view(torch.float16).to(torch.float32)


def _shifts(raw: torch.Tensor, *s: int) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.uint8, device=raw.device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16k] bytes -> [n, 32k]: per 16-byte group, low nibbles then high nibbles (ggml Q4_0 order)."""
    n = qs.shape[0]
    g = qs.reshape(n, -1, 1, 16) >> _shifts(qs, 0, 4).reshape(1, 1, 2, 1)
    return (g & 0x0F).reshape(n, -1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] bits, bit j = element j."""
    n = qh.shape[0]
    return ((qh.reshape(n, 4, 1) >> _shifts(qh, *range(8)).reshape(1, 1, 8)) & 1).reshape(n, 32)


# Float types widen as one flat vector: torch's conversion of the [n, 1] block view takes a
# slower path (F16 -> F32 of 2.9M values: 3.7 ms as [n, 1], 1.3 ms flat, one thread).
def _widen(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return raw.contiguous().view(-1).view(dtype).to(torch.float32).view(raw.shape[0], -1)


def dequantize_blocks_F32(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float32)


def dequantize_blocks_F16(raw: torch.Tensor) -> torch.Tensor:
    return _widen(raw, torch.float16)


def dequantize_blocks_BF16(raw: torch.Tensor) -> torch.Tensor:
    # gguf-py shifts the 16 bits into the top of an fp32 word; bf16 -> fp32 widening is the same.
    return _widen(raw, torch.bfloat16)


def dequantize_blocks_Q8_0(raw: torch.Tensor) -> torch.Tensor:
    # widen the strided int8 quants straight into the output, then scale in place: a pass fewer
    # than contiguous() + to() + mul, and experts are dequantized on every denoising step
    out = torch.empty(raw.shape[0], 32, dtype=torch.float32, device=raw.device)
    out.copy_(raw[:, 2:].view(torch.int8))
    return out.mul_(_f16(raw, 0))


def dequantize_blocks_Q4_0(raw: torch.Tensor) -> torch.Tensor:
    d = _f16(raw, 0)
    q = _nibbles(raw[:, 2:]).to(torch.int16) - 8
    return d * q.to(torch.float32)


def dequantize_blocks_Q4_1(raw: torch.Tensor) -> torch.Tensor:
    d, m = _f16(raw, 0), _f16(raw, 2)
    q = _nibbles(raw[:, 4:]).to(torch.float32)
    return d * q + m


def dequantize_blocks_Q5_0(raw: torch.Tensor) -> torch.Tensor:
    # d . qh (u32, bit j = high bit of element j) . qs[16] (element j < 16: low nibble of byte j, else
    # the high nibble of byte j - 16). The 5-bit codes are built in one uint8 buffer, recentred in place
    # as int8 and widened by the multiply itself (d * (q - 16), the same float product as gguf-py); ops
    # over whole [n, 16] halves instead of broadcast shifts with 8- or 16-element inner loops (3x faster)
    n = raw.shape[0]
    qs = raw[:, 6:]
    q = torch.empty(n, 2, 16, dtype=torch.uint8, device=raw.device)
    torch.bitwise_and(qs, 0x0F, out=q[:, 0])
    torch.bitwise_right_shift(qs, 4, out=q[:, 1])
    qh = raw[:, 2:6].contiguous().view(torch.int32)
    high = ((qh >> torch.arange(32, dtype=torch.int32, device=raw.device)) & 1).to(torch.uint8) << 4
    q = q.view(n, 32).bitwise_or_(high).view(torch.int8).sub_(16)
    return torch.mul(q, _f16(raw, 0))


def dequantize_blocks_Q5_1(raw: torch.Tensor) -> torch.Tensor:
    d, m = _f16(raw, 0), _f16(raw, 2)
    q = (_nibbles(raw[:, 8:]) | (_bits32(raw[:, 4:8]) << 4)).to(torch.float32)
    return d * q + m


def dequantize_blocks_Q2_K(raw: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble scale, high nibble min) . qs[64] . d . dmin
    n = raw.shape[0]
    sc = raw[:, :16]
    d, dmin = _f16(raw, 80), _f16(raw, 82)
    dl = (d * (sc & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).to(torch.float32)).reshape(n, 16, 1)
    # per 128-value half: byte l holds elements l, l+32, l+64, l+96 at shifts 0, 2, 4, 6
    q = (raw[:, 16:80].reshape(n, 2, 1, 32) >> _shifts(raw, 0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def dequantize_blocks_Q3_K(raw: torch.Tensor) -> torch.Tensor:
    # hmask[32] . qs[64] . scales[12] . d
    n = raw.shape[0]
    hmask, qs, scales = raw[:, :32], raw[:, 32:96], raw[:, 96:108]
    d = _f16(raw, 108)
    # 16 six-bit scales: low 4 bits from bytes 0-7 (low nibble: j<8, high: j>=8), top 2 from bytes 8-11.
    lo = (scales[:, :8].reshape(n, 1, 8) >> _shifts(raw, 0, 4).reshape(1, 2, 1)).reshape(n, 16) & 0x0F
    hi = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(raw, 0, 2, 4, 6).reshape(1, 4, 1)).reshape(n, 16) & 0x03
    sc = ((lo | (hi << 4)).to(torch.int16) - 32).to(torch.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts(raw, 0, 2, 4, 6).reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(raw, *range(8)).reshape(1, 1, 8, 1)).reshape(n, 16, 16) & 1
    q = (ql.to(torch.int16) - ((qh ^ 1).to(torch.int16) << 2)).to(torch.float32)  # hbit clear => -4
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packing of 8 six-bit (scale, min) pairs -> two float32 [n, 8]."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def dequantize_blocks_Q4_K(raw: torch.Tensor) -> torch.Tensor:
    # d . dmin . scales[12] . qs[128]: qs byte l of 32-byte group g holds element 64g + l (low nibble)
    # and 64g + 32 + l (high nibble). Each nibble plane is multiplied straight into its place in the
    # output (the uint8 -> float32 widening happens inside the multiply), then dmin*m is subtracted in
    # place: (d*sc)*q - dmin*m as gguf-py, with no broadcast shift over [n, 4, 2, 32] (about 3x faster)
    n = raw.shape[0]
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k_scale_min(raw[:, 4:16])
    dl, ml = (d * sc).reshape(n, 4, 2, 1), (dmin * mn).reshape(n, 4, 2, 1)
    qs = raw[:, 16:].reshape(n, 4, 32)
    out = torch.empty(n, 4, 2, 32, dtype=torch.float32, device=raw.device)
    torch.mul(qs & 0x0F, dl[:, :, 0], out=out[:, :, 0])
    torch.mul(qs >> 4, dl[:, :, 1], out=out[:, :, 1])
    return out.sub_(ml).reshape(n, QK_K)


def dequantize_blocks_Q5_K(raw: torch.Tensor) -> torch.Tensor:
    # d . dmin . scales[12] . qh[32] . qs[128]
    n = raw.shape[0]
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k_scale_min(raw[:, 4:16])
    dl, ml = (d * sc).reshape(n, 8, 1), (dmin * mn).reshape(n, 8, 1)
    ql = (raw[:, 48:].reshape(n, 4, 1, 32) >> _shifts(raw, 0, 4).reshape(1, 1, 2, 1)).reshape(n, 8, 32) & 0x0F
    qh = (raw[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(raw, *range(8)).reshape(1, 1, 8, 1)).reshape(n, 8, 32) & 1
    q = (ql | (qh << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def dequantize_blocks_Q6_K(raw: torch.Tensor) -> torch.Tensor:
    # ql[128] . qh[64] . scales int8[16] . d. Per 128-value half h: element 32g + l (g = 0..3) takes the
    # low (g < 2) or high (g >= 2) nibble of ql[h, 32(g % 2) + l] and bits 2g..2g+1 of qh[h, l] on top.
    # The 6-bit codes are built in one uint8 buffer over whole planes, recentred in place as int8 and
    # widened by the multiply: (d*sc)*(q - 32) as gguf-py (about 2x faster than broadcast shifts)
    n = raw.shape[0]
    sc = raw[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    dl = (_f16(raw, 208) * sc).reshape(n, 16, 1)
    ql = raw[:, :128].reshape(n, 2, 2, 32)
    qh = raw[:, 128:192].reshape(n, 2, 32)
    q = torch.empty(n, 2, 4, 32, dtype=torch.uint8, device=raw.device)
    torch.bitwise_and(ql, 0x0F, out=q[:, :, 0:2])
    torch.bitwise_right_shift(ql, 4, out=q[:, :, 2:4])
    for g in range(4):
        q[:, :, g] |= ((qh >> (2 * g)) & 3) << 4
    q = q.view(torch.int8).sub_(32)
    return torch.mul(q.view(n, 16, 16), dl).reshape(n, QK_K)


def _iq4_levels(idx: torch.Tensor) -> torch.Tensor:
    k = torch.tensor(_IQ4_KVALUES, dtype=torch.float32, device=idx.device)
    return k[idx.to(torch.long)]


def dequantize_blocks_IQ4_NL(raw: torch.Tensor) -> torch.Tensor:
    return _f16(raw, 0) * _iq4_levels(_nibbles(raw[:, 2:]))


def dequantize_blocks_IQ4_XS(raw: torch.Tensor) -> torch.Tensor:
    # d . scales_h u16 . scales_l[4] . qs[128]; 6-bit sub-scale = low nibble | 2 high bits << 4, minus 32
    n = raw.shape[0]
    d = _f16(raw, 0)
    sh = raw[:, 2].to(torch.int32) | (raw[:, 3].to(torch.int32) << 8)
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=raw.device)
    hi = (sh.reshape(n, 1) >> shifts) & 3
    lo = ((raw[:, 4:8].reshape(n, 4, 1) >> _shifts(raw, 0, 4).reshape(1, 1, 2)).reshape(n, 8) & 0x0F).to(torch.int32)
    dl = (d * ((lo | (hi << 4)) - 32).to(torch.float32)).reshape(n, 8, 1)
    q = _iq4_levels(_nibbles(raw[:, 8:])).reshape(n, 8, 32)
    return (dl * q).reshape(n, QK_K)


def dequantize_blocks_MXFP4(raw: torch.Tensor) -> torch.Tensor:
    # e (E8M0) . qs[16]: codes 0..15 in the low nibbles, 16..31 in the high ones. gguf-py (and ggml's
    # kvalues_mxfp4) hold the E2M1 values doubled, so the scale is ggml_e8m0_to_fp32_half(e) = 2^(e-128):
    # built from bits, (e-1) << 23 for e >= 2 and the subnormals 2^-128, 2^-127 for e = 0, 1
    e = raw[:, :1].to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e.clamp(max=1), (e - 1) << 23)
    d = bits.view(torch.float32)
    k = torch.tensor(_MXFP4_KVALUES, dtype=torch.float32, device=raw.device)
    return d * k[_nibbles(raw[:, 1:]).to(torch.long)]


TORCH_DEQUANTIZERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q[name]: fn
    for name, fn in (
        (k.removeprefix("dequantize_blocks_"), v)
        for k, v in dict(globals()).items()
        if k.startswith("dequantize_blocks_")
    )
}


def dequantize_torch(raw_bytes: torch.Tensor, qtype: Q, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Quantized bytes (uint8, 1-D or [rows, row_bytes]) -> float32 tensor of `shape`, same device."""
    fn = TORCH_DEQUANTIZERS.get(Q(qtype))
    if fn is None:
        raise NotImplementedError(f"no torch dequantizer for {Q(qtype).name}")
    if raw_bytes.dtype != torch.uint8:
        raise TypeError(f"expected uint8 bytes, got {raw_bytes.dtype}")
    block, size = GGML_QUANT_SIZES[Q(qtype)]
    n = 1
    for s in shape:
        n *= int(s)
    if n % block or raw_bytes.numel() != n // block * size:
        raise ValueError(f"{raw_bytes.numel()} bytes do not hold {tuple(shape)} values of {Q(qtype).name}")
    return fn(raw_bytes.reshape(-1, size)).reshape(tuple(shape))
