"""Conversion throughput and peak memory on a synthetic checkpoint with the real full-size shapes.

    python bench/convert_bench.py --layers 2 --types BF16 Q8_0

Each conversion runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_tools.synthetic import full_size_config, write_checkpoint, write_tokenizer  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"

CHILD = """
import resource, sys, time, json
from pathlib import Path
from gguf_tools.convert import convert
t = time.perf_counter()
out, plan = convert(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "out_bytes": plan.total_bytes,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=["BF16", "Q8_0"])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dg-bench-"))
    src = work / "synthetic-full-width"
    cfg, gen = full_size_config(REFERENCE, args.layers)
    t = time.perf_counter()
    if not (src / "model.safetensors.index.json").is_file():  # reuse a workdir's checkpoint
        write_checkpoint(src, cfg, gen)
        write_tokenizer(src, cfg["text_config"]["vocab_size"])
    in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"synthetic checkpoint: {in_bytes / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    # the peer: copying the same bytes (read + write + fsync) is the ceiling a streaming converter can reach
    t = time.perf_counter()
    copy_dir = work / "copy"
    copy_dir.mkdir(exist_ok=True)
    for p in src.glob("*.safetensors"):
        shutil.copyfile(p, copy_dir / p.name)
    __import__("os").sync()
    copy_s = time.perf_counter() - t
    shutil.rmtree(copy_dir)
    rows = []
    for type_name in args.types:
        out = work / f"out-{type_name}.gguf"
        res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), type_name], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        out.unlink()
        rows.append((type_name, in_bytes, r))
        print(f"{type_name}: {in_bytes / r['seconds'] / 1e6:.0f} MB/s of bf16 input, "
              f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"Input: synthetic {args.layers}-layer checkpoint, full width (vocab 262144, hidden 2816, "
          f"128 experts), {in_bytes / 2**30:.2f} GiB bf16\n")
    print("| job | seconds | MB/s (bf16 in) | vs. plain copy | output GiB | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| copy shards (shutil + sync) | {copy_s:.1f} | {in_bytes / copy_s / 1e6:.0f} | 1.00 | "
          f"{in_bytes / 2**30:.2f} | - |")
    for type_name, n, r in rows:
        print(f"| convert to {type_name} | {r['seconds']:.1f} | {n / r['seconds'] / 1e6:.0f} | "
              f"{copy_s / r['seconds']:.2f} | {r['out_bytes'] / 2**30:.2f} | {r['peak_rss'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
