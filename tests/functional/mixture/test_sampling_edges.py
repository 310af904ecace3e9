"""Mixture draws at the edges (``probloss.functional.mixture.sampling``): saturated
correlations, extreme scales, empty shapes, the Gumbel cut-off, overflowing scales. The
references and bounds are those of ``_moment_oracles.py`` (its module docstring).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probloss.functional import mixture
from tests.functional._checks import assert_within, dtype_id
from tests.functional.mixture._moment_oracles import (
    INF,
    SIGMAS,
    _assert_matches_mp,
    _gen,
    _nearest,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("a", [50.0, -50.0])
def test_saturated_correlation_draws_lie_on_the_line(dtype, a):
    """atanh_rho = +-50 (tanh rounds to +-1, 1 - tanh^2 = 0 in float32): 20000 draws at
    tau 1 and 0.3 are finite and on the line z2 = +-z1 (z_i = (x_i - mu_i) / (sigma_i
    sqrt tau), float64 from the drawn values), within the rounding of x and mu:
    ``4 eps (|x1| / s1 + |x2| / s2 + |mu1| / s1 + |mu2| / s2)`` plus 1e-20 (the
    1/cosh(50) = 3.9e-22 term; measured at most 0.10 of it); the standardized z1 has
    variance 1 within 5 SE."""
    n = 20_000
    eps = torch.finfo(dtype).eps
    logits = torch.tensor([0.0, 0.5], dtype=dtype)
    loc = torch.tensor([[3.0, -2.0], [-100.0, 30.0]], dtype=dtype)  # > 20 scales apart
    log_scale = torch.tensor([[0.5, -1.0], [1.0, 0.5]], dtype=dtype)
    atanh = torch.tensor([a, a], dtype=dtype)
    for tau in (1.0, 0.3):
        x = mixture.bivariate_normal_mixture_sample(
            logits, loc, log_scale, atanh, temperature=tau, sample_shape=(n,), generator=_gen(9)
        )
        assert torch.isfinite(x).all()
        xs = x.double().numpy()
        mu, ls = loc.double().numpy(), log_scale.double().numpy()
        k = _nearest(xs, mu)
        s = np.exp(ls[k]) * math.sqrt(tau)
        z = (xs - mu[k]) / s
        bound = 4 * eps * ((np.abs(xs) + np.abs(mu[k])) / s).sum(-1) + 1e-20
        assert_within(z[:, 1], math.copysign(1.0, a) * z[:, 0], bound, range(n), "line")
        assert abs(z[:, 0].var() - 1.0) <= SIGMAS * math.sqrt(2.0 / n)


@pytest.mark.parametrize("a", [3.0, 8.0, 10.0, -10.0])
def test_spread_off_the_line_is_one_over_cosh(a):
    """float32, one component at 0 with unit scales, 20000 draws: the standardized spread
    off the correlation line, (z2 - tanh(a) z1) / sech(a) (float64 tanh / cosh, from the
    float32 draws), has variance 1 within 5 SE (+ 0.01 for the float32 rounding of z2 and
    rho, at most 2e-3 relative after dividing by sech(10) = 9.1e-5). ``sqrt(1 - tanh^2)``
    in float32 is 3% off at a = 8 and exactly 0 at |a| = 10, where it fails this."""
    n = 20_000
    x = mixture.bivariate_normal_mixture_sample(
        torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([a]),
        sample_shape=(n,), generator=_gen(16),
    )  # fmt: skip
    z = x.double().numpy()
    e2 = (z[:, 1] - math.tanh(a) * z[:, 0]) * math.cosh(a)
    assert abs(e2.var() - 1.0) <= SIGMAS * math.sqrt(2.0 / n) + 0.01
    assert abs(z[:, 0].var() - 1.0) <= SIGMAS * math.sqrt(2.0 / n)


@pytest.mark.parametrize("log_scale", [-30.0, 30.0])
def test_extreme_log_scale_draws_are_finite_with_the_right_scale(log_scale):
    """log_scale = -+30 in float32 (sigma = 9.4e-14 / 1.1e13), both samplers: draws are
    finite, |x| / sigma <= 10, and x / sigma has variance 1 within 5 SE over 20000 draws
    (float64 from the float32 draws). The means are 0: next to a mean of 1, sigma =
    9.4e-14 is below half an ulp and the draws round to the mean, correctly."""
    n = 20_000
    loc = torch.zeros(1, 2)
    ls = torch.full((1, 2), log_scale)
    for x in (
        mixture.normal_mixture_sample(
            torch.zeros(1), loc, ls, sample_shape=(n,), generator=_gen(12)
        ),
        mixture.bivariate_normal_mixture_sample(
            torch.zeros(1), loc, ls, torch.tensor([0.9]), sample_shape=(n,), generator=_gen(13)
        ),
    ):
        assert torch.isfinite(x).all()
        z = (x.double().numpy() - loc.double().numpy()) / math.exp(log_scale)
        assert np.abs(z).max() <= 10
        assert np.all(np.abs(z.var(0) - 1.0) <= SIGMAS * math.sqrt(2.0 / n))


@pytest.mark.parametrize(("batch", "sample_shape"), [((0,), ()), ((2,), (0,)), ((0,), (3,))])
def test_empty_batch_or_sample_shape(batch, sample_shape):
    """Issue 10: no mixtures (batch of 0) or no draws (``sample_shape`` with a 0): every
    function returns an empty tensor of the documented shape, and back-propagates."""
    k = 3
    params = [torch.zeros(*batch, k), torch.zeros(*batch, k, 2), torch.zeros(*batch, k, 2),
              torch.zeros(*batch, k)]  # fmt: skip
    leaves = [t.requires_grad_(True) for t in params]
    lg, lc, ls, a = leaves
    outputs = [
        (mixture.normal_mixture_sample(lg, lc, ls, sample_shape=sample_shape),
         (*sample_shape, *batch, 2)),
        (mixture.bivariate_normal_mixture_sample(lg, lc, ls, a, sample_shape=sample_shape),
         (*sample_shape, *batch, 2)),
        (mixture.normal_mixture_mean(lg, lc), (*batch, 2)),
        (mixture.bivariate_normal_mixture_mean(lg, lc), (*batch, 2)),
        (mixture.normal_mixture_variance(lg, lc, ls), (*batch, 2)),
        (mixture.bivariate_normal_mixture_covariance(lg, lc, ls, a), (*batch, 2, 2)),
        (mixture.normal_mixture_mode(lg, lc), (*batch, 2)),
        (mixture.bivariate_normal_mixture_mode(lg, lc), (*batch, 2)),
    ]  # fmt: skip
    for out, shape in outputs:
        assert out.shape == shape
        out.sum().backward()
    for leaf in leaves:
        assert leaf.grad is None or leaf.grad.shape == leaf.shape


@pytest.mark.parametrize(
    ("dtype", "cut"), [(torch.float32, 19.4879), (torch.float64, 40.3593)], ids=["f32", "f64"]
)
def test_gumbel_cut_off_at_the_extreme_uniforms(monkeypatch, dtype, cut):
    """The documented cut-off, at the worst uniforms (``torch.rand`` patched): the most
    probable component gets ``U = 0`` and the other the largest value ``1 - eps/2``. A
    component more than ``G_max - G_min`` below (``-log(-log(1 - eps/2)) + log(-log(eps/4))``
    = 19.488 (float32) / 40.359 (float64), computed in float64) never wins; just inside the
    cut-off it does; a component of logit ``-inf`` never wins. (Before, ``U = 0`` gave
    ``G = -inf``, and the component 1000 below, or the one of logit ``-inf``, won.)"""
    eps = torch.finfo(dtype).eps

    def extreme_rand(shape, generator=None, dtype=None, device=None):
        u = torch.full(shape, 1.0 - eps / 2, dtype=dtype, device=device)
        u[..., 0] = 0.0
        return u

    monkeypatch.setattr(torch, "rand", extreme_rand)
    loc = torch.tensor([[-1.0], [1.0]], dtype=dtype)  # (K, D) = (2, 1)
    for gap, winner in ((cut + 1e-3, 0), (1000.0, 0), (cut - 1e-3, 1)):
        logits = torch.tensor([0.0, -gap], dtype=dtype)
        x = mixture.normal_mixture_sample(logits, loc, torch.full((2, 1), -30.0, dtype=dtype))
        assert (x.sign() == loc[winner].sign()).all(), (gap, winner)
    # a logit of -inf is never drawn, even when the live component's uniform is 0 (before:
    # both terms -inf, and the argmax took the first, the -inf component)
    logits = torch.tensor([-INF, 0.0], dtype=dtype)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: extreme_rand(*a, **k).flip(-1))
    x = mixture.normal_mixture_sample(logits, loc, torch.full((2, 1), -30.0, dtype=dtype))
    assert (x > 0).all()


def test_overflowing_scale_gives_inf_only_where_the_draw_exceeds_the_range(monkeypatch):
    """The docstring's claim for ``normal_mixture_sample``: at ``log_scale = 100`` in
    float32 (``e^{100} = 2.7e43`` beyond the range) a draw is ``inf`` only where
    ``eps e^{100}`` truly exceeds it: with the normal draws patched to ``(1e-6, -1e-6, 0,
    1)``, the draws are ``loc + eps e^{100}`` (``+-2.69e37``, float64 by hand at the float32
    ``eps``) within 4 eps32 relative (``mul_exp`` applies ``e^{25}``, rounded by half an
    ulp, four times: 2 eps, and rounds four products: 2 eps), exactly ``loc`` at ``eps = 0``
    (not NaN), and ``inf`` at ``eps = 1``."""

    def fixed_randn(shape, generator=None, dtype=None, device=None):
        values = torch.tensor([1e-6, -1e-6, 0.0, 1.0], dtype=dtype, device=device)
        return values.reshape(shape)

    monkeypatch.setattr(torch, "randn", fixed_randn)
    loc = torch.full((1, 4), 0.5)
    x = mixture.normal_mixture_sample(torch.zeros(1), loc, torch.full((1, 4), 100.0))
    expected = float(torch.tensor(1e-6)) * math.exp(100.0)
    eps32 = torch.finfo(torch.float32).eps
    assert abs(x[0].item() - expected) <= 4 * eps32 * expected
    assert abs(x[1].item() + expected) <= 4 * eps32 * expected
    assert x[2] == 0.5 and x[3] == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_sample_correlation_gradient_where_the_scale_overflows(dtype):
    """Issue 10 (fuzz): the drawn component's ``log_scale[1]`` = 100 (float32; 1e10 in
    float64) at ``atanh_rho = 60``: d x2 / d a = s2 sech(a) (sech(a) e1 - tanh(a) e2) is
    finite in float32 (about -2 e^{40} e2) and +-inf in float64, never NaN (autograd gave
    ``e^{100} * (1 - tanh^2) = inf * 0``). The noise (e1, e2) is re-drawn from the same
    generator (uniforms for the component draw, then the normals); reference in mpmath."""
    from mpmath import mp, mpf

    big = 100.0 if dtype == torch.float32 else 1e10
    logits = torch.zeros(1, dtype=dtype)
    loc = torch.zeros(1, 2, dtype=dtype)
    log_scale = torch.tensor([[0.0, big]], dtype=dtype)
    a = torch.tensor([60.0], dtype=dtype, requires_grad=True)
    for seed in range(21, 29):  # one draw per call: a sum of +inf and -inf draws is NaN
        x = mixture.bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(seed))
        (grad,) = torch.autograd.grad(x[1], a)
        g = _gen(seed)
        torch.rand((1,), generator=g, dtype=dtype)
        e1, e2 = torch.randn((2,), generator=g, dtype=dtype).double().tolist()
        with mp.workdps(40):
            sech = 1 / mp.cosh(60)
            exact = mp.exp(mpf(big)) * sech * (sech * mpf(e1) - mp.tanh(60) * mpf(e2))
        size = abs(mp.exp(mpf(big)) * sech) * (abs(sech * e1) + abs(e2))
        _assert_matches_mp(grad, [(exact, size)], dtype, f"d/datanh_rho (seed {seed})")
