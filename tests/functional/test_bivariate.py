"""Tests of ``probloss.functional.bivariate``: bivariate normal log density and NLL.

Where the numbers come from
---------------------------
* mpmath (:func:`oracle`): the textbook probability-space closed form, in logs,
  ``-log(2 pi s1 s2 sqrt(1 - rho^2)) - (z1^2 - 2 rho z1 z2 + z2^2) / (2 (1 - rho^2))`` with
  ``s_i = exp(log_scale_i)``, ``rho = tanh(atanh_rho)``, ``z_i = (x_i - mu_i) / s_i``, and its
  analytic derivatives (``d/dx1 = -(z1 - rho z2) / ((1 - rho^2) s1)``,
  ``d/dlog_scale1 = -1 + z1 (z1 - rho z2) / (1 - rho^2)``,
  ``d/datanh_rho = rho + z1 z2 - rho N / (1 - rho^2)``, ``N = z1^2 - 2 rho z1 z2 + z2^2``;
  checked against ``mpmath.diff`` in :func:`test_oracle_derivatives_match_mpmath_diff`).
  None of the implementation's rewriting (log cosh, eigen-coordinates) is used. The form
  cancels catastrophically near ``|rho| = 1`` (``1 - tanh(50)^2 ~ 1e-43``), so it is
  evaluated at ``40 + 4|a|/ln 10`` digits and again at twice that, doubling until two
  evaluations agree to 25 significant digits; inputs are the exact values *after* the cast
  to the dtype under test. Results are cached per process.
* ``scipy.stats.multivariate_normal.logpdf`` in float64 for moderate inputs.
* Normalisation and moments: Gauss-Legendre quadrature (numpy nodes) of the implementation.

Bounds
------
The result is ``-log 2 pi - l1 - l2 + log cosh a - Q/2``, a sum of terms each computed to a
few ulps, so the attainable absolute error is a few ``eps`` times the *sum of their
magnitudes* ``S = log 2 pi + |l1| + |l2| + log cosh a + Q/2`` (``eps`` of the compute dtype:
float32 for half inputs). Gradients likewise against ``G``, the sum of the magnitudes of
the terms of the exact derivative written without cancellation (``p = z1 + z2``,
``m = z1 - z2``, ``alpha = (1 + e^{-2a})/4``, ``beta = (1 + e^{2a})/4``):
``G_x = (alpha |p| + beta |m|) e^{-l}``, ``G_l = 1 + |z| (alpha |p| + beta |m|)``,
``G_a = |tanh a| + e^{-2a} p^2 / 4 + e^{2a} m^2 / 4``.

* value: ``|err| <= 16 eps S``. float32 also ``|err| <= 1e-5 |ref|`` wherever the terms do
  not cancel (``S <= 20 |ref|``); where they do, the result is a small difference of terms
  of size ``S`` (e.g. ``-0.0298 = -log 2 pi + log cosh 3 - 1/2``) and only the absolute
  bound is attainable. Measured worst (all dtypes, 689-1196 points each): 5.1 eps S
  (float32), 6.1 eps S (float64); relative 6.1e-7 (float32) / 2.8e-15 (float64) without
  cancellation, 7.9e-6 / 2.9e-14 over every representable point.
* gradients: ``|err| <= 16 eps G`` (+ one rounding to the half dtype for half inputs).
  Measured worst: 4.8 eps G (float32, d/da), 5.1 eps G (float64, d/dx2); relative
  <= 9.6e-7 (float32) / 2.4e-15 (float64) where the terms do not cancel (``|ref| >= G/20``);
  the half gradients are the float32 ones rounded once.

The test points lie exactly on the correlation line (identical residuals and log-scales in
both coordinates, so ``z1 == z2`` exactly in every dtype), exactly on the anti-line, or
well off both (``|z1 - z2|, |z1 + z2| >= max |z_i| / 2``). Just *near* the line at large
``|a|`` the density is ill-conditioned in the inputs themselves (moving ``x`` by
``e^{-|a|}`` scales changes ``Q`` by O(1)), which no implementation can beat. At
``|a| = 50`` off the line, ``Q`` exceeds the float32 range for residuals above ~1e-3
scales: the exact value is not representable and the result must be ``-inf``, never NaN
(checked with the values).
"""

from __future__ import annotations

import functools
import itertools
import math

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp

from probloss.audit.naive import naive_bivariate_normal_nll
from probloss.functional.bivariate import bivariate_normal_log_prob, bivariate_normal_nll
from tests.functional._checks import (
    F32_F64,
    FLOAT_DTYPES,
    HALF_DTYPES,
    assert_within,
    dtype_id,
)
from tests.functional.cb_reference import to_float64

LOG_2PI = math.log(2.0 * math.pi)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


# ======================================================================================
# mpmath oracle
# ======================================================================================

PARAMS = ("x1", "x2", "mu1", "mu2", "l1", "l2", "a")


def _closed_form(x1, x2, m1, m2, l1, l2, a):
    """Value and (d/dx1, d/dx2, d/dl1, d/dl2, d/da) of the textbook form (mpf in/out)."""
    s1, s2 = mp.exp(l1), mp.exp(l2)
    r = mp.tanh(a)
    one_m_r2 = 1 - r * r
    z1, z2 = (x1 - m1) / s1, (x2 - m2) / s2
    n = z1 * z1 - 2 * r * z1 * z2 + z2 * z2
    value = -mp.log(2 * mp.pi * s1 * s2 * mp.sqrt(one_m_r2)) - n / (2 * one_m_r2)
    dx1 = -(z1 - r * z2) / (one_m_r2 * s1)
    dx2 = -(z2 - r * z1) / (one_m_r2 * s2)
    dl1 = -1 + z1 * (z1 - r * z2) / one_m_r2
    dl2 = -1 + z2 * (z2 - r * z1) / one_m_r2
    da = r + z1 * z2 - r * n / one_m_r2
    return (value, dx1, dx2, dl1, dl2, da)


def _agree(u, v) -> bool:
    if u == v:
        return True
    return abs(u - v) <= mpmath.mpf(10) ** -25 * max(abs(u), abs(v))


@functools.cache
def oracle(point: tuple[float, ...]) -> tuple[float, ...]:
    """``(value, d/dx1, d/dx2, d/dl1, d/dl2, d/da)`` as float64, converged to 25 digits.

    ``point`` is ``(x1, x2, mu1, mu2, l1, l2, a)``; ``d/dmu_i = -d/dx_i``.
    """
    dps = 40 + int(4 * abs(point[-1]) / math.log(10.0))
    prev = None
    while dps < 20000:
        with mp.workdps(dps):
            try:
                cur = _closed_form(*(mpmath.mpf(v) for v in point))
            except ZeroDivisionError:  # 1 - tanh(a)^2 rounded to 0: not enough digits yet
                cur = None
        if cur is not None and prev is not None and all(map(_agree, cur, prev)):
            return tuple(to_float64(v) for v in cur)
        prev, dps = cur, 2 * dps
    raise RuntimeError(f"oracle{point} did not converge")


def scales(point: tuple[float, ...]) -> tuple[float, ...]:
    """``(S, G_x1, G_x2, G_l1, G_l2, G_a)``: magnitudes of the terms (module docstring)."""
    x1, x2, m1, m2, l1, l2, a = (mpmath.mpf(v) for v in point)
    with mp.workdps(60 + int(4 * abs(point[-1]))):
        z1, z2 = (x1 - m1) * mp.exp(-l1), (x2 - m2) * mp.exp(-l2)
        p, m = z1 + z2, z1 - z2
        alpha, beta = (1 + mp.exp(-2 * a)) / 4, (1 + mp.exp(2 * a)) / 4
        q = alpha * p * p + beta * m * m
        s = LOG_2PI + abs(l1) + abs(l2) + mp.log(mp.cosh(a)) + q / 2
        g = alpha * abs(p) + beta * abs(m)
        g_a = abs(mp.tanh(a)) + mp.exp(-2 * a) * p * p / 4 + mp.exp(2 * a) * m * m / 4
        return tuple(
            to_float64(v)
            for v in (s, g * mp.exp(-l1), g * mp.exp(-l2), 1 + abs(z1) * g, 1 + abs(z2) * g, g_a)
        )


# ======================================================================================
# Test grid: on the correlation line, on the anti-line, and well off both
# ======================================================================================

A_VALUES = [0.0, 1e-3, -1e-3, 0.5, -0.5, 3.0, -3.0, 9.1, -9.1, 20.0, -20.0, 50.0, -50.0]
EQUAL_LOG_SCALES = [0.0, -20.0, 20.0, -7.3]
RESIDUALS = [0.0, 1.0, 1e3, 1e6]  # in scales
OFF_LINE = [(1.5, -0.7), (0.3, 1.1)]  # z directions: |z1 -+ z2| >= max |z_i| / 2
OFF_LOG_SCALES = [(0.0, 0.0), (-20.0, 20.0), (3.7, -5.2), (-13.0, -11.0)]
OFF_RESIDUALS = [1e-3, 1.0, 1e3, 1e6]


def _raw_points() -> list[tuple[float, ...]]:
    """Points ``(x1, x2, mu1, mu2, l1, l2)`` in float64 before the cast (a added later)."""
    points = []
    for ls, t, mu in itertools.product(EQUAL_LOG_SCALES, RESIDUALS, [0.0, 2.5]):
        d = t * math.exp(ls)
        points.append((mu + d, mu + d, mu, mu, ls, ls))  # on the line: z1 == z2
        points.append((mu + d, -(mu + d), mu, -mu, ls, ls))  # anti-line: z1 == -z2
    for (l1, l2), t, (u1, u2) in itertools.product(OFF_LOG_SCALES, OFF_RESIDUALS, OFF_LINE):
        points.append(
            (0.7 + t * u1 * math.exp(l1), -1.3 + t * u2 * math.exp(l2), 0.7, -1.3, l1, l2)
        )
    return points


def grid(dtype: torch.dtype, a_values=A_VALUES) -> list[tuple[float, ...]]:
    """Every raw point with every ``a``, cast to ``dtype``; points with a non-finite input in
    ``dtype`` (1e6 scales of ``e^20`` in float16) are left out. Exact values as floats."""
    rows = [(*p, a) for p, a in itertools.product(_raw_points(), a_values)]
    cast = torch.tensor(rows, dtype=torch.float64).to(dtype).double()
    keep = torch.isfinite(cast).all(-1)
    return list(dict.fromkeys(map(tuple, cast[keep].tolist())))


def as_tensors(points, dtype, requires_grad=False):
    """``(value (n, 2), loc (n, 2), log_scale (n, 2), atanh_rho (n,))`` of ``dtype``."""
    t = torch.tensor(points, dtype=torch.float64).to(dtype)
    out = (t[:, 0:2], t[:, 2:4], t[:, 4:6], t[:, 6])
    return tuple(o.clone().requires_grad_(requires_grad) for o in out)


def _representable(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return np.abs(values) <= torch.finfo(dtype).max


# ======================================================================================
# Value and gradient against mpmath, every dtype
# ======================================================================================


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_prob_matches_mpmath(dtype):
    """Extreme grid (|a| <= 50, 1e6 scales, log_scale +-20) against the mpmath closed form.

    Bound ``16 eps S``; float32 also relative ``1e-5`` where ``S <= 20 |ref|`` (module
    docstring). Where the exact value lies beyond the compute dtype's range (``|a| = 50``
    off the line, float32) the result must be ``-inf``, never NaN.
    """
    points = grid(dtype)
    compute = _compute_dtype(dtype)
    got = bivariate_normal_log_prob(*as_tensors(points, dtype))
    assert got.dtype == compute and got.shape == (len(points),)
    expected = np.array([oracle(p)[0] for p in points])
    s = np.array([scales(p)[0] for p in points])
    fits = _representable(expected, compute)
    got = got.double().numpy()
    assert (got[~fits] == -np.inf).all()
    eps = torch.finfo(compute).eps
    labels = [p for p, f in zip(points, fits, strict=True) if f]
    assert_within(got[fits], expected[fits], 16 * eps * s[fits], labels, f"log_prob {dtype}")
    if compute == torch.float32:
        plain = fits & (s <= 20 * np.abs(expected))
        assert plain.sum() > 0.8 * len(points)
        labels = [p for p, f in zip(points, plain, strict=True) if f]
        rel = 1e-5 * np.abs(expected[plain])
        assert_within(got[plain], expected[plain], rel, labels, f"relative {dtype}")


GRAD_NAMES = ("d/dx1", "d/dx2", "d/dl1", "d/dl2", "d/da")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_gradients_match_mpmath(dtype):
    """Gradients in value, loc, log_scale and atanh_rho against mpmath's derivatives.

    Bound ``16 eps G`` (float32 eps for half inputs) plus, for half inputs, the rounding of
    the float32 gradient to the input dtype (``eps_half / 2`` relative, or half the
    smallest subnormal spacing). Every gradient whose exact value is representable (in the
    compute and the input dtype) must meet the bound, so be finite, wherever the exact log
    density is representable; beyond those ranges it is +-inf, never NaN.
    """
    points = grid(dtype)
    compute = _compute_dtype(dtype)
    value, loc, log_scale, atanh_rho = inputs = as_tensors(points, dtype, requires_grad=True)
    bivariate_normal_log_prob(*inputs).sum().backward()
    assert all(t.grad.dtype == dtype for t in inputs)
    # the loc gradient is computed separately: it must be exactly minus the value gradient
    assert torch.equal(loc.grad, -value.grad)
    got = {
        "d/dx1": value.grad[:, 0],
        "d/dx2": value.grad[:, 1],
        "d/dl1": log_scale.grad[:, 0],
        "d/dl2": log_scale.grad[:, 1],
        "d/da": atanh_rho.grad,
    }
    refs = np.array([oracle(p) for p in points])
    g = np.array([scales(p)[1:] for p in points])
    value_fits = _representable(refs[:, 0], compute)
    eps = torch.finfo(compute).eps
    for k, name in enumerate(GRAD_NAMES):
        expected = refs[:, k + 1]
        grad = got[name].double().numpy()
        assert not np.isnan(grad[value_fits]).any(), name
        ok = value_fits & _representable(expected, compute) & _representable(expected, dtype)
        bound = 16 * eps * g[:, k]
        if dtype in HALF_DTYPES:
            fi = torch.finfo(dtype)
            bound = bound + np.maximum(fi.eps / 2 * np.abs(expected), fi.tiny * fi.eps / 2)
        labels = [p for p, f in zip(points, ok, strict=True) if f]
        assert_within(grad[ok], expected[ok], bound[ok], labels, f"{name} {dtype}")


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_gradients_keep_relative_accuracy_when_one_coordinate_dwarfs_the_other(dtype):
    """Gradients relative to their own size, not to the terms' (found by ``probloss audit``).

    At ``z2 = 2e8 z1`` (float32; ``2e17`` in float64) through the eigen-coordinates
    ``z1 +- z2`` the forward uses, ``z1`` would be rounded away before d/dx1 is formed
    (the earlier backward gave d/dx1 = 199976 for 199999 in float32, 1.2e-4 off). With the
    derivatives formed from ``z1`` and ``z2`` directly every gradient here is within
    ``64 eps`` of mpmath (``oracle``), relative: at these points no term cancels.
    """
    big = 2e8 if dtype == torch.float32 else 2e17
    points = [(1.0, big, 0.0, 0.0, 0.0, 0.0, a) for a in (1e-3, 0.3, -2.0, 8.0)]
    points += [(big, -1.0, 0.0, 0.0, -1.0, 0.5, a) for a in (1e-3, -0.3)]
    inputs = as_tensors(points, dtype, requires_grad=True)
    bivariate_normal_log_prob(*inputs).sum().backward()
    value, _, log_scale, atanh_rho = inputs
    got = np.stack(
        [g.double().numpy() for g in (*value.grad.T, *log_scale.grad.T, atanh_rho.grad)], 1
    )
    refs = np.array([oracle(p) for p in points])[:, 1:]
    eps = torch.finfo(dtype).eps
    for k, name in enumerate(GRAD_NAMES):
        assert_within(got[:, k], refs[:, k], 64 * eps * np.abs(refs[:, k]), points, name)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_far_beyond_saturation(dtype):
    """atanh_rho = +-100 and +-1000, beyond the +-50 of the contract and past where
    ``e^{|a|}`` overflows float32 (|a| > 88.7): on the line (anti-line for a < 0) value and
    gradients meet the bounds of the grid tests (``16 eps S``, ``16 eps G``) against mpmath;
    off it the exact value is below ``-1e800`` and the result is ``-inf``, never NaN."""
    rows = []
    for a, t, ls in itertools.product(
        [100.0, -100.0, 1000.0, -1000.0], [0.0, 1.0, 1e3], [0.0, -3.0]
    ):
        sign = 1.0 if a > 0 else -1.0
        rows.append((t, sign * t, 0.0, 0.0, ls, ls, a))
    inputs = as_tensors(rows, dtype, requires_grad=True)
    out = bivariate_normal_log_prob(*inputs)
    out.sum().backward()
    refs = np.array([oracle(r) for r in rows])
    sc = np.array([scales(r) for r in rows])
    eps = torch.finfo(dtype).eps
    got = out.detach().numpy()
    assert_within(got, refs[:, 0], 16 * eps * sc[:, 0], rows, f"value {dtype}")
    value, _, log_scale, a = inputs
    grads = (value.grad[:, 0], value.grad[:, 1], log_scale.grad[:, 0], log_scale.grad[:, 1], a.grad)
    for k, (name, grad) in enumerate(zip(GRAD_NAMES, grads, strict=True)):
        bound = 16 * eps * sc[:, k + 1]
        assert_within(grad.numpy(), refs[:, k + 1], bound, rows, f"{name} {dtype}")
    off = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=dtype)
    a_off = torch.tensor([1000.0, -1000.0], dtype=dtype)
    zeros = torch.zeros(2, 2, dtype=dtype)
    assert (bivariate_normal_log_prob(off, zeros, zeros, a_off) == -math.inf).all()


def test_oracle_derivatives_match_mpmath_diff():
    """The oracle's analytic derivatives agree with ``mpmath.diff`` (numerical
    differentiation at 50 digits) of its own value to 1e-20 relative, at moderate points."""
    points = [
        (0.3, -1.2, 0.1, 0.4, 0.2, -0.5, 0.7),
        (2.0, 2.5, -1.0, 1.0, -1.0, 1.5, -1.3),
        (-4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 2.5),
    ]
    for point in points:
        with mp.workdps(50):
            args = [mpmath.mpf(v) for v in point]
            _, *analytic = _closed_form(*args)

            def value(*xs):
                return _closed_form(*xs)[0]

            for name, k, d in zip(GRAD_NAMES, (0, 1, 4, 5, 6), analytic, strict=True):
                order = [0] * 7
                order[k] = 1
                numeric = mpmath.diff(value, args, tuple(order))
                assert abs(numeric - d) <= mpmath.mpf(10) ** -20 * (1 + abs(d)), (name, point)


def test_gradcheck_float64():
    """float64 gradcheck and gradgradcheck in all four arguments, with broadcasting
    (value (3, 4, 2), loc (4, 2), log_scale (1, 2), atanh_rho (3, 1)) and atanh_rho 0
    exactly (where abs() would have a zero subgradient) among +-0.3, +-2."""
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    value = torch.randn(3, 4, 2, generator=g, dtype=f64).requires_grad_(True)
    loc = torch.randn(4, 2, generator=g, dtype=f64).requires_grad_(True)
    log_scale = (0.5 * torch.randn(1, 2, generator=g, dtype=f64)).requires_grad_(True)
    atanh_rho = torch.tensor([[0.0], [-2.0], [0.3]], dtype=f64, requires_grad=True)
    inputs = (value, loc, log_scale, atanh_rho)
    assert torch.autograd.gradcheck(bivariate_normal_log_prob, inputs)
    assert torch.autograd.gradgradcheck(bivariate_normal_log_prob, inputs)
    other = torch.tensor([[2.0], [-0.3], [0.0]], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(bivariate_normal_log_prob, (value, loc, log_scale, other))


def test_gradient_at_zero_correlation_is_minus_z1_z2():
    """At atanh_rho = 0 exactly, d log p / d atanh_rho = z1 z2 (the oracle's formula at
    rho = 0), not 0 (abs() would give 0 there)."""
    value = torch.tensor([[1.5, -2.0], [0.5, 0.25]], dtype=torch.float64)
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2, dtype=torch.float64)
    bivariate_normal_log_prob(value, zeros, zeros, a).sum().backward()
    assert a.grad.tolist() == [-3.0, 0.125]


# ======================================================================================
# Against scipy, and the naive formula
# ======================================================================================


def test_log_prob_matches_scipy_float64():
    """200 random events (seed 0; |loc| ~ 3, log_scale in [-3, 3], |atanh_rho| <= 3,
    points within ~4 scales) against ``scipy.stats.multivariate_normal.logpdf`` on the
    covariance ``[[s1^2, rho s1 s2], [rho s1 s2, s2^2]]``: ``|err| <= 1e-10 max(1, |ref|)``
    (scipy's eigendecomposition of a covariance with condition number up to ~1e5 loses
    digits; measured agreement ~1e-13)."""
    g = np.random.default_rng(0)
    n = 200
    loc = 3.0 * g.standard_normal((n, 2))
    log_scale = g.uniform(-3.0, 3.0, (n, 2))
    a = g.uniform(-3.0, 3.0, n)
    value = loc + np.exp(log_scale) * g.standard_normal((n, 2)) * 2.0
    got = bivariate_normal_log_prob(*map(torch.from_numpy, (value, loc, log_scale, a))).numpy()
    expected = []
    for i in range(n):
        s1, s2 = np.exp(log_scale[i])
        r = math.tanh(a[i])
        cov = [[s1 * s1, r * s1 * s2], [r * s1 * s2, s2 * s2]]
        expected.append(scipy.stats.multivariate_normal.logpdf(value[i], loc[i], cov))
    expected = np.array(expected)
    bound = 1e-10 * np.maximum(1.0, np.abs(expected))
    assert_within(got, expected, bound, list(range(n)), "vs scipy")


def test_naive_probability_space_formula_breaks_where_ours_is_exact():
    """float32, each case a failure of the naive formula in user story 1 (docs/user_stories.md):

    * atanh_rho = 10 (``tanh(10) == 1`` exactly): ``0/0`` -> NaN on the line;
    * a point 40 scales from the mean: the pdf underflows to 0 -> NLL ``inf``;
    * scales of 1e-25: ``2 pi sx sy`` underflows to 0 -> pdf ``inf`` -> NLL ``-inf``/NaN;
    * the common "fix" ``-log(pdf.clamp(min=1e-20))`` returns 46.05 where the NLL is 800.
    Ours is within float32 relative 1e-6 of mpmath at every one of them.
    """
    rows = [
        (1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 10.0),
        (40.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        (0.0, 0.0, 0.0, 0.0, -57.5, -57.5, 0.5),
    ]
    rows = [tuple(torch.tensor(r, dtype=torch.float32).double().tolist()) for r in rows]
    inputs = as_tensors(rows, torch.float32)
    naive = naive_bivariate_normal_nll(*inputs)  # the user-story formula, Graves eqs. 24-25
    assert torch.isnan(naive[0])
    assert naive[1] == math.inf
    assert not torch.isfinite(naive[2])
    ours = bivariate_normal_nll(*inputs, reduction="none").double().numpy()
    exact = -np.array([oracle(r)[0] for r in rows])
    assert_within(ours, exact, 1e-6 * np.abs(exact), rows, "ours")
    # the clamp "fix" silently changes the objective: 46.05 instead of 801.84
    sx = torch.ones(())
    pdf = torch.exp(torch.tensor(-800.0)) / (2 * math.pi * sx * sx)
    assert math.isclose(-torch.log(pdf.clamp(min=1e-20)).item(), 46.0517, rel_tol=1e-5)
    assert math.isclose(exact[1], 800 + LOG_2PI, rel_tol=1e-12)


# ======================================================================================
# rho= alternative
# ======================================================================================


def test_rho_keyword_agrees_with_atanh_rho():
    """``rho=tanh(a)`` equals ``atanh_rho=a`` in float64 for |a| <= 3 within
    ``1e-12 (S + G_a)``: ``atanh(tanh(a))`` returns a within ``~cosh(a)^2 eps`` (at most
    ~100 eps here), moving the result by ``G_a`` times that. Gradients reach ``rho``:
    ``d/drho = (d/da) / (1 - rho^2)`` (chain rule through atanh) within 1e-10 relative."""
    points = [p for p in grid(torch.float64, [0.0, 0.4, -1.1, 3.0, -3.0]) if abs(p[4]) <= 7.3]
    value, loc, log_scale, a = as_tensors(points, torch.float64)
    rho = torch.tanh(a).requires_grad_(True)
    a.requires_grad_(True)
    ours = bivariate_normal_log_prob(value, loc, log_scale, a)
    via_rho = bivariate_normal_log_prob(value, loc, log_scale, rho=rho)
    sc = np.array([scales(p) for p in points])
    bound = 1e-12 * (sc[:, 0] + sc[:, 5])
    assert_within(via_rho.detach().numpy(), ours.detach().numpy(), bound, points, "rho=")
    ours.sum().backward()
    via_rho.sum().backward()
    expected = (a.grad / (1 - rho.detach() ** 2)).numpy()
    bound = 1e-10 * np.abs(expected) + 1e-10 * sc[:, 5]
    assert_within(rho.grad.numpy(), expected, bound, points, "d/drho")


def test_rho_keyword_rejects_saturated_float32_correlation():
    """Why rho= is the less stable form: float32 tanh(10) is exactly 1, which rho= must
    reject (ValueError naming rho and its shape), while atanh_rho=10 is fine."""
    a = torch.tensor([0.5, 10.0])
    rho = torch.tanh(a)
    assert rho[1] == 1.0
    x = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"rho of shape \(2,\)"):
        bivariate_normal_log_prob(x, torch.zeros(2), torch.zeros(2), rho=rho)
    assert torch.isfinite(bivariate_normal_log_prob(x, torch.zeros(2), torch.zeros(2), a)).all()


# ======================================================================================
# Argument checks
# ======================================================================================

X, LOC, LS, A = torch.zeros(5, 2), torch.zeros(5, 2), torch.zeros(5, 2), torch.zeros(5)


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        ((torch.zeros(5, 3), LOC, LS, A), {}, r"value must have shape \(\*, 2\).*\(5, 3\)"),
        ((X, torch.zeros(5), LS, A), {}, r"loc must have shape \(\*, 2\).*\(5,\)"),
        ((X, LOC, torch.zeros(5, 1), A), {}, r"log_scale must have shape \(\*, 2\).*\(5, 1\)"),
        ((torch.zeros(()), LOC, LS, A), {}, r"value must have shape \(\*, 2\).*\(\)"),
        (
            (X, torch.zeros(4, 2), LS, A),
            {},
            r"do not broadcast.*value \(5, 2\), loc \(4, 2\), log_scale \(5, 2\), atanh_rho \(5,\)",
        ),
        ((X, LOC, LS, torch.zeros(3)), {}, r"do not broadcast.*atanh_rho \(3,\)"),
        ((X, LOC, LS), {}, "exactly one of atanh_rho and rho.*neither"),
        ((X, LOC, LS, A), {"rho": A}, "exactly one of atanh_rho and rho.*both"),
        ((X, LOC, LS), {"rho": torch.tensor([0.0, 1.0, 0, 0, 0])}, r"rho of shape \(5,\)"),
        ((X, LOC, LS), {"rho": torch.full((5,), -1.5)}, r"rho of shape \(5,\).*5 value"),
        ((X, LOC, LS), {"rho": torch.tensor(float("nan"))}, r"rho of shape \(\)"),
        ((X, LOC, LS), {"rho": torch.zeros(3)}, r"do not broadcast.*and rho \(\*\).*rho \(3,\)"),
        (
            (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), LOC[:2], LS[:2], A[:2]),
            {},
            r"value of shape \(2, 2\) contains 1 NaN",
        ),
    ],
    ids=[
        "value-event",
        "loc-event",
        "log_scale-event",
        "value-scalar",
        "batch-mismatch",
        "rho-batch",
        "neither",
        "both",
        "rho-one",
        "rho-beyond",
        "rho-nan",
        "rho-shape",
        "value-nan",
    ],
)
def test_value_errors_name_argument_and_shape(args, kwargs, pattern):
    for fn in (bivariate_normal_log_prob, bivariate_normal_nll):
        with pytest.raises(ValueError, match=pattern):
            fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_scale_keyword_equals_the_log_scale_form(dtype):
    """``scale=`` goes through the one resolver as ``log(scale)``. The scales are powers of
    two, so both forms hold ``k log 2`` (``|k| <= 3``) to within an ulp of the compute dtype
    (float32 for half inputs); an ulp ``u`` in ``log_scale`` moves the log density by
    ``u (1 + z_i d/dz_i)``, at most ``2 eps |log_scale| (1 + |ref|) < 8 eps (1 + |ref|)``,
    and the bound is twice that (measured: bitwise equal)."""
    g = torch.Generator().manual_seed(5)
    x, loc = (torch.randn(6, 2, generator=g, dtype=torch.float64).to(dtype) for _ in "xl")
    a = torch.randn(6, generator=g, dtype=torch.float64).to(dtype)
    powers = torch.tensor([[-3.0, 0.0], [1.0, 2.0], [-1.0, 3.0]] * 2, dtype=torch.float64)
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    scale, log_scale = torch.exp2(powers).to(dtype), (powers * math.log(2.0)).to(compute)
    by_scale = bivariate_normal_log_prob(x, loc, scale=scale, atanh_rho=a)
    by_log = bivariate_normal_log_prob(x, loc, log_scale, a)
    assert by_scale.dtype == by_log.dtype == compute
    bound = 16 * torch.finfo(compute).eps * (1 + by_log.abs())
    assert ((by_scale - by_log).abs() <= bound).all(), (by_scale, by_log)
    nll = bivariate_normal_nll(x, loc, scale=scale, atanh_rho=a, reduction="none")
    assert ((nll + by_log).abs() <= bound).all(), (nll, by_log)
    s = scale.clone().requires_grad_()
    (grad,) = torch.autograd.grad(bivariate_normal_nll(x, loc, scale=s, atanh_rho=a), s)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        (
            (X, LOC, LS, A),
            {"scale": torch.ones(5, 2)},
            "exactly one of log_scale, scale; got log_scale, scale",
        ),
        ((X, LOC), {"atanh_rho": A}, "exactly one of log_scale, scale; got none"),
        ((X, LOC), {"scale": -torch.ones(5, 2), "atanh_rho": A}, r"scale of shape \(5, 2\)"),
        ((X, LOC), {"scale": torch.ones(5, 3), "atanh_rho": A}, r"scale must have shape"),
    ],
    ids=["both", "neither", "negative", "event"],
)
def test_scale_keyword_errors(args, kwargs, pattern):
    for fn in (bivariate_normal_log_prob, bivariate_normal_nll):
        with pytest.raises(ValueError, match=pattern):
            fn(*args, **kwargs)


def test_scale_keyword_in_a_reduced_loss_is_named():
    """A scale that would enlarge the value's batch in a reduced loss names ``scale``."""
    with pytest.raises(ValueError, match=r"^scale of batch shape \(5, 1\)"):
        bivariate_normal_nll(X, LOC, scale=torch.ones(5, 1, 2), atanh_rho=A)


def test_loss_option_errors():
    with pytest.raises(ValueError, match="reduction must be"):
        bivariate_normal_nll(X, LOC, LS, A, reduction="batchmean")
    with pytest.raises(ValueError, match="nan_policy must be 'raise' or 'mask', got 'omit'"):
        bivariate_normal_nll(X, LOC, LS, A, nan_policy="omit")
    with pytest.raises(TypeError, match="loc must be a real floating-point tensor"):
        bivariate_normal_log_prob(X, torch.zeros(5, 2, dtype=torch.int64), LS, A)


def test_validate_args_false_skips_value_checks():
    """No value checks with validate_args=False: NaN propagates, |rho| = 1 gives a
    non-finite result (the user opted out); shape checks still run."""
    x = torch.tensor([[float("nan"), 0.0], [1.0, 1.0]])
    out = bivariate_normal_log_prob(x, LOC[:2], LS[:2], A[:2], validate_args=False)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
    out = bivariate_normal_log_prob(x[1:], LOC[:1], LS[:1], rho=torch.ones(1), validate_args=False)
    assert not torch.isfinite(out).any()
    with pytest.raises(ValueError, match="value must have shape"):
        bivariate_normal_log_prob(torch.zeros(3), LOC, LS, A, validate_args=False)


# ======================================================================================
# NLL: reductions and NaN masking
# ======================================================================================


def _random_batch(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(*shape, 2, generator=g, dtype=dtype)
    loc = torch.randn(*shape, 2, generator=g, dtype=dtype)
    log_scale = 0.3 * torch.randn(*shape, 2, generator=g, dtype=dtype)
    a = torch.randn(*shape, generator=g, dtype=dtype)
    return value, loc, log_scale, a


def test_reductions_average_over_events():
    """'none' is -log_prob (shape (3, 4)); 'sum' its sum; 'mean' the sum over 12 events
    (not 24 scalars). A shared parameter broadcasts up to the value's events (loc (2,)
    against value (3, 4, 2) is 12 events); a value that parameters would broadcast is
    refused by a reduced loss (test_reduced_nll_refuses_a_parameter_that_broadcasts_the_value)."""
    value, loc, log_scale, a = _random_batch((3, 4))
    lp = bivariate_normal_log_prob(value, loc, log_scale, a)
    none = bivariate_normal_nll(value, loc, log_scale, a, reduction="none")
    assert none.shape == (3, 4) and torch.equal(none, -lp)
    total = bivariate_normal_nll(value, loc, log_scale, a, reduction="sum")
    assert torch.equal(total, (-lp).sum())
    mean = bivariate_normal_nll(value, loc, log_scale, a)
    assert mean.shape == () and torch.equal(mean, (-lp).sum() / 12)
    shared = bivariate_normal_nll(value, loc[0, 0], log_scale, a)
    expected = -bivariate_normal_log_prob(value, loc[0, 0], log_scale, a).sum() / 12
    assert torch.equal(shared, expected)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_mask(reduction):
    """nan_policy='mask': events with a NaN in either coordinate get loss 0 ('none'), are
    left out of 'sum' and of the count of 'mean'; the result and the gradients of the other
    events equal those of the loss on the unmasked events alone (exactly: same
    arithmetic), and every gradient at a masked event is exactly 0."""
    value, loc, log_scale, a = _random_batch((6,))
    value[1, 0] = float("nan")
    value[4] = float("nan")
    keep = torch.tensor([True, False, True, True, False, True])
    params = [t.clone().requires_grad_(True) for t in (value, loc, log_scale, a)]
    out = bivariate_normal_nll(*params, reduction=reduction, nan_policy="mask")
    assert torch.isfinite(out).all()
    sub = [t[keep].clone().requires_grad_(True) for t in (value, loc, log_scale, a)]
    expected = bivariate_normal_nll(*sub, reduction=reduction)
    if reduction == "none":
        assert torch.equal(out[keep], expected) and (out[~keep] == 0).all()
        out, expected = out.sum(), expected.sum()
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=0)
    out.backward()
    expected.backward()
    for full, part in zip(params, sub, strict=True):
        assert (full.grad[~keep] == 0).all()
        torch.testing.assert_close(full.grad[keep], part.grad, rtol=1e-15, atol=0)


def test_nan_mask_with_broadcast_parameters_and_all_masked():
    """Shared parameters (loc (2,), ...) still get the gradient of the unmasked events only;
    a mean over zero events is NaN (documented), a sum over them 0."""
    value = torch.tensor([[0.5, float("nan")], [1.0, -1.0], [float("nan")] * 2])
    loc = torch.zeros(2, requires_grad=True)
    log_scale = torch.zeros(2, requires_grad=True)
    a = torch.tensor(0.5, requires_grad=True)
    bivariate_normal_nll(value, loc, log_scale, a, nan_policy="mask").backward()
    grads = [t.grad.clone() for t in (loc, log_scale, a)]
    for t in (loc, log_scale, a):
        t.grad = None
    bivariate_normal_nll(value[1:2], loc, log_scale, a).backward()
    for g, t in zip(grads, (loc, log_scale, a), strict=True):
        assert torch.equal(g, t.grad)
    all_nan = torch.full((2, 2), float("nan"))
    assert torch.isnan(bivariate_normal_nll(all_nan, loc, log_scale, a, nan_policy="mask"))
    total = bivariate_normal_nll(all_nan, loc, log_scale, a, nan_policy="mask", reduction="sum")
    assert total == 0


def test_nan_policy_raise_is_the_default():
    value = torch.tensor([[0.5, float("nan")]])
    with pytest.raises(ValueError, match=r"value of shape \(1, 2\) contains 1 NaN"):
        bivariate_normal_nll(value, torch.zeros(2), torch.zeros(2), torch.tensor(0.0))


# ======================================================================================
# Dtypes
# ======================================================================================


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dtype_policy(dtype):
    """Half inputs: float32 result equal to the float32 computation on the upcast inputs,
    gradients in the input dtype. Mixed float32 / float64 promotes to float64."""
    value, loc, log_scale, a = (t.to(dtype) for t in _random_batch((4,)))
    out = bivariate_normal_nll(value, loc, log_scale, a, reduction="none")
    assert out.dtype == _compute_dtype(dtype)
    if dtype in HALF_DTYPES:
        upcast = bivariate_normal_nll(
            value.float(), loc.float(), log_scale.float(), a.float(), reduction="none"
        )
        assert torch.equal(out, upcast)
    a.requires_grad_(True)
    bivariate_normal_nll(value, loc, log_scale, a).backward()
    assert a.grad.dtype == dtype
    mixed = bivariate_normal_log_prob(value.float(), loc.double(), log_scale.float(), a.float())
    assert mixed.dtype == torch.float64


# ======================================================================================
# Normalisation and moments (hypothesis)
# ======================================================================================

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(96)


@settings(max_examples=25, deadline=None)
@given(
    k1=st.floats(-1e3, 1e3),
    k2=st.floats(-1e3, 1e3),
    l1=st.floats(-20.0, 20.0),
    l2=st.floats(-20.0, 20.0),
    a=st.floats(-6.0, 6.0),
)
def test_density_integrates_to_one_with_the_right_moments(k1, k2, l1, l2, a):
    """``int p = 1``, ``E[z1 z2] = tanh(a)``, ``E[z1^2] = E[z2^2] = 1`` and ``E[z] = 0``
    for the standardised ``z = (x - mu) / s``, by 96 x 96-point Gauss-Legendre quadrature
    of the float64 implementation over the +-12-standard-deviation box of each principal
    axis (``x = mu + s (u + v, u - v)/sqrt2``, Jacobian ``s1 s2``; the box holds all but
    ~1e-32 of the mass; the quadrature of a Gaussian over it is exact to ~1e-15).
    Bounds: 1e-10 for the mass, 1e-9 for the moments. Normalisation alone would not catch
    a wrong sign of rho; the second moment does. The means are ``k`` scales from 0
    (``|k| <= 1e3``): the float64 nodes ``x = mu + s z`` are off by ``|mu| eps``, i.e. by
    ``|k| eps`` in ``z``, which must stay below the bound."""
    s1, s2 = math.exp(l1), math.exp(l2)
    mu1, mu2 = k1 * s1, k2 * s2
    r = math.tanh(a)
    hu = 12 * math.sqrt(1 + r)  # std of u = (z1 + z2)/sqrt2 is sqrt(1 + rho)
    hv = 12 / math.cosh(a) / math.sqrt(1 + r)  # sqrt(1 - rho) without cancellation
    u, v = np.meshgrid(hu * _NODES, hv * _NODES, indexing="ij")
    w = np.outer(hu * _WEIGHTS, hv * _WEIGHTS)
    z1, z2 = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
    value = torch.from_numpy(np.stack((mu1 + s1 * z1, mu2 + s2 * z2), -1))
    f64 = torch.float64
    lp = bivariate_normal_log_prob(
        value,
        torch.tensor([mu1, mu2], dtype=f64),
        torch.tensor([l1, l2], dtype=f64),
        torch.tensor(a, dtype=f64),
    ).numpy()
    # the density times the Jacobian s1 s2, in logs (s1 s2 can be e^{+-40})
    dens = np.exp(lp + l1 + l2)
    mass = np.sum(w * dens)
    assert abs(mass - 1.0) <= 1e-10
    assert abs(np.sum(w * dens * z1 * z2) - r) <= 1e-9
    assert abs(np.sum(w * dens * z1 * z1) - 1.0) <= 1e-9
    assert abs(np.sum(w * dens * z2 * z2) - 1.0) <= 1e-9
    assert abs(np.sum(w * dens * z1)) <= 1e-9 and abs(np.sum(w * dens * z2)) <= 1e-9


def test_zero_residual_with_overflowing_inverse_scale():
    """Regression: at log_scale = -200 in float32, e^{-log_scale} overflows; on the mean the
    exact log-density is 400 - log(2 pi) + log cosh(a) (closed form, relative 1e-6) and every
    gradient is finite (d/dlog_scale = -1 each, d/dvalue = 0)."""
    value = torch.tensor([[1.0, -2.0]], requires_grad=True)
    log_scale = torch.full((1, 2), -200.0, requires_grad=True)
    atanh_rho = torch.tensor([0.5], requires_grad=True)
    out = bivariate_normal_log_prob(value, value.detach(), log_scale, atanh_rho)
    expected = 400.0 - math.log(2 * math.pi) + math.log(math.cosh(0.5))
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))
    assert torch.equal(log_scale.grad, torch.full_like(log_scale, -1.0))
    assert atanh_rho.grad.item() == pytest.approx(math.tanh(0.5), rel=1e-6)


def test_zero_incoming_gradient_where_the_density_overflows():
    """Regression: a component with zero responsibility in a mixture back-propagates a zero
    gradient; where its quadratic form overflows (float32, a = 50, off the line) the
    atanh_rho gradient must be exactly 0, not 0 * inf = NaN."""
    value = torch.tensor([[1.0, -1.0]])
    atanh_rho = torch.tensor([50.0], requires_grad=True)
    log_prob = bivariate_normal_log_prob(value, torch.zeros(1, 2), torch.zeros(1, 2), atanh_rho)
    assert log_prob.item() == -math.inf
    (0.0 * log_prob).sum().backward()
    assert atanh_rho.grad.item() == 0.0
