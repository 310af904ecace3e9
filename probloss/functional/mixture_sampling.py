"""Moved: the samplers and modes are in :mod:`probloss.functional.mixture.sampling`, the
means, variances and covariances in :mod:`probloss.functional.mixture.moments` (every
name is also ``probloss.functional.<name>``). Kept so that old imports keep working."""

from .mixture.moments import (
    bivariate_normal_mixture_covariance,
    bivariate_normal_mixture_mean,
    normal_mixture_mean,
    normal_mixture_variance,
)
from .mixture.sampling import (
    bivariate_normal_mixture_mode,
    bivariate_normal_mixture_sample,
    normal_mixture_mode,
    normal_mixture_sample,
)

__all__ = [
    "bivariate_normal_mixture_covariance",
    "bivariate_normal_mixture_mean",
    "bivariate_normal_mixture_mode",
    "bivariate_normal_mixture_sample",
    "normal_mixture_mean",
    "normal_mixture_mode",
    "normal_mixture_sample",
    "normal_mixture_variance",
]
