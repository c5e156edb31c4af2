"""Placement and memory checks for the command line: `diffgemma plan`, and what `diffgemma run` and
`diffgemma logits` check before they allocate.

* `make_plan()` is `diffgemma plan`: the planner (engine/placement.py) for a GGUF file or a config folder
  (sizes of a dry-run quantization plan of the chosen --type), with sizes such as "24GB", "18GiB" or
  "512MB" (memory units are binary: "24GB" is what a 24 GB card holds; a bare number is refused), and
  the context, canvas and --n-cpu-moe checked against the model; `plan_text()` prints it in 80 columns.
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
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gguf_tools.arch import ArchSpec
from gguf_tools.reader import GGUFFile
from gguf_tools.table import render
from gguf_tools.units import SizeError, fmt_rate, fmt_size, parse_size

from .placement import (
    DEFAULT_RESERVE,
    DTYPE_BYTES,
    PlacementError,
    Plan,
    TensorSize,
    build_rules,
    detect_host_ram,
    detect_vram,
    fixed_buffers,
    kv_entries,
    parse_bytes,
    plan_placement,
    sizes_from_source,
)

TORCH_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


# ---- diffgemma plan -----------------------------------------------------------------------------

DEFAULT_PLAN_CTX = 32768


def size_option(text: str | int | None, flag: str) -> int | None:
    """--vram / --host-ram: bytes, from a size that must carry its unit (gguf_tools.units)."""
    if text is None or isinstance(text, int):
        return text
    try:
        return parse_size(text, flag)
    except SizeError as e:
        raise PlacementError(str(e)) from None


def make_plan(source: Path | str, *, vram: str | int | None, ctx: int | None = None, type_name: str | None = None,
              canvas: int | None = None, host_ram: str | int | None = None, cpu_moe: bool = False,
              n_cpu_moe: int = 0, override_tensor: Sequence[str] = (), dtype: str = "bf16",
              backend: str = "torch") -> Plan:
    """The plan `diffgemma plan` prints. vram None: the free VRAM of this machine's CUDA device, or
    no budget without one; ctx None: the model's context length, at most 32768 tokens. Every option
    is checked before planning: sizes need a unit, the context and canvas fit the model, and
    --n-cpu-moe names no more layers than it has."""
    for flag, v in (("--ctx", ctx), ("--canvas", canvas)):
        if v is not None and v < 1:
            raise PlacementError(f"{flag} {v}: must be at least 1")
    if n_cpu_moe < 0:
        raise PlacementError(f"--n-cpu-moe {n_cpu_moe}: must be at least 0")
    vram_b, host_b = size_option(vram, "--vram"), size_option(host_ram, "--host-ram")
    spec, sizes, label = sizes_from_source(source, type_name)
    ctx = min(DEFAULT_PLAN_CTX, spec.context_length) if ctx is None else ctx
    if ctx > spec.context_length:
        raise PlacementError(f"--ctx {ctx} exceeds the model's context length {spec.context_length}")
    if canvas is not None and canvas > spec.context_length:
        raise PlacementError(f"--canvas {canvas} exceeds the model's context length {spec.context_length}")
    if n_cpu_moe > spec.block_count:
        raise PlacementError(f"--n-cpu-moe {n_cpu_moe}: the model has {spec.block_count} layers")
    budget = vram_b if vram_b is not None else detect_vram()
    ram = host_b if host_b is not None else detect_host_ram()
    rules = build_rules(tuple(override_tensor), cpu_moe, n_cpu_moe)
    return plan_placement(spec, sizes, ctx=ctx, vram_budget=budget, host_ram=ram, canvas=canvas, rules=rules,
                          dtype=dtype, reserve=DEFAULT_RESERVE, label=label, backend=backend)


def plan_summary(plan: Plan) -> str:
    """One closing line under plan_text(): the verdict and the three totals."""
    budget = "no budget" if plan.vram_budget_bytes is None else f"budget {fmt_size(plan.vram_budget_bytes)}"
    verdict = "fits" if plan.fits else "does not fit"
    return (f"{verdict}: VRAM {fmt_size(plan.gpu_bytes)} ({budget}; KV cache {fmt_size(plan.kv_cache_bytes)}, "
            f"buffers {fmt_size(plan.buffers_bytes)}), host RAM {fmt_size(plan.host_bytes)}, "
            f"{len(plan.offloaded)} tensors in host RAM ({len(plan.offloaded_layers)} expert layers)")


def plan_text(plan: Plan, width: int | None = 80) -> str:
    """The plan as `diffgemma plan` prints it: what sits in VRAM and host RAM, the expert layers and
    the rules, in tables no wider than `width` (None: one line per row). A refusal is not part of
    it: the command prints that once, as its error line."""
    w = width or 10**6
    costs = plan.costs
    cost = (f"link {fmt_rate(costs.link_bytes_per_s)}, CPU {costs.cpu_flops / 1e9:.0f} GFLOP/s + dequantization "
            f"{fmt_rate(costs.cpu_dequant_bytes_per_s)}, GPU {fmt_rate(costs.gpu_bytes_per_s)}")
    budget = "none" if plan.vram_budget_bytes is None else fmt_size(plan.vram_budget_bytes)
    host = "unknown" if plan.host_ram_bytes is None else fmt_size(plan.host_ram_bytes)
    head = [f"placement plan: {plan.label}",
            f"context {plan.ctx} tokens, canvas {plan.canvas}, compute dtype {plan.dtype}, prefill chunk "
            f"{plan.prefill_chunk}", f"VRAM budget {budget}, host RAM {host}", f"cost model ({costs.source}): {cost}"]
    out = [textwrap.fill(line, w, subsequent_indent="  ") for line in head]
    n_gpu = sum(1 for t in plan.tensors if t.device == "gpu")
    rows = [(f"weights resident ({n_gpu} tensors)", plan.gpu_weight_bytes)]
    rows += [(f"KV cache, {k.kind}: {k.layers} layers x {k.tokens} tokens", k.bytes) for k in plan.kv]
    rows += [(b.note, b.bytes) for b in plan.buffers]
    rows += [("reserve (CUDA context, allocator slack)", plan.reserve_bytes)]
    rows += [("total" + ("" if plan.vram_budget_bytes is None else f" (of {budget})"), plan.gpu_bytes)]
    out += ["", render(("VRAM", "size"), [(k, fmt_size(v)) for k, v in rows], width=width, right=(1,))]
    n_host = sum(1 for t in plan.tensors if t.device == "cpu")
    host_rows = [(f"offloaded weights ({n_host} tensors)", plan.host_weight_bytes),
                 (f"pinned staging ({plan.host_pinning})", plan.host_staging_bytes), ("total", plan.host_bytes)]
    out += [render(("host RAM", "size"), [(k, fmt_size(v)) for k, v in host_rows], width=width, right=(1,))]
    layer_rows = [(lp.layer, fmt_size(lp.bytes), fmt_size(lp.offloaded_bytes), lp.compute, f"{lp.est_ms:.1f}",
                   lp.reason) for lp in plan.layers]
    out += [render(("layer", "experts", "in RAM", "compute", "ms/step", "reason"), layer_rows, width=width,
                   wrap=(5,), right=(0, 1, 2, 4))]
    modes = plan.layer_modes()
    n_cpu = sum(1 for m in modes.values() if m == "cpu")
    n_off = len(plan.offloaded_layers)
    tail = [f"offloaded: {n_off} of {len(plan.layers)} expert layers ({n_cpu} computed on the CPU, "
            f"{n_off - n_cpu} streamed); {plan.auto_offloaded} chosen automatically",
            f"estimated weight time per denoising step: {plan.est_step_ms:.1f} ms (all resident: "
            f"{plan.est_resident_step_ms:.1f} ms)"]
    out += [textwrap.fill(line, w, subsequent_indent="  ") for line in tail]
    others = [t for t in plan.tensors if not t.expert and t.device == "cpu"]
    if others:
        out += ["", "other tensors in host RAM (by rule)",
                render(("name", "type", "size", "compute", "rule"),
                       [(t.name, t.qtype, fmt_size(t.bytes), t.compute, t.reason) for t in others],
                       width=width, wrap=(0, 4), right=(2,))]
    if plan.rules:
        out += ["", "rules (first match wins)",
                render(("rule", "from"), [(f"{r.pattern}={r.device}", r.origin) for r in plan.rules], width=width,
                       wrap=(0, 1))]
    return "\n".join(out).rstrip("\n") + "\n"


def plan_json(plan: Plan) -> dict[str, Any]:
    return plan.to_json()


# ---- diffgemma run ------------------------------------------------------------------------------

def sizes_of(f: GGUFFile) -> list[TensorSize]:
    return [TensorSize(t.name, tuple(t.shape), t.qtype.name, t.n_bytes) for t in f.tensors.values()]


def vram_budget(device: torch.device, vram: str | None) -> int | None:
    """--vram when given; else the free VRAM of a CUDA compute device; else no budget (a CPU device
    holds everything in host RAM, and the plan only follows the rules)."""
    if vram is not None:
        return parse_bytes(size_option(vram, "--vram"), "--vram")
    return detect_vram() if device.type == "cuda" else None


def plan_for_run(f: GGUFFile, spec: ArchSpec, device: torch.device, dtype: torch.dtype, *, ctx: int,
                 vram: str | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
                 override_tensor: Sequence[str] = (), backend: str = "torch") -> Plan:
    """The placement `diffgemma run` follows for the opened file `f` at `ctx` tokens of context. On a
    CPU compute device offloaded experts are computed where they lie (copying them to the same
    device would only cost time)."""
    rules = build_rules(tuple(override_tensor), cpu_moe, n_cpu_moe)
    return plan_placement(spec, sizes_of(f), ctx=ctx, vram_budget=vram_budget(device, vram),
                          host_ram=detect_host_ram(), rules=rules, dtype=TORCH_DTYPE_NAMES.get(dtype, "f32"),
                          offload_mode="auto" if device.type == "cuda" else "cpu", label=f.path.name,
                          backend=backend)


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
            return parse_bytes(size_option(vram, "--vram"), "--vram"), "the --vram budget"
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
    parts = ", ".join(f"{k} {fmt_size(v)}" for k, v in need.items())
    raise PlacementError(f"not enough memory for {ctx} tokens of context: needs {total} bytes ({fmt_size(total)}: "
                         f"{parts}) but {what} is {available} bytes ({fmt_size(available)}); {hint}")


__all__ = ["check_memory", "device_available", "host_available", "make_plan", "plan_for_run", "plan_json",
           "plan_summary", "plan_text", "runtime_need", "size_option", "sizes_of", "vram_budget"]
