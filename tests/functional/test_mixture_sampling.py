"""Tests of ``probloss.functional.mixture_sampling``: mixture sampling with temperature
and the mixture summaries (mean, variance / covariance, most-probable-component mode).

Where the numbers come from
---------------------------
* Mixture weights at temperature ``tau``: ``softmax(logits / tau)`` in float64 numpy
  (:func:`_np_weights`), the sketch-rnn definition (Ha & Eck 2017, arXiv:1704.03477);
  component scales ``sigma sqrt(tau)``.
* Closed-form moments in float64 numpy (:func:`_np_moments`), written in the *raw-moment*
  form ``E[x x^T] - m m^T`` with ``E[x x^T] = sum_k pi_k (Sigma_k + mu_k mu_k^T)``, i.e.
  not the implementation's sum of centred terms; the variance of a sample variance /
  covariance from the fourth moments of the mixture (:func:`_np_fourth`, the Gaussian
  identity ``E[(d_i + Y_i)^2 (d_j + Y_j)^2] = d_i^2 d_j^2 + d_i^2 S_jj + d_j^2 S_ii +
  4 d_i d_j S_ij + S_ii S_jj + 2 S_ij^2`` for ``Y ~ N(0, S)``, summed over components).
* Most-probable-component mode and ``temperature=0``: ``loc[argmax(logits)]`` by numpy
  indexing.
* Summaries with weights below the float32 range: the centred sums in float64 numpy
  (:func:`_np_summaries`), where ``e^{-110}`` is a normal number; with a zero weight: the
  live component's own mean / variance / ``rho s1 s2`` (closed form, exact).
* Pathwise gradients: their closed forms for the drawn component (``dx/dloc = 1``,
  ``dx/dlog_scale = x - mu``, ``dx2/datanh_rho = s2 (z1 - rho z2)``), evaluated on the
  samples themselves in float64.

Statistical bounds (every draw is from a ``torch.Generator`` with a fixed seed, so each
test is deterministic; the bounds are what a correct sampler meets with overwhelming
probability for *any* seed):

* component frequency ``n_k / N``: within ``5 sqrt(p_k (1 - p_k) / N)`` (binomial SE);
* sample mean of a component / of the mixture: within ``5 s / sqrt(n)``;
* sample variance / covariance entry: within ``5 SE``, ``SE^2 = (S_ii S_jj + S_ij^2) / n``
  for a Gaussian component (``2 s^4 / n`` on the diagonal), ``(E[A_i^2 A_j^2] - C_ij^2) / N``
  for the whole mixture (``A = x - m``).

Where draws are attributed to components by the nearest mean, every midpoint between two
means is at least 10 standard deviations (at the test's temperature) from each, so a
misclassification has probability below 1e-23 per draw.
Measured worst ratios error / SE are printed by ``-s`` and listed in the docstrings.

Closed-form bounds: summaries 1e-12 relative (float64), 2e-6 relative in the float32
cancellation case (the naive ``E[x^2] - m^2`` is off by 100%); ``temperature=0`` and the
mode: exactly equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probloss.functional.mixture_sampling import (
    bivariate_normal_mixture_covariance,
    bivariate_normal_mixture_mean,
    bivariate_normal_mixture_mode,
    bivariate_normal_mixture_sample,
    normal_mixture_mean,
    normal_mixture_mode,
    normal_mixture_sample,
    normal_mixture_variance,
)
from tests.functional._checks import HALF_DTYPES, assert_within, dtype_id

F64 = torch.float64
SIGMAS = 5.0  # statistical bounds are 5 standard errors


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np_weights(logits, tau: float = 1.0) -> np.ndarray:
    """softmax(logits / tau) over the last axis, float64 numpy."""
    x = np.asarray(logits, dtype=np.float64) / tau
    x = x - x.max(-1, keepdims=True)
    w = np.exp(x)
    return w / w.sum(-1, keepdims=True)


def _np_cov(log_scale, atanh_rho=None) -> np.ndarray:
    """Component covariances ``(..., K, D, D)``: diagonal, or the 2x2 with rho = tanh a."""
    s = np.exp(np.asarray(log_scale, dtype=np.float64))
    cov = np.einsum("...i,ij->...ij", s**2, np.eye(s.shape[-1]))
    if atanh_rho is not None:
        off = np.tanh(np.asarray(atanh_rho, dtype=np.float64)) * s[..., 0] * s[..., 1]
        cov[..., 0, 1] = cov[..., 1, 0] = off
    return cov


def _np_moments(weights, loc, cov) -> tuple[np.ndarray, np.ndarray]:
    """Mixture mean and covariance, raw-moment form ``E[x x^T] - m m^T`` (float64)."""
    loc = np.asarray(loc, dtype=np.float64)
    mean = np.einsum("...k,...kd->...d", weights, loc)
    second = np.einsum("...k,...kij->...ij", weights, cov + loc[..., :, None] * loc[..., None, :])
    return mean, second - mean[..., :, None] * mean[..., None, :]


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


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center (Euclidean) for every row of ``x`` (N, D)."""
    return np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)


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


# ======================================================================================
# Shapes, vectorisation, argument checks
# ======================================================================================


def test_large_batch_in_one_call_picks_each_rows_component():
    """Batch (4096,), K = 16, D = 3 in one call: row b allows only component b % 16 (the
    other logits are -inf), component k has mean (100 k, 100 k + 1, 100 k + 2) and scale
    e^-10, so every draw must lie within 10 e^-10 (10 standard deviations) of its row's
    mean: the gather is right in every row and -inf components are never drawn. Shapes
    (2, 4096, 3) and, for the bivariate sampler, (2, 4096, 2)."""
    b, k, d = 4096, 16, 3
    rows = torch.arange(b)
    logits = torch.full((b, k), -math.inf)
    logits[rows, rows % k] = 0.0
    loc = (100.0 * torch.arange(k)[:, None] + torch.arange(d)).expand(b, k, d).float()
    log_scale = torch.full((b, k, d), -10.0)
    x = normal_mixture_sample(logits, loc, log_scale, sample_shape=(2,), generator=_gen(0))
    assert x.shape == (2, b, d)
    expected = loc[rows, rows % k]
    assert ((x - expected).abs() <= 10 * math.exp(-10.0)).all()

    x2 = bivariate_normal_mixture_sample(
        logits, loc[..., :2], log_scale[..., :2], torch.randn(b, k), sample_shape=(2,),
        generator=_gen(1),
    )  # fmt: skip
    assert x2.shape == (2, b, 2)
    assert ((x2 - expected[:, :2]).abs() <= 10 * math.exp(-10.0)).all()


def test_large_batch_random_logits_draws_near_a_component_mean():
    """(4096, 16) with random logits: every draw is within 10 scales (e^-6) of one of its
    own row's 16 means (the rows' means are disjoint sets), and over the batch the
    frequency of each component index matches the average weight within 5 binomial SE
    (p = mean over rows of softmax(logits), numpy)."""
    b, k = 4096, 16
    g = _gen(2)
    logits = torch.randn(b, k, generator=g, dtype=F64)
    loc = (torch.arange(b)[:, None] * 1000.0 + torch.arange(k) * 10.0).to(F64)[..., None]
    x = normal_mixture_sample(logits, loc, torch.full((b, k, 1), -6.0, dtype=F64), generator=g)
    assert x.shape == (b, 1)
    rel = (x - loc[:, 0]) / 10.0  # component index within the row, plus noise
    idx = torch.round(rel)
    assert ((rel - idx).abs() * 10.0 <= 10 * math.exp(-6.0)).all()
    assert ((idx >= 0) & (idx < k)).all()
    freq = np.bincount(idx.long().numpy().ravel(), minlength=k) / b
    p = _np_weights(logits.numpy()).mean(0)
    # draws are independent Bernoulli(p_bk) per row: the variance of the count is
    # sum_b p_bk (1 - p_bk) <= b p_k (1 - p_k)
    var = (_np_weights(logits.numpy()) * (1 - _np_weights(logits.numpy()))).sum(0) / b**2
    assert_within(freq, p, SIGMAS * np.sqrt(var), range(k), "frequency over rows")


def test_broadcast_shapes():
    """logits (5, 1, K), loc (3, K, D), log_scale (K, D), atanh_rho (1, K) broadcast to batch
    (5, 3); sample_shape (2, 7) leads. Summaries have the batch shape (no sample dims)."""
    k = 4
    logits, loc, log_scale = torch.zeros(5, 1, k), torch.zeros(3, k, 2), torch.zeros(k, 2)
    a = torch.zeros(1, k)
    assert normal_mixture_sample(logits, loc, log_scale, sample_shape=(2, 7)).shape == (
        2, 7, 5, 3, 2,
    )  # fmt: skip
    assert normal_mixture_sample(logits, loc, log_scale, temperature=0.0).shape == (5, 3, 2)
    assert bivariate_normal_mixture_sample(
        logits, loc, log_scale, a, sample_shape=torch.Size([6])
    ).shape == (6, 5, 3, 2)
    assert normal_mixture_mean(logits, loc).shape == (5, 3, 2)
    assert normal_mixture_variance(logits, loc, log_scale).shape == (5, 3, 2)
    assert normal_mixture_mode(logits, loc).shape == (5, 3, 2)
    assert bivariate_normal_mixture_mean(logits, loc).shape == (5, 3, 2)
    assert bivariate_normal_mixture_covariance(logits, loc, log_scale, a).shape == (5, 3, 2, 2)
    assert bivariate_normal_mixture_mode(logits, loc).shape == (5, 3, 2)


@pytest.mark.parametrize(
    ("fn", "args", "pattern"),
    [
        (normal_mixture_sample, (torch.zeros(()), torch.zeros(1, 1), torch.zeros(1, 1)),
         r"logits must have shape \(\*, K\); got shape \(\)"),
        (normal_mixture_sample, (torch.zeros(3), torch.zeros(3), torch.zeros(3, 1)),
         r"loc must have shape \(\*, K, D\); got shape \(3,\)"),
        (normal_mixture_sample, (torch.zeros(3), torch.zeros(4, 2), torch.zeros(4, 2)),
         r"do not broadcast.*got logits \(3,\), loc \(4, 2\), log_scale \(4, 2\)"),
        (normal_mixture_variance, (torch.zeros(2, 3), torch.zeros(3, 3, 1), torch.zeros(3, 1)),
         r"do not broadcast.*logits \(2, 3\), loc \(3, 3, 1\)"),
        (bivariate_normal_mixture_sample,
         (torch.zeros(3), torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3)),
         r"loc must have shape \(\*, K, 2\) \(event size 2.*got shape \(3, 3\)"),
        (bivariate_normal_mixture_covariance,
         (torch.zeros(3), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(4)),
         r"atanh_rho \(4,\)"),
    ],
    ids=["logits-0d", "loc-1d", "K", "batch", "bivariate-event", "atanh_rho-K"],
)  # fmt: skip
def test_shape_errors_name_the_argument(fn, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(*args)


@pytest.mark.parametrize("bad", [-1e-3, -1.0, math.nan, math.inf, -math.inf])
def test_temperature_must_be_finite_and_non_negative(bad):
    args = (torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        normal_mixture_sample(*args, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        bivariate_normal_mixture_sample(*args, torch.zeros(2), temperature=bad)


# ======================================================================================
# Statistics of the draws
# ======================================================================================

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
    x = normal_mixture_sample(
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
    x = normal_mixture_sample(logits, loc, log_scale, sample_shape=(n,), generator=_gen(11))
    w = _np_weights(logits.numpy())
    cov = _np_cov(log_scale.numpy())
    mean_ref, cov_ref = _np_moments(w, loc.numpy(), cov)
    var_ref = np.diagonal(cov_ref)
    fourth = np.diagonal(_np_fourth(w, loc.numpy(), cov))
    mean = normal_mixture_mean(logits, loc).double().numpy()
    var = normal_mixture_variance(logits, loc, log_scale).double().numpy()
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
    x = bivariate_normal_mixture_sample(
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
    x = bivariate_normal_mixture_sample(
        logits, loc, log_scale, a, sample_shape=(n,), generator=_gen(21)
    )
    w = _np_weights(logits.numpy())
    cov = _np_cov(log_scale.numpy(), a.numpy())
    mean_ref, cov_ref = _np_moments(w, loc.numpy(), cov)
    mean = bivariate_normal_mixture_mean(logits, loc).double().numpy()
    got_cov = bivariate_normal_mixture_covariance(logits, loc, log_scale, a).double().numpy()
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


# ======================================================================================
# Temperature limits
# ======================================================================================


def _random_params(seed: int, b: int = 64, k: int = 5, d: int = 2):
    g = _gen(seed)
    logits = torch.randn(b, k, generator=g)
    logits[0] = torch.tensor([1.0, 3.0, -2.0, 3.0, 0.0])  # a tie: the first maximum wins
    loc = 10 * torch.randn(b, k, d, generator=g)
    log_scale = torch.randn(b, k, d, generator=g)
    a = 3 * torch.randn(b, k, generator=g)
    return logits, loc, log_scale, a


def test_temperature_zero_returns_the_argmax_components_mean_exactly():
    """tau = 0: every draw equals loc[b, argmax_k logits[b]] exactly (numpy argmax: the
    first maximum on ties, row 0 has one), for both samplers and both modes; no random
    number is drawn (the generator's state is unchanged) and nothing is NaN."""
    logits, loc, log_scale, a = _random_params(30)
    expected = loc.numpy()[np.arange(64), np.argmax(logits.numpy(), -1)]
    assert np.argmax(logits.numpy()[0]) == 1
    g = _gen(0)
    state = g.get_state()
    x = normal_mixture_sample(
        logits, loc, log_scale, temperature=0.0, sample_shape=(3,), generator=g
    )
    y = bivariate_normal_mixture_sample(logits, loc, log_scale, a, temperature=0, generator=g)
    assert torch.equal(g.get_state(), state)
    assert np.array_equal(x.numpy(), np.broadcast_to(expected, (3, 64, 2)))
    assert np.array_equal(y.numpy(), expected)
    assert np.array_equal(normal_mixture_mode(logits, loc).numpy(), expected)
    assert np.array_equal(bivariate_normal_mixture_mode(logits, loc).numpy(), expected)


def test_tiny_temperature_does_not_overflow_the_scaled_logits():
    """tau = 1e-38 (float32): logits / tau would be 9.5e38 and 1e39, both inf, and an argmax
    over two infs picks the first component; the shifted (l - max l) / tau is (-5e37, 0),
    so every one of 1000 draws comes from component 1 and lies within 10 of its
    sqrt(tau) sigma = 1e-19 of its mean (noise of 10 standard deviations: p < 1e-20)."""
    logits = torch.tensor([9.5, 10.0])
    loc = torch.tensor([[-3.0, 0.0], [4.0, 1.0]])
    x = normal_mixture_sample(
        logits, loc, torch.zeros(2, 2), temperature=1e-38, sample_shape=(1000,), generator=_gen(3)
    )
    assert torch.isfinite(x).all()
    assert ((x - loc[1]).abs() <= 10 * 1e-19).all()
    y = bivariate_normal_mixture_sample(
        logits, loc, torch.zeros(2, 2), torch.tensor([0.5, 50.0]), temperature=1e-38,
        sample_shape=(1000,), generator=_gen(4),
    )  # fmt: skip
    assert ((y - loc[1]).abs() <= 10 * 1e-19).all()


# ======================================================================================
# Summaries against closed forms
# ======================================================================================


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
    got = normal_mixture_mean(logits, loc).numpy()
    assert_within(got, mean_ref, bound, labels, "mean")
    assert np.array_equal(bivariate_normal_mixture_mean(logits, loc).numpy(), got)
    var = normal_mixture_variance(logits, loc, log_scale).numpy()
    assert_within(var, np.diagonal(cov_ref, axis1=-2, axis2=-1), bound, labels, "variance")
    cov = bivariate_normal_mixture_covariance(logits, loc, log_scale, a).numpy()
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
    got = normal_mixture_variance(logits, loc, log_scale).item()
    naive = (
        (torch.softmax(logits, -1)[:, None] * (loc**2 + torch.exp(2 * log_scale))).sum(0)
        - normal_mixture_mean(logits, loc) ** 2
    ).item()
    assert abs(naive - expected) >= 0.5 * expected  # what the test guards against
    assert abs(got - expected) <= 2e-6 * expected


def test_summaries_at_extreme_logits():
    """logits (1e4, -1e4, 0) float32: the weights are (1, 0, 0) to rounding, so the mean and
    mode are loc[0] exactly and the variance is sigma_0^2 within 1e-6 relative; finite."""
    logits = torch.tensor([1e4, -1e4, 0.0])
    loc = torch.tensor([[1.0, -2.0], [1e3, 1e3], [-5.0, 5.0]])
    log_scale = torch.tensor([[0.5, -0.5], [3.0, 3.0], [0.0, 0.0]])
    assert torch.equal(normal_mixture_mean(logits, loc), loc[0])
    assert torch.equal(normal_mixture_mode(logits, loc), loc[0])
    var = normal_mixture_variance(logits, loc, log_scale)
    assert torch.allclose(var, torch.exp(2 * log_scale[0]), rtol=1e-6, atol=0)
    x = normal_mixture_sample(logits, loc, log_scale, sample_shape=(1000,), generator=_gen(5))
    assert torch.isfinite(x).all() and (x[:, 0] < 1 + 10 * math.exp(0.5)).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision_keeps_the_parameter_dtype(dtype):
    """Half parameters: samples and summaries are returned in the half dtype, finite;
    summaries equal the float32 computation rounded once; tau = 0 returns loc exactly."""
    logits, loc, log_scale, a = (t.to(dtype) for t in _random_params(32))
    f32 = [t.float() for t in (logits, loc, log_scale, a)]
    x = normal_mixture_sample(logits, loc, log_scale, sample_shape=(4,), generator=_gen(6))
    y = bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(6))
    assert x.dtype == y.dtype == dtype and x.shape == (4, 64, 2) and torch.isfinite(x).all()
    assert torch.isfinite(y).all()
    assert torch.equal(normal_mixture_mean(logits, loc), normal_mixture_mean(*f32[:2]).to(dtype))
    assert torch.equal(
        normal_mixture_variance(logits, loc, log_scale),
        normal_mixture_variance(*f32[:3]).to(dtype),
    )
    assert torch.equal(
        bivariate_normal_mixture_covariance(logits, loc, log_scale, a),
        bivariate_normal_mixture_covariance(*f32).to(dtype),
    )
    zero = normal_mixture_sample(logits, loc, log_scale, temperature=0)
    assert torch.equal(zero, loc[torch.arange(64), logits.float().argmax(-1)])


# ======================================================================================
# Generator, extreme inputs, gradients
# ======================================================================================


def test_generator_makes_draws_reproducible_and_leaves_the_global_rng_alone():
    """Same seed: identical samples (both samplers, temperature 1 and 1.0 and 0.7);
    different seed: different samples; the global RNG state is unchanged by calls with a
    generator; with generator=None the global RNG is used (torch.manual_seed repeats)."""
    logits, loc, log_scale, a = _random_params(33)
    global_state = torch.get_rng_state()
    for tau in (1, 1.0, 0.7):
        first = normal_mixture_sample(
            logits, loc, log_scale, temperature=tau, sample_shape=(5,), generator=_gen(7)
        )
        again = normal_mixture_sample(
            logits, loc, log_scale, temperature=tau, sample_shape=(5,), generator=_gen(7)
        )
        assert torch.equal(first, again)
        other = normal_mixture_sample(
            logits, loc, log_scale, temperature=tau, sample_shape=(5,), generator=_gen(8)
        )
        assert not torch.equal(first, other)
        b1 = bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(7))
        b2 = bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(7))
        assert torch.equal(b1, b2)
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(123)
    g1 = normal_mixture_sample(logits, loc, log_scale)
    torch.manual_seed(123)
    assert torch.equal(normal_mixture_sample(logits, loc, log_scale), g1)


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
        x = bivariate_normal_mixture_sample(
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
    x = bivariate_normal_mixture_sample(
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
        normal_mixture_sample(torch.zeros(1), loc, ls, sample_shape=(n,), generator=_gen(12)),
        bivariate_normal_mixture_sample(
            torch.zeros(1), loc, ls, torch.tensor([0.9]), sample_shape=(n,), generator=_gen(13)
        ),
    ):
        assert torch.isfinite(x).all()
        z = (x.double().numpy() - loc.double().numpy()) / math.exp(log_scale)
        assert np.abs(z).max() <= 10
        assert np.all(np.abs(z.var(0) - 1.0) <= SIGMAS * math.sqrt(2.0 / n))


def test_conditional_pathwise_gradients():
    """The draw is differentiable given the drawn component (float64, 5000 draws of three
    separated components, tau = 0.5): for L = sum of all draws, dL/dloc[k] = n_k exactly,
    dL/dlog_scale[k, i] = sum_{draws from k} (x_i - mu_ki) and, bivariate,
    dL/datanh_rho[k] = sum_{draws from k} s_k2 sqrt(tau) (z1 - rho z2) (z the standardized
    draw), each within 1e-10 relative; logits get no gradient at all (grad stays None)."""
    n, tau = 5000, 0.5
    logits = torch.tensor([0.1, 0.4, -0.3], dtype=F64, requires_grad=True)
    loc = torch.tensor([[0.0, 0.0], [50.0, 50.0], [100.0, -50.0]], dtype=F64, requires_grad=True)
    log_scale = torch.tensor([[0.2, -0.1], [0.0, 0.3], [-0.4, 0.1]], dtype=F64, requires_grad=True)
    a = torch.tensor([0.7, -1.2, 2.0], dtype=F64, requires_grad=True)

    x = normal_mixture_sample(
        logits, loc, log_scale, temperature=tau, sample_shape=(n,), generator=_gen(14)
    )
    x.sum().backward()
    xs, mu = x.detach().numpy(), loc.detach().numpy()
    k = _nearest(xs, mu)
    counts = np.bincount(k, minlength=3)
    assert np.array_equal(loc.grad.numpy(), np.repeat(counts[:, None], 2, 1).astype(float))
    ref = np.stack([(xs[k == j] - mu[j]).sum(0) for j in range(3)])
    assert_within(log_scale.grad.numpy().ravel(), ref.ravel(), 1e-10 * np.abs(ref).ravel() + 1e-12,
                  range(6), "d/dlog_scale")  # fmt: skip
    assert logits.grad is None

    loc.grad = log_scale.grad = None
    y = bivariate_normal_mixture_sample(
        logits, loc, log_scale, a, temperature=tau, sample_shape=(n,), generator=_gen(15)
    )
    y.sum().backward()
    ys = y.detach().numpy()
    k = _nearest(ys, mu)
    s = np.exp(log_scale.detach().numpy())[k] * math.sqrt(tau)
    z = (ys - mu[k]) / s
    rho = np.tanh(a.detach().numpy())[k]
    per_draw = s[:, 1] * (z[:, 0] - rho * z[:, 1])
    ref = np.array([per_draw[k == j].sum() for j in range(3)])
    assert_within(a.grad.numpy(), ref, 1e-10 * np.abs(ref) + 1e-12, range(3), "d/datanh_rho")
    counts = np.bincount(k, minlength=3)
    assert np.array_equal(loc.grad.numpy(), np.repeat(counts[:, None], 2, 1).astype(float))
    assert logits.grad is None


# ======================================================================================
# Issue 10: zero and underflowing weights in the summaries; empty batches
# ======================================================================================

INF = math.inf


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
    mean = normal_mixture_mean(*leaves[:2])
    var = normal_mixture_variance(*leaves[:3])
    cov = bivariate_normal_mixture_covariance(*leaves)
    assert torch.equal(mean, loc[:, 0])
    assert torch.equal(bivariate_normal_mixture_mean(*leaves[:2]), loc[:, 0])
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
    for fn in (normal_mixture_mean, bivariate_normal_mixture_mean):
        got = fn(logits, loc).double().numpy()
        assert_within(got.ravel(), mean_ref.ravel(), 4 * eps * s_mean.ravel(), labels, "mean")
    got = normal_mixture_variance(logits, loc, log_scale).double().numpy()
    assert_within(got.ravel(), var_ref.ravel(), 4 * eps * s_var.ravel(), labels, "variance")
    cov = bivariate_normal_mixture_covariance(logits, loc, log_scale, torch.zeros(6, 2))
    diag = torch.diagonal(cov, dim1=-2, dim2=-1).double().numpy()
    assert_within(diag.ravel(), var_ref.ravel(), 4 * eps * s_var.ravel(), labels, "cov diag")


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
        (normal_mixture_sample(lg, lc, ls, sample_shape=sample_shape), (*sample_shape, *batch, 2)),
        (bivariate_normal_mixture_sample(lg, lc, ls, a, sample_shape=sample_shape),
         (*sample_shape, *batch, 2)),
        (normal_mixture_mean(lg, lc), (*batch, 2)),
        (bivariate_normal_mixture_mean(lg, lc), (*batch, 2)),
        (normal_mixture_variance(lg, lc, ls), (*batch, 2)),
        (bivariate_normal_mixture_covariance(lg, lc, ls, a), (*batch, 2, 2)),
        (normal_mixture_mode(lg, lc), (*batch, 2)),
        (bivariate_normal_mixture_mode(lg, lc), (*batch, 2)),
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
        x = normal_mixture_sample(logits, loc, torch.full((2, 1), -30.0, dtype=dtype))
        assert (x.sign() == loc[winner].sign()).all(), (gap, winner)
    # a logit of -inf is never drawn, even when the live component's uniform is 0 (before:
    # both terms -inf, and the argmax took the first, the -inf component)
    logits = torch.tensor([-INF, 0.0], dtype=dtype)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: extreme_rand(*a, **k).flip(-1))
    x = normal_mixture_sample(logits, loc, torch.full((2, 1), -30.0, dtype=dtype))
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
    x = normal_mixture_sample(torch.zeros(1), loc, torch.full((1, 4), 100.0))
    expected = float(torch.tensor(1e-6)) * math.exp(100.0)
    eps32 = torch.finfo(torch.float32).eps
    assert abs(x[0].item() - expected) <= 4 * eps32 * expected
    assert abs(x[1].item() + expected) <= 4 * eps32 * expected
    assert x[2] == 0.5 and x[3] == math.inf


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
    mean = normal_mixture_mean(logits, loc)
    assert torch.isfinite(mean).all()
    assert ((mean.double() - float(torch.tensor(big))).abs() <= 4 * 2**-23 * 3.4e38).all()
    cov = bivariate_normal_mixture_covariance(
        torch.zeros(1), torch.zeros(1, 2), torch.tensor([[0.0, 100.0]]), torch.zeros(1)
    )
    assert cov[0, 1] == 0 and cov[1, 0] == 0 and cov[0, 0] == 1 and cov[1, 1] == INF


def test_off_diagonal_covariance_when_terms_of_both_signs_overflow():
    """Found by the fuzz suite: ``rho s1 s2`` terms of both signs beyond the range made the
    off-diagonal covariance ``inf - inf = NaN``; the larger side decides. float64 (the
    fuzz draw): ``-inf`` (``e^{4.6e23}`` against ``e^{1.7e21}``, mpmath's sign). float32,
    two components on opposite correlation lines (``tanh(+-50) = +-1``), equal weights and
    means:
    ``c12 = (e^{90} - e^{89.5}) / 2 = 2.4e38``, finite although both terms overflow
    (float64 by hand), within ``4 eps (1 + 90)`` times the sum of the terms' magnitudes
    (the rounding of exponents near 90 carried into ``exp``, then the cancellation); and
    ``-inf`` where the negative side is larger by a factor ``e^2``."""
    d = torch.float64
    logits = torch.tensor([4.397136189858803e-23, -0.1808082195878351, 0.2013262300830547], dtype=d)
    loc = torch.tensor([[1.121276415412279e-33, 0.0078125], [0.04946745144030881,
                        -6.644103407655575e37], [-3.8470488045293366e24, 3.119162312519754]],
                       dtype=d)  # fmt: skip
    log_scale = torch.tensor([[1.7289285583694065e21, 1.7517854629505151e-12],
                              [1.2973730293626422e21, -2.5583274342565433e35],
                              [7.532210401440694e-35, 4.565382213568796e23]], dtype=d)  # fmt: skip
    a = torch.tensor([709.3964185322641, -21.382982419666668, -143.96314289500094], dtype=d)
    cov = bivariate_normal_mixture_covariance(logits, loc, log_scale, a)
    assert cov[0, 1] == -INF and cov[1, 0] == -INF
    log_scale = torch.tensor([[45.0, 45.0], [45.0, 44.5]])
    cov = bivariate_normal_mixture_covariance(
        torch.zeros(2), torch.zeros(2, 2), log_scale, torch.tensor([50.0, -50.0])
    )
    terms = 0.5 * math.exp(90.0), 0.5 * math.exp(89.5)
    expected = terms[0] - terms[1]
    eps = torch.finfo(torch.float32).eps
    assert abs(cov[0, 1].item() - expected) <= 4 * eps * 91 * sum(terms)
    cov = bivariate_normal_mixture_covariance(
        torch.zeros(2), torch.zeros(2, 2), torch.tensor([[50.0, 50.0], [51.0, 51.0]]),
        torch.tensor([50.0, -50.0]),
    )  # fmt: skip
    assert cov[0, 1] == -INF and cov[0, 0] == INF


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
        mean = normal_mixture_mean(lg, mu)
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
        mean = normal_mixture_mean(lg, mu)
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
    var = normal_mixture_variance(logits, loc, log_scale)
    cov = bivariate_normal_mixture_covariance(logits, loc, log_scale, torch.zeros(1, 3))
    for got in (var[0, 0], cov[0, 0, 0]):
        assert abs(got.item() - expected) <= 4 * eps * expected


# ======================================================================================
# Issue 10, second round: second moments and their gradients beyond the float range
# ======================================================================================
#
# Reference: the law of total covariance and its derivatives in mpmath at 60 digits
# (:func:`_mp_second_moments`; mpmath's exponent range is unbounded, so e^{2e10} is a
# number there). Bound, per entry: 16 eps of the output dtype times the sum of the
# magnitudes of the terms the entry is made of (T below): the direct form rounds each term
# a few times (mul_exp about 1 ulp, products and sums 1 ulp each: at most 8 roundings per
# term, 8 eps), the log-space form is float64 for float32 inputs (exponents of size E
# exact to E eps64, E <= 1e11 here: below 1e-5 eps32) and rounds once at the end; twice
# that for margin. Entries whose exact magnitude exceeds finfo.max must be +-inf with the
# exact sign.


def _mp_second_moments(logits, loc, log_scale, atanh_rho=None, scale_tril=None):
    """Entries ``C_p`` and gradients with term-size scales, from the closed forms.

    Pairs: the diagonal (``atanh_rho`` None) or (0,0), (0,1), (1,1). Returns
    ``{"value": [(x, T)], "logits": [...], "loc": [...], "log_scale": [...],
    "atanh_rho": [...], "scale_tril": [...]}`` for the gradient of ``sum_p C_p``.
    """
    from mpmath import mp, mpf

    with mp.workdps(60):
        lg = [mpf(float(v)) for v in logits]
        top = max(lg)
        w = [mp.exp(v - top) for v in lg]
        pi = [v / mp.fsum(w) for v in w]
        K = len(pi)
        mu = [[mpf(float(v)) for v in row] for row in loc]
        D = len(mu[0])
        if scale_tril is not None:
            L = [[[mpf(float(v)) for v in row] for row in comp] for comp in scale_tril]
            var = [[mp.fsum(x * x for x in L[k][i]) for i in range(D)] for k in range(K)]
            s = [[mp.sqrt(v) for v in row] for row in var]
        else:
            s = [[mp.exp(mpf(float(v))) for v in row] for row in log_scale]
        rho = None if atanh_rho is None else [mp.tanh(mpf(float(v))) for v in atanh_rho]
        sech = None if atanh_rho is None else [1 / mp.cosh(mpf(float(v))) for v in atanh_rho]
        pairs = [(0, 0), (0, 1), (1, 1)] if rho is not None else [(i, i) for i in range(D)]
        m = [mp.fsum(pi[k] * mu[k][i] for k in range(K)) for i in range(D)]
        d = [[mu[k][i] - m[i] for i in range(D)] for k in range(K)]

        def sig(k, i, j):
            return s[k][i] ** 2 if i == j else rho[k] * s[k][i] * s[k][j]

        Q = [[sig(k, i, j) + d[k][i] * d[k][j] for (i, j) in pairs] for k in range(K)]
        C = [mp.fsum(pi[k] * Q[k][p] for k in range(K)) for p in range(len(pairs))]
        size = [mp.fsum(pi[k] * abs(Q[k][p]) for k in range(K)) for p in range(len(pairs))]
        out = {"value": [(C[p], size[p]) for p in range(len(pairs))]}
        out["logits"] = [
            (
                mp.fsum(pi[k] * (Q[k][p] - C[p]) for p in range(len(pairs))),
                mp.fsum(pi[k] * (abs(Q[k][p]) + size[p]) for p in range(len(pairs))),
            )
            for k in range(K)
        ]
        gl, gs = [], []
        for k in range(K):
            for a in range(D):
                terms = [pi[k] * ((i == a) * d[k][j] + (j == a) * d[k][i]) for (i, j) in pairs]
                gl.append((mp.fsum(terms), mp.fsum(abs(t) for t in terms)))
                terms = [pi[k] * sig(k, i, j) * ((i == a) + (j == a)) for (i, j) in pairs]
                gs.append((mp.fsum(terms), mp.fsum(abs(t) for t in terms)))
        out["loc"], out["log_scale"] = gl, gs
        if rho is not None:
            out["atanh_rho"] = []
            for k in range(K):
                t = pi[k] * sech[k] ** 2 * s[k][0] * s[k][1]  # not 1 - rho^2: 0 at a = 400
                out["atanh_rho"].append((t, abs(t)))
        if scale_tril is not None:
            out["scale_tril"] = [
                (2 * pi[k] * L[k][i][j], abs(2 * pi[k] * L[k][i][j]))
                for k in range(K)
                for i in range(D)
                for j in range(D)
            ]
        return out


def _assert_matches_mp(got: torch.Tensor, ref, dtype, what: str, exponents: float = 0.0):
    """``got`` (flattened) against ``[(exact, T)]``: +-inf with the exact sign beyond the
    range (``|exact| > max (1 + eps)``, so rounding cannot bring it back), else within
    ``(16 + E) eps T`` (module bound above; ``E``, where the float64 result is
    ``e^{x}`` of a sum of logarithms that cancel, is their total size: each carries a
    relative error of eps, so ``x`` is off by ``E eps``, ``e^{x}`` by ``E eps`` relative,
    which is also the condition number of the result in those inputs)."""
    from mpmath import mpf

    f = torch.finfo(dtype)
    got = got.detach().double().reshape(-1).tolist()
    assert len(got) == len(ref), what
    for i, (g, (x, size)) in enumerate(zip(got, ref, strict=True)):
        assert not math.isnan(g), f"{what}[{i}]: NaN, exact {x}"
        if abs(x) > mpf(f.max) * (1 + mpf(f.eps)):
            assert g == math.copysign(INF, x), f"{what}[{i}]: got {g!r}, exact {x} (beyond)"
        else:  # + tiny: a result below the normal range is rounded to a subnormal or 0
            bound = (16 + exponents) * f.eps * float(size) + f.tiny
            assert abs(g - float(x)) <= bound, f"{what}[{i}]: got {g!r}, exact {x}"


def _grads(fn, dtype, *args):
    xs = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in args]
    y = fn(*xs)
    y.sum().backward()
    return y, [x.grad for x in xs]


def test_variance_logit_gradient_with_overflowing_pieces_float32():
    """Issue 10 (fuzz, row 206 in kind): pi_0 (mu_0 - m)^2 = e^{-77} 1e74 = 3.6e40 > max,
    so Var_0 = +inf; d Var_0 / d l_1 = pi_1 (q_1 - Var) = -e^{-177} 3.6e40 = -4.5e-37 is
    finite (autograd formed pi_1 q_1 - pi_1 Var = 0 - inf: -inf), d/dl_0 = +inf and
    d/dl_2 = -inf with mpmath's signs (were NaN)."""
    logits = [0.0, -100.0, 77.0]
    loc = [[-1e37, 0.0], [0.0, 0.0], [0.0, 0.0]]
    log_scale = [[0.0, 0.0]] * 3
    v, (gl, gm, gs) = _grads(normal_mixture_variance, torch.float32, logits, loc, log_scale)
    ref = _mp_second_moments(logits, loc, log_scale)
    _assert_matches_mp(v, ref["value"], torch.float32, "value")
    _assert_matches_mp(gl, ref["logits"], torch.float32, "d/dlogits")
    _assert_matches_mp(gm, ref["loc"], torch.float32, "d/dloc")
    _assert_matches_mp(gs, ref["log_scale"], torch.float32, "d/dlog_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_variance_logit_gradient_at_an_overflowing_scale(dtype):
    """Issue 10: ``log_scale[1, 0] = 1e10`` (100 in float32): Var_0 = e^{2e10}/3 = inf and
    d/dlogits = pi_k (q_k - Var) = (-inf, +inf, -inf) exactly (float64 gave
    ``[-inf, nan, -inf]``); the other gradients as mpmath's."""
    big = 1e10 if dtype == torch.float64 else 100.0
    logits, loc = [0.0, 0.0, 0.0], [[0.0, 0.0]] * 3
    log_scale = [[0.0, 0.0], [big, 0.0], [0.0, 0.0]]
    v, (gl, gm, gs) = _grads(normal_mixture_variance, dtype, logits, loc, log_scale)
    ref = _mp_second_moments(logits, loc, log_scale)
    _assert_matches_mp(v, ref["value"], dtype, "value")
    _assert_matches_mp(gl, ref["logits"], dtype, "d/dlogits")
    _assert_matches_mp(gm, ref["loc"], dtype, "d/dloc")
    _assert_matches_mp(gs, ref["log_scale"], dtype, "d/dlog_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_variance_logit_gradient_with_overflow_in_two_coordinates(dtype):
    """The gradient sums over coordinates terms that are +inf in one and -inf in another:
    d/dl_k = sum_d pi_k (q_kd - Var_d) with component 1 huge in d = 0 and component 2 in
    d = 1 (e^{2 * 1e4} against e^{2 * 1.1e4}): the larger side decides, mpmath's sign."""
    logits, loc = [0.0, 0.0, 0.0], [[0.0, 0.0]] * 3
    log_scale = [[0.0, 0.0], [1e4, 0.0], [0.0, 1.1e4]]
    v, (gl, _, _) = _grads(normal_mixture_variance, dtype, logits, loc, log_scale)
    ref = _mp_second_moments(logits, loc, log_scale)
    _assert_matches_mp(v, ref["value"], dtype, "value")
    _assert_matches_mp(gl, ref["logits"], dtype, "d/dlogits")


def test_covariance_gradients_at_an_overflowing_scale_float32():
    """Issue 10: ``bivariate_normal_mixture_covariance`` with ``log_scale[1, 0] = 100``:
    d/dlogits was NaN x3; exact (float64 reference [-8e85, 1.6e86, -8e85]) is
    (-inf, +inf, -inf) in float32. Every gradient against mpmath."""
    logits, loc = [0.0, 0.0, 0.0], [[0.0, 0.0]] * 3
    log_scale, a = [[0.0, 0.0], [100.0, 0.0], [0.0, 0.0]], [0.3, -0.5, 0.0]
    c, (gl, gm, gs, ga) = _grads(
        lambda *x: bivariate_normal_mixture_covariance(*x)[..., [0, 0, 1], [0, 1, 1]],
        torch.float32, logits, loc, log_scale, a,
    )  # fmt: skip
    ref = _mp_second_moments(logits, loc, log_scale, a)
    _assert_matches_mp(c, ref["value"], torch.float32, "value")
    _assert_matches_mp(gl, ref["logits"], torch.float32, "d/dlogits")
    _assert_matches_mp(gm, ref["loc"], torch.float32, "d/dloc")
    _assert_matches_mp(gs, ref["log_scale"], torch.float32, "d/dlog_scale")
    _assert_matches_mp(ga, ref["atanh_rho"], torch.float32, "d/datanh_rho")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_covariance_correlation_gradient_where_sigma_product_overflows(dtype):
    """``rho s1 s2`` at ``atanh_rho = 60``, ``log_scale = 60`` (float32; 400 in float64):
    ``s1 s2 = e^{120}`` overflows, d/da = sech^2(a) s1 s2 = 4 e^{-120} e^{120} (about 4)
    is finite; through autograd it was ``inf * (1 - tanh^2) = inf * 0 = NaN``."""
    big = 60.0 if dtype == torch.float32 else 400.0
    args = ([0.0], [[0.0, 0.0]], [[big, big]], [big])
    c, (_, _, gs, ga) = _grads(
        lambda *x: bivariate_normal_mixture_covariance(*x)[..., [0, 0, 1], [0, 1, 1]],
        dtype, *args,
    )  # fmt: skip
    ref = _mp_second_moments(*args)
    _assert_matches_mp(c, ref["value"], dtype, "value")
    # e^{2 big - 2 log cosh(big)}: logarithms of total size 4 big cancel to 2 log 2
    _assert_matches_mp(ga, ref["atanh_rho"], dtype, "d/datanh_rho", exponents=4 * big)
    _assert_matches_mp(gs, ref["log_scale"], dtype, "d/dlog_scale")


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
        x = bivariate_normal_mixture_sample(logits, loc, log_scale, a, generator=_gen(seed))
        (grad,) = torch.autograd.grad(x[1], a)
        g = _gen(seed)
        torch.rand((1,), generator=g, dtype=dtype)
        e1, e2 = torch.randn((2,), generator=g, dtype=dtype).double().tolist()
        with mp.workdps(40):
            sech = 1 / mp.cosh(60)
            exact = mp.exp(mpf(big)) * sech * (sech * mpf(e1) - mp.tanh(60) * mpf(e2))
        size = abs(mp.exp(mpf(big)) * sech) * (abs(sech * e1) + abs(e2))
        _assert_matches_mp(grad, [(exact, size)], dtype, f"d/datanh_rho (seed {seed})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_covariance_sign_decided_by_the_low_part_of_an_exponent_sum(dtype):
    """Found by the fuzz suite (float64 path, bfloat16 draw): ``c12`` has the terms
    ``pi_2 rho_2 e^{1.7e21 + 3.39e38}`` (positive) and ``pi_3 rho_3 e^{3.39e38 + 5.5}``
    (negative); in float64 both exponent sums round to ``3.3895313892515355e38`` (ulp
    ``3.8e22``), so the log-space sum read a tie, an exact cancellation, and returned 0;
    exact (mpmath) ``+e^{3.3895e38 + 1.7e21}``, ``+inf`` (the positive side is larger by
    ``e^{1.7e21}``). The exponent sums are now double-floats, exact here. Against
    :func:`_mp_second_moments` (bound of the module, above); float32 inputs run in float64,
    the same tie. (d/dlogits is not checked: for ``k = 2`` it is ``pi_2 pi_1 e^{6.8e38}``
    from ``(1 - pi_2) - pi_3 = pi_1 = 5e-19``, below float64's resolution of the terms.)"""
    logits = [-36.75, 0.048828125, 5.3125]
    loc = [[0.049072265625, -3.147125244140625e-05], [-0.00372314453125, 9.6875],
           [-4.738711601752347e-38, 88.5]]  # fmt: skip
    log_scale = [[-14.25, 4.338734978715565e-30], [1.7155471988549883e21, 3.3895313892515355e38],
                 [3.3895313892515355e38, 5.53125]]  # fmt: skip
    a = [-8.623852854459215e20, 4.15625, -84.5]
    c, (_, _, gs, ga) = _grads(
        lambda *x: bivariate_normal_mixture_covariance(*x)[..., [0, 0, 1], [0, 1, 1]],
        dtype, logits, loc, log_scale, a,
    )  # fmt: skip
    ref = _mp_second_moments(logits, loc, log_scale, a)
    assert c[1] == INF
    _assert_matches_mp(c, ref["value"], dtype, "value")
    _assert_matches_mp(gs, ref["log_scale"], dtype, "d/dlog_scale")
    _assert_matches_mp(ga, ref["atanh_rho"], dtype, "d/datanh_rho")
