"""Heads: modules that map features to a distribution (``loss = -head(x).log_prob(y)``).

Every head returns one kind of thing whatever its options: a distribution over the whole
target point (event shape ``(D,)``) with ``log_prob`` (one value per point), ``sample`` and
``mean``, so ``-head(x).log_prob(y).mean()`` and ``MixtureNLLLoss()(y, head(x))`` average
over points, the unit of every probloss loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._core.dtype import upcast
from ..distributions._independent import EventIndependent
from ..distributions.bivariate_normal import BivariateNormal
from ..distributions.normal import Normal
from ..special import log_softplus, softplus_inverse
from ._options import ShowOptions, check_init_scale, check_number, check_size


def _log_scale(raw: Tensor, min_scale: float) -> Tensor:
    """``log(softplus(raw) + min_scale)``, finite for every raw value."""
    if min_scale > 0:
        # softplus(raw) + m >= m > 0 has no cancellation and no log(0): the log has the same
        # absolute error (an ulp of the result) as logaddexp(log_softplus(raw), log m), at
        # a third of the cost (softplus as -logsigmoid(-raw): exact for every raw)
        wide = upcast(raw)  # half precision evaluated in float32, rounded once
        return torch.log(-torch.nn.functional.logsigmoid(-wide) + min_scale).to(raw.dtype)
    return log_softplus(raw)


def _raw_for_scale(init_scale: float, min_scale: float) -> float:
    """The raw bias that makes ``softplus(raw) + min_scale == init_scale``."""
    return float(softplus_inverse(torch.tensor(init_scale - min_scale, dtype=torch.float64)))


def _scale_options(init_scale: object, min_scale: object) -> tuple[float, float]:
    """``(init_scale, min_scale)`` checked: ``min_scale >= 0`` finite, ``init_scale >
    min_scale`` finite (the initial ``softplus(raw) + min_scale`` must reach it)."""
    floor = check_number("min_scale", min_scale, low=0.0)
    return check_init_scale(init_scale, floor), floor


class NormalHead(ShowOptions, nn.Module):
    r"""Features ``(*, in_features)`` to a diagonal normal over ``out_features`` outputs.

    .. math::
        \log p(y \mid h) = \sum_{d=1}^{D} \log\mathcal N\big(y_d \mid \mu_d(h),
            \sigma_d(h)^2\big), \qquad \sigma = \operatorname{softplus}(r) + m

    A linear layer predicts ``loc`` and a raw scale :math:`r` for each of the
    ``D = out_features`` outputs; :math:`\sigma` is formed as a log-scale
    (:func:`~probloss.special.log_softplus`, with ``m = min_scale`` added in log space) so
    it never rounds to ``log 0``. The raw-scale bias starts at
    ``softplus_inverse(init_scale - min_scale)`` and its weights at zero-mean small values,
    so training starts at ``scale ~= init_scale`` everywhere.

    Returns a ``torch.distributions.Independent`` (the subclass
    ``probloss.distributions._independent.EventIndependent``, which also sums an empty
    batch) of a probloss
    :class:`~probloss.distributions.Normal` (``.base_dist``, with ``loc`` and ``scale``):
    batch shape ``(*)``, event shape ``(out_features,)``, ``log_prob`` one value per target
    point (the sum over its coordinates), so ``-head(x).log_prob(y).mean()`` averages over
    points, like every probloss loss. An empty batch ``(0, in_features)`` gives an empty
    distribution; a half-precision head (``head.half()``) gives a float32 ``log_prob`` and
    samples in its own dtype.

    Args:
        in_features: size of the last dimension of the features.
        out_features: the target dimension ``D``.
        init_scale: the initial scale, ``> min_scale``, in the units of the target.
        min_scale: soft floor ``m >= 0`` on the scale.

    Raises:
        ValueError: a size that is not a positive int, ``min_scale`` negative or not
            finite, ``init_scale <= min_scale``.

    Example:
        >>> head = NormalHead(8, 3, init_scale=0.5)
        >>> d = head(torch.zeros(4, 8))
        >>> d.batch_shape, d.event_shape
        (torch.Size([4]), torch.Size([3]))
        >>> d.base_dist.scale[0]
        tensor([0.5000, 0.5000, 0.5000], grad_fn=<SelectBackward0>)
        >>> d.log_prob(torch.zeros(4, 3)).shape  # one value per point
        torch.Size([4])
    """

    _shown = ("in_features", "out_features", "min_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        init_scale: float = 1.0,
        min_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = check_size("in_features", in_features)
        self.out_features = check_size("out_features", out_features)
        init_scale, self.min_scale = _scale_options(init_scale, min_scale)
        self.linear = nn.Linear(in_features, 2 * out_features)
        with torch.no_grad():
            self.linear.bias[out_features:].fill_(_raw_for_scale(init_scale, self.min_scale))

    def forward(self, features: Tensor) -> EventIndependent:
        loc, raw = self.linear(features).split(self.out_features, dim=-1)
        # validation happens in the base Normal (CPU tensors by default), which checks values
        normal = Normal(loc, log_scale=_log_scale(raw, self.min_scale))
        return EventIndependent(normal, 1, validate_args=False)


class BivariateNormalHead(ShowOptions, nn.Module):
    r"""Features ``(*, in_features)`` to a correlated 2-D :class:`BivariateNormal`.

    Five outputs per input: ``loc`` (2), raw scales (2) and ``atanh_rho`` (1), the Graves
    (2013) / sketch-rnn parameterisation without its ``exp`` and ``tanh`` round trips:
    ``scale = softplus(raw) + min_scale`` as a log-scale, ``rho = tanh(atanh_rho)`` never
    formed. Biases start at ``scale = init_scale`` and ``rho = 0``. The distribution has
    batch shape ``(*)`` and event shape ``(2,)``: ``log_prob`` is one value per point, so
    ``-head(x).log_prob(y).mean()`` averages over points. An empty batch gives an empty
    distribution; a half-precision head gives a float32 ``log_prob`` and samples in its
    own dtype.

    Args:
        in_features: size of the last dimension of the features.
        init_scale: the initial scale of both coordinates, ``> min_scale``.
        min_scale: soft floor ``m >= 0`` on the scales.

    Raises:
        ValueError: ``in_features`` not a positive int, ``min_scale`` negative or not
            finite, ``init_scale <= min_scale``.

    Example:
        >>> head = BivariateNormalHead(16, init_scale=0.1)
        >>> d = head(torch.zeros(5, 16))
        >>> d.batch_shape, d.event_shape
        (torch.Size([5]), torch.Size([2]))
    """

    _shown = ("in_features", "min_scale")

    def __init__(
        self, in_features: int, *, init_scale: float = 1.0, min_scale: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features = check_size("in_features", in_features)
        init_scale, self.min_scale = _scale_options(init_scale, min_scale)
        self.linear = nn.Linear(in_features, 5)
        with torch.no_grad():
            self.linear.bias[2:4].fill_(_raw_for_scale(init_scale, self.min_scale))
            self.linear.bias[4].zero_()

    def forward(self, features: Tensor) -> BivariateNormal:
        out = self.linear(features)
        loc, raw, atanh_rho = out[..., 0:2], out[..., 2:4], out[..., 4]
        return BivariateNormal(loc, _log_scale(raw, self.min_scale), atanh_rho)
