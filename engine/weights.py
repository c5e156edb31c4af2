"""GGUF weights for the torch engine: memory-mapped, kept in their stored type, dequantized on use.

Nothing is inflated ahead of time. A matmul asks `WeightStore.get(name, device, dtype)` for its
operand and receives a freshly dequantized tensor; MoE experts are fetched one expert slice at a
time, and embedding rows one row set at a time, so a quantized 3-D expert tensor or the 262k-row
embedding is never turned into float32 as a whole.

The dequantizers are the torch fast path beside the NumPy quantizers
(gguf_tools/quants/torch_dequant.py), bit-identical with gguf-py's numpy kernels for every number.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from gguf_tools.arch import ArchSpec
from gguf_tools.names import ENC_SCALE, ROPE_FREQS, expected_tensors
from gguf_tools.quants.torch_dequant import TORCH_DEQUANTIZERS
from gguf_tools.reader import GGUFFile, TensorInfo

# blocks [n_blocks, type_size] uint8 -> float32 [n_blocks, block_size]
DEQUANTIZERS = TORCH_DEQUANTIZERS


# Types whose dequantizer is one widening (and scaling) pass: no temporaries to keep in cache.
_ONE_PASS = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0})
# The others build their codes in a few passes over uint8/int8 buffers; on the CPU a request of more
# than 4 pieces is fed to them a piece of about this many values at a time, so those temporaries stay
# in cache: a 1024-row chunk of the Q6_K embedding took 3.9 s per 262,144 rows in one piece and 1.4 s
# in pieces of 128 rows (one thread). quantized_linear's 2 MiB blocks are left whole (an extra copy
# there cost more than it saved).
CPU_DEQUANT_PIECE = 1 << 18


def dequantize(raw: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Raw rows [..., row_bytes] uint8 (on any device) -> float32 [..., row_elements] there."""
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        raise NotImplementedError(f"no torch dequantizer for GGML type {qtype.name}")
    block, size = GGML_QUANT_SIZES[qtype]
    if raw.shape[-1] % size:
        raise ValueError(f"{qtype.name}: row of {raw.shape[-1]} bytes is not a whole number of blocks")
    blocks = raw.reshape(-1, size)
    per = max(1, CPU_DEQUANT_PIECE // block)
    if raw.device.type != "cpu" or qtype in _ONE_PASS or blocks.shape[0] <= 4 * per:
        out = fn(blocks)
    else:  # the same values, piece by piece
        out = torch.empty(blocks.shape[0], block, dtype=torch.float32)
        for a in range(0, blocks.shape[0], per):
            out[a:a + per] = fn(blocks[a:a + per])
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // size * block)


# On CPU a matrix is dequantized about this many bytes (in the compute dtype) at a time and each
# block is multiplied while it is still in cache. Dequantizing the whole matrix first writes it to
# DRAM as fp32 and reads it back (10 bytes of traffic per F16 weight instead of 2), which made
# small-batch work (prefill chunks, the experts of a denoising step) memory-bound.
CPU_BLOCK_BYTES = 2 << 20


def quantized_linear(x: torch.Tensor, raw: torch.Tensor, qtype: Q, block_bytes: int | None = None
                     ) -> torch.Tensor:
    """x [n, cols] @ W.T in x's dtype, for W [rows, cols] given as stored rows `raw` [rows, row_bytes]
    of `qtype` on x's device. Off the CPU the whole matrix is dequantized at once."""
    rows = raw.shape[0]
    block_bytes = block_bytes or CPU_BLOCK_BYTES
    step = rows if x.device.type != "cpu" else max(1, block_bytes // (x.shape[-1] * x.element_size()))
    if step >= rows:
        return x @ dequantize(raw, qtype).to(x.dtype).T
    out = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    for s in range(0, rows, step):
        torch.mm(x, dequantize(raw[s:s + step], qtype).to(x.dtype).T, out=out[:, s:s + step])
    return out


def _as_torch(a: np.ndarray) -> torch.Tensor:
    # the memory map is read-only; torch warns about that, but the engine never writes weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class WeightStore:
    """One GGUF file, memory-mapped; tensors dequantized on request on the requested device.

    Layout variants accepted (all seen in the wild, see arch notes §4.2, §6.3):
    fused `ffn_gate_up_exps` or split `ffn_gate_exps` + `ffn_up_exps`; `self_cond_pre_norm` or
    `self_cond_norm`; no `enc_layer_output_scale` (the decoder scalars then serve both modes).
    """

    SMALL = 1 << 16  # tensors up to this many elements (norms, scalars) are cached dequantized
    # observer(name, x, expert) sees the input rows of every routed expert product (engine.model.expert_mlp);
    # engine.imatrix_collect sets it to collect an importance matrix; None costs nothing
    observer: Callable[[str, torch.Tensor, int], None] | None = None

    def __init__(self, path: Path | str | GGUFFile):
        self.file = path if isinstance(path, GGUFFile) else GGUFFile(path)
        self.path = self.file.path
        self.spec: ArchSpec = self.file.spec()
        self.tensors: dict[str, TensorInfo] = self.file.tensors
        self._raw_on: dict[tuple[str, str], torch.Tensor] = {}
        self._small: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        self.self_cond_norm = self._first_present("self_cond_pre_norm.weight", "self_cond_norm.weight")
        self.fused_gate_up = [f"blk.{i}.ffn_gate_up_exps.weight" in self.tensors
                              for i in range(self.spec.block_count)]
        self._validate()

    # ---- checks -----------------------------------------------------------------------------
    def _first_present(self, *names: str) -> str:
        return next((n for n in names if n in self.tensors), names[0])

    def _validate(self) -> None:
        s = self.spec
        for e in expected_tensors(s):
            if e.name == ROPE_FREQS or e.name.endswith(ENC_SCALE):
                continue  # the engine takes the rope split from the spec; enc scales are optional
            name, shapes = e.name, [e.shape]
            if name == "self_cond_pre_norm.weight":
                name = self.self_cond_norm
            if name.endswith("ffn_gate_up_exps.weight") and not self.fused_gate_up[e.block]:
                gate, up = (f"blk.{e.block}.{p}" for p in ("ffn_gate_exps.weight", "ffn_up_exps.weight"))
                if not (self.has(gate) or self.has(up)):
                    raise ValueError(f"{self.path.name}: missing required tensor {name!r} "
                                     f"(or the split pair {gate!r} + {up!r})")
                half = (s.expert_count, s.expert_feed_forward_length, s.embedding_length)
                self._check(gate, half)
                self._check(up, half)
                continue
            self._check(name, *shapes)
        for i in range(s.block_count):
            if self.has(f"blk.{i}.{ENC_SCALE}"):
                self._check(f"blk.{i}.{ENC_SCALE}", (1,))

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        info = self.tensors.get(name)
        if info is None:
            raise ValueError(f"{self.path.name}: missing required tensor {name!r}")
        if tuple(info.shape) != tuple(shape):
            raise ValueError(f"{self.path.name}: tensor {name!r} has shape {list(info.shape)}, "
                             f"expected {list(shape)}")
        if info.qtype not in DEQUANTIZERS:
            raise ValueError(f"{self.path.name}: tensor {name!r} has type {info.qtype.name}, "
                             "which this engine cannot dequantize")

    # ---- raw access -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"{self.path.name}: missing required tensor {name!r}") from None

    def raw(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Stored bytes as uint8 [..., row_bytes]. On CPU a view of the memory map; on another
        device uploaded once and kept there, still in the stored (quantized) type."""
        device = torch.device(device)
        info = self.info(name)
        if device.type == "cpu":
            return self._raw_cpu(info)
        key = (name, str(device))
        t = self._raw_on.get(key)
        if t is None:
            t = self._raw_on[key] = self._raw_cpu(info).to(device)
        return t

    @staticmethod
    def _raw_cpu(info: TensorInfo) -> torch.Tensor:
        flat = np.asarray(info.data).reshape(-1).view(np.uint8)
        return _as_torch(flat.reshape(*info.shape[:-1], -1))

    # ---- dequantized access -----------------------------------------------------------------
    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole tensor, NumPy shape, dequantized on `device`. Read-only on CPU/F32."""
        info = self.info(name)
        small = info.n_elements <= self.SMALL
        key = (name, str(device), dtype)
        if small and key in self._small:
            return self._small[key]
        t = dequantize(self.raw(name, device), info.qtype).to(dtype)
        if small:
            self._small[key] = t
        return t

    def rows(self, name: str, index: torch.Tensor, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Selected rows of a 2-D tensor (embedding lookup): only those rows are dequantized."""
        raw = self.raw(name, device)
        return dequantize(raw[index.to(raw.device)], self.info(name).qtype).to(dtype)

    def row_range(self, name: str, start: int, stop: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw(name, device)[start:stop], self.info(name).qtype).to(dtype)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T for the 2-D weight `name`, on x's device and in x's dtype (see quantized_linear)."""
        return quantized_linear(x, self.raw(name, x.device), self.info(name).qtype)

    def expert_names(self, layer: int) -> tuple[str, ...]:
        """(gate_up, down) for a fused file, (gate, up, down) for a split one."""
        p = f"blk.{layer}."
        gate_up = ((p + "ffn_gate_up_exps.weight",) if self.fused_gate_up[layer]
                   else (p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"))
        return (*gate_up, p + "ffn_down_exps.weight")

    def layer_scale_name(self, layer: int, encoder: bool) -> str:
        enc = f"blk.{layer}.{ENC_SCALE}"
        if encoder and self.has(enc):
            return enc
        return f"blk.{layer}.layer_output_scale.weight"


__all__ = ["CPU_BLOCK_BYTES", "CPU_DEQUANT_PIECE", "DEQUANTIZERS", "WeightStore", "dequantize", "quantized_linear"]
