r"""Log-sum-exp whose gradient stays finite where a row is all ``-inf``.

:func:`logsumexp` is the reduction every log-space mixture ends in
(:func:`~probloss.functional.mixture_log_prob` and the Gaussian mixtures call the same
kernel). ``torch.logsumexp`` back-propagates ``exp(x - result)``: ``exp(-inf + inf) = NaN``
in a row whose terms are all ``-inf`` (a target no component can produce), and at ties of
huge terms (``(-1e8, -1e8)`` in float32, where the result rounds away ``log 2``) its
weights do not sum to 1. Here the gradient is the softmax normalised by its own sum.

The private helpers (:func:`_exp_nonpositive`, :func:`_softmax`, :func:`_row_softmax_`)
are the same arithmetic for the mixtures' fused kernels, which use them in place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.dtype import as_float_tensor, upcast
from .._core.ops import kernel_op

__all__ = ["logsumexp"]


def _finite_shift(m: Tensor) -> Tensor:
    """The row maximum as a shift, 0 where it is infinite or NaN (nothing to shift by)."""
    return torch.where(torch.isfinite(m), m, 0.0)


def _exp_floor(dtype: torch.dtype) -> float:
    """``floor(log(tiny)) + 2`` (-86 in float32, -707 in float64): ``exp`` of it is normal."""
    return math.floor(math.log(torch.finfo(dtype).tiny)) + 2.0


def _exp_nonpositive(x: Tensor, *, inplace: bool = False) -> Tensor:
    """``exp(x)`` for shifted log weights ``x <= 0``, flushed to 0 up to ``2 exp(floor)``.

    torch's vectorised CPU ``exp`` takes a much slower scalar path for every
    input whose result is subnormal or 0 (below ``log(tiny)``, ``-inf`` included), and
    far-away mixture components put many such inputs in every batch. So the input is
    clamped at ``floor`` (:func:`_exp_floor`), where ``exp`` is a normal number, and
    ``2 exp(floor)`` is subtracted with a floor at 0: clamped entries (``-inf`` ones
    included) become exactly 0, the others change by at most ``2 exp(floor)`` = ``9e-38``
    (float32) / ``1.8e-307`` (float64) in absolute terms, far below the rounding of any
    responsibility that matters next to the row's largest, which is 1.
    """
    floor = _exp_floor(x.dtype)
    cut = 2.0 * math.exp(floor)
    if inplace:
        return x.clamp_(min=floor).exp_().sub_(cut).clamp_(min=0.0)
    return (torch.exp(x.clamp(min=floor)) - cut).clamp(min=0.0)


def _drop_last(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1])


@kernel_op("logsumexp_last", event_dims=(1,), fake=_drop_last)
def _logsumexp_last(x: Tensor) -> Tensor:
    """The forward of :class:`_LogSumExp` over the last dimension (non-empty)."""
    m = _finite_shift(x.amax(-1, keepdim=True))
    out = _exp_nonpositive(x - m, inplace=True).sum(-1, keepdim=True)
    return out.log_().add_(m).squeeze(-1)


class _LogSumExp(torch.autograd.Function):
    """``logsumexp`` over the last dimension whose gradient is finite for ``-inf`` rows.

    Forward: ``m + log(sum(exp(x - m)))`` with ``m`` the row maximum, or 0 where that is
    infinite: a row of ``-inf`` gives ``log(0) = -inf`` (torch's shift by ``-inf`` would
    form ``-inf - -inf``). Backward: ``g softmax(x)`` (:func:`_softmax`), normalised by its
    own sum rather than formed as ``exp(x - lse)``, so the weights of a row sum to 1 even
    where ``lse`` rounds away ``log K`` (ties of terms near ``-1e8`` in float32); a row of
    ``-inf`` gets gradient exactly 0 (torch's is ``exp(-inf + inf) = NaN``). Both ``exp``
    are :func:`_exp_nonpositive` (fast, flushed below ``exp(floor)``). The backward is built
    from the saved input with differentiable ops, so it is differentiable again.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _logsumexp_last(x)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * _softmax(x)


def _softmax(x: Tensor) -> Tensor:
    """``softmax(x)`` over the last dimension, differentiable; rows of ``-inf`` give 0.

    Normalised by the sum of the shifted exponentials, so a row sums to 1 up to rounding
    whatever its magnitude: ``exp(x - logsumexp(x))`` does not (at ``x = (-1e8, -1e8)`` in
    float32 ``logsumexp`` rounds to ``-1e8`` and both entries are 1). The shift is the
    detached row maximum (softmax does not depend on it), the exponentials
    :func:`_exp_nonpositive`; the largest is 1, so the sum is 0 only in a ``-inf`` row,
    which the double-where turns into 0 instead of ``0 / 0``.
    """
    m = _finite_shift(x.detach().amax(-1, keepdim=True))
    e = _exp_nonpositive(x - m)
    s = e.sum(-1, keepdim=True)
    return e / torch.where(s > 0.0, s, 1.0)


def _row_softmax_(j: Tensor) -> Tensor:
    """In place ``j <- softmax(j)`` over the last dimension; returns ``logsumexp(j)``.

    Rows of ``-inf`` become 0 (not ``0/0``) and their log-sum-exp ``-inf``. No graph.
    """
    m = _finite_shift(j.amax(-1, keepdim=True))
    s = _exp_nonpositive(j.sub_(m), inplace=True).sum(-1, keepdim=True)
    lse = torch.log(s).add_(m).squeeze(-1)
    j.mul_(torch.where(s > 0.0, s.reciprocal(), 0.0))  # a -inf row: 0 * 0, not 0 * inf
    return lse


def logsumexp(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    r"""``log(sum(exp(x)))`` over ``dim``; a row of ``-inf`` gives ``-inf`` with gradient 0,
    and tied terms split the gradient evenly.

    .. math::
        \operatorname{logsumexp}(x) = m + \log\sum_k e^{x_k - m}, \qquad
        \frac{\partial}{\partial x_k} = \operatorname{softmax}(x)_k
            = \frac{e^{x_k - m}}{\sum_j e^{x_j - m}},

    with ``m`` the row maximum (0 where it is infinite). The gradient is normalised by the
    sum of its own terms, not formed as ``exp(x - result)``: it sums to 1 up to rounding
    whatever the magnitude (``(-1e8, -1e8)`` in float32 gives ``(0.5, 0.5)``; torch's is
    ``(1, 1)``), and a row of ``-inf`` gets exactly 0 (torch's is NaN). Terms below
    ``2 exp(-86) = 9e-38`` (float32) / ``2 exp(-707) = 1.8e-307`` (float64) times the
    largest are flushed to 0 (torch's CPU ``exp`` is slow on results that are subnormal or
    0; they are below the rounding of the sum). A ``+inf`` term gives ``+inf`` (its
    gradient is NaN: ``inf / inf``). The backward is differentiable again. Accuracy: a few
    eps of ``|result| + K`` in absolute terms (the shifted sum, at least 1, is rounded; as
    in ``torch.logsumexp``, a result near 0 such as ``log(1 + e^{-40})`` is 0).

    Args:
        x: tensor of shape ``(*)``, any floating dtype.
        dim: the dimension summed over.
        keepdim: keep ``dim`` with size 1.

    Returns:
        ``x``'s shape without ``dim`` (or with size 1 there), in the dtype of ``x``
        (float16 / bfloat16 evaluated in float32, rounded once). A ``dim`` of size 0 gives
        ``-inf`` (the log of an empty sum).

    Example:
        >>> x = torch.tensor([[0.0, -1.0], [-float("inf"), -float("inf")]], requires_grad=True)
        >>> out = logsumexp(x)
        >>> out
        tensor([0.3133,   -inf], grad_fn=<_LogSumExpBackward>)
        >>> out.sum().backward()
        >>> x.grad  # the softmax; 0, not NaN, in the impossible row
        tensor([[0.7311, 0.2689],
                [0.0000, 0.0000]])
    """
    x = as_float_tensor(x, "x")
    xc = upcast(x)
    if xc.dim() == 0:  # one term (torch's convention for a scalar): shape ()
        return _LogSumExp.apply(xc.reshape(1)).to(x.dtype)
    last = xc.movedim(dim, -1)
    if last.shape[-1] == 0:
        out = torch.full(last.shape[:-1], -math.inf, dtype=xc.dtype, device=xc.device)
        out = out + last.sum(-1)  # keeps the graph: an empty gradient
    else:
        out = _LogSumExp.apply(last)
    if keepdim:
        out = out.unsqueeze(dim)
    return out.to(x.dtype)
