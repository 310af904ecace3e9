"""Tests of ``probloss.vae.diagnostics``: active units, KL per dimension, rate-distortion.

Where the numbers come from: constructed data with known variances (a column scaled from
a vector of exact unbiased variance 1), ``numpy.var(ddof=1)`` in float64, and the plain
arithmetic of Alemi et al. 2018 (rate = mean KL, distortion = -mean log-likelihood,
ELBO = -(rate + distortion)) on small exactly representable numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probloss.vae.diagnostics import (
    ActiveUnits,
    RateDistortion,
    active_units,
    kl_per_dimension,
    rate_distortion,
)
from probloss.vae.kl import gaussian_kl, gaussian_kl_per_dim
from tests.functional._checks import HALF_DTYPES, dtype_id


def _posterior_means(variances, n=1000, seed=0):
    """(n, L) float64 columns with unbiased sample variances ``variances`` (to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    base = (base - base.mean()) / base.std(correction=1)  # unbiased variance exactly 1
    offsets = torch.arange(len(variances), dtype=torch.float64) * 3.0  # means do not matter
    return base[:, None] * torch.tensor(variances, dtype=torch.float64).sqrt() + offsets


def test_active_units_on_constructed_data():
    """Variances 1e-4, 5e-3, 0.0099 (below 1e-2) and 0.0101, 0.5, 2 (above): the last three
    are active; variance equals numpy's unbiased variance to 1e-13 relative."""
    variances = [1e-4, 5e-3, 0.0099, 0.0101, 0.5, 2.0]
    means = _posterior_means(variances)
    result = active_units(means)
    assert isinstance(result, ActiveUnits)
    assert result.mask.tolist() == [False, False, False, True, True, True]
    assert result.count == 3 == int(result.mask.sum())
    assert result.mask.dtype == torch.bool and result.variance.shape == (6,)
    np.testing.assert_allclose(result.variance.numpy(), np.var(means.numpy(), axis=0, ddof=1))
    np.testing.assert_allclose(result.variance.numpy(), variances, rtol=1e-13)


def test_active_units_threshold_and_unbiasedness():
    """Threshold is strict and user-set; the variance uses the N - 1 divisor (two rows
    [0, 1] give 0.5, not 0.25)."""
    means = torch.tensor([[0.0, 1.0, 5.0], [1.0, 1.0, 5.0]])
    result = active_units(means, threshold=0.0)
    assert result.variance.tolist() == [0.5, 0.0, 0.0]
    assert result.mask.tolist() == [True, False, False] and result.count == 1
    assert active_units(means, threshold=0.5).count == 0  # 0.5 is not > 0.5
    assert active_units(means, threshold=0.49).count == 1


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_active_units_half_precision(dtype):
    means = _posterior_means([1e-4, 1.0], n=64).to(dtype)
    result = active_units(means)
    assert result.variance.dtype == torch.float32
    assert result.mask.tolist() == [False, True]


def test_active_units_errors():
    with pytest.raises(ValueError, match=r"posterior_loc must have shape \(N, L\) .* got \(5,\)"):
        active_units(torch.zeros(5))
    with pytest.raises(ValueError, match=r"N >= 2, got \(1, 3\)"):
        active_units(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"threshold must be a non-negative number, got -0\.1"):
        active_units(torch.zeros(4, 3), threshold=-0.1)
    with pytest.raises(ValueError, match=r"posterior_loc of shape \(2, 2\) contains 1 NaN"):
        active_units(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(TypeError, match="floating"):
        active_units(torch.zeros(4, 3, dtype=torch.int64))


def test_kl_per_dimension():
    """Mean over every leading dim; the per-dimension values add up to the mean per-example
    KL (the rate)."""
    gen = torch.Generator().manual_seed(3)
    loc, log_var = torch.randn(2, 4, 5, 3, generator=gen, dtype=torch.float64)
    per_dim = gaussian_kl_per_dim(loc, log_var)  # (S=4, B=5, L=3)
    out = kl_per_dimension(per_dim)
    assert out.shape == (3,)
    assert torch.allclose(out, per_dim.mean(dim=(0, 1)), rtol=1e-15)
    assert torch.allclose(out.sum(), gaussian_kl(loc, log_var).mean(), rtol=1e-14)
    assert kl_per_dimension(torch.tensor([[0.0, 1.0], [0.0, 3.0]])).tolist() == [0.0, 2.0]
    one = torch.tensor([1.0, 2.0])
    assert torch.equal(kl_per_dimension(one), one)
    assert kl_per_dimension(one.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="0-dimensional"):
        kl_per_dimension(torch.tensor(1.0))


def test_rate_distortion_arithmetic():
    """Rate = mean KL, distortion = -mean log-likelihood, ELBO = -(R + D) = mean(ll - kl)."""
    ll = torch.tensor([-100.0, -80.0, -91.5])
    kl = torch.tensor([10.0, 14.0, 1.5])
    result = rate_distortion(ll, kl)
    assert isinstance(result, RateDistortion)
    assert result == (8.5, 90.5, -99.0)
    assert result.elbo == pytest.approx(float((ll - kl).mean()), rel=1e-7)
    assert all(isinstance(v, float) for v in result)


def test_rate_distortion_shape_errors():
    with pytest.raises(ValueError, match=r"reconstruction_log_likelihood \(3,\), kl \(2,\)"):
        rate_distortion(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"reconstruction_log_likelihood \(3, 1\), kl \(3, 1\)"):
        rate_distortion(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"empty \(N = 0\)"):
        rate_distortion(torch.zeros(0), torch.zeros(0))
