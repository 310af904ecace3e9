"""``torch.distributions.Distribution`` subclasses that call the functional core."""

from .bivariate_normal import BivariateNormal
from .continuous_bernoulli import ContinuousBernoulli
from .mixture import BivariateNormalMixture, MultivariateNormalMixture, NormalMixture
from .normal import Normal

__all__ = [
    "BivariateNormal",
    "BivariateNormalMixture",
    "ContinuousBernoulli",
    "MultivariateNormalMixture",
    "Normal",
    "NormalMixture",
]
