"""engine.sensitivity: a KLD probe (one tensor swapped for its quantized values in memory) gives the KLD of
a real file in which only that tensor is quantized, and its relative error is target_mix's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine import sensitivity as sens
from engine.evaluate import divergence
from engine.imatrix_collect import Sample, collect, write
from engine.model import DiffusionGemmaModel
from engine.run import load
from gguf_tools.convert import convert
from gguf_tools.imatrix import load_imatrix
from gguf_tools.parallel_quant import Shared
from gguf_tools.presets import Rule
from gguf_tools.quant_error import ErrorJob, read_gguf_rows, usage_of
from gguf_tools.reader import GGUFFile

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("blk.0.attn_q.weight", "blk.1.ffn_gate_up_exps.weight")


def samples(n=2, seed=4):
    rng = np.random.default_rng(seed)
    return [Sample(rng.integers(3, 512, 10).tolist(), rng.integers(3, 512, 12).tolist()) for _ in range(n)]


def test_probe_equals_a_file_with_that_tensor_quantized(tiny_ckpt, tiny_gguf, tmp_path):
    im = load_imatrix(write(collect(DiffusionGemmaModel(tiny_gguf), samples(), "both"), tmp_path / "im.gguf", "t", 22))
    lm = load(tiny_gguf, torch.device("cpu"))
    probes = sens.probe_gains(lm, samples(), im, names=NAMES)
    assert set(probes) == set(NAMES)
    ref = sens.calibration_logits(lm.model, samples())
    f = GGUFFile(tiny_gguf)
    for name, p in probes.items():
        q = Q[p["type"]]
        assert q == sens.probe_type(f.tensors[name].shape)
        rules = (Rule("^" + name.replace(".", r"\.") + "$", q), Rule(".", Q.BF16))  # the rest as stored
        one, _ = convert(tiny_ckpt[0], tmp_path / f"{name}.gguf", "Q8_0", overrides=rules, imatrix=im)
        kld = divergence(ref, sens.calibration_logits(load(one, torch.device("cpu")).model, samples()))["mean_kld"]
        assert p["kld"] > 0 and p["kld"] == pytest.approx(kld, rel=1e-6, abs=1e-12)
        shape = tuple(f.tensors[name].shape)
        lookup = im.lookup(name, shape)
        job = ErrorJob(Shared(f, GGUFFile, str(tiny_gguf)), read_gguf_rows, name, name, shape, (q,),
                       lookup if lookup.ndim == 2 else lookup[None], usage_of(im, name, shape), max_rows=10**9)
        assert p["rel"] == pytest.approx(job()[q], rel=1e-9)
        assert p["gain"] == pytest.approx(p["kld"] / p["rel"])
    assert lm.model.weights.__class__.__name__ == "WeightStore"  # the probes put the file's store back


def test_role_gains_are_geometric_means():
    probes = {"blk.0.attn_q.weight": {"gain": 1e-4}, "blk.1.attn_q.weight": {"gain": 1e-2},
              "token_embd.weight": {"gain": 3.0}, "blk.0.attn_k.weight": {"gain": 0.0}}
    assert sens.role_gains(probes) == pytest.approx({"attn_q": 1e-3, "token_embd": 3.0})
