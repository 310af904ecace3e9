r"""The continuous ranked probability score of location-scale families, in closed form.

.. math::
    \operatorname{CRPS}(F, y) = \int_{-\infty}^{\infty} \big(F(x) - \mathbf 1\{x \ge y\}\big)^2
        \, dx = \mathbb E|X - y| - \tfrac12 \mathbb E|X - X'|

(Matheson & Winkler 1976; Gneiting & Raftery 2007, eq. 20), a proper scoring rule in the
units of ``y``: lower is better, and its minimum over ``F`` is the true distribution. For
``F`` of location :math:`\mu` and scale :math:`\sigma`, with :math:`r = y - \mu`,
:math:`z = r / \sigma` and :math:`a = |z|`, every closed form here is written as

.. math::
    \operatorname{CRPS} = |r|\, c(a) + \sigma\, s(a), \qquad
    \frac{\partial}{\partial y} = \operatorname{sign}(r)\, g(a), \qquad
    \frac{\partial}{\partial \sigma} = h(a),

- normal: :math:`c = g = \operatorname{erf}(a/\sqrt2)`, :math:`s = h = 2\varphi(a) -
  1/\sqrt\pi`;
- Laplace: :math:`c = 1`, :math:`s = e^{-a} - 3/4`, :math:`g = 1 - e^{-a}`,
  :math:`h = e^{-a}(1 + a) - 3/4`;
- logistic: :math:`c = 1`, :math:`s = 2\log(1 + e^{-a}) - 1`, :math:`g = \tanh(a/2)`,
  :math:`h = s + 2a\,\sigma(-a)`;

and :math:`\partial/\partial\mu = -\partial/\partial y`. (Normal: Gneiting et al. 2005,
eq. 5; Laplace and logistic: Jordan, Krüger & Lerch 2019, the ``scoringrules`` formulas,
rewritten in ``|r|`` and ``a``.) The split keeps every case exact: ``|r| c(a)`` is formed
from the residual itself, so a target beyond the float range of scales (``sigma =
e^{-100}``, ``z`` overflows) gives ``|r|`` and not ``inf``; ``sigma s(a)`` and ``sigma
h(a)`` are one :func:`~probloss.special.mul_exp` of ``log sigma``, so a huge scale whose
``exp`` overflows still gives the finite score; ``|r|`` is formed without overflow where
``y - mu`` overflows (:func:`~probloss.functional._params.split_residual`). No term
cancels more than a factor of a few: ``c(a) |r|`` dominates for large ``a`` and ``s(0) >
0``. The gradients are written in closed form (autograd through the value would form ``0 *
inf`` at ``a = inf``), from differentiable torch ops, so a double backward works.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional._location_scale import location_scale_inputs
from ..functional._params import residual_for_backward, split_residual
from ..special.erf import erf
from ..special.exp import expm1, mul_exp

__all__ = ["crps_laplace", "crps_logistic", "crps_normal"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # 2 phi(a) = sqrt(2/pi) e^{-a^2/2}
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


# Per family, from a = |z|: the value's (c, s), where c = None stands for 1, and the
# gradient's (g, h); the module docstring's table.


def _normal_value(a: Tensor) -> tuple[Tensor | None, Tensor]:
    # (-a/2) a: a^2 alone overflows where a^2 / 2 may not; e^{-inf} = 0 at a = inf
    s = _SQRT_2_OVER_PI * torch.exp((-0.5 * a) * a) - _INV_SQRT_PI
    return erf(_INV_SQRT_2 * a), s  # compile-safe: relative accuracy near 0


def _normal_grad(a: Tensor) -> tuple[Tensor, Tensor]:
    return _normal_value(a)  # g = c and h = s: d/dsigma [sigma g(z)] = g - z g' = s


def _laplace_value(a: Tensor) -> tuple[Tensor | None, Tensor]:
    return None, torch.exp(-a) - 0.75


def _laplace_grad(a: Tensor) -> tuple[Tensor, Tensor]:
    # e^{-a} (1 + a) -> 0 as a -> inf; at a = inf the product 0 * inf is replaced by it
    h = torch.where(torch.isinf(a), 0.0, torch.exp(-a) * (1.0 + a)) - 0.75
    return -expm1(-a), h  # 1 - e^{-a}, exact for small a


def _logistic_value(a: Tensor) -> tuple[Tensor | None, Tensor]:
    # 2 log(1 + e^{-a}) - 1; softplus(-a) is log1p(exp(-a)), exact for -a <= 0
    return None, 2.0 * torch.nn.functional.softplus(-a) - 1.0


def _logistic_grad(a: Tensor) -> tuple[Tensor, Tensor]:
    # a sigmoid(-a) -> 0 as a -> inf (inf * 0 at a = inf: replaced by the limit)
    tail = torch.where(torch.isinf(a), 0.0, a * torch.sigmoid(-a))
    return torch.tanh(0.5 * a), _logistic_value(a)[1] + 2.0 * tail


_FAMILIES = {
    "normal": (_normal_value, _normal_grad),
    "laplace": (_laplace_value, _laplace_grad),
    "logistic": (_logistic_value, _logistic_grad),
}


def _crps_value(value: Tensor, loc: Tensor, log_scale: Tensor, family: str) -> Tensor:
    """``|r| c(a) + sigma s(a)`` (module docstring), from a residual that cannot overflow."""
    r, m = split_residual(value, loc)
    a = (mul_exp(r, -log_scale) * m).abs()  # m last: overflows only where z does
    c, s = _FAMILIES[family][0](a)
    abs_r = r.abs()
    # where y - mu overflowed, r is its half (m = 2): the score is formed in halves (s / 2
    # is exact) and doubled last, so it overflows only where it is beyond the float range
    score = ((abs_r if c is None else abs_r * c) + mul_exp(s / m, log_scale)) * m
    # an infinite |r| (a target or location at infinity) scores inf, also where sigma s(a)
    # is -inf (an infinite sigma: a = inf e^{-inf} is NaN, inf - inf)
    return torch.where(torch.isinf(abs_r), math.inf, score)


class _LocationScaleCRPS(torch.autograd.Function):
    """The CRPS of one family with its closed-form gradients (module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, loc: Tensor, log_scale: Tensor, family: str) -> Tensor:
        return _crps_value(value, loc, log_scale, family)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        value, loc, log_scale, ctx.family = inputs
        ctx.save_for_backward(value, loc, log_scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        value, loc, log_scale = ctx.saved_tensors
        need_value, need_loc, need_log_scale, _ = ctx.needs_input_grad
        z = residual_for_backward(value, loc, log_scale)
        g, h = _FAMILIES[ctx.family][1](z.abs())
        d_value = d_loc = d_log_scale = None
        if need_value or need_loc:
            slope = grad * torch.sign(z) * g  # d/dy; 0 on the location (the mid subgradient)
            d_value = slope.sum_to_size(value.shape) if need_value else None
            d_loc = (-slope).sum_to_size(loc.shape) if need_loc else None
        if need_log_scale:
            # d/dlog sigma = sigma h(a): one mul_exp, finite wherever the product is
            d_log_scale = mul_exp(grad * h, log_scale).sum_to_size(log_scale.shape)
        return d_value, d_loc, d_log_scale, None


def _crps(family: str, value, loc, log_scale, scale, validate_args) -> Tensor:
    forms = {"log_scale": log_scale, "scale": scale}
    t, _, _, log_scale = location_scale_inputs(value, loc, forms, validate_args)
    return _LocationScaleCRPS.apply(t["value"], t["loc"], log_scale, family)


def crps_normal(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""CRPS of :math:`\mathcal N(\mu, \sigma^2)` at ``value``, in closed form.

    .. math::
        \operatorname{CRPS} = \sigma\Big(z\,(2\Phi(z) - 1) + 2\varphi(z)
            - \tfrac{1}{\sqrt\pi}\Big)
          = |r|\operatorname{erf}\!\big(\tfrac{|z|}{\sqrt2}\big)
            + \sigma\Big(2\varphi(z) - \tfrac1{\sqrt\pi}\Big),
        \qquad r = y - \mu,\ z = r / \sigma

    (Gneiting et al. 2005, eq. 5), in the units of ``value``; written in the second form,
    it is exact for every target and scale: ``|y - mu| - sigma / sqrt(pi)`` far out, where
    ``z`` may overflow, and ``0.2337 sigma`` on the mean, also where ``sigma`` itself
    overflows. Gradients in closed form: :math:`\operatorname{erf}(z/\sqrt2)` for ``value``,
    its negative for ``loc`` and :math:`\sigma(2\varphi(z) - 1/\sqrt\pi)` for
    ``log_scale``.

    Args:
        value: observations :math:`y`, shape broadcastable with the parameters.
        loc: mean :math:`\mu`.
        log_scale: :math:`\log\sigma`, unconstrained (positional).
        scale: alternatively :math:`\sigma > 0` (keyword-only; exactly one of the two; it
            goes through ``log`` once, a relative error ``eps |log sigma|`` more).
        validate_args: check ``value`` has no NaN and ``scale`` is positive; ``None`` checks
            CPU tensors only (no GPU host sync), ``False`` never checks.

    Returns:
        Tensor of the broadcast shape, one score per element (unreduced; average it for a
        training loss); float32 for half-precision inputs.

    Raises:
        ValueError: not exactly one of ``log_scale`` / ``scale``, shapes do not broadcast,
            or (when validating) NaN in ``value`` or a ``scale`` that is not positive.

    Example:
        >>> crps_normal(torch.tensor([0.0, 1.0, 1e30]), 0.0, torch.tensor([0.0, 0.0, -100.0]))
        tensor([2.3369e-01, 6.0244e-01, 1.0000e+30])
        >>> crps_normal(torch.tensor(0.0), 0.0, scale=2.0)  # 2 (sqrt(2) - 1) / sqrt(pi)
        tensor(0.4674)
    """
    return _crps("normal", value, loc, log_scale, scale, validate_args)


def crps_laplace(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""CRPS of the Laplace distribution of location :math:`\mu` and scale :math:`b`.

    .. math::
        \operatorname{CRPS} = |r| + b\Big(e^{-|r|/b} - \tfrac34\Big), \qquad r = y - \mu

    (Jordan, Krüger & Lerch 2019, ``crps_laplace``), exact for every target and scale
    (``3b/4`` below ``|r|`` far out, ``b/4`` on the location). Gradients in closed form:
    :math:`\operatorname{sign}(r)(1 - e^{-|r|/b})` for ``value``, its negative for ``loc``,
    :math:`b\big(e^{-a}(1 + a) - 3/4\big)`, :math:`a = |r|/b`, for ``log_scale``.

    Args:
        value: observations :math:`y`, shape broadcastable with the parameters.
        loc: location :math:`\mu`.
        log_scale: :math:`\log b`, unconstrained (positional).
        scale: alternatively :math:`b > 0` (keyword-only; exactly one of the two). There is
            no ``var`` form: the Laplace variance is :math:`2b^2`.
        validate_args: as in :func:`crps_normal`.

    Returns:
        Tensor of the broadcast shape, one score per element; float32 for half inputs.

    Raises:
        ValueError: as in :func:`crps_normal`.

    Example:
        >>> crps_laplace(torch.tensor([0.0, 1.0]), 0.0, torch.tensor(0.0))  # 1/4, 1/4 + 1/e
        tensor([0.2500, 0.6179])
    """
    return _crps("laplace", value, loc, log_scale, scale, validate_args)


def crps_logistic(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""CRPS of the logistic distribution of location :math:`\mu` and scale :math:`s`.

    .. math::
        \operatorname{CRPS} = s\big(z - 2\log F(z) - 1\big)
          = |r| + s\big(2\log(1 + e^{-|z|}) - 1\big), \qquad z = (y - \mu)/s,\ F = \sigma

    (Jordan, Krüger & Lerch 2019, ``crps_logistic``; even in ``z``, so written in ``|z|``),
    exact for every target and scale (``s (2 log 2 - 1)`` on the location, ``|r| - s`` far
    out). Gradients in closed form: :math:`\tanh(z/2)` for ``value``, its negative for
    ``loc``, :math:`s\big(2\log(1 + e^{-a}) - 1 + 2a\,\sigma(-a)\big)`, :math:`a = |z|`, for
    ``log_scale``.

    Args:
        value: observations :math:`y`, shape broadcastable with the parameters.
        loc: location :math:`\mu`.
        log_scale: :math:`\log s`, unconstrained (positional).
        scale: alternatively :math:`s > 0` (keyword-only; exactly one of the two).
        validate_args: as in :func:`crps_normal`.

    Returns:
        Tensor of the broadcast shape, one score per element; float32 for half inputs.

    Raises:
        ValueError: as in :func:`crps_normal`.

    Example:
        >>> crps_logistic(torch.tensor([0.0, 1e30]), 0.0, torch.tensor(0.0))  # 2 log 2 - 1
        tensor([3.8629e-01, 1.0000e+30])
    """
    return _crps("logistic", value, loc, log_scale, scale, validate_args)
