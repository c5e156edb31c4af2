"""Read GGUF files as plain Python values and memory-mapped tensor views.

Everything comes from the checked parse of gguf_tools/validate.py: every count, length, offset and
shape is checked against the file before anything is mapped or allocated. The key/values are
those of that parse (about 1 us per array value, where gguf-py's reader builds a NumPy view per value
at 20-40 us: 40 s for a 262k-token vocabulary with its merges), and the tensor views are the ones
gguf-py would make (same dtypes and shapes) over one read-only memory map.

Shapes are returned in NumPy order (outermost first); GGUF stores ``ne`` innermost first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from .arch import ArchSpec, SpecError
from .validate import GGUFError, GGUFLayout, TensorRecord, validate_gguf

__all__ = ["GGUFError", "GGUFFile", "TensorInfo"]

# ggml types gguf-py presents with their own element dtype; all others are raw bytes (uint8)
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # NumPy order
    n_bytes: int
    data: np.ndarray  # raw view into the memory map (uint8 for quantized types)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    def __init__(self, path: Path | str, *, check_model: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file")
        # with check_model, a diffusion-gemma/gemma4 file must also hold every tensor its keys imply
        self.layout: GGUFLayout = validate_gguf(self.path, check_model=check_model)
        self.kv: dict[str, Any] = {}
        self.kv_types: dict[str, str] = dict(self.layout.kv_types)
        for key, value in self.layout.kv.items():
            if self.kv_types[key] == "FLOAT32":  # the shortest decimal that is this float32: 1e-06, not 9.99999997e-07
                value = float(str(np.float32(value)))
            self.kv[key] = value
        self.tensors: dict[str, TensorInfo] = {}
        if not self.layout.tensors:
            return
        try:
            self._map = np.memmap(self.path, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path}: cannot map ({_short(e)})") from None
        if self._map.size != self.layout.file_size:
            raise GGUFError(f"{self.path}: the file changed while it was read")
        for rec in self.layout.tensors.values():
            self.tensors[rec.name] = TensorInfo(rec.name, rec.ggml_type, rec.shape, rec.n_bytes, self._view(rec))

    def _view(self, rec: TensorRecord) -> np.ndarray:
        """What gguf-py's reader gives as `ReaderTensor.data`: elements for float/int types, bytes
        (last dimension in bytes) for block-quantized ones."""
        start = self.layout.data_offset + rec.offset
        raw = self._map[start:start + rec.n_bytes]
        dtype = _ELEMENT_DTYPES.get(rec.ggml_type)
        if dtype is not None:
            return raw.view(dtype).reshape(rec.shape)
        return raw.reshape(quant_shape_to_byte_shape(rec.shape, rec.ggml_type))

    @property
    def architecture(self) -> str:
        return str(self.kv.get("general.architecture", "?"))

    def spec(self) -> ArchSpec:
        kv = dict(self.kv)
        if "rope_freqs.weight" in self.tensors:
            kv["_rope_freqs"] = np.asarray(self.tensors["rope_freqs.weight"].data, dtype=np.float32).tolist()
        if "token_embd.weight" in self.tensors:
            kv["_vocab_size"] = self.tensors["token_embd.weight"].shape[0]
        try:
            return ArchSpec.from_gguf_kv(kv, name=str(self.kv.get("general.name", self.path.stem)))
        except SpecError as e:
            raise GGUFError(f"{self.path}: {e}") from None
        except (ValueError, TypeError, ArithmeticError) as e:  # values validate_gguf could not see (rope_freqs)
            raise GGUFError(f"{self.path}: bad model metadata ({type(e).__name__}: {_short(e)})") from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
