r"""Exponentials with their leading Taylor terms removed, accurate in relative error.

``expm1mx(x) = exp(x) - 1 - x`` is the part of the exponential beyond its tangent at 0. It
appears wherever a divergence or a log-likelihood is measured from its minimum: the KL
divergence between two normals is ``(expm1mx(d) + ...) / 2`` with ``d`` the difference of
their log-variances, and ``x - log1p(x) = expm1mx(log1p(x))``. Written as
``exp(x) - 1 - x`` (or ``expm1(x) - x``) it loses every digit near 0, where it is
:math:`x^2/2`; written as below it is exact for every finite ``x``.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from .._core.dtype import as_float_tensor, upcast
from .._core.ops import host_readable, kernel_op
from .where import safe_where

# The series is used for |x| < 1. On [-1, 1], f(x) / x^2 >= f(-1) = e^-1 (its minimum), so
# the truncation error after n terms, at most |x|^n / (n + 2)! times x^2 for this entire
# series (alternating or with positive terms), is below eps / 4 of the value as soon as
# 1 / (n + 2)! <= e^-1 eps / 4.
_SERIES_MAX_ABS_X = 1.0


@cache
def _series_coefficients(dtype: torch.dtype) -> tuple[float, ...]:
    """``1 / (k + 2)!`` for ``k = 0 .. n - 1``, ``n`` derived from ``finfo(dtype).eps``."""
    target = math.exp(-1.0) * torch.finfo(dtype).eps / 4.0
    coefficients = []
    k = 0
    while True:
        coefficients.append(1.0 / math.factorial(k + 2))
        if 1.0 / math.factorial(k + 3) <= target:  # the first omitted term, at |x| = 1
            return tuple(coefficients)
        k += 1


def _series(x: Tensor) -> Tensor:
    """``x^2 sum_k x^k / (k + 2)!`` by Horner's rule; no cancellation for |x| < 1."""
    coefficients = _series_coefficients(x.dtype)
    p = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        p = p * x + c
    return (x * p) * x  # x * p first: x^2 alone underflows earlier than the result


def _negative(x: Tensor) -> Tensor:
    """For x <= -1: ``exp(x) + (-1 - x)``, a sum of two non-negative terms (no cancellation)."""
    return torch.exp(x) + (-1.0 - x)


def _positive(x: Tensor) -> Tensor:
    """For x >= 1: ``expm1(x) - x``; expm1(x) >= 1.7 x there, so at most a factor 3.8 is lost.

    At x = +inf it is ``e^x = inf`` (derivative inf), not ``inf - inf`` (double where).
    """
    infinite = torch.isinf(x)
    x_finite = torch.where(infinite, 2.0, x)
    return torch.where(
        infinite, torch.exp(torch.where(infinite, x, 2.0)), expm1(x_finite) - x_finite
    )


def _outside(x: Tensor) -> Tensor:
    return safe_where(x < 0, x, _negative, _positive, safe_true=-2.0, safe_false=2.0)


def expm1mx(x: Tensor) -> Tensor:
    r"""``exp(x) - 1 - x``, accurate in relative error for every finite ``x``.

    .. math::
        \operatorname{expm1mx}(x) = e^x - 1 - x = \begin{cases}
            x^2 \sum_{k=0}^{n-1} \dfrac{x^k}{(k+2)!} & |x| < 1 \\
            e^x + (-1 - x) & x \le -1 \\
            \operatorname{expm1}(x) - x & x \ge 1
        \end{cases}

    The series (``n`` from ``torch.finfo(dtype).eps``: 10 terms in float32, 17 in float64)
    keeps the :math:`x^2/2` behaviour at 0 that ``expm1(x) - x`` rounds away; below -1 the
    two terms are both non-negative; above 1 ``expm1(x) - x`` loses at most a factor 3.8.
    The result is never negative. The derivative is ``expm1(x)``, finite for every finite
    ``x`` (branches are fed safe inputs where they are not selected). Overflows to ``inf``
    exactly where :math:`e^x` does; ``expm1mx(+-inf) = inf`` with derivative inf / -1.

    Args:
        x: tensor of shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``x`` (half inputs evaluated in float32).

    Example:
        >>> expm1mx(torch.tensor([-50.0, 1e-10, 1.0, 30.0], dtype=torch.float64))
        tensor([4.9000e+01, 5.0000e-21, 7.1828e-01, 1.0686e+13], dtype=torch.float64)
    """
    x = as_float_tensor(x, "x")
    xc = upcast(x)
    out = safe_where(
        xc.abs() < _SERIES_MAX_ABS_X, xc, _series, _outside, safe_true=0.0, safe_false=2.0
    )
    return out.to(x.dtype)


def expm1(x: Tensor) -> Tensor:
    """``torch.expm1(x)``, exact also inside ``torch.compile``.

    Inductor's CPU vector code (torch 2.13; pytorch issue 189803) evaluates ``expm1(x)`` as
    ``exp(x) - 1``, which loses every digit for ``|x| < eps``. While compiling this is
    ``x`` below ``eps`` (``expm1(x) = x (1 + x/2 + ...)``), ``2 t / (1 - t)`` with
    ``t = tanh(x/2)`` below 1/2 (an identity; ``tanh`` keeps its digits near 0), and
    ``exp(x) - 1`` above (``e^x - 1 > 0.39 e^x`` there: no cancellation). Eager code and
    kernel operators call ``torch.expm1`` itself.
    """
    if not torch.compiler.is_compiling():
        return torch.expm1(x)
    small = x.abs() < 0.5
    t = torch.tanh(0.5 * torch.where(small, x, 0.0))  # double where: no 2/(1 - 1) gradient
    moderate = torch.where(small, 2.0 * t / (1.0 - t), torch.exp(x) - 1.0)
    return torch.where(x.abs() < torch.finfo(x.dtype).eps, x, moderate)


def _mul_exp_fake(x: Tensor, t: Tensor) -> Tensor:
    return torch.empty_like(x)


@kernel_op("mul_exp", event_dims=(0, 0), fake=_mul_exp_fake)
def _mul_exp_value(x: Tensor, t: Tensor) -> Tensor:
    """The forward of :func:`mul_exp` (see there); ``x`` and ``t`` of one shape."""
    finfo = torch.finfo(t.dtype)
    log_max, log_tiny = math.log(finfo.max), math.log(finfo.tiny)
    # Fast path when no element needs the four-step form: one reduction pass, free to read
    # on CPU; on an accelerator reading it would wait for the device, so there both forms
    # are built. (An operator's tensors are real even when its caller is being compiled.)
    if host_readable(t):
        if t.numel() == 0:
            return x * torch.exp(t)
        low, high = torch.aminmax(t)
        if bool(low > log_tiny) and bool(high < log_max):
            return x * torch.exp(t)
    direct = (t > log_tiny) & (t < log_max)
    # The clamp is exact: beyond |t| = 3.96 log(max) every nonzero float times exp(t) is 0
    # or inf already, so the result (and its gradient, formed from it) cannot change.
    quarter = torch.exp(0.25 * torch.where(direct, 0.0, t.clamp(-3.96 * log_max, 3.96 * log_max)))
    far = ((x * quarter) * quarter * quarter) * quarter
    return torch.where(direct, x * torch.exp(torch.where(direct, t, 0.0)), far)


class _MulExp(torch.autograd.Function):
    """``x * exp(t)`` with the backward ``(g exp(t), g y)``, ``y`` the output.

    Autograd of the product would form ``g * x`` before multiplying by ``exp(t)``: with
    ``x = 5e37`` and ``t = -80`` (``y = 1e3``) that overflows float32 although the gradient
    ``g y`` is ``1e6``. Both gradients are themselves computed without intermediate
    overflow, and are differentiable again (``g exp(t)`` is this function).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, t: Tensor) -> Tensor:
        return _mul_exp_value(x, t)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1], output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        t, y = ctx.saved_tensors
        grad_x = _MulExp.apply(grad, t) if ctx.needs_input_grad[0] else None
        grad_t = grad * y if ctx.needs_input_grad[1] else None
        return grad_x, grad_t


def mul_exp(x: Tensor, t: Tensor) -> Tensor:
    r"""``x * exp(t)``, accurate to about an ulp, finite wherever the product is.

    Where ``exp(t)`` is a normal float it is one multiplication. Elsewhere
    ``exp(t) = (e^{t/4})^4`` (``t/4`` is exact) is applied in four steps, whose partial
    products lie between ``x`` and the result, so nothing overflows or underflows unless the
    result does: ``z = 0 * exp(100)`` is 0 in float32, not NaN. Beyond
    ``|t| = 3.96 log(finfo.max)`` every nonzero float times ``exp(t)`` is 0 or inf, and
    ``t`` is clamped there. The gradient is written by hand (:class:`_MulExp`).

    Example:
        >>> mul_exp(torch.tensor([0.0, 5e37]), torch.tensor([100.0, -80.0]))
        tensor([  0.0000, 902.4257])
    """
    x, t = torch.broadcast_tensors(x, t)
    if not (torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)):
        return _mul_exp_value(x, t)  # no graph to record: skip autograd.Function's cost
    return _MulExp.apply(x, t)
