"""Dtype/shape contract, exact special values, identities and round trips
of ``probloss.special``.

Where numbers come from: exact special values are the analytic limits
(cb_mean(0) = 1/2, cb_variance(0) = 1/12 rounded to the dtype, ...); the
symmetry checks use the mpmath oracle (``tests/reference.py``) evaluated on the
*other* side of the identity; the round trip uses ``torch.logaddexp(x, 0)``
(an accurate softplus: max + log1p(exp(-|x|))) as the forward map.
Bounds are stated at each test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mpmath import mp

from tests import reference as ref
from tests.special._helpers import (
    DTYPE_IDS,
    DTYPES,
    NAMES,
    SPECS,
    assert_matches,
    evaluate,
    grid,
    impl,
    smallest_subnormal,
    value_rtol,
)

dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
name_param = pytest.mark.parametrize("name", NAMES)


def _domain_values(name: str) -> list[float]:
    if SPECS[name].domain == "nonneg":
        return [1e-3, 0.25, 0.6931, 1.0, 3.5, 12.0, 60.0]
    return [-60.0, -3.5, -0.25, 0.0, 0.25, 1.0, 3.5, 12.0]


# --------------------------------------------------------------------------
# dtype and shape contract
# --------------------------------------------------------------------------


@name_param
@dtype_param
def test_output_and_gradient_dtype_equal_input_dtype(name, dtype):
    x = torch.tensor(_domain_values(name), dtype=dtype, requires_grad=True)
    y = impl(name)(x)
    assert y.dtype == dtype
    assert y.shape == x.shape
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.dtype == dtype
    assert g.shape == x.shape


@name_param
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,), (3, 4, 5)], ids=str)
def test_shape_preserved(name, shape):
    """Output shape == input shape, including 0-dim and empty tensors, and
    the result equals the elementwise evaluation of the flattened input
    (bitwise, NaN-aware)."""
    fn = impl(name)
    vals = torch.tensor(_domain_values(name), dtype=torch.float32)
    n = math.prod(shape)
    x = vals.repeat(n // vals.numel() + 1)[:n].reshape(shape)
    y = fn(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.equal(y.reshape(-1), fn(x.reshape(-1).contiguous()))
    # backward through an empty / 0-dim tensor works and keeps the shape
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xg).sum(), xg)
    assert g.shape == x.shape


@name_param
def test_non_contiguous_and_broadcast_views(name):
    """Transposed and stride-0 (expanded, i.e. broadcast) inputs give the
    same values as their contiguous copies; the input is not modified."""
    fn = impl(name)
    vals = torch.tensor(_domain_values(name), dtype=torch.float64)
    base = torch.stack([vals, vals.flip(0) * 0.5])  # (2, n)
    t = base.t()
    assert not t.is_contiguous()
    before = t.clone()
    assert torch.equal(fn(t), fn(t.contiguous()))
    assert torch.equal(t, before)
    e = vals[:1].expand(4, 3)  # stride (0, 0)
    assert torch.equal(fn(e), fn(e.contiguous()))
    assert fn(e).shape == (4, 3)
    with torch.no_grad():
        assert torch.equal(fn(t), fn(t.contiguous()))


# --------------------------------------------------------------------------
# exact special values
# --------------------------------------------------------------------------


@dtype_param
@pytest.mark.parametrize("zero", [0.0, -0.0], ids=["+0", "-0"])
def test_exact_values_at_zero(dtype, zero):
    """cb_mean(0) == 0.5 exactly; cb_variance(0) == fl_dtype(1/12);
    cb_log_partition(0) == cb_entropy(0) == log_cosh(0) == 0 exactly;
    log1mexp(0) == softplus_inverse(0) == -inf."""
    x = torch.tensor(zero, dtype=dtype)
    one_twelfth = torch.tensor(1.0 / 12.0, dtype=torch.float64).to(dtype)
    assert impl("cb_mean")(x).item() == 0.5
    assert impl("cb_variance")(x).item() == one_twelfth.item()
    assert impl("cb_log_partition")(x).item() == 0.0
    assert impl("cb_entropy")(x).item() == 0.0
    assert impl("log_cosh")(x).item() == 0.0
    if zero == 0.0:
        assert impl("log1mexp")(x).item() == -math.inf
        assert impl("softplus_inverse")(x).item() == -math.inf


@pytest.mark.parametrize("name", ["log1mexp", "softplus_inverse"])
@dtype_param
def test_gradient_at_zero_is_plus_inf(name, dtype):
    """d/dx log1mexp = 1/expm1(x) and d/dy softplus_inverse = 1/(-expm1(-y))
    are both exactly +inf at 0 (the true one-sided derivative)."""
    x = torch.zeros(3, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(impl(name)(x).sum(), x)
    assert torch.all(torch.isposinf(g)), g


@pytest.mark.parametrize("name", ["log1mexp", "softplus_inverse"])
@dtype_param
def test_nan_for_negative_input(name, dtype):
    """Both document NaN for negative inputs (outside the domain), down to -finfo.max."""
    fi = torch.finfo(dtype)
    x = torch.tensor(
        [-smallest_subnormal(dtype), -fi.tiny, -1e-30, -1e-4, -0.5, -1.0, -100.0, -fi.max],
        dtype=torch.float64,
    ).to(dtype)
    x = x[x != 0]  # -1e-30 rounds to -0.0 in float16
    assert x.numel() >= 7 and torch.all(x < 0)
    assert torch.all(torch.isnan(impl(name)(x)))


@dtype_param
def test_cb_derivatives_at_zero(dtype):
    """Derivatives at eta = 0 are the limits 1/2, 1/12, 0, 0 within the value
    bound (cb_log_partition, cb_mean, cb_variance, cb_entropy)."""
    rtol = value_rtol(dtype)
    expected = {"cb_log_partition": 0.5, "cb_mean": 1 / 12, "cb_variance": 0.0, "cb_entropy": 0.0}
    for name, want in expected.items():
        x = torch.zeros((), dtype=dtype, requires_grad=True)
        (g,) = torch.autograd.grad(impl(name)(x), x)
        assert abs(g.item() - want) <= rtol * abs(want), (name, g.item(), want)


# --------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------


def test_softplus_inverse_round_trip_float64():
    """softplus_inverse(softplus(x)) == x within 1e-13 * max(1, |x|)
    absolute for x in [-30, 30] (6001 points), float64."""
    x = torch.linspace(-30.0, 30.0, 6001, dtype=torch.float64)
    y = torch.logaddexp(x, torch.zeros_like(x))
    back = impl("softplus_inverse")(y)
    err = (back - x).abs()
    bound = 1e-13 * torch.clamp(x.abs(), min=1.0)
    i = int(torch.argmax(err / bound))
    assert torch.all(err <= bound), (
        f"worst x={x[i].item()!r}: softplus={y[i].item()!r} back={back[i].item()!r} "
        f"err={err[i].item():.3g} bound={bound[i].item():.3g}"
    )


def _positive_eta(dtype):
    x = grid("real", dtype)
    return x[x > 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cb_log_partition_reflection_against_mpmath(dtype):
    """cb_log_partition(-eta) == A(eta) - eta with the right side from mpmath
    (value bound); and the implementation agrees with itself:
    |f(-eta) - (f(eta) - eta)| <= 4 rtol max(|f(eta)|, eta) + tiny absolute
    (the float subtraction f(eta) - eta cancels at large eta, so the
    self-consistency bound is absolute on the scale of its operands)."""
    eta = _positive_eta(dtype)
    with mp.workdps(60):
        expected = np.array(
            [ref.to_float64(ref.cb_log_partition(e) - mp.mpf(e)) for e in eta.tolist()]
        )
    (got_neg,) = evaluate("cb_log_partition", -eta, dtype)
    rtol = value_rtol(dtype)
    assert_matches(-eta, got_neg, expected, dtype, rtol, what="cb_log_partition(-eta)")
    (got_pos,) = evaluate("cb_log_partition", eta, dtype)
    gap = np.abs(got_neg - (got_pos - eta))
    scale = 4 * rtol * np.maximum(np.abs(got_pos), eta) + torch.finfo(dtype).tiny
    i = int(np.argmax(gap / scale))
    assert np.all(gap <= scale), (eta[i], got_neg[i], got_pos[i], gap[i], scale[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cb_mean_reflection_against_mpmath(dtype):
    """cb_mean(-eta) == 1 - A'(eta) with the right side from mpmath (value
    bound); self-consistency |m(-eta) - (1 - m(eta))| <= 2 rtol + eps
    absolute (m lies in [0, 1])."""
    eta = _positive_eta(dtype)
    with mp.workdps(60):
        expected = np.array([ref.to_float64(1 - ref.cb_mean(e)) for e in eta.tolist()])
    (got_neg,) = evaluate("cb_mean", -eta, dtype)
    rtol = value_rtol(dtype)
    assert_matches(-eta, got_neg, expected, dtype, rtol, what="cb_mean(-eta)")
    (got_pos,) = evaluate("cb_mean", eta, dtype)
    gap = np.abs(got_neg - (1.0 - got_pos))
    bound = 2 * rtol + torch.finfo(dtype).eps
    i = int(np.argmax(gap))
    assert gap[i] <= bound, (eta[i], got_neg[i], got_pos[i], gap[i], bound)


@pytest.mark.parametrize("name", ["log_cosh", "cb_variance", "cb_entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_even_functions_against_mpmath(name, dtype):
    """f(-x) matches the mpmath value at +x (value bound), and
    |f(-x) - f(x)| <= 2 rtol |f(x)| + tiny."""
    eta = _positive_eta(dtype)
    expected = np.array([ref.to_float64(SPECS[name].value(e)) for e in eta.tolist()])
    (got_neg,) = evaluate(name, -eta, dtype)
    rtol = value_rtol(dtype)
    assert_matches(-eta, got_neg, expected, dtype, rtol, what=f"{name}(-x)")
    (got_pos,) = evaluate(name, eta, dtype)
    gap = np.abs(got_neg - got_pos)
    bound = 2 * rtol * np.abs(got_pos) + torch.finfo(dtype).tiny
    i = int(np.argmax(gap / bound))
    assert np.all(gap <= bound), (eta[i], got_neg[i], got_pos[i])


@dtype_param
def test_two_argument_functions_on_empty_tensors(dtype):
    """``soft_floor``, ``mul_exp`` and ``safe_where`` (the functions outside ``NAMES``): an
    empty input gives an empty result of the broadcast shape, and backward works (issue 10:
    empty in, empty out)."""
    from probloss.special import mul_exp, safe_where, soft_floor

    x = torch.zeros(0, 3, dtype=dtype, requires_grad=True)
    outs = [
        soft_floor(x, 0.5),
        soft_floor(x, torch.zeros(3, dtype=dtype)),
        mul_exp(x, torch.zeros(1, 3, dtype=dtype)),
        safe_where(x > 0, x, torch.log, torch.exp, safe_true=1.0, safe_false=0.0),
    ]
    for y in outs:
        assert y.shape == (0, 3) and y.dtype == dtype
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.shape == (0, 3)


def test_cb_variance_underflow_points_float32():
    """The documented underflow of ``cb_variance = 1/eta^2 - ...`` in float32: a normal
    number up to ``|eta| = 1/sqrt(tiny) = 9.2e18``, subnormal (within ``tiny`` of the
    exact 1/eta^2) beyond, and exactly 0 beyond ``|eta| = 3.8e22`` (1/eta^2 below half
    the smallest subnormal); never negative or NaN."""
    fi = torch.finfo(torch.float32)
    eta = torch.tensor([9.0e18, -9.0e18, 1e19, -3e20, 3.7e22, 3.9e22, -1e30, fi.max])
    got = impl("cb_variance")(eta)
    exact = (1.0 / eta.double() ** 2).numpy()
    assert (got[:2] >= fi.tiny).all()
    assert ((got[2:5] > 0) & (got[2:5] < fi.tiny)).all()
    bound = value_rtol(torch.float32) * exact[:5] + fi.tiny  # the contract; tiny: underflow
    assert (np.abs(got[:5].double().numpy() - exact[:5]) <= bound).all()
    assert (got[5:] == 0).all()


@dtype_param
def test_limits_at_infinity(dtype):
    """Regression (issue 10 fuzz: NaN at +-inf): the limits, exactly, value and gradient.
    Continuous Bernoulli at eta -> +-inf is a point mass at 1 / 0: mean 1 / 0, variance 0,
    log-partition ~ max(eta, 0) - log|eta| -> +-inf (derivative, the mean, 1 / 0), entropy
    ~ 1 - log|eta| -> -inf (derivative -eta var -> 0). expm1mx(+-inf) = inf, derivative
    expm1(x) -> inf / -1."""
    from probloss.special import cb_entropy, cb_log_partition, cb_mean, cb_variance, expm1mx

    inf = math.inf
    cases = {
        cb_mean: ([1.0, 0.0], [0.0, 0.0]),
        cb_variance: ([0.0, 0.0], [0.0, 0.0]),
        cb_log_partition: ([inf, -inf], [1.0, 0.0]),
        cb_entropy: ([-inf, -inf], [0.0, 0.0]),
        expm1mx: ([inf, inf], [inf, -1.0]),
    }
    for fn, (value, grad) in cases.items():
        x = torch.tensor([inf, -inf], dtype=dtype, requires_grad=True)
        y = fn(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert y.tolist() == value and g.tolist() == grad, fn.__name__


# --------------------------------------------------------------------------
# Off the CPU and while tracing: no host read
# --------------------------------------------------------------------------
# A CPU fast path may read one reduction on the host; on any other device and while
# torch.compile traces, the branch-free form must run. Meta tensors have no values, so a
# host read (bool(t), .item()) on them raises: they check the non-CPU path on this machine.


@name_param
def test_runs_on_meta_tensors_without_host_reads(name):
    x = torch.zeros(2, 3, device="meta", requires_grad=True)
    out = impl(name)(x)
    assert out.device.type == "meta" and out.shape == (2, 3)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == (2, 3)


def test_two_argument_functions_on_meta_tensors():
    from probloss.special import mul_exp, soft_floor

    x = torch.zeros(4, device="meta")
    assert mul_exp(x, x).shape == (4,) and soft_floor(x, 1e-3).shape == (4,)


@name_param
def test_compiles_with_fullgraph_and_matches_eager(name):
    # the CPU fast paths are skipped while tracing: fullgraph would raise on a host read
    x = torch.tensor([-800.0, -30.0, -1.0, 0.0, 1e-8, 0.5, 3.0, 40.0, 800.0], dtype=torch.float64)
    if SPECS[name].domain == "nonneg":
        x = x.abs()
    compiled = torch.compile(impl(name), fullgraph=True, backend="eager")
    # the traced (branch-free) form is as exact as the fast path: equal to rounding, 1e-13
    torch.testing.assert_close(compiled(x), impl(name)(x), rtol=1e-13, atol=0.0, equal_nan=True)


def test_horner_unfused_matches_fused_within_its_rounding_bound():
    # the non-CPU Horner (two roundings per step) against the CPU one (addcmul): each of
    # the n steps adds at most 2 eps of the running sum of |c_k u^k|, so 2 n eps S bounds it
    from probloss.special.continuous_bernoulli import _COEFFICIENTS, _horner

    for dtype, series in _COEFFICIENTS.items():
        u = torch.linspace(-1.0, 1.0, 257, dtype=dtype)
        for coefs in series:
            fused, plain = _horner(u, coefs, fused=True), _horner(u, coefs, fused=False)
            magnitude = _horner(u.abs(), tuple(abs(c) for c in coefs), fused=True)
            bound = 2 * len(coefs) * torch.finfo(dtype).eps * magnitude
            assert ((fused - plain).abs() <= bound).all()
