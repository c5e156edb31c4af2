"""A rich progress bar for conversions: tensors done, bytes written and MB/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class RichReporter:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[tensor]:<36.36}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task = None

    def start(self, n_tensors: int, n_bytes: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("convert", total=n_bytes, tensor="", done=0, count=n_tensors)

    def advance(self, name: str, n_bytes: int, tensor_done: bool = True) -> None:
        """Called per written chunk, so a large tensor moves the bar while it is quantized."""
        t = self.progress.tasks[0]
        self.progress.update(self.task, advance=n_bytes, tensor=name, done=t.fields["done"] + int(tensor_done))

    def finish(self, ok: bool = True) -> None:
        if not ok:  # a failed run ends with its one error line, not a half-drawn bar
            self.progress.live.transient = True
        self.progress.stop()
