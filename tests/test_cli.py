"""The command line: every command's happy path, and bad input as one line with no partial output."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import cli
from gguf_tools import convert as conv

runner = CliRunner()


def run(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, err


def no_outputs(folder: Path) -> bool:
    return not any(p.suffix in (".gguf", ".partial") or p.name.endswith(".partial") for p in folder.iterdir())


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt[0], dst)
    return dst


def shard_with(ckpt: Path, suffix: str) -> tuple[Path, str]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(k for k in index if k.endswith(suffix))
    return ckpt / index[name], name


def test_quantize_writes_default_name_beside_the_input(ckpt):
    result = run("quantize", ckpt, "--type", "Q8_0")
    assert result.exit_code == 0, result.output
    out = ckpt.parent / "ckpt-Q8_0.gguf"
    assert out.is_file() and "wrote" in result.stdout
    assert "tensors" in result.stderr  # the progress bar
    assert "skipped" in result.stderr  # vision tower notice, one line
    info = run("inspect", out, "--json")
    assert info.exit_code == 0
    summary = json.loads(info.stdout)
    assert summary["architecture"] == "diffusion-gemma"
    assert {r["type"] for r in summary["types"]} == {"F32", "Q8_0"}
    assert summary["tensor_count"] == len(summary["tensors"]) == 75
    table = run("inspect", out)
    assert table.exit_code == 0 and "diffusion-gemma.expert_count" in table.stdout and "Q8_0" in table.stdout


def test_dry_run_reads_no_weights(tmp_path, reference_config):
    cfg_only = tmp_path / "cfg"
    shutil.copytree(reference_config, cfg_only)
    result = run("quantize", cfg_only, "--dry-run", "--json", "--type", "BF16")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert len(plan["tensors"]) == 692
    assert set(plan["tensors"][0]) == {"name", "shape", "type", "bytes", "rule"}
    assert plan["total_bytes"] == sum(t["bytes"] for t in plan["tensors"])
    table = run("quantize", cfg_only, "--dry-run", "--type", "BF16")
    assert table.exit_code == 0 and "692 tensors" in table.stdout and "47.06 GiB" in table.stdout
    assert no_outputs(tmp_path)


def test_missing_config(tmp_path):
    assert_one_line_error(run("quantize", tmp_path), "config.json")


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert_one_line_error(run("quantize", ckpt), "malformed JSON")
    assert no_outputs(ckpt.parent)


def test_missing_shard(ckpt):
    shard, _ = shard_with(ckpt, "embed_tokens.weight")
    shard.unlink()
    assert_one_line_error(run("quantize", ckpt), shard.name, "missing")
    assert no_outputs(ckpt.parent)


def test_shape_disagrees_with_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("quantize", ckpt), "experts", "shape")
    assert no_outputs(ckpt.parent)


def rewrite(shard: Path, name: str, fn) -> None:
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


def test_unexpected_dtype(ckpt):
    shard, name = shard_with(ckpt, "layers.0.mlp.up_proj.weight")
    rewrite(shard, name, lambda t: t.to(torch.int8))
    assert_one_line_error(run("quantize", ckpt), name, "dtype I8")
    assert no_outputs(ckpt.parent)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight(ckpt, bad):
    shard, name = shard_with(ckpt, "layers.1.self_attn.o_proj.weight")

    def poison(t):
        t = t.clone()
        t.view(-1)[5] = bad
        return t

    rewrite(shard, name, poison)
    for type_name in ("BF16", "Q8_0"):
        assert_one_line_error(run("quantize", ckpt, "--type", type_name), name, "NaN or Inf")
    assert no_outputs(ckpt.parent)


def test_unwritable_output(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(run("quantize", ckpt, "-o", blocker / "out.gguf"), "does not exist")
    assert_one_line_error(run("quantize", ckpt, "-o", tmp_path), "directory")


def test_too_little_disk_is_refused_before_writing(ckpt, monkeypatch):
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert_one_line_error(run("quantize", ckpt), "not enough disk space")
    assert no_outputs(ckpt.parent)


def test_failure_midway_leaves_no_partial_file(ckpt, monkeypatch):
    calls = {"n": 0}
    real = conv.encode_rows

    def fail_later(rows, qtype, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(rows, qtype, *args)

    monkeypatch.setattr(conv, "encode_rows", fail_later)
    result = run("quantize", ckpt, "--type", "Q8_0")
    assert result.exit_code == 130
    assert_one_line_error(result, "interrupted")
    assert no_outputs(ckpt.parent)


def test_unknown_type(ckpt):
    assert_one_line_error(run("quantize", ckpt, "--type", "Q9_9"), "Q9_9")


def test_inspect_rejects_a_non_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    assert_one_line_error(run("inspect", bad), "bad.gguf")
    assert_one_line_error(run("inspect", tmp_path / "missing.gguf"), "no such file")


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("quantize", "inspect", "run", "logits", "plan"):
        assert cmd in result.stdout
    run_help = run("run", "--help")
    for opt in ("--vram", "--ctx", "--cpu-moe", "--n-cpu-moe", "--override-tensor"):
        assert opt in run_help.stdout


# ---- run: placement options ---------------------------------------------------------------------------

RUN_ARGS = ("Sort 3 1 2", "--max-new-tokens", "16", "--steps", "3", "--seed", "4", "--json", "--device", "cpu")


@pytest.fixture(scope="module")
def resident(tiny_gguf) -> dict:
    r = run("run", tiny_gguf, *RUN_ARGS)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("placement", [("--n-cpu-moe", "1"), ("--cpu-moe",),
                                       ("-ot", r"blk\.2\.ffn_down_exps=cpu", "--vram", "2GB")],
                         ids=["n-cpu-moe", "cpu-moe", "override-tensor"])
def test_run_tokens_do_not_depend_on_placement(tiny_gguf, resident, placement):
    r = run("run", tiny_gguf, *RUN_ARGS, *placement)
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert resident["placement"]["offloaded"] == [] and resident["placement"]["executor"]["cpu_layer_calls"] == 0
    assert got["placement"]["offloaded"] and got["placement"]["layer_modes"]
    assert got["placement"]["executor"]["cpu_layer_calls"] > 0  # the experts went through the executor
    assert got["token_ids"] == resident["token_ids"] and got["text"] == resident["text"]
    assert got["steps_per_canvas"] == resident["steps_per_canvas"]


def test_run_placement_errors(tiny_gguf):
    assert_one_line_error(run("run", tiny_gguf, "hi", "--n-cpu-moe", "-2"), "--n-cpu-moe")
    assert_one_line_error(run("run", tiny_gguf, "hi", "--override-tensor", "exps"), "REGEX=cpu|gpu")
    assert_one_line_error(run("run", tiny_gguf, "hi", "--vram", "1MB", "--device", "cpu"), "too small")


# ---- every command: bad options are one line, before anything is read or written ---------------------

# {gguf}: the tiny BF16 file, {ckpt}: a copy of the tiny checkpoint, {tmp}: an empty folder
BAD_OPTIONS = {
    "quantize": [
        (("{ckpt}", "--type", "Q9_9"), ("Q9_9", "Q4_K_M")),
        (("{ckpt}", "--json"), ("--json", "--dry-run")),
        (("{tmp}/none",), ("none", "no such file")),
        (("{ckpt}", "--tensor-type", "ffn_down"), ("REGEX=TYPE",)),
        (("{ckpt}", "--tensor-type", "(=Q8_0"), ("regular expression",)),
        (("{ckpt}", "--tensor-type", "ffn=Q9_9"), ("Q9_9",)),
        (("{ckpt}", "--threads", "0"), ("--threads",)),
        (("{ckpt}", "--imatrix", "{tmp}/none.dat"), ("none.dat",)),
        (("{ckpt}", "-o", "{tmp}/missing/x.gguf"), ("missing", "does not exist")),
        (("{ckpt}", "-o", "{ckpt}/config.json"), ("is the input file", "config.json")),
        (("{ckpt}", "--frobnicate"), ("--frobnicate",)),
    ],
    "inspect": [
        (("{tmp}/none.gguf",), ("none.gguf",)),
        ((), ("Missing argument",)),
    ],
    "plan": [
        (("{gguf}", "--vram", "8"), ("--vram", "needs a unit", "24GB")),
        (("{gguf}", "--vram", "lots"), ("--vram", "lots")),
        (("{gguf}", "--host-ram", "64"), ("--host-ram", "needs a unit")),
        (("{gguf}", "--ctx", "0"), ("--ctx 0",)),
        (("{gguf}", "--ctx", "5000"), ("--ctx 5000", "context length 1024")),
        (("{gguf}", "--ctx", "many"), ("--ctx",)),
        (("{gguf}", "--n-cpu-moe", "99"), ("--n-cpu-moe 99", "3 layers")),
        (("{gguf}", "--n-cpu-moe", "-1"), ("--n-cpu-moe",)),
        (("{gguf}", "--canvas", "0"), ("--canvas",)),
        (("{gguf}", "--dtype", "f8"), ("f8",)),
        (("{gguf}", "-ot", "blk=tpu"), ("tpu",)),
        (("{gguf}", "--type", "Q8_0"), ("--type",)),
    ],
    "run": [
        (("{gguf}", "hi", "--steps", "-3"), ("--steps -3",)),
        (("{gguf}", "hi", "--steps", "0"), ("--steps 0",)),
        (("{gguf}", "hi", "--entropy-bound", "-1"), ("--entropy-bound",)),
        (("{gguf}", "hi", "--entropy-bound", "0"), ("--entropy-bound",)),
        (("{gguf}", "hi", "--entropy-bound", "nan"), ("--entropy-bound",)),
        (("{gguf}", "hi", "--t-min", "2", "--t-max", "1"), ("--t-min 2.0", "--t-max 1.0")),
        (("{gguf}", "hi", "--t-min", "2"), ("--t-min 2.0", "the file's t_max 0.8")),
        (("{gguf}", "hi", "--t-min", "-1"), ("--t-min",)),
        (("{gguf}", "hi", "--t-max", "0"), ("--t-max",)),
        (("{gguf}", "hi", "--max-new-tokens", "0"), ("--max-new-tokens",)),
        (("{gguf}", "hi", "--max-new-tokens", "2000"), ("context length 1024", "--max-new-tokens")),
        (("{gguf}", "hi", "--threads", "0"), ("--threads",)),
        (("{gguf}", "hi", "--seed", "-1"), ("--seed",)),
        (("{gguf}", "hi", "--device", "tpu"), ("tpu",)),
        (("{gguf}", "hi", "--vram", "8"), ("--vram", "needs a unit")),
        (("{gguf}", "hi", "--ctx", "0"), ("--ctx",)),
        (("{gguf}", "hi", "--ctx", "5000"), ("--ctx 5000", "1024")),
        (("{gguf}", "hi", "--n-cpu-moe", "99"), ("--n-cpu-moe 99", "3 layers")),
        (("{gguf}", "hi", "--show-canvas", "--json"), ("--show-canvas", "--json")),
        (("{gguf}", "hi", "--show-canvas"), ("--show-canvas", "terminal")),
        (("{gguf}", "hi", "--raw", "--think"), ("--think", "--raw")),
        (("hello", "world", "again"), ("quote",)),
        (("{tmp}/none.gguf", "hi"), ("none.gguf", "no such file")),
        (("{gguf}",), ("model file", "PROMPT")),
    ],
    "tokenize": [
        (("{gguf}", "hi", "--raw", "--think"), ("--think", "--raw")),
        (("{tmp}/none.gguf", "hi"), ("none.gguf",)),
    ],
    "logits": [
        (("{gguf}", "--tokens", "a,b", "--out", "{tmp}/x.npy"), ("--tokens", "comma-separated")),
        (("{gguf}", "--tokens", "", "--out", "{tmp}/x.npy"), ("--tokens", "empty")),
        (("{gguf}", "--tokens", "1,2", "--canvas", "", "--out", "{tmp}/x.npy"), ("--canvas", "empty")),
        (("{gguf}", "--tokens", "1,2", "--self-cond", "{tmp}/sc.npy", "--out", "{tmp}/x.npy"), ("--canvas",)),
        (("{gguf}", "--tokens", "1,2", "--out", "{tmp}/missing/x.npy"), ("does not exist",)),
        (("{gguf}", "--tokens", "1,2", "--out", "{gguf}"), ("is the input file",)),
        (("{gguf}", "--tokens", "1,2", "--out", "{tmp}/x.npy", "--threads", "0"), ("--threads",)),
        (("{gguf}", "--tokens", "1,2", "--out", "{tmp}/x.npy", "--device", "tpu"), ("tpu",)),
    ],
    "imatrix": [  # another session's command: its own checks, seen from here
        (("{gguf}", "-o", "{tmp}/im.gguf", "--mode", "bogus"), ("--mode", "bogus")),
        (("{gguf}", "-o", "{tmp}/im.gguf", "--chunks", "0"), ("--chunks",)),
    ],
    "serve": [  # another session's command: every check happens before it listens
        (("{gguf}", "--max-batch", "0"), ("--max-batch 0",)),
        (("{gguf}", "--max-queue", "-1"), ("--max-queue -1",)),
        (("{gguf}", "--port", "70000"), ("--port 70000",)),
        (("{gguf}", "--ctx", "5000"), ("--ctx 5000", "1024")),
        (("{gguf}", "--ctx", "16"), ("--ctx 16", "canvas length 16")),
        (("{gguf}", "--api-key", " "), ("--api-key",)),
        (("{gguf}", "--device", "tpu"), ("tpu",)),
        (("{gguf}", "--n-cpu-moe", "99"), ("--n-cpu-moe 99", "3 layers")),
        (("{tmp}/none.gguf",), ("none.gguf",)),
    ],
    "eval": [
        (("{gguf}", "--reference", "{gguf}", "--examples", "100000"), ("--examples 100000", "18739")),
        (("{gguf}", "--reference", "{gguf}", "--examples", "0"), ("--examples 0",)),
        (("{gguf}", "--reference", "{gguf}", "--seed", "-1"), ("--seed",)),
        (("{gguf}", "--reference", "{gguf}", "--threads", "0"), ("--threads",)),
        (("{gguf}", "--reference", "{gguf}", "--device", "tpu"), ("tpu",)),
        (("{gguf}",), ("--reference",)),
    ],
}
REGISTERED = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
CASES = [(cmd, args, needles) for cmd, cases in BAD_OPTIONS.items() if cmd in REGISTERED for args, needles in cases]


def snapshot(*folders: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*")}


@pytest.mark.parametrize("cmd, args, needles", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_options_are_one_line_and_write_nothing(cmd, args, needles, tiny_gguf, ckpt, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    np.save(work / "sc.npy", np.zeros((2, 512), np.float32))
    before = snapshot(work, ckpt, tiny_gguf.parent)
    argv = [cmd] + [a.replace("{gguf}", str(tiny_gguf)).replace("{ckpt}", str(ckpt)).replace("{tmp}", str(work))
                    for a in args]
    result = runner.invoke(cli.app, argv)
    assert_one_line_error(result, *needles)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert snapshot(work, ckpt, tiny_gguf.parent) == before  # nothing written, nothing replaced


def test_every_command_has_a_bad_option_case():
    assert set(BAD_OPTIONS) >= REGISTERED, REGISTERED - set(BAD_OPTIONS)


# ---- outputs never replace inputs --------------------------------------------------------------------

def digest(folder_or_file: Path) -> dict[str, str]:
    import hashlib

    files = [folder_or_file] if folder_or_file.is_file() else sorted(folder_or_file.iterdir())
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_quantize_never_writes_over_its_input(ckpt, tiny_gguf, tmp_path):
    before = digest(ckpt)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    (tmp_path / "link.safetensors").symlink_to(shard)
    os.link(ckpt / "config.json", tmp_path / "hard.json")
    for target in (shard, ckpt / "model.safetensors.index.json", ckpt / ".." / ckpt.name / "tokenizer.json",
                   tmp_path / "link.safetensors", tmp_path / "hard.json"):
        assert_one_line_error(run("quantize", ckpt, "--type", "Q8_0", "-o", target), "is the input file")
    assert digest(ckpt) == before
    # requantize: the source file, also through another spelling of its path
    src = tmp_path / "src-BF16.gguf"
    shutil.copy(tiny_gguf, src)
    was = digest(src)
    assert_one_line_error(run("quantize", src, "--type", "Q8_0", "-o", tmp_path / "." / src.name),
                          "is the input file")
    imatrix = tmp_path / "im.dat"
    imatrix.write_bytes(b"an imatrix")
    with pytest.raises(conv.ConversionError, match="is the input file"):
        conv.refuse_overwriting_inputs(tmp_path / "x" / ".." / "im.dat", src, imatrix)
    assert digest(src) == was and imatrix.read_bytes() == b"an imatrix"
    # a new file in the checkpoint folder is fine: it replaces nothing
    ok = run("quantize", ckpt, "--type", "Q8_0", "-o", ckpt / "new.gguf", "--threads", "1")
    assert ok.exit_code == 0, ok.output
    assert {k: v for k, v in digest(ckpt).items() if k != "new.gguf"} == before


def test_logits_never_writes_over_its_inputs(tiny_gguf, tmp_path):
    sc = tmp_path / "sc.npy"
    np.save(sc, np.zeros((2, 512), np.float32))
    was, model_was = sc.read_bytes(), digest(tiny_gguf)
    assert_one_line_error(run("logits", tiny_gguf, "--tokens", "1,2", "--canvas", "3,4", "--self-cond", sc,
                              "--out", sc), "is the input file")
    assert sc.read_bytes() == was and digest(tiny_gguf) == model_was


# ---- OS errors and the unexpected: one line too ---------------------------------------------------------

def test_unwritable_logits_output_is_one_line(tiny_gguf, tmp_path, monkeypatch):
    assert_one_line_error(run("logits", tiny_gguf, "--tokens", "1,2", "--out", "/proc/diffgemma-x.npy"))

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system", str(tmp_path / "x.npy"))

    monkeypatch.setattr(np, "save", read_only)
    assert_one_line_error(run("logits", tiny_gguf, "--tokens", "1,2", "--out", tmp_path / "x.npy"),
                          "x.npy", "Read-only file system")
    assert not list(tmp_path.iterdir())


def test_an_unexpected_failure_is_one_line_and_debug_shows_it(tiny_gguf, monkeypatch):
    from gguf_tools import inspect_gguf

    def boom(f):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(inspect_gguf, "summarize", boom)
    assert_one_line_error(run("inspect", tiny_gguf), "internal error", "RuntimeError", "DIFFGEMMA_DEBUG")
    debug = runner.invoke(cli.app, ["inspect", str(tiny_gguf)], env={"DIFFGEMMA_DEBUG": "1"})
    assert isinstance(debug.exception, RuntimeError)  # the traceback is there for whoever asks


# ---- help and version -------------------------------------------------------------------------------

COMMANDS = sorted(REGISTERED)


def test_version():
    from importlib.metadata import version

    r = run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"diffgemma {version('diffgemma')}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_every_option_without_type_labels(command):
    import typer.main

    r = run(command, "--help")
    assert r.exit_code == 0, r.output
    labels = re.findall(r"<(?:bool|int|float|str|text|path|list\[\w+\]|\w+ range)>", r.stdout)
    assert not labels, labels  # Typer's type labels
    click_cmd = typer.main.get_command(cli.app).commands[command]
    for p in click_cmd.params:
        assert p.help, f"{command} {p.name} has no help text"
        if p.param_type_name == "option" and not p.is_flag:
            assert p.metavar, f"{command} {p.opts} has no metavar"
            assert p.opts[-1] in r.stdout


def test_quantize_help_lists_the_types():
    from gguf_tools.presets import available_presets

    text = " ".join(run("quantize", "--help").stdout.split())
    assert all(t in text for t in available_presets()) and len(available_presets()) >= 17


def test_run_and_eval_default_to_the_same_device():
    import typer.main

    group = typer.main.get_command(cli.app)
    defaults = {c: next(p.default for p in group.commands[c].params if p.name == "device")
                for c in ("run", "eval", "logits")}
    assert set(defaults.values()) == {"auto"}, defaults


# ---- quantize says what happened ------------------------------------------------------------------------

def overridden(plan_json: str, flag: str, qtype: str) -> tuple[list[dict], list[dict]]:
    """(tensors the override decided, those of them not stored as asked), from the plan's own rows."""
    rows = [t for t in json.loads(plan_json)["tensors"] if t["rule"].startswith(flag)]
    return rows, [t for t in rows if t["type"] != qtype]


def test_overrides_that_match_nothing_or_fall_back_are_warned(ckpt, tmp_path):
    # rows of 96 and 32 values are no whole Q6_K blocks (256): llama-quantize's fallback is Q8_0
    args = ("--type", "Q4_K_M", "--tensor-type", "nothing_is_called_this=Q8_0", "--tensor-type", "ffn_down=Q6_K")
    plan = run("quantize", ckpt, "--dry-run", "--json", *args)
    assert plan.exit_code == 0, plan.output
    down, fell = overridden(plan.stdout, "--tensor-type ffn_down=Q6_K", "Q6_K")
    assert fell and {t["type"] for t in fell} == {"Q8_0"}
    for result in (plan, run("quantize", ckpt, "-o", tmp_path / "o.gguf", "--threads", "1", *args)):
        assert result.exit_code == 0, result.output
        err = result.stderr
        assert "warning: --tensor-type nothing_is_called_this=Q8_0 matched no tensor" in err
        assert f"warning: --tensor-type ffn_down=Q6_K: {len(fell)} of {len(down)} tensors stored as Q8_0" in err
        assert "Traceback" not in err


def test_an_override_that_falls_back_to_f16_is_warned():
    from engine.default_model import SHIPPED

    # the built-in model's expert and dense widths (176, 272) are no whole Q8_0 blocks either: F16
    r = run("quantize", SHIPPED, "--dry-run", "--json", "--tensor-type", "ffn_down=Q8_0")
    assert r.exit_code == 0, r.output
    down, fell = overridden(r.stdout, "--tensor-type ffn_down=Q8_0", "Q8_0")
    assert fell and {t["type"] for t in fell} == {"F16"}
    assert f"warning: --tensor-type ffn_down=Q8_0: {len(fell)} of {len(down)} tensors stored as F16" in r.stderr


def test_preset_fallbacks_are_noted(ckpt):
    r = run("quantize", ckpt, "--dry-run", "--type", "Q4_K_M")
    assert r.exit_code == 0, r.output
    n = r.stdout.count("; fallback ")
    assert n and f"note: {n} tensors use a fallback type" in r.stderr


# ---- tables: whole names in a pipe, 80 columns on a terminal ----------------------------------------------

BOX = set("│┃━─┏┓┗┛╭╮╰╯┡┩")


def test_inspect_in_a_pipe_prints_whole_names_one_row_per_line(tiny_gguf):
    from gguf_tools.reader import GGUFFile

    r = run("inspect", tiny_gguf)
    assert r.exit_code == 0 and not BOX & set(r.stdout)
    first_words = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    f = GGUFFile(tiny_gguf)
    assert set(f.tensors) <= first_words and set(f.kv) <= first_words
    assert "KiB" in r.stdout.splitlines()[1] and not re.search(r"\d (KB|MB|GB)\b", r.stdout)


def test_tables_fit_80_columns_on_a_terminal(tiny_gguf, reference_config, monkeypatch):
    from gguf_tools import report

    monkeypatch.setattr(report, "output_width", lambda stream=None: 80)
    for args in (("inspect", tiny_gguf), ("quantize", reference_config, "--dry-run", "--type", "Q4_K_M")):
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert max(len(line) for line in r.stdout.splitlines()) <= 80
    text = " ".join(r.stdout.split())
    assert "692 tensors" in text and "\nblk.29.ffn_gate_up_exps.weight " in r.stdout  # whole, in its column


def test_plan_fits_80_columns(reference_config):
    from engine.plan_cli import make_plan, plan_text

    p = make_plan(reference_config, vram="12GB", ctx=32768, host_ram="64GB",
                  override_tensor=[r"blk\.2\.ffn_down_exps=cpu", "token_embd=cpu"])
    lines = plan_text(p, 80).splitlines()
    assert max(len(x) for x in lines) <= 80 and any(x.startswith("total (of 12.00 GiB)") for x in lines)


def test_a_folder_without_tokenizer_json_is_one_line_but_plans(ckpt):
    (ckpt / "tokenizer.json").unlink()
    assert_one_line_error(run("quantize", ckpt, "--type", "Q8_0"), "tokenizer.json", "not found")
    assert no_outputs(ckpt.parent)
    assert run("quantize", ckpt, "--dry-run", "--type", "Q8_0").exit_code == 0  # config files suffice
