r"""The normal log density from each scale form, with hand-written backwards.

:func:`~probloss.functional.normal_log_prob` and :func:`~probloss.functional.normal_nll`
evaluate :math:`-\tfrac12 z^2 - \log\sigma - \tfrac12\log 2\pi` from the form the
caller gave, without a round trip through ``exp``/``log``: ``z = r / scale``, ``r /
sqrt(var)`` (:class:`ScaleFormDensity`) or ``r e^{-log_scale}``, ``r e^{-log_var/2}``
(:class:`_LogFormDensity`, by :func:`~probloss.functional._params.standardized_residual`).
Each backward is written out where autograd would overflow an intermediate that the exact
derivative does not (see the classes' docstrings).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.constants import HALF_LOG_2PI
from .._core.ops import host_readable
from ..special.exp import mul_exp
from ._params import (
    residual_for_backward,
    split_residual,
    standardized_value,
    summed_location_gradients,
)


def scale_of(name: str, param: Tensor) -> Tensor:
    """``sigma`` from a ``scale`` or ``var`` parameter."""
    return param if name == "scale" else torch.sqrt(param)


def _normal_log_density(z: Tensor, log_scale: Tensor) -> Tensor:
    # (-z/2) * z: z^2 alone overflows for |z| > sqrt(max) where z^2/2 may not.
    return (-0.5 * z) * z - log_scale - HALF_LOG_2PI


def log_density(value: Tensor, loc: Tensor, name: str, param: Tensor) -> Tensor:
    """The normal log density from the scale form ``name`` (no floor)."""
    if name in ("log_scale", "log_var"):
        k = 1.0 if name == "log_scale" else 0.5
        return _LogFormDensity.apply(value, loc, param, k)
    k = 1.0 if name == "scale" else 0.5
    return ScaleFormDensity.apply(value, loc, param, k)


def _value_gradient(grad: Tensor, r: Tensor, over_var, over_sigma) -> Tensor:
    """``-grad r / sigma^2``, the density's ``d/dvalue`` (before the factor ``m``), given
    ``over_var(x) = x / sigma^2`` and ``over_sigma(x) = x / sigma`` of the scale form.

    Formed as ``over_var(-grad r)``; where ``-grad r`` underflows although the result need
    not be small (a responsibility 1e-28 times ``r = 3e-39`` at ``sigma = e^{-75}`` in
    float32: exact -0.034, 0 before) it is ``over_sigma(-grad z)`` with ``z = over_sigma(r)``
    formed first. Where the values can be read on the host (:func:`host_readable`) that
    fallback runs only when some entry needs it.
    """
    prod = -grad * r
    d_value = over_var(prod)
    lost = (prod == 0) & (grad != 0) & (r != 0)
    if not host_readable(lost) or bool(lost.any()):
        z = over_sigma(torch.where(lost, r, 0.0))  # double where: 0 elsewhere
        d_value = torch.where(lost, over_sigma(-grad * z), d_value)
    return d_value


def _summed_location_gradients(ctx, d_value, grad, r, m, log_var) -> tuple[Tensor | None, ...]:
    """``d/dvalue`` and ``d/dloc`` summed to the inputs' shapes, from the entries
    ``d_value = -grad r m / sigma^2`` (``log_var(dtype)``: ``log sigma^2``), by
    :func:`summed_location_gradients` (finite where terms of opposite signs overflow)."""
    value, loc = ctx.saved_tensors[:2]

    def log_abs(wide: torch.dtype) -> Tensor:
        log_gr = grad.to(wide).abs().log() + r.to(wide).abs().log()
        return log_gr + m.to(wide).log() - log_var(wide)

    sign = -(grad.sign() * r.sign())
    return summed_location_gradients(ctx.needs_input_grad, value, loc, d_value, sign, log_abs)


class _FormDensity(torch.autograd.Function):
    """Base of the two forms: inputs ``(value, loc, param, k)``, all three tensors saved."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor, float], output: Tensor) -> None:
        value, loc, param, ctx.k = inputs
        ctx.save_for_backward(value, loc, param)


class ScaleFormDensity(_FormDensity):
    """The log density from ``sigma = p^k`` (``k = 1``: a scale, ``k = 1/2``: a variance),
    ``z = (r / sigma) m`` with ``value - loc = r m`` (:func:`split_residual`, ``m``
    applied last), with the derivatives in closed form.

    ``d/dvalue = -d/dloc = -r m / p^{2k}`` (``r / p / p`` or ``r / var``, then ``m``):
    autograd would form ``d/dz = -z`` first, which overflows where ``z`` does (``r m = 3.8e38``,
    ``sigma = 1.08``: ``z = 3.5e38`` is inf in float32, ``d/dvalue = 3.3e38``), and ``m``
    times the result before the ``1/2`` of the halving. ``d/dp = k (z^2 - 1) / p`` with ``k
    (z^2 - 1)`` formed first (``(k z) z - k``: ``z^2`` alone overflows before the ``k`` of a
    variance) and divided by ``p`` once (never through ``1/p``, nor ``e^{-log p}`` with its
    error ``eps |log p|``): autograd sends ``z^2 / p`` and ``-k / p`` separately, each
    infinite for a subnormal ``p`` (``inf - inf``, or ``-inf`` for ``-1/(2 var) = -2.6e38``
    at ``var = 1.9e-39``). Where ``k (z^2 - 1)`` itself overflows the terms are divided
    first (finite only for ``p > 1``); where both overflow the exact value does too, with
    the sign of ``z^2 - 1``. Built from differentiable ops.
    """

    @staticmethod
    def forward(value: Tensor, loc: Tensor, param: Tensor, k: float) -> Tensor:
        return _normal_log_density(*_scale_form_z(value, loc, param, k))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        value, loc, param = ctx.saved_tensors
        k = ctx.k
        grad_value = grad_loc = grad_param = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            r, m = split_residual(value, loc)
            sigma = scale_of("scale" if k == 1.0 else "var", param)
            # -r / sigma^2, each division rounded once: an intermediate exceeds the result
            # only for p > 1, where it is at most |g r|
            d_value = _value_gradient(
                grad,
                r,
                lambda x: x / param / param if k == 1.0 else x / param,
                lambda x: x / sigma,
            )
            d_value = d_value * m  # m last
            grad_value, grad_loc = _summed_location_gradients(
                ctx, d_value, grad, r, m, lambda wide: 2.0 * k * param.to(wide).log()
            )
        if ctx.needs_input_grad[2]:
            z, _ = _scale_form_z(value, loc, param, k)
            gk = k * grad
            inner = (gk * z) * z - gk  # k g (z^2 - 1), k first
            direct = torch.isfinite(inner)
            total = torch.where(direct, inner, 0.0) / param  # rounded once, 1/p not formed
            # double where: the split form only sees z and g where the sum overflowed
            z_split = torch.where(direct, 0.0, z)
            gk_split = torch.where(direct, 0.0, gk)
            split = (gk_split * z_split) * (z_split / param) - gk_split / param
            split = torch.where(torch.isnan(split), torch.sign(inner) * math.inf, split)
            grad_param = torch.where(direct, total, split).sum_to_size(param.shape)
        return grad_value, grad_loc, grad_param, None


def _scale_form_z(value: Tensor, loc: Tensor, param: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """``(z, log sigma)`` for ``sigma = p^k``: ``z = (r / sigma) m``, ``m`` last (finite
    wherever ``z`` is representable), ``log sigma = k log p`` (a given scale or variance is
    never sent through ``exp``)."""
    sigma = param if k == 1.0 else torch.sqrt(param)
    r, m = split_residual(value, loc)
    return (r / sigma) * m, k * torch.log(param)


class _LogFormDensity(_FormDensity):
    """The log density from ``log sigma = k p`` (``k = 1``: ``log_scale``, ``k = 1/2``:
    ``log_var``), ``z`` by :func:`standardized_residual`.

    ``d/dp = k (z^2 - 1)`` is formed as ``((k z) z - k)``: autograd through ``z = r
    e^{-k p}`` multiplies ``z^2`` by ``k`` last, and ``z^2`` overflows float32 at ``|z| =
    1.9e19`` where ``z^2 / 2`` is ``1.8e38`` (``log_var = 0``, ``r = 2e19``: d/dlog_var was
    ``inf``, exact ``2e38``). ``d/dvalue = -d/dloc = -r m e^{-2 k p}``: one :func:`mul_exp`
    of ``r`` (``value - loc = r m``, :func:`split_residual`), ``m`` last. Autograd would form
    ``d/dz = -z``, infinite where ``z`` overflows although ``z / sigma`` does not (``r m =
    3.8e38``, ``log_scale = 0.073``: ``z = 3.5e38``, ``d/dvalue = 3.3e38`` in float32), and
    ``m`` times the result before the ``1/2`` of the halving. Built from differentiable ops
    (differentiable again).
    """

    @staticmethod
    def forward(value: Tensor, loc: Tensor, param: Tensor, k: float) -> Tensor:
        log_sigma = k * param
        z = standardized_value(value, loc, log_sigma)  # no graph here: the plain value
        return _normal_log_density(z, log_sigma)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        value, loc, param = ctx.saved_tensors
        k = ctx.k
        log_sigma = k * param
        grad_value = grad_loc = grad_param = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            r, m = split_residual(value, loc)
            d_value = _value_gradient(
                grad,
                r,
                lambda x: mul_exp(x, -2.0 * log_sigma),
                lambda x: mul_exp(x, -log_sigma),
            )
            d_value = d_value * m  # m last
            grad_value, grad_loc = _summed_location_gradients(
                ctx, d_value, grad, r, m, lambda wide: 2.0 * k * param.to(wide)
            )
        if ctx.needs_input_grad[2]:
            z = residual_for_backward(value, loc, log_sigma)
            grad_param = ((grad * k * z) * z - grad * k).sum_to_size(param.shape)
        return grad_value, grad_loc, grad_param, None
