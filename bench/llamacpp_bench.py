"""End-to-end generation time, ours against llama.cpp's own DiffusionGemma (PR #24423), on the same GGUF files.

    python bench/llamacpp_bench.py --layers 2,4 --types Q8_0,Q4_K_M,F16 --threads 2
    python bench/llamacpp_bench.py --small            # the plumbing on a tiny random model, in seconds

Builds the oracle when it is missing (tests/oracles/llamacpp_pr.py; about 8 minutes once), writes synthetic
full-width checkpoints (real widths: vocab 262144, hidden 2816, 128 experts; `--layers` layers, the last one
full attention) and quantizes them with our converter; both engines then read the very same files.

Each configuration runs `diffgemma run` and `llama-diffusion-cli` alternately (`--reps` rounds), with the same
prompt text, one canvas, the same thread count and two fixed step budgets (`--steps A,B`, with an entropy
bound low enough that no canvas finishes early). Both report their own generation time without the model
load (ours: the --json prefill and decode times; llama.cpp: its "total time"), so:

- step s      = (time at B steps - time at A steps) / (B - A): one denoising step over the canvas with
                self-conditioning and full-vocabulary logits, sampler included;
- fixed part  = time at A steps - A * step: the prompt prefill plus per-canvas setup. Neither side computes
                logits for the prompt (ours: encode without logits; llama.cpp: its PREFILL phase asks for the
                last row only). llama.cpp's fixed part also holds its one-off F16 copy of the embedding that
                self-conditioning builds on first use.

Caveats: both sides render the prompt with the file's chat template; llama-diffusion-cli always does so with
enable_thinking on, so ours runs with --think to get the same ids (not checked here: the CLI cannot print
its ids). Figures are medians over the rounds. Ratio = llama.cpp time / our time (above 1: we are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"
PROMPT = "Sort: " + " ".join(str(i % 10) for i in range(200))


def prepare(work: Path, layers: int, types: list[str], small: bool) -> dict[str, Path]:
    from gguf_tools.convert import convert
    from gguf_tools.synthetic import full_size_config, write_checkpoint, write_tokenizer

    src = work / (f"small-{layers}L" if small else f"synthetic-{layers}L")
    if small:
        from tests.oracles.oracle_models import SUBJECTS, write_random_checkpoint

        if not (src / "config.json").is_file():
            text = dict(SUBJECTS["wide"].text or {}, num_hidden_layers=layers,
                        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
            write_random_checkpoint(src, text, canvas_length=32)
    elif not (src / "model.safetensors.index.json").is_file():
        cfg, gen = full_size_config(REFERENCE, layers)
        write_checkpoint(src, cfg, gen)
        write_tokenizer(src, cfg["text_config"]["vocab_size"])
    files = {}
    for t in types:
        out = work / f"{src.name}-{t}.gguf"
        if not out.is_file():
            convert(src, out, t)
        files[t] = out
    return files


def ours(model: Path, steps: int, threads: int, canvas: int) -> tuple[float, int, float]:
    """(generation seconds without the load, steps run, prefill seconds)."""
    cmd = [sys.executable, "-m", "cli", "run", str(model), PROMPT, "--json", "--device", "cpu", "--think",
           "--threads", str(threads), "--steps", str(steps), "--max-new-tokens", str(canvas),
           "--entropy-bound", "1e-6", "--seed", "0"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if p.returncode != 0:
        raise SystemExit(f"diffgemma run failed: {p.stderr[-2000:]}")
    r = json.loads(p.stdout)
    prefill = r["prompt_tokens"] / r["prefill_tokens_per_s"]
    decode = len(r["token_ids"]) / r["generated_tokens_per_s"] if r["token_ids"] else 0.0
    return prefill + decode, sum(r["steps_per_canvas"]), prefill


def llama(bin_dir: Path, model: Path, steps: int, threads: int, canvas: int) -> tuple[float, int]:
    from tests.oracles.llamacpp_pr import diffusion_cli

    for _ in range(3):  # its logger loses stdout at exit now and then
        p = diffusion_cli(bin_dir, model, PROMPT, canvas, threads=threads,
                          extra=["--diffusion-eb-max-steps", str(steps), "--diffusion-eb-entropy-bound", "1e-6"])
        m = re.search(r"total time: ([\d.]+)ms, time per step: [\d.]+ms \((\d+) steps", p.stdout)
        if m:
            return float(m[1]) / 1000, int(m[2])
    raise SystemExit(f"llama-diffusion-cli printed no timing: {p.stdout[-500:]} {p.stderr[-1500:]}")


def split(a: tuple[float, int], b: tuple[float, int]) -> tuple[float, float]:
    """(per-step seconds, fixed seconds) from two runs of different step counts."""
    step = (b[0] - a[0]) / max(b[1] - a[1], 1)
    return step, a[0] - a[1] * step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,F16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", default="2,5", help="two step budgets A,B (A < B)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a tiny random model instead of full width")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    from tests.oracles.llamacpp_pr import oracle_bin

    bin_dir = oracle_bin()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dg-llamacpp-bench-"))
    s_a, s_b = (int(x) for x in args.steps.split(","))
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        files = prepare(work, layers, args.types.split(","), args.small)
        for t, path in files.items():
            from gguf_tools.reader import GGUFFile

            canvas = GGUFFile(path).spec().canvas_length
            o: dict[int, list] = {s_a: [], s_b: []}
            ll: dict[int, list] = {s_a: [], s_b: []}
            for _ in range(args.reps):  # alternate the engines so drift in the machine hits both
                for s in (s_a, s_b):
                    ll[s].append(llama(bin_dir, path, s, args.threads, canvas))
                    o[s].append(ours(path, s, args.threads, canvas))

            def med(runs):
                return statistics.median(r[0] for r in runs), runs[0][1]

            o_step, o_fixed = split(med(o[s_a]), med(o[s_b]))
            l_step, l_fixed = split(med(ll[s_a]), med(ll[s_b]))
            rows.append((layers, t, o_step, o_fixed, l_step, l_fixed, med(o[s_b])[0], med(ll[s_b])[0],
                         statistics.median(r[2] for r in o[s_a])))
            print(rows[-1], file=sys.stderr)
    print(f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} threads for both; "
          f"Python {platform.python_version()}; {'tiny random' if args.small else 'full-width synthetic'} model, "
          f"steps {s_a} and {s_b}, median of {args.reps} alternating rounds.\n")
    print("| layers | type | step s ours | step s llama.cpp | step ratio | fixed s ours (prefill s) | "
          f"fixed s llama.cpp | {s_b}-step run s ours | llama.cpp | end-to-end ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layers, t, os_, of, ls, lf, oe, le, op in rows:
        print(f"| {layers} | {t} | {os_:.2f} | {ls:.2f} | {ls / os_:.2f} | {of:.2f} ({op:.2f}) | {lf:.2f} | "
              f"{oe:.2f} | {le:.2f} | {le / oe:.2f} |")


if __name__ == "__main__":
    main()
