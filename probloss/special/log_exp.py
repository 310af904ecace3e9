"""Logarithms of exponential expressions, accurate over the whole floating range.

All functions are elementwise, broadcast like torch, return the input dtype and evaluate
half-precision inputs in float32 (see :mod:`probloss._core.dtype`). Branch switches use
:func:`~probloss.special.where.safe_where`, so gradients are finite wherever the true
derivative is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.constants import LOG_2
from .._core.dtype import as_float_tensor, upcast
from .._core.ops import host_readable
from .exp import expm1
from .where import safe_where

# ln 2 = hi + lo with hi exactly representable: y - hi is then exact (Sterbenz) near y = ln 2
# and (y - hi) - lo carries ln 2 to twice the working precision.
# lo for float64 is ln 2 - float64(ln 2), from a 50-digit mpmath value of ln 2.
_LN2_LO_FLOAT64 = 2.3190468138462996e-17
_LN2_SPLIT = {
    torch.float64: (LOG_2, _LN2_LO_FLOAT64),
    # float32(ln 2) is exact in float64, so the float64 difference below is exact to ~1e-17.
    torch.float32: (
        float(torch.tensor(LOG_2, dtype=torch.float32)),
        (LOG_2 - float(torch.tensor(LOG_2, dtype=torch.float32))) + _LN2_LO_FLOAT64,
    ),
}


def log1mexp(x: Tensor) -> Tensor:
    r"""``log(1 - exp(-x))`` for ``x >= 0``, accurate for every ``x`` (Maechler 2012).

    .. math::
        \operatorname{log1mexp}(x) = \begin{cases}
            \log(-\operatorname{expm1}(-x)) & x \le \ln 2 \\
            \operatorname{log1p}(-e^{-x}) & x > \ln 2
        \end{cases}

    Returns ``-inf`` at ``x = 0`` (with derivative ``+inf``, the true one) and NaN for
    ``x < 0``. The derivative is ``1 / expm1(x)``.

    Args:
        x: tensor of shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``x``.

    Example:
        >>> log1mexp(torch.tensor([1e-20, 1.0, 50.0], dtype=torch.float64))
        tensor([-4.6052e+01, -4.5868e-01, -1.9287e-22], dtype=torch.float64)
    """
    x = as_float_tensor(x, "x")
    xc = upcast(x)
    out = safe_where(
        xc <= LOG_2,
        xc,
        lambda t: torch.log(-expm1(-t)),  # 1 - e^-x = -expm1(-x): exact for small x
        lambda t: torch.log1p(-torch.exp(-t)),  # e^-x < 1/2: log1p keeps every digit
        safe_true=LOG_2,
        safe_false=1.0,
    )
    return out.to(x.dtype)


def softplus_inverse(y: Tensor) -> Tensor:
    r"""Inverse of ``softplus``: ``log(expm1(y))`` for ``y > 0``, accurate in relative error.

    .. math::
        \operatorname{softplus}^{-1}(y) = \log(e^y - 1) = \begin{cases}
            \log(\operatorname{expm1}(y)) & y < 1/2 \\
            \operatorname{log1p}\!\big(2 \operatorname{expm1}(y - \ln 2)\big) & 1/2 \le y \le 2 \\
            y + \operatorname{log1mexp}(y) & y > 2
        \end{cases}

    The middle form (``e^y - 2 = 2 (e^{y - \ln 2} - 1)``) is exact through the root
    ``y = ln 2``, where ``ln 2`` is carried in two pieces. Returns ``-inf`` at 0 and NaN for
    ``y < 0``. The derivative is ``1 / (1 - exp(-y))``. Use it to initialise a bias so that
    ``softplus(bias)`` starts at a chosen scale.

    Args:
        y: tensor of shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``y``.

    Example:
        >>> softplus_inverse(torch.tensor([1e-30, 0.6931471805599453, 100.0], dtype=torch.float64))
        tensor([-6.9078e+01, -4.6381e-17,  1.0000e+02], dtype=torch.float64)
    """
    y = as_float_tensor(y, "y")
    yc = upcast(y)
    ln2_hi, ln2_lo = _LN2_SPLIT[yc.dtype]

    def near_root(t: Tensor) -> Tensor:
        return torch.log1p(2.0 * expm1((t - ln2_hi) - ln2_lo))

    def large(t: Tensor) -> Tensor:
        return t + log1mexp(t)  # log(e^y - 1) = y + log(1 - e^-y)

    def upper(t: Tensor) -> Tensor:
        return safe_where(t <= 2.0, t, near_root, large, safe_true=1.0, safe_false=3.0)

    out = safe_where(
        yc < 0.5,
        yc,
        lambda t: torch.log(expm1(t)),  # expm1 is exact for tiny y; log(y) dominates
        upper,
        safe_true=0.25,
        safe_false=1.0,
    )
    return out.to(y.dtype)


def log_cosh(x: Tensor) -> Tensor:
    r"""``log(cosh(x))``, accurate for every finite ``x``, never computing ``cosh`` itself.

    .. math::
        \log\cosh x = \begin{cases}
            \operatorname{log1p}\!\big(2\sinh^2(x/2)\big) & |x| \le 2
                \text{ (or everywhere if all } |x| \le \log(\text{max})) \\
            |x| - \ln 2 + \operatorname{log1p}(e^{-2|x|}) & |x| > 2
        \end{cases}

    The first form (``cosh x - 1 = 2 sinh^2(x/2)``) keeps the ``x^2/2`` behaviour near 0,
    the second cannot overflow. The derivative is ``tanh(x)``. With it,
    ``log(1 - tanh(a)^2) = -2 log_cosh(a)`` is exact even where ``tanh(a)`` rounds to 1.

    Args:
        x: tensor of shape ``(*)``, any floating dtype.

    Returns:
        Tensor of shape ``(*)`` and the dtype of ``x``.

    Example:
        >>> log_cosh(torch.tensor([1e-10, 1.0, 1e4], dtype=torch.float64))
        tensor([5.0000e-21, 4.3378e-01, 9.9993e+03], dtype=torch.float64)
    """
    x = as_float_tensor(x, "x")
    xc = upcast(x)

    def near_zero(t: Tensor) -> Tensor:
        return torch.log1p(2.0 * torch.sinh(0.5 * t).square())

    # The first form is exact (if slower to converge to |x|) up to |x| = log(max), where
    # sinh(x/2)^2 ~ max/4 still fits: when every element is there, use it alone, skipping a
    # torch.where over a random mask (several times the cost of the arithmetic on CPU).
    # The check reads one reduction, free on CPU; accelerators, tracing and torch.func (which cannot
    # read a value) always take the blend.
    if xc.numel() and host_readable(xc):
        low, high = torch.aminmax(xc)
        bound = math.log(torch.finfo(xc.dtype).max)
        if bool(low >= -bound) and bool(high <= bound):
            return near_zero(xc).to(x.dtype)
    out = safe_where(
        xc.abs() <= 2.0,
        xc,
        near_zero,
        lambda t: t.abs() - LOG_2 + torch.log1p(torch.exp(-2.0 * t.abs())),
        safe_true=0.0,
        safe_false=3.0,
    )
    return out.to(x.dtype)
