"""Progress on stderr: a one-line bar on a terminal (never wider than 80 columns), one summary line
per phase anywhere else, so a log or a pipe gets a readable record instead of redraw codes.

`ConversionBar` is the Reporter convert() and requantize() call (tensors, bytes, MiB/s);
`StepBar` follows the phases of a longer job, e.g. `eval` (examples per phase).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .units import fmt_rate, fmt_size

NAME_WIDTH = 20


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def middle_ellipsis(text: str, width: int) -> str:
    """'blk.12.ffn_…exps.weight': a name that changes every moment on a bar, shortened in the middle."""
    if len(text) <= width:
        return text.ljust(width)
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _progress(stream: TextIO, columns: list[Any]) -> Any:
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(file=stream), transient=True)


class ConversionBar:
    """Reporter for gguf_tools.convert: the tensor being written, a bar, MiB done, MiB/s, tensors, ETA."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.live = is_terminal(self.stream) if live is None else live
        self.progress: Any = None
        self.task: Any = None
        self.tensors = self.bytes = self.done = self.bytes_done = 0
        self.t0 = 0.0

    def start(self, n_tensors: int, n_bytes: int) -> None:
        self.tensors, self.bytes, self.t0 = n_tensors, n_bytes, time.perf_counter()
        if not self.live:
            return
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

        self.progress = _progress(self.stream, [
            TextColumn("{task.fields[tensor]}"), BarColumn(bar_width=12),
            TextColumn("{task.fields[size]}"), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[count]}"), TimeRemainingColumn()])
        self.progress.start()
        self.task = self.progress.add_task("quantize", total=max(n_bytes, 1), **self._fields(""))

    def _fields(self, name: str) -> dict[str, str]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {"tensor": middle_ellipsis(name, NAME_WIDTH), "size": f"{fmt_size(self.bytes_done)}",
                "rate": fmt_rate(self.bytes_done / elapsed), "count": f"{self.done}/{self.tensors}"}

    def advance(self, name: str, n_bytes: int, tensor_done: bool = True) -> None:
        self.bytes_done += n_bytes
        self.done += int(tensor_done)
        if self.progress is not None:
            self.progress.update(self.task, advance=n_bytes, **self._fields(name))

    def finish(self, ok: bool = True) -> None:
        if self.progress is not None:
            self.progress.stop()  # transient: a failed run ends with its one error line
        if ok:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            self.stream.write(f"{self.done} tensors, {fmt_size(self.bytes_done)} in {elapsed:.1f} s "
                              f"({fmt_rate(self.bytes_done / elapsed)})\n")
            self.stream.flush()


class StepBar:
    """`update(what, done, total)` for jobs made of phases; a context manager (the bar goes away with it)."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.live = is_terminal(self.stream) if live is None else live
        self.progress: Any = None
        self.task: Any = None
        self.what: str | None = None
        self.t0 = 0.0

    def __enter__(self) -> StepBar:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = _progress(self.stream, [
                TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn()])
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, what: str, done: int, total: int) -> None:
        if what != self.what:
            self.what, self.t0 = what, time.perf_counter()
            if self.progress is not None:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(middle_ellipsis(what, 26), total=total)
        if self.progress is not None:
            self.progress.update(self.task, completed=done)
        elif done == total:
            self.stream.write(f"{what}: {done}/{total} in {time.perf_counter() - self.t0:.1f} s\n")
            self.stream.flush()


__all__ = ["ConversionBar", "StepBar", "is_terminal", "middle_ellipsis"]
