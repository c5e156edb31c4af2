"""engine.kernels.moe under the Triton interpreter: route() invariants, and grouped_moe against the torch
reference (engine.model.grouped_experts + expert_mlp) on raw expert tensors from the project quantizers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine.kernels.moe import capacity, grouped_moe, layer_moe, route
from engine.model import expert_mlp, grouped_experts
from gguf_tools.quants import quantize

# ---- routing ------------------------------------------------------------------------------------

def _skewed_top_i(T: int, k: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per token; expert 0 takes nearly every token, the last expert none."""
    rows = []
    for _ in range(T):
        p = torch.ones(E - 1)
        p[0] = 50.0
        rows.append(torch.multinomial(p, k, generator=gen))
    return torch.stack(rows)


@pytest.mark.parametrize("T,k,E,bm", [(1, 1, 4, 16), (1, 8, 8, 16), (7, 3, 5, 16), (64, 8, 8, 16),
                                      (64, 2, 4, 64), (33, 4, 128, 16), (5, 2, 6, 1)])
def test_route_invariants(T, k, E, bm):
    gen = torch.Generator().manual_seed(T * 100 + k)
    top_i = _skewed_top_i(T, k, E, gen) if k < E else torch.randint(0, E, (T, k), generator=gen)
    r = route(top_i, E, bm)
    n = T * k
    cap = capacity(n, E, bm)
    assert r.capacity == cap and cap % bm == 0 and r.n_blocks == cap // bm
    flat = top_i.reshape(-1)
    # every (t, j) exactly once, in the slot pair_slot names, in a block of its expert
    used = r.slot_pair[r.slot_pair >= 0]
    assert sorted(used.tolist()) == list(range(n))
    assert torch.equal(r.slot_pair[r.pair_slot.long()], torch.arange(n, dtype=torch.int32))
    assert torch.equal(r.block_expert[r.pair_slot.long() // bm].long(), flat)
    assert torch.equal(r.slot_token[r.pair_slot.long()].long(), torch.arange(n) // k)
    # padding slots point at a valid row and are marked; counts match
    pad = r.slot_pair < 0
    assert torch.all(r.slot_token[pad] == 0)
    assert torch.equal(r.counts.long(), torch.bincount(flat, minlength=E))
    # each expert's blocks are contiguous, hold its pairs first (stable order), then padding;
    # unused blocks come last and hold nothing
    blocks = r.block_expert.tolist()
    for e in range(E):
        bs = [b for b, x in enumerate(blocks) if x == e]
        c = int(r.counts[e])
        assert len(bs) == -(-c // bm)
        if bs:
            assert bs == list(range(bs[0], bs[0] + len(bs)))
            seg = r.slot_pair[bs[0] * bm:(bs[-1] + 1) * bm].tolist()
            assert seg[:c] == (flat == e).nonzero().flatten().tolist() and all(x < 0 for x in seg[c:])
    tail = [b for b, x in enumerate(blocks) if x < 0]
    assert tail == list(range(len(blocks) - len(tail), len(blocks)))
    assert all(x < 0 for b in tail for x in r.slot_pair[b * bm:(b + 1) * bm].tolist())


def test_route_worst_case_fills_capacity():
    # k distinct experts per token, one token each: every used expert wastes bm - 1 slots
    E, bm = 8, 16
    top_i = torch.arange(E).view(1, E)
    r = route(top_i, E, bm)
    assert r.capacity == E * bm and torch.all(r.block_expert >= 0)


# ---- grouped MoE against the torch reference ------------------------------------------------------

class _Store:
    """The two WeightStore methods expert_mlp uses, over raw tensors held in a dict."""

    def __init__(self, tensors: dict[str, tuple[torch.Tensor, Q]]):
        self.tensors = tensors

    def expert_names(self, layer: int) -> tuple[str, ...]:
        return tuple(self.tensors)

    def info(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(qtype=self.tensors[name][1])


def _experts(E: int, rows: int, cols: int, qtype: Q, rng: np.random.Generator, scale: float) -> torch.Tensor:
    w = (rng.standard_normal((E, rows, cols)) * scale).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(quantize(w, qtype)))


def _case(T, k, E, H, F, gu_q, d_q, fused, seed):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if fused:
        gate_up = (_experts(E, 2 * F, H, gu_q, rng, H ** -0.5),)
        gu_types = (gu_q,)
        names = ("gate_up",)
    else:
        gate_up = (_experts(E, F, H, gu_q, rng, H ** -0.5), _experts(E, F, H, gu_q, rng, H ** -0.5))
        gu_types = (gu_q, gu_q)
        names = ("gate", "up")
    down = _experts(E, H, F, d_q, rng, F ** -0.5)
    u = torch.randn(T, H, generator=gen)
    top_i = _skewed_top_i(T, k, E, gen)
    top_w = torch.softmax(torch.randn(T, k, generator=gen), -1)
    down_scale = torch.rand(E, generator=gen) + 0.5
    store = _Store({**{n: (t, q) for n, t, q in zip(names, gate_up, gu_types)}, "down": (down, d_q)})
    return u, top_i, top_w, down_scale, gate_up, gu_types, down, store


def _reference(u, top_i, top_w, down_scale, store):
    E = down_scale.shape[0]
    return grouped_experts(u, top_i, top_w * down_scale[top_i], E,
                           lambda e, x: expert_mlp(store, 0, e, x, lambda name: store.tensors[name][0]))


# (T, k, E, H, F, gate_up type, down type, fused) - the Q4_K_M expert mix is Q4_K gate/up with a Q5_0
# (F = 704 is no multiple of 256) or Q6_K down. Real widths appear one side at a time (gate_up K = H = 2816,
# down K = F = 704), the interpreter being too slow for both in the default run; the full shape is slow-marked.
CASES = [
    (1, 2, 4, 256, 64, Q.F16, Q.F16, True),
    (7, 4, 6, 512, 96, Q.F16, Q.F16, False),
    (64, 8, 10, 256, 64, Q.Q8_0, Q.Q8_0, True),
    (7, 3, 5, 256, 256, Q.Q4_K, Q.Q6_K, False),
    (64, 2, 4, 512, 128, Q.Q4_K, Q.Q5_0, True),
    (7, 8, 9, 256, 64, Q.Q6_K, Q.Q5_0, True),
    (7, 2, 4, 2816, 64, Q.Q4_K, Q.Q8_0, False),
    (7, 2, 4, 256, 704, Q.Q4_K, Q.Q5_0, True),
    pytest.param(7, 4, 5, 2816, 704, Q.Q4_K, Q.Q5_0, True, marks=pytest.mark.slow),
    pytest.param(7, 2, 4, 2816, 768, Q.Q4_K, Q.Q6_K, False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("T,k,E,H,F,gu_q,d_q,fused", CASES)
def test_grouped_moe_matches_torch(T, k, E, H, F, gu_q, d_q, fused):
    u, top_i, top_w, down_scale, gate_up, gu_types, down, store = _case(T, k, E, H, F, gu_q, d_q, fused, T + k)
    want = _reference(u, top_i, top_w, down_scale, store)
    got = grouped_moe(u, top_i, top_w, down_scale, gate_up, gu_types, down, d_q)
    assert got.dtype == u.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_activations():
    # the kernels accumulate in fp32 and keep act in u's dtype: within bf16 rounding of the fp32 reference
    u, top_i, top_w, down_scale, gate_up, gu_types, down, store = _case(7, 2, 4, 256, 64, Q.Q8_0, Q.Q8_0, True, 9)
    want = _reference(u.bfloat16().float(), top_i, top_w, down_scale, store)
    got = grouped_moe(u.bfloat16(), top_i, top_w, down_scale, gate_up, gu_types, down, Q.Q8_0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_deterministic_sum_and_block_sizes():
    u, top_i, top_w, down_scale, gate_up, gu_types, down, store = _case(16, 3, 5, 256, 64, Q.F16, Q.F16, False, 3)
    want = _reference(u, top_i, top_w, down_scale, store)
    for bm, det in ((16, True), (32, False), (64, True)):
        got = grouped_moe(u, top_i, top_w, down_scale, gate_up, gu_types, down, Q.F16, block_m=bm,
                          deterministic=det)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    r = route(top_i, 5, 32)
    got = layer_moe(store, 0, u, top_i, top_w, down_scale, lambda name: store.tensors[name][0], routing=r)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_one_line_errors():
    u, top_i, top_w, down_scale, gate_up, gu_types, down, _ = _case(2, 2, 4, 256, 64, Q.F16, Q.F16, True, 1)
    with pytest.raises(ValueError, match="down"):
        grouped_moe(u, top_i, top_w, down_scale, gate_up, gu_types, down[:, :128], Q.F16)
    with pytest.raises(ValueError, match="gate_up"):
        grouped_moe(u[:, :128], top_i, top_w, down_scale, gate_up, gu_types, down, Q.F16)


@pytest.mark.gpu
def test_route_on_cuda_has_no_host_sync_and_is_capturable():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    top_i = _skewed_top_i(256, 8, 16, gen).to(dev)
    want = route(top_i.cpu(), 16, 16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = route(top_i, 16, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in ("block_expert", "slot_token", "slot_pair", "pair_slot", "counts"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        route(top_i, 16, 16)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route(top_i, 16, 16)
    top_i.copy_(torch.flip(top_i, (0,)))
    graph.replay()
    torch.cuda.synchronize()
    again = route(top_i.cpu(), 16, 16)
    assert torch.equal(captured.slot_pair.cpu(), again.slot_pair) and torch.equal(captured.block_expert.cpu(),
                                                                                   again.block_expert)
