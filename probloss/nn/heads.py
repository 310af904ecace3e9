"""Heads: modules that map features to a distribution (``loss = -head(x).log_prob(y)``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributions.bivariate_normal import BivariateNormal
from ..distributions.normal import Normal
from ..special import log_softplus, softplus_inverse


def _log_scale(raw: Tensor, min_scale: float) -> Tensor:
    """``log(softplus(raw) + min_scale)``, finite for every raw value."""
    if min_scale > 0:
        # log(softplus(raw) + m) = logaddexp(log_softplus(raw), log m): no log(0).
        return torch.logaddexp(log_softplus(raw), torch.tensor(min_scale, dtype=raw.dtype).log())
    return log_softplus(raw)


def _raw_for_scale(init_scale: float, min_scale: float) -> float:
    """The raw bias that makes ``softplus(raw) + min_scale == init_scale``."""
    if not init_scale > min_scale:
        raise ValueError(f"init_scale ({init_scale}) must exceed min_scale ({min_scale})")
    return float(softplus_inverse(torch.tensor(init_scale - min_scale, dtype=torch.float64)))


class NormalHead(nn.Module):
    r"""Features ``(*, in_features)`` to a diagonal :class:`~probloss.distributions.Normal`.

    A linear layer predicts ``loc`` and a raw scale for each of ``out_features`` outputs;
    ``scale = softplus(raw) + min_scale``, formed as a log-scale
    (:func:`~probloss.special.log_softplus`) so it never rounds to ``log 0``. The raw-scale
    bias starts at ``softplus_inverse(init_scale - min_scale)`` and its weights at zero-mean
    small values, so training starts at ``scale ~= init_scale`` everywhere.

    Returns a distribution with batch shape ``(*, out_features)``; a loss is
    ``-head(x).log_prob(y).mean()``. Like every head: an empty batch ``(0, in_features)``
    gives an empty distribution, and a half-precision head (``head.half()``) gives a
    float32 ``log_prob`` and samples in its own dtype.

    Example:
        >>> head = NormalHead(8, 3, init_scale=0.5)
        >>> d = head(torch.zeros(4, 8))
        >>> d.loc.shape, d.scale[0]
        (torch.Size([4, 3]), tensor([0.5000, 0.5000, 0.5000], grad_fn=<SelectBackward0>))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        init_scale: float = 1.0,
        min_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.min_scale = min_scale
        self.linear = nn.Linear(in_features, 2 * out_features)
        with torch.no_grad():
            self.linear.bias[out_features:].fill_(_raw_for_scale(init_scale, min_scale))

    def forward(self, features: Tensor) -> Normal:
        loc, raw = self.linear(features).split(self.out_features, dim=-1)
        return Normal(loc, _log_scale(raw, self.min_scale))


class BivariateNormalHead(nn.Module):
    r"""Features ``(*, in_features)`` to a correlated 2-D :class:`BivariateNormal`.

    Five outputs per input: ``loc`` (2), raw scales (2) and ``atanh_rho`` (1), the Graves
    (2013) / sketch-rnn parameterisation without its ``exp`` and ``tanh`` round trips:
    ``scale = softplus(raw) + min_scale`` as a log-scale, ``rho = tanh(atanh_rho)`` never
    formed. Biases start at ``scale = init_scale`` and ``rho = 0``. An empty batch gives
    an empty distribution; a half-precision head gives a float32 ``log_prob`` and samples
    in its own dtype.

    Example:
        >>> head = BivariateNormalHead(16, init_scale=0.1)
        >>> d = head(torch.zeros(5, 16))
        >>> d.batch_shape, d.event_shape
        (torch.Size([5]), torch.Size([2]))
    """

    def __init__(
        self, in_features: int, *, init_scale: float = 1.0, min_scale: float = 0.0
    ) -> None:
        super().__init__()
        self.min_scale = min_scale
        self.linear = nn.Linear(in_features, 5)
        with torch.no_grad():
            self.linear.bias[2:4].fill_(_raw_for_scale(init_scale, min_scale))
            self.linear.bias[4].zero_()

    def forward(self, features: Tensor) -> BivariateNormal:
        out = self.linear(features)
        loc, raw, atanh_rho = out[..., 0:2], out[..., 2:4], out[..., 4]
        return BivariateNormal(loc, _log_scale(raw, self.min_scale), atanh_rho)
