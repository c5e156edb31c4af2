"""The torch MXFP4 dequantizer against the OCP MX spec, gguf-py and llama.cpp's ggml, and an
MXFP4_MOE file (our quantizer) running through the engine."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from typer.testing import CliRunner

import cli
from gguf_tools.quants.torch_dequant import TORCH_DEQUANTIZERS, dequantize_torch
from tests.oracles import ggml_lib

BLOCK, SIZE = GGML_QUANT_SIZES[Q.MXFP4]
# OCP Microscaling Formats v1.0, table 5: FP4 E2M1 magnitudes by the low three bits; bit 3 is the sign
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def _spec_value(e: int, code: int) -> float:
    """X = 2^(E - 127) * (-1)^S * E2M1 (E8M0 bias 127; E = 255 is NaN in the spec)."""
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7] * 2.0 ** (e - 127)


def _every_code_block(e: int) -> np.ndarray:
    """One block: scale byte e, codes 0..15 as elements 0..15 (low nibbles), 15..0 as 16..31 (high)."""
    lo = np.arange(16, dtype=np.uint8)
    return np.concatenate([[np.uint8(e)], lo | ((15 - lo) << 4)]).astype(np.uint8)


def test_registered():
    assert Q.MXFP4 in TORCH_DEQUANTIZERS
    assert (BLOCK, SIZE) == (32, 17)


def test_every_scale_and_code_follows_the_spec():
    blocks = np.stack([_every_code_block(e) for e in range(255)])
    got = TORCH_DEQUANTIZERS[Q.MXFP4](torch.from_numpy(blocks)).numpy()
    codes = list(range(16)) + list(range(15, -1, -1))
    with np.errstate(over="ignore"):
        want = np.array([[_spec_value(e, c) for c in codes] for e in range(255)]).astype(np.float32)
    assert got.shape == (255, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # by value: ggml (like gguf-py) decodes code 8 as +0, the spec -0
    assert np.isfinite(got[:253]).all() and np.isinf(got[253]).any()  # 6 * 2^126 overflows float32


def test_nibble_order():
    block = np.zeros((1, SIZE), np.uint8)
    block[0, 0] = 127  # scale 1
    block[0, 1 + 3] = 0x0 | (0x7 << 4)  # element 3: +0, element 19: +6
    block[0, 1 + 5] = 0x9  # element 5: -0.5
    got = TORCH_DEQUANTIZERS[Q.MXFP4](torch.from_numpy(block)).numpy()[0]
    want = np.zeros(32, np.float32)
    want[19], want[5] = 6.0, -0.5
    np.testing.assert_array_equal(got, want)


def test_random_bytes_bit_identical_with_gguf_py_and_ggml():
    rng = np.random.default_rng(17)
    raw = rng.integers(0, 256, (4096, SIZE), dtype=np.uint8)
    raw[:256, 0] = np.arange(256)  # every scale, 0 and 255 included
    got = TORCH_DEQUANTIZERS[Q.MXFP4](torch.from_numpy(raw)).numpy()
    with np.errstate(over="ignore"):
        want = gguf_dequantize(raw, Q.MXFP4).reshape(-1, BLOCK)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    ggml = ggml_lib.dequantize(raw, Q.MXFP4, raw.shape[0] * BLOCK).reshape(-1, BLOCK)
    np.testing.assert_array_equal(_bits(got), _bits(ggml))


def test_ggml_quantized_rows_decode_as_ggml_does():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 256)).astype(np.float32) * rng.uniform(1e-3, 10, (6, 1)).astype(np.float32)
    x[0] = 0
    raw = ggml_lib.quantize_chunk(x, Q.MXFP4)
    got = dequantize_torch(torch.from_numpy(raw.reshape(6, -1)), Q.MXFP4, x.shape).numpy()
    ggml = ggml_lib.dequantize(raw, Q.MXFP4, x.size).reshape(x.shape)
    np.testing.assert_array_equal(_bits(got), _bits(ggml))
    # within the format's step: a block's largest magnitude sets a power-of-two scale, E2M1 steps are
    # at most 2 units of 2^(e-128) apart below 4 units, 4 above; the error is at most half of that
    scale = 2.0 ** np.floor(np.log2(np.abs(x).reshape(6, -1, BLOCK).max(-1, keepdims=True) + 1e-30)) / 4
    assert (np.abs(got - x).reshape(6, -1, BLOCK) <= 2 * scale + 1e-30).all()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    raw = torch.from_numpy(np.random.default_rng(9).integers(0, 256, (4096, SIZE), dtype=np.uint8))
    cpu = TORCH_DEQUANTIZERS[Q.MXFP4](raw)
    gpu = TORCH_DEQUANTIZERS[Q.MXFP4](raw.cuda())
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))


# ---- an MXFP4_MOE file through the engine ----------------------------------------------------------

def test_mxfp4_moe_model_runs(tiny_ckpt, tmp_path):
    from engine.weights import WeightStore, dequantize

    src = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt[0], src)
    out = tmp_path / "tiny-MXFP4_MOE.gguf"
    runner = CliRunner()
    q = runner.invoke(cli.app, ["quantize", str(src), "-o", str(out), "--type", "MXFP4_MOE"])
    assert q.exit_code == 0, q.output
    reader = GGUFReader(out)
    experts = [t for t in reader.tensors if t.name.endswith("_exps.weight")]
    assert experts and {Q(t.tensor_type) for t in experts} == {Q.MXFP4}
    # the engine's expert slices (the store's raw view, row e, as expert_mlp hands it to
    # quantized_linear) dequantize to gguf-py's dequantization of the stored bytes
    store = WeightStore(out)
    for t in experts:
        shape = store.info(t.name).shape
        want = gguf_dequantize(np.asarray(t.data), Q.MXFP4).reshape(shape)
        for e in range(shape[0]):
            np.testing.assert_array_equal(dequantize(store.raw(t.name)[e], Q.MXFP4).numpy(), want[e])
    args = ["run", str(out), "Sort 3 1 2", "--max-new-tokens", "8", "--steps", "2", "--json", "--device", "cpu"]
    resident = runner.invoke(cli.app, args)
    offloaded = runner.invoke(cli.app, [*args, "--n-cpu-moe", "1"])
    assert resident.exit_code == 0 and offloaded.exit_code == 0, resident.output + offloaded.output
    a, b = json.loads(resident.stdout), json.loads(offloaded.stdout)
    assert len(a["token_ids"]) == 8 and a["token_ids"] == b["token_ids"]
    assert b["placement"]["executor"]["cpu_layer_calls"] > 0
