r"""The Gaussian log density and negative log-likelihood, in log space.

Everything is computed from the standardised residual :math:`z = (x - \mu) / \sigma`,
never as ``log(pdf)``:

.. math::
    \log \mathcal{N}(x \mid \mu, \sigma^2) = -\tfrac12 z^2 - \log\sigma - \tfrac12 \log 2\pi.

Parameters follow the one rule of the functional core: ``value`` first, then ``loc``, then
``log_scale`` (positional: the unconstrained, stable form); ``scale``, ``var`` and
``log_var`` are keyword-only alternatives (exactly one form). ``z`` is formed from the form
given, without a round trip through ``exp``/``log`` (module ``_normal_forms``): ``r /
scale``, ``r / sqrt(var)``, or ``r * exp(-log_scale)`` by one
:func:`~probloss.special.mul_exp`, finite where ``exp(-log_scale)`` alone would overflow
(``log_scale = -100`` in float32) while ``z`` does not.

A log *density* is not a log probability: it is positive wherever the density exceeds 1
(``log_scale < -0.92`` at the mean), so a negative NLL is normal, not a bug.

Dtypes: float16 / bfloat16 inputs are computed and returned in float32, float32 and
float64 stay as they are. Python numbers take the dtype of the tensor arguments (a ``0.1``
next to float64 tensors is the float64 ``0.1``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.constants import HALF_LOG_2PI
from .._core.reduction import (
    check_nan_policy,
    check_reduction,
    check_value_batch,
    mask_nan_events,
    reduce_loss,
)
from .._core.validation import should_validate
from ..special.exp import mul_exp
from ._location_scale import location_scale_inputs
from ._normal_forms import ScaleFormDensity, log_density, scale_of
from ._params import split_residual

_HALF_LOG_2PI = HALF_LOG_2PI  # the name the mixture kernels import (bitwise-equal terms)


def normal_log_prob(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    var: Tensor | float | None = None,
    log_var: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of :math:`\mathcal{N}(\mu, \sigma^2)` at ``value``, in log space.

    .. math::
        \log p(x) = -\tfrac12 z^2 - \log\sigma - \tfrac12\log 2\pi,
        \qquad z = \frac{x - \mu}{\sigma}

    with :math:`\sigma` from exactly one of ``log_scale`` (positional), ``scale``, ``var``,
    ``log_var`` (keyword-only, resolved by :func:`~probloss._core.params.log_scale_from`);
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
        log_scale: :math:`\log\sigma`, unconstrained (the stable choice for a network head).
        scale: standard deviation :math:`\sigma > 0`.
        var: variance :math:`\sigma^2 > 0`.
        log_var: :math:`\log\sigma^2`, unconstrained.
        validate_args: check ``value`` has no NaN and ``scale`` / ``var`` are positive;
            ``None`` checks CPU tensors only (no GPU host sync), ``False`` never checks.

    Returns:
        Tensor of the broadcast shape (torch's broadcasting; an empty batch gives an empty
        result), one value per element (event shape ``()``); float32 for half-precision
        inputs, else the promoted input dtype.

    Raises:
        ValueError: not exactly one scale form, shapes do not broadcast, or (when
            validating) NaN in ``value`` or a ``scale`` / ``var`` that is not positive.

    Example:
        >>> x = torch.tensor([0.0, 1e-30, 1.0])
        >>> normal_log_prob(x, torch.tensor(0.0), torch.tensor(-80.0))  # log_scale
        tensor([ 7.9081e+01, -1.5349e+09,        -inf])
        >>> normal_log_prob(torch.tensor(3.0), torch.tensor(1.0), var=4.0)
        tensor(-2.1121)
    """
    forms = {"log_scale": log_scale, "scale": scale, "var": var, "log_var": log_var}
    tensors, name, param, _ = location_scale_inputs(value, loc, forms, validate_args)
    return log_density(tensors["value"], tensors["loc"], name, param)


def normal_nll(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
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
        log_scale, scale, var, log_var: exactly one, as in :func:`normal_log_prob`
            (``log_scale`` positional, the others keyword-only).
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
    check_nan_policy(nan_policy)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    forms = {"log_scale": log_scale, "scale": scale, "var": var, "log_var": log_var}
    tensors, name, param, log_sigma = location_scale_inputs(
        value, loc, forms, validate_args, check_value=nan_policy == "raise", min_scale=min_scale
    )
    value, loc = tensors["value"], tensors["loc"]
    floor = tensors.get("min_scale")
    if floor is not None:
        # a Python number is checked as itself (no tensor made from it, so nothing is read
        # back from a device or a tracer); a tensor when validating (host_readable default)
        if not isinstance(min_scale, Tensor):
            if not float(min_scale) > 0.0:  # NaN fails too
                raise ValueError(f"min_scale must be positive, got {min_scale!r}")
        elif should_validate(validate_args, floor) and not (floor > 0).all():
            raise ValueError(f"min_scale must be positive, got {min_scale!r}")

    if reduction != "none":
        params = {"loc": loc, name: param} | ({} if floor is None else {"min_scale": floor})
        check_value_batch(value.shape, **{k: t.shape for k, t in params.items()})

    mask = None
    if nan_policy == "mask":
        value, mask = mask_nan_events(value, loc)  # zero residual: finite, zero gradient

    log_form = name in ("log_scale", "log_var")
    if beta == 0.0 and floor is None:
        loss = -log_density(value, loc, name, param)
    elif beta == 0.0 and not log_form:
        # the soft floor on a scale or variance: sigma = scale + min_scale
        loss = -ScaleFormDensity.apply(value, loc, scale_of(name, param) + floor, 1.0)
    else:
        log_floor = None
        if floor is not None and log_form:
            log_floor = torch.log(floor)  # the floor applied inside, with its own backward
        elif floor is not None:
            log_sigma = torch.log(scale_of(name, param) + floor)  # sigma = scale + min_scale
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

    generate_vmap_rule = True

    @staticmethod
    def forward(value, loc, log_scale, log_floor, beta):
        residual, factor = split_residual(value, loc)
        log_sigma = _floored(log_scale, log_floor)
        y, weight, _ = _beta_pieces(residual, factor, log_sigma, beta)
        return (0.5 * y) * y + weight * (log_sigma + HALF_LOG_2PI)

    @staticmethod
    def setup_context(ctx, inputs, output):
        value, loc, log_scale, log_floor, ctx.beta = inputs
        ctx.save_for_backward(value, loc, log_scale, log_floor)

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
