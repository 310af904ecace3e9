"""Tests of the mixture summaries (``probloss.functional.mixture.moments``): closed forms,
zero and underflowing weights, results near the float range. The closed forms these are
compared with, and their bounds, are described in ``_moment_oracles.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probloss.functional import mixture
from tests.functional._checks import HALF_DTYPES, assert_within, dtype_id
from tests.functional.mixture._moment_oracles import (
    INF,
    _gen,
    _np_cov,
    _np_moments,
    _np_weights,
    _random_params,
)


def test_summaries_match_closed_forms_float64():
    """Batch of 64 random mixtures (K = 5, D = 2) in float64: mean, variance, covariance
    (numpy raw-moment form) within 1e-12 of the largest raw second moment; variance equals
    the covariance diagonal within 1e-15 relative; modes exactly loc[argmax]."""
    logits, loc, log_scale, a = (t.double() for t in _random_params(31))
    w = _np_weights(logits.numpy())
    cov_k = _np_cov(log_scale.numpy(), a.numpy())
    mean_ref, cov_ref = _np_moments(w, loc.numpy(), cov_k)
    scale = np.einsum("bk,bkd->b", w, loc.numpy() ** 2 + np.exp(2 * log_scale.numpy()))
    labels = range(cov_ref.size)
    bound = 1e-12 * np.broadcast_to(scale[:, None], mean_ref.shape)
    got = mixture.normal_mixture_mean(logits, loc).numpy()
    assert_within(got, mean_ref, bound, labels, "mean")
    assert np.array_equal(mixture.bivariate_normal_mixture_mean(logits, loc).numpy(), got)
    var = mixture.normal_mixture_variance(logits, loc, log_scale).numpy()
    assert_within(var, np.diagonal(cov_ref, axis1=-2, axis2=-1), bound, labels, "variance")
    cov = mixture.bivariate_normal_mixture_covariance(logits, loc, log_scale, a).numpy()
    bound = 1e-12 * np.broadcast_to(scale[:, None, None], cov_ref.shape)
    assert_within(cov.ravel(), cov_ref.ravel(), bound.ravel(), labels, "covariance")
    assert_within(np.diagonal(cov, axis1=-2, axis2=-1), var, 1e-15 * var, labels, "diag")


def test_variance_without_cancellation_float32():
    """Two unit-weight components at 1e4 -+ 0.01 with scale 1e-3, float32: the variance is
    ((hi - lo) / 2)^2 + sigma^2 (by hand, float64, at the float32 inputs: 9.6e-5);
    E[x^2] - m^2 in float32 is dominated by the rounding of 1e8 (ulp 8) and is off by at
    least half its value. Ours within 2e-6 relative."""
    logits = torch.zeros(2)
    loc = torch.tensor([[1e4 - 0.01], [1e4 + 0.01]])
    log_scale = torch.full((2, 1), math.log(1e-3))
    lo, hi = (float(v) for v in loc.double().ravel())  # the float32 inputs, exactly
    expected = ((hi - lo) / 2) ** 2 + math.exp(2 * float(log_scale[0, 0]))
    got = mixture.normal_mixture_variance(logits, loc, log_scale).item()
    naive = (
        (torch.softmax(logits, -1)[:, None] * (loc**2 + torch.exp(2 * log_scale))).sum(0)
        - mixture.normal_mixture_mean(logits, loc) ** 2
    ).item()
    assert abs(naive - expected) >= 0.5 * expected  # what the test guards against
    assert abs(got - expected) <= 2e-6 * expected


def test_summaries_at_extreme_logits():
    """logits (1e4, -1e4, 0) float32: the weights are (1, 0, 0) to rounding, so the mean and
    mode are loc[0] exactly and the variance is sigma_0^2 within 1e-6 relative; finite."""
    logits = torch.tensor([1e4, -1e4, 0.0])
    loc = torch.tensor([[1.0, -2.0], [1e3, 1e3], [-5.0, 5.0]])
    log_scale = torch.tensor([[0.5, -0.5], [3.0, 3.0], [0.0, 0.0]])
    assert torch.equal(mixture.normal_mixture_mean(logits, loc), loc[0])
    assert torch.equal(mixture.normal_mixture_mode(logits, loc), loc[0])
    var = mixture.normal_mixture_variance(logits, loc, log_scale)
    assert torch.allclose(var, torch.exp(2 * log_scale[0]), rtol=1e-6, atol=0)
    x = mixture.normal_mixture_sample(
        logits, loc, log_scale, sample_shape=(1000,), generator=_gen(5)
    )
    assert torch.isfinite(x).all() and (x[:, 0] < 1 + 10 * math.exp(0.5)).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision_keeps_the_parameter_dtype(dtype):
    """Half parameters: samples and summaries are returned in the half dtype, finite;
    summaries equal the float32 computation rounded once; tau = 0 returns loc exactly."""
    logits, loc, log_scale, a = (t.to(dtype) for t in _random_params(32))
    f32 = [t.float() for t in (logits, loc, log_scale, a)]
    x = mixture.normal_mixture_sample(logits, loc, log_scale, sample_shape=(4,), generator=_gen(6))
    y = mixture.bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(6))
    assert x.dtype == y.dtype == dtype and x.shape == (4, 64, 2) and torch.isfinite(x).all()
    assert torch.isfinite(y).all()
    assert torch.equal(
        mixture.normal_mixture_mean(logits, loc), mixture.normal_mixture_mean(*f32[:2]).to(dtype)
    )
    assert torch.equal(
        mixture.normal_mixture_variance(logits, loc, log_scale),
        mixture.normal_mixture_variance(*f32[:3]).to(dtype),
    )
    assert torch.equal(
        mixture.bivariate_normal_mixture_covariance(logits, loc, log_scale, a),
        mixture.bivariate_normal_mixture_covariance(*f32).to(dtype),
    )
    zero = mixture.normal_mixture_sample(logits, loc, log_scale, temperature=0)
    assert torch.equal(zero, loc[torch.arange(64), logits.float().argmax(-1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_zero_weight_component_with_overflowing_terms_contributes_nothing(dtype):
    """Issue 10: ``normal_mixture_variance([0, -inf], [[0], [3]], [[0], [50]])`` was NaN
    (``0 * exp(100) = 0 * inf``); exact 1. A zero weight times anything, finite or infinite
    (a ``sigma^2`` or ``mu^2`` beyond the range, ``inf`` parameters), contributes exactly 0
    to mean, variance and covariance: the results equal those of the live component alone
    (closed form: its mean, ``sigma^2``, ``rho s1 s2``), exactly; every gradient is finite
    and the zero-weight component's are 0."""
    big_log_scale = 50.0 if dtype == torch.float32 else 400.0  # sigma^2 overflows
    big_loc = 1e20 if dtype == torch.float32 else 1e160  # (mu - m)^2 overflows
    logits = torch.tensor([[0.0, -INF]] * 4, dtype=dtype)
    loc = torch.tensor(
        [[[0.0, 1.0], [3.0, 3.0]], [[0.5, 2.0], [big_loc, -big_loc]], [[0.0, 0.0], [INF, -INF]],
         [[1.0, -1.0], [0.0, 0.0]]], dtype=dtype,
    )  # fmt: skip
    log_scale = torch.tensor(
        [[[0.0, 0.5], [big_log_scale, 0.0]], [[0.0, 0.0], [0.0, 0.0]],
         [[0.25, 0.0], [INF, INF]], [[0.0, 0.0], [big_log_scale, big_log_scale]]], dtype=dtype,
    )  # fmt: skip
    a = torch.tensor([[0.5, 0.3]] * 4, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (logits, loc, log_scale, a)]
    mean = mixture.normal_mixture_mean(*leaves[:2])
    var = mixture.normal_mixture_variance(*leaves[:3])
    cov = mixture.bivariate_normal_mixture_covariance(*leaves)
    assert torch.equal(mean, loc[:, 0])
    assert torch.equal(mixture.bivariate_normal_mixture_mean(*leaves[:2]), loc[:, 0])
    assert torch.equal(var, torch.exp(2 * log_scale[:, 0]))
    assert torch.equal(torch.diagonal(cov, dim1=-2, dim2=-1), var)
    cross = torch.tanh(a[:, 0]) * torch.exp(log_scale[:, 0].sum(-1))
    assert torch.equal(cov[:, 0, 1], cross) and torch.equal(cov[:, 1, 0], cross)
    (mean.sum() + var.sum() + cov.sum()).backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad[:, 1] == 0).all()


def _np_summaries(logits, loc, log_scale):
    """float64 numpy: weights ``softmax``, mean, per-dimension variance, and the bounds'
    magnitudes ``sum_k pi_k |mu_k| (K + 4 + |l_k - max l|)`` (mean) and
    ``sum_k pi_k (sigma^2 (K + 4 + |l_k - max l| + 2|log sigma|) + (|mu| + |m|)^2 (K + 4 +
    |l_k - max l|))`` (variance)."""
    logits, loc, log_scale = (np.asarray(t, dtype=np.float64) for t in (logits, loc, log_scale))
    k = logits.shape[-1]
    shift = logits - logits.max(-1, keepdims=True)
    w = np.exp(shift)
    w = w / w.sum(-1, keepdims=True)
    mean = np.einsum("...k,...kd->...d", w, loc)
    var2 = np.exp(2 * log_scale)
    dev = (loc - mean[..., None, :]) ** 2
    var = np.einsum("...k,...kd->...d", w, var2 + dev)
    cond = (k + 4 + np.abs(shift))[..., None]
    s_mean = np.einsum("...k,...kd->...d", w, np.abs(loc) * cond)
    spread = (np.abs(loc) + np.abs(mean)[..., None, :]) ** 2
    s_var = np.einsum("...k,...kd->...d", w, var2 * (cond + 2 * np.abs(log_scale)) + spread * cond)
    return mean, var, s_mean, s_var


def test_weights_below_the_float_range_still_count_float32():
    """Issue 10: float32 ``normal_mixture_mean`` dropped a component whose weight underflows
    (``e^{-110}`` is 0 in float32, yet ``e^{-110} 1e38 = 1.7e-10`` is the whole mean when the
    other component sits at 0), and a weight of ``e^{-100}`` (subnormal) kept one digit.
    Likewise the variance: ``pi sigma^2`` with ``sigma^2 = e^{120}`` beyond the range but
    ``pi sigma^2 = e^{20}``, and ``pi (mu - m)^2`` with ``(mu - m)^2 = 1e60``. Against float64
    numpy, within ``4 eps`` times the stated magnitudes (:func:`_np_summaries`): each term
    carries the rounding of its exponent ``l_k - max l`` (relative ``eps |l_k - max l|``),
    of ``mul_exp`` and the sum and division (a few eps each, ``K + 4`` in all), and the
    variance also that of ``2 log sigma`` and of the deviation ``mu - m``; plus, for results
    in the subnormal range (``e^{-100}`` times 1), an absolute ``4 K`` subnormal spacings
    (``2^{-149}``: each of the ``K`` products, the sum and the division round to it)."""
    logits = torch.tensor(
        [[0.0, -110.0], [0.0, -100.0], [-100.0, 0.0], [0.0, -100.0], [0.0, -100.0], [0.0, -90.0]]
    )
    loc = torch.tensor(
        [[[0.0, 1.0], [1e38, -1e38]], [[0.0, 0.0], [1e38, 3e38]], [[1e38, -2e38], [0.0, 1.0]],
         [[0.0, 0.0], [1.0, -1.0]], [[0.0, 0.0], [1e30, -1e30]], [[1.0, 1.0], [-3e38, 3e38]]],
    )  # fmt: skip
    log_scale = torch.zeros(6, 2, 2)
    log_scale[3, 1] = 60.0
    eps = torch.finfo(torch.float32).eps
    mean_ref, var_ref, s_mean, s_var = _np_summaries(logits, loc, log_scale)
    subnormal = 4 * 2 * 2.0**-149  # 4 K spacings, K = 2
    s_mean, s_var = s_mean + subnormal / (4 * eps), s_var + subnormal / (4 * eps)
    labels = list(np.ndindex(6, 2))
    for fn in (mixture.normal_mixture_mean, mixture.bivariate_normal_mixture_mean):
        got = fn(logits, loc).double().numpy()
        assert_within(got.ravel(), mean_ref.ravel(), 4 * eps * s_mean.ravel(), labels, "mean")
    got = mixture.normal_mixture_variance(logits, loc, log_scale).double().numpy()
    assert_within(got.ravel(), var_ref.ravel(), 4 * eps * s_var.ravel(), labels, "variance")
    cov = mixture.bivariate_normal_mixture_covariance(logits, loc, log_scale, torch.zeros(6, 2))
    diag = torch.diagonal(cov, dim1=-2, dim2=-1).double().numpy()
    assert_within(diag.ravel(), var_ref.ravel(), 4 * eps * s_var.ravel(), labels, "cov diag")


def test_summaries_overflow_only_where_the_result_does():
    """float32: the mean of components at ``-3.4e38`` with weights ``(1, e^{-3}) / total``
    is ``-3.4e38`` (each term ``pi_k mu_k`` at most ``|mu_k|``; an unnormalised sum
    ``sum e^{l_k - max l} mu_k`` would overflow first), within 4 eps (the rounding of
    ``mul_exp``, the division and the sum); a zero correlation times ``s1 s2 = e^{100}``
    beyond the range is an off-diagonal covariance of exactly 0 (was ``0 * inf = NaN``),
    while ``sigma_2^2 = e^{200}`` is ``inf`` (the true, unrepresentable value)."""
    big = -3.4e38
    logits = torch.tensor([0.0, -3.0])
    loc = torch.full((2, 2), big)
    mean = mixture.normal_mixture_mean(logits, loc)
    assert torch.isfinite(mean).all()
    assert ((mean.double() - float(torch.tensor(big))).abs() <= 4 * 2**-23 * 3.4e38).all()
    cov = mixture.bivariate_normal_mixture_covariance(
        torch.zeros(1), torch.zeros(1, 2), torch.tensor([[0.0, 100.0]]), torch.zeros(1)
    )
    assert cov[0, 1] == 0 and cov[1, 0] == 0 and cov[0, 0] == 1 and cov[1, 1] == INF


def test_mean_gradient_near_the_float_range():
    """Found by the fuzz suite (float32): with means near ``3.4e38`` the gradient of the
    mean's sum with respect to the logits, ``pi_k sum_d (mu_kd - m_d)``, was NaN (``inf -
    inf`` of two sums of the size of ``|mu|``); now within ``8 eps (1 + |l_k - max l|)``
    times ``pi_k sum_d (|mu_kd - m_d| + sum_j pi_j |mu_jd - m_d|)`` (the rounding of each
    deviation term and of the weights' exponents) of float64 numpy, and the means
    themselves (``+-3.4e38`` at weights ``(1, e^{-23})``) within 4 eps relative."""
    rows = [
        ([-3.6145414439303636e-10, -INF, 12199763378176.0],
         [[-1.4766385939966326e-23, 44.88346862792969], [-4.745127688691425e-34,
          -3.4525551795959473], [6.899222618308345e36, 3.3895313892515355e38]]),
        ([5.545177459716797, -3.1163000782305494e-13, 17.63553237915039],
         [[-6.726399405032349e-29, 3.4373390674591064], [-6.545177459716797, 428045696.0],
          [3.4028234663852886e38, 3.4028234663852886e38]]),
        ([0.0, -23.0, -INF], [[3.4e38, 1.0], [-3.4e38, -1.0], [0.0, 0.0]]),
        # the shift sum_k pi_k mu_k overflowed to -inf (mean -3.4028232e38): inf gradients
        ([16.63553237915039, -0.07074522227048874, 3.1191623210906982],
         [[-3.4028234663852886e38, 6.103515625e-05], [0.22411347925662994,
          9.081182633006527e-37], [-3.4028234663852886e38, -2.90334902081348e-29]]),
        ([-0.684262216091156, 17.63553237915039, 1.0],
         [[1.2569638663251226e-08, -5.545177459716797], [3.4028234663852886e38,
          -0.07224657386541367], [3.4028234663852886e38, 0.0453282967209816]]),
    ]  # fmt: skip
    eps = torch.finfo(torch.float32).eps
    for logits, loc in rows:
        lg = torch.tensor(logits, requires_grad=True)
        mu = torch.tensor(loc, requires_grad=True)
        mean = mixture.normal_mixture_mean(lg, mu)
        mean.sum().backward()
        shift = lg.detach().double().numpy() - lg.detach().double().numpy().max()
        w = np.exp(shift) / np.exp(shift).sum()
        mu64 = mu.detach().double().numpy()
        m = w @ mu64
        dev = np.abs(mu64 - m)
        expected = w * (mu64 - m).sum(-1)
        size = (1 + np.abs(np.where(w > 0, shift, 0.0))) * w  # a zero weight: bound 0
        bound = 8 * eps * size * (dev.sum(-1) + (w @ dev).sum())
        assert_within(lg.grad.double().numpy(), expected, bound, range(3), "d/dlogits")
        assert_within(mean.detach().double().numpy(), m, 4 * eps * np.abs(m), range(2), "mean")


def test_mean_within_an_ulp_of_the_float_range_float64():
    """As :func:`test_mean_gradient_near_the_float_range` in float64 (the fuzz rows' float32
    failure, at float64's maximum): ``m = -max (1 - pi_2)`` with ``pi_2 = 1e-16`` is within
    an ulp of ``-max``, and the graph-free shift ``sum_k pi_k mu_k`` rounded to ``-inf``
    (mean ``-inf``, logit gradients ``inf``; now summed as halves). Against mpmath (60
    digits): the mean within ``4 eps |m|`` and ``d m / d l_k = pi_k (mu_k - m)`` within
    ``8 eps (1 + |l_k - max l|) pi_k (|mu_k - m| + sum_j pi_j |mu_j - m|)``, the bound of
    the float32 test."""
    from mpmath import mp

    big = torch.finfo(torch.float64).max
    eps = torch.finfo(torch.float64).eps
    for logits in ([36.834171295166016, 0.0, 7.0], [37.01005172729492, 0.0, 3.1]):
        lg = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        mu = torch.tensor([[-big], [1.0], [-big]], dtype=torch.float64, requires_grad=True)
        mean = mixture.normal_mixture_mean(lg, mu)
        mean.sum().backward()
        with mp.workdps(60):
            top = max(logits)
            e = [mp.exp(mp.mpf(v) - top) for v in logits]
            w = [x / mp.fsum(e) for x in e]
            mus = [mp.mpf(v) for v in (-big, 1.0, -big)]
            m = mp.fsum(p * v for p, v in zip(w, mus, strict=True))
            spread = mp.fsum(p * abs(v - m) for p, v in zip(w, mus, strict=True))
            assert abs(mean.item() - m) <= 4 * eps * abs(m), (logits, mean.item(), m)
            for k in range(3):
                exact = w[k] * (mus[k] - m)
                size = (1 + abs(logits[k] - top)) * w[k] * (abs(mus[k] - m) + spread)
                got = lg.grad[k].item()
                assert abs(got - exact) <= 8 * eps * size, (logits, k, got, exact)


def test_variance_with_a_deviation_beyond_the_float_range_at_zero_weight():
    """Found by the fuzz suite (float32): a component of weight ``e^{-929976}`` (0) at
    ``+3.4e38`` while the mean is ``-3.4e38``: ``mu - m`` overflows, and the variance was
    ``inf``; its term is 0, so the variance is the heavy component's ``sigma^2 =
    e^{-4.4e-16} = 1`` (float64 by hand), within 4 eps. Both variance and covariance."""
    logits = torch.tensor([[-1.0969745762354691e-21, 929976.0625, -0.02514667436480522]])
    loc = torch.tensor([[[-8.8e-20, 0.0], [-3.3895313892515355e38, 0.0],
                         [3.3895313892515355e38, 0.0]]])  # fmt: skip
    log_scale = torch.tensor([[[0.0, 0.0], [-2.220446049250313e-16, 0.0], [-576.8, 0.0]]])
    expected = math.exp(2 * float(log_scale[0, 1, 0]))
    eps = torch.finfo(torch.float32).eps
    var = mixture.normal_mixture_variance(logits, loc, log_scale)
    cov = mixture.bivariate_normal_mixture_covariance(logits, loc, log_scale, torch.zeros(1, 3))
    for got in (var[0, 0], cov[0, 0, 0]):
        assert abs(got.item() - expected) <= 4 * eps * expected
