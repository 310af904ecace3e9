r"""The bivariate log density and its gradients with magnitudes carried as logarithms.

The closed forms of :mod:`.bivariate` standardise first, ``z_i = (x_i - mu_i) e^{-l_i}``, and
then multiply by powers of ``e^{|a|}``. That is exact while every ``z_i`` is a normal float
and every partial product is finite. It fails in two ways, both handled here:

* ``z_i`` underflows (``|z_i| < finfo.tiny``, ``x_i != mu_i``) although ``z_i e^{|a|}`` is
  large: ``x = (1, 0)``, ``l = (110, 110)``, ``a = 120`` in float32 has ``z_1 = 0`` but
  ``Q/2 = 6.06e7`` (the closed form gave ``Q = 0``, a wrong *finite* log density);
* two terms of a derivative overflow (``inf - inf``) or ``z_i`` itself does.

Each standardised coordinate is written ``z_i = zhat_i e^{Z_i}`` with ``zhat_i`` its sign and
``Z_i = log|x_i - mu_i| - l_i`` (never exponentiated on its own), every sum of two terms goes
through :func:`_scaled_sum` (a mantissa of magnitude at most 2 and a logarithmic exponent),
and only final products are exponentiated, by :func:`~probloss.special.mul_exp`. Float32
inputs are evaluated in float64 (their exponents reach ``3.4e38`` and sums of two overflow
float32), except on MPS, which lacks float64.

Accuracy: the rounding of an exponent ``E`` is an absolute error ``eps |E|`` in it, so a
relative error ``eps |E|`` of the term: these forms are used only where the plain closed forms
are wrong, never as the fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.ops import host_readable
from ..special import mul_exp
from ._bivariate_forms import (
    correlation_sign,
    cosh_coefficient,
    quadratic_factor,
    sinh_coefficient,
)
from ._params import split_residual, sum_to_size_rescaled


def lost_precision(value: Tensor, loc: Tensor, z: Tensor) -> Tensor:
    """Per event ``(*)``: some ``z_i`` is below ``finfo.tiny`` (subnormal or 0) although
    ``x_i != mu_i``, so it has lost relative precision (or all of it)."""
    tiny = torch.finfo(z.dtype).tiny
    off_mean = value != loc
    return ((z.abs() < tiny) & off_mean).any(-1)


def _wide(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Float32 tensors in float64 (not on MPS): sums of two exponents stay finite and exact
    to float64 rounding."""
    t0 = tensors[0]
    if t0.dtype == torch.float32 and t0.device.type != "mps":
        return tuple(t.double() for t in tensors)
    return tensors


def _scaled_sum(x1: Tensor, t1: Tensor, x2: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """``(m, t)`` with ``m e^t = x1 e^{t1} + x2 e^{t2}`` and ``|m| <= 2``: no overflow.

    ``t`` is the larger of ``log|x_i| + t_i``, so both scaled terms are at most 1 in
    magnitude and a term underflows only where it is below rounding of the other. The error
    is that of rounding the exponents, ``eps (|t1| + |t2| + |t|)`` relative to the terms: the
    first-order effect of relative perturbations eps of the inputs that enter exponentially.
    """
    with torch.no_grad():
        ref = torch.maximum(_log_abs(x1) + t1, _log_abs(x2) + t2)
        ref = torch.where(torch.isfinite(ref), ref, 0.0)  # both terms 0: any reference
    return mul_exp(x1, t1 - ref) + mul_exp(x2, t2 - ref), ref


def _n_scaled(
    zh1: Tensor, zh2: Tensor, log_r: Tensor, log_scale: Tensor, y1: Tensor, y2: Tensor
) -> tuple[Tensor, Tensor]:
    """``(m, t)`` with ``m e^t = zhat_1 e^{y_1} - zhat_2' e^{y_2}`` (``|m| <= 2``), where
    ``y_i = log|r_i| - l_i + (common shift)``: ``n`` times that shift's exponential.

    The terms are compared through ``y_1 - y_2 = (log|r_1| - log|r_2|) - (l_1 - l_2)``,
    formed from the small parts: ``y_1 - y_2`` of the rounded ``y_i`` is only ``eps |y_i|``
    accurate, and with ``y_i`` near ``3.4e38`` (``l_i`` or ``b`` that large) it loses the
    ``log|r_i|`` (``x = (1, 1.5)`` gave ``n = 0``). ``t`` is the larger ``y_i``, rounded once.
    """
    lr1, lr2 = log_r.unbind(-1)
    ls1, ls2 = log_scale.unbind(-1)
    d = (lr1 - lr2) - (ls1 - ls2)  # y1 - y2 from the small parts
    first = (zh2 == 0) | ((zh1 != 0) & (d >= 0))
    # double where: each branch scales the smaller term by e^{-|d|} (<= 1), the other gets 0
    d1, d2 = torch.where(first, d, 0.0), torch.where(first, 0.0, d)
    m = torch.where(first, zh1 - mul_exp(zh2, -d1), mul_exp(zh1, d2) - zh2)
    return m, torch.where(first, y1, y2)


def _exponent_clamp(dtype: torch.dtype) -> float:
    """``finfo.max / 16``: exponents are clamped there so that the sums of up to six of them
    formed below stay finite (``inf - inf`` would be NaN). The clamp changes nothing that
    can be seen: ``e^t`` of every nonzero float is 0 or inf for ``|t|`` far smaller, and a
    sum of exponents is changed only where two clamped ones of opposite signs meet (both
    beyond ``1e307``: float64 inputs only, float32 ones are evaluated in float64)."""
    return torch.finfo(dtype).max / 16


def _log_abs(x: Tensor) -> Tensor:
    """``log|x|``, ``-inf`` at 0."""
    return torch.log(x.abs())


def _log_coordinates(
    value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor, clamp: float
) -> tuple[Tensor, ...]:
    """``(sign(a), b, zhat_1, Z_1, zhat_2', Z_2, l, log|r|)``: ``z_1 = zhat_1 e^{Z_1}``, ``z_2'
    = sign(a) z_2 = zhat_2' e^{Z_2}``, ``b = |a|``; exponents clamped at ``+-clamp``; the
    last, ``log|x - mu|`` (shape ``(*, 2)``), for exponents in which ``l`` and ``b`` cancel."""
    sign = correlation_sign(atanh_rho, value)
    b = (sign * atanh_rho).clamp(max=clamp)
    log_scale = log_scale.clamp(-clamp, clamp)
    r, m = split_residual(value, loc)
    r, m = torch.broadcast_tensors(r, m)
    mag = r.abs()
    zhat = torch.sign(r)
    # log|r| where r != 0 (zhat = 0 makes the exponent irrelevant there: a finite stand-in)
    log_r = torch.log(torch.where(mag > 0, mag, 1.0)) + torch.log(m)
    z_log = (log_r - log_scale).clamp(-clamp, clamp)
    # returned clamped: +inf at an infinite residual (sums formed from it stay finite)
    log_r = log_r.clamp(max=clamp)
    zh1, zh2 = zhat.unbind(-1)
    zl1, zl2 = z_log.unbind(-1)
    return sign, b, zh1, zl1, sign * zh2, zl2, log_scale, log_r


def log_scaled_half_q(value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor) -> Tensor:
    r"""``Q/2`` from logarithms: ``(k w)^2 + (k n e^b)^2`` with ``k^2 = (1 + e^{-2b})/8``,
    ``w = z_1 + z_2'``, ``n = z_1 - z_2'`` (the eigen-coordinates of
    :func:`._bivariate_forms.rotated`), ``w`` and ``n`` formed by :func:`_scaled_sum` and
    ``n e^b`` by one :func:`mul_exp`: no factor underflows before the large one multiplies
    it. Returned in the input dtype.

    ``n e^b`` is the scaled sum of ``z_i e^b = zhat_i e^{log|r_i| + (b - l_i)}``: ``b - l_i``
    first, exact where ``b`` and ``l_i`` are close. Formed as ``(log|r_i| - l_i) + b`` the
    exponent carried an absolute error ``eps l_i``: at ``l_i = b = 3.4e38`` (float32 inputs,
    evaluated in float64) that is ``7.5e22``, and ``log|r| = 58`` was rounded away (``Q/2 =
    0.1`` where it is ``6.7e49``). ``w`` has no ``b``. Exponents are finite (``b - l_i`` is
    clamped at ``finfo.max``), so ``+inf`` only where ``Q`` overflows anyway.
    """
    dtype = value.dtype
    value, loc, log_scale, atanh_rho = _wide(value, loc, log_scale, atanh_rho)
    clamp = torch.finfo(value.dtype).max
    _, b, zh1, zl1, zh2, zl2, ls, log_r = _log_coordinates(value, loc, log_scale, atanh_rho, clamp)
    w_m, w_t = _scaled_sum(zh1, zl1, zh2, zl2)
    # z_i e^b = zhat_i e^{log|r_i| + (b - l_i)}: b - l_i formed first (they may cancel)
    y1, y2 = (log_r + (b.unsqueeze(-1) - ls).clamp(-clamp, clamp)).unbind(-1)
    nb_m, nb_t = _n_scaled(zh1, zh2, log_r, ls, y1, y2)  # n e^b
    k = quadratic_factor(torch.exp(-2.0 * b))
    half_q = mul_exp(k * w_m, w_t).square() + mul_exp(k * nb_m, nb_t).square()
    return half_q.to(dtype)


def log_scaled_gradients(
    grad: Tensor, value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The closed-form derivatives (:mod:`._bivariate_forms`) from logarithms,
    at the broadcast shape ``(*, 2)`` / ``(*)``, in the input dtype:

        n = z1 - z2'                      d/dx1 = -c g1 e^{-ls1},  g1 = z1 + n s e^{2b}
        d/dls1 = -1 - z1 d/dz1            d/dx2 = -c g2 e^{-ls2} sign(a), g2 = z2' - n s e^{2b}
        d/da = tanh a + sign(a) u v,      u = z1 e^{-b} + n s e^b,  v = z2' e^{-b} - n s e^b.

    Accurate to ``eps`` times the exponents involved, relative to the terms. A fifth
    tensor holds ``log|d/dx_i|`` in the working (wide) precision.
    """
    dtype = value.dtype
    grad, value, loc, log_scale, atanh_rho = _wide(grad, value, loc, log_scale, atanh_rho)
    # exponents clamped at +-finfo.max / 16 so that their sums stay finite (_exponent_clamp)
    clamp = _exponent_clamp(value.dtype)
    sign, b, zh1, zl1, zh2, zl2, log_scale, log_r = _log_coordinates(
        value, loc, log_scale, atanh_rho, clamp
    )
    c, s = cosh_coefficient(b), sinh_coefficient(b)
    # Every exponent in which b and l_i may cancel is formed from log|r_i| and b - l_i (or l_i
    # + b), never as (log|r_i| - l_i) + b: that carries an absolute error eps l_i, 7.5e22 at
    # l_i = b = 3.4e38, and rounds log|r_i| away.
    b_col = b.unsqueeze(-1)
    b_minus = (b_col - log_scale).clamp(-clamp, clamp)
    y1, y2 = (log_r + b_minus).unbind(-1)  # z_i e^b
    e1, e2 = (log_r - (log_scale + b_col).clamp(-clamp, clamp)).unbind(-1)  # z_i e^{-b}
    bm1, bm2 = b_minus.unbind(-1)
    ls1, ls2 = log_scale.unbind(-1)
    nb_m, nb_t = _n_scaled(zh1, zh2, log_r, log_scale, y1, y2)  # n e^b
    ns_m = nb_m * s  # n s e^{2b} = ns_m e^{nb_t + b}
    gc = grad * c
    # d/dx_i = -c g_i e^{-l_i}: g1 e^{-l1} = z1 e^{-l1} + n s e^{2b} e^{-l1}
    dx1_m, dx1_t = _scaled_sum(zh1, zl1 - ls1, ns_m, nb_t + bm1)
    dx2_m, dx2_t = _scaled_sum(zh2, zl2 - ls2, -ns_m, nb_t + bm2)
    d_x1 = -mul_exp(gc * dx1_m, dx1_t)
    d_x2 = -sign * mul_exp(gc * dx2_m, dx2_t)
    d_value = torch.stack((d_x1, d_x2), -1)
    # d/dls_i = -1 - z_i d/dz_i = -1 + c z_i g_i: z1 g1 = z1^2 + (z1 e^b) n s e^b
    l1_m, l1_t = _scaled_sum(zh1 * zh1, 2.0 * zl1, zh1 * ns_m, y1 + nb_t)
    l2_m, l2_t = _scaled_sum(zh2 * zh2, 2.0 * zl2, -zh2 * ns_m, y2 + nb_t)
    d_ls1 = mul_exp(gc * l1_m, l1_t) - grad
    d_ls2 = mul_exp(gc * l2_m, l2_t) - grad
    u_m, u_t = _scaled_sum(zh1, e1, ns_m, nb_t)
    v_m, v_t = _scaled_sum(zh2, e2, -ns_m, nb_t)
    d_a = grad * torch.tanh(atanh_rho) + mul_exp(sign * grad * u_m * v_m, u_t + v_t)
    out = (d_value, -d_value, torch.stack((d_ls1, d_ls2), -1), d_a)
    # log|d/dx_i| (wide): what sum_to_size_rescaled needs where two entries of a broadcast
    # value's gradient overflow with opposite signs
    value_log_abs = torch.stack((_log_abs(gc * dx1_m) + dx1_t, _log_abs(gc * dx2_m) + dx2_t), -1)
    return (*(g.to(dtype) for g in out), value_log_abs)  # type: ignore[return-value]


def with_fallback(
    grads: list[Tensor | None],
    grad: Tensor,
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    atanh_rho: Tensor,
    lost: Tensor,
) -> tuple[Tensor | None, ...]:
    """The closed-form gradients (at the broadcast shape) with each entry that is not finite,
    or whose event lost precision in ``z`` (``lost``, shape ``(*)``), replaced by its
    log-scaled value; then summed to each input's shape.

    The closed forms are exact while every ``z_i`` is normal and every partial product is
    finite; where two terms of a derivative both overflow (``inf - inf``) or ``z`` itself
    does, they give NaN, and a NaN in one entry is no reason for another.
    :func:`log_scaled_gradients` recomputes those entries with every magnitude carried as a
    logarithm, so each is its own value: finite where it is representable, the infinity of
    the right sign where it is not. Where the values are free to read
    (:func:`~probloss._core.ops.host_readable`: CPU, eager, no ``torch.func`` transform) the
    fallback is skipped when every entry is finite and no event lost precision already.
    ``d/dvalue`` and ``d/dloc`` are summed by :func:`sum_to_size_rescaled`.
    """
    shapes = (value.shape, loc.shape, log_scale.shape, atanh_rho.shape)
    present = [g for g in grads if g is not None]
    skip = not present or (
        host_readable(grad, value, loc, log_scale, atanh_rho, lost, *present)
        and not bool(lost.any())
        and all(bool(torch.isfinite(g).all()) for g in present)
    )
    scaled = None
    if not skip:
        scaled = log_scaled_gradients(grad, value, loc, log_scale, atanh_rho)
        lost_event = lost.unsqueeze(-1)
        selected: list[Tensor | None] = []
        for i, (g, fallback) in enumerate(zip(grads, scaled[:4], strict=True)):
            if g is None:
                selected.append(None)
                continue
            bad = lost if i == 3 else lost_event
            selected.append(torch.where(torch.isfinite(g) & ~bad, g, fallback))
        grads = selected

    def value_log_abs(wide: torch.dtype) -> Tensor:
        nonlocal scaled
        if scaled is None:
            scaled = log_scaled_gradients(grad, value, loc, log_scale, atanh_rho)
        return scaled[4].to(wide)

    summed: list[Tensor | None] = []
    for i, (g, shape) in enumerate(zip(grads, shapes, strict=True)):
        if g is None:
            summed.append(None)
        elif i < 2:  # d/dvalue = -d/dloc: a sum of terms that may overflow with opposite signs
            summed.append(sum_to_size_rescaled(g, shape, g.sign(), value_log_abs))
        else:
            summed.append(g.sum_to_size(shape))
    return tuple(summed)
