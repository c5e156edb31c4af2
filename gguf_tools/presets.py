"""Quantization presets as data (quant_presets/*.toml) and the per-tensor type choice.

`choose_type` answers with the rule that decided, so `quantize --dry-run` can say why each tensor got
its type. Order: fixed guards (what llama.cpp never quantizes), user overrides, preset rules, the
preset default, then llama-quantize's fallback when a block does not divide the row.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

PRESET_DIR = Path(__file__).resolve().parent.parent / "quant_presets"
DEFAULT_TYPE = "BF16"  # what `quantize` writes without --type; Q4_K_M once its preset exists

# Types this build can write (the K-quants arrive with their quantizers).
WRITABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}

# llama-quant.cpp tensor_type_fallback: the type to use when ne0 % block_size != 0.
FALLBACK = {
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0,
    Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
    Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL,
    Q.IQ2_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL,
}


class PresetError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    pattern: str
    type: Q

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: int
    default: Q
    rules: tuple[Rule, ...] = ()


def parse_type(name: str) -> Q:
    try:
        return Q[name.upper()]
    except KeyError:
        raise PresetError(f"unknown tensor type {name!r}") from None


def available_presets() -> list[str]:
    return sorted(p.stem.upper() for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> Preset:
    path = PRESET_DIR / f"{name.lower()}.toml"
    if not path.is_file():
        raise PresetError(f"unknown type or preset {name!r} (known: {', '.join(available_presets())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        rules = tuple(Rule(r["pattern"], parse_type(r["type"])) for r in data.get("rules", []))
        preset = Preset(str(data["name"]), int(data["file_type"]), parse_type(data["default"]), rules)
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise PresetError(f"{path.name}: malformed preset ({e})") from None
    for t in {preset.default, *(r.type for r in rules)}:
        if t not in WRITABLE:
            raise PresetError(f"preset {preset.name}: type {t.name} cannot be written by this version")
    return preset


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's converter keeps 1-D tensors, norms and the MoE router in F32."""
    n_dims = len(shape) - next((i for i, d in enumerate(shape) if d != 1), len(shape))
    return n_dims <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight")


def block_fits(qtype: Q, row_len: int) -> bool:
    return row_len % GGML_QUANT_SIZES[qtype][0] == 0


def choose_type(name: str, shape: tuple[int, ...], preset: Preset,
                overrides: tuple[Rule, ...] = ()) -> tuple[Q, str]:
    """(type, reason) for one tensor."""
    if keeps_f32(name, shape):
        return Q.F32, "f32: 1-D, norm or router"
    qtype, reason = preset.default, f"default {preset.name}"
    for source, rules in (("--tensor-type", overrides), (f"{preset.name} rule", preset.rules)):
        hit = next((r for r in rules if r.matches(name)), None)
        if hit is not None:
            qtype, reason = hit.type, f"{source} {hit.pattern}"
            break
    row = shape[-1]
    if not block_fits(qtype, row):
        fb = FALLBACK.get(qtype, qtype)
        if fb != qtype and block_fits(fb, row):
            return fb, f"{reason}; fallback {qtype.name}->{fb.name} (row {row})"
        return Q.F16, f"{reason}; fallback {qtype.name}->F16 (row {row})"
    return qtype, reason


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size
