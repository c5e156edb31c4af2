"""Torch dequantizers against gguf-py's numpy dequantize (and ggml's own), compared bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from gguf_tools.quants.torch_dequant import TORCH_DEQUANTIZERS, dequantize_torch
from tests.oracles import ggml_lib

TYPES = sorted(TORCH_DEQUANTIZERS, key=int)
REQUIRED = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS}

# Byte offsets of the fp16 fields in each block (ggml-common.h); random bytes there can be NaN/inf.
FP16_FIELDS = {
    Q.F16: (0,), Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def _reference(raw: np.ndarray, qt: Q) -> np.ndarray:
    block, _ = GGML_QUANT_SIZES[qt]
    with np.errstate(all="ignore"):
        return gguf_dequantize(raw, qt).reshape(raw.shape[0], block)


def _finite_blocks(qt: Q, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose fp16 (or bf16/f32) scalars are all finite: ±0, subnormals, normals."""
    _, size = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if qt == Q.BF16:
        w = raw.view(np.uint16)
        w[(w & 0x7F80) == 0x7F80] &= np.uint16(0xBFFF)  # exponent all ones -> drop its top bit
    elif qt == Q.F32:
        w = raw.view(np.uint32)
        w[(w & 0x7F800000) == 0x7F800000] &= np.uint32(0xBFFFFFFF)
    for off in FP16_FIELDS.get(qt, ()):
        h = np.ascontiguousarray(raw[:, off:off + 2]).view(np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)
        raw[:, off:off + 2] = h.view(np.uint8)
    raw[:4] = 0  # a few all-zero blocks
    if FP16_FIELDS.get(qt):
        raw[4:8, FP16_FIELDS[qt][0] + 1] = 0x80  # -0.0 scales
        raw[4:8, FP16_FIELDS[qt][0]] = 0
    return raw


def test_required_types_registered():
    assert set(TORCH_DEQUANTIZERS) >= REQUIRED


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_random_blocks_bit_identical(qt):
    rng = np.random.default_rng(int(qt))
    raw = _finite_blocks(qt, 2048, rng)
    got = TORCH_DEQUANTIZERS[qt](torch.from_numpy(raw))
    assert got.dtype == torch.float32 and tuple(got.shape) == (raw.shape[0], GGML_QUANT_SIZES[qt][0])
    want = _reference(raw, qt)
    np.testing.assert_array_equal(_bits(got.numpy()), _bits(want))


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_unrestricted_random_bytes(qt):
    """Any bytes at all (NaN/inf scales included): equal bits wherever gguf-py's value is not NaN."""
    rng = np.random.default_rng(1000 + int(qt))
    _, size = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (1024, size), dtype=np.uint8)
    got = TORCH_DEQUANTIZERS[qt](torch.from_numpy(raw)).numpy()
    want = _reference(raw, qt)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(want)[~nan])


def _ggml_dequantize(raw: np.ndarray, qt: Q, n: int) -> np.ndarray:
    """ggml's dequantize_row_<type>; K-quant symbols keep their capital K (dequantize_row_q4_K)."""
    if qt.name.endswith("_K"):
        import ctypes as C

        fn = getattr(ggml_lib.lib(), "dequantize_row_" + qt.name[:-2].lower() + "_K")
        fn.restype, fn.argtypes = None, [C.c_void_p, C.c_void_p, C.c_int64]
        src = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty(n, dtype=np.float32)
        fn(src.ctypes.data, out.ctypes.data, n)
        return out
    return ggml_lib.dequantize(raw, qt, n)


def _real_rows(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((12, 512)).astype(np.float32) * rng.uniform(1e-3, 10, (12, 1)).astype(np.float32)
    x[0] = 0  # all-zero blocks
    x[1, :256] = 0
    x[2, ::3] = 0
    x[3] = np.abs(x[3])  # one-signed rows exercise the K-quant mins
    return x


@pytest.mark.parametrize("qt", [q for q in TYPES if q != Q.F32], ids=lambda q: q.name)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_real_quantized_data(qt, with_imatrix):
    """Bytes written by ggml_quantize_chunk decode identically in torch, gguf-py and ggml."""
    rng = np.random.default_rng(7 + int(qt))
    x = _real_rows(rng)
    imatrix = rng.uniform(0.01, 10, x.shape[1]).astype(np.float32) if with_imatrix else None
    raw = ggml_lib.quantize_chunk(x, qt, imatrix)
    size = GGML_QUANT_SIZES[qt][1]
    got = dequantize_torch(torch.from_numpy(raw.reshape(x.shape[0], -1)), qt, x.shape).numpy()
    want = _reference(raw.reshape(-1, size), qt).reshape(x.shape)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    ggml = _ggml_dequantize(raw, qt, x.size).reshape(x.shape)
    np.testing.assert_array_equal(_bits(got), _bits(ggml))


def test_dequantize_torch_shapes_and_errors():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    raw = ggml_lib.quantize_chunk(x, Q.Q4_K)
    flat = dequantize_torch(torch.from_numpy(raw), Q.Q4_K, x.shape)
    rows = dequantize_torch(torch.from_numpy(raw.reshape(6, -1)), Q.Q4_K, (6, 512))
    assert tuple(flat.shape) == x.shape and tuple(rows.shape) == (6, 512)
    assert torch.equal(flat.reshape(6, 512), rows)
    with pytest.raises(ValueError):
        dequantize_torch(torch.from_numpy(raw[:-1]), Q.Q4_K, x.shape)
    with pytest.raises(TypeError):
        dequantize_torch(torch.from_numpy(raw).to(torch.int16), Q.Q4_K, x.shape)
    with pytest.raises(NotImplementedError):
        dequantize_torch(torch.from_numpy(raw), Q.IQ2_XXS, x.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_cuda_matches_cpu(qt):
    rng = np.random.default_rng(50 + int(qt))
    raw = torch.from_numpy(_finite_blocks(qt, 4096, rng))
    cpu = TORCH_DEQUANTIZERS[qt](raw)
    gpu = TORCH_DEQUANTIZERS[qt](raw.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))
