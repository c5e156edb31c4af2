"""Sharded safetensors checkpoints read row-range by row-range with positioned reads.

No memory map: pages of a mapped 47 GB checkpoint would count towards resident memory, and the
converter promises a peak bounded by one chunk, not by the model. Every header value is checked
against the file before it is trusted.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype -> (numpy storage dtype, bytes per element)
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BF16": (np.dtype("<u2"), 2),
    "F16": (np.dtype("<f2"), 2),
    "F32": (np.dtype("<f4"), 4),
}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit


class CheckpointError(ValueError):
    """A checkpoint folder or shard that cannot be read as described."""


@dataclass(frozen=True)
class StoredTensor:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def row_len(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n


def read_header(path: Path) -> dict[str, StoredTensor]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path.name}: safetensors header length {n} exceeds the file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: malformed safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: malformed safetensors header")
    base = 8 + n
    out: dict[str, StoredTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: malformed header entry for {name}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path.name}: tensor {name} has a negative dimension")
        count = 1
        for d in shape:
            count *= d
        if not (0 <= start <= end) or end - start != count * DTYPES[dtype][1] or base + end > size:
            raise CheckpointError(f"{path.name}: tensor {name} has offsets outside the file or a size "
                                  f"that disagrees with its shape")
        out[name] = StoredTensor(name, path, dtype, shape, base + start, end - start)
    return out


class Checkpoint:
    """All tensors of a checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index.name}: malformed index") from None
        else:
            weight_map = None
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder}: no *.safetensors files and no model.safetensors.index.json")
        self.tensors: dict[str, StoredTensor] = {}
        for fname in files:
            p = folder / fname
            if not p.is_file():
                raise CheckpointError(f"shard {fname} listed in the index is missing")
            for name, t in read_header(p).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} appears in two shards")
                self.tensors[name] = t
        if weight_map is not None:
            for name, fname in weight_map.items():
                t = self.tensors.get(name)
                if t is None or t.file.name != fname:
                    raise CheckpointError(f"tensor {name} is not in shard {fname} as the index says")

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor seen as [n_rows, row_len], as float32."""
        return raw_to_f32(self.read_raw_rows(name, start, stop), self.tensors[name].dtype)

    def read_raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows as stored (uint16 bits for BF16) for exact pass-through."""
        t = self.tensors[name]
        storage, width = DTYPES[t.dtype]
        buf = np.empty((stop - start) * t.row_len * width, dtype=np.uint8)
        fd = os.open(t.file, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(buf)], t.offset + start * t.row_len * width)
        finally:
            os.close(fd)
        if got != buf.size:
            raise CheckpointError(f"{t.file.name}: short read in tensor {name} (file truncated?)")
        return buf.view(storage).reshape(stop - start, t.row_len)


def raw_to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)
