"""diffusion-gemma GGUFs made the way the community made theirs, written without any of gguf_tools' code.

The pinned PR #24423 tarball carries only the C++ side; its converter (`conversion/diffusion_gemma.py`, a
`Gemma4Model` subclass, read in the ggml-org/llama.cpp tree) is not in it and needs a gguf-py newer than the
0.19.0 we pin (MODEL_ARCH.DIFFUSION_GEMMA). So `write_community_gguf` follows that converter step by step with
gguf-py's own GGUFWriter, vocabulary classes and quantizers:

- names: `model.decoder.` -> `model.`, then the Gemma 4 tensor map; the encoder's `layer_scalar` buffers become
  `blk.N.enc_layer_output_scale.weight`, `self_conditioning.*` the `self_cond_*` tensors, vision is dropped;
  `router.scale` -> `ffn_gate_inp.scale`, `router.per_expert_scale` -> `ffn_down_exps.scale`; experts stay
  fused (`ffn_gate_up_exps`) unless `split_experts`, the layout older conversions used;
- order: `rope_freqs.weight` first (generate_extra_tensors), then the checkpoint's tensors in its key order
  (the encoder scalars come last), not llama-quantize's loader order as in our files;
- keys: TextModel, then Gemma3Model, Gemma4Model and DiffusionGemmaModel's set_gguf_parameters, in that
  order; `diffusion.eb_*` only for the generation_config.json entries present (`eb_keys=False`: none, as
  for a checkpoint without one);
- types: 1-D tensors, `*_norm.weight` and the router F32, the rest `outtype` (Q8_0 falls back to F16 where a
  row is not whole blocks, as gguf-py's quantizer refuses it);
- vocabulary: gguf-py's LlamaHfVocab and SpecialVocab, as Gemma4Model.set_vocab.

Quantized community files are this file run through the PR's own llama-quantize (tests/oracles/llamacpp_pr).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    LlamaHfVocab,
    SpecialVocab,
    TokenType,
)
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

ARCH = "diffusion-gemma"

# Gemma 4 TensorNameMap rows this model uses (HF name after `model.decoder.` -> `model.`), and the PR's extras
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "model.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
           "model.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
           "model.self_conditioning.up_proj.weight": "self_cond_up.weight",
           "model.self_conditioning.down_proj.weight": "self_cond_down.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight",
          "post_attention_layernorm.weight": "post_attention_norm.weight",
          "pre_feedforward_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
          "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
          "router.proj.weight": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
          "router.per_expert_scale": "ffn_down_exps.scale",
          "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
          "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
          "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
          "post_feedforward_layernorm.weight": "post_ffw_norm.weight", "layer_scalar": "layer_output_scale.weight"}
_OUTTYPES = {"F32": (Q.F32, LlamaFileType.ALL_F32), "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
             "BF16": (Q.BF16, LlamaFileType.MOSTLY_BF16), "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
            '<|"|>'}


def _checkpoint(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for part in sorted(folder.glob("*.safetensors")):
        try:
            out.update(load_file(str(part)))
        except TypeError:  # bf16 shards: numpy has no bfloat16, read through torch
            from safetensors.torch import load_file as load_torch

            out.update({k: v.float().numpy() for k, v in load_torch(str(part)).items()})
    return {k: out[k] for k in sorted(out)}


def _gguf_name(hf: str) -> str | None:
    m = re.match(r"model\.encoder\.(?:language_model\.)?layers\.(\d+)\.layer_scalar$", hf)
    if m:
        return f"blk.{m[1]}.enc_layer_output_scale.weight"
    if hf.startswith("model.encoder.") or hf == "lm_head.weight":
        return None  # vision tower, embed_vision; the tied head
    name = "model." + hf[len("model.decoder."):] if hf.startswith("model.decoder.") else hf
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if m and m[2] in _LAYER:
        return f"blk.{m[1]}.{_LAYER[m[2]]}"
    raise ValueError(f"the community converter has no mapping for {hf}")


def _keeps_f32(name: str, data: np.ndarray) -> bool:
    return data.ndim <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight")


def _encode(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    if qtype == Q.F32:
        return data.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return data.astype(np.float16), Q.F16
    try:
        return gq.quantize(data.astype(np.float32), qtype), qtype
    except gq.QuantError:
        return data.astype(np.float16), Q.F16


def write_community_gguf(src: Path, out: Path, outtype: str = "BF16", split_experts: bool = False,
                         eb_keys: bool = True) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    tc = cfg["text_config"]
    gen_path = src / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if eb_keys and gen_path.is_file() else {}
    qtype, ftype = _OUTTYPES[outtype]
    types = tc["layer_types"]
    swa = [t == "sliding_attention" for t in types]
    full = next(i for i, t in enumerate(types) if t == "full_attention")
    per_layer = tc.get("per_layer_config") or {}  # transformers 5.x saves the full-layer geometry here
    head_full = tc.get("global_head_dim") or per_layer[str(full)]["head_dim"]
    kv_full = tc.get("num_global_key_value_heads") or per_layer[str(full)]["num_key_value_heads"]
    rope = tc["rope_parameters"]

    w = GGUFWriter(out, ARCH)
    w.add_name(src.name)
    # TextModel.set_gguf_parameters
    w.add_block_count(tc["num_hidden_layers"])
    w.add_context_length(tc["max_position_embeddings"])
    w.add_embedding_length(tc["hidden_size"])
    w.add_feed_forward_length(tc["intermediate_size"])
    w.add_head_count(tc["num_attention_heads"])
    w.add_head_count_kv(tc["num_key_value_heads"])
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(tc.get("rms_norm_eps", 1e-6))
    w.add_expert_count(tc["num_experts"])
    w.add_expert_used_count(tc["top_k_experts"])
    w.add_file_type(ftype)
    # Gemma3Model
    w.add_key_length(tc["head_dim"])
    w.add_value_length(tc["head_dim"])
    w.add_final_logit_softcapping(tc.get("final_logit_softcapping", 30.0))
    w.add_sliding_window(tc["sliding_window"])
    # Gemma4Model (num_kv_shared_layers / hidden_size_per_layer_input set to 0 by DiffusionGemmaModel)
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(0)
    w.add_sliding_window_pattern(swa)
    w.add_key_length(head_full)
    w.add_value_length(head_full)
    w.add_key_length_swa(tc["head_dim"])
    w.add_value_length_swa(tc["head_dim"])
    w.add_expert_feed_forward_length(tc["moe_intermediate_size"])
    w.add_head_count_kv([tc["num_key_value_heads"] if s else kv_full for s in swa])
    w.add_rope_dimension_count(head_full)
    w.add_rope_dimension_count_swa(int(tc["head_dim"] * rope["sliding_attention"].get("partial_rotary_factor", 1.0)))
    # DiffusionGemmaModel
    w.add_causal_attention(False)
    w.add_uint32("diffusion.canvas_length", int(cfg["canvas_length"]))
    sampler = gen.get("sampler_config", {})
    for key, value, add in (("eb_max_steps", gen.get("max_denoising_steps"), w.add_uint32),
                            ("eb_t_min", gen.get("t_min"), w.add_float32),
                            ("eb_t_max", gen.get("t_max"), w.add_float32),
                            ("eb_entropy_bound", sampler.get("entropy_bound"), w.add_float32),
                            ("eb_stability_threshold", gen.get("stability_threshold"), w.add_uint32),
                            ("eb_confidence_threshold", gen.get("confidence_threshold"), w.add_float32)):
        if value is not None:
            add(f"diffusion.{key}", value)
    _add_vocab(w, src)

    tensors: list[tuple[str, np.ndarray]] = []
    n_rot = int(head_full * rope["full_attention"]["partial_rotary_factor"] / 2)
    tensors.append(("rope_freqs.weight", np.array([1.0] * n_rot + [1e30] * (head_full // 2 - n_rot), np.float32)))
    F = tc["moe_intermediate_size"]
    for hf, data in _checkpoint(src).items():
        name = _gguf_name(hf)
        if name is None:
            continue
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 0:
            data = data.reshape(1)
        if split_experts and name.endswith("ffn_gate_up_exps.weight"):
            tensors.append((name.replace("gate_up", "gate"), data[:, :F]))
            tensors.append((name.replace("gate_up", "up"), data[:, F:]))
        else:
            tensors.append((name, data))
    for name, data in tensors:
        enc, t = _encode(data, Q.F32 if _keeps_f32(name, data) else qtype)
        w.add_tensor(name, enc, raw_dtype=t if t not in (Q.F32, Q.F16) else None)
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add_vocab(w: GGUFWriter, src: Path) -> None:
    vocab = LlamaHfVocab(src)
    tokens, scores, toktypes = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        toktypes.append(TokenType.USER_DEFINED if text.decode() in _VISIBLE else toktype)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    SpecialVocab(src, load_merges=True).add_to_gguf(w)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def split_experts(src: Path, out: Path) -> Path:
    """Copy a GGUF with every fused ffn_gate_up_exps tensor split into ffn_gate_exps + ffn_up_exps (rows stay
    whole blocks, so quantized data is sliced, not re-encoded). Read with gguf-py's GGUFReader."""
    r = GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = GGUFWriter(out, arch)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        data = np.asarray(t.data)
        raw = None if t.tensor_type in (Q.F32, Q.F16) else t.tensor_type
        if t.name.endswith("ffn_gate_up_exps.weight"):
            half = data.shape[1] // 2
            w.add_tensor(t.name.replace("gate_up", "gate"), np.ascontiguousarray(data[:, :half]), raw_dtype=raw)
            w.add_tensor(t.name.replace("gate_up", "up"), np.ascontiguousarray(data[:, half:]), raw_dtype=raw)
        else:
            w.add_tensor(t.name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
