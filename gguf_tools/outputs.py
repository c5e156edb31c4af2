"""Checks on an output path before anything is written: it must not be one of the command's inputs.

`quantize ckpt -o ckpt/model.safetensors` once replaced the checkpoint with a GGUF; the rename of a
finished temporary file (gguf_tools.atomic) protects a target from a half-written file, not from the
wrong target. So an output that resolves to an input file (through a symlink, `..` or a hard link),
or to any file inside an input checkpoint folder, is refused first, and a missing or read-only
output folder is named before the work starts rather than after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot or must not be written; the message names it."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def input_files(inputs: Iterable[Path | str | None]) -> list[Path]:
    """The files the inputs stand for: a file itself, every file of a folder (a checkpoint's config,
    tokenizer and shards)."""
    files: list[Path] = []
    for p in inputs:
        if p is None:
            continue
        p = Path(p)
        if p.is_dir():
            files += [f for f in p.iterdir() if f.is_file()]
        else:
            files.append(p)
    return files


def check_output_path(out: Path | str, inputs: Iterable[Path | str | None] = ()) -> Path:
    """`out` when it may be written: not an input file or a file inside an input folder, not a
    folder, in a folder that exists and is writable. Returns it unchanged."""
    out = Path(out)
    for f in input_files(inputs):
        if _same_file(out, f):
            raise OutputError(f"output {out} is the input file {f}; choose another output path "
                              "(nothing was written)")
    if out.is_dir():
        raise OutputError(f"output path {out} is a directory")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable")
    return out


__all__ = ["OutputError", "check_output_path", "input_files"]
