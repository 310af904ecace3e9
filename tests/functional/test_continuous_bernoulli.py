"""Tests of ``probloss.functional.continuous_bernoulli``: log density, CDF, ICDF.

Where the numbers come from
---------------------------
Every expected value is an mpmath evaluation of the textbook closed form
(``tests/functional/cb_reference.py``: ``eta x - log((e^eta - 1)/eta)``,
``expm1(eta x)/expm1(eta)``, ``log1p(u expm1(eta))/eta`` and their derivatives) at the
exact value of the input *after* it was cast to the dtype under test, converged to 25
significant digits and rounded once to float64. Normalisation integrals use
``scipy.integrate.quad`` in float64 on the implementation itself.

Bounds (``eps`` = machine epsilon of the compute dtype: 1.19e-7 float32, 2.22e-16 float64)
-----------------------------------------------------------------------------------------
* log_prob: relative 1e-6 (float32) / 1e-13 (float64) where ``|ref| > 1e-3``; elsewhere
  absolute ``1e-6 max(1, |eta|)`` / ``1e-13 max(1, |eta|)``: the result is the difference
  ``eta x - A(eta)`` of two terms of size up to ``|eta|``, and merely rounding ``eta x``
  moves it by ``eps |eta|``, so no relative bound is attainable near the zero crossing.
  Measured worst: 1.6e-7 relative float32 and 1.1e-15 float64 (both at eta = 1e4,
  x = 0.999); absolute-regime errors below 1e-9 / 3e-18.
* log_prob gradient in logits (``x - mean(eta)``): ``rtol (1 + |ref|)``, the rounding of the
  two O(1) terms ``x`` and ``mean``.
* cdf: relative ``(16 + |eta|) eps``: a few roundings plus the conditioning of
  ``exp(eta (x - 1))`` in ``eta`` (a relative perturbation ``eps`` of ``eta`` moves the CDF
  by a relative ``|eta (x-1)| eps``). Where the exact CDF underflows (``< tiny``) the
  result must be within ``tiny`` of it. Measured worst on the test grid: 0.13 (float32) and
  0.24 (float64) of the bound; 16 eps at float64 eta = 1e4, x = 0.99.
* icdf: relative ``8 eps`` (within ``tiny`` where the exact value is below it). Every
  branch is a product or quotient of at most five operations each correct to an ulp
  (``expm1``, ``log1p``, ``log``, ``exp`` inside ``mul_exp``, a multiply or divide) whose
  inputs are the exact ``u`` and ``eta``; the only sums are ``log1p`` of ``w >= -1/2`` and
  a log-sum-exp of ``log1p(-u)`` and ``log u + eta`` with ``u > 1/2`` (both exact to an
  ulp there) whose log is at least ``ln 2`` in size: condition numbers <= 1.44, so about
  ``5 + 2 x 1.44 < 8`` ulp. Measured worst: 1.7 eps (float32) / 1.4 eps (float64) on the
  grids here and on 1500 random log-uniform points per dtype (``u`` down to the smallest
  subnormal, ``|eta|`` from 1e-30 to 1e6 / 1e10).
* half-precision cdf / icdf: the float32 bound plus ``eps_half / 2`` (one rounding);
  measured 0.94 of it in bfloat16, which is that rounding alone.
* icdf gradients, ``dx/du`` and ``dx/deta``: relative ``8 eps`` (within ``tiny`` below it;
  ``dx/du = inf`` where the exact value exceeds ``max``). They are formed from ``u`` and
  ``eta`` as quotients of accurately rounded factors whose sums have same-signed terms or
  cancel by at most a factor 4 (``|eta|`` near 1): ``(3 + 4) eps``-ish. Measured worst:
  2.1 eps on the grids and 1.6 eps on 600 random log-uniform points per dtype (float32,
  float64). (The implicit form ``1/p(x)`` at the rounded ``x`` used before was off by
  ``|eta| eps``: 5% at ``eta = 1e6`` in float32.)
* cdf gradients in logits: ``(16 + |eta|) eps |ref| + 4 eps`` (the gradients are at
  most ~0.13 in size; ``4 eps`` is an absolute floor for where the CDF rounds to 1 and its
  tiny derivative cannot be resolved relative to it), for every logit including the small
  ones ``eps <= |eta| < 0.25`` where autograd through ``expm1(eta x)/expm1(eta)`` would
  cancel terms of size ``1/|eta|``. Measured worst: 0.52 of the bound (float32 cdf).
* icdf(cdf(x)) round trip: see ``test_icdf_cdf_round_trip_float64`` (measured 0.24 of it).
"""

from __future__ import annotations

import functools
import itertools
import math

import mpmath
import numpy as np
import pytest
import scipy.integrate
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp

from probloss.functional import (
    continuous_bernoulli_cdf,
    continuous_bernoulli_icdf,
    continuous_bernoulli_log_prob,
)
from tests.functional import cb_reference as ref
from tests.functional._checks import (
    F32_F64,
    FLOAT_DTYPES,
    HALF_DTYPES,
    RTOL,
    assert_within,
    cast,
    dtype_id,
    relative_bound,
    signed,
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _extremes(dtype: torch.dtype) -> list[float]:
    """0, +-smallest subnormal, +-tiny, +-eps, +-1/eps, +-sqrt(max), +-max of ``dtype``."""
    fi = torch.finfo(dtype)
    mags = [fi.tiny * fi.eps, fi.tiny, fi.eps, 1.0 / fi.eps, math.sqrt(fi.max), fi.max]
    return [0.0, *signed(mags)]


def _grid(xs: list[float], etas: list[float], dtype: torch.dtype):
    """All (x, eta) pairs: exact float lists and the matching flat tensors of ``dtype``."""
    pairs = list(itertools.product(cast(xs, dtype), cast(etas, dtype)))
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64).to(dtype)
    eta = torch.tensor([p[1] for p in pairs], dtype=torch.float64).to(dtype)
    return pairs, x, eta


def _f64(oracle, pairs) -> np.ndarray:
    return np.array([ref.to_float64(oracle(*p)) for p in pairs])


# ======================================================================================
# log_prob
# ======================================================================================

LP_LOGITS = [0.0, *signed([1e-30, 1e-6, 0.1, 1.0, 4.0, 17.0, 50.0, 1e3, 1e4])]
LP_VALUES = [0.0, 1e-6, 0.3, 0.5, 0.999, 1.0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_prob_matches_mpmath(dtype):
    """Against mpmath ``eta x - A(eta)``; half inputs return float32 and meet float32 bounds."""
    pairs, x, eta = _grid(LP_VALUES, LP_LOGITS, dtype)
    got = continuous_bernoulli_log_prob(x, eta)
    compute = _compute_dtype(dtype)
    assert got.dtype == compute  # dtype policy: half precision is computed/returned in float32
    expected = _f64(ref.log_prob, pairs)
    rtol = RTOL[compute]
    scale = np.maximum(1.0, np.abs([p[1] for p in pairs]))
    bound = np.where(np.abs(expected) > 1e-3, rtol * np.abs(expected), rtol * scale)
    assert_within(got.double().numpy(), expected, bound, pairs, f"log_prob {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_prob_gradient_matches_mpmath(dtype):
    """d log_prob / d logits = x - mean(eta) (mpmath), finite everywhere incl. eta = 0."""
    pairs, x, eta = _grid(LP_VALUES, LP_LOGITS, dtype)
    eta.requires_grad_(True)
    continuous_bernoulli_log_prob(x, eta).sum().backward()  # elementwise: grad = derivative
    assert eta.grad.dtype == dtype
    assert torch.isfinite(eta.grad).all()
    expected = _f64(ref.log_prob_grad, pairs)
    # half: the float32 gradient is rounded to the half dtype on the way back
    rtol = RTOL[dtype] if dtype in F32_F64 else torch.finfo(dtype).eps
    bound = rtol * (1.0 + np.abs(expected))
    assert_within(eta.grad.double().numpy(), expected, bound, pairs, f"d log_prob {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_prob_gradient_at_zero_logits_is_x_minus_half(dtype):
    """At logits exactly 0 the gradient is x - 1/2 (the mean of the uniform), not NaN."""
    x = torch.tensor(cast(LP_VALUES, dtype), dtype=torch.float64).to(dtype)
    eta = torch.zeros_like(x, requires_grad=True)
    continuous_bernoulli_log_prob(x, eta).sum().backward()
    expected = x.double() - 0.5
    torch.testing.assert_close(
        eta.grad.double(), expected, rtol=0.0, atol=torch.finfo(dtype).eps, equal_nan=False
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_prob_extremes_finite(dtype):
    """Value and both gradients are finite at the extremes of every dtype.

    Extra exact check: ``log p(1 | eta) = log(eta) + log(1 - e^-eta)``, which for
    ``eta >= 1/eps`` is ``log(eta)`` to far below rounding (``e^-eta`` < 1e-1000).
    """
    fi = torch.finfo(dtype)
    values = [0.0, fi.tiny * fi.eps, fi.tiny, 0.5, 1.0 - fi.eps / 2, 1.0]
    pairs, x, eta = _grid(values, _extremes(dtype), dtype)
    x.requires_grad_(True)
    eta.requires_grad_(True)
    y = continuous_bernoulli_log_prob(x, eta)
    y.sum().backward()
    for name, t in (("value", y), ("d/dlogits", eta.grad), ("d/dvalue", x.grad)):
        bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
        assert not bad, f"{dtype} non-finite {name} at {[pairs[i] for i in bad][:6]}"
    big = [i for i, (xv, ev) in enumerate(pairs) if xv == 1.0 and ev >= 1.0 / fi.eps]
    assert big
    got = y.detach()[big].double().numpy()
    expected = np.log([pairs[i][1] for i in big])
    assert_within(got, expected, 4 * RTOL[_compute_dtype(dtype)] * expected, big, "log p(1|big)")


def test_log_prob_gradcheck():
    """float64 gradcheck in (value, logits), both branches and eta = 0 exactly."""
    value = torch.tensor([0.0, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0], dtype=torch.float64)
    logits = torch.tensor([-30.0, -2.0, -1e-3, 0.0, 1e-3, 2.0, 30.0], dtype=torch.float64)
    v = value[:, None].expand(-1, logits.numel()).clone().requires_grad_(True)
    e = logits[None, :].expand(value.numel(), -1).clone().requires_grad_(True)

    # validate_args=False: the finite-difference steps leave [0, 1] at the end points
    def fn(v, e):
        return continuous_bernoulli_log_prob(v, e, validate_args=False)

    assert torch.autograd.gradcheck(fn, (v, e))
    assert torch.autograd.gradgradcheck(fn, (v, e))


# --- normalisation --------------------------------------------------------------------


def _integral_of_density(eta: float) -> float:
    """``int_0^1 exp(log_prob(x, eta)) dx`` by scipy quad in float64."""
    logits = torch.tensor(eta, dtype=torch.float64)

    def density(x: float) -> float:
        lp = continuous_bernoulli_log_prob(torch.tensor(x, dtype=torch.float64), logits)
        return math.exp(lp.item())

    # the mass sits within ~1/|eta| of one end: tell quad where
    points = [min(0.5, 1.0 / abs(eta)), max(0.5, 1.0 - 1.0 / abs(eta))] if eta else None
    value, abserr = scipy.integrate.quad(
        density, 0.0, 1.0, points=points, epsabs=1e-14, epsrel=1e-13, limit=200
    )
    assert abserr < 1e-12
    return value


@pytest.mark.parametrize("eta", [-50.0, -3.0, 0.0, 1e-8, 3.0, 50.0])
def test_log_prob_normalised(eta):
    """The density integrates to 1 over [0, 1] (quad error < 1e-12; bound 1e-10)."""
    assert abs(_integral_of_density(eta) - 1.0) <= 1e-10


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=-300.0, max_value=300.0, allow_nan=False))
def test_log_prob_normalised_property(eta):
    """Normalisation holds for any logit in [-300, 300] (bound 1e-10)."""
    assert abs(_integral_of_density(eta) - 1.0) <= 1e-10


# --- argument checks ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1e-3, 1.5, float("nan"), float("inf")])
def test_log_prob_rejects_value_outside_unit_interval(bad):
    value = torch.tensor([0.2, bad, 0.7])
    with pytest.raises(ValueError, match=r"value.*\(3,\)"):
        continuous_bernoulli_log_prob(value, torch.zeros(3))


def test_log_prob_rejects_non_broadcastable_shapes():
    with pytest.raises(ValueError) as info:
        continuous_bernoulli_log_prob(torch.full((3,), 0.5), torch.zeros(2, 4))
    message = str(info.value)
    assert "(3,)" in message and "(2, 4)" in message


def test_log_prob_validate_args_false_skips_value_check():
    """validate_args=False evaluates eta x - A(eta) even outside [0, 1]."""
    value = torch.tensor([1.5, -0.5], dtype=torch.float64)
    logits = torch.tensor([2.0, 2.0], dtype=torch.float64)
    got = continuous_bernoulli_log_prob(value, logits, validate_args=False)
    expected = [ref.to_float64(ref.log_prob(v, 2.0)) for v in (1.5, -0.5)]
    assert_within(got.numpy(), expected, 1e-13 * np.abs(expected), [1.5, -0.5], "unchecked")


# ======================================================================================
# cdf / icdf
# ======================================================================================

CDF_LOGITS = [0.0, *signed([1e-30, 1e-7, 0.5, 1.0, 4.0, 30.0, 1e4])]
CDF_VALUES = [0.0, 1e-30, 1e-6, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0 - 1e-6, 1.0]
# eps <= |eta| < 0.25: where the naive closed form's logit-gradient cancels
SMALL_LOGITS = signed([1e-12, 1e-7, 2e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1])


def _cdf_value_bound(pairs, expected, dtype, *, icdf: bool) -> np.ndarray:
    compute = _compute_dtype(dtype)
    eps = torch.finfo(compute).eps
    tiny = torch.finfo(dtype).tiny
    bounds = []
    for (_u, eta), e in zip(pairs, expected, strict=True):
        k = 8.0 if icdf else 16.0 + abs(eta)
        b = k * eps * abs(e)
        if dtype in HALF_DTYPES:
            b += torch.finfo(dtype).eps / 2 * abs(e)  # the one rounding to the half dtype
        bounds.append(b if abs(e) >= tiny else tiny)  # underflow: within tiny of the exact
    return np.array(bounds)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("which", ["cdf", "icdf"])
def test_cdf_icdf_match_mpmath(which, dtype):
    """Against mpmath ``expm1(eta x)/expm1(eta)`` and ``log1p(u expm1(eta))/eta``.

    Includes eta = 1e4 (``expm1(1e4)`` overflows every dtype: the result must not).
    The result keeps the input dtype (half stays half, computed in float32).
    """
    fn, oracle = {
        "cdf": (continuous_bernoulli_cdf, ref.cdf),
        "icdf": (continuous_bernoulli_icdf, ref.icdf),
    }[which]
    pairs, x, eta = _grid(CDF_VALUES, CDF_LOGITS, dtype)
    got = fn(x, eta)
    assert got.dtype == dtype
    expected = _f64(oracle, pairs)
    bound = _cdf_value_bound(pairs, expected, dtype, icdf=which == "icdf")
    assert_within(got.double().numpy(), expected, bound, pairs, f"{which} {dtype}")


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
@pytest.mark.parametrize("which", ["cdf", "icdf"])
def test_cdf_icdf_gradient_matches_mpmath(which, dtype):
    """Logit-gradients against mpmath's closed-form derivatives (bound in module docstring),
    including the small logits where the naive closed form cancels."""
    fn, oracle = {
        "cdf": (continuous_bernoulli_cdf, ref.cdf_grad),
        "icdf": (continuous_bernoulli_icdf, ref.icdf_grad),
    }[which]
    etas = sorted(set(cast(CDF_LOGITS, dtype)) | set(cast(SMALL_LOGITS, dtype)))
    _check_cdf_gradient(fn, oracle, etas, dtype, which)


def _check_cdf_gradient(fn, oracle, etas, dtype, which):
    pairs, x, eta = _grid(CDF_VALUES, etas, dtype)
    eta.requires_grad_(True)
    fn(x, eta).sum().backward()
    assert torch.isfinite(eta.grad).all()
    expected = _f64(oracle, pairs)
    eps = torch.finfo(dtype).eps
    bound = (16.0 + np.abs([p[1] for p in pairs])) * eps * np.abs(expected) + 4 * eps
    assert_within(eta.grad.double().numpy(), expected, bound, pairs, f"d {which} {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("which", ["cdf", "icdf"])
def test_cdf_icdf_extremes_finite(which, dtype):
    """Finite value in [0, 1] and finite logit-gradient at the extremes of every dtype,
    including logits exactly 0. The CDF maps the end points exactly, F(0) = 0 and
    F(1) = 1; the inverse within one ulp (``icdf(1, eta=eps)`` is ``1 - eps/2``, the
    rounding of ``log1p(expm1(eps)) / eps``, inside the accuracy bound)."""
    fn = {"cdf": continuous_bernoulli_cdf, "icdf": continuous_bernoulli_icdf}[which]
    fi = torch.finfo(dtype)
    values = [0.0, fi.tiny * fi.eps, fi.tiny, 0.5, 1.0 - fi.eps / 2, 1.0]
    pairs, x, eta = _grid(values, _extremes(dtype), dtype)
    eta.requires_grad_(True)
    y = fn(x, eta)
    y.sum().backward()
    bad = (~torch.isfinite(y) | ~torch.isfinite(eta.grad)).nonzero().flatten().tolist()
    assert not bad, f"{which} {dtype}: non-finite at {[pairs[i] for i in bad][:6]}"
    assert ((y >= 0) & (y <= 1)).all()
    ulp = 0.0 if which == "cdf" else torch.finfo(dtype).eps
    assert (y[x == 0] == 0).all()
    assert ((y[x == 1] - 1).abs() <= ulp).all()


@pytest.mark.parametrize("eta", [-2.0, 0.0, 0.5, 2.0])
def test_icdf_quantile_gradient_at_end_points(eta):
    """d icdf / du = 1 / density(icdf(u)) is finite at u in {0, 1} for moderate logits."""
    u = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    logits = torch.full((2,), eta, dtype=torch.float64)
    continuous_bernoulli_icdf(u, logits).sum().backward()
    # 1 / density: (e^eta - 1) / (eta e^{eta x}) at x = 0, 1 (1 at eta = 0)
    if eta == 0.0:
        expected = [1.0, 1.0]
    else:
        expected = [math.expm1(eta) / eta, math.expm1(eta) / (eta * math.exp(eta))]
    assert_within(u.grad.numpy(), expected, 1e-13 * np.abs(expected), [0, 1], "d icdf/du")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cdf_icdf_monotone(dtype):
    """cdf is nondecreasing in x and icdf in u on a 4097-point grid, for every logit."""
    grid = torch.linspace(0.0, 1.0, 4097, dtype=torch.float64).to(dtype)
    for eta in cast([*CDF_LOGITS, *signed([17.0, 100.0])], dtype):
        logits = torch.full_like(grid, eta)
        for fn in (continuous_bernoulli_cdf, continuous_bernoulli_icdf):
            y = fn(grid, logits)
            steps = torch.diff(y)
            assert (steps >= 0).all(), f"{fn.__name__} decreases at eta={eta} ({dtype})"


def test_icdf_cdf_round_trip_float64():
    """``icdf(cdf(x)) == x`` in float64 up to the conditioning of the round trip.

    With F = cdf(x) and f the density, a relative error ``e_F`` of F moves the recovered
    x by ``e_F F / f(x)``; the icdf adds its own relative error ``e_I``. Bound:
    ``(16 + |eta|) eps F / f(x) + (16 + |eta| + |log F|) eps x`` (the cdf and icdf bounds of
    the module docstring). ``F / f(x)`` is large where the CDF saturates at 1 (eta << 0,
    x not small): the information is lost in F there, not in the implementation. Points
    where F underflows are skipped (x cannot be recovered from 0).
    """
    eps = torch.finfo(torch.float64).eps
    xs = [1e-30, 1e-6, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0 - 1e-6]
    pairs, x, eta = _grid(xs, [*CDF_LOGITS, *signed([17.0, 100.0])], torch.float64)
    cdf = continuous_bernoulli_cdf(x, eta)
    back = continuous_bernoulli_icdf(cdf, eta).numpy()
    keep, bounds = [], []
    for i, ((xv, ev), f_val) in enumerate(zip(pairs, cdf.tolist(), strict=True)):
        if f_val < torch.finfo(torch.float64).tiny:
            continue
        # F / f(x) in log space (the density underflows where the CDF has saturated at 1)
        cond = math.exp(min(700.0, math.log(f_val) - ref.to_float64(ref.log_prob(xv, ev))))
        k = 16.0 + abs(ev)
        bound = k * eps * cond + (k + abs(math.log(f_val))) * eps * xv
        if bound < 0.01 * xv:  # else x is not recoverable from F at all: nothing to test
            keep.append(i)
            bounds.append(bound)
    assert len(keep) > 0.7 * len(pairs)
    labels = [pairs[i] for i in keep]
    assert_within(back[keep], x.numpy()[keep], bounds, labels, "round trip")


def test_cdf_icdf_gradcheck():
    """float64 gradcheck of cdf and icdf in (x or u, logits), logits 0 included; the icdf's
    second derivatives too (its first are exact values carrying the implicit forms'
    derivatives)."""
    pts = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    logits = torch.tensor([-20.0, -1.5, -0.5, 0.0, 0.5, 1.5, 20.0], dtype=torch.float64)
    v = pts[:, None].expand(-1, logits.numel()).clone().requires_grad_(True)
    e = logits[None, :].expand(pts.numel(), -1).clone().requires_grad_(True)
    for fn in (continuous_bernoulli_cdf, continuous_bernoulli_icdf):
        assert torch.autograd.gradcheck(fn, (v, e)), fn.__name__
    assert torch.autograd.gradgradcheck(continuous_bernoulli_icdf, (v, e))


def test_cdf_icdf_argument_checks():
    with pytest.raises(ValueError, match=r"value.*\(2,\)"):
        continuous_bernoulli_cdf(torch.tensor([0.5, 1.2]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"quantile.*\(2,\)"):
        continuous_bernoulli_icdf(torch.tensor([-0.1, 0.5]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        continuous_bernoulli_cdf(torch.full((3,), 0.5), torch.zeros(2))
    # validate_args=False: no check; outside the support the CDF is 1 above, 0 below
    out = continuous_bernoulli_cdf(torch.tensor([1.2, -0.1]), torch.zeros(2), validate_args=False)
    assert out.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_icdf_tiny_and_near_one_quantiles(dtype):
    """Regression (issue 10: the float32 inverse CDF was off by up to 1e-5 relative at tiny
    quantiles): the log-sum-exp form rounded ``log u`` (absolute ``|log u| eps``) before
    exponentiating, and ``log1p(u expm1(eta)) / eta`` lost the digits of a subnormal
    ``u eta``. Against mpmath with the module's ``8 eps`` relative bound, quantiles from the
    smallest subnormal up and near 1, logits tiny to huge, both signs."""
    fi = torch.finfo(dtype)
    quantiles = [fi.tiny * fi.eps, 1e-44, fi.tiny, 1e-38, 1e-30, 1e-20, 1e-9, 1e-3]
    quantiles += [0.5, 1.0 - 1e-3, 1.0 - 1e-6, 1.0 - fi.eps]
    mags = [1e-30, 1e-7, 1e-4, 0.01, 0.3, 0.999, 1.0, 1.1, 4.0, 30.0, 87.0, 100.0, 1e3, 1e5]
    pairs, u, eta = _grid(quantiles, signed(mags), dtype)
    got = continuous_bernoulli_icdf(u, eta).double().numpy()
    expected = _f64(ref.icdf, pairs)
    bound = _cdf_value_bound(pairs, expected, dtype, icdf=True)
    assert_within(got, expected, bound, pairs, f"icdf {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_icdf_outside_the_unit_interval_is_nan(dtype):
    """Unvalidated quantiles outside [0, 1] have no inverse: NaN (as in torch), for every
    logit including 0 and the tiny ones (whose first-order form returned 1.5 at u = 1.5)."""
    u = torch.tensor([-0.5, -1e-3, 1.5, 1.0 + 1e-2], dtype=dtype).repeat_interleave(4)
    eta = torch.tensor([0.0, 1e-30, 0.5, -40.0], dtype=dtype).repeat(4)
    out = continuous_bernoulli_icdf(u, eta, validate_args=False)
    assert out.dtype == dtype and torch.isnan(out).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cdf_outside_the_support(dtype):
    """Regression (issue 10: ``cdf(-2) = -20`` and ``cdf(1.1) = 1.04`` at probs 0.2): an
    unvalidated value below 0 gives exactly 0 and above 1 exactly 1 (as torch and TFP),
    with zero gradients in value and logits (no NaN from the extrapolated closed forms, even
    at huge values and logits); NaN stays NaN. Exact: no tolerance."""
    values = [-1e30, -2.0, -1e-3, 1.0 + 1e-2, 1.1, 2.0, 1e30]
    if dtype == torch.float16:
        values = [v for v in values if abs(v) < 6e4]
    logits = [0.0, 1e-30, -1.3862943611198906, 0.9, -40.0, 1e4]
    _, x, eta = _grid(values, logits, dtype)
    x.requires_grad_(True)
    eta.requires_grad_(True)
    out = continuous_bernoulli_cdf(x, eta, validate_args=False)
    out.sum().backward()
    expected = torch.where(x.detach() < 0, 0.0, 1.0).to(dtype)
    assert out.dtype == dtype and torch.equal(out.detach(), expected)
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(eta.grad, torch.zeros_like(eta))
    nan = torch.tensor([math.nan], dtype=dtype)
    assert torch.isnan(continuous_bernoulli_cdf(nan, nan + 1, validate_args=False)).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_inputs(dtype):
    """Empty in, empty out (issue 10), with the broadcast shape and a working backward;
    log_prob of half inputs is float32, cdf/icdf keep the dtype."""
    x = torch.zeros(0, 2, dtype=dtype, requires_grad=True)
    eta = torch.zeros(2, dtype=dtype, requires_grad=True)
    for fn, out_dtype in (
        (continuous_bernoulli_log_prob, _compute_dtype(dtype)),
        (continuous_bernoulli_cdf, dtype),
        (continuous_bernoulli_icdf, dtype),
    ):
        y = fn(x, eta)
        assert y.shape == (0, 2) and y.dtype == out_dtype
        gx, ge = torch.autograd.grad(y.sum(), (x, eta))
        assert gx.shape == (0, 2) and torch.equal(ge, torch.zeros_like(eta))


@functools.cache
def _icdf_du(u: float, eta: float):
    """``dx/du = expm1(eta) / (eta ((1 - u) + u e^eta))`` (mpmath; 1 at eta = 0)."""
    if eta == 0.0:
        return mpmath.mpf(1)

    def du(uu, ee):
        return mp.expm1(ee) / (ee * ((1 - uu) + uu * mp.exp(ee)))

    return ref._converged(du, u, eta)


@pytest.mark.parametrize("via", ["backward", "torch.func.grad"])
@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_icdf_gradients_to_a_few_ulp(dtype, via):
    """Regression (issue 10, item: value *and* gradient of the inverse CDF to a few ulp):
    both partial derivatives against mpmath with the module's ``8 eps`` relative bound, for
    quantiles from the smallest subnormal to 1 - eps and logits from 1e-30 to 1e6, both
    signs. Before, ``1/p(x)`` at the rounded ``x`` was off by ``|eta| eps`` (5% at
    ``eta = 1e6`` in float32) and ``u / p(x)`` formed as ``exp(log u - log p)`` by
    ``|log u| eps``. ``torch.func.grad`` always builds a graph of the backward (issue 12):
    it gave the implicit forms' values (``dx/du`` 8e-26 for 4e-8 at ``eta = 1.2e25``)."""
    fi = torch.finfo(dtype)
    quantiles = [fi.tiny * fi.eps, fi.tiny, 1e-30, 1e-7, 0.1, 0.5, 0.9, 1 - 1e-6, 1 - fi.eps]
    mags = [1e-30, 1e-7, 1e-4, 0.3, 0.999, 1.0, 4.0, 30.0, 87.0, 100.0, 1e3, 1e4, 1e6]
    pairs, u, eta = _grid(quantiles, [0.0, *signed(mags)], dtype)
    if via == "backward":
        u.requires_grad_(True)
        eta.requires_grad_(True)
        continuous_bernoulli_icdf(u, eta).sum().backward()
        grad_u, grad_eta = u.grad, eta.grad
    else:
        grad_u, grad_eta = torch.func.grad(
            lambda a, b: continuous_bernoulli_icdf(a, b).sum(), argnums=(0, 1)
        )(u, eta)
    d_eta = _f64(ref.icdf_grad, pairs)
    d_u = _f64(_icdf_du, pairs)
    assert_within(
        grad_eta.numpy(), d_eta, relative_bound(d_eta, 8 * fi.eps, dtype), pairs, "dx/deta"
    )
    over = np.abs(d_u) > fi.max
    assert (grad_u.numpy()[over] == np.inf).all()
    keep = np.flatnonzero(~over)
    got = grad_u.numpy()[keep]
    bound = relative_bound(d_u[keep], 8 * fi.eps, dtype)
    assert_within(got, d_u[keep], bound, [pairs[i] for i in keep], "dx/du")
