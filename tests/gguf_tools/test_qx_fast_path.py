"""The fast path of make_qx_quants (Q6_K, Q3_K's impl, Q4_0/Q5_0 with an imatrix): fused einsum column sums and
the clamp folded into per-class limits on x. Each piece against its plain definition, then the bytes against
llama.cpp's ggml_quantize_chunk on data built to sit on the edges those shortcuts rely on."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from gguf_tools.quants import kquants_common as kc
from gguf_tools.quants import quantize

F = np.float32


def explicit_dot(a, b, c=None):
    acc = np.zeros(a.shape[1], F)
    for i in range(a.shape[0]):
        t = a[i] * b[i] if c is None else (a[i] * b[i]) * c[i]
        acc = acc + t
    return acc


@pytest.mark.parametrize("p, s", [(16, 1), (16, 2), (16, 15), (16, 16), (16, 33), (32, 1000), (16, 16384)])
def test_dot_pm_is_the_left_to_right_loop(p, s):
    rng = np.random.default_rng(p * 7 + s)
    a = (rng.standard_normal((p, s)) * np.exp(rng.uniform(-20, 20, (p, s)))).astype(F)
    b = rng.integers(-33, 33, (p, s)).astype(F)
    c = rng.integers(-33, 33, (p, s)).astype(F)
    a[rng.random((p, s)) < 0.1] = -0.0
    with np.errstate(all="ignore"):
        assert np.array_equal(kc.dot_pm(a, b), explicit_dot(a, b), equal_nan=True)
        assert np.array_equal(kc.dot_pm(a, b, c), explicit_dot(a, b, c), equal_nan=True)


def test_einsum_self_check_runs_and_is_cached():
    first = kc.einsum_is_exact()
    assert isinstance(first, bool) and kc.einsum_is_exact() is first


def edge_groups(rng: np.random.Generator, s: int) -> np.ndarray:
    """(16, s) position-major groups: elements near +-max on both sides, opposite-sign pairs of equal
    magnitude, grid values that put x*iscale on half-integers, integers, sub-normals, huge and tiny scales."""
    x = rng.standard_normal((16, s)).astype(F)
    kind = rng.integers(0, 8, s)
    amax = np.abs(x).max(axis=0)
    m = kind == 1
    x[:, m] = np.sign(rng.standard_normal((16, m.sum()))) * amax[m] * rng.uniform(0.93, 1.0, (16, m.sum()))
    m = kind == 2
    x[:, m] = rng.integers(-64, 65, (16, m.sum())) / 64
    m = kind == 3
    x[0, m], x[1, m] = amax[m], -amax[m]
    m = kind == 4
    x[:, m] = rng.integers(-33, 33, (16, m.sum()))
    m = kind == 5
    x[:, m] = rng.integers(-3, 4, (16, m.sum())) * (F(31.5) / F(32.5))
    m = kind == 6
    x[:, m] *= F(1e-41)
    x *= np.exp(rng.uniform(-30, 30, s)).astype(F)
    return x.astype(F)


@pytest.mark.parametrize("nmax", [4, 8, 16, 32])
def test_clamp_classes_give_the_clamped_levels(nmax):
    """qx_unclamped_levels(step) == MAX(-nmax, MIN(nmax-1, nearest_int(x*iscale))) for every candidate step."""
    rng = np.random.default_rng(nmax)
    x = edge_groups(rng, 20000)
    amax, mx = kc.abs_max_pm(x)
    mx[amax < kc.GROUP_MAX_EPS] = 1
    fast = kc.qx_unclamped_levels(x, mx, nmax)
    assert fast is not None
    for step in kc._QX_STEPS:
        iscale = -kc._qx_c(nmax, step) / mx
        want = np.clip(kc.nint(x * iscale), -nmax, nmax - 1)
        assert np.array_equal(fast(step), want), f"step {step}"


def test_make_qx_quants_fast_equals_reference_loop(monkeypatch):
    """The whole search with the shortcuts on and off (plain multiply + seqsum, explicit clamp)."""
    rng = np.random.default_rng(5)
    x = edge_groups(rng, 4096)
    for w in (x * x, rng.exponential(size=x.shape).astype(F) * (rng.random(x.shape) < 0.8)):
        with np.errstate(all="ignore"):
            fast = kc.make_qx_quants(x, 32, w)
            monkeypatch.setattr(kc, "_EINSUM_EXACT", False)
            monkeypatch.setattr(kc, "qx_unclamped_levels", lambda *a: None)
            slow = kc.make_qx_quants(x, 32, w)
        monkeypatch.undo()
        assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])


pytest.importorskip("llama_cpp")
from tests.oracles.ggml_lib import quantize_chunk  # noqa: E402


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q3_K, Q.Q4_0, Q.Q5_0], ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_groups_match_ggml(qtype, seed):
    rng = np.random.default_rng(50 + seed)
    k = [256, 512, 2816][seed]
    x = np.ascontiguousarray(edge_groups(rng, 48 * k // 16).T).reshape(48, k)
    ims = [(rng.random(k) ** 2 * 50 + 1e-3).astype(F), (rng.exponential(size=k) * (rng.random(k) < 0.8)).astype(F)]
    if qtype in (Q.Q6_K, Q.Q3_K):
        ims.append(None)  # Q4_0/Q5_0 only reach make_qx_quants with an imatrix
    for im in ims:
        with np.errstate(all="ignore"):
            ours, ref = quantize(x, qtype, im).reshape(-1), quantize_chunk(x, qtype, im)
        assert np.array_equal(ours, ref), f"imatrix={'none' if im is None else 'yes'}"


def test_q6k_many_chunks_with_imatrix_tiling():
    """Row length not dividing the chunk: the position-major imatrix slices wrap around the row."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((300, 2816)) * 0.02).astype(F)
    im = (rng.random(2816) ** 2 * 50 + 1e-3).astype(F)
    for m in (None, im):
        assert np.array_equal(quantize(x, Q.Q6_K, m).reshape(-1), quantize_chunk(x, Q.Q6_K, m))
