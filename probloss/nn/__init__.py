"""Loss modules (settings in ``__init__``, ``forward`` is one core call) and heads."""

from .heads import BivariateNormalHead, NormalHead
from .losses import BivariateNormalNLLLoss, GaussianNLLLoss, NormalNLLLoss

__all__ = [
    "BivariateNormalHead",
    "BivariateNormalNLLLoss",
    "GaussianNLLLoss",
    "NormalHead",
    "NormalNLLLoss",
]
