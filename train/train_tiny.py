"""Train the embedded default model: a small DiffusionGemma that sorts lists of digits.

    python train/train_tiny.py --out models/diffgemma-sort-tiny        # about 35 min on 2 idle CPU cores

The model is transformers' own DiffusionGemmaForBlockDiffusion, so `save_pretrained` writes the
released checkpoint's exact layout (bf16 safetensors, config, generation config) and the engine is
checked against a model it did not train. The objective is DiffusionGemma's uniform-state one
(diffusiongemma-arch.md 5.8): per example a corruption level t ~ U(eps, 1); each canvas position is
replaced by a uniform-random token with probability t; the decoder predicts the clean token at every
position, weighted by 1/t; the encoder reads the clean prompt causally. Self-conditioning is trained
Analog-Bits style: for a random half of the examples the decoder also gets the temperature-scaled
logits of a first, gradient-free pass over the same noisy canvas.

Everything is seeded (torch, NumPy, the data stream) and CPU kernels are deterministic, so a rerun
reproduces the run; the final check is task accuracy through `engine.generate` on held-out lists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.sort_task import MAX_LEN, MIN_LEN, Example, evaluation_set, training_examples  # noqa: E402
from gguf_tools.tiny_tokenizer import _CORPUS, build_tokenizer, write_tiny_tokenizer  # noqa: E402

VOCAB = 512
CANVAS = 12
PAD, EOT = 0, 106  # <pad>, <turn|>

# Hidden a multiple of 256 so K-quants apply to attention and embeddings; dense (272) and expert
# (176) widths are not, like the released 2112 and 704, so the quantizer's fallbacks are exercised.
TEXT_CONFIG = dict(
    model_type="diffusion_gemma_text", vocab_size=VOCAB, hidden_size=256, intermediate_size=272,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
    num_global_key_value_heads=1, sliding_window=32,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
    num_experts=8, top_k_experts=2, moe_intermediate_size=176, max_position_embeddings=4096,
    rms_norm_eps=1e-6, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
    bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
)
VISION_CONFIG = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, head_dim=16)
GENERATION_CONFIG = dict(
    max_new_tokens=CANVAS, max_denoising_steps=24,
    sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005, eos_token_id=[1, 106, 50],
    pad_token_id=0,
)


def tokenizer_corpus() -> str:
    """Merge-learning text shaped like the task, so digits with their space are single tokens."""
    rng = np.random.default_rng(0)
    lines = [_CORPUS]
    for _ in range(200):
        ex = Example(tuple(int(d) for d in rng.integers(0, 10, size=rng.integers(MIN_LEN, MAX_LEN + 1))))
        lines.append(f"{ex.prompt}\n{ex.answer}")
    return "\n".join(lines) + "\n"


def build_model(seed: int):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, canvas_length=CANVAS,
                               eos_token_id=[1, 106, 50], pad_token_id=0, bos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(cfg)


class Batches:
    """Prompt ids and clean canvases; one list length per batch, so no padding is needed."""

    def __init__(self, tokenizer, seed: int):
        from engine.tokenizer import gemma4_chat

        self.tok = tokenizer
        self.chat = gemma4_chat
        self.rng = np.random.default_rng(seed)
        self.streams = {n: training_examples(np.random.default_rng(seed + n), n) for n in range(MIN_LEN, MAX_LEN + 1)}

    def prompt_ids(self, ex: Example) -> list[int]:
        text = self.chat([{"role": "user", "content": ex.prompt}])
        return self.tok.encode(text, add_special_tokens=False).ids

    def canvas_ids(self, ex: Example) -> list[int]:
        ids = self.tok.encode(ex.answer, add_special_tokens=False).ids + [EOT]
        return ids + [PAD] * (CANVAS - len(ids))

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(self.rng.integers(MIN_LEN, MAX_LEN + 1))
        exs = [next(self.streams[n]) for _ in range(batch_size)]
        return (torch.tensor([self.prompt_ids(e) for e in exs]), torch.tensor([self.canvas_ids(e) for e in exs]))


def train_step(model, prompt, clean, gen: torch.Generator, eps: float, sc_prob: float):
    b, p = prompt.shape
    t = eps + (1 - eps) * torch.rand(b, 1, generator=gen)
    noise = torch.randint(0, VOCAB, clean.shape, generator=gen)
    noisy = torch.where(torch.rand(clean.shape, generator=gen) < t, noise, clean)
    positions = (p + torch.arange(CANVAS)).expand(b, CANVAS)
    enc = model.model.encoder(input_ids=prompt, use_cache=True)
    cache = enc.past_key_values
    sc_mask = torch.rand(b, generator=gen) < sc_prob
    sc_logits = None
    if bool(sc_mask.any()):
        with torch.no_grad():
            first = model(past_key_values=cache, decoder_input_ids=noisy, decoder_position_ids=positions).logits
        temp = 0.4 + 0.4 * torch.rand(b, 1, 1, generator=gen)  # the sampler's temperature range
        sc_logits = first / temp
    logits = model(past_key_values=cache, decoder_input_ids=noisy, decoder_position_ids=positions,
                   self_conditioning_logits=sc_logits,
                   self_conditioning_mask=sc_mask if sc_logits is not None else None).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), clean.reshape(-1), reduction="none")
    return (ce.view(b, CANVAS).mean(1, keepdim=True) / t).mean(), ce.mean()


def save(model, tokenizer_corpus_text: str, out: Path) -> None:
    """Write into a sibling temporary folder and swap it in, so a killed save leaves the previous
    model (or nothing), never a half-written one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    model.to(torch.float32)
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    write_tiny_tokenizer(tmp, VOCAB, tokenizer_corpus_text)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "diffgemma-sort-tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.1, help="smallest corruption level")
    ap.add_argument("--sc-prob", type=float, default=0.5, help="share of examples trained with self-conditioning")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    corpus = tokenizer_corpus()
    tok = build_tokenizer(VOCAB, corpus)
    model = build_model(args.seed).train()
    data = Batches(tok, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    start = time.monotonic()
    running = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        prompt, clean = data.next(args.batch)
        loss, ce = train_step(model, prompt, clean, gen, args.eps, args.sc_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = ce.item() if running is None else 0.98 * running + 0.02 * ce.item()
        elapsed = time.monotonic() - start
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  ce {running:.4f}  lr {lr_at(step):.2e}  {elapsed / 60:.1f} min", flush=True)
    model.eval()
    save(model, corpus, args.out)
    print(f"saved {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 2**20:.1f} MiB) "
          f"after {(time.monotonic() - start) / 60:.1f} min", flush=True)
    print(f"held-out lists: {len(evaluation_set())} (check with: python bench/quality_table.py)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
