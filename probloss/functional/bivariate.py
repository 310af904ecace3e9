r"""Bivariate normal log density and NLL with correlation, in log space (Graves 2013).

The density of handwriting / sketch generation models (Graves 2013, arXiv:1308.0850,
eqs. 24-25; Ha & Eck 2017, sketch-rnn, arXiv:1704.03477), usually written in probability
space as

.. math::
    \mathcal N(x \mid \mu, \sigma, \rho) = \frac{1}{2\pi\sigma_1\sigma_2\sqrt{1-\rho^2}}
    \exp\!\Big(-\frac{Z}{2(1-\rho^2)}\Big), \qquad
    Z = z_1^2 - 2\rho z_1 z_2 + z_2^2, \quad z_i = \frac{x_i - \mu_i}{\sigma_i},

is computed here as its logarithm from unconstrained parameters ``log_scale``
(:math:`\log\sigma_i`) and ``atanh_rho`` (:math:`a`, :math:`\rho = \tanh a`). Nothing
rounds to ``log 0`` or ``0 / 0``: in float32 ``tanh(10) == 1`` exactly, so the
probability-space formula divides by ``1 - rho^2 == 0``; here
:math:`\log(1 - \rho^2) = -2\log\cosh a` and the quadratic form is a sum of non-negative
terms, exact for ``|a|`` far beyond 10.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.constants import LOG_2PI
from .._core.dtype import as_loss_tensors
from .._core.ops import host_readable, kernel_op
from .._core.params import log_scale_from, single_form
from .._core.reduction import (
    check_nan_policy,
    check_reduction,
    check_value_batch,
    mask_nan_events,
    reduce_loss,
)
from .._core.shapes import BIVARIATE_LAYOUTS, batch_shape
from .._core.validation import check_not_nan, should_validate
from ..special import log_cosh, mul_exp
from ._bivariate_forms import (
    exp_half,
    gradient_pieces,
    quadratic_factor,
    rotated,
)
from ._bivariate_scaled import log_scaled_half_q, lost_precision, with_fallback
from ._params import split_residual

_LAYOUTS = {**BIVARIATE_LAYOUTS, "scale": "(*, 2)"}  # value, loc and a scale form (*, 2)


def _log_density_fake(value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(
        value.shape[:-1], loc.shape[:-1], log_scale.shape[:-1], atanh_rho.shape
    )
    return value.new_empty(shape)


@kernel_op("bivariate_log_density", event_dims=(1, 1, 1, 0), fake=_log_density_fake)
def _log_density_value(value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor) -> Tensor:
    """The forward of :class:`_BivariateLogDensity`: value ``(*, 2)``, loc ``(*, 2)``,
    log_scale ``(*, 2)``, atanh_rho ``(*)``, one compute dtype; returns ``(*)`` broadcast."""
    z = _standardized(value, loc, log_scale)
    wide, narrow_e, g = rotated(z, atanh_rho)
    # Q/2 = (1 + e^{-2|a|})/8 (wide^2 + (n e^|a|)^2), the factor taken inside the squares:
    # no intermediate exceeds Q/2, so nothing overflows unless the result does
    k = quadratic_factor(g.square())
    half_q = (k * wide).square() + (k * narrow_e).square()
    # a z_i below finfo.tiny (x_i != mu_i) has lost its digits before e^|a| multiplies
    # it (z_1 = e^{-110} = 0 in float32, Q/2 = 6e7 at |a| = 120): Q/2 from logarithms
    # there. Where the values are free to read (CPU) only if some event needs it; elsewhere
    # always, selected without a host read.
    lost = lost_precision(value, loc, z)
    if not host_readable(lost) or bool(lost.any()):
        half_q = torch.where(lost, log_scaled_half_q(value, loc, log_scale, atanh_rho), half_q)
    # An infinite z (a target infinitely many scales away) makes Q infinite, since
    # Q >= |z|^2 / (1 + |rho|); z1 - z2 would be inf - inf = NaN on the way.
    half_q = torch.where(torch.isinf(z).any(-1), math.inf, half_q)
    # -log(2 pi s1 s2 sqrt(1 - rho^2)) with -0.5 log(1 - rho^2) = log cosh(a)
    ls1, ls2 = log_scale[..., 0], log_scale[..., 1]  # 8x faster than unbind / sum here
    log_cosh_a = log_cosh(atanh_rho)
    rest = (log_cosh_a - LOG_2PI) - (ls1 + ls2)
    # the terms may each be near finfo.max and cancel (l1 = l2 = |a| = 3.4e38: l1 + l2
    # overflows, the sum is -3.4e38): there as halves, 2 ((lc/2 - c/2 - l1/2) - l2/2)
    # (halving is exact above the subnormals, where such terms lie), so no partial sum
    # overflows unless the result does
    halves = ((0.5 * log_cosh_a - 0.5 * LOG_2PI) - 0.5 * ls1) - 0.5 * ls2
    rest = torch.where(torch.isfinite(rest), rest, 2.0 * halves)
    # Q/2 = inf dominates even an overflowing log cosh(a) - log_scale_sum (inf - inf):
    # Q >= cosh(a)^2 narrow^2 + wide^2 / 4 grows like the squares of z and e^|a|, the
    # rest only like |a| and |log_scale|.
    return torch.where(torch.isinf(half_q), -math.inf, rest - half_q)


class _BivariateLogDensity(torch.autograd.Function):
    """The log density (inputs in one compute dtype, no checks) with a hand-written backward.

    The derivatives in closed form (:func:`_gradient_pieces`), from a third of the memory of
    autograd through the forward and more accurate than it: only the inputs are saved, no
    intermediates, and the backward is a few fused expressions whose products are ordered
    so that nothing overflows where the exact value and derivative are representable. It
    is built from the saved inputs with differentiable torch ops, so it is differentiable
    again (Hessians, ``gradgradcheck``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor) -> Tensor:
        return _log_density_value(value, loc, log_scale, atanh_rho)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return log_density_grads(grad, *ctx.saved_tensors, ctx.needs_input_grad)


def log_density_grads(
    grad: Tensor,
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    atanh_rho: Tensor,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The vector-Jacobian product of the log density (:class:`_BivariateLogDensity`):
    the gradients by ``(value, loc, log_scale, atanh_rho)`` (``None`` where ``needs`` is
    False), each summed to its input's shape. Also the per-component backward of the
    fused mixture's exact fallback (``grad`` the weighted responsibilities)."""
    z = _standardized(value, loc, log_scale)
    sign, z1, z2, ns, c, f, inv_eb = _gradient_pieces(z, atanh_rho)
    # d(-Q/2)/dz1 = -c (z1 + n s e^{2b}), d(-Q/2)/dz2' = -c (z2' - n s e^{2b}): the
    # coefficient multiplies first and e^{2b} last, one finite f = e^{b/2} at a time, so
    # no partial product exceeds the result and a zero coefficient gives exactly 0
    gc = grad * c
    grads: list[Tensor | None] = [None] * 4
    if needs[0] or needs[1]:
        # dz_i/dx_i = e^{-log_scale_i}, applied by mul_exp before the last factor f: a
        # zero term stays 0 where e^{-log_scale} overflows (a point on the mean at
        # log_scale < -88 in float32)
        s1, s2 = (-log_scale).unbind(-1)
        gcns = gc * ns
        d_value = torch.stack(
            (
                -(mul_exp(gc * z1, s1) + mul_exp(gcns * f * f * f, s1) * f),
                -sign * (mul_exp(gc * z2, s2) - mul_exp(gcns * f * f * f, s2) * f),
            ),
            -1,
        )
        if needs[0]:
            grads[0] = d_value
        if needs[1]:
            grads[1] = -d_value
    if needs[2]:
        # z_i = r_i e^{-log_scale_i}: d/dlog_scale_i = -1 - z_i d/dz_i (exactly -1 at
        # z_i = 0, even where d/dz_i overflows: a point on an axis at large |a|)
        gcz1, gcz2 = gc * z1, gc * z2
        d1 = gcz1 * z1 + gcz1 * ns * f * f * f * f
        d2 = gcz2 * z2 - gcz2 * ns * f * f * f * f
        grads[2] = torch.stack((d1 - grad, d2 - grad), -1)
    if needs[3]:
        # d log cosh(a)/da = tanh a and d(-Q/2)/d|a| = u v with u = z1 e^{-b} + n s e^b,
        # v = z2' e^{-b} - n s e^b. The incoming gradient goes into both factors as
        # sqrt|grad| (its sign outside): u v alone can overflow where the density is
        # -inf, and a zero incoming gradient (a component with no responsibility in a
        # mixture) must give 0 there, not 0 * inf.
        root = grad.abs().sqrt()
        rns = root * ns * f * f
        u = root * z1 * inv_eb + rns
        v = root * z2 * inv_eb - rns
        grads[3] = grad * torch.tanh(atanh_rho) + sign * torch.sign(grad) * u * v
    # entries summed to the inputs' shapes only after the fallback's selection per event
    lost = lost_precision(value, loc, z)
    return with_fallback(grads, grad, value, loc, log_scale, atanh_rho, lost)


def _standardized(value: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """``z = (value - loc) e^{-log_scale}``, 0 on the mean even where ``e^{-log_scale} = inf``
    and finite where ``value - loc`` overflows but ``z`` does not (:func:`split_residual`)."""
    r, m = split_residual(value, loc)
    return mul_exp(r, -log_scale) * m


def _gradient_pieces(z: Tensor, atanh_rho: Tensor) -> tuple[Tensor, ...]:
    """``(sign(a), z1, z2', n s, c, f, e^{-b})`` for the backward, ``b = |a|``: the closed
    forms of :mod:`._bivariate_forms` with ``e^b = f f``, ``f`` the finite
    :func:`~._bivariate_forms.exp_half`."""
    sign, b, z1, z2, c, _, ns = gradient_pieces(z, atanh_rho, with_c=True)
    return sign, z1, z2, ns, c, exp_half(b), torch.exp(-b)


def _prepare(
    value: Tensor,
    loc: Tensor,
    scale_forms: dict[str, Tensor | float | None],
    atanh_rho: Tensor | None,
    rho: Tensor | None,
    validate_args: bool | None,
    check_value_nan: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, str, str]:
    """Convert, check shapes (always) and values (when validating); resolve ``scale`` and
    ``rho``. Returns the tensors, then the names of the scale and correlation forms given."""
    scale_name, scale = single_form(scale_forms)  # log_scale or scale, exactly one
    if (atanh_rho is None) == (rho is None):
        got = "both" if rho is not None else "neither"
        raise ValueError(f"pass exactly one of atanh_rho and rho (keyword); got {got}")
    corr_name = "atanh_rho" if rho is None else "rho"
    corr = atanh_rho if rho is None else rho
    named = {"value": value, "loc": loc, scale_name: scale, corr_name: corr}
    value, loc, scale, corr = as_loss_tensors(**named)
    tensors = {"value": value, "loc": loc, scale_name: scale, corr_name: corr}
    batch_shape(_LAYOUTS, **tensors)
    if should_validate(validate_args, *tensors.values()):
        if check_value_nan:
            check_not_nan(value, "value")
        if rho is not None:
            bad = ~(corr.abs() < 1.0)  # also catches NaN
            if bad.any():
                raise ValueError(
                    f"rho of shape {tuple(corr.shape)} must lie in (-1, 1); got "
                    f"{int(bad.sum())} value(s) with |rho| >= 1 or NaN. Pass atanh_rho "
                    "(unconstrained, rho = tanh(atanh_rho)) instead: it has no such limit"
                )
    # the one resolver: a scale is checked positive (when validating) and logged once
    log_scale = log_scale_from(**{scale_name: scale}, validate_args=validate_args)
    if rho is not None:
        corr = torch.atanh(corr)  # 1/(1 - rho^2) amplifies the rounding of rho near +-1
    return value, loc, log_scale, corr, scale_name, corr_name


def bivariate_normal_log_prob(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | None = None,
    atanh_rho: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    rho: Tensor | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of a bivariate normal with correlation, from ``log_scale`` and ``atanh_rho``.

    .. math::
        \log\mathcal N(x \mid \mu, \sigma, \rho) = -\log 2\pi - \log\sigma_1 - \log\sigma_2
            + \log\cosh a - \tfrac12 Q,

    .. math::
        Q = \frac{z_1^2 - 2\rho z_1 z_2 + z_2^2}{1 - \rho^2}
          = \frac{1 + e^{-2a}}{4}(z_1 + z_2)^2 + \frac{1 + e^{2a}}{4}(z_1 - z_2)^2,

    with :math:`z_i = (x_i - \mu_i)\,e^{-\log\sigma_i}` and :math:`\rho = \tanh a`. This is
    Graves (2013, arXiv:1308.0850) eqs. 24-25 and Ha & Eck (2017, sketch-rnn) in log space:
    :math:`-\tfrac12\log(1-\rho^2) = \log\cosh a` and the quadratic form is a sum of two
    non-negative terms (the coordinates along the eigenvectors of the correlation matrix),
    so nothing cancels and nothing rounds to ``log 0``, even where ``tanh(a)`` rounds to
    exactly ``+-1`` (``|a| > 9.01`` in float32). Value and gradients are finite and
    accurate for ``|atanh_rho|`` up to 50 and beyond, residuals of ``1e6`` scales and
    ``log_scale`` in ``[-20, 20]``, wherever the exact result is representable in the
    compute dtype (``Q`` beyond ``3.4e38`` is ``-inf`` in float32, correctly). Each of the
    seven gradient entries is its own value: where a partial product overflows (a
    ``log_scale`` near ``-log(finfo.max)``) only the entries whose exact value exceeds the
    dtype are infinite, the others stay finite and accurate. The value is a
    log *density*: it is positive where the density exceeds 1 (small scales), so the NLL
    can be negative.

    Args:
        value: points, shape ``(*, 2)``.
        loc: means :math:`\mu`, shape ``(*, 2)``, broadcastable with ``value``.
        log_scale: :math:`\log\sigma`, shape ``(*, 2)``, broadcastable (positional).
        atanh_rho: :math:`a = \operatorname{atanh}\rho`, unconstrained, shape ``(*)`` (no
            event dimension), broadcastable with the others' ``(*)``.
        rho: alternatively the correlation itself in ``(-1, 1)`` (keyword only; pass exactly
            one of ``atanh_rho`` and ``rho``). Less stable: a correlation that reached
            ``+-1`` through ``tanh`` has already lost the information, and near ``+-1`` the
            rounding of ``rho`` is amplified by ``1/(1 - rho^2)``.
        scale: alternatively :math:`\sigma > 0`, shape ``(*, 2)`` (keyword only; pass exactly
            one of ``log_scale`` and ``scale``), resolved by the one resolver
            :func:`~probloss._core.params.log_scale_from` (``log`` once).
        validate_args: check values: ``value`` has no NaN, a given ``rho`` lies in
            ``(-1, 1)``, a given ``scale`` is positive; ``None`` checks CPU tensors only (no
            GPU host sync). Shapes are always checked.

    Returns:
        Tensor of shape ``(*)`` (one value per event, unreduced, batch dimensions broadcast
        like torch; an empty batch gives an empty result); float32 for float16 /
        bfloat16 inputs (computed in float32), else the promoted input dtype.

    Raises:
        ValueError: a last dimension is not 2, shapes do not broadcast, not exactly one of
            ``log_scale`` / ``scale`` or of ``atanh_rho`` / ``rho`` is given, or (when
            validating) ``value`` contains NaN, ``|rho| >= 1`` or a ``scale`` is not
            positive. Each message names the argument and its shape.

    Example:
        >>> x = torch.tensor([[3.0, 3.0], [3.0, 3.001]])  # on / just off the line x1 = x2
        >>> bivariate_normal_log_prob(x, torch.zeros(2), torch.zeros(2), torch.tensor(10.0))
        tensor([  2.9690, -57.6694])
        >>> rho = torch.tanh(torch.tensor(10.0))  # exactly 1.0 in float32
        >>> 1 - rho**2  # what the probability-space formula divides by
        tensor(0.)
        >>> bivariate_normal_log_prob(x[0], torch.zeros(2), scale=torch.ones(2), rho=rho * 0.5)
        tensor(-7.6940)
    """
    forms = {"log_scale": log_scale, "scale": scale}
    value, loc, log_scale, atanh_rho, _, _ = _prepare(
        value, loc, forms, atanh_rho, rho, validate_args, check_value_nan=True
    )
    return _BivariateLogDensity.apply(value, loc, log_scale, atanh_rho)


def bivariate_normal_nll(
    value: Tensor,
    loc: Tensor,
    log_scale: Tensor | None = None,
    atanh_rho: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    rho: Tensor | None = None,
    reduction: str = "mean",
    nan_policy: str = "raise",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Negative log-likelihood of a bivariate normal, reduced over events.

    .. math::
        \ell = -\log\mathcal N(x \mid \mu, \sigma, \rho)
             \quad\text{(see :func:`bivariate_normal_log_prob`)}

    The loss of handwriting / sketch models (Graves 2013 eqs. 24-25, sketch-rnn), in log
    space from ``log_scale`` and ``atanh_rho``. It can be negative: it is a density, not a
    probability.

    Args:
        value, loc, log_scale, atanh_rho, scale, rho, validate_args: as in
            :func:`bivariate_normal_log_prob` (shapes ``(*, 2)`` and ``(*)``).
        reduction: ``"none"`` (shape ``(*)``), ``"sum"``, or ``"mean"``: the average over
            *events* (points), i.e. the sum divided by the number of (unmasked) events, never
            by the number of scalars ``2 * events``. Like torch, the sum over an empty batch
            is 0 and its mean NaN. A reduced loss refuses a parameter whose batch shape
            would enlarge the value's (``atanh_rho`` of shape ``(N, 1)`` against ``value``
            ``(N, 2)`` would average an ``(N, N)`` matrix): a ValueError naming the argument
            and both shapes.
        nan_policy: ``"raise"`` (NaN in ``value`` is a ValueError when validating) or
            ``"mask"``: events with a NaN in either coordinate are ignored: loss 0 with
            ``"none"``, left out of ``"sum"`` and of the count of ``"mean"`` (a mean over no
            event is NaN). Their gradient is exactly 0 with respect to every argument.

    Returns:
        A scalar for ``"mean"`` / ``"sum"``, else shape ``(*)``; float32 for half inputs.

    Example:
        >>> x = torch.tensor([[0.5, 0.4], [float("nan"), 1.0], [-1.0, 2.0]])
        >>> bivariate_normal_nll(x, torch.zeros(2), torch.zeros(2), torch.tensor(1.0),
        ...                      nan_policy="mask", reduction="none")
        tensor([ 1.5295,  0.0000, 10.9837])
    """
    check_reduction(reduction)
    check_nan_policy(nan_policy)
    masked = nan_policy == "mask"
    forms = {"log_scale": log_scale, "scale": scale}
    value, loc, log_scale, atanh_rho, scale_name, corr_name = _prepare(
        value, loc, forms, atanh_rho, rho, validate_args, check_value_nan=not masked
    )
    if reduction != "none":
        check_value_batch(
            value.shape[:-1],
            " (event dimension 2 last)",
            loc=loc.shape[:-1],
            **{scale_name: log_scale.shape[:-1], corr_name: atanh_rho.shape},
        )
    mask = None
    if masked:
        # a finite stand-in (the mean, detached): the zero weight then zeroes the gradient
        value, mask = mask_nan_events(value, loc, event_dims=1)
    loss = -_BivariateLogDensity.apply(value, loc, log_scale, atanh_rho)
    return reduce_loss(loss, reduction, mask=mask)
