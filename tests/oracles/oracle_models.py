"""The models the llama.cpp oracle tests run, and the inputs they feed them.

Three checkpoints in the released layout, chosen so that every structural feature and every type fallback of
`quantize` shows up in some file:

- `sort`: the trained model shipped under models/ (hidden 256, four layers of which two are k_eq_v full
  layers, 8 experts with top-2 routing, window 32). Its dense (272) and expert (176) widths are not whole
  32-blocks, so every quantized preset falls back to F16 there.
- `narrow`: random, hidden 64 (every K-quant and IQ4_XS row falls back to a 32-block type: Q5_0, Q5_1, Q8_0,
  IQ4_NL), window 8, three layers with the full one last.
- `wide`: random, hidden 256 (K-quants proper) with an expert width of 96 (32-block fallback for the experts
  only), the full layer first, window 4.

Random weights are scaled to keep the models well conditioned: trained attention is not one-hot, so the
q/k norm weights are head_dim^-1/4 (scores of order 1, not of order sqrt(head_dim)), and every expert is
used (top-k = n) so that no routing decision sits on a tie. Without that, a 1e-3 change of one activation
flips a top-2 choice or the winner of a sharp softmax and moves logits by tens of percent, in llama.cpp and
in our engine alike, and the comparison would measure that chaos instead of the file. The trained `sort`
model keeps its top-2 routing and is the routing check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gguf_tools.arch import ArchSpec
from gguf_tools.names import expected_tensors
from gguf_tools.synthetic import tiny_config, write_tokenizer

SORT_MODEL = Path(__file__).resolve().parents[2] / "models" / "diffgemma-sort-tiny"
VOCAB = 512


@dataclass(frozen=True)
class Subject:
    name: str
    prompt_len: int  # longer than the sliding window, so the window clips what the canvas sees
    text: dict[str, Any] | None = None  # text_config overrides of gguf_tools.synthetic.tiny_config (random)
    canvas_length: int = 16


SUBJECTS = {
    "sort": Subject("sort", prompt_len=40),
    "narrow": Subject("narrow", prompt_len=12, text=dict(top_k_experts=4)),
    "wide": Subject("wide", prompt_len=9, text=dict(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=96, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"], num_hidden_layers=3,
        num_experts=4, top_k_experts=4)),
}


def write_random_checkpoint(folder: Path, text: dict[str, Any], canvas_length: int = 16, seed: int = 0) -> Path:
    """A float32 checkpoint in the released layout with well-conditioned random weights (see module doc)."""
    from safetensors.numpy import save_file

    cfg, gen = tiny_config(VOCAB)
    cfg["canvas_length"] = canvas_length
    cfg["text_config"].update(text)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1))
    spec = ArchSpec.from_hf_config(cfg, gen)
    rng = np.random.default_rng(seed)
    tensors = {}
    for e in expected_tensors(spec):
        if e.source is None:
            continue
        if e.source.endswith(("q_norm.weight", "k_norm.weight")):
            x = e.shape[0] ** -0.25 * (1 + 0.1 * rng.standard_normal(e.shape))  # q.k of order 1
        elif len(e.shape) == 1:
            x = 1 + 0.1 * rng.standard_normal(e.shape)
        elif e.source.endswith("embed_tokens.weight"):
            x = rng.standard_normal(e.shape)
        else:
            x = rng.standard_normal(e.shape) / np.sqrt(e.shape[-1])
        tensors[e.source] = x.astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    write_tokenizer(folder, VOCAB)
    return folder


def checkpoint(name: str, root: Path) -> Path:
    """The checkpoint folder of subject `name` (random ones are written under `root`)."""
    s = SUBJECTS[name]
    if s.text is None:
        return SORT_MODEL
    return write_random_checkpoint(root / name, s.text, s.canvas_length)


def inputs(name: str, canvas_length: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Fixed random prompt (starting with <bos>) and canvas ids for subject `name`."""
    rng = np.random.default_rng(seed)
    prompt = [2] + rng.integers(3, VOCAB, SUBJECTS[name].prompt_len - 1).tolist()
    return prompt, rng.integers(3, VOCAB, canvas_length).tolist()
