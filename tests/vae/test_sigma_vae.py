"""Tests of ``probloss.vae.sigma_vae``: the sigma-VAE optimal shared scale and the
likelihood at it.

Where the numbers come from
---------------------------
* sigma-VAE: the closed-form argmin ``0.5 log(mean(r^2))`` in float64 NumPy, and
  independently ``scipy.optimize.minimize_scalar`` on the float64 NLL.

Bounds
------
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
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probloss.vae.reconstruction import gaussian_log_likelihood
from probloss.vae.sigma_vae import sigma_vae_log_likelihood, sigma_vae_log_scale
from tests.functional._checks import FLOAT_DTYPES, dtype_id
from tests.vae._helpers import _data


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
