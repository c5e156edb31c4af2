"""llama.cpp's own gguf reader and ggml dequantizers, reached through ctypes (llama-cpp-python's libs).

Test-only: this is the oracle our files must satisfy, written by people other than us.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q


def _lib() -> C.CDLL:
    import llama_cpp

    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    lib = C.CDLL(str(path))
    lib.gguf_init_from_file.restype = C.c_void_p
    lib.gguf_init_from_file.argtypes = [C.c_char_p, _InitParams]
    for fn, res, args in [
        ("gguf_free", None, [C.c_void_p]),
        ("gguf_get_version", C.c_uint32, [C.c_void_p]),
        ("gguf_get_data_offset", C.c_size_t, [C.c_void_p]),
        ("gguf_get_n_kv", C.c_int64, [C.c_void_p]),
        ("gguf_get_key", C.c_char_p, [C.c_void_p, C.c_int64]),
        ("gguf_get_kv_type", C.c_int, [C.c_void_p, C.c_int64]),
        ("gguf_get_arr_type", C.c_int, [C.c_void_p, C.c_int64]),
        ("gguf_get_arr_n", C.c_size_t, [C.c_void_p, C.c_int64]),
        ("gguf_get_arr_data", C.c_void_p, [C.c_void_p, C.c_int64]),
        ("gguf_get_arr_str", C.c_char_p, [C.c_void_p, C.c_int64, C.c_size_t]),
        ("gguf_get_val_str", C.c_char_p, [C.c_void_p, C.c_int64]),
        ("gguf_get_val_data", C.c_void_p, [C.c_void_p, C.c_int64]),
        ("gguf_get_n_tensors", C.c_int64, [C.c_void_p]),
        ("gguf_get_tensor_name", C.c_char_p, [C.c_void_p, C.c_int64]),
        ("gguf_get_tensor_type", C.c_int, [C.c_void_p, C.c_int64]),
        ("gguf_get_tensor_offset", C.c_size_t, [C.c_void_p, C.c_int64]),
        ("gguf_get_tensor_size", C.c_size_t, [C.c_void_p, C.c_int64]),
        ("ggml_get_tensor", C.c_void_p, [C.c_void_p, C.c_char_p]),
        ("ggml_free", None, [C.c_void_p]),
    ]:
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    return lib


class _InitParams(C.Structure):
    _fields_ = [("no_alloc", C.c_bool), ("ctx", C.POINTER(C.c_void_p))]


_LIB: C.CDLL | None = None


def lib() -> C.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _lib()
    return _LIB


# gguf_type -> (ctypes scalar, size)
_SCALARS = {0: C.c_uint8, 1: C.c_int8, 2: C.c_uint16, 3: C.c_int16, 4: C.c_uint32, 5: C.c_int32,
            6: C.c_float, 7: C.c_bool, 10: C.c_uint64, 11: C.c_int64, 12: C.c_double}
GGUF_STRING, GGUF_ARRAY = 8, 9


@dataclass
class GGMLTensor:
    name: str
    qtype: Q
    shape: tuple[int, ...]  # NumPy order
    offset: int  # absolute, in the file
    n_bytes: int


@dataclass
class GGMLFile:
    version: int
    kv: dict[str, Any]
    tensors: dict[str, GGMLTensor]


def read_gguf(path: Path) -> GGMLFile:
    """Parse with llama.cpp's gguf_init_from_file; raises ValueError if llama.cpp rejects the file."""
    L = lib()
    ctx_out = C.c_void_p()
    ctx = L.gguf_init_from_file(str(path).encode(), _InitParams(True, C.pointer(ctx_out)))
    if not ctx:
        raise ValueError(f"llama.cpp's gguf reader rejected {path}")
    try:
        kv: dict[str, Any] = {}
        for i in range(L.gguf_get_n_kv(ctx)):
            kv[L.gguf_get_key(ctx, i).decode()] = _value(L, ctx, i)
        base = L.gguf_get_data_offset(ctx)
        tensors = {}
        for i in range(L.gguf_get_n_tensors(ctx)):
            name = L.gguf_get_tensor_name(ctx, i).decode()
            t = L.ggml_get_tensor(ctx_out, name.encode())
            ne = np.ctypeslib.as_array((C.c_int64 * 4).from_address(t + 16)).tolist()  # ggml_tensor.ne
            while len(ne) > 1 and ne[-1] == 1:
                ne.pop()
            tensors[name] = GGMLTensor(name, Q(L.gguf_get_tensor_type(ctx, i)), tuple(reversed(ne)),
                                       base + L.gguf_get_tensor_offset(ctx, i), L.gguf_get_tensor_size(ctx, i))
        return GGMLFile(L.gguf_get_version(ctx), kv, tensors)
    finally:
        L.gguf_free(ctx)
        if ctx_out:
            L.ggml_free(ctx_out)


def _value(L: C.CDLL, ctx: int, i: int) -> Any:
    t = L.gguf_get_kv_type(ctx, i)
    if t == GGUF_STRING:
        return L.gguf_get_val_str(ctx, i).decode()
    if t == GGUF_ARRAY:
        at, n = L.gguf_get_arr_type(ctx, i), L.gguf_get_arr_n(ctx, i)
        if at == GGUF_STRING:
            return [L.gguf_get_arr_str(ctx, i, j).decode() for j in range(n)]
        arr = (_SCALARS[at] * n).from_address(L.gguf_get_arr_data(ctx, i))
        return list(arr)
    return _SCALARS[t].from_address(L.gguf_get_val_data(ctx, i)).value


_DEQUANT = {Q.F16: "ggml_fp16_to_fp32_row", Q.BF16: "ggml_bf16_to_fp32_row"}


def _row_fn(prefix: str, qtype: Q) -> str:
    name = qtype.name.lower()  # ggml spells the K-quants q4_K
    return f"{prefix}_{name[:-2] + '_K' if name.endswith('_k') else name}"


def dequantize(raw: bytes | np.ndarray, qtype: Q, n_elements: int) -> np.ndarray:
    """ggml's own to-float row function for `qtype`."""
    raw = np.ascontiguousarray(np.frombuffer(bytes(raw), dtype=np.uint8))
    if qtype == Q.F32:
        return raw.view(np.float32).copy()
    fn = getattr(lib(), _DEQUANT.get(qtype, _row_fn("dequantize_row", qtype)))
    fn.restype = None
    fn.argtypes = [C.c_void_p, C.c_void_p, C.c_int64]
    out = np.empty(n_elements, dtype=np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    assert raw.size == n_elements // block * size
    fn(raw.ctypes.data, out.ctypes.data, n_elements)
    return out


def tensor_values(path: Path, t: GGMLTensor) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(t.offset)
        raw = f.read(t.n_bytes)
    n = int(np.prod(t.shape))
    return dequantize(raw, t.qtype, n).reshape(t.shape)


def quantize_chunk(data: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over all rows of `data` (float32, [..., row_len]): llama-quantize's path."""
    L = lib()
    fn = L.ggml_quantize_chunk
    fn.restype = C.c_size_t
    fn.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_int64, C.c_int64, C.c_int64, C.c_void_p]
    init = L.ggml_quantize_init
    init.restype = None
    init.argtypes = [C.c_int]
    init(int(qtype))  # IQ types need their lookup tables
    src = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = src.shape[-1]
    nrows = src.size // n_per_row
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros(nrows * (n_per_row // block) * size, dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = fn(int(qtype), src.ctypes.data, out.ctypes.data, 0, nrows, n_per_row,
                 None if imat is None else imat.ctypes.data)
    assert written == out.size
    return out
