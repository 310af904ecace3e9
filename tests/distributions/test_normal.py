"""probloss.distributions.Normal: log-scale parameterisation and log-space log_prob.

References: scipy.stats.norm (float64) and the closed forms; torch's Normal shown failing.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from probloss.distributions import Normal
from probloss.functional.normal import normal_log_prob


def test_log_prob_and_entropy_match_scipy():
    """float64, relative 1e-14."""
    loc = torch.tensor([0.0, 1.0, -3.0], dtype=torch.float64)
    log_scale = torch.tensor([0.0, -2.0, 3.0], dtype=torch.float64)
    x = torch.tensor([0.5, 1.1, 100.0], dtype=torch.float64)
    d = Normal(loc, log_scale)
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
    with pytest.raises(ValueError, match="exactly one"):
        Normal(0.0)
    with pytest.raises(ValueError, match="exactly one"):
        Normal(0.0, 1.0, scale=1.0)
    with pytest.raises(ValueError, match="positive"):
        Normal(torch.zeros(2), scale=torch.tensor([1.0, -1.0]))


def test_expand_sample_and_kl_interop():
    d = Normal(torch.zeros(3), torch.zeros(3))
    e = d.expand((2, 3))
    assert e.batch_shape == (2, 3) and e.log_scale.shape == (2, 3)
    assert d.rsample((4,)).shape == (4, 3)
    p = torch.distributions.Normal(torch.ones(3), torch.ones(3))
    torch.testing.assert_close(torch.distributions.kl_divergence(d, p), torch.full((3,), 0.5))


def test_half_precision_log_prob_is_float32():
    d = Normal(torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float16))
    assert d.log_prob(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32
    assert d.entropy().dtype == torch.float32
