"""dequant_tile against engine.weights.dequantize (the torch path, itself bit-exact with gguf-py):
bit-identical under the interpreter, for bytes from our quantizers and for random bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from engine.kernels import KERNEL_QTYPES
from engine.kernels.dequant import dequant_tile, lut, row_bytes
from engine.weights import dequantize
from gguf_tools.quants import quantize

ALL = sorted(KERNEL_QTYPES, key=int)


@triton.jit
def _dequant_matrix(w_ptr, lut_ptr, out_ptr, N, K, RB, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    QTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    row_off = tl.minimum(rows, N - 1).to(tl.int64) * RB  # clamp the loads, mask the store
    v = dequant_tile(w_ptr, lut_ptr, row_off, k, QTYPE)
    tl.store(out_ptr + rows * K + k, v, mask=rows < N)


def triton_dequantize(raw: torch.Tensor, qtype: Q, k: int, block_n: int = 8, block_k: int = 256) -> torch.Tensor:
    n = raw.shape[0]
    block_k = min(block_k, k)
    out = torch.empty(n, k, dtype=torch.float32)
    _dequant_matrix[(triton.cdiv(n, block_n), k // block_k)](raw, lut("cpu"), out, n, k, raw.shape[1],
                                                              BLOCK_N=block_n, BLOCK_K=block_k, QTYPE=int(qtype))
    return out


def sample_weights(n: int, k: int, seed: int) -> np.ndarray:
    """Gaussian rows with per-row scales over three decades, one all-zero row, one with an outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w *= (10.0 ** rng.uniform(-3, 0, size=(n, 1))).astype(np.float32)
    w[1] = 0.0
    w[2, 5] = 40.0
    return w


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    # NaN payloads are not compared (numpy's and torch's fp16 widening set the quiet bit differently)
    bad = (got.view(torch.int32) != want.view(torch.int32)) & ~(got.isnan() & want.isnan())
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} values differ, first at "
                           f"{tuple(bad.nonzero()[0].tolist())}: {got[bad][0]} vs {want[bad][0]}")


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_quantized_rows_bit_identical(qtype):
    k = 512
    raw = torch.from_numpy(quantize(sample_weights(11, k, seed=int(qtype)), qtype))
    assert raw.shape[1] == row_bytes(qtype, k)
    assert_bits_equal(triton_dequantize(raw, qtype, k), dequantize(raw, qtype))


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("block_k", [16, 64, 256])
@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_random_bytes_bit_identical(qtype, block_k):
    # every bit pattern of scales, mins, signs and high bits, not only those a quantizer writes
    # (fp16 inf/NaN scales included); tiles narrower than a block (16), a few blocks or sub-blocks
    # (64) and a whole K-quant super-block (256)
    block, size = GGML_QUANT_SIZES[qtype]
    k = 256 if block_k == 16 else 512
    g = torch.Generator().manual_seed(int(qtype))
    raw = torch.randint(0, 256, (9, k // block * size), dtype=torch.uint8, generator=g)
    got = triton_dequantize(raw, qtype, k, block_n=16, block_k=block_k)  # rows 9-15 clamped
    assert_bits_equal(got, dequantize(raw, qtype))


def test_row_offsets_address_expert_slices():
    # a 3-D expert tensor: rows of expert e start at (e * N + n) * row_bytes
    qtype, e, n, k = Q.Q4_K, 3, 5, 256
    raw = torch.from_numpy(quantize(sample_weights(e * n, k, seed=7), qtype))
    want = dequantize(raw, qtype)
    got = triton_dequantize(raw.reshape(e * n, -1), qtype, k)
    assert_bits_equal(got.reshape(e, n, k)[2], want.reshape(e, n, k)[2])
