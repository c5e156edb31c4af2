"""The denoising sampler's per-step work kept on the device, for the fast (GPU) path.

`engine.sampler` + `engine.generate` are the reference: they read values back to the host every
step (``bool(mean < threshold)``, ``torch.equal`` of argmax canvases, ``int(accepted.sum())``),
and ``torch.multinomial`` itself checks its input with ``.item()``. Each of those is a device
round trip, and none can live inside a captured CUDA graph. Here one step is only device ops on
state tensors updated in place (fixed addresses, so a graph can replay it):

* the draw is multinomial's own single-sample algorithm written out (``argmax(p / q)`` with
  ``q ~ Exp(1)`` filled from the generator), so it consumes the generator and picks the same
  tokens as `engine.sampler.sample`, without the validity checks that sync;
* acceptance, renoise and the stopping statistics (argmax stability against the last k drafts,
  mean entropy against the confidence threshold, the step budget) stay tensors, ending in a
  device boolean ``stopped``;
* once stopped the state freezes (``torch.where``), so steps run past the real stop point, in a
  batch of steps between two host reads of the flag, change nothing. Their random draws are undone
  by restoring the generator state recorded after the real last step (a host-side copy, no sync).

`device_generate` is `engine.generate.generate` on top of this: the host reads the stop flag every
``check_every`` steps and at the end of a canvas, never inside a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine import sampler as S
from engine.generate import DEFAULTS, GenerationResult, StepInfo, _validate

__all__ = [
    "CanvasState",
    "DeviceDenoiser",
    "StepOutput",
    "Stepper",
    "TorchStepper",
    "device_generate",
    "row_stats",
    "sample",
]


def sample(z: torch.Tensor, generator: torch.Generator | None) -> torch.LongTensor:
    """`engine.sampler.sample` without a host sync: torch.multinomial's single-sample path is
    ``argmax(p / q)`` with ``q`` an Exp(1) tensor of p's shape drawn from the generator, after
    ``.item()`` checks of p. The same draw and division give the same token from the same
    generator state, and leave the generator where multinomial leaves it."""
    probs = torch.softmax(z, dim=-1, dtype=torch.float32).reshape(-1, z.shape[-1])
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return probs.div_(q).argmax(dim=-1).reshape(z.shape[:-1])


def row_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
    """(entropy, argmax) of each row of the scaled logits, the reference's way; a fused vocabulary
    pass (engine.kernels.vocab) gives both from its own sweep instead."""
    return S.entropy(z), z.argmax(dim=-1)


@dataclass
class StepOutput:
    """What a model's denoising step hands the sampler."""

    z: torch.Tensor  # temperature-scaled logits [C, V] fp32
    entropy: torch.Tensor  # [C], of softmax(z)
    argmax: torch.LongTensor  # [C], first index of each row's max (torch.argmax)
    carry: Any  # the self-conditioning input of the next step (scaled logits, a soft embedding, ...)


class Stepper(Protocol):
    """One decoder pass + vocabulary pass for a canvas.

    ``temperature`` is a 0-dim fp32 tensor on the device (what a captured graph can read);
    ``temp_value`` is the same number as a Python float for steppers that run eagerly and need it,
    or None when the step is replayed from a graph. ``carry`` is None on a canvas's first step."""

    def denoise_step(self, canvas: torch.LongTensor, carry: Any, temperature: torch.Tensor,
                     temp_value: float | None) -> StepOutput: ...


class TorchStepper:
    """`Stepper` over an `engine.generate.DiffusionModel` (or `ModelRunner`), doing exactly what the
    reference loop does for one step: scaled logits from ``decode_scaled`` when the model has it,
    else ``decode(...) / temperature``; the scaled logits, cast to ``self_cond_dtype``, are the
    next step's self-conditioning."""

    def __init__(self, model: Any):
        self.model = model
        self.self_cond_dtype = getattr(model, "self_cond_dtype", None)

    def denoise_step(self, canvas: torch.LongTensor, carry: Any, temperature: torch.Tensor,
                     temp_value: float | None) -> StepOutput:
        scaled = getattr(self.model, "decode_scaled", None)
        if scaled is not None:
            if temp_value is None:
                raise ValueError("decode_scaled needs the temperature as a float (an eager step)")
            z = scaled(canvas, carry, temp_value)
        else:
            # dividing by the fp32 0-dim tensor is bit-identical to S.scale_logits
            z = self.model.decode(canvas, carry) / temperature
        h, am = row_stats(z)
        sc = self.self_cond_dtype
        return StepOutput(z, h, am, z if sc is None else z.to(sc))


@dataclass
class CanvasState:
    """Device state of one canvas's denoising; every field is updated in place by a step."""

    canvas: torch.LongTensor  # [C] the diffusion state (sampled / renoised tokens)
    argmax: torch.LongTensor  # [C] the current draft: argmax of the last live step
    history: torch.LongTensor  # [k, C] the last k drafts, oldest first (-1 = none yet)
    steps: torch.LongTensor  # () steps counted (frozen once stopped) = StoppingState.steps
    executed: torch.LongTensor  # () steps run, frozen or not; indexes the schedule and the records
    stopped: torch.BoolTensor  # () the stop flag the host polls
    converged: torch.BoolTensor  # () stable and confident at the last live step
    mean_entropy: torch.Tensor  # () of the last live step
    accepted: torch.LongTensor  # [N] accepted count of each live step (0 after the stop)
    entropies: torch.Tensor  # [N] mean entropy of each live step
    drafts: torch.LongTensor  # [N, C] argmax of each live step


class DeviceDenoiser:
    """Runs the steps of one canvas at a time, all state on the device.

    ``reset(canvas)`` starts a canvas, ``step(temp_value)`` runs one step (model + sampler, no host
    sync, also after the stop, when it changes nothing). The host decides when to look at
    ``state.stopped``."""

    def __init__(self, stepper: Stepper, *, vocab_size: int, canvas_length: int, temperatures: Sequence[float],
                 entropy_bound: float, stability_threshold: int, confidence_threshold: float,
                 device: torch.device | str, generator: torch.Generator | None):
        self.stepper = stepper
        self.vocab = vocab_size
        self.n_steps = len(temperatures)
        self.entropy_bound = entropy_bound
        self.confidence_threshold = confidence_threshold
        self.generator = generator
        dev = torch.device(device)
        self.temps = torch.tensor(list(temperatures), dtype=torch.float32, device=dev)
        c, n = canvas_length, self.n_steps

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.state = CanvasState(
            canvas=zeros(c), argmax=zeros(c), history=zeros(stability_threshold, c), steps=zeros(),
            executed=zeros(), stopped=zeros(dtype=torch.bool), converged=zeros(dtype=torch.bool),
            mean_entropy=zeros(dtype=torch.float32), accepted=zeros(n), entropies=zeros(n, dtype=torch.float32),
            drafts=zeros(n, c))
        self.carry: Any = None

    def reset(self, canvas: torch.LongTensor) -> None:
        st = self.state
        st.canvas.copy_(canvas)
        st.argmax.zero_()
        st.history.fill_(-1)  # StoppingState: missing history counts as all -1, never a token
        for t in (st.steps, st.executed, st.stopped, st.converged, st.accepted, st.drafts):
            t.zero_()
        st.mean_entropy.fill_(math.nan)
        st.entropies.zero_()
        self.carry = None

    def step(self, temp_value: float | None = None) -> None:
        st = self.state
        at = st.executed.view(1)
        temperature = self.temps.index_select(0, at.clamp(max=self.n_steps - 1)).view(())
        out = self.stepper.denoise_step(st.canvas, self.carry, temperature, temp_value)
        self.carry = out.carry
        live = ~st.stopped
        # reference order of generator use: the draw, then the renoise
        sampled = sample(out.z, self.generator)
        accepted = S.entropy_bound_mask(out.entropy, self.entropy_bound)
        canvas = S.renoise(st.canvas, accepted, sampled, self.vocab, self.generator)
        # StoppingState.update as tensors; an empty history (threshold 0) is always stable
        stable = (st.history == out.argmax).all()
        mean = out.entropy.mean(dim=-1)
        confident = mean < self.confidence_threshold  # compared in the entropy's dtype, as there
        steps = st.steps + live.long()
        stop = (stable & confident) | (steps >= self.n_steps)

        st.canvas.copy_(torch.where(live, canvas, st.canvas))
        st.argmax.copy_(torch.where(live, out.argmax, st.argmax))
        if st.history.shape[0]:
            st.history.copy_(torch.where(live, torch.cat([st.history[1:], out.argmax[None]]), st.history))
        st.converged.copy_(torch.where(live, stable & confident, st.converged))
        st.mean_entropy.copy_(torch.where(live, mean, st.mean_entropy))
        # while live, executed == steps - 1: the records of live steps land at their step index
        st.accepted.index_copy_(0, at, torch.where(live, accepted.sum(), 0).view(1))
        st.entropies.index_copy_(0, at, torch.where(live, mean, 0.0).view(1).to(st.entropies.dtype))
        st.drafts.index_copy_(0, at, torch.where(live, out.argmax, 0)[None])
        st.steps.copy_(steps)
        st.stopped.copy_(st.stopped | stop)
        st.executed.add_(1)


def _generator_of(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The generator the sampler ops use when given None (its state is saved and restored)."""
    if generator is not None:
        return generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return torch.default_generator


@torch.no_grad()
def device_generate(
    model: Any,
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
    check_every: int = 4,
    stepper: Stepper | None = None,
) -> GenerationResult:
    """`engine.generate.generate` with the per-step sampler work on the device: same arguments,
    same result (tokens, steps per canvas, finished) and the same `on_step` records for the same
    generator state, whatever ``check_every`` is.

    ``model`` supplies ``encode``, ``vocab_size``, ``canvas_length`` and optionally ``device``;
    ``stepper`` the denoising step (default: ``model`` itself if it has ``denoise_step``, else a
    `TorchStepper` over it). The host reads the stop flag after every ``check_every``-th step and
    after the last; ``on_step`` is called for a canvas's steps once the canvas is done.
    """
    _validate(max_new_tokens, steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold)
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt_ids.ndim != 1 or prompt_ids.numel() == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D tensor")
    canvas_len, vocab = int(model.canvas_length), int(model.vocab_size)
    device = torch.device(getattr(model, "device", None) or prompt_ids.device)
    if generator is not None and torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model runs on {device}")
    if stepper is None:
        stepper = model if callable(getattr(model, "denoise_step", None)) else TorchStepper(model)
    gen = _generator_of(generator, device)
    temps = S.temperature_schedule(steps, t_min, t_max)
    den = DeviceDenoiser(stepper, vocab_size=vocab, canvas_length=canvas_len, temperatures=temps,
                         entropy_bound=entropy_bound, stability_threshold=stability_threshold,
                         confidence_threshold=confidence_threshold, device=device, generator=gen)
    st = den.state

    model.encode(prompt_ids)
    outputs: list[torch.LongTensor] = []
    steps_per_canvas: list[int] = []
    committed: torch.LongTensor | None = None
    n_left = max_new_tokens
    finished = False
    for canvas_index in range(math.ceil(max_new_tokens / canvas_len)):
        if committed is not None:
            model.encode(committed)
        den.reset(S.random_canvas(canvas_len, vocab, gen, device=device))
        after: list[Any] = []  # generator state after each step run since the canvas began
        for i, temp in enumerate(temps):
            den.step(temp)
            after.append(gen.get_state())
            if ((i + 1) % check_every == 0 or i + 1 == len(temps)) and bool(st.stopped):
                break
        n = int(st.steps)
        # steps run past the stop froze the state but drew random numbers: undo those draws
        gen.set_state(after[n - 1])
        steps_per_canvas.append(n)
        if on_step is not None:
            counts, means = st.accepted[:n].tolist(), st.entropies[:n].tolist()
            for s in range(n):
                on_step(StepInfo(canvas_index, s + 1, counts[s], means[s], temps[s], st.drafts[s].clone()))

        committed, eos_seen = S.commit(st.argmax, eos_ids, pad_id)
        kept = committed[:n_left]
        n_left -= kept.numel()
        outputs.append(kept)
        if on_canvas is not None:
            on_canvas(canvas_index, kept)
        if eos_seen:
            eos = torch.as_tensor(list(eos_ids), dtype=kept.dtype, device=kept.device)
            finished = bool(torch.isin(kept, eos).any())
            break
    return GenerationResult(tokens=torch.cat(outputs), steps_per_canvas=steps_per_canvas, finished=finished)
