"""GPU checks of the fast path (issue 12): compiled Triton kernels on CUDA at the real sizes.

They need a CUDA device (sm_80+) and compiled kernels, so they are skipped without one, and skipped
when TRITON_INTERPRET=1 is set (tests/engine/kernels sets it for the interpreter tests): run them in
their own process, e.g. `bash bench/gpu_check.sh` or `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    why = None
    if not torch.cuda.is_available():
        why = "needs CUDA"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        why = "TRITON_INTERPRET=1 is set in this process: run tests/gpu in a pytest process of its own"
    else:
        from engine.kernels import triton_available

        why = triton_available(torch.device("cuda"))
    if why:
        for item in items:
            if "tests/gpu" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(pytest.mark.skip(reason=why))
