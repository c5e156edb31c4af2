"""The HF->GGUF name table against transformers' real checkpoint layout and the full-size counts."""

from __future__ import annotations

import json

import pytest

from gguf_tools.arch import ARCH, GEMMA4_ARCH, ArchSpec, SpecError
from gguf_tools.names import expected_tensors, match_checkpoint
from gguf_tools.safetensors_io import Checkpoint
from gguf_tools.synthetic import tiny_config, write_checkpoint


def test_every_checkpoint_tensor_maps_exactly_once(tiny_ckpt):
    src, _ = tiny_ckpt
    spec = ArchSpec.from_hf_dir(src)
    names = list(Checkpoint(src).tensors)
    entries, skipped = match_checkpoint(spec, names)
    sources = [e.source for e in entries if e.source]
    assert len(sources) == len(set(sources))
    assert set(sources) | set(skipped) == set(names)
    assert skipped and all("vision" in n or "embed_vision" in n for n in skipped)


def test_unknown_and_missing_tensors_are_named(tiny_ckpt):
    spec = ArchSpec.from_hf_dir(tiny_ckpt[0])
    names = list(Checkpoint(tiny_ckpt[0]).tensors)
    with pytest.raises(ValueError, match="unknown tensor in checkpoint: model.decoder.layers.0.mystery"):
        match_checkpoint(spec, names + ["model.decoder.layers.0.mystery"])
    with pytest.raises(ValueError, match="missing tensor in checkpoint: model.decoder.layers.1.router.scale"):
        match_checkpoint(spec, [n for n in names if n != "model.decoder.layers.1.router.scale"])


def test_full_size_counts(reference_config):
    spec = ArchSpec.from_hf_dir(reference_config)
    dg = expected_tensors(spec, ARCH)
    g4 = expected_tensors(spec, GEMMA4_ARCH)
    assert len(dg) == 692 and len(g4) == 658
    full = [i for i in range(30) if not spec.sliding_window_pattern[i]]
    assert full == [5, 11, 17, 23, 29]
    names = {e.name for e in dg}
    assert all(f"blk.{i}.attn_v.weight" not in names for i in full)
    assert {e.name: e.shape for e in dg}["blk.5.attn_q.weight"] == (8192, 2816)
    assert {e.name: e.shape for e in dg}["blk.0.ffn_gate_up_exps.weight"] == (128, 1408, 2816)
    assert spec.rope_freqs() == [1.0] * 64 + [1e30] * 192
    params = sum(e.n_elements for e in dg if e.source)
    assert params == pytest.approx(25.233e9 + 17.845e6, rel=1e-4)


def test_released_config_geometry(reference_config):
    spec = ArchSpec.from_hf_dir(reference_config)
    sliding, full = spec.layer(0), spec.layer(5)
    assert (sliding.head_dim, sliding.n_kv_head, sliding.k_eq_v, sliding.rotated_pairs) == (256, 8, False, 128)
    assert (full.head_dim, full.n_kv_head, full.k_eq_v, full.rotated_pairs) == (512, 2, True, 64)
    assert spec.eos_token_ids == (1, 106, 50) and spec.canvas_length == 256
    assert spec.sampler.max_steps == 48 and spec.sampler.entropy_bound == pytest.approx(0.1)


def test_synthetic_writer_produces_the_transformers_layout(tiny_ckpt, tmp_path):
    """Benchmarks and the embedded default use our own writer; its names and shapes must be the
    ones transformers' save_pretrained gives (vision tower aside)."""
    src, _ = tiny_ckpt
    cfg = json.loads((src / "config.json").read_text())
    ours = Checkpoint(write_checkpoint(tmp_path / "syn", cfg, {}))
    theirs = Checkpoint(src)
    text = {n: t.shape for n, t in theirs.tensors.items() if "vision" not in n}
    assert {n: t.shape for n, t in ours.tensors.items()} == text


def test_bad_configs_are_refused():
    cfg, gen = tiny_config()
    cfg["text_config"]["layer_types"][-1] = "sliding_attention"
    with pytest.raises(SpecError, match="last layer"):
        ArchSpec.from_hf_config(cfg, gen)
    cfg, gen = tiny_config()
    del cfg["text_config"]["num_experts"]
    with pytest.raises(SpecError, match="num_experts"):
        ArchSpec.from_hf_config(cfg, gen)
    cfg, gen = tiny_config()
    cfg["model_type"] = "llama"
    with pytest.raises(SpecError, match="not a DiffusionGemma"):
        ArchSpec.from_hf_config(cfg, gen)
