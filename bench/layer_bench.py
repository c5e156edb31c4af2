"""Quantize one full-width DiffusionGemma layer with a preset: our requantize beside llama-quantize.

    python bench/layer_bench.py                                   # Q4_K_M, 1 thread, files in /tmp/dglayer
    python bench/layer_bench.py --preset Q6_K --threads 2 --reps 2 --vocab 262144

A synthetic checkpoint with the released shapes (gguf_tools.synthetic.full_size_config of the reference
config, one layer: hidden 2816, 16 heads of 256 / 8 KV heads, 128 experts of 704, dense MLP 2112) is
converted once to a gemma4-architecture BF16 (or --src-type F16) GGUF, the input llama-quantize accepts.
Both sides then turn that same file into the preset, in this process:
- ours: gguf_tools.requantize.requantize with threads = --threads (what `diffgemma quantize FILE --type P
  --threads N` runs: N worker processes, gguf_tools.parallel_quant);
- llama.cpp: llama_model_quantize from llama-cpp-python's shared library (what `llama-quantize` runs), with
  nthread = --threads, followed by an fsync of its output because ours fsyncs before renaming.
--threads also pins NumPy/torch/BLAS pools to one thread per worker. Runs alternate (ours, llama.cpp, ours,
...) and the best of --reps is kept, for wall time and for CPU time (this process and its finished worker
processes, all threads) separately. The two
outputs are compared byte for byte. --vocab shrinks the tied token embedding (Q6_K under Q4_K_M), which
otherwise costs about as much as the layer, and the tokenizer metadata; the default is the real 262144. Our
time includes requantize's metadata pass (the validated parse of the header, tokenizer arrays included:
0.2 s at the real vocab on the 2-core dev VM), which is also printed on its own.
Files (about 3 GiB per GGUF at the real vocab) go to --workdir and are reused by later runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--workdir", type=Path, default=Path("/tmp/dglayer"))
ap.add_argument("--preset", default="Q4_K_M")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=1)
ap.add_argument("--vocab", type=int, default=None, help="token embedding rows (default: the reference's)")
ap.add_argument("--src-type", choices=["BF16", "F16"], default="BF16")
ap.add_argument("--keep", action="store_true", help="keep the two quantized outputs")
ARGS = ap.parse_args()
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = str(ARGS.threads)

import ctypes as C  # noqa: E402
import filecmp  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gguf_tools.arch import GEMMA4_ARCH  # noqa: E402
from gguf_tools.convert import convert  # noqa: E402
from gguf_tools.presets import load_preset  # noqa: E402
from gguf_tools.requantize import plan_requantize, requantize  # noqa: E402
from gguf_tools.synthetic import full_size_config, write_checkpoint, write_tokenizer  # noqa: E402


def build_input(work: Path, vocab: int | None, src_type: str) -> tuple[Path, dict]:
    cfg, gen = full_size_config(REFERENCE, 1)
    tc = cfg["text_config"]
    if vocab is not None:
        tc["vocab_size"] = vocab
    cfg["vision_config"] = {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "head_dim": 16,
    }
    src = work / f"synthetic-1L-v{tc['vocab_size']}"
    if not (src / "model.safetensors.index.json").is_file():
        print(f"writing the synthetic checkpoint {src} ...", file=sys.stderr, flush=True)
        write_checkpoint(src, cfg, gen)
        write_tokenizer(src, tc["vocab_size"])
    gguf = work / f"gemma4-1L-v{tc['vocab_size']}-{src_type}.gguf"
    if not gguf.is_file():
        print(f"converting to {gguf} ...", file=sys.stderr, flush=True)
        convert(src, gguf, src_type, arch=GEMMA4_ARCH)
    return gguf, tc


def llama_quantize(inp: Path, out: Path, preset: str, threads: int) -> None:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):  # noqa: ARG001
        pass

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = load_preset(preset).file_type
    p.nthread = threads
    llama_cpp.llama_log_set(quiet, None)
    try:
        rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), C.byref(p))
    finally:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, C.c_void_p(0))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    t0 = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"  llama.cpp output fsync: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (our worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - w0, _cpu() - c0


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    work = ARGS.workdir
    work.mkdir(parents=True, exist_ok=True)
    inp, tc = build_input(work, ARGS.vocab, ARGS.src_type)
    with open(inp, "rb") as fh:  # page cache warm for both sides
        while fh.read(64 << 20):
            pass
    w0, c0 = time.perf_counter(), time.process_time()
    plan, _ = plan_requantize(inp, ARGS.preset)  # requantize repeats this work inside its timed run
    plan_wall, plan_cpu = time.perf_counter() - w0, time.process_time() - c0
    kinds = Counter()
    for t in plan.tensors:
        kinds[t.qtype.name] += int(np.prod(t.shape))
    ours_out, llama_out = work / f"ours-{ARGS.preset}.gguf", work / f"llama-{ARGS.preset}.gguf"
    best = {"ours": [float("inf")] * 2, "llama.cpp": [float("inf")] * 2}
    for rep in range(ARGS.reps):
        for side, fn in (
            ("ours", lambda: requantize(inp, ours_out, ARGS.preset, threads=ARGS.threads)),
            ("llama.cpp", lambda: llama_quantize(inp, llama_out, ARGS.preset, ARGS.threads)),
        ):
            wall, cpu = timed(fn)
            print(f"rep {rep + 1} {side}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
            best[side] = [min(best[side][0], wall), min(best[side][1], cpu)]
    same = filecmp.cmp(ours_out, llama_out, shallow=False)
    if not ARGS.keep:
        ours_out.unlink()
        llama_out.unlink()

    n_in = inp.stat().st_size
    print(f"Command: python {shlex.join(sys.argv)}")
    print(
        f"Machine: {platform.machine()} {platform.processor() or ''} CPU, {os.cpu_count()} cores, "
        f"{ARGS.threads} thread(s) for llama.cpp and for NumPy/torch; Python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )
    print(
        f"Input: {inp.name} ({n_in / 2**30:.2f} GiB {ARGS.src_type}), one layer at full width (hidden "
        f"{tc['hidden_size']}, {tc['num_experts']} experts of {tc['moe_intermediate_size']}, dense "
        f"{tc['intermediate_size']}, {tc['num_attention_heads']}x{tc['head_dim']} heads / "
        f"{tc['num_key_value_heads']} KV), vocab {tc['vocab_size']}"
    )
    print(f"Preset {ARGS.preset}: " + ", ".join(f"{k} {v / 1e6:.0f}M values" for k, v in kinds.most_common()))
    print(
        f"Best of {ARGS.reps}; ratio = llama.cpp time / our time (above 1: we are faster); "
        f"outputs byte-identical: {'yes' if same else 'NO'}\n"
    )
    print("| side | wall s | CPU s | MB/s of input (wall) |")
    print("|---|---:|---:|---:|")
    for side, (wall, cpu) in best.items():
        print(f"| {side} | {wall:.1f} | {cpu:.1f} | {n_in / 1e6 / wall:.0f} |")
    (ow, oc), (lw, lc) = best["ours"], best["llama.cpp"]
    print(f"| ratio | {lw / ow:.2f} | {lc / oc:.2f} | |")
    print(
        f"\nOf our time, {plan_wall:.1f} s wall / {plan_cpu:.1f} s CPU is plan_requantize alone: reading the input's "
        "metadata (it grows with the tokenizer, i.e. --vocab) and choosing the types."
    )


if __name__ == "__main__":
    main()
