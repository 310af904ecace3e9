"""Log densities, divergences and losses as pure tensor functions (value first, unreduced)."""

from .bivariate import bivariate_normal_log_prob, bivariate_normal_nll
from .continuous_bernoulli import (
    continuous_bernoulli_cdf,
    continuous_bernoulli_icdf,
    continuous_bernoulli_log_prob,
)
from .divergence import bernoulli_kl, bivariate_normal_kl, continuous_bernoulli_kl, normal_kl
from .laplace import laplace_log_prob
from .lowrank import lowrank_multivariate_normal_log_prob
from .mixture import (
    bivariate_normal_mixture_covariance,
    bivariate_normal_mixture_log_prob,
    bivariate_normal_mixture_mean,
    bivariate_normal_mixture_mode,
    bivariate_normal_mixture_nll,
    bivariate_normal_mixture_sample,
    mixture_log_prob,
    multivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
    normal_mixture_mean,
    normal_mixture_mode,
    normal_mixture_nll,
    normal_mixture_sample,
    normal_mixture_variance,
)
from .multivariate import multivariate_normal_log_prob, scale_tril_from_raw
from .normal import normal_log_prob, normal_nll
from .student_t import student_t_log_prob

__all__ = [
    "bernoulli_kl",
    "bivariate_normal_kl",
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
