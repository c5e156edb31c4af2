"""Synthetic checkpoints with the released layout and real shapes, generated on the fly.

Weights are random bf16 written tensor by tensor (a minimal safetensors writer), so a full-width
multi-GB checkpoint never has to sit in memory. Used by the benchmarks; never committed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .arch import ArchSpec
from .names import expected_tensors

SHARD_BYTES = 2 * 2**30


def full_size_config(reference: Path, n_layers: int) -> tuple[dict, dict]:
    cfg = json.loads((reference / "config.json").read_text())
    gen = json.loads((reference / "generation_config.json").read_text())
    tc = cfg["text_config"]
    types = tc["layer_types"][:n_layers]
    types[-1] = "full_attention"
    tc.update(num_hidden_layers=n_layers, layer_types=types)
    return cfg, gen


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator, scale: float, offset: float = 0.0) -> np.ndarray:
    x = (rng.standard_normal(shape, dtype=np.float32) * scale + np.float32(offset)).view(np.uint32)
    return (x >> 16).astype(np.uint16)  # truncation is fine for random data


def write_checkpoint(folder: Path, cfg: dict, gen: dict, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1))
    spec = ArchSpec.from_hf_config(cfg, gen)
    rng = np.random.default_rng(seed)
    sources = [(e.source, e.shape) for e in expected_tensors(spec) if e.source is not None]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in sources:
        n = 2 * int(np.prod(shape))
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(folder / fname, group, rng)
        weight_map.update({name: fname for name, _ in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _write_shard(path: Path, group: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    header, offset = {}, 0
    for name, shape in group:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in group:
            scale = 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5
            if len(shape) == 1:  # norms, scales and scalars sit near 1, as trained ones do
                f.write(random_bf16(shape, rng, 0.1, 1.0).tobytes())
                continue
            rows = shape[0]
            step = max(1, (64 * 2**20) // (2 * int(np.prod(shape[1:]))))
            for start in range(0, rows, step):
                sub = (min(rows, start + step) - start, *shape[1:])
                f.write(random_bf16(sub, rng, scale).tobytes())


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from .tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(folder, vocab_size)


__all__ = ["full_size_config", "write_checkpoint", "write_tokenizer"]


def tiny_config(vocab_size: int = 512) -> tuple[dict, dict]:
    """A tiny random DiffusionGemma with every structural feature of the real one (sliding and
    k_eq_v full layers, MoE beside the dense MLP, self-conditioning): the embedded default until a
    trained small model ships."""
    text = dict(model_type="diffusion_gemma_text", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                global_head_dim=32, num_global_key_value_heads=1, sliding_window=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"], num_experts=4,
                top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
                final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                    "rope_theta": 1000000.0}})
    cfg = dict(architectures=["DiffusionGemmaForBlockDiffusion"], model_type="diffusion_gemma", canvas_length=32,
               eos_token_id=[1, 106, 50], pad_token_id=0, bos_token_id=2, tie_word_embeddings=True,
               text_config=text)
    gen = dict(max_new_tokens=64, max_denoising_steps=16, sampler_config={"entropy_bound": 0.1}, t_min=0.4,
               t_max=0.8, stability_threshold=1, confidence_threshold=0.005, eos_token_id=[1, 106, 50],
               pad_token_id=0)
    return cfg, gen
