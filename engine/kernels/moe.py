"""Grouped MoE on the device: routing built without a host sync, then two Triton launches per layer.

    route(top_i, n_experts, block_m) -> Routing
    grouped_moe(u, top_i, top_w, down_scale, gate_up, gate_up_qtypes, down, down_qtype) -> [T, H]

Routing sorts the T*k (token, j) pairs by expert into a fixed worst-case padded layout: each expert's
pairs fill whole M-blocks of `block_m` slots, and the capacity (T*k + min(E, T*k)*(block_m-1), rounded
up to block_m) holds any routing, so every shape depends only on (T, k, E, block_m) and a step can be
captured in a CUDA graph. Blocks past the used ones carry expert -1 and the kernels skip them.

gate_up kernel: grid (M-blocks, F tiles); each program gathers its block's token rows of u, multiplies
them by its expert's gate and up rows (dequantized tile by tile from the raw GGUF blocks) and writes
gelu_tanh(gate) * up to act[slot, F]. Each weight tile is read once per M-block: with few tokens per
expert (a denoising step) that is once per step; M-blocks of a busy expert re-read it from L2.

down kernel: grid (M-blocks, H tiles); act @ Wd_e.T, times top_w[t, j] * down_scale[e], then the
top-k sum. By default that sum is an fp32 atomic_add into a zeroed fp32 [T, H] accumulator (the
order of the k additions, hence the last bit, can vary between runs on a GPU); deterministic=True
writes each pair's row to an fp32 [T*k, H] buffer instead and sums over k with torch, in j order.
The result is cast to u's dtype.

The torch reference is engine.model.grouped_experts + expert_mlp (there Block.moe has already
multiplied top_w by down_scale[top_i]; here they are separate inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from engine.kernels import INTERPRET, dot_dtype
from engine.kernels.dequant import dequant_tile, lut

_SQRT_8_OVER_PI = tl.constexpr(1.5957691216057308)  # gelu_tanh(x) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))


@dataclass(frozen=True)
class Routing:
    """Pairs (t, j) sorted by expert into M-blocks; all tensors int32 on top_i's device.

    block_expert [n_blocks]: the expert of each M-block, -1 for an unused block.
    slot_token [capacity]: the token whose row of u each slot reads (0 in padding slots, a valid row).
    slot_pair [capacity]: t * k + j of the pair in each slot, -1 in padding slots.
    pair_slot [T * k]: the slot of each pair (the inverse of slot_pair).
    counts [E]: pairs routed to each expert."""

    block_m: int
    top_k: int
    block_expert: torch.Tensor
    slot_token: torch.Tensor
    slot_pair: torch.Tensor
    pair_slot: torch.Tensor
    counts: torch.Tensor

    @property
    def n_blocks(self) -> int:
        return self.block_expert.shape[0]

    @property
    def capacity(self) -> int:
        return self.slot_pair.shape[0]


def capacity(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Slots that hold any routing of n_pairs pairs: each used expert wastes at most block_m - 1."""
    worst = n_pairs + min(n_experts, n_pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


def route(top_i: torch.Tensor, n_experts: int, block_m: int) -> Routing:
    """Routing for top_i [T, k] (expert ids in 0..n_experts-1), on its device, with no host sync.

    torch.bincount is avoided on purpose: on CUDA it reads the input's max back to size its output."""
    if top_i.dim() != 2:
        raise ValueError(f"top_i must be [T, k], got shape {tuple(top_i.shape)}")
    if block_m < 1:
        raise ValueError(f"block_m must be positive, got {block_m}")
    dev = top_i.device
    k = top_i.shape[1]
    flat = top_i.reshape(-1).to(torch.int64)
    n = flat.shape[0]
    cap = capacity(n, n_experts, block_m)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + (block_m - 1)) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    cstart = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    slot = (pend - padded)[sorted_e] + torch.arange(n, device=dev) - cstart[sorted_e]
    slot_pair = torch.full((cap,), -1, dtype=torch.int64, device=dev).scatter_(0, slot, order)
    pair_slot = torch.empty(n, dtype=torch.int64, device=dev).scatter_(0, order, slot)
    slot_token = torch.where(slot_pair >= 0, slot_pair // k, 0)
    # block b belongs to the first expert whose padded range ends after b * block_m
    starts = torch.arange(0, cap, block_m, device=dev)
    block_expert = torch.searchsorted(pend, starts, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1)
    i32 = torch.int32
    return Routing(block_m, k, block_expert.to(i32), slot_token.to(i32), slot_pair.to(i32), pair_slot.to(i32),
                   counts.to(i32))


@triton.jit
def _gate_up_kernel(u_ptr, g_ptr, up_ptr, lut_ptr, act_ptr, block_expert_ptr, slot_token_ptr,
                    stride_u, stride_act, g_rows, up_rows, up_row0, g_rb, up_rb,
                    H: tl.constexpr, F: tl.constexpr, QG: tl.constexpr, QU: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        slots = pid_m * BM + tl.arange(0, BM)
        tok = tl.load(slot_token_ptr + slots).to(tl.int64)
        n = pid_n * BN + tl.arange(0, BN)
        n_ld = tl.minimum(n, F - 1).to(tl.int64)  # loads stay inside the tensor, the store is masked
        e64 = e.to(tl.int64)
        g_off = ((e64 * g_rows + n_ld) * g_rb)[:, None]
        u_off = ((e64 * up_rows + up_row0 + n_ld) * up_rb)[:, None]
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            x = tl.load(u_ptr + tok[:, None] * stride_u + kk[None, :]).to(DOT)
            wg = dequant_tile(g_ptr, lut_ptr, g_off, kk[None, :], QG).to(DOT)
            acc_g = tl.dot(x, tl.trans(wg), acc_g)
            wu = dequant_tile(up_ptr, lut_ptr, u_off, kk[None, :], QU).to(DOT)
            acc_u = tl.dot(x, tl.trans(wu), acc_u)
        inner = _SQRT_8_OVER_PI * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        act = acc_g * tl.sigmoid(inner) * acc_u
        # padding slots are written too (from token 0's row): finite, and the down kernel drops them
        tl.store(act_ptr + slots[:, None].to(tl.int64) * stride_act + n[None, :],
                 act.to(act_ptr.dtype.element_ty), mask=n[None, :] < F)


@triton.jit
def _down_kernel(act_ptr, d_ptr, lut_ptr, out_ptr, block_expert_ptr, slot_pair_ptr, top_w_ptr, scale_ptr,
                 stride_act, stride_out, d_rb, TOP_K,
                 H: tl.constexpr, F: tl.constexpr, QD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, DOT: tl.constexpr, ATOMIC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        slots = pid_m * BM + tl.arange(0, BM)
        pair = tl.load(slot_pair_ptr + slots)
        valid = pair >= 0
        pair = tl.maximum(pair, 0).to(tl.int64)
        w = tl.load(top_w_ptr + pair, mask=valid, other=0.0) * tl.load(scale_ptr + e)
        n = pid_n * BN + tl.arange(0, BN)
        n_ld = tl.minimum(n, H - 1).to(tl.int64)
        d_off = ((e.to(tl.int64) * H + n_ld) * d_rb)[:, None]
        a_rows = act_ptr + slots[:, None].to(tl.int64) * stride_act
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, F, BK):
            kk = k0 + tl.arange(0, BK)
            a = tl.load(a_rows + kk[None, :]).to(DOT)
            wd = dequant_tile(d_ptr, lut_ptr, d_off, kk[None, :], QD).to(DOT)
            acc = tl.dot(a, tl.trans(wd), acc)
        acc = acc * w[:, None]
        mask = valid[:, None] & (n[None, :] < H)
        if ATOMIC:
            tok = pair // TOP_K
            tl.atomic_add(out_ptr + tok[:, None] * stride_out + n[None, :], acc, mask=mask, sem="relaxed")
        else:
            tl.store(out_ptr + pair[:, None] * stride_out + n[None, :], acc, mask=mask)


# N tiles (gate_up, down). The interpreter pays per op more than per element: wider tiles run faster there.
_BN_INTERPRET = (128, 256)
# GPU launch options, not yet tuned on a GPU: with 4 warps the K-quant gate_up tiles spill (ptxas, sm_90:
# 255 registers and 400-1100 bytes of spill at BM 16-64); 8 warps spill nothing for the Q4_K_M types.
_GPU_BN, _GPU_BK, _GPU_WARPS, _GPU_STAGES = 64, 64, 8, 3


def _block_k(k: int, prefer: int) -> int:
    for bk in (prefer, 128, 64, 32, 16):
        if bk <= prefer and k % bk == 0:
            return bk
    raise ValueError(f"row width {k} is not a multiple of 16")


def default_block_m(n_pairs: int, n_experts: int) -> int:
    """M-block size from the mean pairs per expert (shapes only, so it is fixed for a CUDA graph)."""
    mean = n_pairs / max(n_experts, 1)
    return 16 if mean <= 16 or INTERPRET else 32 if mean <= 48 else 64


def _expert_tensor(raw: torch.Tensor, qtype: Q, e: int, cols: int, what: str) -> tuple[int, int]:
    """(rows per expert, row bytes) of a raw 3-D expert tensor, checked against the expected width."""
    if raw.dtype != torch.uint8 or raw.dim() != 3:
        raise ValueError(f"{what}: expected raw uint8 [E, rows, row_bytes], got {raw.dtype} {tuple(raw.shape)}")
    block, size = GGML_QUANT_SIZES[Q(qtype)]
    if raw.shape[0] != e or cols % block or raw.shape[2] != cols // block * size:
        raise ValueError(f"{what}: {Q(qtype).name} {tuple(raw.shape)} does not hold {e} experts of rows "
                         f"{cols} wide")
    if not raw.is_contiguous():
        raise ValueError(f"{what}: raw expert tensor must be contiguous")
    return raw.shape[1], raw.shape[2]


def grouped_moe(u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor, down_scale: torch.Tensor,
                gate_up: tuple[torch.Tensor, ...], gate_up_qtypes: tuple[Q, ...], down: torch.Tensor,
                down_qtype: Q, *, routing: Routing | None = None, block_m: int | None = None,
                deterministic: bool = False) -> torch.Tensor:
    """sum_j top_w[t, j] * down_scale[e_j] * down_e(gelu_tanh(gate_e(u_t)) * up_e(u_t)), [T, H] in u's dtype.

    u [T, H]; top_i [T, k] int; top_w [T, k] (normalised router weights, fp32); down_scale [E];
    gate_up = (fused [E, 2F, rb],) with gate rows first, or (gate [E, F, rb], up [E, F, rb]), raw
    uint8 GGUF rows with their types in gate_up_qtypes; down raw uint8 [E, H, rb_d] of down_qtype.
    `routing` (from route(top_i, E, block_m)) may be passed in when several layers share top_i."""
    T, H = u.shape
    k = top_i.shape[1]
    E = down.shape[0]
    if len(gate_up) != len(gate_up_qtypes) or len(gate_up) not in (1, 2):
        raise ValueError("gate_up must be (fused,) or (gate, up), with one qtype each")
    if len(gate_up) == 1:
        rows, g_rb = _expert_tensor(gate_up[0], gate_up_qtypes[0], E, H, "gate_up")
        if rows % 2:
            raise ValueError(f"fused gate_up has an odd row count {rows}")
        F = rows // 2
        g_raw, up_raw, qg, qu = gate_up[0], gate_up[0], gate_up_qtypes[0], gate_up_qtypes[0]
        g_rows, up_rows, up_row0, up_rb = rows, rows, F, g_rb
    else:
        F, g_rb = _expert_tensor(gate_up[0], gate_up_qtypes[0], E, H, "gate")
        up_rows, up_rb = _expert_tensor(gate_up[1], gate_up_qtypes[1], E, H, "up")
        if up_rows != F:
            raise ValueError(f"gate has {F} rows per expert, up {up_rows}")
        g_raw, up_raw, qg, qu = gate_up[0], gate_up[1], gate_up_qtypes[0], gate_up_qtypes[1]
        g_rows, up_row0 = F, 0
    d_rows, d_rb = _expert_tensor(down, down_qtype, E, F, "down")
    if d_rows != H:
        raise ValueError(f"down has {d_rows} rows per expert, u is {H} wide")
    if top_i.shape[0] != T or top_w.shape != top_i.shape or down_scale.numel() != E:
        raise ValueError("top_i/top_w must be [T, k] and down_scale [E]")

    bm = routing.block_m if routing is not None else block_m or default_block_m(T * k, E)
    r = routing if routing is not None else route(top_i, E, bm)
    u = u.contiguous()
    dev = u.device
    table = lut(dev)
    dot = dot_dtype(u.dtype)
    bn_gu, bn_d = _BN_INTERPRET if INTERPRET else (_GPU_BN, _GPU_BN)
    bk = 256 if INTERPRET else _GPU_BK
    opts = {} if INTERPRET else {"num_warps": _GPU_WARPS, "num_stages": _GPU_STAGES}
    act = torch.empty(r.capacity, F, dtype=u.dtype, device=dev)
    _gate_up_kernel[(r.n_blocks, triton.cdiv(F, bn_gu))](
        u, g_raw, up_raw, table, act, r.block_expert, r.slot_token,
        u.stride(0), act.stride(0), g_rows, up_rows, up_row0, g_rb, up_rb,
        H=H, F=F, QG=int(qg), QU=int(qu), BM=bm, BN=bn_gu, BK=_block_k(H, bk), DOT=dot, **opts)

    tw = top_w.reshape(-1).to(torch.float32).contiguous()
    scale = down_scale.reshape(-1).to(device=dev, dtype=torch.float32).contiguous()
    if deterministic:  # every pair's row is written once
        out = torch.empty(T * k, H, dtype=torch.float32, device=dev)
    else:
        out = torch.zeros(T, H, dtype=torch.float32, device=dev)
    _down_kernel[(r.n_blocks, triton.cdiv(H, bn_d))](
        act, down, table, out, r.block_expert, r.slot_pair, tw, scale,
        act.stride(0), out.stride(0), d_rb, k,
        H=H, F=F, QD=int(down_qtype), BM=bm, BN=bn_d, BK=_block_k(F, bk), DOT=dot,
        ATOMIC=not deterministic, **opts)
    if deterministic:
        out = out.view(T, k, H).sum(1)
    return out.to(u.dtype)


def layer_moe(store, layer: int, u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor,
              down_scale: torch.Tensor, raw_of, *, routing: Routing | None = None) -> torch.Tensor:
    """grouped_moe for `layer` of a WeightStore, the raw expert tensors taken from raw_of(name) (as
    expert_mlp takes them: store.raw(name, device), or views of an offload executor's stream slot)."""
    *gate_up, down = store.expert_names(layer)
    return grouped_moe(u, top_i, top_w, down_scale, tuple(raw_of(n) for n in gate_up),
                       tuple(store.info(n).qtype for n in gate_up), raw_of(down), store.info(down).qtype,
                       routing=routing)


__all__ = ["Routing", "capacity", "default_block_m", "grouped_moe", "layer_moe", "route"]
