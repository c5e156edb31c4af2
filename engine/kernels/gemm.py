"""Dense dequant-GEMM: y = x @ W.T with W read as raw GGUF blocks (dequantized tile by tile in
registers, never written out). Reference: engine.weights.quantized_linear (dequantize + matmul).

Grid: program_id(0) walks M, program_id(1) walks N, so the programs that run together share a
weight tile and W comes from DRAM about once; x (at most a few MB) stays in L2. Each program
streams its BLOCK_N rows of W along K, contiguous in memory. Configs chosen by M: GEMV-like ones
for the denoising step's small batches (BLOCK_M = 16, the smallest tl.dot tile, up to 64; narrow N
tiles so there are enough programs to fill the GPU) and a large one for prefill, which reuses each
dequantized weight tile for 128 rows. Under the interpreter one fixed config: time there goes with
the number of programs x loop trips (numpy work per tile hardly matters), so its tiles are large.

Products run in dot_dtype(x.dtype): bf16/fp16 tensor cores for half inputs (weights are rounded
to that type first; an F32/BF16 weight above 65504 would overflow fp16), tf32 for fp32 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

from engine.kernels import INTERPRET, dot_dtype
from engine.kernels.dequant import dequant_tile, lut, row_bytes


@triton.jit
def _dequant_matmul_kernel(x_ptr, w_ptr, lut_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym,
                           K: tl.constexpr, QTYPE: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # clamp the rows that are loaded; the store is masked instead
    row_off = (tl.minimum(rn, N - 1).to(tl.int64) * stride_wn)[:, None]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    x_mask = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K is a constexpr: the interpreter cannot loop to a runtime scalar under numpy 2.4, and there are
    # only five real widths to compile for
    for k0 in range(0, K, BLOCK_K):
        xt = tl.load(x_ptrs + k0, mask=x_mask, other=0.0).to(DOT)
        w = dequant_tile(w_ptr, lut_ptr, row_off, k0 + rk[None, :], QTYPE).to(DOT)
        acc = tl.dot(xt, tl.trans(w), acc)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=x_mask & (rn[None, :] < N))


SMALL_M = 64  # up to this many rows: the GEMV-like configs


def _config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for an [m, k] x [k, n] product.

    GPU choices are from ptxas -v on sm_90 (no spills, <= ~170 registers for every type; BLOCK_K =
    256 spilled for Q3_K/Q4_K/Q5_K), not yet from timings on a GPU."""
    if INTERPRET:
        bm, bn, bk_max, warps = 64, 64, 256, 4
    elif m <= SMALL_M:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bk_max = 128 if m <= 16 else 64
        # aim for >= ~2 programs per SM of a 132-SM H100 while N tiles stay >= 16 rows
        bn = 64 if triton.cdiv(n, 64) >= 264 else 32 if triton.cdiv(n, 32) >= 264 else 16
        warps = 8 if bn == 64 else 4
    else:
        bm, bn, bk_max, warps = 128, 128, 64, 8
    bk = next((b for b in (256, 128, 64, 32, 16) if b <= bk_max and k % b == 0), None)
    if bk is None:
        raise ValueError(f"dequant_matmul: K = {k} is not a multiple of 16")
    return bm, bn, bk, warps


def dequant_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: Q, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (or [..., K]) @ W.T -> [M, N] (or [..., N]) in x's dtype, accumulated in fp32.

    raw: uint8 [N, row_bytes], the stored GGUF rows of W [N, K] on x's device (WeightStore.raw);
    rows may be strided, bytes within a row must be contiguous. out: optional [M, N] result tensor."""
    qtype = Q(qtype)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], raw.shape[0]
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise TypeError(f"dequant_matmul: raw must be a 2-D uint8 tensor, got {raw.dtype} {tuple(raw.shape)}")
    if raw.shape[1] != row_bytes(qtype, k):
        raise ValueError(f"dequant_matmul: rows of {raw.shape[1]} bytes do not hold {k} {qtype.name} values")
    if raw.device != x.device:
        raise ValueError(f"dequant_matmul: x is on {x.device}, the weight on {raw.device}")
    if raw.stride(1) != 1 or raw.data_ptr() % 4 or raw.stride(0) % 2:
        raw = raw.contiguous()  # fp16/fp32 fields are read through cast pointers: keep them aligned
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"dequant_matmul: out must be a [{m}, {n}] {x.dtype} tensor with unit stride in N")
    if m and n:
        bm, bn, bk, warps = _config(m, n, k)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _dequant_matmul_kernel[grid](x2, raw, lut(x.device), out, m, n, x2.stride(0), raw.stride(0),
                                     out.stride(0), K=k, QTYPE=int(qtype), DOT=dot_dtype(x.dtype),
                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out.reshape(*lead, n)
