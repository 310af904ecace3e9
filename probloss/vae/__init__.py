"""VAE objectives: reconstruction likelihoods, KL terms, the ELBO, KL weighting strategies.

The reduction of every term is explicit, the ELBO is reported in
nats per example and bits per dimension, and the balancing strategies from the literature
(beta-VAE, KL annealing, cyclical annealing, free bits, capacity, GECO, sigma-VAE) are
composable pieces that switch in one line.
"""

from .constrained import GECO, Capacity
from .diagnostics import (
    ActiveUnits,
    RateDistortion,
    active_units,
    kl_per_dimension,
    rate_distortion,
)
from .elbo import ELBO, ELBOResult, elbo
from .kl import gaussian_kl, gaussian_kl_per_dim, monte_carlo_kl, monte_carlo_kl_per_dim
from .reconstruction import (
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    gaussian_log_likelihood,
    laplace_log_likelihood,
)
from .schedules import (
    Constant,
    CyclicalAnnealing,
    ExponentialApproach,
    LinearWarmup,
    Schedule,
    SigmoidAnnealing,
)
from .sigma_vae import sigma_vae_log_likelihood, sigma_vae_log_scale
from .weighting import Beta, FreeBits, WeightedLoss, Weighting, normalised_beta

__all__ = [
    "ELBO",
    "GECO",
    "ActiveUnits",
    "Beta",
    "Capacity",
    "Constant",
    "CyclicalAnnealing",
    "ELBOResult",
    "ExponentialApproach",
    "FreeBits",
    "LinearWarmup",
    "RateDistortion",
    "Schedule",
    "SigmoidAnnealing",
    "WeightedLoss",
    "Weighting",
    "active_units",
    "bernoulli_log_likelihood",
    "continuous_bernoulli_log_likelihood",
    "elbo",
    "gaussian_kl",
    "gaussian_kl_per_dim",
    "gaussian_log_likelihood",
    "kl_per_dimension",
    "laplace_log_likelihood",
    "monte_carlo_kl",
    "monte_carlo_kl_per_dim",
    "normalised_beta",
    "rate_distortion",
    "sigma_vae_log_likelihood",
    "sigma_vae_log_scale",
]
