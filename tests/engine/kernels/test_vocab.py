"""vocab_pass against the torch reference: DiffusionGemmaModel._vocab_pass itself (dequantized
chunks, matmul, softcap, online-softmax soft embedding) and engine.sampler's entropy / argmax."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine import sampler as S
from engine.kernels.vocab import vocab_pass
from engine.model import DiffusionGemmaModel, rms_norm
from engine.weights import dequantize
from gguf_tools.quants import quantize

CAP = 30.0
EPS = 1e-6


def make_table(v: int, h: int, qtype: Q, seed: int) -> torch.Tensor:
    """Stored rows of an embedding-like table: small Gaussian values, a few rows 10x larger."""
    rng = np.random.default_rng(seed)
    e = (rng.standard_normal((v, h)) * 0.03).astype(np.float32)
    e[rng.choice(v, 5, replace=False)] *= 10
    return torch.from_numpy(quantize(e, qtype))


def make_hidden(c: int, table: torch.Tensor, seed: int) -> torch.Tensor:
    """Pre-norm hidden states: noise, some rows pointing at a table row (confident distributions),
    and an all-zero row (every logit 0: a full tie)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(c, table.shape[1], generator=g)
    for r in range(0, c, 3):
        h[r] += 40 * table[(r * 37) % table.shape[0]] / table[(r * 37) % table.shape[0]].norm()
    if c > 1:
        h[c - 1] = 0
    return h


def reference(h: torch.Tensor, raw: torch.Tensor, qtype: Q, temperature: float | None):
    """The engine's own _vocab_pass (torch path) on a stand-in model holding only the embedding
    table (norm weight 1, embedding scale 1 so the soft embedding comes back unscaled)."""
    v, hid = raw.shape[0], h.shape[1]
    weights = SimpleNamespace(row_range=lambda name, s, e, device, dtype: dequantize(raw[s:e], qtype).to(dtype))
    fake = SimpleNamespace(
        weights=weights, token_embd="token_embd.weight", output_norm="output_norm.weight", eps=EPS,
        device=torch.device("cpu"), dtype=torch.float32, vocab=v, vocab_chunk=384,
        spec=SimpleNamespace(final_logit_softcapping=CAP, embedding_length=hid),
        w=lambda name: torch.ones(hid), embed_scale=lambda: torch.tensor(1.0))
    fake.torch_vocab_pass = lambda x, t: DiffusionGemmaModel.torch_vocab_pass(fake, x, t)
    fake.ops = SimpleNamespace(vocab_pass=fake.torch_vocab_pass)  # the torch backend
    return DiffusionGemmaModel._vocab_pass(fake, h, temperature)


def check(c: int, hid: int, v: int, qtype: Q, temperature: float | None, seed: int = 0):
    raw = make_table(v, hid, qtype, seed)
    table = dequantize(raw, qtype)
    h = make_hidden(c, table, seed + 1)
    ref_logits, ref_soft = reference(h, raw, qtype, temperature)
    x = rms_norm(h, torch.ones(hid), EPS)  # what _vocab_pass multiplies by the table
    t = None if temperature is None else torch.tensor(temperature, dtype=torch.float32)
    out = vocab_pass(x, raw, qtype, CAP, t)

    assert out.logits.shape == (c, v) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=2e-5)
    if temperature is None:
        assert out.soft is None
    else:
        torch.testing.assert_close(out.soft, ref_soft, rtol=1e-4, atol=1e-5)

    # the statistics are those of z = (the kernel's own logits) / T, computed the sampler's way
    z = out.logits if t is None else S.scale_logits(out.logits, temperature)
    assert torch.equal(out.argmax, z.argmax(dim=-1))
    assert torch.equal(out.max, z.amax(dim=-1))
    torch.testing.assert_close(out.logsumexp, z.logsumexp(dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.entropy, S.entropy(z), rtol=1e-5, atol=2e-6)
    return out, z


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q6_K, Q.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("c", [1, 12, 40])
def test_small_width(qtype, c):
    check(c, 256, 1000, qtype, 0.4 + 0.1 * (c % 4))


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q6_K, Q.Q4_K], ids=lambda q: q.name)
def test_real_width(qtype):
    out, z = check(12, 2816, 1000, qtype, 0.4)
    assert (out.entropy < 1e-3).sum() >= 2  # confident rows were part of the check
    assert (out.entropy > 1.0).sum() >= 2


def test_without_temperature_stats_of_the_logits():
    check(12, 256, 1000, Q.Q6_K, None)


def test_full_tie_takes_the_first_index():
    out, _ = check(12, 256, 1000, Q.F16, 0.5)
    last = out.logits[-1]  # all-zero hidden state: every logit is exactly 0
    assert torch.equal(last, torch.zeros_like(last))
    assert int(out.argmax[-1]) == 0
    torch.testing.assert_close(out.entropy[-1], torch.tensor(float(np.log(1000))))


def test_writes_into_the_given_buffer_and_refuses_bad_input():
    raw = make_table(300, 256, Q.Q8_0, 3)
    x = torch.randn(4, 256)
    buf = torch.full((4, 300), float("nan"))
    out = vocab_pass(x, raw, Q.Q8_0, CAP, torch.tensor(0.7), logits_out=buf)
    assert out.logits is buf and not buf.isnan().any()
    with pytest.raises(ValueError, match="bytes"):
        vocab_pass(torch.randn(4, 512), raw, Q.Q8_0, CAP)
    with pytest.raises(ValueError, match="logits_out"):
        vocab_pass(x, raw, Q.Q8_0, CAP, logits_out=torch.empty(4, 299))
    with pytest.raises(NotImplementedError, match="TQ1_0"):
        vocab_pass(x, raw, Q.TQ1_0, CAP)
