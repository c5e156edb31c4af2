"""diffgemma command line: argument parsing and wiring only; the work lives in gguf_tools/ and engine/."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from gguf_tools.presets import DEFAULT_TYPE

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Quantize DiffusionGemma checkpoints into GGUF and run them on one machine.")


@contextmanager
def _user_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Known failures become one line on stderr and a non-zero exit, never a traceback."""
    from gguf_tools.errors import USER_ERRORS

    try:
        yield
    except KeyboardInterrupt:
        typer.echo("error: interrupted; no output was written", err=True)
        raise typer.Exit(130) from None
    except USER_ERRORS + extra as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=1))


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="Checkpoint folder (config.json, tokenizer, *.safetensors) or a .gguf "
                                         "file (e.g. BF16) to requantize."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output .gguf (default: <model>-<TYPE>.gguf)."),
    type_name: str = typer.Option(DEFAULT_TYPE, "--type", help="Tensor type or preset, as llama.cpp spells it."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", metavar="REGEX=TYPE",
                                          help="Type for tensors whose name matches REGEX; repeatable, first "
                                               "match wins (as llama-quantize)."),
    pure: bool = typer.Option(False, "--pure", help="No mixture: every quantized tensor gets the default type."),
    imatrix: str | None = typer.Option(None, "--imatrix", metavar="FILE",
                                       help="Importance matrix: llama.cpp GGUF imatrix or legacy .dat."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (type and rule per tensor, size) "
                                                          "without reading any weight."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: the plan as JSON."),
    threads: int | None = typer.Option(None, "--threads", metavar="N", show_default=False,
                                       help="Worker processes quantizing in parallel (default: every core). The "
                                            "file is byte-identical whatever N; each worker needs about 128 MiB."),
) -> None:
    """Convert a DiffusionGemma checkpoint (or requantize a GGUF) into one llama.cpp-layout GGUF file."""
    with _user_errors():
        from gguf_tools import convert as conv
        from gguf_tools.presets import parse_override
        from gguf_tools.requantize import plan_requantize, requantize

        from gguf_tools.parallel_quant import check_threads

        n_threads = check_threads(threads)
        overrides = tuple(parse_override(t) for t in tensor_type)
        im = None
        if imatrix is not None:
            from gguf_tools.imatrix import load_imatrix

            im = load_imatrix(imatrix)
        from_gguf = src.is_file()  # a file is a GGUF to requantize (its reader names what is wrong with it)
        if dry_run:
            if from_gguf:
                plan = plan_requantize(src, type_name, overrides, pure=pure, imatrix=im)[0]
            else:
                plan = conv.plan_conversion(src, type_name, overrides=overrides, pure=pure, imatrix=im)
            if as_json:
                _echo_json(plan.to_json())
            else:
                from gguf_tools.report import print_plan

                print_plan(plan)
            return
        from gguf_tools.progress import RichReporter

        if from_gguf:
            path, plan = requantize(src, out, type_name, overrides, RichReporter(), pure=pure, imatrix=im,
                                    threads=n_threads)
        else:
            path, plan = conv.convert(src, out, type_name, overrides=overrides, reporter=RichReporter(), pure=pure,
                                      imatrix=im, threads=n_threads)
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


def _engine_errors() -> tuple[type[BaseException], ...]:
    from engine.placement import PlacementError
    from engine.run import EngineError

    return (EngineError, PlacementError)


def _override_option() -> list[str]:
    return typer.Option([], "--override-tensor", "-ot", metavar="REGEX=cpu|gpu",
                        help="Keep tensors whose name matches REGEX in host RAM (cpu) or on the GPU; repeatable, "
                             "first match wins (llama.cpp -ot).")


@app.command()
def plan(
    source: Path = typer.Argument(..., metavar="MODEL.gguf|CONFIG_DIR",
                                  help="A GGUF file, or a checkpoint/config folder (sizes of a dry-run --type plan)."),
    vram: str | None = typer.Option(None, "--vram", help="VRAM budget, e.g. 24GB, 18GiB, 512MB (binary units). "
                                                         "Default: the free VRAM of the CUDA device, else none."),
    ctx: int = typer.Option(32768, "--ctx", help="Context length in tokens (KV cache size)."),
    type_name: str | None = typer.Option(None, "--type", help=f"For a folder: the quantization type or preset "
                                                              f"(default {DEFAULT_TYPE})."),
    canvas: int | None = typer.Option(None, "--canvas", help="Canvas length (default: the model's)."),
    host_ram: str | None = typer.Option(None, "--host-ram", help="Host RAM (default: this machine's)."),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", help="Every MoE expert tensor in host RAM."),
    n_cpu_moe: int = typer.Option(0, "--n-cpu-moe", help="The experts of the first N layers in host RAM."),
    override_tensor: list[str] = _override_option(),
    dtype: str = typer.Option("bf16", "--dtype", help="Compute dtype of KV cache and activations: bf16, f16, f32."),
    as_json: bool = typer.Option(False, "--json", help="The plan as JSON."),
) -> None:
    """Plan which tensors live in VRAM and which MoE experts in host RAM, for a budget and a context."""
    with _user_errors(_engine_errors()):
        from engine.plan_cli import make_plan, plan_json, plan_summary

        p = make_plan(source, vram=vram, ctx=ctx, type_name=type_name, canvas=canvas, host_ram=host_ram,
                      cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, override_tensor=override_tensor, dtype=dtype)
        if as_json:
            _echo_json(plan_json(p))
        else:
            typer.echo(p.explain(), nl=False)
            typer.echo(plan_summary(p))
        p.require()


@app.command()
def run(
    args: list[str] = typer.Argument(..., metavar="[MODEL.gguf] PROMPT",
                                     help="Optional GGUF file (default: the embedded model), then the prompt."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default: the file's."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising step budget per canvas."),
    entropy_bound: float | None = typer.Option(None, "--entropy-bound"),
    t_min: float | None = typer.Option(None, "--t-min"),
    t_max: float | None = typer.Option(None, "--t-max"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch."),
    think: bool = typer.Option(False, "--think", help="Turn the model's thinking channel on."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: the prompt is the text."),
    show_canvas: bool = typer.Option(False, "--show-canvas", help="Live view of the canvas as it denoises."),
    as_json: bool = typer.Option(False, "--json", help="Text, ids, steps, speeds and memory as JSON."),
    vram: str | None = typer.Option(None, "--vram", help="VRAM budget, e.g. 24GB (default: the free VRAM)."),
    ctx: int | None = typer.Option(None, "--ctx", help="Context to plan for (default: prompt + max-new-tokens)."),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", help="Every MoE expert tensor in host RAM."),
    n_cpu_moe: int = typer.Option(0, "--n-cpu-moe", help="The experts of the first N layers in host RAM."),
    override_tensor: list[str] = _override_option(),
) -> None:
    """Generate text with a DiffusionGemma GGUF (block diffusion, entropy-bound sampler)."""
    if len(args) > 2:
        typer.echo("error: expected [MODEL.gguf] PROMPT", err=True)
        raise typer.Exit(2)
    model = Path(args[0]) if len(args) == 2 else None
    prompt = args[-1]
    with _user_errors(_engine_errors()):
        from contextlib import nullcontext

        from engine.run import RunOptions, run_prompt

        opts = RunOptions(max_new_tokens, steps, entropy_bound, t_min, t_max, seed, device, threads, think, raw,
                          vram=vram, ctx=ctx, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe,
                          override_tensor=tuple(override_tensor))
        on_text = None if as_json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        view = None
        if show_canvas and not as_json:
            from engine.live import CanvasView

            view = CanvasView()
        with view or nullcontext():
            result = run_prompt(model, prompt, opts, on_text=on_text, view=view)
        if as_json:
            _echo_json(result.to_json())
        else:
            sys.stdout.write("\n")
            typer.echo(f"[{len(result.token_ids)} tokens, {len(result.steps_per_canvas)} canvas(es), steps "
                       f"{result.steps_per_canvas}, prefill {result.prefill_tokens_per_s:.1f} tok/s, "
                       f"generation {result.generated_tokens_per_s:.1f} tok/s, {result.device}]", err=True)


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise typer.BadParameter(f"{flag} must be comma-separated integers") from None


@app.command()
def logits(
    model: Path = typer.Argument(..., help="A diffusion-gemma GGUF."),
    tokens: str = typer.Option(..., "--tokens", help="Comma-separated token ids (the context)."),
    canvas: str | None = typer.Option(None, "--canvas", help="Comma-separated canvas ids: decoder logits."),
    self_cond: Path | None = typer.Option(None, "--self-cond", help="[C, V] .npy of previous scaled logits."),
    out: Path = typer.Option(..., "--out", help="Where to write the logits (.npy)."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Write encoder logits [P, V] (or, with --canvas, decoder canvas logits [C, V]) to a .npy file."""
    tok = _ids(tokens, "--tokens")
    can = _ids(canvas, "--canvas") if canvas is not None else None
    with _user_errors(_engine_errors()):
        import numpy as np

        from engine.run import EngineError, compute_logits
        from gguf_tools.atomic import atomic_path

        sc = None
        if self_cond is not None:
            try:
                sc = np.load(self_cond, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise EngineError(f"{self_cond}: not a readable .npy array ({e})") from None
        result = compute_logits(model, tok, can, sc, device)
        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, result)
        typer.echo(f"wrote {out} {list(result.shape)}")


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="The diffusion-gemma GGUF to judge (e.g. a Q4_K_M file)."),
    reference: Path = typer.Option(..., "--reference", help="The GGUF it is compared with (e.g. the BF16 file)."),
    examples: int = typer.Option(200, "--examples", help="How many fixed held-out prompts to use."),
    seed: int = typer.Option(0, "--seed", help="Seed for the noised canvases and the sampler."),
    accuracy: bool | None = typer.Option(None, "--accuracy/--no-accuracy",
                                         help="Task accuracy by full generation (default: on for the built-in "
                                              "sorting model)."),
    device: str = typer.Option("cpu", "--device"),
    threads: int | None = typer.Option(None, "--threads"),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """KL divergence and top-1 agreement of MODEL's canvas logits against REFERENCE's on the same inputs
    (as llama-perplexity --kl-divergence reports them), and task accuracy for the built-in model."""
    with _user_errors(_engine_errors()):
        import torch

        from engine.evaluate import evaluate

        if threads:
            torch.set_num_threads(threads)
        r = evaluate(model, reference, examples=examples, seed=seed, accuracy=accuracy, device=device,
                     on_progress=None if as_json else lambda what: typer.echo(f"... {what}", err=True))
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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
