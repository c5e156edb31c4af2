"""gguf_tools.quants against llama.cpp's own ggml_quantize_chunk, byte for byte, with and without an imatrix."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

pytest.importorskip("llama_cpp")

from gguf_tools.quants import REGISTRY, dequantize, quantize, row_bytes  # noqa: E402
from gguf_tools.quants.kquants_common import nint, seqsum  # noqa: E402
from tests.oracles.ggml_lib import quantize_chunk  # noqa: E402

K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
PASSTHROUGH = [Q.Q8_0, Q.F16, Q.BF16, Q.MXFP4]  # ggml ignores the imatrix for these
ROW_LENS = [256, 512, 2816]
F = np.float32


def edge_rows(k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that hit the corner cases of the searches: zero/flat groups, ties, fp16 overflow and underflow,
    sub-normals, outliers, signed zeros, inf."""
    rows = [
        np.zeros(k, F),
        np.full(k, F(-0.0)),
        np.full(k, F(0.37)),
        np.full(k, F(-2.0)),
        rng.integers(-16, 17, k) / 8,
        rng.integers(-4, 5, k) / 8,  # ties on the level grid
        rng.standard_normal(k) * 1e30,
        rng.standard_normal(k) * 1e-30,  # huge / tiny
        rng.standard_normal(k) * 1e-40,
        rng.standard_normal(k) * 1e-44,  # sub-normal
        rng.standard_normal(k) * 7e4,
        rng.standard_normal(k) * 1e-6,  # fp16 overflow / fp16 sub-normal scales
        np.abs(rng.standard_normal(k)),
        -np.abs(rng.standard_normal(k)),
        rng.standard_normal(k) + 100,
    ]
    r = np.zeros(k, F)
    r[k // 3] = 5.0  # lone outlier in a zero row
    rows.append(r)
    r = rng.standard_normal(k).astype(F) * F(0.01)
    r[7] = 100.0
    rows.append(r)
    r = rng.standard_normal(k).astype(F)
    r[5] = 1e30
    rows.append(r)
    r = rng.standard_normal(k).astype(F)
    r[: k // 2] = 0  # half zeros
    rows.append(r)
    r = rng.standard_normal(k).astype(F)
    r[::2] = 0
    rows.append(r)
    r = rng.standard_normal(k).astype(F)
    r[rng.random(k) < 0.5] = -0.0
    rows.append(r)
    r = rng.standard_normal(k).astype(F)
    r[9] = np.inf
    rows.append(r)
    return np.stack([np.asarray(r, F) for r in rows])


def data(k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    normal = rng.standard_normal((12, k)).astype(F) * F(0.02)
    laplace = (rng.laplace(size=(4, k)) * np.exp(rng.uniform(-8, 8, (4, 1)))).astype(F)
    return np.concatenate([normal, laplace, edge_rows(k, rng)])


def imatrix(k: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + k)
    return (rng.random(k) ** 2 * 50 + 1e-3).astype(F)


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, x: np.ndarray) -> None:
    ref = ref.reshape(ours.shape)
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {len(x)} rows differ, first row {bad[0]}"


@pytest.mark.parametrize("k", ROW_LENS)
@pytest.mark.parametrize("qtype", K_QUANTS + LEGACY + PASSTHROUGH, ids=lambda q: q.name)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_bytes_match_ggml(qtype, k, with_imatrix):
    x = data(k)
    im = imatrix(k) if with_imatrix else None
    with np.errstate(all="ignore"):
        ref = quantize_chunk(x, qtype, im)
        ours = quantize(x, qtype, im)
    assert ours.dtype == np.uint8 and ours.shape == (len(x), row_bytes(qtype, k))
    assert_same_bytes(ours, ref, x)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("qtype", K_QUANTS + LEGACY, ids=lambda q: q.name)
def test_mixed_distributions(qtype, seed):
    """Normal, Laplace, uniform and grid-valued rows, 5 % exact zeros, row scales spread over e^+-20."""
    rng = np.random.default_rng(100 + seed)
    k, n = 1024, 48
    parts = [
        rng.standard_normal((n // 4, k)),
        rng.laplace(size=(n // 4, k)) * 0.02,
        rng.uniform(-1, 1, (n // 4, k)),
        np.round(rng.standard_normal((n // 4, k)) * 4) / 8,
    ]
    x = np.concatenate(parts).astype(F)
    x[rng.random(x.shape) < 0.05] = 0
    x *= np.exp(rng.uniform(-20, 20, (n, 1))).astype(F)
    for im in (None, (rng.random(k) ** 3).astype(F)):
        with np.errstate(all="ignore"):
            assert_same_bytes(quantize(x, qtype, im), quantize_chunk(x, qtype, im), x)


@pytest.mark.parametrize("qtype", K_QUANTS + LEGACY, ids=lambda q: q.name)
def test_imatrix_with_zeros_and_spread(qtype):
    """An imatrix with exact zeros and a 1e6 dynamic range (dead and hot input channels)."""
    k = 512
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, k)).astype(F)
    im = (rng.exponential(size=k) * np.exp(rng.uniform(-7, 7, k)) * (rng.random(k) < 0.8)).astype(F)
    with np.errstate(all="ignore"):
        assert_same_bytes(quantize(x, qtype, im), quantize_chunk(x, qtype, im), x)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_many_superblocks_cross_chunk_boundaries(qtype):
    """More super-blocks than one vectorised batch, so chunking and the per-row imatrix tiling are exercised."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((450, 2816)).astype(F) * F(0.05)
    im = imatrix(2816)
    for m in (None, im):
        assert_same_bytes(quantize(x, qtype, m), quantize_chunk(x, qtype, m), x)


@pytest.mark.parametrize("qtype", K_QUANTS + LEGACY, ids=lambda q: q.name)
def test_single_block_row(qtype):
    """One row of one super-block: every batch has a single group column (seqsum's fallback path)."""
    x = np.random.default_rng(2).standard_normal((1, 256)).astype(F)
    for im in (None, imatrix(256)):
        assert_same_bytes(quantize(x, qtype, im), quantize_chunk(x, qtype, im), x)
        assert_same_bytes(quantize(x[0], qtype, im)[None], quantize_chunk(x, qtype, im), x)


TOLERANCE = {
    Q.Q2_K: 0.33,
    Q.Q3_K: 0.17,
    Q.Q4_K: 0.08,
    Q.Q5_K: 0.04,
    Q.Q6_K: 0.02,
    Q.Q4_0: 0.095,
    Q.Q4_1: 0.085,
    Q.Q5_0: 0.047,
    Q.Q5_1: 0.042,
    Q.Q8_0: 0.006,
    Q.F16: 3e-4,
    Q.BF16: 2e-3,
    Q.MXFP4: 0.125,
}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_roundtrip_error(qtype):
    x = np.random.default_rng(3).standard_normal((2, 4, 2816)).astype(F)
    q = quantize(x, qtype)
    assert q.shape == (2, 4, row_bytes(qtype, 2816))
    y = dequantize(q, qtype).reshape(x.shape)
    assert y.dtype == np.float32
    assert np.sqrt(np.mean((y - x) ** 2)) < TOLERANCE[qtype]


def test_per_expert_imatrix_slices():
    """A 3-D expert tensor with one imatrix row per expert equals quantizing each expert with its own slice."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 8, 512)).astype(F)
    im = rng.random((3, 512)).astype(F)
    out = quantize(x, Q.Q4_K, im)
    for e in range(3):
        assert np.array_equal(out[e], quantize_chunk(x[e], Q.Q4_K, im[e]).reshape(8, -1))


def test_registry_and_errors():
    assert set(K_QUANTS + LEGACY + PASSTHROUGH) <= set(REGISTRY)
    x = np.zeros((2, 256), F)
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        quantize(np.zeros((2, 100), F), Q.Q4_K)
    with pytest.raises(TypeError, match="float32"):
        quantize(x.astype(np.float64), Q.Q4_K)
    with pytest.raises(ValueError, match="imatrix has 128 values, rows have 256"):
        quantize(x, Q.Q4_K, np.ones(128, F))
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        quantize(x, Q.IQ2_XXS)


def test_seqsum_is_left_to_right():
    """np.add.reduce over axis 0 of a C-contiguous (P, S>=2) array adds row after row; seqsum relies on it."""
    rng = np.random.default_rng(0)
    for p, s in [(16, 1), (16, 2), (32, 3), (32, 1000), (256, 17)]:
        a = (rng.standard_normal((p, s)) * 10.0 ** rng.integers(-3, 4, (p, s))).astype(F)
        acc0, acc1 = np.zeros(s, F), a[0].copy()
        for i in range(p):
            acc0 = acc0 + a[i]
            if i:
                acc1 = acc1 + a[i]
        assert np.array_equal(seqsum(a), acc0) and np.array_equal(seqsum(a, start_zero=False), acc1)


def test_nint_matches_the_c_bit_trick():
    t = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49, 4194303.0, 5e6, -5e6, np.inf, -np.inf, np.nan], F)
    assert nint(t[:7]).tolist() == [0, 2, 2, 0, -2, 3, 4194303]
    v = (t + F(12582912.0)).view(np.int32)
    assert np.array_equal(nint(t), (v & 0x7FFFFF) - 0x400000)
    assert nint(t[9:]).tolist() == [-4194304, -4194304, 0]
