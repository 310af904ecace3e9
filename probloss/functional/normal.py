r"""Gaussian, Laplace and Student-t log densities and the Gaussian negative log-likelihood.

Everything is computed in log space from the standardised residual
:math:`z = (x - \mu) / \sigma`, never as ``log(pdf)``:

.. math::
    \log \mathcal{N}(x \mid \mu, \sigma^2) = -\tfrac12 z^2 - \log\sigma - \tfrac12 \log 2\pi.

The scale can be given in any one of four forms, ``scale``, ``log_scale``, ``var`` or
``log_var`` (exactly one; the log forms are unconstrained and cannot fail). ``z`` is formed
from the form given, without a round trip through ``exp``/``log``: ``r / scale``,
``r / sqrt(var)``, or ``r * exp(-log_scale)``, the latter in four exact quarter steps where
``exp(-log_scale)`` alone would overflow or underflow (``log_scale = -100`` in float32)
while ``z`` does not.

A log *density* is not a log probability: it is positive wherever the density exceeds 1
(``log_scale < -0.92`` at the mean), so a negative NLL is normal, not a bug.

Dtypes: float16 / bfloat16 inputs are computed and returned in float32 (DESIGN.md, half
precision policy), float32 and float64 stay as they are. Python numbers take the dtype of
the tensor arguments (a ``0.1`` next to float64 tensors is the float64 ``0.1``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch
from torch import Tensor

from .._dtype import loss_tensors
from .._validation import broadcast_shapes, check_not_nan, should_validate
from ..special.exp import expm1mx, mul_exp
from ..special.where import safe_where
from ._params import (
    check_positive,
    log_scale_from,
    split_residual,
    standardized_residual,
    summed_location_gradients,
)
from ._reduction import check_reduction, check_value_batch, reduce_loss

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LN2 = math.log(2.0)
_LGAMMA_HALF = 0.5 * math.log(math.pi)  # lgamma(1/2) = log sqrt(pi)
_NAN_POLICIES = ("raise", "mask")


# ======================================================================================
# Shared pieces
# ======================================================================================


def _scale_of(name: str, param: Tensor) -> Tensor:
    """``sigma`` from a ``scale`` or ``var`` parameter."""
    return param if name == "scale" else torch.sqrt(param)


def _normal_log_density(z: Tensor, log_scale: Tensor) -> Tensor:
    # (-z/2) * z: z^2 alone overflows for |z| > sqrt(max) where z^2/2 may not.
    return (-0.5 * z) * z - log_scale - _HALF_LOG_2PI


def _log_density(value: Tensor, loc: Tensor, name: str, param: Tensor) -> Tensor:
    """The normal log density from the scale form ``name`` (no floor)."""
    if name in ("log_scale", "log_var"):
        k = 1.0 if name == "log_scale" else 0.5
        return _LogFormDensity.apply(value, loc, param, k)
    k = 1.0 if name == "scale" else 0.5
    return _ScaleFormDensity.apply(value, loc, param, k)


def _value_gradient(grad: Tensor, r: Tensor, over_var, over_sigma) -> Tensor:
    """``-grad r / sigma^2``, the density's ``d/dvalue`` (before the factor ``m``), given
    ``over_var(x) = x / sigma^2`` and ``over_sigma(x) = x / sigma`` of the scale form.

    Formed as ``over_var(-grad r)``; where ``-grad r`` underflows although the result need
    not be small (a responsibility 1e-28 times ``r = 3e-39`` at ``sigma = e^{-75}`` in
    float32: exact -0.034, 0 before) it is ``over_sigma(-grad z)`` with ``z = over_sigma(r)``
    formed first. On CPU (not compiling) that fallback runs only when some entry needs it.
    """
    prod = -grad * r
    d_value = over_var(prod)
    lost = (prod == 0) & (grad != 0) & (r != 0)
    eager_cpu = r.device.type == "cpu" and not torch.compiler.is_compiling()
    if not eager_cpu or bool(lost.any()):
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


class _ScaleFormDensity(torch.autograd.Function):
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
    def forward(ctx, value: Tensor, loc: Tensor, param: Tensor, k: float) -> Tensor:
        ctx.save_for_backward(value, loc, param)
        ctx.k = k
        return _normal_log_density(*_scale_form_z(value, loc, param, k))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        value, loc, param = ctx.saved_tensors
        k = ctx.k
        grad_value = grad_loc = grad_param = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            r, m = split_residual(value, loc)
            sigma = _scale_of("scale" if k == 1.0 else "var", param)
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


class _LogFormDensity(torch.autograd.Function):
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
    def forward(ctx, value: Tensor, loc: Tensor, param: Tensor, k: float) -> Tensor:
        ctx.save_for_backward(value, loc, param)
        ctx.k = k
        log_sigma = k * param
        z = standardized_residual(value, loc, log_sigma)
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
            z = standardized_residual(value, loc, log_sigma)
            grad_param = ((grad * k * z) * z - grad * k).sum_to_size(param.shape)
        return grad_value, grad_loc, grad_param, None


def _prepare(value, loc, forms, validate_args, **extra):
    """Convert, check shapes and the exactly-one-form rule; return the pieces."""
    given = {name: v for name, v in forms.items() if v is not None}
    tensors = loss_tensors(value=value, loc=loc, **given, **extra)
    param_tensors = {name: tensors[name] for name in given}
    broadcast_shapes(value=tensors["value"], loc=tensors["loc"], **param_tensors)
    # log_scale_from raises unless exactly one form is given, and checks scale / var > 0.
    log_scale = log_scale_from(**param_tensors, validate_args=validate_args)
    ((name, param),) = param_tensors.items()
    return tensors, name, param, log_scale


# ======================================================================================
# Normal
# ======================================================================================


def normal_log_prob(
    value: Tensor,
    loc: Tensor,
    *,
    scale: Tensor | float | None = None,
    log_scale: Tensor | float | None = None,
    var: Tensor | float | None = None,
    log_var: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of :math:`\mathcal{N}(\mu, \sigma^2)` at ``value``, in log space.

    .. math::
        \log p(x) = -\tfrac12 z^2 - \log\sigma - \tfrac12\log 2\pi,
        \qquad z = \frac{x - \mu}{\sigma}

    with :math:`\sigma` from exactly one of ``scale``, ``log_scale``, ``var``, ``log_var``;
    ``z`` is ``r / scale``, ``r / sqrt(var)`` or ``r * exp(-log_scale)`` (``r = x - mu``),
    so a given scale or variance is never sent through ``log`` and back. Exact (relative to
    the size of the terms) for ``|z|`` from 0 to ``1e30`` in float64 and for ``log_scale``
    from -80 to 80 in float32, with finite gradients. In float32 the density at ``|z| =
    1e30`` is :math:`-5 \cdot 10^{59}`, beyond ``finfo.max``: the result is ``-inf``, the
    true value rounded, with the gradient in ``value`` and ``loc`` still finite
    (:math:`\mp z/\sigma`) and the one in ``log_scale`` (:math:`z^2 - 1`) ``+inf``.

    Args:
        value: observations :math:`x`, shape broadcastable with the parameters.
        loc: mean :math:`\mu`, shape ``(*)``.
        scale: standard deviation :math:`\sigma > 0`.
        log_scale: :math:`\log\sigma`, unconstrained (the stable choice for a network head).
        var: variance :math:`\sigma^2 > 0`.
        log_var: :math:`\log\sigma^2`, unconstrained.
        validate_args: check ``scale`` / ``var`` are positive; ``None`` checks CPU tensors
            only (no GPU host sync).

    Returns:
        Tensor of the broadcast shape (torch's broadcasting; an empty batch gives an empty
        result), one value per element (event shape ``()``); float32 for half-precision
        inputs, else the promoted input dtype.

    Raises:
        ValueError: not exactly one scale form, shapes do not broadcast, or (when
            validating) a ``scale`` / ``var`` that is not positive.

    Example:
        >>> x = torch.tensor([0.0, 1e-30, 1.0])
        >>> normal_log_prob(x, torch.tensor(0.0), log_scale=torch.tensor(-80.0))
        tensor([ 7.9081e+01, -1.5349e+09,        -inf])
        >>> normal_log_prob(torch.tensor(3.0), torch.tensor(1.0), var=4.0)
        tensor(-2.1121)
    """
    forms = {"scale": scale, "log_scale": log_scale, "var": var, "log_var": log_var}
    tensors, name, param, _ = _prepare(value, loc, forms, validate_args)
    return _log_density(tensors["value"], tensors["loc"], name, param)


def normal_nll(
    value: Tensor,
    loc: Tensor,
    *,
    scale: Tensor | float | None = None,
    log_scale: Tensor | float | None = None,
    var: Tensor | float | None = None,
    log_var: Tensor | float | None = None,
    beta: float = 0.0,
    min_scale: Tensor | float | None = None,
    reduction: str = "mean",
    nan_policy: str = "raise",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Gaussian negative log-likelihood, optionally beta-weighted, floored and NaN-masked.

    .. math::
        \ell_i = \operatorname{sg}\!\big[\sigma_i^{2\beta}\big]
            \Big(\tfrac12 z_i^2 + \log\sigma_i + \tfrac12\log 2\pi\Big),
        \qquad z_i = \frac{x_i - \mu_i}{\sigma_i}

    per element (the event shape is ``()``), then reduced: ``"mean"`` averages over the
    events (the elements of ``value``), ``"sum"`` adds them, ``"none"`` returns them
    (broadcast like torch). ``sg`` is stop-gradient. A reduced loss refuses a parameter that
    would enlarge the value's shape (``value`` of shape ``(8,)`` against ``loc`` of shape
    ``(8, 1)`` would average an ``(8, 8)`` matrix of every target against every prediction):
    that is a ValueError naming the argument and both shapes; parameters may broadcast *up
    to* the value's shape. Like torch, the ``"sum"`` of an empty batch is 0 and its
    ``"mean"`` NaN.

    * ``beta`` (beta-NLL, Seitzer et al. 2022, arXiv:2203.09168): each element is weighted
      by :math:`\sigma^{2\beta}` = ``var ** beta``, detached, which undoes the NLL's
      down-weighting of badly fit points by their predicted variance. ``beta = 0`` is the
      plain NLL (bitwise), ``beta = 1`` gives the mean gradient of the squared error.
      The product is formed in log space (``(r sigma^{beta - 1})^2 / 2`` in one
      :func:`~probloss.special.mul_exp`), so it is finite, with finite gradients, wherever
      it is representable, although ``z^2`` alone overflows (``log_scale = -50`` in
      float32), and ``+inf`` where it is not.
    * ``min_scale`` (:math:`m`): a soft floor on the scale that keeps its gradient,
      :math:`\sigma' = \sigma + m`, i.e. ``log_scale' = logaddexp(log_scale, log(m))`` =
      :func:`~probloss.special.soft_floor` ``(log_scale, log(m))``. It changes the
      objective by at most :math:`m` in the scale and keeps the loss bounded below as
      ``log_scale -> -inf``, with gradient :math:`\sigma / (\sigma + m) > 0` there instead
      of the zero of a clamp. The weight of ``beta`` uses the floored scale.
    * ``nan_policy``: ``"raise"`` raises for NaN in ``value`` (when validating; otherwise
      NaN propagates); ``"mask"`` ignores those events: they are fed ``loc`` (detached) so
      their loss and gradient are exactly 0, and ``"mean"`` divides by the number of the
      other events (NaN when every event is masked).

    Args:
        value: targets :math:`x`, shape broadcastable with the parameters.
        loc: predicted mean, shape ``(*)``.
        scale, log_scale, var, log_var: exactly one, as in :func:`normal_log_prob`.
        beta: exponent of the detached variance weight, in ``[0, 1]``.
        min_scale: positive number or tensor broadcastable with the scale, or ``None``.
        reduction: ``"mean"`` (over events), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"`` or ``"mask"`` (NaN in ``value`` only).
        validate_args: check scale/var positive and value free of NaN (``"raise"``);
            ``None`` checks CPU tensors only.

    Returns:
        A scalar for ``"mean"`` / ``"sum"``, else a tensor of the broadcast shape;
        float32 for half-precision inputs.

    Raises:
        ValueError: a bad ``reduction``, ``nan_policy``, ``beta`` or ``min_scale``, not
            exactly one scale form, shapes that do not broadcast, a parameter that would
            broadcast the value's shape in a reduced loss, a non-positive
            ``scale`` / ``var``, or NaN in ``value`` under ``"raise"`` (when validating).

    Example:
        >>> value = torch.tensor([0.5, float("nan"), -1.0])
        >>> loc = torch.zeros(3)
        >>> normal_nll(value, loc, log_scale=torch.zeros(3), nan_policy="mask", reduction="none")
        tensor([1.0439, 0.0000, 1.4189])
        >>> normal_nll(value, loc, log_scale=torch.zeros(3), nan_policy="mask")
        tensor(1.2314)
        >>> normal_nll(torch.tensor(0.0), torch.tensor(0.0), log_scale=-50.0, min_scale=1e-3)
        tensor(-5.9888)
    """
    check_reduction(reduction)
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"nan_policy must be 'raise' or 'mask', got {nan_policy!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    forms = {"scale": scale, "log_scale": log_scale, "var": var, "log_var": log_var}
    tensors, name, param, log_sigma = _prepare(
        value, loc, forms, validate_args, min_scale=min_scale
    )
    value, loc = tensors["value"], tensors["loc"]
    floor = tensors.get("min_scale")
    if floor is not None:
        # a Python number is checked as itself (no host read of the tensor made from it: on
        # a GPU or meta device that would be one); a tensor when validating
        if not isinstance(min_scale, Tensor):
            if not bool((torch.as_tensor(min_scale, dtype=torch.float64) > 0).all()):
                raise ValueError(f"min_scale must be positive, got {min_scale!r}")
        elif should_validate(validate_args, floor) and not (floor > 0).all():
            raise ValueError(f"min_scale must be positive, got {min_scale!r}")

    if reduction != "none":
        params = {"loc": loc, name: param} | ({} if floor is None else {"min_scale": floor})
        check_value_batch(value.shape, **{k: t.shape for k, t in params.items()})

    mask = None
    if nan_policy == "mask":
        mask = ~torch.isnan(value)
        value = torch.where(mask, value, loc.detach())  # zero residual: finite, zero gradient
    elif should_validate(validate_args, value):
        check_not_nan(value, "value")

    log_form = name in ("log_scale", "log_var")
    if beta == 0.0 and floor is None:
        loss = -_log_density(value, loc, name, param)
    elif beta == 0.0 and not log_form:
        # the soft floor on a scale or variance: sigma = scale + min_scale
        loss = -_ScaleFormDensity.apply(value, loc, _scale_of(name, param) + floor, 1.0)
    else:
        log_floor = None
        if floor is not None and log_form:
            log_floor = torch.log(floor)  # the floor applied inside, with its own backward
        elif floor is not None:
            log_sigma = torch.log(_scale_of(name, param) + floor)  # sigma = scale + min_scale
        loss = _WeightedNLL.apply(value, loc, log_sigma, log_floor, beta)
    return reduce_loss(loss, reduction, mask=mask)


class _WeightedNLL(torch.autograd.Function):
    r"""``sg[sigma^{2 beta}] (z^2/2 + log sigma + log(2 pi)/2)`` with no factor overflowing alone.

    Inputs ``(x, mu, s, log_floor, beta)``, ``x - mu = r m`` (:func:`split_residual`) and
    ``log sigma = logaddexp(s, log_floor)`` (the soft floor ``sigma + min_scale``; no floor
    when ``log_floor`` is None). The quadratic part is ``y^2 / 2`` with ``y = r e^{t} m``,
    ``t = -(1 - beta) log sigma`` (``w z^2 = (z sqrt(w))^2``, ``w = sigma^{2 beta}``): ``z``
    alone overflows (``log_scale = -50`` in float32) where ``y`` does not, and ``w`` alone
    underflows where ``w z^2`` is large. The rest, ``w (log sigma + log(2 pi)/2)``,
    overflows only where the whole loss does (``w`` is large only for large ``log sigma``).

    Backward (the weight detached): ``d/dx = -d/dmu = w z / sigma = r e^{2t} m`` (to ``x``
    and ``mu`` directly: through ``r`` it is ``m`` times that, which can overflow), ``d/dlog
    sigma = w (1 - z^2) = w - y^2``, and through the floor ``d/ds = (w - y^2) v`` with ``v =
    e^{s - log sigma}`` formed as ``w v - (y sqrt(v))^2``, the square root taken inside the
    exponent:
    where ``z^2`` overflows and ``v`` underflows (``log_scale = -1e30`` floored at 1e-3,
    residual 3e38) the product is the exact tiny value, not ``inf * 0``; ``d/dlog_floor``
    likewise with ``1 - v``. Where ``w`` and ``y^2`` both overflow (``inf - inf``) the exact
    value overflows too, with the sign of ``1 - |z|``. Built from differentiable torch ops.
    """

    @staticmethod
    def forward(ctx, value, loc, log_scale, log_floor, beta):
        ctx.save_for_backward(value, loc, log_scale, log_floor)
        residual, factor = split_residual(value, loc)
        ctx.beta = beta
        log_sigma = _floored(log_scale, log_floor)
        y, weight, _ = _beta_pieces(residual, factor, log_sigma, beta)
        return (0.5 * y) * y + weight * (log_sigma + _HALF_LOG_2PI)

    @staticmethod
    def backward(ctx, grad):
        value, loc, log_scale, log_floor = ctx.saved_tensors
        residual, factor = split_residual(value, loc)
        log_sigma = _floored(log_scale, log_floor)
        y, weight, t = _beta_pieces(residual, factor, log_sigma, ctx.beta)
        grads = [None] * 5
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # w z / sigma = r e^{2t} m: one mul_exp of r (y e^t would overflow with y where
            # y does but y e^t does not, sigma > 1), m last; to value and loc directly
            # (through r it would be m times that first, inf where d/dvalue = 3.4e38)
            d_value = mul_exp(grad * residual, 2.0 * t) * factor
            if ctx.needs_input_grad[0]:
                grads[0] = d_value.sum_to_size(value.shape)
            if ctx.needs_input_grad[1]:
                grads[1] = (-d_value).sum_to_size(loc.shape)
        z_abs = mul_exp(residual, -log_sigma).abs() * factor
        z_big = z_abs > 1.0

        def chained(log_v: Tensor | None) -> Tensor:
            """``grad (w - y^2) e^{log_v}`` (``log_v`` None: ``e^0``)."""
            if log_v is None:
                d = weight - y * y
            else:
                # y sqrt(v) from r in one exponent: y alone can overflow where it does not
                y_v = mul_exp(residual, t + 0.5 * log_v) * factor
                d = mul_exp(weight, log_v) - y_v * y_v
            # w - y^2 = e^{2 beta log sigma} (1 - |z|)(1 + |z|) in one exponent where a term
            # overflows: w = e^{88.7228} is inf in float32 next to y^2 = 3.4e38, but the
            # difference is 2.7e36. Where that is not finite either, the exact value
            # overflows, with the sign of 1 - |z|.
            log_w = 2.0 * ctx.beta * log_sigma + (0.0 if log_v is None else log_v)
            far = ~torch.isfinite(d)
            z_far = torch.where(far, z_abs, 0.0)
            alt = mul_exp((1.0 - z_far) * (1.0 + z_far), torch.where(far, log_w, 0.0))
            d = torch.where(far & torch.isfinite(alt), alt, d)
            d = torch.where(torch.isnan(d), torch.where(z_big, -math.inf, math.inf), d)
            return grad * d

        if ctx.needs_input_grad[2]:
            log_v = None if log_floor is None else log_scale - log_sigma  # log sigmoid
            grads[2] = chained(log_v).sum_to_size(log_scale.shape)
        if log_floor is not None and ctx.needs_input_grad[3]:
            grads[3] = chained(log_floor - log_sigma).sum_to_size(log_floor.shape)
        return tuple(grads)


def _floored(log_scale: Tensor, log_floor: Tensor | None) -> Tensor:
    """``log(e^s + m) = logaddexp(s, log m)``: the soft floor in log space, or ``s``."""
    return log_scale if log_floor is None else torch.logaddexp(log_scale, log_floor)


def _beta_pieces(
    residual: Tensor, factor: Tensor, log_sigma: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, w, t)``: ``y = r e^t m`` with ``t = -(1 - beta) log sigma``, ``w = e^{2 beta log
    sigma}``; ``t`` is rounded once (an absolute error ``eps |t|``, the conditioning of
    ``e^t`` in ``log sigma``)."""
    t = (beta - 1.0) * log_sigma
    return mul_exp(residual, t) * factor, torch.exp((2.0 * beta) * log_sigma), t


# ======================================================================================
# Laplace
# ======================================================================================


def laplace_log_prob(value: Tensor, loc: Tensor, log_scale: Tensor | float) -> Tensor:
    r"""Log density of the Laplace distribution with location ``loc`` and scale ``exp(log_scale)``.

    .. math::
        \log p(x) = -\frac{|x - \mu|}{b} - \log b - \log 2, \qquad \log b = \text{log\_scale}

    ``|x - mu| / b`` is ``|x - mu| * exp(-log_scale)`` without overflow of the exponential
    where the quotient is finite. At ``x = mu`` the gradient in ``value`` / ``loc`` is 0 (the
    midpoint of the subgradient).

    Args:
        value: observations, shape broadcastable with the parameters.
        loc: location :math:`\mu`, shape ``(*)``.
        log_scale: :math:`\log b`, unconstrained.

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast.

    Example:
        >>> x = torch.tensor([0.0, 1e-30, 1e30])
        >>> laplace_log_prob(x, torch.tensor(0.0), torch.tensor([-80.0, -80.0, 60.0]))
        tensor([    79.3069, -55326.9180,  -8817.2041])
    """
    t = loss_tensors(value=value, loc=loc, log_scale=log_scale)
    broadcast_shapes(**t)
    value, loc, log_scale = t["value"], t["loc"], t["log_scale"]
    # |r e^{-s}|, not |r| e^{-s}: at r = 0 the abs's zero gradient then reaches mul_exp's
    # backward, which gives 0 * e^{-s} = 0 even where e^{-s} overflows (not sign(0) * inf);
    # z finite where value - loc overflows, its value / loc gradients formed directly
    return -standardized_residual(value, loc, log_scale).abs() - log_scale - _LN2


# ======================================================================================
# Student t
# ======================================================================================

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


def _d_asymptotic(a: Tensor) -> Tensor:
    coefficients = _asymptotic_coefficients(a.dtype)
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
        lambda x: _LGAMMA_HALF + 0.5 * (torch.log(x) - _LN2),
        lambda x: _log_gamma_ratio(0.5 * x),
        safe_true=0.5 * eps,
        safe_false=1.0,
    )
    return d - _HALF_LOG_2PI


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

    @staticmethod
    def forward(ctx, z: Tensor, df: Tensor) -> Tensor:
        ctx.save_for_backward(z, df)
        log_term, _ = _far_kernel_pieces(z, df)
        return (0.5 * (df + 1.0)) * log_term

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
    log_scale: Tensor | float,
    *,
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
    ``df -> inf`` it tends to :func:`normal_log_prob`.

    Args:
        value: observations, shape broadcastable with the parameters.
        df: degrees of freedom :math:`\nu > 0`.
        loc: location :math:`\mu`.
        log_scale: :math:`\log\sigma`, unconstrained.
        validate_args: check ``df > 0``; ``None`` checks CPU tensors only.

    Returns:
        Tensor of the broadcast shape; float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast, or (when validating) ``df`` is not positive.

    Example:
        >>> df = torch.tensor([1e-3, 1.0, 1e8], dtype=torch.float64)
        >>> student_t_log_prob(torch.tensor(1e30, dtype=torch.float64), df, 0.0, 0.0)
        tensor([-7.6752e+01, -1.3930e+02, -5.9867e+09], dtype=torch.float64)
    """
    t = loss_tensors(value=value, df=df, loc=loc, log_scale=log_scale)
    broadcast_shapes(**t)
    value, df, loc, log_scale = t["value"], t["df"], t["loc"], t["log_scale"]
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
