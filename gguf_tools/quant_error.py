"""Relative quantization error of a tensor for a set of GGML types, weighted by an importance matrix.

rel(t, q) = sum over matrices m (experts) of usage_m * sum_j imatrix_mj * ||W_m[:, j] - Q(W_m)[:, j]||^2,
divided by the same sum with W_m itself: the expected squared change of the tensor's output relative to
its expected energy, for inputs whose mean squares per column are the imatrix values. Q is the file's
own byte-exact quantizer (with the imatrix), so the error measured is the error written. Large tensors
are measured on SAMPLE_ROWS rows per matrix, in evenly spaced contiguous runs (a few positioned reads);
the jobs run in worker processes (gguf_tools.parallel_quant). gguf_tools.target_mix turns these into
expected KLD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q

from .imatrix import Imatrix
from .parallel_quant import Shared, ordered_map
from .presets import block_fits

# llama.cpp runs all of these on CPU and GPU; ordered by bits per weight
CANDIDATES: tuple[Q, ...] = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_0, Q.IQ4_NL, Q.Q4_K, Q.Q4_1, Q.Q5_0, Q.Q5_K, Q.Q5_1,
                             Q.Q6_K, Q.Q8_0, Q.F16, Q.BF16)
SAMPLE_ROWS = 512  # rows measured per weight matrix (per expert: SAMPLE_ROWS // 8, at least 16)


def candidates(shape: Sequence[int]) -> list[Q]:
    """The candidate types whose block divides the row."""
    return [q for q in CANDIDATES if block_fits(q, int(shape[-1]))]


RowReader = Callable[[object, str, int, int], np.ndarray]  # (source, name, first row, end row) -> float32


@dataclass(frozen=True, eq=False)
class ErrorJob:
    """rel(t, q) for every q in qtypes, from a sample of the tensor's rows; runs in a worker process."""

    source: Shared
    read: RowReader
    name: str  # the output tensor
    source_name: str  # what `read` knows it by
    shape: tuple[int, ...]
    qtypes: tuple[Q, ...]
    imatrix: np.ndarray | None  # (n_mat, ne0)
    usage: np.ndarray  # (n_mat,) share of rows each matrix (expert) saw
    max_rows: int = SAMPLE_ROWS

    def __call__(self) -> dict[Q, float]:
        from .quants import dequantize, quantize

        n_mat = self.shape[0] if len(self.shape) == 3 else 1
        rows = int(np.prod(self.shape[:-1])) // n_mat
        per = rows if n_mat == 1 else max(16, self.max_rows // 8)
        err = dict.fromkeys(self.qtypes, 0.0)
        signal = 0.0
        for m in range(n_mat):
            if self.usage[m] <= 0:
                continue
            im = None if self.imatrix is None else self.imatrix[m]
            w = np.concatenate([self.read(self.source.get(), self.source_name, m * rows + a, m * rows + b)
                                for a, b in _blocks(rows, min(per, self.max_rows))])
            scale = self.usage[m] * rows / w.shape[0]
            signal += scale * weighted_energy(w, im)
            for q in self.qtypes:
                err[q] += scale * weighted_energy(w - dequantize(quantize(w, q, im), q).reshape(w.shape), im)
        return {q: (e / signal if signal > 0 else 0.0) for q, e in err.items()}


def weighted_energy(w: np.ndarray, imatrix: np.ndarray | None) -> float:
    """sum_j imatrix_j * sum_i w_ij^2: the expected squared output of rows w for inputs whose mean
    squares per column are the importance values (1 without an imatrix)."""
    sq = (w.astype(np.float64) ** 2).sum(0)
    return float(sq.sum() if imatrix is None else sq @ imatrix.astype(np.float64))


def _blocks(rows: int, want: int, pieces: int = 8) -> list[tuple[int, int]]:
    """`want` rows in up to `pieces` evenly spaced contiguous runs (cheap positioned reads)."""
    if want >= rows:
        return [(0, rows)]
    pieces = max(1, min(pieces, want))
    size = want // pieces
    starts = np.linspace(0, rows - size, pieces).astype(int)
    return [(int(s), int(s) + size) for s in starts]


def read_checkpoint_rows(ckpt, name: str, start: int, stop: int) -> np.ndarray:
    return ckpt.read_rows(name, start, stop)


def read_gguf_rows(f, name: str, start: int, stop: int) -> np.ndarray:
    from .requantize import _decode

    info = f.tensors[name]
    n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    raw = np.asarray(info.data).reshape(-1).view(np.uint8).reshape(n_rows, -1)[start:stop]
    return np.ascontiguousarray(_decode(raw, info.qtype, info.shape[-1]))


def usage_of(imatrix: Imatrix | None, name: str, shape: Sequence[int]) -> np.ndarray:
    n_mat = shape[0] if len(shape) == 3 else 1
    counts = None if imatrix is None else imatrix.counts.get(name)
    if counts is None or counts.size != n_mat or counts.sum() <= 0:
        return np.full(n_mat, 1.0 / n_mat)
    return counts.astype(np.float64) / counts.sum()


def measure(tensors: Iterable[tuple[str, str, tuple[int, ...]]], source: Shared, read: RowReader,
            imatrix: Imatrix | None, threads: int = 1, max_rows: int = SAMPLE_ROWS,
            on_tensor: Callable[[int, int], None] | None = None) -> dict[str, dict[Q, float]]:
    """rel(t, q) for every (name, source name, shape) and every candidate type of its row."""
    jobs, names = [], []
    for name, src_name, shape in tensors:
        im = None if imatrix is None else imatrix.lookup(name, shape)
        if im is not None and im.ndim == 1:
            im = im[None, :]
        jobs.append(ErrorJob(source, read, name, src_name, tuple(shape), tuple(candidates(shape)), im,
                             usage_of(imatrix, name, shape), max_rows))
        names.append(name)
    out = {}
    for i, (name, rel) in enumerate(zip(names, ordered_map(jobs, threads))):
        out[name] = rel
        if on_tensor is not None:
            on_tensor(i + 1, len(names))
    return out


__all__ = ["CANDIDATES", "ErrorJob", "candidates", "measure", "read_checkpoint_rows", "read_gguf_rows", "usage_of",
           "weighted_energy"]
