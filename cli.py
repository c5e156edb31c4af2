"""diffgemma command line: argument parsing and wiring only; the work lives in gguf_tools/ and engine/."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from gguf_tools.presets import DEFAULT_TYPE

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Quantize DiffusionGemma checkpoints into GGUF and run them on one machine.")


@contextmanager
def _user_errors() -> Iterator[None]:
    """Known failures become one line on stderr and a non-zero exit, never a traceback."""
    from gguf_tools.errors import USER_ERRORS

    try:
        yield
    except KeyboardInterrupt:
        typer.echo("error: interrupted; no output was written", err=True)
        raise typer.Exit(130) from None
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=1))


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="Checkpoint folder (config.json, tokenizer, *.safetensors)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output .gguf (default: <model>-<TYPE>.gguf)."),
    type_name: str = typer.Option(DEFAULT_TYPE, "--type", help="Tensor type or preset, as llama.cpp spells it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan without reading any weight."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: the plan as JSON."),
) -> None:
    """Convert a DiffusionGemma checkpoint into one llama.cpp-layout GGUF file."""
    with _user_errors():
        from gguf_tools import convert as conv

        if dry_run:
            plan = conv.plan_conversion(src, type_name)
            if as_json:
                _echo_json(plan.to_json())
            else:
                from gguf_tools.report import print_plan

                print_plan(plan)
            return
        from gguf_tools.progress import RichReporter

        path, plan = conv.convert(src, out, type_name, reporter=RichReporter())
        if plan.skipped:
            typer.echo(f"note: skipped {len(plan.skipped)} vision/tied tensors (text GGUF, as llama.cpp does)",
                       err=True)
        typer.echo(f"wrote {path} ({len(plan.tensors)} tensors, {plan.total_bytes / 2**30:.2f} GiB)")


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="A .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a GGUF file's architecture, metadata, tensors and bits per weight."""
    with _user_errors():
        from gguf_tools.inspect_gguf import summarize
        from gguf_tools.reader import GGUFFile

        summary = summarize(GGUFFile(file))
        if as_json:
            _echo_json(summary)
        else:
            from gguf_tools.report import print_summary

            print_summary(summary)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
