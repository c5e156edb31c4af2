"""Model-free pieces of the DiffusionGemma denoising sampler.

Every function here works on one canvas (no batch dimension): logits are ``[C, V]`` and canvases
``[C]``.  The reference semantics are transformers' ``generation_diffusion_gemma.py``; the places
where floating-point detail or RNG consumption matters for bit-parity with it are called out in
comments, because a "nearly equal" re-implementation would make acceptance decisions (and so every
later random draw) diverge.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "StoppingState",
    "commit",
    "entropy",
    "entropy_bound_accept",
    "entropy_bound_mask",
    "random_canvas",
    "renoise",
    "sample",
    "scale_logits",
    "temperature",
    "temperature_schedule",
]

# Rows per chunk in `entropy`.  Must stay >= 2: torch reduces a single row of a large vocab with a
# two-pass (split) sum whose rounding differs from the per-row sum used for multi-row inputs, so a
# 1-row chunk would not be bit-identical to the reference computed over the whole canvas.
_ENTROPY_CHUNK_ROWS = 8


def temperature(step_remaining: int, n_steps: int, t_min: float, t_max: float) -> float:
    """Temperature of the denoising step that has ``step_remaining`` steps left (N for the first
    step, 1 for the last), i.e. ``t_min + (t_max - t_min) * step_remaining / n_steps``.

    The schedule never reaches ``t_min`` itself: the last step uses ``t_min + (t_max - t_min)/N``.
    The value is rounded through float32 exactly the way the reference computes it (an int32 step
    tensor divided by N, then scalar float ops), so dividing fp32 logits by it is bit-identical.
    """
    if n_steps <= 0:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    if not 1 <= step_remaining <= n_steps:
        raise ValueError(f"step_remaining must be in [1, {n_steps}], got {step_remaining}")
    frac = torch.tensor(step_remaining, dtype=torch.int32) / n_steps
    return float(t_min + (t_max - t_min) * frac)


def temperature_schedule(n_steps: int, t_min: float, t_max: float) -> list[float]:
    """Temperatures in execution order (first denoising step first)."""
    return [temperature(s, n_steps, t_min, t_max) for s in range(n_steps, 0, -1)]


def scale_logits(logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Temperature-scaled logits ``z``; everything downstream (sampling, argmax, entropy,
    self-conditioning) uses ``z``, never the raw logits."""
    # Divide by a float32 0-dim tensor, as the reference does, rather than a Python float so the
    # kernel sees the same operand type.
    return logits / torch.tensor(temp, dtype=torch.float32, device=logits.device)


def entropy(logits: torch.Tensor, chunk_rows: int = _ENTROPY_CHUNK_ROWS) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last dim, in the logits' dtype.

    Arithmetic mirrors ``torch.distributions.Categorical(logits=...).entropy()`` step for step
    (normalise by logsumexp, softmax of the normalised logits, clamp -inf to the dtype's lowest
    finite value so 0 * -inf contributes 0, sum of p*log p), but works a few rows at a time in
    place, so a 256 x 262,144 canvas needs two chunk-sized temporaries instead of ~5 full copies.
    """
    if chunk_rows < 2:
        raise ValueError("chunk_rows must be >= 2 (see _ENTROPY_CHUNK_ROWS)")
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    out = torch.empty(rows.shape[0], dtype=logits.dtype, device=logits.device)
    lowest = torch.finfo(logits.dtype).min
    for lo, hi in _row_chunks(rows.shape[0], chunk_rows):
        block = rows[lo:hi]
        log_p = block - block.logsumexp(dim=-1, keepdim=True)
        p = torch.softmax(log_p, dim=-1)
        log_p.clamp_(min=lowest)
        out[lo:hi] = -p.mul_(log_p).sum(dim=-1)
    return out.reshape(logits.shape[:-1])


def _row_chunks(n_rows: int, size: int) -> Iterable[tuple[int, int]]:
    starts = list(range(0, n_rows, size))
    # Fold a trailing single row into the previous chunk (see _ENTROPY_CHUNK_ROWS).
    if len(starts) > 1 and n_rows - starts[-1] == 1:
        starts.pop()
    bounds = starts + [n_rows]
    return itertools.pairwise(bounds)


def entropy_bound_mask(token_entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Acceptance mask from per-position entropies (see `entropy_bound_accept`)."""
    # Same sort call as the reference (default, i.e. not guaranteed stable): when equal entropies
    # straddle the bound, which of them gets in is decided by torch's sort order, and matching the
    # call keeps that order identical on the same device.
    sorted_h, order = torch.sort(token_entropy, dim=-1, descending=False)
    # Ascending order makes the current entry the running maximum, so "sum so far minus max" is
    # the mutual-information upper bound of the accepted set.  The first entry gives exactly 0,
    # so the lowest-entropy position is always accepted.
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def entropy_bound_accept(scaled_logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Boolean mask of the positions accepted this step: the lowest-entropy prefix (entropy of the
    temperature-scaled distribution) whose cumulative entropy minus its largest member is
    ``<= bound``."""
    return entropy_bound_mask(entropy(scaled_logits), bound)


def sample(scaled_logits: torch.Tensor, generator: torch.Generator | None) -> torch.LongTensor:
    """One categorical draw per position from ``softmax(scaled_logits)``.

    Uses fp32 softmax + ``torch.multinomial`` over the whole ``[C, V]`` block in one call, like the
    reference.  multinomial's single-sample path fills a ``[C, V]`` exponential tensor from the
    generator, so chunking it would change which random numbers land where and break seed parity.
    """
    probs = torch.softmax(scaled_logits, dim=-1, dtype=torch.float32)
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, num_samples=1, generator=generator)
    return drawn.reshape(scaled_logits.shape[:-1])


def random_canvas(
    length: int, vocab_size: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.LongTensor:
    """Uniform-random token ids in ``[0, vocab_size)``; the initial canvas and the renoise source."""
    return torch.randint(0, vocab_size, (length,), generator=generator, device=device)


def renoise(
    canvas: torch.LongTensor,
    accepted: torch.Tensor,
    sampled: torch.LongTensor,
    vocab_size: int,
    generator: torch.Generator | None,
) -> torch.LongTensor:
    """Next canvas: accepted positions take the freshly sampled token, all others a fresh uniform
    token.

    ``canvas`` only supplies shape/device: in the reference the current token at a rejected
    position is always overwritten by noise, so its value never survives.  A full canvas of noise
    is drawn even when everything is accepted, to consume the RNG exactly like the reference.
    """
    noise = random_canvas(canvas.shape[-1], vocab_size, generator, device=canvas.device)
    return torch.where(accepted, sampled, noise)


class StoppingState:
    """Adaptive stopping for one canvas.

    ``update`` is called once per denoising step with that step's argmax canvas and entropies and
    returns True when the denoising loop should end:

    * stable: the argmax canvas equals each of the previous ``stability_threshold`` argmax
      canvases.  Missing history counts as all -1 (never a token), so with threshold k the earliest
      possible stable step is k+1.  Threshold 0 means always stable.
    * confident: mean entropy of the temperature-scaled distribution < ``confidence_threshold``.
    * or the step budget ``max_steps`` (if given) is used up.
    """

    def __init__(self, stability_threshold: int, confidence_threshold: float, max_steps: int | None = None):
        if stability_threshold < 0:
            raise ValueError("stability_threshold must be >= 0")
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.max_steps = max_steps
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.stable = False
        self.confident = False
        self.mean_entropy = float("nan")
        self._history: deque[torch.Tensor] | None = None

    @property
    def converged(self) -> bool:
        """Stable and confident (as opposed to merely out of steps)."""
        return self.stable and self.confident

    def update(self, argmax_canvas: torch.LongTensor, token_entropy: torch.Tensor) -> bool:
        self.steps += 1
        if self.stability_threshold == 0:
            self.stable = True
        else:
            if self._history is None:
                never = torch.full_like(argmax_canvas, -1)
                self._history = deque([never] * self.stability_threshold, maxlen=self.stability_threshold)
            self.stable = all(bool(torch.equal(prev, argmax_canvas)) for prev in self._history)
            self._history.append(argmax_canvas.clone())
        mean = token_entropy.mean(dim=-1)
        self.mean_entropy = float(mean)
        # Compare as tensors so the threshold is applied in the entropy's dtype, as the reference
        # does, rather than after widening the mean to a Python double.
        self.confident = bool(mean < self.confidence_threshold)
        out_of_steps = self.max_steps is not None and self.steps >= self.max_steps
        return self.converged or out_of_steps


def commit(
    argmax_canvas: torch.LongTensor, eos_ids: Sequence[int], pad_id: int | None
) -> tuple[torch.LongTensor, bool]:
    """Finalise a denoised canvas.

    Returns ``(tokens, finished)``: ``finished`` is True when any EOS id appears anywhere in the
    canvas; then every token after the first EOS becomes ``pad_id`` (the EOS itself is kept).
    With ``pad_id=None`` the tokens are left as they are, as in the reference.
    """
    tokens = argmax_canvas.clone()
    if not eos_ids:
        return tokens, False
    eos = torch.as_tensor(list(eos_ids), dtype=tokens.dtype, device=tokens.device)
    is_eos = torch.isin(tokens, eos)
    finished = bool(is_eos.any())
    if finished and pad_id is not None:
        first = int(torch.nonzero(is_eos)[0, 0])
        tokens[first + 1 :] = pad_id
    return tokens, finished
