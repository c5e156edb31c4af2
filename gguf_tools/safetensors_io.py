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
# Real headers are well under 1 MiB (2,000 tensors x ~150 bytes). The spec allows 100 MB, but json.loads
# of a forged 100 MB header ("[[],[],...") builds gigabytes of Python objects: 16 MiB bounds that.
MAX_HEADER = 16 * 1024 * 1024
MAX_INDEX = 64 * 1024 * 1024  # model.safetensors.index.json
MAX_DIMS = 8


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


def _show(text: str, limit: int = 80) -> str:
    s = text if text.isprintable() else repr(text)[1:-1]
    return s if len(s) <= limit else s[:limit] + "..."


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {_show(k)!r}")
        out[k] = v
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, every header value checked against the file first.

    As the reference implementation (safetensors' `Metadata::validate`) does: the header is UTF-8
    JSON of at most MAX_HEADER bytes starting with '{'; every entry has a known dtype, a shape of
    non-negative integers and `data_offsets` [start, end] with end - start = elements x dtype size;
    the byte ranges, in order, cover the data section exactly (no overlap, no gap, nothing after the
    last tensor). A file that does not fit the header is rejected before any tensor is read.
    """
    name_ = _show(path.name)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name_}: truncated safetensors file ({len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(f"{name_}: safetensors header length {n} is over the {MAX_HEADER}-byte limit")
            if 8 + n > size:
                raise CheckpointError(f"{name_}: safetensors header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name_}: cannot read ({e.strerror})") from None
    if len(raw) != n:
        raise CheckpointError(f"{name_}: short read of the safetensors header (file changed?)")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise CheckpointError(f"{name_}: malformed safetensors header (not a JSON object)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{name_}: malformed safetensors header (not valid UTF-8)") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{name_}: malformed safetensors header ({e})") from None
    except RecursionError:  # the C scanner stops deep nesting ('[[[[...') cleanly at the recursion limit
        raise CheckpointError(f"{name_}: malformed safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, or an integer of too many digits
        raise CheckpointError(f"{name_}: malformed safetensors header ({_show(str(e), 120)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name_}: malformed safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{name_}: malformed safetensors header (__metadata__ must map names to strings)")
    base = 8 + n
    data_size = size - base
    out: dict[str, StoredTensor] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        t = _show(name)
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{name_}: malformed header entry for {t}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
            raise CheckpointError(f"{name_}: malformed header entry for {t} (needs dtype, shape, data_offsets)")
        if dtype not in DTYPES:
            raise CheckpointError(f"{name_}: tensor {t} has unsupported dtype {_show(dtype, 20)}")
        if len(shape) > MAX_DIMS or not all(_is_int(d) for d in shape):
            raise CheckpointError(f"{name_}: tensor {t} has a malformed shape (up to {MAX_DIMS} integers)")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{name_}: tensor {t} has a negative dimension")
        if len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise CheckpointError(f"{name_}: tensor {t} has malformed data_offsets (two integers)")
        start, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= start <= end or end > data_size:
            raise CheckpointError(f"{name_}: tensor {t} has data_offsets [{start}, {end}] outside the file's "
                                  f"{data_size} data bytes")
        if end - start != count * DTYPES[dtype][1]:
            raise CheckpointError(f"{name_}: tensor {t} has {end - start} bytes but its shape {shape} of {dtype} "
                                  f"needs {count * DTYPES[dtype][1]}")
        out[name] = StoredTensor(name, path, dtype, tuple(shape), base + start, end - start)
        ranges.append((start, end, t))
    pos = 0
    for start, end, t in sorted(ranges):
        if start < pos:
            raise CheckpointError(f"{name_}: tensor {t} overlaps the tensor before it (bytes from {start})")
        if start > pos:
            raise CheckpointError(f"{name_}: {start - pos} unused bytes before tensor {t} (offsets must be "
                                  "contiguous)")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{name_}: {data_size - pos} bytes after the last tensor: the header does not "
                              "describe the file")
    return out


class Checkpoint:
    """All tensors of a checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder}: no *.safetensors files and no model.safetensors.index.json")
        self.tensors: dict[str, StoredTensor] = {}
        for fname in files:
            p = folder / fname
            if not p.is_file():
                raise CheckpointError(f"shard {fname} listed in the index is missing (or not a regular file)")
            for name, t in read_header(p).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {_show(name)} appears in two shards")
                self.tensors[name] = t
        if weight_map is not None:
            for name, fname in weight_map.items():
                t = self.tensors.get(name)
                if t is None or t.file.name != fname:
                    raise CheckpointError(f"tensor {_show(name)} is not in shard {fname} as the index says")

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor seen as [n_rows, row_len], as float32."""
        return raw_to_f32(self.read_raw_rows(name, start, stop), self.tensors[name].dtype)

    def read_raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows as stored (uint16 bits for BF16) for exact pass-through."""
        t = self.tensors[name]
        if not 0 <= start <= stop <= t.n_rows:
            raise CheckpointError(f"{t.file.name}: rows [{start}, {stop}) outside tensor {name} ({t.n_rows} rows)")
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


def _read_index(index: Path) -> dict[str, str]:
    """weight_map of model.safetensors.index.json: tensor name -> shard file name in this folder."""
    try:
        too_big = index.stat().st_size > MAX_INDEX
    except OSError as e:
        raise CheckpointError(f"{index.name}: cannot read ({e.strerror})") from None
    if too_big:
        raise CheckpointError(f"{index.name}: over the {MAX_INDEX}-byte limit for an index")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        raise CheckpointError(f"{index.name}: malformed index") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index.name}: malformed index (weight_map must map tensor names to file names)")
    for fname in set(weight_map.values()):
        # a shard is a file in this folder: no paths, so an index cannot point at /dev/zero or ../../x
        if not fname or fname in (".", "..") or "/" in fname or "\\" in fname or "\0" in fname:
            raise CheckpointError(f"{index.name}: shard name {_show(fname)!r} is not a file name in the "
                                  "checkpoint folder")
    return weight_map


def raw_to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)
