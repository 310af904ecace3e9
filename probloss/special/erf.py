"""The error function, exact also inside ``torch.compile``."""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

# Below this |x| the compiled erf sums its Taylor series (inductor's float32 vector erf
# has an absolute, not a relative, error below |x| = 0.28: erf(1e-15) came out 0).
_SERIES_MAX_ABS_X = 0.5


@cache
def _series_coefficients(dtype: torch.dtype) -> tuple[float, ...]:
    """``(-1)^n / (n! (2n + 1))`` until the first omitted term, at ``|x| = 1/2``, is below
    ``eps / 4`` of the first (the series alternates with decreasing terms there, so the
    truncation error is below the first omitted term)."""
    target = torch.finfo(dtype).eps / 4.0
    coefficients, n = [], 0
    while True:
        coefficients.append((-1.0) ** n / (math.factorial(n) * (2 * n + 1)))
        if _SERIES_MAX_ABS_X ** (2 * n + 2) / (math.factorial(n + 1) * (2 * n + 3)) <= target:
            return tuple(coefficients)
        n += 1


def erf(x: Tensor) -> Tensor:
    r"""``torch.erf(x)``, accurate in relative error also inside ``torch.compile``.

    Eager code calls ``torch.erf``. While compiling, ``|x| < 1/2`` takes the series
    :math:`\operatorname{erf}(x) = \frac{2x}{\sqrt\pi}\sum_n \frac{(-1)^n x^{2n}}{n!\,(2n+1)}`
    (terms from ``finfo(dtype).eps``: 6 in float32, 12 in float64; alternating and
    decreasing there, no cancellation), the rest ``torch.erf`` (accurate away from 0).
    """
    if not torch.compiler.is_compiling():
        return torch.erf(x)
    small = x.abs() < _SERIES_MAX_ABS_X
    xs = torch.where(small, x, 0.0)  # double where: the series is fed 0 where unselected
    x2 = xs * xs
    coefficients = _series_coefficients(x.dtype)
    p = torch.full_like(x2, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        p = p * x2 + c
    return torch.where(small, (2.0 / math.sqrt(math.pi)) * xs * p, torch.erf(x))
