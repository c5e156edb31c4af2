"""`diffgemma eval`: the divergence statistics, and the command on tiny converted files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.evaluate import divergence
from gguf_tools import convert as conv
from tests.cli_helpers import invoke


def test_divergence_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(6, 50, generator=g) * 3 for _ in range(4)]
    mod = [r + 0.5 * torch.randn(r.shape, generator=g) for r in ref]
    got = divergence(ref, mod)
    p = np.concatenate([torch.softmax(r.double(), -1).numpy() for r in ref])
    q = np.concatenate([torch.softmax(m.double(), -1).numpy() for m in mod])
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    assert got["positions"] == 24
    assert got["mean_kld"] == pytest.approx(kl.mean(), rel=1e-9)
    assert got["p99_kld"] == pytest.approx(np.percentile(kl, 99), rel=1e-9)
    assert got["top1_agreement"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
    same = divergence(ref, ref)
    assert same["mean_kld"] == 0 and same["top1_agreement"] == 1


@pytest.fixture(scope="module")
def tiny_q(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    return {t: conv.convert(tiny_ckpt[0], d / f"tiny-{t}.gguf", t)[0] for t in ("Q8_0", "Q2_K")}


def test_eval_orders_quantizations_and_is_reproducible(tiny_gguf, tiny_q):
    def figures(model, seed=0):
        r = invoke("eval", model, "--reference", tiny_gguf, "--examples", "6", "--seed", seed, "--json",
                   "--no-accuracy")
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    same, q8, q2 = figures(tiny_gguf), figures(tiny_q["Q8_0"]), figures(tiny_q["Q2_K"])
    assert same["mean_kld"] == 0 and same["top1_agreement"] == 1
    assert 0 < q8["mean_kld"] < q2["mean_kld"] and q8["top1_agreement"] > q2["top1_agreement"]
    assert q8["positions"] == 6 * 4 * 16  # prompts x noise levels x canvas length
    assert figures(tiny_q["Q8_0"]) == q8
    assert figures(tiny_q["Q8_0"], seed=1) != q8


def test_eval_refuses_files_of_different_models(tiny_gguf, tmp_path):
    from tests.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "other", canvas_length=8)
    other, _ = conv.convert(tmp_path / "other", tmp_path / "other.gguf", "BF16")
    r = invoke("eval", other, "--reference", tiny_gguf, "--examples", "2")
    assert r.exit_code == 1
    assert r.stderr.strip().startswith("error:") and "not the same model" in r.stderr


def test_eval_refuses_more_examples_than_exist_before_loading_anything(tmp_path):
    from engine.sort_task import held_out_count

    missing = tmp_path / "not-there.gguf"
    r = invoke("eval", missing, "--reference", missing, "--examples", 100000)
    assert r.exit_code == 1 and r.stderr.strip() == (f"error: --examples 100000: only {held_out_count()} held-out "
                                                     "prompts exist")


def test_eval_shows_its_progress(tiny_gguf, tiny_q):
    r = invoke("eval", tiny_q["Q8_0"], "--reference", tiny_gguf, "--examples", "1", "--accuracy")
    assert r.exit_code == 0, r.output
    phases = [line.split(":")[0] for line in r.stderr.splitlines()]
    assert phases == ["canvas logits, reference", "canvas logits, model", "task accuracy, model",
                      "task accuracy, reference"]
    assert all(": 1/1 in " in line for line in r.stderr.splitlines())
    assert "task accuracy" in r.stdout
