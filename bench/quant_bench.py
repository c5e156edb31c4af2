"""Quantizer throughput on one core: gguf_tools.quants beside llama.cpp's ggml_quantize_chunk.

    python bench/quant_bench.py                      # 2816x2816, K-quants and legacy, with and without imatrix
    python bench/quant_bench.py --rows 1024 --types Q4_K Q6_K --repeat 5

MB/s of float32 input. Both sides run single-threaded in this process (ggml_quantize_chunk called directly does
not spawn threads; BLAS/OpenMP pools are pinned to one thread before NumPy loads). Each measurement is the best
of --repeat runs after a warm-up, ours and ggml interleaved so that background load hits both alike; the
default clock is process CPU time, which is what one core spends. The "same" column checks the bytes.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType as Q  # noqa: E402

from gguf_tools.quants import quantize  # noqa: E402
from tests.oracles.ggml_lib import quantize_chunk  # noqa: E402

DEFAULT_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2816)
    ap.add_argument("--cols", type=int, default=2816)
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--no-imatrix", action="store_true", help="skip the imatrix column")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    imat = (rng.random(args.cols) ** 2 * 50 + 1e-3).astype(np.float32)
    mb = x.nbytes / 1e6

    def timed(fn) -> tuple[float, np.ndarray]:
        t0 = clock()
        out = fn()
        return clock() - t0, out

    print(
        f"{args.rows}x{args.cols} float32 ({mb:.1f} MB), best of {args.repeat}, {args.clock} clock, "
        f"{platform.processor() or platform.machine()}, numpy {np.__version__}\n"
    )
    print("| type | imatrix | ours MB/s | ggml MB/s | ours/ggml | same bytes |")
    print("|---|---|---:|---:|---:|---|")
    for name in args.types:
        qtype = Q[name]
        for im in [None] if args.no_imatrix else [None, imat]:
            quantize(x[:64], qtype, im)  # warm-up: imports, allocator, caches
            quantize_chunk(x[:64], qtype, im)
            t_ours = t_ggml = float("inf")
            same = True
            for _ in range(args.repeat):
                t, ours = timed(lambda q=qtype, m=im: quantize(x, q, m))
                t_ours = min(t_ours, t)
                t, ref = timed(lambda q=qtype, m=im: quantize_chunk(x, q, m))
                t_ggml = min(t_ggml, t)
                same &= bool(np.array_equal(ours.reshape(-1), ref))
            print(
                f"| {name} | {'yes' if im is not None else 'no'} | {mb / t_ours:.1f} | {mb / t_ggml:.1f} | "
                f"{t_ggml / t_ours:.2f} | {'yes' if same else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
