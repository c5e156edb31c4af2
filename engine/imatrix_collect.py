"""`diffgemma imatrix`: an importance matrix measured with this engine, in both of the model's modes.

llama.cpp's llama-imatrix runs causal passes only. DiffusionGemma spends nearly all of its inference in
decoder mode, on a bidirectional canvas of noised tokens with a self-conditioning input, so the inputs
its weights see there are collected too:

* causal (encoder) passes over each calibration sample, as llama-imatrix does;
* decoder passes over the sample's canvas (the last `canvas_length` tokens), noised with uniform random
  tokens at each level of NOISE_LEVELS (nested: a position noised at 0.5 is noised at 0.75 too, as the
  sampler uncovers a canvas), from the noisiest down, each pass fed the soft embedding of the one before
  at the temperature the sampler uses at that point of its schedule (the first pass has none).

What is collected is what llama.cpp's imatrix tool stores: per weight matrix the sum over input rows
of x_j^2 for every column j, and the number of rows; for the 3-D expert weights one sum and one count
per expert, over the rows routed to it. Dense products are observed through an `ObservingOps` (the
reference TorchOps, so the numerics are the engine's own); routed experts through WeightStore.observer,
which engine.model.expert_mlp calls in every placement (resident, offloaded to the CPU, streamed).
The result is written in llama.cpp's GGUF imatrix format (gguf_tools.imatrix.save_gguf_imatrix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .model import DiffusionGemmaModel, TorchOps
from .run import EngineError, LoadedModel
from .weights import WeightStore

MODES = ("causal", "diffusion", "both")
NOISE_LEVELS = (1.0, 0.75, 0.5, 0.25)
BUILTIN_SAMPLES = 128  # default-model calibration prompts (training distribution, never held out)
BUILTIN_SEED = 7


@dataclass(frozen=True)
class Sample:
    """One calibration sample: context tokens (encoded causally) and the canvas that follows them."""

    context: list[int]
    canvas: list[int]
    pad_id: int | None = None  # trailing pads of the canvas are not encoded causally

    def text_tokens(self) -> list[int]:
        """What a causal pass reads: the context and the canvas without its padding."""
        canvas = list(self.canvas)
        while canvas and self.pad_id is not None and canvas[-1] == self.pad_id:
            canvas.pop()
        return self.context + canvas


@dataclass
class ImatrixStats:
    """Sums of squared inputs (float64, [n_mat, ne0]) and row counts ([n_mat]) per weight."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    chunks: int = 0

    def entries(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Weights that saw at least one row, as save_gguf_imatrix takes them."""
        return {n: (self.sums[n].astype(np.float32), self.counts[n].astype(np.float32))
                for n in sorted(self.sums) if self.counts[n].sum() > 0}


class Collector:
    """Accumulates ImatrixStats; `active` switches collection on and off between passes. Entries are
    made up front, so expert worker threads only ever add into their own expert's row."""

    def __init__(self, model: DiffusionGemmaModel):
        self.stats = ImatrixStats()
        self.active = False
        for name, info in model.weights.tensors.items():
            if len(info.shape) < 2 or not name.endswith(".weight") or "_norm" in name or name == "token_embd.weight":
                continue
            n_mat = info.shape[0] if len(info.shape) == 3 else 1
            self.stats.sums[name] = np.zeros((n_mat, info.shape[-1]), dtype=np.float64)
            self.stats.counts[name] = np.zeros(n_mat, dtype=np.int64)

    def observe(self, name: str, x: torch.Tensor, expert: int = 0) -> None:
        if not self.active or x.shape[0] == 0:
            return
        sums = self.stats.sums.get(name)
        if sums is None:
            return
        sums[expert] += x.detach().double().pow(2).sum(0).cpu().numpy()
        self.stats.counts[name][expert] += x.shape[0]


class ObservingOps(TorchOps):
    """The reference operations, with every dense product's input shown to the collector first."""

    def __init__(self, model: DiffusionGemmaModel, collector: Collector):
        super().__init__(model)
        self.collector = collector

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self.collector.observe(name, x)
        return super().linear(name, x)


def _stores(model: DiffusionGemmaModel) -> list[WeightStore]:
    """Every store an expert product may be read through (a placement wraps the file's store)."""
    out: list[WeightStore] = []
    for s in (model.weights, getattr(model.weights, "base", None),
              getattr(model.expert_executor, "store", None)):
        if s is not None and all(s is not o for o in out):
            out.append(s)
    return out


def noise_levels_temperature(level: float, t_min: float, t_max: float) -> float:
    """The sampler's temperature when a `level` share of the canvas is still noise: its schedule runs
    from t_max (all noise, first step) down towards t_min."""
    return t_min + (t_max - t_min) * level


@torch.no_grad()
def collect(model: DiffusionGemmaModel, samples: Sequence[Sample], mode: str = "both", seed: int = 0,
            levels: Sequence[float] = NOISE_LEVELS, on_sample: Callable[[int, int], None] | None = None
            ) -> ImatrixStats:
    """Run the calibration samples through `model` and collect what `mode` asks for."""
    if mode not in MODES:
        raise EngineError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    collector = Collector(model)
    saved_ops, stores = model.ops, _stores(model)
    saved_observers = [s.observer for s in stores]
    model.ops = ObservingOps(model, collector)
    for s in stores:
        s.observer = collector.observe
    causal, diffusion = mode in ("causal", "both"), mode in ("diffusion", "both")
    g = torch.Generator().manual_seed(seed)
    t_min, t_max = model.spec.sampler.t_min, model.spec.sampler.t_max
    dev = model.device
    try:
        for i, sample in enumerate(samples):
            cache = model.new_cache()
            if diffusion:
                collector.active = causal
                model.encode(torch.tensor(sample.context, dtype=torch.long), cache)
                collector.active = True
                clean = torch.tensor(sample.canvas, dtype=torch.long)
                u = torch.rand(clean.shape[0], generator=g)
                noise = torch.randint(0, model.vocab_size, clean.shape, generator=g)
                soft = None
                for level in sorted(levels, reverse=True):
                    canvas = torch.where(u < level, noise, clean).to(dev)
                    _, soft = model.decode_step(canvas, cache, soft, noise_levels_temperature(level, t_min, t_max))
                if causal:  # the rest of the text, causally, after the context
                    tail = sample.text_tokens()[len(sample.context):]
                    if tail:
                        model.encode(torch.tensor(tail, dtype=torch.long), cache)
            else:
                collector.active = True
                model.encode(torch.tensor(sample.text_tokens(), dtype=torch.long), cache)
            collector.stats.chunks += 1
            if on_sample is not None:
                on_sample(i + 1, len(samples))
    finally:
        collector.active = False
        model.ops = saved_ops
        for s, o in zip(stores, saved_observers):
            s.observer = o
    return collector.stats


@dataclass
class ImatrixOptions:
    """What `diffgemma imatrix` was asked for; check() refuses bad values before anything is loaded."""

    data: Path | None = None
    chunks: int | None = None
    ctx: int = 512
    mode: str = "both"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    vram: str | None = None
    cpu_moe: bool = False
    n_cpu_moe: int = 0

    def check(self, model: Path | None, out: Path) -> None:
        if self.mode not in MODES:
            raise EngineError(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        for flag, v in (("--chunks", self.chunks), ("--ctx", self.ctx), ("--threads", self.threads)):
            if v is not None and v < 1:
                raise EngineError(f"{flag} {v}: must be at least 1")
        if self.seed < 0:
            raise EngineError(f"--seed {self.seed}: must be at least 0")
        if self.data is not None and not self.data.is_file():
            raise EngineError(f"--data {self.data}: no such file")
        for what, p in (("the model", model), ("the calibration text", self.data)):
            if p is not None and Path(p).exists() and Path(out).resolve() == Path(p).resolve():
                raise EngineError(f"output {out} is {what}; choose another path (nothing was written)")
        folder = Path(out).parent
        if not folder.is_dir():
            raise EngineError(f"output folder {folder} does not exist")
        if Path(out).is_dir():
            raise EngineError(f"output path {out} is a directory")


def make_imatrix(model: Path | None, out: Path, opts: ImatrixOptions,
                 on_sample: Callable[[int, int], None] | None = None) -> tuple[Path, ImatrixStats, int]:
    """Load the file (None: the built-in model), cut the calibration samples, place the model as `run`
    does (so --vram / --cpu-moe offload experts), collect, write. Returns (path, stats, samples)."""
    from .default_model import NAME as BUILTIN
    from .run import RunOptions, _place, load, resolve_device

    opts.check(model, out)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    dev = resolve_device(opts.device)
    lm = load(model, dev)
    if opts.data is not None:
        try:
            text = opts.data.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"--data {opts.data}: cannot read it as UTF-8 text ({e})") from None
        items, dataset, chunk_size = text_samples(lm, text, opts.ctx, opts.chunks), opts.data.name, opts.ctx
    elif str(lm.file.kv.get("general.name", "")).startswith(BUILTIN):
        items = builtin_samples(lm, opts.chunks or BUILTIN_SAMPLES)
        dataset = f"builtin:{BUILTIN} ({len(items)} training-distribution sorting prompts)"
        chunk_size = max(len(s.context) + len(s.canvas) for s in items)
    else:
        raise EngineError(f"{lm.path.name}: --data TEXT_FILE is needed (the built-in calibration set is for "
                          f"the built-in {BUILTIN} model)")
    ctx = max(len(s.context) + len(s.canvas) for s in items)
    _place(lm, dev, ctx, RunOptions(device=opts.device, vram=opts.vram, cpu_moe=opts.cpu_moe,
                                    n_cpu_moe=opts.n_cpu_moe).check())
    stats = collect(lm.model, items, opts.mode, opts.seed, on_sample=on_sample)
    return write(stats, out, dataset, chunk_size), stats, len(items)


# ---- calibration data ----------------------------------------------------------------------------

def builtin_samples(lm: LoadedModel, n: int = BUILTIN_SAMPLES, seed: int = BUILTIN_SEED) -> list[Sample]:
    """The default model's calibration set: sorting prompts from the training distribution (never a
    held-out list), each as the chat prompt and its answer canvas (answer, end of turn, padding)."""
    from .evaluate import EOT, PAD
    from .sort_task import MAX_LEN, MIN_LEN, training_examples

    tok = lm.tokenizer
    assert tok is not None
    c = lm.model.canvas_length
    rng = np.random.default_rng(seed)
    streams = {k: training_examples(rng, k) for k in range(MIN_LEN, MAX_LEN + 1)}
    out = []
    for i in range(n):
        ex = next(streams[MIN_LEN + i % (MAX_LEN - MIN_LEN + 1)])
        clean = (tok.encode(ex.answer) + [EOT])[:c]  # as train/train_tiny.py builds its canvases
        out.append(Sample(tok.apply_chat([{"role": "user", "content": ex.prompt}]), clean + [PAD] * (c - len(clean)),
                          pad_id=PAD))
    return out


def text_samples(lm: LoadedModel, text: str, ctx: int, chunks: int | None = None) -> list[Sample]:
    """llama-imatrix's chunking: the tokenized text cut into `ctx`-token chunks (BOS first when the
    tokenizer adds one); the last canvas_length tokens of each chunk are its canvas."""
    tok = lm.tokenizer
    assert tok is not None
    c = lm.model.canvas_length
    if ctx <= c:
        raise EngineError(f"--ctx {ctx}: must be larger than the canvas ({c} tokens)")
    ids = tok.encode(text)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    step = ctx - len(bos)
    out = []
    for start in range(0, len(ids) - step + 1, step):
        chunk = bos + ids[start:start + step]
        out.append(Sample(chunk[:-c], chunk[-c:]))
        if chunks is not None and len(out) >= chunks:
            break
    if not out:
        raise EngineError(f"the calibration text has {len(ids)} tokens, fewer than one --ctx {ctx} chunk")
    return out


def write(stats: ImatrixStats, out: Path, dataset: str, chunk_size: int) -> Path:
    """The GGUF imatrix, written to a temporary file and renamed on success."""
    from gguf_tools.atomic import atomic_path
    from gguf_tools.imatrix import save_gguf_imatrix

    entries = stats.entries()
    if not entries:
        raise EngineError("no weight saw any input: nothing to write")
    with atomic_path(out) as tmp:
        save_gguf_imatrix(tmp, entries, datasets=[dataset], chunk_count=stats.chunks, chunk_size=chunk_size)
    return out


__all__ = ["MODES", "NOISE_LEVELS", "Collector", "ImatrixOptions", "ImatrixStats", "ObservingOps", "Sample",
           "builtin_samples", "collect", "make_imatrix", "text_samples", "write"]
