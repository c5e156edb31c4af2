"""Plain-text tables that fit a terminal without making names ambiguous.

Rich's tables fold a long name at whatever character meets the edge and, in a pipe, still draw
boxes at 80 columns; two tensor names that differ only in their middle could then print the same.
Here a table is plain aligned text: in a pipe every row is one line (whole names, easy to grep);
on a terminal narrower than the table, the columns marked wrappable are broken after '.', '_',
'-', '/', ',' or ' ' onto continuation lines, so every character of every name is still printed
and in order.
"""

from __future__ import annotations

import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import TextIO

GAP = "  "
MIN_WRAP = 12  # narrowest a wrapped column gets
_PIECES = re.compile(r"[^._\-/ ,]*[._\-/ ,]+|[^._\-/ ,]+")


def output_width(stream: TextIO | None = None) -> int | None:
    """The terminal's width when `stream` (stdout) is a terminal, else None: no wrapping in a pipe."""
    stream = stream or sys.stdout
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def wrap_name(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters whose concatenation is `text`, broken after separators
    where possible (a piece longer than a line is cut)."""
    if len(text) <= width:
        return [text]
    lines: list[str] = []
    line = ""
    for piece in _PIECES.findall(text):
        while len(piece) > width:  # no separator close enough: cut
            room = width - len(line)
            if room == 0:
                lines.append(line)
                line, room = "", width
            line, piece = line + piece[:room], piece[room:]
        if len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
    if line or not lines:
        lines.append(line)
    return lines


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], *, width: int | None = None,
           wrap: Sequence[int] = (0,), right: Sequence[int] = (), indent: str = "",
           notes: Sequence[str] | None = None) -> str:
    """Aligned columns under a header and a rule. `wrap`: the columns that may be broken when the
    table is wider than `width` (widest first); `right`: right-aligned columns (numbers); `notes`:
    a line of prose under each row, indented and wrapped at spaces to `width`."""
    cells = [[str(c) for c in r] for r in rows]
    n = len(headers)
    widths = [max([len(headers[i])] + [len(r[i]) for r in cells]) for i in range(n)]
    if width is not None:
        _fit(widths, headers, width - len(indent), wrap)
    lines = [_line(list(headers), widths, right, indent), _line(["-" * w for w in widths], widths, right, indent)]
    pad = indent + "    "
    for n, r in enumerate(cells):
        parts = [wrap_name(c, widths[i]) if i in wrap else [c] for i, c in enumerate(r)]
        for k in range(max(len(p) for p in parts)):
            lines.append(_line([p[k] if k < len(p) else "" for p in parts], widths, right, indent))
        if notes is not None and notes[n]:
            lines += textwrap.wrap(notes[n], width, initial_indent=pad, subsequent_indent=pad + "  ",
                                   break_on_hyphens=False) if width else [pad + notes[n]]
    return "\n".join(lines) + "\n"


def _fit(widths: list[int], headers: Sequence[str], width: int, wrap: Sequence[int]) -> None:
    """Narrow the wrappable columns, widest first, until the table fits or none can shrink."""
    while sum(widths) + len(GAP) * (len(widths) - 1) > width:
        floor = {i: max(MIN_WRAP, len(headers[i])) for i in wrap}
        shrinkable = [i for i in wrap if widths[i] > floor[i]]
        if not shrinkable:
            return
        i = max(shrinkable, key=lambda j: widths[j])
        excess = sum(widths) + len(GAP) * (len(widths) - 1) - width
        widths[i] = max(floor[i], widths[i] - excess)


def _line(cells: list[str], widths: list[int], right: Sequence[int], indent: str) -> str:
    out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    return (indent + GAP.join(out)).rstrip()


__all__ = ["output_width", "render", "wrap_name"]
