"""The fast path's operations: Triton kernels over the packed GGUF blocks (engine/kernels/).

Same three entry points as the reference engine.model.TorchOps, with the same meaning, so the
model code does not know which one runs:

* linear(name, x): dequant-GEMM reading the stored rows in place (no dequantized copy in memory);
* experts(layer, ...): the grouped MoE: routing built on the device, one launch per projection;
* vocab_pass(x, T): tied head with the softcap fused and the self-conditioning product by online
  softmax, the [C, V] logits written once; the per-row statistics of that pass are kept in
  `last_stats` for a sampler that runs on the device.

A tensor whose type has no kernel, or that sits on another device than its input, runs on the
torch path for that tensor; its name is recorded in `fallbacks` (reported by `--json`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.kernels import KERNEL_QTYPES

from .model import TorchOps


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self, model):
        super().__init__(model)
        self.fallbacks: set[str] = set()
        self.last_stats = None
        self._temps: dict[tuple[float, str], torch.Tensor] = {}

    def _kernel_ok(self, names: tuple[str, ...]) -> bool:
        w = self.m.weights
        if all(w.info(n).qtype in KERNEL_QTYPES for n in names):
            return True
        self.fallbacks.update(names)
        return False

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.gemm import dequant_matmul

        if not self._kernel_ok((name,)):
            return super().linear(name, x)
        w = self.m.weights
        raw = w.raw(name, x.device)
        lead = x.shape[:-1]
        y = dequant_matmul(x.reshape(-1, x.shape[-1]).contiguous(), raw, w.info(name).qtype)
        return y.reshape(*lead, y.shape[-1])

    def experts(self, layer: int, u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor,
                down_scale: torch.Tensor, raw_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
        from engine.kernels.moe import grouped_moe

        w = self.m.weights
        names = w.expert_names(layer)
        if not self._kernel_ok(names):
            return super().experts(layer, u, top_i, top_w, down_scale, raw_of)
        *gate_up, down = names
        return grouped_moe(u.contiguous(), top_i, top_w.float(), down_scale.float(),
                           tuple(raw_of(n) for n in gate_up), tuple(w.info(n).qtype for n in gate_up),
                           raw_of(down), w.info(down).qtype)

    def _temperature(self, temperature: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(temperature, torch.Tensor):  # a captured graph's static temperature buffer
            return temperature
        key = (temperature, str(device))
        t = self._temps.get(key)
        if t is None:
            t = self._temps[key] = torch.tensor(temperature, dtype=torch.float32, device=device)
        return t

    def vocab_pass(self, x: torch.Tensor, temperature: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from engine.kernels.vocab import vocab_pass

        m = self.m
        if not self._kernel_ok((m.token_embd,)):
            return super().vocab_pass(x, temperature)
        raw = m.weights.raw(m.token_embd, x.device)
        temp = None if temperature is None else self._temperature(temperature, x.device)
        res = vocab_pass(x.contiguous(), raw, m.weights.info(m.token_embd).qtype,
                         float(m.spec.final_logit_softcapping), temp, None)
        self.last_stats = res
        return res.logits, res.soft




class FusedStepper:
    """One denoising step for engine.device_sampler on the fast path: the decoder pass and the
    vocabulary pass (a CUDA graph replay after a canvas's second step), with the entropy and argmax
    the vocabulary kernel computed in its sweep over the logits instead of another pass over [C, V].
    The self-conditioning carry is the soft embedding that same sweep produced."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def denoise_step(self, canvas: torch.Tensor, carry, temperature: torch.Tensor, temp_value: float | None):
        from engine.device_sampler import StepOutput

        if temp_value is None:
            raise ValueError("FusedStepper needs the step's temperature as a float")
        logits, soft = self.model.decode_step(canvas, self.cache, carry, temp_value)
        stats = self.model.ops.last_stats
        return StepOutput(logits / temperature, stats.entropy, stats.argmax, soft)


__all__ = ["FusedStepper", "TritonOps"]
