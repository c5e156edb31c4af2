"""HF DiffusionGemma checkpoint -> one llama.cpp-layout GGUF, streamed chunk by chunk.

plan_conversion() reads config files only (so --dry-run works on a folder without weights);
convert() checks the checkpoint against the plan, then writes tensor infos first and data after,
through a temporary file that is renamed only when everything succeeded.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter
from gguf.quants import quantize as gguf_quantize
from gguf.utility import size_label

from .arch import ARCH, ArchSpec
from .names import TensorEntry, expected_tensors, match_checkpoint
from .presets import Preset, Rule, choose_type, load_preset, parse_type, tensor_bytes
from .safetensors_io import Checkpoint, CheckpointError

CHUNK_ELEMENTS = 8 * 1024 * 1024  # float32 elements per chunk: 32 MiB of f32 working set
DISK_MARGIN = 64 * 1024 * 1024
QUANTIZATION_VERSION = 2

_VTYPES = {"u32": GGUFValueType.UINT32, "i32": GGUFValueType.INT32, "f32": GGUFValueType.FLOAT32,
           "bool": GGUFValueType.BOOL, "str": GGUFValueType.STRING}


class ConversionError(RuntimeError):
    """A conversion that cannot proceed; the message names the problem."""


class Reporter(Protocol):
    def start(self, n_tensors: int, n_bytes: int) -> None: ...
    def advance(self, name: str, n_bytes: int) -> None: ...
    def finish(self, ok: bool = True) -> None: ...


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    source: str | None
    shape: tuple[int, ...]
    qtype: Q
    n_bytes: int
    rule: str


@dataclass
class ConversionPlan:
    spec: ArchSpec
    arch: str
    preset: Preset
    tensors: list[PlannedTensor]
    kv: list[tuple[str, Any, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def explain(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "source": t.source or "(generated)", "shape": list(t.shape),
                 "type": t.qtype.name, "bytes": t.n_bytes, "rule": t.rule} for t in self.tensors]

    def to_json(self) -> dict[str, Any]:
        rows = [{k: r[k] for k in ("name", "shape", "type", "bytes", "rule")} for r in self.explain()]
        return {"tensors": rows, "total_bytes": self.total_bytes}


def plan_conversion(src: Path, type_name: str = "BF16", arch: str = ARCH,
                    overrides: tuple[Rule, ...] = (), spec: ArchSpec | None = None) -> ConversionPlan:
    spec = spec or ArchSpec.from_hf_dir(src)
    preset = load_preset(type_name)
    tensors = []
    for e in expected_tensors(spec, arch):
        qtype, rule = choose_type(e.name, e.shape, preset, overrides)
        tensors.append(PlannedTensor(e.name, e.source, e.shape, qtype, tensor_bytes(qtype, e.shape), rule))
    plan = ConversionPlan(spec, arch, preset, tensors)
    plan.kv = _general_kv(plan) + spec.gguf_kv(arch) + [("general.file_type", preset.file_type, "u32")]
    return plan


def _general_kv(plan: ConversionPlan) -> list[tuple[str, Any, str]]:
    total = expert_total = per_expert = 0
    for t in plan.tensors:
        n = int(np.prod(t.shape))
        total += n
        if "_exps." in t.name and len(t.shape) == 3:
            expert_total += n
            per_expert += n // t.shape[0]
    label = size_label(total, total - expert_total, per_expert, plan.spec.expert_count)
    return [("general.type", "model", "str"), ("general.name", plan.spec.name, "str"),
            ("general.size_label", label, "str")]


def default_output(src: Path, type_name: str) -> Path:
    """The community convention: <model-name>-<TYPE>.gguf beside the checkpoint folder."""
    src = src.resolve()
    return src.parent / f"{src.name}-{type_name.upper()}.gguf"


def prepare(src: Path, type_name: str = "BF16", arch: str = ARCH,
            overrides: tuple[Rule, ...] = ()) -> tuple[ConversionPlan, Checkpoint]:
    """Plan against the real checkpoint: tokenizer, shards, names, shapes and dtypes all checked."""
    from .tokenizer_meta import tokenizer_kv

    spec = ArchSpec.from_hf_dir(src)
    tok_kv = tokenizer_kv(src)
    tokens = next(v for k, v, _ in tok_kv if k == "tokenizer.ggml.tokens")
    if len(tokens) > spec.vocab_size:
        raise ConversionError(f"tokenizer has {len(tokens)} tokens but the embedding only {spec.vocab_size} rows")
    ckpt = Checkpoint(src)
    try:
        entries, skipped = match_checkpoint(spec, list(ckpt.tensors), arch)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    _check_shapes(entries, ckpt)
    # llama.cpp's Gemma converters drop embedding rows that have no token
    plan = plan_conversion(src, type_name, arch, overrides, spec.with_(vocab_size=len(tokens)))
    plan.kv += tok_kv
    plan.skipped = skipped
    return plan, ckpt


def _check_shapes(entries: list[TensorEntry], ckpt: Checkpoint) -> None:
    for e in entries:
        if e.source is None:
            continue
        stored = ckpt.tensors[e.source].shape
        if stored != e.shape:
            raise ConversionError(f"tensor {e.source} has shape {list(stored)}, config implies {list(e.shape)}")


def convert(src: Path, out: Path | None = None, type_name: str = "BF16", arch: str = ARCH,
            overrides: tuple[Rule, ...] = (), reporter: Reporter | None = None) -> tuple[Path, ConversionPlan]:
    src = Path(src)
    plan, ckpt = prepare(src, type_name, arch, overrides)
    out = Path(out) if out is not None else default_output(src, type_name)
    check_writable(out, plan.total_bytes)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        _write(plan, ckpt, tmp, reporter)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out, plan


def check_writable(out: Path, planned: int) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ConversionError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConversionError(f"output folder {folder} is not writable")
    if out.is_dir():
        raise ConversionError(f"output path {out} is a directory")
    free = shutil.disk_usage(folder).free
    if free < planned + DISK_MARGIN:
        raise ConversionError(f"not enough disk space in {folder}: need {_gib(planned)}, {_gib(free)} free")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _write(plan: ConversionPlan, ckpt: Checkpoint, path: Path, reporter: Reporter | None) -> None:
    w = GGUFWriter(path, plan.arch)
    for key, value, vtype in plan.kv:
        _add_kv(w, key, value, vtype)
    _add_kv(w, "general.quantization_version", QUANTIZATION_VERSION, "u32")
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    if reporter:
        reporter.start(len(plan.tensors), plan.total_bytes)
    ok = False
    try:
        for t in plan.tensors:
            w.write_padding(fout, fout.tell())
            written = 0
            for chunk in _tensor_chunks(plan, ckpt, t):
                chunk.tofile(fout)
                written += chunk.nbytes
            if written != t.n_bytes:
                raise ConversionError(f"tensor {t.name}: wrote {written} bytes, planned {t.n_bytes}")
            w.write_padding(fout, written)
            if reporter:
                reporter.advance(t.name, t.n_bytes)
        fout.flush()
        os.fsync(fout.fileno())
        ok = True
    except OSError as e:
        raise ConversionError(f"cannot write {path.name}: {e.strerror or e}") from None
    finally:
        w.close()
        if reporter:
            reporter.finish(ok)


def _add_kv(w: GGUFWriter, key: str, value: Any, vtype: str) -> None:
    if vtype.endswith("[]"):
        sub = _VTYPES[vtype[:-2]]
        w.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=sub)
    else:
        w.add_key_value(key, value, _VTYPES[vtype])


def _tensor_chunks(plan: ConversionPlan, ckpt: Checkpoint, t: PlannedTensor):
    if t.source is None:  # rope_freqs
        yield np.asarray(plan.spec.rope_freqs(), dtype=np.float32)
        return
    stored = ckpt.tensors[t.source]
    row_len = t.shape[-1]
    n_rows = int(np.prod(t.shape[:-1], dtype=np.int64))  # may be fewer than stored (trimmed vocab)
    step = max(1, CHUNK_ELEMENTS // row_len)
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        if t.qtype == Q.BF16 and stored.dtype == "BF16":
            raw = ckpt.read_raw_rows(t.source, start, stop)
            if ((raw & 0x7F80) == 0x7F80).any():
                raise ConversionError(f"tensor {t.source} contains NaN or Inf")
            yield raw
            continue
        rows = ckpt.read_rows(t.source, start, stop)
        if not np.isfinite(rows).all():
            raise ConversionError(f"tensor {t.source} contains NaN or Inf")
        yield encode_rows(rows, t.qtype, t.source)


def encode_rows(rows: np.ndarray, qtype: Q, what: str = "tensor") -> np.ndarray:
    if qtype == Q.F32:
        return rows
    if qtype == Q.F16:
        half = rows.astype(np.float16)
        if not np.isfinite(half).all():
            raise ConversionError(f"{what} has values outside the F16 range; use BF16 or a quantized type")
        return half
    return gguf_quantize(rows, qtype)


__all__ = ["ConversionError", "ConversionPlan", "CheckpointError", "convert", "plan_conversion", "prepare",
           "default_output", "parse_type"]
