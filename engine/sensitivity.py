"""KLD probes for `quantize --target`: the canvas KLD one tensor's quantization causes, per unit of its
relative error (gguf_tools.target_mix's loss model: KLD(t, q) ~ gain(t) * rel(t, q)).

For each quantizable tensor the probe quantizes that tensor alone (the byte-exact quantizer, with the
importance matrix, at PROBE_TYPES' type for its row) and runs the decoder over calibration canvases:
the prompts' contexts, their canvases noised at the imatrix's nested noise levels, each decoder pass
self-conditioned on the one before (calibration prompts, never the held-out ones). The KLD against
the unquantized file's logits, divided by the tensor's imatrix-weighted relative error, is its gain.
The quantized tensor is swapped in as float32 (its dequantized values: what the engine computes with
either way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from gguf_tools.imatrix import Imatrix
from gguf_tools.presets import allows_quantization, block_fits
from gguf_tools.quant_error import read_gguf_rows, usage_of, weighted_energy

from .evaluate import divergence
from .imatrix_collect import NOISE_LEVELS, Sample, noise_levels_temperature
from .model import DiffusionGemmaModel
from .run import LoadedModel
from .weights import WeightStore

# a low type, so the KLD stands out of float noise, still in the regime where it grows like the error
PROBE_TYPES = (Q.Q3_K, Q.Q4_0)


def probe_type(shape: Sequence[int]) -> Q | None:
    return next((q for q in PROBE_TYPES if block_fits(q, int(shape[-1]))), None)


class OverrideStore(WeightStore):
    """A view of a WeightStore with some tensors replaced by float32 values."""

    def __init__(self, base: WeightStore, values: dict[str, np.ndarray]):  # noqa: D107 - shares base's state
        self.__dict__.update(base.__dict__)
        self._small, self._raw_on = {}, {}  # no cached copies of the replaced tensors
        self.values = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in values.items()}

    def info(self, name: str):
        info = super().info(name)
        v = self.values.get(name)
        return info if v is None else replace(info, qtype=Q.F32, n_bytes=v.nbytes, data=v)

    def raw(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        v = self.values.get(name)
        if v is None:
            return super().raw(name, device)
        return torch.from_numpy(v.view(np.uint8).reshape(*v.shape[:-1], -1)).to(device)


@torch.no_grad()
def calibration_logits(model: DiffusionGemmaModel, samples: Sequence[Sample], seed: int = 0) -> list[torch.Tensor]:
    """Canvas logits [C, V] of every pass imatrix_collect's decoder passes make (nested noise levels,
    each pass self-conditioned on the one before), so the self-conditioning MLP is probed too."""
    g = torch.Generator().manual_seed(seed)
    t_min, t_max = model.spec.sampler.t_min, model.spec.sampler.t_max
    out = []
    for s in samples:
        cache = model.new_cache()
        model.encode(torch.tensor(s.context, dtype=torch.long), cache)
        clean = torch.tensor(s.canvas, dtype=torch.long)
        u = torch.rand(clean.shape[0], generator=g)
        noise = torch.randint(0, model.vocab_size, clean.shape, generator=g)
        soft = None
        for level in NOISE_LEVELS:
            canvas = torch.where(u < level, noise, clean).to(model.device)
            logits, soft = model.decode_step(canvas, cache, soft, noise_levels_temperature(level, t_min, t_max))
            out.append(logits.float().cpu())
    return out


def quantized_values(f, name: str, q: Q, imatrix: Imatrix | None) -> tuple[np.ndarray, float]:
    """(dequantized values of tensor `name` quantized to q, its relative error) over all rows."""
    from gguf_tools.quants import dequantize, quantize

    info = f.tensors[name]
    shape = tuple(info.shape)
    w = read_gguf_rows(f, name, 0, int(np.prod(shape[:-1])))
    n_mat = shape[0] if len(shape) == 3 else 1
    w = w.reshape(n_mat, -1, shape[-1])
    im = None if imatrix is None else imatrix.lookup(name, shape)
    im = None if im is None else (im if im.ndim == 2 else im[None, :])
    usage = usage_of(imatrix, name, shape)
    out = np.empty_like(w)
    err = signal = 0.0
    for m in range(n_mat):
        imm = None if im is None else im[m]
        out[m] = dequantize(quantize(w[m], q, imm), q).reshape(w[m].shape)
        err += usage[m] * weighted_energy(w[m] - out[m], imm)
        signal += usage[m] * weighted_energy(w[m], imm)
    return out.reshape(shape), (err / signal if signal > 0 else 0.0)


@torch.no_grad()
def probe_gains(lm: LoadedModel, samples: Sequence[Sample], imatrix: Imatrix | None, *, seed: int = 0,
                names: Sequence[str] | None = None, on_tensor: Callable[[int, int], None] | None = None
                ) -> dict[str, dict[str, float]]:
    """name -> {"gain", "kld", "rel", "type"} for every quantizable tensor of the loaded file."""
    f, model = lm.file, lm.model
    ref = calibration_logits(model, samples, seed)
    todo = [n for n, t in f.tensors.items() if allows_quantization(n, t.shape) and probe_type(t.shape) is not None
            and (names is None or n in names)]
    base = model.weights
    out: dict[str, dict[str, float]] = {}
    try:
        for i, name in enumerate(todo):
            q = probe_type(f.tensors[name].shape)
            assert q is not None
            values, rel = quantized_values(f, name, q, imatrix)
            model.weights = OverrideStore(base, {name: values})
            kld = divergence(ref, calibration_logits(model, samples, seed))["mean_kld"]
            model.weights = base
            out[name] = {"gain": kld / rel if rel > 0 else 0.0, "kld": kld, "rel": rel, "type": q.name}
            if on_tensor is not None:
                on_tensor(i + 1, len(todo))
    finally:
        model.weights = base
    return out


def weights_budget(spec, tensors: Sequence[tuple[str, tuple[int, ...], str, int]], vram: int, ctx: int,
                   dtype: str = "bf16") -> int:
    """Bytes of weights a card of `vram` bytes holds beside the KV cache for `ctx` tokens, the fixed
    buffers and the reserve, as the placement planner counts them (tensors: name, shape, type, bytes of
    the stock mix, which size the dequantization scratch)."""
    from .placement import TensorSize, plan_placement

    p = plan_placement(spec, [TensorSize(*t) for t in tensors], ctx=ctx, vram_budget=None, dtype=dtype)
    return vram - (p.gpu_bytes - p.gpu_weight_bytes)


def role_gains(probes: dict[str, dict[str, float]]) -> dict[str, float]:
    """Geometric mean of the gains per role (blk.N. stripped), for target_mix.ROLE_GAINS."""
    from gguf_tools.target_mix import role

    by_role: dict[str, list[float]] = {}
    for name, p in probes.items():
        if p["gain"] > 0:
            by_role.setdefault(role(name), []).append(p["gain"])
    return {r: float(np.exp(np.mean(np.log(v)))) for r, v in sorted(by_role.items())}


__all__ = ["OverrideStore", "PROBE_TYPES", "calibration_logits", "probe_gains", "quantized_values", "role_gains"]
