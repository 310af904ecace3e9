"""Gradients of ``probloss.functional.normal`` where an intermediate overflows or underflows
(issue 10, most found by the fuzz suite): a subnormal scale or variance, ``z^2`` or the
residual ``value - loc`` beyond ``finfo.max``, a floored scale, an incoming gradient times
the residual below the normal range, and a broadcast value whose gradient terms overflow
with opposite signs. The value-side edge cases (beta-NLL at extreme scales, empty batches,
huge inputs) are in ``test_normal_edges.py``.

Where the numbers come from
---------------------------
mpmath at 50 significant digits (40 in one case), evaluated at the inputs *after* the cast
to the dtype under test, or the exact limit (``+-inf`` where the true derivative exceeds
the output dtype, ``0`` where it is below every float). Each test states its reference
and its bound (a count of roundings, in ``eps`` of the compute dtype, plus the half
rounding of a gradient returned in float16 / bfloat16) in its docstring.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from mpmath import mp, mpf

from probloss.functional import laplace_log_prob, normal_log_prob, normal_nll
from tests.functional._checks import HALF_DTYPES, as_float, dtype_id


def test_scale_and_var_gradients_at_overflowing_intermediates():
    """Found by the fuzz suite. A subnormal scale (1e-40, float32): d/dscale = (z^2 - 1) /
    scale with both autograd terms z^2/scale and -1/scale infinite (inf - inf = NaN); exact
    +inf. A variance of 78336 with z = 2.3e21: d/dvar = (z^2 - 1) / (2 var) = 3.3e37 (mpmath),
    finite although z^2 / sigma, autograd's path through sqrt, overflows; bound 8 eps
    relative (a handful of roundings)."""
    x = torch.tensor([1.6], requires_grad=True)
    scale = torch.tensor([1e-40], requires_grad=True)
    normal_log_prob(x, torch.zeros(1), scale=scale).sum().backward()
    assert scale.grad.item() == math.inf and x.grad.item() == -math.inf
    var = torch.tensor([78336.0], requires_grad=True)
    value, loc = torch.tensor([0.0]), torch.tensor([-6.327971087045325e23])
    normal_log_prob(value, loc, var=var).sum().backward()
    with mp.workdps(40):
        z2 = (mpf(value.item()) - mpf(loc.item())) ** 2 / mpf(var.item())
        exact = float((z2 - 1) / (2 * mpf(var.item())))
    assert abs(var.grad.item() - exact) <= 8 * torch.finfo(torch.float32).eps * exact


def test_floored_nll_gradient_where_the_weight_underflows_and_z_overflows():
    """Found by the fuzz suite: log_scale = -2.9e24 floored at min_scale = 1e-3, residual
    3.4e38: d/dlog_scale = (1 - z'^2) e^{log_scale - log sigma'} = -(3.4e41)^2 e^{-2.9e24},
    exactly 0 in any float (mpmath: 10^(-1.3e24)); was -inf (z' formed before the weight)."""
    ls = torch.tensor([-2.9467566853106586e24], requires_grad=True)
    value, loc = torch.tensor([-6.103515625e-05]), torch.tensor([3.3895313892515355e38])
    normal_nll(value, loc, log_scale=ls, min_scale=1e-3, reduction="sum").backward()
    assert ls.grad.item() == 0.0


def _z_squared_rows(dtype):
    """(value, loc, form, param) where ``z^2`` exceeds ``finfo.max`` of the compute dtype but
    the derivative in the scale parameter does not: ``z^2 = 1.5 M`` (``M = finfo.max``)
    against ``log_var`` (d/dlog_var = (z^2 - 1)/2 = 0.75 M), ``z^2 = 1.5 M var`` against
    ``var < 1`` (d/dvar = (z^2 - 1)/(2 var) = 0.75 M while ``z^2 / var`` = 1.5 M), both
    signs of the residual, and ``log_scale`` (d/dlog_scale = z^2 - 1: +inf, exactly)."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    big = torch.finfo(compute).max
    rows = []
    for sign, lv in itertools.product((1.0, -1.0), (0.0, -0.5, 0.75)):
        r = sign * math.sqrt(1.5) * math.sqrt(big) * math.exp(lv / 2)
        rows.append((0.0, -r, "log_var", lv))
        rows.append((r / 2, -r / 2, "log_scale", lv / 2))
    for sign, var in itertools.product((1.0, -1.0), (0.55078125, 0.125, 1.0)):
        rows.append((0.0, -sign * math.sqrt(1.5) * math.sqrt(big) * var, "var", var))
    return rows


# float16 is left out: its inputs (at most 65504) cannot make z^2 exceed float32's range
# with a variance of at least its smallest subnormal (z^2 <= 65504^2 / 6e-8 = 7e16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_scale_parameter_gradient_where_z_squared_overflows_against_mpmath(dtype):
    """Issue 10 (found by the fuzz suite): normal_log_prob(0, -2e19, log_var=0) gave d/dlog_var
    = inf (exact (z^2 - 1)/2 = 2.0e38: z^2 = 4e38 overflowed before the factor 1/2), and
    normal_log_prob(-9.87e18, 1.65e18, var=0.551) d/dvar = inf (exact 2.19e38: k z (z / var)
    formed without k first). mpmath at 50 digits: d/dp = k (z^2 - 1) / p^{[var]}; the same
    for normal_nll (the negative). Bound: (4 |log sigma| + 16) eps relative (z = r e^{-log
    sigma} rounded in its exponent, squared), plus the half rounding for half inputs; +inf
    exactly where the true derivative exceeds the output dtype."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    eps = torch.finfo(compute).eps
    half_eps = torch.finfo(dtype).eps / 2 if dtype in HALF_DTYPES else 0.0
    checked = 0
    for value, loc, form, p in _z_squared_rows(dtype):
        v, m, pt = (torch.tensor(u, dtype=torch.float64).to(dtype) for u in (value, loc, p))
        if not all(torch.isfinite(t) for t in (v, m, pt)):
            continue
        with mp.workdps(50):
            pv = mpf(pt.item())
            k = 1 if form == "log_scale" else mpf(1) / 2
            log_sigma = k * (mp.log(pv) if form == "var" else pv)
            z2 = ((mpf(v.item()) - mpf(m.item())) / mp.exp(log_sigma)) ** 2
            exact = k * (z2 - 1) / (pv if form == "var" else 1)
        ref = as_float(exact, dtype)
        if ref is None:
            continue
        bound = (4 * abs(float(log_sigma)) + 16) * eps * abs(float(exact))
        bound += half_eps * abs(float(exact)) + torch.finfo(dtype).tiny
        for fn, sign in ((normal_log_prob, 1.0), (normal_nll, -1.0)):
            param = pt.clone().requires_grad_()
            kwargs = {"reduction": "sum"} if fn is normal_nll else {}
            fn(v, m, **{form: param}, **kwargs).backward()
            got = param.grad.item()
            label = f"{fn.__name__} {form}={pt.item():.4g} r={v.item() - m.item():.4g}"
            if math.isinf(ref):
                assert got == sign * ref, f"{label}: got {got}, exact {float(exact):.5g}"
            else:
                assert abs(got - sign * ref) <= bound, f"{label}: got {got}, exact {ref:.5g}"
            checked += 1
    assert checked >= 16  # every row survives the cast


_SIGMAS = (1.08, 1.2)  # z = r / sigma overflows at the first (r = 1.106 M), not at the second


def _overflowing_residual_rows(dtype):
    """(value, loc, sigma) with ``value - loc = +-1.106 M`` (``M = finfo.max`` of the compute
    dtype: the difference overflows) and ``sigma`` in :data:`_SIGMAS`: ``z = r / sigma`` is
    ``1.024 M`` (inf) or ``0.92 M``, while ``d/dvalue = -r / sigma^2`` is ``0.948 M`` or
    ``0.768 M``."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    big = torch.finfo(compute).max
    return [
        (sign * 0.996 * big, -sign * 0.11 * big, sigma)
        for sign, sigma in itertools.product((1.0, -1.0), _SIGMAS)
    ]


def _residual_gradient_cases():
    """(label, fn(value, loc, p) -> log density (or -NLL), p from sigma, sigma' from p,
    d/dvalue from (r, sigma')), in mpmath; ``sigma' = sigma + 1e-3`` with a floor."""
    floor = mpf("1e-3")

    def normal(r, sig):  # d/dvalue of log N = -r / sigma^2
        return -r / sig**2

    identity = (lambda sig: sig, lambda p: p)
    log_scale, log_var = (mp.log, mp.exp), (lambda sig: 2 * mp.log(sig), lambda p: mp.exp(p / 2))
    var = (lambda sig: sig**2, mp.sqrt)
    return [
        (
            "log_prob log_scale",
            lambda x, m, p: normal_log_prob(x, m, log_scale=p),
            *log_scale,
            normal,
        ),
        ("log_prob log_var", lambda x, m, p: normal_log_prob(x, m, log_var=p), *log_var, normal),
        ("log_prob scale", lambda x, m, p: normal_log_prob(x, m, scale=p), *identity, normal),
        ("log_prob var", lambda x, m, p: normal_log_prob(x, m, var=p), *var, normal),
        (
            "nll log_scale",
            lambda x, m, p: -normal_nll(x, m, log_scale=p, reduction="sum"),
            *log_scale,
            normal,
        ),
        (
            "nll log_scale floor",
            lambda x, m, p: -normal_nll(x, m, log_scale=p, min_scale=1e-3, reduction="sum"),
            *log_scale,
            lambda r, sig: normal(r, sig + floor),
        ),
        (
            "nll scale floor",
            lambda x, m, p: -normal_nll(x, m, scale=p, min_scale=1e-3, reduction="sum"),
            *identity,
            lambda r, sig: normal(r, sig + floor),
        ),
        # beta = 0.5: w z / sigma = sigma r / sigma^2 (the weight detached)
        (
            "nll var beta=0.5",
            lambda x, m, p: -normal_nll(x, m, var=p, beta=0.5, reduction="sum"),
            *var,
            lambda r, sig: -r / sig,
        ),
        (
            "laplace",
            lambda x, m, p: laplace_log_prob(x, m, p),
            *log_scale,
            lambda r, sig: -mp.sign(r) / sig,
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_value_and_loc_gradients_where_the_residual_or_z_overflows_against_mpmath(dtype):
    """Found by the fuzz suite (issue 10): normal_log_prob(3.3895e38, -3.6975e36, log_scale=
    0.0139) in float32 gave d/dvalue = -inf, exact -3.33e38: value - loc overflows and is
    split as r m (m = 2), and the gradient reached value through r, as m times itself
    (2 * 3.3e38 = inf) before the 1/2 of the halving. And where z = r m / sigma overflows
    but z / sigma does not (sigma = 1.08), autograd's d/dz = -z was inf. Every scale form,
    the NLL paths (floor, beta) and Laplace; d/dloc = -d/dvalue. mpmath at 50 digits at the
    cast inputs; bound (4 |log sigma| + 16) eps relative (r rounded once, e^{-2 log sigma} or
    the divisions by sigma a few roundings, the exponent rounded by eps |log sigma|), plus
    the half rounding of the returned gradient for bfloat16."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    eps = torch.finfo(compute).eps
    half_eps = torch.finfo(dtype).eps / 2 if dtype in HALF_DTYPES else 0.0
    checked = 0
    for label, fn, param_of, sigma_of, d_value in _residual_gradient_cases():
        for x, mu, sigma in _overflowing_residual_rows(dtype):
            with mp.workdps(50):
                p_exact = param_of(mpf(sigma))
            v, m, p = (
                torch.tensor(float(u), dtype=torch.float64).to(dtype) for u in (x, mu, p_exact)
            )
            if not all(torch.isfinite(t) for t in (v, m, p)):
                continue
            with mp.workdps(50):
                r = mpf(v.item()) - mpf(m.item())
                sig = sigma_of(mpf(p.item()))
                exact = d_value(r, sig)
            ref = as_float(exact, dtype)
            if ref is None or math.isinf(ref):
                continue
            leaves = [t.clone().requires_grad_() for t in (v, m, p)]
            fn(*leaves).sum().backward()
            bound = (4 * abs(float(mp.log(sig))) + 16) * eps * abs(ref)
            bound += half_eps * abs(ref) + torch.finfo(dtype).tiny
            got_v, got_m = leaves[0].grad.item(), leaves[1].grad.item()
            where = f"{label} x={v.item():.5g} mu={m.item():.5g} p={p.item():.5g}"
            assert abs(got_v - ref) <= bound, f"{where}: d/dvalue {got_v}, exact {ref:.6g}"
            assert abs(got_m + ref) <= bound, f"{where}: d/dloc {got_m}, exact {-ref:.6g}"
            checked += 1
    assert checked >= 30  # most rows survive the cast and have a representable gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_scale_parameter_gradient_at_subnormal_scale_or_variance_against_mpmath(dtype):
    """Found by the fuzz suite (issue 10): normal_log_prob(3.7e-34, -3.09e-21, var=1.948e-39)
    in float32 gave d/dvar = -inf, exact (z^2 - 1)/(2 var) = -2.55e38: the -1/(2 var) term was
    formed as (1/var) / 2, and 1/var overflows. Likewise z / p overflows for |z| < 1 where k
    z^2 / p does not (var = 2e-39, z = 0.9: z / var = 4.5e38, d/dvar = -4.8e37; scale =
    3e-39, z = 0.9: d/dscale = -6.3e37). p between 1/(2 max) and 1/max (a subnormal in
    float32 and float64), z in {0, 0.5, 0.9, 0.999}. mpmath at 50 digits at the cast
    inputs: d/dp = k (z^2 - 1) / p; bound 16 eps of the terms' size k (z^2 + 1) / p (z
    rounded twice, z^2 - 1 and one division a few roundings), plus the half rounding of the
    returned gradient for bfloat16."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    eps = torch.finfo(compute).eps
    half_eps = torch.finfo(dtype).eps / 2 if dtype in HALF_DTYPES else 0.0
    inv_max = 1.0 / torch.finfo(compute).max
    checked = 0
    for form, p_frac, z in itertools.product(("var", "scale"), (0.6, 0.9), (0.0, 0.5, 0.9, 0.999)):
        p = torch.tensor(p_frac * inv_max, dtype=torch.float64).to(dtype)
        sigma = math.sqrt(p.item()) if form == "var" else p.item()
        value = torch.tensor(z * sigma, dtype=torch.float64).to(dtype)
        if p.item() == 0.0:
            continue
        with mp.workdps(50):
            pv = mpf(p.item())
            k = mpf(1) / 2 if form == "var" else mpf(1)
            zz = mpf(value.item()) / (mp.sqrt(pv) if form == "var" else pv)
            exact = k * (zz * zz - 1) / pv
        ref = as_float(exact, dtype)
        if ref is None or math.isinf(ref):
            continue
        leaf = p.clone().requires_grad_()
        normal_log_prob(value, torch.zeros((), dtype=dtype), **{form: leaf}).backward()
        size = float(k * (zz * zz + 1) / pv)  # the terms' size: z^2 - 1 may cancel
        bound = 16 * eps * size + half_eps * abs(ref) + torch.finfo(dtype).tiny
        got = leaf.grad.item()
        assert abs(got - ref) <= bound, (
            f"{form}={p.item():.4g} z={float(zz):.4g}: got {got}, exact {ref:.6g}"
        )
        checked += 1
    assert checked >= 12


def test_value_gradient_when_the_incoming_gradient_times_the_residual_underflows():
    """d/dvalue = -g r / sigma^2 formed as (-g r) e^{-2 log sigma} underflowed where g r does
    (a mixture responsibility g = 1e-28 times r = 2.9e-39 in float32, sigma = e^{-74.8}: 0
    where the exact -0.034; the fused mixture kernel had it right, so fused != plain in the
    fuzz). There it is (-g z) e^{-log sigma} with z = r e^{-log sigma} first. Bound: two
    mul_exp (about an ulp each) and two products: 8 eps32 relative; mpmath at the cast
    inputs."""
    value = torch.tensor([2.6281142503642295e-39], requires_grad=True)
    loc = torch.tensor([-3.1011015275201067e-40], requires_grad=True)
    log_scale = torch.tensor([-74.83798217773438])
    grad = torch.tensor([1e-28])
    normal_log_prob(value, loc, log_scale=log_scale).backward(grad)
    with mp.workdps(50):
        r = mpf(float(value.detach())) - mpf(float(loc.detach()))
        exact = -mpf(float(grad)) * r * mp.exp(-2 * mpf(float(log_scale)))
    eps = torch.finfo(torch.float32).eps
    assert abs(float(value.grad) - float(exact)) <= 8 * eps * abs(float(exact)), value.grad
    assert float(loc.grad) == -float(value.grad)


@pytest.mark.parametrize("form, param, g", [("scale", 3.2e-33, 1e-28), ("var", 1.2e-38, 1e-17)])
def test_scale_form_value_gradient_when_the_incoming_gradient_times_the_residual_underflows(
    form, param, g
):
    """The same underflow for a given scale or variance: (-g r) / sigma^2 was 0 where -g r
    underflows (g = 1e-28, r = 2.9e-39, scale 3.2e-33 in float32: exact -0.028; g = 1e-17
    at var = 1.2e-38: exact -2.4e-18); now (-g (r / sigma)) / sigma there. Bound: three
    roundings and the division by the scale (or its square root, for a variance): 8 eps32
    relative; mpmath at the cast inputs."""
    value = torch.tensor([2.6281142503642295e-39], requires_grad=True)
    loc = torch.tensor([-3.1011015275201067e-40], requires_grad=True)
    param = torch.tensor([param])
    grad = torch.tensor([g])
    normal_log_prob(value, loc, **{form: param}).backward(grad)
    with mp.workdps(50):
        r = mpf(float(value.detach())) - mpf(float(loc.detach()))
        var = mpf(float(param)) if form == "var" else mpf(float(param)) ** 2
        exact = -mpf(float(grad)) * r / var
    eps = torch.finfo(torch.float32).eps
    assert abs(float(value.grad) - float(exact)) <= 8 * eps * abs(float(exact)), value.grad
    assert float(loc.grad) == -float(value.grad)


@pytest.mark.parametrize("form", ["log_scale", "log_var", "scale"])
def test_value_gradient_summed_over_terms_that_overflow_with_opposite_signs(form):
    """A value shared by two densities (broadcast) at loc = -2e-31 and 1.9e-31, sigma = e^{-80}
    in float32: each term of d/dvalue = sum_k (mu_k - x) / sigma^2 is about 6e38 (inf), their
    sum -3.1e37. It was NaN (inf - inf); d/dloc is each term itself (+-inf, correctly). The
    sum is formed again from the terms' logarithms in float64: bound 2 eps32 |exact| (the
    final rounding and that of the given parameter's own rounding, included in mpmath's
    inputs) plus 1e-12 times the terms; mpmath at the cast inputs."""
    value = torch.zeros(1, requires_grad=True)
    loc = torch.tensor([-2e-31, 1.9e-31])
    param = {"log_scale": -80.0, "log_var": -160.0, "scale": math.exp(-80.0)}[form]
    param = torch.full((2,), param)
    normal_log_prob(value, loc, **{form: param}).sum().backward()
    with mp.workdps(50):
        var = {"log_scale": lambda p: mp.exp(2 * p), "log_var": mp.exp, "scale": lambda p: p * p}[
            form
        ]
        terms = [mpf(float(m)) / var(mpf(float(p))) for m, p in zip(loc, param, strict=True)]
        exact = sum(terms)
    eps = torch.finfo(torch.float32).eps
    assert max(abs(t) for t in terms) > torch.finfo(torch.float32).max  # the case
    bound = 2 * eps * abs(exact) + 1e-12 * sum(abs(t) for t in terms)
    assert abs(float(value.grad) - exact) <= bound, (value.grad, float(exact))
