r"""Mixture log densities and NLLs for mixture density networks, in log space.

A mixture density network (Bishop 1994) predicts, per input, mixture ``logits``
:math:`\ell_k` and the parameters of :math:`K` components; its loss is the negative log of

.. math::
    p(x) = \sum_{k=1}^K \pi_k\, p_k(x), \qquad \pi = \operatorname{softmax}(\ell).

The tutorial form multiplies per-dimension densities and takes the log of the weighted sum:
as soon as a target is 14.4 scales from every mean in float32 (38.6 in float64; one
dimension, unit scales), every :math:`p_k(x)` underflows to 0 and the loss is ``inf``
(its gradient NaN). Here everything stays in log space:

.. math::
    \log p(x) = \operatorname{logsumexp}_k\big(\log\operatorname{softmax}(\ell)_k
        + \log p_k(x)\big),

finite wherever one term is (residuals of ``1e6`` scales give ``-5e11``, not ``-inf``), and
its gradients are the *responsibilities* (posterior component weights)
:math:`r_k = \pi_k p_k(x) / p(x)`, the softmax of the joint terms:

.. math::
    \frac{\partial \log p}{\partial \log p_k} = r_k, \qquad
    \frac{\partial \log p}{\partial \ell_k} = r_k - \pi_k .

``torch.logsumexp`` back-propagates ``exp(x - result)``, which is ``exp(-inf + inf) = NaN``
when every term of a row is ``-inf`` (a target no component can produce, e.g. beyond the
float range, or zero-weight components only). Here such a row has value ``-inf`` and
gradient exactly 0 (:func:`mixture_log_prob`), and zero-weight components (``-inf``
logits) or components with ``-inf`` log density get responsibility 0 without NaN.

Functions (value first, one value per event, unreduced; batch dimensions broadcast like
torch, every target against every mixture if the shapes say so):

* :func:`mixture_log_prob`: any mixture, from component log densities ``(*, K)``;
* :func:`normal_mixture_log_prob`: diagonal Gaussian components (Bishop 1994);
* :func:`bivariate_normal_mixture_log_prob`: correlated bivariate Gaussians, the offset
  likelihood of handwriting and sketch models (Graves 2013, arXiv:1308.0850, eqs. 23-26;
  Ha & Eck 2017, sketch-rnn, arXiv:1704.03477);
* :func:`multivariate_normal_mixture_log_prob`: full covariances from ``scale_tril``;
* :func:`normal_mixture_nll`, :func:`bivariate_normal_mixture_nll`: the reduced losses,
  with NaN-target masking; reduced, they refuse a parameter that would enlarge the
  targets' batch shape (``out[:, 4:5]`` for ``out[:, 4]``), a silently wrong average.

A batch of no events gives an empty result (and an empty gradient) everywhere.

Weights: the Gaussian mixtures take ``logits``, the unconstrained output of a network.
Weights known as probabilities, possibly with exact zeros, go to :func:`mixture_log_prob`
as ``probs=`` (with component log densities from e.g.
:func:`~probloss.functional.normal.normal_log_prob`), whose gradient stays finite at a
zero weight; ``log(probs)`` passed as logits would give ``0 * inf = NaN`` there.

Fused kernels. With ``fused=True`` (the default) the diagonal and bivariate mixtures run a
``torch.autograd.Function`` whose backward is written by hand from the responsibilities.
Besides its inputs it keeps for the backward only the standardised residuals ``(*, K, D)``,
the responsibilities and the mixture weights ``(*, K)`` and the value ``(*)``, works in
place on as few fresh buffers as possible and handles the small event dimension one
coordinate plane at a time (torch's CPU loops over a broadcast innermost dimension of size
2 run 2 elements per call); ``benchmarks/bench_mixture.py`` measures its speed and peak
memory against the plain path. ``fused=False`` is the plain autograd composition of the
component log density and :func:`mixture_log_prob`. Both agree to the rounding of the terms
involved (tested: within ``1e-5`` (float32) / ``1e-12`` (float64) times the sum of the
magnitudes of the terms, in value and every gradient). The fused kernels run on CPU where
``exp`` of ``log_scale`` is a normal float and, for the bivariate one, ``|atanh_rho|`` is
below 42.3 (float32) / 352.8 (float64), where its backward cannot overflow (one ``aminmax``
pass each decides); elsewhere, off the CPU and while compiling, the plain path runs by
itself, so no input is out of bounds. A component whose residual or quadratic form
overflows (``1e6`` at ``log_scale = -80`` in float32) has term ``-inf`` and gradient
exactly 0 in both paths. The fused backward is not itself differentiated: a double backward
(``create_graph=True``, Hessians, ``gradgradcheck``) recomputes the gradients through the
plain path, so it is exact but not fast.

Responsibilities below ``2 exp(-86) = 9e-38`` (float32) / ``2 exp(-707) = 1.8e-307``
(float64) times the largest are flushed to exactly 0, and the others shifted by at most
that in absolute terms, in both paths (tested): torch's CPU ``exp`` takes a slow scalar
path on inputs whose result is subnormal or 0, which far-away components produce in every
batch.

Dtypes: float16 / bfloat16 inputs are computed and returned in float32 (DESIGN.md, half
precision policy); float32 and float64 stay as they are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._dtype import as_loss_tensors
from .._validation import check_in_interval, check_not_nan, should_validate
from ._params import split_residual, sum_to_size_rescaled
from ._reduction import check_reduction, check_value_batch, reduce_loss
from .bivariate import bivariate_normal_log_prob
from .multivariate import multivariate_normal_log_prob
from .normal import _HALF_LOG_2PI, normal_log_prob  # the same constant: bitwise-equal terms

__all__ = [
    "bivariate_normal_mixture_log_prob",
    "bivariate_normal_mixture_nll",
    "mixture_log_prob",
    "multivariate_normal_mixture_log_prob",
    "normal_mixture_log_prob",
    "normal_mixture_nll",
]

_LOG_2PI = math.log(2.0 * math.pi)
_LN2 = math.log(2.0)
_NAN_POLICIES = ("raise", "mask")
# Event sizes up to this are handled one (*, K) coordinate plane at a time; larger ones with
# broadcasting ops over the whole (*, K, D) block, whose innermost loop is then long enough.
_PLANAR_MAX_D = 4


# ======================================================================================
# Log-sum-exp with a finite gradient
# ======================================================================================


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

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        m = _finite_shift(x.amax(-1, keepdim=True))
        out = _exp_nonpositive(x - m, inplace=True).sum(-1, keepdim=True)
        out = out.log_().add_(m).squeeze(-1)
        ctx.save_for_backward(x)
        return out

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


# ======================================================================================
# Shape checks
# ======================================================================================


def _shape_error(name: str, t: Tensor, expected: str, detail: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected} ({detail}); got {tuple(t.shape)}")


def _mixture_shapes(
    value: Tensor, logits: Tensor, components: dict[str, Tensor], event: int | None
) -> tuple[int, int, torch.Size]:
    """Check ``value (*, D)``, ``logits (*, K)`` and ``(*, K, D)`` component parameters.

    Returns ``(K, D, batch)`` with ``batch`` the broadcast ``(*)``. ``event`` fixes ``D``.
    """
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise _shape_error("logits", logits, "(*, K)", "K >= 1 mixture components")
    k = logits.shape[-1]
    if value.dim() == 0 or (event is not None and value.shape[-1] != event):
        size = "D" if event is None else str(event)
        raise _shape_error("value", value, f"(*, {size})", "the event in the last dimension")
    d = value.shape[-1]
    for name, t in components.items():
        if t.dim() < 2 or t.shape[-2:] != (k, d):
            raise _shape_error(
                name,
                t,
                f"(*, K, D) = (*, {k}, {d})",
                f"K = {k} from logits {tuple(logits.shape)}, D = {d} from value "
                f"{tuple(value.shape)}",
            )
    batches = {"value": value.shape[:-1], "logits": logits.shape[:-1]}
    batches.update({name: t.shape[:-2] for name, t in components.items()})
    return k, d, _broadcast_batch(batches)


def _broadcast_batch(batches: dict[str, torch.Size], extra: str = "") -> torch.Size:
    try:
        return torch.broadcast_shapes(*batches.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {tuple(s)}" for name, s in batches.items())
        raise ValueError(f"batch shapes (*) do not broadcast: {listed}{extra}") from None


def _check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(f"nan_policy must be 'raise' or 'mask', got {nan_policy!r}")


def _grad_to(grad: Tensor | None, t: Tensor, needed: bool) -> Tensor | None:
    """``grad`` summed over broadcast dimensions to the shape of input ``t``, if needed."""
    return grad.sum_to_size(t.shape) if needed and grad is not None else None


# ======================================================================================
# General mixture
# ======================================================================================


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

    Shifted by ``c``, the largest ``lp_k`` among components of positive weight (detached),
    ``D = sum_k w_k e^{lp_k - c}`` lies in ``[w_{k*}, sum w]`` (no overflow, no underflow to
    0 unless the row is impossible) and::

        log p = c + log D - log sum w,   r_k = w_k e^{lp_k - c} / D,
        dlog p/dw_k = e^{lp_k - c - log D} - 1 / sum w

    (the last from ``lp_k - c`` directly, not from ``r_k / w_k``: exact at ``w_k = 0``, and
    ``lp_k - c`` is 0 exactly at ties, where a shift by the rounded ``log p`` is not).
    Zero-weight components enter the sums through the double-where pattern.
    """
    positive = probs > 0.0
    masked = torch.where(positive, lp, -math.inf)
    c = _finite_shift(masked.detach().amax(-1, keepdim=True))
    e = torch.where(positive, _exp_nonpositive(torch.where(positive, lp, c) - c), 0.0)
    pe = probs * e
    d = pe.sum(-1, keepdim=True)
    s = probs.sum(-1, keepdim=True)
    alive = d > 0.0  # False in an impossible row: value -inf, gradient 0 (double-where)
    safe_d = torch.where(alive, d, 1.0)
    value = (c + torch.log(d) - torch.log(s)).squeeze(-1)
    r = pe / safe_d
    d_probs = torch.where(alive, torch.exp(lp - c - torch.log(safe_d)), 0.0) - 1.0 / s
    return value, r, d_probs


class _ProbsMixture(torch.autograd.Function):
    """:func:`mixture_log_prob` from ``probs``, with the gradient of :func:`_probs_mixture`.

    Autograd through ``log(probs)`` would give ``r_k / w_k = 0 / 0`` at a zero weight; the
    backward here is built from the saved inputs with differentiable ops (so a double
    backward works), and is exactly 0 in rows whose value is ``-inf``.
    """

    @staticmethod
    def forward(ctx, lp: Tensor, probs: Tensor) -> Tensor:
        ctx.save_for_backward(lp, probs)
        return _probs_mixture(lp, probs)[0]

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


# ======================================================================================
# Diagonal normal mixture
# ======================================================================================


def _residuals(value: Tensor, loc: Tensor, shape: torch.Size) -> Tensor:
    """``value[..., None, :] - loc`` as a new contiguous tensor of shape ``(*shape, D)``."""
    d = value.shape[-1]
    out = value.new_empty((*shape, d))
    if d <= _PLANAR_MAX_D:
        # One (*, K) plane per coordinate: 5-10x faster on CPU than the broadcast over K,
        # whose innermost dimension D = 2 would be looped over 2 elements at a time.
        for i in range(d):
            torch.sub(value[..., i, None].expand(shape), loc[..., i].expand(shape), out=out[..., i])
    else:
        torch.sub(value.unsqueeze(-2).expand(out.shape), loc.expand(out.shape), out=out)
    return out


def _planes_mul(z: Tensor, w: Tensor) -> Tensor:
    """``z * w[..., None]`` for ``z (*, K, D)`` and ``w (*, K)``, into a new tensor."""
    out = torch.empty_like(z)
    if z.shape[-1] <= _PLANAR_MAX_D:
        for i in range(z.shape[-1]):
            torch.mul(z[..., i], w, out=out[..., i])
    else:
        torch.mul(z, w.unsqueeze(-1), out=out)
    return out


def _planes_sub_(t: Tensor, w: Tensor) -> Tensor:
    """In place ``t -= w[..., None]`` for ``t (*, K, D)`` and ``w (*, K)``."""
    if t.shape[-1] <= _PLANAR_MAX_D:
        for i in range(t.shape[-1]):
            t[..., i].sub_(w)
        return t
    return t.sub_(w.unsqueeze(-1))


def _standardized(value: Tensor, loc: Tensor, log_scale: Tensor, shape: torch.Size) -> Tensor:
    """``z = (value - loc) e^{-log_scale}``, shape ``(*shape, D)``, new and contiguous.

    Bitwise the plain path's ``z`` (:func:`~probloss.functional._params.split_residual` and
    :func:`~probloss.special.mul_exp`, one multiplication by ``exp(-log_scale)`` in the fused
    domain): where two components' terms are within an ulp of each other, a different
    rounding of ``z`` (``r / exp(s)`` rounds ``exp(8.6e-17)`` to 1 in float64, ``exp(-8.6e-17)``
    is ``1 - 2^-53``) decides their responsibilities, so both paths round alike. A residual
    that overflowed (``value - loc`` of huge opposite numbers) is ``inf`` here and is
    recomputed by :func:`_rescue_overflowed_residuals_`.
    """
    z = _residuals(value, loc, shape)
    return z.mul_(torch.neg(log_scale).exp_())


def _rescue_overflowed_residuals_(z: Tensor, value: Tensor, loc: Tensor, log_scale: Tensor) -> bool:
    """In place ``z = ((value/2 - loc/2) e^{-log_scale}) 2`` where ``value - loc`` overflowed.

    ``3.4e38 - (-1.3e36)`` overflows float32 while ``z`` at ``log_scale = 85.8`` is 19: the
    component's term is finite (``-345``, not ``-inf``). Halving is exact in the range
    where a difference can overflow; the factor 2 is applied last, so ``z`` overflows only
    where it is beyond the float range: :func:`~probloss.functional._params.split_residual`,
    as in the plain path (bitwise). Returns
    whether any entry was recomputed. Called only where some ``z`` is infinite or some
    term ``-inf`` (one host read of a reduction: the fused kernels run on CPU only).
    """
    r, m = split_residual(value.unsqueeze(-2), loc)
    over = m != 1  # m = 2 exactly where a difference of finite numbers overflowed
    if not bool(over.any()):
        return False
    z.copy_(torch.where(over, (r * torch.exp(-log_scale)) * m, z))
    return True


def _joint_init(logits: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """``(log_softmax(logits), softmax(logits))``, the first as a new tensor of the full
    ``(*, K)`` shape to add into, the second (the weights, for the backward) as ``logits``."""
    j = torch.log_softmax(logits, -1)
    weights = torch.exp(j)  # one pass; a second softmax kernel in the backward costs 3
    return (j if j.shape == shape else j.expand(shape).clone()), weights


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
    q.mul_(z).sub_(log_scale).sub_(_HALF_LOG_2PI)
    d = z.shape[-1]
    if d > _PLANAR_MAX_D:
        lp = q.sum(-1)
    else:
        lp = q[..., 0].clone() if d == 1 else torch.add(q[..., 0], q[..., 1])
        for i in range(2, d):
            lp.add_(q[..., i])
    return lp.add_(log_w)


def _any_dead(j: Tensor) -> bool:
    """Whether some joint term is ``-inf`` (or NaN): one ``amin`` pass, read on the host
    (the fused kernels run on CPU only, never while tracing). False in the common case."""
    return j.numel() > 0 and not bool(j.amin() > -math.inf)


def _clear_dead_(z: Tensor, j: Tensor, known_dead: bool | None = None) -> None:
    """In place ``z = 0`` for the components whose joint term ``j`` is ``-inf``.

    Such a component (a zero weight, or a quadratic form beyond the float range: a
    residual of ``1e6`` at ``log_scale = -80`` in float32) has responsibility exactly 0 and
    so an exactly zero gradient; but its ``z`` may be infinite, or huge enough that a
    backward factor (``z1 - z2``) overflows, and ``0 * inf`` is NaN. Its ``z`` is used only
    by the backward, where with ``w = 0`` any finite value gives the exact 0. The fill is
    skipped when no term is ``-inf`` (:func:`_any_dead`, unless ``known_dead`` says), the
    common case.
    """
    if not (_any_dead(j) if known_dead is None else known_dead):  # NaN: fill (stays NaN)
        return
    z.masked_fill_((j == -math.inf).unsqueeze(-1), 0.0)


def _logits_grad_(w: Tensor, weights: Tensor, g: Tensor) -> Tensor:
    """``d/dlogits = w - g pi``, in place into ``w`` (its last use)."""
    return w.addcmul_(weights, g, value=-1.0)


def _plain_normal_mixture(value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """The plain autograd path: component log densities, summed over D, then the mixture."""

    def components(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        return normal_log_prob(x, loc, log_scale=log_scale).sum(-1)

    lp = _without_dead_components(components, value, loc, (log_scale, 0.0, 1))
    return mixture_log_prob(lp, logits)


def _without_dead_components(
    components, value: Tensor, loc: Tensor, *params: tuple[Tensor, float | Tensor, int]
) -> Tensor:
    """Component log densities ``(*, K)`` whose ``-inf`` entries carry an exactly zero gradient.

    ``components(x, loc, *tensors)`` evaluates them from targets ``x`` (``(*, 1, D)`` or
    ``(*, K, D)``), ``loc (*, K, D)`` and the other parameters; ``params`` are
    ``(tensor, safe value, event dimensions after K)``: ``(log_scale, 0.0, 1)``,
    ``(atanh_rho, 0.0, 0)``.

    A component whose quadratic form overflows (log density ``-inf``: a target infinitely
    many of its scales away, or at infinity) has responsibility 0, but autograd through its
    density multiplies that 0 by an infinite derivative (NaN). Such components are found
    after one evaluation and evaluated again at a safe point (the mean moved onto the
    target, the parameters' safe values: a residual of 0 at unit scale), with ``-inf`` put back as a
    constant: the double-where pattern, applied to a condition known only after
    evaluation. (At the mean alone, a residual of ``3e38`` in both coordinates still
    overflowed the bivariate ``z1 - z2`` at unit scale, and a target of ``inf`` gave
    ``inf - inf``: NaN.) On CPU, outside tracing, when no component is dead (one host read
    of a reduction, free there) the first evaluation is returned as it is.
    """
    x = value.unsqueeze(-2)
    tensors = [t for t, _, _ in params]
    if loc.device.type == "cpu" and not torch.compiler.is_compiling():
        first = components(x, loc, *tensors)
        dead = (first == -math.inf).detach()
        if not bool(dead.any()):
            return first
    else:  # no host read: always the second evaluation; the first needs no graph
        with torch.no_grad():
            dead = components(x, loc, *tensors) == -math.inf
    per_coordinate = dead.unsqueeze(-1)  # against (*, K, D)
    # The target keeps its shape (*, 1, D), so that its gradient is summed over K inside the
    # density's backward (sum_to_size_rescaled: finite where two components' terms overflow
    # with opposite signs), and a dead component is evaluated on its own target instead:
    # mean := target (detached), a residual of exactly 0. A row whose components are all
    # dead (a target at infinity) is -inf whatever its target: there the target is 0.
    x_safe = torch.where(dead.all(-1)[..., None, None], 0.0, x)
    safe = [x_safe, torch.where(per_coordinate, x_safe.detach(), loc)]
    for t, fill, event_dims in params:
        mask = dead[(..., *(None,) * event_dims)]
        safe.append(torch.where(mask, torch.as_tensor(fill, dtype=t.dtype, device=t.device), t))
    return torch.where(dead, -math.inf, components(*safe))


def _double_backward(ctx, grad: Tensor, plain) -> tuple[Tensor | None, ...]:
    """First derivatives recomputed through the plain path, differentiably (create_graph)."""
    inputs = ctx.saved_tensors[: len(ctx.needs_input_grad)]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad, strict=True) if need]
    with torch.enable_grad():
        out = plain(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


def _summed_value_gradient(d_loc: Tensor, a: Tensor, log_scale: Tensor) -> Tensor:
    """``d/dvalue = -sum_k d/dloc_k`` (*, D) of the fused kernels, ``d/dloc = a e^{-log_scale}``.

    Finite where two components' ``d/dloc`` overflow with opposite signs but their sum
    does not (:func:`sum_to_size_rescaled`): ``loc = +-1.8e-30``, ``log_scale = -80``,
    value 0 in float32 gave NaN, exact 0.
    """

    def log_abs(wide: torch.dtype) -> Tensor:
        return a.to(wide).abs().log() - log_scale.to(wide)

    shape = (*d_loc.shape[:-2], 1, d_loc.shape[-1])
    return sum_to_size_rescaled(-d_loc, shape, -a.sign(), log_abs).squeeze(-2)


class _NormalMixture(torch.autograd.Function):
    """Diagonal normal mixture log density with a hand-written backward.

    Forward: ``z = (x - mu) e^{-log sigma}`` (*, K, D); joint terms
    ``j_k = log_softmax(l)_k + sum_d log N_kd`` rounded as the plain path rounds them
    (:func:`_normal_terms`); ``log p = logsumexp(j)``, bitwise the plain path's value; ``j``
    is turned into the responsibilities ``r`` in place. Saved: the inputs
    (references), ``z``, ``r`` and the weights ``pi = softmax(l)``. With ``w = g r`` (``g``
    the incoming gradient, 0 in rows whose value is ``-inf``)::

        d/dlogits    = w - g pi             (in place into w, after its other uses)
        d/dloc       = w z / sigma          (= r (x - mu) / sigma^2)
        d/dlog_scale = w z^2 - w = (w z) z - w
        d/dvalue     = -sum_k d/dloc

    each formed with ``w`` multiplied in first, so that a component whose ``z^2/2``
    overflowed (``r = 0``) contributes exactly 0.
    """

    @staticmethod
    def forward(ctx, value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(
            (*value.shape[:-1], 1), logits.shape, loc.shape[:-1], log_scale.shape[:-1]
        )
        z = _residuals(value, loc, shape)
        inv_scale = torch.neg(log_scale).exp_()  # e^{-s}, bitwise the plain path's
        z.mul_(inv_scale)  # see _standardized
        log_w = torch.log_softmax(logits, -1)
        weights = torch.exp(log_w)  # one pass; a second softmax kernel in the backward costs 3
        # the buffer of e^{-s} is reused for the terms' (*, K, D) block when it has that shape
        j = _normal_terms(z, log_w, log_scale, inv_scale if inv_scale.shape == z.shape else None)
        del inv_scale
        dead = _any_dead(j)
        if dead and _rescue_overflowed_residuals_(z, value, loc, log_scale):
            j = _normal_terms(z, log_w, log_scale)  # rare: a value - loc that overflowed
        _clear_dead_(z, j, known_dead=dead)
        lse = _row_softmax_(j)  # j is now the responsibilities
        ctx.save_for_backward(value, logits, loc, log_scale, z, j, weights, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            return _double_backward(ctx, grad, _plain_normal_mixture)
        value, logits, loc, log_scale, z, resp, weights, lse = ctx.saved_tensors
        need_value, need_logits, need_loc, need_log_scale = ctx.needs_input_grad
        g = torch.where(lse == -math.inf, 0.0, grad).unsqueeze(-1)  # a -inf row: gradient 0
        w = resp * g
        d_value = d_logits = d_loc = d_log_scale = None
        if need_value or need_loc or need_log_scale:
            t = _planes_mul(z, w)  # w z
            if need_value or need_loc:
                scale = torch.exp(log_scale)
                if scale.shape == t.shape:  # reuse the fresh buffer: d/dloc = w z / sigma
                    d_loc = torch.div(t, scale, out=scale)
                else:
                    d_loc = t / scale
                if need_value:
                    d_value = _summed_value_gradient(d_loc, t, log_scale)
            if need_log_scale:
                d_log_scale = _planes_sub_(t.mul_(z), w)  # (w z) z - w
        if need_logits:
            d_logits = _logits_grad_(w, weights, g)
        return (
            _grad_to(d_value, value, need_value),
            _grad_to(d_logits, logits, need_logits),
            _grad_to(d_loc, loc, need_loc),
            _grad_to(d_log_scale, log_scale, need_log_scale),
        )


def _normal_inputs(value, logits, loc, log_scale) -> tuple[Tensor, ...]:
    value, logits, loc, log_scale = as_loss_tensors(
        value=value, logits=logits, loc=loc, log_scale=log_scale
    )
    _mixture_shapes(value, logits, {"loc": loc, "log_scale": log_scale}, None)
    return value, logits, loc, log_scale


def _in_fused_domain(log_scale: Tensor, atanh_rho: Tensor | None = None) -> bool:
    """Whether the fused kernels are exact here: on CPU, ``|log_scale|`` and ``|atanh_rho|``
    below the bounds of :func:`_fused_bounds`.

    The kernels take ``exp`` of ``log_scale``, which must be a normal float:
    ``|log_scale| < -log(tiny) - 1`` (86 in float32, 707 in float64). The bivariate
    backward forms ``A = w dQ/dz`` before dividing by the scale, with a factor
    ``M e^{|a|}`` where ``M^2 <= 8 Q`` is finite: ``A`` cannot overflow (where ``A / s``
    would not) while ``e^{|a|} sqrt(8 max) <= max / e``, i.e.
    ``|atanh_rho| < (log(max) - log 8) / 2 - 1`` (42.3 in float32, 352.8 in float64; at
    ``|a| = 64`` in float32 a finite ``d/dloc`` of 1e17 came out ``inf``). Nothing else
    limits them: a standardised residual or quadratic form beyond the float range makes its
    component's term ``-inf`` and its gradient exactly 0 (:func:`_clear_dead_`), which is
    exact, since its responsibility is below any float. One ``aminmax`` pass per tensor
    decides, free to read on CPU (the kernels read such reductions too: they run on CPU
    only). On an accelerator reading it would wait for the device, and while tracing
    (``torch.compile``) it would break the graph, so there the plain path (exact for every
    input) is always taken: the result never depends on which path runs.
    """
    if torch.compiler.is_compiling():
        return False
    checks = [(log_scale, _fused_bounds(log_scale.dtype)[0])]
    if atanh_rho is not None:
        checks.append((atanh_rho, _fused_bounds(atanh_rho.dtype)[1]))
    for t, bound in checks:
        if t.device.type != "cpu":
            return False
        if t.numel() == 0:
            continue
        low, high = torch.aminmax(t)
        if not (bool(low > -bound) and bool(high < bound)):  # also False for NaN
            return False
    return True


def _fused_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """``(log_scale bound, atanh_rho bound)`` of the fused kernels (:func:`_in_fused_domain`)."""
    finfo = torch.finfo(dtype)
    return -math.log(finfo.tiny) - 1.0, 0.5 * (math.log(finfo.max) - math.log(8.0)) - 1.0


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
            autograd path). Any input is fine: where the kernel's
            ``exp(log_scale)`` would not be a normal float, off the CPU (where the check
            would wait for the device) and while compiling, the plain path is taken by
            itself, and both paths agree (module docstring). ``fused=False`` always takes
            the plain path (component densities from
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
    """The fused kernel where it is exact (see :func:`_in_fused_domain`), else the plain path."""
    if fused and _in_fused_domain(log_scale):
        return _NormalMixture.apply(value, logits, loc, log_scale)
    return _plain_normal_mixture(value, logits, loc, log_scale)


def _mask_nan_targets(value: Tensor, loc: Tensor) -> tuple[Tensor, Tensor]:
    """Replace events with a NaN coordinate by the mean of component 0 (detached).

    Returns ``(value, mask)`` with ``mask`` False at those events. At the fill every
    standardised residual of component 0 is 0 and the others are finite for finite
    parameters, so the event's loss is finite and its zero weight gives a zero gradient.
    """
    missing = torch.isnan(value).any(-1, keepdim=True)
    value = torch.where(missing, loc[..., 0, :].detach(), value)
    return value, ~missing.squeeze(-1)


def _targets(value: Tensor, loc: Tensor, nan_policy: str, validate_args: bool | None):
    """``(value, mask)`` for the NLLs: NaN events masked (``"mask"``) or rejected."""
    if nan_policy == "mask":
        return _mask_nan_targets(value, loc)
    if should_validate(validate_args, value):
        check_not_nan(value, "value")
    return value, None


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
    check_reduction(reduction)
    _check_nan_policy(nan_policy)
    value, logits, loc, log_scale = _normal_inputs(value, logits, loc, log_scale)
    if reduction != "none":
        check_value_batch(
            value.shape[:-1],
            " (event dimension D last)",
            logits=logits.shape[:-1],
            loc=loc.shape[:-2],
            log_scale=log_scale.shape[:-2],
        )
    value, mask = _targets(value, loc, nan_policy, validate_args)
    loss = -_normal_mixture(value, logits, loc, log_scale, fused=True)
    return reduce_loss(loss, reduction, mask=mask)


# ======================================================================================
# Bivariate normal mixture (Graves 2013, sketch-rnn)
# ======================================================================================


def _plain_bivariate_mixture(
    value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor
) -> Tensor:

    def components(x: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor) -> Tensor:
        return bivariate_normal_log_prob(x, loc, log_scale, atanh_rho, validate_args=False)

    lp = _without_dead_components(components, value, loc, (log_scale, 0.0, 1), (atanh_rho, 0.0, 0))
    return mixture_log_prob(lp, logits)


def _bivariate_pieces(z: Tensor, atanh_rho: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(e^a, e^-a, P, M)`` with ``P = (z1 + z2) e^-a`` and ``M = (z1 - z2) e^a``.

    With ``rho = tanh a`` the quadratic form is a sum of four squares (the coordinates
    ``z1 +- z2`` along the eigenvectors of the correlation matrix, eigenvalues ``1 +- rho``,
    and ``1/(1 +- tanh a) = (1 + e^{-+2a})/2``)::

        Q = (z1^2 - 2 rho z1 z2 + z2^2) / (1 - rho^2)
          = ((z1 + z2)^2 (1 + e^{-2a}) + (z1 - z2)^2 (1 + e^{2a})) / 4
          = (z1^2 + z2^2) / 2 + (P^2 + M^2) / 4

    no ``1 - rho^2``, no cancellation; ``e^{+-a}`` are finite for ``|a| < log(max)``.
    """
    z1, z2 = z[..., 0], z[..., 1]
    ea = torch.exp(atanh_rho)
    inv_ea = torch.exp(-atanh_rho)
    return ea, inv_ea, torch.add(z1, z2).mul_(inv_ea), torch.sub(z1, z2).mul_(ea)


def _bivariate_gradient_pieces(z: Tensor, atanh_rho: Tensor) -> tuple[Tensor, ...]:
    """``(sign(a), n s, s, e^{|a|})``, each ``(*, K)``, for the backward of the mixture.

    The closed-form derivatives of :func:`~probloss.functional.bivariate._gradient_pieces`
    (``z2' = sign(a) z2``, ``n = z1 - z2'``, ``s = -expm1(-2|a|)/2``, ``c = 1 - s``),
    formed from ``z1`` and ``z2`` directly: through ``z1 +- z2`` a coordinate dwarfed by
    the other would be rounded away. ``e^{|a|}`` is finite in the fused kernel's domain
    (:func:`_fused_bounds`). In place where possible: the backward's peak memory.
    """
    sign = torch.copysign(torch.ones((), dtype=z.dtype, device=z.device), atanh_rho)
    s = torch.abs(atanh_rho)
    eb = torch.exp(s)
    s = s.mul_(-2.0).expm1_().mul_(-0.5)
    ns = torch.mul(z[..., 1], sign)
    ns = torch.sub(z[..., 0], ns, out=ns).mul_(s)
    return sign, ns, s, eb


class _BivariateMixture(torch.autograd.Function):
    """Bivariate normal mixture log density with a hand-written backward.

    Component ``k``: ``log N = log cosh a - log 2 pi - log s1 - log s2 - Q/2`` with
    ``Q/2 = (z1^2 + z2^2)/4 + (P^2 + M^2)/8`` (:func:`_bivariate_pieces`) and
    ``log cosh a = log(e^a + e^-a) - log 2``. Saved: the inputs (references), ``z``, the
    responsibilities ``r`` and the weights ``pi``; the backward's pieces are recomputed
    from them (less memory for a few cheap passes). With ``w = g r``, ``b = |a|``,
    ``z2' = sign(a) z2``, ``n = z1 - z2'``, ``s = -expm1(-2b)/2``, ``c = 1 - s``
    (:func:`_bivariate_gradient_pieces`, the closed forms of the single density's
    backward, formed from ``z1`` and ``z2`` directly)::

        A_1 = w d(Q/2)/dz1 = w c (z1 + n s e^{2b}),   A_2 = sign w c (z2' - n s e^{2b})
        d/dloc_i       = A_i / s_i,     d/dlog_scale_i = z_i A_i - w
        d/datanh_rho   = w tanh a + sign w u v,
                         u = z1 e^{-b} + n s e^b,  v = z2' e^{-b} - n s e^b
        d/dlogits      = w - g pi,      d/dvalue = -sum_k d/dloc

    Products are ordered with ``w`` first (``((w c n s) e^b) e^b``), so a component whose
    ``Q`` overflowed (``r = 0``) contributes exactly 0, and nothing overflows unless the
    exact derivative does.
    """

    @staticmethod
    def forward(ctx, value, logits, loc, log_scale, atanh_rho) -> Tensor:
        shape = torch.broadcast_shapes(
            (*value.shape[:-1], 1), logits.shape, loc.shape[:-1], log_scale.shape[:-1],
            atanh_rho.shape,
        )  # fmt: skip
        z = _standardized(value, loc, log_scale, shape)
        # exact: |z| >= max gives Q >= z^2/2 = inf either way, and an infinite z would make
        # M = (z1 - z2) e^a NaN where z1 = z2 = inf (checked first: CPU only, see
        # _clear_dead_; NaN compares False and is clamped to itself); an infinite z from a
        # value - loc that overflowed is first recomputed (it may be finite)
        big = torch.finfo(z.dtype).max
        if z.numel() and not all(bool(abs(v) <= big) for v in torch.aminmax(z)):
            _rescue_overflowed_residuals_(z, value, loc, log_scale)
            z.clamp_(-big, big)
        ea, inv_ea, p, m = _bivariate_pieces(z, atanh_rho)
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
        ctx.save_for_backward(value, logits, loc, log_scale, atanh_rho, z, j, weights, lse)
        return lse - (_LOG_2PI + _LN2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            return _double_backward(ctx, grad, _plain_bivariate_mixture)
        value, logits, loc, log_scale, atanh_rho, z, resp, weights, lse = ctx.saved_tensors
        need_value, need_logits, need_loc, need_log_scale, need_rho = ctx.needs_input_grad
        g = torch.where(lse == -math.inf, 0.0, grad).unsqueeze(-1)  # a -inf row: gradient 0
        w = resp * g
        d_value = d_logits = d_loc = d_log_scale = d_rho = None
        if not (need_value or need_loc or need_log_scale or need_rho):
            d_logits = _logits_grad_(w, weights, g) if need_logits else None
            return None, _grad_to(d_logits, logits, need_logits), None, None, None
        # closed-form derivatives (see _bivariate_gradient_pieces), w multiplied in first so a
        # component with no responsibility contributes exactly 0; every temporary is (*, K)
        sign, ns, s, eb = _bivariate_gradient_pieces(z, atanh_rho)
        z1, z2 = z[..., 0], z[..., 1]
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
            if need_value or need_loc:
                scale = torch.exp(log_scale)
                if scale.shape == a.shape:
                    d_loc = torch.div(a, scale, out=scale)
                else:
                    d_loc = a / scale
                if need_value:
                    d_value = _summed_value_gradient(d_loc, a, log_scale)
            if need_log_scale:
                d_log_scale = _planes_sub_(a.mul_(z), w)  # z_i A_i - w
        if need_logits:
            d_logits = _logits_grad_(w, weights, g)
        return (
            _grad_to(d_value, value, need_value),
            _grad_to(d_logits, logits, need_logits),
            _grad_to(d_loc, loc, need_loc),
            _grad_to(d_log_scale, log_scale, need_log_scale),
            _grad_to(d_rho, atanh_rho, need_rho),
        )


def _bivariate_inputs(value, logits, loc, log_scale, atanh_rho) -> tuple[Tensor, ...]:
    value, logits, loc, log_scale, atanh_rho = as_loss_tensors(
        value=value, logits=logits, loc=loc, log_scale=log_scale, atanh_rho=atanh_rho
    )
    k, _, batch = _mixture_shapes(value, logits, {"loc": loc, "log_scale": log_scale}, 2)
    if atanh_rho.dim() == 0 or atanh_rho.shape[-1] != k:
        raise _shape_error(
            "atanh_rho",
            atanh_rho,
            f"(*, K) = (*, {k})",
            f"K = {k} from logits {tuple(logits.shape)}",
        )
    _broadcast_batch(
        {"batch of value, logits, loc, log_scale": batch, "atanh_rho": atanh_rho.shape[:-1]}
    )
    return value, logits, loc, log_scale, atanh_rho


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
        fused: on CPU, use the fused kernel with a hand-written backward (the default).
            Any input is fine: where the kernel's ``exp`` of ``log_scale`` would not be a
            normal float or its backward could overflow (``|atanh_rho|`` above 42 in
            float32, 352 in float64), off the CPU and while compiling, the plain path
            through ``bivariate_normal_log_prob`` is taken by itself, as it always is with
            ``fused=False``; both paths agree (module docstring). A double backward
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
    """The fused kernel where it is exact (see :func:`_in_fused_domain`), else the plain path."""
    if fused and _in_fused_domain(log_scale, atanh_rho):
        return _BivariateMixture.apply(value, logits, loc, log_scale, atanh_rho)
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
    check_reduction(reduction)
    _check_nan_policy(nan_policy)
    value, logits, loc, log_scale, atanh_rho = _bivariate_inputs(
        value, logits, loc, log_scale, atanh_rho
    )
    if reduction != "none":
        check_value_batch(
            value.shape[:-1],
            " (event dimension 2 last)",
            logits=logits.shape[:-1],
            loc=loc.shape[:-2],
            log_scale=log_scale.shape[:-2],
            atanh_rho=atanh_rho.shape[:-1],
        )
    value, mask = _targets(value, loc, nan_policy, validate_args)
    loss = -_bivariate_mixture(value, logits, loc, log_scale, atanh_rho, fused=True)
    return reduce_loss(loss, reduction, mask=mask)


# ======================================================================================
# Full-covariance mixture
# ======================================================================================


def multivariate_normal_mixture_log_prob(
    value: Tensor,
    logits: Tensor,
    loc: Tensor,
    scale_tril: Tensor,
    *,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of a mixture of Gaussians with full covariances :math:`L_k L_k^\top`.

    .. math::
        \log p(x) = \operatorname{logsumexp}_k\Big(\log\operatorname{softmax}(\ell)_k
            - \tfrac12\lVert L_k^{-1}(x - \mu_k)\rVert^2 - \sum_i \log (L_k)_{ii}\Big)
            - \tfrac D2 \log 2\pi

    The components are
    :func:`~probloss.functional.multivariate.multivariate_normal_log_prob` (one triangular
    solve, no covariance formed) combined by :func:`mixture_log_prob` with plain autograd.
    Build ``scale_tril`` from unconstrained network outputs with
    :func:`~probloss.functional.multivariate.scale_tril_from_raw`.

    Args:
        value: targets, shape ``(*, D)``.
        logits: mixture logits, shape ``(*, K)``.
        loc: means, shape ``(*, K, D)``.
        scale_tril: lower-triangular factors :math:`L_k` with positive diagonals, shape
            ``(*, K, D, D)``.
        validate_args: checks of ``multivariate_normal_log_prob`` (no NaN, positive
            diagonal, lower triangular); ``None`` checks CPU tensors only.

    Returns:
        Tensor of shape ``(*)``, the broadcast batch shape (torch's broadcasting, as for
        every unreduced density); float32 for half-precision inputs.

    Raises:
        ValueError: shapes (``scale_tril`` must be ``(*, K, D, D)``), or the checks above.

    Example:
        >>> L = torch.tensor([[[1.0, 0.0], [0.9, 0.1]], [[2.0, 0.0], [0.0, 2.0]]])
        >>> loc, logits = torch.zeros(2, 2), torch.tensor([1.0, 0.0])
        >>> multivariate_normal_mixture_log_prob(torch.tensor([1.0, 0.9]), logits, loc, L)
        tensor(-0.3365)
    """
    value, logits, loc, scale_tril = as_loss_tensors(
        value=value, logits=logits, loc=loc, scale_tril=scale_tril
    )
    k, d, batch = _mixture_shapes(value, logits, {"loc": loc}, None)
    if scale_tril.dim() < 3 or scale_tril.shape[-3:] != (k, d, d):
        raise _shape_error(
            "scale_tril",
            scale_tril,
            f"(*, K, D, D) = (*, {k}, {d}, {d})",
            f"K = {k} from logits {tuple(logits.shape)}, D = {d} from value {tuple(value.shape)}",
        )
    _broadcast_batch({"batch of value, logits, loc": batch, "scale_tril": scale_tril.shape[:-3]})
    component = multivariate_normal_log_prob(
        value.unsqueeze(-2), loc, scale_tril, validate_args=validate_args
    )
    return mixture_log_prob(component, logits)
