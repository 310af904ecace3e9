"""Tests of ``probloss.distributions.bivariate_normal.BivariateNormal``.

Where the numbers come from
---------------------------
* ``log_prob`` is the functional core (tested against mpmath in
  ``tests/functional/test_bivariate.py``): here it must be *equal* to it.
* Covariance and Cholesky factor: the textbook matrices ``[[s1^2, rho s1 s2],
  [rho s1 s2, s2^2]]`` and ``[[s1, 0], [rho s2, s2 sqrt(1 - rho^2)]]`` in float64 numpy
  (moderate rho), ``torch.linalg.cholesky`` in float64, and ``s2 / math.cosh(a)`` in
  float64 where float32 ``sqrt(1 - tanh(a)^2)`` is 0.
* Entropy: ``scipy.stats.multivariate_normal(mean, cov).entropy()`` in float64 (moderate),
  and the mpmath closed form ``1 + log 2 pi + l1 + l2 + log(1 - tanh(a)^2) / 2`` at 60+
  digits for saturated correlations.
* Sampling: a fixed seed and N = 200000 draws; sample means within 5 standard errors
  ``s_i / sqrt(N)``; sample covariances within 5 standard errors
  ``sqrt((S_ii S_jj + S_ij^2) / N)`` (the variance of a Gaussian sample covariance); the
  pathwise gradient against its closed form for the same noise (re-drawn with the seed);
  float16 draws against ``e exp(log_scale)`` in float64 for the same noise, one float16
  ulp (a single rounding of a float32 computation).

Bounds: covariance / Cholesky / entropy 1e-12 relative (float64; measured <= 4e-16 except
scipy's entropy, 1e-15), saturated Cholesky entry and entropy ``8 eps`` of their size
(float32), pathwise gradients 1e-12 relative (float64).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from mpmath import mp
from torch.distributions import MultivariateNormal

from probloss.distributions.bivariate_normal import BivariateNormal
from probloss.functional.bivariate import bivariate_normal_log_prob
from tests.functional._checks import F32_F64, HALF_DTYPES, assert_within, dtype_id

F64 = torch.float64


def _params(dtype=F64):
    """Four parameter sets (batch (4,)): moderate, rho < 0, rho = 0 exactly, rho near 1."""
    loc = torch.tensor([[0.5, -1.0], [3.0, 2.0], [-7.0, 0.25], [0.0, 10.0]], dtype=dtype)
    log_scale = torch.tensor([[0.0, 0.3], [-1.2, 0.8], [2.0, -0.5], [0.4, 0.1]], dtype=dtype)
    atanh_rho = torch.tensor([0.7, -2.0, 0.0, 3.0], dtype=dtype)
    return loc, log_scale, atanh_rho


def _textbook(loc, log_scale, atanh_rho):
    """Covariance and Cholesky factor from the textbook formulas, float64 numpy."""
    s = np.exp(log_scale.double().numpy())
    r = np.tanh(atanh_rho.double().numpy())
    cov = np.empty((*r.shape, 2, 2))
    cov[..., 0, 0], cov[..., 1, 1] = s[..., 0] ** 2, s[..., 1] ** 2
    cov[..., 0, 1] = cov[..., 1, 0] = r * s[..., 0] * s[..., 1]
    tril = np.zeros_like(cov)
    tril[..., 0, 0] = s[..., 0]
    tril[..., 1, 0] = r * s[..., 1]
    tril[..., 1, 1] = s[..., 1] * np.sqrt(1 - r * r)
    return cov, tril


# ======================================================================================
# log_prob, shapes, construction
# ======================================================================================


def test_log_prob_is_the_functional_core():
    """log_prob equals bivariate_normal_log_prob exactly, for a value of the batch shape
    and for a sample batch (5, 4, 2) broadcast against batch (4,)."""
    d = BivariateNormal(*_params())
    x = d.sample((5,))
    assert torch.equal(d.log_prob(x), bivariate_normal_log_prob(x, *_params()))
    assert d.log_prob(x).shape == (5, 4)
    assert torch.equal(d.log_prob(x[0]), bivariate_normal_log_prob(x[0], *_params()))


def test_batch_and_event_shapes_from_broadcasting():
    """loc (4, 1, 2), log_scale (3, 2), atanh_rho (4, 3) -> batch (4, 3), event (2,)."""
    d = BivariateNormal(torch.zeros(4, 1, 2), torch.zeros(3, 2), torch.zeros(4, 3))
    assert d.batch_shape == (4, 3) and d.event_shape == (2,)
    assert d.sample((7,)).shape == (7, 4, 3, 2)
    assert d.rsample().shape == (4, 3, 2)
    assert d.mean.shape == d.variance.shape == d.stddev.shape == (4, 3, 2)
    assert d.covariance_matrix.shape == d.scale_tril.shape == (4, 3, 2, 2)
    assert d.entropy().shape == (4, 3)
    assert d.log_prob(torch.zeros(2)).shape == (4, 3)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((torch.zeros(3), torch.zeros(2), torch.zeros(())), r"loc must have shape.*\(3,\)"),
        ((torch.zeros(2), torch.zeros(5, 1), torch.zeros(5)), r"log_scale.*\(5, 1\)"),
        (
            (torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(())),
            r"do not broadcast: loc, log_scale must.*got loc \(4, 2\), log_scale \(3, 2\), "
            r"atanh_rho \(\)$",
        ),
        ((torch.zeros(4, 2), torch.zeros(2), torch.zeros(3)), r"atanh_rho \(3,\)"),
    ],
    ids=["loc-event", "log_scale-event", "batch", "atanh_rho-batch"],
)
def test_constructor_shape_errors(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        BivariateNormal(*args)


def test_validate_args():
    """With validate_args=True: NaN or wrong-shaped values and NaN parameters raise
    ValueError naming the argument; with False, NaN propagates."""
    d = BivariateNormal(torch.zeros(2), torch.zeros(2), torch.tensor(0.5), validate_args=True)
    with pytest.raises(ValueError, match=r"value argument \(Tensor of shape \(2,\)\)"):
        d.log_prob(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="value"):
        d.log_prob(torch.zeros(3))
    with pytest.raises(ValueError, match="atanh_rho"):
        BivariateNormal(torch.zeros(2), torch.zeros(2), torch.tensor(math.nan), validate_args=True)
    lax = BivariateNormal(torch.zeros(2), torch.zeros(2), torch.tensor(0.5), validate_args=False)
    assert torch.isnan(lax.log_prob(torch.tensor([0.0, float("nan")])))


def test_constraints_and_repr():
    d = BivariateNormal(torch.zeros(2), torch.zeros(2), torch.tensor(1.5))
    assert d.support.check(torch.tensor([1.0, -2.0])).item()
    assert set(d.arg_constraints) == {"loc", "log_scale", "atanh_rho"}
    assert d.has_rsample
    assert repr(d) == (
        "BivariateNormal(loc: torch.Size([2]), log_scale: torch.Size([2]), atanh_rho: 1.5)"
    )


def test_expand():
    d = BivariateNormal(*_params(), validate_args=True)
    e = d.expand(torch.Size([3, 4]))
    assert isinstance(e, BivariateNormal)
    assert e.batch_shape == (3, 4) and e.event_shape == (2,)
    assert torch.equal(e.mean, d.mean.expand(3, 4, 2))
    assert torch.equal(e.covariance_matrix, d.covariance_matrix.expand(3, 4, 2, 2))
    assert torch.equal(e.entropy(), d.entropy().expand(3, 4))
    x = torch.zeros(3, 4, 2, dtype=F64)
    assert torch.equal(e.log_prob(x), d.log_prob(x))
    assert e.rsample((2,)).shape == (2, 3, 4, 2)
    assert e._validate_args
    with pytest.raises(ValueError):
        e.log_prob(torch.full((3, 4, 2), math.nan, dtype=F64))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision_dtypes(dtype):
    """log_prob and entropy of half parameters are float32 (equal to the float32
    computation on the upcast parameters); moments and samples keep the dtype."""
    params = [t.to(dtype) for t in _params()]
    d = BivariateNormal(*params)
    x = params[0] + 0.5
    assert d.log_prob(x).dtype == torch.float32
    upcast = BivariateNormal(*(t.float() for t in params))
    assert torch.equal(d.log_prob(x), upcast.log_prob(x.float()))
    assert torch.equal(d.entropy(), upcast.entropy())
    assert d.mean.dtype == d.variance.dtype == d.covariance_matrix.dtype == dtype
    s = d.sample((10,))
    assert s.dtype == dtype and s.shape == (10, 4, 2) and torch.isfinite(s).all()


# ======================================================================================
# Moments, covariance, Cholesky factor, entropy
# ======================================================================================


def test_mean_variance_covariance_and_scale_tril_match_textbook():
    """float64 against the textbook matrices (1e-12 relative); L L^T = covariance and L
    equals torch.linalg.cholesky(covariance) (1e-12 relative)."""
    loc, log_scale, a = _params()
    d = BivariateNormal(loc, log_scale, a)
    cov, tril = _textbook(loc, log_scale, a)
    assert torch.equal(d.mean, loc) and torch.equal(d.mode, loc)
    labels = list(range(cov.size))
    got = d.covariance_matrix.numpy().ravel()
    assert_within(got, cov.ravel(), 1e-12 * np.abs(cov.ravel()), labels, "covariance")
    got = d.scale_tril.numpy().ravel()
    assert_within(got, tril.ravel(), 1e-12 * np.abs(tril.ravel()), labels, "scale_tril")
    variance = np.stack((cov[:, 0, 0], cov[:, 1, 1]), -1).ravel()
    assert_within(d.variance.numpy().ravel(), variance, 1e-12 * variance, labels[:8], "var")
    assert_within(d.stddev.numpy().ravel(), np.sqrt(variance), 1e-12, labels[:8], "stddev")
    llt = (d.scale_tril @ d.scale_tril.mT).numpy().ravel()
    assert_within(llt, cov.ravel(), 1e-12 * np.abs(cov.ravel()) + 1e-300, labels, "L L^T")
    chol = torch.linalg.cholesky(d.covariance_matrix).numpy().ravel()
    assert_within(d.scale_tril.numpy().ravel(), chol, 1e-12 * np.abs(chol), labels, "chol")


def test_scale_tril_where_float32_correlation_saturates():
    """float32, atanh_rho in {10, 20, -50}: tanh rounds to +-1, so torch's
    MultivariateNormal rejects the covariance (ValueError, not positive definite) and the
    textbook ``s2 sqrt(1 - rho^2)`` is 0. Our scale_tril[1, 1] = s2 / cosh(a) is positive
    and within 8 eps of ``s2 / math.cosh(a)`` (float64)."""
    a = torch.tensor([10.0, 20.0, -50.0])
    log_scale = torch.tensor([[0.0, 1.5], [-3.0, 0.0], [2.0, -2.0]])
    d = BivariateNormal(torch.zeros(3, 2), log_scale, a)
    assert (d.rho.abs() == 1.0).all()
    with pytest.raises(ValueError, match="PositiveDefinite"):
        MultivariateNormal(d.loc, covariance_matrix=d.covariance_matrix)
    got = d.scale_tril[:, 1, 1].double().numpy()
    expected = np.array(
        [
            math.exp(float(ls)) / math.cosh(float(v))
            for ls, v in zip(log_scale[:, 1], a, strict=True)
        ]
    )
    eps = torch.finfo(torch.float32).eps
    assert_within(got, expected, 8 * eps * expected, a.tolist(), "s2 / cosh(a)")


def test_entropy_matches_scipy():
    """float64 against ``scipy.stats.multivariate_normal(loc, cov).entropy()`` (1e-12
    relative to max(1, |ref|))."""
    loc, log_scale, a = _params()
    cov, _ = _textbook(loc, log_scale, a)
    got = BivariateNormal(loc, log_scale, a).entropy().numpy()
    expected = np.array(
        [scipy.stats.multivariate_normal(loc[i].numpy(), cov[i]).entropy() for i in range(4)]
    )
    bound = 1e-12 * np.maximum(1.0, np.abs(expected))
    assert_within(got, expected, bound, list(range(4)), "entropy vs scipy")


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_entropy_at_saturated_correlation(dtype):
    """atanh_rho up to +-50, log_scale +-20: against the mpmath closed form
    ``1 + log 2 pi + l1 + l2 + log(1 - tanh(a)^2) / 2`` (at ``40 + 2|a|/ln 10`` digits, where
    ``1 - tanh^2`` keeps its digits); bound ``8 eps S`` with ``S`` the sum of the terms'
    magnitudes. Torch's float32 ``log(1 - tanh^2)`` would be ``-inf``."""
    a_values = [0.0, 0.3, -9.1, 20.0, -50.0, 50.0]
    log_scale = torch.tensor(
        [[0.0, 0.0], [-20.0, 20.0], [5.5, -3.0], [-20.0, -20.0], [20.0, 20.0], [1.0, 2.0]],
        dtype=dtype,
    )
    a = torch.tensor(a_values, dtype=dtype)
    got = BivariateNormal(torch.zeros(6, 2, dtype=dtype), log_scale, a).entropy()
    expected, size = [], []
    for (l1, l2), v in zip(log_scale.double().tolist(), a.double().tolist(), strict=True):
        with mp.workdps(40 + int(2 * abs(v) / math.log(10))):
            half_log = mp.log(1 - mp.tanh(mpmath.mpf(v)) ** 2) / 2
            expected.append(float(1 + mp.log(2 * mp.pi) + l1 + l2 + half_log))
            size.append(float(1 + mp.log(2 * mp.pi) + abs(l1) + abs(l2) - half_log))
    eps = torch.finfo(dtype).eps
    bound = 8 * eps * np.array(size)
    assert_within(got.double().numpy(), expected, bound, a_values, f"entropy {dtype}")


# ======================================================================================
# Sampling
# ======================================================================================

_N = 200_000


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_sample_moments_within_five_standard_errors(dtype):
    """Seed 0, N = 200000 draws per parameter set: sample means within 5 ``s_i/sqrt(N)``,
    sample covariances within 5 ``sqrt((S_ii S_jj + S_ij^2)/N)`` of the textbook covariance
    (a wrong sign or size of rho moves S_12 by many of them)."""
    torch.manual_seed(0)
    loc, log_scale, a = _params(dtype)
    x = BivariateNormal(loc, log_scale, a).sample((_N,)).double()
    cov, _ = _textbook(loc, log_scale, a)
    mean = x.mean(0).numpy()
    se = np.sqrt(np.stack((cov[:, 0, 0], cov[:, 1, 1]), -1) / _N)
    labels = list(range(mean.size))
    assert_within(mean.ravel(), loc.double().numpy().ravel(), 5 * se.ravel(), labels, "mean")
    centred = x - x.mean(0)
    sample_cov = (centred.unsqueeze(-1) * centred.unsqueeze(-2)).mean(0).numpy()
    diag = np.stack((cov[:, 0, 0], cov[:, 1, 1]), -1)
    se_cov = np.sqrt((diag[:, :, None] * diag[:, None, :] + cov**2) / _N)
    labels = list(range(sample_cov.size))
    assert_within(sample_cov.ravel(), cov.ravel(), 5 * se_cov.ravel(), labels, "covariance")


def test_residual_off_the_line_has_scale_one_over_cosh():
    """float64, atanh_rho = 5 (1 - rho = 9e-5): ``(z2 - rho z1) cosh(a)`` is standard
    normal: mean within 5/sqrt(N), variance within 5 sqrt(2/N) of 1 (seed 1, N = 200000).
    This is the part of the sample that ``sqrt(1 - rho^2)`` computes from a cancellation."""
    torch.manual_seed(1)
    a = torch.tensor(5.0, dtype=F64)
    d = BivariateNormal(
        torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, -1.0], dtype=F64), a
    )
    z = (d.sample((_N,)) - d.loc) / d.scale
    r = (z[:, 1] - torch.tanh(a) * z[:, 0]) * math.cosh(5.0)
    assert abs(r.mean().item()) <= 5 / math.sqrt(_N)
    assert abs(r.var().item() - 1.0) <= 5 * math.sqrt(2 / _N)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_rsample_pathwise_gradients(dtype):
    """Gradients of ``rsample`` reach loc, log_scale and atanh_rho, finite for
    atanh_rho in {-50, -3, 0, 0.5, 50}; in float64 they equal the closed form for the same
    noise ``e`` (re-drawn with the seed): ``dx_i/dloc_i = 1``, ``dx_i/dlog_scale_i = x_i - mu_i``,
    ``dx2/da = s2 (e1 sech^2 a - e2 tanh a sech a)`` (1e-12 relative + 1e-300)."""
    a_values = [-50.0, -3.0, 0.0, 0.5, 50.0]
    loc = torch.tensor([[0.5, -1.0]] * 5, dtype=dtype, requires_grad=True)
    log_scale = torch.tensor([[0.2, -0.4]] * 5, dtype=dtype, requires_grad=True)
    a = torch.tensor(a_values, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    x = BivariateNormal(loc, log_scale, a).rsample((64,))
    x[..., 1].sum().backward()  # gradients of the second coordinate only
    for t in (loc, log_scale, a):
        assert torch.isfinite(t.grad).all()
    assert (loc.grad[:, 1] == 64).all() and (loc.grad[:, 0] == 0).all()
    assert (a.grad[1:4] != 0).all()
    if dtype != F64:
        return
    torch.manual_seed(3)
    e = torch.randn(64, 5, 2, dtype=F64)
    s2 = math.exp(-0.4)
    av = torch.tensor(a_values, dtype=F64)
    sech = 1 / torch.cosh(av)
    dx2_da = (s2 * (e[..., 0] * sech**2 - e[..., 1] * torch.tanh(av) * sech)).sum(0)
    dx2_dls = (x[..., 1] - loc[:, 1]).detach().sum(0)
    labels = a_values
    bound = 1e-12 * np.abs(dx2_da.numpy()) + 1e-300
    assert_within(a.grad.numpy(), dx2_da.numpy(), bound, labels, "dx2/da")
    bound = 1e-12 * np.abs(dx2_dls.numpy())
    assert_within(log_scale.grad[:, 1].numpy(), dx2_dls.numpy(), bound, labels, "dx2/dls")
    assert (log_scale.grad[:, 0] == 0).all()


def test_samples_on_the_line_at_saturated_correlation():
    """float32 atanh_rho = 20: the sample lies on the correlation line up to s2 / cosh(20)
    (~4e-9 scales, below float32 resolution): standardised coordinates agree to 1e-6."""
    torch.manual_seed(2)
    d = BivariateNormal(torch.zeros(2), torch.tensor([1.0, -1.0]), torch.tensor(20.0))
    z = d.sample((1000,)) / d.scale
    assert torch.isfinite(z).all()
    assert ((z[:, 0] - z[:, 1]).abs() <= 1e-6 * (1 + z[:, 0].abs())).all()


def test_float16_samples_are_computed_in_float32():
    """float16 log_scale = 12: exp(12) = 162755 overflows float16, but draws
    e * exp(12) with |e| < 0.40 are representable. Samples are computed in float32 and
    rounded once (issue 10's one dtype rule), so each is within one float16 ulp of the
    float64 value ``e exp(12)`` (e re-drawn in float32 with the seed; rho = 0), and inf
    only where that value exceeds float16's range."""
    loc = torch.zeros(50, 2, dtype=torch.float16)
    log_scale = torch.full((50, 2), 12.0, dtype=torch.float16)
    d = BivariateNormal(loc, log_scale, torch.zeros(50, dtype=torch.float16))
    torch.manual_seed(4)
    x = d.sample()
    torch.manual_seed(4)
    ref = torch.randn(50, 2).double() * math.exp(12.0)
    assert x.dtype == torch.float16
    small = ref.abs() < 65504
    assert small.any() and (~small).any()  # both regimes are exercised
    ulp = torch.finfo(torch.float16).eps * 2.0 ** torch.floor(torch.log2(ref.abs()))
    assert ((x.double() - ref).abs()[small] <= ulp[small]).all()
    big = ref.abs() > 65520  # rounds to inf in float16
    assert torch.equal(x.double()[big], ref.sign()[big] * math.inf)


def test_empty_batch_in_empty_out():
    """Batch (0,) with validate_args=True (nothing to check; torch's independent
    constraint cannot reshape 0 elements, issue 10): every method returns an empty tensor;
    a non-empty distribution evaluates an empty sample (sample_shape (0,))."""
    d = BivariateNormal(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0), validate_args=True)
    assert d.batch_shape == (0,) and d.event_shape == (2,)
    value = torch.zeros(0, 2, requires_grad=True)
    d.log_prob(value).sum().backward()
    assert d.log_prob(value).shape == (0,) and value.grad.shape == (0, 2)
    assert d.sample((3,)).shape == d.rsample((3,)).shape == (3, 0, 2)
    assert d.entropy().shape == (0,)
    assert d.mean.shape == d.variance.shape == d.mode.shape == (0, 2)
    assert d.covariance_matrix.shape == d.scale_tril.shape == (0, 2, 2)
    full = BivariateNormal(torch.zeros(2), torch.zeros(2), torch.tensor(0.0), validate_args=True)
    assert full.log_prob(full.sample((0,))).shape == (0,)


# ======================================================================================
# Issue 10, second round: covariance entries and correlation gradients beyond the range
# ======================================================================================
#
# Reference: mpmath at 40 digits (``rho s1 s2 = tanh(a) e^{l1 + l2}``, its derivative in
# ``a``, ``sech^2(a) e^{l1 + l2}``, from ``1 / cosh`` directly). Bound: 16 eps of the
# entry (the entry is one rounding of a float64 product ``e^{x}``, ``x`` a sum of
# logarithms exact in float64 for float32 inputs: 1 ulp), except where logarithms of total
# size E cancel in float64 (E eps relative, stated per test). Beyond ``max``: +-inf.


def _mp_entry(x) -> float:
    return float(x) if abs(x) < mpmath.mpf(1e308) else math.copysign(math.inf, x)


@pytest.mark.parametrize(
    ("log_scale", "a", "exact"),
    [
        ((90.0, -10.0), 1.0, lambda: mp.tanh(1) * mp.exp(80)),  # 4.2197e34: s1 s2 = e^80
        ((100.0, -1e10), 0.0, lambda: mpmath.mpf(0)),  # rho = 0 against e^{100 - 1e10}
    ],
)
def test_covariance_off_diagonal_beyond_the_product_of_scales(log_scale, a, exact):
    """Issue 10: ``BivariateNormal(0, [90, -10], 1).covariance_matrix`` had an off-diagonal
    ``inf`` (``s1 = e^90`` overflows float32, ``rho s1 s2 = 4.2197e34`` does not), and
    ``[100, -1e10]``, ``a = 0`` gave NaN (``0 * inf``): exact 0. The diagonal is
    ``e^{2 l}``: inf at ``l = 90, 100``, ``e^{-20}``, and 0 at ``l = -1e10``."""
    cov = BivariateNormal(torch.zeros(2), torch.tensor(log_scale), torch.tensor(a))
    cov = cov.covariance_matrix.double()
    with mp.workdps(40):
        off = _mp_entry(exact())
        diag = [_mp_entry(mp.exp(2 * mpmath.mpf(v))) for v in log_scale]
    eps = torch.finfo(torch.float32).eps
    assert cov[0, 1] == cov[1, 0]
    assert abs(float(cov[0, 1]) - off) <= 16 * eps * abs(off)
    for i in range(2):
        want = math.inf if diag[i] > 3.5e38 else diag[i]  # beyond float32's max: inf
        got = float(cov[i, i])
        assert got == want or abs(got - want) <= 16 * eps * want, (i, got, want)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_covariance_correlation_gradient_where_the_entry_overflows(dtype):
    """``a = l1 = l2 = 60`` (float32; 400 in float64): ``rho s1 s2 = e^{120}`` overflows,
    but d/da = sech^2(a) e^{120} is about 4 (both off-diagonal entries: 8); through
    ``tanh``'s backward it was ``inf * 0 = NaN``. float64: the logarithms 800 and
    ``2 log cosh 400`` cancel (E = 1600)."""
    big = 60.0 if dtype == torch.float32 else 400.0
    a = torch.tensor(big, dtype=dtype, requires_grad=True)
    log_scale = torch.full((2,), big, dtype=dtype)
    cov = BivariateNormal(torch.zeros(2, dtype=dtype), log_scale, a).covariance_matrix
    (grad,) = torch.autograd.grad(cov.sum(), a)
    with mp.workdps(40):
        exact = float(2 * mp.exp(2 * mpmath.mpf(big)) / mp.cosh(big) ** 2)
    eps = torch.finfo(dtype).eps
    e = 0.0 if dtype == torch.float32 else 4 * big
    assert abs(float(grad) - exact) <= (16 + e) * eps * exact, (float(grad), exact)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_rsample_correlation_gradient_where_the_scale_overflows(dtype):
    """``rsample`` at ``log_scale = (0, 100)`` (1e10 in float64), ``a = 60``: d x2 / d a
    = s2 sech(a) (sech(a) e1 - tanh(a) e2) (about -2 e^{40} e2 in float32, +-inf in
    float64), never NaN (``e^{100} * (1 - tanh^2) = inf * 0``). One draw per seed; the
    noise re-drawn with the seed; mpmath reference, bound 16 eps of the magnitudes."""
    big = 100.0 if dtype == torch.float32 else 1e10
    for seed in range(8):
        a = torch.tensor(60.0, dtype=dtype, requires_grad=True)
        d = BivariateNormal(torch.zeros(2, dtype=dtype), torch.tensor([0.0, big], dtype=dtype), a)
        torch.manual_seed(seed)
        x = d.rsample()
        (grad,) = torch.autograd.grad(x[1], a)
        torch.manual_seed(seed)
        e1, e2 = torch.randn(2, dtype=dtype).double().tolist()
        with mp.workdps(40):
            sech = 1 / mp.cosh(60)
            scale = mp.exp(mpmath.mpf(big)) * sech
            exact = scale * (sech * e1 - mp.tanh(60) * e2)
            size = abs(scale) * (abs(sech * e1) + abs(e2))
        g = float(grad)
        assert not math.isnan(g), seed
        if abs(exact) > mpmath.mpf(torch.finfo(dtype).max) * 1.01:
            assert g == math.copysign(math.inf, exact), (seed, g)
        else:
            assert abs(g - float(exact)) <= 16 * torch.finfo(dtype).eps * float(size), seed


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_entropy_when_terms_near_the_float_range_cancel(dtype):
    """Found by the fuzz suite (float32): ``log s1 = a = 3.4e38`` cancel in ``l1 + l2 -
    log cosh a``, but ``l1 + l2`` overflowed first, giving ``inf`` for an entropy of
    ``2.27e32`` (and of ``4.98e37``); float64 likewise at ``1.8e308``. Against mpmath
    ``1 + log 2 pi + l1 + l2 - log cosh a`` (at enough digits for ``log cosh`` of ``a``),
    bound ``4 eps64 S`` with ``S = 3 + |l1| + |l2| + log cosh a`` (three float64 additions of
    halves, each within ``eps64 S / 4``, and ``log cosh``'s own rounding), plus the final
    rounding to the output dtype, ``eps / 2`` of the value. Where the sum of the terms
    itself exceeds the range (``l1 = l2 = -1.7e308``) the entropy is ``-inf``."""
    big = torch.finfo(dtype).max
    if dtype == torch.float32:
        rows = [(3.4028234663852886e38, 2.2676668813725985e32, 3.4028234663852886e38),
                (3.3895313892515355e38, 5.116484760858058e37, 3.4028234663852886e38),
                (-3.4028234663852886e38, 3.4028234663852886e38, 2.5)]  # fmt: skip
    else:
        rows = [(big, 1e300, big), (1e300, big, -big), (-big, big, 2.5)]
    log_scale = torch.tensor([r[:2] for r in rows], dtype=dtype)
    a = torch.tensor([r[2] for r in rows], dtype=dtype)
    got = BivariateNormal(torch.zeros(len(rows), 2, dtype=dtype), log_scale, a).entropy()
    assert got.dtype == dtype
    eps64, eps = torch.finfo(torch.float64).eps, torch.finfo(dtype).eps
    for (l1, l2), v, x in zip(
        log_scale.double().tolist(), a.double().tolist(), got.double().tolist(), strict=True
    ):
        with mp.workdps(60 + int(math.log10(1 + abs(v)))):  # cosh of 1e308: digits of a
            lc = mp.log(mp.cosh(mpmath.mpf(v)))
            exact = 1 + mp.log(2 * mp.pi) + l1 + l2 - lc
            size = 3 + abs(l1) + abs(l2) + lc
            bound = float(4 * eps64 * size + eps / 2 * abs(exact))
            assert math.isfinite(x) and abs(x - float(exact)) <= bound, (l1, l2, v, x, exact)
    neg = BivariateNormal(torch.zeros(2, dtype=dtype), torch.full((2,), -big, dtype=dtype),
                          torch.tensor(0.0, dtype=dtype)).entropy()  # fmt: skip
    assert neg == -math.inf
