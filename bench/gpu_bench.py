"""The GPU fast path measured in one command (issue 12): triton backend against the torch reference.

    python bench/gpu_bench.py --json $OUT/gpu_bench.json          # H100/H200, under 6 minutes

builds a synthetic full-size Q4_K_M model in memory (the per-tensor types and shapes `diffgemma
quantize --type Q4_K_M` writes for the released config, random blocks with finite scales: speed does
not depend on the values), then prints and writes as JSON:

* the device, its measured device-to-device bandwidth and the floor (weight bytes / bandwidth: a
  256-token canvas routes to nearly every expert, so a step reads every weight once);
* prefill tok/s and the 256-token denoising step (median of >= 20 graph replays, self-conditioning
  on) after a 512-token and an 8,192-token context; peak VRAM;
* the same step under the placement plans for --vram 18GB and --vram 12GB (streamed expert layers);
* one step of the torch backend on the same context, for the speed-up, and the agreement of the two
  backends' canvas logits (top-1, max abs difference);
* end-to-end tok/s of a 1,024-token generation with a fixed number of steps per canvas.

On a CPU (`--config tiny`, with TRITON_INTERPRET=1 for the triton backend) the same script runs on a
tiny model in seconds, which checks the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from bench.offload_bench import REFERENCE, SyntheticGGUF, synthetic_model
from engine import backend
from engine.experts import attach_plan, detach
from engine.generate import ModelRunner, generate
from engine.model import DiffusionGemmaModel, TorchOps
from engine.placement import build_rules, detect_host_ram, fmt_bytes, parse_bytes, plan_placement
from engine.weights import WeightStore

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def d2d_bandwidth(dev: torch.device, n_bytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy (best of 5)."""
    a = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(dev)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def tiny_store() -> tuple[WeightStore, list]:
    """A tiny Q4_K_M-typed model (full-width rows are not needed to check the script)."""
    import json as _json
    import tempfile

    from gguf_tools.convert import plan_conversion
    from gguf_tools.synthetic import tiny_config

    cfg, gen = tiny_config()
    src = Path(tempfile.mkdtemp(prefix="gpu-bench-")) / "tiny"
    src.mkdir()
    (src / "config.json").write_text(_json.dumps(cfg))
    (src / "generation_config.json").write_text(_json.dumps(gen))
    return synthetic_from_plan(plan_conversion(src, "Q8_0"))


def synthetic_from_plan(plan) -> tuple[WeightStore, list]:
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    from engine.experts import synthetic_blocks
    from engine.placement import TensorSize
    from gguf_tools.reader import TensorInfo

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for t in plan.tensors:
        if t.qtype in (Q.F32, Q.F16):
            n = int(np.prod(t.shape))
            x = (torch.randn(n, generator=g) * t.shape[-1] ** -0.5 if len(t.shape) >= 2
                 else 1.0 + 0.1 * torch.randn(n, generator=g))
            data = x.numpy().astype(np.float32 if t.qtype == Q.F32 else np.float16).view(np.uint8)
        else:
            data = synthetic_blocks(t.qtype, t.n_bytes // GGML_QUANT_SIZES[t.qtype][1], "cpu", g).numpy().reshape(-1)
        tensors[t.name] = TensorInfo(t.name, t.qtype, tuple(t.shape), t.n_bytes, data)
    sizes = [TensorSize(t.name, tuple(t.shape), t.qtype.name, t.n_bytes) for t in plan.tensors]
    return WeightStore(SyntheticGGUF("synthetic-tiny", plan.spec, tensors)), sizes


def timed_steps(model: DiffusionGemmaModel, cache, canvas, soft, n: int, deadline: float) -> list[float]:
    dev = torch.device(model.device)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        _, soft = model.decode_step(canvas, cache, soft, 0.8)
        sync(dev)
        times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return times


def prefill(model: DiffusionGemmaModel, tokens: torch.Tensor):
    dev = torch.device(model.device)
    cache = model.new_cache()
    sync(dev)
    t = time.perf_counter()
    model.encode(tokens, cache)
    sync(dev)
    return cache, tokens.numel() / (time.perf_counter() - t)


def context_run(model, ctx: int, steps: int, vocab: int, deadline: float, g: torch.Generator) -> dict:
    dev = torch.device(model.device)
    prompt = torch.randint(200, vocab, (ctx,), generator=g)
    canvas = torch.randint(200, vocab, (model.canvas_length,), generator=g).to(dev)
    cache, tok_s = prefill(model, prompt)
    _, soft = model.decode_step(canvas, cache, None, 0.8)  # first step: no self-conditioning
    _, soft = model.decode_step(canvas, cache, soft, 0.8)  # captures the graph on CUDA
    sync(dev)
    times = timed_steps(model, cache, canvas, soft, steps, deadline)
    return {"context": ctx, "prefill_tok_s": tok_s, "step_ms": 1e3 * statistics.median(times),
            "steps_timed": len(times), "cache": cache, "canvas": canvas, "soft": soft}


def agreement(model, cache, canvas, soft) -> dict:
    """Canvas logits of the triton and torch backends on the same inputs."""
    fast = model.ops
    logits_fast, _ = model._decode(canvas, cache, soft, None, 0.8)
    model.ops = TorchOps(model)
    logits_ref, _ = model._decode(canvas, cache, soft, None, 0.8)
    model.ops = fast
    top1 = (logits_fast.argmax(-1) == logits_ref.argmax(-1)).float().mean().item()
    return {"top1_agreement": top1, "max_abs_diff": (logits_fast - logits_ref).abs().max().item()}


def torch_step_ms(model, cache, canvas, soft) -> float:
    dev = torch.device(model.device)
    fast, graphs = model.ops, model.step_graphs
    model.ops, model.step_graphs = TorchOps(model), None
    sync(dev)
    t = time.perf_counter()
    model.decode_step(canvas, cache, soft, 0.8)
    sync(dev)
    model.ops, model.step_graphs = fast, graphs
    return 1e3 * (time.perf_counter() - t)


def plan_run(model, sizes, vram: str, cache, canvas, soft, steps: int, deadline: float) -> dict:
    dev = torch.device(model.device)
    spec = model.spec
    plan = plan_placement(spec, sizes, ctx=cache.length + spec.canvas_length, vram_budget=parse_bytes(vram, "--vram"),
                          host_ram=detect_host_ram(), rules=build_rules(), offload_mode="stream",
                          dtype="bf16" if model.dtype == torch.bfloat16 else "f32", label=f"--vram {vram}")
    if not plan.fits:
        return {"vram": vram, "fits": False, "message": plan.message}
    ex = attach_plan(model, plan)
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        model.decode_step(canvas, cache, soft, 0.8)  # first, synchronous load of the streamed layers
        sync(dev)
        times = timed_steps(model, cache, canvas, soft, steps, deadline)
        return {"vram": vram, "fits": True, "streamed_layers": len(ex.stream_layers),
                "step_ms": 1e3 * statistics.median(times), "steps_timed": len(times),
                "plan_gpu_bytes": plan.gpu_bytes,
                "vram_peak_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None}
    finally:
        detach(model)


def end_to_end(model, tokens: int, steps: int, vocab: int, g: torch.Generator) -> dict:
    dev = torch.device(model.device)
    prompt = torch.randint(200, vocab, (64,), generator=g)
    gen = torch.Generator(device=dev).manual_seed(0)
    runner = ModelRunner(model)
    sync(dev)
    t = time.perf_counter()
    # thresholds that are never met: every canvas takes exactly `steps` steps
    res = generate(runner, prompt, max_new_tokens=tokens, steps=steps, stability_threshold=steps + 1,
                   confidence_threshold=1e-30, generator=gen)
    sync(dev)
    s = time.perf_counter() - t
    return {"tokens": int(res.tokens.numel()), "steps_per_canvas": res.steps_per_canvas, "seconds": s,
            "tok_s": res.tokens.numel() / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", choices=("full", "tiny"), default=None, help="default: full on cuda, tiny on cpu")
    ap.add_argument("--backend", default="triton", choices=("triton", "torch"))
    ap.add_argument("--contexts", default=None, help="comma-separated context lengths (default 512,8192 / 16,64)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median reported)")
    ap.add_argument("--vram", default="18GB,12GB", help="comma-separated plans to time ('' for none)")
    ap.add_argument("--e2e-tokens", type=int, default=None, help="default 1024 / 24")
    ap.add_argument("--e2e-steps", type=int, default=16, help="denoising steps per canvas in the end-to-end run")
    ap.add_argument("--deadline", type=float, default=330.0, help="seconds; later parts are skipped after it")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    args = ap.parse_args()
    deadline = T0 + args.deadline
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    config = args.config or ("full" if cuda else "tiny")
    contexts = [int(c) for c in (args.contexts or ("512,8192" if config == "full" else "16,64")).split(",")]
    dtype = torch.bfloat16 if cuda else torch.float32
    res: dict = {"device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)",
                 "torch": torch.__version__, "config": config, "backend": args.backend,
                 "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    log(f"device {res['device']}, torch {res['torch']}, triton {res['triton']}")
    if cuda:
        res["d2d_bytes_per_s"] = d2d_bandwidth(dev, 1 << 30)
        log(f"device-to-device copy: {res['d2d_bytes_per_s'] / 1e12:.2f} TB/s (read + written)")

    if config == "full":
        store, sizes = synthetic_model("full", "Q4_K_M", dev if cuda else torch.device("cpu"), args.reference)
    else:
        store, sizes = tiny_store()
    weight_bytes = sum(s.bytes for s in sizes)
    res["weight_bytes"] = weight_bytes
    if cuda:  # a step reads each weight once; the copy's read + write rate is the memory's bandwidth
        res["floor_ms"] = 1e3 * weight_bytes / res["d2d_bytes_per_s"]
    log(f"synthetic {config} model: {fmt_bytes(weight_bytes)} of weights"
        + (f", floor {res['floor_ms']:.2f} ms per step" if cuda else ""))

    model = DiffusionGemmaModel(store, dev, dtype=dtype, prefill_chunk=512)
    choice = backend.resolve(args.backend, dev)
    if choice.fell_back:
        log(choice.reason)
    backend.apply(model, choice)
    res["backend_ran"] = choice.name
    vocab = model.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    warm = torch.randint(200, vocab, (min(64, contexts[0]),), generator=g)
    prefill(model, warm)  # compiles the kernels
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    runs, first = [], None
    for ctx in contexts:
        if time.perf_counter() > deadline:
            log(f"deadline: skipping context {ctx}")
            continue
        r = context_run(model, ctx, args.steps, vocab, deadline, g)
        log(f"context {ctx}: prefill {r['prefill_tok_s']:.0f} tok/s, step {r['step_ms']:.2f} ms "
            f"(median of {r['steps_timed']})")
        if first is None:
            first = r
        else:
            for k in ("cache", "canvas", "soft"):
                r.pop(k)
        runs.append(r)
    res["peak_vram_bytes"] = int(torch.cuda.max_memory_allocated(dev)) if cuda else None
    if first is not None:
        cache, canvas, soft = first.pop("cache"), first.pop("canvas"), first.pop("soft")
        res["agreement"] = agreement(model, cache, canvas, soft)
        log(f"triton vs torch canvas logits: top-1 {100 * res['agreement']['top1_agreement']:.2f} %, "
            f"max abs diff {res['agreement']['max_abs_diff']:.3g}")
        res["torch_step_ms"] = torch_step_ms(model, cache, canvas, soft)
        log(f"torch backend, one step: {res['torch_step_ms']:.1f} ms "
            f"(speed-up {res['torch_step_ms'] / first['step_ms']:.1f}x)")
        res["plans"] = []
        for vram in [v for v in args.vram.split(",") if v]:
            if time.perf_counter() > deadline:
                log(f"deadline: skipping --vram {vram}")
                continue
            p = plan_run(model, sizes, vram, cache, canvas, soft, args.steps, deadline)
            res["plans"].append(p)
            log(f"--vram {vram}: " + (f"{p['streamed_layers']} streamed expert layers, step {p['step_ms']:.2f} ms"
                                      if p["fits"] else p["message"]))
        del cache
    res["contexts"] = runs
    if time.perf_counter() < deadline:
        tokens = args.e2e_tokens or (1024 if config == "full" else 24)
        res["end_to_end"] = end_to_end(model, tokens, args.e2e_steps, vocab, g)
        e = res["end_to_end"]
        log(f"end to end: {e['tokens']} tokens, {args.e2e_steps} steps per canvas, {e['tok_s']:.0f} tok/s")
    res["step_graphs"] = None if model.step_graphs is None else {
        "captures": model.step_graphs.captures, "replays": model.step_graphs.replays}
    res["torch_fallback_tensors"] = sorted(getattr(model.ops, "fallbacks", ()))
    log("done")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
