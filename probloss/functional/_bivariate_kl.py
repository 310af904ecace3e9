r"""The value and closed-form gradient of :func:`~probloss.functional.bivariate_normal_kl`.

The KL is taken in the chain-rule form of its docstring, with ``d_i = l_qi - l_pi`` the
log-scale differences, ``c = log cosh a_q - log cosh a_p``, ``z_i`` the standardised mean
differences, ``rho = tanh a``:

.. math::
    \mathrm{KL} = \tfrac12\operatorname{expm1mx}(2 d_1) + \tfrac12 z_1^2
        + \tfrac12\operatorname{expm1mx}(D) + \tfrac12 m^2 + \tfrac12 w^2,
    \qquad D = 2 (d_2 - c),

:math:`m = (z_2 - \rho_p z_1)\cosh a_p`, :math:`w = (\rho_q e^{d_2} - \rho_p e^{d_1})\cosh
a_p`. With :math:`n = (z_1 - \rho_p z_2)\cosh a_p` (``m^2 + z_1^2 = n^2 + z_2^2`` is the
Mahalanobis form, so ``|m|, |n|, |z_i|, |w| <= sqrt(2 KL)``), its derivatives are

.. math::
    \partial_{\mu_{q1}} = n \cosh a_p\, e^{-l_{p1}}, \quad
    \partial_{\mu_{q2}} = m \cosh a_p\, e^{-l_{p2}}, \quad
    \partial_{\mu_{pi}} = -\partial_{\mu_{qi}},

    \partial_{l_{q1}} = \operatorname{expm1}(2 d_1) - w \rho_p e^{d_1}\cosh a_p, \quad
    \partial_{l_{p1}} = -\partial_{l_{q1}} - z_1 n \cosh a_p,

    \partial_{l_{q2}} = \operatorname{expm1}(D) + w \rho_q e^{d_2}\cosh a_p, \quad
    \partial_{l_{p2}} = -\partial_{l_{q2}} - z_2 m \cosh a_p,

    \partial_{a_q} = -\rho_q \operatorname{expm1}(D) + w e^{d_2 + \log\cosh a_p - 2\log\cosh a_q}
        = \rho_q - \rho_p e^{d_1 + d_2 - 2 c},

    \partial_{a_p} = \rho_p \operatorname{expm1}(D) - m n
        + w (\rho_p \rho_q e^{d_2} - e^{d_1}) \cosh a_p

(``dm/da_p = -n``, ``dw/da_q = e^{d_2} \cosh a_p / \cosh^2 a_q``). Every product is one
factor bounded by ``sqrt(2 KL)`` (or two, :func:`_mul2_exp`) times an exponential of a sum
of log-scales and ``log cosh``, formed by :func:`~probloss.special.mul_exp`: nothing
overflows unless the term does, where autograd through ``tanh``, ``log_cosh`` and the
squares forms ``0 * inf`` and ``inf - inf``. Single-precision gradients are computed in
float64 (float32 on MPS), where no product of two float32-range factors leaves the range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..special import log_cosh, softplus
from ..special.exp import expm1, mul_exp
from ._normal_kl_parts import half_expm1mx_of_twice_difference, half_square_over_variance
from ._params import standardized_residual


def bivariate_kl(*params: Tensor) -> Tensor:
    """The KL from the ten broadcast ``(*)`` tensors ``mu_q1, mu_q2, l_q1, l_q2, a_q,
    mu_p1, mu_p2, l_p1, l_p2, a_p`` (``l`` log-scales, ``a`` atanh of the correlations)."""
    return _BivariateKL.apply(*params)


def _bivariate_kl_value(mq1, mq2, lq1, lq2, a_q, mp1, mp2, lp1, lp2, a_p) -> Tensor:
    """The chain rule of the public docstring (all ``(*)``)."""
    lc_q, lc_p = log_cosh(a_q), log_cosh(a_p)
    z1, z2 = standardized_residual(mq1, mp1, lp1), standardized_residual(mq2, mp2, lp2)
    d1, d2 = lq1 - lp1, lq2 - lp2
    # expm1mx(2 d1) / 2 of the log-variances 2 l (TwoSum-exact), without doubling past max
    first = half_expm1mx_of_twice_difference(lq1, lp1)
    first = first + half_square_over_variance(mq1, mp1, 2.0 * lp1)  # 2 l overflows to 0 / inf
    # normal_kl of the conditionals in parts: log-variances' difference 2 d2 - 2 (lc_q - lc_p)
    # (equal correlations cancel exactly), mean part (z2 - rho_p z1)^2 cosh^2(a_p) / 2
    second = half_expm1mx_of_twice_difference(d2, lc_q - lc_p)
    second = second + half_square_over_variance(z2, torch.tanh(a_p) * z1, -2.0 * lc_p)
    w = _slope_difference(d1, d2, a_q, a_p, lc_q, lc_p)
    # KL >= KL(q_i || p_i) >= max(|d_i| - 1/2, z_i^2 / 2): an overflowed d_i or z_i, KL = inf
    overflow = d1.isinf() | d2.isinf() | z1.isinf() | z2.isinf()
    kl = first + second + (0.5 * w) * w  # (w/2) w: no w^2 overflow below the result's
    return torch.where(overflow, math.inf, kl)


def _slope_difference(d1, d2, a_q, a_p, lc_q, lc_p) -> Tensor:
    r"""``w = (rho_q e^{d2} - rho_p e^{d1}) cosh a_p`` without cancellation or overflow.

    Where the two terms agree in sign to within a factor 2, from ``rho_q tanh(h) e^{log(e^{d1}
    + e^{d2}) + log cosh a_p} + tanh(a_q - a_p) e^{log cosh(a_q - a_p) + d1 - log cosh a_q}``,
    ``h = (d2 - d1) / 2`` (``e^{d2} - e^{d1} = tanh(h) (e^{d1} + e^{d2})``, ``(tanh a_q -
    tanh a_p) cosh a_p = sinh(a_q - a_p) / cosh a_q``); elsewhere as the difference itself.
    """
    # 2 cosh(h) e^{(d1 + d2)/2} = e^{d1} + e^{d2}: its log by logaddexp, no |h| to cancel
    x1, t1 = torch.tanh(a_q) * torch.tanh(0.5 * (d2 - d1)), torch.logaddexp(d1, d2) + lc_p
    x2, t2 = torch.tanh(a_q - a_p), log_cosh(a_q - a_p) + d1 - lc_q
    w = mul_exp(x1, t1) + mul_exp(x2, t2)
    # the split cancels unless rho_q e^{d2} and rho_p e^{d1} nearly agree: elsewhere their
    # difference (times cosh a_p) directly, which loses at most a factor 3 there
    w_q, w_p = mul_exp(torch.tanh(a_q), d2 + lc_p), mul_exp(torch.tanh(a_p), d1 + lc_p)
    apart = (w_q * w_p <= 0) | (w_q.abs() >= 2 * w_p.abs()) | (w_p.abs() >= 2 * w_q.abs())
    w = torch.where(apart & (w_q - w_p).isfinite(), w_q - w_p, w)
    # inf - inf: the same sum from L_i = log|x_i| + t_i, sign e^{L_big} (1 - e^{L_sm - L_big})
    far = w.isnan()
    l1 = torch.log(torch.where(far, x1, 1.0).abs()) + torch.where(far, t1, 0.0)  # safe inputs
    l2 = torch.log(torch.where(far, x2, 1.0).abs()) + torch.where(far, t2, 0.0)
    big, small = torch.maximum(l1, l2), torch.minimum(l1, l2)
    sign = torch.where(l1 >= l2, x1.sign(), x2.sign())
    # both exponents overflowed (inf - inf = NaN): the larger term, |w| = inf, stands
    gap = torch.where(far, small - big, 0.0).nan_to_num(nan=-math.inf)
    w_far = mul_exp(sign * -expm1(gap), big)
    return torch.where(far, w_far, w)


def _mul2_exp(x: Tensor, y: Tensor, t: Tensor) -> Tensor:
    """``x y e^t`` (shape ``(*)``): :func:`mul_exp` of ``x y`` where that is a normal float
    (always for float32 inputs, computed in float64), else ``sign e^{log|x| + log|y| + t}``
    (float64 factors beyond ``1e154`` or below ``1e-154``: relative error ``eps`` times
    that exponent's terms, a few hundred ``eps``, where the product would be 0 or inf)."""
    xy = x * y
    plain = (xy.isfinite() & (xy.abs() >= torch.finfo(xy.dtype).tiny)) | (x == 0) | (y == 0)
    log_x = torch.log(torch.where(plain, 1.0, x).abs())  # safe inputs where not selected
    log_y = torch.log(torch.where(plain, 1.0, y).abs())
    far = torch.exp(log_x + log_y + torch.where(plain, 0.0, t)) * (x.sign() * y.sign())
    return torch.where(plain, mul_exp(xy, t), far)


def _exp_difference(t1: Tensor, b: Tensor, t2: Tensor) -> Tensor:
    """``e^{t1} - b e^{t2}`` (all ``(*)``) from logs: ``e^T (e^{t1 - T} - sign(b) e^{t2' - T})``,
    ``t2' = t2 + log|b|``, ``T`` the larger, the bracket by ``expm1``; finite wherever the
    result is (relative error ``eps`` times the exponents' size, as their rounding)."""
    t2 = t2 + torch.log(b.abs())
    top = torch.maximum(t1, t2)
    lo1, lo2 = t1 - top, t2 - top  # one of them 0
    differ = torch.where(t1 >= t2, -expm1(lo2), expm1(lo1))
    return mul_exp(torch.where(b > 0, differ, torch.exp(lo1) + torch.exp(lo2)), top)


def _bivariate_kl_gradients(grad: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
    """``grad`` times the ten partial derivatives of the module docstring (all ``(*)``).

    Where a chain-rule sum meets ``inf - inf`` (``e^{2 d}`` beyond the compute range, the KL
    itself far beyond it) the log-scale and ``a_p`` derivatives come from the expanded
    forms ``C^2 e^{d_1} (e^{d_1} - rho_p rho_q e^{d_2}) - 1`` (``C = cosh a_p``; ``l_q2``
    alike) and ``rho_p C^2 Q - rho_q e^{d_1 + d_2 - 2 |a_p|} - rho_p - m n``, ``Q = 4
    e^{d_1 + d_2} (sinh^2 h + sigmoid(-2 sign(a_p) a_q))`` (``C^2 + S^2 = 2 |S C| +
    e^{-2 |a_p|}``: two non-negative terms). ``d/da_q`` is always the expanded
    ``rho_q - rho_p e^{d_1 + d_2 - 2c}`` (its chain rule's two ``e^D`` terms cancel).
    """
    dtype = grad.dtype
    wide = torch.float64 if dtype == torch.float32 and grad.device.type != "mps" else dtype
    g, mq1, mq2, lq1, lq2, a_q, mp1, mp2, lp1, lp2, a_p = (t.to(wide) for t in (grad, *params))
    lc_q, lc_p = log_cosh(a_q), log_cosh(a_p)
    rho_q, rho_p = torch.tanh(a_q), torch.tanh(a_p)
    d1, d2 = lq1 - lp1, lq2 - lp2
    z1, z2 = standardized_residual(mq1, mp1, lp1), standardized_residual(mq2, mp2, lp2)
    gw = g * _slope_difference(d1, d2, a_q, a_p, lc_q, lc_p)  # grad first: g small, w large
    half_d = d2 - (lc_q - lc_p)  # D / 2, grouped as in the value (exact at a_q == a_p)
    e1, e2 = g * expm1(2.0 * d1), g * expm1(2.0 * half_d)
    u, v = z1 - rho_p * z2, z2 - rho_p * z1  # n / cosh a_p, m / cosh a_p
    gw_wp = mul_exp(gw * rho_p, d1 + lc_p)  # g w rho_p e^{d1} cosh a_p
    gw_wq = mul_exp(gw * rho_q, d2 + lc_p)  # g w rho_q e^{d2} cosh a_p
    g_mq1 = mul_exp(g * u, (lc_p - lp1) + lc_p)  # n cosh a_p e^{-l_p1}
    g_mq2 = mul_exp(g * v, (lc_p - lp2) + lc_p)
    rr, twice_lc_p = rho_p * rho_q, 2.0 * lc_p
    g_lq1, g_lq2 = e1 - gw_wp, e2 + gw_wq
    g_lq1 = torch.where(
        g_lq1.isnan(), mul_exp(g, twice_lc_p + d1) * _exp_difference(d1, rr, d2) - g, g_lq1
    )
    g_lq2 = torch.where(
        g_lq2.isnan(), mul_exp(g, twice_lc_p + d2) * _exp_difference(d2, rr, d1) - g, g_lq2
    )
    mn = _mul2_exp(g * u, v, twice_lc_p)  # g m n
    g_lp1 = -g_lq1 - _mul2_exp(g * z1, u, twice_lc_p)  # z1 n cosh a_p
    g_lp2 = -g_lq2 - _mul2_exp(g * z2, v, twice_lc_p)  # z2 m cosh a_p
    d_sum = d1 + d2
    g_aq = g * rho_q - mul_exp(g * rho_p, (d1 - (lc_q - lc_p)) + half_d)
    g_ap = (e2 * rho_p - mn) + (mul_exp(gw * rr, d2 + lc_p) - mul_exp(gw, d1 + lc_p))
    far = g_ap.isnan()
    h = torch.where(far, 0.5 * (d2 - d1), 1.0)  # safe input where not selected
    log_sinh_sq = 2.0 * (h.abs() + torch.log(-expm1(-2.0 * h.abs())) - math.log(2.0))
    log_q = torch.logaddexp(log_sinh_sq, -softplus(2.0 * a_q * a_p.sign()))
    trace = mul_exp(4.0 * g * rho_p, (d_sum + twice_lc_p) + log_q)
    trace = trace - mul_exp(g * rho_q, d_sum - 2.0 * a_p.abs())
    g_ap = torch.where(far, (trace - g * rho_p) - mn, g_ap)
    out = (g_mq1, g_mq2, g_lq1, g_lq2, g_aq, -g_mq1, -g_mq2, g_lp1, g_lp2, g_ap)
    return tuple(t.to(dtype) for t in out)


class _BivariateKL(torch.autograd.Function):
    """The KL (plain torch forward) with the closed-form backward; differentiable again
    (the backward is plain torch, :func:`mul_exp` and :func:`standardized_residual`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mq1, mq2, lq1, lq2, a_q, mp1, mp2, lp1, lp2, a_p) -> Tensor:
        # named, not *params: torch.compile binds a ctx into a varargs forward
        return _bivariate_kl_value(mq1, mq2, lq1, lq2, a_q, mp1, mp2, lp1, lp2, a_p)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        return _bivariate_kl_gradients(grad, *ctx.saved_tensors)
