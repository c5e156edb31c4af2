"""engine.device_sampler against the reference loop (engine.generate + engine.sampler), and a guard
that fails when a step reads a value back to the host."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine import sampler as S
from engine.device_sampler import DeviceDenoiser, StepOutput, TorchStepper, device_generate, row_stats, sample
from engine.generate import ModelRunner, generate
from tests.engine.test_generate import EOS, PAD, NoisyModel, TargetModel, _target

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_draws_what_multinomial_draws():
    for seed in range(4):
        z = torch.randn(12, 1000, generator=torch.Generator().manual_seed(seed + 10)) * (1 + seed)
        g_ref, g_dev = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(S.sample(z, g_ref), sample(z, g_dev))
        assert torch.equal(g_ref.get_state(), g_dev.get_state())  # the generator is left where multinomial leaves it


def _trace(runs):
    return lambda s: runs.append((s.canvas_index, s.step, s.accepted_count, s.mean_entropy, s.temperature,
                                  s.argmax.tolist()))


def _both(make_model, prompt, check_every, **kw):
    """Run the reference loop and the device loop from the same seed; return both results, traces and
    the generators' final states."""
    out = []
    for fn, extra in ((generate, {}), (device_generate, {"check_every": check_every})):
        trace, gen = [], torch.Generator().manual_seed(0)
        res = fn(make_model(), prompt, generator=gen, on_step=_trace(trace), **kw, **extra)
        out.append((res, trace, gen.get_state()))
    return out


def _assert_same(ref, dev):
    (r, rt, rg), (d, dt, dg) = ref, dev
    assert torch.equal(r.tokens, d.tokens)
    assert r.steps_per_canvas == d.steps_per_canvas
    assert r.finished == d.finished
    assert rt == dt  # per step: accepted counts, mean entropy, temperature, draft
    assert torch.equal(rg, dg)  # draws of steps run past a stop were undone


@pytest.mark.parametrize("check_every", [1, 3, 7, 100])
@pytest.mark.parametrize("stability, confidence", [(1, 0.005), (2, 0.5), (0, 1.0)])
def test_same_run_as_reference_loop(check_every, stability, confidence):
    ref, dev = _both(NoisyModel, torch.tensor([3, 4, 5]), check_every, max_new_tokens=18, steps=20, eos_ids=(),
                     stability_threshold=stability, confidence_threshold=confidence)
    _assert_same(ref, dev)
    assert min(ref[0].steps_per_canvas) < 20  # canvases stop early: steps past the stop are exercised


def test_same_run_with_bf16_self_conditioning_and_early_stops():
    ref, dev = _both(lambda: NoisyModel(self_cond_dtype=torch.bfloat16, seed=9), torch.tensor([7, 1]), 4,
                     max_new_tokens=24, steps=12, eos_ids=(), confidence_threshold=0.8)
    _assert_same(ref, dev)


@pytest.mark.parametrize("check_every", [1, 5])
def test_same_run_with_eos_and_trim(check_every):
    target = _target(5, 16)
    target[5 + 4 + 1] = 106
    ref, dev = _both(lambda: TargetModel(target), target[:5], check_every, max_new_tokens=16, steps=12,
                     eos_ids=EOS, pad_id=PAD)
    _assert_same(ref, dev)
    assert dev[0].finished and dev[0].steps_per_canvas == [2, 2]


def test_same_run_on_the_tiny_engine_model(tiny_gguf):
    from engine.model import DiffusionGemmaModel

    model = DiffusionGemmaModel(tiny_gguf)
    prompt = torch.arange(5, 17)
    # a random tiny model is never sure of much: a wide bound, and stop on confidence alone
    ref, dev = _both(lambda: ModelRunner(model), prompt, 3, max_new_tokens=20, steps=8, eos_ids=(),
                     entropy_bound=8.0, stability_threshold=0, confidence_threshold=4.5)
    _assert_same(ref, dev)
    assert min(ref[0].steps_per_canvas) < 8 and max(s[2] for s in ref[1]) > 1


# ---- no host synchronization inside a step -------------------------------------------------

_SYNCING = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
            "masked_select", "unique")


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Any read of a tensor value by the host raises: torch.cuda's sync debug mode on CUDA, and on
    every device the Python-level conversions (which is where a sync would come from on this path)."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}
    saved_equal = torch.equal

    def refuse(name):
        def fn(*args, **kwargs):
            raise AssertionError(f"host sync inside a step: Tensor.{name}")
        return fn

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, refuse(name))
        torch.equal = refuse("equal")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.equal = saved_equal


class DeviceFake:
    """A sync-free step: logits from a fixed table, the canvas and the previous scaled logits."""

    def __init__(self, device, canvas_length=8, vocab=61):
        g = torch.Generator().manual_seed(3)
        self.table = (torch.randn(canvas_length, vocab, generator=g) * 3).to(device)
        self.device, self.canvas_length, self.vocab_size = device, canvas_length, vocab

    def encode(self, tokens):
        pass

    def denoise_step(self, canvas, carry, temperature, temp_value):
        logits = self.table.clone()
        logits.scatter_add_(1, canvas[:, None], torch.full_like(canvas[:, None], 2.0, dtype=logits.dtype))
        if carry is not None:
            logits += 2.0 * torch.softmax(carry, dim=-1)
        z = logits / temperature
        return StepOutput(z, *row_stats(z), z)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_a_step_never_reads_back_to_the_host(device, monkeypatch):
    device = torch.device(device)
    fake = DeviceFake(device)
    with pytest.raises(AssertionError, match="host sync"), no_host_sync(device):
        torch.tensor([1.0]).item()  # the guard works

    real_step = DeviceDenoiser.step
    steps_run = []

    def guarded(self, temp_value=None):
        with no_host_sync(device):
            real_step(self, None)  # as replayed from a graph: no Python float either
        steps_run.append(1)

    monkeypatch.setattr(DeviceDenoiser, "step", guarded)
    g = torch.Generator(device=device).manual_seed(0)
    res = device_generate(fake, torch.tensor([1, 2], device=device), max_new_tokens=16, steps=10, generator=g,
                          check_every=4, confidence_threshold=0.5)
    assert len(steps_run) >= sum(res.steps_per_canvas)


def test_steps_after_the_stop_change_nothing():
    den = DeviceDenoiser(DeviceFake("cpu"), vocab_size=61, canvas_length=8,
                         temperatures=S.temperature_schedule(6, 0.4, 0.8), entropy_bound=0.1, stability_threshold=1,
                         confidence_threshold=10.0, device="cpu", generator=torch.Generator().manual_seed(1))
    den.reset(torch.arange(8))
    den.step()
    den.step()  # stable needs a previous draft: stops at step 2 at the earliest
    st = den.state
    assert bool(st.stopped) and int(st.steps) == 2
    frozen = {k: v.clone() for k, v in vars(st).items() if k != "executed"}
    den.step()
    den.step()
    assert all(torch.equal(frozen[k], v) for k, v in vars(st).items() if k != "executed")
    assert int(st.executed) == 4


def test_torch_stepper_needs_a_float_for_decode_scaled():
    class Scaled:
        def decode_scaled(self, canvas, self_cond, temp):
            return torch.zeros(2, 3)

    with pytest.raises(ValueError, match="float"):
        TorchStepper(Scaled()).denoise_step(torch.zeros(2, dtype=torch.long), None, torch.tensor(0.5), None)


def test_rejects_bad_check_every():
    with pytest.raises(ValueError, match="check_every"):
        device_generate(NoisyModel(), torch.tensor([1]), check_every=0)
