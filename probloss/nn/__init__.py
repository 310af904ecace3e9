"""Loss modules (settings in ``__init__``, ``forward`` is one core call) and heads.

Every head returns one kind of thing, a probloss distribution; every loss takes the value
(target) first. ``MixtureDensityOutput`` was removed: the head with pen states returns a
:class:`~probloss.distributions.StrokeMixture`.
"""

from . import mixture as _mixture
from .heads import BivariateNormalHead, NormalHead
from .losses import BivariateNormalNLLLoss, GaussianNLLLoss, NormalNLLLoss
from .mixture import MixtureDensityHead, MixtureNLLLoss

__all__ = [
    "BivariateNormalHead",
    "BivariateNormalNLLLoss",
    "GaussianNLLLoss",
    "MixtureDensityHead",
    "MixtureNLLLoss",
    "NormalHead",
    "NormalNLLLoss",
]


def __getattr__(name: str) -> object:
    if name in _mixture._REMOVED:  # a removed name: an AttributeError saying what replaced it
        raise AttributeError(_mixture._REMOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
