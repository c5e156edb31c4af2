"""Read GGUF files through gguf-py's memory-mapped reader, as plain Python values.

Shapes are returned in NumPy order (outermost first); GGUF stores ``ne`` innermost first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from .arch import ArchSpec, SpecError


class GGUFError(ValueError):
    """A file that is not a readable GGUF."""


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
    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        try:
            self._reader = GGUFReader(self.path, "r")
        except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
            raise GGUFError(f"{self.path}: not a valid GGUF file ({_short(e)})") from None
        self.kv: dict[str, Any] = {}
        self.kv_types: dict[str, str] = {}
        for key, f in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = f.contents()
            main = GGUFValueType(f.types[0]).name if f.types else "?"
            if main == "FLOAT32":  # the shortest decimal that is this float32: 1e-06, not 9.99999997e-07
                value = float(str(np.float32(value)))
            self.kv[key] = value
            self.kv_types[key] = main if main != "ARRAY" else f"ARRAY[{GGUFValueType(f.types[-1]).name}]"
        self.tensors: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, GGMLQuantizationType(t.tensor_type), shape,
                                              int(t.n_bytes), t.data)

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


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
