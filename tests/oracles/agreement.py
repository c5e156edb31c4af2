"""How close llama.cpp's canvas logits must be to ours, and why.

On the CPU llama.cpp rounds the *activations* of every matrix product to the vec_dot type of the weight
(ggml-cpu type traits): F32 weights keep F32 activations, F16 weights take F16 activations (11-bit
significand), BF16 weights take BF16 activations (8-bit significand), and every quantized type takes 8-bit
blocks with one absmax scale: Q8_0/Q8_1 per 32 values for the 32-block types, Q8_K per 256 for the K-quants.
Our engine multiplies F32 activations with the dequantized weights. Even with F32 weights llama.cpp looks
GELU up in an F16 table (GGML_GELU_FP16: input and output rounded to F16).

An 8-bit absmax block rounds each value by up to d/2 with d = max|x|/127, an RMS error of
(max/rms)/(127*sqrt(12)) ~ 0.5-0.7% of the block's RMS for Gaussian-like blocks of 32-256 values: the same
size of perturbation as rounding the *weights* to Q8_0. So the expected gap between llama.cpp and us on a
quantized file is the model's response to rounding one operand of every product to 8 bits, which can be
measured with our own engine alone: our Q8_0 file against our F32 file moves the logits by 0.3% (the trained
model) to 2.5% (the small random ones) RMS. Measured llama.cpp-vs-us gaps over every preset, subject and
mode (tests/oracles, `-m slow`): at most 2.5% RMS and 6.1% at the worst single logit (the random `wide`
model; the trained one: 1.9% and 4.5%, where sharp attention amplifies the rounding), F16 files 1.7e-3,
BF16 files 1.1e-2, F32 files 7.7e-4 (GELU table), with top-1 agreement never below 87.5% (2 of 16
positions of a random model whose top two logits nearly tie). The bounds leave about 2x of room over these;
a wrong name, layout, scale or type in a file moves logits by tens of percent (the random models' Q4_0
files against their F32 sources already differ by 10-25% RMS).

Relative errors are taken against the largest |logit| of our result (soft-capped logits, |z| < 30), max over
all canvas positions and vocabulary entries; rms is the Frobenius norm of the difference over that of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from gguf_tools.reader import GGUFFile


@dataclass(frozen=True)
class Tolerance:
    activations: str  # the coarsest activation rounding llama.cpp applies for this file
    max_rel: float
    rms_rel: float
    min_top1: float  # fraction of canvas positions whose argmax must agree


TOLERANCES = {
    "F32": Tolerance("F32 (GELU via an F16 table)", 1e-3, 1e-3, 1.0),
    "F16": Tolerance("F16", 4e-3, 3e-3, 1.0),
    "BF16": Tolerance("BF16", 3e-2, 2e-2, 0.9),
    "quantized": Tolerance("8-bit blocks (Q8_0/Q8_1/Q8_K)", 1.2e-1, 5e-2, 0.8),
}


def tolerance_for(path: Path) -> Tolerance:
    types = {t.qtype for t in GGUFFile(path).tensors.values()}
    if types - {Q.F32, Q.F16, Q.BF16}:
        return TOLERANCES["quantized"]
    if Q.BF16 in types:
        return TOLERANCES["BF16"]
    return TOLERANCES["F16"] if Q.F16 in types else TOLERANCES["F32"]


@dataclass(frozen=True)
class Agreement:
    max_rel: float
    rms_rel: float
    top1: float

    def __str__(self) -> str:
        return f"max rel {self.max_rel:.2e}, rms rel {self.rms_rel:.2e}, top-1 {100 * self.top1:.1f}%"

    def within(self, tol: Tolerance) -> bool:
        return self.max_rel <= tol.max_rel and self.rms_rel <= tol.rms_rel and self.top1 >= tol.min_top1


def agreement(theirs: np.ndarray, ours: np.ndarray) -> Agreement:
    a, b = np.asarray(theirs, dtype=np.float64), np.asarray(ours, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all(), "llama.cpp returned non-finite logits"
    d = np.abs(a - b)
    return Agreement(float(d.max() / np.abs(b).max()), float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                     float(np.mean(a.argmax(-1) == b.argmax(-1))))
