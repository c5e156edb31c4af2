"""CPU prefill and denoising-step time on a synthetic full-width model, beside llama.cpp and transformers.

    python bench/engine_bench.py --layers 4 --threads 2

One synthetic checkpoint (real widths: vocab 262144, hidden 2816, 128 experts; `--layers` layers,
the last one full attention) is converted to F16 and Q8_0 diffusion-gemma GGUFs for our engine and to
a gemma4 F16/Q8_0 copy for llama.cpp; transformers loads the checkpoint itself in bf16. Each engine runs
in its own process with the same thread count:
- prefill: a causal pass over `--prompt` tokens;
- step: one denoising step, the decoder over a 256-token canvas after that prompt, with
  self-conditioning input (ours, transformers). llama.cpp has no diffusion-gemma graph, so its figure
  is the nearest causal work: a 256-token batch after the prompt with logits for every position.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"

COMMON = """
import json, os, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
P, C, REPS = int(sys.argv[3]), 256, int(sys.argv[4])
g = torch.Generator().manual_seed(0)
prompt = torch.randint(200, 262144, (P,), generator=g)
canvas = torch.randint(200, 262144, (C,), generator=g)
sc = torch.randn(C, 262144, generator=g) * 3
def timed(fn, warm_up=None):
    (warm_up or fn)()  # page faults, allocator, kernel selection
    out = []
    for _ in range(REPS):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)
"""

OURS = COMMON + """
from engine.model import DiffusionGemmaModel
m = DiffusionGemmaModel(sys.argv[1])
def prefill():
    m.encode(prompt, m.new_cache())
cache = m.new_cache(); m.encode(prompt, cache)
soft = m.soft_embedding(sc)  # what the previous step handed over
def step():  # what generation runs per step: logits and the next step's soft embedding, one table pass
    m.decode_step(canvas, cache, soft, temperature=1.0)
print(json.dumps({"prefill_s": timed(prefill), "step_s": timed(step)}))
"""

HF = COMMON + """
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache
dtype = getattr(torch, sys.argv[5])
m = DiffusionGemmaForBlockDiffusion.from_pretrained(sys.argv[1], dtype=dtype).eval()
def prefill():
    with torch.no_grad():
        m.model.encoder(input_ids=prompt[None], past_key_values=DynamicCache(config=m.config.text_config))
cache = DynamicCache(config=m.config.text_config)
with torch.no_grad():
    m.model.encoder(input_ids=prompt[None], past_key_values=cache)
sc_in = sc[None].to(dtype)
def step(n=C):
    with torch.no_grad():
        m(decoder_input_ids=canvas[None, :n], past_key_values=cache, self_conditioning_logits=sc_in[:, :n])
# The step's warm-up runs the same kernels on a 16-position canvas: in bf16 on a CPU without native
# bf16 one full step takes over half an hour (see BENCHMARKS.md), and transformers holds its weights
# in RAM, so there are no page faults for a full-size warm-up to absorb.
print(json.dumps({"prefill_s": timed(prefill), "step_s": timed(step, warm_up=lambda: step(16))}))
"""


LLAMA = COMMON + """
import llama_cpp
threads = int(sys.argv[2])
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=P + C + 16, n_batch=P + C, n_ubatch=P + C, logits_all=True,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
ids = prompt.tolist()
def prefill():
    llm.reset(); llm.eval(ids)
llm.reset(); llm.eval(ids)
def step():
    llm.n_tokens = P  # drop the previous batch: the cache keeps only the prompt
    llm.eval(canvas.tolist())
print(json.dumps({"prefill_s": timed(prefill), "step_s": timed(step)}))
"""


def run(code: str, model: Path, threads: int, prompt: int, reps: int, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, "-c", code, str(model), str(threads), str(prompt), str(reps), *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    from gguf_tools.arch import GEMMA4_ARCH
    from gguf_tools.convert import convert
    from gguf_tools.synthetic import full_size_config, write_checkpoint, write_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--hf-dtypes", default="float32,bfloat16:1",
                    help="dtypes transformers is timed in, comma-separated torch names; NAME:N times that one "
                         "N times instead of --reps (its bf16 step takes over half an hour on an AVX2 CPU)")
    ap.add_argument("--prepare-only", action="store_true", help="build and convert the model, time nothing")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dg-engine-bench-"))
    src = work / f"synthetic-{args.layers}L"
    if not (src / "model.safetensors.index.json").is_file():
        cfg, gen = full_size_config(REFERENCE, args.layers)
        cfg["vision_config"] = {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16}
        write_checkpoint(src, cfg, gen)
        write_tokenizer(src, cfg["text_config"]["vocab_size"])
    files = {}
    for type_name in ("F16", "Q8_0"):
        for arch in ("diffusion-gemma", GEMMA4_ARCH):
            out = work / f"{arch}-{args.layers}L-{type_name}.gguf"
            if not out.is_file():
                convert(src, out, type_name, arch=arch)
            files[arch, type_name] = out
    if args.prepare_only:
        return
    rows = []
    for type_name in ("F16", "Q8_0"):
        ours = run(OURS, files["diffusion-gemma", type_name], args.threads, args.prompt, args.reps)
        llama = run(LLAMA, files[GEMMA4_ARCH, type_name], args.threads, args.prompt, args.reps)
        rows.append((type_name, ours, llama))
        print(type_name, ours, llama, file=sys.stderr)
    hf = {}
    for item in args.hf_dtypes.split(","):
        dtype, _, reps = item.partition(":")
        hf[dtype] = run(HF, src, args.threads, args.prompt, int(reps or args.reps), dtype)
        print("transformers", dtype, hf[dtype], file=sys.stderr)
    print(f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} threads for every engine; "
          f"Python {platform.python_version()}")
    print(f"Model: synthetic {args.layers}-layer DiffusionGemma at full width (vocab 262144, hidden 2816, 128 experts "
          f"top-8); prefill {args.prompt} tokens; step = decoder over a 256-token canvas with self-conditioning, "
          f"full-vocabulary logits. Median of {args.reps} after a warm-up (transformers: {args.hf_dtypes}).\n")
    p = args.prompt
    print("| engine | weights | prefill tok/s | step s |")
    print("|---|---|---:|---:|")
    for type_name, ours, _llama in rows:
        print(f"| diffgemma | {type_name} | {p / ours['prefill_s']:.1f} | {ours['step_s']:.2f} |")
    for type_name, _ours, llama in rows:
        print(f"| llama.cpp (256-token causal batch as step) | {type_name} | {p / llama['prefill_s']:.1f} | "
              f"{llama['step_s']:.2f} |")
    for dtype, t in hf.items():
        print(f"| transformers | {dtype} | {p / t['prefill_s']:.1f} | {t['step_s']:.2f} |")
    print("\nRatio = peer time / our time (above 1: we are faster).\n")
    print("| ours | peer | prefill ratio | step ratio |")
    print("|---|---|---:|---:|")
    for type_name, ours, llama in rows:
        peers = [(f"llama.cpp {type_name}", llama)] + [(f"transformers {d}", t) for d, t in hf.items()]
        for name, t in peers:
            print(f"| {type_name} | {name} | {t['prefill_s'] / ours['prefill_s']:.2f} | "
                  f"{t['step_s'] / ours['step_s']:.2f} |")


if __name__ == "__main__":
    main()
