"""The README's quality table: what each quantization preset does to the trained default model.

    python bench/quality_table.py                      # prints the table
    python bench/quality_table.py --write-readme       # and replaces the table in README.md

Every preset is made from the shipped checkpoint (models/diffgemma-sort-tiny) by our converter and
compared with the BF16 conversion (the shipped weights bit for bit) by `engine.evaluate`: the
decoder's canvas logits over the fixed held-out inputs (mean and 99th-percentile KL divergence, top-1
agreement) and task accuracy through full generation with a fixed seed. Everything is seeded, so a
rerun prints the same numbers.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.evaluate import canvas_inputs, canvas_logits, divergence, task_accuracy  # noqa: E402
from engine.run import load  # noqa: E402
from engine.sort_task import evaluation_set  # noqa: E402
from gguf_tools.atomic import atomic_path  # noqa: E402
from gguf_tools.convert import convert  # noqa: E402
from gguf_tools.reader import GGUFFile  # noqa: E402

PRESETS = ["BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "MXFP4_MOE"]
BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


def bits_per_weight(path: Path) -> float:
    f = GGUFFile(path, check_model=False)
    return 8 * sum(t.n_bytes for t in f.tensors.values()) / sum(t.n_elements for t in f.tensors.values())


def build(src: Path, workdir: Path, preset: str) -> Path:
    out = workdir / f"{src.name}-{preset}.gguf"
    if not out.exists():
        convert(src, out, preset)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "diffgemma-sort-tiny")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dgquality"))
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    presets = args.presets.split(",")
    if presets[0] != "BF16":
        presets.insert(0, "BF16")
    t0 = time.monotonic()
    exs = evaluation_set(args.examples)
    ref = load(build(args.model, args.workdir, "BF16"), torch.device("cpu"))
    inputs = canvas_inputs(ref, exs, args.seed)
    ref_logits = canvas_logits(ref, inputs)
    rows = []
    for preset in presets:
        path = build(args.model, args.workdir, preset)
        lm = ref if preset == "BF16" else load(path, torch.device("cpu"))
        stats = divergence(ref_logits, canvas_logits(lm, inputs))
        acc = task_accuracy(lm, exs, args.seed)
        rows.append((preset, path.stat().st_size, bits_per_weight(path), stats, acc))
        print(f"{preset:10s} {path.stat().st_size / 2**20:6.2f} MiB  bpw {rows[-1][2]:5.2f}  "
              f"KLD {stats['mean_kld']:.5f}  p99 {stats['p99_kld']:.5f}  top1 {stats['top1_agreement']:.4f}  "
              f"acc {acc:.3f}", flush=True)
    table = render(rows, args)
    print("\n" + table)
    print(f"({time.monotonic() - t0:.0f} s)")
    if args.write_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            print(f"README.md has no {BEGIN} ... {END} section", file=sys.stderr)
            return 1
        head, rest = text.split(BEGIN, 1)
        with atomic_path(readme) as tmp:
            tmp.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    return 0


def render(rows, args) -> str:
    cmd = "python bench/quality_table.py" + (f" --examples {args.examples}" if args.examples != 200 else "")
    lines = [f"Model `{args.model.name}`, {args.examples} held-out prompts, seed {args.seed}, reference BF16; "
             f"produced by `{cmd}` on {platform.machine()} CPU ({torch.get_num_threads()} threads).", "",
             "| preset | file size | bits/weight | mean KLD | 99% KLD | top-1 agreement | task accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for preset, size, bpw, s, acc in rows:
        lines.append(f"| {preset} | {size / 2**20:.2f} MiB | {bpw:.2f} | {s['mean_kld']:.5f} | {s['p99_kld']:.5f} | "
                     f"{100 * s['top1_agreement']:.2f}% | {100 * acc:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
