"""The two parts of a normal KL, ``expm1mx(d) / 2`` of a difference of log-variances and
``Delta^2 / (2 sigma^2)``, each exact and finite wherever it is representable.

Shared by :func:`~probloss.functional.normal_kl` and
:func:`~probloss.functional.bivariate_normal_kl` (whose conditional KL is a normal KL).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..special.exp import expm1mx, mul_exp


def half_square_over_variance(loc_q: Tensor, loc_p: Tensor, log_var_p: Tensor) -> Tensor:
    """``(loc_q - loc_p)^2 exp(-log_var_p) / 2`` as ``2 w^2``, ``w = (Delta/2) e^{-lv/2}``.

    ``Delta / 2 = loc_q/2 - loc_p/2`` cannot overflow where ``Delta`` does (-3.4e38 against
    3.4e38 in float32), the halvings are exact (to the subnormals, where the term is
    dominated by the other anyway), and ``w`` comes from ``mul_exp``: nothing overflows unless
    the result does.
    """
    w = mul_exp(0.5 * loc_q - 0.5 * loc_p, -0.5 * log_var_p)
    return (w * w) * 2.0


class HalfSquareOverVariance(torch.autograd.Function):
    """:func:`half_square_over_variance` with the backward written from the result.

    ``dM/dlog_var_p = -M`` and ``dM/dloc_q = -dM/dloc_p = Delta e^{-lv} = 2 (Delta/2) e^{-lv}``
    (by ``mul_exp``): each overflows only if it is itself out of range, where autograd of
    ``2 w^2`` would form ``dM/dw * w = 2 M`` and overflow for ``M > max / 2``. The forward is
    plain torch (no kernel op); the backward is differentiable again (built from this
    function and ``mul_exp``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(loc_q: Tensor, loc_p: Tensor, log_var_p: Tensor) -> Tensor:
        return half_square_over_variance(loc_q, loc_p, log_var_p)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc_q, loc_p, log_var_p, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: rebuild the result differentiably
            out = HalfSquareOverVariance.apply(loc_q, loc_p, log_var_p)
        # grad first: the slope may be near max while grad is small (a mean over a batch)
        slope = mul_exp(grad * (0.5 * loc_q - 0.5 * loc_p), -log_var_p)
        slope = slope + slope
        return slope, -slope, -(grad * out)


def half_expm1mx_of_difference(a: Tensor, b: Tensor) -> Tensor:
    """``expm1mx(a - b) / 2`` for the exact difference of the floats ``a`` and ``b``.

    Rounding ``d = a - b`` costs ``|d| eps / 2`` of relative accuracy in ``e^d`` (5e-6 in
    float32 at ``d = 88``); the rounding error ``err = (a - b) - d`` is recovered exactly
    (Knuth's TwoSum) and added to first order, ``expm1mx(d + err) = expm1mx(d) +
    expm1(d) err + O(e^d err^2)``. ``err`` is detached (as a function of ``a`` and ``b`` it
    is the constant 0 of exact arithmetic), so the gradient ``expm1(d) / 2`` is corrected
    the same way through ``d``. Where ``exp(d)`` is within a factor e of ``finfo.max``,
    ``e^d e^err / 2`` is formed by ``mul_exp``, which overflows (value or gradient)
    only if the result does.
    """
    d = a - b
    b_virtual = d - a  # TwoSum of (a, -b): err = (a - a_virtual) + (-b - b_virtual), exact
    err = ((a - (d - b_virtual)) - (b + b_virtual)).detach()
    err = torch.where(torch.isfinite(d), err, 0.0)  # inf - inf where a - b overflows
    top = math.log(torch.finfo(d.dtype).max) - 1.0
    big = d > top
    # Far below 0, e^d - 1 - d = (b/2 - a/2) * 2 + e^d - 1: -d may exceed finfo.max (-3.4e38
    # against 1e32 in float32) while its half cannot; its rounding is relative (no TwoSum)
    very_negative = d < -top
    # safe inputs for the unselected branches; where a - b overflows to inf (the result is
    # inf), finfo.max stands in for it, as inf - (1 + inf) / 2 would be NaN
    d_big = torch.where(big, torch.where(torch.isinf(d), torch.finfo(d.dtype).max, d), top)
    err_big = torch.where(d_big < 2.0 * (top + 1.0), err, 0.0)  # e^d e^err: no 0 * inf
    d_small = torch.where(big | very_negative, 0.0, d)
    d_negative = torch.where(very_negative, d, -top)
    a_negative = torch.where(very_negative, a, 0.0)
    b_negative = torch.where(very_negative, b, top)
    negative = (0.5 * b_negative - 0.5 * a_negative) + 0.5 * (torch.exp(d_negative) - 1.0)
    # e^{d + err} / 2 = e^d (e^err / 2): err, exact but not small when |b| dwarfs |a| (-1.07
    # against -1e19 is lost in d entirely), is taken whole, not to first order
    near_overflow = mul_exp(0.5 * torch.exp(err_big), d_big) - 0.5 * (1.0 + d_big)
    moderate = 0.5 * (expm1mx(d_small) + torch.expm1(d_small) * torch.where(big, 0.0, err))
    return torch.where(big, near_overflow, torch.where(very_negative, negative, moderate))


def half_expm1mx_of_twice_difference(a: Tensor, b: Tensor) -> Tensor:
    """``expm1mx(2 (a - b)) / 2`` (``a``, ``b`` log-scales, shape ``(*)``), no doubling overflow.

    :func:`half_expm1mx_of_difference` of ``2 a`` and ``2 b`` (doubling is exact) while both
    are within ``finfo.max / 4``. Beyond, ``2 a`` may overflow although the result (about
    ``b - a``) does not: there ``a - b`` is 0 or at least ``ulp(max / 8)`` (``5e30`` in
    float32) in magnitude, where the result is ``inf`` above 0 and ``b - a - 1/2 = b - a``
    (the half below its ulp, the ``e^{2 (a - b)}`` term 0) below.
    """
    quarter = torch.finfo(a.dtype).max / 4
    huge = (a.abs() > quarter) | (b.abs() > quarter)
    doubled = half_expm1mx_of_difference(
        2.0 * torch.where(huge, 0.0, a), 2.0 * torch.where(huge, 0.0, b)
    )
    far = torch.where(a > b, math.inf, b - a)
    return torch.where(huge, far, doubled)
