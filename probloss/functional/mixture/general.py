r"""The log density of any mixture from its component log densities: :func:`mixture_log_prob`.

Weights as ``logits`` go through ``log_softmax`` and :func:`~probloss.special.logsumexp`'s
kernel; weights as ``probs`` (exact zeros allowed) through :class:`_ProbsMixture`, whose
gradient is finite at a zero weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._core.dtype import as_loss_tensors
from ..._core.ops import kernel_op
from ..._core.validation import check_in_interval, should_validate
from ...special.exp import expm1, mul_exp
from ...special.logsumexp import _finite_shift, _LogSumExp
from ._inputs import _broadcast_batch, _grad_to

__all__ = [
    "mixture_log_prob",
]


def mixture_log_prob(
    component_log_prob: Tensor,
    logits: Tensor | None = None,
    *,
    probs: Tensor | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of a mixture from its component log densities and logits (or probs).

    .. math::
        \log p(x) = \operatorname{logsumexp}_k\big(\log\operatorname{softmax}(\ell)_k
            + \log p_k(x)\big)
          = \log \sum_k w_k p_k(x) - \log \sum_k w_k

    The weights are given by exactly one of ``logits`` :math:`\ell` (need not be
    normalised: they are, by ``log_softmax``) or ``probs`` :math:`w \ge 0` (need not sum
    to 1: they are divided by their sum, like ``torch.distributions.Categorical``). The
    result is finite wherever one weighted component is, however small the densities
    (no ``exp`` of a log density is ever formed). Gradients: the responsibilities
    :math:`r_k = \pi_k p_k / p` with respect to :math:`\log p_k` (summing to 1 up to
    rounding, also at ties of huge terms), :math:`r_k - \pi_k` with respect to
    :math:`\ell_k`, and

    .. math::
        \frac{\partial \log p}{\partial w_k} = \frac{p_k(x)}{\sum_j w_j p_j(x)}
            - \frac1{\sum_j w_j}

    with respect to ``probs``: finite also at :math:`w_k = 0` (where ``log(probs)``
    passed as logits has gradient ``0 * inf = NaN``, numpyro issue 1870); it is ``inf``
    only where that ratio exceeds the float range.

    Edge cases, each finite in value and gradient (``torch.logsumexp`` gives NaN
    gradients in the last one):

    * a logit of ``-inf`` or a prob of 0 is a zero-weight component: responsibility 0;
    * a component log density of ``-inf`` (a point outside its support): likewise;
    * a row whose terms are *all* ``-inf``: value ``-inf`` and gradient exactly 0 with
      respect to every input of the row.

    Rows of logits that are all ``-inf`` (no mixture at all) or contain ``+inf`` give NaN;
    so do rows of probs that are all 0 (rejected when validating).

    Args:
        component_log_prob: :math:`\log p_k(x)`, shape ``(*, K)``.
        logits: mixture logits :math:`\ell`, shape ``(*, K)``.
        probs: keyword alternative to ``logits``: non-negative mixture weights :math:`w`,
            shape ``(*, K)``. Batch dimensions of either broadcast with those of
            ``component_log_prob`` (torch's broadcasting: this is an unreduced density).
        validate_args: check that ``probs`` is finite, non-negative and not all 0 in a
            row; ``None`` checks CPU tensors only.

    Returns:
        Tensor of shape ``(*)``, one value per event; float32 for half-precision inputs.

    Raises:
        ValueError: not exactly one of ``logits`` / ``probs``; the last dimensions differ
            or are 0, or the batch shapes do not broadcast; invalid ``probs`` (when
            validating).

    Example:
        >>> logits = torch.tensor([0.0, 0.0, -float("inf")])  # third component: weight 0
        >>> lp = torch.tensor([[-1.0, -3.0, 5.0], [-float("inf")] * 3], requires_grad=True)
        >>> out = mixture_log_prob(lp, logits)
        >>> out
        tensor([-1.5662,    -inf], grad_fn=<_LogSumExpBackward>)
        >>> out.sum().backward()
        >>> lp.grad  # responsibilities; an impossible row gets 0, not NaN
        tensor([[0.8808, 0.1192, 0.0000],
                [0.0000, 0.0000, 0.0000]])
        >>> probs = torch.tensor([0.5, 0.5, 0.0], requires_grad=True)
        >>> mixture_log_prob(lp.detach()[0], probs=probs).backward()
        >>> probs.grad  # p_k / p - 1: finite at the zero weight
        tensor([  0.7616,  -0.7616, 709.6779])

    References:
        Bishop (1994), "Mixture density networks", Aston University NCRG/94/004, eqs. 22-23
        (the negative log of the mixture as the error function), 34-37 (its gradients
        through the posterior weights).
    """
    weights_name, weights = _one_weight_form(logits, probs)
    component_log_prob, weights = as_loss_tensors(
        component_log_prob=component_log_prob, **{weights_name: weights}
    )
    if component_log_prob.dim() == 0 or weights.dim() == 0:
        raise ValueError(
            f"component_log_prob and {weights_name} must have shape (*, K); got "
            f"{tuple(component_log_prob.shape)} and {tuple(weights.shape)}"
        )
    k = weights.shape[-1]
    if component_log_prob.shape[-1] != k or k == 0:
        raise ValueError(
            f"component_log_prob (*, K) and {weights_name} (*, K) must have the same K >= 1; "
            f"got component_log_prob {tuple(component_log_prob.shape)} and {weights_name} "
            f"{tuple(weights.shape)}"
        )
    _broadcast_batch(
        {"component_log_prob": component_log_prob.shape[:-1], weights_name: weights.shape[:-1]}
    )
    if weights_name == "probs":
        if should_validate(validate_args, weights):
            _check_probs(weights)
        return _ProbsMixture.apply(component_log_prob, weights)
    return _LogSumExp.apply(torch.log_softmax(weights, -1) + component_log_prob)


def _one_weight_form(logits: Tensor | None, probs: Tensor | None) -> tuple[str, Tensor]:
    """``("logits", logits)`` or ``("probs", probs)``: exactly one must be given."""
    if (logits is None) == (probs is None):
        got = "both" if logits is not None else "neither"
        raise ValueError(f"pass exactly one of logits, probs (the mixture weights); got {got}")
    return ("logits", logits) if probs is None else ("probs", probs)


def _check_probs(probs: Tensor) -> None:
    """ValueError unless ``probs`` is finite, non-negative and has a positive sum per row."""
    check_in_interval(probs, "probs", 0.0, torch.finfo(probs.dtype).max)
    empty = ~(probs.sum(-1) > 0.0)
    if empty.any():
        raise ValueError(
            f"probs of shape {tuple(probs.shape)} must have a positive sum over the last "
            f"dimension (K); {int(empty.sum())} row(s) are all 0"
        )


def _probs_mixture(lp: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p, r, dlog p/dprobs)`` of :func:`mixture_log_prob` from ``probs``, differentiable.

    Shifted by ``c``, the largest weighted term ``lp_k + log w_k`` (detached),
    ``D = sum_k w_k e^{lp_k - c}`` lies in ``[1, K]`` up to rounding (no overflow, no
    underflow; each term by :func:`~probloss.special.mul_exp`, exact also where ``e^{lp_k - c}``
    alone would overflow or be subnormal) and::

        log p = c + log D - log sum w,   r_k = w_k e^{lp_k - c} / D,
        dlog p/dw_k = e^{lp_k - c - log D} - 1 / sum w = expm1(t_k) / sum w

    (the last from ``lp_k - c`` directly, not from ``r_k / w_k``: exact at ``w_k = 0``; it
    overflows only where ``p_k / p`` does). Shifting by the largest ``lp_k`` instead fails
    where that component's weight is tiny: the other terms underflow (the fuzz found
    gradients of 8e6 for -1.2e-7). Zero-weight components enter through the double-where
    pattern.
    """
    positive = probs > 0.0
    log_w = torch.log(torch.where(positive, probs, 1.0))
    weighted = torch.where(positive, lp + log_w, -math.inf)
    c = _finite_shift(weighted.detach().amax(-1, keepdim=True))
    pe = torch.where(positive, mul_exp(probs, torch.where(positive, lp, c) - c), 0.0)
    d = pe.sum(-1, keepdim=True)
    s = probs.sum(-1, keepdim=True)
    alive = d > 0.0  # False in an impossible row: value -inf, gradient 0 (double-where)
    safe_d = torch.where(alive, d, 1.0)
    value = (c + torch.log(d) - torch.log(s)).squeeze(-1)
    r = pe / safe_d
    # dlog p/dw_k = (e^t - 1) / sum w with t = lp_k - c - log D + log sum w, as expm1 and
    # mul_exp: no inf - inf where both terms exceed the float range (tiny weights)
    log_s = torch.log(s)
    t = torch.where(alive, lp - c - torch.log(safe_d) + log_s, -math.inf)
    big = t > 1.0  # there e^t overflows before the division: (1 - e^-t) e^{t - log sum w}
    small_t, big_t = torch.where(big, 0.0, t), torch.where(big, t, 1.0)  # double where
    d_probs = torch.where(
        big, mul_exp(-expm1(-big_t), big_t - log_s), mul_exp(expm1(small_t), -log_s)
    )
    return value, r, d_probs


def _probs_mixture_fake(lp: Tensor, probs: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(lp.shape[:-1], probs.shape[:-1])
    return lp.new_empty(shape, dtype=torch.promote_types(lp.dtype, probs.dtype))


@kernel_op("probs_mixture", event_dims=(1, 1), fake=_probs_mixture_fake)
def _probs_mixture_value(lp: Tensor, probs: Tensor) -> Tensor:
    """The forward of :class:`_ProbsMixture`: ``log p`` of :func:`_probs_mixture`."""
    return _probs_mixture(lp, probs)[0]


class _ProbsMixture(torch.autograd.Function):
    """:func:`mixture_log_prob` from ``probs``, with the gradient of :func:`_probs_mixture`.

    Autograd through ``log(probs)`` would give ``r_k / w_k = 0 / 0`` at a zero weight; the
    backward here is built from the saved inputs with differentiable ops (so a double
    backward works), and is exactly 0 in rows whose value is ``-inf``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(lp: Tensor, probs: Tensor) -> Tensor:
        return _probs_mixture_value(lp, probs)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        lp, probs = ctx.saved_tensors
        value, r, d_probs = _probs_mixture(lp, probs)
        g = torch.where(value == -math.inf, 0.0, grad).unsqueeze(-1)
        need_lp, need_probs = ctx.needs_input_grad
        d_lp = g * r if need_lp else None  # r in [0, 1]
        # d_probs is inf where p_k / p exceeds the float range: 0, not NaN, where g = 0
        d_w = torch.where(g == 0.0, 0.0, g * d_probs) if need_probs else None
        return _grad_to(d_lp, lp, need_lp), _grad_to(d_w, probs, need_probs)
