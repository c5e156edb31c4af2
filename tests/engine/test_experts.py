"""Offloaded experts (engine/experts.py) give the logits of all-resident execution.

A tiny DiffusionGemma (transformers-made, converted to F32 by our converter) runs the encoder over a
prompt longer than the sliding window, two decoder steps (the second with self-conditioning), a
committed block and one more decoder step, once with every expert resident and once per placement:
experts computed on the CPU, streamed through the pinned arena or through the staging buffers (with a
chunk smaller than a tensor), a partly offloaded layer, and a plan the budget forced. On a machine
without a GPU the compute device is the CPU and these paths run all the same; the `gpu` variant
repeats them with CUDA as the compute device.
"""

from __future__ import annotations

import math

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine.experts import ExpertExecutor, HostTensorStore, attach_plan, detach, measure_costs, synthetic_blocks
from engine.model import DiffusionGemmaModel
from engine.placement import PlacementError, build_rules, plan_for, plan_placement, sizes_from_gguf
from engine.weights import dequantize

PROMPT, CANVAS = 20, 16
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The transformers-made tiny checkpoint, converted to F32. Where the installed transformers has no
    DiffusionGemma (a GPU machine's older image), the same layout with random weights from
    gguf_tools.synthetic: the comparison is resident vs offloaded on one file either way."""
    from gguf_tools.convert import convert

    d = tmp_path_factory.mktemp("experts")
    try:
        from transformers import DiffusionGemmaForBlockDiffusion  # noqa: F401

        from tests.tiny import make_tiny_checkpoint

        make_tiny_checkpoint(d / "ckpt", dtype=torch.float32, canvas_length=CANVAS, seed=5)
    except ImportError:
        from gguf_tools.synthetic import tiny_config, write_checkpoint, write_tokenizer

        cfg, gen = tiny_config()
        cfg["canvas_length"] = CANVAS
        write_checkpoint(d / "ckpt", cfg, gen, seed=5)
        write_tokenizer(d / "ckpt", cfg["text_config"]["vocab_size"])
    out, _ = convert(d / "ckpt", d / "tiny-F32.gguf", "F32")
    return out


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (n,), generator=g) for n in (PROMPT, CANVAS, CANVAS, CANVAS)]


def run(model: DiffusionGemmaModel, inputs) -> list[torch.Tensor]:
    prompt, canvas, committed, canvas2 = (t.to(model.device) for t in inputs)
    cache = model.new_cache()
    enc = model.encode(prompt, cache, return_logits=True)
    dec0 = model.decode(canvas, cache)
    dec1 = model.decode(canvas, cache, self_cond_logits=dec0 / 0.8)
    enc2 = model.encode(committed, cache, return_logits=True)
    logits, soft = model.decode_step(canvas2, cache, None, 0.8)
    dec2, _ = model.decode_step(canvas2, cache, soft, 0.7)
    return [x.float().cpu() for x in (enc, dec0, dec1, enc2, logits, dec2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def placements(spec, sizes):
    """(id, plan, executor options) for the placements every test device runs."""
    f32 = dict(ctx=64, vram_budget=None, dtype="f32")
    out = [
        ("cpu-first-2", plan_placement(spec, sizes, rules=build_rules(n_cpu_moe=2), offload_mode="cpu", **f32), {}),
        ("stream-arena", plan_placement(spec, sizes, rules=build_rules(cpu_moe=True), offload_mode="stream", **f32),
         {"host_pinning": "arena"}),
        ("stream-staging", plan_placement(spec, sizes, rules=build_rules(cpu_moe=True), offload_mode="stream", **f32),
         {"host_pinning": "staging", "staging_chunk": 3000}),
        ("partial-layer-stream", plan_placement(spec, sizes, rules=build_rules([r"blk\.1\.ffn_down_exps=cpu"],
                                                                                n_cpu_moe=1),
                                                offload_mode="stream", **f32), {}),
        ("partial-layer-cpu", plan_placement(spec, sizes, rules=build_rules([r"blk\.2\.ffn_gate_up_exps=cpu"]),
                                             offload_mode="cpu", **f32), {}),
    ]
    # a budget only: the planner offloads on its own (reserve and budget scaled to the tiny model)
    everything = plan_placement(spec, sizes, reserve=0, **f32)
    budget = everything.gpu_bytes - 40_000
    auto = plan_placement(spec, sizes, ctx=64, vram_budget=budget, dtype="f32", reserve=0)
    assert auto.fits and auto.auto_offloaded > 0 and auto.gpu_bytes <= budget
    out.append(("budget-auto", auto, {}))
    return out


def check_placements(path, inputs, device: str, tol: float):
    spec, sizes, _ = sizes_from_gguf(path)
    model = DiffusionGemmaModel(path, device)
    reference = run(model, inputs)
    for name, plan, opts in placements(spec, sizes):
        assert plan.layer_modes(), name
        ex = attach_plan(model, plan, **opts)
        try:
            got = run(model, inputs)
            errs = [rel(a, b) for a, b in zip(got, reference)]
            print(f"{device} {name}: modes {plan.layer_modes()} rel err {max(errs):.2e} stats {ex.stats}")
            assert max(errs) <= tol, (name, errs)
            modes = set(plan.layer_modes().values())
            if "cpu" in modes:
                assert ex.stats["cpu_layer_calls"] > 0, name
            if "stream" in modes:
                assert ex.stats["stream_layer_calls"] > 0 and ex.stats["bytes_streamed"] > 0, name
            if device != "cpu":  # offloaded tensors have no device copy
                assert not any(k[0] in set(plan.offloaded) for k in model.weights._raw_on), name
        finally:
            detach(model)
        assert model.expert_executor is None
    # back to resident: the same numbers again
    assert max(rel(a, b) for a, b in zip(run(model, inputs), reference)) <= tol


def test_offloaded_experts_give_resident_logits_cpu(tiny_gguf, inputs):
    check_placements(tiny_gguf, inputs, "cpu", TOL)


@pytest.mark.gpu
def test_offloaded_experts_give_resident_logits_cuda(tiny_gguf, inputs):
    # the CPU mode computes in float32 on the host; everything else is the device's own arithmetic
    check_placements(tiny_gguf, inputs, "cuda", 1e-4)


@pytest.mark.gpu
def test_non_expert_tensor_in_host_ram_cuda(tiny_gguf, inputs):
    """A non-expert tensor in host RAM (the plan's compute "stream" for it) is uploaded per use, never
    kept on the device. The tiny model's tensors are all below the size rules move, so the store view
    is made directly."""
    model = DiffusionGemmaModel(tiny_gguf, "cuda")
    reference = run(model, inputs)
    base = model.weights
    base._raw_on.clear()
    model.weights = HostTensorStore(base, frozenset({"token_embd.weight"}))  # read via rows()/row_range()
    try:
        got = run(model, inputs)
        assert not any(k[0] == "token_embd.weight" for k in base._raw_on)
        assert any(k[0] == "blk.1.ffn_gate_up_exps.weight" for k in base._raw_on)  # the rest: cached as before
        assert max(rel(a, b) for a, b in zip(got, reference)) <= 1e-6
    finally:
        model.weights = base


def test_stream_prefetch_wraps_around(tiny_gguf, inputs):
    """Three streamed layers, two slots: after the first pass every layer comes from a prefetch
    (no synchronous load), and each pass copies every streamed layer once."""
    spec, sizes, _ = sizes_from_gguf(tiny_gguf)
    model = DiffusionGemmaModel(tiny_gguf, "cpu")
    plan = plan_placement(spec, sizes, ctx=64, vram_budget=None, dtype="f32", rules=build_rules(cpu_moe=True),
                          offload_mode="stream")
    ex = attach_plan(model, plan, host_pinning="staging", staging_chunk=5000)
    try:
        cache = model.new_cache()
        model.encode(inputs[0], cache)
        assert ex.stats["sync_loads"] == 1
        per_pass = sum(t.bytes for t in plan.tensors if t.device == "cpu")
        before = ex.stats["bytes_streamed"]
        for _ in range(3):
            model.decode(inputs[1], cache)
        assert ex.stats["sync_loads"] == 1
        assert ex.stats["bytes_streamed"] - before == 3 * per_pass
    finally:
        detach(model)


def test_plan_for_a_gguf_and_refusals(tiny_gguf):
    p = plan_for(tiny_gguf, "1GB", 64, n_cpu_moe=1, dtype="f32")
    assert p.fits and sorted(p.layer_modes()) == [0]
    with pytest.raises(PlacementError, match="--type"):
        plan_for(tiny_gguf, "1GB", 64, "Q8_0")
    refused = plan_for(tiny_gguf, "1MB", 64)
    assert not refused.fits
    model = DiffusionGemmaModel(tiny_gguf, "cpu")
    with pytest.raises(PlacementError, match="too small"):
        attach_plan(model, refused)
    assert model.expert_executor is None


def test_executor_rejects_a_plan_for_another_model(tiny_gguf, reference_config):
    from engine.placement import sizes_from_config

    spec, sizes, _ = sizes_from_config(reference_config, "Q8_0")
    plan = plan_placement(spec, sizes, ctx=64, vram_budget=None, rules=build_rules(n_cpu_moe=1))
    model = DiffusionGemmaModel(tiny_gguf, "cpu")
    with pytest.raises(PlacementError, match="another model"):
        ExpertExecutor(model, plan)
    with pytest.raises(PlacementError, match="another model"):
        attach_plan(model, plan)


def test_synthetic_blocks_and_measured_costs():
    for q in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        w = dequantize(synthetic_blocks(q, 64), q)
        assert torch.isfinite(w).all() and 0.001 < float(w.abs().max()) < 0.1, q.name
    c = measure_costs("cpu", quick=True)
    for v in (c.link_bytes_per_s, c.cpu_flops, c.cpu_dequant_bytes_per_s, c.gpu_bytes_per_s):
        assert math.isfinite(v) and v > 0
    assert c.source == "measured on cpu"
