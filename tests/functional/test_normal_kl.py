"""Tests of ``probloss.functional.divergence.normal_kl``.

Where the numbers come from
---------------------------
Expected values are mpmath evaluations of the textbook closed form at the inputs after the
cast to the dtype under test (differences formed exactly),

    KL = (log_var_p - log_var_q + exp(log_var_q - log_var_p)
          + (loc_q - loc_p)^2 exp(-log_var_p) - 1) / 2,

with derivatives ``dKL/dloc_q = -dKL/dloc_p = (loc_q - loc_p) exp(-log_var_p)``,
``dKL/dlog_var_q = (exp(d) - 1) / 2`` and ``dKL/dlog_var_p = -(exp(d) - 1) / 2 - (loc_q -
loc_p)^2 exp(-log_var_p) / 2``, ``d = log_var_q - log_var_p``. This form cancels
catastrophically as q -> p, so it is evaluated by ``cb_reference._converged`` (doubling
the precision until two evaluations agree to 25 digits); genuine zeros (equal arguments)
are returned directly. None of the implementation's forms (``expm1mx``, the scaled
product) is reused.

Bounds
------
The KL and the first three derivatives are single non-negative sums or products: bounded
relative to themselves. ``dKL/dlog_var_p`` is a sum of two terms of opposite sign for
d < 0: bounded relative to the sum of their magnitudes. Derivation (float32): the KL is
the sum of two non-negative terms, ``expm1mx(d)/2`` (the special functions' 8.4-ulp
contract, plus about an ulp for the compensated rounding of ``d``) and ``2 w^2`` with
``w = mul_exp(Delta/2, -lv/2)`` (two roundings in ``w``, so five in ``w^2``): a sum of
non-negative terms errs by at most its worst term plus one rounding, 10 ulp = 1.2e-6;
the gradients are single ``mul_exp`` products (3 ulp), ``expm1`` (1 ulp) or such a sum,
within the same 10 ulp. float64 is held to the contract's 1e-13.
Half-precision inputs are computed in float32 (held to the float32 bound; their gradients
come back in the input dtype, to its eps). Where the exact value exceeds the dtype's range
the result must be inf. Measured worst (f32 / f64): value 2.1e-7 / 3.4e-16, gradients
2.3e-7 / 4.5e-16.
"""

from __future__ import annotations

import functools
import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp
from torch.distributions import Normal, kl_divergence

from probloss.functional.divergence import normal_kl
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, cast, dtype_id
from tests.functional.cb_reference import _converged, to_float64

RTOL = {torch.float32: 10 * torch.finfo(torch.float32).eps, torch.float64: 1e-13}


def _kl(mq, lq, mp_, lp):
    dm = mp.fsub(mq, mp_, exact=True)
    d = mp.fsub(lq, lp, exact=True)
    return (-d + mp.exp(d) + dm * dm * mp.exp(-lp) - 1) / 2


def _dloc_q(mq, lq, mp_, lp):
    return mp.fsub(mq, mp_, exact=True) * mp.exp(-lp)


def _dlog_var_q(mq, lq, mp_, lp):
    return mp.expm1(mp.fsub(lq, lp, exact=True)) / 2


def _dlog_var_p(mq, lq, mp_, lp):
    dm = mp.fsub(mq, mp_, exact=True)
    return -mp.expm1(mp.fsub(lq, lp, exact=True)) / 2 - dm * dm * mp.exp(-lp) / 2


def _dlog_var_p_magnitude(mq, lq, mp_, lp):
    dm = mp.fsub(mq, mp_, exact=True)
    return abs(mp.expm1(mp.fsub(lq, lp, exact=True))) / 2 + dm * dm * mp.exp(-lp) / 2


@functools.cache
def kl_ref(mq: float, lq: float, mp_: float, lp: float) -> tuple[float, ...]:
    """(KL, dKL/dloc_q, dKL/dlog_var_q, dKL/dlog_var_p, its magnitude), float64-rounded."""
    same_loc, same_var = mq == mp_, lq == lp
    zero = mpmath.mpf(0)
    args = (mq, lq, mp_, lp)
    kl = zero if same_loc and same_var else _converged(_kl, *args)
    dloc = zero if same_loc else _converged(_dloc_q, *args)
    dlq = zero if same_var else _converged(_dlog_var_q, *args)
    if same_loc and same_var:
        dlp = mag = zero
    else:
        dlp = _converged(_dlog_var_p, *args)
        mag = _converged(_dlog_var_p_magnitude, *args)
    return tuple(to_float64(v) for v in (kl, dloc, dlq, dlp, mag))


# ======================================================================================
# Grid
# ======================================================================================

LOG_VARS = [-60.0, -30.0, -5.0, -1.0, -1e-4, 0.0, 1e-7, 0.3, 2.0, 10.0, 30.0, 60.0]
LOC_PAIRS = [(0.0, 0.0), (0.5, 0.0), (0.0, -3.0), (1e-8, 0.0), (1e4, 1e4 + 1.0)]
LOC_PAIRS += [(1e20, 0.0), (-7.0, 2.0)]


def _quads() -> list[tuple[float, float, float, float]]:
    quads = [
        (mq, lq, mp_, lp)
        for lq, lp in itertools.product(LOG_VARS, LOG_VARS)
        for mq, mp_ in LOC_PAIRS
    ]
    # q -> p: relative and absolute log-variance offsets, equal or nearly equal means
    for lv in (-30.0, -1.0, 0.0, 2.0, 30.0):
        for delta in (1e-7, 1e-4, 1e-2):
            for other in (lv + delta, lv - delta, lv * (1 + delta)):
                quads += [(0.0, lv, 0.0, other), (0.5, lv, 0.5 + 1e-6, other)]
    # no overflow where the KL is finite: (dm)^2 e^-lp with e^-lp or dm^2 alone overflowing
    # float32, and e^d just above float32's max with e^d / 2 below it
    quads += [(1e19, 0.0, 0.0, 0.0), (1e-30, 0.0, 0.0, -150.0), (0.0, 89.0, 0.0, 0.0)]
    quads += [(0.0, 0.0, 0.0, -400.0), (1.0, 0.0, 0.0, 400.0)]
    return quads


def _cast(values, dtype):
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@functools.cache
def _grid(dtype: torch.dtype):
    quads = _quads()
    cols = [_cast([q[k] for q in quads], dtype) for k in range(4)]
    ok = torch.stack([torch.isfinite(c) for c in cols]).all(0)
    cast = list(zip(*(c[ok].double().tolist() for c in cols), strict=True))
    return sorted(set(cast))


def _check(got, exact, magnitude, rtol, dtype, labels, what):
    """Relative-to-magnitude bound (plus tiny); inf of the right sign where the exact value
    overflows ``dtype``."""
    got = np.asarray(got, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    over = np.abs(exact) > torch.finfo(dtype).max
    bad = np.flatnonzero(over & ~(got == np.copysign(np.inf, exact)))
    assert not bad.size, f"{what}: expected overflow to inf at {[labels[i] for i in bad[:5]]}"
    keep = np.flatnonzero(~over)
    bound = rtol * np.abs(np.asarray(magnitude)[keep]) + torch.finfo(dtype).tiny
    assert_within(got[keep], exact[keep], bound, [labels[i] for i in keep], what)


# ======================================================================================
# Accuracy against mpmath
# ======================================================================================


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_normal_kl_matches_mpmath(dtype):
    """Value and all four gradients on the grid (log-variances +-60, near-equal pairs,
    means up to 1e20, overflow-edge cases), every dtype."""
    quads = _grid(dtype)
    mq, lq, mp_, lp = (_cast([q[k] for q in quads], dtype).requires_grad_() for k in range(4))
    out = normal_kl(mq, lq, mp_, lp)
    out_dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    assert out.dtype == out_dtype
    out.sum().backward()
    ref = np.array([kl_ref(*q) for q in quads])
    rtol = RTOL[out_dtype]
    g_rtol = torch.finfo(dtype).eps if dtype in HALF_DTYPES else rtol
    _check(out.detach().double(), ref[:, 0], ref[:, 0], rtol, out_dtype, quads, "KL")
    _check(mq.grad.double(), ref[:, 1], ref[:, 1], g_rtol, dtype, quads, "dKL/dloc_q")
    _check(mp_.grad.double(), -ref[:, 1], ref[:, 1], g_rtol, dtype, quads, "dKL/dloc_p")
    _check(lq.grad.double(), ref[:, 2], ref[:, 2], g_rtol, dtype, quads, "dKL/dlog_var_q")
    _check(lp.grad.double(), ref[:, 3], ref[:, 4], g_rtol, dtype, quads, "dKL/dlog_var_p")


def test_bound_rejects_the_textbook_formula():
    """The float32 bound fails log(sp/sq) + (vq + dm^2)/(2 vp) - 1/2 near q == p, so the
    accuracy test can fail."""
    quads = [q for q in _grid(torch.float32) if q[0] == q[2] and 0 < abs(q[1] - q[3]) < 1e-3]
    mq, lq, mp_, lp = (_cast([q[k] for q in quads], torch.float32) for k in range(4))
    textbook = 0.5 * (lp - lq) + (lq.exp() + (mq - mp_) ** 2) / (2 * lp.exp()) - 0.5
    exact = np.array([kl_ref(*q)[0] for q in quads])
    assert (np.abs(textbook.double().numpy() - exact) > RTOL[torch.float32] * exact).any()


@pytest.mark.parametrize("log_var", [30.0, -30.0])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_log_var_30(dtype, log_var):
    """float16/bfloat16 log_var = +-30 against the standard normal prior: the float32 result
    is right (5.34e12, beyond float16's 65504; and 14.5 + e^-30 / 2), the gradient in loc
    finite. The gradient in log_var, expm1(d)/2, is 5.3e12 at +30 and returned in the
    input dtype: inf in float16 (the exact value rounded), finite in bfloat16."""
    mu = torch.tensor([0.0, 1.5], dtype=dtype, requires_grad=True)
    lv = torch.full((2,), log_var, dtype=dtype, requires_grad=True)
    out = normal_kl(mu, lv)
    assert out.dtype == torch.float32
    out.sum().backward()
    exact = [kl_ref(m, log_var, 0.0, 0.0) for m in mu.tolist()]
    for k in range(2):
        assert math.isclose(out[k].item(), exact[k][0], rel_tol=RTOL[torch.float32])
        assert math.isclose(lv.grad[k].item(), exact[k][2], rel_tol=torch.finfo(dtype).eps) or (
            abs(exact[k][2]) > torch.finfo(dtype).max and lv.grad[k].item() == math.inf
        )
    assert torch.isfinite(mu.grad).all()


# ======================================================================================
# Properties
# ======================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_kl_nonnegative_property(dtype):
    """KL >= 0 and never NaN for any means in +-1e6 and log-variances in +-200 (the KL may
    overflow to inf; it must not be negative or NaN), near-equal pairs half the time."""
    width = 32 if dtype == torch.float32 else 64
    loc = st.floats(-1e6, 1e6, width=width)
    lv = st.floats(-200.0, 200.0, width=width)

    @settings(max_examples=300, deadline=None)
    @given(loc, lv, loc, lv, st.booleans(), st.floats(-1e-4, 1e-4))
    def check(mq, lq, mp_, lp, near, rel):
        if near:
            mp_, lp = mq * (1 + rel), lq + rel
        t = [torch.tensor(v, dtype=dtype) for v in (mq, lq, mp_, lp)]
        kl = normal_kl(*t)
        assert not torch.isnan(kl) and kl >= 0, (mq, lq, mp_, lp, kl)

    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_kl_zero_iff_equal_property(dtype):
    """KL(q, q) == 0 exactly; KL > 0 when the means or log-variances differ by >= 1e-3
    (|log-variances| <= 20, |means| <= 100: the exact KL is >= ~1e-16, far above underflow)."""

    @settings(max_examples=200, deadline=None)
    @given(
        st.floats(-100.0, 100.0),
        st.floats(-20.0, 20.0),
        st.floats(1e-3, 5.0),
        st.sampled_from(["loc", "log_var", "both"]),
    )
    def check(mq, lq, delta, which):
        q = (torch.tensor(mq, dtype=dtype), torch.tensor(lq, dtype=dtype))
        assert normal_kl(*q, *q) == 0
        dm = delta if which in ("loc", "both") else 0.0
        dl = delta if which in ("log_var", "both") else 0.0
        assert normal_kl(*q, q[0] + dm, q[1] - dl) > 0

    check()


# ======================================================================================
# torch.distributions, defaults, shapes, gradcheck
# ======================================================================================


def test_agrees_with_torch_where_torch_is_right():
    """kl_divergence(Normal, Normal) in float64 at moderate parameters with KL >= 1e-2:
    torch's var_ratio - 1 - log(var_ratio) does not cancel much there (measured 3e-15),
    bound 1e-13 relative."""
    gen = torch.Generator().manual_seed(0)
    mq, mp_ = torch.randn(2, 400, generator=gen, dtype=torch.float64) * 2
    lq, lp = torch.randn(2, 400, generator=gen, dtype=torch.float64) * 2
    ours = normal_kl(mq, lq, mp_, lp)
    theirs = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp_, (0.5 * lp).exp()))
    keep = theirs >= 1e-2
    assert keep.sum() > 300
    labels = list(range(int(keep.sum())))
    assert_within(ours[keep], theirs[keep], 1e-13 * theirs[keep], labels, "vs torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_torch_is_wrong_near_equal_variances_and_ours_is_not(dtype):
    """Near q == p torch's ``var_ratio - 1 - log(var_ratio)`` turns the rounding of
    ``var_ratio`` into a relative error of about ``2 eps / |d|``: at d = 1e-9 (float64) or
    1e-3 (float32) it misses our bound by more than 10x (measured 1.7e-8..1.5e-7 and
    3.6e-5..1.1e-4 relative), while ours meets it against mpmath."""
    d = 1e-9 if dtype == torch.float64 else 1e-3
    lq = _cast([d, -d, 2.0 + d, 3 * d], dtype)
    lp = _cast([0.0, 0.0, 2.0, 0.0], dtype)
    zero = torch.zeros(4, dtype=dtype)
    quads = [(0.0, a, 0.0, b) for a, b in zip(lq.tolist(), lp.tolist(), strict=True)]
    exact = np.array([kl_ref(*q)[0] for q in quads])
    theirs = kl_divergence(Normal(zero, (0.5 * lq).exp()), Normal(zero, (0.5 * lp).exp()))
    rtol = RTOL[dtype]
    assert (np.abs(theirs.double().numpy() - exact) > 10 * rtol * exact).all()
    ours = normal_kl(zero, lq, zero, lp).double().numpy()
    assert_within(ours, exact, rtol * exact, quads, "ours near q == p")


def test_defaults_are_the_standard_normal():
    mq = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    lq = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    full = normal_kl(mq, lq, zero, zero)
    assert torch.equal(normal_kl(mq, lq), full)
    assert torch.equal(normal_kl(mq, lq, loc_p=zero), full)
    assert torch.equal(normal_kl(mq, lq, log_var_p=zero), full)
    assert torch.equal(normal_kl(mq, lq, loc_p=1.0), normal_kl(mq, lq, zero + 1.0, zero))
    assert torch.equal(normal_kl(mq, lq, log_var_p=2.0), normal_kl(mq, lq, zero, zero + 2.0))


def test_shapes_and_errors():
    out = normal_kl(torch.zeros(4, 1), torch.zeros(1, 3))
    assert out.shape == (4, 3)
    with pytest.raises(ValueError, match=r"loc_q \(3,\), log_var_q \(2,\)"):
        normal_kl(torch.zeros(3), torch.zeros(2))
    with pytest.raises(TypeError, match="floating"):
        normal_kl(torch.zeros(3, dtype=torch.int64), torch.zeros(3))


def test_gradcheck_float64():
    mq = torch.tensor([0.0, 0.5, -3.0, 1e-3, 2.0], dtype=torch.float64, requires_grad=True)
    lq = torch.tensor([0.0, -2.0, 1.0, 1e-4, 30.0], dtype=torch.float64, requires_grad=True)
    mp_ = torch.tensor([0.1, 0.5, 4.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    lp = torch.tensor([0.0, 1.0, -5.0, 0.0, 29.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(normal_kl, (mq, lq, mp_, lp))
    assert torch.autograd.gradgradcheck(normal_kl, (mq, lq, mp_, lp))


def test_rounding_of_the_log_variance_difference_is_compensated():
    """float32, d = log_var_q - log_var_p near 85 and not exactly representable: rounding d
    alone costs up to |d| eps / 2 = 5e-6 relative in e^d (the KL); the compensated
    difference keeps value and dKL/dlog_var_q within the float32 bound (1.2e-6) of mpmath.
    The cases are chosen so the rounding error of d exceeds 2e-6 (checked), i.e. the bound
    would fail without the compensation."""
    lq = torch.full((5,), 85.0)
    lp = torch.tensor([-7e-3, 4.3e-3, -0.3, -1.7, 2.3])
    d64 = lq.double() - lp.double()  # exact in float64
    assert ((d64 - (lq - lp).double()).abs() > 2e-6).all()
    lq.requires_grad_()
    zero = torch.zeros(5)
    out = normal_kl(zero, lq, zero, lp)
    out.sum().backward()
    quads = [(0.0, 85.0, 0.0, b) for b in lp.tolist()]
    ref = np.array([kl_ref(*q) for q in quads])
    rtol = RTOL[torch.float32]
    assert_within(out.detach().double(), ref[:, 0], rtol * ref[:, 0], quads, "KL")
    assert_within(lq.grad.double(), ref[:, 2], rtol * ref[:, 2], quads, "dKL/dlog_var_q")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_prior_log_variance_that_dwarfs_the_posterior_one(dtype):
    """log_var_p = -1e19 (float32) / -1e154 (float64) against log_var_q = -1.07 (found by
    ``probloss audit``): d = log_var_q - log_var_p rounds to 1e19 and its rounding error
    is the whole of log_var_q. The KL is +inf (e^d / 2 overflows), with gradients +-inf,
    never NaN: the error term e^err is applied whole (the first-order 1 + err = -0.07
    made e^d negative)."""
    huge = -1e19 if dtype == torch.float32 else -1e154
    args = [torch.tensor([v], dtype=dtype, requires_grad=True) for v in (0.249, -1.07, -0.0035)]
    log_var_p = torch.tensor([huge], dtype=dtype, requires_grad=True)
    out = normal_kl(args[0], args[1], args[2], log_var_p)
    out.sum().backward()
    assert out.item() == math.inf
    grads = [t.grad.item() for t in (*args, log_var_p)]
    assert not any(math.isnan(g) for g in grads), grads
    assert grads[1] == math.inf and grads[3] == -math.inf  # d/dlog_var_q, d/dlog_var_p


def _overflow_quads(dtype: torch.dtype) -> list[tuple[float, float, float, float]]:
    """Inputs whose differences overflow ``dtype`` (or float32, where half inputs are
    computed) while the KL does not, and one whose KL overflows."""
    top = torch.finfo(dtype).max
    root = 2.0**64 if dtype != torch.float64 else 2.0**512  # root^2 / 2 = max / 2 (about)
    quads = [
        (-top, -top, 0.0, top / 8),  # d = log_var_q - log_var_p < -max: KL ~ 0.56 max
        (0.0, -top, 0.0, top / 4),
        (-0.9 * top, 0.0, 0.9 * top, 100.0 if dtype != torch.float64 else 1000.0),  # loc
        (root, 0.0, 0.0, -0.4),  # (Delta mu)^2 e^-lvp / 2 = 0.74 max: dKL/dlvp near -max
        (-root, 1.0, 0.0, -0.4),
        (0.0, top, 0.0, -top),  # d > max: the KL is +inf
    ]
    return [tuple(cast(q, dtype)) for q in quads]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_overflowing_differences(dtype):
    """Regression (issue 10, NaN at inputs 1e16..3e38): ``log_var_q - log_var_p`` or
    ``loc_q - loc_p`` beyond ``finfo.max`` gave a NaN KL (inf - inf) although the KL is
    below ``max``, and ``dKL/dlog_var_p = -(Delta mu)^2 e^-lvp / 2`` between max/2 and max
    came out -inf (autograd of ``w^2`` formed twice that). Bounds as for the grid (relative,
    the float32 one for half inputs, the input dtype's eps for their gradients); where the
    exact KL overflows it is +inf and no gradient is NaN."""
    quads = _overflow_quads(dtype)
    mq, lq, mp_, lp = (_cast([q[k] for q in quads], dtype).requires_grad_() for k in range(4))
    out = normal_kl(mq, lq, mp_, lp)
    out.sum().backward()
    out_dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    ref = np.array([kl_ref(*q) for q in quads])
    rtol = RTOL[out_dtype]
    g_rtol = torch.finfo(dtype).eps if dtype in HALF_DTYPES else rtol
    finite = np.isfinite(ref[:, 0]) & (ref[:, 0] <= torch.finfo(out_dtype).max)
    assert finite[:-1].all() and not finite[-1]
    assert out[-1].item() == math.inf
    for t in (mq, lq, mp_, lp):
        assert not torch.isnan(t.grad).any()
    keep = np.flatnonzero(finite)
    labels = [quads[i] for i in keep]
    got = [out.detach().double(), mq.grad.double(), mp_.grad.double(), lq.grad.double()]
    got.append(lp.grad.double())
    expected = [ref[:, 0], ref[:, 1], -ref[:, 1], ref[:, 2], ref[:, 3]]
    magnitudes = [ref[:, 0], ref[:, 1], ref[:, 1], ref[:, 2], ref[:, 4]]
    names = ["KL", "dKL/dloc_q", "dKL/dloc_p", "dKL/dlog_var_q", "dKL/dlog_var_p"]
    for k, (g, e, m, name) in enumerate(zip(got, expected, magnitudes, names, strict=True)):
        tol, dt = (rtol, out_dtype) if k == 0 else (g_rtol, dtype)
        _check(g.numpy()[keep], e[keep], m[keep], tol, dt, labels, name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_inputs(dtype):
    """Empty in, empty out (issue 10), against the prior and against a given p."""
    mq = torch.zeros(0, 3, dtype=dtype, requires_grad=True)
    lq = torch.zeros(0, 3, dtype=dtype, requires_grad=True)
    out_dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    for out in (normal_kl(mq, lq), normal_kl(mq, lq, torch.zeros(3, dtype=dtype), 1.0)):
        assert out.shape == (0, 3) and out.dtype == out_dtype
        gm, gl = torch.autograd.grad(out.sum(), (mq, lq))
        assert gm.shape == gl.shape == (0, 3)
