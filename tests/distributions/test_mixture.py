"""Tests of ``probloss.distributions.mixture``: ``NormalMixture``, ``BivariateNormalMixture``
and ``MultivariateNormalMixture``, and through them of their shared base
(``probloss.distributions._mixture_base``).

Where the numbers come from
---------------------------
* ``log_prob``, moments, mode and samples are the functional core
  (``probloss.functional.mixture`` and ``probloss.functional.mixture.sampling``, tested
  against their own references): here they must be *equal* to it.
* ``torch.distributions.MixtureSameFamily`` in float64 at moderate inputs (where torch is
  right): ``Categorical(logits)`` over ``Independent(Normal(loc, exp(log_scale)), 1)`` or
  ``MultivariateNormal(loc, textbook covariance)`` (``MultivariateNormal(loc,
  scale_tril=L)`` for the full-covariance mixture); ``log_prob``, ``mean`` and
  ``variance`` within 1e-12 relative (of the larger of the value and 1 for ``log_prob``).
* The components: the log-sum-exp over ``component_distribution.log_prob`` plus
  ``log_softmax(logits)`` (torch's ``logsumexp``), float64, 1e-12.
* Sampling: a fixed seed and N = 100000 draws per batch element; sample means within 5
  standard errors ``sqrt(Var / N)`` of ``mean`` (``Var`` from ``variance``), and for the
  bivariate mixture the sample covariance within 5 SE ``sqrt((C_ii C_jj + C_ij^2) / N)``
  (the Gaussian-approximation SE, a close bound for these near-Gaussian mixtures).

The mixture weights sum to 1 within ``K eps``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
)
from torch.distributions import Normal as TorchNormal

from probloss.distributions.bivariate_normal import BivariateNormal
from probloss.distributions.mixture import (
    BivariateNormalMixture,
    MultivariateNormalMixture,
    NormalMixture,
)
from probloss.distributions.normal import Normal
from probloss.functional import mixture
from tests.functional._checks import HALF_DTYPES, assert_within, dtype_id

F64 = torch.float64
B, K, D = 6, 4, 3


def _params(dtype=torch.float32, seed=0):
    """Batch (6,), K = 4, D = 3 normal-mixture parameters and (6, 4) atanh_rho, moderate."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g, dtype=F64)
    loc = 3 * torch.randn(B, K, D, generator=g, dtype=F64)
    log_scale = 0.5 * torch.randn(B, K, D, generator=g, dtype=F64)
    a = torch.randn(B, K, generator=g, dtype=F64)
    return [t.to(dtype) for t in (logits, loc, log_scale, a)]


def _normal(dtype=torch.float32, **kw):
    logits, loc, log_scale, _ = _params(dtype)
    return NormalMixture(logits, loc, log_scale, **kw), (logits, loc, log_scale)


def _bivariate(dtype=torch.float32, **kw):
    logits, loc, log_scale, a = _params(dtype)
    params = (logits, loc[..., :2], log_scale[..., :2], a)
    return BivariateNormalMixture(*params, **kw), params


def _textbook_cov(log_scale, a):
    s = log_scale.exp()
    off = torch.tanh(a) * s[..., 0] * s[..., 1]
    return torch.stack((s[..., 0] ** 2, off, off, s[..., 1] ** 2), -1).unflatten(-1, (2, 2))


# ======================================================================================
# The functional core, shapes, construction
# ======================================================================================


def test_log_prob_and_summaries_are_the_functional_core():
    """log_prob (value of the batch shape and a sample batch (5, 6, D)), mean, variance,
    covariance_matrix and mode equal the functional results exactly."""
    d, p = _normal()
    x = d.sample((5,))
    assert torch.equal(d.log_prob(x), mixture.normal_mixture_log_prob(x, *p))
    assert d.log_prob(x).shape == (5, B)
    assert torch.equal(d.log_prob(x[0]), mixture.normal_mixture_log_prob(x[0], *p))
    assert torch.equal(d.mean, mixture.normal_mixture_mean(*p[:2]))
    assert torch.equal(d.variance, mixture.normal_mixture_variance(*p))
    assert torch.equal(d.stddev, mixture.normal_mixture_variance(*p).sqrt())
    assert torch.equal(d.mode, mixture.normal_mixture_mode(*p[:2]))

    e, q = _bivariate()
    y = e.sample((5,))
    assert torch.equal(e.log_prob(y), mixture.bivariate_normal_mixture_log_prob(y, *q))
    assert e.log_prob(y).shape == (5, B)
    assert torch.equal(e.mean, mixture.bivariate_normal_mixture_mean(*q[:2]))
    assert torch.equal(e.covariance_matrix, mixture.bivariate_normal_mixture_covariance(*q))
    assert torch.equal(e.variance, torch.diagonal(e.covariance_matrix, dim1=-2, dim2=-1))
    assert torch.equal(e.mode, mixture.bivariate_normal_mixture_mode(*q[:2]))


def test_shapes_from_broadcasting():
    """logits (5, 1, K), loc (3, K, D), log_scale (K, D), atanh_rho (1, K): batch (5, 3),
    event (D,) / (2,); parameters are stored broadcast; every output shape follows."""
    d = NormalMixture(torch.zeros(5, 1, K), torch.zeros(3, K, D), torch.zeros(K, D))
    assert d.batch_shape == (5, 3) and d.event_shape == (D,) and d.num_components == K
    assert d.logits.shape == (5, 3, K) and d.loc.shape == d.log_scale.shape == (5, 3, K, D)
    assert d.sample().shape == (5, 3, D)
    assert d.sample((7, 2)).shape == (7, 2, 5, 3, D)
    assert d.sample_with_temperature(0.5, (4,)).shape == (4, 5, 3, D)
    assert d.mean.shape == d.variance.shape == d.mode.shape == (5, 3, D)
    assert d.log_prob(torch.zeros(D)).shape == (5, 3)
    assert d.log_prob(torch.zeros(2, 1, 1, D)).shape == (2, 5, 3)
    assert d.mixture_weights.shape == (5, 3, K)

    e = BivariateNormalMixture(
        torch.zeros(5, 1, K), torch.zeros(3, K, 2), torch.zeros(K, 2), torch.zeros(1, K)
    )
    assert e.batch_shape == (5, 3) and e.event_shape == (2,)
    assert e.atanh_rho.shape == (5, 3, K)
    assert e.sample((7,)).shape == (7, 5, 3, 2)
    assert e.covariance_matrix.shape == (5, 3, 2, 2)
    assert e.mean.shape == e.variance.shape == e.mode.shape == (5, 3, 2)
    assert e.log_prob(torch.zeros(4, 1, 1, 2)).shape == (4, 5, 3)


@pytest.mark.parametrize(
    ("cls", "args", "pattern"),
    [
        (NormalMixture, (torch.zeros(3), torch.zeros(4, 2), torch.zeros(4, 2)),
         r"do not broadcast.*logits \(3,\), loc \(4, 2\)"),
        (NormalMixture, (torch.zeros(3), torch.zeros(3), torch.zeros(3, 1)),
         r"loc must have shape \(\*, K, D\)"),
        (BivariateNormalMixture,
         (torch.zeros(3), torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3)),
         r"loc must have shape \(\*, K, 2\)"),
        (BivariateNormalMixture,
         (torch.zeros(3), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2)),
         r"atanh_rho \(2,\)"),
    ],
    ids=["K", "loc-rank", "bivariate-event", "atanh_rho-K"],
)  # fmt: skip
def test_constructor_shape_errors(cls, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(*args)


def test_validate_args():
    """validate_args=True: a NaN parameter raises ValueError naming it; a value of the
    wrong event size or with NaN raises; validate_args=False lets NaN through."""
    logits, loc, log_scale = torch.zeros(2), torch.zeros(2, 1), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="loc"):
        NormalMixture(logits, torch.full((2, 1), math.nan), log_scale, validate_args=True)
    with pytest.raises(ValueError, match="atanh_rho"):
        BivariateNormalMixture(
            logits, torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0.0, math.nan]),
            validate_args=True,
        )  # fmt: skip
    d = NormalMixture(logits, loc, log_scale, validate_args=True)
    with pytest.raises(ValueError, match="value"):
        d.log_prob(torch.zeros(2))
    with pytest.raises(ValueError, match="value"):
        d.log_prob(torch.tensor([math.nan]))
    lax = NormalMixture(logits, loc, log_scale, validate_args=False)
    assert torch.isnan(lax.log_prob(torch.tensor([math.nan])))


def test_constraints_support_and_repr():
    d, _ = _normal()
    assert set(d.arg_constraints) == {"logits", "loc", "log_scale"}
    assert d.support.check(torch.zeros(D)).item()
    assert repr(d).startswith(
        "NormalMixture(logits: torch.Size([6, 4]), loc: torch.Size([6, 4, 3])"
    )
    e, _ = _bivariate()
    assert set(e.arg_constraints) == {"logits", "loc", "log_scale", "atanh_rho"}
    assert "atanh_rho: torch.Size([6, 4])" in repr(e)


def test_expand():
    """expand to (2, 6): parameters, moments and log_prob are the broadcast originals;
    samples have the expanded shape; validate_args is kept."""
    for d, x in (
        (_normal(validate_args=True)[0], torch.zeros(2, B, D)),
        (_bivariate(validate_args=True)[0], torch.zeros(2, B, 2)),
    ):
        e = d.expand(torch.Size([2, B]))
        assert type(e) is type(d) and e.batch_shape == (2, B) and e.event_shape == d.event_shape
        for name in d.arg_constraints:
            original = getattr(d, name)
            assert torch.equal(getattr(e, name), original.expand(2, *original.shape))
        assert torch.equal(e.mean, d.mean.expand(2, *d.mean.shape))
        assert torch.equal(e.variance, d.variance.expand(2, *d.variance.shape))
        assert torch.equal(e.log_prob(x), d.log_prob(x))
        assert e.sample((3,)).shape == (3, 2, B, *d.event_shape)
        assert e._validate_args
        with pytest.raises(ValueError):
            e.log_prob(torch.full_like(x, math.nan))


# ======================================================================================
# Weights and components
# ======================================================================================


def test_mixture_weights_and_mixture_distribution():
    """mixture_weights = softmax(logits) (torch.softmax, float64: equal), sum to 1 within
    K eps in float32 and at logits +-1e4; mixture_distribution is Categorical(logits)."""
    d, (logits, *_) = _normal(F64)
    assert torch.equal(d.mixture_weights, torch.softmax(logits, -1))
    assert torch.equal(d.mixture_distribution.probs, Categorical(logits=logits).probs)
    f32, _ = _normal()
    sums = f32.mixture_weights.sum(-1)
    assert ((sums - 1).abs() <= K * torch.finfo(torch.float32).eps).all()
    extreme = NormalMixture(torch.tensor([1e4, -1e4, 0.0]), torch.zeros(3, 1), torch.zeros(3, 1))
    assert torch.equal(extreme.mixture_weights, torch.tensor([1.0, 0.0, 0.0]))


def test_component_distribution_and_log_sum_exp():
    """component_distribution is a probloss Normal with batch (6, K, D) (resp. a
    BivariateNormal with batch (6, K)) holding the parameters; the mixture log_prob equals
    logsumexp_k(log_softmax(logits)_k + sum_d component.log_prob) within 1e-12 (float64)."""
    d, (logits, loc, log_scale) = _normal(F64)
    c = d.component_distribution
    assert isinstance(c, Normal) and c.batch_shape == (B, K, D) and c.event_shape == ()
    assert torch.equal(c.loc, loc) and torch.equal(c.log_scale, log_scale)
    x = d.sample((5,))
    ref = torch.logsumexp(torch.log_softmax(logits, -1) + c.log_prob(x.unsqueeze(-2)).sum(-1), -1)
    bound = 1e-12 * np.maximum(ref.abs().numpy().ravel(), 1.0)
    assert_within(d.log_prob(x).numpy().ravel(), ref.numpy().ravel(), bound, range(30), "normal")

    e, (logits, loc, log_scale, a) = _bivariate(F64)
    c = e.component_distribution
    assert isinstance(c, BivariateNormal) and c.batch_shape == (B, K) and c.event_shape == (2,)
    assert torch.equal(c.atanh_rho, a)
    y = e.sample((5,))
    ref = torch.logsumexp(torch.log_softmax(logits, -1) + c.log_prob(y.unsqueeze(-2)), -1)
    bound = 1e-12 * np.maximum(ref.abs().numpy().ravel(), 1.0)
    assert_within(e.log_prob(y).numpy().ravel(), ref.numpy().ravel(), bound, range(30), "biv")


def test_agrees_with_torch_mixture_same_family_float64():
    """Moderate float64 inputs: log_prob at 20 samples per batch element and at points 5
    scales out, mean and variance agree with torch.distributions.MixtureSameFamily within
    1e-12 relative (log_prob: of max(|value|, 1)); the bivariate covariance agrees with the
    covariance of MixtureSameFamily's samples' law, i.e. torch's variance on the diagonal."""
    d, (logits, loc, log_scale) = _normal(F64)
    ref = MixtureSameFamily(
        Categorical(logits=logits), Independent(TorchNormal(loc, log_scale.exp()), 1)
    )
    e, (logits2, loc2, log_scale2, a) = _bivariate(F64)
    ref2 = MixtureSameFamily(
        Categorical(logits=logits2), MultivariateNormal(loc2, _textbook_cov(log_scale2, a))
    )
    for ours, theirs, name in ((d, ref, "normal"), (e, ref2, "bivariate")):
        x = torch.cat((ours.sample((20,)), ours.mean + 5 * ours.stddev[None]), 0)
        got, want = ours.log_prob(x).numpy().ravel(), theirs.log_prob(x).numpy().ravel()
        bound = 1e-12 * np.maximum(np.abs(want), 1.0)
        assert_within(got, want, bound, range(got.size), f"{name} log_prob")
        for moment in ("mean", "variance"):
            got = getattr(ours, moment).numpy().ravel()
            want = getattr(theirs, moment).numpy().ravel()
            assert_within(got, want, 1e-12 * np.abs(want), range(got.size), f"{name} {moment}")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision(dtype):
    """Half parameters: log_prob is float32 and equals the float32 computation on the
    upcast parameters; mean, variance, mode, weights and samples keep the half dtype."""
    for make in (_normal, _bivariate):
        d, p = make(dtype)
        upcast = type(d)(*(t.float() for t in p))
        x = d.sample((3,))
        assert x.dtype == dtype and torch.isfinite(x).all()
        assert d.log_prob(x).dtype == torch.float32
        assert torch.equal(d.log_prob(x), upcast.log_prob(x.float()))
        assert d.mean.dtype == d.variance.dtype == d.mode.dtype == dtype
        assert d.mixture_weights.dtype == dtype


# ======================================================================================
# Sampling
# ======================================================================================


def test_no_rsample_and_samples_carry_no_graph():
    """has_rsample is False and rsample raises NotImplementedError naming the functional
    alternative; sample / sample_with_temperature return tensors without a graph even for
    parameters that require grad."""
    logits, loc, log_scale, a = (t.requires_grad_() for t in _params())
    for d in (
        NormalMixture(logits, loc, log_scale),
        BivariateNormalMixture(logits, loc[..., :2], log_scale[..., :2], a),
    ):
        assert not d.has_rsample
        with pytest.raises(NotImplementedError, match=r"mixture\.sampling"):
            d.rsample()
        assert not d.sample((2,)).requires_grad
        assert not d.sample_with_temperature(0.3, (2,)).requires_grad
        assert d.log_prob(d.sample()).requires_grad  # log_prob keeps its gradient


def test_sample_is_the_functional_sampler():
    """sample() draws from torch's global RNG exactly as the functional sampler does
    (same seed, equal tensors); sample_with_temperature(tau, shape, generator) equals the
    functional call with that generator; temperature 0 returns the mode (every draw)."""
    d, p = _normal()
    e, q = _bivariate()
    for dist, params, fn in (
        (d, p, mixture.normal_mixture_sample),
        (e, q, mixture.bivariate_normal_mixture_sample),
    ):
        torch.manual_seed(5)
        x = dist.sample((4,))
        torch.manual_seed(5)
        assert torch.equal(x, fn(*params, sample_shape=(4,)))
        g1, g2 = (torch.Generator().manual_seed(9) for _ in range(2))
        got = dist.sample_with_temperature(0.6, (4,), generator=g1)
        assert torch.equal(got, fn(*params, temperature=0.6, sample_shape=(4,), generator=g2))
        zero = dist.sample_with_temperature(0.0, (3,))
        assert torch.equal(zero, dist.mode.expand(3, *dist.mode.shape))
        with pytest.raises(ValueError, match="temperature"):
            dist.sample_with_temperature(-0.5)


def test_sample_moments_within_five_standard_errors():
    """N = 100000 draws of each of the 6 mixtures (float64): sample means within 5 SE
    sqrt(variance / N) of ``mean``; bivariate sample covariances within 5 SE
    sqrt((C_ii C_jj + C_ij^2) / N) of ``covariance_matrix``; normal sample variances within
    5 SE sqrt(2 / N) variance (Gaussian-approximation SE, see the module docstring)."""
    n = 100_000
    torch.manual_seed(1)
    d, _ = _normal(F64)
    x = d.sample((n,))
    se = (d.variance / n).sqrt()
    assert_within(x.mean(0).numpy().ravel(), d.mean.numpy().ravel(), 5 * se.numpy().ravel(),
                  range(B * D), "normal mean")  # fmt: skip
    var_se = d.variance * math.sqrt(2.0 / n)
    assert_within(x.var(0).numpy().ravel(), d.variance.numpy().ravel(),
                  5 * var_se.numpy().ravel(), range(B * D), "normal variance")  # fmt: skip

    e, _ = _bivariate(F64)
    y = e.sample((n,))
    c = e.covariance_matrix
    se = (torch.diagonal(c, dim1=-2, dim2=-1) / n).sqrt()
    assert_within(y.mean(0).numpy().ravel(), e.mean.numpy().ravel(), 5 * se.numpy().ravel(),
                  range(B * 2), "bivariate mean")  # fmt: skip
    centred = y - y.mean(0)
    sample_cov = torch.einsum("nbi,nbj->bij", centred, centred) / (n - 1)
    diag = torch.diagonal(c, dim1=-2, dim2=-1)
    cov_se = ((diag[..., :, None] * diag[..., None, :] + c**2) / n).sqrt()
    assert_within(sample_cov.numpy().ravel(), c.numpy().ravel(), 5 * cov_se.numpy().ravel(),
                  range(B * 4), "bivariate covariance")  # fmt: skip


@pytest.mark.parametrize("a", [50.0, -50.0])
def test_saturated_correlation_samples_and_log_prob(a):
    """float32, atanh_rho = +-50 for every component: 1000 draws are finite, lie on the
    lines x2 - mu2 = +-(x1 - mu1) (unit scales) within 4 eps (|x1| + |x2| + |mu1| + |mu2|),
    and their log_prob is finite (the density is huge but representable: log cosh 50 =
    49.3 plus at most a few units)."""
    loc = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    d = BivariateNormalMixture(torch.zeros(2), loc, torch.zeros(2, 2), torch.full((2,), a))
    torch.manual_seed(2)
    x = d.sample((1000,))
    assert torch.isfinite(x).all()
    k = (x[:, 0] > 5).long()
    r = x - loc[k]
    eps = torch.finfo(torch.float32).eps
    bound = 4 * eps * (x.abs().sum(-1) + loc[k].abs().sum(-1)) + 1e-20
    assert ((r[:, 1] - math.copysign(1.0, a) * r[:, 0]).abs() <= bound).all()
    assert torch.isfinite(d.log_prob(x)).all()


@pytest.mark.parametrize("log_scale", [-30.0, 30.0])
def test_extreme_log_scale_samples_and_log_prob(log_scale):
    """float32, log_scale = -+30 for every component (means 0): samples are finite and
    within 10 scales of 0; the mean is 0 and the variance e^(2 log_scale) within 1e-6
    relative; log_prob of the samples is finite."""
    d = NormalMixture(torch.zeros(3), torch.zeros(3, 2), torch.full((3, 2), log_scale))
    torch.manual_seed(3)
    x = d.sample((1000,))
    assert torch.isfinite(x).all() and (x.abs() <= 10 * math.exp(log_scale)).all()
    assert torch.equal(d.mean, torch.zeros(2))
    assert torch.allclose(d.variance, torch.full((2,), math.exp(2 * log_scale)), rtol=1e-6, atol=0)
    assert torch.isfinite(d.log_prob(x)).all()


# ======================================================================================
# MultivariateNormalMixture (full covariances)
# ======================================================================================


def _full(dtype=torch.float32, **kw):
    """Batch (6,), K = 4, D = 3: the normal-mixture parameters and random lower-triangular
    factors with diagonals exp(N(0, 0.25))."""
    logits, loc, log_scale, _ = _params(F64)
    g = torch.Generator().manual_seed(5)
    tril = torch.randn(B, K, D, D, generator=g, dtype=F64).tril(-1) * 0.5
    tril = tril + torch.diag_embed(log_scale.exp())
    params = [t.to(dtype) for t in (logits, loc, tril)]
    return MultivariateNormalMixture(*params, **kw), params


def test_full_covariance_agrees_with_torch_mixture_same_family_float64():
    """float64: log_prob (20 samples and points 5 standard deviations out), mean and
    variance agree with MixtureSameFamily(Categorical, MultivariateNormal(scale_tril))
    within 1e-12 relative (of max(|value|, 1) for log_prob), the rounding of a few dozen
    float64 operations on well-conditioned factors; mode is the most probable component's
    mean; the component and mixture distributions are torch's, holding the parameters."""
    d, (logits, loc, tril) = _full(F64)
    ref = MixtureSameFamily(Categorical(logits=logits), MultivariateNormal(loc, scale_tril=tril))
    assert d.batch_shape == (B,) and d.event_shape == (D,)
    x = torch.cat((d.sample((20,)), d.mean + 5 * d.stddev[None]), 0)
    assert torch.equal(
        d.log_prob(x), mixture.multivariate_normal_mixture_log_prob(x, logits, loc, tril)
    )
    got, want = d.log_prob(x).numpy().ravel(), ref.log_prob(x).numpy().ravel()
    assert_within(got, want, 1e-12 * np.maximum(np.abs(want), 1.0), range(got.size), "log_prob")
    for moment in ("mean", "variance"):
        got, want = getattr(d, moment).numpy().ravel(), getattr(ref, moment).numpy().ravel()
        assert_within(got, want, 1e-12 * np.abs(want), range(got.size), moment)
    assert torch.equal(d.mode, mixture.normal_mixture_mode(logits, loc))
    assert torch.equal(d.component_distribution.scale_tril, tril)
    assert torch.equal(d.mixture_distribution.logits, Categorical(logits=logits).logits)


def test_full_covariance_sample_moments_and_temperature():
    """N = 100000 float64 draws: sample means within 5 SE sqrt(variance / N) of ``mean``
    and sample variances within 5 SE sqrt(2 / N) variance (module docstring); at
    temperature 0 the draw is the mode exactly; a seeded generator reproduces draws."""
    n = 100_000
    torch.manual_seed(2)
    d, _ = _full(F64)
    x = d.sample((n,))
    assert x.shape == (n, B, D)
    se = (d.variance / n).sqrt()
    assert_within(x.mean(0).numpy().ravel(), d.mean.numpy().ravel(), 5 * se.numpy().ravel(),
                  range(B * D), "mean")  # fmt: skip
    var_se = d.variance * math.sqrt(2.0 / n)
    assert_within(x.var(0).numpy().ravel(), d.variance.numpy().ravel(),
                  5 * var_se.numpy().ravel(), range(B * D), "variance")  # fmt: skip
    assert torch.equal(d.sample_with_temperature(0.0, (2,)), d.mode.expand(2, B, D))
    draws = [d.sample_with_temperature(0.5, (4,), torch.Generator().manual_seed(9)) for _ in "ab"]
    assert torch.equal(*draws)
    # temperature tau scales each covariance by tau: one component, variance tau diag(L L^T)
    one = MultivariateNormalMixture(d.logits[:, :1], d.loc[:, :1], d.scale_tril[:, :1])
    cold = one.sample_with_temperature(0.25, (n,))
    var = 0.25 * one.variance
    assert_within(cold.var(0).numpy().ravel(), var.numpy().ravel(),
                  5 * (var * math.sqrt(2.0 / n)).numpy().ravel(), range(B * D), "tau")  # fmt: skip
    # no reparameterised sampler; sample() records no graph
    with pytest.raises(NotImplementedError, match="rsample"):
        d.rsample()
    loc = d.loc.clone().requires_grad_()
    assert not MultivariateNormalMixture(d.logits, loc, d.scale_tril).sample().requires_grad


def test_full_covariance_shapes_and_errors():
    """Broadcasting of (*) and K like the other mixtures; shape errors name the argument."""
    d = MultivariateNormalMixture(
        torch.zeros(5, 1, K), torch.zeros(3, K, D), torch.eye(D).expand(K, D, D)
    )
    assert d.batch_shape == (5, 3) and d.event_shape == (D,)
    assert d.sample((2,)).shape == (2, 5, 3, D)
    assert d.log_prob(torch.zeros(2, 1, 1, D)).shape == (2, 5, 3)
    assert d.expand(torch.Size([4, 5, 3])).log_prob(torch.zeros(D)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match=r"scale_tril must have shape \(\*, K, D, D\)"):
        MultivariateNormalMixture(torch.zeros(K), torch.zeros(K, D), torch.zeros(K, 2, 2))
    with pytest.raises(ValueError, match=r"do not broadcast.*logits"):
        MultivariateNormalMixture(torch.zeros(2), torch.zeros(K, D), torch.eye(D).expand(K, D, D))
    with pytest.raises(ValueError, match="scale_tril"):  # not lower triangular
        MultivariateNormalMixture(
            torch.zeros(1), torch.zeros(1, 2), torch.ones(1, 2, 2), validate_args=True
        )


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_full_covariance_half_precision(dtype):
    """The dtype rule of every probloss distribution: log_prob float32 and equal to the
    float32 computation on the upcast parameters; samples (at temperatures 1, 0.5, 0),
    mean, variance and mode in the parameters' dtype, finite."""
    d, p = _full(dtype)
    upcast = MultivariateNormalMixture(*(t.float() for t in p))
    x = d.sample((3,))
    assert x.dtype == dtype and torch.isfinite(x).all()
    assert d.log_prob(x).dtype == torch.float32
    assert torch.equal(d.log_prob(x), upcast.log_prob(x.float()))
    for t in (0.5, 0.0):
        assert d.sample_with_temperature(t, (2,)).dtype == dtype
    for moment in (d.mean, d.variance, d.mode):
        assert moment.dtype == dtype and torch.isfinite(moment).all()


# ======================================================================================
# Empty batches (issue 10: "cannot reshape tensor of 0 elements")
# ======================================================================================


def _empty(kind, batch):
    z = torch.zeros
    if kind == "normal":
        return NormalMixture(z(*batch, K), z(*batch, K, D), z(*batch, K, D), validate_args=True)
    if kind == "bivariate":
        return BivariateNormalMixture(
            z(*batch, K), z(*batch, K, 2), z(*batch, K, 2), z(*batch, K), validate_args=True
        )
    tril = torch.eye(D).expand(*batch, K, D, D)
    return MultivariateNormalMixture(z(*batch, K), z(*batch, K, D), tril, validate_args=True)


@pytest.mark.parametrize("batch", [(0,), (3, 0), (0, 4)])
@pytest.mark.parametrize("kind", ["normal", "bivariate", "full"])
def test_empty_batch_in_empty_out(kind, batch):
    """A batch with 0 elements, even with validate_args=True (nothing to check): every
    method returns an empty tensor of the documented shape, and log_prob back-propagates."""
    d = _empty(kind, batch)
    event = d.event_shape
    assert d.batch_shape == batch
    value = torch.zeros(*batch, *event, requires_grad=True)
    lp = d.log_prob(value)
    assert lp.shape == batch
    lp.sum().backward()
    assert value.grad.shape == value.shape
    assert d.sample().shape == (*batch, *event)
    assert d.sample((2,)).shape == (2, *batch, *event)
    assert d.sample_with_temperature(0.5, (2,)).shape == (2, *batch, *event)
    assert d.sample_with_temperature(0.0).shape == (*batch, *event)
    for moment in ("mean", "variance", "mode"):
        assert getattr(d, moment).shape == (*batch, *event), moment


@pytest.mark.parametrize("kind", ["normal", "bivariate", "full"])
def test_empty_sample_shape_log_prob_with_validation(kind):
    """A non-empty mixture with validate_args=True evaluates an empty value (sample_shape
    (0,)): nothing to validate, an empty result."""
    d = _empty(kind, (2,))
    x = d.sample((0,))
    assert x.shape == (0, 2, *d.event_shape)
    assert d.log_prob(x).shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_full_covariance_variance_gradient_where_sigma_squared_overflows(dtype):
    """Issue 10 (fuzz): ``MultivariateNormalMixture.variance`` differentiated ``sigma^2``
    through ``log sigma`` (``2 pi sigma^2 = inf`` times ``d log sigma / dL = L / sigma^2``):
    inf or NaN where ``d Var_i / d L_kij = 2 pi_k L_kij`` is finite. Here one component
    (float32; in float64 ``L_00 = 1e160``): ``Var_0 = L_00^2 = 1e60 = inf`` (exact, beyond
    the range), its gradient ``2 L_00 = 2e30`` and ``d Var_1 / d L_11 = 2``; a weight of
    ``e^{-100}`` in a second component scales them by ``pi``. Reference: the closed form
    ``2 pi_k L_kij`` in mpmath (40 digits); bound 16 eps (a few roundings of one product)."""
    from mpmath import mp, mpf

    big = 1e30 if dtype == torch.float32 else 1e160
    L = torch.tensor([[[big, 0.0], [0.0, 1.0]], [[big, 0.0], [3.0, 2.0]]], dtype=dtype)
    L.requires_grad_(True)
    logits = torch.tensor([0.0, -100.0], dtype=dtype)
    var = MultivariateNormalMixture(logits, torch.zeros(2, 2, dtype=dtype), L).variance
    assert float(var[0].detach()) == math.inf
    (grad,) = torch.autograd.grad(var.sum(), L)
    with mp.workdps(40):
        w = [mpf(1), mp.exp(-100)]
        pi = [v / (w[0] + w[1]) for v in w]
        exact = [[[2 * pi[k] * mpf(float(v)) for v in row] for row in comp]
                 for k, comp in enumerate(L.detach().double().tolist())]  # fmt: skip
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny  # a result below the normal range rounds to a subnormal
    for k in range(2):
        for i in range(2):
            for j in range(2):
                x, g = float(exact[k][i][j]), float(grad[k, i, j])
                assert abs(g - x) <= 16 * eps * abs(x) + tiny, (k, i, j, g, x)
