"""Why transformers' bf16 denoising step is so slow on this CPU: torch's bf16 matmul beside fp32.

    python bench/cpu_bf16_matmul.py --threads 2

The step's two vocabulary-size products, on a slice of the 262,144-row embedding table:
- head: normed hidden [R, 2816] x E^T [2816, V] (reduction over the hidden size);
- self-conditioning: softmax(previous logits) [R, V] x E [V, 2816] (reduction over the vocabulary),
  which transformers' DiffusionGemma decoder computes in the model dtype.
On a CPU without native bf16 arithmetic (AVX2 only) the second shape falls to a slow path.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16, help="canvas positions R")
    ap.add_argument("--vocab", type=int, default=32768, help="slice of the vocabulary V")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, 2816, generator=g)
    probs = torch.softmax(torch.randn(args.rows, args.vocab, generator=g), -1)
    table = torch.randn(args.vocab, 2816, generator=g)
    print(f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; R={args.rows}, V={args.vocab}\n")
    print("| product | fp32 s | bf16 s | bf16/fp32 |")
    print("|---|---:|---:|---:|")
    for name, a, b in (("head [R,2816] x [2816,V]", hidden, table.T), ("self-cond [R,V] x [V,2816]", probs, table)):
        f32 = best_of(lambda a=a, b=b: a @ b, args.reps)
        a16, b16 = a.bfloat16(), b.bfloat16()
        b16_s = best_of(lambda a16=a16, b16=b16: a16 @ b16, args.reps)
        print(f"| {name} | {f32:.3f} | {b16_s:.3f} | {b16_s / f32:.1f} |")


if __name__ == "__main__":
    main()
