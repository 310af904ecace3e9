r"""Mixtures of diagonal Gaussians (Bishop 1994): the MDN log density and loss.

:func:`normal_mixture_log_prob` runs the fused kernel :class:`_NormalMixture` (hand-written
backward from the responsibilities, :mod:`._fused`) where it is exact, else the plain
autograd path (:func:`~probloss.functional.normal_log_prob` summed over ``D``, then
:func:`~.general.mixture_log_prob`); :func:`normal_mixture_nll` reduces it over events.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._core.constants import HALF_LOG_2PI  # normal_log_prob's: bitwise-equal terms
from ..._core.ops import kernel_op
from ...special.logsumexp import _row_softmax_
from ..normal import normal_log_prob
from ._fused import (
    _PLANAR_MAX_D,
    _any_dead,
    _clear_dead_,
    _double_backward,
    _fused_outputs_fake,
    _fused_runs,
    _grads_fake,
    _location_scale_grads,
    _logits_grad_,
    _planes_mul,
    _rescue_overflowed_residuals_,
    _residuals,
    _standardized_anywhere,
    _weighted_responsibilities,
    _within_fused_bounds,
    _without_dead_components,
)
from ._inputs import _filled_grads, _mixture_nll, _normal_inputs
from .general import mixture_log_prob

__all__ = [
    "normal_mixture_log_prob",
    "normal_mixture_nll",
]


def _normal_terms(z: Tensor, log_w: Tensor, log_scale: Tensor, out: Tensor | None = None) -> Tensor:
    """The joint terms ``T_k = log_softmax(l)_k + sum_d log N(x_d | mu_kd, sigma_kd)``, new.

    Bitwise the plain path's terms (``normal_log_prob`` summed over D, then the log weight
    added): per coordinate ``((-z/2) z - s) - log(2 pi)/2``, the coordinates added in order
    (as torch's ``sum`` over ``D <= 4`` does; beyond, that ``sum`` itself), the log weight
    last. Where two terms are within their rounding error of each other (``|T| = 2.3e39``
    in float64, one ulp ``3e23``) the order of the roundings decides which component takes
    the responsibility: adding ``z^2/2`` into the log weight in one ``addcmul`` (one
    rounding) tied two components that differ only by ``1.5e23`` in log weight (``r = 0.5,
    0.5``, exact ``1, 0``), where rounding their common density first keeps them apart. So
    the kernel rounds as the plain path does (a fast path may not be less exact). The
    elementwise part runs on the contiguous ``(*, K, D)`` block (into ``out`` if given), the
    sum over coordinates one plane at a time (see :func:`_residuals`).
    """
    q = torch.mul(z, -0.5) if out is None else torch.mul(z, -0.5, out=out)
    q.mul_(z).sub_(log_scale).sub_(HALF_LOG_2PI)
    d = z.shape[-1]
    if d > _PLANAR_MAX_D:
        lp = q.sum(-1)
    else:
        lp = q[..., 0].clone() if d == 1 else torch.add(q[..., 0], q[..., 1])
        for i in range(2, d):
            lp.add_(q[..., i])
    return lp.add_(log_w)


def _plain_normal_mixture(value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """The plain autograd path: component log densities, summed over D, then the mixture."""

    def components(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        return normal_log_prob(x, loc, log_scale=log_scale).sum(-1)

    lp = _without_dead_components(components, value, loc, (log_scale, 0.0, 1))
    return mixture_log_prob(lp, logits)


def _normal_mixture_fake(value, logits, loc, log_scale):
    return _fused_outputs_fake(value, logits, loc, log_scale)


@kernel_op("normal_mixture_fused", event_dims=(1, 1, 2, 2), fake=_normal_mixture_fake)
def _normal_mixture_fused(
    value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward of :class:`_NormalMixture`: ``(log p, z, r, pi)``, each new."""
    shape = torch.broadcast_shapes(
        (*value.shape[:-1], 1), logits.shape, loc.shape[:-1], log_scale.shape[:-1]
    )
    log_w = torch.log_softmax(logits, -1)
    weights = torch.exp(log_w)  # one pass; a second softmax kernel in the backward costs 3
    if _within_fused_bounds(log_scale):
        z = _residuals(value, loc, shape)
        inv_scale = torch.neg(log_scale).exp_()  # e^{-s}, bitwise the plain path's
        z.mul_(inv_scale)  # see _standardized
        # the buffer of e^{-s} is reused for the terms' (*, K, D) block when it has that shape
        j = _normal_terms(z, log_w, log_scale, inv_scale if inv_scale.shape == z.shape else None)
        del inv_scale
        dead = _any_dead(j)
        if dead and _rescue_overflowed_residuals_(z, value, loc, log_scale):
            j = _normal_terms(z, log_w, log_scale)  # rare: a value - loc that overflowed
    else:  # e^{-s} not a normal float somewhere: z as the plain path forms it (exact)
        z = _standardized_anywhere(value, loc, log_scale, shape)
        j = _normal_terms(z, log_w, log_scale)
        dead = None  # not known yet
    _clear_dead_(z, j, known_dead=dead)
    lse = _row_softmax_(j)  # j is now the responsibilities
    return lse, z, j, weights


def _normal_mixture_backward_fake(
    grad, value, logits, loc, log_scale, z, resp, weights, lse, *needed
):
    return _grads_fake((value, logits, loc, log_scale), needed)


@kernel_op(
    "normal_mixture_fused_backward",
    event_dims=(0, 1, 1, 2, 2, 2, 1, 1, 0, None, None, None, None),
    fake=_normal_mixture_backward_fake,
)
def _normal_mixture_fused_backward(
    grad: Tensor,
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    z: Tensor,
    resp: Tensor,
    weights: Tensor,
    lse: Tensor,
    need_value: bool,
    need_logits: bool,
    need_loc: bool,
    need_log_scale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :class:`_NormalMixture` by each input (empty where not needed),
    in place on fresh buffers (no input is modified)."""
    g, w = _weighted_responsibilities(grad, resp, lse)
    d_value = d_logits = d_loc = d_log_scale = None
    if need_value or need_loc or need_log_scale:
        # a = w d(Q/2)/dz = w z, Q/2 = sum_d z_d^2 / 2
        needed = (need_value, need_loc, need_log_scale)
        d_value, d_loc, d_log_scale = _location_scale_grads(
            _planes_mul(z, w), z, w, log_scale, needed, _within_fused_bounds(log_scale)
        )
    if need_logits:
        d_logits = _logits_grad_(w, weights, g)
    inputs = (value, logits, loc, log_scale)
    needed = (need_value, need_logits, need_loc, need_log_scale)
    return _filled_grads((d_value, d_logits, d_loc, d_log_scale), inputs, needed)


class _NormalMixture(torch.autograd.Function):
    """Diagonal normal mixture log density with a hand-written backward.

    Forward (:func:`_normal_mixture_fused`): ``z = (x - mu) e^{-log sigma}`` (*, K, D);
    joint terms ``j_k = log_softmax(l)_k + sum_d log N_kd`` rounded as the plain path
    rounds them (:func:`_normal_terms`); ``log p = logsumexp(j)``, bitwise the plain
    path's value; ``j`` is turned into the responsibilities ``r`` in place. Saved: the
    inputs, ``z``, ``r`` and the weights ``pi = softmax(l)`` (extra outputs of the
    operator, not differentiable). With ``w = g r`` (``g`` the incoming gradient, 0 in rows
    whose value is ``-inf``), in :func:`_normal_mixture_fused_backward`::

        d/dlogits    = w - g pi             (in place into w, after its other uses)
        d/dloc       = w z / sigma          (= r (x - mu) / sigma^2)
        d/dlog_scale = w z^2 - w = (w z) z - w
        d/dvalue     = -sum_k d/dloc

    each formed with ``w`` multiplied in first, so that a component whose ``z^2/2``
    overflowed (``r = 0``) contributes exactly 0. Where ``e^{-log sigma}`` is not a normal
    float (:func:`~._fused._within_fused_bounds`) ``z`` and ``d/dloc`` are formed with
    :func:`~probloss.special.mul_exp`, as the plain path forms them. Runs where
    :func:`~._fused._fused_runs` (CPU, eager or compiled).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor):
        return _normal_mixture_fused(value, logits, loc, log_scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        lse, z, resp, weights = output
        ctx.mark_non_differentiable(z, resp, weights)
        ctx.set_materialize_grads(False)  # no zero gradients formed for the extras
        ctx.save_for_backward(*inputs, z, resp, weights, lse)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_) -> tuple[Tensor | None, ...]:
        if grad is None:  # grads are not materialised (none for the extras): a zero one
            grad = torch.zeros_like(ctx.saved_tensors[-1])  # lse, of the output's shape
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            return _double_backward(ctx, grad, _plain_normal_mixture)
        grads = _normal_mixture_fused_backward(grad, *ctx.saved_tensors, *ctx.needs_input_grad)
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad, strict=True))


def normal_mixture_log_prob(
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    *,
    fused: bool = True,
) -> Tensor:
    r"""Log density of a mixture of diagonal Gaussians, in log space (Bishop 1994).

    .. math::
        \log p(x) = \operatorname{logsumexp}_k\Big(\log\operatorname{softmax}(\ell)_k
            - \sum_{d=1}^D \big(\tfrac12 z_{kd}^2 + \log\sigma_{kd}\big)\Big)
            - \tfrac D2 \log 2\pi,
        \qquad z_{kd} = \frac{x_d - \mu_{kd}}{\sigma_{kd}}

    The density of a mixture density network with ``K`` diagonal components in ``D``
    dimensions. The tutorial form ``log(sum(pi * prod(pdf)))`` is ``-inf`` (NaN gradient)
    once the target is 14.4 scales from every mean in float32, 38.6 in float64 (``D = 1``,
    unit scales: ``exp(-z^2/2)`` underflows); this one is exact there: at ``z = 1e6`` it
    is about ``-5e11``, accurate to float rounding. Gradients are the responsibilities
    :math:`r_k` (see :mod:`.mixture`): :math:`r_k - \pi_k` for the logits,
    :math:`r_k z_{kd}/\sigma_{kd}` for the means, :math:`r_k (z_{kd}^2 - 1)` for the
    log-scales.

    Args:
        value: targets :math:`x`, shape ``(*, D)``.
        logits: mixture logits :math:`\ell`, shape ``(*, K)``, unnormalised.
        loc: means :math:`\mu`, shape ``(*, K, D)``.
        log_scale: :math:`\log\sigma`, shape ``(*, K, D)``, unconstrained.
        fused: on CPU, use the fused kernel with a hand-written backward (the default;
            ``benchmarks/bench_mixture.py`` measures its speed and memory against the plain
            autograd path), eager and inside ``torch.compile``. Any input is fine: where
            ``exp(log_scale)`` is not a normal float the kernel forms ``z`` as the plain
            path does; off the CPU and under ``torch.func`` transforms the plain path is
            taken by itself; both paths agree (module docstring). ``fused=False`` always
            takes the plain path (component densities from
            :func:`~probloss.functional.normal.normal_log_prob`). A double backward
            recomputes the gradients through the plain path.

    Returns:
        Tensor of shape ``(*)``, the broadcast batch shape (torch's broadcasting: this is
        the unreduced density), one value per event; float32 for float16 / bfloat16
        inputs, else the promoted input dtype.

    Raises:
        ValueError: ``loc`` / ``log_scale`` are not ``(*, K, D)`` with ``K`` from ``logits``
            and ``D`` from ``value``, or the batch shapes do not broadcast.

    Example:
        >>> logits = torch.tensor([0.0, 0.0])
        >>> loc = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # K = 2 components in D = 2
        >>> log_scale = torch.zeros(2, 2)
        >>> x = torch.tensor([[0.0, 0.0], [1e6, 0.0]])  # between the means; very far
        >>> normal_mixture_log_prob(x, logits, loc, log_scale)
        tensor([-2.3379e+00, -5.0000e+11])
        >>> pdf = (-0.5 * (x[:, None] - loc) ** 2).exp().prod(-1) / (2 * torch.pi)
        >>> (0.5 * pdf).sum(-1).log()  # the tutorial form
        tensor([-2.3379,    -inf])

    References:
        Bishop (1994), "Mixture density networks", NCRG/94/004, eqs. 22-26 (error function)
        and 34-39 (gradients through the posteriors).
    """
    value, logits, loc, log_scale = _normal_inputs(value, logits, loc, log_scale)
    return _normal_mixture(value, logits, loc, log_scale, fused)


def _normal_mixture(value, logits, loc, log_scale, fused: bool) -> Tensor:
    """The fused kernel where it runs (:func:`_fused_runs`: CPU, eager or compiled), else
    the plain path."""
    if fused and _fused_runs(value, logits, loc, log_scale):
        return _NormalMixture.apply(value, logits, loc, log_scale)[0]
    return _plain_normal_mixture(value, logits, loc, log_scale)


def normal_mixture_nll(
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    *,
    reduction: str = "mean",
    nan_policy: str = "raise",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Negative log-likelihood of a diagonal Gaussian mixture: the MDN loss, reduced.

    .. math::
        \ell_i = -\log p(x_i) \quad\text{(see :func:`normal_mixture_log_prob`)}

    one value per event (a ``D``-dimensional target), computed with the fused kernel, then
    reduced: ``"mean"`` averages over events (never over the ``D`` coordinates or the
    ``K`` components), ``"sum"`` adds them, ``"none"`` returns them. It is a density, so it
    can be negative. Like torch, a batch of no events gives ``"mean"`` NaN (0 / 0),
    ``"sum"`` 0 and ``"none"`` an empty tensor.

    Reduced losses do not broadcast the targets: the parameters' batch shapes may broadcast
    *up to* that of ``value`` (a shared mixture of batch shape ``()``), but one that would
    enlarge it (``logits`` of shape ``(N, 1, K)`` against ``value (N, D)``, every target
    against every mixture, an ``(N, N)`` average) is a ValueError naming the argument and
    both shapes. ``reduction="none"`` keeps torch's broadcasting, as
    :func:`normal_mixture_log_prob` does.

    Args:
        value, logits, loc, log_scale: as in :func:`normal_mixture_log_prob`.
        reduction: ``"mean"`` (over events), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"``: NaN in ``value`` is a ValueError (when validating;
            otherwise it propagates). ``"mask"``: events with a NaN in any coordinate are
            ignored: loss 0 under ``"none"``, left out of ``"sum"`` and of the count of
            ``"mean"`` (a mean over no events is NaN); their gradient is exactly 0 with
            respect to every parameter (they are evaluated at the mean of component 0,
            detached, where the loss is finite for finite parameters).
        validate_args: check ``value`` for NaN under ``"raise"``; ``None`` checks CPU
            tensors only (no GPU host sync). Shapes are always checked.

    Returns:
        A scalar for ``"mean"`` / ``"sum"``, else shape ``(*)``; float32 for half inputs.

    Raises:
        ValueError: bad ``reduction`` or ``nan_policy``, shapes as in
            :func:`normal_mixture_log_prob`, a parameter that would enlarge the batch shape
            of ``value`` (reduced losses), or NaN in ``value`` under ``"raise"``.

    Example:
        >>> x = torch.tensor([[0.5], [float("nan")], [3.0]])
        >>> logits, loc, log_scale = torch.zeros(2), torch.tensor([[0.0], [3.0]]), torch.zeros(2, 1)
        >>> normal_mixture_nll(x, logits, loc, log_scale, nan_policy="mask", reduction="none")
        tensor([1.6885, 0.0000, 1.6010])
        >>> normal_mixture_nll(x, logits, loc, log_scale, nan_policy="mask")
        tensor(1.6448)
    """
    inputs = {"value": value, "logits": logits, "loc": loc, "log_scale": log_scale}
    return _mixture_nll(
        _normal_mixture,
        _normal_inputs,
        " (event dimension D last)",
        inputs,
        reduction,
        nan_policy,
        validate_args,
    )
