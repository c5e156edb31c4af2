"""The embedded default model: the small trained DiffusionGemma shipped under models/, converted on
first use.

The checkpoint (models/diffgemma-sort-tiny, trained by train/train_tiny.py to sort lists of digits)
is in the released layout and is converted by the same converter users run, so `diffgemma run` with
no model exercises the whole pipeline and prints checkable answers ("Sort: 3 1 2" -> "1 2 3"). The
cached file's name carries a digest of the checkpoint, so a retrained model is converted afresh.
The checkpoint ships inside the installed package (engine/models/ in a wheel, models/ in a checkout).

Failures say what to do in one line (DefaultModelError): a cache folder that cannot be written names
DIFFGEMMA_CACHE; a checkpoint that cannot be converted (a damaged install, a file overwritten by
hand) names its folder and how to restore it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from gguf_tools.convert import ConversionError, convert
from gguf_tools.errors import USER_ERRORS
from gguf_tools.package_data import data_dir
from gguf_tools.presets import DEFAULT_TYPE
from gguf_tools.validate import GGUFError, validate_gguf

NAME = "diffgemma-sort-tiny"
SHIPPED = data_dir(Path(__file__).resolve().parent, "models") / NAME


class DefaultModelError(RuntimeError):
    """The built-in model cannot be used; the message says why and what to do."""


def cache_dir() -> Path:
    root = os.environ.get("DIFFGEMMA_CACHE") or Path.home() / ".cache" / "diffgemma"
    return Path(root)


def default_model_path() -> Path:
    """The cached GGUF, built on first call. A crash midway leaves no GGUF (the converter writes a
    temporary file and renames it); the next call removes what a killed build left and rebuilds."""
    if not (SHIPPED / "config.json").is_file():
        raise DefaultModelError(f"the built-in model's checkpoint is missing ({SHIPPED}): reinstall diffgemma, "
                                "or pass a MODEL.gguf")
    out = cache_dir() / f"{NAME}-{_digest(SHIPPED)}-{DEFAULT_TYPE}.gguf"
    if out.is_file():
        try:
            validate_gguf(out, check_model=False)  # a damaged cache (disk trouble, hand edits) is rebuilt
            return out
        except GGUFError:
            _unlink_damaged(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(out.parent)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".build-{os.getpid()}-") as tmp:
            try:
                convert(SHIPPED, Path(tmp) / out.name, DEFAULT_TYPE)
            except USER_ERRORS as e:
                if isinstance(e, ConversionError) and "disk space" in str(e):
                    raise
                raise DefaultModelError(f"the built-in model's checkpoint {SHIPPED} cannot be converted ({e}); "
                                        "reinstall diffgemma (or restore models/ from git)") from None
            os.replace(Path(tmp) / out.name, out)
    except OSError as e:
        raise DefaultModelError(f"cannot write the built-in model's cache {out.parent} ({e.strerror or e}); set "
                                "DIFFGEMMA_CACHE to a writable folder") from None
    return out


def _unlink_damaged(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise DefaultModelError(f"the cached built-in model {path} is damaged and cannot be removed "
                                f"({e.strerror or e}); set DIFFGEMMA_CACHE to a writable folder") from None


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:12]


def _remove_stale_builds(folder: Path) -> None:
    """Build folders (`.build-{pid}-*`) of processes killed midway; a running build's is left alone."""
    from gguf_tools.atomic import pid_alive

    for d in folder.glob(".build-*"):
        pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
