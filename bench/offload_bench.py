"""Denoising-step time with MoE experts offloaded to host RAM (engine/placement.py + engine/experts.py).

GPU (one call, well under 8 minutes on an H100/H200; --deadline stops early and still prints):

    python bench/offload_bench.py --device cuda --offload 0,6,12,30 --json $OUT/offload.json

builds a synthetic full-size Q4_K_M model in memory on the machine itself (the per-tensor types and
shapes `diffgemma quantize --dry-run --type Q4_K_M` plans for the released config; random blocks
with finite scales), prefills a prompt, and times decode steps (256-token canvas, self-conditioning)
with the experts of the first N layers offloaded (`--n-cpu-moe N`), streamed through a pinned arena
with prefetch; then the CPU-compute mode for the smallest N > 0, and the staging-buffer path. It
prints step time, VRAM peak (torch allocator) beside the plan's estimate for the same context,
bytes streamed per step, the measured link bandwidth (pinned and pageable), and the attention
workspace at 32K context against the plan's figure.

CPU (a mid-size synthetic config, a few minutes on 2 threads):

    python bench/offload_bench.py --device cpu --config mid --threads 2

prints the same table for the mid-size model, where the compute device is the CPU (so "cpu" mode
is resident arithmetic through the executor and "stream" adds a copy), and the cost of one
full-size DiffusionGemma expert layer (128 experts at Q4_K_M types, 256 x top-8 routed rows)
computed on this CPU: what an offloaded layer costs per denoising step in the "cpu" mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from engine.experts import attach_plan, detach, grouped_experts, measure_costs, measure_link, synthetic_blocks
from engine.model import DiffusionGemmaModel
from engine.placement import (
    TensorSize,
    build_rules,
    detect_host_ram,
    fixed_buffers,
    fmt_bytes,
    plan_placement,
)
from engine.weights import WeightStore, dequantize, quantized_linear
from gguf_tools.arch import ArchSpec
from gguf_tools.convert import plan_conversion
from gguf_tools.reader import GGUFFile, TensorInfo

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ---- a synthetic model in memory -------------------------------------------------------------------

class SyntheticGGUF(GGUFFile):
    """A GGUFFile look-alike whose tensors are in-memory arrays (no file is written)."""

    def __init__(self, name: str, spec: ArchSpec, tensors: dict[str, TensorInfo]):  # noqa: D107
        self.path = Path(name)
        self.kv = {"general.architecture": "diffusion-gemma"}
        self.kv_types = {}
        self.tensors = tensors
        self._spec = spec

    def spec(self) -> ArchSpec:
        return self._spec


def mid_config(reference: Path) -> tuple[dict, dict]:
    cfg = json.loads((reference / "config.json").read_text())
    gen = json.loads((reference / "generation_config.json").read_text())
    tc = cfg["text_config"]
    types = ["sliding_attention"] * 5 + ["full_attention"]
    tc.update(hidden_size=1024, intermediate_size=768, num_hidden_layers=6, layer_types=types, num_attention_heads=8,
              num_key_value_heads=4, num_global_key_value_heads=1, head_dim=128, global_head_dim=256,
              num_experts=64, top_k_experts=8, moe_intermediate_size=256, vocab_size=32768, sliding_window=512)
    return cfg, gen


def synthetic_model(config: str, type_name: str, gen_device: torch.device, reference: Path = REFERENCE
                    ) -> tuple[WeightStore, list[TensorSize]]:
    if config == "full":
        src = reference
    else:
        cfg, gen = mid_config(reference)
        src = Path(tempfile.mkdtemp(prefix="offload-bench-")) / "mid"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(cfg))
        (src / "generation_config.json").write_text(json.dumps(gen))
    plan = plan_conversion(src, type_name)
    spec = plan.spec
    g = torch.Generator(device=gen_device).manual_seed(0)
    tensors: dict[str, TensorInfo] = {}
    for t in plan.tensors:
        if t.qtype == Q.F32:
            n = int(np.prod(t.shape))
            if len(t.shape) >= 2:  # the router
                x = torch.randn(n, generator=g, device=gen_device) * t.shape[-1] ** -0.5
            else:  # norms, scales, scalars near 1
                x = 1.0 + 0.1 * torch.randn(n, generator=g, device=gen_device)
            data = x.float().cpu().numpy().view(np.uint8)
        else:
            block, size = GGML_QUANT_SIZES[t.qtype]
            data = synthetic_blocks(t.qtype, t.n_bytes // size, gen_device, g).cpu().numpy().reshape(-1)
        assert data.nbytes == t.n_bytes, t.name
        tensors[t.name] = TensorInfo(t.name, t.qtype, tuple(t.shape), t.n_bytes, data)
    sizes = [TensorSize(t.name, tuple(t.shape), t.qtype.name, t.n_bytes) for t in plan.tensors]
    return WeightStore(SyntheticGGUF(f"synthetic-{config}-{type_name}", spec, tensors)), sizes


# ---- timing ------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(model: DiffusionGemmaModel, sizes, n_off: int, mode: str, pinning: str | None, args, cache, canvas,
               soft, costs, deadline: float) -> dict | None:
    dev = torch.device(model.device)
    spec = model.spec
    ctx = cache.length + spec.canvas_length
    rules = build_rules(n_cpu_moe=n_off)
    plan = plan_placement(spec, sizes, ctx=ctx, vram_budget=None, host_ram=detect_host_ram(), rules=rules,
                          offload_mode="auto" if mode == "auto" else ("cpu" if mode == "cpu" else "stream"),
                          dtype="bf16" if model.dtype == torch.bfloat16 else "f32", costs=costs,
                          label=f"n-cpu-moe {n_off}")
    t = time.perf_counter()
    ex = attach_plan(model, plan, host_pinning=pinning)
    attach_s = time.perf_counter() - t
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    temp = 0.8
    model.decode_step(canvas, cache, soft, temp)  # warm-up: first (synchronous) load of streamed layers
    sync(dev)
    ex.stats.update({k: 0 for k in ex.stats})
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        _, soft = model.decode_step(canvas, cache, soft, temp)
        sync(dev)
        times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    n = len(times)
    row = {"offloaded_layers": n_off, "mode": mode, "modes": sorted(set(plan.layer_modes().values())),
           "pinning": ex.pinning if ex.stream_layers else "-", "step_ms": 1e3 * statistics.median(times),
           "steps_timed": n, "attach_s": attach_s,
           "vram_peak_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
           "plan_gpu_bytes_no_reserve": plan.gpu_bytes - plan.reserve_bytes,
           "plan_gpu_weight_bytes": plan.gpu_weight_bytes, "host_bytes": plan.host_bytes,
           "streamed_bytes_per_step": ex.stats["bytes_streamed"] / n,
           "stream_wait_ms_per_step": 1e3 * ex.stats["stream_wait_s"] / n,
           "cpu_ms_per_step": 1e3 * ex.stats["cpu_s"] / n, "est_step_ms": plan.est_step_ms}
    detach(model)
    return row


def print_rows(rows: list[dict], base_ms: float | None) -> None:
    print(f"\n{'offl.':>5} {'mode':<8} {'pin':<8} {'step ms':>9} {'+ms/layer':>9} {'VRAM peak':>10} {'plan':>10} "
          f"{'streamed/step':>13} {'wait ms':>8} {'cpu ms':>8}")
    for r in rows:
        per = ((r["step_ms"] - base_ms) / r["offloaded_layers"]) if base_ms is not None and r["offloaded_layers"] else 0
        peak = fmt_bytes(r["vram_peak_bytes"]) if r["vram_peak_bytes"] is not None else "-"
        print(f"{r['offloaded_layers']:>5} {r['mode']:<8} {r['pinning']:<8} {r['step_ms']:>9.1f} {per:>9.1f} "
              f"{peak:>10} {fmt_bytes(r['plan_gpu_bytes_no_reserve']):>10} "
              f"{fmt_bytes(r['streamed_bytes_per_step']):>13} "
              f"{r['stream_wait_ms_per_step']:>8.1f} {r['cpu_ms_per_step']:>8.1f}", flush=True)


def attention_check(dev: torch.device, spec: ArchSpec, ctx: int, dtype: torch.dtype) -> list[dict]:
    """Peak extra memory of one layer's SDPA at `ctx` keys (as Block.attend calls it) vs the plan."""
    out = []
    C = spec.canvas_length
    plan_attn = next(b.bytes for b in fixed_buffers(spec, [], ctx, C, 2 if dtype != torch.float32 else 4, C, 32768)
                     if b.name == "attention")
    for sliding in (True, False):
        i = spec.sliding_window_pattern.index(sliding)
        geo = spec.layer(i)
        S = (min(ctx, spec.sliding_window - 1) if sliding else ctx) + C
        q = torch.randn(spec.head_count, C, geo.head_dim, device=dev, dtype=dtype)
        k = torch.randn(geo.n_kv_head, S, geo.head_dim, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        past = k[:, :S - C].contiguous(), v[:, :S - C].contiguous()
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        k_all, v_all = torch.cat([past[0], k[:, S - C:]], 1), torch.cat([past[1], v[:, S - C:]], 1)
        o = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, scale=1.0, enable_gqa=True)
        sync(dev)
        out.append({"layer": "sliding" if sliding else "full", "keys": S,
                    "peak_extra_bytes": int(torch.cuda.max_memory_allocated(dev) - before), "plan_bytes": plan_attn})
        del q, k, v, past, k_all, v_all, o
    return out


def full_layer_cpu_cost(threads: int, reps: int) -> dict:
    """One full-size DG expert layer (128 x [gate_up Q4_K 1408x2816, down Q5_0 2816x704]) on the CPU with
    256 x top-8 routed rows: the per-step cost of an offloaded layer in "cpu" mode."""
    H, F, E, K, C = 2816, 704, 128, 8, 256
    g = torch.Generator().manual_seed(0)
    gu = synthetic_blocks(Q.Q4_K, E * 2 * F * H // 256, "cpu", g).view(E, 2 * F, H // 256 * 144)
    down = synthetic_blocks(Q.Q5_0, E * H * F // 32, "cpu", g).view(E, H, F // 32 * 22)
    u = torch.randn(C, H, generator=g)
    top_i = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(C)])
    top_w = torch.rand(C, K, generator=g)

    def fetch(e: int):
        a = dequantize(gu[e], Q.Q4_K)
        return a[:F], a[F:], dequantize(down[e], Q.Q5_0)

    def mlp(e: int, x: torch.Tensor) -> torch.Tensor:  # what the engine runs: blocked dequantize + matmul
        a = quantized_linear(x, gu[e], Q.Q4_K)
        return quantized_linear(torch.nn.functional.gelu(a[:, :F], approximate="tanh") * a[:, F:], down[e], Q.Q5_0)

    dq = []
    for _ in range(reps):
        t = time.perf_counter()
        for e in range(E):
            fetch(e)
        dq.append(time.perf_counter() - t)
    tot = []
    for _ in range(reps):
        t = time.perf_counter()
        grouped_experts(u, top_i, top_w, E, mlp, workers=torch.get_num_threads())
        tot.append(time.perf_counter() - t)
    n_bytes = gu.numel() + down.numel()
    return {"layer_bytes": n_bytes, "threads": threads, "dequant_ms": 1e3 * min(dq), "total_ms": 1e3 * min(tot)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", choices=("full", "mid"), default=None, help="default: full on cuda, mid on cpu")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--offload", default=None, help="comma-separated layer counts (default 0,6,12,30 / 0,3,6)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens prefilled (default 512 / 128)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds; later configurations are skipped")
    ap.add_argument("--extra", default="cpu,staging", help="extra runs after the main sweep: cpu, staging, auto")
    ap.add_argument("--skip-layer-cost", action="store_true")
    ap.add_argument("--layer-cost-only", action="store_true",
                    help="only the CPU cost of one full-size expert layer (no model, no device)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reference", type=Path, default=REFERENCE, help="folder with the released config.json")
    args = ap.parse_args()
    deadline = T0 + args.deadline
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layer_cost_only:
        lc = full_layer_cpu_cost(torch.get_num_threads(), 2)
        print(f"full-size expert layer on this CPU ({lc['threads']} threads, {fmt_bytes(lc['layer_bytes'])} stored): "
              f"{lc['total_ms']:.0f} ms per step (dequantizing alone, whole experts: {lc['dequant_ms']:.0f} ms)")
        return
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    config = args.config or ("full" if cuda else "mid")
    counts = [int(x) for x in (args.offload or ("0,6,12,30" if config == "full" else "0,3,6")).split(",")]
    prompt_len = args.prompt or (512 if cuda else 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    result: dict = {"device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)",
                    "threads": torch.get_num_threads(), "config": config, "type": args.type,
                    "prompt": prompt_len, "torch": torch.__version__}
    log(f"device {result['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    if cuda:
        result["link_pinned_bytes_per_s"] = measure_link(dev, 512 << 20, pinned=True)
        result["link_pageable_bytes_per_s"] = measure_link(dev, 512 << 20, pinned=False)
        log(f"host->device: pinned {result['link_pinned_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"pageable {result['link_pageable_bytes_per_s'] / 1e9:.1f} GB/s")
    store, sizes = synthetic_model(config, args.type, dev if cuda else torch.device("cpu"), args.reference)
    spec = store.spec
    total = sum(s.bytes for s in sizes)
    log(f"synthetic {config} {args.type}: {len(sizes)} tensors, {fmt_bytes(total)}, {spec.block_count} layers")
    costs = measure_costs(dev, spec, Q.Q4_K, quick=not cuda)
    result["costs"] = costs.to_json()
    log(f"cost model: {costs.describe()}")

    model = DiffusionGemmaModel(store, dev, dtype=dtype, prefill_chunk=256)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(200, spec.vocab_size, (prompt_len,), generator=g)
    canvas = torch.randint(200, spec.vocab_size, (spec.canvas_length,), generator=g).to(dev)
    cache = model.new_cache()
    t = time.perf_counter()
    model.encode(prompt, cache)
    sync(dev)
    log(f"prefill {prompt_len} tokens: {time.perf_counter() - t:.2f} s (includes first upload of resident weights)")
    logits, soft = model.decode_step(canvas, cache, None, 0.8)
    sync(dev)
    finite = bool(torch.isfinite(logits).all())
    log(f"first decode step done; logits finite: {finite}")

    rows: list[dict] = []
    plan_runs = [(n, "stream" if n else "resident", None) for n in counts]
    positive = [n for n in counts if n > 0]
    extras = [x for x in args.extra.split(",") if x]
    if positive and "cpu" in extras:
        plan_runs.append((positive[0], "cpu", None))
    if positive and "staging" in extras:
        plan_runs.append((positive[-1], "stream", "staging"))
    if positive and "auto" in extras:
        plan_runs.append((positive[0], "auto", None))
    for n, mode, pin in plan_runs:
        if time.perf_counter() > deadline:
            log(f"deadline reached: skipping n={n} {mode}")
            continue
        row = run_config(model, sizes, n, mode, pin, args, cache, canvas, soft, costs, deadline)
        rows.append(row)
        log(f"n-cpu-moe {n:>2} {mode:<8} {row['pinning']:<8} step {row['step_ms']:.1f} ms"
            + (f", VRAM peak {fmt_bytes(row['vram_peak_bytes'])}" if cuda else ""))
    base = next((r["step_ms"] for r in rows if r["offloaded_layers"] == 0), None)
    print_rows(rows, base)
    result["rows"] = rows

    if cuda and time.perf_counter() < deadline - 20:
        model = None
        store = None
        torch.cuda.empty_cache()
        result["attention_32k"] = attention_check(dev, spec, 32768, dtype)
        for a in result["attention_32k"]:
            print(f"attention at 32K context, {a['layer']} layer ({a['keys']} keys): peak "
                  f"{fmt_bytes(a['peak_extra_bytes'])}, plan {fmt_bytes(a['plan_bytes'])}", flush=True)
    if not cuda and not args.skip_layer_cost and time.perf_counter() < deadline - 30:
        lc = full_layer_cpu_cost(torch.get_num_threads(), 2)
        result["full_layer_cpu"] = lc
        print(f"\nfull-size expert layer on this CPU ({lc['threads']} threads, {fmt_bytes(lc['layer_bytes'])} stored): "
              f"{lc['total_ms']:.0f} ms per step (dequantizing alone, whole experts: {lc['dequant_ms']:.0f} ms)",
              flush=True)
    log("done")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
