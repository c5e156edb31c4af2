"""Quantization presets as data (quant_presets/*.toml) and the per-tensor type choice.

A preset is a default type plus an ordered list of rules; the first rule whose pattern and conditions
match a tensor gives its type. The rules reproduce llama-quantize's mixtures (llama-quant.cpp,
llama_tensor_get_type_impl) for this architecture; what the C code does in code, a rule says in data:

    [[rules]]
    pattern = 'ffn_down'          # regex, searched in the GGUF tensor name (std::regex_search)
    counter = "ffn_down"          # what i and n are for `layers` (see COUNTERS)
    layers = "use_more_bits"      # "use_more_bits", "< n/8", "< n/16", "< 4", ...
    n_expert = 8                  # only when the model has exactly this many experts
    min_gqa = 4                   # only when n_head / n_head_kv (layer 0) >= 4
    imatrix = false               # only without (false) / with (true) an importance matrix
    tied = true                   # only when the model has no output.weight (tied embeddings)
    experts = true                # only 3-D tensors holding more than one expert
    row_fits_default = false      # only when the row is not a multiple of the default type's block
    type = "Q6_K"

The order of one tensor's decision, as in llama-quantize (llama_tensor_get_type):
  1. tensors llama.cpp never quantizes (1-D, norms, the MoE router, ...) keep their source type;
  2. an F32/F16/BF16 preset gives its type to every other tensor (no rules, no fallback);
  3. the first --tensor-type override that matches ("manual"), else, unless --pure, the preset's
     rules, else the default type; only tensors decided by the preset advance the counters;
  4. the fallback when the type's block does not divide the row (tensor_type_fallback).

`TypeChooser` holds the model facts and the counters; `choose()` answers (type, reason) so that
`quantize --dry-run` can name the rule behind every choice.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from .package_data import data_dir

PRESET_DIR = data_dir(Path(__file__).resolve().parent, "quant_presets")
DEFAULT_TYPE = "Q4_K_M"  # what `quantize` writes without --type (the engine's default model too)

FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})

# llama-quant.cpp tensor_type_fallback: the type to use when ne0 % block_size != 0. A 32-block type
# falls back to itself; when the fallback's block does not divide the row either, the tensor is F16.
FALLBACK = {
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0,
    Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
    Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL,
    Q.IQ2_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL,
}

# Counters that rules can select layers by (llama-quant.cpp quantize_state_impl):
#   attn_v:   i = attn_v-like tensors decided by the preset so far (loader order), n = attn_v-like
#             tensors in the model (i_attention_wv / n_attention_wv);
#   ffn_down: i = the blk.N number when the model has more than one expert, else ffn_down tensors
#             decided so far; n = the block count (i_ffn_down / n_ffn_down = n_layer_all).
COUNTERS: dict[str, tuple[str, str]] = {
    "attn_v": (r"attn_v\.weight|attn_qkv\.weight|attn_kv_b\.weight", "tensors"),
    "ffn_down": (r"ffn_down", "layers"),
}

# Substrings that llama-quant.cpp's tensor_allows_quantization refuses (beyond 1-D and norms).
_NEVER_QUANTIZED = (
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")

_LAYERS = re.compile(r"^\s*(use_more_bits|<\s*(\d+)|<\s*n\s*/\s*(\d+))\s*$")
_RULE_KEYS = {"pattern", "type", "counter", "layers", "n_expert", "min_gqa", "imatrix", "tied", "experts",
              "row_fits_default"}


class PresetError(ValueError):
    pass


def writable_types() -> frozenset[Q]:
    """Types this build can write: the float types and every type with a quantizer."""
    from gguf_tools.quants import REGISTRY

    return FLOAT_TYPES | frozenset(REGISTRY)


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Rule:
    pattern: str
    type: Q
    counter: str | None = None
    layers: str | None = None
    n_expert: int | None = None
    min_gqa: int | None = None
    imatrix: bool | None = None
    tied: bool | None = None
    experts: bool | None = None
    row_fits_default: bool | None = None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def describe(self) -> str:
        conds = [f"{k}={v}" for k, v in (("n_expert", self.n_expert), ("min_gqa", self.min_gqa),
                                         ("imatrix", self.imatrix), ("tied", self.tied),
                                         ("experts", self.experts), ("row_fits_default", self.row_fits_default))
                 if v is not None]
        if self.layers:
            conds.append(f"{self.counter} {self.layers}")
        return f"/{self.pattern}/" + (f" [{', '.join(conds)}]" if conds else "")


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: int
    default: Q
    rules: tuple[Rule, ...] = ()
    description: str = ""

    @property
    def is_float(self) -> bool:
        return self.default in FLOAT_TYPES

    @property
    def types(self) -> frozenset[Q]:
        return frozenset({self.default, *(r.type for r in self.rules)})


@dataclass(frozen=True)
class ModelFacts:
    """What llama-quantize's rules read from the model (hparams and the tensor list)."""

    n_expert: int
    n_layer: int
    n_gqa: int  # n_head / n_head_kv of layer 0, integer division
    tied: bool  # no output.weight: token_embd is treated as the output tensor
    n_attn_v: int  # attn_v-like tensors in the model
    has_imatrix: bool = False

    @classmethod
    def from_tensors(cls, names: Iterable[str], n_expert: int, n_layer: int, n_head: int, n_head_kv0: int,
                     has_imatrix: bool = False) -> ModelFacts:
        names = list(names)
        v = re.compile(COUNTERS["attn_v"][0])
        return cls(n_expert=n_expert, n_layer=n_layer, n_gqa=n_head // n_head_kv0 if n_head_kv0 > 0 else 0,
                   tied="output.weight" not in names, n_attn_v=sum(1 for n in names if v.search(n)),
                   has_imatrix=has_imatrix)


def parse_type(name: str) -> Q:
    try:
        return Q[name.strip().upper()]
    except KeyError:
        raise PresetError(f"unknown tensor type {name!r}") from None


def available_presets() -> list[str]:
    return sorted(p.stem.upper() for p in PRESET_DIR.glob("*.toml"))


def _parse_rule(r: Any, where: str) -> Rule:
    if not isinstance(r, dict):
        raise PresetError(f"{where}: a rule must be a table")
    unknown = set(r) - _RULE_KEYS
    if unknown:
        raise PresetError(f"{where}: unknown rule key {sorted(unknown)[0]!r}")
    if "pattern" not in r or "type" not in r:
        raise PresetError(f"{where}: a rule needs 'pattern' and 'type'")
    try:
        re.compile(r["pattern"])
    except re.error as e:
        raise PresetError(f"{where}: bad pattern {r['pattern']!r} ({e})") from None
    layers, counter = r.get("layers"), r.get("counter")
    if (layers is None) != (counter is None):
        raise PresetError(f"{where}: 'layers' and 'counter' go together")
    if layers is not None and not _LAYERS.match(str(layers)):
        raise PresetError(f"{where}: bad layer selector {layers!r}")
    if counter is not None and counter not in COUNTERS:
        raise PresetError(f"{where}: unknown counter {counter!r} (known: {', '.join(COUNTERS)})")
    return Rule(pattern=str(r["pattern"]), type=parse_type(str(r["type"])), counter=counter,
                layers=None if layers is None else str(layers),
                n_expert=None if r.get("n_expert") is None else int(r["n_expert"]),
                min_gqa=None if r.get("min_gqa") is None else int(r["min_gqa"]),
                imatrix=r.get("imatrix"), tied=r.get("tied"), experts=r.get("experts"),
                row_fits_default=r.get("row_fits_default"))


def is_preset_file(name: str) -> bool:
    """--type FILE.toml: a preset saved by `quantize --target --save-preset` (or written by hand)."""
    return name.strip().lower().endswith(".toml")


def preset_label(name: str) -> str:
    """What an output file name carries: the type, or a preset file's name without .toml."""
    return Path(name.strip()).stem.upper() if is_preset_file(name) else name.strip().upper()


def load_preset(name: str) -> Preset:
    if is_preset_file(name):
        path = Path(name.strip())
        if not path.is_file():
            raise PresetError(f"--type {name}: no such preset file")
    else:
        path = PRESET_DIR / f"{name.strip().lower()}.toml"
        if not name.strip() or not path.is_file():
            raise PresetError(f"unknown type or preset {name!r} (known: {', '.join(available_presets())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        rules = tuple(_parse_rule(r, f"{path.name} rule {i + 1}") for i, r in enumerate(data.get("rules", [])))
        preset = Preset(str(data["name"]), int(data["file_type"]), parse_type(data["default"]), rules,
                        str(data.get("description", "")))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, PresetError):
            raise
        raise PresetError(f"{path.name}: malformed preset ({e})") from None
    missing = sorted(t.name for t in preset.types - writable_types())
    if missing:
        raise PresetError(f"preset {preset.name}: type {missing[0]} cannot be written by this version")
    return preset


def parse_override(text: str) -> Rule:
    """--tensor-type REGEX=TYPE, as llama-quantize parses it (pattern lower-cased, type by ggml name)."""
    pattern, sep, type_name = text.partition("=")
    if not sep:
        raise PresetError(f"--tensor-type {text!r}: expected REGEX=TYPE")
    if not pattern:
        raise PresetError(f"--tensor-type {text!r}: missing tensor name pattern")
    if not type_name:
        raise PresetError(f"--tensor-type {text!r}: missing type")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as e:
        raise PresetError(f"--tensor-type {text!r}: bad regular expression ({e})") from None
    qtype = parse_type(type_name)
    if qtype not in writable_types():
        raise PresetError(f"--tensor-type {text!r}: type {qtype.name} cannot be written by this version")
    return Rule(pattern, qtype)


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one that is not 1 (NumPy order: leading 1s dropped)."""
    return max(1, len(shape) - next((i for i, d in enumerate(shape) if d != 1), len(shape)))


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's converter keeps 1-D tensors, norms and the MoE router in F32."""
    return n_dims(shape) <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight")


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama-quant.cpp tensor_allows_quantization (default params, non-GLM5 architectures)."""
    if n_dims(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def block_fits(qtype: Q, row_len: int) -> bool:
    return row_len % GGML_QUANT_SIZES[qtype][0] == 0


def fallback(qtype: Q, row_len: int) -> Q:
    """llama-quant.cpp tensor_type_fallback."""
    if block_fits(qtype, row_len):
        return qtype
    block = GGML_QUANT_SIZES[qtype][0]
    fb = FALLBACK.get(qtype)
    if fb is None:
        if block > 32:
            raise PresetError(f"no tensor type fallback is defined for type {qtype.name}")
        fb = qtype
    return fb if block_fits(fb, row_len) else Q.F16


@dataclass
class TypeChooser:
    """llama-quantize's per-tensor type choice for one model; call choose() in loader order."""

    preset: Preset
    facts: ModelFacts
    overrides: tuple[Rule, ...] = ()
    pure: bool = False
    _seen: dict[str, int] = field(default_factory=dict)

    def choose(self, name: str, shape: Sequence[int], source_type: Q = Q.F32) -> tuple[Q, str]:
        shape = tuple(int(d) for d in shape)
        if not allows_quantization(name, shape):
            return source_type, f"kept {source_type.name}: never quantized (1-D, norm, router, ...)"
        preset = self.preset
        if preset.is_float:
            return preset.default, f"{preset.name}"
        qtype, reason = preset.default, f"default {preset.name}"
        hit = next((r for r in self.overrides if r.matches(name)), None)
        if hit is not None:
            qtype, reason = hit.type, f"--tensor-type {hit.pattern}={hit.type.name}"
        elif self.pure:
            reason = f"--pure {preset.default.name}"
        else:
            qtype, reason = self._from_rules(name, shape)
        row = shape[-1]
        fb = fallback(qtype, row)
        if fb != qtype:
            reason += f"; fallback {qtype.name}->{fb.name} (row {row})"
        return fb, reason

    def _from_rules(self, name: str, shape: tuple[int, ...]) -> tuple[Q, str]:
        index = {c: self._index(c, name) for c, (pat, _) in COUNTERS.items() if re.search(pat, name)}
        result = (self.preset.default, f"default {self.preset.name}")
        for k, rule in enumerate(self.preset.rules):
            if rule.matches(name) and self._conditions(rule, name, shape, index):
                result = (rule.type, f"{self.preset.name} rule {k + 1} {rule.describe()}")
                break
        for c in index:  # llama-quant.cpp increments after deciding
            self._seen[c] = self._seen.get(c, 0) + 1
        return result

    def _index(self, counter: str, name: str) -> tuple[int, int]:
        kind = COUNTERS[counter][1]
        if kind == "tensors":
            return self._seen.get(counter, 0), self.facts.n_attn_v
        n = self.facts.n_layer
        if self.facts.n_expert > 1:  # llama-quant.cpp layer_info: parse blk.N
            m = re.match(r"blk\.(\d+)\.", name)
            if m is None:
                raise PresetError(f"failed to determine the layer of tensor {name}")
            i = int(m.group(1))
            if i >= n:
                raise PresetError(f"bad layer {i} for tensor {name}: must be in [0, {n})")
            return i, n
        return self._seen.get(counter, 0), n

    def _conditions(self, rule: Rule, name: str, shape: tuple[int, ...], index: dict[str, tuple[int, int]]) -> bool:
        f = self.facts
        if rule.n_expert is not None and f.n_expert != rule.n_expert:
            return False
        if rule.min_gqa is not None and f.n_gqa < rule.min_gqa:
            return False
        if rule.imatrix is not None and f.has_imatrix != rule.imatrix:
            return False
        if rule.tied is not None and f.tied != rule.tied:
            return False
        if rule.experts is not None and (len(shape) == 3 and shape[0] > 1) != rule.experts:
            return False
        if rule.row_fits_default is not None and block_fits(self.preset.default, shape[-1]) != rule.row_fits_default:
            return False
        if rule.layers is not None:
            assert rule.counter is not None
            if rule.counter not in index:
                return False
            i, n = index[rule.counter]
            m = _LAYERS.match(rule.layers)
            assert m is not None
            if m.group(1) == "use_more_bits":
                return use_more_bits(i, n)
            if m.group(2) is not None:
                return i < int(m.group(2))
            return i < n // int(m.group(3))
        return True


def choose_types(tensors: Sequence[tuple[str, Sequence[int], Q]], preset: Preset, facts: ModelFacts,
                 overrides: tuple[Rule, ...] = (), pure: bool = False) -> list[tuple[Q, str]]:
    """(type, reason) for every (name, shape, source type), given in llama-quantize's loader order."""
    if overrides and preset.is_float:
        raise PresetError(f"--tensor-type applies to quantized types only (llama-quantize ignores it for "
                          f"{preset.name})")
    chooser = TypeChooser(preset, facts, tuple(overrides), pure)
    return [chooser.choose(name, shape, src) for name, shape, src in tensors]


def choose_type(name: str, shape: tuple[int, ...], preset: Preset, overrides: tuple[Rule, ...] = (),
                facts: ModelFacts | None = None) -> tuple[Q, str]:
    """(type, reason) for one tensor on its own (no counters carried over; see choose_types)."""
    facts = facts or ModelFacts(n_expert=0, n_layer=1, n_gqa=1, tied=name == "token_embd.weight", n_attn_v=1)
    return TypeChooser(preset, facts, tuple(overrides)).choose(name, shape)


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size
