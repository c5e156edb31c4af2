"""dequant_matmul against x @ dequantize(raw).T (engine.weights, the torch path) at the real row
widths, under the interpreter; and the package's availability checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine.kernels import KERNEL_QTYPES, gemm, triton_available
from engine.kernels.gemm import dequant_matmul
from engine.weights import dequantize
from gguf_tools.quants import quantize
from tests.engine.kernels.test_dequant import sample_weights

# each type at two of the real row widths; blocks of 32 also at the narrow 704 and 2112 (K-quant rows
# are multiples of 256)
WIDTHS = {
    Q.F32: (704, 2816), Q.F16: (2112, 4096), Q.BF16: (704, 2816), Q.Q8_0: (704, 8192),
    Q.Q4_0: (704, 2112), Q.Q4_1: (2112, 2816), Q.Q5_0: (704, 4096), Q.Q5_1: (2112, 2816),
    Q.IQ4_NL: (704, 2112), Q.MXFP4: (704, 2816),
    Q.Q2_K: (2816, 4096), Q.Q3_K: (2816, 4096), Q.Q4_K: (2816, 8192), Q.Q5_K: (2816, 4096),
    Q.Q6_K: (2816, 4096), Q.IQ4_XS: (2816, 4096),
}
# M = 100 spans two 64-row tiles of the interpreter config; 1, 5 and 16 are partial single tiles
CASES = [(q, k, ms) for q, ks in WIDTHS.items() for k, ms in zip(ks, ((1, 100), (5, 16)))]
N = 40  # not a multiple of 16 (the GPU configs' narrowest N tile), less than the interpreter's 64
U = 2.0**-24


def weights(qtype: Q, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(quantize(sample_weights(n, k, seed=k + int(qtype)), qtype))


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Against the float64 product: the kernel sums in fp32 in its own order, so each result is off by
    about sqrt(K) roundings of the magnitude sum |x| @ |w|.T (K of them at worst). Measured: under
    4 % of this tolerance; one weight off by a quarter of its row's mean |w| exceeds it (see below)."""
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    err = (y.double() - ref).abs()
    tol = x.shape[1] ** 0.5 * U * mag + 1e-30
    assert (err <= tol).all(), f"max error {float((err / tol).max()):.2f} x the tolerance"


@pytest.mark.parametrize(("qtype", "k", "ms"), CASES, ids=[f"{q.name}-{k}" for q, k, _ in CASES])
def test_matches_dequantize_matmul(qtype, k, ms):
    raw = weights(qtype, N, k)
    w = dequantize(raw, qtype)
    g = torch.Generator().manual_seed(k)
    for m in ms:
        x = torch.randn(m, k, generator=g)
        y = dequant_matmul(x, raw, qtype)
        assert y.shape == (m, N) and y.dtype == torch.float32
        check_close(y, x, w)


def test_tolerance_catches_one_wrong_weight():
    qtype, k = Q.Q4_K, 8192
    raw = weights(qtype, N, k)
    w = dequantize(raw, qtype)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4))
    y = dequant_matmul(x, raw, qtype)
    check_close(y, x, w)
    w[3, 7] += w[3].abs().mean() / 4
    with pytest.raises(AssertionError, match="tolerance"):
        check_close(y, x, w)


def test_gpu_configs(monkeypatch):
    # the GPU's tile configs (GEMV-like 16 x 16, 64 x 16, prefill 128 x 128), run by the interpreter
    monkeypatch.setattr(gemm, "INTERPRET", False)
    qtype, k, n = Q.Q5_0, 704, 150
    raw = weights(qtype, n, k)
    w = dequantize(raw, qtype)
    g = torch.Generator().manual_seed(3)
    for m in (5, 40, 130):
        x = torch.randn(m, k, generator=g)
        check_close(dequant_matmul(x, raw, qtype), x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_round_once(dtype):
    # fp32 accumulation, one rounding to x's dtype at the end
    qtype, k = Q.Q4_K, 2816
    raw = weights(qtype, N, k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = dequant_matmul(x, raw, qtype)
    assert y.dtype == dtype
    ref = (x.float() @ dequantize(raw, qtype).T).to(dtype)
    ulp = ref.float().abs() * torch.finfo(dtype).eps
    assert ((y.float() - ref.float()).abs() <= ulp + 1e-6).all()


def test_out_strided_rows_and_leading_dims():
    # rows of one expert out of a 3-D tensor (strided view), x with two leading dims, a given out
    qtype, e, n, k = Q.Q8_0, 3, 20, 704
    raw3 = weights(qtype, e * n, k).reshape(e, n, -1)
    view = raw3[1, ::2]  # every other row of expert 1: row stride 2 x row_bytes
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(2))
    out = torch.empty(6, n // 2)
    y = dequant_matmul(x, view, qtype, out=out)
    assert y.shape == (2, 3, n // 2) and y.data_ptr() == out.data_ptr()
    check_close(y.reshape(6, -1), x.reshape(6, k), dequantize(view.contiguous(), qtype))


def test_bad_input_is_one_line():
    raw = weights(Q.Q4_0, 16, 64)
    with pytest.raises(ValueError, match="do not hold"):
        dequant_matmul(torch.randn(2, 96), raw, Q.Q4_0)
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequant_matmul(torch.randn(2, 256), torch.zeros(16, 66, dtype=torch.uint8), Q.IQ2_XXS)


# Compiles the GEMM kernel for sm_90 the way a launch on an H100 would (16-byte divisibility of
# pointers and strides), without a GPU: catches what the interpreter accepts and the compiler does
# not. Run in a fresh process because this one has TRITON_INTERPRET=1.
_COMPILE_SM90 = """
import json, os, re, subprocess, sys, tempfile
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import KERNEL_QTYPES
from engine.kernels.gemm import _config, _dequant_matmul_kernel

names = ["x_ptr", "w_ptr", "lut_ptr", "y_ptr", "M", "N", "stride_xm", "stride_wn", "stride_ym",
         "K", "QTYPE", "DOT", "BLOCK_M", "BLOCK_N", "BLOCK_K"]
types = ["*bf16", "*u8", "*fp32", "*bf16"] + ["i32"] * 5 + ["constexpr"] * 6
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
out = {}
for q in sorted(KERNEL_QTYPES, key=int):
    for m in (1, 512) if q.name == "Q4_K" else (1,):
        bm, bn, bk, warps = _config(m, 2816, 2816)
        const = dict(K=2816, QTYPE=int(q), DOT=tl.bfloat16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        div16 = ["x_ptr", "w_ptr", "lut_ptr", "y_ptr", "stride_xm", "stride_wn", "stride_ym"]
        src = ASTSource(fn=_dequant_matmul_kernel, signature=dict(zip(names, types)),
                        constexprs={(names.index(k),): v for k, v in const.items()},
                        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in div16})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        spills = None
        if os.access(ptxas, os.X_OK):
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(c.asm["ptx"])
            r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            os.unlink(f.name)
            spills = int(re.search(r"(\\d+) bytes spill stores", r.stderr).group(1))
        out[f"{q.name}-M{m}"] = spills
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[3], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(spills) == len(KERNEL_QTYPES) + 1
    assert not any(spills.values()), spills


def test_availability():
    assert triton_available("cpu") is None  # the conftest set TRITON_INTERPRET=1
    if not torch.cuda.is_available():
        assert triton_available("cuda") == "no CUDA device"
    assert "CUDA" in triton_available("meta")
    assert set(WIDTHS) == KERNEL_QTYPES


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import engine.kernels as k; "
            "print(k.triton_available('cuda')); print(k.KERNEL_QTYPES and 'ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["triton is not installed", "ok"]


def test_sample_weights_are_sane():
    w = sample_weights(11, 256, seed=0)
    assert np.isfinite(w).all() and not w[1].any()
