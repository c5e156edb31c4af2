"""A gemma4-architecture copy of a tiny checkpoint loads in llama.cpp and computes what transformers does.

llama.cpp has no diffusion-gemma graph in the pinned release, but it has gemma4, the same backbone.
If our names, shapes, tensor order and keys are what llama.cpp reads, its causal logits equal
transformers' Gemma4ForCausalLM run on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gguf_tools import convert as conv
from gguf_tools.arch import GEMMA4_ARCH
from gguf_tools.reader import GGUFFile

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT_LEN = 21  # longer than the tiny sliding window (8), so the window mask matters


def gemma4_causal_lm(dg_model: torch.nn.Module) -> torch.nn.Module:
    """transformers' autoregressive Gemma 4 with the diffusion model's decoder weights."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    tc = dg_model.config.text_config.to_dict()
    per_layer = tc.pop("per_layer_config")
    full = next(v for k, v in sorted(per_layer.items(), key=lambda x: int(x[0])))
    keep = {k: tc[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                               "sliding_window", "layer_types", "rope_parameters", "num_experts",
                               "top_k_experts", "moe_intermediate_size", "max_position_embeddings")}
    cfg = Gemma4TextConfig(**keep, global_head_dim=full["head_dim"],
                           num_global_key_value_heads=full["num_key_value_heads"], attention_k_eq_v=True,
                           enable_moe_block=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                           final_logit_softcapping=30.0, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    lm = Gemma4ForCausalLM(cfg).eval()
    src = dg_model.state_dict()
    state = {}
    for name in lm.state_dict():
        if name == "lm_head.weight":
            continue
        state[name] = src[name.replace("model.", "model.decoder.", 1)]
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    lm.tie_weights()
    return lm


@pytest.fixture(scope="module")
def gemma4_file(tiny_ckpt_f32, tmp_path_factory):
    src, _ = tiny_ckpt_f32
    out = tmp_path_factory.mktemp("g4") / "tiny-gemma4-F32.gguf"
    conv.convert(src, out, "F32", arch=GEMMA4_ARCH)
    return out


def test_gemma4_copy_has_only_backbone_tensors(gemma4_file):
    f = GGUFFile(gemma4_file)
    assert f.architecture == "gemma4"
    assert not any("self_cond" in n or "enc_layer_output_scale" in n for n in f.tensors)
    assert not any(k.startswith("diffusion.") for k in f.kv)


def test_llamacpp_logits_match_transformers(gemma4_file, tiny_ckpt_f32):
    _, model = tiny_ckpt_f32
    vocab = model.config.text_config.vocab_size
    tokens = [2] + [int(t) for t in torch.randint(200, vocab, (PROMPT_LEN - 1,),
                                                  generator=torch.Generator().manual_seed(7))]
    llm = llama_cpp.Llama(model_path=str(gemma4_file), n_ctx=64, n_batch=64, logits_all=True, n_threads=2,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)  # F32 KV cache
    llm.eval(tokens)
    ours = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    with torch.no_grad():
        ref = gemma4_causal_lm(model)(torch.tensor([tokens])).logits[0].double().numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 5e-3, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
