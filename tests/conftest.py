"""Shared fixtures: tiny transformers-made checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_checkpoint

REFERENCE_CONFIG = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_config() -> Path:
    if not (REFERENCE_CONFIG / "config.json").is_file():
        pytest.skip("shared/reference config not found beside the checkout")
    return REFERENCE_CONFIG


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """bf16 tiny checkpoint, sharded, with vision tower and tokenizer; and its float32 model."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-dg"
    model = make_tiny_checkpoint(path, dtype=torch.bfloat16)
    return path, model


@pytest.fixture(scope="session")
def tiny_gguf(tiny_ckpt, tmp_path_factory) -> Path:
    """The bf16 tiny checkpoint converted by our converter (BF16, lossless): the engine's test file."""
    from gguf_tools.convert import convert

    out, _ = convert(tiny_ckpt[0], tmp_path_factory.mktemp("tiny-gguf") / "tiny-BF16.gguf", "BF16")
    return out


@pytest.fixture(scope="session")
def tiny_ckpt_f32(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("tiny32") / "tiny-dg-f32"
    model = make_tiny_checkpoint(path, dtype=torch.float32, seed=3)
    return path, model
