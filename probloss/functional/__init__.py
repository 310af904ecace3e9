"""Log densities, divergences and losses as pure tensor functions (value first, unreduced)."""

from .bernoulli import (
    continuous_bernoulli_cdf,
    continuous_bernoulli_icdf,
    continuous_bernoulli_log_prob,
)
from .bivariate import bivariate_normal_log_prob, bivariate_normal_nll
from .divergence import bernoulli_kl, continuous_bernoulli_kl, normal_kl
from .mixture import (
    bivariate_normal_mixture_log_prob,
    bivariate_normal_mixture_nll,
    mixture_log_prob,
    multivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
    normal_mixture_nll,
)
from .mixture_sampling import (
    bivariate_normal_mixture_covariance,
    bivariate_normal_mixture_mean,
    bivariate_normal_mixture_mode,
    bivariate_normal_mixture_sample,
    normal_mixture_mean,
    normal_mixture_mode,
    normal_mixture_sample,
    normal_mixture_variance,
)
from .multivariate import (
    lowrank_multivariate_normal_log_prob,
    multivariate_normal_log_prob,
    scale_tril_from_raw,
)
from .normal import laplace_log_prob, normal_log_prob, normal_nll, student_t_log_prob

__all__ = [
    "bernoulli_kl",
    "bivariate_normal_log_prob",
    "bivariate_normal_mixture_covariance",
    "bivariate_normal_mixture_log_prob",
    "bivariate_normal_mixture_mean",
    "bivariate_normal_mixture_mode",
    "bivariate_normal_mixture_nll",
    "bivariate_normal_mixture_sample",
    "bivariate_normal_nll",
    "continuous_bernoulli_cdf",
    "continuous_bernoulli_icdf",
    "continuous_bernoulli_kl",
    "continuous_bernoulli_log_prob",
    "laplace_log_prob",
    "lowrank_multivariate_normal_log_prob",
    "mixture_log_prob",
    "multivariate_normal_log_prob",
    "multivariate_normal_mixture_log_prob",
    "normal_kl",
    "normal_log_prob",
    "normal_mixture_log_prob",
    "normal_mixture_mean",
    "normal_mixture_mode",
    "normal_mixture_nll",
    "normal_mixture_sample",
    "normal_mixture_variance",
    "normal_nll",
    "scale_tril_from_raw",
    "student_t_log_prob",
]
