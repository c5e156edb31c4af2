"""The vocabulary pass of a denoising step in Triton: tied head over the stored embedding with the
softcap fused, the sampler's row statistics, and the self-conditioning soft embedding.

Reference: DiffusionGemmaModel._vocab_pass (dequantize chunks of E, x @ E.T, cap*tanh(x/cap),
online softmax of z = logits/T accumulated into softmax(z) @ E) and engine.sampler.entropy /
torch.argmax of z.

Two kernels, because the soft embedding's accumulator is [C, H] with H = 2816: flash-attention style
(each V-tile program rescaling a running [BLOCK_C, H] sum) would keep that accumulator in global
memory and read-modify-write it for every V tile, more bytes than the weights. Instead:

1. `_head_kernel`, grid (C tiles, V tiles): logits tile = x @ dequant(E tile).T over H, softcap,
   one store of the [C, V] logits (the only time they are written), and per (V tile, row) the
   statistics of z: max, sum exp(z - max), sum exp(z - max) * (z - max), first index of the max.
   Tile statistics are merged with a few torch ops on [V tiles, C] arrays (no host sync).
2. `_soft_kernel`, grid (C tiles, H tiles, V splits): an ordinary GEMM softmax(z) @ E whose A operand
   is exp(z - logsumexp) made on the fly from the stored logits; split-V partial sums are added by
   torch. It reads E a second time (0.6 GB for the Q6_K table of Q4_K_M, ~0.2 ms at H100 bandwidth,
   small beside the 2 x 380 GFLOP of the two products at C = 256).

Entropy without cancellation: with l = sum exp(z - m) and s = sum exp(z - m)(z - m), H = log l - s/l,
both terms small when the row is confident (log-sum-exp minus sum p*z would subtract two numbers
near max z, ~75 at T = 0.4, and lose the 1e-3-sized entropies the stopping rule compares).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

from engine.kernels import INTERPRET, KERNEL_QTYPES, dot_dtype
from engine.kernels.dequant import dequant_tile, lut, row_bytes

__all__ = ["VocabResult", "vocab_pass"]


@dataclass
class VocabResult:
    logits: torch.Tensor  # [C, V] fp32, soft-capped (not divided by the temperature)
    soft: torch.Tensor | None  # [C, H] fp32 softmax(logits / T) @ E, not yet times sqrt(H); None without T
    max: torch.Tensor  # [C] fp32, of z = logits / T (z = logits without T)
    logsumexp: torch.Tensor  # [C] fp32, of z
    entropy: torch.Tensor  # [C] fp32, of softmax(z), nats
    argmax: torch.Tensor  # [C] int64, first index of the max of z (torch.argmax)


@triton.jit
def _softcap(acc, cap):
    # cap * tanh(acc / cap); tanh from one exp of a non-positive argument (no overflow, and
    # libdevice's tanh is missing under the interpreter)
    y = acc / cap
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(y < 0, -t, t)


@triton.jit
def _head_kernel(x_ptr, w_ptr, lut_ptr, t_ptr, out_ptr, tmax_ptr, tsum_ptr, tent_ptr, targ_ptr,
                 C, V, stride_xc, stride_wv, stride_oc, cap, H: tl.constexpr,
                 QTYPE: tl.constexpr, HAS_TEMP: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_v = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rk = tl.arange(0, BLOCK_K)
    c_ok = rc < C
    v_ok = rv < V
    # clamp the table rows that are read; the stores are masked instead
    row_off = (tl.minimum(rv, V - 1).to(tl.int64) * stride_wv)[:, None]
    x_ptrs = x_ptr + rc.to(tl.int64)[:, None] * stride_xc + rk[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        xt = tl.load(x_ptrs + k0, mask=c_ok[:, None], other=0.0).to(DOT)
        w = dequant_tile(w_ptr, lut_ptr, row_off, k0 + rk[None, :], QTYPE).to(DOT)
        acc = tl.dot(xt, tl.trans(w), acc)
    logits = _softcap(acc, cap)
    o_ptrs = out_ptr + rc.to(tl.int64)[:, None] * stride_oc + rv[None, :]
    tl.store(o_ptrs, logits, mask=c_ok[:, None] & v_ok[None, :])

    # IEEE division, as torch's logits / T (a plain `/` is approximate on the GPU)
    z = tl.math.div_rn(logits, tl.load(t_ptr)) if HAS_TEMP else logits
    z = tl.where(v_ok[None, :], z, float("-inf"))
    m = tl.max(z, axis=1)
    d = tl.where(v_ok[None, :], z - m[:, None], 0.0)
    p = tl.where(v_ok[None, :], tl.exp(d), 0.0)
    first = tl.min(tl.where(z == m[:, None], rv[None, :], V), axis=1)
    stat = pid_v * C + rc
    tl.store(tmax_ptr + stat, m, mask=c_ok)
    tl.store(tsum_ptr + stat, tl.sum(p, axis=1), mask=c_ok)
    tl.store(tent_ptr + stat, tl.sum(p * d, axis=1), mask=c_ok)
    tl.store(targ_ptr + stat, first, mask=c_ok)


@triton.jit
def _soft_kernel(logits_ptr, w_ptr, lut_ptr, t_ptr, lse_ptr, part_ptr, C, V, stride_lc, stride_wv,
                 H: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, QTYPE: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    c_ok = rc < C
    # p = exp(logits / T - lse) as one FMA and an exp2: this runs H / BLOCK_H times per logit, and
    # p need not reproduce z bit for bit (it is rounded to the dot dtype next)
    a = 1.4426950408889634 / tl.load(t_ptr)  # log2(e) / T
    b = tl.load(lse_ptr + rc, mask=c_ok, other=0.0) * 1.4426950408889634
    l_rows = logits_ptr + rc.to(tl.int64)[:, None] * stride_lc
    acc = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    first = split * TILES_PER_SPLIT * BLOCK_V
    # the last split may run past V: those tiles are fully masked (p = 0, rows clamped)
    for i in range(0, TILES_PER_SPLIT):
        rv = first + i * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = rv < V
        mask = c_ok[:, None] & v_ok[None, :]
        lg = tl.load(l_rows + rv[None, :], mask=mask, other=0.0)
        p = tl.where(mask, tl.math.exp2(lg * a - b[:, None]), 0.0)
        row_off = (tl.minimum(rv, V - 1).to(tl.int64) * stride_wv)[:, None]
        w = dequant_tile(w_ptr, lut_ptr, row_off, rh[None, :], QTYPE)
        acc = tl.dot(p.to(DOT), w.to(DOT), acc)
    p_ptrs = part_ptr + (split * C + rc.to(tl.int64))[:, None] * H + rh[None, :]
    tl.store(p_ptrs, acc, mask=c_ok[:, None])


def _pick(h: int, sizes: tuple[int, ...], what: str) -> int:
    b = next((b for b in sizes if h % b == 0), None)
    if b is None:
        raise ValueError(f"vocab_pass: hidden size {h} is not a multiple of {sizes[-1]} ({what})")
    return b


# GPU tile shapes: no register spills in ptxas -v for sm_90 at H = 2816 with F16, Q8_0, Q4_K and Q6_K
# tables (compiled, not yet timed on a GPU); the dequantized tile's integer temporaries are what
# bound BLOCK_K (head) and BLOCK_V (soft) to 32.
def _head_config(c: int, h: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_V, BLOCK_K, num_warps)."""
    if INTERPRET:  # speed there is about programs x loop trips: wide tiles, one config
        return 64, 512, _pick(h, (256, 128, 64, 32, 16), "BLOCK_K"), 4
    bk = _pick(h, (32, 16), "BLOCK_K")
    if c > 64:  # a canvas: each dequantized table tile serves 128 rows
        return 128, 128, bk, 8
    if c > 16:
        return 64, 128, bk, 8
    return 16, 128, bk, 4


def _soft_config(c: int, h: int, v: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_C, BLOCK_V, BLOCK_H, num_warps, V splits)."""
    if INTERPRET:
        return 64, 512, _pick(h, (256, 128, 64, 32, 16), "BLOCK_H"), 4, 2
    bc, warps = (128, 8) if c > 64 else (64, 8) if c > 32 else (32, 4) if c > 16 else (16, 4)
    bh = _pick(h, (128, 64, 32, 16), "BLOCK_H")
    # enough programs for ~2 per SM: (C tiles x H tiles) is only 44 for a 256-row canvas at H = 2816
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = triton.cdiv(2 * sms, triton.cdiv(c, bc) * (h // bh))
    return bc, 32, bh, warps, splits


def vocab_pass(x: torch.Tensor, raw_embd: torch.Tensor, qtype: Q, softcap: float,
               temperature: torch.Tensor | float | None = None,
               logits_out: torch.Tensor | None = None) -> VocabResult:
    """Tied head + softcap + row statistics (+ soft embedding with a temperature) in one sweep.

    x: [C, H] output-normed hidden states (any float dtype; cast to the dot dtype inside).
    raw_embd: uint8 [V, row_bytes] stored rows of token_embd (WeightStore.raw), on x's device.
    temperature: 0-dim fp32 tensor on the device (a float is copied there); None = no soft
    embedding, statistics of the logits themselves. logits_out: optional [C, V] fp32 buffer.
    Raises NotImplementedError for a table type without a kernel (the caller keeps the torch path).
    """
    qtype = Q(qtype)
    if qtype not in KERNEL_QTYPES:
        raise NotImplementedError(f"vocab_pass: no triton kernel for {qtype.name}")
    if x.dim() != 2 or raw_embd.dim() != 2 or raw_embd.dtype != torch.uint8:
        raise ValueError(f"vocab_pass: need x [C, H] and a uint8 [V, row_bytes] table, got {tuple(x.shape)} "
                         f"and {raw_embd.dtype} {tuple(raw_embd.shape)}")
    c, h = x.shape
    v = raw_embd.shape[0]
    dev = x.device
    if raw_embd.shape[1] != row_bytes(qtype, h):
        raise ValueError(f"vocab_pass: table rows of {raw_embd.shape[1]} bytes do not hold {h} {qtype.name} values")
    if raw_embd.device != dev:
        raise ValueError(f"vocab_pass: x is on {dev}, the table on {raw_embd.device}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if raw_embd.stride(1) != 1 or raw_embd.data_ptr() % 4 or raw_embd.stride(0) % 2:
        raw_embd = raw_embd.contiguous()  # fp16 fields are read through cast pointers
    if logits_out is None:
        logits_out = torch.empty(c, v, dtype=torch.float32, device=dev)
    elif logits_out.shape != (c, v) or logits_out.dtype != torch.float32 or logits_out.stride(-1) != 1:
        raise ValueError(f"vocab_pass: logits_out must be a [{c}, {v}] float32 tensor with unit stride in V")
    if temperature is not None and not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(float(temperature), dtype=torch.float32, device=dev)
    if temperature is not None:
        temperature = temperature.to(device=dev, dtype=torch.float32).reshape(())
    table_lut = lut(dev)
    dot = dot_dtype(x.dtype)

    bc, bv, bk, warps = _head_config(c, h)
    n_vt = triton.cdiv(v, bv)
    tmax, tsum, tent = (torch.empty(n_vt, c, dtype=torch.float32, device=dev) for _ in range(3))
    targ = torch.empty(n_vt, c, dtype=torch.int32, device=dev)
    t_arg = temperature if temperature is not None else tmax  # unread without HAS_TEMP
    if c:
        _head_kernel[(triton.cdiv(c, bc), n_vt)](
            x, raw_embd, table_lut, t_arg, logits_out, tmax, tsum, tent, targ, c, v, x.stride(0),
            raw_embd.stride(0), logits_out.stride(0), float(softcap), H=h, QTYPE=int(qtype),
            HAS_TEMP=temperature is not None, DOT=dot, BLOCK_C=bc, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps,
            num_stages=1 if INTERPRET else 3)

    # merge the V tiles' statistics: rescale each tile's sums to the row max
    m = tmax.amax(dim=0)
    shift = tmax - m
    scale = torch.exp(shift)
    sum_exp = (tsum * scale).sum(dim=0)
    sum_pd = ((tent + shift * tsum) * scale).sum(dim=0)
    log_l = torch.log(sum_exp)
    lse = m + log_l
    entropy = (log_l - sum_pd / sum_exp).clamp_min_(0.0)
    # the first tile holding the row max (torch.argmax takes the first), then its first index
    argmax = targ.gather(0, tmax.argmax(dim=0, keepdim=True)).squeeze(0).long()

    soft = None
    if temperature is not None:
        sc, sv, sh, swarps, splits = _soft_config(c, h, v, dev)
        tiles = triton.cdiv(v, sv)
        per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
        splits = triton.cdiv(tiles, per_split)  # none left empty
        part = torch.empty(splits, c, h, dtype=torch.float32, device=dev)
        if c:
            _soft_kernel[(triton.cdiv(c, sc), h // sh, splits)](
                logits_out, raw_embd, table_lut, temperature, lse, part, c, v, logits_out.stride(0),
                raw_embd.stride(0), H=h, TILES_PER_SPLIT=per_split, QTYPE=int(qtype), DOT=dot, BLOCK_C=sc,
                BLOCK_V=sv, BLOCK_H=sh, num_warps=swarps, num_stages=1 if INTERPRET else 3)
        soft = part.sum(dim=0) if splits > 1 else part[0]
    return VocabResult(logits_out, soft, m, lse, entropy, argmax)
