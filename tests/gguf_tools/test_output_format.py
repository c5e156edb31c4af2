"""What the commands print: sizes and rates in llama.cpp's binary units, sizes read only with a unit,
tables that fit 80 columns without cutting a name into something ambiguous, bars that fit too."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from engine.placement import parse_bytes
from gguf_tools.bars import ConversionBar, StepBar, middle_ellipsis
from gguf_tools.table import render, wrap_name
from gguf_tools.units import SizeError, fmt_rate, fmt_size, parse_size

MIB, GIB = 2**20, 2**30


@pytest.mark.parametrize("n", [8_660_000, 13_061_000, 700 * MIB, GIB - 1])
def test_sizes_below_a_gib_are_mib_as_llama_cpp_prints_them(n):
    assert fmt_size(n) == f"{n / MIB:.2f} MiB"  # an 8 MB file is "8.26 MiB", never "0.01 GiB"


@pytest.mark.parametrize("n", [GIB, 16_790_983_920, 50 * GIB])
def test_sizes_from_a_gib_are_gib(n):
    assert fmt_size(n) == f"{n / GIB:.2f} GiB"


def test_small_sizes_and_rates():
    assert fmt_size(512) == "512 B" and fmt_size(3 * 1024) == "3.00 KiB"
    assert fmt_rate(250 * MIB) == "250.0 MiB/s" and fmt_rate(24e9) == f"{24e9 / GIB:.2f} GiB/s"
    assert not re.search(r"\b[KMG]B\b", fmt_size(8_660_000) + fmt_rate(8_660_000))  # no decimal units


@pytest.mark.parametrize("text", ["24GB", "18GiB", "512MB", "512mib", "1.5G", "64 GB", "1T", "4096KB"])
def test_sizes_read_as_the_planner_reads_them(text):
    assert parse_size(text, "--vram") == parse_bytes(text)


@pytest.mark.parametrize("text, needle", [("8", "needs a unit"), ("1024", "needs a unit"), ("lots", "expected"),
                                          ("8 parsecs", "unknown unit"), ("-1GB", "expected"), ("", "expected")])
def test_a_size_without_a_unit_is_refused_with_the_expected_form(text, needle):
    with pytest.raises(SizeError) as e:
        parse_size(text, "--vram")
    assert needle in str(e.value) and "--vram" in str(e.value) and "24GB" in str(e.value)


NAMES = [f"blk.{i}.ffn_{kind}_exps.weight" for i in (1, 10, 11) for kind in ("gate_up", "down")] + \
        ["token_embd.weight", "x" * 50]


def rows_of(text: str, n_cols: int) -> list[list[str]]:
    """Rebuild the cells of a render() table: continuation lines extend the previous row's cells."""
    lines = text.splitlines()
    rule = lines[1]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    assert len(spans) == n_cols
    rows: list[list[str]] = []
    for line in lines[2:]:
        cells = [line[a:b].strip() if i < n_cols - 1 else line[a:].strip() for i, (a, b) in enumerate(spans)]
        if rows and not cells[-1]:  # the size column is never wrapped: a blank one is a continuation
            rows[-1] = [r + c for r, c in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    return rows


@pytest.mark.parametrize("width", [30, 40, 80])
def test_tables_fit_the_width_and_keep_every_name_whole(width):
    text = render(("name", "type", "size"), [(n, "Q4_K", "1.00 MiB") for n in NAMES], width=width)
    assert max(len(line) for line in text.splitlines()) <= max(width, 12 + 2 + 4 + 2 + 8)
    assert [r[0] for r in rows_of(text, 3)] == NAMES  # names that differ in the middle stay different


def test_without_a_width_every_row_is_one_line():
    text = render(("name", "size"), [(n, "1 B") for n in NAMES], width=None)
    assert [line.split()[0] for line in text.splitlines()[2:]] == NAMES


def test_wrap_breaks_after_separators_and_loses_nothing():
    for n in NAMES:
        for w in (5, 8, 13):
            parts = wrap_name(n, w)
            assert "".join(parts) == n and all(len(p) <= w for p in parts)
    assert wrap_name("blk.10.ffn_gate_up_exps.weight", 12) == ["blk.10.ffn_", "gate_up_", "exps.weight"]


def test_progress_bar_line_fits_80_columns():
    bar = ConversionBar(stream=io.StringIO(), live=True)
    bar.start(692, 16_790_983_920)
    bar.advance("blk.29.ffn_gate_up_exps.weight", 1_234_567_890, tensor_done=False)
    console = Console(file=io.StringIO(), width=300, record=True)
    console.print(bar.progress.make_tasks_table(bar.progress.tasks))
    lines = console.export_text().splitlines()
    bar.finish(ok=False)
    assert lines and max(len(x.rstrip()) for x in lines) <= 80, lines
    assert "MiB/s" in lines[0] or "GiB/s" in lines[0]
    short = middle_ellipsis("blk.29.ffn_gate_up_exps.weight", 20)
    assert len(short) == 20 and short.startswith("blk.29.f") and short.endswith("ps.weight") and "…" in short


def test_off_a_terminal_progress_is_one_summary_line():
    out = io.StringIO()
    bar = ConversionBar(stream=out)
    bar.start(3, 3 * MIB)
    for i in range(3):
        bar.advance(f"t{i}", MIB)
    bar.finish()
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("3 tensors, 3.00 MiB in ")
    steps = io.StringIO()
    with StepBar(stream=steps) as s:
        for i in range(4):
            s.update("canvas logits, model", i + 1, 4)
    assert steps.getvalue().startswith("canvas logits, model: 4/4 in ") and steps.getvalue().count("\n") == 1
