"""Importance matrices: llama.cpp's GGUF and legacy .dat files, normalised as llama-quantize does."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

from gguf_tools import convert as conv
from gguf_tools.arch import GEMMA4_ARCH
from gguf_tools.imatrix import (
    Imatrix,
    ImatrixError,
    load_imatrix,
    needs_imatrix_entry,
    save_gguf_imatrix,
    save_legacy_imatrix,
)
from gguf_tools.presets import PresetError
from tests.oracles import ggml_lib

F = np.float32


def stats_3d() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    sums = rng.gamma(0.5, 3.0, (4, 64)).astype(F) * 100
    return {
        "blk.0.ffn_down_exps.weight": (sums, np.array([100, 0, 7, 2049], F)),
        "blk.0.attn_q.weight": (rng.random((1, 32)).astype(F) * 50, np.array([50], F)),
    }


def test_gguf_imatrix_is_normalised_per_expert(tmp_path):
    stats = stats_3d()
    path = save_gguf_imatrix(tmp_path / "im.gguf", stats, datasets=["wiki.txt", "code.txt"], chunk_count=12,
                             chunk_size=256)
    # llama.cpp's own gguf reader sees the tool's layout: in_sum2 ne = [ne0, n_mat], counts ne = [1, n_mat]
    g = ggml_lib.read_gguf(path)
    assert g.tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape == (4, 64)
    assert g.tensors["blk.0.ffn_down_exps.weight.counts"].shape == (4, 1)
    assert g.tensors["blk.0.attn_q.weight.in_sum2"].shape == (32,)
    assert g.kv["general.type"] == "imatrix" and g.kv["imatrix.chunk_count"] == 12
    im = load_imatrix(str(path))
    assert not im.legacy and im.datasets == ["wiki.txt", "code.txt"] and im.chunk_size == 256
    sums, counts = stats["blk.0.ffn_down_exps.weight"]
    e = im.lookup("blk.0.ffn_down_exps.weight", (4, 256, 64))
    assert e.shape == (4, 64) and e.dtype == F
    np.testing.assert_array_equal(e[0], sums[0] / F(100))
    np.testing.assert_array_equal(e[1], np.ones(64, F))  # an expert that saw no token
    np.testing.assert_array_equal(e[3], sums[3] / F(2049))
    q = im.lookup("blk.0.attn_q.weight", (128, 32))
    assert q.shape == (32,)
    assert im.lookup("blk.0.attn_k.weight", (16, 32)) is None
    assert im.kv() == [("quantize.imatrix.file", str(path), "str"), ("quantize.imatrix.dataset", "wiki.txt", "str"),
                       ("quantize.imatrix.entries_count", 2, "u32"), ("quantize.imatrix.chunks_count", 12, "u32")]


def test_counts_are_rounded_like_lround(tmp_path):
    sums = np.full((3, 32), 6.0, F)
    path = save_gguf_imatrix(tmp_path / "im.gguf", {"blk.0.ffn_up_exps.weight": (sums, np.array([2.5, 0.4, -3], F))})
    e = load_imatrix(path).lookup("blk.0.ffn_up_exps.weight", (3, 8, 32))
    np.testing.assert_array_equal(e[:, 0], [2.0, 1.0, 1.0])  # 2.5 -> 3; 0.4 -> 0 -> 1.0; -3 -> 1.0


def test_legacy_dat_matches_the_gguf_values(tmp_path):
    stats = stats_3d()
    dat = save_legacy_imatrix(tmp_path / "im.dat", stats, chunk_size=512, chunk_count=9, dataset="wiki.txt")
    im = load_imatrix(dat)
    assert im.legacy and im.chunk_count == 9 and im.datasets == ["wiki.txt"]
    g = load_imatrix(save_gguf_imatrix(tmp_path / "im.gguf", stats))
    for name, (sums, counts) in stats.items():
        ncall = int((counts.max() + 511) // 512)  # stored: (sum / count) * ncall; loaded: stored / ncall
        a, b = im.entries[name], g.entries[name]
        np.testing.assert_allclose(a, b, rtol=2e-7)  # the two formats can differ in the last ulp
        per = sums.shape[-1]
        expect = np.concatenate([((sums[j] / F(c)) * F(ncall) if c else np.full(per, F(ncall))) / F(ncall)
                                 for j, c in enumerate(counts)])
        np.testing.assert_array_equal(a, expect.astype(F))
    assert im.kv()[-1] == ("quantize.imatrix.chunks_count", 9, "u32")


def test_legacy_without_trailer_and_with_ncall_zero(tmp_path):
    body = struct.pack("<i", 1) + struct.pack("<i", 6) + b"blk.0x" + struct.pack("<ii", 0, 2) + \
        np.array([3.0, 4.0], "<f4").tobytes()
    (tmp_path / "a.dat").write_bytes(body)
    im = load_imatrix(tmp_path / "a.dat")
    np.testing.assert_array_equal(im.entries["blk.0x"], [3.0, 4.0])  # ncall 0: values as stored
    assert im.chunk_count == 0 and im.datasets == [] and len(im.kv()) == 2


@pytest.mark.parametrize("case", ["metadata", "pairs", "type", "nonfinite", "empty_legacy", "truncated", "missing"])
def test_bad_imatrix_files_are_errors(tmp_path, case):
    from gguf import GGUFValueType, GGUFWriter

    path = tmp_path / "bad.imatrix"
    if case == "metadata":
        w = GGUFWriter(path, "x")
        w.add_tensor("blk.0.a.weight.in_sum2", np.ones(32, F))
        w.add_tensor("blk.0.a.weight.counts", np.ones(1, F))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        msg = "missing imatrix metadata"
    elif case in ("pairs", "type"):
        w = GGUFWriter(path, "x")
        for k in ("imatrix.chunk_count", "imatrix.chunk_size"):
            w.add_key_value(k, 1, GGUFValueType.UINT32)
        w.add_key_value("imatrix.datasets", ["d"], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        w.add_tensor("blk.0.a.weight.in_sum2", np.ones(32, F if case == "pairs" else np.float16))
        w.add_tensor("blk.0.a.weight.counts", np.ones(1, F if case == "type" else F))
        if case == "pairs":
            w.add_tensor("blk.0.b.weight.in_sum2", np.ones(32, F))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        msg = "mismatched sums and counts for blk.0.b.weight" if case == "pairs" else "must be F32"
    elif case == "nonfinite":
        save_gguf_imatrix(path, {"blk.0.a.weight": (np.array([[1.0, np.inf] * 16], F), np.array([1], F))})
        msg = "non-finite"
    elif case == "empty_legacy":
        path.write_bytes(struct.pack("<i", 0))
        msg = "no data"
    elif case == "truncated":
        path.write_bytes(struct.pack("<ii", 1, 40) + b"blk.0")
        msg = "truncated"
    else:
        path = tmp_path / "nope.dat"
        msg = "no such imatrix file"
    with pytest.raises(ImatrixError, match=msg):
        load_imatrix(path)


def test_wrong_size_entry_is_an_error_except_for_token_embd():
    im = Imatrix("x.gguf", {"blk.0.attn_q.weight": np.ones(64, F), "token_embd.weight": np.ones(3, F)})
    with pytest.raises(ImatrixError, match="blk.0.attn_q.weight"):
        im.lookup("blk.0.attn_q.weight", (64, 128))
    assert im.lookup("token_embd.weight", (512, 64)) is None
    assert Imatrix("é" * 100, {}).kv()[0][1] == "é" * 63  # 127 bytes at most, whole characters
    assert needs_imatrix_entry("blk.3.ffn_down_exps.weight") and not needs_imatrix_entry("token_embd.weight")
    assert not needs_imatrix_entry("self_cond_gate.weight")


def tensor_stats(gguf_path: Path, skip: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = {}
    for name, t in ggml_lib.read_gguf(gguf_path).tensors.items():
        if name.startswith("blk.") and len(t.shape) >= 2 and name != skip and "ffn_gate_inp" not in name:
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            counts = rng.integers(1, 900, n_mat).astype(F)
            out[name] = ((rng.random((n_mat, t.shape[-1])) * counts[:, None]).astype(F), counts)
    return out


def test_missing_entry_names_the_tensor(tiny_ckpt, tmp_path):
    import cli

    src, _ = tiny_ckpt
    bf16 = conv.convert(src, tmp_path / "g4-BF16.gguf", "BF16", arch=GEMMA4_ARCH)[0]
    im = save_gguf_imatrix(tmp_path / "part.gguf", tensor_stats(bf16, skip="blk.1.ffn_down_exps.weight"))
    result = CliRunner().invoke(cli.app, ["quantize", str(src), "--type", "Q4_K_M", "--imatrix", str(im),
                                          "--dry-run"])
    assert result.exit_code == 1
    assert "blk.1.ffn_down_exps.weight" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # Q8_0 does not use an importance matrix: nothing is missing
    assert CliRunner().invoke(cli.app, ["quantize", str(src), "--type", "Q8_0", "--imatrix", str(im),
                                        "--dry-run", "--json"]).exit_code == 0
    with pytest.raises(PresetError, match="quantized type"):
        conv.plan_conversion(src, "BF16", imatrix=im)


def test_legacy_imatrix_file_as_llama_quantize(tiny_ckpt, tmp_path):
    """A legacy .dat file through our pipeline equals llama_model_quantize given value / ncall."""
    pytest.importorskip("llama_cpp")
    from tests.gguf_tools.test_llama_quantize_parity import assert_same_file, imatrix_kv, llama_quantize

    src, _ = tiny_ckpt
    bf16 = conv.convert(src, tmp_path / "g4-BF16.gguf", "BF16", arch=GEMMA4_ARCH)[0]
    stats = tensor_stats(bf16)
    dat = save_legacy_imatrix(tmp_path / "im.dat", stats, chunk_size=64, chunk_count=5, dataset="calib.txt")
    im = load_imatrix(str(dat))
    normalised = {}
    raw = dat.read_bytes()
    pos = 4
    for _ in range(len(stats)):  # read the file back independently: value / float(ncall)
        n = struct.unpack_from("<i", raw, pos)[0]
        name = raw[pos + 4: pos + 4 + n].decode()
        ncall, nval = struct.unpack_from("<ii", raw, pos + 4 + n)
        vals = np.frombuffer(raw, "<f4", nval, pos + 12 + n)
        normalised[name] = (vals / F(ncall)).astype(F)
        pos += 12 + n + 4 * nval
    ref = tmp_path / "llama.gguf"
    llama_quantize(bf16, ref, "Q4_K_M", normalised, kv=imatrix_kv(dat, im))
    ours, plan = conv.convert(src, tmp_path / "ours.gguf", "Q4_K_M", arch=GEMMA4_ARCH, imatrix=im)
    assert any(t.qtype == Q.Q5_0 for t in plan.tensors)  # 64-wide rows: the Q4_K fallback, imatrix-weighted
    assert_same_file(ours, ref)
