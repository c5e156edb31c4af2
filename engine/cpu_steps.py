"""The denoising step on the CPU without the reference sampler's sweeps over the [C, V] logits.

The reference step (engine.generate.ReferenceStep) makes several passes over the 256 x 262,144
canvas logits after the model: the temperature division, softmax + torch.multinomial, argmax, the
chunked entropy. On a CPU the draw dominates: multinomial's single-sample path fills a [C, V]
Exp(1) tensor one element at a time through the generator's lock (a 64-bit Mersenne Twister draw
and a scalar log1p per element, about 1.5 s per step on 2 cores), then divides and takes the argmax.

`CpuFusedStep` does the same step with:

* entropy, argmax (and max, logsumexp) of z = logits / T from the model's own vocabulary pass
  (DiffusionGemmaModel.torch_vocab_pass leaves them in `last_row_stats`), so acceptance is known
  before anything is drawn;
* `race_draw`: multinomial's algorithm (argmax of p / q, q ~ Exp(1)) written out row by row, with
  the same q: the generator's 64-bit words come from one `random_` call per block of rows and are
  turned into q = -log1p(-u) vectorised, exactly as torch does per element. Only accepted rows need a
  token (the others are renoised), so the other rows only advance the generator past their words;
* the soft embedding of the same pass as the next step's self-conditioning (no [C, V] carry).

For the same generator state it draws the same tokens as the reference step; the entropies differ
from engine.sampler.entropy by rounding only (tests/engine/test_cpu_steps.py runs both loops).

`VocabTable` is an optional compute copy of the embedding table, dequantized once, that the
vocabulary pass then reads instead of dequantizing every chunk on every step.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from engine import sampler as S
from engine.generate import StepOutcome

__all__ = ["CpuFusedStep", "VocabTable", "bf16_matmul_is_native", "cpu_vocab_table", "exponential_words",
           "race_draw"]

_MASK53 = (1 << 53) - 1
# Rows whose words one random_ call fills: 2 MiB of int64 per row of a 262,144 vocabulary
_ROWS_PER_DRAW = 2


def exponential_words(words: torch.Tensor) -> torch.Tensor:
    """float32 Exp(1) variates from int64 words of the CPU generator, as `Tensor.exponential_`
    makes them: uniform_real_distribution<double> keeps the low 53 bits of each 64-bit draw
    (u = bits * 2^-53), then -log1p(-u) in double, cast to float32."""
    u = (words & _MASK53).to(torch.float64).mul_(2.0 ** -53)
    return torch.log1p(u.neg_()).neg_().to(torch.float32)


def race_draw(z_rows: Any, rows: int, vocab: int, accepted: torch.Tensor,
              generator: torch.Generator | None) -> torch.LongTensor:
    """`engine.sampler.sample` for the accepted rows, leaving the generator where it leaves it.

    torch.multinomial(softmax(z), 1) on a [C, V] block fills q ~ Exp(1) of shape [C, V] in row-major
    order from the generator, one 64-bit word per element, and returns argmax(p / q) per row. Here
    the rows are walked in that order: an accepted row gets its words, its q and its race (z_rows(r0, r1)
    gives the scaled logits of rows r0..r1-1); any other row only moves the generator past its
    words. Returns [rows] token ids, 0 at rows that were not accepted."""
    gen = generator if generator is not None else torch.default_generator
    out = torch.zeros(rows, dtype=torch.long)
    flags = accepted.tolist()
    scratch = torch.empty(min(_ROWS_PER_DRAW, rows), vocab, dtype=torch.long)
    r = 0
    while r < rows:
        end = r + 1
        while end < rows and end - r < _ROWS_PER_DRAW and flags[end] == flags[r]:
            end += 1
        words = scratch[:end - r].random_(generator=gen)
        if flags[r]:
            p = torch.softmax(z_rows(r, end), dim=-1, dtype=torch.float32)
            out[r:end] = p.div_(exponential_words(words)).argmax(dim=-1)
        r = end
    return out


class VocabTable:
    """The embedding table dequantized once (DiffusionGemmaModel.vocab_table), so the vocabulary pass
    stops dequantizing every chunk on every step (a Q6_K table: ~4 s of CPU per step).

    In the model's compute dtype it holds exactly the values `WeightStore.row_range` gives, and the
    pass computes the same logits from it. In bfloat16 (half the memory of fp32) both vocabulary
    products take bf16 operands with fp32 accumulation, which a CPU with AVX512-BF16 or AMX runs
    about 2.4 times as fast as fp32: the logits then carry bf16 rounding (~0.4 % of a logit,
    tests/engine/test_cpu_steps.py bounds it), finer than the 8-bit activations llama.cpp's CPU
    products use on a quantized table."""

    def __init__(self, model: Any, dtype: torch.dtype | None = None):
        w, name = model.weights, model.token_embd
        self.device, self.dtype = model.device, dtype or model.dtype
        v, chunk = model.vocab, model.vocab_chunk
        self.data = torch.empty(v, model.spec.embedding_length, dtype=self.dtype, device=self.device)
        for s in range(0, v, chunk):  # chunk by chunk: never a second full-size temporary
            e = min(s + chunk, v)
            self.data[s:e] = w.row_range(name, s, e, self.device, model.dtype)

    @staticmethod
    def nbytes(model: Any, dtype: torch.dtype | None = None) -> int:
        size = torch.empty((), dtype=dtype or model.dtype).element_size()
        return model.vocab * model.spec.embedding_length * size

    def holds(self, start: int, stop: int, device: torch.device) -> bool:
        return device == self.device and stop <= self.data.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop]


# table types cheap enough to dequantize on every step that a full fp32 copy would not pay for itself
_CHEAP_TABLES = frozenset({"F32", "F16", "BF16", "Q8_0"})


def bf16_matmul_is_native() -> bool:
    """torch multiplies bf16 with native instructions here (AVX512-BF16 or AMX); on an AVX2-only CPU
    its bf16 matmul is a slow fallback (over 100x fp32 for the self-conditioning shape)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_vocab_table(model: Any, available: int | None, bf16: bool = False) -> VocabTable | None:
    """The compute copy `run` hands the vocabulary pass on the CPU, or None. Exact by default: an fp32
    copy, only of a table that is slow to dequantize (K-quants and the like). With `bf16` (rounded
    products, faster) a bf16 copy where bf16 matmul is native. Either only when it takes at most half
    of the `available` host RAM left after the model file itself, which every step reads through the
    page cache and which must stay there."""
    if model.device.type != "cpu" or model.dtype != torch.float32 or available is None:
        return None
    if bf16 and bf16_matmul_is_native():
        dtype = torch.bfloat16
    elif model.weights.info(model.token_embd).qtype.name not in _CHEAP_TABLES:
        dtype = torch.float32
    else:
        return None
    path = getattr(model.weights, "path", None)
    resident = os.path.getsize(path) if path is not None and os.path.exists(path) else 0
    if VocabTable.nbytes(model, dtype) > (available - resident) // 2:
        return None
    return VocabTable(model, dtype)


class CpuFusedStep:
    """engine.generate.SamplerStep for an engine model on the torch backend: one decode_step (the
    decoder and the vocabulary pass with its row statistics and soft embedding), acceptance from
    those entropies, the draw for accepted rows only, renoise. Carries the soft embedding."""

    def __init__(self, model: Any, cache: Any):
        if model.ops.name != "torch":
            raise ValueError(f"CpuFusedStep needs the torch vocabulary pass, not {model.ops.name!r}")
        self.model, self.cache = model, cache

    def __call__(self, canvas: torch.LongTensor, self_cond: Any, temp: float,
                 generator: torch.Generator | None, entropy_bound: float) -> StepOutcome:
        m = self.model
        m.last_row_stats = None
        logits, soft = m.decode_step(canvas, self.cache, self_cond, temp)
        stats = m.last_row_stats
        if stats is None:
            raise RuntimeError("the vocabulary pass left no row statistics (not the torch pass?)")
        accepted = S.entropy_bound_mask(stats.entropy, entropy_bound)
        t = torch.tensor(temp, dtype=torch.float32)
        sampled = race_draw(lambda r0, r1: logits[r0:r1] / t, logits.shape[0], logits.shape[1], accepted,
                            generator)
        canvas = S.renoise(canvas, accepted, sampled, m.vocab_size, generator)
        return StepOutcome(canvas, stats.argmax, stats.entropy, accepted, soft)
