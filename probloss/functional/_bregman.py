r"""Bregman divergences of log-partition functions, non-negative and accurate.

The KL divergence between two members of a one-parameter exponential family with
log-partition :math:`f` is the Bregman divergence

.. math::
    D(x_q, x_p) = f(x_p) - f(x_q) - f'(x_q)(x_p - x_q)
               = \Delta^2 \int_0^1 (1 - t)\, f''(x_q + t\Delta)\, dt, \quad \Delta = x_p - x_q.

The closed form cancels catastrophically when :math:`x_p \approx x_q` (it can come out
negative). Near the diagonal, :math:`|\Delta| \le` ``near_width``, the integral form is used
with Gauss-Legendre quadrature: a positively weighted sum of :math:`f'' > 0`, hence never
negative and accurate to a relative ``eps``. Far from it the closed form is used after
reflecting both points so that :math:`x_q \le 0`, which is valid for log-partitions with
:math:`f(x) = x + f(-x)` (softplus and the continuous-Bernoulli :math:`A`): the
divergence is unchanged, :math:`f'(x_q) \le 1/2`, and the large linear parts of :math:`f`
no longer cancel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Nodes per dtype: f'' is analytic in a strip of half-width >= pi around the real axis and
# |Delta| <= 4, so the Bernstein-ellipse parameter is >= pi/2 + sqrt(1 + pi^2/4) = 3.4 and the
# error ~ 3.4^(-2n): 8 nodes reach float32 and 16 float64 precision (checked against mpmath).
_NODES = {torch.float32: 8, torch.float64: 16}


def _gauss_legendre_01(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [0, 1] (Golub-Welsch)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off_diagonal = k / torch.sqrt(4.0 * k * k - 1.0)
    jacobi = torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    weights = 2.0 * vectors[0] ** 2
    return tuple(((nodes + 1.0) / 2.0).tolist()), tuple((weights / 2.0).tolist())


# Computed once at import: a tracer (torch.compile) cannot run the eigh and .tolist() above.
_QUADRATURE = {n: _gauss_legendre_01(n) for n in set(_NODES.values())}


def bregman_divergence(
    f: Callable[[Tensor], Tensor],
    slope_times: Callable[[Tensor, Tensor], Tensor],
    curvature_times_square: Callable[[Tensor, Tensor], Tensor],
    x_q: Tensor,
    x_p: Tensor,
    near_width: Tensor | float,
) -> Tensor:
    """``f(x_p) - f(x_q) - f'(x_q) (x_p - x_q)`` for ``f(x) = x + f(-x)``, never negative.

    Args:
        f: the convex function, elementwise, differentiable.
        slope_times: ``(x, delta) -> f'(x) delta``, elementwise, differentiable; one function
            so that it can be formed without underflow where ``f'(x)`` alone would be
            subnormal (a saturated sigmoid times a huge step), and its gradient
            ``f''(x) delta`` without ``0 * inf`` where ``f''(x)`` underflows and ``delta``
            is near ``finfo.max``.
        curvature_times_square: ``(x, delta) -> delta^2 f''(x)``, elementwise; given as one
            function so that it can be formed without overflow or underflow where
            ``delta^2`` or ``f''(x)`` alone would (huge logits).
        x_q, x_p: broadcastable tensors of one floating dtype (float32 or float64).
        near_width: where ``|x_p - x_q| <= near_width`` the quadrature form is used.

    Returns:
        Tensor of the broadcast shape.
    """
    x_q, x_p = torch.broadcast_tensors(x_q, x_p)
    delta = x_p - x_q
    near = delta.abs() <= near_width
    nodes, weights = _QUADRATURE[_NODES[x_q.dtype]]
    t = torch.tensor(nodes, dtype=x_q.dtype, device=x_q.device)
    # (1 - t) w: the Taylor remainder kernel times the quadrature weights.
    kernel = torch.tensor(weights, dtype=x_q.dtype, device=x_q.device) * (1.0 - t)
    # The quadrature is fed delta = 0 where the closed form is selected (double where).
    delta_near = torch.where(near, delta, 0.0).unsqueeze(-1)
    quadrature = (
        curvature_times_square(x_q.unsqueeze(-1) + t * delta_near, delta_near) * kernel
    ).sum(-1)
    # Reflect so that x_q <= 0: D is invariant under (x_q, x_p) -> (-x_q, -x_p).
    flip = torch.where(x_q > 0, -1.0, 1.0).to(x_q.dtype)
    q, p = x_q * flip, x_p * flip
    # f'(q) (p - q) = 2 f'(q) (p/2 - q/2): the halves cannot overflow where p - q does
    # (-3.4e38 against 1e33 in float32), and the halving is exact (|p - q| > near_width >= 2
    # here, far from the subnormals); f'(q) <= 1/2 after the reflection, so the product
    # overflows only where the divergence does. slope_times must then form its own gradient
    # in x without the product f''(x) (p/2 - q/2) (see the callers).
    half_step = 0.5 * p - 0.5 * q
    slope_part = slope_times(q, half_step)
    # relu is exact: the divergence is >= 0, and only underflow to subnormals (sigmoid may
    # flush to 0 where softplus does not) can make the closed form round below 0.
    closed = torch.relu(f(p) - f(q) - (slope_part + slope_part))
    return torch.where(near, quadrature, closed)
