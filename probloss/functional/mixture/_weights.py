r"""Weighted sums over mixture components that never round a weight on its own.

Shared by the summaries (:mod:`.moments`) and the second moments (:mod:`._second_moments`):
a weight below the float range (``e^{-110}`` in float32) still scales a term of ``1e38``,
and a zero weight contributes exactly 0 whatever the term (``inf`` included).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...special import mul_exp


def _weights(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log w, zero, total)`` with ``pi = e^{log w} / total``, for weighted sums.

    ``log w = l - max l <= 0`` (the detached maximum: ``softmax`` does not depend on the
    shift, and ``l - max l`` is exact for logits within a factor 2 of the maximum),
    ``total = sum_k e^{log w_k}`` in ``[1, K]``, ``zero`` where ``log w = -inf`` (a zero
    weight). Each term is formed as ``e^{log w_k} t_k / total`` and only then summed: the
    weights are never rounded to a float of their own, so a weight below the float range
    (``e^{-110}`` in float32) still scales a ``t`` of ``1e38``; no term exceeds its
    ``|t_k|``, so nothing overflows unless the sum does; equal weights give exact results.
    """
    log_w = logits - logits.detach().amax(-1, keepdim=True)
    return log_w, log_w == -math.inf, torch.exp(log_w).sum(-1, keepdim=True)


def _weighted(t: Tensor, log_w: Tensor, zero: Tensor) -> Tensor:
    """``e^{log w_k} t_k`` for ``t (*, K, D)`` in one rounding, finite wherever the product
    is (:func:`~probloss.special.mul_exp`); a zero weight gives exactly 0 whatever ``t`` is
    (``inf`` or NaN included: ``t`` is replaced there, double-where)."""
    safe = torch.where(zero.unsqueeze(-1), 0.0, t)
    return mul_exp(safe, log_w.unsqueeze(-1))


def _half_mixture_mean(log_w: Tensor, zero: Tensor, total: Tensor, loc: Tensor) -> Tensor:
    """``m / 2 = sum_k pi_k mu_k / 2``, ``(*, D)``, as ``h + sum_k pi_k (mu_k / 2 - h)``.

    Halves throughout (exact but for subnormals): ``|m / 2| <= max |mu| / 2``, so neither
    the shift ``h`` nor the result overflows, even where ``m`` itself rounds to within an
    ulp of the float range. ``h`` is the same sum without a graph: correctly rounded terms
    ``e^{log w} (mu / 2) / total``. The differentiable part then carries the gradient
    ``d (m / 2) / d l_k = pi_k (mu_k / 2 - m / 2)`` in terms of the size of the deviations:
    through ``sum pi_k mu_k`` itself it is the difference of two sums of the size of
    ``|mu|`` (``inf - inf`` for means near the float range, where the true gradient is
    finite). Its terms are ``pi_k (mu_k / 2 - h)`` (``mul_exp``; ``|mu_k / 2 - h| <= max``),
    each at most ``pi_k`` times the spread of the means, finite.
    """
    with torch.no_grad():
        h = (_weighted(0.5 * loc, log_w, zero) / total.unsqueeze(-1)).sum(-2, keepdim=True)
        h = torch.where(torch.isfinite(h), h, 0.0)  # an inf / NaN mean: no shift
    dev = 0.5 * loc - h  # mu/2 - h: both at most max/2 in magnitude, no overflow
    log_pi = log_w - torch.log(total)
    return (h + _weighted(dev, log_pi, zero).sum(-2, keepdim=True)).squeeze(-2)


def _mixture_mean(log_w: Tensor, zero: Tensor, total: Tensor, loc: Tensor) -> Tensor:
    """``m = sum_k pi_k mu_k``, ``(*, D)``: twice :func:`_half_mixture_mean` (exact), so it
    is ``+-inf`` only where ``m`` rounds beyond the range, and the gradients ``pi_k`` and
    ``pi_k (mu_k - m)`` are finite wherever they are (each term of the backward is one of
    them times the incoming gradient)."""
    return 2.0 * _half_mixture_mean(log_w, zero, total, loc)
