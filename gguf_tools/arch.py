"""DiffusionGemma architecture spec: HF config <-> ArchSpec <-> GGUF key/value pairs.

Field names follow the GGUF keys they become (``expert_count`` -> ``{arch}.expert_count``), so the
round trip is easy to read. Facts and key names: shared/reference/diffusiongemma-arch.md §2 and §4.3.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ARCH = "diffusion-gemma"
GEMMA4_ARCH = "gemma4"  # llama.cpp's autoregressive backbone arch; used for the oracle copy
SLIDING, FULL = "sliding_attention", "full_attention"


class SpecError(ValueError):
    """A config or GGUF header that does not describe a DiffusionGemma model."""


@dataclass(frozen=True)
class LayerGeometry:
    """Attention geometry of one layer, derived from the layer type."""

    sliding: bool
    head_dim: int
    n_kv_head: int
    k_eq_v: bool  # full layers have no v_proj: V is the raw k projection
    rope_base: float
    rope_dims: int  # dims the rope is built over (NeoX pairs i, i+rope_dims/2)
    rotated_pairs: int  # pairs with a non-zero frequency; the rest pass through


@dataclass(frozen=True)
class SamplerDefaults:
    max_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_new_tokens: int = 256


@dataclass(frozen=True)
class ArchSpec:
    name: str
    vocab_size: int
    embedding_length: int
    feed_forward_length: int
    block_count: int
    head_count: int
    head_count_kv_swa: int
    head_count_kv_full: int
    key_length: int  # full-attention head dim
    key_length_swa: int  # sliding-attention head dim
    sliding_window: int
    sliding_window_pattern: tuple[bool, ...]  # True = sliding layer
    rope_freq_base: float
    rope_freq_base_swa: float
    partial_rotary_factor: float  # full layers ("proportional" rope)
    expert_count: int
    expert_used_count: int
    expert_feed_forward_length: int
    layer_norm_rms_epsilon: float
    final_logit_softcapping: float
    context_length: int
    canvas_length: int
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)

    # ---- derived geometry -------------------------------------------------------------
    def layer(self, i: int) -> LayerGeometry:
        if self.sliding_window_pattern[i]:
            d = self.key_length_swa
            return LayerGeometry(True, d, self.head_count_kv_swa, False, self.rope_freq_base_swa, d, d // 2)
        d = self.key_length
        rotated = int(d * self.partial_rotary_factor / 2)
        return LayerGeometry(False, d, self.head_count_kv_full, True, self.rope_freq_base, d, rotated)

    @property
    def layers(self) -> list[LayerGeometry]:
        return [self.layer(i) for i in range(self.block_count)]

    def rope_freqs(self) -> list[float]:
        """llama.cpp's freq factors for full layers: 1.0 on rotated pairs, 1e30 (theta ~ 0) on the rest."""
        half = self.key_length // 2
        rotated = int(self.key_length * self.partial_rotary_factor / 2)
        return [1.0] * rotated + [1e30] * (half - rotated)

    # ---- HF config ---------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: Path | str) -> ArchSpec:
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise SpecError(f"{cfg_path}: config.json not found")
        cfg = _load_json(cfg_path)
        gen_path = path / "generation_config.json"
        gen = _load_json(gen_path) if gen_path.is_file() else {}
        return cls.from_hf_config(cfg, gen, name=path.resolve().name)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], gen: dict[str, Any] | None = None, name: str = "model") -> ArchSpec:
        gen = gen or {}
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") not in ("diffusion_gemma", None) or (
            archs and not any("DiffusionGemma" in a for a in archs)
        ):
            raise SpecError(f"config.json: not a DiffusionGemma checkpoint (model_type={cfg.get('model_type')!r})")
        tc = cfg.get("text_config", cfg)
        if not isinstance(tc, dict):
            raise SpecError("config.json: text_config is not an object")
        req = _Required(tc, "config.json text_config")
        layer_types = req.get("layer_types", list)
        n_layer = req.get("num_hidden_layers", int)
        if len(layer_types) != n_layer or any(t not in (SLIDING, FULL) for t in layer_types):
            raise SpecError("config.json: layer_types must list sliding_attention/full_attention once per layer")
        head_dim = req.get("head_dim", int)
        n_kv = req.get("num_key_value_heads", int)
        full_head_dim, full_kv = _full_layer_geometry(tc, layer_types, n_kv)
        rope = tc.get("rope_parameters") or {}
        rope_full = rope.get("full_attention", {})
        rope_swa = rope.get("sliding_attention", {})
        if rope_full.get("rope_type", "proportional") != "proportional":
            raise SpecError(f"config.json: full-attention rope_type {rope_full.get('rope_type')!r} is not supported")
        eos = cfg.get("eos_token_id", gen.get("eos_token_id", tc.get("eos_token_id", 1)))
        eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        gen_eos = gen.get("eos_token_id")
        if isinstance(gen_eos, list):
            eos_ids = tuple(dict.fromkeys([*eos_ids, *gen_eos]))
        sampler_cfg = gen.get("sampler_config") or {}
        d = SamplerDefaults()
        sampler = SamplerDefaults(
            max_steps=int(gen.get("max_denoising_steps") or d.max_steps),
            t_min=float(gen.get("t_min") or d.t_min),
            t_max=float(gen.get("t_max") or d.t_max),
            entropy_bound=float(sampler_cfg.get("entropy_bound") or d.entropy_bound),
            stability_threshold=int(gen.get("stability_threshold") or d.stability_threshold),
            confidence_threshold=float(gen.get("confidence_threshold") or d.confidence_threshold),
            max_new_tokens=int(gen.get("max_new_tokens") or d.max_new_tokens),
        )
        spec = cls(
            name=name,
            vocab_size=req.get("vocab_size", int),
            embedding_length=req.get("hidden_size", int),
            feed_forward_length=req.get("intermediate_size", int),
            block_count=n_layer,
            head_count=req.get("num_attention_heads", int),
            head_count_kv_swa=n_kv,
            head_count_kv_full=full_kv,
            key_length=full_head_dim,
            key_length_swa=head_dim,
            sliding_window=req.get("sliding_window", int),
            sliding_window_pattern=tuple(t == SLIDING for t in layer_types),
            rope_freq_base=float(rope_full.get("rope_theta", 1e6)),
            rope_freq_base_swa=float(rope_swa.get("rope_theta", 1e4)),
            partial_rotary_factor=float(rope_full.get("partial_rotary_factor", 0.25)),
            expert_count=req.get("num_experts", int),
            expert_used_count=req.get("top_k_experts", int),
            expert_feed_forward_length=req.get("moe_intermediate_size", int),
            layer_norm_rms_epsilon=float(tc.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=float(tc.get("final_logit_softcapping") or 30.0),
            context_length=int(tc.get("max_position_embeddings", 131072)),
            canvas_length=int(cfg.get("canvas_length", 256)),
            bos_token_id=int(tc.get("bos_token_id", 2)),
            eos_token_id=eos_ids[0],
            pad_token_id=int(gen.get("pad_token_id", tc.get("pad_token_id", 0)) or 0),
            eos_token_ids=eos_ids,
            sampler=sampler,
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.sliding_window_pattern and self.sliding_window_pattern[-1]:
            raise SpecError("config: the last layer must be full_attention")
        if self.expert_used_count > self.expert_count or self.expert_used_count < 1:
            raise SpecError(f"config: top_k_experts={self.expert_used_count} vs num_experts={self.expert_count}")
        for n, v in [("hidden_size", self.embedding_length), ("vocab_size", self.vocab_size),
                     ("num_attention_heads", self.head_count), ("head_dim", self.key_length_swa)]:
            if v <= 0:
                raise SpecError(f"config: {n} must be positive, got {v}")
        for kv in (self.head_count_kv_swa, self.head_count_kv_full):
            if kv <= 0 or self.head_count % kv:
                raise SpecError(f"config: {self.head_count} heads do not divide into {kv} KV heads")

    # ---- GGUF keys -----------------------------------------------------------------------
    def gguf_kv(self, arch: str = ARCH) -> list[tuple[str, Any, str]]:
        """(key, value, gguf value type) in the order llama.cpp's converters write them."""
        a = arch
        kv: list[tuple[str, Any, str]] = [
            (f"{a}.block_count", self.block_count, "u32"),
            (f"{a}.context_length", self.context_length, "u32"),
            (f"{a}.embedding_length", self.embedding_length, "u32"),
            (f"{a}.feed_forward_length", self.feed_forward_length, "u32"),
            (f"{a}.attention.head_count", self.head_count, "u32"),
            (f"{a}.attention.head_count_kv", [g.n_kv_head for g in self.layers], "i32[]"),
            (f"{a}.rope.freq_base", self.rope_freq_base, "f32"),
            (f"{a}.rope.freq_base_swa", self.rope_freq_base_swa, "f32"),
            (f"{a}.attention.layer_norm_rms_epsilon", self.layer_norm_rms_epsilon, "f32"),
            (f"{a}.expert_count", self.expert_count, "u32"),
            (f"{a}.expert_used_count", self.expert_used_count, "u32"),
            (f"{a}.final_logit_softcapping", self.final_logit_softcapping, "f32"),
            (f"{a}.attention.sliding_window", self.sliding_window, "u32"),
            (f"{a}.attention.shared_kv_layers", 0, "u32"),
            (f"{a}.embedding_length_per_layer_input", 0, "u32"),
            (f"{a}.attention.sliding_window_pattern", list(self.sliding_window_pattern), "bool[]"),
            (f"{a}.attention.key_length", self.key_length, "u32"),
            (f"{a}.attention.value_length", self.key_length, "u32"),
            (f"{a}.attention.key_length_swa", self.key_length_swa, "u32"),
            (f"{a}.attention.value_length_swa", self.key_length_swa, "u32"),
            (f"{a}.expert_feed_forward_length", self.expert_feed_forward_length, "u32"),
            (f"{a}.rope.dimension_count", self.key_length, "u32"),
            (f"{a}.rope.dimension_count_swa", self.key_length_swa, "u32"),
        ]
        if arch == ARCH:
            s = self.sampler
            kv += [
                (f"{a}.attention.causal", False, "bool"),
                ("diffusion.canvas_length", self.canvas_length, "u32"),
                ("diffusion.eb_max_steps", s.max_steps, "u32"),
                ("diffusion.eb_t_min", s.t_min, "f32"),
                ("diffusion.eb_t_max", s.t_max, "f32"),
                ("diffusion.eb_entropy_bound", s.entropy_bound, "f32"),
                ("diffusion.eb_stability_threshold", s.stability_threshold, "u32"),
                ("diffusion.eb_confidence_threshold", s.confidence_threshold, "f32"),
            ]
        return kv

    @classmethod
    def from_gguf_kv(cls, kv: dict[str, Any], name: str | None = None) -> ArchSpec:
        """Rebuild the spec from a GGUF key/value dict (plain Python values)."""
        arch = kv.get("general.architecture")
        if arch not in (ARCH, GEMMA4_ARCH):
            raise SpecError(f"GGUF architecture is {arch!r}, expected {ARCH!r}")
        g = _Required(kv, "GGUF")
        p = f"{arch}."
        pattern = tuple(bool(x) for x in g.get(p + "attention.sliding_window_pattern", list))
        n_layer = g.get(p + "block_count", int)
        kv_heads = g.get(p + "attention.head_count_kv", (list, int))
        if isinstance(kv_heads, int):
            kv_heads = [kv_heads] * n_layer
        if len(pattern) != n_layer or len(kv_heads) != n_layer:
            raise SpecError("GGUF: sliding_window_pattern/head_count_kv length differs from block_count")
        swa_kv = [h for h, s in zip(kv_heads, pattern) if s] or [kv_heads[0]]
        full_kv = [h for h, s in zip(kv_heads, pattern) if not s] or [kv_heads[0]]
        key_length = g.get(p + "attention.key_length", int)
        freqs = kv.get("_rope_freqs")
        rotated = sum(1 for f in freqs if f < 1e29) if freqs is not None else int(key_length * 0.25 / 2)
        d = SamplerDefaults()
        sampler = SamplerDefaults(
            max_steps=int(kv.get("diffusion.eb_max_steps", d.max_steps)),
            t_min=float(kv.get("diffusion.eb_t_min", d.t_min)),
            t_max=float(kv.get("diffusion.eb_t_max", d.t_max)),
            entropy_bound=float(kv.get("diffusion.eb_entropy_bound", d.entropy_bound)),
            stability_threshold=int(kv.get("diffusion.eb_stability_threshold", d.stability_threshold)),
            confidence_threshold=float(kv.get("diffusion.eb_confidence_threshold", d.confidence_threshold)),
        )
        tokens = kv.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else int(kv.get("_vocab_size", 0))
        eos = int(kv.get("tokenizer.ggml.eos_token_id", 1))
        eos_ids = [eos]
        if tokens is not None:  # llama.cpp's gemma4 end-of-generation set
            for t in ("<turn|>", "<|tool_response>"):
                if t in tokens:
                    eos_ids.append(tokens.index(t))
        spec = cls(
            name=name or str(kv.get("general.name", "model")),
            vocab_size=vocab,
            embedding_length=g.get(p + "embedding_length", int),
            feed_forward_length=g.get(p + "feed_forward_length", int),
            block_count=n_layer,
            head_count=g.get(p + "attention.head_count", int),
            head_count_kv_swa=int(swa_kv[0]),
            head_count_kv_full=int(full_kv[0]),
            key_length=key_length,
            key_length_swa=g.get(p + "attention.key_length_swa", int),
            sliding_window=g.get(p + "attention.sliding_window", int),
            sliding_window_pattern=pattern,
            rope_freq_base=float(g.get(p + "rope.freq_base", (float, int))),
            rope_freq_base_swa=float(g.get(p + "rope.freq_base_swa", (float, int))),
            partial_rotary_factor=2 * rotated / key_length,
            expert_count=g.get(p + "expert_count", int),
            expert_used_count=g.get(p + "expert_used_count", int),
            expert_feed_forward_length=g.get(p + "expert_feed_forward_length", int),
            layer_norm_rms_epsilon=float(g.get(p + "attention.layer_norm_rms_epsilon", (float, int))),
            final_logit_softcapping=float(kv.get(p + "final_logit_softcapping", 30.0)),
            context_length=g.get(p + "context_length", int),
            canvas_length=int(kv.get("diffusion.canvas_length", 256)),
            bos_token_id=int(kv.get("tokenizer.ggml.bos_token_id", 2)),
            eos_token_id=eos,
            pad_token_id=int(kv.get("tokenizer.ggml.padding_token_id", 0)),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            sampler=sampler,
        )
        spec.validate()
        return spec

    def with_(self, **changes: Any) -> ArchSpec:
        return replace(self, **changes)

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.embedding_length)


def _full_layer_geometry(tc: dict[str, Any], layer_types: list[str], n_kv: int) -> tuple[int, int]:
    """Full-layer head dim and KV heads: explicit keys (released config) or per_layer_config
    (what transformers' save_pretrained writes), as llama.cpp's Gemma4 converter reads them."""
    head_dim = tc.get("global_head_dim")
    kv = tc.get("num_global_key_value_heads")
    per_layer = tc.get("per_layer_config") or {}
    for idx, lc in sorted(per_layer.items(), key=lambda x: int(x[0])):
        if int(idx) < len(layer_types) and layer_types[int(idx)] == FULL:
            head_dim = head_dim if head_dim is not None else lc.get("head_dim")
            kv = kv if kv is not None else lc.get("num_key_value_heads")
            break
    return int(head_dim if head_dim is not None else 512), int(kv if kv is not None else n_kv)


class _Required:
    def __init__(self, d: dict[str, Any], where: str):
        self.d, self.where = d, where

    def get(self, key: str, typ: Any) -> Any:
        if key not in self.d:
            raise SpecError(f"{self.where}: missing required key {key!r}")
        v = self.d[key]
        if isinstance(v, bool) and typ in (int, float):
            raise SpecError(f"{self.where}: {key!r} has type bool")
        if not isinstance(v, typ):
            raise SpecError(f"{self.where}: {key!r} has type {type(v).__name__}")
        return v


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a JSON object")
    return data
