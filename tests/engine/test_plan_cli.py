"""`diffgemma plan` (engine/plan_cli.py): the full-size config at 24/18/12/0.5 GB through the command line,
plans for a GGUF file with llama.cpp-style rules, JSON and table output, and bad input as one line.

The expected figures come from the planner itself (engine.placement.plan_for on the same inputs) and
from the budgets: the command must print what the planner decides and exit by its verdict.
"""

from __future__ import annotations

import json

from engine.placement import is_expert, parse_bytes, plan_for
from engine.plan_cli import plan_text
from tests.cli_helpers import invoke, one_line_error

GIB = 2**30
CTX = "32768"


def plan_json(*args) -> dict:
    r = invoke("plan", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ---- acceptance: the released config -----------------------------------------------------------------

def test_24gb_fits_everything_resident(reference_config):
    j = plan_json(reference_config, "--vram", "24GB", "--ctx", CTX, "--host-ram", "64GB")
    for key in ("fits", "vram_budget_bytes", "gpu_bytes", "host_bytes", "kv_cache_bytes", "buffers_bytes",
                "offloaded", "tensors"):
        assert key in j, key
    assert j["fits"] is True and j["offloaded"] == [] and j["host_bytes"] == 0
    assert j["vram_budget_bytes"] == 24 * GIB and j["gpu_bytes"] <= 24 * GIB
    assert len(j["tensors"]) == 692 and set(j["tensors"][0]) >= {"name", "bytes", "device", "compute"}
    assert {t["device"] for t in j["tensors"]} == {"gpu"}
    want = plan_for(reference_config, "24GB", 32768, host_ram="64GB")
    assert j["gpu_bytes"] == want.gpu_bytes and j["kv_cache_bytes"] == want.kv_cache_bytes
    assert j["buffers_bytes"] == want.buffers_bytes
    # the text form: the explain() table and the closing totals line
    r = invoke("plan", reference_config, "--vram", "24GB", "--ctx", CTX, "--host-ram", "64GB")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(plan_text(want, None))  # CliRunner's stdout is no terminal: rows unwrapped
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("fits: VRAM") and "budget 24.00 GiB" in last and "0 tensors in host RAM" in last


def test_18gb_offloads_experts_and_stays_under(reference_config):
    j = plan_json(reference_config, "--vram", "18GB", "--ctx", CTX, "--host-ram", "64GB")
    assert j["fits"] is True and j["gpu_bytes"] <= 18 * GIB
    assert j["offloaded"] and all(is_expert(n) for n in j["offloaded"])
    assert j["offloaded"] == [t["name"] for t in j["tensors"] if t["device"] == "cpu"]
    assert j["host_bytes"] >= sum(t["bytes"] for t in j["tensors"] if t["device"] == "cpu")


def test_12gb_offloads_more(reference_config):
    j18 = plan_json(reference_config, "--vram", "18GB", "--ctx", CTX, "--host-ram", "64GB")
    j12 = plan_json(reference_config, "--vram", "12GB", "--ctx", CTX, "--host-ram", "64GB")
    assert j12["fits"] is True and j12["gpu_bytes"] <= 12 * GIB
    assert len(j12["offloaded"]) > len(j18["offloaded"]) and j12["host_bytes"] > j18["host_bytes"]


def test_half_gb_is_refused(reference_config):
    r = invoke("plan", reference_config, "--vram", "0.5GB", "--ctx", CTX)
    one_line_error(r, "too small", "512.00 MiB", "needs")
    # the table still shows what would be needed; the refusal is said once, on stderr
    assert "total (of 512.00 MiB)" in r.stdout and "too small" not in r.stdout
    assert not any(line.startswith(("fits", "does not fit", "refused")) for line in r.stdout.splitlines())
    j = invoke("plan", reference_config, "--vram", "0.5GB", "--ctx", CTX, "--json")
    assert j.exit_code == 1 and json.loads(j.stdout)["fits"] is False


def test_type_and_context_change_the_plan(reference_config):
    q4 = plan_json(reference_config, "--vram", "24GB", "--ctx", "4096")
    q8 = plan_json(reference_config, "--vram", "24GB", "--ctx", "4096", "--type", "Q8_0")
    long = plan_json(reference_config, "--vram", "24GB", "--ctx", "65536")
    assert sum(t["bytes"] for t in q8["tensors"]) > sum(t["bytes"] for t in q4["tensors"])
    assert long["kv_cache_bytes"] > q4["kv_cache_bytes"]
    assert q8["fits"] is False or q8["offloaded"]  # 26B at Q8_0 cannot be resident in 24 GB


def test_size_units(reference_config):
    a = plan_json(reference_config, "--vram", "18GiB", "--ctx", "4096")
    b = plan_json(reference_config, "--vram", "18GB", "--ctx", "4096")
    assert a["vram_budget_bytes"] == b["vram_budget_bytes"] == parse_bytes("18G")
    c = invoke("plan", reference_config, "--vram", "512MB", "--ctx", "4096", "--json")
    assert json.loads(c.stdout)["vram_budget_bytes"] == 512 * 2**20 and c.exit_code == 1


# ---- a GGUF file and the rules ----------------------------------------------------------------------

def test_gguf_with_rules(tiny_gguf):
    j = plan_json(tiny_gguf, "--vram", "1GB", "--ctx", "64", "--n-cpu-moe", "1")
    assert j["offloaded"] and {n.split(".")[1] for n in j["offloaded"]} == {"0"}
    every = plan_json(tiny_gguf, "--vram", "1GB", "--ctx", "64", "--cpu-moe")
    names = [t["name"] for t in every["tensors"]]
    assert every["offloaded"] == [n for n in names if is_expert(n)]
    ot = plan_json(tiny_gguf, "--vram", "1GB", "--ctx", "64", "--override-tensor", r"blk\.2\.ffn_down_exps=cpu",
                   "-ot", r"blk\.1\.ffn_gate_up_exps=cpu")
    assert sorted(ot["offloaded"]) == ["blk.1.ffn_gate_up_exps.weight", "blk.2.ffn_down_exps.weight"]
    # an explicit gpu rule wins over --cpu-moe (first match)
    pinned = plan_json(tiny_gguf, "--vram", "1GB", "--ctx", "64", "-ot", r"blk\.0\.=gpu", "--cpu-moe")
    assert pinned["offloaded"] and not any(n.startswith("blk.0.") for n in pinned["offloaded"])


def test_bad_input_is_one_line(tiny_gguf, tmp_path, reference_config):
    one_line_error(invoke("plan", tiny_gguf, "--vram", "lots"), "--vram", "lots")
    one_line_error(invoke("plan", tiny_gguf, "--vram", "1GB", "--type", "Q8_0"), "--type")
    one_line_error(invoke("plan", tmp_path / "none.gguf", "--vram", "1GB"), "none.gguf")
    one_line_error(invoke("plan", tiny_gguf, "--vram", "1GB", "-ot", "blk=tpu"), "tpu")
    one_line_error(invoke("plan", tiny_gguf, "--vram", "1GB", "-ot", "(=cpu"), "regular expression")
    one_line_error(invoke("plan", tiny_gguf, "--vram", "1GB", "--n-cpu-moe", "-1"), "--n-cpu-moe")
    one_line_error(invoke("plan", tiny_gguf, "--vram", "1GB", "--ctx", "0"), "--ctx")
    one_line_error(invoke("plan", tiny_gguf, "--vram", "1GB", "--canvas", "0"), "--canvas")
    one_line_error(invoke("plan", tiny_gguf, "--vram", "1GB", "--dtype", "f8"), "f8")
    one_line_error(invoke("plan", reference_config, "--vram", "12GB", "--host-ram", "4GB"), "host RAM")
    one_line_error(invoke("plan", reference_config, "--vram", "12GB", "--type", "Q9_9"), "Q9_9")
