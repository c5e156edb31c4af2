"""Block-diffusion generation loop (one sequence, no batching).

The loop only needs the small `DiffusionModel` protocol below, so it can be driven by a fake model
in tests; `ModelRunner` adapts the real engine model (which takes an explicit KV cache) to it.

Outline, following transformers' ``DiffusionGemmaGenerationMixin.generate``:

* encode the prompt causally (fills the KV cache);
* per canvas: start from uniform noise, and for s = N..1 decode, scale by the temperature of step
  s, sample + argmax, accept by entropy bound, renoise the rest, feed the scaled logits back as
  self-conditioning, stop when stable and confident;
* commit the last argmax canvas (pad after the first EOS), stop on EOS, otherwise re-encode the
  committed canvas causally and continue.

The RNG is consumed in the reference's order (canvas init; per step: multinomial, then renoise),
so with an identically seeded generator the whole run is reproducible against it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from engine import sampler as S

__all__ = [
    "DEFAULTS",
    "DiffusionModel",
    "GenerationResult",
    "ModelRunner",
    "ReferenceStep",
    "SamplerStep",
    "StepInfo",
    "StepOutcome",
    "generate",
]

# Released checkpoint's generation_config.json (token ids are left to the caller / GGUF metadata).
DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


@runtime_checkable
class DiffusionModel(Protocol):
    """What the loop needs from a model.

    ``encode(tokens)`` runs ``tokens`` causally at the next free positions and appends them to the
    model's context.  ``decode(canvas, self_cond)`` returns fp32 (soft-capped) logits ``[C, V]``
    for a canvas placed right after the context, without changing the context.  ``self_cond`` is
    the previous step's temperature-scaled logits, or None on a canvas's first step.

    Optional attributes: ``self_cond_dtype`` (the loop casts the self-conditioning logits to it
    before handing them over; the reference passes them in the embedding dtype, e.g. bf16) and
    ``device`` (where canvases are drawn; a ``generator`` must live on the same device type).
    """

    vocab_size: int
    canvas_length: int

    def encode(self, tokens: torch.LongTensor) -> None: ...

    def decode(self, canvas: torch.LongTensor, self_cond: torch.Tensor | None) -> torch.Tensor: ...


class ModelRunner:
    """Adapter from an engine model with explicit cache arguments to `DiffusionModel`.

    If the model's ``encode`` / ``decode`` take a ``cache`` parameter, the bound ``cache`` (by
    default ``model.new_cache()`` when that exists) is passed by keyword; the self-conditioning
    logits go to a parameter named ``self_cond_logits`` or ``self_cond`` when one exists, otherwise
    positionally.  Sizes come from explicit arguments, then the model's attributes (``vocab_size``
    or ``vocab``, the logits width), then its ``config`` / ``cfg`` / ``spec``.

    ``self_cond_dtype`` defaults to the model's compute ``dtype``: the reference hands the scaled
    logits to the decoder already cast to the embedding dtype, and with a bf16 model that rounding
    changes the self-conditioning softmax.
    """

    def __init__(
        self,
        model: Any,
        cache: Any = None,
        *,
        vocab_size: int | None = None,
        canvas_length: int | None = None,
        self_cond_dtype: torch.dtype | None = None,
    ):
        self.model = model
        if cache is None and callable(getattr(model, "new_cache", None)):
            cache = model.new_cache()
        self.cache = cache
        self.vocab_size = int(
            vocab_size if vocab_size is not None else _lookup(model, ("vocab_size", "vocab"))
        )
        self.canvas_length = int(
            canvas_length if canvas_length is not None else _lookup(model, ("canvas_length",))
        )
        if self_cond_dtype is None:
            self_cond_dtype = getattr(model, "self_cond_dtype", None)
        if self_cond_dtype is None and isinstance(getattr(model, "dtype", None), torch.dtype):
            self_cond_dtype = model.dtype
        self.self_cond_dtype = self_cond_dtype
        self.device = getattr(model, "device", None)
        self._encode_cache = _takes(model.encode, "cache")
        self._decode_cache = _takes(model.decode, "cache")
        self._self_cond_kw = next(
            (name for name in ("self_cond_logits", "self_cond") if _takes(model.decode, name)), None
        )
        self._scaled: torch.Tensor | None = None  # the last scaled logits decode_scaled returned
        self._soft: torch.Tensor | None = None  # ... and the soft embedding of exactly those

    def encode(self, tokens: torch.LongTensor) -> None:
        if self._encode_cache:
            self.model.encode(tokens, cache=self.cache)
        else:
            self.model.encode(tokens)

    def decode_scaled(self, canvas: torch.LongTensor, self_cond: torch.Tensor | None, temp: float) -> torch.Tensor:
        """Temperature-scaled logits. A model with `decode_step` computes, in the same pass over its
        embedding table, the soft embedding of exactly these scaled logits; when the loop hands them
        back unchanged as the next step's self-conditioning, that embedding is reused instead of
        recomputed from [C, V] logits."""
        step = getattr(self.model, "decode_step", None)
        if step is None or self.cache is None:
            return S.scale_logits(self.decode(canvas, self_cond), temp)
        if self_cond is None:
            soft = None
        elif self_cond is self._scaled:
            soft = self._soft
        else:
            soft = self.model.soft_embedding(self_cond)
        logits, self._soft = step(canvas, self.cache, soft, temp)
        self._scaled = S.scale_logits(logits, temp)
        return self._scaled

    def decode(self, canvas: torch.LongTensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"cache": self.cache} if self._decode_cache else {}
        if self._self_cond_kw is not None:
            kwargs[self._self_cond_kw] = self_cond
            return self.model.decode(canvas, **kwargs)
        return self.model.decode(canvas, self_cond, **kwargs)


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _lookup(model: Any, names: tuple[str, ...]) -> int:
    for name in names:
        if isinstance(getattr(model, name, None), int):
            return getattr(model, name)
    for holder in ("config", "cfg", "spec"):
        for name in names:
            value = getattr(getattr(model, holder, None), name, None)
            if isinstance(value, int):
                return value
    raise AttributeError(f"cannot find {names[0]!r} on {type(model).__name__}; pass it to ModelRunner")


@dataclass(frozen=True)
class StepInfo:
    canvas_index: int
    step: int  # 1-based index of the denoising step within the canvas
    accepted_count: int
    mean_entropy: float
    temperature: float = float("nan")
    argmax: torch.LongTensor | None = field(default=None, repr=False)  # current draft of the canvas


@dataclass
class GenerationResult:
    tokens: torch.LongTensor  # generated ids only (no prompt), at most max_new_tokens, pad after EOS
    steps_per_canvas: list[int]  # decoder passes spent on each canvas
    finished: bool  # an EOS id is among the returned tokens

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_canvas)


@dataclass
class StepOutcome:
    """One denoising step as the loop sees it."""

    canvas: torch.LongTensor  # the next diffusion state: accepted samples, fresh noise elsewhere
    argmax: torch.LongTensor  # [C] the current draft
    entropy: torch.Tensor  # [C] of the temperature-scaled distribution
    accepted: torch.Tensor  # [C] bool
    carry: Any  # the next step's self-conditioning input


class SamplerStep(Protocol):
    def __call__(self, canvas: torch.LongTensor, self_cond: Any, temp: float,
                 generator: torch.Generator | None, entropy_bound: float) -> StepOutcome: ...


class ReferenceStep:
    """The reference step: decode, scale, then sample, argmax, entropy and acceptance over the
    [C, V] scaled logits, renoise; the scaled logits (cast to ``self_cond_dtype``) carry over."""

    def __init__(self, model: DiffusionModel, vocab: int, sc_dtype: torch.dtype | None):
        self.model, self.vocab, self.sc_dtype = model, vocab, sc_dtype

    def __call__(self, canvas: torch.LongTensor, self_cond: Any, temp: float,
                 generator: torch.Generator | None, entropy_bound: float) -> StepOutcome:
        model = self.model
        scaled = getattr(model, "decode_scaled", None)
        z = scaled(canvas, self_cond, temp) if scaled else S.scale_logits(model.decode(canvas, self_cond), temp)
        sampled = S.sample(z, generator)
        argmax = z.argmax(dim=-1)
        h = S.entropy(z)
        accepted = S.entropy_bound_mask(h, entropy_bound)
        canvas = S.renoise(canvas, accepted, sampled, self.vocab, generator)
        return StepOutcome(canvas, argmax, h, accepted, z if self.sc_dtype is None else z.to(self.sc_dtype))


def _validate(max_new_tokens, steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold):
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if entropy_bound <= 0:
        raise ValueError(f"entropy_bound must be > 0, got {entropy_bound}")
    # The reference insists on t_max > t_min; equality (a constant temperature) is harmless, so allow it.
    if t_min < 0 or t_max <= 0 or t_max < t_min:
        raise ValueError(f"need 0 <= t_min <= t_max and t_max > 0, got t_min={t_min}, t_max={t_max}")
    if stability_threshold < 0:
        raise ValueError(f"stability_threshold must be >= 0, got {stability_threshold}")
    if confidence_threshold <= 0:
        raise ValueError(f"confidence_threshold must be > 0, got {confidence_threshold}")


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompt_ids: torch.LongTensor,
    *,
    max_new_tokens: int = DEFAULTS["max_new_tokens"],
    steps: int = DEFAULTS["steps"],
    entropy_bound: float = DEFAULTS["entropy_bound"],
    t_min: float = DEFAULTS["t_min"],
    t_max: float = DEFAULTS["t_max"],
    stability_threshold: int = DEFAULTS["stability_threshold"],
    confidence_threshold: float = DEFAULTS["confidence_threshold"],
    eos_ids: Sequence[int] = (),
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_canvas: Callable[[int, torch.LongTensor], None] | None = None,
    sampler_step: SamplerStep | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (1-D).

    ``ceil(max_new_tokens / C)`` canvases are denoised; the output is trimmed to
    ``max_new_tokens``.  ``on_canvas(i, tokens)`` receives each committed (padded, trimmed) canvas.
    ``sampler_step`` replaces `ReferenceStep` with a fast step that draws the same tokens (e.g.
    engine.cpu_steps.CpuFusedStep); what it carries as self-conditioning is its own business.
    """
    _validate(max_new_tokens, steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold)
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt_ids.ndim != 1 or prompt_ids.numel() == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D tensor")
    canvas_len = int(model.canvas_length)
    vocab = int(model.vocab_size)
    device = getattr(model, "device", None) or prompt_ids.device
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but the model runs on {device}")
    sc_dtype = getattr(model, "self_cond_dtype", None)
    temps = S.temperature_schedule(steps, t_min, t_max)
    stopper = S.StoppingState(stability_threshold, confidence_threshold, max_steps=steps)

    step_fn = sampler_step or ReferenceStep(model, vocab, sc_dtype)

    model.encode(prompt_ids)
    outputs: list[torch.LongTensor] = []
    steps_per_canvas: list[int] = []
    committed: torch.LongTensor | None = None
    n_left = max_new_tokens
    finished = False

    for canvas_index in range(math.ceil(max_new_tokens / canvas_len)):
        if committed is not None:
            # The previous canvas becomes context: encode it causally at the positions the
            # decoder used for it; the decoder's own canvas K/V are not kept.
            model.encode(committed)

        canvas = S.random_canvas(canvas_len, vocab, generator, device=device)
        self_cond = None
        stopper.reset()
        for step, temp in enumerate(temps, start=1):
            out = step_fn(canvas, self_cond, temp, generator, entropy_bound)
            canvas, argmax, h, accepted, self_cond = out.canvas, out.argmax, out.entropy, out.accepted, out.carry
            stop = stopper.update(argmax, h)
            if on_step is not None:
                on_step(StepInfo(canvas_index, step, int(accepted.sum()), stopper.mean_entropy, temp, argmax))
            if stop:
                break
        steps_per_canvas.append(stopper.steps)

        # The output is the argmax canvas of the last step; the sampled canvas is only a
        # diffusion state and is never emitted.
        committed, eos_seen = S.commit(argmax, eos_ids, pad_id)
        kept = committed[:n_left]
        n_left -= kept.numel()
        outputs.append(kept)
        if on_canvas is not None:
            on_canvas(canvas_index, kept)
        if eos_seen:
            # The reference marks the sequence finished on an EOS anywhere in the canvas; an EOS
            # past the trim point (last canvas only) is not in the output, hence the recheck.
            eos = torch.as_tensor(list(eos_ids), dtype=kept.dtype, device=kept.device)
            finished = bool(torch.isin(kept, eos).any())
            break

    return GenerationResult(tokens=torch.cat(outputs), steps_per_canvas=steps_per_canvas, finished=finished)
