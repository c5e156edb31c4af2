"""diffgemma command line: argument parsing and wiring only; the work lives in gguf_tools/ and engine/.

Every failure ends as one `error: ...` line on stderr and a non-zero exit, never a traceback: bad
options (_Commands.main), bad input and OS errors (_Command.invoke), and, as a last resort, anything
unexpected (its traceback with DIFFGEMMA_DEBUG=1). Options are checked before any file is read or
written. Every option carries a metavar and a help text (tests/test_cli.py checks), so a new option
(e.g. a --backend on run/logits/eval/plan) is one more typer.Option(..., metavar=..., help=...).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from gguf_tools.presets import DEFAULT_TYPE, available_presets

CHAT_HINT = 'quote a prompt of several words: diffgemma run "hello world"'


def _click_class(name: str) -> type[BaseException]:
    """Click's exception classes (typer vendors its own click), found through typer's public ones."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_CLICK_ERROR = _click_class("ClickException")


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _describe(e: BaseException) -> str | None:
    """The one-line message for an exception a user can cause, or None for a bug."""
    from engine.default_model import DefaultModelError
    from engine.placement import PlacementError
    from engine.run import EngineError
    from gguf_tools.errors import USER_ERRORS
    from gguf_tools.outputs import OutputError
    from gguf_tools.units import SizeError

    if isinstance(e, OSError) and e.strerror:  # raised by the OS: name the path, not "[Errno 30] ..."
        where = f"{e.filename}: " if e.filename is not None else ""
        return _one_line(f"{where}{e.strerror}")
    if isinstance(e, USER_ERRORS + (EngineError, PlacementError, SizeError, DefaultModelError, OutputError, OSError)):
        return _one_line(str(e))
    if isinstance(e, MemoryError):
        return "out of memory"
    return None


class _Command(TyperCommand):
    """A command whose failures are one line, whose usage line is its arguments' metavars, and whose
    help shows no type labels (Typer writes `<str>` beside arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            if p.param_type_name == "argument":
                p.display_type_rich = lambda ctx=None: ""  # type: ignore[method-assign]

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        args = [p.metavar or p.name.upper() for p in self.params if p.param_type_name == "argument"]
        return [self.options_metavar or "[OPTIONS]", *args]

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, _CLICK_ERROR):
            raise
        except KeyboardInterrupt:
            typer.echo("error: interrupted; no output was written", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            message = _describe(e)
            if message is None:
                if os.environ.get("DIFFGEMMA_DEBUG"):
                    raise
                message = (f"internal error ({type(e).__name__}: {_one_line(str(e))}); please report it "
                           "(DIFFGEMMA_DEBUG=1 shows the traceback)")
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None


class _Commands(TyperGroup):
    """Usage errors (unknown option, bad value, missing argument) as one line too."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        except _CLICK_ERROR as e:
            code = _usage_error(e)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        except KeyboardInterrupt:  # while parsing, before any command ran
            typer.echo("error: interrupted", err=True)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code or 0)


def _usage_error(e: Any) -> int:
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
        return 0
    message = _one_line(e.format_message())
    if ctx is not None and ctx.command.name == "run" and "extra argument" in message:
        message += f" ({CHAT_HINT})"
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    typer.echo(f"error: {message}{where}", err=True)
    return int(getattr(e, "exit_code", 2) or 2)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("diffgemma")
        except PackageNotFoundError:
            v = "(not installed: run from a source checkout)"
        typer.echo(f"diffgemma {v}")
        raise typer.Exit()


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Quantize DiffusionGemma checkpoints into GGUF and run them on one machine.")


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Quantize DiffusionGemma checkpoints into GGUF and run them on one machine."""


def command(name: str | None = None) -> Any:
    return app.command(name, cls=_Command)


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=1))


def _fail(message: str) -> None:
    """An option that does not apply or does not parse: the one-line error, before any work."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ---- quantize / inspect -------------------------------------------------------------------------------

TYPES_HELP = (f"Tensor type or preset, as llama.cpp spells it: {', '.join(available_presets())} "
              f"(default {DEFAULT_TYPE}); or a FILE.toml preset (quantize --target --save-preset).")


@command()
def quantize(
    src: Path = typer.Argument(..., metavar="SRC", show_default=False,
                               help="Checkpoint folder (config.json, tokenizer, *.safetensors) or a .gguf file "
                                    "(e.g. BF16) to requantize."),
    out: Path | None = typer.Option(None, "-o", "--out", metavar="OUT.gguf",
                                    help="Output file (default: <model>-<TYPE>.gguf beside SRC). Never one of "
                                         "the input files."),
    type_name: str = typer.Option(DEFAULT_TYPE, "--type", metavar="NAME", show_default=False, help=TYPES_HELP),
    tensor_type: list[str] = typer.Option([], "--tensor-type", metavar="REGEX=TYPE", show_default=False,
                                          help="Type for tensors whose name matches REGEX; repeatable, first "
                                               "match wins (as llama-quantize)."),
    pure: bool = typer.Option(False, "--pure", help="No mixture: every quantized tensor gets the default type."),
    imatrix: Path | None = typer.Option(None, "--imatrix", metavar="FILE",
                                        help="Importance matrix: llama.cpp GGUF imatrix or legacy .dat."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (type, size and rule per tensor) "
                                                          "without reading any weight or writing anything."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: the plan as JSON."),
    threads: int | None = typer.Option(None, "--threads", metavar="N", show_default=False,
                                       help="Worker processes quantizing in parallel (default: every core). The "
                                            "file is byte-identical whatever N; each worker needs about 128 MiB."),
    target_size: str | None = typer.Option(None, "--target", metavar="SIZE",
                                           help="Fit a size instead of a preset's mix: a file size (18GB = 18e9 "
                                                "bytes, 16.5GiB), bits per weight (4.8bpw) or vram:24GB (a card "
                                                "with --ctx tokens of KV cache). Every tensor's GGML type is chosen "
                                                "by measured sensitivity (imatrix-weighted quantization error times "
                                                "a KLD gain); --type sets the file's defaults."),
    save_preset: Path | None = typer.Option(None, "--save-preset", metavar="FILE.toml",
                                            help="With --target: save the chosen mix as a preset for --type "
                                                 "FILE.toml."),
    probe: bool = typer.Option(False, "--probe", help="With --target: measure every tensor's KLD gain on this "
                                                      "model with probes (the built-in model's calibration "
                                                      "prompts) instead of the built-in per-role gains."),
    ctx: int = typer.Option(32768, "--ctx", metavar="N", help="With --target vram:SIZE: tokens of KV cache the "
                                                              "card must hold beside the weights."),
) -> None:
    """Quantize a checkpoint folder or a GGUF into one GGUF file.

    The output has llama.cpp's layout (names, order, metadata) and the types llama-quantize chooses."""
    if as_json and not dry_run:
        _fail("--json prints the plan of --dry-run; without --dry-run quantize writes a GGUF file")
    from gguf_tools import convert as conv
    from gguf_tools.parallel_quant import check_threads
    from gguf_tools.presets import load_preset, parse_override
    from gguf_tools.report import plan_warnings, print_plan
    from gguf_tools.requantize import default_output as gguf_default_output
    from gguf_tools.requantize import plan_requantize, requantize

    n_threads = check_threads(threads)  # --threads 0: one line before anything is read
    load_preset(type_name)  # an unknown type is named before anything is read
    overrides = tuple(parse_override(t) for t in tensor_type)
    if not src.exists():
        _fail(f"{src}: no such file or folder")
    im = None
    if imatrix is not None:
        from gguf_tools.imatrix import load_imatrix

        im = load_imatrix(imatrix)
    from_gguf = src.is_file()  # a file is a GGUF to requantize (its reader names what is wrong with it)
    if target_size is not None or save_preset is not None or probe:
        _quantize_to_target(src, out, type_name, overrides, imatrix, im, target_size, save_preset, probe, ctx,
                            pure, dry_run, as_json, n_threads)
        return
    if dry_run:
        if from_gguf:
            plan = plan_requantize(src, type_name, overrides, pure=pure, imatrix=im)[0]
        else:
            plan = conv.plan_conversion(src, type_name, overrides=overrides, pure=pure, imatrix=im)
        for line in plan_warnings(plan, overrides):
            typer.echo(line, err=True)
        if as_json:
            _echo_json(plan.to_json())
        else:
            print_plan(plan)
        return
    from gguf_tools.bars import ConversionBar

    target = out or (gguf_default_output(src, type_name) if from_gguf else conv.default_output(src, type_name))
    conv.refuse_overwriting_inputs(target, src, imatrix)
    if from_gguf:
        path, plan = requantize(src, target, type_name, overrides, ConversionBar(), pure=pure, imatrix=im,
                                threads=n_threads)
    else:
        path, plan = conv.convert(src, target, type_name, overrides=overrides, reporter=ConversionBar(), pure=pure,
                                  imatrix=im, threads=n_threads)
    for line in plan_warnings(plan, overrides):
        typer.echo(line, err=True)
    if plan.skipped:
        typer.echo(f"note: skipped {len(plan.skipped)} vision/tied tensors (text GGUF, as llama.cpp does)", err=True)
    from gguf_tools.units import fmt_size

    typer.echo(f"wrote {path} ({len(plan.tensors)} tensors, {fmt_size(plan.total_bytes)})")


def _quantize_to_target(src: Path, out: Path | None, type_name: str, overrides: tuple, imatrix: Path | None,
                        im: Any, target_size: str | None, save_preset: Path | None, probe: bool, ctx: int, pure: bool,
                        dry_run: bool, as_json: bool, threads: int) -> None:
    """quantize --target: measure, choose the mix (gguf_tools.target_mix), then write it as --tensor-type rules."""
    from gguf_tools import convert as conv
    from gguf_tools import target_mix as tm
    from gguf_tools.bars import ConversionBar, StepBar
    from gguf_tools.requantize import default_output as gguf_default_output
    from gguf_tools.requantize import requantize

    if target_size is None:
        _fail("--save-preset and --probe go with --target SIZE")
    if pure:
        _fail("--pure and --target both decide every tensor's type; use one")
    if ctx < 1:
        _fail(f"--ctx {ctx}: must be at least 1")
    target = tm.parse_target(target_size)
    if save_preset is not None and save_preset.suffix.lower() != ".toml":
        _fail(f"--save-preset {save_preset}: the file name must end in .toml")
    if im is None:
        typer.echo("note: no --imatrix: every input column counts the same in the quantization error", err=True)
    from_gguf = src.is_file()
    if target.kind == "vram":
        target = _vram_target(src, type_name, target, ctx, from_gguf)
    gains = _probe_gains(src, im, from_gguf) if probe else None
    with StepBar() as bar:
        _, mix = tm.target_plan(src, type_name, target, im, overrides=overrides, gains=gains, threads=threads,
                                on_tensor=lambda d, n: bar.update("quantization error", d, n))
    if save_preset is not None:
        from gguf_tools.outputs import check_output_path

        check_output_path(save_preset, inputs=[src, imatrix])
        tm.save_preset(mix, save_preset, type_name, command=f"--type {type_name}")
        typer.echo(f"wrote preset {save_preset} (use it with --type {save_preset})", err=True)
    rules = tuple(overrides) + mix.rules()
    if dry_run:
        if as_json:
            _echo_json({"summary": tm.summary(mix), "tensors": tm.explain(mix)})
            return
        for row in tm.explain(mix):
            typer.echo(f"{row['name']:<34} {row['type']:<6} {row['bytes']:>11,} B  rel {row['rel_error']:.2e}  "
                       f"x gain {row['gain']:.2e} = KLD {row['kld']:.2e}  {row['why']}")
        s = tm.summary(mix)
        typer.echo(f"target {s['target']}: {s['planned_bytes']:,} bytes planned (smallest mix {s['smallest_bytes']:,}, "
                   f"BF16 {s['bf16_bytes']:,}); expected KLD {s['expected_kld']:.3e} "
                   f"(--type {type_name}'s own types: {s['stock_expected_kld']:.3e})")
        return
    path_out = out or (gguf_default_output(src, f"{type_name}-{target_size}") if from_gguf
                       else conv.default_output(src, f"{type_name}-{target_size}"))
    conv.refuse_overwriting_inputs(path_out, src, imatrix)
    if from_gguf:
        path, plan = requantize(src, path_out, type_name, rules, ConversionBar(), imatrix=im, threads=threads)
    else:
        path, plan = conv.convert(src, path_out, type_name, overrides=rules, reporter=ConversionBar(), imatrix=im,
                                  threads=threads)
    from gguf_tools.units import fmt_size

    typer.echo(f"wrote {path} ({len(plan.tensors)} tensors, {fmt_size(path.stat().st_size)}, target {target_size}, "
               f"expected KLD {mix.expected_kld:.3e})")


def _vram_target(src: Path, type_name: str, target: Any, ctx: int, from_gguf: bool) -> Any:
    """vram:SIZE -> the bytes of weights that fit beside --ctx tokens of KV cache (the planner's count)."""
    from engine.sensitivity import weights_budget
    from gguf_tools import convert as conv
    from gguf_tools.requantize import plan_requantize
    from gguf_tools.target_mix import Target

    base = plan_requantize(src, type_name)[0] if from_gguf else conv.plan_conversion(src, type_name)
    tensors = [(t.name, tuple(t.shape), t.qtype.name, t.n_bytes) for t in base.tensors]
    return Target("weights", weights_budget(base.spec, tensors, int(target.value), ctx), target.text)


def _probe_gains(src: Path, im: Any, from_gguf: bool) -> dict[str, float]:
    """--probe: every tensor's KLD gain measured on this model (a BF16 copy when SRC is a folder)."""
    import tempfile

    import torch

    from engine.default_model import NAME
    from engine.imatrix_collect import builtin_samples
    from engine.run import load
    from engine.sensitivity import probe_gains
    from gguf_tools import convert as conv
    from gguf_tools.bars import StepBar

    with tempfile.TemporaryDirectory() as tmp:
        gguf = src if from_gguf else conv.convert(src, Path(tmp) / "probe-BF16.gguf", "BF16")[0]
        lm = load(gguf, torch.device("cpu"))
        torch.set_num_threads(1)  # the built-in model's products are too small to share out among threads
        if not str(lm.file.kv.get("general.name", "")).startswith(NAME):
            _fail(f"--probe runs the built-in {NAME} model's calibration prompts; {src} is another model "
                  "(leave --probe out to use the built-in per-role gains)")
        with StepBar() as bar:
            probes = probe_gains(lm, builtin_samples(lm, 32, seed=11), im,
                                 on_tensor=lambda d, n: bar.update("KLD probes", d, n))
    return {n: p["gain"] for n, p in probes.items()}


@command()
def inspect(
    file: Path = typer.Argument(..., metavar="FILE.gguf", show_default=False, help="A .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a GGUF file's metadata, tensors and bits per weight."""
    from gguf_tools.inspect_gguf import summarize
    from gguf_tools.reader import GGUFFile

    summary = summarize(GGUFFile(file))
    if as_json:
        _echo_json(summary)
    else:
        from gguf_tools.report import print_summary

        print_summary(summary)


# ---- plan ----------------------------------------------------------------------------------------------

def _override_option() -> Any:
    return typer.Option([], "--override-tensor", "-ot", metavar="REGEX=cpu|gpu", show_default=False,
                        help="Keep tensors whose name matches REGEX in host RAM (cpu) or on the GPU; repeatable, "
                             "first match wins (llama.cpp -ot).")


def _cpu_moe_option() -> Any:
    return typer.Option(False, "--cpu-moe", help="Every MoE expert tensor in host RAM.")


def _n_cpu_moe_option() -> Any:
    return typer.Option(0, "--n-cpu-moe", metavar="N", help="The experts of the first N layers in host RAM.")


@command()
def plan(
    source: Path = typer.Argument(..., metavar="MODEL.gguf|CONFIG_DIR", show_default=False,
                                  help="A GGUF file, or a checkpoint/config folder (sizes of a dry-run --type plan)."),
    vram: str | None = typer.Option(None, "--vram", metavar="SIZE",
                                    help="VRAM budget with its unit: 24GB, 18GiB, 512MB (binary: 1GB = 2^30 "
                                         "bytes). Default: the free VRAM of the CUDA device, else none."),
    ctx: int | None = typer.Option(None, "--ctx", metavar="N",
                                   help="Context length in tokens, at most the model's (default: the model's, "
                                        "at most 32768)."),
    type_name: str | None = typer.Option(None, "--type", metavar="NAME",
                                         help=f"For a folder: the quantization type or preset (default "
                                              f"{DEFAULT_TYPE})."),
    canvas: int | None = typer.Option(None, "--canvas", metavar="N", help="Canvas length (default: the model's)."),
    host_ram: str | None = typer.Option(None, "--host-ram", metavar="SIZE",
                                        help="Host RAM with its unit, e.g. 64GB (default: this machine's)."),
    cpu_moe: bool = _cpu_moe_option(),
    n_cpu_moe: int = _n_cpu_moe_option(),
    override_tensor: list[str] = _override_option(),
    dtype: str = typer.Option("bf16", "--dtype", metavar="bf16|f16|f32",
                              help="Compute dtype of the KV cache and activations."),
    backend: str = typer.Option("auto", "--backend", metavar="auto|torch|triton",
                                help="Size the working memory for these kernels (auto: triton when this "
                                     "machine's CUDA device runs it, else torch)."),
    as_json: bool = typer.Option(False, "--json", help="The plan as JSON."),
) -> None:
    """Plan what stays in VRAM and what goes to host RAM.

    Which tensors live in VRAM and which MoE experts in host RAM, for a budget and a context; exit 1
    with the reason when nothing fits."""
    from engine.backend import BACKENDS, for_planning
    from engine.placement import DTYPE_BYTES
    from engine.plan_cli import make_plan, plan_json, plan_summary, plan_text
    from gguf_tools.table import output_width

    if dtype.lower() not in DTYPE_BYTES:
        _fail(f"--dtype {dtype!r}: use bf16, f16 or f32")
    if backend not in BACKENDS:
        _fail(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    p = make_plan(source, vram=vram, ctx=ctx, type_name=type_name, canvas=canvas, host_ram=host_ram,
                  cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, override_tensor=override_tensor, dtype=dtype.lower(),
                  backend=for_planning(backend))
    if as_json:
        _echo_json(plan_json(p))
    else:
        typer.echo(plan_text(p, output_width()), nl=False)
        if p.fits:
            typer.echo(plan_summary(p))
    p.require()  # a refusal: its one error line


# ---- run / tokenize / logits / eval --------------------------------------------------------------------

def _split_model_prompt(args: list[str]) -> tuple[Path | None, str]:
    """[MODEL.gguf] PROMPT; a first word that is no file is an unquoted prompt, not a model."""
    if len(args) == 1:
        if args[0].endswith(".gguf") and Path(args[0]).is_file():
            _fail(f"{args[0]} is a model file: the PROMPT goes after it")
        return None, args[0]
    if len(args) == 2 and Path(args[0]).is_file():
        return Path(args[0]), args[1]
    if len(args) == 2 and (args[0].endswith(".gguf") or os.sep in args[0]):
        _fail(f"{args[0]}: no such file")
    _fail(f"expected [MODEL.gguf] PROMPT, got {len(args)} words and {args[0]!r} is no file; {CHAT_HINT}")
    raise AssertionError  # unreachable


def _model_prompt_argument() -> Any:
    return typer.Argument(..., metavar="[MODEL.gguf] PROMPT", show_default=False,
                          help="Optional GGUF file (default: the built-in model), then the prompt (quoted).")


def _device_option(default: str = "auto") -> Any:
    return typer.Option(default, "--device", metavar="auto|cpu|cuda",
                        help="Where to compute: auto is CUDA when available, else the CPU.")


def _backend_option() -> Any:
    return typer.Option("auto", "--backend", metavar="auto|torch|triton",
                        help="Kernels: triton reads the packed GGUF blocks in place (CUDA, sm_80+), torch "
                             "dequantizes then multiplies (the reference); auto is triton on CUDA, else torch.")


def _notice(line: str) -> None:
    typer.echo(f"note: {line}", err=True)


def _threads_option() -> Any:
    return typer.Option(None, "--threads", metavar="N", help="CPU threads for torch (default: torch's).")


@command()
def run(
    args: list[str] = _model_prompt_argument(),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", metavar="N",
                                              help="Longest answer in tokens (default: the file's)."),
    steps: int | None = typer.Option(None, "--steps", metavar="N",
                                     help="Denoising step budget per canvas, at least 1 (default: the file's)."),
    entropy_bound: float | None = typer.Option(None, "--entropy-bound", metavar="X",
                                               help="Entropy budget for accepting tokens per step, above 0 "
                                                    "(default: the file's)."),
    t_min: float | None = typer.Option(None, "--t-min", metavar="X",
                                       help="Final sampling temperature, at least 0 and at most --t-max "
                                            "(default: the file's)."),
    t_max: float | None = typer.Option(None, "--t-max", metavar="X",
                                       help="First sampling temperature, above 0 (default: the file's)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the canvas noise and the sampler."),
    device: str = _device_option(),
    backend: str = _backend_option(),
    threads: int | None = _threads_option(),
    think: bool = typer.Option(False, "--think", help="Turn the chat template's thinking channel on."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: <bos> and the prompt text as written."),
    show_prompt: bool = typer.Option(False, "--show-prompt",
                                     help="Print the prompt as prefilled (template applied) and its ids first."),
    show_canvas: bool = typer.Option(False, "--show-canvas",
                                     help="Live view of the canvas as it denoises (needs a terminal)."),
    as_json: bool = typer.Option(False, "--json", help="Text, ids, steps, speeds and memory as JSON."),
    vram: str | None = typer.Option(None, "--vram", metavar="SIZE",
                                    help="VRAM budget with its unit, e.g. 24GB (default: the free VRAM)."),
    ctx: int | None = typer.Option(None, "--ctx", metavar="N",
                                   help="Context to plan for (default: prompt + max-new-tokens)."),
    cpu_moe: bool = _cpu_moe_option(),
    n_cpu_moe: int = _n_cpu_moe_option(),
    override_tensor: list[str] = _override_option(),
) -> None:
    """Generate text with a DiffusionGemma GGUF.

    Block diffusion with the entropy-bound sampler; the text appears canvas by canvas on stdout, a
    statistics line on stderr."""
    if show_canvas and as_json:
        _fail("--show-canvas draws on the terminal and --json prints one JSON object: use one of them")
    if show_canvas and not _stderr_is_terminal():
        _fail("--show-canvas draws a live view on the terminal, and stderr is not one")
    model, prompt = _split_model_prompt(args)
    from contextlib import nullcontext

    from engine.run import RunOptions, run_prompt

    opts = RunOptions(max_new_tokens, steps, entropy_bound, t_min, t_max, seed, device, threads, think, raw,
                      vram=vram, ctx=ctx, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe,
                      override_tensor=tuple(override_tensor), backend=backend).check()
    shown: dict[str, Any] = {}

    def on_prompt(text: str, ids: list[int]) -> None:
        if as_json:
            shown.update(prompt_text=text, prompt_ids=ids)
        else:
            typer.echo(f"prompt ({len(ids)} tokens):\n{text}\nids: {','.join(map(str, ids))}\n", err=True)

    on_text = None if as_json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    view = None
    if show_canvas:
        from engine.live import CanvasView

        view = CanvasView()
    with view or nullcontext():
        result = run_prompt(model, prompt, opts, on_text=on_text, view=view,
                            on_prompt=on_prompt if show_prompt else None, on_notice=_notice)
    if as_json:
        _echo_json(result.to_json() | shown)
        return
    sys.stdout.write("\n")
    n = len(result.steps_per_canvas)
    typer.echo(f"[{result.answer_tokens} tokens, {n} canvas{'es' if n != 1 else ''}, steps {result.steps_per_canvas}, "
               f"prefill {result.prefill_tokens_per_s:.1f} tok/s, generation {result.generated_tokens_per_s:.1f} "
               f"tok/s, {result.device}]", err=True)
    if not result.text.strip():
        typer.echo("note: the answer is empty: the model ended its turn at once (--show-prompt shows what it "
                   "was given)", err=True)


@command()
def tokenize(
    args: list[str] = typer.Argument(..., metavar="[MODEL.gguf] TEXT", show_default=False,
                                     help="Optional GGUF file (default: the built-in model), then the text."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: <bos> and the text, as run --raw."),
    think: bool = typer.Option(False, "--think", help="The chat template with thinking on, as run --think."),
    as_json: bool = typer.Option(False, "--json", help="The rendered text, the ids and each id's token."),
) -> None:
    """Print the token ids run would prefill for TEXT.

    Comma-separated, as logits --tokens takes them."""
    model, text = _split_model_prompt(args)
    from engine.run import EngineError, file_tokenizer, open_gguf, prompt_ids

    if raw and think:
        raise EngineError("--think applies to the chat template; --raw has none")
    tok = file_tokenizer(open_gguf(model))
    ids = prompt_ids(tok, text, raw, think)
    if as_json:
        _echo_json({"text": tok.decode(ids, stop_at_eos=False, keep_control=True), "ids": ids,
                    "tokens": [tok.tokens[i] for i in ids]})
    else:
        typer.echo(",".join(map(str, ids)))


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        _fail(f"{flag} {text!r}: expected comma-separated token ids, e.g. 2,105,2364 (diffgemma tokenize "
              "makes them from text)")
        raise AssertionError from None  # unreachable


@command()
def logits(
    model: Path = typer.Argument(..., metavar="MODEL.gguf", show_default=False, help="A diffusion-gemma GGUF."),
    tokens: str = typer.Option(..., "--tokens", metavar="IDS", show_default=False,
                               help="Comma-separated token ids: the context (see diffgemma tokenize)."),
    canvas: str | None = typer.Option(None, "--canvas", metavar="IDS",
                                      help="Comma-separated canvas ids: decoder logits [C, V] instead."),
    self_cond: Path | None = typer.Option(None, "--self-cond", metavar="PREV.npy",
                                          help="[C, V] array of previous temperature-scaled logits (needs "
                                               "--canvas)."),
    out: Path = typer.Option(..., "--out", metavar="OUT.npy", show_default=False,
                             help="Where to write the logits (.npy); never an input file."),
    device: str = _device_option(),
    backend: str = _backend_option(),
    threads: int | None = _threads_option(),
) -> None:
    """Write encoder or decoder canvas logits to a .npy file.

    Encoder logits [P, V] for the tokens, or with --canvas the decoder's logits [C, V] for the canvas
    after the tokens were prefilled."""
    tok = _ids(tokens, "--tokens")
    can = _ids(canvas, "--canvas") if canvas is not None else None
    import numpy as np
    import torch

    from engine.run import EngineError, compute_logits, resolve_device
    from gguf_tools.atomic import atomic_path
    from gguf_tools.outputs import check_output_path

    if threads is not None:
        if threads < 1:
            raise EngineError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
    resolve_device(device)
    check_output_path(out, inputs=[model] + ([self_cond] if self_cond is not None else []))
    sc = None
    if self_cond is not None:
        try:
            sc = np.load(self_cond, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EngineError(f"{self_cond}: not a readable .npy array ({e})") from None
    result = compute_logits(model, tok, can, sc, device, backend=backend, on_notice=_notice)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, result)
    typer.echo(f"wrote {out} {list(result.shape)}")


@command("eval")
def eval_(
    model: Path = typer.Argument(..., metavar="MODEL.gguf", show_default=False,
                                 help="The diffusion-gemma GGUF to judge (e.g. a Q4_K_M file)."),
    reference: Path = typer.Option(..., "--reference", metavar="REF.gguf", show_default=False,
                                   help="The GGUF it is compared with (e.g. the BF16 file)."),
    examples: int = typer.Option(200, "--examples", metavar="N",
                                 help="How many fixed held-out prompts to use (at most 18739)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for the noised canvases and the sampler."),
    accuracy: bool | None = typer.Option(None, "--accuracy/--no-accuracy", show_default=False,
                                         help="Task accuracy by full generation (default: on for the built-in "
                                              "sorting model)."),
    device: str = _device_option(),
    backend: str = _backend_option(),
    threads: int | None = _threads_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Compare a file's canvas predictions with a reference file's.

    KL divergence and top-1 agreement of MODEL's canvas logits against REFERENCE's on the same inputs
    (as llama-perplexity --kl-divergence reports them), and task accuracy for the built-in model."""
    import torch

    from engine.evaluate import check_examples, evaluate
    from engine.run import EngineError, resolve_device
    from gguf_tools.bars import StepBar

    check_examples(examples, seed)
    resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise EngineError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
    with StepBar() as bar:
        r = evaluate(model, reference, examples=examples, seed=seed, accuracy=accuracy, device=device,
                     on_progress=bar.update, backend=backend, on_notice=_notice)
    if as_json:
        _echo_json(r.to_json())
        return
    typer.echo(f"{r.positions} canvas positions, {examples} prompts, seed {seed}")
    typer.echo(f"mean KLD        {r.mean_kld:.6f}")
    typer.echo(f"99% KLD         {r.p99_kld:.6f}")
    typer.echo(f"max KLD         {r.max_kld:.6f}")
    typer.echo(f"top-1 agreement {100 * r.top1_agreement:.2f}%")
    if r.accuracy is not None:
        typer.echo(f"task accuracy   {100 * r.accuracy:.1f}% (reference {100 * r.reference_accuracy:.1f}%)")


@command()
def imatrix(
    model: Path | None = typer.Argument(None, metavar="[MODEL.gguf]", show_default=False,
                                        help="A diffusion-gemma GGUF (default: the built-in model)."),
    out: Path = typer.Option(..., "-o", "--out", metavar="OUT.gguf", show_default=False,
                             help="The importance matrix, in llama.cpp's GGUF imatrix format."),
    data: Path | None = typer.Option(None, "--data", metavar="TEXT_FILE",
                                     help="Calibration text (UTF-8), cut into --ctx token chunks (default for the "
                                          "built-in model: its own calibration prompts; needed for any other)."),
    chunks: int | None = typer.Option(None, "--chunks", metavar="N", show_default=False,
                                      help="At most N chunks (default: all of --data; 128 built-in prompts)."),
    ctx: int = typer.Option(512, "--ctx", metavar="N", help="Tokens per chunk of --data; the last canvas-length "
                                                             "tokens of each are the canvas of its decoder passes."),
    mode: str = typer.Option("both", "--mode", metavar="causal|diffusion|both",
                             help="Encoder passes (llama-imatrix's way), decoder passes over noised canvases with "
                                  "self-conditioning, or both."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for the canvas noise."),
    device: str = _device_option(),
    threads: int | None = _threads_option(),
    vram: str | None = typer.Option(None, "--vram", metavar="SIZE",
                                    help="VRAM budget, e.g. 24GB (default: the free VRAM); experts that do not fit "
                                         "are offloaded as in run."),
    cpu_moe: bool = _cpu_moe_option(),
    n_cpu_moe: int = _n_cpu_moe_option(),
) -> None:
    """Measure an importance matrix with this engine, in encoder and decoder mode.

    Sums of squared inputs per column of every weight matrix (per expert for the expert tensors) and
    their row counts, for quantize --imatrix and llama-quantize --imatrix."""
    from engine.imatrix_collect import ImatrixOptions, make_imatrix
    from gguf_tools.bars import StepBar

    opts = ImatrixOptions(data=data, chunks=chunks, ctx=ctx, mode=mode, seed=seed, device=device, threads=threads,
                          vram=vram, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe)
    opts.check(model, out)
    with StepBar() as bar:
        path, stats, n = make_imatrix(model, out, opts, on_sample=lambda d, t: bar.update(f"{mode} passes", d, t))
    typer.echo(f"wrote {path} ({len(stats.entries())} matrices, {n} chunks, mode {mode})")


@command()
def serve(
    model: Path | None = typer.Argument(None, metavar="[MODEL.gguf]", show_default=False,
                                        help="A diffusion-gemma GGUF (default: the built-in model)."),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDR", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", metavar="N", help="TCP port (0: any free port, printed at start)."),
    max_batch: int = typer.Option(8, "--max-batch", metavar="N",
                                  help="Requests denoised together in one batched pass per step."),
    max_queue: int = typer.Option(64, "--max-queue", metavar="N",
                                  help="Requests that may wait for a slot; beyond that the answer is 429."),
    ctx: int | None = typer.Option(None, "--ctx", metavar="N",
                                   help="Context per request: prompt plus canvases (default: the model's, at most "
                                        "8192)."),
    api_key: str | None = typer.Option(None, "--api-key", metavar="KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1/* (else 401)."),
    device: str = _device_option(),
    backend: str = _backend_option(),
    threads: int | None = _threads_option(),
    vram: str | None = typer.Option(None, "--vram", metavar="SIZE",
                                    help="VRAM budget with its unit, e.g. 24GB (default: the free VRAM)."),
    cpu_moe: bool = _cpu_moe_option(),
    n_cpu_moe: int = _n_cpu_moe_option(),
    override_tensor: list[str] = _override_option(),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API.

    POST /v1/chat/completions and /v1/completions (streaming as SSE), GET /v1/models and /health. The
    canvases of concurrent requests are denoised together; each request's answer is the one run gives
    for its seed. SIGTERM stops admitting, finishes the running requests and exits 0."""
    from engine.server import ServeOptions
    from engine.server import serve as run_server

    opts = ServeOptions(model, host, port, max_batch, max_queue, ctx, api_key, device, threads, backend, vram,
                        cpu_moe, n_cpu_moe, tuple(override_tensor))
    run_server(opts, on_notice=_notice,
               on_ready=lambda url: typer.echo(f"diffgemma serve: listening on {url} (--max-batch {max_batch}, "
                                               f"--max-queue {max_queue})", err=True))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
