"""The sampler's per-row statistics of the scaled logits z = logits / T, gathered inside the torch
vocabulary pass (DiffusionGemmaModel.torch_vocab_pass) while each chunk of z is still in cache, so the
sampler needs no further sweep over the [C, V] canvas logits for them.

Per row: the max of z and the first index holding it (torch.argmax), l = sum exp(z - max) and
s = sum exp(z - max) * (z - max), both carried online across vocabulary chunks like the soft
embedding's softmax. Entropy = log l - s / l: two small terms for a confident row, where
logsumexp - sum p*z would subtract two numbers near max z and lose the 1e-3-sized entropies the
stopping rule compares (the same formula as engine/kernels/vocab.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OnlineRowStats", "RowStats"]


@dataclass
class RowStats:
    """Statistics of each row of z = logits / T ([C] each, fp32 / int64)."""

    max: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor  # nats, of softmax(z); equals engine.sampler.entropy up to rounding
    argmax: torch.Tensor  # first index of the max, as torch.argmax


class OnlineRowStats:
    """Accumulates RowStats over the vocabulary chunks of one pass. The caller runs the online
    softmax itself (its running max and sum feed the soft embedding) and hands each chunk's pieces
    over, so exp(z - max) is computed once for both."""

    def __init__(self, rows: int, device: torch.device):
        self.s = torch.zeros(rows, 1, device=device)
        self.best = torch.full((rows, 1), -torch.inf, device=device)
        self.index = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.first = True

    def update(self, z: torch.Tensor, offset: int, z_max: torch.Tensor, old_max: torch.Tensor,
               new_max: torch.Tensor, old_sum: torch.Tensor, d: torch.Tensor, p: torch.Tensor) -> None:
        """z: this chunk of the scaled logits, columns offset.. of the row; z_max its row max;
        old/new_max the running max before/after it; old_sum the running sum exp(z - old_max)
        before it; d = z - new_max and p = exp(d) for the chunk."""
        pd = (p * d).sum(-1, keepdim=True)
        if self.first:  # old_max is -inf: nothing to rescale (and -inf * 0 would be NaN)
            self.s = pd
            self.first = False
        else:
            shift = old_max - new_max  # <= 0
            self.s = torch.exp(shift) * (self.s + shift * old_sum) + pd
        better = z_max > self.best  # strict: an equal max in a later chunk keeps the first index
        self.index = torch.where(better, z.argmax(-1, keepdim=True) + offset, self.index)
        self.best = torch.where(better, z_max, self.best)

    def result(self, run_max: torch.Tensor, run_sum: torch.Tensor) -> RowStats:
        log_l = torch.log(run_sum)
        entropy = (log_l - self.s / run_sum).clamp_min_(0.0)
        return RowStats(run_max.reshape(-1), (run_max + log_l).reshape(-1), entropy.reshape(-1),
                        self.index.reshape(-1))
