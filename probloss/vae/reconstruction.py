r"""Decoder log-likelihoods for a VAE, summed over each example's event dimensions.

A VAE's reconstruction term is :math:`\log p_\theta(x \mid z)`, one number per example: the
per-element log densities summed over the dimensions that make up one example (pixels,
channels, ...). Every function here takes the data ``x`` first, then the decoder outputs,
and sums over the trailing ``event_dims`` dimensions of the broadcast shape (by default
``x.dim() - 1``: all of ``x``'s dimensions but the first, the batch). The result is in
nats, with the leading (batch) shape; leading dimensions that only the decoder outputs have
(several samples of ``z``) are kept.

The sum, not the mean, is the log-likelihood: averaging over pixels instead rescales the
reconstruction term by the image size and silently changes its balance against the KL
term (DESIGN.md, user story 3).

Dtypes: float16 / bfloat16 inputs are computed and returned in float32 (DESIGN.md, half
precision policy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._dtype import as_loss_tensors, loss_tensors
from .._validation import broadcast_shapes, check_in_interval, should_validate
from ..functional import continuous_bernoulli_log_prob, laplace_log_prob, normal_log_prob
from ..special import safe_where, soft_floor


def resolve_event_dims(event_dims: int | None, ndim: int, name: str = "event_dims") -> int:
    """``event_dims`` checked against ``0 <= event_dims <= ndim``; ``None`` means ``ndim - 1``
    (all dimensions but the first; 0 for a 0-dimensional input).

    Raises:
        TypeError: ``event_dims`` is not an int.
        ValueError: it is out of range.
    """
    if event_dims is None:
        return max(ndim - 1, 0)
    if isinstance(event_dims, bool) or not isinstance(event_dims, int):
        raise TypeError(f"{name} must be an int, got {type(event_dims).__name__}")
    if not 0 <= event_dims <= ndim:
        raise ValueError(
            f"{name} must lie in [0, {ndim}] for an input of {ndim} dims, got {event_dims}"
        )
    return event_dims


def sum_trailing(t: Tensor, dims: int) -> Tensor:
    """Sum over the last ``dims`` dimensions of ``t`` (``dims = 0``: ``t`` itself).

    ``Tensor.sum(dim=())`` would sum over *every* dimension, hence the explicit case.
    """
    if dims == 0:
        return t
    return t.sum(dim=tuple(range(-dims, 0)))


def bernoulli_log_likelihood(
    x: Tensor, logits: Tensor, *, event_dims: int | None = None, validate_args: bool | None = None
) -> Tensor:
    r"""Bernoulli decoder log-likelihood from logits, summed over the event dimensions.

    .. math::
        \log p(x \mid \ell) = \sum_{i \in \text{event}}
            x_i \log\sigma(\ell_i) + (1 - x_i) \log\sigma(-\ell_i)

    computed as ``-binary_cross_entropy_with_logits(logits, x, reduction="none")`` (exact
    and with gradient ``x - sigmoid(l)`` at any finite logit, including ``+-1e4``). For
    ``x`` in ``{0, 1}`` this is a log probability (``<= 0``). For ``x`` strictly inside
    ``(0, 1)`` (grey levels) it is still the binary cross-entropy but *not* a normalised
    density on ``[0, 1]``: the missing log-normaliser depends on the logits, which biases
    the decoder; :func:`continuous_bernoulli_log_likelihood` is the normalised version
    (Loaiza-Ganem & Cunningham 2019, arXiv:1907.06845).

    Args:
        x: data in ``[0, 1]``, shape ``(B, *E)`` (broadcastable with ``logits``).
        logits: decoder logits, shape broadcastable with ``x``, e.g. ``(S, B, *E)``.
        event_dims: number of trailing dimensions summed (default ``x.dim() - 1``).
        validate_args: check ``x`` lies in ``[0, 1]`` without NaN; ``None`` checks CPU
            tensors only (no GPU host sync).

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions, e.g.
        ``(B,)``; float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast, ``event_dims`` out of range, or (when
            validating) ``x`` outside ``[0, 1]``.
        TypeError: a non-floating tensor or a non-int ``event_dims``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0, 1.0]])
        >>> bernoulli_log_likelihood(x, torch.tensor([[-1e4, 1e4, 0.0]]))
        tensor([-0.6931])
    """
    dims = resolve_event_dims(event_dims, _ndim(x))
    x, logits = as_loss_tensors(x=x, logits=logits)
    broadcast_shapes(x=x, logits=logits)
    if should_validate(validate_args, x):
        check_in_interval(x, "x", 0.0, 1.0)
    logits, target = torch.broadcast_tensors(logits, x)  # the built-in wants equal shapes
    log_p = -torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return sum_trailing(log_p, dims)


def continuous_bernoulli_log_likelihood(
    x: Tensor, logits: Tensor, *, event_dims: int | None = None, validate_args: bool | None = None
) -> Tensor:
    r"""Continuous Bernoulli decoder log-likelihood, summed over the event dimensions.

    .. math::
        \log p(x \mid \eta) = \sum_{i \in \text{event}} \eta_i x_i - A(\eta_i),
        \qquad A(\eta) = \log\frac{e^\eta - 1}{\eta}

    the sum of :func:`~probloss.functional.continuous_bernoulli_log_prob`: the normalised
    density on ``[0, 1]`` that the Bernoulli likelihood of grey-level data is not
    (Loaiza-Ganem & Cunningham 2019, arXiv:1907.06845). A log *density*: it is positive
    where the fit is good.

    Args:
        x: data in ``[0, 1]``, shape ``(B, *E)`` (broadcastable with ``logits``).
        logits: natural parameters :math:`\eta`, shape broadcastable with ``x``.
        event_dims: number of trailing dimensions summed (default ``x.dim() - 1``).
        validate_args: check ``x`` lies in ``[0, 1]`` without NaN; ``None`` checks CPU
            tensors only.

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast, ``event_dims`` out of range, or (when
            validating) ``x`` outside ``[0, 1]``.
        TypeError: a non-floating tensor or a non-int ``event_dims``.

    Example:
        >>> x = torch.tensor([[0.0, 0.5, 1.0]])
        >>> continuous_bernoulli_log_likelihood(x, torch.tensor([[-50.0, 0.0, 50.0]]))
        tensor([7.8240])
    """
    dims = resolve_event_dims(event_dims, _ndim(x))
    x, logits = as_loss_tensors(x=x, logits=logits)
    broadcast_shapes(x=x, logits=logits)
    if should_validate(validate_args, x):
        check_in_interval(x, "x", 0.0, 1.0)  # checked here to name the argument ``x``
    return sum_trailing(continuous_bernoulli_log_prob(x, logits, validate_args=False), dims)


def gaussian_log_likelihood(
    x: Tensor,
    loc: Tensor,
    *,
    log_scale: Tensor | float | None = None,
    scale: Tensor | float | None = None,
    event_dims: int | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Gaussian decoder log-likelihood, summed over the event dimensions.

    .. math::
        \log p(x \mid \mu, \sigma) = \sum_{i \in \text{event}}
            -\tfrac12 \Big(\frac{x_i - \mu_i}{\sigma_i}\Big)^2 - \log\sigma_i
            - \tfrac12 \log 2\pi

    through :func:`~probloss.functional.normal_log_prob` (log space, no overflow of
    ``exp(-log_scale)``). The scale is exactly one of ``log_scale`` (unconstrained) or
    ``scale``, and may be

    * a Python number: one fixed :math:`\sigma` (``log_scale=0.0`` is the "MSE" decoder,
      whose log-likelihood is ``-SSE / 2`` plus a constant);
    * a tensor of one event's shape ``(*E)``: a learned per-dimension :math:`\sigma`;
    * a tensor of shape ``(B, 1, ..., 1)`` or ``()``: one :math:`\sigma` per example or
      for everything (the calibrated decoder of :func:`sigma_vae_log_likelihood`);
    * a tensor of the full shape: a :math:`\sigma` per element from the decoder.

    Args:
        x: data, shape ``(B, *E)`` (broadcastable with the parameters).
        loc: decoder mean, shape broadcastable with ``x``.
        log_scale: :math:`\log\sigma`, a number or a tensor broadcastable with ``x``.
        scale: :math:`\sigma > 0`, a number or a tensor broadcastable with ``x``.
        event_dims: number of trailing dimensions summed (default ``x.dim() - 1``).
        validate_args: check ``scale`` is positive; ``None`` checks CPU tensors only.

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError: not exactly one of ``log_scale`` / ``scale``, shapes do not broadcast,
            ``event_dims`` out of range, or (when validating) a non-positive ``scale``.
        TypeError: a non-floating tensor or a non-int ``event_dims``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
        >>> gaussian_log_likelihood(x, torch.ones(2, 2), log_scale=0.0)
        tensor([-2.3379, -2.8379])
    """
    given = [name for name, v in (("log_scale", log_scale), ("scale", scale)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of log_scale, scale; got {', '.join(given) or 'none'}")
    dims = resolve_event_dims(event_dims, _ndim(x))
    t = loss_tensors(x=x, loc=loc, log_scale=log_scale, scale=scale)
    broadcast_shapes(**t)  # here, to name ``x`` in the error
    log_p = normal_log_prob(
        t["x"],
        t["loc"],
        log_scale=t.get("log_scale"),
        scale=t.get("scale"),
        validate_args=validate_args,
    )
    return sum_trailing(log_p, dims)


def laplace_log_likelihood(
    x: Tensor, loc: Tensor, *, log_scale: Tensor | float, event_dims: int | None = None
) -> Tensor:
    r"""Laplace decoder log-likelihood, summed over the event dimensions.

    .. math::
        \log p(x \mid \mu, b) = \sum_{i \in \text{event}}
            -\frac{|x_i - \mu_i|}{b_i} - \log b_i - \log 2

    through :func:`~probloss.functional.laplace_log_prob`; the L1 counterpart of
    :func:`gaussian_log_likelihood` (sharper reconstructions for images with edges).

    Args:
        x: data, shape ``(B, *E)`` (broadcastable with the parameters).
        loc: decoder location :math:`\mu`, shape broadcastable with ``x``.
        log_scale: :math:`\log b`, a number or a tensor broadcastable with ``x``.
        event_dims: number of trailing dimensions summed (default ``x.dim() - 1``).

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast or ``event_dims`` is out of range.
        TypeError: a non-floating tensor or a non-int ``event_dims``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
        >>> laplace_log_likelihood(x, torch.ones(2, 2), log_scale=0.0)
        tensor([-2.3863, -3.3863])
    """
    dims = resolve_event_dims(event_dims, _ndim(x))
    t = loss_tensors(x=x, loc=loc, log_scale=log_scale)
    broadcast_shapes(**t)  # here, to name ``x`` in the error
    return sum_trailing(laplace_log_prob(t["x"], t["loc"], t["log_scale"]), dims)


def sigma_vae_log_scale(
    x: Tensor,
    loc: Tensor,
    *,
    event_dims: int | None = None,
    per_example: bool = False,
    min_log_scale: float = -6.0,
) -> Tensor:
    r"""The optimal shared log-scale of a Gaussian decoder (sigma-VAE), softly floored.

    For a Gaussian decoder with one scale :math:`\sigma` shared by :math:`n` residuals
    :math:`r_i = x_i - \mu_i`, the log-likelihood
    :math:`-\tfrac{1}{2\sigma^2}\sum_i r_i^2 - n \log\sigma + \text{const}` is maximised by
    :math:`\sigma^{*2} = \frac1n \sum_i r_i^2`, the mean squared error (Rybkin et al. 2021,
    "Simple and Effective VAE Training with Calibrated Decoders", arXiv:2006.13202). The
    result is

    .. math::
        \log\sigma = \operatorname{soft\_floor}\big(\log\sigma^*, m\big)
            = \log\big(\sqrt{\mathrm{MSE}} + e^{m}\big), \qquad m = \text{min\_log\_scale},

    (:func:`~probloss.special.soft_floor`: ``logaddexp(log sigma*, m)``, never a clamp), so
    a perfect reconstruction gives ``m`` and a finite likelihood rather than ``+inf``.
    :math:`\log\sigma^* = \log\|r\| - \tfrac12\log n` is formed from the norm of ``r``
    scaled by its largest entry, so neither ``r^2`` overflows nor ``log 0`` is taken.

    The MSE runs over the whole batch and every event dimension (as in the paper), or,
    with ``per_example=True``, over each example's ``event_dims`` trailing dimensions.

    Gradients flow through :math:`\sigma^*` (it is a function of ``loc``), as in the paper.
    Because :math:`\sigma^*` maximises the likelihood, its own contribution to the gradient
    of :func:`sigma_vae_log_likelihood` vanishes (envelope theorem): the gradient equals
    the one with :math:`\sigma` held fixed, up to the small offset the floor introduces
    (relative :math:`e^m / \sigma^*`). Where ``x == loc`` everywhere the gradient is 0.

    Args:
        x: data, shape ``(B, *E)`` (broadcastable with ``loc``).
        loc: decoder mean, shape broadcastable with ``x``.
        event_dims: number of trailing dimensions forming one example (default
            ``x.dim() - 1``); only used with ``per_example=True``.
        per_example: one scale per example instead of one for everything.
        min_log_scale: the finite soft floor :math:`m` of the log-scale (default -6,
            :math:`\sigma \ge 0.0025`, as in the paper's implementation).

    Returns:
        A 0-dimensional tensor, or with ``per_example=True`` a tensor of the broadcast
        shape with the last ``event_dims`` dimensions set to size 1 (``(B, 1, ..., 1)``),
        broadcastable against ``x``. float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast, the inputs are empty, ``event_dims`` is out of
            range or ``min_log_scale`` is not finite.
        TypeError: a non-floating tensor or a non-int ``event_dims``.

    Example:
        >>> x = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
        >>> sigma_vae_log_scale(x, torch.ones(2, 2), min_log_scale=-20.0)  # 0.5 log(0.5)
        tensor(-0.3466)
        >>> sigma_vae_log_scale(x, torch.ones(2, 2), per_example=True).exp()  # rms + e^-6
        tensor([[1.0025],
                [0.0025]])
    """
    if not math.isfinite(min_log_scale):
        raise ValueError(f"min_log_scale must be a finite number, got {min_log_scale!r}")
    dims = resolve_event_dims(event_dims, _ndim(x))
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
    return soft_floor(log_rms, min_log_scale)


def sigma_vae_log_likelihood(
    x: Tensor,
    loc: Tensor,
    *,
    event_dims: int | None = None,
    per_example: bool = False,
    min_log_scale: float = -6.0,
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
        min_log_scale: soft floor of the log-scale (default -6).

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError, TypeError: as :func:`sigma_vae_log_scale`.

    Example:
        >>> x = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
        >>> sigma_vae_log_likelihood(x, torch.ones(2, 2), min_log_scale=-20.0)
        tensor([-3.1447, -1.1447])
    """
    log_scale = sigma_vae_log_scale(
        x, loc, event_dims=event_dims, per_example=per_example, min_log_scale=min_log_scale
    )
    return gaussian_log_likelihood(x, loc, log_scale=log_scale, event_dims=event_dims)


def _ndim(x: Tensor | float) -> int:
    return x.dim() if isinstance(x, Tensor) else 0
