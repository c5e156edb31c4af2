"""The reverse direction: files made the community's way (the PR #24423 converter's layout, then the PR's own
llama-quantize) run in our engine with llama.cpp's logits, and with the logits of our own file of the same
checkpoint, so the diffusion-gemma GGUFs people already have are readable too.

How the community files are written: tests/oracles/community_gguf.py (gguf-py only, no gguf_tools code).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.run import compute_logits
from gguf_tools.reader import GGUFFile
from tests.oracles import oracle_models
from tests.oracles.community_gguf import write_community_gguf
from tests.oracles.llamacpp_pr import llama_quantize
from tests.oracles.test_llamacpp_pr import check_against_llamacpp


@pytest.fixture(scope="session")
def community_file(subject_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("community")
    made = {}

    def get(subject: str, outtype: str = "BF16", **options) -> object:
        key = (subject, outtype, tuple(sorted(options.items())))
        if key not in made:
            name = f"{subject}-{outtype}-{len(made)}.gguf"
            made[key] = write_community_gguf(subject_ckpt(subject), root / name, outtype, **options)
        return made[key]

    return get


def _same_logits(a, b, subject: str, atol: float = 0.0) -> None:
    prompt, canvas = oracle_models.inputs(subject, GGUFFile(a).spec().canvas_length)
    np.testing.assert_allclose(compute_logits(a, prompt, canvas, device="cpu"),
                               compute_logits(b, prompt, canvas, device="cpu"), rtol=0, atol=atol)


@pytest.mark.parametrize("subject,outtype,options", [
    pytest.param("sort", "BF16", {}, id="sort-BF16"),
    pytest.param("narrow", "F32", {"split_experts": True}, id="narrow-F32-split"),
    pytest.param("wide", "F16", {}, id="wide-F16", marks=pytest.mark.slow),
    pytest.param("wide", "Q8_0", {"split_experts": True}, id="wide-Q8_0-split", marks=pytest.mark.slow),
    pytest.param("sort", "F32", {"eb_keys": False}, id="sort-F32-no-eb-keys", marks=pytest.mark.slow),
])
def test_converter_layout_reads_like_our_file(llamacpp_bin, community_file, our_file, subject, outtype, options):
    theirs = community_file(subject, outtype, **options)
    ours = our_file(subject, outtype)
    # a different file, not a copy of ours: the converter's tensor order (and the expert layout when split)
    assert list(GGUFFile(theirs).tensors) != list(GGUFFile(ours).tensors)
    # same weights and geometry, so our engine must give our file's logits (bit for bit when fused;
    # split expert halves are multiplied separately, a float32 rounding apart)
    _same_logits(theirs, ours, subject, atol=1e-4 if options.get("split_experts") else 0.0)
    check_against_llamacpp(llamacpp_bin, theirs, subject)


def test_missing_sampler_keys_fall_back_to_the_runtime_defaults(community_file):
    """A checkpoint without generation_config.json gives a file without diffusion.eb_*; our defaults are the
    PR CLI's (48 steps, t 0.4..0.8, entropy bound 0.1, stability 1, confidence 0.005)."""
    s = GGUFFile(community_file("narrow", "F32", eb_keys=False)).spec().sampler
    assert (s.max_steps, s.t_min, s.t_max, s.entropy_bound, s.stability_threshold, s.confidence_threshold) == \
        (48, 0.4, 0.8, 0.1, 1, 0.005)


LLAMA_QUANTIZE_CASES = [
    # the sort model's 272/176 widths take K-quant fallbacks down to F16; the PR's llama-quantize refuses a
    # 32-block preset (Q8_0, Q4_0, ...) on such rows ("no tensor type fallback"), so those run on `wide`
    pytest.param("sort", "Q4_K_M", id="sort-Q4_K_M"),
    pytest.param("wide", "Q8_0", id="wide-Q8_0"),
    *(pytest.param("sort", p, id=f"sort-{p}", marks=pytest.mark.slow)
      for p in ("Q2_K", "Q3_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "IQ4_XS")),
    *(pytest.param("wide", p, id=f"wide-{p}", marks=pytest.mark.slow)
      for p in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4_MOE", "Q4_K_M", "F16")),
]


@pytest.mark.parametrize("subject,preset", LLAMA_QUANTIZE_CASES)
def test_llama_quantize_files_run_in_our_engine(llamacpp_bin, community_file, our_file, tmp_path, subject, preset):
    """community BF16 -> the PR's llama-quantize -> our engine agrees with llama.cpp on it; and
    `diffgemma quantize` of the same BF16 file writes the very same tensors (types and bytes) and keys."""
    src = community_file(subject, "BF16")
    theirs = llama_quantize(llamacpp_bin, src, tmp_path / f"{subject}-{preset}.gguf", preset)
    check_against_llamacpp(llamacpp_bin, theirs, subject)
    a, b = GGUFFile(theirs), GGUFFile(our_file(subject, preset, src=src))
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        assert t.qtype == b.tensors[name].qtype, name
        assert np.asarray(t.data).tobytes() == np.asarray(b.tensors[name].data).tobytes(), name
    assert a.kv == b.kv
