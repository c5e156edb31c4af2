"""One denoising step on the CPU, sampler included: the reference step against engine/cpu_steps.py.

    python bench/cpu_step_bench.py MODEL.gguf [MODEL.gguf ...] --threads 2 --reps 3

In one process per file, after a `--prompt`-token prefill, each variant runs the step generation runs
(decoder over the 256-token canvas with self-conditioning, vocabulary pass, then the sampler's draw,
acceptance and renoise), in turn, `--reps` rounds:

- reference: engine.generate.ReferenceStep over ModelRunner (decode_step, then scale, multinomial,
  argmax and entropy over the [C, V] logits);
- fused: engine.cpu_steps.CpuFusedStep (row statistics from the vocabulary pass, the draw for accepted
  rows only), with the compute copy of the embedding `run` would pick (fp32 for a K-quant table);
- fused-bf16: the same with a bf16 copy of the table (DIFFGEMMA_CPU_BF16=1 in `run`).

Printed: median wall seconds and process CPU seconds per step. Run it where nothing else holds the
cores for wall times that mean something; CPU seconds move less under load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_file(path: Path, reps: int, prompt_len: int, bound: float) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each variant's steps on one file, variants alternating."""
    from engine import plan_cli
    from engine.cpu_steps import CpuFusedStep, VocabTable, bf16_matmul_is_native, cpu_vocab_table
    from engine.generate import ModelRunner, ReferenceStep
    from engine.model import DiffusionGemmaModel

    m = DiffusionGemmaModel(path)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(200, m.vocab, (prompt_len,), generator=g)
    canvas = torch.randint(200, m.vocab, (m.canvas_length,), generator=g)
    runner = ModelRunner(m)
    runner.encode(prompt)
    tables = {"reference": None, "fused": cpu_vocab_table(m, plan_cli.host_available())}
    if bf16_matmul_is_native():
        tables["fused-bf16"] = VocabTable(m, torch.bfloat16)
    # every variant starts from the same self-conditioning: one reference step's scaled logits, and
    # the soft embedding of that pass for the fused steps
    z0 = ReferenceStep(runner, m.vocab, None)(canvas, None, 0.8, g, bound).carry
    soft0 = m.soft_embedding(z0).to(m.dtype)

    def step(name: str) -> None:
        m.vocab_table = tables[name]
        if name == "reference":
            # as in the loop, the previous scaled logits come with the soft embedding of their own pass
            # (ModelRunner reuses it instead of another pass over the table)
            runner._scaled, runner._soft = z0, soft0
            ReferenceStep(runner, m.vocab, None)(canvas, z0, 0.7, g, bound)
        else:
            CpuFusedStep(m, runner.cache)(canvas, soft0, 0.7, g, bound)

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in tables}
    for rep in range(reps + 1):  # the first round warms up (page faults, allocator)
        for name in tables:
            w, c = time.perf_counter(), time.process_time()
            step(name)
            if rep:
                times[name].append((time.perf_counter() - w, time.process_time() - c))
    m.vocab_table = None
    return times


def main() -> None:
    from engine.cpu_steps import bf16_matmul_is_native

    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bound", type=float, default=0.1, help="entropy bound (acceptance)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, torch {torch.__version__}, bf16 matmul native: {bf16_matmul_is_native()}; "
          f"median of {args.reps} after a warm-up round")
    print("| file | variant | step s (wall) | step s (CPU) |")
    print("|---|---|---:|---:|")
    for path in args.models:
        for name, ts in bench_file(path, args.reps, args.prompt, args.bound).items():
            print(f"| {path.name} | {name} | {statistics.median(t[0] for t in ts):.2f} | "
                  f"{statistics.median(t[1] for t in ts):.2f} |", flush=True)


if __name__ == "__main__":
    main()
