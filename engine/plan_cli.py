"""Placement and memory checks for the command line: `diffgemma plan`, and what `diffgemma run` and
`diffgemma logits` check before they allocate.

* `make_plan()` is `diffgemma plan`: the planner (engine/placement.py) for a GGUF file or a config folder
  (sizes of a dry-run quantization plan of the chosen --type), with sizes such as "24GB", "18GiB" or
  "512MB" (memory units are binary: "24GB" is what a 24 GB card holds).
* `plan_for_run()` is the plan `diffgemma run` follows for an opened GGUF: the compute device's budget
  (--vram, else the free VRAM of a CUDA device, else none), this machine's RAM, the run's context.
* `runtime_need()` / `check_memory()` size the memory a run or a logits call allocates as it goes (KV
  cache, [C, V] fp32 canvas logits, self-conditioning feedback) with the planner's own formulas, and
  refuse before allocating when it exceeds what is available: MemAvailable on the CPU, the free VRAM
  (or --vram) on CUDA.

Every refusal is a PlacementError with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gguf_tools.arch import ArchSpec
from gguf_tools.reader import GGUFFile

from .placement import (
    DTYPE_BYTES,
    PlacementError,
    Plan,
    TensorSize,
    build_rules,
    detect_host_ram,
    detect_vram,
    fixed_buffers,
    fmt_bytes,
    kv_entries,
    parse_bytes,
    plan_for,
    plan_placement,
)

TORCH_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


# ---- diffgemma plan -----------------------------------------------------------------------------

def make_plan(source: Path | str, *, vram: str | None, ctx: int, type_name: str | None = None,
              canvas: int | None = None, host_ram: str | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
              override_tensor: Sequence[str] = (), dtype: str = "bf16") -> Plan:
    """The plan `diffgemma plan` prints. vram None: the free VRAM of this machine's CUDA device, or
    no budget without one."""
    if ctx < 1:
        raise PlacementError(f"--ctx {ctx}: must be at least 1")
    if canvas is not None and canvas < 1:
        raise PlacementError(f"--canvas {canvas}: must be at least 1")
    return plan_for(source, vram, ctx, type_name, override_tensor=tuple(override_tensor), cpu_moe=cpu_moe,
                    n_cpu_moe=n_cpu_moe, host_ram=host_ram, canvas=canvas, dtype=dtype)


def plan_summary(plan: Plan) -> str:
    """One closing line under explain(): the verdict and the three totals."""
    budget = "no budget" if plan.vram_budget_bytes is None else f"budget {fmt_bytes(plan.vram_budget_bytes)}"
    verdict = "fits" if plan.fits else "does not fit"
    return (f"{verdict}: VRAM {fmt_bytes(plan.gpu_bytes)} ({budget}; KV cache {fmt_bytes(plan.kv_cache_bytes)}, "
            f"buffers {fmt_bytes(plan.buffers_bytes)}), host RAM {fmt_bytes(plan.host_bytes)}, "
            f"{len(plan.offloaded)} tensors in host RAM ({len(plan.offloaded_layers)} expert layers)")


def plan_json(plan: Plan) -> dict[str, Any]:
    return plan.to_json()


# ---- diffgemma run ------------------------------------------------------------------------------

def sizes_of(f: GGUFFile) -> list[TensorSize]:
    return [TensorSize(t.name, tuple(t.shape), t.qtype.name, t.n_bytes) for t in f.tensors.values()]


def vram_budget(device: torch.device, vram: str | None) -> int | None:
    """--vram when given; else the free VRAM of a CUDA compute device; else no budget (a CPU device
    holds everything in host RAM, and the plan only follows the rules)."""
    if vram is not None:
        return parse_bytes(vram, "--vram")
    return detect_vram() if device.type == "cuda" else None


def plan_for_run(f: GGUFFile, spec: ArchSpec, device: torch.device, dtype: torch.dtype, *, ctx: int,
                 vram: str | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
                 override_tensor: Sequence[str] = ()) -> Plan:
    """The placement `diffgemma run` follows for the opened file `f` at `ctx` tokens of context. On a
    CPU compute device offloaded experts are computed where they lie (copying them to the same
    device would only cost time)."""
    rules = build_rules(tuple(override_tensor), cpu_moe, n_cpu_moe)
    return plan_placement(spec, sizes_of(f), ctx=ctx, vram_budget=vram_budget(device, vram),
                          host_ram=detect_host_ram(), rules=rules, dtype=TORCH_DTYPE_NAMES.get(dtype, "f32"),
                          offload_mode="auto" if device.type == "cuda" else "cpu", label=f.path.name)


# ---- memory check before allocating --------------------------------------------------------------

def runtime_need(spec: ArchSpec, ctx: int, rows: int, dtype: torch.dtype, self_cond: bool = True) -> dict[str, int]:
    """Bytes a run allocates as it goes, by part: the KV cache at `ctx` tokens, the fp32 logits of
    `rows` positions ([C, V] canvas logits, or the encoder's [P, V]), and with `self_cond` the
    previous step's logits and soft embeddings kept for self-conditioning (the planner's formulas)."""
    nb = DTYPE_BYTES[TORCH_DTYPE_NAMES.get(dtype, "f32")]
    kv = sum(k.bytes for k in kv_entries(spec, ctx, nb))
    buffers = {b.name: b.bytes for b in fixed_buffers(spec, (), ctx, rows, nb, rows, spec.vocab_size)}
    need = {"KV cache": kv, "logits": buffers["canvas_logits"]}
    if self_cond:
        need["self-conditioning"] = buffers["self_conditioning"]
    return need


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo; else free pages x page size; None when neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    parts = line.split()
                    return int(parts[1]) * (1024 if parts[2:] == ["kB"] else 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_available(device: torch.device, vram: str | None = None) -> tuple[int | None, str]:
    """(bytes available for the run's buffers, what they are): --vram or the free VRAM on CUDA, the
    available host RAM on the CPU."""
    if device.type == "cuda":
        if vram is not None:
            return parse_bytes(vram, "--vram"), "the --vram budget"
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except RuntimeError:
            return None, "free VRAM"
        return int(free), "free VRAM"
    return host_available(), "available host RAM"


def check_memory(need: dict[str, int], available: int | None, what: str, ctx: int, hint: str) -> None:
    """PlacementError naming the needed and available bytes when `need` does not fit."""
    total = sum(need.values())
    if available is None or total <= available:
        return
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in need.items())
    raise PlacementError(f"not enough memory for {ctx} tokens of context: needs {total} bytes ({fmt_bytes(total)}: "
                         f"{parts}) but {what} is {available} bytes ({fmt_bytes(available)}); {hint}")


__all__ = ["check_memory", "device_available", "host_available", "make_plan", "plan_for_run", "plan_json",
           "plan_summary", "runtime_need", "sizes_of", "vram_budget"]
