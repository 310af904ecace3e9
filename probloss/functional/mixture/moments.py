r"""Means, variances and covariances of Gaussian mixtures, from unconstrained parameters.

Means are weighted sums that never round a weight (:mod:`._weights`); variances and
covariances follow the law of total (co)variance, summed as non-negative terms with
hand-written gradients that are never ``inf - inf`` (:mod:`._second_moments`). Half
precision parameters are computed in float32 and the results returned in the parameters'
dtype (they are quantities in the data's units, not log densities).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._core.shapes import mixture_parameters
from ._second_moments import second_moments
from ._weights import _mixture_mean, _weights

__all__ = [
    "bivariate_normal_mixture_covariance",
    "bivariate_normal_mixture_mean",
    "normal_mixture_mean",
    "normal_mixture_variance",
]


def normal_mixture_mean(logits: Tensor, loc: Tensor) -> Tensor:
    r"""Mean of a mixture of normals, :math:`\sum_k \pi_k \mu_k`, shape ``(*, D)``.

    Each product :math:`\pi_k\mu_k` is formed as ``mul_exp(mu_k, l_k - max l)`` (then
    divided by :math:`\sum_j e^{l_j - \max l}`), never from a rounded weight: a weight below
    the float range (:math:`e^{-110}` in float32) still counts against a mean of ``1e38``,
    and a zero weight (logit ``-inf``) contributes exactly 0, even against an infinite
    mean. Finite wherever the result is.

    Args:
        logits: mixture logits, shape ``(*, K)``; :math:`\pi = \operatorname{softmax}`.
        loc: component means, shape ``(*, K, D)``.

    Example:
        >>> normal_mixture_mean(torch.tensor([0.0, 0.0]), torch.tensor([[-1.0], [3.0]]))
        tensor([1.])
    """
    (logits, loc), dtype = mixture_parameters(None, logits=logits, loc=loc)
    return _mixture_mean(*_weights(logits), loc).to(dtype)


def normal_mixture_variance(logits: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    r"""Per-dimension variance of a mixture of normals (law of total variance), ``(*, D)``.

    .. math::
        \operatorname{Var}[x_d] = \sum_k \pi_k \big(\sigma_{kd}^2 + (\mu_{kd} - m_d)^2\big),
        \qquad m = \sum_k \pi_k \mu_k

    the expected within-component variance plus the variance of the component means,
    summed as non-negative terms (never :math:`\mathbb E[x^2] - m^2`, which cancels when
    the spread is small next to the mean). Each term is formed without its factors:
    :math:`\pi_k\sigma_k^2 = e^{\log\pi_k + 2\log\sigma_k}` and
    :math:`\pi_k(\mu_k - m)^2 = (\sqrt{\pi_k}(\mu_k - m))^2`, so a term is finite
    wherever it is representable (:math:`\sigma^2 = e^{120}` at weight :math:`e^{-100}` in
    float32), and a zero-weight component contributes exactly 0, whatever its
    ``log_scale`` or ``loc`` (``inf`` included). Computed in float64 and rounded once.

    Gradients are formed from their closed forms (``d/d l_k = pi_k (q_k - Var)``,
    ``q_k = sigma_k^2 + (mu_k - m)^2``; ``d/d mu_k = 2 pi_k (mu_k - m)``;
    ``d/d log sigma_k = 2 pi_k sigma_k^2``), never as the difference of two overflowing
    sums: where the variance overflows, the logit gradients are ``+-inf`` with their exact
    signs (or finite, for a weight small enough), not NaN.

    Args:
        logits: mixture logits, shape ``(*, K)``.
        loc: component means, shape ``(*, K, D)``.
        log_scale: component log standard deviations, shape ``(*, K, D)``.

    Example:
        >>> normal_mixture_variance(
        ...     torch.tensor([0.0, 0.0]), torch.tensor([[-1.0], [3.0]]), torch.zeros(2, 1))
        tensor([5.])
    """
    (logits, loc, log_scale), dtype = mixture_parameters(
        None, logits=logits, loc=loc, log_scale=log_scale
    )
    return second_moments(logits, loc, log_scale, None).to(dtype)


def bivariate_normal_mixture_mean(logits: Tensor, loc: Tensor) -> Tensor:
    r"""Mean :math:`\sum_k \pi_k \mu_k` of a bivariate normal mixture, shape ``(*, 2)``.

    Computed as :func:`normal_mixture_mean` (weights below the float range still count,
    zero weights contribute exactly 0).

    Args:
        logits: mixture logits, shape ``(*, K)``.
        loc: component means, shape ``(*, K, 2)``.

    Example:
        >>> bivariate_normal_mixture_mean(torch.zeros(2), torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        tensor([1., 2.])
    """
    (logits, loc), dtype = mixture_parameters(2, logits=logits, loc=loc)
    return _mixture_mean(*_weights(logits), loc).to(dtype)


def bivariate_normal_mixture_covariance(
    logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> Tensor:
    r"""Covariance of a bivariate normal mixture (law of total covariance), ``(*, 2, 2)``.

    .. math::
        \operatorname{Cov}[x] = \sum_k \pi_k \big(\Sigma_k + (\mu_k - m)(\mu_k - m)^\top\big),
        \qquad \Sigma_k = \begin{pmatrix} \sigma_{k1}^2 & \rho_k\sigma_{k1}\sigma_{k2} \\
            \rho_k\sigma_{k1}\sigma_{k2} & \sigma_{k2}^2 \end{pmatrix},

    :math:`m = \sum_k \pi_k\mu_k`, :math:`\rho_k = \tanh a_k`,
    :math:`\pi_k\sigma_{k1}\sigma_{k2} = e^{\log\pi_k + \log\sigma_{k1} + \log\sigma_{k2}}`.
    The diagonal is :func:`normal_mixture_variance` (the same terms, so the same results;
    zero weights contribute exactly 0). Where terms of both signs of the off-diagonal
    entry overflow, the two sides are compared in log space: the result is the larger
    side's ``+-inf``, or the finite difference where they nearly cancel, not NaN. The
    gradients likewise (closed forms, see :func:`normal_mixture_variance`; in
    ``atanh_rho``, ``pi_k sech^2(a_k) sigma_k1 sigma_k2`` as one exponential, finite where
    ``rho s1 s2`` overflows).

    Args:
        logits: mixture logits, shape ``(*, K)``.
        loc: component means, shape ``(*, K, 2)``.
        log_scale: component log standard deviations, shape ``(*, K, 2)``.
        atanh_rho: :math:`\operatorname{atanh}` of the component correlations, ``(*, K)``.

    Example:
        >>> bivariate_normal_mixture_covariance(  # two unit normals at (-1, -1) and (1, 1)
        ...     torch.zeros(2), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), torch.zeros(2, 2),
        ...     torch.zeros(2))
        tensor([[2., 1.],
                [1., 2.]])
    """
    (logits, loc, log_scale, atanh_rho), dtype = mixture_parameters(
        2, logits=logits, loc=loc, log_scale=log_scale, atanh_rho=atanh_rho
    )
    c11, c12, c22 = second_moments(logits, loc, log_scale, atanh_rho).unbind(-1)
    return torch.stack((c11, c12, c12, c22), -1).unflatten(-1, (2, 2)).to(dtype)
