"""Presets as data: every rule against llama-quantize's own choices for the full-size model.

The oracle is llama_model_quantize in dry-run mode on a *sparse* gemma4 GGUF with the released
model's header (658 tensors, 47 GiB of holes, a few KB on disk): it reads no weight and logs the type
it picks for every tensor. Our plan for the same header must agree tensor by tensor, for every
preset, with and without an imatrix, with --tensor-type overrides and with --pure; and the
diffusion-gemma plan (692 tensors) must give the shared tensors the same types.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from typer.testing import CliRunner

from gguf_tools import convert as conv
from gguf_tools.arch import GEMMA4_ARCH
from gguf_tools.imatrix import Imatrix
from gguf_tools.presets import (
    COUNTERS,
    DEFAULT_TYPE,
    FALLBACK,
    ModelFacts,
    PresetError,
    Rule,
    available_presets,
    choose_types,
    fallback,
    load_preset,
    parse_override,
    use_more_bits,
)

llama_cpp = pytest.importorskip("llama_cpp")

from tests.gguf_tools.test_llama_quantize_parity import FTYPES, llama_dry_run_types, llama_quantize  # noqa: E402

PRESETS = list(FTYPES)


@pytest.fixture(scope="module")
def sparse_gemma4(reference_config, tmp_path_factory) -> Path:
    """The released model's gemma4 header over a sparse file as long as the BF16 data would be."""
    plan = conv.plan_conversion(reference_config, "BF16", arch=GEMMA4_ARCH)
    path = tmp_path_factory.mktemp("sparse") / "dg26b-gemma4-BF16.gguf"
    w = GGUFWriter(path, GEMMA4_ARCH)
    for key, value, vtype in plan.output_kv():
        conv._add_kv(w, key, value, vtype)
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    header = w.fout[0].tell()
    w.close()
    pad = lambda n: -(-n // 32) * 32  # noqa: E731
    os.truncate(path, pad(header) + sum(pad(t.n_bytes) for t in plan.tensors))
    return path


def ones_imatrix(plan) -> Imatrix:
    """An imatrix entry of the right size for every blk.* tensor (broadcast views: no memory)."""
    entries = {}
    for t in plan.tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2:
            n = t.shape[-1] * (t.shape[0] if len(t.shape) == 3 else 1)
            entries[t.name] = np.broadcast_to(np.float32(1.0), (n,))
    return Imatrix("ones.imatrix", entries)


def llama_types(sparse: Path, tmp_path: Path, preset: str, with_imatrix: bool = False, overrides=(),
                pure: bool = False, log_out: list[str] | None = None) -> dict[str, str]:
    im = {"blk.0.attn_q.weight": np.ones(2816, np.float32)} if with_imatrix else None  # sets has_imatrix
    log = llama_quantize(sparse, tmp_path / "none.gguf", preset, im, overrides=overrides, pure=pure, dry_run=True)
    if log_out is not None:
        log_out.append(log)
    return llama_dry_run_types(log)


def ggml_name(q: Q) -> str:
    return q.name.upper()


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("preset", PRESETS)
def test_full_size_types_match_llama_quantize(sparse_gemma4, reference_config, tmp_path, preset, with_imatrix):
    log: list[str] = []
    theirs = llama_types(sparse_gemma4, tmp_path, preset, with_imatrix, log_out=log)
    base = conv.plan_conversion(reference_config, "BF16", arch=GEMMA4_ARCH)
    im = ones_imatrix(base) if with_imatrix else None
    plan = conv.plan_conversion(reference_config, preset, arch=GEMMA4_ARCH, imatrix=im)
    ours = {t.name: ggml_name(t.qtype) for t in plan.tensors}
    assert len(theirs) == len(ours) == 658
    diff = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
    assert not diff, f"{len(diff)} tensors differ (ours, llama.cpp): {dict(list(diff.items())[:6])}"
    quant_mib = float(re.search(r"quant size\s*=\s*([\d.]+) MiB", log[0]).group(1))
    assert plan.total_bytes / 2**20 == pytest.approx(quant_mib, abs=0.006)
    # the diffusion-gemma file of the same weights: same types for every shared tensor
    dg = conv.plan_conversion(reference_config, preset, imatrix=ones_imatrix(conv.plan_conversion(
        reference_config, "BF16")) if with_imatrix else None)
    dg_types = {t.name: ggml_name(t.qtype) for t in dg.tensors}
    assert len(dg_types) == 692
    assert {n: dg_types[n] for n in theirs} == theirs


def test_overrides_and_pure_match_llama_quantize(sparse_gemma4, reference_config, tmp_path):
    """An override on attn_v skips llama.cpp's attn_v counter, which moves later use_more_bits picks."""
    rules = tuple(parse_override(t) for t in (r"blk\.[02]\.attn_v=q5_0", "FFN_GATE_UP=Q8_0", "ffn_down_exps=iq4_xs",
                                              "attn_k=q5_k"))
    pairs = [(r.pattern, r.type) for r in rules]
    for preset, pure in (("Q4_K_M", False), ("Q5_K_M", False), ("Q3_K_M", True)):
        theirs = llama_types(sparse_gemma4, tmp_path, preset, overrides=pairs, pure=pure)
        plan = conv.plan_conversion(reference_config, preset, arch=GEMMA4_ARCH, overrides=rules, pure=pure)
        ours = {t.name: ggml_name(t.qtype) for t in plan.tensors}
        assert ours == theirs, preset


def test_q4_k_m_dry_run_size_of_the_released_model(reference_config):
    plan = conv.plan_conversion(reference_config, "Q4_K_M")
    types = {t.name: t.qtype for t in plan.tensors}
    assert types["token_embd.weight"] == Q.Q6_K  # tied embedding = output tensor
    assert types["blk.0.ffn_down_exps.weight"] == Q.Q8_0  # use_more_bits Q6_K, 704-wide rows -> Q8_0
    assert types["blk.3.ffn_down_exps.weight"] == Q.Q5_0  # Q4_K, 704-wide rows -> Q5_0
    assert types["blk.2.ffn_gate_up_exps.weight"] == Q.Q4_K
    assert plan.total_bytes == 16_790_983_920  # 15.64 GiB; the published Q4_K_M is about 16 GB
    result = CliRunner().invoke(__import__("cli").app, ["quantize", str(reference_config), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows["total_bytes"] == plan.total_bytes  # Q4_K_M is the default type
    assert all(r["rule"] for r in rows["tensors"])
    by_name = {r["name"]: r["rule"] for r in rows["tensors"]}
    assert "use_more_bits" in by_name["blk.0.attn_v.weight"] and "fallback Q6_K->Q8_0" in by_name[
        "blk.0.ffn_down_exps.weight"]


def test_every_preset_loads_with_llama_cpp_ftype():
    names = available_presets()
    assert set(PRESETS) | {"F32", "F16", "BF16"} <= set(names)
    for name in PRESETS:
        p = load_preset(name)
        assert p.name == name and p.file_type == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    assert load_preset(DEFAULT_TYPE).name == "Q4_K_M"


def test_use_more_bits_and_fallbacks():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert fallback(Q.Q4_K, 704) == Q.Q5_0 and fallback(Q.Q5_K, 2112) == Q.Q5_1
    assert fallback(Q.Q6_K, 704) == Q.Q8_0 and fallback(Q.IQ4_XS, 2112) == Q.IQ4_NL
    assert fallback(Q.Q2_K, 704) == Q.Q4_0 and fallback(Q.Q3_K, 96) == Q.Q4_0
    assert fallback(Q.Q4_K, 200) == Q.F16 and fallback(Q.Q8_0, 80) == Q.F16 and fallback(Q.MXFP4, 48) == Q.F16
    assert fallback(Q.Q4_K, 2816) == Q.Q4_K
    assert set(FALLBACK) >= {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS}


def test_counters_follow_loader_order_and_skip_overrides():
    """attn_v's index counts attn_v tensors decided by the preset (not blk.N, not overridden ones)."""
    names = [f"blk.{i}.attn_v.weight" for i in (0, 1, 2, 4, 5, 6, 7, 8)]  # blk.3 has no attn_v (k_eq_v)
    facts = ModelFacts.from_tensors(names, n_expert=128, n_layer=9, n_head=16, n_head_kv0=8)
    assert facts.n_attn_v == 8 and facts.tied and facts.n_gqa == 2
    q4km = load_preset("Q4_K_M")
    got = [q for q, _ in choose_types([(n, (256, 256), Q.BF16) for n in names], q4km, facts)]
    assert [n for n, q in zip(names, got) if q == Q.Q6_K] == [names[i] for i in range(8) if use_more_bits(i, 8)]
    skip = (Rule("blk\\.0\\.", Q.Q8_0),)
    got = [q for q, _ in choose_types([(n, (256, 256), Q.BF16) for n in names], q4km, facts, skip)]
    assert got[0] == Q.Q8_0
    assert [n for n, q in zip(names[1:], got[1:]) if q == Q.Q6_K] == [names[1 + i] for i in range(7)
                                                                       if use_more_bits(i, 8)]
    assert set(COUNTERS) == {"attn_v", "ffn_down"}


def test_never_quantized_tensors_keep_their_source_type():
    facts = ModelFacts.from_tensors(["token_embd.weight"], n_expert=4, n_layer=2, n_head=4, n_head_kv0=2)
    rows = [("blk.0.attn_norm.weight", (256,), Q.F32), ("blk.0.ffn_gate_inp.weight", (4, 256), Q.F32),
            ("blk.0.ffn_gate_inp.scale", (256,), Q.BF16), ("blk.0.layer_output_scale.weight", (1,), Q.F32),
            ("blk.0.attn_q.weight", (1, 256), Q.BF16)]
    got = choose_types(rows, load_preset("Q4_K_M"), facts)
    assert [q for q, _ in got] == [Q.F32, Q.F32, Q.BF16, Q.F32, Q.BF16]
    assert all("never quantized" in r for _, r in got)


def test_override_parsing_and_errors(reference_config):
    r = parse_override(r"BLK\.0\.FFN_DOWN=q6_k")
    assert r.pattern == r"blk\.0\.ffn_down" and r.type == Q.Q6_K  # lower-cased, as llama-quantize does
    for bad, msg in (("attn_v", "REGEX=TYPE"), ("=q8_0", "missing tensor name"), ("attn_v=", "missing type"),
                     ("attn_v=q9_9", "unknown tensor type"), ("(=q8_0", "bad regular expression")):
        with pytest.raises(PresetError, match=re.escape(msg)):
            parse_override(bad)
    with pytest.raises(PresetError, match="quantized types only"):
        conv.plan_conversion(reference_config, "BF16", overrides=(r,))
    with pytest.raises(PresetError, match="Q9_9"):
        load_preset("Q9_9")


def test_malformed_preset_files_are_refused(tmp_path, monkeypatch):
    import gguf_tools.presets as presets

    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    head = 'name = "X"\nfile_type = 15\ndefault = "Q4_K"\n'
    cases = {
        "unknown rule key": '[[rules]]\npattern = "a"\ntype = "Q8_0"\nlayer = "use_more_bits"\n',
        "go together": '[[rules]]\npattern = "a"\ntype = "Q8_0"\nlayers = "use_more_bits"\n',
        "bad layer selector": '[[rules]]\npattern = "a"\ntype = "Q8_0"\ncounter = "attn_v"\nlayers = "half"\n',
        "unknown counter": '[[rules]]\npattern = "a"\ntype = "Q8_0"\ncounter = "x"\nlayers = "< 2"\n',
        "bad pattern": '[[rules]]\npattern = "("\ntype = "Q8_0"\n',
        "unknown tensor type": '[[rules]]\npattern = "a"\ntype = "Q9_K"\n',
        "malformed preset": 'name = "X"\n',
    }
    for i, (msg, body) in enumerate(cases.items()):
        (tmp_path / f"x{i}.toml").write_text(body if msg == "malformed preset" else head + body)
        with pytest.raises(PresetError, match=msg):
            load_preset(f"x{i}")
