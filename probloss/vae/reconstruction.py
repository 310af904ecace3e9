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
term.

Parameters follow the rule of the functional core: data first, then the location, then
``log_scale`` (positional, unconstrained); the constrained forms are keyword-only
alternatives. The sigma-VAE decoder is in
:mod:`probloss.vae.sigma_vae`. Dtypes: float16 / bfloat16
inputs are computed and returned in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtype import as_loss_tensors, loss_tensors
from .._core.shapes import broadcast_shapes
from .._core.validation import check_in_interval, check_not_nan, should_validate
from ..functional import continuous_bernoulli_log_prob, laplace_log_prob, normal_log_prob


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
    dims = resolve_event_dims(event_dims, ndim_of(x))
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
    dims = resolve_event_dims(event_dims, ndim_of(x))
    x, logits = as_loss_tensors(x=x, logits=logits)
    broadcast_shapes(x=x, logits=logits)
    if should_validate(validate_args, x):
        check_in_interval(x, "x", 0.0, 1.0)  # checked here to name the argument ``x``
    return sum_trailing(continuous_bernoulli_log_prob(x, logits, validate_args=False), dims)


def gaussian_log_likelihood(
    x: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    var: Tensor | float | None = None,
    log_var: Tensor | float | None = None,
    event_dims: int | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Gaussian decoder log-likelihood, summed over the event dimensions.

    .. math::
        \log p(x \mid \mu, \sigma) = \sum_{i \in \text{event}}
            -\tfrac12 \Big(\frac{x_i - \mu_i}{\sigma_i}\Big)^2 - \log\sigma_i
            - \tfrac12 \log 2\pi

    through :func:`~probloss.functional.normal_log_prob` (log space, no overflow of
    ``exp(-log_scale)``). The scale is exactly one of ``log_scale`` (unconstrained,
    positional) or the keyword-only ``scale``, ``var``, ``log_var``, and may be

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
        scale, var, log_var: alternatively :math:`\sigma > 0`, :math:`\sigma^2 > 0` or
            :math:`\log\sigma^2` (keyword-only), as in
            :func:`~probloss.functional.normal_log_prob`.
        event_dims: number of trailing dimensions summed (default ``x.dim() - 1``).
        validate_args: check ``x`` has no NaN and ``scale`` / ``var`` are positive;
            ``None`` checks CPU tensors only, ``False`` never checks.

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError: not exactly one scale form, shapes do not broadcast, ``event_dims``
            out of range, or (when validating) NaN in ``x`` or a non-positive
            ``scale`` / ``var``.
        TypeError: a non-floating tensor or a non-int ``event_dims``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
        >>> gaussian_log_likelihood(x, torch.ones(2, 2), 0.0)  # log_scale = 0
        tensor([-2.3379, -2.8379])
    """
    dims = resolve_event_dims(event_dims, ndim_of(x))
    forms = {"log_scale": log_scale, "scale": scale, "var": var, "log_var": log_var}
    t = loss_tensors(x=x, loc=loc, **forms)
    broadcast_shapes(**t)  # here, to name ``x`` in the error
    _check_x_not_nan(t["x"], validate_args)
    forms = {name: t.get(name) for name in forms}
    log_p = normal_log_prob(t["x"], t["loc"], **forms, validate_args=validate_args)
    return sum_trailing(log_p, dims)


def laplace_log_likelihood(
    x: Tensor,
    loc: Tensor,
    log_scale: Tensor | float | None = None,
    *,
    scale: Tensor | float | None = None,
    event_dims: int | None = None,
    validate_args: bool | None = None,
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
        scale: alternatively :math:`b > 0` (keyword-only; exactly one of the two).
        event_dims: number of trailing dimensions summed (default ``x.dim() - 1``).
        validate_args: check ``x`` has no NaN and ``scale`` is positive; ``None`` checks
            CPU tensors only, ``False`` never checks.

    Returns:
        Tensor of the broadcast shape without its last ``event_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError: not exactly one of ``log_scale`` / ``scale``, shapes do not broadcast,
            ``event_dims`` is out of range, or (when validating) NaN in ``x`` or a
            non-positive ``scale``.
        TypeError: a non-floating tensor or a non-int ``event_dims``.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
        >>> laplace_log_likelihood(x, torch.ones(2, 2), 0.0)  # log_scale = 0
        tensor([-2.3863, -3.3863])
    """
    dims = resolve_event_dims(event_dims, ndim_of(x))
    t = loss_tensors(x=x, loc=loc, log_scale=log_scale, scale=scale)
    broadcast_shapes(**t)  # here, to name ``x`` in the error
    _check_x_not_nan(t["x"], validate_args)
    log_p = laplace_log_prob(
        t["x"], t["loc"], t.get("log_scale"), scale=t.get("scale"), validate_args=validate_args
    )
    return sum_trailing(log_p, dims)


def ndim_of(x: Tensor | float) -> int:
    return x.dim() if isinstance(x, Tensor) else 0


def _check_x_not_nan(x: Tensor, validate_args: bool | None) -> None:
    """NaN in the data, named ``x`` (when validating; ``None``: CPU tensors only)."""
    if should_validate(validate_args, x):
        check_not_nan(x, "x")
