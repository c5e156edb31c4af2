"""Memory planner: which tensors live in VRAM, which MoE experts live in host RAM, and what it costs.

`plan_placement()` is a pure function of tensor sizes (from a GGUF, or a dry-run conversion plan of a
config folder), the context and canvas lengths, a VRAM budget, the host RAM and llama.cpp-style
placement rules. It returns an immutable `Plan`:

* every tensor's device ("gpu" = the compute device, "cpu" = host RAM) and compute: "gpu" (resident),
  "cpu" (offloaded experts computed on the CPU with torch, only the routed tokens) or "stream"
  (copied to the compute device each use, experts through pinned staging with prefetch);
* the KV cache per layer type: sliding layers keep `window - 1` keys, full layers the whole context;
  K and V both stored in the compute dtype (full layers are k_eq_v but V = norm(raw k) differs from
  K = rope(k_norm(raw k)), so V is stored too, as the engine's KVCache does);
* the fixed buffers: canvas logits (C x V fp32), self-conditioning feedback, sampler scratch, attention
  workspace, activations, dequantization scratch, expert stream slots; and a reserve for the CUDA
  context and allocator slack.

Rules follow llama.cpp: `--override-tensor REGEX=cpu|gpu` (comma-separated lists allowed, regex searched
in the tensor name, the first rule that matches decides), `--cpu-moe` (= `\\.ffn_(up|down|gate|gate_up)_exps=cpu`)
and `--n-cpu-moe N` (the same for blk.0 .. blk.N-1, as mainline llama.cpp). Explicit overrides come first,
so they win over --cpu-moe/--n-cpu-moe. Tensors no rule names stay resident unless the budget forces
an automatic offload: then whole expert layers move to host RAM, cheapest first (per byte of VRAM
freed, under the cost model; later layers first on ties, as ik_llama.cpp's placement), and each
offloaded layer is computed on the CPU or streamed, whichever mix the cost model says is faster.
A budget that cannot hold the non-expert weights, the KV cache, the buffers and the reserve is
refused with a message that says how much is needed.

Sizes are in bytes. Inputs follow the memory (JEDEC) convention: "24GB", "24GiB" and "24G" are all
24 * 2^30 bytes, what a "24 GB" card holds; printouts say GiB. Buffers are summed although some
never coexist (the sampler runs after the forward pass), so the total is an upper bound; the
reserve covers the CUDA context and allocator slack.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf_tools.arch import ArchSpec

MIB = 1 << 20
DEFAULT_RESERVE = 512 * MIB  # CUDA context, cuBLAS workspace, caching-allocator slack
DEFAULT_CANVAS_PREFILL_CHUNK = 256
DEFAULT_VOCAB_CHUNK = 32768  # engine.model.VOCAB_CHUNK, the largest chunk the model uses (CPU uses less)
STAGING_CHUNK = 64 * MIB  # one pinned staging buffer (two are used, double-buffered)
STREAM_SLOTS = 2  # device buffers for streamed expert layers: the current one and the prefetched next
MIN_STREAM_LAYERS = 3  # with two slots, fewer streamed layers would save no VRAM
SMALL_ELEMENTS = 1 << 16  # WeightStore.SMALL: such tensors stay on the compute device whatever the rules say

EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate_up|gate|up|down)_exps\.weight$")
LAYER_RE = re.compile(r"^blk\.(\d+)\.")
CPU_MOE_PATTERN = r"\.ffn_(up|down|gate|gate_up)_exps"  # llama.cpp llm_ffn_exps_cpu_override()
DTYPE_BYTES = {"f32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "f16": 2, "float16": 2}
GPU_NAMES = ("gpu", "cuda", "cuda0", "gpu0")
CPU_NAMES = ("cpu", "host")


class PlacementError(ValueError):
    """Bad planner input, or (from Plan.require) a plan that does not fit."""


# ---- small helpers ------------------------------------------------------------------------------

GIB = 1 << 30
# memory sizes in the JEDEC convention nvidia-smi and card boxes use: a "24 GB" card holds 24 GiB
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MIB, "mb": MIB, "mib": MIB,
          "g": GIB, "gb": GIB, "gib": GIB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'24GB' = '24GiB' = '24G' -> 24 * 2^30 (memory sizes are binary, as nvidia-smi counts them);
    '512MB' -> 512 MiB; a plain number ('1.5e9', 1500000000) is bytes."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None:
            raise PlacementError(f"{what} {text!r}: expected a number with an optional unit, e.g. 24GB or 16GiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise PlacementError(f"{what} {text!r}: unknown unit {unit!r} (use B, MB, GB, MiB, GiB)")
    if value < 0:
        raise PlacementError(f"{what} {text!r} is negative")
    return int(value * _UNITS[unit])


def fmt_bytes(n: int | float) -> str:
    """Sizes as every command prints them (gguf_tools.units.fmt_size: MiB below 1 GiB, as llama.cpp)."""
    from gguf_tools.units import fmt_size

    return fmt_size(n)


def _n_elements(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def is_expert(name: str) -> bool:
    return EXPERT_RE.match(name) is not None


@dataclass(frozen=True)
class TensorSize:
    name: str
    shape: tuple[int, ...]  # NumPy order
    qtype: str  # GGML type name
    bytes: int


# ---- rules --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlacementRule:
    pattern: str  # regex, searched in the tensor name
    device: str  # "cpu" or "gpu"
    origin: str  # the option it came from, for explain()

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_override(text: str) -> tuple[PlacementRule, ...]:
    """One `--override-tensor` value: 'REGEX=cpu' or 'A=cpu,B=gpu' (llama.cpp -ot syntax; buffer
    names CPU/CUDA0/GPU are accepted case-insensitively)."""
    rules = []
    for part in text.split(","):
        pattern, sep, target = part.rpartition("=")
        if not sep or not pattern:
            raise PlacementError(f"--override-tensor {text!r}: expected REGEX=cpu|gpu")
        t = target.strip().lower()
        if t in CPU_NAMES:
            device = "cpu"
        elif t in GPU_NAMES:
            device = "gpu"
        else:
            raise PlacementError(f"--override-tensor {text!r}: unknown device {target!r} (use cpu or gpu)")
        try:
            re.compile(pattern)
        except re.error as e:
            raise PlacementError(f"--override-tensor {text!r}: bad regular expression ({e})") from None
        rules.append(PlacementRule(pattern, device, f"--override-tensor {pattern}={device}"))
    return tuple(rules)


def build_rules(override_tensor: Iterable[str] = (), cpu_moe: bool = False, n_cpu_moe: int = 0
                ) -> tuple[PlacementRule, ...]:
    """Rules in the order they are tried: explicit overrides (in the given order), then --cpu-moe,
    then --n-cpu-moe. The first rule that matches a tensor decides its device."""
    if n_cpu_moe < 0:
        raise PlacementError(f"--n-cpu-moe {n_cpu_moe}: must be >= 0")
    rules: list[PlacementRule] = []
    for text in override_tensor:
        rules.extend(parse_override(text))
    if cpu_moe:
        rules.append(PlacementRule(CPU_MOE_PATTERN, "cpu", "--cpu-moe"))
    for i in range(n_cpu_moe):
        rules.append(PlacementRule(rf"^blk\.{i}{CPU_MOE_PATTERN}", "cpu", f"--n-cpu-moe {n_cpu_moe}"))
    return tuple(rules)


# ---- cost model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostModel:
    """Throughputs the per-layer choice (compute offloaded experts on the CPU, or stream them) uses.

    Defaults are assumptions: a PCIe 4.0 x16 link (24 GB/s pinned, the measured range in
    performance-anchors.md §2.1), an RTX 4090-class card, and a 16-core CPU running this engine's
    torch kernels as the H200 machine's 16 cores did (fp32 GEMM on expert-shaped operands 385
    GFLOP/s; the torch dequantizers 0.23 GB/s of stored Q4_K bytes). `engine.experts.measure_costs()`
    measures the real ones (link, CPU GEMM, CPU dequantization of the stored type)."""

    link_bytes_per_s: float = 24e9  # pinned host -> device copy
    cpu_flops: float = 0.4e12  # effective CPU GEMM on ~16-row expert matmuls
    cpu_dequant_bytes_per_s: float = 0.25e9  # stored expert bytes dequantized per second on the CPU
    gpu_bytes_per_s: float = 1.0e12  # resident weights read per second on the GPU
    source: str = "assumed"

    def stream_s(self, n_bytes: int) -> float:
        return n_bytes / self.link_bytes_per_s

    def cpu_s(self, n_bytes: int, flops: float) -> float:
        return n_bytes / self.cpu_dequant_bytes_per_s + flops / self.cpu_flops

    def gpu_s(self, n_bytes: int) -> float:
        return n_bytes / self.gpu_bytes_per_s

    def describe(self) -> str:
        return (f"link {self.link_bytes_per_s / 1e9:.1f} GB/s, CPU {self.cpu_flops / 1e9:.0f} GFLOP/s + dequant "
                f"{self.cpu_dequant_bytes_per_s / 1e9:.2f} GB/s, GPU {self.gpu_bytes_per_s / 1e9:.1f} GB/s")

    def to_json(self) -> dict[str, Any]:
        return {"link_bytes_per_s": self.link_bytes_per_s, "cpu_flops": self.cpu_flops,
                "cpu_dequant_bytes_per_s": self.cpu_dequant_bytes_per_s, "gpu_bytes_per_s": self.gpu_bytes_per_s,
                "source": self.source}


# ---- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorPlacement:
    name: str
    shape: tuple[int, ...]
    qtype: str
    bytes: int
    device: str  # "gpu" | "cpu"
    compute: str  # "gpu" | "cpu" | "stream"
    reason: str
    layer: int | None = None
    expert: bool = False


@dataclass(frozen=True)
class KVEntry:
    kind: str  # "sliding" | "full"
    layers: int
    tokens: int  # keys held per layer
    bytes: int  # all layers of this kind, K and V


@dataclass(frozen=True)
class Buffer:
    name: str
    bytes: int
    note: str


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    bytes: int  # all expert tensors of the layer
    offloaded_bytes: int
    compute: str  # "gpu" | "cpu" | "stream"
    reason: str
    est_ms: float  # cost model: extra time per denoising step (0 when resident)


@dataclass(frozen=True)
class Plan:
    fits: bool
    message: str
    label: str
    vram_budget_bytes: int | None
    host_ram_bytes: int | None
    ctx: int
    canvas: int
    dtype: str
    prefill_chunk: int
    vocab_chunk: int
    tensors: tuple[TensorPlacement, ...]
    kv: tuple[KVEntry, ...]
    buffers: tuple[Buffer, ...]
    reserve_bytes: int
    layers: tuple[LayerPlan, ...]
    host_pinning: str  # "none" | "arena" (offloaded streamed experts copied once to pinned RAM) | "staging"
    host_staging_bytes: int
    costs: CostModel
    est_step_ms: float  # cost model: expert/weight part of one denoising step
    est_resident_step_ms: float  # the same with every tensor resident
    rules: tuple[PlacementRule, ...] = ()
    auto_offloaded: int = 0  # expert layers the planner moved on its own

    # ---- totals ------------------------------------------------------------------------------
    @property
    def gpu_weight_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors if t.device == "gpu")

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.bytes for k in self.kv)

    @property
    def buffers_bytes(self) -> int:
        return sum(b.bytes for b in self.buffers)

    @property
    def gpu_bytes(self) -> int:
        return self.gpu_weight_bytes + self.kv_cache_bytes + self.buffers_bytes + self.reserve_bytes

    @property
    def host_weight_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors if t.device == "cpu")

    @property
    def host_bytes(self) -> int:
        return self.host_weight_bytes + self.host_staging_bytes

    @property
    def offloaded(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if t.device == "cpu")

    @property
    def offloaded_layers(self) -> tuple[int, ...]:
        return tuple(lp.layer for lp in self.layers if lp.offloaded_bytes)

    def layer_modes(self) -> dict[int, str]:
        """Offloaded expert layers -> "cpu" | "stream" (what engine.experts follows)."""
        return {lp.layer: lp.compute for lp in self.layers if lp.offloaded_bytes}

    def tensor(self, name: str) -> TensorPlacement:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def require(self) -> Plan:
        """The plan itself when it fits; PlacementError with the refusal message otherwise."""
        if not self.fits:
            raise PlacementError(self.message)
        return self

    # ---- output ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "message": self.message,
            "model": self.label,
            "vram_budget_bytes": self.vram_budget_bytes,
            "host_ram_bytes": self.host_ram_bytes,
            "gpu_bytes": self.gpu_bytes,
            "gpu_weight_bytes": self.gpu_weight_bytes,
            "host_bytes": self.host_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_cache": [{"kind": k.kind, "layers": k.layers, "tokens": k.tokens, "bytes": k.bytes} for k in self.kv],
            "buffers_bytes": self.buffers_bytes,
            "buffers": {b.name: b.bytes for b in self.buffers},
            "reserve_bytes": self.reserve_bytes,
            "ctx": self.ctx,
            "canvas": self.canvas,
            "dtype": self.dtype,
            "prefill_chunk": self.prefill_chunk,
            "host_pinning": self.host_pinning,
            "offloaded": list(self.offloaded),
            "layers": [{"layer": lp.layer, "bytes": lp.bytes, "offloaded_bytes": lp.offloaded_bytes,
                        "compute": lp.compute, "est_ms": round(lp.est_ms, 3)} for lp in self.layers],
            "est_step_ms": round(self.est_step_ms, 3),
            "est_resident_step_ms": round(self.est_resident_step_ms, 3),
            "cost_model": self.costs.to_json(),
            "rules": [{"pattern": r.pattern, "device": r.device, "origin": r.origin} for r in self.rules],
            "tensors": [{"name": t.name, "bytes": t.bytes, "device": t.device, "compute": t.compute}
                        for t in self.tensors],
        }

    def explain(self, all_tensors: bool = False) -> str:
        """A fixed-format table: VRAM, host RAM, expert layers, and tensors placed by rules."""
        w = 58
        budget = "unlimited" if self.vram_budget_bytes is None else fmt_bytes(self.vram_budget_bytes)
        host = "unknown" if self.host_ram_bytes is None else fmt_bytes(self.host_ram_bytes)
        lines = [f"placement plan: {self.label}",
                 f"  context {self.ctx} tokens, canvas {self.canvas}, compute dtype {self.dtype}, "
                 f"prefill chunk {self.prefill_chunk}",
                 f"  VRAM budget {budget}, host RAM {host}",
                 f"  cost model ({self.costs.source}): {self.costs.describe()}",
                 "",
                 "VRAM"]
        n_gpu = sum(1 for t in self.tensors if t.device == "gpu")
        rows = [(f"weights resident ({n_gpu} tensors)", self.gpu_weight_bytes)]
        rows += [(f"KV cache, {k.kind}: {k.layers} layers x {k.tokens} tokens", k.bytes) for k in self.kv]
        rows += [(b.note, b.bytes) for b in self.buffers]
        rows += [("reserve (CUDA context, allocator slack)", self.reserve_bytes)]
        lines += [f"  {name:<{w}}{fmt_bytes(n):>12}" for name, n in rows]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        of = "" if self.vram_budget_bytes is None else f" of {budget}"
        lines.append(f"  {'total':<{w}}{fmt_bytes(self.gpu_bytes):>12}{of}: {verdict}")
        lines += ["", "host RAM"]
        n_host = sum(1 for t in self.tensors if t.device == "cpu")
        lines.append(f"  {f'offloaded weights ({n_host} tensors)':<{w}}{fmt_bytes(self.host_weight_bytes):>12}")
        lines.append(f"  {f'pinned staging ({self.host_pinning})':<{w}}{fmt_bytes(self.host_staging_bytes):>12}")
        lines.append(f"  {'total':<{w}}{fmt_bytes(self.host_bytes):>12}")
        lines += ["", "expert layers", f"  {'layer':>5}  {'experts':>10}  {'in RAM':>10}  {'compute':<7}  "
                  f"{'ms/step':>8}  reason"]
        for lp in self.layers:
            lines.append(f"  {lp.layer:>5}  {fmt_bytes(lp.bytes):>10}  {fmt_bytes(lp.offloaded_bytes):>10}  "
                         f"{lp.compute:<7}  {lp.est_ms:>8.1f}  {lp.reason}")
        off = self.offloaded_layers
        modes = self.layer_modes()
        n_cpu = sum(1 for m in modes.values() if m == "cpu")
        lines.append(f"  offloaded: {len(off)} of {len(self.layers)} layers ({n_cpu} computed on the CPU, "
                     f"{len(off) - n_cpu} streamed); {self.auto_offloaded} chosen automatically")
        lines.append(f"  estimated weight time per denoising step: {self.est_step_ms:.1f} ms "
                     f"(all resident: {self.est_resident_step_ms:.1f} ms)")
        others = [t for t in self.tensors if (all_tensors or (not t.expert and t.device == "cpu"))]
        if others:
            lines += ["", "tensors" if all_tensors else "other tensors in host RAM (by rule)"]
            lines += [f"  {t.name:<44}{t.qtype:>6}{fmt_bytes(t.bytes):>11}  {t.device:<3}  {t.compute:<6}  {t.reason}"
                      for t in others]
        if self.rules:
            lines += ["", "rules (first match wins)"]
            lines += [f"  {r.pattern}={r.device}  ({r.origin})" for r in self.rules]
        if not self.fits:
            lines += ["", f"refused: {self.message}"]
        return "\n".join(lines) + "\n"


# ---- estimates ----------------------------------------------------------------------------------

def kv_entries(spec: ArchSpec, ctx: int, dtype_bytes: int) -> tuple[KVEntry, ...]:
    """K and V per layer type: sliding layers hold min(ctx, window - 1) keys, full layers ctx keys."""
    out = []
    for kind, sliding in (("sliding", True), ("full", False)):
        idx = [i for i in range(spec.block_count) if spec.sliding_window_pattern[i] == sliding]
        if not idx:
            continue
        g = spec.layer(idx[0])
        tokens = min(ctx, max(spec.sliding_window - 1, 0)) if sliding else ctx
        per_layer = 2 * tokens * g.n_kv_head * g.head_dim * dtype_bytes
        out.append(KVEntry(kind, len(idx), tokens, per_layer * len(idx)))
    return tuple(out)


def fixed_buffers(spec: ArchSpec, tensors: Sequence[TensorSize], ctx: int, canvas: int, dtype_bytes: int,
                  prefill_chunk: int, vocab_chunk: int, backend: str = "torch") -> list[Buffer]:
    """Working memory that does not depend on placement (see the module docstring). The triton
    backend reads weights in place: a kernel workspace replaces the dequantization scratch."""
    V, H = spec.vocab_size, spec.embedding_length
    C, T = canvas, max(canvas, prefill_chunk)
    logits = C * V * 4
    out = [Buffer("canvas_logits", logits, f"canvas logits {C} x {V} fp32")]
    # the previous step's temperature-scaled logits kept for self-conditioning, its soft embedding
    out.append(Buffer("self_conditioning", logits + 2 * C * H * 4, "self-conditioning logits + soft embeddings"))
    # temperature scaling and the softmax of sampling, each C x V fp32
    out.append(Buffer("sampler", 2 * logits, "sampler scratch (scaled logits, probabilities)"))
    # attention of one layer at the longest key range. Block.attend calls SDPA with enable_gqa, which
    # (and head_dim 512) takes torch's math path: q, K, V upcast to fp32, K/V expanded to the query
    # heads, scores / softmax / dropout-free copy [Hq, T, S] fp32, plus the cached+new K/V concat and
    # the encoder's bool mask. Measured on an H200 at 32K context: 4.21 GB for a full layer.
    attn = 0
    for i in range(spec.block_count):
        g = spec.layer(i)
        S = (min(ctx, spec.sliding_window - 1) if g.sliding else ctx) + T
        Hq, Hkv, d = spec.head_count, g.n_kv_head, g.head_dim
        upcast = 2 * Hkv * S * d * 4 if dtype_bytes < 4 else 0
        expand = 2 * Hq * S * d * 4 if Hq != Hkv else 0
        scores = 3 * Hq * T * S * 4
        concat = 2 * Hkv * S * d * dtype_bytes
        attn = max(attn, upcast + expand + Hq * T * d * 4 + scores + concat + T * S)
    out.append(Buffer("attention", attn, f"attention workspace ({T} queries x {ctx + T} keys)"))
    # hidden states, q/k/v, the dense MLP, routing, MoE slots and one expert's rows, vocab chunk
    k, F, E = spec.expert_used_count, spec.feed_forward_length, spec.expert_count
    qdim = max(spec.head_count * spec.layer(i).head_dim for i in range(spec.block_count))
    act = T * (8 * H * 4 + 3 * qdim * dtype_bytes + 3 * F * dtype_bytes + E * 4 * 2 + k * H * dtype_bytes * 2
               + k * 4 * 4) + 3 * T * min(vocab_chunk, V) * 4
    out.append(Buffer("activations", act, "activations (hidden, q/k/v, MLP, MoE, vocab chunk)"))
    if backend == "triton":
        out.append(Buffer("kernels", kernel_workspace(spec, T, dtype_bytes),
                          "kernel workspace (grouped-MoE slots, top-k accumulator, split-V partials)"))
    else:
        out.append(Buffer("dequant", dequant_scratch(spec, tensors, dtype_bytes, vocab_chunk),
                          "dequantization scratch (largest per-use operand)"))
    return out


def kernel_workspace(spec: ArchSpec, rows: int, dtype_bytes: int) -> int:
    """engine/kernels: the grouped MoE's padded slots (rows x top-k plus up to 63 padding rows per
    expert) holding gelu(gate) * up, its fp32 top-k accumulator, and the vocabulary pass's split-V
    partial soft embeddings (at most 64 splits of C x H fp32)."""
    k, E, F, H = spec.expert_used_count, spec.expert_count, spec.expert_feed_forward_length, spec.embedding_length
    slots = rows * k + min(E, rows * k) * 63
    return slots * F * dtype_bytes + rows * H * 4 + 64 * spec.canvas_length * H * 4


def dequant_scratch(spec: ArchSpec, tensors: Sequence[TensorSize], dtype_bytes: int, vocab_chunk: int) -> int:
    """Weights are dequantized per use: float32 out of the dequantizer, its intermediates (about one
    more float32 copy), then the compute-dtype copy. The largest set alive at once decides."""
    per_elem = 2 * 4 + dtype_bytes
    elems: dict[str, int] = {}
    for t in tensors:
        n = 1
        for d in t.shape:
            n *= d
        if t.name == "token_embd.weight":
            n = min(vocab_chunk, t.shape[0]) * t.shape[-1]
        elif len(t.shape) == 3:
            n //= t.shape[0]  # one expert slice
        elems[t.name] = n
    groups: list[int] = [max(elems.values(), default=0)]
    for i in range(spec.block_count):
        p = f"blk.{i}."
        groups.append(sum(elems.get(p + s, 0) for s in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")))
        groups.append(sum(elems.get(p + s, 0) for s in ("ffn_gate_up_exps.weight", "ffn_gate_exps.weight",
                                                        "ffn_up_exps.weight", "ffn_down_exps.weight")))
    groups.append(sum(elems.get(s, 0) for s in ("self_cond_gate.weight", "self_cond_up.weight",
                                                "self_cond_down.weight")))
    return max(groups) * per_elem


def expert_layer_flops(spec: ArchSpec, canvas: int) -> float:
    """One denoising step through one layer's routed experts: canvas x top-k rows, gate+up+down."""
    return 2.0 * canvas * spec.expert_used_count * 3 * spec.embedding_length * spec.expert_feed_forward_length


# ---- the planner --------------------------------------------------------------------------------

@dataclass
class _Choice:
    offloaded: list[int]  # expert layers in host RAM
    modes: dict[int, str]
    est_s: float
    gpu_bytes: int
    auto: int


def plan_placement(spec: ArchSpec, tensors: Sequence[TensorSize], *, ctx: int, vram_budget: int | None,
                   host_ram: int | None = None, canvas: int | None = None,
                   rules: Sequence[PlacementRule] = (), dtype: str = "bf16", offload_mode: str = "auto",
                   costs: CostModel | None = None, reserve: int = DEFAULT_RESERVE,
                   prefill_chunk: int = DEFAULT_CANVAS_PREFILL_CHUNK, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                   label: str = "", backend: str = "torch") -> Plan:
    """The placement of `tensors` for a run of `ctx` tokens of context (see the module docstring).

    offload_mode: "auto" (the cost model picks CPU compute or streaming per offloaded layer), "cpu" or
    "stream" (every offloaded expert layer so). A plan that does not fit comes back with fits=False
    and a message; Plan.require() turns that into a PlacementError."""
    if ctx < 1:
        raise PlacementError(f"context length {ctx}: must be at least 1")
    canvas = spec.canvas_length if canvas is None else canvas
    if canvas < 1:
        raise PlacementError(f"canvas length {canvas}: must be at least 1")
    if dtype not in DTYPE_BYTES:
        raise PlacementError(f"unknown compute dtype {dtype!r} (use bf16, f16 or f32)")
    if offload_mode not in ("auto", "cpu", "stream"):
        raise PlacementError(f"offload mode {offload_mode!r}: use auto, cpu or stream")
    if vram_budget is not None and vram_budget < 0:
        raise PlacementError("VRAM budget is negative")
    costs = costs or CostModel()
    dtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(dtype, dtype)
    nb = DTYPE_BYTES[dtype]
    rules = tuple(rules)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise PlacementError("duplicate tensor names in the size list")

    # 1. rules: first match wins
    ruled: dict[str, PlacementRule] = {}
    for t in tensors:
        if not is_expert(t.name) and _n_elements(t.shape) <= SMALL_ELEMENTS:
            continue  # norms, scales, router scales: cached on the compute device by the engine
        hit = next((r for r in rules if r.matches(t.name)), None)
        if hit is not None:
            ruled[t.name] = hit

    # 2. expert layers: bytes, forced state
    layer_bytes: dict[int, int] = {}
    forced_cpu: dict[int, list[str]] = {}
    pinned_gpu: set[int] = set()
    for t in tensors:
        if not is_expert(t.name):
            continue
        i = layer_of(t.name)
        assert i is not None
        layer_bytes[i] = layer_bytes.get(i, 0) + t.bytes
        r = ruled.get(t.name)
        if r is not None and r.device == "cpu":
            forced_cpu.setdefault(i, []).append(t.name)
        elif r is not None:
            pinned_gpu.add(i)
    flops = expert_layer_flops(spec, canvas)
    off_bytes_forced = {i: sum(t.bytes for t in tensors if t.name in set(v)) for i, v in forced_cpu.items()}

    # 3. what does not depend on the expert choice
    kv = kv_entries(spec, ctx, nb)
    buffers = fixed_buffers(spec, tensors, ctx, canvas, nb, prefill_chunk, vocab_chunk, backend)
    host_other = [t for t in tensors if not is_expert(t.name) and t.name in ruled and ruled[t.name].device == "cpu"]
    if host_other:  # non-expert tensors in host RAM are uploaded for each use: room for the largest
        biggest = max(t.bytes for t in host_other)
        buffers.append(Buffer("host_upload", biggest, "upload slot for non-expert tensors in host RAM"))
    base_buffers = sum(b.bytes for b in buffers)
    kv_bytes = sum(k.bytes for k in kv)
    all_weights = sum(t.bytes for t in tensors)
    non_expert_gpu = sum(t.bytes for t in tensors if not is_expert(t.name)) - sum(t.bytes for t in host_other)
    fixed = non_expert_gpu + kv_bytes + base_buffers + reserve
    resident_s = costs.gpu_s(all_weights)

    def gpu_total(offloaded: dict[int, int], slots: int) -> int:
        return fixed + sum(layer_bytes.values()) - sum(offloaded.values()) + slots

    def layer_costs(i: int, nbytes: int) -> tuple[float, float]:
        return costs.cpu_s(nbytes, flops), costs.stream_s(nbytes)

    def assign(offloaded: dict[int, int], allow_stream: bool, only: str | None) -> tuple[dict[int, str], float]:
        """Modes for the offloaded layers and the estimated weight time per step:
        max(GPU time + CPU expert time, link time) -- streaming overlaps the rest (prefetch)."""
        gpu_read = costs.gpu_s(all_weights - sum(offloaded.values()))
        if only is not None:
            modes = {i: only for i in offloaded}
        else:
            modes = {i: "cpu" for i in offloaded}
            if allow_stream:
                # move layers to streaming, most CPU-expensive per link second first
                order = sorted(offloaded, key=lambda i: (-layer_costs(i, offloaded[i])[0]
                                                         / layer_costs(i, offloaded[i])[1], -i))
                best_k, best = 0, None
                for k_ in range(len(order) + 1):
                    if 0 < k_ < MIN_STREAM_LAYERS and len(order) >= MIN_STREAM_LAYERS:
                        continue
                    trial = {i: ("stream" if n < k_ else "cpu") for n, i in enumerate(order)}
                    est = _estimate(trial, offloaded, gpu_read, costs, flops)
                    if best is None or est < best - 1e-12:
                        best_k, best = k_, est
                modes = {i: ("stream" if n < best_k else "cpu") for n, i in enumerate(order)}
        return modes, _estimate(modes, offloaded, gpu_read, costs, flops)

    def slots_for(modes: dict[int, str], offloaded: dict[int, int]) -> int:
        streamed = [offloaded[i] for i, m in modes.items() if m == "stream"]
        return STREAM_SLOTS * max(streamed) if streamed else 0

    candidates: list[tuple[bool, str | None]] = {
        "auto": [(False, None), (True, None)], "cpu": [(False, "cpu")], "stream": [(True, "stream")]}[offload_mode]
    free_layers = [i for i in sorted(layer_bytes) if i not in pinned_gpu and i not in forced_cpu]
    choices: list[_Choice] = []
    for allow_stream, only in candidates:
        offloaded = dict(off_bytes_forced)
        # cheapest per byte freed first; later layers first on ties
        def key(i: int, allow_stream: bool = allow_stream, only: str | None = only) -> tuple[float, int]:
            c, s = layer_costs(i, layer_bytes[i])
            per = s if only == "stream" else (c if not allow_stream else min(c, s))
            return (round(per / layer_bytes[i] * 1e12, 6), -i)
        queue = sorted(free_layers, key=key)
        # room for the stream slots is set aside at the largest layer (known before the choice)
        reserve_slots = STREAM_SLOTS * max(layer_bytes.values(), default=0) if allow_stream else 0
        auto = 0
        ok = vram_budget is None or gpu_total(offloaded, reserve_slots if offloaded else 0) <= vram_budget
        while not ok and queue:
            i = queue.pop(0)
            offloaded[i] = layer_bytes[i]
            auto += 1
            ok = gpu_total(offloaded, reserve_slots) <= vram_budget
        if not ok:
            continue
        modes, est = assign(offloaded, allow_stream, only)
        if allow_stream and only is None and "stream" not in modes.values() and auto:
            continue  # slots were set aside for nothing: the CPU-only candidate is better
        total = gpu_total(offloaded, slots_for(modes, offloaded))
        if vram_budget is not None and total > vram_budget:
            continue
        choices.append(_Choice(sorted(offloaded), modes, est, total, auto))

    host_pin = "none"
    if not choices:
        # report the smallest footprint possible: every free expert layer on the CPU, no slots
        everything = {**off_bytes_forced, **{i: layer_bytes[i] for i in free_layers}}
        need = gpu_total(everything, 0)
        parts = (f"non-expert weights {fmt_bytes(non_expert_gpu)}, KV cache {fmt_bytes(kv_bytes)} at {ctx} tokens, "
                 f"buffers {fmt_bytes(base_buffers)}, reserve {fmt_bytes(reserve)}")
        pinned = sum(layer_bytes[i] for i in pinned_gpu)
        if pinned:
            parts += f", experts kept on the GPU by rules {fmt_bytes(pinned)}"
        msg = (f"VRAM budget {fmt_bytes(vram_budget or 0)} is too small: even with every expert layer in host RAM "
               f"this model needs {fmt_bytes(need)} ({parts}); raise --vram, lower --ctx, or use a smaller type")
        modes = {i: "cpu" for i in everything}
        return _build(spec, tensors, ruled, everything, set(free_layers), modes, len(free_layers), False, msg, label,
                      vram_budget,
                      host_ram, ctx, canvas, dtype, prefill_chunk, vocab_chunk, kv, buffers, reserve, host_pin, 0,
                      costs, _estimate(modes, everything, costs.gpu_s(all_weights - sum(everything.values())),
                                       costs, flops), resident_s, rules, layer_bytes, flops)

    best = min(choices, key=lambda c: (c.est_s, c.gpu_bytes))
    offloaded = {i: (off_bytes_forced[i] if i in off_bytes_forced else layer_bytes[i]) for i in best.offloaded}
    slot_bytes = slots_for(best.modes, offloaded)
    if slot_bytes:
        buffers.append(Buffer("stream_slots", slot_bytes,
                              f"expert stream slots ({STREAM_SLOTS} x {fmt_bytes(slot_bytes // STREAM_SLOTS)})"))
    streamed = sum(offloaded[i] for i, m in best.modes.items() if m == "stream")
    staging = 0
    if streamed:
        # streamed experts copied once into pinned RAM when that leaves half the host RAM free;
        # otherwise two pinned staging buffers between the memory map and the link
        if host_ram is not None and 2 * sum(offloaded.values()) <= host_ram:
            host_pin = "arena"
        else:
            host_pin, staging = "staging", STREAM_SLOTS * STAGING_CHUNK
    fits, msg = True, "fits"
    whole = set(offloaded) - set(forced_cpu)
    host_total = sum(t.bytes for t in tensors if t.name in set(_host_names(tensors, ruled, whole))) + staging
    if host_ram is not None and host_total > host_ram:
        fits = False
        msg = (f"host RAM {fmt_bytes(host_ram)} is too small for the {fmt_bytes(host_total)} of weights this plan "
               f"keeps there; raise --vram or free host memory")
    return _build(spec, tensors, ruled, offloaded, whole, best.modes, best.auto, fits, msg, label, vram_budget,
                  host_ram, ctx, canvas, dtype, prefill_chunk, vocab_chunk, kv, buffers, reserve, host_pin, staging,
                  costs, best.est_s, resident_s, rules, layer_bytes, flops)


def _estimate(modes: dict[int, str], offloaded: dict[int, int], gpu_read_s: float, costs: CostModel,
              flops: float) -> float:
    cpu = sum(costs.cpu_s(offloaded[i], flops) for i, m in modes.items() if m == "cpu")
    link = sum(costs.stream_s(offloaded[i]) for i, m in modes.items() if m == "stream")
    streamed_read = sum(costs.gpu_s(offloaded[i]) for i, m in modes.items() if m == "stream")
    return max(gpu_read_s + streamed_read + cpu, link)


def _host_names(tensors: Sequence[TensorSize], ruled: dict[str, PlacementRule], whole: set[int]) -> list[str]:
    """Tensors in host RAM: those a rule sends there, and the expert tensors of the layers the
    planner moved as a whole (`whole`, never holding a ruled tensor)."""
    out = []
    for t in tensors:
        r = ruled.get(t.name)
        if is_expert(t.name):
            if (r is not None and r.device == "cpu") or (r is None and layer_of(t.name) in whole):
                out.append(t.name)
        elif r is not None and r.device == "cpu":
            out.append(t.name)
    return out


def _build(spec: ArchSpec, tensors: Sequence[TensorSize], ruled: dict[str, PlacementRule], offloaded: dict[int, int],
           whole: set[int],
           modes: dict[int, str], auto: int, fits: bool, msg: str, label: str, vram_budget: int | None,
           host_ram: int | None, ctx: int, canvas: int, dtype: str, prefill_chunk: int, vocab_chunk: int,
           kv: tuple[KVEntry, ...], buffers: list[Buffer], reserve: int, host_pin: str, staging: int,
           costs: CostModel, est_s: float, resident_s: float, rules: tuple[PlacementRule, ...],
           layer_bytes: dict[int, int], flops: float) -> Plan:
    host = set(_host_names(tensors, ruled, whole))
    placed = []
    for t in tensors:
        r, i, ex = ruled.get(t.name), layer_of(t.name), is_expert(t.name)
        if t.name in host:
            compute = modes.get(i, "cpu") if ex else "stream"
            reason = r.origin if r is not None else "auto: offloaded to fit the VRAM budget"
            placed.append(TensorPlacement(t.name, t.shape, t.qtype, t.bytes, "cpu", compute, reason, i, ex))
        else:
            reason = r.origin if r is not None else (
                "resident" if ex or _n_elements(t.shape) > SMALL_ELEMENTS else "resident (small: rules do not move it)")
            compute = "gpu"
            if ex and i in offloaded and modes.get(i) == "cpu":
                reason += " (its layer is computed on the CPU from the host copy)"
            placed.append(TensorPlacement(t.name, t.shape, t.qtype, t.bytes, "gpu", compute, reason, i, ex))
    layers = []
    for i in sorted(layer_bytes):
        if i in offloaded:
            m = modes.get(i, "cpu")
            reasons = sorted({p.reason for p in placed if p.layer == i and p.expert and p.device == "cpu"})
            est = costs.cpu_s(offloaded[i], flops) if m == "cpu" else costs.stream_s(offloaded[i])
            layers.append(LayerPlan(i, layer_bytes[i], offloaded[i], m, "; ".join(reasons), est * 1e3))
        else:
            reasons = sorted({p.reason for p in placed if p.layer == i and p.expert})
            layers.append(LayerPlan(i, layer_bytes[i], 0, "gpu", "; ".join(reasons), 0.0))
    return Plan(fits=fits, message=msg, label=label, vram_budget_bytes=vram_budget, host_ram_bytes=host_ram, ctx=ctx,
                canvas=canvas, dtype=dtype, prefill_chunk=prefill_chunk, vocab_chunk=vocab_chunk,
                tensors=tuple(placed), kv=kv, buffers=tuple(buffers), reserve_bytes=reserve, layers=tuple(layers),
                host_pinning=host_pin, host_staging_bytes=staging, costs=costs, est_step_ms=est_s * 1e3,
                est_resident_step_ms=resident_s * 1e3, rules=rules, auto_offloaded=auto)


# ---- sources: a GGUF, or a config folder (dry-run conversion plan) -------------------------------

def sizes_from_gguf(path: Path | str) -> tuple[ArchSpec, list[TensorSize], str]:
    from gguf_tools.reader import GGUFFile

    f = GGUFFile(path)
    if f.architecture != "diffusion-gemma":
        raise PlacementError(f"{f.path.name}: architecture is {f.architecture!r}, not 'diffusion-gemma'")
    sizes = [TensorSize(t.name, tuple(t.shape), t.qtype.name, t.n_bytes) for t in f.tensors.values()]
    return f.spec(), sizes, f.path.name


def sizes_from_config(folder: Path | str, type_name: str | None = None) -> tuple[ArchSpec, list[TensorSize], str]:
    """Per-tensor bytes as `diffgemma quantize --dry-run --type TYPE` plans them (config files only)."""
    from gguf_tools.convert import plan_conversion
    from gguf_tools.presets import DEFAULT_TYPE

    type_name = type_name or DEFAULT_TYPE
    plan = plan_conversion(Path(folder), type_name)
    sizes = [TensorSize(t.name, tuple(t.shape), t.qtype.name, t.n_bytes) for t in plan.tensors]
    return plan.spec, sizes, f"{Path(folder).resolve().name} as {type_name.upper()} (dry-run sizes)"


def detect_host_ram() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def detect_vram() -> int | None:
    """Free memory of the current CUDA device plus what this process already holds, or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved())
    except Exception:  # noqa: BLE001 - no usable CUDA runtime: no budget
        return None


def sizes_from_source(source: Path | str, type_name: str | None = None
                      ) -> tuple[ArchSpec, list[TensorSize], str]:
    """(spec, tensor sizes, label) of a GGUF file, or of a checkpoint/config folder quantized to
    `type_name` (a dry-run conversion plan)."""
    source = Path(source)
    if source.is_dir():
        return sizes_from_config(source, type_name)
    if source.is_file():
        if type_name is not None:
            raise PlacementError(f"--type applies to a config folder; {source.name} already has its types")
        return sizes_from_gguf(source)
    raise PlacementError(f"{source}: no such file or folder")


def plan_for(source: Path | str, vram: str | int | None = None, ctx: int = 32768, type_name: str | None = None, *,
             override_tensor: Sequence[str] = (), cpu_moe: bool = False, n_cpu_moe: int = 0,
             host_ram: str | int | None = None, canvas: int | None = None, dtype: str = "bf16",
             offload_mode: str = "auto", costs: CostModel | None = None, reserve: str | int | None = None,
             prefill_chunk: int = DEFAULT_CANVAS_PREFILL_CHUNK) -> Plan:
    """The plan for a GGUF file or a checkpoint/config folder (sizes of `type_name`, default Q4_K_M).

    vram: '24GB', '16GiB', a byte count, or None for the free VRAM of the CUDA device (no budget when
    there is none). host_ram: likewise; None = this machine's physical RAM."""
    spec, sizes, label = sizes_from_source(source, type_name)
    budget = parse_bytes(vram, "--vram") if vram is not None else detect_vram()
    ram = parse_bytes(host_ram, "host RAM") if host_ram is not None else detect_host_ram()
    rules = build_rules(override_tensor, cpu_moe, n_cpu_moe)
    res = DEFAULT_RESERVE if reserve is None else parse_bytes(reserve, "reserve")
    return plan_placement(spec, sizes, ctx=ctx, vram_budget=budget, host_ram=ram, canvas=canvas, rules=rules,
                          dtype=dtype, offload_mode=offload_mode, costs=costs, reserve=res,
                          prefill_chunk=prefill_chunk, label=label)


__all__ = ["Buffer", "CostModel", "KVEntry", "LayerPlan", "Plan", "PlacementError", "PlacementRule", "TensorPlacement",
           "TensorSize", "build_rules", "fmt_bytes", "kv_entries", "parse_bytes", "parse_override", "plan_for",
           "plan_placement", "sizes_from_config", "sizes_from_gguf", "sizes_from_source"]
