"""Tiny DiffusionGemma checkpoints made by transformers itself (the reference layout).

`save_pretrained` of `DiffusionGemmaForBlockDiffusion` gives exactly the released checkpoint's names
(model.decoder.*, the encoder's layer_scalar buffers, the vision tower), sharded with an index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_TEXT: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
    max_position_embeddings=1024,
)
TINY_VISION: dict[str, Any] = dict(
    model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, head_dim=16,
)
TINY_GENERATION: dict[str, Any] = dict(
    max_new_tokens=32, max_denoising_steps=12, sampler_config={"_cls_name": "EntropyBoundSamplerConfig",
                                                              "entropy_bound": 0.1},
    t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005, eos_token_id=[1, 106, 50],
    pad_token_id=0,
)


def build_tiny_model(seed: int = 0, canvas_length: int = 16, **text_overrides: Any):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = {**TINY_TEXT, **text_overrides}
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=TINY_VISION, canvas_length=canvas_length,
                               eos_token_id=[1, 106, 50], pad_token_id=0, bos_token_id=2)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    _randomize(model, seed)
    return model


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm weights, scalars, router scales), so that a wrong
    mapping or a skipped multiply changes the logits."""
    g = torch.Generator().manual_seed(seed + 1)
    # state_dict holds what a checkpoint holds; non-persistent buffers (rope inv_freq, the embedding
    # scale) are derived from the config and must keep their values
    for name, p in model.state_dict(keep_vars=True).items():
        if not p.is_floating_point():
            continue
        if "layer_scalar" in name:
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def make_tiny_checkpoint(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                         canvas_length: int = 16, max_shard_size: str = "100KB",
                         with_tokenizer: bool = True, **text_overrides: Any):
    """Write a sharded tiny checkpoint in the released layout; return the (float32) model."""
    model = build_tiny_model(seed, canvas_length, **text_overrides)
    path.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    (path / "generation_config.json").write_text(json.dumps(TINY_GENERATION, indent=2))
    if with_tokenizer:
        from gguf_tools.tiny_tokenizer import write_tiny_tokenizer

        write_tiny_tokenizer(path, model.config.text_config.vocab_size)
    # the saved weights are `dtype`; the float32 model the tests compare against holds the same values
    return model.to(dtype).to(torch.float32)
