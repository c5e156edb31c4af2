"""Human-readable output of `quantize --dry-run` and `inspect`: plain aligned tables (gguf_tools.table)
that fit the terminal, one line per row in a pipe, sizes in MiB/GiB as llama.cpp prints them."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

from gguf import GGML_QUANT_SIZES

from .presets import allows_quantization
from .table import output_width, render
from .units import fmt_size


def _out(stream: TextIO | None) -> TextIO:
    return stream or sys.stdout


def _width(stream: TextIO | None, width: int | None) -> int | None:
    return width if width is not None else output_width(_out(stream))


def print_plan(plan: Any, stream: TextIO | None = None, width: int | None = None) -> None:
    """The conversion plan: every tensor with its source, shape, type, size and the rule that chose it.
    One line per tensor when that fits (always in a pipe); on a narrower terminal the source and the
    rule go on an indented line of their own under the tensor's row."""
    out, w = _out(stream), _width(stream, width)
    out.write(f"{plan.spec.name} -> {plan.preset.name} ({plan.arch})\n\n")
    rows = [(r["name"], r["source"], "x".join(map(str, r["shape"])), r["type"], fmt_size(r["bytes"]), r["rule"])
            for r in plan.explain()]
    headers = ("name", "source", "shape", "type", "size", "rule")
    one_line = render(headers, rows, width=None, right=(4,))
    if w is None or max(map(len, one_line.splitlines())) <= w:
        out.write(one_line)
    else:
        out.write(render(headers[:1] + headers[2:5], [r[:1] + r[2:5] for r in rows], width=w, wrap=(0, 1),
                         right=(3,), notes=[f"from {r[1]}: {r[5]}" for r in rows]))
    out.write(f"\n{len(plan.tensors)} tensors, total {fmt_size(plan.total_bytes)} ({plan.total_bytes:,} bytes)\n")


def _value(v: Any) -> str:
    if isinstance(v, dict) and "length" in v:  # an array preview (inspect_gguf._preview)
        return f"[{v['length']} items] " + json.dumps(v["head"], ensure_ascii=False)[:-1] + ", ...]"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # escapes newlines: one row per key
    return json.dumps(v, ensure_ascii=False) if isinstance(v, list) else str(v)


def print_summary(s: dict[str, Any], stream: TextIO | None = None, width: int | None = None) -> None:
    """`inspect`: the file line, then the key/value, by-type and tensor tables."""
    out, w = _out(stream), _width(stream, width)
    out.write(f"{s['path']}\n  architecture {s['architecture']}, {s['tensor_count']} tensors, "
              f"{fmt_size(s['file_size'])}, {s['bpw']:.2f} bits/weight\n\nmetadata\n")
    out.write(render(("key", "type", "value"), [(r["key"], r["type"], _value(r["value"])) for r in s["kv"]],
                     width=w, wrap=(2, 0), indent="  "))
    out.write("\nby type\n")
    out.write(render(("type", "tensors", "elements", "size", "bits/weight"),
                     [(r["type"], r["tensors"], f"{r['elements']:,}", fmt_size(r["bytes"]), f"{r['bpw']:.2f}")
                      for r in s["types"]], width=w, wrap=(), right=(1, 2, 3, 4), indent="  "))
    out.write("\ntensors\n")
    out.write(render(("name", "type", "shape", "size"),
                     [(r["name"], r["type"], "x".join(map(str, r["shape"])), fmt_size(r["bytes"]))
                      for r in s["tensors"]], width=w, wrap=(0, 2), right=(3,), indent="  "))


_FALLBACK = re.compile(r"fallback (\w+)->(\w+) \(row (\d+)\)")


def plan_warnings(plan: Any, overrides: Sequence[Any] = ()) -> list[str]:
    """What the plan did that the command line did not say: --tensor-type patterns that match no
    tensor or whose type fell back (llama-quantize's rule when a row is not whole blocks), and, as a
    note, how many tensors of the preset fell back. Lines for stderr."""
    lines: list[str] = []
    hits: dict[int, list[Any]] = {i: [] for i in range(len(overrides))}
    preset_fallbacks: Counter[str] = Counter()
    for t in plan.tensors:
        k = None
        if not plan.preset.is_float and allows_quantization(t.name, t.shape):
            k = next((i for i, r in enumerate(overrides) if r.matches(t.name)), None)
        if k is not None:
            hits[k].append(t)
            continue
        m = _FALLBACK.search(t.rule)
        if m:
            preset_fallbacks[f"{m.group(1)}->{m.group(2)}"] += 1
    for i, r in enumerate(overrides):
        flag = f"--tensor-type {r.pattern}={r.type.name}"
        if not hits[i]:
            lines.append(f"warning: {flag} matched no tensor (patterns are searched in GGUF names such as "
                         "blk.0.ffn_down_exps.weight)")
            continue
        fell: dict[str, list[Any]] = {}
        for t in hits[i]:
            if t.qtype != r.type:
                fell.setdefault(t.qtype.name, []).append(t)
        for name, ts in sorted(fell.items()):
            rows = ", ".join(str(n) for n in sorted({t.shape[-1] for t in ts}))
            lines.append(f"warning: {flag}: {len(ts)} of {len(hits[i])} tensors stored as {name} instead (rows of "
                         f"{rows} values are not whole {r.type.name} blocks of {GGML_QUANT_SIZES[r.type][0]}, as "
                         "in llama-quantize)")
    if preset_fallbacks:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(preset_fallbacks.items()))
        lines.append(f"note: {sum(preset_fallbacks.values())} tensors use a fallback type because their rows are "
                     f"not whole blocks ({kinds}), as llama-quantize does; --dry-run lists them")
    return lines
