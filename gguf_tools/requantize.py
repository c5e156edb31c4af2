"""GGUF -> GGUF with another type, as llama-quantize does it (shared/reference/gguf-quantization.md §3.3).

The input (for example a BF16 GGUF) keeps all its metadata, in its order, except that
general.quantization_version and general.file_type move to the end (general.file_type set to the
preset's ftype) and split.* keys are dropped; the imatrix keys follow. Tensors are written in
llama.cpp's loader order (non-block tensors first, then by block number, then by name), each either
copied byte for byte (when its type does not change: norms, 1-D tensors, the router) or decoded to
float32 and quantized. Like llama-quantize without --allow-requantize, a quantized input tensor that
would need another type is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType

from .arch import ArchSpec
from .convert import (
    Chunk,
    ConversionError,
    ConversionPlan,
    PlannedTensor,
    Reporter,
    _as_imatrix,
    check_imatrix,
    encode_rows,
    row_chunks,
    tensor_imatrix,
    write_atomically,
)
from .imatrix import Imatrix
from .parallel_quant import Shared, check_threads
from .presets import FLOAT_TYPES, ModelFacts, Rule, choose_types, load_preset, preset_label, tensor_bytes
from .reader import GGUFError, GGUFFile

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_VTYPE_CODES = {GGUFValueType.UINT8: "u8", GGUFValueType.INT8: "i8", GGUFValueType.UINT16: "u16",
                GGUFValueType.INT16: "i16", GGUFValueType.UINT32: "u32", GGUFValueType.INT32: "i32",
                GGUFValueType.UINT64: "u64", GGUFValueType.INT64: "i64", GGUFValueType.FLOAT32: "f32",
                GGUFValueType.FLOAT64: "f64", GGUFValueType.BOOL: "bool", GGUFValueType.STRING: "str"}
_TYPE_SUFFIX = re.compile(r"-(F32|F16|BF16|Q\d\w*|IQ\d\w*|MXFP4\w*)$", re.IGNORECASE)


def is_gguf(path: Path | str) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def loader_order_key(name: str) -> tuple[int, bytes]:
    """llama_model_loader's weight_name_comparer: blk.N number (-1 without one), then the name."""
    m = re.match(r"blk\.\s*([+-]?\d+)\.", name)
    return (int(m.group(1)) if m else -1, name.encode())


def default_output(src: Path, type_name: str) -> Path:
    """<name>-<TYPE>.gguf beside the input, replacing a type suffix such as -BF16."""
    src = Path(src).resolve()
    stem = _TYPE_SUFFIX.sub("", src.stem)
    return src.with_name(f"{stem}-{preset_label(type_name)}.gguf")


def _input_kv(f: GGUFFile) -> list[tuple[str, Any, str]]:
    """The input's key/values in file order, typed for the writer, from the validated parse: values
    exactly as stored (floats as read, strings strict UTF-8). gguf-py's reader would give the same,
    but builds a NumPy view per array value: about 21 s for a 262k-token vocabulary."""
    codes = {t.name: code for t, code in _VTYPE_CODES.items()}
    out: list[tuple[str, Any, str]] = []
    for key, value in f.layout.kv.items():
        vtype = f.layout.kv_types[key]
        code = codes[vtype[6:-1]] + "[]" if vtype.startswith("ARRAY[") else codes[vtype]  # no nested arrays: validated
        if key == "general.alignment" and int(value) != DEFAULT_ALIGNMENT:
            raise GGUFError(f"{f.path}: general.alignment {value} is not supported (llama-quantize writes 32)")
        out.append((key, value, code))
    return out


def plan_requantize(src: Path | str, type_name: str, overrides: tuple[Rule, ...] = (), *, pure: bool = False,
                    imatrix: Imatrix | Path | str | None = None) -> tuple[ConversionPlan, GGUFFile]:
    """Types as llama-quantize chooses them for this GGUF; reads no tensor data."""
    src = Path(src)
    f = GGUFFile(src)
    if int(f.kv.get("split.count", 1)) > 1:
        raise GGUFError(f"{src}: one shard of a split GGUF; merge the shards first (llama-gguf-split --merge)")
    spec: ArchSpec = f.spec()
    preset = load_preset(type_name)
    imatrix = _as_imatrix(imatrix)
    infos = sorted(f.tensors.values(), key=lambda t: loader_order_key(t.name))
    n_head_kv = f.kv.get(f"{f.architecture}.attention.head_count_kv", spec.head_count_kv_swa)
    n_head = f.kv.get(f"{f.architecture}.attention.head_count", spec.head_count)
    facts = ModelFacts.from_tensors([t.name for t in infos], n_expert=spec.expert_count, n_layer=spec.block_count,
                                    n_head=int(n_head[0] if isinstance(n_head, list) else n_head),
                                    n_head_kv0=int(n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv),
                                    has_imatrix=imatrix is not None)
    choices = choose_types([(t.name, t.shape, t.qtype) for t in infos], preset, facts, tuple(overrides), pure)
    tensors = []
    for t, (qtype, rule) in zip(infos, choices):
        if qtype == t.qtype:
            rule += " (copied)"
        elif t.qtype not in FLOAT_TYPES:
            raise ConversionError(f"tensor {t.name} is {t.qtype.name}; requantizing from a quantized type is "
                                  "disabled (as in llama-quantize): start from an F32, F16 or BF16 file")
        tensors.append(PlannedTensor(t.name, t.name, t.shape, qtype, tensor_bytes(qtype, t.shape), rule, t.qtype))
    plan = ConversionPlan(spec, f.architecture, preset, tensors, imatrix=imatrix, layout="llama-quantize")
    plan.kv = _input_kv(f)
    check_imatrix(plan)
    return plan, f


def requantize(src: Path | str, out: Path | str | None = None, type_name: str = "Q4_K_M",
               overrides: tuple[Rule, ...] = (), reporter: Reporter | None = None, *, pure: bool = False,
               imatrix: Imatrix | Path | str | None = None, threads: int | None = 1) -> tuple[Path, ConversionPlan]:
    """threads: chunks quantized on that many threads (None: every core); the bytes do not change."""
    threads = check_threads(threads)
    src = Path(src)
    plan, f = plan_requantize(src, type_name, overrides, pure=pure, imatrix=imatrix)
    out = Path(out) if out is not None else default_output(src, type_name)
    if out.resolve() == src.resolve():
        raise ConversionError(f"output {out} is the input file")
    source = Shared(f, _open_validated, str(f.path))
    write_atomically(plan, out, lambda t: _tensor_chunks(plan, source, t), reporter, threads)
    return out, plan


def _open_validated(path: str) -> GGUFFile:
    """A worker's own map of the input, which the writing process has already validated as a model."""
    return GGUFFile(path, check_model=False)


@dataclass(frozen=True, eq=False)
class GGUFRows:
    """Rows [start, stop) of one input tensor: copied (same type, after a finiteness check for float
    types) or decoded and quantized to qtype; a job that a worker process can run."""

    source: Shared[GGUFFile]
    name: str
    qtype: Q
    start: int
    stop: int
    imatrix: np.ndarray | None = None

    @property
    def light(self) -> bool:
        return self.qtype in FLOAT_TYPES or self.qtype == self.source.get().tensors[self.name].qtype

    def __call__(self) -> np.ndarray:
        info = self.source.get().tensors[self.name]
        row_len = info.shape[-1]
        n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        raw = np.asarray(info.data).reshape(-1).view(np.uint8).reshape(n_rows, -1)[self.start:self.stop]
        if self.qtype == info.qtype:  # same type: llama-quantize copies the bytes
            if info.qtype in FLOAT_TYPES and not np.isfinite(_decode(raw, info.qtype, row_len)).all():
                raise ConversionError(f"tensor {self.name} contains NaN or Inf")
            return raw
        rows = _decode(raw, info.qtype, row_len)
        if not np.isfinite(rows).all():
            raise ConversionError(f"tensor {self.name} contains NaN or Inf")
        return encode_rows(rows, self.qtype, self.name, self.imatrix)


def _tensor_chunks(plan: ConversionPlan, source: Shared[GGUFFile], t: PlannedTensor) -> Iterable[Chunk]:
    info = source.get().tensors[t.name]
    n_rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    if t.qtype == info.qtype:
        step = max(1, (64 << 20) // max(1, info.n_bytes // max(1, n_rows)))
        for start in range(0, n_rows, step):
            yield GGUFRows(source, t.name, t.qtype, start, min(n_rows, start + step))
        return
    for start, stop, im in row_chunks(t.shape, tensor_imatrix(plan, t)):
        yield GGUFRows(source, t.name, t.qtype, start, stop, im)


def _decode(raw: np.ndarray, qtype: Q, row_len: int) -> np.ndarray:
    """Rows of F32/F16/BF16 bytes -> float32, exactly (llama_tensor_dequantize_impl's converters)."""
    raw = np.ascontiguousarray(raw)
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(-1, row_len)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, row_len)
    if qtype == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1, row_len)
    raise ConversionError(f"cannot decode {qtype.name}")


__all__ = ["default_output", "is_gguf", "loader_order_key", "plan_requantize", "requantize"]
