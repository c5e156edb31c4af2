"""Sizes and rates as every command prints and reads them.

Printing follows llama.cpp: binary units spelled MiB and GiB ("file size = 8.26 MiB"), a size under
1 GiB in MiB, rates in MiB/s (GiB/s from 1 GiB/s); KiB and bytes only for what is smaller than a
MiB. Reading follows the memory convention the planner uses (engine.placement): "24GB", "24GiB" and
"24G" are all 24 x 2^30 bytes, what a "24 GB" card holds. A number without a unit is refused:
"--vram 8" meaning 8 bytes is never what anyone typed it for.
"""

from __future__ import annotations

import re

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZE_UNITS = {"b": 1, "k": KIB, "kb": KIB, "kib": KIB, "m": MIB, "mb": MIB, "mib": MIB,
              "g": GIB, "gb": GIB, "gib": GIB, "t": TIB, "tb": TIB, "tib": TIB}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


class SizeError(ValueError):
    """A size option that cannot be read; the message shows the expected form."""


def fmt_size(n: int | float) -> str:
    """'12.46 MiB', '15.64 GiB', '3.00 KiB', '512 B'."""
    a = abs(n)
    if a >= GIB:
        return f"{n / GIB:.2f} GiB"
    if a >= MIB:
        return f"{n / MIB:.2f} MiB"
    if a >= KIB:
        return f"{n / KIB:.2f} KiB"
    return f"{int(n)} B"


def fmt_rate(bytes_per_s: float) -> str:
    """'238.4 MiB/s', '22.35 GiB/s': the binary units of the sizes beside them."""
    if abs(bytes_per_s) >= GIB:
        return f"{bytes_per_s / GIB:.2f} GiB/s"
    return f"{bytes_per_s / MIB:.1f} MiB/s"


def parse_size(text: str, flag: str) -> int:
    """'24GB' / '18GiB' / '512MB' / '1.5T' -> bytes; a bare number or an unknown unit is a SizeError
    naming `flag` and the expected form."""
    m = _SIZE.fullmatch(str(text))
    example = "e.g. 24GB, 18GiB or 512MB (binary units: 1GB = 1GiB = 2^30 bytes)"
    if m is None:
        raise SizeError(f"{flag} {text!r}: expected a size with a unit, {example}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit:
        raise SizeError(f"{flag} {text!r}: a size needs a unit, {example}")
    if unit not in SIZE_UNITS:
        raise SizeError(f"{flag} {text!r}: unknown unit {m.group(2)!r}, {example}")
    return int(value * SIZE_UNITS[unit])


__all__ = ["GIB", "KIB", "MIB", "SizeError", "fmt_rate", "fmt_size", "parse_size"]
