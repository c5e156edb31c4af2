"""The triton backend (engine.triton_ops.TritonOps) against the torch reference on whole models, under
the interpreter: prefill logits, a canvas without and with self-conditioning, and a denoising step's
soft embedding, for files whose tensors cover the kernels' types."""

from __future__ import annotations

import pytest
import torch

from engine import backend
from engine.model import DiffusionGemmaModel, TorchOps
from engine.triton_ops import TritonOps
from engine.weights import WeightStore


@pytest.fixture(scope="module")
def sort_q4km(tmp_path_factory):
    """The shipped trained model (hidden 256: K-quant rows) at Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0, F32."""
    from engine.default_model import SHIPPED
    from gguf_tools.convert import convert

    out, _ = convert(SHIPPED, tmp_path_factory.mktemp("sort") / "sort-Q4_K_M.gguf", "Q4_K_M")
    return out


@pytest.fixture(scope="module")
def tiny_q8(tiny_ckpt, tmp_path_factory):
    from gguf_tools.convert import convert

    out, _ = convert(tiny_ckpt[0], tmp_path_factory.mktemp("tiny-q8") / "tiny-Q8_0.gguf", "Q8_0")
    return out


def _pair(path):
    store = WeightStore(path)
    ref = DiffusionGemmaModel(store, "cpu")
    fast = DiffusionGemmaModel(store, "cpu")
    backend.apply(fast, backend.resolve("triton", "cpu"))
    assert isinstance(fast.ops, TritonOps) and isinstance(ref.ops, TorchOps)
    return ref, fast


def _both(ref, fast, fn):
    return fn(ref), fn(fast)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # fp32 products in another summation order: differences of a few ulps of the largest terms
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 2e-5 * max(scale, 1.0), (a - b).abs().max().item()


@pytest.mark.parametrize("which", ["tiny_gguf", "tiny_q8", "sort_q4km"])
def test_triton_backend_matches_torch(which, request, one_thread):
    path = request.getfixturevalue(which)
    ref, fast = _pair(path)
    vocab = ref.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (11,), generator=g)
    canvas = torch.randint(3, vocab, (ref.canvas_length,), generator=g)

    def run(m):
        cache = m.new_cache()
        prefill = m.encode(prompt, cache, return_logits=True)
        first, soft = m.decode_step(canvas, cache, None, 0.7)
        second, soft2 = m.decode_step(canvas, cache, soft, 0.7)
        selfcond = m.decode(canvas, cache, self_cond_logits=first / 0.7)
        return prefill, first, soft, second, soft2, selfcond

    want, got = run(ref), run(fast)
    for a, b in zip(got, want):
        _close(a, b)
    assert torch.equal(got[3].argmax(-1), want[3].argmax(-1))
    # every tensor of these files has a kernel
    assert fast.ops.fallbacks == set()
    assert fast.ops.last_stats is not None


def test_type_without_kernel_runs_on_torch_and_is_reported(tiny_q8, monkeypatch, one_thread):
    from gguf import GGMLQuantizationType as Q

    import engine.triton_ops as T

    monkeypatch.setattr(T, "KERNEL_QTYPES", frozenset(T.KERNEL_QTYPES) - {Q.Q8_0})
    ref, fast = _pair(tiny_q8)
    canvas = torch.arange(3, 3 + ref.canvas_length)

    def run(m):
        cache = m.new_cache()
        m.encode(torch.arange(5, 12), cache)
        return m.decode(canvas, cache)

    _close(run(fast), run(ref))
    assert fast.ops.fallbacks, "Q8_0 tensors should have been handed to torch"
    store = fast.weights
    assert all(store.info(n).qtype == Q.Q8_0 for n in fast.ops.fallbacks)
    assert backend.describe(fast)["torch_fallback_tensors"] == sorted(fast.ops.fallbacks)


def test_resolve_names_the_fallback():
    # under this directory's conftest the interpreter is on, so triton runs on the CPU
    assert backend.resolve("triton", "cpu").name == "triton"
    assert backend.resolve("auto", "cpu").name == "torch"
    assert backend.resolve("torch", "cpu").name == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        backend.resolve("cuda-magic", "cpu")


def test_fused_steps_generate_what_the_reference_loop_generates(tiny_q8, one_thread):
    """device_generate over the fast path (vocabulary-kernel entropy/argmax, soft embedding carry)
    against engine.generate.generate over the torch backend, same seed: same tokens and steps."""
    from engine.device_sampler import device_generate
    from engine.generate import ModelRunner, generate
    from engine.triton_ops import FusedStepper

    ref, fast = _pair(tiny_q8)
    prompt = torch.arange(5, 14)
    kw = dict(max_new_tokens=2 * ref.canvas_length, steps=6, entropy_bound=0.5, t_min=0.4, t_max=0.8)
    want = generate(ModelRunner(ref), prompt, generator=torch.Generator().manual_seed(7), **kw)
    runner = ModelRunner(fast)
    got = device_generate(runner, prompt, generator=torch.Generator().manual_seed(7),
                          stepper=FusedStepper(fast, runner.cache), check_every=3, **kw)
    assert got.steps_per_canvas == want.steps_per_canvas
    assert torch.equal(got.tokens, want.tokens)


def test_logits_and_run_through_the_engine_api(tiny_q8, one_thread):
    """compute_logits and run_prompt with backend="triton" (what `diffgemma logits/run --backend
    triton --device cpu` call) against backend="torch"."""
    from engine.run import RunOptions, compute_logits, run_prompt

    notices: list[str] = []
    for canvas in (None, list(range(20, 20 + 12))):
        want = compute_logits(tiny_q8, [5, 6, 7, 8], canvas, device="cpu", backend="torch")
        got = compute_logits(tiny_q8, [5, 6, 7, 8], canvas, device="cpu", backend="triton",
                             on_notice=notices.append)
        _close(torch.from_numpy(got), torch.from_numpy(want))
    opts = dict(max_new_tokens=8, steps=4, seed=3, device="cpu", raw=True)
    ref = run_prompt(tiny_q8, "hello", RunOptions(backend="torch", **opts))
    fast = run_prompt(tiny_q8, "hello", RunOptions(backend="triton", **opts), on_notice=notices.append)
    assert notices == []
    assert fast.token_ids == ref.token_ids and fast.steps_per_canvas == ref.steps_per_canvas
    assert fast.to_json()["backend"] == {"backend": "triton", "torch_fallback_tensors": []}
    assert ref.to_json()["backend"] == {"backend": "torch"}


def test_triton_request_without_interpreter_or_gpu_runs_on_torch(tiny_q8, monkeypatch, one_thread):
    import engine.kernels as K
    from engine.run import compute_logits

    monkeypatch.setattr(K, "INTERPRET", False)
    choice = backend.resolve("triton", "cpu")
    assert choice.name == "torch" and choice.fell_back
    assert "--backend torch" in choice.reason and "TRITON_INTERPRET" in choice.reason
    notices: list[str] = []
    compute_logits(tiny_q8, [5, 6, 7], device="cpu", backend="triton", on_notice=notices.append)
    assert notices == [choice.reason]


@pytest.mark.parametrize("fixture", ["tiny_gguf", "sort_q4km"])
def test_logits_command_backends_agree(fixture, request, tmp_path):
    """`diffgemma logits --backend triton --device cpu` (interpreter) against `--backend torch`."""
    import numpy as np

    from tests.cli_helpers import invoke

    path = request.getfixturevalue(fixture)
    outs = {}
    for b in ("torch", "triton"):
        outs[b] = tmp_path / f"{b}.npy"
        r = invoke("logits", path, "--tokens", "2,5,9,11", "--canvas", ",".join(map(str, range(20, 32))),
                   "--device", "cpu", "--backend", b, "--out", outs[b])
        assert r.exit_code == 0, r.output
        assert "note:" not in r.stderr
    want, got = np.load(outs["torch"]), np.load(outs["triton"])
    _close(torch.from_numpy(got), torch.from_numpy(want))
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_plan_sizes_kernel_workspace_for_triton(reference_config):
    import json

    from tests.cli_helpers import invoke

    texts = {b: invoke("plan", reference_config, "--vram", "24GB", "--ctx", "8192", "--backend", b, "--json")
             for b in ("torch", "triton")}
    for r in texts.values():
        assert r.exit_code == 0, r.output
    bufs = {b: json.loads(r.stdout)["buffers"] for b, r in texts.items()}
    assert "dequant" in bufs["torch"] and "kernels" not in bufs["torch"]
    assert "kernels" in bufs["triton"] and "dequant" not in bufs["triton"]


@pytest.mark.parametrize("mode", ["stream", "cpu"])
def test_offloaded_experts_on_the_fast_path(tiny_q8, mode, one_thread):
    """Streamed expert layers run the grouped kernel out of the stream slot; CPU-computed layers stay
    on the torch path; either way the logits are the resident ones."""
    from engine.experts import attach_plan, detach
    from engine.placement import build_rules, plan_placement, sizes_from_gguf

    ref, fast = _pair(tiny_q8)
    spec, sizes, _ = sizes_from_gguf(tiny_q8)
    canvas = torch.arange(40, 40 + ref.canvas_length)

    def run(m):
        cache = m.new_cache()
        m.encode(torch.arange(5, 15), cache)
        return m.decode(canvas, cache)

    want = run(ref)
    plan = plan_placement(spec, sizes, ctx=64, vram_budget=None, dtype="f32", rules=build_rules(n_cpu_moe=2),
                          offload_mode=mode)
    calls = []
    import engine.kernels.moe as moe

    real = moe.grouped_moe
    ex = attach_plan(fast, plan)
    try:
        moe.grouped_moe = lambda *a, **k: calls.append(1) or real(*a, **k)
        got = run(fast)
    finally:
        moe.grouped_moe = real
        detach(fast)
    _close(got, want)
    assert ex.stats[f"{mode}_layer_calls"] > 0
    n_layers = spec.block_count
    # every layer's experts pass through the kernel twice (prefill, canvas) except the CPU-computed ones
    assert len(calls) == 2 * (n_layers if mode == "stream" else n_layers - 2)
