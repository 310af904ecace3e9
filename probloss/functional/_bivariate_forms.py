r"""The closed forms of the correlated bivariate normal, derived once for every user.

With standardised residuals :math:`z_i = (x_i - \mu_i)/\sigma_i` and :math:`\rho = \tanh a`
(``a = atanh_rho``, unconstrained), every bivariate quantity of probloss comes from the
identities below: the single density
(:func:`~probloss.functional.bivariate_normal_log_prob` and its log-scaled fallback), the
fused mixture kernel (:func:`~probloss.functional.bivariate_normal_mixture_log_prob`), the
mixture sampler and :class:`~probloss.distributions.BivariateNormal`.

**Quadratic form.** The correlation matrix has eigenvectors ``(1, 1)/sqrt2``, ``(1, -1)/sqrt2``
with eigenvalues ``1 + rho``, ``1 - rho``, and ``1/(1 +- tanh a) = (1 + e^{-+2a})/2``, so
with ``p = z1 + z2`` and ``m = z1 - z2``::

    Q = (z1^2 - 2 rho z1 z2 + z2^2) / (1 - rho^2)
      = p^2 (1 + e^{-2a})/4 + m^2 (1 + e^{2a})/4
      = (z1^2 + z2^2)/2 + (P^2 + M^2)/4,          P = p e^{-a},  M = m e^{a}
      = (1 + e^{-2b})/4 (wide^2 + (narrow e^b)^2), wide, narrow = z1 +- sign(a) z2

with ``b = |a|``: sums of squares, no ``1 - rho^2`` (0 in float32 once ``tanh a`` rounds
to 1, from ``|a|`` of about 9), no cancellation; and ``-log(1 - rho^2)/2 = log cosh a``.
The fused mixture kernel accumulates the third line (:func:`eigen_terms`: ``e^{+-a}`` are
finite in its domain); the single density the fourth (:func:`rotated`,
:func:`quadratic_factor`), finite for every ``a``.

**Derivatives.** With ``z2' = sign(a) z2``, ``c = cosh(b) e^{-b} = (1 + e^{-2b})/2``,
``s = sinh(b) e^{-b} = -expm1(-2b)/2`` (so ``e^{2b} (c - s) = 1``) and ``n = z1 - z2'``
(:func:`gradient_pieces`)::

    d(-Q/2)/dz1  = -c e^{2b} (c z1 - s z2')  = -c (z1 + n s e^{2b})
    d(-Q/2)/dz2' = -c e^{2b} (c z2' - s z1)  = -c (z2' - n s e^{2b})
    d(-Q/2)/db   = (z1 e^{-b} + n s e^b) (z2' e^{-b} - n s e^b)
    d log cosh(a)/da = tanh a

One form, accurate in every regime: near the correlation line ``n`` is exact (Sterbenz) and
small; where one coordinate dwarfs the other, the small one enters through its own term
(through ``z1 +- z2'`` it would be rounded away: d/dx1 = 0 instead of -2.7 at z2 = 2e8);
``s`` is exact for small ``b``; ``e^{2b}`` never multiplies ``e^{-2b}``, which underflows for
``b > 52`` in float32.

**Sampling.** ``x = mu + sigma (e1, rho e1 + sqrt(1 - rho^2) e2)`` with
``sqrt(1 - rho^2) = sech a = 2 e^{-b} / (1 + e^{-2b})`` (:func:`sech`, never
``1 - tanh^2``), the second step with its own backward (:class:`CorrelatedStep`).

**Signs.** ``sign(a)`` is ``copysign(1, a)`` (:func:`correlation_sign`): ``b = sign(a) a``
has the derivative ``sign(a)`` also at 0, where ``abs``' subgradient is 0 (either branch
at ``a = 0`` is the same analytic function of ``a``, so either one-sided derivative is the
derivative).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..special import log_cosh, mul_exp
from ..special.exp import expm1


def correlation_sign(atanh_rho: Tensor, like: Tensor) -> Tensor:
    """``sign(a)`` as ``+-1`` in the dtype of ``like`` (``sign(+-0) = +-1``)."""
    # copysign, not where(a >= 0, 1, -1): 15x faster on CPU; sign(-0.0) = -1 is as good
    return torch.copysign(torch.ones((), dtype=like.dtype, device=like.device), atanh_rho)


def exp_cap(dtype: torch.dtype) -> float:
    """Largest ``|a|`` used in ``exp(|a| / 2)``: ``2 floor(log(max))`` (176 float32, 1418 float64).

    ``exp(cap / 2)`` is finite, and beyond the cap ``(n e^{|a|})^2`` overflows for every
    nonzero ``n`` (even the smallest subnormal: ``(e^{-103.3} e^{176})^2 > e^{88.8}`` in
    float32, ``(e^{-744.4} e^{1418})^2 > e^{709.8}`` in float64), so capping never changes
    a finite result; it only keeps ``0 * inf`` out of points exactly on the line.
    """
    return 2.0 * math.floor(math.log(torch.finfo(dtype).max))


def exp_half(b: Tensor) -> Tensor:
    """``exp(min(b, cap) / 2)``, finite (see :func:`exp_cap`)."""
    return torch.exp(0.5 * b.clamp(max=exp_cap(b.dtype)))


def rotated(z: Tensor, atanh_rho: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(wide, narrow e^b, e^{-b})`` of the quadratic form (module docstring, fourth line).

    ``wide, narrow = z1 +- sign(a) z2`` (``p, m`` for ``a >= 0``, ``m, p`` below);
    ``narrow e^b`` is ``(narrow f) f`` with ``f = e^{min(b, cap)/2}`` finite, so
    ``narrow == 0`` (a point exactly on the correlation line) gives 0, never ``0 * inf``.
    """
    sign = correlation_sign(atanh_rho, z)
    z1, z2 = z.unbind(-1)
    z2 = sign * z2
    b = sign * atanh_rho
    f = exp_half(b)
    return z1 + z2, (z1 - z2) * f * f, torch.exp(-b)


def quadratic_factor(e_2b: Tensor) -> Tensor:
    """``k = sqrt((1 + e^{-2b})/8)`` from ``e_2b = e^{-2b}``: ``Q/2 = (k wide)^2 + (k narrow
    e^b)^2``, the factor taken inside the squares, so no intermediate exceeds ``Q/2``."""
    return torch.sqrt(0.125 + 0.125 * e_2b)


def eigen_terms(z: Tensor, atanh_rho: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(e^a, e^-a, P, M)`` with ``P = (z1 + z2) e^-a``, ``M = (z1 - z2) e^a`` (module
    docstring, third line: ``Q = (z1^2 + z2^2)/2 + (P^2 + M^2)/4``), ``z (*, 2)`` given as
    its last dimension. ``e^{+-a}`` are finite for ``|a| < log(max)``."""
    z1, z2 = z[..., 0], z[..., 1]
    ea = torch.exp(atanh_rho)
    inv_ea = torch.exp(-atanh_rho)
    return ea, inv_ea, torch.add(z1, z2).mul_(inv_ea), torch.sub(z1, z2).mul_(ea)


def cosh_coefficient(b: Tensor) -> Tensor:
    """``c = cosh(b) e^{-b} = (1 + e^{-2b})/2``."""
    return 0.5 + 0.5 * torch.exp(-2.0 * b)


def sinh_coefficient(b: Tensor) -> Tensor:
    """``s = sinh(b) e^{-b} = -expm1(-2b)/2``, exact for small ``b`` (``expm1`` of
    :mod:`probloss.special.exp`, exact also while compiling)."""
    return -0.5 * expm1(-2.0 * b)


def gradient_pieces(z: Tensor, atanh_rho: Tensor, *, with_c: bool = False) -> tuple:
    """``(sign(a), b, z1, z2', c, s, n s)`` of the derivatives (module docstring), ``z (*, 2)``
    given as its last dimension (``c`` is None unless ``with_c``: the fused kernel folds
    ``c = 1 - s`` into its weights); ``z1`` and ``z2`` enter directly, never through
    ``z1 +- z2``. Differentiable (the single density's backward is differentiated again;
    the order of the operations fixes the order in which a double backward sums)."""
    sign = correlation_sign(atanh_rho, z)
    b = sign * atanh_rho
    z1, z2 = z.unbind(-1)
    z2 = sign * z2
    c = cosh_coefficient(b) if with_c else None
    s = sinh_coefficient(b)
    return sign, b, z1, z2, c, s, (z1 - z2) * s


def sech(atanh_rho: Tensor) -> Tensor:
    """``sqrt(1 - rho^2) = 1/cosh(a) = 2 e^{-|a|} / (1 + e^{-2|a|})``: never ``1 - tanh^2``
    (0 in float32 from ``|a|`` of about 9), no overflow; ``abs``' zero subgradient at 0 is
    ``sech'(0) = 0``."""
    g = torch.exp(-atanh_rho.abs())
    return 2.0 * g / (1.0 + g * g)


class CorrelatedStep(torch.autograd.Function):
    """``e^{t} (tanh(a) e1 + sech(a) e2)``, the second coordinate's step of a draw, with the
    gradient in ``a``, ``e^{t} sech(a) (sech(a) e1 - tanh(a) e2)``, formed as
    ``mul_exp(sech(a) e1 - tanh(a) e2, t - log cosh a)``: through autograd it is
    ``e^{t}`` (``inf``) times ``1 - tanh^2`` (0 in float32 from ``|a|`` of about 9):
    NaN where the gradient is a defined ``+-inf`` or finite (issue 10).

    ``apply(a, t, e1, e2)``, all broadcastable; the gradients of ``e1`` and ``e2`` (standard
    normal draws) are not formed."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, t: Tensor, e1: Tensor, e2: Tensor) -> Tensor:
        return mul_exp(torch.tanh(a) * e1 + sech(a) * e2, t)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        a, t, e1, e2, y = ctx.saved_tensors
        s = sech(a)
        grad_a = mul_exp(g * (s * e1 - torch.tanh(a) * e2), t - log_cosh(a))
        return grad_a, g * y, None, None  # d/dt: g y, as mul_exp's
