"""The README's quality table: what each quantization preset does to the trained default model.

    python bench/quality_table.py                      # prints the table
    python bench/quality_table.py --write-readme       # and replaces the table in README.md
    python bench/quality_table.py --presets Q4_K_M,Q4_K_M+imatrix-diffusion,target@Q4_K_M   # some rows
    python bench/quality_table.py --calibrate          # per-role KLD gains for gguf_tools/target_mix.py

Every preset is made from the shipped checkpoint (models/diffgemma-sort-tiny) by our converter and
compared with the BF16 conversion (the shipped weights bit for bit) by `engine.evaluate`: the
decoder's canvas logits over the fixed held-out inputs (mean and 99th-percentile KL divergence, top-1
agreement) and task accuracy through full generation with a fixed seed. Everything is seeded, so a
rerun prints the same numbers.

Beyond the stock presets (issue 14): Q4_K_M with an importance matrix measured by `diffgemma imatrix`
on the BF16 file in causal mode only (llama-imatrix's way) and in diffusion mode (decoder passes over
noised, self-conditioned canvases); and `quantize --target` mixes (diffusion imatrix, per-tensor KLD
gains from engine.sensitivity probes) at exactly the stock Q4_K_M and Q3_K_M file sizes. The imatrix
and the probes use the built-in calibration prompts (training distribution), never the held-out ones.
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
EXTRA = ["Q4_K_M+imatrix-causal", "Q4_K_M+imatrix-diffusion", "target@Q4_K_M", "target@Q3_K_M"]
LABELS = {"Q4_K_M+imatrix-causal": "Q4_K_M, causal imatrix", "Q4_K_M+imatrix-diffusion": "Q4_K_M, diffusion imatrix",
          "target@Q4_K_M": "--target = Q4_K_M size", "target@Q3_K_M": "--target = Q3_K_M size"}
THREADS = 2  # quantizer worker processes (the bytes do not depend on it)
BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


def bits_per_weight(path: Path) -> float:
    f = GGUFFile(path, check_model=False)
    return 8 * sum(t.n_bytes for t in f.tensors.values()) / sum(t.n_elements for t in f.tensors.values())


def build(src: Path, workdir: Path, preset: str) -> Path:
    out = workdir / f"{src.name}-{preset.replace('@', '-at-')}.gguf"
    if out.exists():
        return out
    if preset.startswith("Q4_K_M+imatrix-"):
        convert(src, out, "Q4_K_M", imatrix=imatrix(src, workdir, preset.rsplit("-", 1)[1]), threads=THREADS)
    elif preset.startswith("target@"):
        from gguf_tools.target_mix import Target, target_plan

        size = build(src, workdir, preset.split("@")[1]).stat().st_size
        im = imatrix(src, workdir, "diffusion")
        _, mix = target_plan(src, "Q4_K_M", Target("bytes", size, f"{size}B"), im, gains=probe_gains(src, workdir),
                             threads=THREADS)
        convert(src, out, "Q4_K_M", overrides=mix.rules(), imatrix=im, threads=THREADS)
    else:
        convert(src, out, preset, threads=THREADS)
    return out


def imatrix(src: Path, workdir: Path, mode: str):
    """`diffgemma imatrix BF16.gguf --mode MODE` with the built-in calibration prompts, cached."""
    from engine.imatrix_collect import builtin_samples, collect, write
    from gguf_tools.imatrix import load_imatrix

    path = workdir / f"{src.name}-imatrix-{mode}.gguf"
    if not path.exists():
        lm = load(build(src, workdir, "BF16"), torch.device("cpu"))
        samples = builtin_samples(lm)
        write(collect(lm.model, samples, mode), path, f"builtin {mode}",
              max(len(s.context) + len(s.canvas) for s in samples))
    return load_imatrix(path)


def probes(src: Path, workdir: Path) -> dict:
    """engine.sensitivity probes of the BF16 file with the diffusion imatrix (32 calibration prompts), cached."""
    import json

    from engine.imatrix_collect import builtin_samples
    from engine.sensitivity import probe_gains

    path = workdir / f"{src.name}-probes.json"
    if not path.exists():
        lm = load(build(src, workdir, "BF16"), torch.device("cpu"))
        found = probe_gains(lm, builtin_samples(lm, 32, seed=11), imatrix(src, workdir, "diffusion"))
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(found, indent=1))
    return json.loads(path.read_text())


def probe_gains(src: Path, workdir: Path) -> dict[str, float]:
    return {n: p["gain"] for n, p in probes(src, workdir).items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "diffgemma-sort-tiny")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dgquality"))
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", default=",".join(PRESETS + EXTRA))
    ap.add_argument("--calibrate", action="store_true", help="print per-role KLD gains (target_mix.ROLE_GAINS)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        from engine.sensitivity import role_gains

        for role, gain in role_gains(probes(args.model, args.workdir)).items():
            print(f'    "{role}": {gain:.3e},')
        return 0
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
        lines.append(f"| {LABELS.get(preset, preset)} | {size / 2**20:.2f} MiB | {bpw:.2f} | {s['mean_kld']:.5f} | "
                     f"{s['p99_kld']:.5f} | "
                     f"{100 * s['top1_agreement']:.2f}% | {100 * acc:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
