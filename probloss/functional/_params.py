"""Residual kernels of the location families: ``value - loc`` and ``(value - loc) / sigma``
kept finite where they are representable, and their broadcast-summed gradients.

(The scale-form resolver ``log_scale_from`` lives in :mod:`probloss._core.params`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.ops import host_readable
from ..special.exp import mul_exp


def split_residual(value: Tensor, loc: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, m)`` with ``value - loc = r m`` and ``r`` finite wherever both inputs are.

    ``value - loc`` of two finite numbers overflows when they are huge and of opposite signs
    (``3e38 - (-3e38)`` in float32), although ``z = (value - loc) / sigma`` may be finite for
    a large ``sigma``. There ``r = value/2 - loc/2`` (halving is exact above the subnormal
    range, where such numbers lie) and ``m = 2``; elsewhere ``r = value - loc``, ``m = 1``.
    Apply ``m`` last (``(r / sigma) m``): it overflows only where the result does. ``m``
    broadcasts against ``r`` (a 0-dim 1 where no difference overflowed, when the values
    can be read on the host: eager, on CPU).
    """
    r = value - loc
    if host_readable(r):
        if not bool(torch.isinf(r).any()):  # the common case, on CPU one reduction: m = 1
            return r, r.new_ones(())
    over = torch.isinf(r) & torch.isfinite(value) & torch.isfinite(loc)
    # double where: the halves are formed from 0 where not needed (no inf - inf anywhere)
    v_half, l_half = torch.where(over, value, 0.0), torch.where(over, loc, 0.0)
    factor = torch.where(over, 2.0, 1.0).to(r.dtype)
    return torch.where(over, 0.5 * v_half - 0.5 * l_half, r), factor


def standardized_residual(value: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """``z = (value - loc) e^{-log_scale}``, finite wherever it is representable, with
    gradients ``(g e^{-log_scale}, -g e^{-log_scale}, -g z)`` formed directly.

    The value is ``(r e^{-log_scale}) m`` (:func:`split_residual`, one :func:`mul_exp`).
    Autograd through that chain would form ``d/dr = g e^{-log_scale} m`` before the ``1/2``
    of the halving reaches ``value``: where ``value - loc`` overflows that intermediate is
    twice the result (``2 * 3.3e38 = inf`` in float32 where ``d/dvalue = -3.3e38``). Here
    ``d/dvalue`` is one :func:`mul_exp` of the incoming gradient, exact wherever it is
    representable (0 on the mean even where ``e^{-log_scale}`` overflows). Differentiable
    again (the backward is built from this function and :func:`mul_exp`).
    """
    return _StandardizedResidual.apply(value, loc, log_scale)


def standardized_value(value: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """The value of :func:`standardized_residual` without its autograd function, for code
    that records no graph (an autograd function's forward)."""
    r, m = split_residual(value, loc)
    return mul_exp(r, -log_scale) * m  # m applied last: overflows only where z does


def residual_for_backward(value: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """``z`` inside a backward: differentiable (:func:`standardized_residual`) when a graph
    of the backward is being built, else the plain value (entering an autograd function
    costs about 10 us a call)."""
    if torch.is_grad_enabled():
        return standardized_residual(value, loc, log_scale)
    return standardized_value(value, loc, log_scale)


class _StandardizedResidual(torch.autograd.Function):
    """:func:`standardized_residual` with its backward written out."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        return standardized_value(value, loc, log_scale)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        value, loc, log_scale = ctx.saved_tensors
        grad_value = grad_loc = grad_log_scale = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # dz/dvalue = -dz/dloc = e^{-log_scale}: one mul_exp, no factor m in between
            d_value = mul_exp(grad, -log_scale)

            def log_abs(wide: torch.dtype) -> Tensor:
                return grad.to(wide).abs().log() - log_scale.to(wide)

            grad_value, grad_loc = summed_location_gradients(
                ctx.needs_input_grad, value, loc, d_value, grad.sign(), log_abs
            )
        if ctx.needs_input_grad[2]:
            z = residual_for_backward(value, loc, log_scale)  # recomputed
            grad_log_scale = (-(grad * z)).sum_to_size(log_scale.shape)
        return grad_value, grad_loc, grad_log_scale


def sum_to_size_rescaled(terms: Tensor, shape: torch.Size, sign: Tensor, log_abs) -> Tensor:
    """``terms.sum_to_size(shape)`` for ``terms = sign e^{log_abs}``, finite wherever the
    exact sum is.

    A gradient summed over broadcast entries (a value shared by a mixture's components)
    can be small while two of its terms overflow with opposite signs: ``inf - inf``
    (float32 components at ``loc = +-1.8e-30``, ``log_scale = -80``, value 0:
    ``d/dvalue`` NaN, exact 0). Where the plain sum is not finite it is formed again from
    the terms' log magnitudes, shifted by their largest ``S`` per output entry,
    ``sum = e^S sum_i sign_i e^{log_abs_i - S}`` (:func:`mul_exp` applies ``e^S``), in
    float64 (float32 on MPS): ``log_abs - S`` carries an absolute error ``~2 eps64 |S|``,
    below the rounding of a half or single precision result and, in float64, of the size
    of the error of ``e^{-log_scale}`` itself. ``log_abs(dtype)`` (broadcastable to
    ``terms``, ``-inf`` for a zero term) is evaluated only then: on CPU (not compiling)
    only when some sum needs it (values readable on the host, :func:`host_readable`),
    elsewhere always (branch-free). The rescued entries are
    constants to a further derivative (``create_graph=True``).
    """
    total = terms.sum_to_size(shape)
    if tuple(shape) == tuple(terms.shape):
        return total  # nothing summed
    bad = ~torch.isfinite(total)
    if host_readable(bad) and not bool(bad.any()):
        return total
    lead = terms.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and terms.shape[lead + i] != 1
    )
    wide = torch.float32 if terms.device.type == "mps" else torch.float64  # no float64 on MPS
    u = torch.broadcast_to(log_abs(wide), terms.shape).detach()
    s = u.amax(dims, keepdim=True)
    s = torch.where(torch.isfinite(s), s, 0.0)  # all terms 0 (or an inf term): no shift
    signed = torch.broadcast_to(sign, terms.shape).to(wide)
    shifted = (signed * torch.exp(u - s)).sum(dims, keepdim=True)
    rescued = mul_exp(shifted, s).reshape(shape).to(terms.dtype)
    return torch.where(bad, rescued, total)


def summed_location_gradients(needs, value, loc, d_value, sign, log_abs) -> tuple:
    """``(d/dvalue, d/dloc)`` of a location family, ``None`` where ``needs[0]`` /
    ``needs[1]`` is false, from the broadcast entries ``d_value = sign e^{log_abs}``
    (``d/dloc = -d/dvalue``), each summed by :func:`sum_to_size_rescaled`."""
    grad_value = grad_loc = None
    if needs[0]:
        grad_value = sum_to_size_rescaled(d_value, value.shape, sign, log_abs)
    if needs[1]:
        grad_loc = sum_to_size_rescaled(-d_value, loc.shape, -sign, log_abs)
    return grad_value, grad_loc
