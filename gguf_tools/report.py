"""Human-readable tables for plans and file summaries (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def print_plan(plan: Any, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"{plan.spec.name} -> {plan.preset.name} ({plan.arch})")
    for col in ("name", "source", "shape", "type", "bytes", "rule"):
        t.add_column(col, overflow="fold")
    for r in plan.explain():
        t.add_row(r["name"], r["source"], "x".join(map(str, r["shape"])), r["type"], _size(r["bytes"]), r["rule"])
    console.print(t)
    console.print(f"{len(plan.tensors)} tensors, total {_size(plan.total_bytes)} ({plan.total_bytes} bytes)")


def print_summary(s: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{s['path']}[/bold]  architecture [bold]{s['architecture']}[/bold]  "
                  f"{s['tensor_count']} tensors  {_size(s['file_size'])}  {s['bpw']:.2f} bits/weight")
    kv = Table(title="metadata")
    kv.add_column("key")
    kv.add_column("type")
    kv.add_column("value", overflow="fold")
    for r in s["kv"]:
        kv.add_row(r["key"], r["type"], str(r["value"]))
    console.print(kv)
    types = Table(title="by type")
    for col in ("type", "tensors", "elements", "bytes", "bits/weight"):
        types.add_column(col, justify="right")
    for r in s["types"]:
        types.add_row(r["type"], str(r["tensors"]), str(r["elements"]), _size(r["bytes"]), f"{r['bpw']:.2f}")
    console.print(types)
    tt = Table(title="tensors")
    for col in ("name", "type", "shape", "bytes"):
        tt.add_column(col)
    for r in s["tensors"]:
        tt.add_row(r["name"], r["type"], "x".join(map(str, r["shape"])), _size(r["bytes"]))
    console.print(tt)
