"""A normal distribution parameterised by its log-scale, computed in log space."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .._validation import distribution_validate_args
from ..functional.normal import normal_log_prob

_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


class Normal(torch.distributions.Normal):
    r"""``torch.distributions.Normal`` parameterised by ``log_scale``, with log-space ``log_prob``.

    .. math::
        \log p(x) = -\tfrac12 z^2 - \log\sigma - \tfrac12\log 2\pi,
        \qquad z = (x - \mu)\, e^{-\log\sigma}

    ``log_prob`` and ``entropy`` come from ``log_scale`` directly (no ``log(scale)`` of an
    ``exp`` that under- or overflows: ``log_scale = -120`` is fine in float32) and, for
    half-precision parameters, are returned in float32. Sampling, ``cdf``, ``icdf`` and
    the KL registry are torch's (a subclass keeps ``kl_divergence`` with other normals).

    Args:
        loc: mean, any shape.
        log_scale: log standard deviation, broadcastable with ``loc``.
        scale: alternatively the standard deviation (positive); pass exactly one.
        validate_args: as in ``torch.distributions``.

    Example:
        >>> d = Normal(torch.tensor(0.0), log_scale=torch.tensor(-120.0))
        >>> d.log_prob(torch.tensor(0.0)), d.scale  # torch's Normal cannot even be built
        (tensor(119.0811), tensor(0.))
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "log_scale": constraints.real,
    }

    def __init__(
        self,
        loc: Tensor | float,
        log_scale: Tensor | float | None = None,
        *,
        scale: Tensor | float | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (log_scale is None) == (scale is None):
            raise ValueError("pass exactly one of log_scale and scale")
        if log_scale is None:
            loc, scale = broadcast_all(loc, scale)
            if distribution_validate_args(validate_args, scale) and not (scale > 0).all():
                raise ValueError(f"scale of shape {tuple(scale.shape)} must be positive")
            log_scale = torch.log(scale)
        loc, log_scale = broadcast_all(loc, log_scale)
        self.log_scale = log_scale
        validate_args = distribution_validate_args(validate_args, loc, log_scale)
        super().__init__(loc, log_scale.exp(), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> Normal:
        new = self._get_checked_instance(Normal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.log_scale = self.log_scale.expand(batch_shape)
        torch.distributions.Distribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return normal_log_prob(value, self.loc, log_scale=self.log_scale, validate_args=False)

    def entropy(self) -> Tensor:
        log_scale = self.log_scale
        if log_scale.dtype in (torch.float16, torch.bfloat16):
            log_scale = log_scale.float()
        return _HALF_LOG_2PI_E + log_scale  # 1/2 log(2 pi e sigma^2)
