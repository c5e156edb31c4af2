"""Quantize on every core while the output stays byte-identical to one thread.

The writers (convert, requantize) cut each tensor into chunks of at most CHUNK_ELEMENTS values
(whole rows, never crossing an expert when the imatrix is per expert), and every GGML quantizer works
row by row, so a chunk's bytes do not depend on which worker makes them or when. `ordered_map` runs
the chunk jobs (read or decode the rows, check them, quantize) on a pool of worker processes and hands
the results back in file order, so the file is written front to back exactly as with one thread.

Processes, not threads: py-spy shows the NumPy quantizers holding the GIL for 7% (Q4_K) to 43%
(Q5_0) of their time (Python between array operations), which would cap two threads at about 1.4x on
the Q6_K/Q5_0 parts of a mix and 16 threads far lower. A job is a small picklable description (tensor,
row range, types, its imatrix slice); the source travels as a `Shared` reference that each worker
opens once (a checkpoint's headers, or the input GGUF memory-mapped) and reads with positioned reads.
Jobs marked light (byte copies, F16/F32 conversion) run in the writing process.

Memory: at most `threads` jobs run at once and at most 2 * threads finished chunks wait to be
written. One job holds one chunk: CHUNK_ELEMENTS (8 Mi) values as stored and as float32, and the
quantizer's temporaries, which tracemalloc puts at 64 MiB at most (Q4_0/Q5_0/Q5_1 with an imatrix;
the K-quants 10-23 MiB). A whole job (BF16 rows decoded, checked, quantized to Q5_0 with an imatrix)
peaks at 96 MiB, so PEAK_PER_WORKER_MIB = 128 per thread whatever the model size; a forked worker
shares the interpreter's pages with the writing process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

T = TypeVar("T")
S = TypeVar("S")

PEAK_PER_WORKER_MIB = 128  # checked by tests/gguf_tools/test_parallel_quant.py on the worst type


class ThreadsError(ValueError):
    """A bad --threads value, or a worker that died."""


def default_threads() -> int:
    """Every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int:
    """None -> every core; below 1 is an error (one line, before anything is written)."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ThreadsError(f"--threads must be at least 1, got {threads}")
    return threads


_OPENED: dict[tuple[Callable[..., Any], Hashable], Any] = {}


class Shared(Generic[S]):
    """A source object that a worker process reopens (opener(key)) instead of receiving it pickled;
    the writing process uses the object it already has."""

    def __init__(self, obj: S, opener: Callable[[Any], S], key: Hashable):
        self.obj: S | None = obj
        self.opener, self.key = opener, key

    def __getstate__(self) -> dict[str, Any]:
        return {"opener": self.opener, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.opener, self.key, self.obj = state["opener"], state["key"], None

    def get(self) -> S:
        if self.obj is None:
            k = (self.opener, self.key)
            if k not in _OPENED:  # once per worker process
                _OPENED[k] = self.opener(self.key)
            self.obj = _OPENED[k]
        return self.obj


def _worker_init(parent: int) -> None:
    # Ctrl-C goes to the whole process group: the writer handles it (cancels, cleans up, one error line)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """A writer killed with SIGKILL cannot shut its pool down, and a forked worker holds its own copy of
    the job pipe, so it would wait for work forever: on Linux the kernel ends it with its parent."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _call(job: Callable[[], T]) -> T:
    return job()


def _context() -> mp.context.BaseContext:
    # fork starts a worker in milliseconds with NumPy already imported; elsewhere spawn is the safe choice
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def ordered_map(jobs: Iterable[Callable[[], T]], threads: int = 1) -> Iterator[T]:
    """job() for every job, results in job order. With threads > 1 the jobs run in `threads` worker
    processes (jobs with a true `light` attribute in this one, when their turn comes) and at most
    2 * threads are queued; the first failing job (in order) raises its error, and the rest are
    cancelled."""
    if threads <= 1:
        for job in jobs:
            yield job()
        return
    window = 2 * threads
    pending: deque[Future[T] | Callable[[], T]] = deque()
    pool = ProcessPoolExecutor(threads, mp_context=_context(), initializer=_worker_init, initargs=(os.getpid(),))

    def result(item: Future[T] | Callable[[], T]) -> T:
        if not isinstance(item, Future):
            return item()
        try:
            return item.result()
        except BrokenProcessPool:
            raise ThreadsError("a quantization worker process died (out of memory?); try fewer --threads") from None

    try:
        for job in jobs:
            pending.append(job if getattr(job, "light", False) else pool.submit(_call, job))
            if len(pending) >= window:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())
    finally:  # also on an error, Ctrl-C or an abandoned generator: running jobs finish, queued ones are dropped
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["PEAK_PER_WORKER_MIB", "Shared", "ThreadsError", "check_threads", "default_threads", "ordered_map"]
