"""Triton kernels for the GPU fast path: they read the raw GGUF blocks that WeightStore uploads.

Importing this package never imports triton, so the torch backend keeps working where triton is
missing; the kernel modules (dequant, gemm, moe, vocab) import it themselves. Under
TRITON_INTERPRET=1 the kernels also run on CPU tensors (slowly): that is how CI checks them.
The variable must be set before triton or any kernel module is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from gguf import GGMLQuantizationType as Q

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# every type `quantize` writes, plus F32 (norm-free tensors are sometimes stored that way)
KERNEL_QTYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4,
})


def triton_available(device: torch.device | str) -> str | None:
    """None when the kernels can run on `device`, else a one-line reason why not."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cpu":
        return None if INTERPRET else "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device.type != "cuda":
        return f"triton kernels need a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU sm_{major}{minor} is older than sm_80"
    return None


def dot_dtype(dtype: torch.dtype | None = None):
    """The tl dtype tiles are cast to before tl.dot (pass it as a tl.constexpr).

    float32 under the interpreter: its bf16 tl.dot gives wrong results. On a GPU it follows the
    activations: fp16 stays fp16, fp32 stays fp32 (tf32 tensor cores), anything else is bf16."""
    import triton.language as tl

    if INTERPRET:
        return tl.float32
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.float32:
        return tl.float32
    return tl.bfloat16


def __getattr__(name: str):
    # lazy re-exports: `from engine.kernels import dequant_matmul` imports triton only then
    if name == "dequant_matmul":
        from engine.kernels.gemm import dequant_matmul
        return dequant_matmul
    if name in ("dequant_tile", "lut", "row_bytes"):
        from engine.kernels import dequant
        return getattr(dequant, name)
    raise AttributeError(f"module 'engine.kernels' has no attribute {name!r}")


__all__ = ["INTERPRET", "KERNEL_QTYPES", "dequant_matmul", "dequant_tile", "dot_dtype", "lut", "row_bytes",
           "triton_available"]
