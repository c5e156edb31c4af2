"""Quantizers that write exactly the bytes of llama.cpp's ggml_quantize_chunk (the llama-quantize path).

    quantize(data, qtype, imatrix=None) -> uint8, shape data.shape[:-1] + (bytes_per_row,)
    dequantize(raw, qtype) -> float32 (gguf-py's decoders)

REGISTRY maps a GGMLQuantizationType to fn(rows float32 (n, row_len), imatrix (row_len,) | None) -> uint8
(n, bytes_per_row). Adding a type is one import and one entry.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf.quants as _gq
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_tools.quants import kquants, legacy
from gguf_tools.quants.iq4 import quantize_iq4_nl, quantize_iq4_xs

Q = GGMLQuantizationType
QuantizeFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def _via_gguf_py(qtype: GGMLQuantizationType) -> QuantizeFn:
    """Types whose ggml quantizer ignores an imatrix and that gguf-py reproduces bit for bit
    (F16/BF16 row converters, quantize_row_q8_0_ref, quantize_row_mxfp4_ref)."""

    def fn(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        out = np.ascontiguousarray(_gq.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype))
        return out.view(np.uint8).reshape(rows.shape[0], -1)

    fn.__name__ = f"quantize_{qtype.name.lower()}"
    return fn


REGISTRY: dict[GGMLQuantizationType, QuantizeFn] = {
    Q.F32: _via_gguf_py(Q.F32),
    Q.F16: _via_gguf_py(Q.F16),
    Q.BF16: _via_gguf_py(Q.BF16),
    Q.Q8_0: _via_gguf_py(Q.Q8_0),
    Q.MXFP4: _via_gguf_py(Q.MXFP4),
    Q.Q4_0: legacy.quantize_q4_0,
    Q.Q4_1: legacy.quantize_q4_1,
    Q.Q5_0: legacy.quantize_q5_0,
    Q.Q5_1: legacy.quantize_q5_1,
    Q.Q2_K: kquants.quantize_q2_k,
    Q.Q3_K: kquants.quantize_q3_k,
    Q.Q4_K: kquants.quantize_q4_k,
    Q.Q5_K: kquants.quantize_q5_k,
    Q.Q6_K: kquants.quantize_q6_k,
    Q.IQ4_NL: quantize_iq4_nl,
    Q.IQ4_XS: quantize_iq4_xs,
}


def row_bytes(qtype: GGMLQuantizationType, row_len: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if row_len % block:
        raise ValueError(f"row length {row_len} is not a multiple of the {qtype.name} block size {block}")
    return row_len // block * size


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `data` (last axis = rows) like ggml_quantize_chunk.

    imatrix: (row_len,) for all rows, or (*data.shape[:-2], row_len) for one slice per leading index, e.g. per
    expert of a 3-D MoE tensor (llama-quantize hands each expert its own slice).
    Finite data, +-inf, sub-normals and signed zeros reproduce ggml exactly; rows containing NaN are not
    guaranteed to (ggml's own result then depends on where the NaN sits in its running comparisons)."""
    qtype = GGMLQuantizationType(qtype)
    fn = REGISTRY.get(qtype)
    if fn is None:
        raise NotImplementedError(f"no quantizer for {qtype.name}")
    data = np.asarray(data)
    if data.dtype != np.float32:
        raise TypeError(f"expected float32 data, got {data.dtype}")
    row_len = data.shape[-1]
    nbytes = row_bytes(qtype, row_len)
    out_shape = (*data.shape[:-1], nbytes)
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=np.float32)
    if imatrix is None or imatrix.ndim == 1:
        if imatrix is not None and imatrix.shape != (row_len,):
            raise ValueError(f"imatrix has {imatrix.shape[0]} values, rows have {row_len}")
        return fn(data.reshape(-1, row_len), imatrix).reshape(out_shape)
    if data.ndim < 2 or imatrix.shape != (*data.shape[:-2], row_len):
        raise ValueError(f"imatrix shape {imatrix.shape} does not match data shape {data.shape}")
    lead = data.reshape(-1, *data.shape[-2:])
    imats = imatrix.reshape(-1, row_len)
    out = np.stack([fn(lead[i].reshape(-1, row_len), imats[i]) for i in range(lead.shape[0])])
    return out.reshape(out_shape)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Decode bytes from quantize() (or a GGUF tensor) to float32 with gguf-py."""
    return np.asarray(_gq.dequantize(np.asarray(data), GGMLQuantizationType(qtype)), dtype=np.float32)


__all__ = ["REGISTRY", "QuantizeFn", "dequantize", "quantize", "row_bytes"]
