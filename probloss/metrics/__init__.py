"""Proper scoring rules as exact, differentiable training losses and evaluation metrics.

Every function is unreduced and takes the value (observation) first, like the rest of
probloss: average the result for a training loss.
"""

from .crps import crps_laplace, crps_logistic, crps_normal
from .crps_mixture import crps_normal_mixture
from .ensemble import crps_ensemble

__all__ = [
    "crps_ensemble",
    "crps_laplace",
    "crps_logistic",
    "crps_normal",
    "crps_normal_mixture",
]
