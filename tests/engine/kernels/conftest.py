"""Kernel tests run under Triton's interpreter on CPU tensors, so CI checks them without a GPU.

TRITON_INTERPRET must be set before any kernel module is decorated by @triton.jit, hence at import
time of this conftest, which pytest loads before the test modules of this directory. Without
triton the whole directory is left out (the torch backend does not need it).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    _kernels = sys.modules.get("engine.kernels")
    if _kernels is not None:
        # imported earlier in this process (by another test directory): it read the variable then
        _kernels.INTERPRET = True
    _compiled = [m for m in ("engine.kernels.dequant", "engine.kernels.gemm", "engine.kernels.moe",
                             "engine.kernels.vocab") if m in sys.modules]
    if _compiled:
        pytest.exit(f"{', '.join(_compiled)} imported before tests/engine/kernels/conftest.py set "
                    "TRITON_INTERPRET=1; run the kernel tests in their own pytest process", returncode=4)
