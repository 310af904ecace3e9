r"""The multivariate normal log density from a triangular factor, and an unconstrained
parameterisation of that factor.

Nothing here forms a covariance matrix, inverts one, or takes its Cholesky decomposition:

* :func:`multivariate_normal_log_prob` takes the factor :math:`L` of
  :math:`\Sigma = L L^\top` itself and needs only one triangular solve;
* :func:`scale_tril_from_raw` maps :math:`D(D+1)/2` unconstrained numbers (a network
  output) to a valid :math:`L`, so a full covariance can be predicted with no
  "not positive definite" failure.

The low-rank-plus-diagonal covariance is in :mod:`probloss.functional.lowrank`.
Half-precision inputs are computed and returned in float32; float32 inputs are solved in
float64 (``L^{-1} r`` leaves the float32 range) and the result rounded once to float32.
Shapes: events are the last dimension, ``(*, D)``; matrices ``(*, D, D)``; batch
dimensions broadcast like torch (an empty batch gives an empty result).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.constants import LOG_2PI
from .._core.dtype import as_loss_tensors, compute_dtype
from .._core.ops import host_readable
from .._core.shapes import broadcast_shapes
from .._core.validation import check_not_nan, check_renamed_keywords, should_validate
from ..special import softplus
from ._multivariate_shared import (
    check_event,
    event_residual,
    matrix_shape_error,
    solve_triangular,
    work_dtype,
)
from ._squared_norm import half_squared_norm


def multivariate_normal_log_prob(
    value: Tensor,
    loc: Tensor,
    scale_tril: Tensor,
    *,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of :math:`\mathcal N(\mu, L L^\top)` at ``value``, from the factor :math:`L`.

    .. math::
        \log p(x) = -\frac D2 \log 2\pi - \sum_{i=1}^D \log L_{ii}
            - \frac12 \lVert z \rVert^2, \qquad z = L^{-1}(x - \mu),

    with :math:`z` from one triangular solve (``torch.linalg.solve_triangular``) and
    :math:`\log\det\Sigma = 2 \sum_i \log L_{ii}`: no inverse and no covariance is formed,
    so nothing is squared before it is needed. :math:`\tfrac12\lVert z\rVert^2` is summed
    after scaling by a power of two, so it overflows only where the result itself does.
    With per-coordinate scales spanning ``1e-6 .. 1e6`` (float32) or ``1e-150 .. 1e150``
    (float64), i.e. ``L = diag(s) M`` with a well-conditioned ``M``, the error stays below
    4 eps times :math:`\tfrac12\lVert z\rVert^2 + \sum_i |\log L_{ii}| + \tfrac D2 \log 2\pi`
    (tested against mpmath; a relative error where the terms do not cancel), although the
    covariance :math:`L L^\top` of such a factor overflows or underflows. Where the problem
    itself is ill-conditioned (a point near a direction of tiny variance) the error is that
    of a backward-stable evaluation. Only the lower triangle of ``scale_tril`` is read.
    ``value - loc`` may overflow where ``z`` does not (``3e38 - (-3e38)`` in float32): the
    event is then halved exactly and the factor 2 applied after the solve. An infinite
    coordinate of ``value`` or ``loc`` gives ``-inf``, and so does a ``z`` that overflows
    (e.g. a subnormal diagonal entry); the gradient of the quadratic term is then 0 (the
    exact one is beyond the dtype; in a mixture the component's zero responsibility makes
    0 exact), never NaN.

    ``torch.distributions.MultivariateNormal(loc, scale_tril=L)`` computes the same quantity
    (its squared norm overflows sooner); from a ``covariance_matrix`` it needs a Cholesky
    decomposition, which fails ("not positive definite") for correlations that round to 1
    or scales whose squares leave the dtype's range. Use :func:`scale_tril_from_raw` to
    predict ``scale_tril`` with a network.

    Args:
        value: points, shape ``(*, D)``.
        loc: means, shape ``(*, D)``.
        scale_tril: lower-triangular factors with positive diagonal, shape ``(*, D, D)``.
        validate_args: check the diagonal of ``scale_tril`` is positive, that its entries
            above the diagonal are 0 (catches a covariance passed by mistake) and that no
            input is NaN; ``None`` checks CPU tensors only (no GPU host sync).

    Returns:
        One log density per event, shape ``broadcast(value, loc, scale_tril)`` without the
        event dimension: ``(*)``. float32 for half-precision inputs, else their dtype.

    Raises:
        ValueError: ``scale_tril`` is not ``(*, D, D)``, ``value`` or ``loc`` do not end in
            ``D``, batch shapes do not broadcast, or (when validating) a diagonal entry is
            not positive, an entry above the diagonal is nonzero, or an input is NaN.

    Example:
        >>> L = torch.tensor([[1e-6, 0.0], [2e5, 1e6]])  # variances 1e-12 and 4e10 + 1e12
        >>> multivariate_normal_log_prob(torch.tensor([1e-6, 3e5]), torch.zeros(2), L)
        tensor(-2.3429)

    References:
        Standard; e.g. Rasmussen & Williams (2006), *Gaussian Processes for Machine
        Learning*, algorithm 2.1 (log likelihood through a triangular factor).
    """
    value, loc, scale_tril = as_loss_tensors(value=value, loc=loc, scale_tril=scale_tril)
    if scale_tril.dim() < 2 or scale_tril.shape[-1] != scale_tril.shape[-2]:
        raise matrix_shape_error("scale_tril", scale_tril, "(*, D, D) (square)")
    dim = scale_tril.shape[-1]
    check_event(dim, f"scale_tril {tuple(scale_tril.shape)}", value=value, loc=loc)
    broadcast_shapes(
        what="batch shapes",
        value=value.shape[:-1],
        loc=loc.shape[:-1],
        scale_tril=scale_tril.shape[:-2],
    )
    diag = scale_tril.diagonal(dim1=-2, dim2=-1)
    if should_validate(validate_args, value, loc, scale_tril):
        check_not_nan(value, "value")
        check_not_nan(loc, "loc")
        check_not_nan(scale_tril.tril(), "scale_tril")
        _check_positive_diagonal(diag, scale_tril)
        _check_lower_triangular(scale_tril)
    out_dtype = value.dtype
    work = work_dtype(value)
    value, loc, scale_tril = (t.to(work) for t in (value, loc, scale_tril))
    r, factor, infinite = event_residual(value, loc)
    z, overflow = _whitened_residual(scale_tril, r, factor)
    infinite = infinite | overflow
    half_log_det = torch.log(scale_tril.diagonal(dim1=-2, dim2=-1)).sum(-1)  # sum log L_ii
    log_p = -half_squared_norm(z) - half_log_det - 0.5 * dim * LOG_2PI
    return torch.where(infinite, -math.inf, log_p).to(out_dtype)


def _whitened_residual(scale_tril: Tensor, r: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, overflow)``: ``z = L^{-1} r * factor``, and the events where it is not finite.

    A non-finite ``z`` of finite inputs means an intermediate of the solve overflowed (e.g.
    a subnormal diagonal entry of ``L``); ``||z||^2 / 2``, at least its square, then
    overflows too and the log density is ``-inf``. Those events are solved again from
    ``r = 0`` (double where): the solve's backward forms ``-(L^{-T} g) z^T``, which is
    ``0 * inf = NaN`` for the overflowed ``z`` even where the incoming gradient ``g`` is 0,
    and would poison a mixture whose other components are finite. Their gradient is then
    0 (the exact one is beyond the dtype's range; in a mixture the component's
    responsibility ``e^{-inf}`` makes 0 exact). Where the values are free to read
    (:func:`~probloss._core.ops.host_readable`) the second solve runs only when an event
    overflowed; elsewhere always, without a host read. A NaN input
    (``r`` or the lower triangle of ``L``, when not validated) is not an overflow: its
    event stays NaN instead of reading as ``-inf``.
    """
    z = solve_triangular(scale_tril, r, upper=False) * factor
    with torch.no_grad():
        nan_input = torch.isnan(r).any(-1) | torch.isnan(scale_tril.tril()).any((-2, -1))
        overflow = ~torch.isfinite(z).all(-1) & ~nan_input
    if host_readable(overflow) and not bool(overflow.any()):
        return z, overflow
    r = torch.where(overflow.unsqueeze(-1), 0.0, r)
    return solve_triangular(scale_tril, r, upper=False) * factor, overflow


def _check_positive_diagonal(diag: Tensor, scale_tril: Tensor) -> None:
    bad = ~(diag > 0)
    if bad.any():
        raise ValueError(
            f"scale_tril of shape {tuple(scale_tril.shape)} must have a positive diagonal; "
            f"got {int(bad.sum())} diagonal value(s) <= 0 or NaN "
            f"(smallest {diag.min().item():.6g})"
        )


def _check_lower_triangular(scale_tril: Tensor) -> None:
    above = scale_tril.triu(1) != 0
    if above.any():
        raise ValueError(
            f"scale_tril of shape {tuple(scale_tril.shape)} must be lower triangular; "
            f"{int(above.sum())} entries above the diagonal are nonzero (pass the factor L "
            "of the covariance L L^T, e.g. torch.linalg.cholesky(cov), not the covariance)"
        )


def default_min_scale(dtype: torch.dtype) -> float:
    """Default ``min_scale`` of :func:`scale_tril_from_raw`: ``sqrt(eps)`` of the compute dtype.

    ``3.45e-4`` for float32 (and float16 / bfloat16, which are computed in float32),
    ``1.49e-8`` for float64.
    """
    return math.sqrt(torch.finfo(compute_dtype(dtype)).eps)


default_min_diag = default_min_scale  # the name before the floors were unified (same value)


def scale_tril_from_raw(
    raw: Tensor, dim: int, *, min_scale: float | None = None, **renamed: object
) -> Tensor:
    r"""A valid lower-triangular factor :math:`L` from :math:`D(D+1)/2` unconstrained numbers.

    The last dimension of ``raw`` holds the lower triangle of :math:`L` **row by row**
    (the order of ``torch.tril_indices(D, D)``): :math:`L_{00}, L_{10}, L_{11}, L_{20},
    L_{21}, L_{22}, \dots`; entry ``k`` is at row ``i`` and column ``j`` with
    :math:`k = i(i+1)/2 + j`, so the diagonal sits at :math:`k = i(i+3)/2`. Off-diagonal
    entries are taken as they are; the diagonal is soft-floored:

    .. math::
        L_{ij} = r_k \ (i > j), \qquad
        L_{ii} = m + \operatorname{softplus}(r_k) = m + \log(1 + e^{r_k}) > m,

    with the exact :func:`probloss.special.softplus`. Every ``raw`` gives a valid factor of
    a positive definite covariance :math:`L L^\top`, so a network can predict a full
    covariance without a Cholesky decomposition and without "not positive definite"
    errors; pass the result to :func:`multivariate_normal_log_prob`. The gradient of
    :math:`L_{ii}` is :math:`\sigma(r_k) \in (0, 1)`: no clamp, no dead gradient.
    ``softplus`` behaves like ``exp`` for negative inputs (:math:`L_{ii} \approx m + e^{r_k}`,
    so small scales are reached in log space) and like the identity for positive ones (no
    overflow).

    The floor :math:`m` (``min_scale``, the one floor name of probloss, in scale units like
    ``normal_nll``'s: a soft floor, diagonal scale ``= softplus(r) + min_scale``) keeps
    :math:`\log L_{ii}` and :math:`L^{-1}` finite where ``softplus`` underflows (``raw``
    below about -88 in float32); it is in the units of the data, so set it below the
    smallest scale you need to represent (0 disables it, at the risk of a zero diagonal).

    Initialising for an initial scale :math:`s > m` on the diagonal: set the diagonal
    entries of the bias of the layer producing ``raw`` to
    ``probloss.special.softplus_inverse(s - m)`` and the off-diagonal ones to 0 (with small
    weights); :math:`L` then starts near :math:`s I`.

    Args:
        raw: unconstrained numbers, shape ``(*, D(D+1)/2)``; batch dimensions are kept.
        dim: the event size :math:`D \ge 1`.
        min_scale: soft floor :math:`m \ge 0` of the diagonal. Default ``sqrt(eps)`` of the
            compute dtype: 3.45e-4 (float32, float16, bfloat16) and 1.49e-8 (float64), see
            :func:`default_min_scale`. (Formerly ``min_diag``: that keyword now raises a
            TypeError naming ``min_scale``.)

    Returns:
        :math:`L`, shape ``(*, D, D)``, zero above the diagonal; float32 for half-precision
        ``raw`` (it feeds a float32 log density), else the dtype of ``raw``.

    Raises:
        ValueError: ``raw``'s last dimension is not :math:`D(D+1)/2`, ``dim < 1``, or
            ``min_scale`` is negative or not finite.
        TypeError: ``min_diag`` passed (renamed ``min_scale``).

    Example:
        >>> raw = torch.tensor([0.0, 0.5, -20.0], dtype=torch.float64)  # L00, L10, L11
        >>> scale_tril_from_raw(raw, 2, min_scale=1e-6)
        tensor([[6.9315e-01, 0.0000e+00],
                [5.0000e-01, 1.0021e-06]], dtype=torch.float64)
        >>> from probloss.special import softplus_inverse
        >>> bias = torch.zeros(3, dtype=torch.float64)  # start at L = 0.1 I
        >>> bias[[0, 2]] = softplus_inverse(torch.tensor(0.1 - 1e-6, dtype=torch.float64))
        >>> scale_tril_from_raw(bias, 2, min_scale=1e-6)
        tensor([[0.1000, 0.0000],
                [0.0000, 0.1000]], dtype=torch.float64)

    References:
        The softplus-diagonal Cholesky parameterisation is common practice for predicting
        covariances; see e.g. Pinheiro & Bates (1996), "Unconstrained parametrizations for
        variance-covariance matrices", Statistics and Computing 6, 289-296 (log-Cholesky).
    """
    check_renamed_keywords("scale_tril_from_raw", renamed, {"min_diag": "min_scale"})
    (raw,) = as_loss_tensors(raw=raw)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    size = dim * (dim + 1) // 2
    if raw.dim() == 0 or raw.shape[-1] != size:
        got = "a 0-dim tensor" if raw.dim() == 0 else f"last dimension {raw.shape[-1]}"
        raise ValueError(
            f"raw must have shape (*, D(D+1)/2) = (*, {size}) for dim={dim}, "
            f"got shape {tuple(raw.shape)} ({got})"
        )
    if min_scale is None:
        min_scale = default_min_scale(raw.dtype)
    min_scale = float(min_scale)
    # an option (a Python float, a constant to a tracer): plain comparisons, no math.isfinite
    # (a graph break for dynamo); NaN fails both
    if not (0.0 <= min_scale < math.inf):
        raise ValueError(f"min_scale must be finite and >= 0, got {min_scale!r}")
    # Positions as constants from Python integers: index arithmetic on tensors would be
    # traced, and inductor's CPU code generation fails on it (torch 2.13).
    diag_pos = torch.tensor([i * (i + 3) // 2 for i in range(dim)], device=raw.device)  # k
    flat_pos = torch.tensor(  # row-major position i D + j of the k-th entry (i >= j)
        [i * dim + j for i in range(dim) for j in range(i + 1)], device=raw.device
    )
    entries = raw.index_copy(-1, diag_pos, softplus(raw[..., diag_pos]) + min_scale)
    flat = raw.new_zeros((*raw.shape[:-1], dim * dim))
    flat = flat.index_copy(-1, flat_pos, entries)
    return flat.unflatten(-1, (dim, dim))
