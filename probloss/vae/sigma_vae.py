r"""The sigma-VAE decoder (Rybkin et al. 2021): a Gaussian likelihood whose one shared scale
is the optimal one, the root mean squared error, softly floored.

The floor is ``min_scale``, in scale units like every floor of probloss: :math:`\sigma =
\sigma^* + m`, i.e. ``log sigma = logaddexp(log sigma*, log m)``
(:func:`~probloss.special.soft_floor`). It was ``min_log_scale`` (log units, default -6);
that keyword now raises a TypeError naming ``min_scale = exp(min_log_scale)``. Dtypes:
float16 / bfloat16 inputs are computed and returned in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.dtype import loss_tensors
from .._core.shapes import broadcast_shapes
from .._core.validation import check_renamed_keywords
from ..special import safe_where, soft_floor
from .reconstruction import gaussian_log_likelihood, ndim_of, resolve_event_dims

_DEFAULT_MIN_SCALE = math.exp(-6.0)  # 0.0025: the sigma-VAE paper's floor of -6 on log sigma
_RENAMED_FLOOR = {"min_log_scale": "min_scale (scale units: min_scale = exp(min_log_scale))"}


def sigma_vae_log_scale(
    x: Tensor,
    loc: Tensor,
    *,
    event_dims: int | None = None,
    per_example: bool = False,
    min_scale: float = _DEFAULT_MIN_SCALE,
    **renamed: object,
) -> Tensor:
    r"""The optimal shared log-scale of a Gaussian decoder (sigma-VAE), softly floored.

    For a Gaussian decoder with one scale :math:`\sigma` shared by :math:`n` residuals
    :math:`r_i = x_i - \mu_i`, the log-likelihood
    :math:`-\tfrac{1}{2\sigma^2}\sum_i r_i^2 - n \log\sigma + \text{const}` is maximised by
    :math:`\sigma^{*2} = \frac1n \sum_i r_i^2`, the mean squared error (Rybkin et al. 2021,
    "Simple and Effective VAE Training with Calibrated Decoders", arXiv:2006.13202). The
    result is

    .. math::
        \sigma = \sigma^* + m, \qquad \log\sigma
            = \operatorname{soft\_floor}\big(\log\sigma^*, \log m\big)
            = \log\big(\sqrt{\mathrm{MSE}} + m\big), \qquad m = \text{min\_scale},

    the soft floor of probloss in scale units (:func:`~probloss.special.soft_floor`:
    ``logaddexp(log sigma*, log m)``, never a clamp), so a perfect reconstruction gives
    ``log m`` and a finite likelihood rather than ``+inf``.
    :math:`\log\sigma^* = \log\|r\| - \tfrac12\log n` is formed from the norm of ``r``
    scaled by its largest entry, so neither ``r^2`` overflows nor ``log 0`` is taken.

    The MSE runs over the whole batch and every event dimension (as in the paper), or,
    with ``per_example=True``, over each example's ``event_dims`` trailing dimensions.

    Gradients flow through :math:`\sigma^*` (it is a function of ``loc``), as in the paper.
    Because :math:`\sigma^*` maximises the likelihood, its own contribution to the gradient
    of :func:`sigma_vae_log_likelihood` vanishes (envelope theorem): the gradient equals
    the one with :math:`\sigma` held fixed, up to the small offset the floor introduces
    (relative :math:`m / \sigma^*`). Where ``x == loc`` everywhere the gradient is 0.

    Args:
        x: data, shape ``(B, *E)`` (broadcastable with ``loc``).
        loc: decoder mean, shape broadcastable with ``x``.
        event_dims: number of trailing dimensions forming one example (default
            ``x.dim() - 1``); only used with ``per_example=True``.
        per_example: one scale per example instead of one for everything.
        min_scale: the soft floor :math:`m > 0` of the scale, in scale units (default
            :math:`e^{-6} = 0.0025`, the paper's implementation's floor of -6 on the
            log-scale). Formerly ``min_log_scale`` (log units): that keyword now raises a
            TypeError; pass ``min_scale=math.exp(min_log_scale)``.

    Returns:
        A 0-dimensional tensor, or with ``per_example=True`` a tensor of the broadcast
        shape with the last ``event_dims`` dimensions set to size 1 (``(B, 1, ..., 1)``),
        broadcastable against ``x``. float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast, the inputs are empty, ``event_dims`` is out of
            range or ``min_scale`` is not a positive finite number.
        TypeError: a non-floating tensor, a non-int ``event_dims``, or ``min_log_scale``
            passed (renamed ``min_scale``).

    Example:
        >>> x = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
        >>> sigma_vae_log_scale(x, torch.ones(2, 2), min_scale=1e-9)  # 0.5 log(0.5)
        tensor(-0.3466)
        >>> sigma_vae_log_scale(x, torch.ones(2, 2), per_example=True).exp()  # rms + e^-6
        tensor([[1.0025],
                [0.0025]])
    """
    check_renamed_keywords("sigma_vae_log_scale", renamed, _RENAMED_FLOOR)
    log_floor = _log_min_scale(min_scale)
    dims = resolve_event_dims(event_dims, ndim_of(x))
    t = loss_tensors(x=x, loc=loc)
    broadcast_shapes(**t)
    residual = t["x"] - t["loc"]
    if residual.numel() == 0:
        raise ValueError(f"x and loc are empty (broadcast shape {tuple(residual.shape)})")
    first = residual.dim() - dims if per_example else 0
    over = tuple(range(first, residual.dim()))  # the dimensions the MSE averages over
    count = math.prod(residual.shape[d] for d in over)
    # ||r|| = a ||r / a|| for any constant a > 0: scaling by the (detached) largest |r_i|
    # keeps r_i^2 from overflowing and leaves value and gradient exact.
    if over:
        biggest = residual.abs().amax(dim=over, keepdim=True).detach()
    else:  # one element per "example": amax / vector_norm over dim=() would reduce all
        biggest = residual.abs().detach()
    nonzero = biggest != 0  # NaN counts as nonzero, so it propagates
    safe_biggest = torch.where(nonzero, biggest, 1.0)
    scaled = residual / safe_biggest
    norm = torch.linalg.vector_norm(scaled, dim=over, keepdim=True) if over else scaled.abs()
    # log sigma* = log ||r|| - log(n) / 2; log 0 = -inf for a zero residual, which the
    # floor maps to m with gradient 0 (double where: log never sees the 0).
    log_norm = safe_where(
        nonzero,
        norm,
        torch.log,
        lambda v: torch.full_like(v, -math.inf),
        safe_true=1.0,
        safe_false=0.0,
    )
    log_rms = torch.log(safe_biggest) + log_norm - 0.5 * math.log(count)
    if not per_example:
        log_rms = log_rms.reshape(())
    return soft_floor(log_rms, log_floor)  # log(sigma* + m) = logaddexp(log sigma*, log m)


def sigma_vae_log_likelihood(
    x: Tensor,
    loc: Tensor,
    *,
    event_dims: int | None = None,
    per_example: bool = False,
    min_scale: float = _DEFAULT_MIN_SCALE,
    **renamed: object,
) -> Tensor:
    r"""Gaussian log-likelihood with the optimal shared scale (sigma-VAE, Rybkin et al. 2021).

    .. math::
        \log p(x \mid \mu) = \sum_{i \in \text{event}} -\frac{(x_i - \mu_i)^2}{2\sigma^2}
            - \log\sigma - \tfrac12\log 2\pi, \qquad \log\sigma =
            \text{sigma\_vae\_log\_scale}(x, \mu)

    i.e. :func:`gaussian_log_likelihood` with ``log_scale`` from
    :func:`sigma_vae_log_scale` (see there for the floor and the gradient). Without the
    floor this is :math:`-\tfrac{n}{2}(\log(2\pi\,\mathrm{MSE}) + 1)` per example of
    :math:`n` elements: the decoder's reconstruction-vs-KL balance is then set by the data
    instead of a hand-tuned weight (arXiv:2006.13202).

    Args:
        x: data, shape ``(B, *E)`` (broadcastable with ``loc``).
        loc: decoder mean, shape broadcastable with ``x``.
        event_dims: number of trailing dimensions summed (default ``x.dim() - 1``);
            with ``per_example=True`` also the dimensions of each example's MSE.
        per_example: one scale per example instead of one for the batch.
        min_scale: soft floor of the scale, :math:`\sigma = \sigma^* + m` (default
            :math:`e^{-6}`; formerly ``min_log_scale``, which now raises a TypeError).

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError, TypeError: as :func:`sigma_vae_log_scale`.

    Example:
        >>> x = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
        >>> sigma_vae_log_likelihood(x, torch.ones(2, 2), min_scale=1e-9)
        tensor([-3.1447, -1.1447])
    """
    check_renamed_keywords("sigma_vae_log_likelihood", renamed, _RENAMED_FLOOR)
    log_scale = sigma_vae_log_scale(
        x, loc, event_dims=event_dims, per_example=per_example, min_scale=min_scale
    )
    return gaussian_log_likelihood(x, loc, log_scale, event_dims=event_dims)


def _log_min_scale(min_scale: float) -> float:
    """``log(min_scale)`` of a positive finite floor, else a ValueError naming it."""
    if isinstance(min_scale, bool) or not isinstance(min_scale, int | float):
        raise ValueError(f"min_scale must be a positive finite number, got {min_scale!r}")
    if not (math.isfinite(min_scale) and min_scale > 0.0):
        raise ValueError(f"min_scale must be a positive finite number, got {min_scale!r}")
    return math.log(min_scale)
