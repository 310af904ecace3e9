"""Loss modules (settings in ``__init__``, ``forward`` is one core call) and heads."""

from .heads import BivariateNormalHead, NormalHead
from .losses import BivariateNormalNLLLoss, GaussianNLLLoss, NormalNLLLoss
from .mixture import MixtureDensityHead, MixtureDensityOutput, MixtureNLLLoss

__all__ = [
    "BivariateNormalHead",
    "BivariateNormalNLLLoss",
    "GaussianNLLLoss",
    "MixtureDensityHead",
    "MixtureDensityOutput",
    "MixtureNLLLoss",
    "NormalHead",
    "NormalNLLLoss",
]
