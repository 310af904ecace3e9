"""Soft floors: a lower bound that keeps a gradient, instead of a clamp that kills it."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dtype import as_float_tensor, upcast


def softplus(x: Tensor) -> Tensor:
    r"""``log(1 + exp(x))``, exact for every ``x`` (no threshold switch).

    ``torch.nn.functional.softplus`` returns ``x`` itself above ``threshold=20``, dropping
    ``log1p(exp(-x))`` (a relative 2e-10 in float64); here
    :math:`\operatorname{softplus}(x) = -\log\sigma(-x)` through ``logsigmoid``, exact
    everywhere. Returns the input dtype (half inputs evaluated in float32).

    Example:
        >>> softplus(torch.tensor([-100.0, 0.0, 30.0], dtype=torch.float64))
        tensor([3.7201e-44, 6.9315e-01, 3.0000e+01], dtype=torch.float64)
    """
    x = as_float_tensor(x, "x")
    return (-torch.nn.functional.logsigmoid(-upcast(x))).to(x.dtype)


def soft_floor(x: Tensor, floor: float | Tensor) -> Tensor:
    r"""A smooth lower bound: ``floor + softplus(x - floor)``.

    .. math::
        \operatorname{soft\_floor}(x, m) = m + \log(1 + e^{x - m}) > m,
        \qquad \frac{d}{dx} = \sigma(x - m) \in (0, 1)

    Far above the floor it is ``x`` (error ``e^{-(x - m)}``); at the floor it is
    ``m + log 2``; below it tends to ``m`` with a gradient that shrinks smoothly instead of
    vanishing at a kink as ``clamp(x, min=m)``'s does. ``softplus`` has unit width, so apply
    it to quantities on a unit scale, such as a log-scale: in log space it is exactly an
    additive floor, ``soft_floor(log s, log m) = log(s + m)``, which is how probloss floors
    scales and variances (``min_scale``, ``eps``) without changing the objective by more
    than ``m`` in the scale.

    Args:
        x: tensor of shape ``(*)``.
        floor: the bound, a number or a tensor broadcastable with ``x``.

    Returns:
        Tensor of the broadcast shape.

    Example:
        >>> log_scale = torch.tensor([-30.0, 0.0, 5.0])
        >>> soft_floor(log_scale, -7.0).exp()  # = exp(log_scale) + exp(-7)
        tensor([9.1188e-04, 1.0009e+00, 1.4841e+02])
    """
    x = as_float_tensor(x, "x")
    return floor + softplus(x - floor)
