"""probloss.distributions.Normal: log-scale parameterisation and log-space log_prob.

References: scipy.stats.norm (float64) and the closed forms; torch's Normal shown failing.
The cdf and icdf tests use mpmath at 60 digits at the inputs after the cast to the dtype
under test: ``ncdf(z)`` and its inverse by ``findroot`` on ``log ncdf(x) = log p``
(symmetric for ``p > 1/2``, where ``1 - p`` is exact). Bounds, relative, ``eps`` of the
compute dtype (float32 for half inputs, plus ``eps_half / 2`` for the one rounding):

* cdf: ``(4 + 3 (1 + z^2)) eps``: ``z`` is formed to about 3 ulp (a subtraction and
  ``mul_exp``), and the relative condition number of ``Phi`` is
  ``|z| phi(z) / Phi(z) <= 1 + z^2`` (Mills' ratio), plus a few ulp for ``erfc``;
* icdf: ``8 eps``: Cephes' ``ndtri`` rational approximations are accurate to about an ulp
  in double (and torch evaluates the same in float32), plus the arithmetic of its few
  steps; its derivative ``sqrt(2 pi) e^{x^2/2}`` then carries ``x^2`` times the relative
  error of ``x``: ``(8 x^2 + 4) eps``.

Where the exact value is below the dtype's ``tiny`` the result must be within ``tiny``.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest
import scipy.stats
import torch
from mpmath import mp

from probloss.distributions import Normal
from probloss.functional.normal import normal_log_prob
from tests.functional._checks import assert_within, dtype_id


def test_log_prob_and_entropy_match_scipy():
    """float64, relative 1e-14."""
    loc = torch.tensor([0.0, 1.0, -3.0], dtype=torch.float64)
    log_scale = torch.tensor([0.0, -2.0, 3.0], dtype=torch.float64)
    x = torch.tensor([0.5, 1.1, 100.0], dtype=torch.float64)
    d = Normal(loc, log_scale=log_scale)
    sd = log_scale.exp().numpy()
    torch.testing.assert_close(
        d.log_prob(x),
        torch.from_numpy(scipy.stats.norm.logpdf(x.numpy(), loc.numpy(), sd)),
        rtol=1e-14,
        atol=0,
    )
    torch.testing.assert_close(
        d.entropy(),
        torch.from_numpy(scipy.stats.norm.entropy(loc.numpy(), sd)),
        rtol=1e-14,
        atol=0,
    )
    assert torch.equal(d.log_prob(x), normal_log_prob(x, loc, log_scale=log_scale))


def test_tiny_scale_in_float32_where_torch_overflows():
    """log_scale = -120 in float32: scale = exp(-120) underflows to 0; the exact log-density
    at the mean is 120 - log(2 pi)/2 = 119.0811 (closed form); torch's Normal gives NaN."""
    d = Normal(torch.tensor(0.0), log_scale=torch.tensor(-120.0))
    assert d.log_prob(torch.tensor(0.0)).item() == pytest.approx(120 - 0.5 * math.log(2 * math.pi))
    theirs = torch.distributions.Normal(0.0, d.scale, validate_args=False).log_prob(
        torch.tensor(0.0)
    )
    assert not torch.isfinite(theirs)


def test_scale_alternative_and_errors():
    a = Normal(torch.tensor([1.0]), scale=torch.tensor([2.0]))
    torch.testing.assert_close(a.log_scale, torch.tensor([math.log(2.0)]))
    with pytest.raises(ValueError, match=r"exactly one of scale .* and log_scale"):
        Normal(0.0)
    with pytest.raises(ValueError, match=r"exactly one of scale .* and log_scale"):
        Normal(0.0, 1.0, log_scale=0.0)
    # a log-scale passed in the old positional place: the error says what changed
    with pytest.raises(ValueError, match=r"scale of shape \(2,\) must be positive.*log_scale="):
        Normal(torch.zeros(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="positive"):
        Normal(torch.zeros(2), scale=torch.tensor([1.0, 0.0]))
    assert Normal(0.0, -1.0, validate_args=False).log_scale.isnan()  # unchecked, as asked
    assert not Normal(0.0, 1.0, False)._validate_args  # torch's third positional
    with pytest.raises(TypeError):  # log_scale is keyword-only
        Normal(0.0, None, None, 0.0)


def test_positional_meaning_and_signature_are_torchs():
    """Issue 11: ``Normal(0., 2.0)`` had scale ``e^2 = 7.39`` (the second positional was
    ``log_scale``). Now the positional parameters are torch's, the scale is kept as given,
    and every method equals torch's in float64 where torch's formula is accurate (moderate
    ``z``, ``p`` and the cdf away from the lower tail): relative 1e-14, 1e-13 for
    ``icdf`` (torch's ``erfinv`` form); ``log_prob`` is the functional core at the given
    ``scale`` exactly; samples are torch's draws (same seed)."""
    positional = [
        name
        for name, par in inspect.signature(Normal).parameters.items()
        if par.kind is par.POSITIONAL_OR_KEYWORD
    ]
    assert positional == list(inspect.signature(torch.distributions.Normal).parameters)
    assert Normal(0.0, 2.0).scale.item() == 2.0
    loc = torch.tensor([0.0, 1.0, -3.0], dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5, 10.0], dtype=torch.float64)
    ours, theirs = Normal(loc, scale), torch.distributions.Normal(loc, scale)
    assert torch.equal(ours.scale, scale) and torch.equal(ours.loc, loc)
    assert ours.batch_shape == theirs.batch_shape
    x = torch.tensor([0.5, 1.1, 4.0], dtype=torch.float64)
    p = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    for name, f, rtol in [
        ("mean", lambda d: d.mean, 0.0),
        ("stddev", lambda d: d.stddev, 0.0),
        ("variance", lambda d: d.variance, 1e-16),
        ("entropy", lambda d: d.entropy(), 1e-14),
        ("log_prob", lambda d: d.log_prob(x), 1e-14),
        ("cdf", lambda d: d.cdf(x), 1e-14),
        ("icdf", lambda d: d.icdf(p), 1e-13),
        ("expand", lambda d: d.expand((2, 3)).scale, 0.0),
    ]:
        torch.testing.assert_close(f(ours), f(theirs), rtol=rtol, atol=0, msg=name)
    assert torch.equal(ours.log_prob(x), normal_log_prob(x, loc, scale=scale))
    assert torch.equal(
        ours.expand((2, 3)).log_prob(x), normal_log_prob(x, loc, scale=scale).expand(2, 3)
    )
    torch.manual_seed(0)
    drawn = ours.sample((4,))
    torch.manual_seed(0)
    torch.testing.assert_close(drawn, theirs.sample((4,)), rtol=1e-15, atol=1e-15)


def test_log_scale_keyword_is_the_functional_core():
    """The keyword form: ``scale = exp(log_scale)``, ``log_prob`` the core at ``log_scale``."""
    ls = torch.tensor([-120.0, 0.0, 3.0], dtype=torch.float64)
    d = Normal(torch.zeros(3, dtype=torch.float64), log_scale=ls)
    x = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    assert torch.equal(d.scale, ls.exp()) and torch.equal(d.log_scale, ls)
    assert torch.equal(d.log_prob(x), normal_log_prob(x, d.loc, ls))


def test_expand_sample_and_kl_interop():
    d = Normal(torch.zeros(3), log_scale=torch.zeros(3))
    e = d.expand((2, 3))
    assert e.batch_shape == (2, 3) and e.log_scale.shape == (2, 3)
    assert d.rsample((4,)).shape == (4, 3)
    p = torch.distributions.Normal(torch.ones(3), torch.ones(3))
    torch.testing.assert_close(torch.distributions.kl_divergence(d, p), torch.full((3,), 0.5))


def test_half_precision_log_prob_is_float32():
    d = Normal(torch.zeros(2, dtype=torch.float16), log_scale=torch.zeros(2, dtype=torch.float16))
    assert d.log_prob(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32
    assert d.entropy().dtype == torch.float32


@functools.cache
def _ppf(p: float) -> float:
    """The standard normal quantile of ``p`` (mpmath, 60 digits), rounded to float64."""
    with mp.workdps(60):
        target = mp.mpf(p)
        if target == mp.mpf(0.5):
            return 0.0
        lower = target < 0.5
        q = target if lower else 1 - target  # exact at 60 digits
        guess = scipy.stats.norm.ppf(float(q)) if float(q) > 1e-300 else -38.0
        x = mp.findroot(lambda t: mp.log(mp.ncdf(t)) - mp.log(q), mp.mpf(guess))
        return float(x if lower else -x)


@functools.cache
def _cdf(z: float) -> float:
    with mp.workdps(60):
        return float(mp.ncdf(mp.mpf(z)))


def _quantiles(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    ps = [fi.tiny * fi.eps, 4 * fi.tiny * fi.eps, fi.tiny, 1e-30, math.exp(-33)]
    ps += [math.exp(-32), 1e-10, 1e-3, 0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 0.999, 1 - 1e-6]
    t = torch.tensor(ps, dtype=torch.float64).to(dtype)
    return sorted(set(t[t > 0].double().tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_icdf_matches_mpmath_down_to_subnormal_quantiles(dtype):
    """Regression (issue 10): torch's ``erfinv(2p - 1)`` gave ``-inf`` (infinite gradient)
    at ``p = e^-32`` in float32, true -7.62, and 1.3e-5 relative error at ``e^-33`` in
    float64. Value and ``d/dp`` (``sqrt(2 pi) e^{x^2/2}``) against mpmath, bounds in the
    module docstring; ``d/dlog_scale = x``."""
    p64 = _quantiles(dtype)
    p = torch.tensor(p64, dtype=dtype, requires_grad=True)
    log_scale = torch.zeros(len(p64), dtype=dtype, requires_grad=True)
    x = Normal(torch.zeros(len(p64), dtype=dtype), log_scale=log_scale).icdf(p)
    x.sum().backward()
    exact = np.array([_ppf(v) for v in p64])
    if dtype == torch.float32:  # the documented failure of torch's erfinv form
        theirs = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(math.exp(-32)))
        assert theirs.item() == -math.inf
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    got = x.detach().double().numpy()
    assert_within(got, exact, 8 * eps * np.abs(exact) + tiny, p64, "icdf")
    assert_within(
        log_scale.grad.double().numpy(), exact, 8 * eps * np.abs(exact) + tiny, p64, "d/dlog_scale"
    )
    with mp.workdps(60):
        dp = np.array([float(1 / mp.npdf(mp.mpf(v))) for v in exact])
    finite = dp <= torch.finfo(dtype).max
    bound = (8 * exact**2 + 4) * eps * np.abs(dp)
    got_dp = p.grad.double().numpy()
    assert_within(got_dp[finite], dp[finite], bound[finite], np.array(p64)[finite], "d/dp")
    assert (got_dp[~finite] == math.inf).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_cdf_matches_mpmath_in_both_tails(dtype):
    """Regression (issue 10): torch's ``0.5 (1 + erf(z / sqrt 2))`` cancels in the lower
    tail (0 at z = -10 in float32, true 7.6e-24; 1e-8 relative at z = -5 in float64).
    Against mpmath ``ncdf`` with the module's bound, ``log_scale`` nonzero so that ``z`` is
    formed, and the gradient in ``value`` (``phi(z) e^{-log_scale}``, relative
    ``(4 + 3 (1 + z^2)) eps`` as well: ``phi`` has condition ``z^2``)."""
    fi = torch.finfo(dtype)
    zs = [-37.0, -30.0, -20.0, -13.0, -10.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 3.0, 5.0, 8.0]
    zs = [z for z in zs if _cdf(z) > 0 and abs(z) < math.sqrt(-2 * math.log(fi.tiny * fi.eps))]
    log_scale = torch.full((len(zs),), 0.75, dtype=dtype)
    loc = torch.full((len(zs),), -2.0, dtype=dtype)
    value = (torch.tensor(zs, dtype=torch.float64) * math.exp(0.75) - 2.0).to(dtype)
    value.requires_grad_()
    # the exact z of the cast inputs
    with mp.workdps(60):
        z_exact = [
            (mp.mpf(v) + 2) * mp.exp(-mp.mpf(0.75)) for v in value.detach().double().tolist()
        ]
        exact = np.array([float(mp.ncdf(z)) for z in z_exact])
        dvalue = np.array([float(mp.npdf(z) * mp.exp(-mp.mpf(0.75))) for z in z_exact])
    out = Normal(loc, log_scale=log_scale).cdf(value)
    out.sum().backward()
    # the documented failures: torch's Normal.cdf and torch.special.ndtr at z = -10
    minus_ten = torch.tensor(-10.0, dtype=dtype)
    assert torch.distributions.Normal(0.0, 1.0).cdf(minus_ten).item() == 0.0
    assert torch.special.ndtr(minus_ten).item() == 0.0  # exact 7.6e-24
    z = np.array([float(v) for v in z_exact])
    bound = (4 + 3 * (1 + z**2)) * fi.eps
    labels = [float(v) for v in z_exact]
    assert_within(out.detach().double().numpy(), exact, bound * exact + fi.tiny, labels, "cdf")
    got = value.grad.double().numpy()
    assert_within(got, dvalue, bound * dvalue + fi.tiny, labels, "d cdf/d value")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_cdf_icdf_at_huge_inputs(dtype):
    """Issue 10 sweep: ``x - loc`` beyond ``finfo.max``, log-scales from -1e30 to 1e30:
    the CDF is the exact 0 or 1 with zero gradients (never NaN), and ``loc + z e^s`` with
    a term beyond ``max`` where the sum is not (``-3.39e38 + 6.2e38``) is finite (mpmath,
    relative 8 eps of the compute dtype plus one rounding to the dtype)."""
    top = torch.finfo(dtype).max
    x = torch.tensor([-top, top, -top, top, 0.0, 1.0], dtype=dtype, requires_grad=True)
    loc = torch.tensor([top, -top, 1e30, -1e30, 1e30, 0.0], dtype=dtype, requires_grad=True)
    ls = torch.tensor([0.0, 10.0, -1e30, 1e30, -100.0, -1e30], dtype=dtype, requires_grad=True)
    out = Normal(loc, log_scale=ls).cdf(x)
    out.sum().backward()
    assert out.dtype == dtype
    # z = -inf, +inf, -inf, 0 (e^-1e30 times a finite step), -inf, +inf
    assert out.tolist() == [0.0, 1.0, 0.0, 0.5, 0.0, 1.0]
    for t in (x, loc, ls):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))
    p = torch.tensor([0.98828125, 0.5, 1e-30], dtype=dtype)
    loc = torch.tensor([-3.3895313892515355e38, 1e38, 0.0], dtype=dtype)
    ls = torch.tensor([88.5, -1e30, 80.0], dtype=dtype)
    got = Normal(loc, log_scale=ls).icdf(p)
    assert got.dtype == dtype
    with mp.workdps(60):
        exact = [
            float(mp.mpf(m) + mp.mpf(_ppf(q)) * mp.exp(mp.mpf(s)))
            for q, m, s in zip(
                p.double().tolist(), loc.double().tolist(), ls.double().tolist(), strict=True
            )
        ]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = 8 * torch.finfo(compute).eps + (torch.finfo(dtype).eps / 2 if dtype != compute else 0)
    labels = list(
        zip(p.double().tolist(), loc.double().tolist(), ls.double().tolist(), strict=True)
    )
    assert_within(got.double().numpy(), exact, rtol * np.abs(exact), labels, "icdf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_precision_cdf_icdf_rsample(dtype):
    """Half-precision parameters: cdf, icdf and samples are computed in float32 and returned
    in the parameters' dtype (float32 bound plus one rounding: ``eps_half / 2`` relative)."""
    d = Normal(torch.zeros(3, dtype=dtype), log_scale=torch.tensor([0.0, -2.0, 3.0], dtype=dtype))
    x = torch.tensor([-1.0, 0.25, 30.0], dtype=dtype)
    p = torch.tensor([1e-3, 0.5, 0.875], dtype=dtype)
    cdf, icdf = d.cdf(x), d.icdf(p)
    assert cdf.dtype == icdf.dtype == d.rsample((2,)).dtype == dtype
    sd = d.log_scale.double().exp().numpy()
    exact_cdf = scipy.stats.norm.cdf(x.double().numpy(), 0.0, sd)
    exact_icdf = scipy.stats.norm.ppf(p.double().numpy(), 0.0, sd)
    rtol = torch.finfo(dtype).eps / 2 + 64 * torch.finfo(torch.float32).eps
    assert_within(cdf.double().numpy(), exact_cdf, rtol * exact_cdf, x.tolist(), "cdf")
    assert_within(icdf.double().numpy(), exact_icdf, rtol * np.abs(exact_icdf), p.tolist(), "icdf")


def test_rsample_is_loc_plus_scaled_noise():
    """``rsample = loc + e^{log_scale} eps`` with torch's ``randn`` draws (same seed), also
    where ``e^{log_scale}`` alone overflows float32 (log_scale 88.75) and the sample does
    not (a seed with ``|eps| < 1/2`` there); float32, 4 eps relative (mul_exp's rounding
    and the sum's). torch's Normal(loc, exp(88.75)) samples inf there."""
    seed = next(
        k
        for k in range(1000)
        if abs(torch.randn(3, generator=torch.Generator().manual_seed(k))[2]) < 0.5
    )
    loc = torch.tensor([0.0, 1.0, -1e38])
    ls = torch.tensor([0.0, -30.0, 88.75], requires_grad=True)
    torch.manual_seed(seed)
    got = Normal(loc, log_scale=ls).rsample()
    torch.manual_seed(seed)
    eps = torch.randn(3)
    assert abs(eps[2].item()) < 0.5
    with mp.workdps(60):
        exact = np.array(
            [
                float(mp.mpf(m) + mp.mpf(e) * mp.exp(mp.mpf(v)))
                for m, e, v in zip(loc.tolist(), eps.tolist(), ls.tolist(), strict=True)
            ]
        )
    bound = 4 * torch.finfo(torch.float32).eps * np.abs(exact)
    assert_within(got.detach().double().numpy(), exact, bound, list(range(3)), "rsample")
    got.sum().backward()
    assert torch.isfinite(ls.grad).all()
    torch.manual_seed(seed)
    assert torch.equal(
        Normal(loc, log_scale=ls).sample(), got.detach()
    )  # sample is rsample, no graph


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=dtype_id)
def test_empty_batch(dtype):
    """Empty in, empty out (issue 10): log_prob, cdf, icdf, entropy and rsample of a batch of
    0, with empty gradients."""
    loc = torch.zeros(0, 2, dtype=dtype, requires_grad=True)
    d = Normal(loc, log_scale=torch.zeros(0, 2, dtype=dtype))
    x = torch.zeros(0, 2, dtype=dtype)
    for y in (d.log_prob(x), d.cdf(x), d.icdf(x + 0.5), d.entropy(), d.rsample((3,))):
        assert y.numel() == 0
        if y.requires_grad:
            (g,) = torch.autograd.grad(y.sum(), loc)
            assert g.shape == (0, 2)
    assert d.rsample((3,)).shape == (3, 0, 2)
    assert Normal(torch.zeros(0), scale=torch.ones(0)).log_scale.shape == (0,)


def test_cdf_and_icdf_at_subnormal_inputs_and_extreme_scales():
    """Regression (issue 10 fuzz): ``x - mu`` of two subnormals (2.8e-45) at ``log_scale =
    -1e26`` is ``z = +inf``, the CDF 1 with zero gradients (halving the step rounded it to
    0: CDF 0.5, gradient inf); ``icdf`` at the smallest float64 subnormal with
    ``log_scale = -2.9e32`` has ``d/dp = sqrt(2 pi) e^{log_scale + z^2/2} = 0`` (autograd
    formed ``inf * 0 = NaN``). Exact values, no tolerance."""
    tiny = torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps
    x = torch.tensor([tiny], requires_grad=True)
    loc = torch.tensor([-tiny], requires_grad=True)
    ls = torch.tensor([-1.0668787882505972e26], requires_grad=True)
    out = Normal(loc, log_scale=ls).cdf(x)
    out.backward()
    assert out.item() == 1.0
    assert x.grad.item() == 0.0 and loc.grad.item() == 0.0 and ls.grad.item() == 0.0
    p = torch.tensor([5e-324], dtype=torch.float64, requires_grad=True)
    loc = torch.tensor([-1e-3], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([-2.9e32], dtype=torch.float64, requires_grad=True)
    out = Normal(loc, log_scale=ls).icdf(p)
    out.backward()
    assert out.item() == -1e-3
    assert p.grad.item() == 0.0 and loc.grad.item() == 1.0 and ls.grad.item() == 0.0
