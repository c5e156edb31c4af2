"""Where the data files the commands read (quantization presets, the default model) live.

The repository keeps them at its root (quant_presets/, models/) beside the packages; a wheel carries
them inside the packages that read them (gguf_tools/quant_presets/, engine/models/: see setup.py),
so an installed copy never looks in the working directory or at the top of site-packages.
"""

from __future__ import annotations

from pathlib import Path


def data_dir(package_dir: Path, name: str) -> Path:
    """`name` inside the installed package, else beside the package in a source checkout (also what
    an editable install sees)."""
    inside = Path(package_dir) / name
    return inside if inside.is_dir() else Path(package_dir).parent / name
