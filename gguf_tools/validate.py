"""Check a GGUF file against itself before anything trusts it.

GGUF files come from strangers. gguf-py's reader believes every count, length and offset it reads
(a forged array length makes it loop for hours and build millions of NumPy views; a forged offset
makes a tensor view that points outside the file), so `validate_gguf` walks the header first with
bounds-checked reads and rejects, with one line naming the problem:

- magic, version (v1 and byte-swapped files refused, as llama.cpp does), key/value and tensor counts
  that the file is too short to hold, or above what any model needs;
- every string and array length against the bytes left in the file, value and element types,
  nested arrays, empty or duplicate keys, text that is not UTF-8;
- tensor names (non-empty, unique, shorter than GGML_MAX_NAME = 64 bytes), 1 <= n_dims <= 4,
  dimensions >= 0 whose product fits in int64, known ggml types whose block divides ne0;
- `general.alignment` (u32, a power of two), and every data offset: exactly consecutive as
  llama.cpp requires (each tensor padded to the alignment, no gaps, no reordering), and every tensor's
  bytes inside the file;
- for the diffusion-gemma and gemma4 architectures, the metadata a model needs (ArchSpec), sane
  special token ids and canvas sizes, and that every tensor the keys imply
  (`names.expected_tensors`) is present with that shape, in the layout variants the engine accepts.

The parse itself is the metadata GGUFFile hands out (scalars, strings and arrays as Python
values), and it allocates no more than the file justifies: a value costs at most a few times the
bytes it occupies in the file, and there are at most MAX_TOTAL_ARRAY_ELEMENTS array values, checked
before any is read. Reference: shared/reference/gguf-quantization.md section 3.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .arch import ARCH, GEMMA4_ARCH, ArchSpec, SpecError
from .names import ENC_SCALE, ROPE_FREQS, expected_tensors

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_NAME = 64  # a tensor name must be shorter than this (ggml.h)
GGML_MAX_DIMS = 4
INT64_MAX = 2**63 - 1

# Resource limits: far above the released model (692 tensors, ~60 keys, a 262,144-token vocabulary
# with its types, scores and merges: about 1.3 million array values), far below what would let a
# forged file cost gigabytes of Python objects (or minutes of gguf-py, which builds a NumPy view per
# array value, where requantize still uses it).
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 21  # one array
MAX_TOTAL_ARRAY_ELEMENTS = 1 << 22  # all arrays together
MAX_CANVAS = 1 << 16
MAX_STEPS = 1 << 16

_SCALAR = {  # value type -> (struct format, size)
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1), GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2), GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1), GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8), GGUFValueType.FLOAT64: ("<d", 8),
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_VALID_VTYPES = {int(v) for v in GGUFValueType}
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "unknown_token_id",
                  "seperator_token_id", "padding_token_id", "cls_token_id", "mask_token_id")


class GGUFError(ValueError):
    """A file that is not a readable GGUF."""


@dataclass(frozen=True)
class TensorRecord:
    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # GGUF order, innermost first
    offset: int  # relative to the data section
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:  # NumPy order
        return tuple(reversed(self.ne))


@dataclass
class GGUFLayout:
    """What the header says, once every number in it has been checked against the file."""

    path: Path
    file_size: int
    version: int
    alignment: int
    data_offset: int
    kv: dict[str, Any] = field(default_factory=dict)  # Python values; arrays as lists
    kv_types: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    spec: ArchSpec | None = None  # for diffusion-gemma / gemma4 files


def show(text: str, limit: int = 80) -> str:
    """A name from the file, safe to put in a one-line message (no newlines, bounded length)."""
    s = repr(text)[1:-1] if not text.isprintable() else text
    return s if len(s) <= limit else s[:limit] + "..."


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes (a read-only map: nothing is copied
    that the caller did not ask for, and nothing is read past the end)."""

    def __init__(self, buf: Any, size: int, where: str):
        self.buf, self.size, self.pos, self.where = buf, size, 0, where

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.where}: {problem}")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has "
                            f"{max(self.size - self.pos, 0)} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what} claims {n} bytes but only {self.size - self.pos} are left in the file")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def text(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def validate_gguf(path: Path | str, *, check_model: bool = True) -> GGUFLayout:
    """Check `path` as described in the module docstring; raise GGUFError naming the first problem."""
    path = Path(path)
    where = show(str(path), 1000)
    try:
        st = os.stat(path)
    except OSError as e:
        raise GGUFError(f"{where}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(f"{where}: not a regular file")
    size = st.st_size
    if size < 24:
        if size >= 4 and _head(path) != GGUF_MAGIC:
            raise GGUFError(f"{where}: not a GGUF file (bad magic)")
        raise GGUFError(f"{where}: truncated: {size} bytes is shorter than a GGUF header (24)")
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            layout = _parse(buf, size, path, where)
    except OSError as e:
        raise GGUFError(f"{where}: cannot read ({e.strerror or e})") from None
    except (ValueError, BufferError) as e:  # mmap of a file that changed under us
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"{where}: cannot read ({e})") from None
    if check_model:
        check_model_tensors(layout)
    return layout


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)


def _parse(buf: Any, size: int, path: Path, where: str) -> GGUFLayout:
    cur = _Cursor(buf, size, where)
    if buf[0:4] != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (bad magic {bytes(buf[0:4])!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version & 0xFFFF == 0:
        raise cur.fail(f"GGUF version {version:#x} looks byte-swapped: big-endian files are not supported")
    if version == 1:
        raise cur.fail("GGUF version 1 is not supported (v2 and v3 are)")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"unsupported GGUF version {version} (v2 and v3 are supported)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key/value count")
    # the smallest key/value is 14 bytes (8 length + 1 key byte + 4 type + 1 value byte), the smallest
    # tensor info 33 (8 length + 1 name byte + 4 n_dims + 8 one dimension + 4 type + 8 offset)
    if n_kv > MAX_KV or n_kv * 14 > cur.left():
        raise cur.fail(f"key/value count {n_kv} cannot be right for a file of {size} bytes"
                       + (f" (limit {MAX_KV})" if n_kv > MAX_KV else ""))
    if n_tensors > MAX_TENSORS or n_tensors * 33 > cur.left():
        raise cur.fail(f"tensor count {n_tensors} cannot be right for a file of {size} bytes"
                       + (f" (limit {MAX_TENSORS})" if n_tensors > MAX_TENSORS else ""))
    layout = GGUFLayout(path, size, version, DEFAULT_ALIGNMENT, 0)
    _parse_kv(cur, n_kv, layout)
    _parse_tensor_infos(cur, n_tensors, layout)
    _check_alignment(cur, layout)
    _check_offsets(cur, layout)
    return layout


def _parse_kv(cur: _Cursor, n_kv: int, layout: GGUFLayout) -> None:
    total_elements = 0
    for i in range(n_kv):
        key = cur.text(f"key #{i}")
        if not key:
            raise cur.fail(f"key #{i} is empty")
        if key in layout.kv or key in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            raise cur.fail(f"duplicate key {show(key)!r}")
        what = f"key {show(key)!r}"
        vtype = cur.u32(f"value type of {what}")
        if vtype not in _VALID_VTYPES:
            raise cur.fail(f"{what} has invalid value type {vtype}")
        vt = GGUFValueType(vtype)
        if vt != GGUFValueType.ARRAY:
            layout.kv[key] = _scalar(cur, vt, what)
            layout.kv_types[key] = vt.name
            continue
        etype = cur.u32(f"element type of {what}")
        if etype not in _VALID_VTYPES:
            raise cur.fail(f"{what} is an array of invalid type {etype}")
        et = GGUFValueType(etype)
        if et == GGUFValueType.ARRAY:
            raise cur.fail(f"{what} is an array of arrays, which GGUF readers do not support")
        n = cur.u64(f"length of {what}")
        min_size = 8 if et == GGUFValueType.STRING else _SCALAR[et][1]
        if n * min_size > cur.left():
            raise cur.fail(f"{what} claims {n} {et.name} elements, more than the {cur.left()} bytes left "
                           "in the file can hold")
        total_elements += n
        if n > MAX_ARRAY_ELEMENTS or total_elements > MAX_TOTAL_ARRAY_ELEMENTS:
            raise cur.fail(f"{what} has {n} elements: over the limit of {MAX_ARRAY_ELEMENTS} per array and "
                           f"{MAX_TOTAL_ARRAY_ELEMENTS} per file")
        layout.kv_types[key] = f"ARRAY[{et.name}]"
        if et == GGUFValueType.STRING:
            layout.kv[key] = _string_array(cur, n, what)
        else:
            fmt, width = _SCALAR[et]
            start = cur.pos
            cur.pos += n * width  # fits: checked above
            layout.kv[key] = np.frombuffer(cur.buf[start:cur.pos], dtype=np.dtype(fmt)).tolist()


def _scalar(cur: _Cursor, vt: GGUFValueType, what: str) -> Any:
    if vt == GGUFValueType.STRING:
        return cur.text(f"value of {what}")
    fmt, width = _SCALAR[vt]
    cur.need(width, f"value of {what}")
    (v,) = struct.unpack_from(fmt, cur.buf, cur.pos)
    cur.pos += width
    return v


def _string_array(cur: _Cursor, n: int, what: str) -> list[str]:
    buf, size, pos = cur.buf, cur.size, cur.pos
    out: list[str] = []
    unpack = _U64.unpack_from
    for j in range(n):
        if pos + 8 > size:
            cur.pos = pos
            raise cur.fail(f"truncated: element {j} of {what} at offset {pos}")
        (ln,) = unpack(buf, pos)
        pos += 8
        if ln > size - pos:
            cur.pos = pos
            raise cur.fail(f"element {j} of {what} claims {ln} bytes but only {size - pos} are left in the file")
        try:
            s = buf[pos:pos + ln].decode("utf-8")
        except UnicodeDecodeError:
            cur.pos = pos
            raise cur.fail(f"element {j} of {what} is not valid UTF-8") from None
        pos += ln
        out.append(s)
    cur.pos = pos
    return out


def _parse_tensor_infos(cur: _Cursor, n_tensors: int, layout: GGUFLayout) -> None:
    for i in range(n_tensors):
        name = cur.text(f"name of tensor #{i}")
        if not name:
            raise cur.fail(f"tensor #{i} has an empty name")
        if len(name.encode()) >= GGML_MAX_NAME:
            raise cur.fail(f"tensor name {show(name)!r} is {len(name.encode())} bytes; names must be shorter than "
                           f"{GGML_MAX_NAME} (GGML_MAX_NAME)")
        if name in layout.tensors:
            raise cur.fail(f"duplicate tensor name {show(name)!r}")
        what = f"tensor {show(name)!r}"
        n_dims = cur.u32(f"n_dims of {what}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise cur.fail(f"{what} has {n_dims} dimensions (1 to {GGML_MAX_DIMS} allowed)")
        ne = tuple(cur.u64(f"dimensions of {what}") for _ in range(n_dims))
        if any(d > INT64_MAX for d in ne):
            raise cur.fail(f"{what} has a negative dimension {[d - 2**64 if d > INT64_MAX else d for d in ne]}")
        raw_type = cur.u32(f"type of {what}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.fail(f"{what} has unknown ggml type id {raw_type}") from None
        n_elements = 1
        for d in ne:
            n_elements *= d
        if n_elements > INT64_MAX:
            raise cur.fail(f"{what} has dimensions {list(ne)} whose element count overflows int64")
        if ne[0] % block:
            raise cur.fail(f"{what} has rows of {ne[0]} elements, not a multiple of the {qtype.name} block "
                           f"size {block}")
        n_bytes = n_elements // block * type_size
        offset = cur.u64(f"data offset of {what}")
        layout.tensors[name] = TensorRecord(name, qtype, ne, offset, n_bytes)


def _check_alignment(cur: _Cursor, layout: GGUFLayout) -> None:
    if "general.alignment" in layout.kv:
        a = layout.kv["general.alignment"]
        if layout.kv_types["general.alignment"] != "UINT32":
            raise cur.fail(f"general.alignment has type {layout.kv_types['general.alignment']}, not UINT32")
        if a == 0 or a & (a - 1):
            raise cur.fail(f"general.alignment {a} is not a power of two")
        layout.alignment = a
    layout.data_offset = _pad(cur.pos, layout.alignment)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _check_offsets(cur: _Cursor, layout: GGUFLayout) -> None:
    expected = 0
    for t in layout.tensors.values():
        what = f"tensor {show(t.name)!r}"
        if t.offset != expected:
            raise cur.fail(f"{what} has data offset {t.offset}, expected {expected}: tensor data must follow "
                           f"each other in order, each padded to {layout.alignment} bytes (as llama.cpp requires)")
        start = layout.data_offset + t.offset
        if start + t.n_bytes > layout.file_size:
            raise cur.fail(f"{what} data [{start}, {start + t.n_bytes}) extends past the end of the file "
                           f"({layout.file_size} bytes)")
        expected += _pad(t.n_bytes, layout.alignment)


# ---- model level ------------------------------------------------------------------------------------

def check_model_tensors(layout: GGUFLayout) -> None:
    """For diffusion-gemma and gemma4 files: the metadata describes a model, and every tensor it implies
    is there with the implied shape. Other architectures (and imatrix files) are left alone."""
    where = str(layout.path)
    arch = layout.kv.get("general.architecture")
    if "general.architecture" in layout.kv and not isinstance(arch, str):
        raise GGUFError(f"{where}: general.architecture has type {layout.kv_types['general.architecture']}, "
                        "not STRING")
    if arch not in (ARCH, GEMMA4_ARCH):
        return
    kv = dict(layout.kv)
    embd = layout.tensors.get("token_embd.weight")
    if embd is not None and len(embd.ne) >= 2:
        kv["_vocab_size"] = embd.ne[-1]
    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise GGUFError(f"{where}: tokenizer.ggml.tokens has type {layout.kv_types['tokenizer.ggml.tokens']}, "
                        "not ARRAY[STRING]")
    try:
        spec = ArchSpec.from_gguf_kv(kv, name=str(kv.get("general.name", layout.path.stem)))
    except SpecError as e:
        raise GGUFError(f"{where}: {_one_line(e)}") from None
    except (ValueError, TypeError, ArithmeticError, KeyError, IndexError, AttributeError) as e:
        raise GGUFError(f"{where}: metadata does not describe a {arch} model ({type(e).__name__}: "
                        f"{_one_line(e)})") from None
    _check_values(spec, kv, where)
    _check_tensor_table(spec, arch, layout, where)
    layout.spec = spec


def _one_line(e: BaseException) -> str:
    s = str(e)
    return show(s.splitlines()[0] if s else type(e).__name__, 200)


def _check_values(spec: ArchSpec, kv: dict[str, Any], where: str) -> None:
    def bad(problem: str) -> GGUFError:
        return GGUFError(f"{where}: {problem}")

    if spec.context_length < 1:
        raise bad(f"context length {spec.context_length} must be at least 1")
    if not 1 <= spec.canvas_length <= min(MAX_CANVAS, spec.context_length):
        raise bad(f"diffusion.canvas_length {spec.canvas_length} must be between 1 and "
                  f"{min(MAX_CANVAS, spec.context_length)} (the context length)")
    if not 1 <= spec.sampler.max_steps <= MAX_STEPS:
        raise bad(f"diffusion.eb_max_steps {spec.sampler.max_steps} must be between 1 and {MAX_STEPS}")
    if spec.sliding_window < 1:
        raise bad(f"attention.sliding_window {spec.sliding_window} must be at least 1")
    for name, n in (("feed_forward_length", spec.feed_forward_length),
                    ("expert_feed_forward_length", spec.expert_feed_forward_length),
                    ("attention.key_length", spec.key_length), ("block_count", spec.block_count)):
        if n < 1:
            raise bad(f"{name} {n} must be at least 1")
    for key in _TOKEN_ID_KEYS:
        v = kv.get(f"tokenizer.ggml.{key}")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < spec.vocab_size):
            raise bad(f"tokenizer.ggml.{key} {v!r} is not a token id of the {spec.vocab_size}-token vocabulary")


def _trim(shape: tuple[int, ...]) -> tuple[int, ...]:
    """ggml_n_dims: trailing ne of 1 (leading NumPy dims) are not stored."""
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def _check_tensor_table(spec: ArchSpec, arch: str, layout: GGUFLayout, where: str) -> None:
    tensors = layout.tensors

    def check(name: str, shape: tuple[int, ...]) -> None:
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{where}: missing required tensor {name!r}")
        if _trim(t.shape) != _trim(shape):
            raise GGUFError(f"{where}: tensor {name!r} has shape {list(t.shape)}, the metadata implies "
                            f"{list(shape)}")

    for e in expected_tensors(spec, arch):
        name = e.name
        if name == ROPE_FREQS or name.endswith(ENC_SCALE):  # optional; checked when present
            if name in tensors:
                check(name, e.shape)
                if name == ROPE_FREQS and tensors[name].ggml_type != GGMLQuantizationType.F32:
                    raise GGUFError(f"{where}: tensor {ROPE_FREQS!r} has type {tensors[name].ggml_type.name}, "
                                    "not F32")
            continue
        if name == "self_cond_pre_norm.weight" and name not in tensors and "self_cond_norm.weight" in tensors:
            name = "self_cond_norm.weight"
        if name.endswith("ffn_gate_up_exps.weight") and name not in tensors:
            prefix = name[: -len("ffn_gate_up_exps.weight")]
            gate, up = prefix + "ffn_gate_exps.weight", prefix + "ffn_up_exps.weight"
            if gate in tensors or up in tensors:
                half = (spec.expert_count, spec.expert_feed_forward_length, spec.embedding_length)
                check(gate, half)
                check(up, half)
                continue
        check(name, e.shape)


__all__ = ["GGUFError", "GGUFLayout", "TensorRecord", "check_model_tensors", "show", "validate_gguf"]
