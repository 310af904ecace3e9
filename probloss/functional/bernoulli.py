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

from .._dtype import as_loss_tensors, promote_float_tensors
from .._validation import broadcast_shapes, check_in_interval, should_validate
from ..special import cb_log_partition, cb_mean, safe_where
from ..special._dtype import upcast


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
    would differentiate into a cancellation of terms of size ``1/eta``.

    Args:
        value: points in ``[0, 1]``, shape broadcastable with ``logits``.
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
    value, logits = torch.broadcast_tensors(upcast(value), upcast(logits))

    def small(eta: Tensor) -> Tensor:
        return value * torch.exp(cb_log_partition(eta * value) - cb_log_partition(eta))

    def positive(eta: Tensor) -> Tensor:
        return torch.exp(eta * (value - 1.0)) * torch.expm1(-eta * value) / torch.expm1(-eta)

    def negative(eta: Tensor) -> Tensor:
        return torch.expm1(eta * value) / torch.expm1(eta)

    def large(eta: Tensor) -> Tensor:
        return safe_where(eta > 0, eta, positive, negative, safe_true=2.0, safe_false=-2.0)

    out = safe_where(logits.abs() <= 1.0, logits, small, large, safe_true=0.0, safe_false=2.0)
    return out.to(out_dtype)


class _ContinuousBernoulliIcdf(torch.autograd.Function):
    """Inverse CDF with the implicit-function gradient.

    ``x(u, eta)`` solves ``F(x; eta) = u``, so ``dx/du = 1 / p(x)`` and
    ``dx/deta = -(dF/deta) / p(x) = -u (x mu(eta x) - mu(eta)) / p(x)``: exact everywhere,
    finite at ``u = 0`` and ``u = 1``, and differentiable again (built from probloss
    functions), where autograd through the closed forms cancels for small ``|eta|`` and
    takes ``log(0)`` at the ends.
    """

    @staticmethod
    def forward(ctx, u: Tensor, logits: Tensor) -> Tensor:
        x = _icdf_value(u, logits)
        ctx.save_for_backward(u, logits, x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        u, logits, x = ctx.saved_tensors
        log_density = _log_density(x, logits)
        grad_u = grad * torch.exp(-log_density)
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
        return grad_u, -grad * d_cdf


def _icdf_value(u: Tensor, logits: Tensor) -> Tensor:
    eps = torch.finfo(logits.dtype).eps
    large = logits.abs() >= 1.0
    # log(1 - u + u e^eta): log-sum-exp for |eta| >= 1 (no overflow, keeps tiny quantiles),
    # log1p for |eta| < 1; first order in eta below eps (no 0/0).
    log_sum = torch.logaddexp(torch.log1p(-u), torch.log(u) + logits)
    moderate = torch.log1p(u * torch.expm1(logits))
    safe_logits = torch.where(logits.abs() < eps, 1.0, logits)
    ratio = torch.where(large, log_sum, moderate) / safe_logits
    return torch.where(logits.abs() < eps, u - 0.5 * logits * u * (u - 1.0), ratio)


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
    r"""Inverse CDF of the continuous Bernoulli, stable for every finite logit.

    .. math::
        F^{-1}(u) = \frac{\log(1 - u + u e^\eta)}{\eta} = \begin{cases}
            \operatorname{logaddexp}(\operatorname{log1p}(-u), \log u + \eta) / \eta
                & |\eta| \ge 1 \\
            \operatorname{log1p}(u \operatorname{expm1}(\eta)) / \eta
                & \epsilon \le |\eta| < 1 \\
            u - \tfrac12 \eta\,u (u - 1) & |\eta| < \epsilon
        \end{cases}

    The log-sum-exp form never overflows and keeps tiny quantiles (samples near 0 when
    ``eta`` is large, near 1 when it is very negative); ``log1p`` keeps ``|eta| < 1`` exact.
    The gradient is the implicit-function one, ``dx/du = 1/p(x)`` and
    ``dx/deta = -u (x mu(eta x) - mu(eta)) / p(x)``: exact, and finite at ``u = 0`` and
    ``u = 1``. :meth:`ContinuousBernoulli.rsample` uses it, so its gradient in ``logits`` is
    the reparameterisation (pathwise) gradient.

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
