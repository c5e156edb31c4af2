"""Shared pieces of the byte-exact NumPy ports of ggml's K-quant search routines (ggml/src/ggml-quants.c).

Layout convention: a batch of groups (sub-blocks) is held *position-major*, shape (P, S): row p holds element p
of every one of the S groups. Element-wise work then runs on whole arrays, and a left-to-right float32 sum over
the P positions -- what every `sum += ...` loop in the C code does -- is one `np.add.reduce(axis=0)` over a
C-contiguous (P, S) array with S >= 2 (NumPy adds row after row there; it only sums pairwise along the inner,
contiguous axis, which is why `np.sum` over a group is not used anywhere).

Every constant is a np.float32 so that nothing is promoted to float64 (NEP 50 keeps float32 op float32 scalar
in float32), and expressions keep the C evaluation order: `w*x*l` is `(w*x)*l`, `a*l + m - x` is `((a*l)+m)-x`.
"""

from __future__ import annotations

import functools

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: GROUP_MAX_EPS
_MAGIC = F32(12582912.0)  # 1.5 * 2**23, nearest_int's rounding constant
LIMIT = F32(4194304.0)  # 2**22: below it nearest_int == rint
ZERO = F32(0.0)


def seqsum(a: np.ndarray, start_zero: bool = True) -> np.ndarray:
    """Left-to-right float32 sum over axis 0 of a (P, S) array.

    start_zero mirrors `float s = 0; for (...) s += a[i]` (the first add turns -0.0 into +0.0); without it the
    sum starts from a[0], as make_qkx2_quants' sum_w/sum_x do."""
    a = np.ascontiguousarray(a)
    if a.ndim == 2 and a.shape[1] >= 2:
        return np.add.reduce(a, axis=0, initial=ZERO) if start_zero else np.add.reduce(a, axis=0)
    acc = np.zeros(a.shape[1:], F32) + a[0] if start_zero else a[0].copy()
    for i in range(1, a.shape[0]):
        acc = acc + a[i]
    return acc


def nint(t: np.ndarray) -> np.ndarray:
    """nearest_int(): add 1.5*2^23 in float32 and read the low mantissa bits (int32).

    Equals round-half-even for |t| < 2^22 and reproduces C's values outside it too (inf -> -4194304, NaN -> 0),
    which matters on rows with huge, sub-normal or overflowing values."""
    v = np.asarray(t, dtype=F32) + _MAGIC
    return (v.view(np.int32) & 0x7FFFFF) - 0x400000


def fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even, overflow to inf) and its read-back as float32."""
    h = np.asarray(v, dtype=F32).astype(np.float16)
    return h, h.astype(F32)


def first_abs_max(xg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over the last axis of group-major data: `if (fabsf(x) > amax) {amax = ..; max = x;}` from
    amax = max = 0 keeps the first element with the largest magnitude, sign included, skips NaN (a NaN scale
    never wins) and leaves max = +0.0 when nothing beats 0."""
    ax = np.abs(xg)
    ax = np.where(np.isnan(ax), ZERO, ax)
    idx = ax.argmax(axis=-1)[..., None]
    amax = np.take_along_axis(ax, idx, -1)[..., 0]
    return amax, np.where(amax > 0, np.take_along_axis(xg, idx, -1)[..., 0], ZERO)


def nan_skipping_max(a: np.ndarray, axis: int) -> np.ndarray:
    """`m = 0; if (a > m) m = a;` over an axis: NaN never wins and the result is at least +0.0."""
    return np.fmax(np.fmax.reduce(a, axis=axis), ZERO)


def update(mask: np.ndarray, *pairs) -> np.ndarray:
    """dst[mask] = src[mask] for each (dst, src) pair; returns the indices. Accepted trials are a minority, so
    gathering them beats np.where over the whole batch."""
    k = np.flatnonzero(mask)
    if k.size:
        for dst, src in pairs:
            dst[k] = src[k]
    return k


def abs_max_pm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """first_abs_max over the columns of position-major x (P, S), from row-wise fmax/fmin reductions (argmax
    along a short axis is ~20x slower). The first-occurrence rule only matters when +a and -a both reach the
    maximum; those columns are settled by scanning them."""
    hi, lo = np.fmax.reduce(x, axis=0), np.fmin.reduce(x, axis=0)
    nlo = -lo
    amax = np.fmax(np.fmax(hi, nlo), ZERO)
    mx = np.where(hi >= nlo, hi, lo)
    tie = np.flatnonzero((hi == nlo) & (amax > 0))
    if tie.size:
        _, mx[tie] = first_abs_max(np.ascontiguousarray(x[:, tie].T))
    mx[amax == 0] = 0
    return amax, mx


def min_max_pm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's `min = x[0]; if (x[i] < min) min = x[i]` (and max) per column of position-major x. Values come from
    plain reductions; only a zero minimum needs the sign of the first zero, which C keeps (and Q4_1/Q5_1 store)."""
    mn, mx = np.minimum.reduce(x, axis=0), np.maximum.reduce(x, axis=0)
    z = np.flatnonzero(mn == 0)
    if z.size:
        sub = x[:, z]
        mn[z] = sub[(sub == 0).argmax(axis=0), np.arange(z.size)]
    return mn, mx


# ---------------------------------------------------------------------------------------------- fused dot products
# make_qx_quants spends its time on sum_i w*x*l and sum_i w*l*l for 19 candidate scales. np.einsum("ij,ij->j")
# and ("ij,ij,ij->j") form each product and add it to the running column sum row after row, without a temporary,
# which is both faster than multiply + seqsum and -- where the build forms every product before adding it (no
# fused multiply-add) -- bit-identical to it. That is a property of the NumPy build, so it is checked once at
# first use against the explicit multiply-then-add loop and the slow path is kept as the fallback.
EINSUM_MIN_COLS = 16  # with a single column nditer makes the summed axis the inner loop (a SIMD dot product)
_EINSUM_EXACT: bool | None = None


def _explicit_dot(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    acc = np.zeros(a.shape[1], F32)
    for i in range(a.shape[0]):
        t = a[i] * b[i]
        if c is not None:
            t = t * c[i]
        acc = acc + t
    return acc


def einsum_is_exact() -> bool:
    """Whether np.einsum's column dot products equal the left-to-right multiply-then-add loop on this build.
    Columns of mixed magnitudes show the order of the additions; in others everything but rows 0-1 is zero and
    (1+2^-12)^2 - (1+2^-11) would come out as 2^-24 instead of 0 if a product were fused into the add (a*b+acc
    for two operands, (a*b)*c+acc for three). Several widths run both the vector bodies and the remainders."""
    global _EINSUM_EXACT
    if _EINSUM_EXACT is None:
        rng = np.random.default_rng(12345)
        u, v = F32(1 + 2.0**-12), F32(1 + 2.0**-11)
        ok = True
        with np.errstate(all="ignore"):
            for p, s in [(16, 16), (16, 17), (32, 67), (16, 1000), (16, 4099)]:
                a = (rng.standard_normal((p, s)) * np.exp(rng.uniform(-12, 12, (p, s)))).astype(F32)
                b = rng.integers(-33, 33, (p, s)).astype(F32)
                c = rng.integers(-33, 33, (p, s)).astype(F32)
                for col, (a1, b1, c1) in ((slice(0, None, 3), (u, u, 1)), (slice(1, None, 3), (u, 1, u))):
                    a[2:, col] = 0
                    a[0, col], b[0, col], c[0, col] = -v, 1, 1
                    a[1, col], b[1, col], c[1, col] = a1, b1, c1
                for args, spec in [((a, b), "ij,ij->j"), ((a, b, c), "ij,ij,ij->j")]:
                    out = np.empty(s, F32)
                    np.einsum(spec, *args, out=out)
                    ok &= bool(np.array_equal(out, _explicit_dot(*args), equal_nan=True))
        _EINSUM_EXACT = ok
    return _EINSUM_EXACT


def dot_pm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """Per column of position-major (P, S) arrays: float32 `s = 0; s += a*b` (or `s += a*b*c`, i.e. (a*b)*c)
    over the P rows in order, as the C loops accumulate."""
    if a.shape[1] >= EINSUM_MIN_COLS and einsum_is_exact():
        # C-contiguous operands keep the column axis innermost, the order the self-check saw
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        c = None if c is None else np.ascontiguousarray(c)
        out = np.empty(a.shape[1], F32)
        if c is None:
            return np.einsum("ij,ij->j", a, b, out=out)
        return np.einsum("ij,ij,ij->j", a, b, c, out=out)
    t = a * b
    if c is not None:
        t *= c
    return seqsum(t)


# ---------------------------------------------------------------------------------------------- make_qx_quants
_QX_STEPS = (0, *range(-9, 0), *range(1, 10))  # C's order: the initial iscale, then is = -9..9 without 0


def _qx_c(nmax: int, step: int) -> np.float32:
    """nmax + 0.1f*is in float32, the numerator of C's candidate iscale -(nmax + 0.1f*is)/max."""
    return F32(nmax) + F32(0.1) * F32(step)


@functools.cache
def _qx_clip_classes(nmax: int) -> dict[int, tuple[float | None, float | None]] | None:
    """Per candidate step, the (opposite-sign, same-sign) limits K on |x|/amax above which C's clamp of
    nearest_int(iscale*x) to [-nmax, nmax-1] bites, or None when the clamp is not needed at that step.

    With p = |x|/amax * c (c = nmax + 0.1*is; the float32 rounding of iscale and of the product is < 1e-6
    relative), an element on the side whose levels are positive (sign opposite to max) is clamped at nmax-1,
    one on max's side at -nmax. Replacing |x| by min(|x|, K*amax) with K*c_max < cap+0.5 and K*c_min > cap-0.5
    on each side gives the clamped level for every step of a class straight from nearest_int: elements below
    K never reach the cap there, elements above it always do. Classes: is <= -6 (no clamp), -5..4 (the
    positive side), 5..9 (both). Returns None if some margin is under 1e-3 (never for the nmax in use)."""
    classes = {
        -6: (None, None),
        4: ((nmax - 0.51) / (nmax + 0.4), None),
        9: ((nmax - 0.51) / (nmax + 0.9), (nmax + 0.49) / (nmax + 0.9)),
    }
    eps = 1e-6
    out = {}
    lo_step = -9
    for hi_step, (kp, kn) in classes.items():
        cs = [float(_qx_c(nmax, s)) for s in range(lo_step, hi_step + 1)]
        cmin, cmax = min(cs), max(cs)
        for k, cap in ((kp, nmax - 1), (kn, nmax)):
            if k is None:  # unclamped: the largest |p| must stay below cap + 0.5
                if cmax * (1 + eps) >= cap + 0.5 - 1e-3:
                    return None
            elif not (k * cmax * (1 + eps) < cap + 0.5 - 1e-3 and k * cmin * (1 - eps) > cap - 0.5 + 1e-3):
                return None
        for s in range(lo_step, hi_step + 1):
            out[s] = (kp, kn)
        lo_step = hi_step + 1
    return out


def make_qx_quants(
    x: np.ndarray, nmax: int, w: np.ndarray, levels: bool = True, amax_mx: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Port of make_qx_quants with rmse_type 1 (weights w: qw, or x*x when the C caller passes NULL).

    x, w: (P, S) position-major; amax_mx: abs_max_pm(x) if the caller has it. Returns (scale (S,), L (P, S)
    int32 in [0, 2*nmax)), or with levels=False (scale, iscale (S,)) where iscale is the winning candidate
    (qx_levels rebuilds L from it, as C does).

    Each of the 19 candidate scales costs four passes over the data on finite input: multiply and rint for the
    levels (the clamp folded into qx_unclamped_levels) and the two fused column sums of dot_pm."""
    amax, mx = abs_max_pm(x) if amax_mx is None else amax_mx
    zero = amax < GROUP_MAX_EPS
    mx = mx.copy()
    mx[zero] = 1
    wx = w * x
    lbuf = np.empty_like(x)

    finite = bool(np.isfinite(x).all())  # scales handed in by Q3_K's impl can be inf/NaN
    unclamped = qx_unclamped_levels(x, mx, nmax) if finite else None

    def trial(step, iscale):
        if unclamped is not None:
            unclamped(step, out=lbuf)
        else:
            qx_levels(x, iscale, nmax, finite, out=lbuf)
        return dot_pm(wx, lbuf), dot_pm(w, lbuf, lbuf)

    best = scale = best_is = None
    for step in _QX_STEPS:
        isc = -_qx_c(nmax, step) / mx
        sumlx, suml2 = trial(step, isc)
        if best is None:
            scale = sumlx / suml2  # C: suml2 ? sumlx/suml2 : 0
            scale[suml2 == 0] = 0
            best = scale * sumlx
            best_is = isc
            continue
        k = np.flatnonzero((suml2 > 0) & (sumlx * sumlx > best * suml2))
        if k.size:
            sl = sumlx[k]
            sk = sl / suml2[k]
            scale[k] = sk
            best[k] = sk * sl
            best_is[k] = isc[k]
    scale[zero] = 0
    if not levels:
        return scale, best_is
    # C rebuilds L from the winning iscale, so recomputing it once at the end gives the same levels.
    L = qx_levels(x, best_is, nmax, finite).astype(np.int32) + nmax
    L[:, zero] = 0
    return scale, L


def qx_unclamped_levels(x: np.ndarray, mx: np.ndarray, nmax: int):
    """For finite x (P, S) and each group's max mx (nonzero): a function step -> the float32 levels
    MAX(-nmax, MIN(nmax-1, nearest_int(x * (-(nmax + 0.1f*step)/mx)))), computed as a multiply and a rint only:
    x is limited once per clamp class instead (see _qx_clip_classes). None if the classes do not apply to nmax.

    The clamped classes work on y = x*sign(max) with iscale -c/|max|: every step of C's nearest_int(x*(-c/max))
    is sign-symmetric, so the product is the same float, and on y max's side (levels <= 0, clamp at -nmax) is
    y > 0, the other side (clamp at nmax-1) y < 0: the limits become plain lower/upper bounds per group."""
    classes = _qx_clip_classes(nmax)
    if classes is None:
        return None
    amx = np.abs(mx)
    y = x * np.sign(mx)
    inputs = {(None, None): (x, mx)}
    for key in set(classes.values()) - {(None, None)}:
        kp, kn = key
        yk = np.maximum(y, -(F32(kp) * amx))
        if kn is not None:
            np.minimum(yk, F32(kn) * amx, out=yk)
        inputs[key] = (yk, amx)
    del y

    def levels(step: int, out: np.ndarray | None = None) -> np.ndarray:
        arr, den = inputs[classes[step]]
        # |iscale*x| <= nmax+1 for finite x, so rint is nearest_int
        t = np.multiply(arr, -_qx_c(nmax, step) / den, out=out)
        return np.rint(t, out=t)

    return levels


def qx_levels(x: np.ndarray, iscale: np.ndarray, nmax: int, finite: bool = True, out=None) -> np.ndarray:
    """MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x))) as float32 (without make_qx_quants' +nmax offset)."""
    t = np.multiply(x, iscale, out=out)
    if finite:
        np.rint(t, out=t)
        return np.clip(t, -F32(nmax), F32(nmax - 1), out=t)
    t[...] = np.clip(nint(t), -nmax, nmax - 1)
    return t


# ------------------------------------------------------------------------------------ coordinate descent
def descend(x, w, wx, L, sumlx, suml2, lo, hi, qp: bool, wxL=None, wLL=None):
    """The up-to-5-pass level refinement shared by make_q3_quants (qp=False) and make_qp_quants (qp=True).

    x, w, wx = w*x, L: (n, S) float32; L is updated in place. Per position i, C proposes
    nearest_int(x*sl2/slx) without element i's contribution and keeps it when slx^2/sl2 grows. A group stops
    after a pass without changes (C's `if (!n_changed) break;`), so later passes run only on the groups that
    changed in the previous one -- a shrinking, gathered subset.
    q3: clamp [lo, hi], needs sl2 > 0 after the change. qp: MIN(hi, .) only, needs slx > 0 && sl2 > 0 before
    it, and L is a uint8 array (stores wrap, the int proposal does not).
    w*x*L[i] and w*L[i]*L[i] only change with L[i], which only changes at step i, so they are formed once per
    pass for all positions (wxL, wLL; the caller may hand in the first pass's)."""
    idx = None
    xs, ws, wxs, Ls, a, b = x, w, wx, L, sumlx.copy(), suml2.copy()
    for _ in range(5):
        changed = np.zeros(xs.shape[1], bool)
        if wxL is None:
            wxL, wLL = wxs * Ls, ws * Ls * Ls
        for i in range(xs.shape[0]):
            Li, wi, wxi = Ls[i], ws[i], wxs[i]
            slx = a - wxL[i]
            sl2 = b - wLL[i]
            t = xs[i] * sl2 / slx
            r = np.rint(t)
            big = ~(np.abs(t) < LIMIT)  # nearest_int leaves round-half-even territory (or t is inf/NaN)
            if big.any():
                r[big] = nint(t[big])
            if qp:
                np.minimum(r, F32(hi), out=r)
                cand = (r != Li) & (slx > 0) & (sl2 > 0)
            else:
                np.clip(r, F32(lo), F32(hi), out=r)
                cand = (r != Li) & (slx > 0)
            k = np.flatnonzero(cand)
            if not k.size:
                continue
            rk, wk, ak, bk = r[k], wi[k], a[k], b[k]
            slx2 = slx[k] + wxi[k] * rk
            sl22 = sl2[k] + wk * rk * rk
            ok = slx2 * slx2 * bk > ak * ak * sl22
            if not qp:
                ok &= sl22 > 0
            kk = k[ok]
            Li[kk] = (rk[ok].astype(np.int32) & 0xFF) if qp else rk[ok]
            a[kk], b[kk], changed[kk] = slx2[ok], sl22[ok], True
        if idx is None:
            sumlx, suml2 = a, b
        else:
            L[:, idx], sumlx[idx], suml2[idx] = Ls, a, b
        keep = np.flatnonzero(changed)
        if keep.size == 0:
            break
        idx = keep if idx is None else idx[keep]
        # take(axis=1) keeps rows C-contiguous (x[:, keep] would come back Fortran-ordered)
        xs, ws, wxs, Ls = (v.take(keep, axis=1) for v in (xs, ws, wxs, Ls))
        a, b, wxL = a[keep], b[keep], None
    return L, sumlx, suml2


# --------------------------------------------------------------------------------------------- make_q3_quants
def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Port of make_q3_quants(do_rmse=true): x^2 weights, levels from -nmax/max, then descend().
    Returns (scale (S,), L (P, S) int32 in [0, 2*nmax))."""
    amax, mx = abs_max_pm(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    nm = F32(nmax)
    iscale = -nm / mx
    L = x * iscale
    L = np.clip(np.rint(L), -nm, nm - 1) if np.isfinite(L).all() else np.clip(nint(L), -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    wxL, wLL = wx * L, w * L * L
    sumlx, suml2 = seqsum(wxL), seqsum(wLL)
    L, sumlx, suml2 = descend(x, w, wx, L, sumlx, suml2, -nmax, nmax - 1, False, wxL, wLL)
    scale = np.where(suml2 > 0, sumlx / suml2, ZERO)
    Li = L.astype(np.int32) + nmax
    Li[:, zero] = 0
    return np.where(zero, ZERO, scale), Li


# ------------------------------------------------------------------------------ make_qkx2_quants / make_qkx3_quants
def make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Port of make_qkx2_quants (and make_qkx3_quants with explicit weights, which only differs in `max <= min`,
    the same test for non-NaN data since min <= max). Returns (scale (S,), the_min (S,), L (P, S) int32)."""
    mn, mx = min_max_pm(x)
    sum_w = seqsum(w, start_zero=False)
    sum_x = seqsum(w * x, start_zero=False)
    mn = np.where(mn > 0, ZERO, mn)
    flat = mx == mn
    nm = F32(nmax)
    iscale = nm / (mx - mn)
    scale = F32(1) / iscale
    iscale = np.where(flat, ZERO, iscale)
    lb = np.empty_like(x)
    buf = np.empty_like(x)

    def levels(isc, m):
        """clamp(nearest_int(isc*(x - m)), 0, nmax) as float32 levels. C moves `min` to each accepted fit, so
        later trials can see x - min < 0 or a tiny max - min; rint is only used where |isc*(x-m)| < 2^22."""
        np.subtract(x, m, out=lb)
        np.multiply(lb, isc, out=lb)
        bound = np.abs(isc) * np.maximum(mx - m, m - mn)
        if np.all(bound < F32(4.0e6)):
            np.rint(lb, out=lb)
            return np.clip(lb, ZERO, nm, out=lb)
        lb[...] = np.clip(nint(lb), 0, nmax)
        return lb

    def error(sc, m, lev):
        d = np.multiply(lev, sc, out=buf)
        np.add(d, m, out=d)
        np.subtract(d, x, out=d)
        if use_mad:
            return dot_pm(np.abs(d, out=d), w)  # w*|d|
        return dot_pm(d, d, w)  # w*(d*d)

    # (iscale, min) that produced the kept levels, to rebuild them once at the end
    best_is, best_lm, cur_min = iscale.copy(), mn.copy(), mn.copy()
    best = error(scale, mn, levels(iscale, mn))
    any_flat, live = flat.any(), ~flat
    for step in range(nstep + 1):
        isc = (F32(rmin) + F32(rdelta) * F32(step) + nm) / (mx - cur_min)
        if any_flat:
            isc[flat] = 0  # flat groups never take a trial; keep them off the exact path
        lev = levels(isc, cur_min)
        sum_l = dot_pm(w, lev)  # w*l
        sum_l2 = dot_pm(w, lev, lev)  # w*l*l
        sum_xl = dot_pm(w, lev, x)  # w*l*x
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        update(this_min > 0, (this_min, np.zeros_like(this_min)), (this_scale, sum_xl / sum_l2))
        err = error(this_scale, this_min, lev)
        update(
            (D > 0) & (err < best) & live,
            (best, err),
            (scale, this_scale),
            (best_is, isc),
            (best_lm, cur_min),
            (cur_min, this_min),
        )
    L = levels(best_is, best_lm).astype(np.int32)
    # a flat group returns before the search in C: no levels, scale 0, the_min = -min
    L[:, flat] = 0
    return np.where(flat, ZERO, scale), -cur_min, L


# --------------------------------------------------------------------------------------------- make_qp_quants
def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Port of make_qp_quants: x (n, S) non-negative sub-block scales or mins, qw (n, S) their weights.

    L is C's uint8 array, so every store wraps modulo 256 (`& 0xFF`) while the int `l` used in the same
    expression does not. Returns (scale (S,), L (n, S) int32)."""
    mx = np.zeros(x.shape[1], F32)
    for xi in x:  # MAX(max, x) = max > x ? max : x, with C's NaN behaviour (a NaN x replaces max)
        mx = np.where(mx > xi, mx, xi)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    nm = F32(nmax)
    iscale = nm / mx
    L0 = (nint(iscale * x) & 0xFF).astype(F32)
    scale = F32(1) / iscale
    diff = x - scale * L0
    best = seqsum(qw * diff * diff)
    iscale = iscale.copy()
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = (F32(0.1) * F32(step) + nm) / mx
        sc = F32(1) / isc
        li = np.minimum(nint(isc * x), nmax).astype(F32)
        diff = x - sc * li
        mse = seqsum(qw * diff * diff)
        update(mse < best, (best, mse), (iscale, isc))
    li = np.minimum(nint(iscale * x), nmax)
    lf = li.astype(F32)
    L = (li & 0xFF).astype(F32)
    wx = qw * x
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(qw * lf * lf)
    L, sumlx, suml2 = descend(x, qw, wx, L, sumlx, suml2, None, nmax, True)
    scale = np.where(suml2 > 0, sumlx / suml2, ZERO)
    Li = L.astype(np.int32)
    Li[:, zero] = 0
    return np.where(zero, ZERO, scale), Li


# ------------------------------------------------------------------------------------------------ driver
def run_blocks(
    x: np.ndarray, qw: np.ndarray | None, block_fn, block_bytes: int, chunk_blocks: int, qw_chunk=None
) -> np.ndarray:
    """Apply block_fn(x_chunk (cb, B), qw_chunk | None) -> (cb, block_bytes) uint8 over the blocks of x (nb, B)
    in batches of chunk_blocks. qw: None, or a (period, B) table where block i uses row i % period (the
    imatrix of one row repeats for every row; pass period = nb for per-block weights). qw_chunk(c0, c1), if
    given, builds the weights block_fn gets for blocks c0..c1 instead (in whatever layout it wants)."""
    nb = x.shape[0]
    out = np.empty((nb, block_bytes), np.uint8)
    with np.errstate(all="ignore"):
        for c0 in range(0, nb, chunk_blocks):
            c1 = min(nb, c0 + chunk_blocks)
            qc = None
            if qw_chunk is not None:
                qc = qw_chunk(c0, c1)
            elif qw is not None:
                qc = qw[c0:c1] if len(qw) == nb else qw.take(np.arange(c0, c1) % len(qw), axis=0)
            out[c0:c1] = block_fn(x[c0:c1], qc)
    return out
