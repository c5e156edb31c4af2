"""Importance matrices: llama.cpp's GGUF imatrix files and the legacy .dat format.

What the quantizer receives is what llama-quantize hands llama_model_quantize (tools/quantize
load_imatrix on top of common/imatrix-loader.cpp):
  GGUF   `<name>.in_sum2` (F32, ne = [ne0, n_mat]) and `<name>.counts` (F32, ne = [1, n_mat]); each
         count is rounded half away from zero to an integer, then per matrix j (expert j of a 3-D
         weight) value = in_sum2 / float(count) in float32, or 1.0 for every column when count <= 0.
         The keys imatrix.datasets, imatrix.chunk_count and imatrix.chunk_size must be present.
  legacy int32 entry count; per entry int32 name length, name, int32 ncall, int32 nval, nval float32;
         then optionally int32 chunk count, int32 length, dataset name. value = stored / float(ncall)
         when ncall > 0, else the stored value.
Any non-finite value is an error, as in llama_model_quantize. A 3-D expert weight's entry holds
ne0 * n_expert values; expert e is quantized with values [e*ne0, (e+1)*ne0).

llama-quantize adds quantize.imatrix.* keys to the output; `Imatrix.kv()` lists them the same way.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q

from .reader import GGUFError

GGUF_MAGIC = b"GGUF"
IN_SUM2, COUNTS = ".in_sum2", ".counts"
KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_ENTRIES = "quantize.imatrix.entries_count"
KV_CHUNKS = "quantize.imatrix.chunks_count"
KV_MAX_STR = 127  # llama-quantize copies these strings into a char[128]


# types whose ggml quantizer reads an importance matrix (Q8_0, MXFP4 and the float types ignore it)
USES_IMATRIX = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL,
                          Q.IQ4_XS, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S})


class ImatrixError(GGUFError):
    """An importance matrix file that cannot be used; the message names the file or the tensor."""


@dataclass
class Imatrix:
    path: str  # as given on the command line (written to quantize.imatrix.file)
    entries: dict[str, np.ndarray]  # normalised float32, flat: n_mat * ne0 values
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    # rows seen per matrix (per expert for 3-D weights), as stored; a legacy file has none
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def lookup(self, name: str, shape: Sequence[int]) -> np.ndarray | None:
        """The values llama-quantize uses for tensor `name` (NumPy shape): (ne0,) for a 2-D weight,
        (n_expert, ne0) for a 3-D one; None without an entry. A wrong-size entry is an error, except for
        token_embd, which llama-quantize then quantizes without one."""
        e = self.entries.get(name)
        if e is None:
            return None
        ne0 = int(shape[-1])
        ne2 = int(shape[0]) if len(shape) >= 3 else 1
        if e.size != ne0 * ne2:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None
            raise ImatrixError(f"{self.path}: imatrix size {e.size} is different from tensor size {ne0 * ne2} "
                               f"for {name}")
        return e.reshape(ne2, ne0) if len(shape) >= 3 else e

    def kv(self) -> list[tuple[str, Any, str]]:
        """The keys llama-quantize appends to its output (in this order)."""
        out: list[tuple[str, Any, str]] = [(KV_FILE, _clip(self.path), "str")]
        if self.datasets:
            out.append((KV_DATASET, _clip(self.datasets[0]), "str"))
        out.append((KV_ENTRIES, len(self.entries), "u32"))
        if self.chunk_count > 0:
            out.append((KV_CHUNKS, self.chunk_count, "u32"))
        return out


def _clip(s: str) -> str:
    b = s.encode("utf-8")[:KV_MAX_STR]
    return b.decode("utf-8", errors="ignore")


def load_imatrix(path: Path | str) -> Imatrix:
    """Read a GGUF imatrix or a legacy .dat file and normalise it as llama-quantize does."""
    shown = str(path)
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{shown}: no such imatrix file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    im = _load_gguf(p, shown) if magic == GGUF_MAGIC else _load_legacy(p, shown)
    for name, v in im.entries.items():
        if not np.isfinite(v).all():
            raise ImatrixError(f"{shown}: imatrix contains a non-finite value (entry {name})")
    return im


def _load_gguf(p: Path, shown: str) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    from .validate import validate_gguf

    try:  # counts, lengths and offsets checked against the file before gguf-py trusts them
        validate_gguf(p, check_model=False)
    except GGUFError as e:
        raise ImatrixError(f"{shown}: not a readable GGUF imatrix ({str(e).removeprefix(f'{p}: ')})") from None
    try:
        r = GGUFReader(p, "r")
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise ImatrixError(f"{shown}: not a readable GGUF imatrix ({str(e).splitlines()[0][:200]})") from None
    fields = r.fields
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in fields:
            raise ImatrixError(f"{shown}: missing imatrix metadata ({key})")
    if not r.tensors:
        raise ImatrixError(f"{shown}: no data in the imatrix file")
    datasets_f = fields["imatrix.datasets"]
    is_str_array = [GGUFValueType(t) for t in datasets_f.types] == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    datasets = [str(x) for x in datasets_f.contents()] if is_str_array else []
    pairs: dict[str, list[Any]] = {}
    for t in r.tensors:
        for suffix, slot in ((IN_SUM2, 0), (COUNTS, 1)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    entries: dict[str, np.ndarray] = {}
    counts_of: dict[str, np.ndarray] = {}
    for name in sorted(pairs):
        sums_t, counts_t = pairs[name]
        if sums_t is None or counts_t is None:
            raise ImatrixError(f"{shown}: mismatched sums and counts for {name}")
        if sums_t.tensor_type != GGMLQuantizationType.F32 or counts_t.tensor_type != GGMLQuantizationType.F32:
            raise ImatrixError(f"{shown}: sums and counts for {name} must be F32")
        sums = np.asarray(sums_t.data, dtype=np.float32).reshape(-1)
        counts = _lround(np.asarray(counts_t.data, dtype=np.float32).reshape(-1))
        entries[name] = normalise_gguf(sums, counts, name, shown)
        counts_of[name] = counts
    return Imatrix(shown, entries, datasets, _u32(fields["imatrix.chunk_count"]),
                   _u32(fields["imatrix.chunk_size"]), legacy=False, counts=counts_of)


def _u32(f: Any) -> int:
    v = f.contents()
    return int(v) if isinstance(v, (int, np.integer)) else 0


def _lround(x: np.ndarray) -> np.ndarray:
    """C lround on float32: nearest integer, halves away from zero."""
    x64 = x.astype(np.float64)
    return (np.sign(x64) * np.floor(np.abs(x64) + 0.5)).astype(np.int64)


def normalise_gguf(sums: np.ndarray, counts: np.ndarray, name: str = "?", shown: str = "imatrix") -> np.ndarray:
    """Per-matrix mean: sums[j*ne0 + i] / float32(counts[j]); 1.0 where counts[j] <= 0."""
    n_mat = counts.size
    if n_mat == 0 or sums.size % n_mat:
        raise ImatrixError(f"{shown}: {name} has {sums.size} sums for {n_mat} counts")
    s = sums.astype(np.float32).reshape(n_mat, -1)
    c = counts.astype(np.float32)  # (float) of the int64 count, rounding to nearest even as C does
    out = np.ones_like(s)
    pos = counts > 0
    out[pos] = s[pos] / c[pos, None]
    return out.reshape(-1)


def _load_legacy(p: Path, shown: str) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ImatrixError(f"{shown}: truncated legacy imatrix ({what})")
        b = data[pos: pos + n]
        pos += n
        return b

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    if len(data) < 4:
        raise ImatrixError(f"{shown}: not an imatrix file (neither GGUF nor legacy .dat)")
    n_entries = i32("entry count")
    if n_entries < 1:
        raise ImatrixError(f"{shown}: no data in the imatrix file")
    entries: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        length = i32(f"name length of entry {i + 1}")
        if length < 0:
            raise ImatrixError(f"{shown}: bad name length for entry {i + 1}")
        name = take(length, f"name of entry {i + 1}").split(b"\0", 1)[0].decode("utf-8", errors="replace")
        ncall = i32(f"ncall of {name}")
        nval = i32(f"value count of {name}")
        if nval < 1:
            raise ImatrixError(f"{shown}: failed reading number of values for entry {i + 1} ({name})")
        vals = np.frombuffer(take(4 * nval, f"values of {name}"), dtype="<f4").astype(np.float32)
        entries[name] = vals / np.float32(ncall) if ncall > 0 else vals.copy()
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):  # optional trailer: chunk count, dataset name
        chunk_count = struct.unpack("<i", data[pos: pos + 4])[0]
        pos += 4
        if pos + 4 <= len(data):
            length = struct.unpack("<i", data[pos: pos + 4])[0]
            pos += 4
            if 0 < length <= len(data) - pos:
                datasets.append(data[pos: pos + length].split(b"\0", 1)[0].decode("utf-8", errors="replace"))
    return Imatrix(shown, entries, datasets, chunk_count, 0, legacy=True)


# ---- writers (the formats llama.cpp's imatrix tool writes; used by tests and tools) ------------------

def save_gguf_imatrix(path: Path | str, stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      datasets: Sequence[str] = ("synthetic",), chunk_count: int = 1, chunk_size: int = 512) -> Path:
    """stats: name -> (in_sum2 (n_mat, ne0), counts (n_mat,)), as tools/imatrix saves them (sorted names)."""
    from gguf import GGUFValueType, GGUFWriter

    path = Path(path)
    w = GGUFWriter(path, "imatrix")
    w.kv_data[0].clear()  # the imatrix tool writes no general.architecture
    w.add_key_value("general.type", "imatrix", GGUFValueType.STRING)
    w.add_key_value("imatrix.datasets", list(datasets), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_key_value("imatrix.chunk_count", int(chunk_count), GGUFValueType.UINT32)
    w.add_key_value("imatrix.chunk_size", int(chunk_size), GGUFValueType.UINT32)
    for name in sorted(stats):
        sums, counts = stats[name]
        sums = np.asarray(sums, dtype=np.float32)
        sums = sums.reshape(-1, sums.shape[-1])
        counts = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
        # ggml_n_dims drops trailing 1s of ne: [ne0, 1] is 1-D, [1, 1] is 1-D
        w.add_tensor(name + IN_SUM2, sums if sums.shape[0] > 1 else sums.reshape(-1))
        w.add_tensor(name + COUNTS, counts if counts.shape[0] > 1 else counts.reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def save_legacy_imatrix(path: Path | str, stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
                        chunk_size: int = 512, chunk_count: int = 1, dataset: str = "synthetic") -> Path:
    """The legacy .dat layout of tools/imatrix save_imatrix_legacy (values stored as mean * ncall)."""
    out = bytearray()
    kept = []
    for name in sorted(stats):
        sums, counts = stats[name]
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if counts.size == 0 or not counts.any():
            continue
        kept.append((name, np.asarray(sums, dtype=np.float32).reshape(-1), counts))
    out += struct.pack("<i", len(kept))
    for name, sums, counts in kept:
        nb = name.encode()
        out += struct.pack("<i", len(nb)) + nb
        ncall = int((counts.max() + chunk_size - 1) // chunk_size)
        out += struct.pack("<ii", ncall, sums.size)
        per = sums.size // counts.size
        cnt = np.repeat(counts.astype(np.float32), per)
        vals = np.where(cnt == 0, np.float32(ncall), sums / np.where(cnt == 0, 1, cnt) * np.float32(ncall))
        out += vals.astype("<f4").tobytes()
    ds = dataset.encode()
    out += struct.pack("<i", chunk_count) + struct.pack("<i", len(ds)) + ds
    Path(path).write_bytes(bytes(out))
    return Path(path)


def needs_imatrix_entry(name: str) -> bool:
    """Tensors llama.cpp's imatrix tool collects (every blk.* matrix multiplication); token_embd is a
    row lookup and output.weight is collected only on request, so neither is required."""
    return re.match(r"blk\.\d+\.", name) is not None


__all__ = ["USES_IMATRIX", "Imatrix", "ImatrixError", "load_imatrix", "needs_imatrix_entry", "normalise_gguf",
           "save_gguf_imatrix", "save_legacy_imatrix"]
