"""Tests of ``probloss.vae.kl``: analytic Gaussian KL per dimension and Monte-Carlo KL.

Where the numbers come from
---------------------------
* Closed forms: mpmath at 80 digits of the textbook
  ``KL = (lp - lq + exp(lq - lp) + (mq - mp)^2 exp(-lp) - 1) / 2`` and of its derivatives
  ``dKL/dmq = (mq - mp) exp(-lp)``, ``dKL/dlq = expm1(lq - lp) / 2``, at the inputs after
  the cast to the dtype under test (differences formed exactly). 80 digits absorb the
  cancellation of the textbook form for every case here (the nearest q, p differ by 1e-6
  in the log-variance, losing 12 digits). Equal distributions are exactly 0.
* ``torch.distributions.kl_divergence`` of ``Independent(Normal)`` in float64 where torch's
  formula is well conditioned (KL >= 1e-2).
* Monte-Carlo: the analytic KL above, with the standard error from the exact variance of
  the log-ratio of two Gaussians under ``z = mu + s e``: ``Var = (s^2/s_p^2 - 1)^2 / 2 +
  (mu - mu_p)^2 s^2 / s_p^4`` (a quadratic in a standard normal ``e``); for Bernoulli
  ``pi (1 - pi) (L_1 - L_0)^2``.

Bounds
------
* Value: relative 1e-6 (float32 result, also for half inputs) / 1e-13 (float64), plus the
  dtype's smallest normal. Measured worst: 2.0e-7 (bfloat16 inputs) / 2.1e-16 relative.
* Gradients: relative 1e-6 / 1e-13 for float32 / float64 inputs and ``eps`` of the input
  dtype for half inputs (gradients come back in the input dtype), plus its smallest normal
  (a float16 gradient of 1e-13 underflows); where the exact gradient exceeds the dtype's
  range (``expm1(80) / 2`` in float16) it must be ``inf``. Measured worst: 9.7e-8 /
  3.5e-16 relative.
* Monte-Carlo: within 5 standard errors, fixed seeds, 20000 samples. Measured worst: 2.35
  standard errors (the gradient), 1.86 (the summed KL).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from probloss.vae.kl import gaussian_kl, gaussian_kl_per_dim, monte_carlo_kl, monte_carlo_kl_per_dim
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id

RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}
MC_SAMPLES = 20000
MC_SIGMAS = 5.0


@functools.cache
def kl_ref(mq: float, lq: float, mp_: float, lp: float) -> tuple[float, float, float]:
    """(KL, dKL/dloc, dKL/dlog_var) by mpmath at 80 digits, rounded to float64."""
    with mp.workdps(80):
        dm = mp.fsub(mq, mp_, exact=True)
        d = mp.fsub(lq, lp, exact=True)
        if dm == 0 and d == 0:
            return 0.0, 0.0, 0.0
        kl = (-d + mp.exp(d) + dm * dm * mp.exp(-lp) - 1) / 2
        return float(kl), float(dm * mp.exp(-lp)), float(mp.expm1(d) / 2)


MEANS = [0.0, 1e-3, 1.5, -3.0, 1e4]
LOG_VARS = [-80.0, -30.0, -1.0, -1e-6, 0.0, 1e-6, 2.0, 30.0, 80.0]
# (prior mean, prior log-variance): the standard normal and others, near-equal included
PRIORS = [(0.0, 0.0), (1.5, 2.0), (-3.0, -30.0), (1e4, 30.0), (1e-3, -1e-6)]


def _cases():
    return [(m, lv, pm, plv) for m, lv in itertools.product(MEANS, LOG_VARS) for pm, plv in PRIORS]


def _check(got, exact, rtol, dtype, labels, what):
    """Relative bound; +-inf required where the exact value overflows ``dtype``."""
    got, exact = np.asarray(got, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    over = np.abs(exact) > torch.finfo(dtype).max
    assert (got[over] == np.copysign(np.inf, exact[over])).all(), what
    keep = np.flatnonzero(~over)
    bound = rtol * np.abs(exact[keep]) + torch.finfo(dtype).tiny
    return assert_within(got[keep], exact[keep], bound, [labels[i] for i in keep], what)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_gaussian_kl_per_dim_matches_mpmath(dtype):
    """Means up to 1e4, log-variances +-1e-6 .. +-80, five priors (standard normal default
    included), every dtype: value (float32 for half inputs) and gradients vs mpmath. Values
    and gradients are finite wherever the exact ones fit the dtype (``e^110 / 2`` for
    log_var 80 against a prior log_var -30 does not fit float32: inf is required there)."""
    cols = torch.tensor(_cases(), dtype=torch.float64).to(dtype).T
    loc, log_var, prior_loc, prior_log_var = (c.clone().requires_grad_() for c in cols)
    out = gaussian_kl_per_dim(loc, log_var, prior_loc=prior_loc, prior_log_var=prior_log_var)
    out_dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    assert out.dtype == out_dtype
    out.sum().backward()
    cast = list(zip(*(c.double().tolist() for c in cols), strict=True))
    ref = np.array([kl_ref(*c) for c in cast])
    rtol = RTOL[out_dtype]
    g_rtol = torch.finfo(dtype).eps if dtype in HALF_DTYPES else rtol
    _check(out.detach().double(), ref[:, 0], rtol, out_dtype, cast, "KL")
    _check(loc.grad.double(), ref[:, 1], g_rtol, dtype, cast, "dKL/dloc")
    _check(log_var.grad.double(), ref[:, 2], g_rtol, dtype, cast, "dKL/dlog_var")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_standard_normal_default_prior(dtype):
    """No prior given == the standard normal prior, bitwise; 0.5 (mu^2 + expm1mx(lv)) at
    log_var = +-30 in float16 / bfloat16 is the right finite float32 (5.3e12, beyond
    float16's range; 14.5 + e^-30 / 2), relative 1e-6 of mpmath."""
    loc = torch.tensor([[0.0, 1.5, 0.0, -2.0]], dtype=dtype)
    log_var = torch.tensor([[30.0, -30.0, 0.0, 1.0]], dtype=dtype)
    out = gaussian_kl_per_dim(loc, log_var)
    zero = torch.zeros((), dtype=dtype)
    assert torch.equal(out, gaussian_kl_per_dim(loc, log_var, prior_loc=zero, prior_log_var=zero))
    assert out.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    cast = list(
        zip(loc.double().flatten().tolist(), log_var.double().flatten().tolist(), strict=True)
    )
    exact = [kl_ref(m, lv, 0.0, 0.0)[0] for m, lv in cast]
    rtol = RTOL[torch.float64 if dtype == torch.float64 else torch.float32]
    assert_within(out.double().flatten(), exact, rtol * np.abs(exact), cast, "default prior")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_equal_distributions_give_exactly_zero(dtype):
    """q == p (separate tensors, equal values, extremes included): KL exactly 0 and every
    gradient exactly 0."""
    values = torch.tensor([[0.0, 1e4, -3.0, 1e-3], [80.0, -80.0, 0.0, 1e-6]], dtype=dtype)
    args = [values[0].clone(), values[1].clone(), values[0].clone(), values[1].clone()]
    for a in args:
        a.requires_grad_()
    out = gaussian_kl_per_dim(args[0], args[1], prior_loc=args[2], prior_log_var=args[3])
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum(), args)
    assert all((g == 0).all() for g in grads)


def test_gaussian_kl_sums_latent_dims():
    """gaussian_kl = per-dim KL summed over the last ``latent_dims`` dims; 0 keeps them."""
    gen = torch.Generator().manual_seed(0)
    loc, log_var = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    per_dim = gaussian_kl_per_dim(loc, log_var)
    assert torch.equal(gaussian_kl(loc, log_var), per_dim.sum(-1))
    assert torch.allclose(gaussian_kl(loc, log_var, latent_dims=2), per_dim.sum((-2, -1)))
    assert torch.equal(gaussian_kl(loc, log_var, latent_dims=0), per_dim)
    assert gaussian_kl(loc, log_var, latent_dims=3).shape == ()


def test_gaussian_kl_agrees_with_torch():
    """kl_divergence(Independent(Normal, 1), ...) in float64 at moderate parameters, where
    it is well conditioned (KL >= 1e-2): relative 1e-13."""
    gen = torch.Generator().manual_seed(1)
    loc, log_var, prior_loc, prior_log_var = torch.randn(4, 64, 8, generator=gen).double() * 2
    ours = gaussian_kl(loc, log_var, prior_loc=prior_loc, prior_log_var=prior_log_var)
    q = Independent(Normal(loc, (0.5 * log_var).exp()), 1)
    p = Independent(Normal(prior_loc, (0.5 * prior_log_var).exp()), 1)
    theirs = kl_divergence(q, p)
    assert (theirs >= 1e-2).all()
    assert_within(ours, theirs, 1e-13 * theirs, range(64), "vs torch")


def test_errors_name_the_arguments():
    with pytest.raises(ValueError, match=r"loc \(3,\), log_var \(2,\)"):
        gaussian_kl_per_dim(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"prior_log_var \(4,\)"):
        gaussian_kl(torch.zeros(3), torch.zeros(3), prior_log_var=torch.zeros(4))
    with pytest.raises(ValueError, match=r"latent_dims must lie in \[0, 2\] .* got 3"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), latent_dims=3)
    with pytest.raises(TypeError, match="floating"):
        gaussian_kl(torch.zeros(3, dtype=torch.int64), torch.zeros(3))


# ======================================================================================
# Properties
# ======================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_kl_nonnegative_and_zero_iff_equal_property(dtype):
    """KL >= 0 (never NaN) for means in +-1e4 and log-variances in +-80; KL(q, q) == 0
    exactly; KL > 0 when q and p differ by >= 1e-3 in a mean or log-variance (|log-var|
    <= 20, |mean| <= 100, where the exact KL is >= ~1e-16, above underflow)."""
    width = 32 if dtype == torch.float32 else 64
    loc, lv = st.floats(-1e4, 1e4, width=width), st.floats(-80.0, 80.0, width=width)

    @settings(max_examples=150, deadline=None)
    @given(loc, lv, loc, lv, st.floats(1e-3, 5.0), st.sampled_from(["loc", "log_var"]))
    def check(mq, lq, mp_, lp, delta, which):
        t = [torch.tensor([v], dtype=dtype) for v in (mq, lq, mp_, lp)]
        kl = gaussian_kl_per_dim(t[0], t[1], prior_loc=t[2], prior_log_var=t[3])
        assert not torch.isnan(kl).any() and (kl >= 0).all()
        assert (gaussian_kl_per_dim(t[0], t[1], prior_loc=t[0], prior_log_var=t[1]) == 0).all()
        m, v = min(max(mq, -100.0), 100.0), min(max(lq, -20.0), 20.0)
        q = torch.tensor([m], dtype=dtype), torch.tensor([v], dtype=dtype)
        shifted = (q[0] + delta, q[1]) if which == "loc" else (q[0], q[1] - delta)
        assert (gaussian_kl_per_dim(*q, prior_loc=shifted[0], prior_log_var=shifted[1]) > 0).all()

    check()


# ======================================================================================
# Monte-Carlo KL
# ======================================================================================


def _gaussians():
    gen = torch.Generator().manual_seed(2)
    loc, log_var = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    prior_loc = torch.tensor([0.0, 1.0, -0.5, 0.2], dtype=torch.float64)
    prior_log_var = torch.tensor([0.0, 0.5, -0.3, 1.0], dtype=torch.float64)
    return loc, log_var, prior_loc, prior_log_var


def _log_ratio_variance(loc, log_var, prior_loc, prior_log_var):
    """Exact Var[log q(z) - log p(z)], z ~ q, per dimension (see the module docstring)."""
    ratio = torch.exp(log_var - prior_log_var)  # s^2 / s_p^2
    return (ratio - 1) ** 2 / 2 + (loc - prior_loc) ** 2 * ratio * torch.exp(-prior_log_var)


def test_monte_carlo_kl_converges_to_the_closed_form():
    """20000 reparameterised samples (seed 0): per dimension, summed (Normal, latent_dims=1
    by default) and for Independent(Normal, 1), within 5 standard errors of the analytic KL."""
    loc, log_var, prior_loc, prior_log_var = _gaussians()
    q = Normal(loc, (0.5 * log_var).exp())
    p = Normal(prior_loc, (0.5 * prior_log_var).exp())
    exact = gaussian_kl_per_dim(loc, log_var, prior_loc=prior_loc, prior_log_var=prior_log_var)
    var = _log_ratio_variance(loc, log_var, prior_loc, prior_log_var)
    se = (var / MC_SAMPLES).sqrt()
    torch.manual_seed(0)
    per_dim = monte_carlo_kl_per_dim(q, p, num_samples=MC_SAMPLES)
    assert per_dim.shape == (3, 4)
    assert ((per_dim - exact).abs() <= MC_SIGMAS * se).all()
    se_sum = (var.sum(-1) / MC_SAMPLES).sqrt()
    torch.manual_seed(1)
    summed = monte_carlo_kl(q, p, num_samples=MC_SAMPLES)
    assert summed.shape == (3,)
    assert ((summed - exact.sum(-1)).abs() <= MC_SIGMAS * se_sum).all()
    torch.manual_seed(2)
    independent = monte_carlo_kl(Independent(q, 1), Independent(p, 1), num_samples=MC_SAMPLES)
    assert ((independent - exact.sum(-1)).abs() <= MC_SIGMAS * se_sum).all()
    # the test can fail: a KL off by 20 standard errors is rejected
    assert not ((summed + 20 * se_sum - exact.sum(-1)).abs() <= MC_SIGMAS * se_sum).any()


def test_monte_carlo_gradient_through_rsample():
    """The reparameterised estimate is differentiable in q's mean: its gradient is
    (mu - mu_p + s mean(e)) / s_p^2 per dimension, within 5 standard errors (s / (s_p^2
    sqrt(S))) of the analytic gradient (mu - mu_p) / s_p^2."""
    loc, log_var, prior_loc, prior_log_var = _gaussians()
    loc.requires_grad_()
    q = Normal(loc, (0.5 * log_var).exp())
    p = Normal(prior_loc, (0.5 * prior_log_var).exp())
    torch.manual_seed(3)
    (grad,) = torch.autograd.grad(monte_carlo_kl(q, p, num_samples=MC_SAMPLES).sum(), loc)
    exact = (loc.detach() - prior_loc) * torch.exp(-prior_log_var)
    se = torch.exp(0.5 * log_var - prior_log_var) / math.sqrt(MC_SAMPLES)
    assert ((grad - exact).abs() <= MC_SIGMAS * se).all()


def test_monte_carlo_without_rsample():
    """Bernoulli has no rsample: q.sample is used (z carries no gradient), the estimate
    converges to the closed-form Bernoulli KL within 5 standard errors, and the gradient in
    q's logits exists only through log q(z) (finite)."""
    logits_q = torch.tensor([[-2.0, 0.0, 1.0], [3.0, 0.5, -0.5]], dtype=torch.float64)
    logits_p = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    logits_q.requires_grad_()
    q, p = Bernoulli(logits=logits_q), Bernoulli(logits=logits_p)
    torch.manual_seed(4)
    per_dim = monte_carlo_kl_per_dim(q, p, num_samples=MC_SAMPLES)
    pq, pp = torch.sigmoid(logits_q.detach()), torch.sigmoid(logits_p)
    log1 = torch.log(pq) - torch.log(pp)  # log ratio at z = 1
    log0 = torch.log1p(-pq) - torch.log1p(-pp)  # log ratio at z = 0
    exact = pq * log1 + (1 - pq) * log0
    se = (pq * (1 - pq) * (log1 - log0) ** 2 / MC_SAMPLES).sqrt()
    assert ((per_dim.detach() - exact).abs() <= MC_SIGMAS * se).all()
    (grad,) = torch.autograd.grad(per_dim.sum(), logits_q)
    assert torch.isfinite(grad).all()
    assert monte_carlo_kl(q, p, num_samples=3).shape == (2,)


def test_monte_carlo_with_given_sample():
    """A passed sample (one, or S of them) is used as is: the result is the mean of
    log q(z) - log p(z) over it (checked against the distributions' log_prob directly)."""
    loc, log_var, prior_loc, prior_log_var = _gaussians()
    q = Normal(loc, (0.5 * log_var).exp())
    p = Normal(prior_loc, (0.5 * prior_log_var).exp())
    z = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    direct = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert torch.allclose(monte_carlo_kl_per_dim(q, p, sample=z), direct, rtol=1e-15)
    assert torch.allclose(monte_carlo_kl(q, p, sample=z, num_samples=7), direct.sum(-1))
    one = monte_carlo_kl_per_dim(q, p, sample=z[0])
    assert torch.equal(one, q.log_prob(z[0]) - p.log_prob(z[0]))
    independent = monte_carlo_kl(Independent(q, 1), Independent(p, 1), sample=z)
    assert torch.allclose(independent, direct.sum(-1), rtol=1e-14)
    assert monte_carlo_kl(q, p, sample=z, latent_dims=0).shape == (3, 4)
    assert monte_carlo_kl(q, p, sample=z, latent_dims=2).shape == ()


def test_monte_carlo_errors():
    loc, log_var, prior_loc, prior_log_var = _gaussians()
    q = Normal(loc, (0.5 * log_var).exp())
    p = Normal(prior_loc, (0.5 * prior_log_var).exp())
    with pytest.raises(ValueError, match=r"sample of shape \(2, 4\) must have shape"):
        monte_carlo_kl(q, p, sample=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"num_samples=5 disagrees with sample of shape"):
        monte_carlo_kl(q, p, sample=torch.zeros(7, 3, 4, dtype=torch.float64), num_samples=5)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        monte_carlo_kl(q, p, num_samples=0)
    with pytest.raises(ValueError, match=r"same event_shape, got \(4,\) and \(\)"):
        monte_carlo_kl(Independent(q, 1), p)
    with pytest.raises(ValueError, match=r"elementwise log_prob .* q with event_shape \(4,\)"):
        monte_carlo_kl_per_dim(Independent(q, 1), Independent(p, 1))
    with pytest.raises(TypeError, match=r"p must be a torch\.distributions\.Distribution"):
        monte_carlo_kl(q, prior_loc)
    with pytest.raises(ValueError, match=r"latent_dims must lie in \[0, 2\]"):
        monte_carlo_kl(q, p, latent_dims=3)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision_gives_float32(dtype):
    """float16 / bfloat16 parameters: analytic and Monte-Carlo KL come back in float32."""
    loc = torch.tensor([[0.5, -1.0]], dtype=dtype)
    log_var = torch.tensor([[30.0, -30.0]], dtype=dtype)
    assert gaussian_kl(loc, log_var).dtype == torch.float32
    assert gaussian_kl_per_dim(loc, log_var).dtype == torch.float32
    q = Normal(loc, torch.ones_like(loc))
    p = Normal(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    out = monte_carlo_kl(q, p, num_samples=4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert monte_carlo_kl_per_dim(q, p, sample=loc).dtype == torch.float32
