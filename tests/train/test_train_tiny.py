"""The training script: a rerun from its seed gives the same weights, in the released layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_tools.convert import convert
from gguf_tools.reader import GGUFFile

SCRIPT = Path(__file__).resolve().parents[2] / "train" / "train_tiny.py"


def train(out: Path, seed: int) -> bytes:
    subprocess.run([sys.executable, SCRIPT, "--steps", "2", "--batch", "4", "--seed", str(seed), "--out", out],
                   check=True, capture_output=True, timeout=300)
    return (out / "model.safetensors").read_bytes()


@pytest.mark.filterwarnings("ignore")
def test_rerun_from_seed_is_identical_and_in_released_layout(tmp_path):
    a, b, c = train(tmp_path / "a", 0), train(tmp_path / "b", 0), train(tmp_path / "c", 1)
    assert a == b and a != c
    train(tmp_path / "a", 0)  # saving over an existing model swaps folders and leaves nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["architectures"] == ["DiffusionGemmaForBlockDiffusion"] and cfg["model_type"] == "diffusion_gemma"
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).is_file()
    assert cfg["text_config"]["hidden_size"] % 256 == 0
    assert {"sliding_attention", "full_attention"} <= set(cfg["text_config"]["layer_types"])
    assert cfg["text_config"]["num_experts"] >= 8
    assert cfg["text_config"]["moe_intermediate_size"] % 256 and cfg["text_config"]["intermediate_size"] % 256
    out, _ = convert(tmp_path / "a", tmp_path / "a.gguf", "Q4_K_M")  # every tensor the converter expects
    types = {t.qtype.name for t in GGUFFile(out).tensors.values()}
    assert {"Q4_K", "Q6_K"} <= types and types - {"Q4_K", "Q6_K", "F32"}  # K-quants and a fallback for 176/272
