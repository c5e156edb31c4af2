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
from gguf_tools.validate import GGUFError, validate_gguf

NAME = "diffgemma-tiny-random-v1"
SEED = 1234


def cache_dir() -> Path:
    root = os.environ.get("DIFFGEMMA_CACHE") or Path.home() / ".cache" / "diffgemma"
    return Path(root)


def default_model_path() -> Path:
    """The cached GGUF, built on first call. A crash midway leaves no GGUF (the converter writes a
    temporary file and renames it); the next call removes what a killed build left and rebuilds."""
    out = cache_dir() / f"{NAME}-{DEFAULT_TYPE}.gguf"
    if out.is_file():
        try:
            validate_gguf(out, check_model=False)  # a damaged cache (disk trouble, hand edits) is rebuilt
            return out
        except GGUFError:
            out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out.parent)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".build-{os.getpid()}-") as tmp:
        src = Path(tmp) / NAME
        cfg, gen = tiny_config()
        write_checkpoint(src, cfg, gen, seed=SEED)
        write_tokenizer(src, cfg["text_config"]["vocab_size"])
        convert(src, out, DEFAULT_TYPE)
        shutil.rmtree(src, ignore_errors=True)
    return out


def _remove_stale_builds(folder: Path) -> None:
    """Build folders (`.build-{pid}-*`) of processes killed midway; a running build's is left alone."""
    from gguf_tools.atomic import pid_alive

    for d in folder.glob(".build-*"):
        pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
