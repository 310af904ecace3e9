"""Statistics of mixture draws at a temperature: component frequencies, means and
(co)variances within 5 standard errors. Where the numbers come from, and why 5 standard
errors: the module docstring of ``_moment_oracles.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probloss.functional import mixture
from tests.functional._checks import assert_within
from tests.functional.mixture._moment_oracles import (
    SIGMAS,
    _gen,
    _nearest,
    _np_cov,
    _np_moments,
    _np_weights,
)


def _np_fourth(weights, loc, cov) -> np.ndarray:
    """``E[A_i^2 A_j^2]`` with ``A = x - E[x]`` for the mixture (module docstring)."""
    mean, _ = _np_moments(weights, loc, cov)
    d = np.asarray(loc, dtype=np.float64) - mean[..., None, :]  # (K, D)
    dd = d[:, :, None] * d[:, None, :]
    var = np.diagonal(cov, axis1=-2, axis2=-1)  # (K, D)
    terms = (
        dd**2
        + d[:, :, None] ** 2 * var[:, None, :]
        + d[:, None, :] ** 2 * var[:, :, None]
        + 4 * dd * cov
        + var[:, :, None] * var[:, None, :]
        + 2 * cov**2
    )
    return np.einsum("k,kij->ij", weights, terms)


def _check_components(x, centers, weights, cov, what) -> float:
    """Frequencies, per-component means and covariances within 5 SE; the worst ratio."""
    x = x.reshape(-1, x.shape[-1])
    n_total = x.shape[0]
    k_of = _nearest(x, centers)
    worst = 0.0
    freq = np.bincount(k_of, minlength=len(weights)) / n_total
    se = np.sqrt(weights * (1 - weights) / n_total)
    labels = [f"{what} k={k}" for k in range(len(weights))]
    worst = max(worst, assert_within(freq, weights, SIGMAS * se, labels, f"{what} frequency"))
    for k in range(len(weights)):
        xk = x[k_of == k]
        n = len(xk)
        s = cov[k]
        mean_se = np.sqrt(np.diagonal(s) / n)
        worst = max(
            worst,
            assert_within(
                xk.mean(0), centers[k], SIGMAS * mean_se, range(len(mean_se)), f"{what} k={k} mean"
            ),
        )
        sample_cov = np.cov(xk, rowvar=False).reshape(s.shape)
        cov_se = np.sqrt((np.outer(np.diagonal(s), np.diagonal(s)) + s**2) / n)
        worst = max(
            worst,
            assert_within(
                sample_cov.ravel(),
                s.ravel(),
                SIGMAS * cov_se.ravel(),
                range(s.size),
                f"{what} k={k} covariance",
            ),
        )
    return worst


# Four components 50+ scales apart (largest scale e^0.5 = 1.65, smallest gap 50 in x1).
NORMAL_LOGITS = [0.3, -1.0, 1.2, 0.0]


NORMAL_LOC = [[0.0, 5.0], [50.0, -5.0], [100.0, 0.0], [150.0, 10.0]]


NORMAL_LOG_SCALE = [[0.0, -0.5], [0.5, 0.2], [-0.3, 0.1], [0.4, -1.0]]


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.25, 2.0])
def test_normal_frequencies_means_variances_at_temperature(tau):
    """N = 200000 draws at temperature tau: component frequencies match
    softmax(logits / tau) (numpy) within 5 binomial SE, per-component means and
    covariances (diagonal, variances sigma^2 tau, zero covariance) within 5 SE. For tau != 1
    the tempered weights and the variances of the most frequent component differ from the
    untempered ones by more than 20 SE, so ignoring the temperature fails the test.
    Measured worst |error| / SE, seed 10: 2.26 (tau 1), 3.20 (0.5), 2.50 (0.25), 2.98 (2)."""
    n = 200_000
    logits, loc = torch.tensor(NORMAL_LOGITS), torch.tensor(NORMAL_LOC)
    log_scale = torch.tensor(NORMAL_LOG_SCALE)
    x = mixture.normal_mixture_sample(
        logits, loc, log_scale, temperature=tau, sample_shape=(n,), generator=_gen(10)
    )
    assert x.shape == (n, 2) and x.dtype == torch.float32
    weights = _np_weights(NORMAL_LOGITS, tau)
    cov = _np_cov(np.asarray(NORMAL_LOG_SCALE) + 0.5 * math.log(tau))
    worst = _check_components(x.double().numpy(), np.asarray(NORMAL_LOC), weights, cov, "normal")
    print(f"tau={tau}: worst |err|/SE = {worst * SIGMAS:.2f}")
    if tau != 1.0:  # the test discriminates: untempered weights / variances are far off
        p1 = _np_weights(NORMAL_LOGITS)
        assert np.max(np.abs(p1 - weights) / np.sqrt(weights * (1 - weights) / n)) > 20
        assert abs(tau - 1.0) / math.sqrt(2.0 / (n * weights.max())) > 20


def test_normal_overall_mean_and_variance_match_the_summaries():
    """Overlapping mixture (K = 3, D = 2), N = 400000: the sample mean and the sample
    variance per dimension agree with normal_mixture_mean / normal_mixture_variance within
    5 SE (mean: sqrt(Var / N); variance: sqrt((E[A^4] - Var^2) / N) from the mixture's
    fourth central moment); the summaries themselves equal the numpy closed form within
    1e-6 relative (float32). Measured |error| / SE: mean 1.17, variance 0.61."""
    n = 400_000
    logits = torch.tensor([0.5, -0.2, 0.1])
    loc = torch.tensor([[-1.0, 2.0], [1.5, 0.0], [0.0, -3.0]])
    log_scale = torch.tensor([[0.0, -0.3], [-0.5, 0.4], [0.3, 0.0]])
    x = mixture.normal_mixture_sample(logits, loc, log_scale, sample_shape=(n,), generator=_gen(11))
    w = _np_weights(logits.numpy())
    cov = _np_cov(log_scale.numpy())
    mean_ref, cov_ref = _np_moments(w, loc.numpy(), cov)
    var_ref = np.diagonal(cov_ref)
    fourth = np.diagonal(_np_fourth(w, loc.numpy(), cov))
    mean = mixture.normal_mixture_mean(logits, loc).double().numpy()
    var = mixture.normal_mixture_variance(logits, loc, log_scale).double().numpy()
    assert_within(mean, mean_ref, 1e-6 * np.abs(mean_ref).max(), range(2), "mean closed form")
    assert_within(var, var_ref, 1e-6 * var_ref, range(2), "variance closed form")
    xs = x.double().numpy()
    r1 = assert_within(xs.mean(0), mean, SIGMAS * np.sqrt(var_ref / n), range(2), "MC mean")
    se = np.sqrt((fourth - var_ref**2) / n)
    r2 = assert_within(xs.var(0), var, SIGMAS * se, range(2), "MC variance")
    print(f"worst |err|/SE: mean {r1 * SIGMAS:.2f}, variance {r2 * SIGMAS:.2f}")


BIV_LOGITS = [0.2, -0.5, 0.8]


BIV_LOC = [[0.0, 0.0], [60.0, 20.0], [120.0, -20.0]]


BIV_LOG_SCALE = [[0.0, 0.5], [-0.2, 0.3], [0.4, -0.4]]


BIV_ATANH_RHO = [0.8, -1.5, 0.0]


@pytest.mark.parametrize("tau", [1.0, 0.4])
def test_bivariate_frequencies_means_covariances_at_temperature(tau):
    """N = 200000 draws: frequencies match softmax(logits / tau) within 5 binomial SE;
    per-component means and full 2x2 covariances ``tau Sigma_k`` (rho = tanh a unchanged
    by the temperature) within 5 SE. Measured worst |error| / SE, seed 20: 1.61 (tau 1),
    1.66 (tau 0.4)."""
    n = 200_000
    x = mixture.bivariate_normal_mixture_sample(
        torch.tensor(BIV_LOGITS),
        torch.tensor(BIV_LOC),
        torch.tensor(BIV_LOG_SCALE),
        torch.tensor(BIV_ATANH_RHO),
        temperature=tau,
        sample_shape=(n,),
        generator=_gen(20),
    )
    assert x.shape == (n, 2)
    weights = _np_weights(BIV_LOGITS, tau)
    cov = tau * _np_cov(BIV_LOG_SCALE, BIV_ATANH_RHO)
    worst = _check_components(x.double().numpy(), np.asarray(BIV_LOC), weights, cov, "biv")
    print(f"tau={tau}: worst |err|/SE = {worst * SIGMAS:.2f}")


def test_bivariate_overall_mean_and_covariance_match_the_summaries():
    """Overlapping correlated mixture (K = 3), N = 400000: sample mean within 5 SE of
    bivariate_normal_mixture_mean and the three sample covariance entries within 5 SE
    ``sqrt((E[A_i^2 A_j^2] - C_ij^2) / N)`` of bivariate_normal_mixture_covariance; the
    summaries equal the numpy raw-moment closed form within 1e-6 relative (float32).
    Measured |error| / SE: mean 1.70, covariance 0.55."""
    n = 400_000
    logits = torch.tensor([0.0, 0.7, -0.4])
    loc = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.5, 0.5]])
    log_scale = torch.tensor([[0.0, 0.2], [-0.4, 0.1], [0.3, -0.2]])
    a = torch.tensor([1.2, -0.6, 0.3])
    x = mixture.bivariate_normal_mixture_sample(
        logits, loc, log_scale, a, sample_shape=(n,), generator=_gen(21)
    )
    w = _np_weights(logits.numpy())
    cov = _np_cov(log_scale.numpy(), a.numpy())
    mean_ref, cov_ref = _np_moments(w, loc.numpy(), cov)
    mean = mixture.bivariate_normal_mixture_mean(logits, loc).double().numpy()
    got_cov = (
        mixture.bivariate_normal_mixture_covariance(logits, loc, log_scale, a).double().numpy()
    )
    assert_within(mean, mean_ref, 1e-6 * np.abs(mean_ref).max(), range(2), "mean closed form")
    assert_within(
        got_cov.ravel(), cov_ref.ravel(), 1e-6 * np.abs(cov_ref).max(), range(4), "cov closed"
    )
    xs = x.double().numpy()
    mean_se = np.sqrt(np.diagonal(cov_ref) / n)
    r1 = assert_within(xs.mean(0), mean, SIGMAS * mean_se, range(2), "MC mean")
    se = np.sqrt((_np_fourth(w, loc.numpy(), cov) - cov_ref**2) / n)
    sample_cov = np.cov(xs, rowvar=False)
    r2 = assert_within(
        sample_cov.ravel(), got_cov.ravel(), SIGMAS * se.ravel(), range(4), "MC covariance"
    )
    print(f"worst |err|/SE: mean {r1 * SIGMAS:.2f}, covariance {r2 * SIGMAS:.2f}")
