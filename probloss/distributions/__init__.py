"""``torch.distributions.Distribution`` subclasses that call the functional core."""

from .continuous_bernoulli import ContinuousBernoulli

__all__ = ["ContinuousBernoulli"]
