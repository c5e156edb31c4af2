"""IQ4_NL / IQ4_XS quantizers against llama.cpp's ggml_quantize_chunk, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from gguf_tools.quants import iq4
from gguf_tools.quants.iq4 import quantize_iq4_nl, quantize_iq4_xs
from tests.oracles.ggml_lib import quantize_chunk

FUNCS = {Q.IQ4_NL: quantize_iq4_nl, Q.IQ4_XS: quantize_iq4_xs}
LENGTHS = {Q.IQ4_NL: (32, 256, 512, 704, 2816), Q.IQ4_XS: (256, 512, 2816)}
CASES = [(qt, n) for qt, lens in LENGTHS.items() for n in lens]


def _ids(case):
    return f"{case[0].name}-{case[1]}"


def edge_rows(row_len: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that stress the zero/eps paths, ties, float overflow, subnormals and the max scan."""
    n = row_len
    g = rng.standard_normal
    rows = [
        np.zeros(n), -np.zeros(n),                       # all-zero blocks (IQ4_XS: fp16 0x8000 scale)
        np.full(n, 0.5), np.full(n, -3.0),               # constant
        np.tile([1.0, -1.0, 0.5, -0.5], n // 4),         # exact ties between +max and -max
        np.round(g(n) * 4) / 4,                          # many equal values
        rng.integers(-127, 114, n).astype(float),        # values on the levels and midpoints
        g(n) * 1e30, np.full(n, 1e30), np.full(n, -1e30),  # x*x overflows to inf -> NaN scales
        g(n) * 1e-30,                                    # below GROUP_MAX_EPS
        g(n) * 1e-40,                                    # subnormals
        g(n) * 1e-15, g(n) * 1e-19, g(n) * 1e19, g(n) * 1e5,
    ]
    r = g(n) * 0.01
    r[n // 3] = 50.0                                     # a single outlier
    rows.append(r)
    for pattern in ("alternate", "first_half"):
        r = g(n)
        if pattern == "alternate":
            r[::2] = 0
        else:
            r[: n // 2] = 0                              # half the blocks all zero
        rows.append(r)
    for big in (1e30, 3e38, np.inf):
        r = g(n)
        r[min(7, n - 1)] = big
        rows.append(r)
    return np.array(rows, dtype=np.float32)


def _check(qt: Q, x: np.ndarray, imatrix: np.ndarray | None) -> None:
    block, size = GGML_QUANT_SIZES[qt]
    got = FUNCS[qt](x, imatrix)
    assert got.dtype == np.uint8 and got.shape == (x.shape[0], x.shape[1] // block * size)
    want = quantize_chunk(x, qt, imatrix).reshape(got.shape)
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert bad.size == 0, f"{qt.name}: rows {bad.tolist()[:10]} differ from ggml_quantize_chunk"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_random_rows(case, with_imatrix):
    qt, row_len = case
    rng = np.random.default_rng(row_len * 7 + int(qt))
    n_rows = max(4, 8192 // row_len)
    x = (rng.standard_normal((n_rows, row_len)) * rng.uniform(0.01, 3.0, (n_rows, 1))).astype(np.float32)
    imatrix = rng.uniform(0.001, 20.0, row_len).astype(np.float32) if with_imatrix else None
    _check(qt, x, imatrix)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("imatrix_kind", ["none", "random", "ones"])
def test_edge_rows(case, imatrix_kind):
    qt, row_len = case
    rng = np.random.default_rng(row_len + 100 * int(qt))
    imatrix = {"none": None, "ones": np.ones(row_len, np.float32),
               "random": rng.uniform(0.001, 20.0, row_len).astype(np.float32)}[imatrix_kind]
    with np.errstate(over="ignore"):
        _check(qt, edge_rows(row_len, rng), imatrix)


def test_all_zero_scales():
    """quantize_row_iq4_nl_impl: IQ4_NL zero block -> d=+0, nibbles 8; IQ4_XS -> d=-0 (0x8000)."""
    nl = quantize_iq4_nl(np.zeros((1, 32), np.float32))
    assert nl.tobytes() == b"\x00\x00" + b"\x88" * 16
    xs = quantize_iq4_xs(np.zeros((1, 256), np.float32))
    assert xs.tobytes() == b"\x00\x80" + b"\xaa\xaa" + b"\x00" * 4 + b"\x88" * 128


def _best_index_int8_c(x: np.ndarray) -> np.ndarray:
    """Literal vectorised transcription of ggml-quants.c best_index_int8 on kvalues_iq4nl."""
    val = iq4.KVALUES.astype(np.float32)
    x = x.astype(np.float32)
    ml = np.zeros(x.shape, np.int64)
    mu = np.full(x.shape, 15, np.int64)
    for _ in range(4):  # 4 halvings take mu - ml from 15 to 1
        active = mu - ml > 1
        mav = (ml + mu) // 2
        lt = x < val[mav]
        mu = np.where(active & lt, mav, mu)
        ml = np.where(active & ~lt, mav, ml)
    res = np.where(x - val[mu - 1] < val[mu] - x, mu - 1, mu)
    res = np.where(x >= val[15], 15, res)
    return np.where(x <= val[0], 0, res)


def test_level_table_matches_best_index_int8():
    """The floor(2x) table used for best_index_int8 agrees with the C search everywhere it matters."""
    val = iq4.KVALUES.astype(np.float32)
    mids = (val[:-1] + val[1:]) / np.float32(2)
    probes = [np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38], np.float32)]
    for c in np.concatenate([mids, val]):  # every float32 within 3000 ulps of each midpoint and level
        bits = np.float32(c).view(np.int32) + np.arange(-3000, 3001, dtype=np.int32)
        probes.append(bits.view(np.float32))
    rng = np.random.default_rng(5)
    probes.append((rng.standard_normal(200_000) * 80).astype(np.float32))
    probes.append(rng.uniform(-140, 130, 200_000).astype(np.float32))
    x = np.concatenate(probes)
    with np.errstate(all="ignore"):
        got = iq4._CELL_L.take(iq4._cells(x * np.float32(2)), mode="clip")
        want = _best_index_int8_c(x)
    np.testing.assert_array_equal(got, want)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        quantize_iq4_nl(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError):
        quantize_iq4_xs(np.zeros((2, 288), np.float32))
    with pytest.raises(ValueError):
        quantize_iq4_xs(np.zeros((2, 256), np.float32), np.ones(128, np.float32))
