"""engine.weights.dequantize feeds large CPU requests of multi-pass types to the dequantizer piece by
piece (temporaries kept in cache): the result must be the one-piece result, bit for bit, and gguf-py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from engine import weights
from engine.weights import DEQUANTIZERS, dequantize


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0, Q.F16], ids=lambda q: q.name)
def test_pieces_give_the_one_piece_values(qtype, monkeypatch):
    monkeypatch.setattr(weights, "CPU_DEQUANT_PIECE", 1000)  # a few blocks per piece, ragged last piece
    block, size = GGML_QUANT_SIZES[qtype]
    rows, per_row = 37, max(3, 768 // block)  # more than 4 pieces of every type
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (rows, per_row * size), dtype=np.uint8)
    # finite fp16 fields (NaN payloads may differ between vectorised and scalar code)
    fields = {Q.F16: (0,), Q.Q4_K: (0, 2), Q.Q5_0: (0,), Q.Q6_K: (208,), Q.Q8_0: (0,)}[qtype]
    for off in fields:
        raw.reshape(-1, size)[:, off + 1] &= 0x3F
    t = torch.from_numpy(raw)
    got = dequantize(t, qtype)
    whole = DEQUANTIZERS[qtype](t.reshape(-1, size)).reshape(rows, -1)
    assert torch.equal(got.view(torch.int32), whole.view(torch.int32))
    want = np.asarray(gguf_dequantize(raw.reshape(-1, size), qtype), np.float32).reshape(rows, -1)
    np.testing.assert_array_equal(got.numpy().view(np.int32), want.view(np.int32))
    assert got.shape == (rows, per_row * block)
