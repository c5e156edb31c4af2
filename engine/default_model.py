"""The embedded default model: a tiny random DiffusionGemma, built and converted on first use.

It is written in the released checkpoint layout by gguf_tools.synthetic and converted by the same
converter users run, so `diffgemma run` with no model exercises the whole pipeline. Its weights are
random: the text it prints is noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gguf_tools.convert import convert
from gguf_tools.presets import DEFAULT_TYPE
from gguf_tools.synthetic import tiny_config, write_checkpoint, write_tokenizer

NAME = "diffgemma-tiny-random-v1"
SEED = 1234


def cache_dir() -> Path:
    root = os.environ.get("DIFFGEMMA_CACHE") or Path.home() / ".cache" / "diffgemma"
    return Path(root)


def default_model_path() -> Path:
    """The cached GGUF, built on first call. A crash midway leaves no file; the next call rebuilds."""
    out = cache_dir() / f"{NAME}-{DEFAULT_TYPE}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        src = Path(tmp) / NAME
        cfg, gen = tiny_config()
        write_checkpoint(src, cfg, gen, seed=SEED)
        write_tokenizer(src, cfg["text_config"]["vocab_size"])
        convert(src, out, DEFAULT_TYPE)
        shutil.rmtree(src, ignore_errors=True)
    return out
