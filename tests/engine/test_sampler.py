"""engine.sampler against transformers' own DiffusionGemma sampling code on identical inputs."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from engine import sampler as S

hf = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
from transformers.generation import EosTokenCriteria, StoppingCriteriaList


def _hf_sampler(bound: float, canvas_length: int, vocab: int, steps: int = 48):
    cfg = hf.EntropyBoundSamplerConfig(entropy_bound=bound)
    return hf.EntropyBoundSampler(
        config=cfg, canvas_length=canvas_length, vocab_size=vocab, max_denoising_steps=steps
    )


def _hf_mask(logits: torch.Tensor, bound: float) -> torch.Tensor:
    c, v = logits.shape
    smp = _hf_sampler(bound, c, v)
    cur = torch.zeros(1, c, dtype=torch.long)
    smp.accept_canvas(cur, cur + 1, logits[None], cur_step=1)
    return smp.accepted_token_mask[0]


def _hf_entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits[None]).entropy()[0]


# ---------------------------------------------------------------------------------------------
# temperature


@pytest.mark.parametrize("n_steps", [1, 2, 3, 7, 16, 48, 100])
@pytest.mark.parametrize(("t_min", "t_max"), [(0.4, 0.8), (0.0, 1.0), (0.1, 0.3), (0.7, 1.9)])
def test_temperature_scaling_bit_identical(n_steps, t_min, t_max):
    proc = hf.LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=n_steps)
    logits = torch.randn(1, 5, 33, generator=torch.Generator().manual_seed(n_steps)) * 10
    sched = S.temperature_schedule(n_steps, t_min, t_max)
    # The reference loops over steps remaining, N down to 1, and passes it as an int32 tensor.
    for temp, step_remaining in zip(sched, range(n_steps, 0, -1), strict=True):
        ref = proc(None, logits, cur_step=torch.tensor(step_remaining, dtype=torch.int32))
        assert torch.equal(S.scale_logits(logits, temp), ref)
        assert temp == S.temperature(step_remaining, n_steps, t_min, t_max)
    assert len(sched) == n_steps
    assert sched[0] == pytest.approx(t_max)
    assert sched[-1] == pytest.approx(t_min + (t_max - t_min) / n_steps)
    assert all(a >= b for a, b in itertools.pairwise(sched))


def test_temperature_rejects_bad_step():
    with pytest.raises(ValueError):
        S.temperature(0, 4, 0.4, 0.8)
    with pytest.raises(ValueError):
        S.temperature(5, 4, 0.4, 0.8)


# ---------------------------------------------------------------------------------------------
# entropy


def _logit_cases():
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(9, 500, generator=g) * 3
    peaked = torch.randn(6, 500, generator=g)
    peaked[torch.arange(6), torch.arange(6) * 7] += torch.tensor([5.0, 20.0, 60.0, 200.0, 1e4, 3.0])
    with_inf = torch.randn(4, 500, generator=g)
    with_inf[:, 100:] = float("-inf")
    with_inf[3, :] = float("-inf")
    with_inf[3, 42] = 1.5  # a single finite logit: entropy exactly 0
    huge_range = torch.randn(3, 500, generator=g) * 1e4
    return {"random": rnd, "peaked": peaked, "neg_inf": with_inf, "huge_range": huge_range}


@pytest.mark.parametrize("name", list(_logit_cases()))
@pytest.mark.parametrize("chunk_rows", [2, 3, 8, 1000])
def test_entropy_bit_identical_to_categorical(name, chunk_rows):
    logits = _logit_cases()[name]
    got = S.entropy(logits, chunk_rows=chunk_rows)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert torch.equal(got, _hf_entropy(logits))


def test_entropy_full_vocab_bit_identical():
    # Real vocabulary size: large enough that torch's reductions run multi-threaded.
    logits = torch.randn(11, 262_144, generator=torch.Generator().manual_seed(1)) * 4
    logits[2, 5:] = float("-inf")
    assert torch.equal(S.entropy(logits), _hf_entropy(logits))


def test_entropy_rejects_single_row_chunks():
    with pytest.raises(ValueError):
        S.entropy(torch.zeros(4, 8), chunk_rows=1)


def test_entropy_values():
    uniform = torch.zeros(2, 64)
    assert torch.allclose(S.entropy(uniform), torch.full((2,), torch.log(torch.tensor(64.0)).item()))
    one_hot = torch.full((3, 64), float("-inf"))
    one_hot[:, 3] = 0.0
    assert torch.equal(S.entropy(one_hot), torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# entropy-bound acceptance


def _mask_cases():
    g = torch.Generator().manual_seed(2)
    cases = {}
    for scale in (0.5, 2.0, 6.0, 15.0):
        cases[f"random_x{scale}"] = torch.randn(32, 200, generator=g) * scale
    peaked = torch.randn(32, 200, generator=g)
    peaked[torch.arange(32), torch.randint(0, 200, (32,), generator=g)] += torch.linspace(0, 14, 32)
    cases["peaked"] = peaked
    # Ties: many positions share identical rows, so equal entropies straddle the bound and the
    # sort's tie order decides which positions get in.
    rows = torch.randn(4, 200, generator=g) * 3
    rows[0, 0] += 9
    rows[1, 1] += 6
    cases["ties"] = rows[torch.randint(0, 4, (40,), generator=g)]
    cases["all_tied"] = rows[1].expand(25, 200).clone()
    zero = torch.full((20, 200), float("-inf"))
    zero[:, 0] = 0.0
    zero[5:9] = torch.randn(4, 200, generator=g)
    cases["zero_entropy"] = zero
    return cases


@pytest.mark.parametrize("name", list(_mask_cases()))
@pytest.mark.parametrize("bound", [1e-4, 0.1, 0.5, 3.0, 50.0])
def test_accept_mask_matches_reference(name, bound):
    logits = _mask_cases()[name]
    got = S.entropy_bound_accept(logits, bound)
    ref = _hf_mask(logits, bound)
    assert got.dtype == torch.bool
    assert torch.equal(got, ref)
    # A lowest-entropy position is always accepted (with ties, the sort decides which one).
    h = S.entropy(logits)
    assert got[h == h.min()].any()
    if name in ("ties", "all_tied") and bound < 50.0:
        # Make sure the case really has tied entropies on both sides of the cut.
        assert (h[got, None] == h[None, ~got]).any()


def test_accept_mask_prefix_rule():
    h = torch.tensor([0.3, 0.01, 0.05, 2.0, 0.02])
    # sorted: .01 .02 .05 .3 2 -> cumsum-current: 0, .01, .03, .08, .38
    assert S.entropy_bound_mask(h, 0.1).tolist() == [True, True, True, False, True]
    assert S.entropy_bound_mask(h, 0.02).tolist() == [False, True, False, False, True]


# ---------------------------------------------------------------------------------------------
# renoise / sampling RNG use


@pytest.mark.parametrize("seed", [0, 7])
def test_renoise_matches_reference_rng(seed):
    c, v = 24, 1000
    g = torch.Generator().manual_seed(99)
    logits = torch.randn(c, v, generator=g) * 4
    current = torch.randint(0, v, (c,), generator=g)
    sampled = torch.randint(0, v, (c,), generator=g)
    smp = _hf_sampler(0.3, c, v)
    accepted_canvas = smp.accept_canvas(current[None], sampled[None], logits[None], cur_step=1)
    torch.manual_seed(seed)
    ref = smp.renoise_canvas(accepted_canvas, cur_step=1)[0]
    mask = S.entropy_bound_accept(logits, 0.3)
    got = S.renoise(current, mask, sampled, v, torch.Generator().manual_seed(seed))
    assert torch.equal(got, ref)
    assert torch.equal(got[mask], sampled[mask])


def test_random_canvas_matches_reference_init():
    smp = _hf_sampler(0.1, 17, 5000)
    torch.manual_seed(3)
    ref = smp.initialize_canvas(batch_size=1, device=torch.device("cpu"))[0]
    assert torch.equal(S.random_canvas(17, 5000, torch.Generator().manual_seed(3)), ref)


def test_sample_matches_reference_multinomial():
    logits = torch.randn(9, 3000, generator=torch.Generator().manual_seed(4)) * 3
    # What the reference's denoising step does with the processed logits of a (1, C, V) batch.
    torch.manual_seed(11)
    probs = torch.softmax(logits[None], dim=-1, dtype=torch.float32)
    ref = torch.multinomial(probs.view(-1, 3000), num_samples=1).squeeze(-1)
    assert torch.equal(S.sample(logits, torch.Generator().manual_seed(11)), ref)


def test_sample_follows_distribution():
    logits = torch.full((4, 10), float("-inf"))
    logits[:, 3] = 0.0
    logits[1, 7] = 0.0
    draws = torch.stack([S.sample(logits, torch.Generator().manual_seed(s)) for s in range(200)])
    assert (draws[:, [0, 2, 3]] == 3).all()
    assert set(draws[:, 1].tolist()) == {3, 7}


# ---------------------------------------------------------------------------------------------
# stopping


def _stop_sequence(seed: int, length: int = 14, c: int = 6, v: int = 30):
    """Argmax canvases that repeat in runs, with logits alternating between confident/unsure."""
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, v, (c,), generator=g) for _ in range(3)]
    seq = []
    for _ in range(length):
        canvas = pool[int(torch.randint(0, 3, (1,), generator=g))]
        if torch.rand(1, generator=g) < 0.15:  # one-position change
            canvas = canvas.clone()
            canvas[0] = (canvas[0] + 1) % v
        sharp = float(torch.rand(1, generator=g)) < 0.6
        logits = torch.randn(c, v, generator=g)
        logits[torch.arange(c), canvas] += 25.0 if sharp else 2.0
        seq.append((canvas, logits))
    return seq


@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_stopping_matches_reference(threshold, seed):
    ref = hf.StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.005)
    ours = S.StoppingState(threshold, 0.005)
    decisions = []
    for canvas, logits in _stop_sequence(seed):
        want = bool(ref(canvas[None], logits[None])[0])
        got = ours.update(canvas, S.entropy(logits))
        assert got == want
        decisions.append(got)
    # reset() starts a fresh history on both sides
    ref.reset()
    ours.reset()
    canvas, logits = _stop_sequence(seed)[0]
    assert ours.update(canvas, S.entropy(logits)) == bool(ref(canvas[None], logits[None])[0])


def test_stopping_semantics():
    c = torch.tensor([1, 2, 3])
    sure = torch.zeros(3)
    st = S.StoppingState(2, 0.005)
    assert not st.update(c, sure)  # history is all -1
    assert not st.update(c, sure)  # one real match, one -1 left
    assert st.update(c, sure) and st.converged
    assert not st.update(torch.tensor([1, 2, 4]), sure)
    assert not st.update(torch.tensor([1, 2, 4]), torch.full((3,), 0.01))  # stable-ish but unsure
    zero = S.StoppingState(0, 0.005)
    assert zero.update(c, sure) and zero.stable
    budget = S.StoppingState(1, 0.005, max_steps=2)
    assert not budget.update(c, torch.ones(3))
    assert budget.update(torch.tensor([9, 9, 9]), torch.ones(3)) and not budget.converged


# ---------------------------------------------------------------------------------------------
# commit


EOS = [1, 106, 50]


def _hf_commit(canvas: torch.Tensor, eos_ids, pad_id):
    prompt = torch.tensor([[2, 7, 7]])
    input_ids = torch.cat([prompt, canvas[None]], dim=-1)
    cfg = SimpleNamespace(pad_token_id=pad_id, eos_token_id=eos_ids)
    crit = StoppingCriteriaList([EosTokenCriteria(eos_ids)] if eos_ids else [])
    eos_tensor = torch.tensor(eos_ids) if eos_ids else None
    out, fin = hf.DiffusionGemmaGenerationMixin._finalize_canvas(
        input_ids=input_ids,
        finished_sequences=torch.zeros(1, dtype=torch.bool),
        generation_config=cfg,
        stopping_criteria=crit,
        canvas_length=canvas.numel(),
        eos_tensor=eos_tensor,
    )
    return out[0, prompt.shape[1] :], bool(fin[0])


@pytest.mark.parametrize(
    "canvas",
    [
        [5, 6, 7, 8, 9, 10],
        [5, 106, 7, 8, 9, 10],
        [1, 6, 7, 8, 9, 10],
        [5, 6, 7, 8, 9, 50],
        [5, 50, 7, 1, 106, 10],
        [106, 106, 106, 0, 0, 3],
    ],
)
@pytest.mark.parametrize("pad_id", [0, 3, None])
def test_commit_matches_reference(canvas, pad_id):
    canvas = torch.tensor(canvas)
    tokens, finished = S.commit(canvas, EOS, pad_id)
    ref_tokens, ref_finished = _hf_commit(canvas.clone(), EOS, pad_id)
    assert torch.equal(tokens, ref_tokens)
    assert finished == ref_finished
    assert torch.equal(canvas, canvas.clone())  # input untouched


def test_commit_without_eos_ids():
    canvas = torch.tensor([1, 106, 3])
    tokens, finished = S.commit(canvas, [], 0)
    assert torch.equal(tokens, canvas) and not finished


def test_commit_pads_after_first_eos():
    tokens, finished = S.commit(torch.tensor([4, 4, 106, 4, 1, 4]), EOS, 0)
    assert finished and tokens.tolist() == [4, 4, 106, 0, 0, 0]
