"""Tests of ``probloss.vae.reconstruction``: decoder log-likelihoods and the sigma-VAE scale.

Where the numbers come from
---------------------------
* Bernoulli: the explicit formula ``x log sigmoid(l) + (1 - x) log sigmoid(-l)`` in float64
  NumPy, with ``scipy.special.log_expit`` for ``log sigmoid``, at the inputs after the cast
  to the dtype under test; its logit-gradient ``x - expit(l)`` likewise.
* Continuous Bernoulli: ``probloss.functional.continuous_bernoulli_log_prob`` (tested
  against mpmath in ``tests/functional/test_bernoulli.py``), summed in float64.
* Gaussian / Laplace: ``scipy.stats.norm.logpdf`` / ``scipy.stats.laplace.logpdf`` in
  float64, summed.
* sigma-VAE: the closed-form argmin ``0.5 log(mean(r^2))`` in float64 NumPy, and
  independently ``scipy.optimize.minimize_scalar`` on the float64 NLL.

Bounds
------
* Bernoulli: ``torch``'s built-in adds terms of size ``|l|`` and ``|log sigmoid(l)|``; the
  bound is ``8 eps`` times the sum of those magnitudes over the event (float32 / float64
  compute eps; half inputs are computed in float32). Measured worst: 0.045 of the bound
  (float16 inputs), 0.036 (float32), 0.022 (float64); relative to the value itself 1.3e-7
  (float32) and 1.2e-16 (float64). Gradient ``x - sigmoid(l)``: ``4 eps`` absolute of the
  input dtype (it lies in [-1, 1]); measured 0.11 of it (float32), exact in float64.
* Continuous Bernoulli: ``4 eps`` times the summed magnitudes (the order of summation);
  measured 0.37 of it (bfloat16), 0.18 (float32), exact in float64.
* Gaussian / Laplace against scipy (float64): relative 1e-13 of the sum of the magnitudes
  of the terms; measured 2.1e-16.
* sigma-VAE argmin: closed form within 1e-14 (float64); minimize_scalar within 1e-7 (its
  ``xatol`` is 1e-10); the derivative of the NLL in a shared log-scale at the returned
  value below ``1e-10 n`` for ``n`` residuals. Measured: 1.1e-16, 6.2e-9 and 3.4e-16 n.
* Envelope theorem: gradient through sigma* equals the detached-scale gradient within
  1e-12 relative (measured 6.3e-16); with the floor active the two differ by 2.5x.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probloss.functional import continuous_bernoulli_log_prob
from probloss.vae.reconstruction import (
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    gaussian_log_likelihood,
    laplace_log_likelihood,
)
from probloss.vae.sigma_vae import sigma_vae_log_likelihood, sigma_vae_log_scale
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id

LOGITS = [1e4, -1e4, 100.0, -100.0, 20.0, -20.0, 1.0, -1.0, 1e-3, -1e-3, 0.0, 3.7]
VALUES = [0.0, 1.0, 0.3, 1e-6, 0.5, 1.0 - 2.0**-10]


def _grid(dtype):
    """x and logits of shape (len(VALUES), 2, len(LOGITS)): every pair, two channels."""
    x = torch.tensor(VALUES, dtype=torch.float64)[:, None, None].expand(-1, 2, len(LOGITS))
    logits = torch.tensor(LOGITS, dtype=torch.float64).expand(len(VALUES), 2, -1).clone()
    logits[:, 1] *= 0.5
    return x.to(dtype), logits.to(dtype)


def _compute_eps(dtype):
    return torch.finfo(torch.float32 if dtype in HALF_DTYPES else dtype).eps


# ======================================================================================
# Bernoulli and continuous Bernoulli
# ======================================================================================


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_bernoulli_matches_explicit_formula(dtype):
    """Against x log sigmoid(l) + (1-x) log sigmoid(-l) (float64 NumPy / scipy), logits up
    to +-1e4 and grey-level x; value and logit-gradient, every dtype."""
    x, logits = _grid(dtype)
    logits.requires_grad_()
    out = bernoulli_log_likelihood(x, logits)
    assert out.shape == (len(VALUES),)
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    out.sum().backward()
    xs, ls = x.double().numpy(), logits.detach().double().numpy()
    terms = xs * scipy.special.log_expit(ls) + (1 - xs) * scipy.special.log_expit(-ls)
    expected = terms.sum(axis=(1, 2))
    magnitude = (np.abs(ls) + np.abs(scipy.special.log_expit(ls))).sum(axis=(1, 2))
    labels = [f"x={v}" for v in VALUES]
    bound = 8 * _compute_eps(dtype) * magnitude
    assert_within(out.detach().double(), expected, bound, labels, "value")
    grad = (xs - scipy.special.expit(ls)).ravel()
    g_labels = [f"x={a}, l={b}" for a, b in zip(xs.ravel(), ls.ravel(), strict=True)]
    g_bound = 4 * torch.finfo(dtype).eps
    assert_within(logits.grad.double().numpy().ravel(), grad, g_bound, g_labels, "d/dlogits")


def test_bernoulli_binary_x_is_a_log_probability():
    """For x in {0, 1} every term is a log probability: the sum is <= 0, and at logits 0 it
    is exactly -n log 2."""
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert bernoulli_log_likelihood(x, torch.zeros(1, 4, dtype=torch.float64)).item() == (
        pytest.approx(-4 * math.log(2), rel=1e-15)
    )
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (bernoulli_log_likelihood(x.expand(5, 4), logits * 10) <= 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_continuous_bernoulli_is_the_summed_log_prob(dtype):
    """The sum over the event of probloss' CB log_prob (itself tested against mpmath), in
    float64, within 4 eps of the sum of magnitudes; finite gradients at logits +-1e4."""
    x, logits = _grid(dtype)
    logits.requires_grad_()
    out = continuous_bernoulli_log_likelihood(x, logits)
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    out.sum().backward()
    terms = continuous_bernoulli_log_prob(x, logits.detach()).double()
    expected = terms.sum(dim=(1, 2))
    bound = 4 * _compute_eps(dtype) * terms.abs().sum(dim=(1, 2))
    assert_within(out.detach().double(), expected, bound, VALUES, "CB sum")
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", [bernoulli_log_likelihood, continuous_bernoulli_log_likelihood])
def test_bernoulli_rejects_x_outside_unit_interval(fn):
    with pytest.raises(ValueError, match=r"x of shape \(2, 2\) must lie in \[0.0, 1.0\]"):
        fn(torch.tensor([[0.5, 1.5], [0.0, 0.0]]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"x of shape \(1, 2\) contains 1 NaN"):
        fn(torch.tensor([[0.5, float("nan")]]), torch.zeros(1, 2))
    out = fn(torch.tensor([[0.5, 1.5]]), torch.zeros(1, 2), validate_args=False)
    assert out.shape == (1,)


# ======================================================================================
# Gaussian and Laplace
# ======================================================================================


def _data(seed=0, shape=(3, 2, 5), unit=False):
    """Random float64 data and decoder output; with ``unit`` the data lies in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    loc = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x.sigmoid() if unit else x), loc


def _scales(shape):
    """Every documented form of the scale, as (log_scale, numpy log-scale broadcastable)."""
    gen = torch.Generator().manual_seed(7)
    per_dim = torch.randn(shape[1:], generator=gen, dtype=torch.float64)
    per_example = torch.randn(shape[0], *(1,) * (len(shape) - 1), generator=gen).double()
    full = torch.randn(shape, generator=gen, dtype=torch.float64)
    return {
        "fixed": -0.7,
        "per_dim": per_dim,
        "per_example": per_example,
        "scalar": torch.tensor(1.3, dtype=torch.float64),
        "full": full,
    }


def _log_scale_np(s):
    return s.numpy() if isinstance(s, torch.Tensor) else s


@pytest.mark.parametrize("form", ["fixed", "per_dim", "per_example", "scalar", "full"])
def test_gaussian_matches_scipy(form):
    """Against scipy.stats.norm.logpdf (float64) summed over (2, 5), for every documented
    broadcasting of the scale, given as log_scale and as scale."""
    x, loc = _data()
    log_scale = _scales(x.shape)[form]
    ls = _log_scale_np(log_scale)
    terms = scipy.stats.norm.logpdf(x.numpy(), loc.numpy(), np.exp(ls) * np.ones(x.shape))
    expected = terms.sum(axis=(1, 2))
    bound = 1e-13 * np.abs(terms).sum(axis=(1, 2))
    got = gaussian_log_likelihood(x, loc, log_scale=log_scale)
    assert got.shape == (3,)
    assert_within(got, expected, bound, range(3), f"log_scale {form}")
    scale = math.exp(log_scale) if isinstance(log_scale, float) else log_scale.exp()
    got = gaussian_log_likelihood(x, loc, scale=scale)
    assert_within(got, expected, bound, range(3), f"scale {form}")


@pytest.mark.parametrize("form", ["fixed", "per_dim", "per_example", "full"])
def test_laplace_matches_scipy(form):
    """Against scipy.stats.laplace.logpdf (float64) summed over the event."""
    x, loc = _data(1)
    log_scale = _scales(x.shape)[form]
    ls = _log_scale_np(log_scale)
    terms = scipy.stats.laplace.logpdf(x.numpy(), loc.numpy(), np.exp(ls) * np.ones(x.shape))
    got = laplace_log_likelihood(x, loc, log_scale=log_scale)
    bound = 1e-13 * np.abs(terms).sum(axis=(1, 2))
    assert_within(got, terms.sum(axis=(1, 2)), bound, range(3), f"laplace {form}")


def test_gaussian_scale_errors():
    x, loc = _data()
    with pytest.raises(ValueError, match="exactly one of log_scale, scale, var, log_var; got none"):
        gaussian_log_likelihood(x, loc)
    with pytest.raises(ValueError, match=r"exactly one of .*; got log_scale, scale"):
        gaussian_log_likelihood(x, loc, log_scale=0.0, scale=1.0)
    with pytest.raises(ValueError, match=r"scale of shape \(5,\) must be positive"):
        gaussian_log_likelihood(x, loc, scale=torch.tensor([1.0, 1, 1, 0, 1]).double())


# ======================================================================================
# event_dims, shapes, dtypes, extremes
# ======================================================================================

CALLS = {  # x of the Bernoulli likelihoods is the data sent through sigmoid (in [0, 1])
    "bernoulli": lambda x, p, **k: bernoulli_log_likelihood(x, p, **k),
    "continuous_bernoulli": lambda x, p, **k: continuous_bernoulli_log_likelihood(x, p, **k),
    "gaussian": lambda x, p, **k: gaussian_log_likelihood(x, p, log_scale=0.3, **k),
    "laplace": lambda x, p, **k: laplace_log_likelihood(x, p, log_scale=-0.2, **k),
    "sigma_vae": lambda x, p, **k: sigma_vae_log_likelihood(x, p, **k),
}
UNIT = ("bernoulli", "continuous_bernoulli")


@pytest.mark.parametrize("name", list(CALLS))
def test_event_dims(name):
    """Default: all dims but the first; k: the last k; 0: elementwise; a leading sample
    dim of the decoder output is kept. Each result equals the elementwise one summed."""
    fn = CALLS[name]
    x, loc = _data(2, (4, 3, 2), unit=name in UNIT)
    elementwise = fn(x, loc, event_dims=0)
    assert elementwise.shape == (4, 3, 2)
    if name != "sigma_vae":  # its shared scale depends on the whole batch, not elementwise
        assert torch.allclose(fn(x, loc), elementwise.sum(dim=(1, 2)), rtol=1e-14)
        assert torch.allclose(fn(x, loc, event_dims=1), elementwise.sum(-1), rtol=1e-14)
        assert torch.allclose(fn(x, loc, event_dims=3), elementwise.sum(), rtol=1e-14)
    assert fn(x, loc).shape == (4,)
    assert fn(x, loc, event_dims=1).shape == (4, 3)
    assert fn(x, loc, event_dims=3).shape == ()
    samples = loc.expand(5, 4, 3, 2)  # (S, B, *E) decoder output against x of (B, *E)
    assert fn(x, samples).shape == (5, 4)


@pytest.mark.parametrize("name", list(CALLS))
def test_event_dims_and_shape_errors(name):
    fn = CALLS[name]
    x, loc = _data(2, (4, 3), unit=name in UNIT)
    with pytest.raises(ValueError, match=r"event_dims must lie in \[0, 2\] .* got 3"):
        fn(x, loc, event_dims=3)
    with pytest.raises(ValueError, match=r"event_dims must lie in \[0, 2\] .* got -1"):
        fn(x, loc, event_dims=-1)
    with pytest.raises(TypeError, match="event_dims must be an int, got float"):
        fn(x, loc, event_dims=1.0)
    with pytest.raises(ValueError, match=r"shapes do not broadcast: x \(4, 3\), \w+ \(4, 2\)"):
        fn(x, loc[:, :2])


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_inputs_give_float32(name, dtype):
    """float16 / bfloat16 in, float32 out, equal to the float32 computation on the same
    (exactly upcast) inputs."""
    x, loc = _data(3, (2, 6), unit=name in UNIT)
    x, loc = x.to(dtype), loc.to(dtype)
    out = CALLS[name](x, loc)
    assert out.dtype == torch.float32
    assert torch.equal(out, CALLS[name](x.float(), loc.float()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_extreme_decoder_outputs_are_finite(dtype):
    """Logits +-1e4 / +-100: finite values and gradients in every dtype. Log-scales +-30
    and residuals 1e4 (Gaussian, Laplace): finite values; each gradient finite wherever its
    exact value (float64 closed form at the cast inputs) fits the input dtype, else the
    exact value rounded to +-inf (gradients come back in the input dtype)."""
    x = torch.tensor([[0.0, 1.0, 0.25, 1.0, 0.0, 0.5]], dtype=dtype)
    logits = torch.tensor([[1e4, -1e4, 1e4, 100.0, -100.0, -1e4]], dtype=dtype)
    logits.requires_grad_()
    for fn in (bernoulli_log_likelihood, continuous_bernoulli_log_likelihood):
        out = fn(x, logits)
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), fn.__name__
    loc = torch.tensor([[1e4, -1e4, 0.0, 0.25, 0.0, 5.0]], dtype=dtype, requires_grad=True)
    log_scale = torch.tensor([[30.0, -30.0, 0.0, -30.0, 30.0, 0.0]], dtype=dtype)
    log_scale.requires_grad_()
    r, s = (x - loc).detach().double(), log_scale.detach().double()
    exact = {  # (d/dloc, d/dlog_scale)
        gaussian_log_likelihood: (r * torch.exp(-2 * s), (r * torch.exp(-s)) ** 2 - 1),
        laplace_log_likelihood: (torch.sign(r) * torch.exp(-s), r.abs() * torch.exp(-s) - 1),
    }
    big = torch.finfo(dtype).max
    for fn, exact_grads in exact.items():
        out = fn(x, loc, log_scale=log_scale)
        assert torch.isfinite(out).all(), fn.__name__
        grads = torch.autograd.grad(out.sum(), (loc, log_scale))
        for got, want in zip(grads, exact_grads, strict=True):
            fits = want.abs() <= big
            assert torch.isfinite(got[fits]).all(), fn.__name__
            assert torch.equal(got[~fits].double(), want[~fits].sign() * math.inf), fn.__name__


# ======================================================================================
# sigma-VAE
# ======================================================================================


def _nll_np(log_scale, r):
    """Float64 Gaussian NLL of the residuals r with one shared log-scale."""
    return float(np.sum(0.5 * r**2 * np.exp(-2 * log_scale) + log_scale + 0.5 * np.log(2 * np.pi)))


def test_sigma_vae_scale_is_the_argmin():
    """Random float64 data, floor far below (-40): the returned log-scale is the closed
    form 0.5 log(MSE), the numerical argmin of the NLL (scipy), and the NLL's derivative in
    a shared log-scale vanishes there."""
    x, loc = _data(4, (8, 3, 7))
    r = (x - loc).numpy()
    log_scale = sigma_vae_log_scale(x, loc, min_scale=math.exp(-40.0))
    assert log_scale.shape == ()
    closed = 0.5 * np.log(np.mean(r**2))
    assert abs(log_scale.item() - closed) <= 1e-14
    res = scipy.optimize.minimize_scalar(
        _nll_np, args=(r,), bounds=(-5, 5), method="bounded", options={"xatol": 1e-10}
    )
    assert abs(log_scale.item() - res.x) <= 1e-7
    shared = log_scale.detach().clone().requires_grad_()
    nll = -gaussian_log_likelihood(x, loc, log_scale=shared).sum()
    (grad,) = torch.autograd.grad(nll, shared)
    assert abs(grad.item()) <= 1e-10 * r.size
    # the test can fail: a shared log-scale 1e-3 off the argmin has derivative ~2e-3 n
    (off,) = torch.autograd.grad(
        -gaussian_log_likelihood(x, loc, log_scale=shared + 1e-3).sum(), shared
    )
    assert abs(off.item()) > 1e-3 * r.size


def test_sigma_vae_per_example():
    """per_example: one log-scale per example, 0.5 log of that example's MSE (float64
    NumPy), shaped (B, 1, 1) to broadcast against x."""
    x, loc = _data(5, (4, 3, 6))
    log_scale = sigma_vae_log_scale(x, loc, per_example=True, min_scale=math.exp(-40.0))
    assert log_scale.shape == (4, 1, 1)
    closed = 0.5 * np.log(np.mean((x - loc).numpy() ** 2, axis=(1, 2)))
    assert np.abs(log_scale.flatten().numpy() - closed).max() <= 1e-14
    one_dim = sigma_vae_log_scale(x, loc, per_example=True, event_dims=1, min_scale=math.exp(-40.0))
    assert one_dim.shape == (4, 3, 1)


def test_sigma_vae_soft_floor():
    """The floor is log(rms + e^m) exactly (float64 NumPy), active for small residuals."""
    x, loc = _data(6, (5, 10))
    for factor, m in ((1e-3, -6.0), (1.0, -6.0), (1e-5, -2.0)):
        got = sigma_vae_log_scale(x, x + factor * (loc - x), min_scale=math.exp(m)).item()
        rms = np.sqrt(np.mean((factor * (loc - x).numpy()) ** 2))
        assert got == pytest.approx(np.log(rms + np.exp(m)), rel=1e-14, abs=1e-15)
        assert got > m


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_sigma_vae_perfect_reconstruction_is_finite(dtype, per_example):
    """x == loc: the log-scale is the floor m, the likelihood n (-m - log(2 pi)/2) per
    example, value finite and gradient exactly 0 (no 0/0 from log of a zero MSE)."""
    x = torch.linspace(0, 1, 12, dtype=dtype).reshape(3, 4)
    loc = x.clone().requires_grad_()
    out = sigma_vae_log_likelihood(x, loc, per_example=per_example)
    (grad,) = torch.autograd.grad(out.sum(), loc)
    expected = 4 * (6.0 - 0.5 * math.log(2 * math.pi))
    assert torch.allclose(out, torch.full((3,), expected, dtype=out.dtype), rtol=1e-6)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_sigma_vae_mixed_zero_and_nonzero_examples():
    """per_example with one exact example and one not: the exact one sits at the floor,
    the other at 0.5 log(MSE) + log1p(e^m / rms); gradients finite everywhere."""
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    loc = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    s = sigma_vae_log_scale(x, loc, per_example=True)
    assert s[0, 0].item() == -6.0
    assert s[1, 0].item() == pytest.approx(math.log(0.5 + math.exp(-6.0)), rel=1e-15)
    (grad,) = torch.autograd.grad(sigma_vae_log_likelihood(x, loc, per_example=True).sum(), loc)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all()


@pytest.mark.parametrize("per_example", [False, True])
def test_sigma_vae_envelope_theorem(per_example):
    """Without an active floor, the gradient through sigma* is zero at the optimum: the
    gradient in loc equals the one with the log-scale detached (float64, 1e-12 relative).
    With the floor active (rms 1e-3 against e^-6) they differ, so the check can fail."""
    x, loc = _data(8, (6, 20))
    loc.requires_grad_()

    def grads(scale_factor, m):
        kw = {"per_example": per_example, "min_scale": math.exp(m)}
        near = x + scale_factor * (loc - x)
        (attached,) = torch.autograd.grad(sigma_vae_log_likelihood(x, near, **kw).sum(), loc)
        near = x + scale_factor * (loc - x)
        s = sigma_vae_log_scale(x, near, **kw).detach()
        detached = gaussian_log_likelihood(x, near, log_scale=s).sum()
        return attached, torch.autograd.grad(detached, loc)[0]

    attached, detached = grads(1.0, -40.0)
    assert torch.allclose(attached, detached, rtol=1e-12, atol=0)
    attached, detached = grads(1e-3, -6.0)
    assert not torch.allclose(attached, detached, rtol=0.1)


def test_sigma_vae_gradcheck():
    x, loc = _data(9, (3, 4))
    loc.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: sigma_vae_log_scale(x, v), (loc,))
    assert torch.autograd.gradcheck(lambda v: sigma_vae_log_scale(x, v, per_example=True), (loc,))
    assert torch.autograd.gradgradcheck(lambda v: sigma_vae_log_likelihood(x, v), (loc,))


def test_sigma_vae_no_overflow_of_squares():
    """float32 residuals of 1e20 (r^2 overflows float32): the log-scale is log(rms), within
    1e-6 of the float64 value, with a finite gradient."""
    x = torch.tensor([[1e20, -3e20], [0.0, 2e20]])
    loc = torch.zeros(2, 2, requires_grad=True)
    s = sigma_vae_log_scale(x, loc)
    expected = 0.5 * np.log(np.mean(x.double().numpy() ** 2))
    assert s.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(s, loc)
    assert torch.isfinite(grad).all()


def test_sigma_vae_errors():
    x, loc = _data()
    for bad in (0.0, -1e-3, math.inf, math.nan):
        with pytest.raises(ValueError, match="min_scale must be a positive finite number"):
            sigma_vae_log_scale(x, loc, min_scale=bad)
    # the old keyword (log units) raises a TypeError naming the new one and its units
    for fn in (sigma_vae_log_scale, sigma_vae_log_likelihood):
        with pytest.raises(TypeError, match=r"min_log_scale was renamed min_scale \(scale units"):
            fn(x, loc, min_log_scale=-6.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'min_scal'"):
        sigma_vae_log_scale(x, loc, min_scal=1e-3)
    with pytest.raises(ValueError, match=r"x and loc are empty \(broadcast shape \(0, 3\)\)"):
        sigma_vae_log_scale(torch.zeros(0, 3), torch.zeros(0, 3))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.floats(-8.0, 8.0),
    st.floats(1e-3, 1e3),
)
def test_sigma_vae_likelihood_beats_every_shared_scale_property(seed, log_scale, spread):
    """Optimality law: with the floor inactive, the sigma-VAE likelihood is >= the Gaussian
    likelihood with any other shared log-scale (float64; slack 1e-12 relative)."""
    x, loc = _data(seed % 1000, (3, 5))
    loc = x + spread * (loc - x)
    best = sigma_vae_log_likelihood(x, loc, min_scale=math.exp(-60.0)).sum().item()
    other = gaussian_log_likelihood(x, loc, log_scale=log_scale).sum().item()
    assert best >= other - 1e-12 * abs(other)
