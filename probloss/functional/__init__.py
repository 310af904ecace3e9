"""Log densities, divergences and losses as pure tensor functions (value first, unreduced)."""

from .bernoulli import (
    continuous_bernoulli_cdf,
    continuous_bernoulli_icdf,
    continuous_bernoulli_log_prob,
)
from .divergence import bernoulli_kl, continuous_bernoulli_kl

__all__ = [
    "bernoulli_kl",
    "continuous_bernoulli_cdf",
    "continuous_bernoulli_icdf",
    "continuous_bernoulli_kl",
    "continuous_bernoulli_log_prob",
]
