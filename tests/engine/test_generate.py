"""engine.generate with fake models, and against transformers' generate loop driven by the same fake."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.generate import DEFAULTS, GenerationResult, ModelRunner, StepInfo, generate

EOS = (1, 106, 50)
PAD = 0


class TargetModel:
    """Logits strongly favour ``target[absolute position]`` regardless of the canvas, so denoising
    converges in two steps (the first can never be stable); records every call."""

    def __init__(self, target, canvas_length=4, vocab_size=300, margin=40.0):
        self.target = torch.as_tensor(target)
        self.canvas_length = canvas_length
        self.vocab_size = vocab_size
        self.margin = margin
        self.context: list[int] = []
        self.encode_calls: list[list[int]] = []
        self.decode_calls: list[tuple[int, bool]] = []  # (position, self_cond given)

    def encode(self, tokens):
        self.encode_calls.append(tokens.tolist())
        self.context.extend(tokens.tolist())

    def decode(self, canvas, self_cond):
        pos = len(self.context)
        self.decode_calls.append((pos, self_cond is not None))
        assert canvas.shape == (self.canvas_length,) and canvas.dtype == torch.long
        assert ((canvas >= 0) & (canvas < self.vocab_size)).all()
        if self_cond is not None:
            assert self_cond.shape == (self.canvas_length, self.vocab_size)
        logits = torch.zeros(self.canvas_length, self.vocab_size)
        idx = self.target[pos : pos + self.canvas_length]
        logits[torch.arange(self.canvas_length), idx] = self.margin
        return logits


def _target(n_prompt, n_new, vocab=300, seed=0, avoid=EOS + (PAD,)):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(2, vocab, (n_prompt + n_new + 64,), generator=g)
    for tok in avoid:
        t[t == tok] = 7
    return t


def _gen(model, prompt, **kw):
    args = {
        "max_new_tokens": 8,
        "steps": 12,
        "eos_ids": EOS,
        "pad_id": PAD,
        "generator": torch.Generator().manual_seed(0),
    }
    args.update(kw)
    return generate(model, prompt, **args)


def test_converges_to_target_and_reencodes_committed_canvases():
    target = _target(5, 12)
    model = TargetModel(target)
    prompt = target[:5]
    res = _gen(model, prompt, max_new_tokens=12)
    assert isinstance(res, GenerationResult)
    assert torch.equal(res.tokens, target[5:17])
    assert not res.finished
    assert res.steps_per_canvas == [2, 2, 2]  # step 1 never stable; step 2 stable and confident
    # prompt once, then each committed canvas except the last
    assert model.encode_calls == [prompt.tolist(), target[5:9].tolist(), target[9:13].tolist()]
    # decode positions follow the context; self-conditioning only after a canvas's first step
    assert model.decode_calls == [(5, False), (5, True), (9, False), (9, True), (13, False), (13, True)]


def test_trims_to_max_new_tokens():
    target = _target(3, 12)
    model = TargetModel(target)
    res = _gen(model, target[:3], max_new_tokens=10)  # ceil(10/4) = 3 canvases
    assert res.tokens.shape == (10,)
    assert torch.equal(res.tokens, target[3:13])
    assert len(res.steps_per_canvas) == 3
    assert len(model.encode_calls) == 3


def test_single_canvas_is_never_encoded():
    target = _target(4, 4)
    model = TargetModel(target)
    res = _gen(model, target[:4], max_new_tokens=3)
    assert res.tokens.tolist() == target[4:7].tolist()
    assert model.encode_calls == [target[:4].tolist()]


def test_eos_pads_rest_and_stops():
    target = _target(5, 16)
    target[5 + 4 + 1] = 106  # second canvas, second position
    model = TargetModel(target)
    seen = []
    res = _gen(model, target[:5], max_new_tokens=16, on_canvas=lambda i, t: seen.append((i, t.tolist())))
    assert res.finished
    assert res.tokens.tolist() == target[5:9].tolist() + [target[9].item(), 106, PAD, PAD]
    assert len(res.steps_per_canvas) == 2
    assert len(model.encode_calls) == 2  # prompt + first canvas; the finished canvas is not encoded
    assert seen == [(0, target[5:9].tolist()), (1, res.tokens[4:].tolist())]


def test_eos_without_pad_id_keeps_tokens():
    target = _target(2, 8)
    target[2 + 1] = 1
    res = _gen(TargetModel(target), target[:2], pad_id=None)
    assert res.finished
    assert res.tokens.tolist() == target[2:6].tolist()


def test_eos_past_trim_point_is_not_reported():
    target = _target(2, 8)
    target[2 + 4 + 3] = 50  # last position of the 2nd canvas, cut by max_new_tokens=7
    res = _gen(TargetModel(target), target[:2], max_new_tokens=7)
    assert res.tokens.tolist() == target[2:9].tolist()
    assert not res.finished


def test_callbacks():
    target = _target(3, 8)
    steps: list[StepInfo] = []
    canvases = []
    res = _gen(
        TargetModel(target), target[:3], on_step=steps.append, on_canvas=lambda i, t: canvases.append((i, t))
    )
    assert [(s.canvas_index, s.step) for s in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(s.accepted_count == 4 for s in steps)  # every position is near-certain
    assert all(0 <= s.mean_entropy < 1e-3 for s in steps)
    assert steps[0].temperature == pytest.approx(0.8) and steps[1].temperature < steps[0].temperature
    assert torch.equal(steps[-1].argmax, target[7:11])
    assert [i for i, _ in canvases] == [0, 1]
    assert torch.equal(torch.cat([t for _, t in canvases]), res.tokens)


def test_out_of_steps_when_never_confident():
    target = _target(3, 4)
    model = TargetModel(target, margin=1.0)  # high entropy: never confident
    res = _gen(model, target[:3], max_new_tokens=4, steps=5)
    assert res.steps_per_canvas == [5]
    assert len(model.decode_calls) == 5


class NoisyModel:
    """Deterministic but uncertain: logits depend on the context, the canvas and the
    self-conditioning input, so the sampler's randomness decides the outcome."""

    def __init__(self, canvas_length=6, vocab_size=97, self_cond_dtype=None, seed=5):
        self.canvas_length = canvas_length
        self.vocab_size = vocab_size
        self.self_cond_dtype = self_cond_dtype
        self.context: list[int] = []
        self.encode_calls: list[list[int]] = []
        self.decode_calls = 0
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(64, vocab_size, generator=g) * 2.5
        self.copy_bias = 1.5

    def encode(self, tokens):
        self.encode_calls.append(tokens.tolist())
        self.context.extend(tokens.tolist())

    def decode(self, canvas, self_cond):
        self.decode_calls += 1
        return fake_logits(self.table, self.copy_bias, self.context, canvas, self_cond)


def fake_logits(table, copy_bias, context, canvas, self_cond):
    """Shared by our fake model and the transformers stub, so both see the same function."""
    c, v = canvas.shape[-1], table.shape[-1]
    pos = len(context)
    rows = (torch.arange(pos, pos + c) * 7 + sum(context) * 3) % table.shape[0]
    logits = table[rows].clone()
    logits[torch.arange(c), canvas] += copy_bias  # the canvas matters
    target = (torch.arange(pos, pos + c) * 13 + 5) % v
    logits[torch.arange(c), target] += 4.0
    if self_cond is not None:
        logits += 3.0 * torch.softmax(self_cond.float(), dim=-1)
    return logits.float()


def test_reproducible_for_a_seed():
    def run(seed):
        trace = []
        res = _gen(
            NoisyModel(),
            torch.tensor([3, 4, 5]),
            max_new_tokens=18,
            steps=20,
            eos_ids=(),
            generator=torch.Generator().manual_seed(seed),
            on_step=lambda s: trace.append((s.canvas_index, s.step, s.accepted_count, s.mean_entropy)),
        )
        return res, trace

    (a, ta), (b, tb), (_c, tc) = run(1), run(1), run(2)
    assert torch.equal(a.tokens, b.tokens) and a.steps_per_canvas == b.steps_per_canvas
    assert ta == tb
    # The seed drives the initial canvas, the draws and the renoising, so the trajectory differs.
    assert ta != tc


def test_validation():
    model = TargetModel(_target(1, 4))
    for bad in (
        {"max_new_tokens": 0},
        {"steps": 0},
        {"entropy_bound": 0.0},
        {"t_min": 0.9, "t_max": 0.8},
        {"t_min": -0.1},
        {"stability_threshold": -1},
        {"confidence_threshold": 0.0},
    ):
        with pytest.raises(ValueError):
            _gen(model, torch.tensor([1]), **bad)
    with pytest.raises(ValueError):
        _gen(model, torch.tensor([[1, 2]]))


def test_defaults_match_reference_generation_config():
    hf = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
    ref = hf.DiffusionGemmaGenerationConfig._get_default_generation_params()
    assert DEFAULTS["max_new_tokens"] == ref["max_new_tokens"]
    assert DEFAULTS["steps"] == ref["max_denoising_steps"]
    assert DEFAULTS["entropy_bound"] == ref["sampler_config"].entropy_bound
    for k in ("t_min", "t_max", "stability_threshold", "confidence_threshold"):
        assert DEFAULTS[k] == ref[k]


# ---------------------------------------------------------------------------------------------
# ModelRunner


class CacheModel:
    """Shaped like the engine model: explicit cache argument, config object for sizes."""

    def __init__(self):
        self.config = SimpleNamespace(vocab_size=50, canvas_length=3)
        self.calls = []

    def encode(self, tokens, cache):
        self.calls.append(("encode", tokens.tolist(), cache))

    def decode(self, canvas, cache, self_cond_logits=None):
        self.calls.append(("decode", canvas.shape, cache, self_cond_logits is not None))
        logits = torch.zeros(3, 50)
        logits[:, 9] = 50.0
        return logits


def test_model_runner_binds_cache():
    model = CacheModel()
    cache = object()
    runner = ModelRunner(model, cache)
    assert (runner.vocab_size, runner.canvas_length) == (50, 3)
    res = generate(
        runner, torch.tensor([2, 3]), max_new_tokens=6, steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert res.tokens.tolist() == [9] * 6
    assert model.calls[0] == ("encode", [2, 3], cache)
    assert ("encode", [9, 9, 9], cache) in model.calls
    decodes = [c for c in model.calls if c[0] == "decode"]
    assert all(c[2] is cache for c in decodes)
    assert [c[3] for c in decodes] == [False, True, False, True]


def test_model_runner_without_cache_and_explicit_sizes():
    class Plain:
        def __init__(self):
            self.got = []

        def encode(self, tokens):
            self.got.append(tokens.tolist())

        def decode(self, canvas, self_cond):
            return torch.zeros(canvas.shape[0], 11)

    runner = ModelRunner(Plain(), vocab_size=11, canvas_length=2)
    runner.encode(torch.tensor([1]))
    assert runner.decode(torch.tensor([0, 1]), None).shape == (2, 11)
    with pytest.raises(AttributeError):
        ModelRunner(Plain())


class EngineShapedModel:
    """Mirrors engine.model.DiffusionGemmaModel's surface: ``vocab``, ``spec``, ``dtype``,
    ``new_cache()``, ``encode(tokens, cache, return_logits=False)`` and
    ``decode(canvas, cache, self_cond_logits=None, start_pos=None)``."""

    def __init__(self, dtype=torch.bfloat16):
        self.vocab = 40
        self.spec = SimpleNamespace(vocab_size=40, canvas_length=4)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.self_cond_dtypes = []

    def new_cache(self):
        return SimpleNamespace(length=0)

    def encode(self, tokens, cache, return_logits=False, chunk_size=None):
        cache.length += tokens.numel()

    def decode(self, canvas, cache, self_cond_logits=None, start_pos=None):
        self.self_cond_dtypes.append(None if self_cond_logits is None else self_cond_logits.dtype)
        logits = torch.zeros(4, 40)
        logits[torch.arange(4), (torch.arange(4) + cache.length) % 40] = 60.0
        return logits


def test_model_runner_on_engine_shaped_model():
    model = EngineShapedModel()
    runner = ModelRunner(model)
    assert (runner.vocab_size, runner.canvas_length) == (40, 4)
    assert runner.self_cond_dtype == torch.bfloat16 and runner.cache.length == 0
    res = generate(
        runner, torch.arange(3), max_new_tokens=8, steps=5, generator=torch.Generator().manual_seed(0)
    )
    assert res.tokens.tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    assert runner.cache.length == 3 + 4  # the last canvas is not encoded
    assert model.self_cond_dtypes == [None, torch.bfloat16, None, torch.bfloat16]
    assert ModelRunner(EngineShapedModel(torch.float32)).self_cond_dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Whole-loop parity with transformers' DiffusionGemmaGenerationMixin.generate


def _hf_stub_class():
    hf = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")

    class StubCache:
        is_compileable = False

        def get_seq_length(self):
            return 0

    class StubEncoder:
        def __init__(self, owner):
            self.owner = owner

        def create_masks_for_generate(self, **kwargs):
            return None

        def __call__(self, input_ids, attention_mask, past_key_values, position_ids, **kwargs):
            assert input_ids.shape[0] == 1
            # Positions must continue the context, as our engine's encode assumes.
            assert position_ids[0].tolist() == list(
                range(len(self.owner.context), len(self.owner.context) + input_ids.shape[1])
            )
            self.owner.encode_calls.append(input_ids[0].tolist())
            self.owner.context.extend(input_ids[0].tolist())
            return SimpleNamespace(past_key_values=past_key_values)

    class HFStub(hf.DiffusionGemmaGenerationMixin):
        """Just enough of DiffusionGemmaForBlockDiffusion for the reference generate loop."""

        def __init__(self, fake: NoisyModel, embed_dtype=torch.float32):
            self.fake = fake
            self.context: list[int] = []
            self.encode_calls: list[list[int]] = []
            self.decode_calls = 0
            self.config = SimpleNamespace(
                canvas_length=fake.canvas_length,
                text_config=SimpleNamespace(vocab_size=fake.vocab_size),
                image_token_id=-12345,
            )
            self.generation_config = hf.DiffusionGemmaGenerationConfig()
            self.dtype = torch.float32
            decoder = SimpleNamespace(
                create_diffusion_decoder_attention_mask=lambda **kw: None,
                embed_tokens=SimpleNamespace(weight=torch.zeros(1, dtype=embed_dtype)),
            )
            self.model = SimpleNamespace(encoder=StubEncoder(self), decoder=decoder)

        def forward(
            self,
            decoder_input_ids,
            self_conditioning_logits,
            decoder_attention_mask,
            past_key_values,
            decoder_position_ids,
            **kwargs,
        ):
            assert decoder_position_ids[0, 0].item() == len(self.context)
            self.decode_calls += 1
            sc = None if self_conditioning_logits is None else self_conditioning_logits[0]
            logits = fake_logits(self.fake.table, self.fake.copy_bias, self.context, decoder_input_ids[0], sc)
            return SimpleNamespace(logits=logits[None])

    return hf, HFStub, StubCache


@pytest.mark.parametrize(
    ("seed", "cfg"),
    [
        (0, {}),
        (1, {"max_new_tokens": 24, "steps": 10, "entropy_bound": 0.5}),
        (2, {"stability_threshold": 2, "confidence_threshold": 0.05, "t_min": 0.2, "t_max": 1.3}),
        (3, {"stability_threshold": 0, "entropy_bound": 2.0, "steps": 6}),
        (4, {"eos": True}),
        (5, {"self_cond_dtype": torch.bfloat16}),
        # Real-vocab-sized reductions run multi-threaded; a loose confidence threshold lets it stop early.
        (
            6,
            {
                "vocab_size": 40_000,
                "canvas_length": 8,
                "max_new_tokens": 16,
                "steps": 8,
                "confidence_threshold": 50.0,
            },
        ),
    ],
)
def test_matches_transformers_generate(seed, cfg):
    hf, HFStub, StubCache = _hf_stub_class()
    cfg = dict(cfg)
    vocab = cfg.pop("vocab_size", 97)
    canvas_length = cfg.pop("canvas_length", 6)
    sc_dtype = cfg.pop("self_cond_dtype", None)
    params = {
        "max_new_tokens": 18,
        "steps": 16,
        "entropy_bound": 0.1,
        "t_min": 0.4,
        "t_max": 0.8,
        "stability_threshold": 1,
        "confidence_threshold": 0.5,
    }
    eos_ids = [1, 106, 50]
    with_eos = cfg.pop("eos", False)
    params.update(cfg)
    prompt = torch.tensor([2, 9, 4, 17, 3])
    if with_eos:
        # Everything before the first EOS is unaffected by the EOS choice, so pick as EOS a token
        # that a plain run emits mid-way through its second canvas (and not earlier).
        plain = generate(
            NoisyModel(canvas_length=canvas_length, vocab_size=vocab, seed=seed),
            prompt,
            **params,
            generator=torch.Generator().manual_seed(1000 + seed),
        ).tokens.tolist()
        at = next(i for i in range(canvas_length + 1, 2 * canvas_length - 1) if plain[i] not in plain[:i])
        eos_ids = [plain[at]]

    ours_model = NoisyModel(
        canvas_length=canvas_length, vocab_size=vocab, self_cond_dtype=sc_dtype, seed=seed
    )
    hf_model = HFStub(
        NoisyModel(canvas_length=canvas_length, vocab_size=vocab, seed=seed),
        embed_dtype=sc_dtype or torch.float32,
    )

    torch.manual_seed(1000 + seed)
    ref = hf_model.generate(
        input_ids=prompt[None],
        past_key_values=StubCache(),
        max_new_tokens=params["max_new_tokens"],
        max_denoising_steps=params["steps"],
        sampler_config=hf.EntropyBoundSamplerConfig(entropy_bound=params["entropy_bound"]),
        t_min=params["t_min"],
        t_max=params["t_max"],
        stability_threshold=params["stability_threshold"],
        confidence_threshold=params["confidence_threshold"],
        eos_token_id=eos_ids,
        pad_token_id=PAD,
    )
    res = generate(
        ours_model,
        prompt,
        **params,
        eos_ids=eos_ids,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(1000 + seed),
    )

    ref_new = ref.sequences[0, prompt.numel() :]
    assert torch.equal(res.tokens, ref_new[: params["max_new_tokens"]])
    assert ours_model.encode_calls == hf_model.encode_calls
    assert ours_model.decode_calls == hf_model.decode_calls
    # The reference stops denoising early in some canvas for these settings (not just out of steps).
    assert res.total_steps < params["steps"] * len(res.steps_per_canvas) or params["stability_threshold"] == 0
    if with_eos:
        assert res.finished and res.tokens.numel() == 2 * canvas_length
        assert res.tokens[at].item() == eos_ids[0] and (res.tokens[at + 1 :] == PAD).all()
        assert len(ours_model.encode_calls) == 2  # prompt, first canvas
