"""The command line: every command's happy path, and bad input as one line with no partial output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
