"""Packaging that pyproject.toml cannot say statically: the data at the repository root travels inside
the packages that read it (gguf_tools.package_data finds it in either place).

    quant_presets/*.toml          -> gguf_tools/quant_presets/*.toml
    models/diffgemma-sort-tiny/*  -> engine/models/diffgemma-sort-tiny/*

Everything else (metadata, dependencies, the `diffgemma` script) is in pyproject.toml.
"""

from setuptools import find_packages, setup

CODE = find_packages(include=["gguf_tools", "gguf_tools.*", "engine", "engine.*"])
DATA = {"gguf_tools.quant_presets": "quant_presets", "engine.models": "models"}

setup(
    py_modules=["cli"],
    packages=CODE + list(DATA),
    package_dir=DATA,
    package_data={"gguf_tools.quant_presets": ["*.toml"], "engine.models": ["diffgemma-sort-tiny/*"]},
    include_package_data=False,
)
