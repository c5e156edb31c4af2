"""`diffgemma eval`: how far a (quantized) file's canvas predictions drift from a reference file's.

The inputs are fixed: the held-out prompts of the default model's task (engine.sort_task), each
followed by its answer canvas corrupted to several noise levels with a seeded generator, which is
what the decoder sees during denoising. Both files get exactly the same token ids; the statistics are
those `llama-perplexity --kl-divergence` reports for autoregressive models, taken over every canvas
position: mean and 99th-percentile KL(reference || model) and top-1 agreement. For the task model
the answers can also be checked: task accuracy runs the full sampler with a fixed seed per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .default_model import NAME as TASK_MODEL_PREFIX
from .generate import ModelRunner, generate
from .run import EngineError, LoadedModel, load, resolve_device, sampler_kwargs, use_backend
from .sort_task import Example, evaluation_set, held_out_count, is_correct

NOISE_LEVELS = (1.0, 0.75, 0.5, 0.25)
EOT, PAD = 106, 0

Progress = Callable[[str, int, int], None]  # (what, done, total), called after every example


@dataclass
class CanvasInput:
    prompt: list[int]
    canvases: list[list[int]]


@dataclass
class EvalResult:
    model: str
    reference: str
    positions: int
    mean_kld: float
    p99_kld: float
    max_kld: float
    top1_agreement: float
    accuracy: float | None = None
    reference_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("model", "reference", "positions", "mean_kld", "p99_kld", "max_kld",
                                              "top1_agreement", "accuracy", "reference_accuracy")}


def canvas_inputs(lm: LoadedModel, examples: Sequence[Example], seed: int) -> list[CanvasInput]:
    """Prompt ids through the file's own chat path, and the answer canvas at each noise level."""
    tok, spec = lm.tokenizer, lm.model.spec
    assert tok is not None
    c, vocab = spec.canvas_length, lm.model.vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for ex in examples:
        prompt = tok.apply_chat([{"role": "user", "content": ex.prompt}])
        clean = (tok.raw(ex.answer) + [EOT])[:c]
        clean = torch.tensor(clean + [PAD] * (c - len(clean)), dtype=torch.long)
        canvases = []
        for t in NOISE_LEVELS:
            noise = torch.randint(0, vocab, (c,), generator=g)
            canvases.append(torch.where(torch.rand(c, generator=g) < t, noise, clean).tolist())
        out.append(CanvasInput(prompt, canvases))
    return out


@torch.no_grad()
def canvas_logits(lm: LoadedModel, inputs: Sequence[CanvasInput],
                  on_example: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Decoder logits [C, V] for every canvas; the prompt is encoded once per example (the decoder
    reads the cache without writing it)."""
    m = lm.model
    out = []
    for i, item in enumerate(inputs):
        cache = m.new_cache()
        m.encode(torch.tensor(item.prompt, dtype=torch.long), cache)
        for canvas in item.canvases:
            out.append(m.decode(torch.tensor(canvas, dtype=torch.long), cache).float().cpu())
        if on_example is not None:
            on_example(i)
    return out


def divergence(ref_logits: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> dict[str, float]:
    """Per-position KL(ref || model) in float64, then mean, 99th percentile, max, and top-1 agreement."""
    kls, agree = [], []
    for r, m in zip(ref_logits, logits, strict=True):
        lr, lm_ = torch.log_softmax(r.double(), -1), torch.log_softmax(m.double(), -1)
        kls.append((lr.exp() * (lr - lm_)).sum(-1).clamp_min(0))
        agree.append(r.argmax(-1) == m.argmax(-1))
    kl = torch.cat(kls).numpy()
    return {"positions": int(kl.size), "mean_kld": float(kl.mean()), "p99_kld": float(np.percentile(kl, 99)),
            "max_kld": float(kl.max()), "top1_agreement": float(torch.cat(agree).double().mean())}


def task_accuracy(lm: LoadedModel, examples: Sequence[Example], seed: int,
                  on_example: Callable[[int, bool], None] | None = None) -> float:
    """Share of prompts answered exactly, through the full sampler; prompt i uses seed + i, so the
    figure does not depend on how many prompts run or in which order."""
    tok, spec = lm.tokenizer, lm.model.spec
    assert tok is not None
    right = 0
    for i, ex in enumerate(examples):
        ids = tok.apply_chat([{"role": "user", "content": ex.prompt}])
        gen = torch.Generator(device=lm.model.device).manual_seed(seed + i)
        result = generate(ModelRunner(lm.model), torch.tensor(ids, dtype=torch.long),
                          max_new_tokens=spec.sampler.max_new_tokens, generator=gen, **sampler_kwargs(spec))
        ok = is_correct(ex, tok.decode([int(t) for t in result.tokens.tolist()]))
        right += ok
        if on_example is not None:
            on_example(i, ok)
    return right / max(1, len(examples))


def is_task_model(lm: LoadedModel) -> bool:
    return str(lm.file.kv.get("general.name", "")).startswith(TASK_MODEL_PREFIX)


def check_examples(examples: int, seed: int = 0) -> None:
    """Before anything is loaded: a count the held-out set can supply, a seed torch accepts."""
    if examples < 1:
        raise EngineError(f"--examples {examples}: must be at least 1")
    if examples > held_out_count():
        raise EngineError(f"--examples {examples}: only {held_out_count()} held-out prompts exist")
    if seed < 0:
        raise EngineError(f"--seed {seed}: must be at least 0")


def evaluate(model_path: Path, reference_path: Path, *, examples: int = 200, seed: int = 0,
             accuracy: bool | None = None, device: str = "auto", on_progress: Progress | None = None,
             backend: str = "auto", on_notice: Callable[[str], None] | None = None) -> EvalResult:
    """The figures of `diffgemma eval`; `on_progress(what, done, total)` follows every example. Both
    models run on `backend` (engine/backend.py); `on_notice` hears of a triton request run on torch."""
    check_examples(examples, seed)
    dev = resolve_device(device)
    lm, ref = load(model_path, dev), load(reference_path, dev)
    use_backend(lm.model, backend, dev, on_notice)
    use_backend(ref.model, backend, dev)
    if lm.model.vocab_size != ref.model.vocab_size or lm.model.spec.canvas_length != ref.model.spec.canvas_length:
        raise EngineError(f"{model_path.name} and {reference_path.name} are not the same model "
                          "(vocabulary or canvas length differ)")
    exs = evaluation_set(examples)
    inputs = canvas_inputs(ref, exs, seed)
    n = len(exs)

    def tick(what: str) -> Callable[..., None] | None:
        if on_progress is None:
            return None
        on_progress(what, 0, n)
        return lambda i, *_: on_progress(what, i + 1, n)

    ref_logits = canvas_logits(ref, inputs, tick("canvas logits, reference"))
    stats = divergence(ref_logits, canvas_logits(lm, inputs, tick("canvas logits, model")))
    result = EvalResult(model=str(model_path), reference=str(reference_path), **stats)
    if accuracy is None:
        accuracy = is_task_model(lm)
    if accuracy:
        result.accuracy = task_accuracy(lm, exs, seed, tick("task accuracy, model"))
        result.reference_accuracy = task_accuracy(ref, exs, seed, tick("task accuracy, reference"))
    return result
