"""`quantize --target SIZE`: the size parser, the allocator against brute force, the measured errors
against a direct computation, and the command: sizes met, the mix explained, a saved preset that
reproduces the file, and one-line errors for targets that cannot be met."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from gguf_tools import quant_error as qe
from gguf_tools import target_mix as tm
from gguf_tools.parallel_quant import Shared
from gguf_tools.reader import GGUFFile
from tests.cli_helpers import invoke, one_line_error


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("18GB", "bytes", 18e9), ("16.5GiB", "bytes", 16.5 * 2**30), ("512 MiB", "bytes", 512 * 2**20),
    ("4.8bpw", "bpw", 4.8), ("6494624B", "bytes", 6494624), ("vram:24GB", "vram", 24 * 2**30)])
def test_parse_target(text, kind, value):
    t = tm.parse_target(text)
    assert (t.kind, t.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["18", "18 parsecs", "-2GB", "0bpw", "vram:24", "big"])
def test_parse_target_refuses(text):
    with pytest.raises(tm.TargetError, match="--target"):
        tm.parse_target(text)


def _instance(seed: int, n: int = 4):
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(n):
        costs = np.sort(rng.choice(np.arange(10, 200), size=4, replace=False))
        losses = np.sort(rng.gamma(1.0, 1.0, 4))[::-1] * rng.uniform(0.1, 10)
        options[f"t{i}"] = [tm.Option(Q.Q4_K, int(c), float(ls)) for c, ls in zip(costs, losses)]
    return options


@pytest.mark.parametrize("seed", range(12))
def test_allocation_against_brute_force(seed):
    """Whole-byte costs under 50,000 steps: the exact optimum of every budget, found by trying every mix."""
    options = _instance(seed)
    names = list(options)
    lo, hi = (sum(f(o.cost for o in options[n]) for n in names) for f in (min, max))
    for budget in np.linspace(lo, hi, 7).astype(int):
        best = min((sum(o.loss for o in combo), combo) for combo in itertools.product(*options.values())
                   if sum(o.cost for o in combo) <= budget)[0]
        pick, _ = tm.allocate(options, int(budget))
        assert sum(o.cost for o in pick.values()) <= budget
        loss = sum(o.loss for o in pick.values())
        assert loss == pytest.approx(best), (budget, loss, best)
    with pytest.raises(tm.TargetError):
        tm.allocate(options, lo - 1)


def test_allocation_in_coarse_steps_stays_within_budget_and_near_optimal():
    """Large costs (steps of many bytes): the rounding is repaired, and the loss is close to the optimum."""
    options = {n: [tm.Option(o.qtype, o.cost * 100_003, o.loss) for o in opts] for n, opts in _instance(5, 6).items()}
    lo = sum(min(o.cost for o in v) for v in options.values())
    hi = sum(max(o.cost for o in v) for v in options.values())
    for budget in np.linspace(lo, hi, 5).astype(int):
        best = min(sum(o.loss for o in combo) for combo in itertools.product(*options.values())
                   if sum(o.cost for o in combo) <= budget)
        pick, _ = tm.allocate(options, int(budget), buckets=50)
        assert sum(o.cost for o in pick.values()) <= budget
        assert sum(o.loss for o in pick.values()) <= best * 1.1 + 1e-12


def _gguf(tmp_path, w: np.ndarray):
    from gguf import GGUFWriter

    path = tmp_path / "w.gguf"
    g = GGUFWriter(path, "test")
    g.add_tensor("w.weight", w)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return GGUFFile(path, check_model=False)


def test_measured_error_is_the_weighted_quantization_error(tmp_path):
    """rel(t, q) for Q8_0 and Q4_0 (no imatrix: gguf-py's quantizers are ggml's), all rows and a sample of
    them, against sum_j im_j ||W - Q(W)||^2 / sum_j im_j ||W||^2 computed here."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 64)) * rng.uniform(0.1, 3, 64)).astype(np.float32)
    f = _gguf(tmp_path, w)
    src = Shared(f, GGUFFile, str(f.path))
    for max_rows in (1000, 32):
        job = qe.ErrorJob(src, qe.read_gguf_rows, "w.weight", "w.weight", (96, 64), (Q.Q8_0, Q.Q4_0), None,
                          np.ones(1), max_rows)
        got = job()
        rows = np.concatenate([w[a:b] for a, b in qe._blocks(96, min(96, max_rows))])
        for q in (Q.Q8_0, Q.Q4_0):
            deq = gguf_dequantize(gguf_quantize(rows, q), q)
            expect = ((rows - deq).astype(np.float64) ** 2).sum() / (rows.astype(np.float64) ** 2).sum()
            assert got[q] == pytest.approx(expect, rel=1e-9)
    assert got[Q.Q8_0] < got[Q.Q4_0]


# ---- the command --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stock(tiny_ckpt, tmp_path_factory):
    """(checkpoint, stock Q4_K_M file, an imatrix for it)."""
    from engine.imatrix_collect import Sample, collect, write
    from engine.model import DiffusionGemmaModel
    from gguf_tools.convert import convert

    d = tmp_path_factory.mktemp("target")
    src = tiny_ckpt[0]
    q4, _ = convert(src, d / "stock-Q4_K_M.gguf", "Q4_K_M")
    bf16, _ = convert(src, d / "m-BF16.gguf", "BF16")
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(0, 512, 12).tolist(), rng.integers(0, 512, 16).tolist()) for _ in range(2)]
    im = write(collect(DiffusionGemmaModel(bf16), samples, "both"), d / "im.gguf", "test", 28)
    return src, q4, im, bf16


def test_target_meets_the_size_and_the_preset_reproduces_it(stock, tmp_path):
    src, q4, im, bf16 = stock
    size = q4.stat().st_size
    out, preset = tmp_path / "t.gguf", tmp_path / "mix.toml"
    r = invoke("quantize", src, "--target", f"{size}B", "--imatrix", im, "-o", out, "--save-preset", preset,
               "--threads", 1)
    assert r.exit_code == 0, r.output
    assert 0.99 * size <= out.stat().st_size <= size
    again = tmp_path / "again.gguf"
    r = invoke("quantize", src, "--type", preset, "--imatrix", im, "-o", again, "--threads", 2)
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()
    r = invoke("quantize", bf16, "--type", preset, "--imatrix", im, "--threads", 1)  # requantize, default name
    assert r.exit_code == 0, r.output
    assert (bf16.parent / "m-MIX.gguf").is_file()
    types = {t.qtype for t in GGUFFile(out).tensors.values()}
    assert types <= set(qe.CANDIDATES) | {Q.F32}


def test_dry_run_explains_the_mix(stock, tmp_path):
    src, q4, im, _ = stock
    r = invoke("quantize", src, "--target", "5.5bpw", "--imatrix", im, "--dry-run", "--json", "--threads", 1)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    s = plan["summary"]
    assert s["planned_bpw"] <= 5.5 and s["planned_bpw"] > 5.3
    assert sum(t["bytes"] for t in plan["tensors"]) == sum(s["bytes_by_type"].values())
    assert s["expected_kld"] == pytest.approx(sum(t["kld"] for t in plan["tensors"]))
    assert all(t["kld"] == pytest.approx(t["gain"] * t["rel_error"]) and t["why"] for t in plan["tensors"])
    assert not list(tmp_path.iterdir())


def test_targets_that_cannot_be_met(stock, tmp_path):
    src, q4, im, _ = stock
    out = tmp_path / "x.gguf"
    for args, needle in ((("--target", "10KB"), "smaller than the smallest mix"),
                         (("--target", "10GB"), "larger than the BF16 file"),
                         (("--target", "5parsec"), "unknown unit"),
                         (("--target", "6MB", "--pure"), "--pure"),
                         (("--save-preset", tmp_path / "p.toml"), "--target"),
                         (("--target", "6MB", "--save-preset", tmp_path / "p.txt"), ".toml"),
                         (("--type", tmp_path / "none.toml"), "no such preset file")):
        one_line_error(invoke("quantize", src, "-o", out, "--imatrix", im, *args), needle)
        assert not out.exists() and not (tmp_path / "p.toml").exists()


def test_vram_target_fits_the_card_without_offloading(stock, tmp_path):
    """vram:SIZE --ctx N: a card 10% of the stock weights too small for the stock file to stay resident
    holds the --target file whole, as `diffgemma plan` counts it."""
    src, q4, im, _ = stock

    def plan(path, vram):
        r = invoke("plan", path, "--vram", f"{vram}B", "--ctx", 64, "--json")
        return json.loads(r.stdout)

    whole = plan(q4, 2**40)
    weights = sum(t["bytes"] for t in whole["tensors"])
    card = whole["gpu_bytes"] - weights // 10
    assert plan(q4, card)["offloaded"], "the stock file must not fit resident, or this proves nothing"
    out = tmp_path / "v.gguf"
    r = invoke("quantize", src, "--target", f"vram:{card}B", "--ctx", 64, "--imatrix", im, "-o", out, "--threads", 1)
    assert r.exit_code == 0, r.output
    p = plan(out, card)
    assert p["fits"] and not p["offloaded"], p["gpu_bytes"]


@pytest.mark.parametrize("subject", ["sort", pytest.param("wide", marks=pytest.mark.slow)])
def test_imatrix_and_target_files_run_in_llamacpp(subject, tmp_path):
    """A file made with `diffgemma imatrix` and `quantize --target` loads in llama.cpp's DiffusionGemma (PR
    24423) and gives our engine's canvas logits (tests/oracles: four ways, its tolerances)."""
    from engine.imatrix_collect import Sample, collect, write
    from engine.model import DiffusionGemmaModel
    from gguf_tools.convert import convert
    from tests.oracles import oracle_models
    from tests.oracles.llamacpp_pr import OracleUnavailable, oracle_bin
    from tests.oracles.test_llamacpp_pr import check_against_llamacpp

    try:
        bin_dir = oracle_bin()
    except OracleUnavailable as e:
        pytest.skip(str(e))
    src = oracle_models.checkpoint(subject, tmp_path)
    bf16, _ = convert(src, tmp_path / "s-BF16.gguf", "BF16")
    im_path = tmp_path / "im.gguf"
    if subject == "sort":  # the built-in model: the command and its calibration prompts
        r = invoke("imatrix", bf16, "-o", im_path, "--chunks", 8, "--threads", 1)
        assert r.exit_code == 0, r.output
    else:
        rng = np.random.default_rng(1)
        samples = [Sample(rng.integers(3, 512, 12).tolist(), rng.integers(3, 512, 16).tolist()) for _ in range(2)]
        write(collect(DiffusionGemmaModel(bf16), samples, "both"), im_path, "test", 28)
    q3, _ = convert(src, tmp_path / "s-Q3_K_M.gguf", "Q3_K_M")
    out = tmp_path / "s-target.gguf"
    r = invoke("quantize", src, "--target", f"{q3.stat().st_size}B", "--imatrix", im_path, "-o", out,
               "--threads", 2)
    assert r.exit_code == 0, r.output
    assert len({t.qtype for t in GGUFFile(out).tensors.values()}) >= 4  # a mix, not one type
    check_against_llamacpp(bin_dir, out, subject)
