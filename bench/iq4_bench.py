"""IQ4_NL / IQ4_XS quantization speed: our numpy port beside ggml_quantize_chunk, on one core.

    python bench/iq4_bench.py [--size 2816] [--repeats 3]

Both run on the same float32 matrix, pinned to one CPU, after a warm-up; MB/s counts float32 input
bytes and uses each side's best time. ggml_quantize_chunk is single-threaded by itself; BLAS/OpenMP
pools are capped to one thread before numpy loads. The outputs are also checked to be byte-identical.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType as Q

from gguf_tools.quants.iq4 import quantize_iq4_nl, quantize_iq4_xs
from tests.oracles.ggml_lib import quantize_chunk


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.size, args.size)).astype(np.float32)
    imatrix = rng.uniform(0.01, 10, args.size).astype(np.float32)
    mb = x.nbytes / 1e6
    rows = []
    for qt, ours in ((Q.IQ4_NL, quantize_iq4_nl), (Q.IQ4_XS, quantize_iq4_xs)):
        for imat in (None, imatrix):
            ours(x[:16], imat)  # warm-up (imports, caches, ggml tables)
            quantize_chunk(x[:16], qt, imat)
            t_ggml, ref = best_time(lambda qt=qt, imat=imat: quantize_chunk(x, qt, imat), args.repeats)
            t_ours, got = best_time(lambda ours=ours, imat=imat: ours(x, imat), args.repeats)
            same = bool(np.array_equal(got.reshape(-1), ref.reshape(-1)))
            rows.append((qt.name, imat is not None, mb / t_ours, mb / t_ggml, same))
            print(f"{qt.name} imatrix={imat is not None}: ours {mb / t_ours:.1f} MB/s, "
                  f"ggml {mb / t_ggml:.1f} MB/s, identical={same}", file=sys.stderr)
    print(f"\nMachine: {platform.processor() or platform.machine()}, 1 core pinned, numpy {np.__version__}, "
          f"Python {platform.python_version()}")
    print(f"Input: {args.size}x{args.size} float32 N(0,1) ({mb:.1f} MB), best of {args.repeats}\n")
    print("| type | imatrix | ours MB/s | ggml_quantize_chunk MB/s | ours / ggml | byte-identical |")
    print("|---|---|---:|---:|---:|---|")
    for name, im, a, b, same in rows:
        print(f"| {name} | {'yes' if im else 'no'} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
