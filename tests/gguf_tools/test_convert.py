"""Conversion of transformers-made tiny checkpoints, checked with gguf-py and llama.cpp's own reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_tools import convert as conv
from gguf_tools.arch import ARCH, ArchSpec
from gguf_tools.names import expected_tensors
from gguf_tools.reader import GGUFFile
from tests.oracles import ggml_lib

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# worst error of a dequantized weight relative to the largest |value| of its row: a block's scale
# step is amax/127 (Q8_0), amax/8 when the clamped side loses a step (Q4_0), (max-min)/15 (Q4_1) ...
# (plus the fp16 rounding of the scale itself: up to 2^-11 of the largest code)
TOLERANCE = {"F32": 0.0, "BF16": 0.0, "Q8_0": 0.57 / 127, "Q5_0": 1.07 / 16, "Q5_1": 1.07 / 31,
             "Q4_0": 1.07 / 8, "Q4_1": 1.07 / 15}


def hf_tensor(model: torch.nn.Module, hf_name: str) -> np.ndarray:
    return model.state_dict()[hf_name].detach().float().numpy()  # state_dict keeps tied aliases


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    src, _ = tiny_ckpt
    out_dir = tmp_path_factory.mktemp("converted")
    return {t: conv.convert(src, out_dir / f"tiny-{t}.gguf", t)[0] for t in TYPES}


@pytest.mark.parametrize("type_name", TYPES)
def test_every_tensor_round_trips(converted, tiny_ckpt, type_name):
    src, model = tiny_ckpt
    path = converted[type_name]
    ours = GGUFFile(path)
    theirs = ggml_lib.read_gguf(path)
    spec = ArchSpec.from_hf_dir(src)
    expected = expected_tensors(spec)
    assert list(ours.tensors) == [e.name for e in expected] == list(theirs.tensors)
    for e in expected:
        t, g = ours.tensors[e.name], theirs.tensors[e.name]
        assert t.shape == g.shape == e.shape, e.name
        assert t.qtype == g.qtype, e.name
        values = ggml_lib.tensor_values(path, g)
        if e.source is None:
            np.testing.assert_array_equal(values, np.asarray(spec.rope_freqs(), np.float32))
            continue
        ref = hf_tensor(model, e.source)
        if t.qtype == Q.F16:  # exactly the IEEE half rounding of the bf16 values
            np.testing.assert_array_equal(values, ref.astype(np.float16).astype(np.float32))
            continue
        tol = 0.0 if t.qtype == Q.F32 else TOLERANCE[type_name]
        rows = ref.reshape(-1, ref.shape[-1])
        err = np.abs(values.reshape(rows.shape) - rows).max(axis=1)
        assert (err <= tol * np.abs(rows).max(axis=1) + 1e-12).all(), f"{e.name}: {err.max()}"


def test_small_tensors_stay_f32_and_types_follow_request(converted):
    f = GGUFFile(converted["Q8_0"])
    for name, t in f.tensors.items():
        one_d = len([d for d in t.shape if d != 1]) <= 1
        if one_d or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight"):
            assert t.qtype == Q.F32, name
        else:
            assert t.qtype == Q.Q8_0, name
    assert f.kv["general.file_type"] == 7


def test_keys_match_the_spec(converted, tiny_ckpt):
    src, model = tiny_ckpt
    kv = ggml_lib.read_gguf(converted["BF16"]).kv
    tc = model.config.text_config
    a = ARCH
    assert kv["general.architecture"] == "diffusion-gemma"
    assert kv["general.file_type"] == 32 and kv["general.quantization_version"] == 2
    assert kv["general.name"] == src.name and kv["general.size_label"].startswith("4x")
    assert kv[f"{a}.block_count"] == 3
    assert kv[f"{a}.embedding_length"] == tc.hidden_size
    assert kv[f"{a}.feed_forward_length"] == tc.intermediate_size
    assert kv[f"{a}.attention.head_count"] == tc.num_attention_heads
    assert kv[f"{a}.attention.head_count_kv"] == [2, 2, 1]
    assert kv[f"{a}.attention.sliding_window_pattern"] == [True, True, False]
    assert kv[f"{a}.attention.key_length"] == kv[f"{a}.rope.dimension_count"] == 32
    assert kv[f"{a}.attention.key_length_swa"] == kv[f"{a}.rope.dimension_count_swa"] == 16
    assert kv[f"{a}.attention.sliding_window"] == 8
    assert kv[f"{a}.expert_count"] == 4 and kv[f"{a}.expert_used_count"] == 2
    assert kv[f"{a}.expert_feed_forward_length"] == 32
    assert kv[f"{a}.attention.causal"] is False
    assert kv[f"{a}.final_logit_softcapping"] == pytest.approx(30.0)
    assert kv[f"{a}.rope.freq_base"] == pytest.approx(1e6) and kv[f"{a}.rope.freq_base_swa"] == pytest.approx(1e4)
    assert kv["diffusion.canvas_length"] == 16
    assert kv["diffusion.eb_max_steps"] == 12
    assert kv["diffusion.eb_t_min"] == pytest.approx(0.4) and kv["diffusion.eb_t_max"] == pytest.approx(0.8)
    assert kv["diffusion.eb_entropy_bound"] == pytest.approx(0.1)
    assert kv["diffusion.eb_confidence_threshold"] == pytest.approx(0.005)
    assert kv["tokenizer.ggml.model"] == "gemma4"
    assert len(kv["tokenizer.ggml.tokens"]) == tc.vocab_size


def test_spec_round_trips_through_gguf(converted, tiny_ckpt):
    src, _ = tiny_ckpt
    spec = ArchSpec.from_hf_dir(src)
    back = GGUFFile(converted["F32"]).spec()
    assert back.with_(eos_token_ids=spec.eos_token_ids, sampler=spec.sampler.__class__(
        **{**back.sampler.__dict__, "max_new_tokens": spec.sampler.max_new_tokens})) == spec
    assert set(back.eos_token_ids) == {1, 106, 50}


def test_chunked_streaming_gives_identical_bytes(tiny_ckpt, converted, tmp_path, monkeypatch):
    src, _ = tiny_ckpt
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 100)  # forces many chunks per tensor
    for t in ("BF16", "Q4_1"):
        out, _ = conv.convert(src, tmp_path / f"{t}.gguf", t)
        assert out.read_bytes() == converted[t].read_bytes()


def test_mapping_uses_the_right_sources(converted, tiny_ckpt):
    _, model = tiny_ckpt
    f = GGUFFile(converted["F32"])
    get = lambda n: np.asarray(f.tensors[n].data).reshape(f.tensors[n].shape)  # noqa: E731
    np.testing.assert_array_equal(get("blk.1.enc_layer_output_scale.weight"),
                                  hf_tensor(model, "model.encoder.language_model.layers.1.layer_scalar"))
    np.testing.assert_array_equal(get("blk.1.layer_output_scale.weight"),
                                  hf_tensor(model, "model.decoder.layers.1.layer_scalar"))
    np.testing.assert_array_equal(get("blk.2.ffn_gate_up_exps.weight"),
                                  hf_tensor(model, "model.decoder.layers.2.experts.gate_up_proj"))
    np.testing.assert_array_equal(get("blk.0.ffn_down_exps.scale"),
                                  hf_tensor(model, "model.decoder.layers.0.router.per_expert_scale"))
    assert "blk.2.attn_v.weight" not in f.tensors and "blk.1.attn_v.weight" in f.tensors
    assert not any("vision" in n for n in f.tensors)


def test_dry_run_on_the_released_config(reference_config):
    plan = conv.plan_conversion(reference_config, "BF16")
    assert len(plan.tensors) == 692
    assert plan.total_bytes / 2**30 == pytest.approx(47.0, abs=0.1)
    assert sum(1 for t in plan.tensors if t.qtype == Q.BF16) == 269
    assert dict((k, v) for k, v, _ in plan.kv)["general.size_label"] == "128x2.6B"
