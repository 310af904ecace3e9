r"""Student's t log density: a normaliser without cancellation for large ``df`` and a tail
that never squares a residual that could overflow.

``student_t_log_prob(value, df, loc, log_scale, *, scale=None)``: ``df`` keeps its place
before the location (the order of ``torch.distributions.StudentT(df, loc, scale)``), then
the rule of the functional core: ``log_scale`` positional (unconstrained), ``scale`` the
keyword-only alternative, resolved by :func:`~probloss._core.params.log_scale_from`.
There is no ``var`` form: the variance of Student's t is :math:`\sigma^2 \nu/(\nu - 2)`
(infinite for :math:`\nu \le 2`), not the square of its scale. Half-precision inputs are
computed and returned in float32.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch
from torch import Tensor

from .._core.constants import HALF_LOG_2PI, HALF_LOG_PI, LOG_2
from .._core.validation import check_positive, should_validate
from ..special.exp import expm1mx
from ..special.where import safe_where
from ._location_scale import location_scale_inputs
from ._params import split_residual, standardized_residual

# D(a) = lgamma(a + 1/2) - lgamma(a) - log(a)/2 (-> 0 as a -> inf) is the part of the
# Student-t normaliser that cancels catastrophically for large df = 2a. Three forms:
#   a >= 10     the asymptotic series sum_k c_k a^(1-2k) (DLMF 5.11.8 with h = 1/2 and
#               B_n(1/2) = (2^(1-n) - 1) B_n, DLMF 24.4.27): c_k = B_2k (2^(1-2k) - 2) /
#               (2k (2k - 1)) = -1/8, 1/192, -1/640, 17/14336, ...; the number of terms is
#               derived from eps so that the first omitted term and its derivative are
#               below eps/16 of the leading ones at a = 10.
#   1 <= a < 10 shift up by 10 with Gamma(a + 1) = a Gamma(a):
#               D(a) = D(a + 10) + log1p(10/a)/2 - sum_{j<10} log1p(1/(2(a + j)))
#               (terms of size < 1: value and derivative lose less than a factor 30).
#   a < 1       lgamma(a + 1/2) - lgamma(a) - log(a)/2, well conditioned there (D ~ log(a)/2).
_ASYMPTOTIC_MIN_A = 10.0
_SHIFT = 10
_LGAMMA_MAX_A = 1.0


def _bernoulli_numbers(n: int) -> list[Fraction]:
    """B_0 .. B_n exactly (B_1 = -1/2), by the recurrence sum_k C(m+1, k) B_k = 0."""
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum(math.comb(m + 1, k) * b[k] for k in range(m)) / (m + 1))
    return b


@cache
def _asymptotic_coefficients(dtype: torch.dtype) -> tuple[float, ...]:
    eps = torch.finfo(dtype).eps
    b = _bernoulli_numbers(60)
    a = _ASYMPTOTIC_MIN_A
    coefficients: list[float] = []
    for k in range(1, 30):
        c = b[2 * k] * (Fraction(1, 2 ** (2 * k - 1)) - 2) / (2 * k * (2 * k - 1))
        coefficients.append(float(c))
        c_next = b[2 * k + 2] * (Fraction(1, 2 ** (2 * k + 1)) - 2) / ((2 * k + 2) * (2 * k + 1))
        # first omitted term's derivative, relative to the leading derivative 1/(8 a^2)
        if (2 * k + 1) * abs(float(c_next)) * a ** -(2 * k + 2) <= eps / 16 / (8 * a * a):
            return tuple(coefficients)
    raise AssertionError("asymptotic series did not reach eps")  # pragma: no cover


# Computed once at import: torch.compile would trace the Fraction arithmetic of a call
# (30 s of compile time per dtype).
_ASYMPTOTIC = {dtype: _asymptotic_coefficients(dtype) for dtype in (torch.float32, torch.float64)}


def _d_asymptotic(a: Tensor) -> Tensor:
    coefficients = _ASYMPTOTIC[a.dtype]
    inv_sq = 1.0 / (a * a)
    p = torch.full_like(a, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        p = p * inv_sq + c
    return p / a


def _d_shifted(a: Tensor) -> Tensor:
    out = _d_asymptotic(a + _SHIFT) + 0.5 * torch.log1p(_SHIFT / a)
    for j in range(_SHIFT):
        out = out - torch.log1p(0.5 / (a + j))
    return out


def _d_lgamma(a: Tensor) -> Tensor:
    return torch.lgamma(a + 0.5) - torch.lgamma(a) - 0.5 * torch.log(a)


def _d_moderate(a: Tensor) -> Tensor:
    return safe_where(
        a < _LGAMMA_MAX_A, a, _d_lgamma, _d_shifted, safe_true=0.5, safe_false=_LGAMMA_MAX_A
    )


def _log_gamma_ratio(a: Tensor) -> Tensor:
    """``lgamma(a + 1/2) - lgamma(a) - log(a)/2`` for a > 0, without cancellation."""
    return safe_where(
        a >= _ASYMPTOTIC_MIN_A,
        a,
        _d_asymptotic,
        _d_moderate,
        safe_true=_ASYMPTOTIC_MIN_A,
        safe_false=_LGAMMA_MAX_A,
    )


def _student_t_normaliser(df: Tensor) -> Tensor:
    """``lgamma((df + 1)/2) - lgamma(df/2) - log(pi df)/2 = D(df/2) - log(2 pi)/2``.

    Below ``df = eps``, ``D(a) = lgamma(1/2) + log(a)/2 - 2 log(2) a + O(a^2)`` (``lgamma(a)
    = -log a - gamma a``, ``psi(1/2) = -gamma - 2 log 2``) with the linear term below
    rounding, and ``log(a) = log(df) - log 2`` from ``df`` itself: ``df/2`` of a subnormal
    ``df`` is inexact, and 0 for the smallest one.
    """
    eps = torch.finfo(df.dtype).eps
    d = safe_where(
        df < eps,
        df,
        lambda x: HALF_LOG_PI + 0.5 * (torch.log(x) - LOG_2),  # lgamma(1/2) = log sqrt(pi)
        lambda x: _log_gamma_ratio(0.5 * x),
        safe_true=0.5 * eps,
        safe_false=1.0,
    )
    return d - HALF_LOG_2PI


def _student_t_kernel(z: Tensor, df: Tensor) -> Tensor:
    r"""``(df + 1)/2 * log1p(z^2/df)`` without overflow, with accurate df-gradients.

    For ``z^2 <= df`` it is ``(w + z^2 - df * expm1mx(w)) / 2`` with ``w = log1p(z^2/df)``
    (since ``df (x - log1p x) = df expm1mx(log1p x)``, ``x = z^2/df``): no term depends on
    df through a product that autograd would differentiate into a cancellation, so the
    df-derivative (of order ``z^4/df^2``) keeps its digits for df up to 1e10 and beyond.
    For ``z^2 > df`` it is ``(df + 1)/2 * (2 log|u| + log1p(1/u^2))`` with
    ``u = z / sqrt(df)``: no ``z^2``, so no overflow for huge residuals; ``log|u|`` is
    ``log|z| - log(df)/2`` where ``u`` itself could overflow (df < 1 < |z|).
    """
    z, df = torch.broadcast_tensors(z, df)
    near = z.abs() <= torch.sqrt(df)

    z_near = torch.where(near, z, 0.0)  # safe inputs: 0 and 1 for near, 2 and 1 for far
    df_near = torch.where(near, df, 1.0)
    square = z_near * z_near
    # z^2 / df as (z / sqrt(df))^2: 1/df overflows for a subnormal df (its gradient then
    # inf * 0 at z = 0), 1/sqrt(df) does not
    ratio = z_near / torch.sqrt(df_near)
    w = torch.log1p(ratio * ratio)
    near_value = 0.5 * ((w + square) - df_near * expm1mx(w))

    z_far = torch.where(near, 2.0, z).abs()
    df_far = torch.where(near, 1.0, df)
    far_value = _FarKernel.apply(z_far, df_far)
    return torch.where(near, near_value, far_value)


def _far_kernel_pieces(z: Tensor, df: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, q)`` with ``L = log1p(z^2/df) = 2 log|u| + log1p(q)``, ``u = z/sqrt(df)``, ``q =
    1/u^2 <= 1`` (``z > sqrt(df)``); ``log|u|`` is ``log z - log(df)/2`` where ``u`` itself
    could overflow (df < 1 < z)."""
    split = (df < 1.0) & (z > 1.0)  # |u| may overflow: log z - log(df)/2, both >= 0
    z_split = torch.where(split, z, 2.0)
    df_split = torch.where(split, df, 1.0)
    z_direct = torch.where(split, 2.0, z)
    df_direct = torch.where(split, 1.0, df)
    log_u = torch.where(
        split,
        torch.log(z_split) - 0.5 * torch.log(df_split),
        torch.log(z_direct / torch.sqrt(df_direct)),
    )
    inv_u = torch.sqrt(df) / z  # < 1; may underflow harmlessly
    q = inv_u * inv_u
    return 2.0 * log_u + torch.log1p(q), q


class _FarKernel(torch.autograd.Function):
    r"""``K = (df + 1)/2 * L`` for ``z > sqrt(df)`` (:func:`_far_kernel_pieces`), with the
    derivatives in closed form.

    With ``q = df/z^2``: ``dK/dz = (df + 1) / (z (1 + q))`` and ``dK/ddf = L/2 - (1 + 1/df) /
    (2 (1 + q))``. Autograd through ``2 log|u| + log1p(q)`` adds ``-(df + 1)/(2 df)`` (from
    ``log|u|``) and ``(df + 1) q / (2 df (1 + q))`` (from ``log1p(q)``, through ``1/z^2``):
    at a subnormal ``df`` both overflow, with opposite signs (``inf - inf = NaN``, where the
    exact d/ddf of the log density is ``1/df = 7.1e44``, +inf in float32), and elsewhere
    they cancel for ``q`` near 1. The closed form has no such pair; ``1/(2 df (1 + q))`` is
    one division of the incoming gradient (0, not ``0 * inf``, where it is 0). Built from
    differentiable ops (differentiable again).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, df: Tensor) -> Tensor:
        log_term, _ = _far_kernel_pieces(z, df)
        return (0.5 * (df + 1.0)) * log_term

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        z, df = ctx.saved_tensors
        log_term, q = _far_kernel_pieces(z, df)
        one_q = 1.0 + q
        grad_z = grad_df = None
        if ctx.needs_input_grad[0]:
            grad_z = grad * (((df + 1.0) / z) / one_q)  # (df + 1)/z <= sqrt(df) + 1/sqrt(df)
        if ctx.needs_input_grad[1]:
            half = 0.5 * grad
            # L/2 - 1/(2 (1 + q)) - 1/(2 df (1 + q)); df (1 + q) >= df > 0, finite or +inf
            grad_df = half * log_term - half / one_q - half / (df * one_q)
        return grad_z, grad_df


def _student_t_far_tail(log_abs_r: Tensor, log_scale: Tensor, df: Tensor) -> Tensor:
    """``log_scale + (df + 1)/2 * log1p(z^2/df)`` from ``log|r|`` where ``z`` overflows.

    There ``z^2/df >= (max/e)^2 / df``, so ``log1p(z^2/df) = 2 log|z| - log df + log1p(df/z^2)``
    with ``df/z^2 < eps`` for every representable ``df``: below rounding. With ``L = log|z|
    - log(df)/2 = log|r| - log_scale - log(df)/2 > 0`` the sum is ``df L + log|r| -
    log(df)/2``: a product (``+inf`` only where the true sum overflows) plus a moderate term,
    no difference of huge terms (``-df log_scale`` against ``df log df / 2``).
    """
    half_log_df = 0.5 * torch.log(df)
    return df * (log_abs_r - log_scale - half_log_df) + (log_abs_r - half_log_df)


def student_t_log_prob(
    value: Tensor,
    df: Tensor | float,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of Student's t with ``df`` degrees of freedom, location and log-scale.

    .. math::
        \log p(x) = \log\Gamma\!\big(\tfrac{\nu+1}{2}\big) - \log\Gamma\!\big(\tfrac{\nu}{2}\big)
            - \tfrac12\log(\nu\pi) - \log\sigma
            - \tfrac{\nu+1}{2}\operatorname{log1p}\!\big(z^2/\nu\big),
        \qquad z = \frac{x - \mu}{\sigma}

    evaluated as :math:`D(\nu/2) - \tfrac12\log 2\pi - \log\sigma - K(z, \nu)` with
    :math:`D(a) = \log\Gamma(a + \tfrac12) - \log\Gamma(a) - \tfrac12\log a \to 0`, which
    the lgamma difference would lose to cancellation for large ``df`` (all digits in float32
    at ``df = 1e8``): an asymptotic series (DLMF 5.11.8) for ``df >= 20``, a ten-step
    recurrence shift below, ``lgamma`` for ``df < 2``. The tail
    :math:`K = \tfrac{\nu+1}{2}\operatorname{log1p}(z^2/\nu)` never forms :math:`z^2` where
    it could overflow (``2 log|z/sqrt(df)| + log1p(df/z^2)`` there), so huge residuals give
    the right finite value. Exact (relative to the size of the terms) for ``df`` from
    ``1e-3`` to ``1e10`` and beyond, in value and gradient (``df`` included). As
    ``df -> inf`` it tends to :func:`~probloss.functional.normal_log_prob`.

    Args:
        value: observations, shape broadcastable with the parameters.
        df: degrees of freedom :math:`\nu > 0`.
        loc: location :math:`\mu`.
        log_scale: :math:`\log\sigma`, unconstrained (positional).
        scale: alternatively :math:`\sigma > 0` (keyword-only; exactly one of the two; it
            goes through ``log`` once, a relative error ``eps |log sigma|`` more in ``z``).
        validate_args: check ``value`` has no NaN, ``df > 0`` and a ``scale`` positive;
            ``None`` checks CPU tensors only (no GPU host sync), ``False`` never checks.

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs.

    Raises:
        ValueError: not exactly one of ``log_scale`` / ``scale``, shapes do not broadcast,
            or (when validating) NaN in ``value``, ``df`` or ``scale`` not positive.

    Example:
        >>> df = torch.tensor([1e-3, 1.0, 1e8], dtype=torch.float64)
        >>> student_t_log_prob(torch.tensor(1e30, dtype=torch.float64), df, 0.0, 0.0)
        tensor([-7.6752e+01, -1.3930e+02, -5.9867e+09], dtype=torch.float64)
    """
    forms = {"log_scale": log_scale, "scale": scale}
    t, _, _, log_scale = location_scale_inputs(value, loc, forms, validate_args, df=df)
    value, df, loc = t["value"], t["df"], t["loc"]
    if should_validate(validate_args, df):
        check_positive(df, "df")
    residual, factor = split_residual(value, loc)  # value - loc = r m, r finite
    log_factor = torch.log(factor)  # 0, or log 2 where value - loc overflows
    with torch.no_grad():  # where z = r e^{-log_scale} would overflow (within a factor e)
        log_max = math.log(torch.finfo(residual.dtype).max)
        beyond = torch.log(residual.abs()) + log_factor - log_scale > log_max - 1.0
    # double where: where z overflows the residual is fed 0 (its gradient 0 * inf would be
    # NaN), elsewhere log|r| is fed 1; z's value / loc gradients are formed directly (through
    # r they would be m = 2 times theirs first)
    z = standardized_residual(
        torch.where(beyond, 0.0, value), torch.where(beyond, 0.0, loc), log_scale
    )
    log_abs_r = torch.log(torch.where(beyond, residual, 1.0).abs()) + log_factor
    # An infinite residual (value or loc infinite): the tail is +inf, and its derivatives are
    # the limits as |r| -> inf, d/ddf = +inf and d/dlog_scale = -df (the far tail's; formed
    # from a finite log|r| they would be inf - inf = NaN at a subnormal df, whose -1/(2 df)
    # overflows). The normaliser's d/ddf (1/(2 df), +inf at a subnormal df) is finite next
    # to that limit for every df > 0, so it is left out there (detached), not inf - inf.
    # Double where: df * inf only sees df where it is selected.
    infinite = torch.isinf(log_abs_r)
    normaliser = _student_t_normaliser(torch.where(infinite, df.detach(), df))
    df_inf = torch.where(infinite, df, 1.0)
    ls_inf = torch.where(infinite, log_scale, 0.0)
    far_tail = torch.where(
        infinite,
        df_inf * (math.inf - ls_inf),  # one product: df ls may overflow next to inf
        _student_t_far_tail(torch.where(infinite, 1.0, log_abs_r), log_scale, df),
    )
    tail = torch.where(beyond, far_tail, log_scale + _student_t_kernel(z, df))
    return normaliser - tail
