"""The triton backend on a GPU against the torch reference, at the model's real sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from engine.weights import dequantize
from gguf_tools.quants import quantize

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"


def _raw(qtype: Q, n: int, k: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    return torch.from_numpy(quantize(w, qtype).reshape(n, -1).copy()).to(DEV)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


KQ = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K, Q.IQ4_XS]
LEGACY = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.MXFP4]


@pytest.mark.parametrize("qtype", KQ + LEGACY, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 16, 256, 512])
def test_dequant_matmul_real_widths(qtype, m):
    from engine.kernels.gemm import dequant_matmul

    widths = [2816, 4096] if qtype in KQ else [2816, 704, 2112]
    for k in widths:
        raw = _raw(qtype, 1408, k, k + m)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        want = x.float() @ dequantize(raw, qtype).T
        got = dequant_matmul(x, raw, qtype)
        assert got.dtype == torch.bfloat16
        assert _rel(got, want) < 2e-2, (qtype.name, k, m)


@pytest.mark.parametrize("types", [(Q.Q4_K, Q.Q5_0), (Q.Q6_K, Q.Q8_0)], ids=lambda t: "+".join(q.name for q in t))
def test_grouped_moe_full_layer(types):
    """128 experts, top-8, a 256-token canvas (plus a skewed one), H=2816, F=704, fused gate_up."""
    from engine.kernels.moe import grouped_moe
    from engine.model import grouped_experts

    E, k, H, Fw, T = 128, 8, 2816, 704, 256
    gu_t, down_t = types
    gate_up = _raw(gu_t, E * 2 * Fw, H, 1).view(E, 2 * Fw, -1)
    down = _raw(down_t, E * H, Fw, 2).view(E, H, -1)
    u = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    g = torch.Generator(device=DEV).manual_seed(0)
    for skew in (False, True):
        logits = torch.randn(T, E, device=DEV, generator=g)
        if skew:
            logits[:, 0] += 10.0
        top_w, top_i = torch.topk(torch.softmax(logits, -1), k)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        scale = torch.rand(E, device=DEV) + 0.5

        def mlp(e, x):
            gu = x.float() @ dequantize(gate_up[e], gu_t).T
            return (F.gelu(gu[:, :Fw], approximate="tanh") * gu[:, Fw:]) @ dequantize(down[e], down_t).T

        want = grouped_experts(u.float(), top_i, top_w * scale[top_i], E, mlp)
        got = grouped_moe(u, top_i, top_w, scale, (gate_up,), (gu_t,), down, down_t)
        assert _rel(got, want) < 3e-2


def test_vocab_pass_real_vocabulary():
    from engine.kernels.vocab import vocab_pass

    V, H, C = 262144, 2816, 256
    raw = _raw(Q.Q6_K, V, H, 3)
    x = torch.randn(C, H, device=DEV, dtype=torch.bfloat16)
    t = torch.tensor(0.7, device=DEV)
    res = vocab_pass(x, raw, Q.Q6_K, 30.0, t, None)
    table = dequantize(raw, Q.Q6_K)
    logits = 30.0 * torch.tanh((x.float() @ table.T) / 30.0)
    assert _rel(res.logits, logits) < 2e-2
    agree = (res.argmax == logits.argmax(-1)).float().mean().item()
    assert agree >= 0.995
    soft = torch.softmax(res.logits / t, -1) @ table
    assert _rel(res.soft, soft) < 2e-2
    del table


def _two_layer_model(tmp_path):
    from bench.gpu_bench import synthetic_from_plan
    from gguf_tools.convert import plan_conversion
    from gguf_tools.synthetic import full_size_config

    cfg, gen = full_size_config(REFERENCE, 2)
    src = tmp_path / "two"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "generation_config.json").write_text(json.dumps(gen))
    store, _ = synthetic_from_plan(plan_conversion(src, "Q4_K_M"))
    return store


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    if not (REFERENCE / "config.json").is_file():
        pytest.skip("shared/reference config not found beside the checkout")
    return _two_layer_model(tmp_path_factory.mktemp("gpu"))


def test_model_backends_agree_and_graph_replays(two_layers):
    from engine import backend
    from engine.model import DiffusionGemmaModel

    ref = DiffusionGemmaModel(two_layers, DEV, dtype=torch.bfloat16)
    fast = DiffusionGemmaModel(two_layers, DEV, dtype=torch.bfloat16)
    backend.apply(fast, backend.resolve("triton", DEV))
    assert fast.ops.name == "triton" and fast.step_graphs is not None
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(200, ref.vocab_size, (300,), generator=g)
    canvas = torch.randint(200, ref.vocab_size, (ref.canvas_length,), generator=g).to(DEV)
    out = {}
    for name, m in (("ref", ref), ("fast", fast)):
        cache = m.new_cache()
        m.encode(prompt, cache)
        _, soft = m.decode_step(canvas, cache, None, 0.8)
        logits, soft2 = m.decode_step(canvas, cache, soft, 0.8)  # the fast model captures here
        out[name] = (logits.clone(), soft2.clone(), cache, soft)
    agree = (out["fast"][0].argmax(-1) == out["ref"][0].argmax(-1)).float().mean().item()
    print(f"\ntriton vs torch canvas logits: top-1 {100 * agree:.2f} %, max abs diff "
          f"{(out['fast'][0] - out['ref'][0]).abs().max().item():.4g}")
    assert agree >= 0.995
    # replays give what the eager pass gives for the same inputs
    cache, soft = out["fast"][2], out["fast"][3]
    replay, _ = fast.decode_step(canvas, cache, soft, 0.8)
    assert fast.step_graphs.captures == 1 and fast.step_graphs.replays >= 1
    eager, _ = fast._decode(canvas, cache, soft, None, 0.8)
    assert _rel(replay, eager) < 1e-3
    # no host synchronisation inside a replayed step and its sampler work
    from engine.device_sampler import DeviceDenoiser
    from engine.triton_ops import FusedStepper

    den = DeviceDenoiser(FusedStepper(fast, cache), vocab_size=fast.vocab_size, canvas_length=fast.canvas_length,
                         temperatures=[0.8, 0.7, 0.6], entropy_bound=0.1, stability_threshold=1,
                         confidence_threshold=0.005, device=DEV, generator=torch.Generator(device=DEV).manual_seed(0))
    den.reset(canvas.clone())
    den.step(0.8)
    den.step(0.7)  # captures (the cache is the same, so the graph from above is reused or recaptured)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        den.step(0.6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_full_attention_heads_avoid_the_math_path():
    """512-wide heads with one KV head: the memory-efficient kernel accepts the folded shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine.model import grouped_query_attention

    q = torch.randn(16, 256, 512, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 8448, 512, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        got = grouped_query_attention(q, k, v, None)
        mask = torch.ones(256, 8448, dtype=torch.bool, device=DEV).tril(8448 - 256)
        got_masked = grouped_query_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=1.0, enable_gqa=True)
    assert _rel(got, want) < 2e-2
    assert torch.isfinite(got_masked.float()).all()
