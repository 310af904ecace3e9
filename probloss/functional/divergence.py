r"""KL divergences between distributions of the same family, in closed form from logits.

Each returns one value per element, unreduced, never negative, with finite gradients
wherever the parameters are finite. Half-precision inputs are computed and returned in
float32 (DESIGN.md, half-precision policy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtype import as_loss_tensors
from .._validation import broadcast_shapes
from ..special import cb_log_partition, cb_mean, cb_variance, softplus
from ._bregman import bregman_divergence


def bernoulli_kl(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    r"""``KL(Bernoulli(logits_q) || Bernoulli(logits_p))``, from logits.

    .. math::
        \mathrm{KL}(q \,\|\, p) = \operatorname{softplus}(\ell_p) - \operatorname{softplus}(\ell_q)
            - \sigma(\ell_q)(\ell_p - \ell_q)

    (the Bregman divergence of the Bernoulli log-partition ``softplus``), evaluated without
    forming probabilities: exact and with finite gradients when ``sigmoid`` saturates (logits
    30 against 0, or 1e4 against -1e4), non-negative near ``logits_q == logits_p``.

    Args:
        logits_q: logits of ``q``, shape broadcastable with ``logits_p``.
        logits_p: logits of ``p``.

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs.

    Example:
        >>> bernoulli_kl(torch.tensor([30.0, 0.0]), torch.tensor([0.0, 0.0]))
        tensor([0.6931, 0.0000])
    """
    logits_q, logits_p = as_loss_tensors(logits_q=logits_q, logits_p=logits_p)
    broadcast_shapes(logits_q=logits_q, logits_p=logits_p)
    return bregman_divergence(
        softplus,
        torch.sigmoid,
        lambda x, delta: delta.square() * torch.sigmoid(x) * torch.sigmoid(-x),
        logits_q,
        logits_p,
        near_width=2.0,
    )


def continuous_bernoulli_kl(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    r"""``KL(CB(logits_q) || CB(logits_p))`` between continuous Bernoulli distributions.

    .. math::
        \mathrm{KL}(q \,\|\, p) = A(\eta_p) - A(\eta_q) - \mu(\eta_q)(\eta_p - \eta_q)
            = \Delta^2 \int_0^1 (1 - t)\,\sigma^2(\eta_q + t\Delta)\,dt

    with :math:`A` = :func:`~probloss.special.cb_log_partition`, :math:`\mu` =
    :func:`~probloss.special.cb_mean`, :math:`\sigma^2` = :func:`~probloss.special.cb_variance`.
    The integral form (Gauss-Legendre) is used for :math:`|\Delta| \le \max(4, |\eta_q|/2)`,
    so the result is never negative and keeps its relative accuracy as ``q -> p``; the
    closed form elsewhere, reflected so no large terms cancel. ``torch.distributions``'
    version is built from clamped probabilities and is wrong (even negative) for
    ``|logits|`` beyond about 17 in float32.

    Args:
        logits_q: natural parameter of ``q``, shape broadcastable with ``logits_p``.
        logits_p: natural parameter of ``p``.

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs.

    Example:
        >>> continuous_bernoulli_kl(torch.tensor([50.0, 1.0]), torch.tensor([40.0, 1.0]))
        tensor([0.0231, 0.0000])
    """
    logits_q, logits_p = as_loss_tensors(logits_q=logits_q, logits_p=logits_p)
    broadcast_shapes(logits_q=logits_q, logits_p=logits_p)
    # |Delta| <= |eta_q| / 2 keeps p on q's side of 0, where 1/eta^2 dominates the variance
    # and the quadrature converges; the closed form then only meets |Delta| > |eta_q| / 2.
    near_width = torch.maximum(logits_q.abs() * 0.5, torch.tensor(4.0, dtype=logits_q.dtype))
    return bregman_divergence(
        cb_log_partition, cb_mean, _cb_curvature_times_square, logits_q, logits_p, near_width
    )


def _cb_curvature_times_square(eta: Tensor, delta: Tensor) -> Tensor:
    """``delta^2 var(eta)`` without overflow of ``delta^2`` or underflow of ``var``.

    For ``|eta| > 8`` it is ``(delta/eta)^2 (eta^2 var)`` with
    ``eta^2 var = 1 - eta^2 q (1 + q)``, ``q = 1/expm1(|eta|) = e^-a / (1 - e^-a)`` (from
    ``var = 1/eta^2 - q (1 + q)``), which tends to 1 instead of underflowing; on the
    quadrature branch ``|delta| <= |eta_q| / 2`` keeps ``delta / eta`` of order one there,
    and ``|eta| <= 8`` at a node implies ``|delta| <= 8``.
    """
    big = eta.abs() > 8.0
    eta_small = torch.where(big, 0.0, eta)  # safe inputs for the unselected branch
    eta_big = torch.where(big, eta, 16.0)
    a = eta_big.abs()
    q = torch.exp(-a) / -torch.expm1(-a)  # 1/expm1(a), with a finite gradient for huge a
    scaled = 1.0 - (eta_big * q) * eta_big * (1.0 + q)  # eta^2 var; eta*q first: no inf*0
    return torch.where(
        big, (delta / eta_big).square() * scaled, delta.square() * cb_variance(eta_small)
    )
