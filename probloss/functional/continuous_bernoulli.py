r"""Continuous Bernoulli log density, CDF and inverse CDF, in logit space.

The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019, arXiv:1907.06845) is the
exponential family on :math:`[0, 1]` with natural parameter (logit) :math:`\eta`:

.. math::
    \log p(x \mid \eta) = \eta x - A(\eta), \qquad A(\eta) = \log\frac{e^\eta - 1}{\eta}.

It is the correctly normalised likelihood for data in ``[0, 1]`` that
``binary_cross_entropy`` treats as if it were binary. Everything here works from the logit,
never from clamped probabilities, so it stays exact where ``sigmoid`` saturates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtype import as_loss_tensors, promote_float_tensors, upcast
from .._core.ops import kernel_op
from .._core.shapes import broadcast_shapes
from .._core.validation import check_in_interval, should_validate
from ..special import cb_log_partition, cb_mean, mul_exp, safe_where
from ..special.exp import expm1


def continuous_bernoulli_log_prob(
    value: Tensor, logits: Tensor, *, validate_args: bool | None = None
) -> Tensor:
    r"""Log density of the continuous Bernoulli at ``value`` given ``logits``.

    .. math::
        \log p(x \mid \eta) = \eta x - A(\eta) = \begin{cases}
            \eta (x - 1) - A(-\eta) & \eta > 0 \\
            \eta x - A(\eta) & \eta \le 0
        \end{cases}

    using :math:`A(\eta) = \eta + A(-\eta)`; the first form keeps ``x - 1`` exact instead of
    subtracting two large numbers. Unreduced: one value per element (event shape ``()``).

    Args:
        value: data in ``[0, 1]``, shape broadcastable with ``logits``.
        logits: natural parameter :math:`\eta \in \mathbb{R}`, shape ``(*)``.
        validate_args: check ``value`` lies in ``[0, 1]`` and has no NaN; ``None`` checks
            CPU tensors only (no GPU host sync).

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs, else their dtype.

    Raises:
        ValueError: shapes do not broadcast, or (when validating) ``value`` is outside
            ``[0, 1]`` or NaN.

    Example:
        >>> continuous_bernoulli_log_prob(torch.tensor([0.0, 0.5, 1.0]), torch.tensor(50.0))
        tensor([-46.0880, -21.0880,   3.9120])
    """
    value, logits = as_loss_tensors(value=value, logits=logits)
    broadcast_shapes(value=value, logits=logits)
    if should_validate(validate_args, value):
        check_in_interval(value, "value", 0.0, 1.0)
    return _log_density(value, logits)


def continuous_bernoulli_cdf(
    value: Tensor, logits: Tensor, *, validate_args: bool | None = None
) -> Tensor:
    r"""CDF of the continuous Bernoulli, ``(exp(eta x) - 1) / (exp(eta) - 1)``, without overflow.

    .. math::
        F(x) = \begin{cases}
            x\, e^{A(\eta x) - A(\eta)} & |\eta| \le 1 \\
            e^{\eta (x - 1)}\,\dfrac{\operatorname{expm1}(-\eta x)}{\operatorname{expm1}(-\eta)}
                & \eta > 1 \\
            \dfrac{\operatorname{expm1}(\eta x)}{\operatorname{expm1}(\eta)} & \eta < -1
        \end{cases}

    The first form (``expm1(z) = z e^{A(z)}`` with :math:`A` =
    :func:`~probloss.special.cb_log_partition`) is exact at and near ``eta = 0``, and so is
    its gradient :math:`F\,(x\,\mu(\eta x) - \mu(\eta))`, where the quotient of ``expm1`` s
    would differentiate into a cancellation of terms of size ``1/eta``. Outside the
    support (when not validated) it is 0 below 0 and 1 above 1, with zero gradients.

    Args:
        value: points, shape broadcastable with ``logits``; outside ``[0, 1]`` only when not
            validated.
        logits: natural parameter, shape ``(*)``.
        validate_args: as in :func:`continuous_bernoulli_log_prob`.

    Returns:
        Tensor of the broadcast shape and the promoted dtype of the inputs.
    """
    value, logits = promote_float_tensors(value=value, logits=logits)
    broadcast_shapes(value=value, logits=logits)
    if should_validate(validate_args, value):
        check_in_interval(value, "value", 0.0, 1.0)
    out_dtype = value.dtype
    raw, logits = torch.broadcast_tensors(upcast(value), upcast(logits))
    # Outside the support F is 0 below and 1 above; the closed forms (which would
    # extrapolate, -20 at x = -2) see a safe 1/2 there, so value and gradient are those of
    # the constant (double where). NaN stays NaN.
    below, above = raw < 0, raw > 1
    value = torch.where(below | above, 0.5, raw)

    def small(eta: Tensor) -> Tensor:
        return value * torch.exp(cb_log_partition(eta * value) - cb_log_partition(eta))

    def positive(eta: Tensor) -> Tensor:
        return torch.exp(eta * (value - 1.0)) * expm1(-eta * value) / expm1(-eta)

    def negative(eta: Tensor) -> Tensor:
        return expm1(eta * value) / expm1(eta)

    def large(eta: Tensor) -> Tensor:
        return safe_where(eta > 0, eta, positive, negative, safe_true=2.0, safe_false=-2.0)

    out = safe_where(logits.abs() <= 1.0, logits, small, large, safe_true=0.0, safe_false=2.0)
    out = torch.where(below, 0.0, torch.where(above, 1.0, out))
    return out.to(out_dtype)


# The inverse CDF and its partials are kernel operators, run as written under
# torch.compile: inductor's fused code for them (torch 2.13, CPU) gave ``u expm1(eta)`` = 0
# at ``eta = 8e-27`` (quantile 0 for 7e-11), and the forms are exact only as written.


def _icdf_fake(u: Tensor, logits: Tensor) -> Tensor:
    return torch.empty(
        torch.broadcast_shapes(u.shape, logits.shape),
        dtype=torch.promote_types(u.dtype, logits.dtype),
        device=u.device,
    )


def _icdf_partials_fake(u: Tensor, eta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    out = _icdf_fake(u, eta)
    return out, torch.empty_like(out)


class _ContinuousBernoulliIcdf(torch.autograd.Function):
    """Inverse CDF with the implicit-function gradient.

    ``x(u, eta)`` solves ``F(x; eta) = u``, so ``dx/du = 1 / p(x)`` and
    ``dx/deta = -(dF/deta) / p(x) = -u (x mu(eta x) - mu(eta)) / p(x)``: finite at
    ``u = 0`` and ``u = 1``, where autograd through the closed forms cancels for small
    ``|eta|`` and takes ``log(0)`` at the ends. First derivatives come from ``u`` and
    ``eta`` directly (:func:`_icdf_partials`, a few ulp). When a graph of the backward is
    built (``create_graph``, and always under ``torch.func.grad``, which cannot tell a first
    derivative from a later one) those values carry the derivatives of the implicit forms
    above (probloss functions; relative accuracy about ``(16 + |eta|) eps``, the density
    evaluated at the rounded ``x``), see :func:`_value_with_derivative_of`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, logits: Tensor) -> Tensor:
        return _icdf_value(u, logits)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        u, logits, x = ctx.saved_tensors
        # first derivatives: from (u, eta) directly
        d_u, d_eta = _icdf_partials(u.detach(), logits.detach(), x.detach())
        if not torch.is_grad_enabled():
            return grad * d_u, grad * d_eta
        log_density = _log_density(x, logits)
        implicit_u = torch.exp(-log_density)
        # dF/deta = u (x mu(eta x) - mu(eta)) = (1 - u) ((1 - x) mu(-eta (1 - x)) - mu(-eta))
        # by the symmetry 1 - F(x; eta) = F(1 - x; -eta). Take the form whose prefactor is the
        # smaller of u and 1 - u, and divide by p(x) in logs: exactly 0 at u = 0 and u = 1,
        # even where 1 / p(x) overflows there.
        lower = u <= 0.5
        prefactor = torch.where(lower, u, 1.0 - u)
        eta = torch.where(lower, logits, -logits)
        y = torch.where(lower, x, 1.0 - x)
        d_cdf = (y * cb_mean(eta * y) - cb_mean(eta)) * torch.exp(
            torch.log(prefactor) - log_density
        )
        return (
            grad * _value_with_derivative_of(d_u, implicit_u),
            grad * _value_with_derivative_of(d_eta, -d_cdf),
        )


def _value_with_derivative_of(value: Tensor, form: Tensor) -> Tensor:
    """``value`` (no graph) whose derivative is that of ``form``, the same quantity
    evaluated less accurately but differentiably: ``value + (f - f.detach())``, exactly
    ``value`` (``f - f`` is 0), with ``f = form`` where finite and 0 elsewhere (no
    ``inf - inf``)."""
    f = torch.where(torch.isfinite(form), form, 0.0)
    return value + (f - f.detach())


@kernel_op("cb_icdf_partials", event_dims=(0, 0, 0), fake=_icdf_partials_fake)
def _icdf_partials(u: Tensor, eta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(dx/du, dx/deta)`` of ``x = icdf(u, eta)`` from ``u`` and ``eta``, to a few ulp.

    The implicit forms ``1/p(x)`` and ``-(dF/deta)/p(x)`` evaluate the density at the
    rounded ``x``, whose relative error ``eps`` moves ``eta x`` by ``|eta| eps``: a relative
    error ``|eta| eps`` (5% at ``eta = 1e6`` in float32). Here, with ``L = log1p(w) = eta x``,
    ``w = u expm1(eta)`` and ``t = u e^eta``, ``dx/du = expm1(eta) / (eta (1 + w))`` and
    ``dx/deta = (dL/deta - x) / eta``, ``dL/deta = t / (1 + w)``, written per region as
    sums of same-signed terms (cancellation at most a factor 4, for ``|eta|`` near 1). The
    implicit forms are kept for ``|eta| < 1``, where ``|eta| eps`` is below ``eps``.
    No graph is recorded (first derivatives only), so the branches need no safe inputs.
    """
    small = eta.abs() < 1.0
    # |eta| < 1: the implicit forms (see the autograd function)
    log_density = _log_density(x, eta)
    d_u_small = torch.exp(-log_density)
    lower = u <= 0.5
    prefactor = torch.where(lower, u, 1.0 - u)
    e_sym = torch.where(lower, eta, -eta)
    y = torch.where(lower, x, 1.0 - x)
    # prefactor / p(x) as a product: 1/p(x) is in [e^-1, e] here, while the log form would
    # carry the absolute error |log u| eps of log(prefactor) into the exponential
    d_eta_small = -(y * cb_mean(e_sym * y) - cb_mean(e_sym)) * (prefactor * d_u_small)
    # eta >= 1: dx/du = c e^eta / (eta (1 + t c)), c = 1 - e^-eta; for t > 1 as
    # (1/eta) / u * c / (c + 1/t), which keeps a subnormal u exact
    a = eta.abs()
    c = -expm1(-a)
    t = mul_exp(u, eta)
    d_u_pos = torch.where(
        t <= 1.0, mul_exp(c / (eta * (1.0 + t * c)), eta), (1.0 / eta) / u * (c / (c + 1.0 / t))
    )
    d_eta_pos = _icdf_eta_partial_positive(u, eta, x)
    # eta <= -1: dx/du = (expm1(eta) / eta) / ((1 - u) + u e^eta), a sum of non-negative
    # terms; at u = 1 (1 - u = 0, e^eta maybe subnormal) as (expm1(eta) / eta) e^-eta
    ratio = expm1(eta) / eta
    s_neg = (1.0 - u) + t
    d_u_neg = torch.where(u == 1.0, mul_exp(ratio, -eta), ratio / s_neg)
    # dx/deta: u < 1/2: (t / S - x) / eta, S = (1 - u) + t, with t / S <= 0.58 x (no
    # cancellation); u >= 1/2: by the symmetry x(u, eta) = 1 - x(1 - u, -eta), the
    # positive-eta form at (1 - u, -eta), 1 - u exact there
    direct = (t / s_neg - x) / eta
    v = 1.0 - u
    mirrored = _icdf_eta_partial_positive(v, -eta, _icdf_value(v, -eta))
    d_eta_neg = torch.where(u < 0.5, direct, mirrored)
    d_u = torch.where(small, d_u_small, torch.where(eta > 0, d_u_pos, d_u_neg))
    d_eta = torch.where(small, d_eta_small, torch.where(eta > 0, d_eta_pos, d_eta_neg))
    return d_u, d_eta


def _icdf_eta_partial_positive(v: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """``dx/deta`` at ``(v, a)`` for ``a >= 1``, ``x = icdf(v, a)``; other ``a``: unused.

    With ``t = v e^a``, ``w = t (1 - e^-a)``: for ``t <= 1``, ``(t / (1 + w) - x) / a``
    (``t / (1 + w) >= e x / (e - 1)``-ish: cancellation below a factor 3); for ``t > 1``,
    ``x = 1 + G / a`` with ``G = log D``, ``D = v + (1 - v) e^-a``, and
    ``dx/deta = (-G / a - (1 - v) e^-a / D) / a`` (cancellation below a factor 4).
    """
    t = mul_exp(v, a)
    c = -expm1(-a)
    low = (t / (1.0 + t * c) - x) / a
    e = torch.exp(-a)
    d = v + (1.0 - v) * e
    # log D: log1p of -(1 - v)(1 - e^-a) while that is >= -1/2 (D near 1), else log D
    m = (1.0 - v) * c
    g = torch.where(m <= 0.5, torch.log1p(-m), torch.log(d))
    high = (-g / a - (1.0 - v) * e / d) / a
    return torch.where(t <= 1.0, low, high)


@kernel_op("cb_icdf", event_dims=(0, 0), fake=_icdf_fake)
def _icdf_value(u: Tensor, logits: Tensor) -> Tensor:
    """``log1p(u expm1(eta)) / eta`` to a few ulp for every ``u`` in [0, 1] and finite ``eta``.

    Runs inside the autograd function's forward (no graph), so the branches need no safe
    inputs; ``w = u expm1(eta)`` throughout.
    """
    finfo = torch.finfo(logits.dtype)
    # |eta| < 1: x = u (expm1(eta) / eta) (log1p(w) / w), a product of accurate factors; the
    # quotient log1p(w) / eta would lose digits where w = u eta is subnormal and x is not
    safe_eta = torch.where(logits == 0, 1.0, logits)
    exprel = torch.where(logits == 0, 1.0, expm1(safe_eta) / safe_eta)
    w_small = u * expm1(logits)
    # log1p(w) / w = 1 - w/2 + w^2/3 - ...: 1 - w/2 is exact to eps^2 for |w| < eps (and
    # needs no log1p of a subnormal, which may flush to 0)
    tiny_w = w_small.abs() < finfo.eps
    safe_w = torch.where(tiny_w, 1.0, w_small)
    ratio = torch.where(tiny_w, 1.0 - 0.5 * w_small, torch.log1p(safe_w) / safe_w)
    on_small = (u * exprel) * ratio
    # eta >= 1: w = u e^eta (1 - e^-eta) by mul_exp (no overflow of e^eta unless of w);
    # where w does overflow, log1p(w) = log u + eta + log1p(-e^-eta) (+ 1/w, below eps)
    w_pos = mul_exp(u, logits) * -expm1(-logits)
    on_overflow = torch.log(u) + logits + torch.log1p(-torch.exp(-logits))
    log_pos = torch.where(w_pos <= finfo.max, torch.log1p(w_pos), on_overflow)
    # eta <= -1: 1 + w = (1 - u) + u e^eta is a sum of two non-negative terms; log1p(w) is
    # exact while 1 + w >= 1/2, below that u > 1/2 and the log of the sum is taken as a
    # log-sum-exp of log1p(-u) and log u + eta, both exact there (1/|log(1 + w)| <= 1.44)
    w_neg = u * expm1(logits)
    log_neg = torch.where(
        w_neg >= -0.5,
        torch.log1p(w_neg),
        torch.logaddexp(torch.log1p(-u), torch.log(u) + logits),
    )
    on_large = torch.where(logits > 0, log_pos, log_neg) / logits
    x = torch.where(logits.abs() < 1.0, on_small, on_large)
    # The clamp is exact: x lies in [0, 1]; only the last rounding can step outside.
    x = x.clamp(0.0, 1.0)
    # Quantiles outside [0, 1] (unvalidated) have no inverse: NaN, as in torch.
    return torch.where((u < 0) | (u > 1), torch.nan, x)


def _log_density(x: Tensor, logits: Tensor) -> Tensor:
    """``eta x - A(eta)``, keeping ``x - 1`` exact for positive logits (see log_prob)."""
    return torch.where(
        logits > 0,
        logits * (x - 1.0) - cb_log_partition(-logits),
        logits * x - cb_log_partition(logits),
    )


def continuous_bernoulli_icdf(
    quantile: Tensor, logits: Tensor, *, validate_args: bool | None = None
) -> Tensor:
    r"""Inverse CDF of the continuous Bernoulli, to a few ulp for every finite logit.

    .. math::
        F^{-1}(u) = \frac{\operatorname{log1p}(w)}{\eta}, \quad w = u\,\operatorname{expm1}(\eta),
        \qquad \text{evaluated as} \begin{cases}
            u\,\dfrac{\operatorname{expm1}(\eta)}{\eta}\,\dfrac{\operatorname{log1p}(w)}{w}
                & |\eta| < 1 \\
            \operatorname{log1p}\big(u e^\eta (1 - e^{-\eta})\big) / \eta & \eta \ge 1 \\
            \operatorname{log1p}(w) / \eta & \eta \le -1,\ w \ge -\tfrac12 \\
            \operatorname{logaddexp}(\operatorname{log1p}(-u), \log u + \eta) / \eta
                & \eta \le -1,\ w < -\tfrac12
        \end{cases}

    Each form is a product or quotient of accurately rounded factors of the exact inputs
    (``u e^eta`` by :func:`~probloss.special.mul_exp`, so it overflows only where ``w``
    does, and then ``log1p(w) = log u + eta + log1p(-e^-eta)``), which keeps tiny
    quantiles (samples near 0 when ``eta`` is large, near 1 when it is very negative), a
    subnormal ``u eta`` and ``u`` near 1 accurate: relative error below 8 ulp (tested
    against mpmath). Quantiles outside ``[0, 1]`` (when not validated) give NaN, as in
    torch. The gradient is the implicit-function one, ``dx/du = 1/p(x)`` and
    ``dx/deta = -u (x mu(eta x) - mu(eta)) / p(x)``, formed from ``u`` and ``eta`` to
    below 8 ulp (tested against mpmath) and finite at ``u = 0`` and ``u = 1``
    (``dx/du`` is ``inf`` only where ``1/p`` exceeds the dtype's range).
    :meth:`ContinuousBernoulli.rsample` uses it, so its gradient in ``logits`` is the
    reparameterisation (pathwise) gradient.

    Args:
        quantile: ``u`` in ``[0, 1]``, shape broadcastable with ``logits``.
        logits: natural parameter, shape ``(*)``.
        validate_args: check ``quantile`` lies in ``[0, 1]``; ``None``: CPU tensors only.

    Returns:
        Tensor of the broadcast shape and the promoted dtype of the inputs, in ``[0, 1]``.
    """
    quantile, logits = promote_float_tensors(quantile=quantile, logits=logits)
    broadcast_shapes(quantile=quantile, logits=logits)
    if should_validate(validate_args, quantile):
        check_in_interval(quantile, "quantile", 0.0, 1.0)
    out_dtype = quantile.dtype
    u, logits = torch.broadcast_tensors(upcast(quantile), upcast(logits))
    return _ContinuousBernoulliIcdf.apply(u, logits).to(out_dtype)
