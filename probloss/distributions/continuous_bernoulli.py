"""The continuous Bernoulli with torch's signature (``probs`` first), computed from logits."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import broadcast_all, lazy_property

from .._core.dtype import upcast
from .._core.validation import distribution_validate_args, set_validation
from ..functional.continuous_bernoulli import (
    continuous_bernoulli_cdf,
    continuous_bernoulli_icdf,
    continuous_bernoulli_log_prob,
)
from ..special import cb_entropy, cb_mean, cb_variance


class ContinuousBernoulli(Distribution):
    r"""Continuous Bernoulli distribution on ``[0, 1]`` (Loaiza-Ganem & Cunningham 2019).

    .. math::
        p(x \mid \eta) = \frac{\eta}{e^\eta - 1} e^{\eta x}, \qquad x \in [0, 1],
        \qquad \eta = \operatorname{logit}(\lambda)

    A drop-in for ``torch.distributions.ContinuousBernoulli`` with torch's signature and
    positional order: ``ContinuousBernoulli(0.3)`` has ``probs`` (the paper's
    :math:`\lambda`) 0.3; the stable form is the keyword ``logits=`` (the natural parameter
    :math:`\eta`), in which everything is computed. Unlike torch's class, nothing is
    computed from clamped probabilities or a Taylor window: mean, variance, entropy,
    ``log_prob``, ``cdf``, ``icdf``, ``rsample`` and the KL divergence
    (:func:`~probloss.functional.continuous_bernoulli_kl`, registered in
    :mod:`probloss.distributions.kl` with probloss's and torch's class) are exact for every
    finite logit (torch's mean saturates at 0.937 beyond ``|logits|`` ~ 17 in float32).

    ``log_prob`` and ``entropy`` of half-precision logits are returned in float32; mean,
    variance and samples keep the dtype of ``logits``.

    Args:
        probs: :math:`\lambda` in ``(0, 1)``, any shape (the batch shape); converted to
            logits once (``log p - log1p(-p)``, less stable near 0 and 1) and kept as given.
        logits: keyword alternative, the natural parameter :math:`\eta` (any real);
            ``sigmoid(logits)`` is :math:`\lambda`. Pass exactly one of ``probs`` and
            ``logits``.
        lims: accepted for torch compatibility and unused (torch evaluates a Taylor
            expansion for ``probs`` inside ``lims``; the forms here need none).
        validate_args: as in ``torch.distributions`` (checks CPU tensors only by default).

    Raises:
        ValueError: not exactly one of ``probs`` / ``logits``; ``probs`` outside ``(0, 1)``
            or a NaN logit when validating.

    Example:
        >>> ContinuousBernoulli(0.3).probs  # positional: probs, as in torch
        tensor(0.3000)
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
        probs: Tensor | float | None = None,
        logits: Tensor | float | None = None,
        lims: tuple[float, float] = (0.499, 0.501),
        validate_args: bool | None = None,
    ) -> None:
        if (logits is None) == (probs is None):
            raise ValueError(
                "ContinuousBernoulli: pass exactly one of probs (positional, as in torch) and "
                "logits"
            )
        self._lims = lims
        if probs is not None:
            (probs,) = broadcast_all(probs)
            if (
                distribution_validate_args(validate_args, probs)
                and ((probs <= 0) | (probs >= 1)).any()
            ):
                raise ValueError(
                    f"probs of shape {tuple(probs.shape)} must lie in (0, 1); the first "
                    "positional argument is probs, as in torch: pass logits as logits= (also "
                    "for the limits)"
                )
            self.probs = probs  # kept as given, like torch (shadows the lazy sigmoid)
            logits = torch.log(probs) - torch.log1p(-probs)  # logit(p)
        (self.logits,) = broadcast_all(logits)
        validate_args = distribution_validate_args(validate_args, self.logits)
        super().__init__(self.logits.shape, validate_args=False)  # checked next, faster
        set_validation(self, validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> ContinuousBernoulli:
        new = self._get_checked_instance(ContinuousBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new._lims = self._lims
        new.logits = self.logits.expand(batch_shape)
        if "probs" in self.__dict__:
            new.probs = self.probs.expand(batch_shape)
        super(ContinuousBernoulli, new).__init__(batch_shape, validate_args=False)
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
        return cb_entropy(upcast(self.logits))  # half: computed and returned in float32

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
