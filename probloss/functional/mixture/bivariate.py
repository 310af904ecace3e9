r"""Mixtures of correlated bivariate Gaussians (Graves 2013, sketch-rnn): log density, loss.

:func:`bivariate_normal_mixture_log_prob` runs the fused kernel :class:`_BivariateMixture`
where it is exact (:mod:`._fused`), else the plain path through
:func:`~probloss.functional.bivariate_normal_log_prob`; both evaluate the closed forms of
:mod:`probloss.functional._bivariate_forms`. :func:`bivariate_normal_mixture_nll` reduces
it over events.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._core.constants import LOG_2, LOG_2PI
from ..._core.ops import host_readable, kernel_op
from ...special.logsumexp import _row_softmax_
from .._bivariate_forms import eigen_terms, gradient_pieces
from ..bivariate import _log_density_value, bivariate_normal_log_prob, log_density_grads
from ._fused import (
    _at_safe_points,
    _clear_dead_,
    _double_backward,
    _fused_outputs_fake,
    _fused_runs,
    _grads_fake,
    _joint_init,
    _location_scale_grads,
    _logits_grad_,
    _rescue_overflowed_residuals_,
    _standardized,
    _weighted_responsibilities,
    _within_fused_bounds,
    _without_dead_components,
)
from ._inputs import _bivariate_inputs, _filled_grads, _mixture_nll
from .general import mixture_log_prob

__all__ = [
    "bivariate_normal_mixture_log_prob",
    "bivariate_normal_mixture_nll",
]


def _plain_bivariate_mixture(
    value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> Tensor:

    def components(x: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor) -> Tensor:
        return bivariate_normal_log_prob(x, loc, log_scale, atanh_rho, validate_args=False)

    lp = _without_dead_components(components, value, loc, (log_scale, 0.0, 1), (atanh_rho, 0.0, 0))
    return mixture_log_prob(lp, logits)


def _bivariate_mixture_fake(value, logits, loc, log_scale, atanh_rho):
    out = _fused_outputs_fake(value, logits, loc, log_scale, atanh_rho)
    return (*out, torch.empty_like(out[0]))


@kernel_op("bivariate_mixture_fused", event_dims=(1, 1, 2, 2, 1), fake=_bivariate_mixture_fake)
def _bivariate_mixture_fused(
    value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward of :class:`_BivariateMixture`: ``(log p, z, r, pi, logsumexp(j))``, new."""
    shape = torch.broadcast_shapes(
        (*value.shape[:-1], 1), logits.shape, loc.shape[:-1], log_scale.shape[:-1],
        atanh_rho.shape,
    )  # fmt: skip
    if not _within_fused_bounds(log_scale, atanh_rho):
        return _per_component_forward(value, logits, loc, log_scale, atanh_rho, shape)
    z = _standardized(value, loc, log_scale, shape)
    # exact: |z| >= max gives Q >= z^2/2 = inf either way, and an infinite z would make
    # M = (z1 - z2) e^a NaN where z1 = z2 = inf (checked first where host_readable, else
    # always done; NaN compares False and is clamped to itself); an infinite z from a
    # value - loc that overflowed is first recomputed (it may be finite)
    big = torch.finfo(z.dtype).max
    checked = host_readable(z) and z.numel() > 0
    if not checked or not all(bool(abs(v) <= big) for v in torch.aminmax(z)):
        _rescue_overflowed_residuals_(z, value, loc, log_scale)
        z.clamp_(-big, big)
    ea, inv_ea, p, m = eigen_terms(z, atanh_rho)
    j, weights = _joint_init(logits, shape)
    j.add_(ea.add_(inv_ea).log_())  # log cosh a + log 2
    del ea, inv_ea
    z1, z2 = z[..., 0], z[..., 1]
    j.sub_(log_scale[..., 0]).sub_(log_scale[..., 1])
    j.addcmul_(z1, z1, value=-0.25).addcmul_(z2, z2, value=-0.25)
    j.addcmul_(p, p, value=-0.125).addcmul_(m, m, value=-0.125)
    del p, m
    _clear_dead_(z, j)
    lse = _row_softmax_(j)
    return lse - (LOG_2PI + LOG_2), z, j, weights, lse


def _per_component_forward(
    value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor, shape
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The exact fallback of :func:`_bivariate_mixture_fused` outside its bounds
    (:func:`~._fused._within_fused_bounds`): the single density's forward per component (the
    plain path's component densities), then the mixture's log-sum-exp. Same outputs, ``z``
    zero (unused: :func:`_per_component_backward` recomputes what it needs)."""
    j, weights = _joint_init(logits, shape)
    j.add_(_log_density_value(value.unsqueeze(-2), loc, log_scale, atanh_rho))
    lse = _row_softmax_(j)  # j is now the responsibilities
    return lse, value.new_zeros((*shape, 2)), j, weights, lse.clone()


def _per_component_backward(
    grad, value, logits, loc, log_scale, atanh_rho, resp, weights, lse, needed
) -> tuple[Tensor, ...]:
    """The gradients of :func:`_per_component_forward`: the single density's backward
    (:func:`~probloss.functional.bivariate.log_density_grads`) with the weighted
    responsibilities ``w = g r`` as its incoming gradient, summed to each input's shape.

    A component with ``w = 0`` contributes exactly 0; it is evaluated at a safe point (mean
    on the target, unit scales, no correlation: a residual of 0), where its derivatives are
    finite, as the plain path evaluates its components whose density is ``-inf``. A row
    whose every ``w`` is 0 (a target at infinity) is evaluated at a target of 0.
    """
    g, w = _weighted_responsibilities(grad, resp, lse)
    x, loc_safe, log_scale_safe, rho_safe = _at_safe_points(
        w == 0, value.unsqueeze(-2), loc, (log_scale, 0.0, 1), (atanh_rho, 0.0, 0)
    )
    need_value, need_logits, need_loc, need_log_scale, need_rho = needed
    needs = (need_value, need_loc, need_log_scale, need_rho)
    d_x, d_loc, d_log_scale, d_rho = log_density_grads(
        w, x, loc_safe, log_scale_safe, rho_safe, needs
    )
    inputs = (value, logits, loc, log_scale, atanh_rho)
    grads = (
        None if d_x is None else d_x.squeeze(-2).sum_to_size(value.shape),
        _logits_grad_(w, weights, g) if need_logits else None,
        None if d_loc is None else d_loc.sum_to_size(loc.shape),
        None if d_log_scale is None else d_log_scale.sum_to_size(log_scale.shape),
        None if d_rho is None else d_rho.sum_to_size(atanh_rho.shape),
    )
    return _filled_grads(grads, inputs, needed)


def _bivariate_mixture_backward_fake(
    grad, value, logits, loc, log_scale, atanh_rho, z, resp, weights, lse, *needed
):
    return _grads_fake((value, logits, loc, log_scale, atanh_rho), needed)


@kernel_op(
    "bivariate_mixture_fused_backward",
    event_dims=(0, 1, 1, 2, 2, 1, 2, 1, 1, 0, None, None, None, None, None),
    fake=_bivariate_mixture_backward_fake,
)
def _bivariate_mixture_fused_backward(
    grad: Tensor,
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    atanh_rho: Tensor,
    z: Tensor,
    resp: Tensor,
    weights: Tensor,
    lse: Tensor,
    need_value: bool,
    need_logits: bool,
    need_loc: bool,
    need_log_scale: bool,
    need_rho: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :class:`_BivariateMixture` by each input (empty where not needed),
    in place on fresh buffers (no input is modified)."""
    inputs = (value, logits, loc, log_scale, atanh_rho)
    needed = (need_value, need_logits, need_loc, need_log_scale, need_rho)
    if not _within_fused_bounds(log_scale, atanh_rho):
        return _per_component_backward(
            grad, value, logits, loc, log_scale, atanh_rho, resp, weights, lse, needed
        )
    g, w = _weighted_responsibilities(grad, resp, lse)
    d_value = d_logits = d_loc = d_log_scale = d_rho = None
    if not (need_value or need_loc or need_log_scale or need_rho):
        d_logits = _logits_grad_(w, weights, g) if need_logits else None
        return _filled_grads((None, d_logits, None, None, None), inputs, needed)
    # closed-form derivatives (_bivariate_forms.gradient_pieces), w multiplied in first
    # so a component with no responsibility contributes exactly 0; every temporary is
    # (*, K). e^{|a|} is finite in the fused kernel's domain (_fused_bounds).
    sign, b, z1, _, _, s, ns = gradient_pieces(z, atanh_rho)
    eb = torch.exp(b)
    del b
    z2 = z[..., 1]
    if need_value or need_loc or need_log_scale:
        wc = torch.addcmul(w, w, s, value=-1.0)  # w c, c = 1 - s = (1 + e^{-2|a|})/2
        del s  # before the next (*, K) buffers: the backward's peak memory is here
        t = torch.mul(wc, ns).mul_(eb).mul_(eb)  # w c n s e^{2|a|}
        # A_i = w d(Q/2)/dz_i: A_1 = w c (z1 + n s e^{2|a|}), A_2 = w c z2 - sign t
        a = torch.empty_like(z)
        torch.addcmul(t, wc, z1, out=a[..., 0])
        torch.mul(wc, z2, out=a[..., 1]).addcmul_(sign, t, value=-1.0)
        del wc, t
    if need_rho:
        # d/da = w tanh a + sign u v, u = z1 e^{-|a|} + n s e^{|a|}, v = z2' e^{-|a|} -
        # n s e^{|a|}, z2' = sign z2 (w multiplied into u first)
        # in place where possible: the (*, K) buffers here set the backward's peak memory
        n_e = ns.mul_(eb)
        inv_eb = eb.reciprocal_()
        v = torch.mul(z2, sign).mul_(inv_eb).sub_(n_e)
        w_z1 = inv_eb.mul_(z1) if inv_eb.shape == z1.shape else inv_eb * z1
        wu = n_e.mul_(w).add_(w_z1.mul_(w))  # w n s e^{|a|} + w z1 e^{-|a|}
        d_rho = torch.tanh(atanh_rho)
        d_rho = d_rho.mul_(w) if d_rho.shape == w.shape else d_rho * w
        d_rho.addcmul_(wu.mul_(v), sign)
        del n_e, inv_eb, w_z1, wu, v
    del ns, eb, sign
    if need_value or need_loc or need_log_scale:
        planes = (need_value, need_loc, need_log_scale)
        d_value, d_loc, d_log_scale = _location_scale_grads(a, z, w, log_scale, planes)
    if need_logits:
        d_logits = _logits_grad_(w, weights, g)
    grads = (d_value, d_logits, d_loc, d_log_scale, d_rho)
    return _filled_grads(grads, inputs, needed)


class _BivariateMixture(torch.autograd.Function):
    """Bivariate normal mixture log density with a hand-written backward.

    Component ``k``: ``log N = log cosh a - log 2 pi - log s1 - log s2 - Q/2`` with
    ``Q/2 = (z1^2 + z2^2)/4 + (P^2 + M^2)/8`` (:func:`~.._bivariate_forms.eigen_terms`) and
    ``log cosh a = log(e^a + e^-a) - log 2``. Saved: the inputs (references), ``z``, the
    responsibilities ``r`` and the weights ``pi``; the backward's pieces are recomputed
    from them (less memory for a few cheap passes). With ``w = g r``, ``b = |a|``,
    ``z2' = sign(a) z2``, ``n = z1 - z2'``, ``s = -expm1(-2b)/2``, ``c = 1 - s``
    (:func:`~.._bivariate_forms.gradient_pieces`, the closed forms of the single
    density's backward, formed from ``z1`` and ``z2`` directly)::

        A_1 = w d(Q/2)/dz1 = w c (z1 + n s e^{2b}),   A_2 = sign w c (z2' - n s e^{2b})
        d/dloc_i       = A_i / s_i,     d/dlog_scale_i = z_i A_i - w
        d/datanh_rho   = w tanh a + sign w u v,
                         u = z1 e^{-b} + n s e^b,  v = z2' e^{-b} - n s e^b
        d/dlogits      = w - g pi,      d/dvalue = -sum_k d/dloc

    Products are ordered with ``w`` first (``((w c n s) e^b) e^b``), so a component whose
    ``Q`` overflowed (``r = 0``) contributes exactly 0, and nothing overflows unless the
    exact derivative does.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor):
        return _bivariate_mixture_fused(value, logits, loc, log_scale, atanh_rho)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, z, resp, weights, lse = output
        ctx.mark_non_differentiable(z, resp, weights, lse)
        ctx.set_materialize_grads(False)  # no zero gradients formed for the extras
        ctx.save_for_backward(*inputs, z, resp, weights, lse)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_) -> tuple[Tensor | None, ...]:
        if grad is None:  # grads are not materialised (none for the extras): a zero one
            grad = torch.zeros_like(ctx.saved_tensors[-1])  # lse, of the output's shape
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            return _double_backward(ctx, grad, _plain_bivariate_mixture)
        grads = _bivariate_mixture_fused_backward(
            grad, *ctx.saved_tensors, *ctx.needs_input_grad
        )
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad, strict=True))


def bivariate_normal_mixture_log_prob(
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    atanh_rho: Tensor,
    *,
    fused: bool = True,
) -> Tensor:
    r"""Log density of a mixture of correlated bivariate Gaussians (Graves 2013, sketch-rnn).

    .. math::
        \log p(x) = \operatorname{logsumexp}_k\big(\log\operatorname{softmax}(\ell)_k
            + \log\mathcal N(x \mid \mu_k, \sigma_k, \rho_k)\big),

    .. math::
        \log\mathcal N = -\log 2\pi - \log\sigma_1 - \log\sigma_2 + \log\cosh a - \tfrac12 Q,
        \qquad Q = \frac{z_1^2 - 2\rho z_1 z_2 + z_2^2}{1 - \rho^2}
          = \frac{z_1^2 + z_2^2}2 + \frac{(z_1 + z_2)^2 e^{-2a} + (z_1 - z_2)^2 e^{2a}}4,

    with :math:`z_i = (x_i - \mu_i)/\sigma_i`, :math:`\rho = \tanh a`,
    :math:`-\tfrac12\log(1-\rho^2) = \log\cosh a`. This is the pen-offset likelihood of
    Graves (2013) eqs. 23-26 and of sketch-rnn (Ha & Eck 2017, eqs. 1-2 and the
    reconstruction loss :math:`L_s`), in log space from unconstrained ``log_scale`` and
    ``atanh_rho``: no ``1 - rho^2`` (0 in float32 once ``tanh(a)`` rounds to 1, from
    ``|a|`` of about 9), no ``exp`` of the
    quadratic form, so far targets, tiny scales and saturated correlations give the exact
    finite value instead of ``inf``/NaN. Each component equals
    :func:`~probloss.functional.bivariate.bivariate_normal_log_prob`.

    Args:
        value: pen offsets :math:`x`, shape ``(*, 2)``.
        logits: mixture logits, shape ``(*, K)``, unnormalised.
        loc: means, shape ``(*, K, 2)``.
        log_scale: :math:`\log\sigma`, shape ``(*, K, 2)``, unconstrained.
        atanh_rho: :math:`a = \operatorname{atanh}\rho`, shape ``(*, K)``, unconstrained.
        fused: on CPU, use the fused kernel with a hand-written backward (the default),
            eager and inside ``torch.compile``. Any input is fine: where ``exp`` of
            ``log_scale`` would not be a normal float or the kernel's backward could
            overflow (``|atanh_rho|`` above 42 in float32, 352 in float64), the kernel
            evaluates the single density of ``bivariate_normal_log_prob`` per component,
            forward and backward; off the CPU and under ``torch.func`` transforms the plain
            path through ``bivariate_normal_log_prob`` is taken by itself, as it always is
            with ``fused=False``; both paths agree (module docstring). A double backward
            recomputes the gradients through the plain path.

    Returns:
        Tensor of shape ``(*)``, the broadcast batch shape (torch's broadcasting, as for
        every unreduced density); float32 for half-precision inputs.

    Raises:
        ValueError: ``value`` is not ``(*, 2)``, ``loc`` / ``log_scale`` not ``(*, K, 2)``,
            ``atanh_rho`` not ``(*, K)``, or the batch shapes do not broadcast.

    Example:
        >>> logits = torch.tensor([0.0, -1.0])
        >>> loc, log_scale = torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [-3.0, -3.0]])
        >>> atanh_rho = torch.tensor([0.5, 12.0])  # second: tanh(12) == 1 in float32
        >>> x = torch.tensor([[0.1, 0.1], [1e4, -1e4]])
        >>> bivariate_normal_mixture_log_prob(x, logits, loc, log_scale, atanh_rho)
        tensor([ 1.2139e+01, -1.8591e+08])

    References:
        Graves (2013), "Generating sequences with recurrent neural networks",
        arXiv:1308.0850, eqs. 23-26; Ha & Eck (2017), "A neural representation of sketch
        drawings", arXiv:1704.03477, sec. 3.
    """
    value, logits, loc, log_scale, atanh_rho = _bivariate_inputs(
        value, logits, loc, log_scale, atanh_rho
    )
    return _bivariate_mixture(value, logits, loc, log_scale, atanh_rho, fused)


def _bivariate_mixture(value, logits, loc, log_scale, atanh_rho, fused: bool) -> Tensor:
    """The fused kernel where it runs (:func:`_fused_runs`: CPU, eager or compiled), else
    the plain path."""
    if fused and _fused_runs(value, logits, loc, log_scale, atanh_rho):
        return _BivariateMixture.apply(value, logits, loc, log_scale, atanh_rho)[0]
    return _plain_bivariate_mixture(value, logits, loc, log_scale, atanh_rho)


def bivariate_normal_mixture_nll(
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    atanh_rho: Tensor,
    *,
    reduction: str = "mean",
    nan_policy: str = "raise",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Negative log-likelihood of a bivariate Gaussian mixture (the sketch-rnn offset loss).

    .. math::
        \ell_i = -\log p(x_i) \quad\text{(see :func:`bivariate_normal_mixture_log_prob`)}

    per event (a 2-d offset), with the fused kernel, then reduced: ``"mean"`` averages over
    events (not over the 2 coordinates), ``"sum"`` adds them, ``"none"`` returns them.
    sketch-rnn's :math:`L_s` divides the sum over a sequence by the maximum length
    :math:`N_{max}`: pass ``reduction="sum"`` and divide, or mask padding with NaN targets.
    No events: ``"mean"`` NaN, ``"sum"`` 0, like torch. As in :func:`normal_mixture_nll`,
    a parameter whose batch shape would enlarge that of ``value`` is a ValueError unless
    ``reduction="none"``.

    Args:
        value, logits, loc, log_scale, atanh_rho: as in
            :func:`bivariate_normal_mixture_log_prob`.
        reduction: ``"mean"`` (over events), ``"sum"`` or ``"none"``.
        nan_policy: ``"raise"`` or ``"mask"`` (events with a NaN coordinate get loss 0,
            are not counted by ``"mean"`` and have gradient exactly 0), as in
            :func:`normal_mixture_nll`.
        validate_args: check ``value`` for NaN under ``"raise"``; ``None``: CPU only.

    Returns:
        A scalar for ``"mean"`` / ``"sum"``, else shape ``(*)``; float32 for half inputs.

    Raises:
        ValueError: bad ``reduction`` / ``nan_policy``, shapes, a parameter that would
            enlarge the batch shape of ``value`` (reduced losses), or NaN under
            ``"raise"``.

    Example:
        >>> x = torch.tensor([[0.5, 0.4], [float("nan"), 0.0]])
        >>> logits, loc, log_scale = torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2)
        >>> bivariate_normal_mixture_nll(x, logits, loc, log_scale, torch.tensor([1.0]),
        ...                              nan_policy="mask", reduction="none")
        tensor([1.5295, 0.0000])
    """
    inputs = {
        "value": value,
        "logits": logits,
        "loc": loc,
        "log_scale": log_scale,
        "atanh_rho": atanh_rho,
    }
    return _mixture_nll(
        _bivariate_mixture,
        _bivariate_inputs,
        " (event dimension 2 last)",
        inputs,
        reduction,
        nan_policy,
        validate_args,
    )
