"""``torch.distributions.Distribution`` subclasses that call the functional core.

Classes that share a name with torch's keep torch's positional meaning (``Normal(loc,
scale)``, ``ContinuousBernoulli(probs)``) and take the stable form by keyword
(``log_scale=``, ``logits=``); probloss-only classes take the functional core's order.
Importing this package registers every closed-form KL divergence (:mod:`.kl`).
"""

from . import kl  # noqa: F401  (registers the KL divergences with torch)
from .bivariate_normal import BivariateNormal
from .continuous_bernoulli import ContinuousBernoulli
from .mixture import BivariateNormalMixture, MultivariateNormalMixture, NormalMixture
from .normal import Normal
from .stroke import StrokeMixture

__all__ = [
    "BivariateNormal",
    "BivariateNormalMixture",
    "ContinuousBernoulli",
    "MultivariateNormalMixture",
    "Normal",
    "NormalMixture",
    "StrokeMixture",
]
