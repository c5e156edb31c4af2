"""Files `diffgemma quantize` writes load in llama.cpp's own DiffusionGemma (pull request #24423) and give the
canvas logits our engine gives: with and without self-conditioning, through its unified [prompt | canvas]
forward and through its prefill-then-decode path (DG_CACHED=1).

Tolerances and why: tests/oracles/agreement.py. The default run covers each subject and each kind of
tensor type once; `pytest -m slow -k oracle` runs every preset on every subject, with --imatrix,
--tensor-type and requantized files.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.run import compute_logits
from gguf_tools.presets import available_presets
from gguf_tools.reader import GGUFFile
from tests.oracles import oracle_models
from tests.oracles.agreement import agreement, tolerance_for
from tests.oracles.llamacpp_pr import canvas_logits, diffusion_cli

SELF_COND_TEMPERATURE = 0.8  # the previous step's logits arrive divided by the sampler's temperature

# (subject, preset) pairs the default run covers: F32 on every subject (the tight check), a K-quant mixture on
# each (K-quant rows, 32-block and F16 fallbacks), Q8_0 and IQ4_XS (IQ4_NL fallback) once, BF16 once.
DEFAULT_CASES = {("sort", "F32"), ("sort", "Q4_K_M"), ("sort", "Q8_0"), ("narrow", "F32"), ("narrow", "IQ4_XS"),
                 ("wide", "F32"), ("wide", "Q4_K_M"), ("wide", "BF16")}


def _cases():
    for subject in oracle_models.SUBJECTS:
        for preset in available_presets():
            marks = () if (subject, preset) in DEFAULT_CASES else (pytest.mark.slow,)
            yield pytest.param(subject, preset, id=f"{subject}-{preset}", marks=marks)


def check_against_llamacpp(bin_dir, path, subject: str) -> list[str]:
    """llama.cpp's logits on `path`, four ways, against ours; returns one report line per way."""
    spec = GGUFFile(path).spec()
    prompt, canvas = oracle_models.inputs(subject, spec.canvas_length)
    tol = tolerance_for(path)
    plain = compute_logits(path, prompt, canvas, device="cpu")
    prev = (plain / SELF_COND_TEMPERATURE).astype(np.float32)
    conditioned = compute_logits(path, prompt, canvas, prev, device="cpu")
    lines, failures = [], []
    for cached in (False, True):
        for sc, ours in ((None, plain), (prev, conditioned)):
            theirs = canvas_logits(bin_dir, path, prompt, canvas, sc, cached=cached)
            a = agreement(theirs, ours)
            what = f"{path.name} {'cached' if cached else 'unified'} sc={'on' if sc is not None else 'off'}: {a}"
            lines.append(what)
            if not a.within(tol):
                failures.append(what)
            # self-conditioning must be what brings the two together, or this comparison proves nothing
            if sc is not None and not a.rms_rel < agreement(theirs, plain).rms_rel / 3:
                failures.append(f"{what}; but self-conditioning barely matters ({agreement(theirs, plain)})")
    print("\n".join(lines))
    assert not failures, f"outside the {tol.activations} tolerance {tol}:\n" + "\n".join(failures)
    return lines


@pytest.mark.parametrize("subject,preset", list(_cases()))
def test_quantize_output_matches_llamacpp(llamacpp_bin, our_file, subject, preset):
    check_against_llamacpp(llamacpp_bin, our_file(subject, preset), subject)


IMATRIX_CASES = [
    pytest.param("sort", "Q4_K_M", (), id="sort-Q4_K_M"),
    pytest.param("wide", "IQ4_XS", (), id="wide-IQ4_XS", marks=pytest.mark.slow),
    pytest.param("wide", "Q2_K", (), id="wide-Q2_K", marks=pytest.mark.slow),
    pytest.param("narrow", "Q5_0", (), id="narrow-Q5_0", marks=pytest.mark.slow),
    pytest.param("sort", "Q3_K_M", ("--pure",), id="sort-Q3_K_M-pure", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("subject,preset,options", IMATRIX_CASES)
def test_imatrix_files_match_llamacpp(llamacpp_bin, our_file, subject, preset, options):
    with_im = our_file(subject, preset, *options, imatrix=True)
    without = our_file(subject, preset, *options)
    assert _tensor_bytes(with_im) != _tensor_bytes(without), "the importance matrix changed nothing"
    check_against_llamacpp(llamacpp_bin, with_im, subject)


# every writable type llama.cpp can run, forced onto some tensors of a mixture
TENSOR_TYPE_CASES = [
    pytest.param("wide", "Q4_K_M", ("attn_q=IQ4_NL", "attn_output=Q5_K", "ffn_up\\.=Q3_K", "ffn_gate\\.=Q2_K",
                                    "exps=MXFP4", "ffn_down\\.=Q4_1"), id="wide-mixed"),
    pytest.param("sort", "Q8_0", ("attn_k=Q5_1", "attn_v=Q4_0", "ffn_gate_up_exps=Q6_K", "token_embd=Q5_K"),
                 id="sort-mixed", marks=pytest.mark.slow),
    pytest.param("narrow", "Q6_K", ("blk\\.0\\.=F16", "blk\\.1\\.=BF16", "self_cond=IQ4_XS"),
                 id="narrow-floats", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("subject,preset,overrides", TENSOR_TYPE_CASES)
def test_tensor_type_overrides_match_llamacpp(llamacpp_bin, our_file, subject, preset, overrides):
    options = [x for o in overrides for x in ("--tensor-type", o)]
    path = our_file(subject, preset, *options)
    types = {name: t.qtype.name for name, t in GGUFFile(path).tensors.items()}
    pattern, type_name = overrides[0].split("=")
    assert any(re.search(pattern, n) and ty == type_name for n, ty in types.items()), types
    check_against_llamacpp(llamacpp_bin, path, subject)


@pytest.mark.parametrize("subject,preset", [
    pytest.param("sort", "Q4_K_M", id="sort-Q4_K_M"),
    pytest.param("wide", "Q5_K_S", id="wide-Q5_K_S", marks=pytest.mark.slow),
    pytest.param("narrow", "Q4_0", id="narrow-Q4_0", marks=pytest.mark.slow),
])
def test_requantized_files_match_llamacpp(llamacpp_bin, our_file, subject, preset):
    """BF16 file -> `diffgemma quantize FILE.gguf`, the way most users make their files."""
    check_against_llamacpp(llamacpp_bin, our_file(subject, preset, src="BF16"), subject)


def test_split_expert_layout_matches_llamacpp(llamacpp_bin, our_file, tmp_path):
    """A file with ffn_gate_exps + ffn_up_exps instead of the fused ffn_gate_up_exps: both loaders take it,
    and our engine's logits equal those of the fused file it was split from."""
    from tests.oracles.community_gguf import split_experts

    fused = our_file("wide", "Q4_K_M")
    split = split_experts(fused, tmp_path / "wide-split.gguf")
    names = set(GGUFFile(split).tensors)
    assert "blk.0.ffn_gate_exps.weight" in names and "blk.0.ffn_gate_up_exps.weight" not in names
    prompt, canvas = oracle_models.inputs("wide", GGUFFile(split).spec().canvas_length)
    np.testing.assert_allclose(compute_logits(split, prompt, canvas, device="cpu"),
                               compute_logits(fused, prompt, canvas, device="cpu"), rtol=0, atol=1e-4)
    check_against_llamacpp(llamacpp_bin, split, "wide")


def test_llama_diffusion_cli_generates_from_our_file(llamacpp_bin, our_file):
    """The PR's own runner loads our file, reads our diffusion.eb_* sampler keys and fills a canvas.

    (Its text is not checked: it renders the chat template with enable_thinking on, which the built-in sort
    model was not trained with, and it has no option to turn that off.)"""
    path = our_file("sort", "Q8_0")
    spec = GGUFFile(path).spec()
    s = spec.sampler
    for _ in range(3):  # its asynchronous logger loses all of stdout at exit in about 1 run of 6 here
        p = diffusion_cli(llamacpp_bin, path, "Sort: 7 3 9 1 5", n_predict=spec.canvas_length)
        if p.stdout.strip():
            break
    m = re.search(r"max_steps=(\d+) t=\[([\d.]+),([\d.]+)\] entropy_bound=([\d.]+) stability=(\d+) "
                  r"confidence=([\d.]+)", p.stderr)
    assert m, p.stderr[-2000:]
    assert int(m[1]) == s.max_steps and int(m[5]) == s.stability_threshold
    np.testing.assert_allclose([float(m[i]) for i in (2, 3, 4, 6)],
                               [s.t_min, s.t_max, s.entropy_bound, s.confidence_threshold], rtol=1e-3)
    assert f"canvas_length={spec.canvas_length}" in p.stderr
    assert "entropy-bound" in p.stdout and p.stdout.split("total time:")[0].strip(), p.stdout
    print(p.stdout)


def _tensor_bytes(path) -> bytes:
    f = GGUFFile(path)
    return b"".join(np.asarray(t.data).tobytes() for t in f.tensors.values())
