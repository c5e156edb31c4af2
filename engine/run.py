"""What `diffgemma run` and `diffgemma logits` do, as library functions the CLI and tests call.

Every input check happens before anything large is allocated, and every failure a user can cause is
an EngineError with a one-line message.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gguf_tools.reader import GGUFError, GGUFFile
from gguf_tools.units import SizeError, parse_size

from . import backend as backends
from . import plan_cli
from .experts import attach_plan, detach
from .generate import GenerationResult, ModelRunner, StepInfo, generate
from .model import DiffusionGemmaModel
from .placement import PlacementError, Plan
from .tokenizer import GGUFTokenizer
from .weights import WeightStore


class EngineError(ValueError):
    """Bad input to the engine: the message names the problem."""


@dataclass
class RunOptions:
    max_new_tokens: int | None = None  # None: the file's defaults
    steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    think: bool = False
    raw: bool = False
    # placement (engine/placement.py): the compute device's budget, the context the plan and the
    # memory check size (None: prompt + max_new_tokens), llama.cpp-style expert offload rules
    vram: str | int | None = None  # "24GB", or bytes
    ctx: int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    override_tensor: tuple[str, ...] = ()
    backend: str = "auto"  # engine/backend.py: auto, torch or triton

    def check(self) -> RunOptions:
        """Refuse out-of-range options before anything is loaded; --vram is read into bytes."""
        for flag, v, low in (("--max-new-tokens", self.max_new_tokens, 1), ("--steps", self.steps, 1),
                             ("--seed", self.seed, 0), ("--threads", self.threads, 1), ("--ctx", self.ctx, 1),
                             ("--n-cpu-moe", self.n_cpu_moe, 0)):
            if v is not None and v < low:
                raise EngineError(f"{flag} {v}: must be at least {low}")
        if self.entropy_bound is not None and not (math.isfinite(self.entropy_bound) and self.entropy_bound > 0):
            raise EngineError(f"--entropy-bound {self.entropy_bound}: must be a number above 0")
        for flag, v in (("--t-min", self.t_min), ("--t-max", self.t_max)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise EngineError(f"{flag} {v}: must be a number of at least 0")
        if self.t_min is not None and self.t_max is not None and self.t_min > self.t_max:
            raise EngineError(f"--t-min {self.t_min} is above --t-max {self.t_max}")
        if self.raw and self.think:
            raise EngineError("--think switches the chat template's thinking channel; with --raw there is no "
                              "template (write the thinking turn into the prompt instead)")
        resolve_device(self.device)
        if self.backend not in backends.BACKENDS:
            raise EngineError(f"--backend {self.backend}: use one of {', '.join(backends.BACKENDS)}")
        if isinstance(self.vram, str):
            try:
                self.vram = parse_size(self.vram, "--vram")  # type: ignore[assignment]
            except SizeError as e:
                raise EngineError(str(e)) from None
        return self


def check_sampler(kw: dict[str, Any], opts: RunOptions | None = None) -> None:
    """The sampler settings after the file's defaults were applied, as generate() needs them: a
    --t-min above the file's t_max is named here, before anything is allocated."""
    def origin(name: str) -> str:
        return f"--{name.replace('_', '-')}" if getattr(opts, name, None) is not None else f"the file's {name}"

    if kw["t_max"] <= 0:
        raise EngineError(f"{origin('t_max')} {kw['t_max']}: must be above 0")
    if kw["t_min"] > kw["t_max"]:
        raise EngineError(f"{origin('t_min')} {kw['t_min']} is above {origin('t_max')} {kw['t_max']}")


def sampler_kwargs(spec: Any, opts: RunOptions | None = None) -> dict[str, Any]:
    """generate()'s sampler keywords: the file's diffusion.* defaults, overridden where `opts` sets one."""
    s = spec.sampler

    def pick(name: str, default: Any) -> Any:
        given = getattr(opts, name, None)
        return default if given is None else given

    return dict(steps=pick("steps", s.max_steps), entropy_bound=pick("entropy_bound", s.entropy_bound),
                t_min=pick("t_min", s.t_min), t_max=pick("t_max", s.t_max),
                stability_threshold=s.stability_threshold, confidence_threshold=s.confidence_threshold,
                eos_ids=spec.eos_token_ids, pad_id=spec.pad_token_id)


@dataclass
class RunResult:
    text: str
    token_ids: list[int]  # the generated canvases' ids, at most max_new_tokens (padded after the end)
    prompt_tokens: int
    steps_per_canvas: list[int]
    finished: bool
    prefill_tokens_per_s: float
    generated_tokens_per_s: float
    peak_memory_bytes: int
    device: str
    model: str
    timings: dict[str, float] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    answer_tokens: int = 0  # the answer's own tokens: those before the end-of-turn id
    backend: dict[str, Any] = field(default_factory=dict)  # what ran; tensors the fast path gave to torch

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("text", "token_ids", "answer_tokens", "prompt_tokens",
                                              "steps_per_canvas", "finished", "prefill_tokens_per_s",
                                              "generated_tokens_per_s", "peak_memory_bytes", "device", "model",
                                              "placement", "backend")}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise EngineError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


@dataclass
class LoadedModel:
    path: Path
    file: GGUFFile
    model: DiffusionGemmaModel
    tokenizer: GGUFTokenizer | None


def open_gguf(path: Path | None) -> GGUFFile:
    """The diffusion-gemma file at `path` (None: the built-in model, converted on first use)."""
    if path is None:
        from .default_model import default_model_path

        path = default_model_path()
    try:
        f = GGUFFile(path)
    except GGUFError as e:
        raise EngineError(str(e)) from None
    if f.architecture != "diffusion-gemma":
        raise EngineError(f"{f.path.name}: architecture is {f.architecture!r}, not 'diffusion-gemma'")
    return f


def file_tokenizer(f: GGUFFile) -> GGUFTokenizer:
    if "tokenizer.ggml.tokens" not in f.kv:
        raise EngineError(f"{f.path.name}: no tokenizer.ggml.* metadata (a text model needs a vocabulary)")
    try:
        return GGUFTokenizer.from_kv(f.kv)
    except (ValueError, KeyError) as e:
        raise EngineError(f"{f.path.name}: bad tokenizer metadata ({e})") from None


def is_builtin(f: GGUFFile) -> bool:
    """The embedded sorting model (or a file made from it)."""
    from .default_model import NAME

    return str(f.kv.get("general.name", "")).startswith(NAME)


def prompt_ids(tok: GGUFTokenizer, prompt: str, raw: bool = False, think: bool = False) -> list[int]:
    """The ids `run` prefills: <bos> + the text with --raw, else the chat template's user turn."""
    return tok.raw(prompt) if raw else tok.apply_chat([{"role": "user", "content": prompt}], think=think)


def load(path: Path | None, device: torch.device, need_tokenizer: bool = True) -> LoadedModel:
    f = open_gguf(path)
    try:
        store = WeightStore(f)
    except GGUFError as e:
        raise EngineError(str(e)) from None
    except ValueError as e:  # missing tensors, wrong shapes, unsupported types (named by the store)
        raise EngineError(str(e)) from None
    tok = file_tokenizer(f) if need_tokenizer else None
    return LoadedModel(f.path, f, DiffusionGemmaModel(store, device), tok)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_prompt(path: Path | None, prompt: str, opts: RunOptions,
               on_text: Callable[[str], None] | None = None,
               on_step: Callable[[StepInfo], None] | None = None, view: Any = None,
               on_prompt: Callable[[str, list[int]], None] | None = None,
               on_notice: Callable[[str], None] | None = None) -> RunResult:
    """Generate text for `prompt`; `on_text` receives the new text of each committed canvas;
    `view` (engine.live.CanvasView) gets the tokenizer and every step; `on_prompt` the prompt as
    prefilled (its text with every control token shown, and its ids) before generation starts;
    `on_notice` one-line notices (a --backend that is not available and what runs instead)."""
    opts.check()
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    lm = load(path, device)
    spec, tok = lm.model.spec, lm.tokenizer
    assert tok is not None
    if opts.think and is_builtin(lm.file):
        raise EngineError("the built-in model was not trained with a thinking channel; --think needs a model "
                          "that was (pass a DiffusionGemma GGUF)")
    if opts.n_cpu_moe > spec.block_count:
        raise EngineError(f"--n-cpu-moe {opts.n_cpu_moe}: {lm.path.name} has {spec.block_count} layers")
    if view is not None:
        view.tok = tok
        on_step = view.step
    ids = prompt_ids(tok, prompt, opts.raw, opts.think)
    s = spec.sampler
    max_new = opts.max_new_tokens if opts.max_new_tokens is not None else s.max_new_tokens
    n_canvas_tokens = -(-max_new // spec.canvas_length) * spec.canvas_length
    if len(ids) + n_canvas_tokens > spec.context_length:
        raise EngineError(f"the prompt ({len(ids)} tokens) plus {n_canvas_tokens} canvas tokens for "
                          f"--max-new-tokens {max_new} exceed the context length {spec.context_length}; "
                          "shorten the prompt or lower --max-new-tokens")
    ctx = len(ids) + max_new if opts.ctx is None else opts.ctx
    if ctx < len(ids) + max_new:
        raise EngineError(f"--ctx {ctx} is less than the prompt ({len(ids)} tokens) plus --max-new-tokens {max_new}")
    if ctx > spec.context_length:
        raise EngineError(f"--ctx {ctx} exceeds the context length {spec.context_length}")
    check_sampler(sampler_kwargs(spec, opts), opts)
    if on_prompt is not None:
        on_prompt(tok.decode(ids, stop_at_eos=False, keep_control=True), ids)
    use_backend(lm.model, opts.backend, device, on_notice)
    plan = _place(lm, device, ctx, opts)
    try:
        return _generate(lm, ids, max_new, opts, device, plan, on_text, on_step)
    finally:
        detach(lm.model)


def use_backend(model: DiffusionGemmaModel, requested: str, device: torch.device,
                on_notice: Callable[[str], None] | None = None) -> backends.BackendChoice:
    """Give `model` the operations of `requested` (engine/backend.py); a triton request that cannot
    be met runs on torch, and `on_notice` is told so in one line."""
    try:
        choice = backends.resolve(requested, device)
    except ValueError as e:
        raise EngineError(str(e)) from None
    if choice.fell_back and on_notice is not None:
        on_notice(choice.reason)
    backends.apply(model, choice)
    return choice


def _place(lm: LoadedModel, device: torch.device, ctx: int, opts: RunOptions) -> Plan:
    """Memory check, then the placement plan, attached: nothing large is allocated before both pass."""
    m = lm.model
    try:
        need = plan_cli.runtime_need(m.spec, ctx, m.spec.canvas_length, m.dtype)
        plan_cli.check_memory(need, *plan_cli.device_available(device, opts.vram), ctx,
                              "lower --max-new-tokens or --ctx")
        plan = plan_cli.plan_for_run(lm.file, m.spec, device, m.dtype, ctx=ctx, vram=opts.vram,
                                     cpu_moe=opts.cpu_moe, n_cpu_moe=opts.n_cpu_moe,
                                     override_tensor=opts.override_tensor,
                                     backend=m.ops.name).require()
        m.prefill_chunk = plan.prefill_chunk or m.prefill_chunk
        attach_plan(m, plan)
    except PlacementError as e:
        raise EngineError(str(e)) from None
    return plan


# engine/cpu_steps.py's step for `run` on the CPU (False: the reference step, for comparison)
CPU_FUSED_STEP = True


def _generate(lm: LoadedModel, ids: list[int], max_new: int, opts: RunOptions, device: torch.device, plan: Plan,
              on_text: Callable[[str], None] | None, on_step: Callable[[StepInfo], None] | None) -> RunResult:
    spec, tok = lm.model.spec, lm.tokenizer
    assert tok is not None
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    runner = _TimedRunner(lm.model)
    emitted: list[int] = []
    text_so_far = ""

    def canvas_done(_: int, tokens: torch.Tensor) -> None:
        nonlocal text_so_far
        emitted.extend(int(t) for t in tokens.tolist())
        text = tok.decode(emitted)
        if on_text is not None and text.startswith(text_so_far):
            on_text(text[len(text_so_far):])
        text_so_far = text

    t0 = time.perf_counter()
    if lm.model.ops.name == "triton":
        # the fast path: the sampler's work stays on the device (engine/device_sampler.py), with
        # entropy and argmax from the vocabulary kernel; on_step hears of a canvas's steps at its end
        from .device_sampler import device_generate
        from .triton_ops import FusedStepper

        result: GenerationResult = device_generate(
            runner, torch.tensor(ids, dtype=torch.long), max_new_tokens=max_new, generator=generator,
            on_step=on_step, on_canvas=canvas_done, stepper=FusedStepper(lm.model, runner.cache),
            **sampler_kwargs(spec, opts))
    else:
        # on the CPU the sampler's statistics come from the vocabulary pass and only accepted rows are
        # drawn (engine/cpu_steps.py: the same tokens as the reference step, without its [C, V] sweeps)
        step = None
        if device.type == "cpu" and CPU_FUSED_STEP:
            from .cpu_steps import CpuFusedStep, cpu_vocab_table

            step = CpuFusedStep(lm.model, runner.cache)
            # and a compute copy of the embedding table if RAM allows: fp32 (same logits) for a table that
            # is slow to dequantize; DIFFGEMMA_CPU_BF16=1 asks for a bf16 copy (rounded vocabulary products,
            # about twice as fast where bf16 matmul is native)
            lm.model.vocab_table = cpu_vocab_table(lm.model, plan_cli.host_available(),
                                                   bf16=os.environ.get("DIFFGEMMA_CPU_BF16") == "1")
        result = generate(
            runner, torch.tensor(ids, dtype=torch.long), max_new_tokens=max_new, generator=generator,
            on_step=on_step, on_canvas=canvas_done, sampler_step=step, **sampler_kwargs(spec, opts))
    total = time.perf_counter() - t0
    tokens = [int(t) for t in result.tokens.tolist()]
    decode_s = max(total - runner.prefill_s, 1e-9)
    eos = set(tok.eos_ids)
    return RunResult(
        text=tok.decode(tokens), token_ids=tokens, prompt_tokens=len(ids), steps_per_canvas=result.steps_per_canvas,
        finished=result.finished, prefill_tokens_per_s=len(ids) / max(runner.prefill_s, 1e-9),
        generated_tokens_per_s=len(tokens) / decode_s, peak_memory_bytes=_peak_memory(device),
        device=str(device), model=str(lm.path), timings={"prefill_s": runner.prefill_s, "total_s": total},
        placement=_placement_json(lm.model, plan, device), backend=backends.describe(lm.model),
        answer_tokens=next((n for n, t in enumerate(tokens) if t in eos), len(tokens)))


def _placement_json(model: DiffusionGemmaModel, plan: Plan, device: torch.device) -> dict[str, Any]:
    """What the run followed; VRAM figures only when the compute device has VRAM."""
    ex = model.expert_executor
    out: dict[str, Any] = {"ctx": plan.ctx}
    if device.type == "cuda":
        out.update(vram_budget_bytes=plan.vram_budget_bytes, planned_gpu_bytes=plan.gpu_bytes)
    return out | {"offloaded": list(plan.offloaded), "layer_modes": {str(i): m for i, m in plan.layer_modes().items()},
                  "executor": dict(ex.stats) if ex is not None else {}}


class _TimedRunner(ModelRunner):
    """Times the first encode (the prompt prefill) separately from denoising."""

    def __init__(self, model: DiffusionGemmaModel):
        super().__init__(model)
        self.prefill_s = 0.0
        self._first = True

    def encode(self, tokens: torch.Tensor) -> None:
        t = time.perf_counter()
        super().encode(tokens)
        if self._first:
            self.prefill_s = time.perf_counter() - t
            self._first = False


def compute_logits(path: Path, tokens: list[int], canvas: list[int] | None = None,
                   self_cond: np.ndarray | None = None, device: str = "auto", backend: str = "auto",
                   on_notice: Callable[[str], None] | None = None) -> np.ndarray:
    """Encoder logits [P, V] for `tokens`, or, with `canvas`, the decoder's logits [C, V] for the
    canvas after `tokens` were prefilled as context (optionally with self-conditioning [C, V])."""
    dev = resolve_device(device)
    if not tokens:
        raise EngineError("--tokens is empty")
    if self_cond is not None and canvas is None:
        raise EngineError("--self-cond needs --canvas")
    if canvas is not None and not canvas:
        raise EngineError("--canvas is empty")
    lm = load(path, dev, need_tokenizer=False)
    m, spec = lm.model, lm.model.spec
    vocab = m.vocab_size
    for what, ids in (("--tokens", tokens), ("--canvas", canvas or [])):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"{what}: token id {bad[0]} is out of range [0, {vocab})")
    if len(tokens) + len(canvas or []) > spec.context_length:
        raise EngineError(f"{len(tokens) + len(canvas or [])} positions exceed the context length "
                          f"{spec.context_length}")
    if self_cond is not None:
        assert canvas is not None
        if self_cond.shape != (len(canvas), vocab):
            raise EngineError(f"--self-cond has shape {list(self_cond.shape)}, expected [{len(canvas)}, {vocab}]")
        if not np.isfinite(self_cond).all():
            raise EngineError("--self-cond contains NaN or Inf")
    ctx = len(tokens) + len(canvas or [])
    try:
        need = plan_cli.runtime_need(spec, ctx, len(canvas) if canvas is not None else len(tokens), m.dtype,
                                     self_cond=self_cond is not None)
        plan_cli.check_memory(need, *plan_cli.device_available(dev), ctx, "pass fewer --tokens")
    except PlacementError as e:
        raise EngineError(str(e)) from None
    use_backend(m, backend, dev, on_notice)
    cache = m.new_cache()
    ctx = torch.tensor(tokens, dtype=torch.long)
    if canvas is None:
        return m.encode(ctx, cache, return_logits=True).cpu().numpy()
    m.encode(ctx, cache)
    sc = None if self_cond is None else torch.from_numpy(np.ascontiguousarray(self_cond, dtype=np.float32))
    return m.decode(torch.tensor(canvas, dtype=torch.long), cache, sc).cpu().numpy()
