"""The memory check `diffgemma run` and `diffgemma logits` make before allocating (engine/plan_cli.py):
KV cache + [C, V] fp32 logits + self-conditioning buffers for the requested context, sized with the
planner's formulas, against the available host RAM (CPU) or the free VRAM / --vram (CUDA).

A copy of the tiny model with a 2^31-token context length lets --max-new-tokens 10**9 pass the context
check, so the memory check is what refuses it: one line naming the bytes, quickly, before any cache,
canvas or logits exist (the allocating functions are replaced by ones that fail the test).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import engine.run as run_mod
from engine import plan_cli
from engine.model import DiffusionGemmaModel
from engine.placement import PlacementError, fixed_buffers, kv_entries
from gguf_tools import convert as conv
from gguf_tools.reader import GGUFFile
from tests.cli_helpers import invoke, one_line_error

HUGE_CTX = 2**31


@pytest.fixture(scope="module")
def long_ctx_gguf(tiny_ckpt, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("memory")
    shutil.copytree(tiny_ckpt[0], d / "ckpt")
    cfg_path = d / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"]["max_position_embeddings"] = HUGE_CTX
    cfg_path.write_text(json.dumps(cfg))
    out, _ = conv.convert(d / "ckpt", d / "tiny-longctx-BF16.gguf", "BF16")
    return out


@pytest.fixture
def no_allocation(monkeypatch):
    """Creating a KV cache or starting generation fails the test: the check must come first."""
    def boom(*_a, **_k):
        raise AssertionError("allocated before the memory check")

    monkeypatch.setattr(DiffusionGemmaModel, "new_cache", boom)
    monkeypatch.setattr(run_mod, "generate", boom)


def test_runtime_need_is_the_planners_formulas(long_ctx_gguf):
    spec = GGUFFile(long_ctx_gguf).spec()
    ctx, C = 5000, spec.canvas_length
    need = plan_cli.runtime_need(spec, ctx, C, torch.float32)
    buffers = {b.name: b.bytes for b in fixed_buffers(spec, (), ctx, C, 4, C, spec.vocab_size)}
    assert need == {"KV cache": sum(k.bytes for k in kv_entries(spec, ctx, 4)),
                    "logits": buffers["canvas_logits"], "self-conditioning": buffers["self_conditioning"]}
    assert need["logits"] == C * spec.vocab_size * 4
    assert plan_cli.runtime_need(spec, 2 * ctx, C, torch.float32)["KV cache"] > need["KV cache"]
    assert plan_cli.runtime_need(spec, ctx, C, torch.bfloat16)["KV cache"] * 2 == need["KV cache"]
    assert "self-conditioning" not in plan_cli.runtime_need(spec, ctx, C, torch.float32, self_cond=False)


def test_host_available_reads_meminfo():
    avail = plan_cli.host_available()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:"))
        kb = int(line.split()[1])
        assert avail is not None and abs(avail - kb * 1024) < 2**30  # read again a moment later
    else:
        assert avail is None or avail > 0


def test_check_memory_names_both_sizes():
    plan_cli.check_memory({"KV cache": 10, "logits": 5}, 15, "available host RAM", 7, "hint")
    plan_cli.check_memory({"KV cache": 10}, None, "available host RAM", 7, "hint")  # unknown: no check
    with pytest.raises(PlacementError) as e:
        plan_cli.check_memory({"KV cache": 10, "logits": 6}, 15, "available host RAM", 7, "lower it")
    msg = str(e.value)
    assert "needs 16 bytes" in msg and "available host RAM is 15 bytes" in msg and "lower it" in msg
    assert "\n" not in msg


def test_huge_max_new_tokens_is_refused_before_allocating(long_ctx_gguf, no_allocation):
    t0 = time.perf_counter()
    r = invoke("run", long_ctx_gguf, "hi", "--max-new-tokens", 10**9, "--device", "cpu")
    elapsed = time.perf_counter() - t0
    one_line_error(r, "not enough memory", "needs", "bytes", "available host RAM", "--max-new-tokens")
    spec = GGUFFile(long_ctx_gguf).spec()
    need = r.stderr.split("needs ")[1].split(" bytes")[0]
    # at least the KV cache of 10**9 tokens, as the planner sizes it
    assert int(need) >= sum(k.bytes for k in kv_entries(spec, 10**9, 4))
    assert elapsed < 20


def test_run_refused_when_the_available_memory_is_small(long_ctx_gguf, no_allocation, monkeypatch):
    monkeypatch.setattr(plan_cli, "host_available", lambda: 12345)
    r = invoke("run", long_ctx_gguf, "hi", "--max-new-tokens", 16, "--device", "cpu")
    one_line_error(r, "is 12345 bytes", "needs")
    # --ctx sizes the check too, and must hold the prompt and the new tokens
    one_line_error(invoke("run", long_ctx_gguf, "hi", "--max-new-tokens", 16, "--ctx", 4), "--ctx 4")


def test_logits_refused_when_the_available_memory_is_small(long_ctx_gguf, no_allocation, monkeypatch, tmp_path):
    monkeypatch.setattr(plan_cli, "host_available", lambda: 1000)
    out = tmp_path / "x.npy"
    one_line_error(invoke("logits", long_ctx_gguf, "--tokens", "1,2,3", "--out", out, "--device", "cpu"),
                   "is 1000 bytes", "--tokens")
    one_line_error(invoke("logits", long_ctx_gguf, "--tokens", "1,2,3", "--canvas", "4,5", "--out", out,
                          "--device", "cpu"), "is 1000 bytes")
    assert not out.exists()


def test_cpu_vram_budget_too_small_for_the_plan(long_ctx_gguf, no_allocation):
    one_line_error(invoke("run", long_ctx_gguf, "hi", "--max-new-tokens", 16, "--device", "cpu", "--vram", "1MB"),
                   "too small")
    one_line_error(invoke("run", long_ctx_gguf, "hi", "--vram", "lots"), "--vram")


@pytest.mark.gpu
def test_cuda_checks_free_vram_or_the_budget(long_ctx_gguf, no_allocation):
    free, _ = torch.cuda.mem_get_info()
    avail, what = plan_cli.device_available(torch.device("cuda"))
    assert what == "free VRAM" and abs(avail - free) < 2**30
    assert plan_cli.device_available(torch.device("cuda"), "2GB") == (2 * 2**30, "the --vram budget")
    r = invoke("run", long_ctx_gguf, "hi", "--max-new-tokens", 10**9, "--device", "cuda")
    one_line_error(r, "not enough memory", "free VRAM")
