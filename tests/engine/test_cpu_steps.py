"""engine.cpu_steps (the CPU step with the sampler's statistics from the vocabulary pass and the draw
for accepted rows only) against the reference: engine.sampler's multinomial draw and entropy, and
whole generations of engine.generate with its ReferenceStep on the tiny engine model."""

from __future__ import annotations

import pytest
import torch

from engine import sampler as S
from engine.cpu_steps import CpuFusedStep, VocabTable, exponential_words, race_draw
from engine.generate import ModelRunner, generate
from engine.model import DiffusionGemmaModel, rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exponential_words_are_what_exponential_draws():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    q = torch.empty(3, 100_003).exponential_(1, generator=g1)
    words = torch.empty(3, 100_003, dtype=torch.long).random_(generator=g2)
    assert torch.equal(exponential_words(words), q)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("seed", range(4))
def test_race_draw_is_multinomial_on_accepted_rows(seed):
    g = torch.Generator().manual_seed(100 + seed)
    rows, vocab = 11, 3001
    z = torch.randn(rows, vocab, generator=g) * (0.5 + 3 * seed)
    z[3, 7] = 60.0  # one confident row
    accepted = torch.rand(rows, generator=g) < (0.5 if seed < 3 else 1.0)
    accepted[0] = seed == 1  # runs of accepted and rejected rows at both ends
    g_ref, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ref = S.sample(z, g_ref)
    got = race_draw(lambda r0, r1: z[r0:r1], rows, vocab, accepted, g_new)
    assert torch.equal(got[accepted], ref[accepted])
    assert torch.equal(got[~accepted], torch.zeros_like(got[~accepted]))
    assert torch.equal(g_ref.get_state(), g_new.get_state())  # later draws (renoise) see the same stream


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf):
    return DiffusionGemmaModel(tiny_gguf)


def test_vocab_pass_statistics_match_the_sampler(tiny_model):
    m = tiny_model
    g = torch.Generator().manual_seed(0)
    x = rms_norm(torch.randn(16, m.spec.embedding_length, generator=g) * 3, m.w(m.output_norm), m.eps)
    x[4] = 0  # a full tie: argmax must be the first index
    for chunk in (m.vocab, 100, 7):  # one chunk, and the online merge across many
        m.vocab_chunk = chunk
        logits, _ = m.torch_vocab_pass(x, 0.6)
        z = S.scale_logits(logits, 0.6)
        st = m.last_row_stats
        assert torch.equal(st.argmax, z.argmax(-1))
        assert torch.equal(st.max, z.amax(-1))
        torch.testing.assert_close(st.logsumexp, z.logsumexp(-1), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(st.entropy, S.entropy(z), rtol=1e-5, atol=2e-6)


def test_vocab_table_gives_the_same_pass(tiny_model):
    m = tiny_model
    x = torch.randn(8, m.spec.embedding_length, generator=torch.Generator().manual_seed(1))
    m.vocab_chunk = 100
    ref = m.torch_vocab_pass(x, 0.7)
    m.vocab_table = VocabTable(m)
    try:
        got = m.torch_vocab_pass(x, 0.7)
    finally:
        m.vocab_table = None
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def _run(model, step: bool, table: bool = False, **kw):
    trace = []
    runner = ModelRunner(model)
    model.vocab_table = VocabTable(model) if table else None
    res = generate(runner, torch.arange(5, 17), generator=torch.Generator().manual_seed(kw.pop("seed", 0)),
                   on_step=lambda s: trace.append((s.canvas_index, s.step, s.accepted_count, s.mean_entropy,
                                                   s.argmax.tolist())),
                   sampler_step=CpuFusedStep(model, runner.cache) if step else None, **kw)
    model.vocab_table = None
    return res, trace


@pytest.mark.parametrize("seed, chunk, table", [(0, 1 << 20, False), (1, 97, True), (2, 97, False)])
def test_same_generation_as_the_reference_loop(tiny_model, seed, chunk, table):
    tiny_model.vocab_chunk = chunk
    # a random tiny model is never sure of much: a wide bound, so that several rows are accepted
    kw = dict(max_new_tokens=24, steps=6, eos_ids=(), entropy_bound=8.0, stability_threshold=0,
              confidence_threshold=4.5, seed=seed)
    (ref, ref_trace), (got, got_trace) = _run(tiny_model, False, **kw), _run(tiny_model, True, table, **kw)
    assert torch.equal(ref.tokens, got.tokens)
    assert ref.steps_per_canvas == got.steps_per_canvas
    assert [t[:3] + t[4:] for t in ref_trace] == [t[:3] + t[4:] for t in got_trace]  # drafts, accepted counts
    torch.testing.assert_close(torch.tensor([t[3] for t in got_trace]), torch.tensor([t[3] for t in ref_trace]))
    assert max(t[2] for t in ref_trace) > 1 and min(ref.steps_per_canvas) < 6


def test_needs_the_torch_pass(tiny_model):
    class Other:
        name = "triton"

    saved = tiny_model.ops
    tiny_model.ops = Other()
    try:
        with pytest.raises(ValueError, match="torch vocabulary pass"):
            CpuFusedStep(tiny_model, tiny_model.new_cache())
    finally:
        tiny_model.ops = saved


@pytest.mark.parametrize("bound", [None, 6.0])
def test_run_takes_the_fused_step_on_the_cpu_and_draws_the_same(tiny_gguf, monkeypatch, bound):
    import engine.run as run

    opts = dict(max_new_tokens=40, steps=5, seed=3, raw=True, device="cpu", entropy_bound=bound)
    used = []
    monkeypatch.setattr("engine.cpu_steps.CpuFusedStep.__call__",
                        lambda self, *a, _call=CpuFusedStep.__call__: used.append(1) or _call(self, *a))
    fast = run.run_prompt(tiny_gguf, "hello there", run.RunOptions(**opts))
    assert used
    monkeypatch.setattr(run, "CPU_FUSED_STEP", False)
    used.clear()
    ref = run.run_prompt(tiny_gguf, "hello there", run.RunOptions(**opts))
    assert not used
    assert fast.token_ids == ref.token_ids and fast.steps_per_canvas == ref.steps_per_canvas


def test_bf16_table_stays_within_its_rounding_bound(tiny_model):
    """A bf16 compute copy rounds x and the table (unit roundoff u = 2^-9 each) and each chunk's
    product (u again); fp32 accumulation adds K * 2^-24. The softcap is 1-Lipschitz, so each capped
    logit moves at most (2u + u^2 + K 2^-24) sum|x_i w_i| + u (|y| + that), y the fp32 product. The
    soft embedding is checked against softmax of the pass's own logits @ E, the statistics likewise."""
    m = tiny_model
    m.vocab_chunk = 100
    x = rms_norm(torch.randn(12, m.spec.embedding_length, generator=torch.Generator().manual_seed(4)) * 2,
                 m.w(m.output_norm), m.eps)
    ref, ref_soft = m.torch_vocab_pass(x, 0.5)
    ref_stats = m.last_row_stats
    m.vocab_table = VocabTable(m, torch.bfloat16)
    try:
        got, got_soft = m.torch_vocab_pass(x, 0.5)
        got_stats = m.last_row_stats
    finally:
        m.vocab_table = None
    table = m.weights.row_range(m.token_embd, 0, m.vocab)
    u, k = 2.0 ** -9, x.shape[1]
    dots = x.abs() @ table.abs().T
    product_err = (2 * u + u * u + k * 2.0 ** -24) * dots
    bound = product_err + u * ((x @ table.T).abs() + product_err)
    assert ((got - ref).abs() <= bound).all()
    assert (bound.mean() / (x @ table.T).abs().mean()) < 0.05  # the bound says something
    # the soft embedding of those logits: p and the table rounded (u each), each chunk's sum (u)
    p = torch.softmax(got / 0.5, dim=-1)
    soft_bound = (3 * u + u * u + m.vocab * 2.0 ** -24) * (p @ table.abs())
    assert ((got_soft - p @ table).abs() <= soft_bound + 1e-6).all()
    assert torch.equal(got_stats.argmax, (got / 0.5).argmax(-1))
    torch.testing.assert_close(got_stats.entropy, S.entropy(got / 0.5), rtol=1e-5, atol=2e-6)
    assert ref_stats.entropy.shape == got_stats.entropy.shape and not torch.equal(got, ref)


def test_the_compute_copy_run_asks_for(monkeypatch, tmp_path):
    import types

    from engine import cpu_steps

    made = []
    monkeypatch.setattr(cpu_steps, "VocabTable", type("Stub", (), {
        "__init__": lambda self, model, dtype: made.append(dtype), "nbytes": staticmethod(VocabTable.nbytes)}))

    def model(qtype, device="cpu", dtype=torch.float32):
        info = types.SimpleNamespace(qtype=types.SimpleNamespace(name=qtype))
        return types.SimpleNamespace(device=torch.device(device), dtype=dtype, vocab=1000, token_embd="t",
                                     spec=types.SimpleNamespace(embedding_length=100),
                                     weights=types.SimpleNamespace(info=lambda name: info))

    big = 1 << 40
    for native in (True, False):
        monkeypatch.setattr(cpu_steps, "bf16_matmul_is_native", lambda native=native: native)
        made.clear()
        assert cpu_steps.cpu_vocab_table(model("F16"), big) is None  # cheap to dequantize: no exact copy
        cpu_steps.cpu_vocab_table(model("Q6_K"), big)
        cpu_steps.cpu_vocab_table(model("F16"), big, bf16=True)
        assert made == ([torch.float32, torch.bfloat16] if native else [torch.float32])
    monkeypatch.setattr(cpu_steps, "bf16_matmul_is_native", lambda: True)
    made.clear()
    assert cpu_steps.cpu_vocab_table(model("Q6_K"), 2 * 1000 * 100 * 2 - 1, True) is None  # over half the RAM
    assert not made
    assert cpu_steps.cpu_vocab_table(model("Q6_K"), big, True) is not None and made == [torch.bfloat16]
    assert cpu_steps.cpu_vocab_table(model("Q6_K", dtype=torch.bfloat16), big) is None
    assert cpu_steps.cpu_vocab_table(model("Q6_K"), None) is None
    # the model file has to stay in the page cache: only what is left after it counts
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(300_000))
    m = model("Q6_K")
    m.weights.path = path
    made.clear()
    assert cpu_steps.cpu_vocab_table(m, 300_000 + 2 * 400_000 - 1) is None and not made
    assert cpu_steps.cpu_vocab_table(m, 300_000 + 2 * 400_000) is not None and made == [torch.float32]


def test_run_never_computes_prompt_logits(tiny_gguf, monkeypatch):
    """Prefill (the prompt and each committed canvas) only fills the KV cache: no vocabulary pass
    without a temperature, i.e. no logits that would be thrown away."""
    import engine.run as run

    passes = []
    real = DiffusionGemmaModel.torch_vocab_pass
    monkeypatch.setattr(DiffusionGemmaModel, "torch_vocab_pass",
                        lambda self, x, t: passes.append((x.shape[0], t)) or real(self, x, t))
    canvases = 0
    for seed in range(4):  # some runs stop at an end token; others encode committed canvases as context too
        passes.clear()
        res = run.run_prompt(tiny_gguf, "hello there", run.RunOptions(max_new_tokens=40, steps=3, seed=seed,
                                                                      raw=True, device="cpu"))
        assert passes and all(t is not None for _, t in passes)
        assert len(passes) == sum(res.steps_per_canvas)
        canvases = max(canvases, len(res.steps_per_canvas))
    assert canvases > 1
