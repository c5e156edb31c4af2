"""A live terminal view of the canvas while it denoises (`diffgemma run --show-canvas`)."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from .generate import StepInfo
from .tokenizer import GGUFTokenizer


class CanvasView:
    def __init__(self, console: Console | None = None):
        self.tok: GGUFTokenizer | None = None  # set by the runner once the model is loaded
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=12, transient=True)

    def __enter__(self) -> CanvasView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def step(self, info: StepInfo) -> None:
        draft = ""
        if info.argmax is not None and self.tok is not None:
            draft = self.tok.decode(info.argmax.tolist(), stop_at_eos=False)
        title = (f"canvas {info.canvas_index + 1}  step {info.step}  accepted {info.accepted_count}  "
                 f"mean entropy {info.mean_entropy:.4f}")
        self.live.update(Panel(Text(draft), title=title, border_style="cyan"))
