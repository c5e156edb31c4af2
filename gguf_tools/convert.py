"""HF DiffusionGemma checkpoint -> one llama.cpp-layout GGUF, streamed chunk by chunk.

plan_conversion() reads config files only (so --dry-run works on a folder without weights);
convert() checks the checkpoint against the plan, then writes tensor infos first and data after,
through a temporary file that is renamed only when everything succeeded.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter
from gguf.utility import size_label

from .arch import ARCH, ArchSpec
from .atomic import fsync_dir, partial_path, remove_stale_partials
from .imatrix import USES_IMATRIX, Imatrix, load_imatrix, needs_imatrix_entry
from .names import TensorEntry, expected_tensors, match_checkpoint
from .outputs import OutputError, check_output_path
from .parallel_quant import Shared, check_threads, ordered_map
from .presets import (
    FLOAT_TYPES,
    ModelFacts,
    Preset,
    PresetError,
    Rule,
    choose_types,
    keeps_f32,
    load_preset,
    n_dims,
    parse_type,
    preset_label,
    tensor_bytes,
)
from .safetensors_io import Checkpoint, CheckpointError

CHUNK_ELEMENTS = 8 * 1024 * 1024  # float32 elements per chunk: 32 MiB of f32 working set
DISK_MARGIN = 64 * 1024 * 1024
QUANTIZATION_VERSION = 2

_VTYPES = {"u8": GGUFValueType.UINT8, "i8": GGUFValueType.INT8, "u16": GGUFValueType.UINT16,
           "i16": GGUFValueType.INT16, "u32": GGUFValueType.UINT32, "i32": GGUFValueType.INT32,
           "u64": GGUFValueType.UINT64, "i64": GGUFValueType.INT64, "f32": GGUFValueType.FLOAT32,
           "f64": GGUFValueType.FLOAT64, "bool": GGUFValueType.BOOL, "str": GGUFValueType.STRING}
FILE_TYPE, QUANT_VERSION = "general.file_type", "general.quantization_version"


class ConversionError(RuntimeError):
    """A conversion that cannot proceed; the message names the problem."""


class Reporter(Protocol):
    def start(self, n_tensors: int, n_bytes: int) -> None: ...
    # called per written chunk; tensor_done on a tensor's last chunk
    def advance(self, name: str, n_bytes: int, tensor_done: bool = True) -> None: ...
    def finish(self, ok: bool = True) -> None: ...


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    source: str | None
    shape: tuple[int, ...]
    qtype: Q
    n_bytes: int
    rule: str
    source_type: Q | None = None  # the type llama-quantize starts from (the converter's, or the input GGUF's)


@dataclass
class ConversionPlan:
    spec: ArchSpec
    arch: str
    preset: Preset
    tensors: list[PlannedTensor]
    kv: list[tuple[str, Any, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    imatrix: Imatrix | None = None
    # "converter": keys as convert_hf_to_gguf writes them (F32/F16/BF16); "llama-quantize": the input's keys
    # with general.quantization_version and general.file_type moved to the end, then the imatrix keys
    layout: str = "converter"

    def output_kv(self) -> list[tuple[str, Any, str]]:
        """Every key/value pair of the output file after general.architecture, in file order."""
        qv = (QUANT_VERSION, QUANTIZATION_VERSION, "u32")
        if self.layout == "converter":
            return [e for e in self.kv if e[0] != QUANT_VERSION] + [qv]
        kv = [e for e in self.kv if e[0] not in (FILE_TYPE, QUANT_VERSION) and not e[0].startswith("split.")]
        kv += [qv, (FILE_TYPE, self.preset.file_type, "u32")]
        return kv + (self.imatrix.kv() if self.imatrix is not None else [])

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
                    overrides: tuple[Rule, ...] = (), spec: ArchSpec | None = None, *, pure: bool = False,
                    imatrix: Imatrix | Path | str | None = None) -> ConversionPlan:
    """Types as llama-quantize would choose them for the converted (BF16) file of this checkpoint."""
    spec = spec or ArchSpec.from_hf_dir(src)
    preset = load_preset(type_name)
    imatrix = _as_imatrix(imatrix)
    entries = expected_tensors(spec, arch)
    facts = ModelFacts.from_tensors([e.name for e in entries], n_expert=spec.expert_count,
                                    n_layer=spec.block_count, n_head=spec.head_count,
                                    n_head_kv0=spec.layer(0).n_kv_head, has_imatrix=imatrix is not None)
    # what the converter writes for tensors llama-quantize never quantizes
    sources = [(e.name, e.shape, Q.F32 if keeps_f32(e.name, e.shape) else Q.BF16) for e in entries]
    choices = choose_types(sources, preset, facts, tuple(overrides), pure)
    tensors = [PlannedTensor(e.name, e.source, e.shape, q, tensor_bytes(q, e.shape), rule, src)
               for e, (_, _, src), (q, rule) in zip(entries, sources, choices)]
    plan = ConversionPlan(spec, arch, preset, tensors, imatrix=imatrix,
                          layout="converter" if preset.is_float else "llama-quantize")
    plan.kv = _general_kv(plan) + spec.gguf_kv(arch) + [(FILE_TYPE, preset.file_type, "u32")]
    check_imatrix(plan)
    return plan


def _as_imatrix(imatrix: Imatrix | Path | str | None) -> Imatrix | None:
    if imatrix is None or isinstance(imatrix, Imatrix):
        return imatrix
    return load_imatrix(imatrix)


def check_imatrix(plan: ConversionPlan) -> None:
    """Entries must have the right size for every tensor that is quantized (as in llama-quantize), and every
    blk.* tensor quantized to a type that uses an importance matrix must have one (llama-quantize would
    quietly quantize it without)."""
    if plan.imatrix is None:
        return
    if plan.preset.is_float:
        raise PresetError(f"--imatrix needs a quantized type, not {plan.preset.name}")
    names = {t.name for t in plan.tensors}
    # llama-quantize ignores entries it has no tensor for; a blk.* one means the matrix was made for
    # another model (other layers or attention layout). Others are allowed: a diffusion-gemma imatrix
    # has self_cond_* entries that its gemma4 copy lacks.
    stray = sorted(n for n in plan.imatrix.entries if n not in names and needs_imatrix_entry(n))
    if stray:
        raise ConversionError(f"imatrix {plan.imatrix.path} has {len(stray)} entries for tensors this model does "
                              f"not have (first: {stray[0]}); it was made for another model")
    for t in plan.tensors:
        if t.qtype == t.source_type:  # copied, not quantized
            continue
        entry = plan.imatrix.lookup(t.name, t.shape)
        if entry is None and t.qtype in USES_IMATRIX and needs_imatrix_entry(t.name):
            raise ConversionError(f"imatrix {plan.imatrix.path} has no entry for tensor {t.name} "
                                  f"({t.qtype.name} uses one)")


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
    return src.parent / f"{src.name}-{preset_label(type_name)}.gguf"


def prepare(src: Path, type_name: str = "BF16", arch: str = ARCH,
            overrides: tuple[Rule, ...] = (), *, pure: bool = False,
            imatrix: Imatrix | Path | str | None = None) -> tuple[ConversionPlan, Checkpoint]:
    """Plan against the real checkpoint: tokenizer, shards, names, shapes and dtypes all checked."""
    from .tokenizer_meta import tokenizer_kv

    spec = ArchSpec.from_hf_dir(src)
    try:
        tok_kv = tokenizer_kv(src)
    except ValueError as e:  # tokenizer.json missing or malformed: the message names the file
        raise ConversionError(str(e)) from None
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
    plan = plan_conversion(src, type_name, arch, overrides, spec.with_(vocab_size=len(tokens)), pure=pure,
                           imatrix=imatrix)
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
            overrides: tuple[Rule, ...] = (), reporter: Reporter | None = None, *, pure: bool = False,
            imatrix: Imatrix | Path | str | None = None, threads: int | None = 1) -> tuple[Path, ConversionPlan]:
    """threads: chunks quantized on that many threads (None: every core); the bytes do not change."""
    threads = check_threads(threads)
    src = Path(src)
    plan, ckpt = prepare(src, type_name, arch, overrides, pure=pure, imatrix=imatrix)
    out = Path(out) if out is not None else default_output(src, type_name)
    refuse_overwriting_inputs(out, src, imatrix)
    source = Shared(ckpt, Checkpoint, ckpt.folder)
    write_atomically(plan, out, lambda t: _tensor_chunks(plan, source, t), reporter, threads)
    return out, plan


Chunk = Callable[[], np.ndarray]  # a job that reads, checks and encodes some rows of one tensor


def refuse_overwriting_inputs(out: Path, src: Path, imatrix: Imatrix | Path | str | None = None) -> None:
    """An output that is the source GGUF, a file of the checkpoint folder or the imatrix is refused
    before anything is written (gguf_tools.outputs)."""
    im_path = imatrix.path if isinstance(imatrix, Imatrix) else imatrix
    try:
        check_output_path(out, [src, im_path])
    except OutputError as e:
        raise ConversionError(str(e)) from None


def write_atomically(plan: ConversionPlan, out: Path, chunks: Callable[[PlannedTensor], Iterable[Chunk]],
                     reporter: Reporter | None = None, threads: int = 1) -> None:
    """Check the target, write `plan` to a temporary file beside it, rename it only on success."""
    remove_stale_partials(out)  # left by a killed run (SIGKILL): dead pid, never a running conversion's
    check_writable(out, plan.total_bytes)
    tmp = partial_path(out)
    try:
        write_plan(plan, tmp, chunks, reporter, threads)  # fsyncs the data before closing
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)  # the rename itself survives a power cut


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
    write_plan(plan, path, lambda t: _tensor_chunks(plan, Shared(ckpt, Checkpoint, ckpt.folder), t), reporter)


def write_plan(plan: ConversionPlan, path: Path, chunks: Callable[[PlannedTensor], Iterable[Chunk]],
               reporter: Reporter | None, threads: int = 1) -> None:
    """Tensor infos, then every tensor's chunks in order; the chunk jobs run on `threads` threads
    (gguf_tools.parallel_quant), their results are written in plan order."""
    w = _write_header(plan, path)
    assert w.fout is not None
    fout = w.fout[0]
    if reporter:
        reporter.start(len(plan.tensors), plan.total_bytes)
    ok = False
    tags: deque[tuple[int, bool]] = deque()  # (tensor index, last chunk?) of the jobs handed out, in order

    def jobs() -> Iterator[Chunk]:
        for k, t in enumerate(plan.tensors):
            for job, last in _with_last(chunks(t)):
                tags.append((k, last))
                yield job

    results = ordered_map(jobs(), threads)
    try:
        written = 0
        w.write_padding(fout, fout.tell())
        for chunk in results:
            k, last = tags.popleft()
            t = plan.tensors[k]
            chunk.tofile(fout)
            written += chunk.nbytes
            if reporter:
                reporter.advance(t.name, chunk.nbytes, tensor_done=last)
            if not last:
                continue
            if written != t.n_bytes:
                raise ConversionError(f"tensor {t.name}: wrote {written} bytes, planned {t.n_bytes}")
            w.write_padding(fout, written)
            written = 0
            if k + 1 < len(plan.tensors):
                w.write_padding(fout, fout.tell())
        fout.flush()
        os.fsync(fout.fileno())
        ok = True
    except OSError as e:
        raise ConversionError(f"cannot write {path.name}: {e.strerror or e}") from None
    finally:
        results.close()  # cancels the chunk jobs not yet started when writing failed
        w.close()
        if reporter:
            reporter.finish(ok)


def _write_header(plan: ConversionPlan, path: Path) -> GGUFWriter:
    """Header, key/values and tensor infos of `plan` written to `path`; the writer stays open."""
    w = GGUFWriter(path, plan.arch)
    kv = plan.output_kv()
    if any(k == "general.architecture" for k, _, _ in kv):
        w.kv_data[0].clear()  # keep the input's key order (requantize)
    for key, value, vtype in kv:
        _add_kv(w, key, value, vtype)
    for t in plan.tensors:
        shape = t.shape[len(t.shape) - n_dims(t.shape):]  # ggml_n_dims: no leading 1s in NumPy order
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def header_size(plan: ConversionPlan) -> int:
    """Bytes before the first tensor's data (unpadded); they do not depend on the tensor types."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        w = _write_header(plan, Path(d) / "header.gguf")
        assert w.fout is not None
        n = w.fout[0].tell()
        w.close()
    return n


def _with_last(items: Iterable[Chunk]) -> Iterable[tuple[Chunk, bool]]:
    """(item, is it the last one); a tensor always has at least one chunk."""
    it = iter(items)
    prev = next(it)
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _add_kv(w: GGUFWriter, key: str, value: Any, vtype: str) -> None:
    if vtype.endswith("[]"):
        sub = _VTYPES[vtype[:-2]]
        w.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=sub)
    else:
        w.add_key_value(key, value, _VTYPES[vtype])


@dataclass(frozen=True, eq=False)
class Ready:
    """A chunk that is already made (rope_freqs)."""

    data: np.ndarray
    light = True

    def __call__(self) -> np.ndarray:
        return self.data


@dataclass(frozen=True, eq=False)
class CheckpointRows:
    """Rows [start, stop) of one checkpoint tensor, read, checked and encoded: a job that a worker
    process can run (gguf_tools.parallel_quant)."""

    source: Shared[Checkpoint]
    name: str
    qtype: Q
    start: int
    stop: int
    imatrix: np.ndarray | None = None

    @property
    def light(self) -> bool:  # copies and float conversions are not worth a trip to a worker
        return self.qtype in FLOAT_TYPES

    def __call__(self) -> np.ndarray:
        ckpt = self.source.get()
        if self.qtype == Q.BF16 and ckpt.tensors[self.name].dtype == "BF16":
            raw = ckpt.read_raw_rows(self.name, self.start, self.stop)
            if ((raw & 0x7F80) == 0x7F80).any():
                raise ConversionError(f"tensor {self.name} contains NaN or Inf")
            return raw
        rows = ckpt.read_rows(self.name, self.start, self.stop)
        if not np.isfinite(rows).all():
            raise ConversionError(f"tensor {self.name} contains NaN or Inf")
        return encode_rows(rows, self.qtype, self.name, self.imatrix)


def _tensor_chunks(plan: ConversionPlan, source: Shared[Checkpoint], t: PlannedTensor) -> Iterable[Chunk]:
    if t.source is None:  # rope_freqs
        yield Ready(np.asarray(plan.spec.rope_freqs(), dtype=np.float32))
        return
    for start, stop, im in row_chunks(t.shape, tensor_imatrix(plan, t)):
        yield CheckpointRows(source, t.source, t.qtype, start, stop, im)


def tensor_imatrix(plan: ConversionPlan, t: PlannedTensor) -> np.ndarray | None:
    """The importance values for tensor t: (ne0,), (n_expert, ne0) for 3-D experts, or None."""
    if plan.imatrix is None or t.qtype in FLOAT_TYPES:
        return None
    return plan.imatrix.lookup(t.name, t.shape)


def row_chunks(shape: tuple[int, ...], imatrix: np.ndarray | None):
    """(first row, end row, imatrix for these rows) of at most CHUNK_ELEMENTS values; with a per-expert
    imatrix a chunk never crosses an expert (llama_tensor_quantize_impl)."""
    row_len = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))  # may be fewer than stored (trimmed vocab)
    per_expert = shape[-2] if imatrix is not None and imatrix.ndim == 2 else n_rows
    step = max(1, CHUNK_ELEMENTS // row_len)
    start = 0
    while start < n_rows:
        expert = start // per_expert if per_expert else 0
        stop = min(n_rows, start + step, (expert + 1) * per_expert)
        im = None if imatrix is None else (imatrix[expert] if imatrix.ndim == 2 else imatrix)
        yield start, stop, im
        start = stop


def encode_rows(rows: np.ndarray, qtype: Q, what: str = "tensor", imatrix: np.ndarray | None = None) -> np.ndarray:
    if qtype == Q.F32:
        return rows
    if qtype == Q.F16:
        half = rows.astype(np.float16)
        if not np.isfinite(half).all():
            raise ConversionError(f"{what} has values outside the F16 range; use BF16 or a quantized type")
        return half
    from .quants import quantize

    return quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype, imatrix)


__all__ = ["ConversionError", "ConversionPlan", "CheckpointError", "convert", "plan_conversion", "prepare",
           "default_output", "parse_type"]
