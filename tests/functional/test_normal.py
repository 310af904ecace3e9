"""Tests of ``probloss.functional.normal``: the normal log density in its four scale forms
and the Gaussian NLL (beta-NLL, soft scale floor, NaN masking, validation).

References and bounds: see ``tests/functional/location_scale_reference.py`` (mpmath at
adaptive precision, scipy.stats in float64; the table of bounds and measured errors).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from mpmath import mp

from probloss.functional import (
    laplace_log_prob,
    normal_log_prob,
    normal_nll,
    student_t_log_prob,
)
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id
from tests.functional.location_scale_reference import (
    LOCS,
    LOG_SCALES,
    RTOL,
    cast,
    check,
    grad_rtol,
    normal_ref,
    result_dtype,
    sigma_of,
    stable,
)

FORMS = ("scale", "log_scale", "var", "log_var")


# ======================================================================================
# Normal: accuracy against mpmath in every dtype and every parameter form
# ======================================================================================

ZS = [0.0, *(s * m for m in (1e-8, 0.5, 1.0, 1.5, 3.0, 10.0, 1e3, 1e10, 1e30) for s in (1, -1))]


def _param(form: str, ls: float) -> float:
    return {
        "scale": math.exp(ls),
        "log_scale": ls,
        "var": math.exp(2 * ls),
        "log_var": 2 * ls,
    }[form]


@functools.cache
def _normal_grid(form: str, dtype: torch.dtype):
    """Cast (x, mu, param) triples: x = mu + z sigma over the grid, dropping points whose
    x or parameter is not a finite (positive, for scale/var) number of the dtype."""
    triples = [
        (mu + z * math.exp(ls), mu, _param(form, ls))
        for ls, z, mu in itertools.product(LOG_SCALES, ZS, LOCS)
    ]
    cols = [cast([t[k] for t in triples], dtype) for k in range(3)]
    ok = torch.isfinite(cols[0]) & torch.isfinite(cols[2])
    if form in ("scale", "var"):
        ok &= cols[2] > 0
    x, mu, p = (c[ok].double().tolist() for c in cols)
    return sorted(set(zip(x, mu, p, strict=True)))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_normal_log_prob_matches_mpmath(dtype, form):
    """Value and the three gradients on the extreme grid: |z| from 0 to 1e30, log-scale
    from -80 to 80, in every dtype and parameter form (bounds in the module docstring)."""
    points = _normal_grid(form, dtype)
    assert len(points) > 100
    x, mu, p = (cast([t[k] for t in points], dtype).requires_grad_() for k in range(3))
    out = normal_log_prob(x, mu, **{form: p})
    out_dtype = result_dtype(dtype)
    assert out.dtype == out_dtype
    out.sum().backward()
    ref = np.array([normal_ref(a, b, form, c) for a, b, c in points])
    rtol, g_rtol = RTOL[out_dtype], grad_rtol(dtype)
    what = f"{form} {dtype}"
    check(out.detach().double(), ref[:, 0], ref[:, 1], rtol, out_dtype, points, f"value {what}")
    check(x.grad.double(), ref[:, 2], ref[:, 2], g_rtol, dtype, points, f"d/dvalue {what}")
    check(mu.grad.double(), ref[:, 3], ref[:, 3], g_rtol, dtype, points, f"d/dloc {what}")
    check(p.grad.double(), ref[:, 4], ref[:, 5], g_rtol, dtype, points, f"d/d{form} {what}")


@pytest.mark.parametrize(
    ("dtype", "x", "log_scale"),
    [
        (torch.float64, 1e30, 0.0),  # |z| = 1e30: -5e59, exact
        (torch.float64, 0.0, 0.0),
        (torch.float32, 0.0, -80.0),  # density e^80 / sqrt(2 pi) at the mean
        (torch.float32, 0.0, 80.0),
        (torch.float32, 1e-30, -80.0),  # z = 5.5e4
        (torch.float32, 1e30, 80.0),  # z = 1.8e-5
        (torch.float32, 0.0, -150.0),  # exp(150) overflows float32; z = 0 still
        (torch.float32, 1e-40, -120.0),  # subnormal residual, z = 1.3e12
        (torch.float64, 0.0, -1000.0),
    ],
)
def test_normal_documented_exact_cases(dtype, x, log_scale):
    """The cases the docstring promises, value and both gradients against mpmath at the
    float32/float64 bounds (``check``: finite unless the exact value overflows the dtype,
    as d/dvalue = -z/sigma does at (1e-30, -80) and (1e-40, -120) in float32)."""
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    ls = torch.tensor(log_scale, dtype=dtype, requires_grad=True)
    out = normal_log_prob(xt, torch.tensor(0.0, dtype=dtype), log_scale=ls)
    out.backward()
    exact, mag, dx, _, dls, mag_ls = normal_ref(xt.item(), 0.0, "log_scale", log_scale)
    rtol = RTOL[dtype]
    label = [(x, log_scale)]
    check([out.item()], [exact], [mag], rtol, dtype, label, "value")
    check([xt.grad.item()], [dx], [dx], rtol, dtype, label, "d/dvalue")
    check([ls.grad.item()], [dls], [mag_ls], rtol, dtype, label, "d/dlog_scale")
    assert torch.isfinite(out) and torch.isfinite(ls.grad)  # d/dvalue overflows at two


def test_normal_float32_overflow_of_the_density_itself():
    """In float32, |z| = 1e30 gives log p = -5e59 < -finfo.max: the result is -inf (the
    exact value rounded to float32); the gradient in value/loc, -z/sigma = -1e30, is still
    finite and exact, and the one in log_scale, z^2 - 1 = 1e60, is +inf (overflows too)."""
    x = torch.tensor(1e30, requires_grad=True)
    loc = torch.tensor(0.0, requires_grad=True)
    ls = torch.tensor(0.0, requires_grad=True)
    out = normal_log_prob(x, loc, log_scale=ls)
    out.backward()
    assert out.item() == -math.inf
    assert x.grad.item() == pytest.approx(-1e30, rel=1e-6)
    assert loc.grad.item() == pytest.approx(1e30, rel=1e-6)
    assert ls.grad.item() == math.inf


def test_normal_forms_agree():
    """The four parameter forms give the same value and value-gradient (float64, random
    moderate inputs; forms differ only in the rounding of the parameter: bound 1e-13 M)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=gen, dtype=torch.float64) * 10
    mu = torch.randn(200, generator=gen, dtype=torch.float64)
    ls = torch.randn(200, generator=gen, dtype=torch.float64) * 3
    params = {"scale": ls.exp(), "log_scale": ls, "var": (2 * ls).exp(), "log_var": 2 * ls}
    results = {}
    for form, p in params.items():
        xg = x.clone().requires_grad_()
        out = normal_log_prob(xg, mu, **{form: p})
        out.sum().backward()
        results[form] = (out.detach(), xg.grad)
    z = (x - mu) / ls.exp()
    magnitude = (z * z / 2 + ls.abs() + 1).numpy()
    labels = list(range(200))
    ref_value, ref_grad = results["log_scale"]
    for form, (value, grad) in results.items():
        assert_within(value.numpy(), ref_value.numpy(), 1e-13 * magnitude, labels, form)
        bound = 1e-13 * ref_grad.abs().numpy()
        assert_within(grad.numpy(), ref_grad.numpy(), bound, labels, f"{form} grad")


def test_normal_against_scipy_float64():
    """scipy.stats.norm.logpdf on seeded random inputs (|z| up to ~1e3, scale 1e-3..1e3)."""
    rng = np.random.default_rng(1)
    mu = rng.normal(size=500) * 5
    scale = np.exp(rng.uniform(-7, 7, size=500))
    x = mu + scale * rng.standard_t(1.5, size=500)
    expected = scipy.stats.norm.logpdf(x, mu, scale)
    got = normal_log_prob(torch.tensor(x), torch.tensor(mu), scale=torch.tensor(scale)).numpy()
    z = (x - mu) / scale
    magnitude = z * z / 2 + np.abs(np.log(scale)) + 1
    assert_within(got, expected, 1e-13 * magnitude, list(range(500)), "norm.logpdf")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_inputs_computed_in_float32(dtype):
    """Every log density of half inputs is float32 and equals the float32 computation on the
    exactly upcast inputs; gradients come back in the input dtype, finite."""
    x = torch.tensor([-3.0, 0.0, 0.5, 200.0], dtype=dtype, requires_grad=True)
    loc = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=dtype, requires_grad=True)
    ls = torch.tensor([-2.0, 3.0, 0.0, 1.0], dtype=dtype, requires_grad=True)
    df = torch.tensor([0.5, 3.0, 30.0, 1e3], dtype=dtype, requires_grad=True)
    calls = {
        "normal": lambda a, b, c, d: normal_log_prob(a, b, log_scale=c),
        "normal_nll": lambda a, b, c, d: normal_nll(a, b, log_var=c, reduction="none"),
        "laplace": lambda a, b, c, d: laplace_log_prob(a, b, c),
        "student_t": lambda a, b, c, d: student_t_log_prob(a, d, b, c),
    }
    for name, fn in calls.items():
        out = fn(x, loc, ls, df)
        assert out.dtype == torch.float32, name
        ref = fn(*(t.detach().float() for t in (x, loc, ls, df)))
        torch.testing.assert_close(out.detach(), ref, rtol=0.0, atol=0.0)
        grads = torch.autograd.grad(out.sum(), (x, loc, ls, df), allow_unused=True)
        for g in grads:
            assert g is None or (g.dtype == dtype and torch.isfinite(g).all()), name


def test_python_numbers_take_the_tensor_dtype():
    """A Python ``0.1`` next to float64 tensors is the float64 0.1 (not its float32 rounding,
    which would be off by 1.5e-9 relative)."""
    x = torch.tensor([0.3], dtype=torch.float64)
    got = normal_log_prob(x, 0.1, scale=0.7)
    expected = scipy.stats.norm.logpdf(0.3, 0.1, 0.7)
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) <= 1e-15 * 2
    assert normal_log_prob(0.3, 0.1, scale=0.7).dtype == torch.get_default_dtype()


# ======================================================================================
# Errors
# ======================================================================================


def test_exactly_one_scale_form():
    x, mu = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="exactly one of log_scale, scale, var, log_var; got none"):
        normal_log_prob(x, mu)
    with pytest.raises(ValueError, match="got scale, log_var"):
        normal_log_prob(x, mu, scale=torch.ones(3), log_var=torch.zeros(3))
    with pytest.raises(ValueError, match="exactly one"):
        normal_nll(x, mu, log_scale=torch.zeros(3), var=torch.ones(3))


@pytest.mark.parametrize("form", ["scale", "var"])
@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan])
def test_non_positive_scale_or_var_is_named(form, bad):
    p = torch.tensor([[1.0, bad, 2.0]])
    with pytest.raises(ValueError, match=rf"{form} of shape \(1, 3\) must be positive"):
        normal_log_prob(torch.zeros(1, 3), torch.zeros(1, 3), **{form: p})
    with pytest.raises(ValueError, match=rf"{form} of shape \(1, 3\) must be positive"):
        normal_nll(torch.zeros(1, 3), torch.zeros(1, 3), **{form: p})
    # validate_args=False skips the check (no host sync): the bad element is NaN
    out = normal_log_prob(torch.zeros(1, 3), torch.zeros(1, 3), validate_args=False, **{form: p})
    assert torch.isnan(out[0, 1]) and torch.isfinite(out[0, [0, 2]]).all()


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"value \(4,\), loc \(3,\), log_scale \(4,\)"):
        normal_log_prob(torch.zeros(4), torch.zeros(3), log_scale=torch.zeros(4))
    with pytest.raises(ValueError, match=r"var \(2, 5\)"):
        normal_nll(torch.zeros(3), torch.zeros(3), var=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"log_scale \(2,\)"):
        laplace_log_prob(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"df \(2,\)"):
        student_t_log_prob(torch.zeros(3), torch.ones(2), torch.zeros(3), torch.zeros(3))
    out = normal_log_prob(torch.zeros(4, 1), torch.zeros(3), log_scale=torch.zeros(1, 1))
    assert out.shape == (4, 3)


def test_nll_argument_errors():
    x, mu, ls = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="reduction must be"):
        normal_nll(x, mu, log_scale=ls, reduction="average")
    with pytest.raises(ValueError, match="nan_policy must be 'raise' or 'mask'"):
        normal_nll(x, mu, log_scale=ls, nan_policy="omit")
    with pytest.raises(ValueError, match="beta must lie in"):
        normal_nll(x, mu, log_scale=ls, beta=1.5)
    with pytest.raises(ValueError, match="min_scale must be positive"):
        normal_nll(x, mu, log_scale=ls, min_scale=0.0)
    with pytest.raises(ValueError, match="min_scale must be positive"):
        normal_nll(x, mu, log_scale=ls, min_scale=torch.tensor([1.0, -1.0, 1.0]))


def test_nan_target_raises_under_raise_policy():
    x = torch.tensor([0.0, math.nan, 1.0])
    with pytest.raises(ValueError, match=r"value of shape \(3,\) contains 1 NaN"):
        normal_nll(x, torch.zeros(3), log_scale=torch.zeros(3))
    # not validating: NaN propagates (documented), no host sync
    out = normal_nll(x, torch.zeros(3), log_scale=torch.zeros(3), validate_args=False)
    assert torch.isnan(out)


# ======================================================================================
# normal_nll: reduction, beta-NLL, min_scale, NaN masking
# ======================================================================================


def _nll_inputs(n: int = 60, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    mu = torch.randn(n, generator=gen, dtype=torch.float64)
    ls = torch.randn(n, generator=gen, dtype=torch.float64)
    return x, mu, ls


def test_nll_is_negative_log_prob_and_reductions():
    """'none' is -log_prob bitwise; 'sum' its sum; 'mean' the sum over the number of
    events (the value's elements), with a parameter broadcast up to the value's shape."""
    x, mu, ls = _nll_inputs()
    x2 = x.reshape(6, 10)
    mu2, ls2 = mu.reshape(6, 10)[:, :1], ls.reshape(6, 10)  # (6, 1) loc broadcast up to (6, 10)
    per = normal_nll(x2, mu2, log_scale=ls2, reduction="none")
    assert torch.equal(per, -normal_log_prob(x2, mu2, log_scale=ls2))
    assert per.shape == (6, 10)
    total = normal_nll(x2, mu2, log_scale=ls2, reduction="sum")
    mean = normal_nll(x2, mu2, log_scale=ls2)
    torch.testing.assert_close(total, per.sum(), rtol=1e-15, atol=0.0)
    torch.testing.assert_close(mean, per.sum() / 60, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_beta_nll_weight_is_detached_variance_power(beta):
    """Seitzer et al. 2022: loss_i = sg(var_i ** beta) * nll_i. Value: the weight is
    var ** beta; gradient: detached weight, so d/dls and d/dloc are the weight times the
    plain NLL gradients. Reference: float64 ``var ** beta`` times the plain float64 NLL and its
    gradients (each a few roundings). Bound: the weighted loss is ``y^2/2 + w (ls + c)`` with
    ``y = r e^{-(1 - beta) ls}`` (relative error <= (|ls| + 3) eps: the rounded exponent
    carries an absolute error eps |ls|), so both sides agree to 8 (|ls| + 3) eps relative to
    the magnitude ``w (z^2/2 + |ls| + c)`` of the terms (the sum may cancel); d/dls
    (``w (1 - z^2)``) relative to ``w (1 + z^2)``, d/dloc (a product) relative to itself."""
    eps = torch.finfo(torch.float64).eps
    x, mu, ls = _nll_inputs()
    var = (2 * ls).exp()
    lsg, mug = ls.clone().requires_grad_(), mu.clone().requires_grad_()
    weighted = normal_nll(x, mug, log_scale=lsg, beta=beta, reduction="none")
    plain = normal_nll(x, mu, log_scale=ls, reduction="none")
    weight = var**beta
    z2 = ((x - mu) / ls.exp()) ** 2
    k = 8 * (ls.abs() + 3) * eps
    magnitude = weight * (z2 / 2 + ls.abs() + 0.5 * math.log(2 * math.pi))
    assert ((weighted.detach() - weight * plain).abs() <= k * magnitude).all()
    weighted.sum().backward()
    lsp, mup = ls.clone().requires_grad_(), mu.clone().requires_grad_()
    normal_nll(x, mup, log_scale=lsp, reduction="none").mul(weight).sum().backward()
    assert ((lsg.grad - lsp.grad).abs() <= k * weight * (1 + z2)).all()
    assert ((mug.grad - mup.grad).abs() <= k * mup.grad.abs()).all()
    # ... and not the gradient with the weight attached, which adds d(var ** beta)/dls * nll:
    lsa = ls.clone().requires_grad_()
    ((2 * lsa).exp().pow(beta) * plain).sum().backward()
    assert (lsa.grad.abs() > 0).all()
    assert not torch.allclose(lsg.grad, lsp.grad + lsa.grad)


def test_beta_zero_is_the_plain_nll_bitwise():
    x, mu, ls = _nll_inputs()
    for reduction in ("none", "sum", "mean"):
        a = normal_nll(x, mu, log_scale=ls, beta=0.0, reduction=reduction)
        b = -normal_log_prob(x, mu, log_scale=ls)
        b = {"none": b, "sum": b.sum(), "mean": b.mean()}[reduction]
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", FORMS)
def test_min_scale_equals_nll_with_scale_plus_min_scale(form):
    """min_scale m is sigma' = sigma + m in every form; value against mpmath's normal NLL at
    scale = sigma + m, gradient in the parameter against mpmath (closed form
    d/dp = (1 - z'^2) / sigma' * dsigma/dp), float64, bound 1e-13 of the magnitudes."""
    ls = [-60.0, -20.0, -7.0, -3.0, 0.0, 2.0]
    m = 1e-3
    x = torch.tensor([0.5] * len(ls), dtype=torch.float64)
    mu = torch.zeros(len(ls), dtype=torch.float64)
    p = torch.tensor([_param(form, v) for v in ls], dtype=torch.float64, requires_grad=True)
    out = normal_nll(x, mu, min_scale=m, reduction="none", **{form: p})
    out.sum().backward()
    labels = list(zip(ls, p.tolist(), strict=True))

    def ref(pv):
        def f(pm):
            sigma = sigma_of(form, pm) + mp.mpf(m)
            z = mp.mpf(0.5) / sigma
            dsigma = mp.diff(lambda q: sigma_of(form, q), pm)
            half_log_2pi = mp.log(2 * mp.pi) / 2
            return (
                z * z / 2 + mp.log(sigma) + half_log_2pi,
                z * z / 2 + abs(mp.log(sigma)) + half_log_2pi,
                (1 - z * z) / sigma * dsigma,
                (1 + z * z) / sigma * abs(dsigma),
            )

        return stable(f, pv)

    refs = np.array([ref(v) for v in p.tolist()])
    check(out.detach(), refs[:, 0], refs[:, 1], 1e-13, torch.float64, labels, "value")
    check(p.grad, refs[:, 2], refs[:, 3], 1e-12, torch.float64, labels, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_min_scale_keeps_loss_finite_and_gradient_alive(dtype):
    """log_scale -> -inf (-20, -50, -80) with a residual: the plain NLL explodes (z^2/2 up to
    ~1e65, inf in float32) while the floored one is finite, tends to the NLL at scale m, and
    its gradient in log_scale is positive (not the zero of a clamp) and finite."""
    ls = torch.tensor([-20.0, -50.0, -80.0], dtype=dtype, requires_grad=True)
    x, mu = torch.full((3,), 0.01, dtype=dtype), torch.zeros(3, dtype=dtype)
    out = normal_nll(x, mu, log_scale=ls, min_scale=1e-3, reduction="none")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(ls.grad).all()
    # d nll / d ls = (1 - z'^2) sigma / (sigma + m) with z' = 10: negative and nonzero
    assert (ls.grad < 0).all()
    at_floor = normal_nll(x[:1], mu[:1], scale=1e-3, reduction="none")
    torch.testing.assert_close(out[-1:].detach(), at_floor, rtol=1e-6, atol=0.0)
    plain = normal_nll(x, mu, log_scale=ls.detach(), reduction="none")
    assert (plain > 1e12).all()


def test_min_scale_accepts_a_tensor():
    x, mu, ls = _nll_inputs(6)
    m = torch.tensor([1e-3, 1e-2, 1e-1, 1.0, 2.0, 5.0], dtype=torch.float64)
    got = normal_nll(x, mu, log_scale=ls, min_scale=m, reduction="none")
    expected = normal_nll(x, mu, scale=ls.exp() + m, reduction="none")
    z = (x - mu) / (ls.exp() + m)
    bound = 1e-13 * (z * z / 2 + (ls.exp() + m).log().abs() + 1)
    assert ((got - expected).abs() <= bound).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_mask_contributes_exactly_zero(reduction):
    """NaN targets under nan_policy='mask': zero loss and exactly zero gradient for every
    input at those events (value, loc, log_scale, and through beta and min_scale), 'mean'
    divides by the number of unmasked events, and the rest equals the NLL of the unmasked
    events alone (float64, 1e-15 relative: the same operations in another order)."""
    x, mu, ls = _nll_inputs(8)
    nan = torch.tensor([False, True, False, False, True, True, False, False])
    x = torch.where(nan, math.nan, x)
    xg, mug, lsg = (t.clone().requires_grad_() for t in (x, mu, ls))
    kwargs = {"beta": 0.5, "min_scale": 1e-2, "reduction": reduction}
    out = normal_nll(xg, mug, log_scale=lsg, nan_policy="mask", **kwargs)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for g in (xg.grad, mug.grad, lsg.grad):
        assert torch.isfinite(g).all()
        assert (g[nan] == 0).all()
        assert (g[~nan] != 0).all()
    keep = ~nan
    alone = normal_nll(x[keep], mu[keep], log_scale=ls[keep], **kwargs)
    if reduction == "none":
        assert (out[nan] == 0).all()
        torch.testing.assert_close(out[keep].detach(), alone, rtol=1e-15, atol=0.0)
    else:
        torch.testing.assert_close(out.detach(), alone, rtol=1e-15, atol=0.0)
    if reduction == "mean":
        total = normal_nll(x, mu, log_scale=ls, nan_policy="mask", **{**kwargs, "reduction": "sum"})
        torch.testing.assert_close(out.detach(), total / int(keep.sum()), rtol=1e-15, atol=0.0)


def test_nan_mask_broadcast_target():
    """A NaN in a (N, 1) target masks its whole row of the unreduced (N, K) loss (loss and
    gradient exactly 0 there); a reduced loss refuses the broadcast (see
    test_reduced_nll_refuses_a_parameter_that_broadcasts_the_value)."""
    x = torch.tensor([[0.5], [math.nan], [-1.0]], dtype=torch.float64)
    mu = torch.zeros(3, 4, dtype=torch.float64)
    ls = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4).requires_grad_()
    out = normal_nll(x, mu, log_scale=ls, nan_policy="mask", reduction="none")
    out.sum().backward()
    assert (out[1] == 0).all() and (out[[0, 2]] != 0).all()
    assert (ls.grad[1] == 0).all() and (ls.grad[[0, 2]] != 0).all()
    per = normal_nll(x[[0, 2]], mu[[0, 2]], log_scale=ls.detach()[[0, 2]], reduction="none")
    assert torch.equal(out.detach()[[0, 2]], per)
    with pytest.raises(ValueError, match="loc of batch shape"):
        normal_nll(x, mu, log_scale=ls, nan_policy="mask")


def test_nll_gradcheck_float64():
    """float64 gradcheck (defaults) of the NLL with min_scale and a NaN mask, every form."""
    x, mu, ls = _nll_inputs(6)
    x[2] = math.nan
    for form in FORMS:
        p = torch.tensor([_param(form, v) for v in ls.tolist()], dtype=torch.float64)

        def fn(mu_, p_, form=form):
            return normal_nll(
                x, mu_, min_scale=0.1, nan_policy="mask", reduction="sum", **{form: p_}
            )

        assert torch.autograd.gradcheck(fn, (mu.clone().requires_grad_(), p.requires_grad_()))


@pytest.mark.parametrize("form", FORMS)
def test_log_prob_gradcheck_float64(form):
    x, mu, ls = _nll_inputs(8)
    p = torch.tensor([_param(form, v) for v in ls.tolist()], dtype=torch.float64)
    args = (x.requires_grad_(), mu.requires_grad_(), p.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c: normal_log_prob(a, b, **{form: c}), args)
    assert torch.autograd.gradgradcheck(lambda a, b, c: normal_log_prob(a, b, **{form: c}), args)
