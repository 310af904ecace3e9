"""The continuous Bernoulli as a ``torch.distributions.Distribution``, computed from logits."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints, register_kl
from torch.distributions.utils import broadcast_all, lazy_property

from .._validation import distribution_validate_args
from ..functional.bernoulli import (
    continuous_bernoulli_cdf,
    continuous_bernoulli_icdf,
    continuous_bernoulli_log_prob,
)
from ..functional.divergence import continuous_bernoulli_kl
from ..special import cb_entropy, cb_mean, cb_variance


class ContinuousBernoulli(Distribution):
    r"""Continuous Bernoulli distribution on ``[0, 1]`` (Loaiza-Ganem & Cunningham 2019).

    .. math::
        p(x \mid \eta) = \frac{\eta}{e^\eta - 1} e^{\eta x}, \qquad x \in [0, 1]

    parameterised by its logit (natural parameter) :math:`\eta`. Unlike
    ``torch.distributions.ContinuousBernoulli``, nothing is computed from clamped
    probabilities: mean, variance, entropy, ``log_prob``, ``cdf``, ``icdf``, ``rsample`` and
    the KL divergence (registered with ``torch.distributions.kl_divergence``) are exact for
    every finite logit (torch's mean saturates at 0.937 beyond ``|logits|`` ~ 17 in float32).

    ``log_prob`` and ``entropy`` of half-precision logits are returned in float32 (DESIGN.md,
    half-precision policy); mean, variance and samples keep the dtype of ``logits``.

    Args:
        logits: natural parameter, any shape (the batch shape); ``sigmoid(logits)`` is the
            ``lambda`` of the paper.
        probs: alternatively ``lambda`` in ``(0, 1)``, converted to logits (less stable
            near 0 and 1). Pass exactly one of ``logits`` and ``probs``.
        validate_args: as in ``torch.distributions``.

    Example:
        >>> d = ContinuousBernoulli(logits=torch.tensor([-50.0, 0.0, 50.0]))
        >>> d.mean
        tensor([0.0200, 0.5000, 0.9800])
        >>> torch.distributions.kl_divergence(d, ContinuousBernoulli(logits=torch.zeros(3)))
        tensor([2.9120, 0.0000, 2.9120])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(
        self,
        logits: Tensor | float | None = None,
        probs: Tensor | float | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (logits is None) == (probs is None):
            raise ValueError("pass exactly one of logits and probs")
        if probs is not None:
            (probs,) = broadcast_all(probs)
            if (
                distribution_validate_args(validate_args, probs)
                and ((probs <= 0) | (probs >= 1)).any()
            ):
                raise ValueError(
                    f"probs of shape {tuple(probs.shape)} must lie in (0, 1); use logits "
                    "for the limits"
                )
            logits = torch.log(probs) - torch.log1p(-probs)
        (self.logits,) = broadcast_all(logits)
        validate_args = distribution_validate_args(validate_args, self.logits)
        super().__init__(self.logits.shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> ContinuousBernoulli:
        new = self._get_checked_instance(ContinuousBernoulli, _instance)
        new.logits = self.logits.expand(torch.Size(batch_shape))
        super(ContinuousBernoulli, new).__init__(new.logits.shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def probs(self) -> Tensor:
        """``sigmoid(logits)``, the ``lambda`` parameter of the paper."""
        return torch.sigmoid(self.logits)

    @property
    def param_shape(self) -> torch.Size:
        return self.logits.shape

    @property
    def mean(self) -> Tensor:
        return cb_mean(self.logits)

    @property
    def variance(self) -> Tensor:
        return cb_variance(self.logits)

    def entropy(self) -> Tensor:
        return cb_entropy(self.logits.float() if _is_half(self.logits) else self.logits)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return continuous_bernoulli_log_prob(value, self.logits, validate_args=False)

    def cdf(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return continuous_bernoulli_cdf(value, self.logits, validate_args=False)

    def icdf(self, value: Tensor) -> Tensor:
        return continuous_bernoulli_icdf(value, self.logits, validate_args=self._validate_args)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Reparameterised samples ``icdf(U)``, ``U ~ Uniform[0, 1)``; pathwise gradient."""
        shape = self._extended_shape(torch.Size(sample_shape))
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)
        return continuous_bernoulli_icdf(u, self.logits, validate_args=False)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


def _is_half(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


@register_kl(ContinuousBernoulli, ContinuousBernoulli)
def _kl_continuous_bernoulli(q: ContinuousBernoulli, p: ContinuousBernoulli) -> Tensor:
    return continuous_bernoulli_kl(q.logits, p.logits)
