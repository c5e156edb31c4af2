"""HF checkpoint names -> GGUF tensor names, with shapes, as data.

NumPy shape order everywhere (GGUF ``ne`` is the reverse). Source of the table:
shared/reference/diffusiongemma-arch.md §4.2 (llama.cpp gemma4 TensorNameMap + PR 24423).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .arch import ARCH, ArchSpec

DECODER = "model.decoder."  # all shared text weights live here in the released checkpoint
ENCODER_LAYERS = "model.encoder.language_model.layers."  # only the untied layer_scalar buffers
SKIPPED_PREFIXES = (  # vision tower: a text GGUF drops it, as llama.cpp does (mmproj is separate)
    "model.encoder.vision_tower.",
    "model.encoder.embed_vision.",
)
TIED_ALIASES = ("lm_head.weight",)  # tied to the embedding; llama.cpp writes no output.weight

Shape = Callable[[ArchSpec, int], tuple[int, ...]]


def _h(s: ArchSpec, _: int) -> tuple[int, ...]:
    return (s.embedding_length,)


# (GGUF name, HF name under DECODER, numpy shape) -- per layer, {bid} is the block number.
# A row whose HF name is None has no source in full layers (k_eq_v: no v_proj).
LAYER_TABLE: list[tuple[str, str, Shape]] = [
    ("attn_norm.weight", "input_layernorm.weight", _h),
    ("attn_q.weight", "self_attn.q_proj.weight",
     lambda s, i: (s.head_count * s.layer(i).head_dim, s.embedding_length)),
    ("attn_k.weight", "self_attn.k_proj.weight",
     lambda s, i: (s.layer(i).n_kv_head * s.layer(i).head_dim, s.embedding_length)),
    ("attn_v.weight", "self_attn.v_proj.weight",  # sliding layers only
     lambda s, i: (s.layer(i).n_kv_head * s.layer(i).head_dim, s.embedding_length)),
    ("attn_output.weight", "self_attn.o_proj.weight",
     lambda s, i: (s.embedding_length, s.head_count * s.layer(i).head_dim)),
    ("attn_q_norm.weight", "self_attn.q_norm.weight", lambda s, i: (s.layer(i).head_dim,)),
    ("attn_k_norm.weight", "self_attn.k_norm.weight", lambda s, i: (s.layer(i).head_dim,)),
    ("post_attention_norm.weight", "post_attention_layernorm.weight", _h),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight", _h),  # dense-branch pre-norm
    ("ffn_gate.weight", "mlp.gate_proj.weight", lambda s, i: (s.feed_forward_length, s.embedding_length)),
    ("ffn_up.weight", "mlp.up_proj.weight", lambda s, i: (s.feed_forward_length, s.embedding_length)),
    ("ffn_down.weight", "mlp.down_proj.weight", lambda s, i: (s.embedding_length, s.feed_forward_length)),
    ("post_ffw_norm_1.weight", "post_feedforward_layernorm_1.weight", _h),
    ("ffn_gate_inp.weight", "router.proj.weight", lambda s, i: (s.expert_count, s.embedding_length)),
    ("ffn_gate_inp.scale", "router.scale", _h),  # gemma4 modify_tensors: '.scale' suffix
    ("ffn_down_exps.scale", "router.per_expert_scale", lambda s, i: (s.expert_count,)),
    ("pre_ffw_norm_2.weight", "pre_feedforward_layernorm_2.weight", _h),
    ("ffn_gate_up_exps.weight", "experts.gate_up_proj",  # kept fused, gate rows first
     lambda s, i: (s.expert_count, 2 * s.expert_feed_forward_length, s.embedding_length)),
    ("ffn_down_exps.weight", "experts.down_proj",
     lambda s, i: (s.expert_count, s.embedding_length, s.expert_feed_forward_length)),
    ("post_ffw_norm_2.weight", "post_feedforward_layernorm_2.weight", _h),
    ("post_ffw_norm.weight", "post_feedforward_layernorm.weight", _h),
    ("layer_output_scale.weight", "layer_scalar", lambda s, i: (1,)),  # converter appends '.weight'
]

GLOBAL_TABLE: list[tuple[str, str, Shape]] = [
    ("token_embd.weight", "embed_tokens.weight", lambda s, i: (s.vocab_size, s.embedding_length)),
    ("output_norm.weight", "norm.weight", _h),
]

# diffusion-gemma only (PR 24423 names)
SELF_COND_TABLE: list[tuple[str, str, Shape]] = [
    ("self_cond_pre_norm.weight", "self_conditioning.pre_norm.weight", _h),
    ("self_cond_gate.weight", "self_conditioning.gate_proj.weight",
     lambda s, i: (s.feed_forward_length, s.embedding_length)),
    ("self_cond_up.weight", "self_conditioning.up_proj.weight",
     lambda s, i: (s.feed_forward_length, s.embedding_length)),
    ("self_cond_down.weight", "self_conditioning.down_proj.weight",
     lambda s, i: (s.embedding_length, s.feed_forward_length)),
]
ENC_SCALE = "enc_layer_output_scale.weight"  # from ENCODER_LAYERS{L}.layer_scalar
ROPE_FREQS = "rope_freqs.weight"  # generated, used by full layers only


@dataclass(frozen=True)
class TensorEntry:
    name: str  # GGUF name
    source: str | None  # HF name, or None for generated tensors
    shape: tuple[int, ...]  # NumPy order

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def block(self) -> int | None:
        m = re.match(r"blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None


def expected_tensors(spec: ArchSpec, arch: str = ARCH) -> list[TensorEntry]:
    """Every tensor of the GGUF, in llama-quantize's order (non-block first, then by block, by name)."""
    out = [TensorEntry(g, DECODER + h, shape(spec, 0)) for g, h, shape in GLOBAL_TABLE]
    out.append(TensorEntry(ROPE_FREQS, None, (spec.key_length // 2,)))
    if arch == ARCH:
        out += [TensorEntry(g, DECODER + h, shape(spec, 0)) for g, h, shape in SELF_COND_TABLE]
    for i in range(spec.block_count):
        block: list[TensorEntry] = []
        for g, h, shape in LAYER_TABLE:
            if g == "attn_v.weight" and spec.layer(i).k_eq_v:
                continue
            block.append(TensorEntry(f"blk.{i}.{g}", f"{DECODER}layers.{i}.{h}", shape(spec, i)))
        if arch == ARCH:
            block.append(TensorEntry(f"blk.{i}.{ENC_SCALE}", f"{ENCODER_LAYERS}{i}.layer_scalar", (1,)))
        out += sorted(block, key=lambda t: t.name)
    return sorted(out, key=lambda t: (t.block is not None, t.block or 0, t.name))


def is_skipped(hf_name: str) -> bool:
    return hf_name.startswith(SKIPPED_PREFIXES)


class NameError_(KeyError):
    pass


def match_checkpoint(spec: ArchSpec, hf_names: list[str], arch: str = ARCH) -> tuple[list[TensorEntry], list[str]]:
    """Check a checkpoint's keys against the table.

    Returns (entries, skipped HF names). Raises ValueError naming the first unknown or missing tensor.
    """
    entries = expected_tensors(spec, arch)
    wanted = {e.source for e in entries if e.source is not None}
    present = set(hf_names)
    skipped = sorted(n for n in present if is_skipped(n) or n in TIED_ALIASES)
    unknown = sorted(present - wanted - set(skipped))
    if arch != ARCH:  # a gemma4 copy leaves the diffusion-only tensors behind on purpose
        unknown = [n for n in unknown if not (n.startswith(ENCODER_LAYERS) or ".self_conditioning." in n)]
    if unknown:
        raise ValueError(f"unknown tensor in checkpoint: {unknown[0]}" + _more(unknown))
    missing = sorted(wanted - present)
    if missing:
        raise ValueError(f"missing tensor in checkpoint: {missing[0]}" + _more(missing))
    return entries, skipped


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
