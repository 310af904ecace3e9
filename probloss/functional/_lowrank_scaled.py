r"""The low-rank-plus-diagonal log density where whitening by ``e^{-l/2}`` overflows.

:func:`.lowrank.lowrank_multivariate_normal_log_prob` whitens by ``d^{-1/2} = e^{-l/2}``,
which overflows for ``l_i < -2 log(finfo.max)`` (-1419 in float64); a nonzero row of ``W``
then becomes infinite and the QR gives NaN, although the density is finite (``W W^T``
carries that coordinate). Long before, from whitened entries of ``finfo.max ** 0.25``,
the QR's backward multiplies them pairwise and its gradients turn NaN. Such events come
here, where each coordinate is scaled by its own size instead,

.. math::
    c_i = \max(\tfrac12 l_i, \log\max_j |W_{ij}|), \qquad S = \operatorname{diag}(e^{c}),
    \qquad \Sigma = S (V V^\top + E) S,

with ``V = S^{-1} W`` (entries at most 1) and ``E = diag(e^{l - 2c})`` (entries at most 1),
so nothing overflows. ``M = V V^T + E = B B^T`` with ``B = [V, E^{1/2}]``, whose QR
factorisation ``B^T = Q C`` gives ``M = C^T C`` without forming ``M``:

.. math::
    \log p(x) = -\frac D2 \log 2\pi - \sum_i c_i - \sum_i \log|C_{ii}|
        - \tfrac12 \lVert C^{-\top} S^{-1} (x - \mu) \rVert^2 .

The identity holds for every ``c``, so ``c`` is a detached choice of scaling (its
derivative terms cancel exactly and are not formed). Cost ``O(D^3)`` per event, used only
for events whose whitened factor overflows. Where ``e^{l_i - 2c_i}`` underflows (``d_i``
below ``finfo.tiny`` times the row's largest ``W_{ij}^2``) the coordinate is carried by
``V`` alone: exact to rounding when the rows of ``V`` so affected are linearly independent
(at most ``R`` of them); with more such coordinates than the rank the covariance is
singular to the dtype, and the density depends on those ``d_i`` beyond its range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.constants import LOG_2PI as _LOG_2PI
from ..special import mul_exp
from ._squared_norm import half_squared_norm


def scaled_lowrank_log_prob(
    residual: Tensor, factor: Tensor, cov_factor: Tensor, log_diag: Tensor
) -> Tensor:
    """The log density of ``value - loc = residual * factor`` (finite ``residual``),
    shape ``(*)``, in the inputs' dtype; ``-inf`` where the scaled residual overflows."""
    dim = cov_factor.shape[-2]
    with torch.no_grad():
        row = cov_factor.abs().amax(-1) if cov_factor.shape[-1] else torch.zeros_like(log_diag)
        c = torch.maximum(0.5 * log_diag, torch.log(row))  # log of each coordinate's size
    v = mul_exp(cov_factor, -c.unsqueeze(-1))  # |v| <= 1
    e_half = torch.exp(0.5 * log_diag - c)  # <= 1 (may underflow: see the module doc)
    r_hat = mul_exp(residual, -c) * factor
    # an overflowing scaled residual: the quadratic form is at least its square over
    # max(M) <= R + 1, so it overflows too (-inf); fed 0 (double where)
    over = ~torch.isfinite(r_hat).all(-1)
    r_hat = torch.where(over.unsqueeze(-1), 0.0, r_hat)
    batch = torch.broadcast_shapes(v.shape[:-2], e_half.shape[:-1])
    rank = cov_factor.shape[-1]
    b_t = torch.cat(
        [v.mT.expand((*batch, rank, dim)), torch.diag_embed(e_half).expand((*batch, dim, dim))],
        dim=-2,
    )  # B^T, (R + D) x D
    # M singular to the dtype (more coordinates whose e^{l - 2c} underflows than the rank
    # covers): a zero diagonal entry of C. There the density is that of a covariance with a
    # null direction: -inf off its range, +inf at the mean (the limits as those d_i -> 0; the
    # exact density depends on d_i beyond the dtype's range). Found by a QR without
    # gradient; such events are then fed B^T = [0; I] (double where), so the QR's backward
    # never divides by the zero.
    with torch.no_grad():
        probe = torch.linalg.qr(b_t)[1]
        singular = ~(probe.diagonal(dim1=-2, dim2=-1).abs() > 0).all(-1)
        # a quadratic form beyond the dtype (log p = -inf): solved again from r^ = 0, like
        # an overflowing r^, since C^{-T} r^ of that size overflows products in the QR's
        # and the solve's backward (inf - inf = NaN). The gradient there is then that of the
        # log-determinant alone: the quadratic's is beyond the dtype's range or is
        # negligible against a log density of -inf, a loss of +inf.
        over_q = ~torch.isfinite(half_squared_norm(_solve_lower(probe.mT, r_hat)))
    over = over | (over_q & ~singular)
    r_hat = torch.where(over.unsqueeze(-1), 0.0, r_hat)
    safe = torch.cat(
        [
            torch.zeros_like(b_t[..., :rank, :]),
            torch.eye(dim, dtype=b_t.dtype, device=b_t.device).expand_as(b_t[..., rank:, :]),
        ],
        dim=-2,
    )
    b_t = torch.where(singular[..., None, None], safe, b_t)
    _, upper = torch.linalg.qr(b_t)  # B^T = Q C, M = C^T C
    half_log_det = c.sum(-1) + upper.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    y = _solve_lower(upper.mT, r_hat)  # C^T y = r^, ||y||^2 = r^T M^{-1} r^
    log_p = -half_squared_norm(y) - half_log_det - 0.5 * dim * _LOG_2PI
    at_mean = (r_hat == 0).all(-1)
    log_p = torch.where(singular, torch.where(at_mean, math.inf, -math.inf), log_p)
    return torch.where(over, -math.inf, log_p)


def _solve_lower(lower: Tensor, rhs: Tensor) -> Tensor:
    """``lower^{-1} rhs`` for ``(*, D, D)`` lower-triangular factors and ``(*, D)`` vectors,
    batch dimensions broadcast."""
    batch = torch.broadcast_shapes(lower.shape[:-2], rhs.shape[:-1])
    dim = lower.shape[-1]
    return torch.linalg.solve_triangular(
        lower.expand((*batch, dim, dim)), rhs.expand((*batch, dim)).unsqueeze(-1), upper=False
    ).squeeze(-1)
