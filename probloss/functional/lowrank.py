r"""The multivariate normal log density of a low-rank-plus-diagonal covariance
:math:`\Sigma = W W^\top + \operatorname{diag}(e^{\ell})`.

Through the triangular factor of an :math:`R \times R` capacitance matrix obtained by a QR
factorisation, never by a Cholesky decomposition that rounding can make fail; events whose
whitened factor would overflow go to module ``_lowrank_scaled``. Float32 (and
half-precision) inputs are computed in float64 and returned in float32 (see
:func:`lowrank_multivariate_normal_log_prob`: its quadratic form can be ill-conditioned
beyond float32). Shapes: events are the last dimension, ``(*, D)``; ``W`` is ``(*, D, R)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.constants import LOG_2PI
from .._core.dtype import as_loss_tensors
from .._core.ops import host_readable
from .._core.shapes import broadcast_shapes
from .._core.validation import check_not_nan, should_validate
from ..special import mul_exp
from ._lowrank_scaled import scaled_lowrank_log_prob
from ._multivariate_shared import (
    check_event,
    event_residual,
    matrix_shape_error,
    solve_triangular,
    work_dtype,
)
from ._squared_norm import half_squared_norm


def lowrank_multivariate_normal_log_prob(
    value: Tensor,
    loc: Tensor,
    cov_factor: Tensor,
    log_diag: Tensor,
    *,
    validate_args: bool | None = None,
) -> Tensor:
    r"""Log density of :math:`\mathcal N(\mu, W W^\top + \operatorname{diag}(e^\ell))` at ``value``.

    With :math:`d = e^{\ell}` (``log_diag`` is unconstrained), the scaled factor and
    residual :math:`\tilde W = d^{-1/2} W` (rows scaled), :math:`\tilde r = d^{-1/2}(x - \mu)`
    and the :math:`R \times R` capacitance matrix
    :math:`K = I + \tilde W^\top \tilde W = I + W^\top D^{-1} W`, the matrix determinant
    lemma and the Woodbury identity give

    .. math::
        \log p(x) = -\frac D2 \log 2\pi - \frac12 \sum_i \ell_i - \log\det C
            - \frac12\Big(\lVert \tilde r - \tilde W y \rVert^2 + \lVert y \rVert^2\Big),
        \qquad K = C^\top C, \quad y = K^{-1} \tilde W^\top \tilde r .

    The quadratic form is Woodbury's
    :math:`\tilde r^\top (I - \tilde W K^{-1} \tilde W^\top) \tilde r` written as the
    optimum of the ridge problem :math:`\min_y \lVert\tilde r - \tilde W y\rVert^2 +
    \lVert y\rVert^2`: a sum of two squares instead of the difference
    :math:`\lVert\tilde r\rVert^2 - \lVert C^{-\top} \tilde W^\top \tilde r\rVert^2`,
    which cancels when the residual lies along a large :math:`\tilde W`. The triangular
    factor :math:`C` of :math:`K` (its Cholesky factor up to the signs of its rows) is the
    R factor of the QR decomposition of the stacked matrix
    :math:`\left[\begin{smallmatrix}\tilde W \\ I\end{smallmatrix}\right]`, whose singular
    values are all at least 1: forming :math:`K` and calling ``cholesky`` squares the
    condition number, and in float32 can fail ("not positive definite"), depending on the
    rounding of the BLAS, for nearly collinear columns with :math:`\lVert\tilde W\rVert
    \approx 3 \cdot 10^3`, as ``torch.distributions.LowRankMultivariateNormal`` can.
    :math:`y` is the QR
    least-squares solution :math:`C^{-1} Q_1^\top \tilde r`. Cost
    :math:`O(D R^2)` per event instead of :math:`O(D^3)`.

    Accuracy: the evaluation is backward stable, and no working-precision evaluation can do
    better for a point along a long factor direction: a relative rounding ``u`` of the
    whitened residual :math:`\tilde r` leaves a component of size :math:`u\lVert\tilde
    r\rVert` outside the factor's range and moves the Mahalanobis term by
    :math:`(u\lVert\tilde r\rVert)^2`, whatever the QR or BLAS underneath (0.75 of the log
    density of the example below in float32). So float32 inputs (and half-precision ones,
    promoted to float32) are computed in float64 and the result rounded once to float32
    (except on MPS, which has no float64); float64 inputs in float64. The error is at most
    ``4 eps (scale + cond) + (4 eps ||r~||)^2`` with ``eps`` that of float64, ``scale``
    the size of the terms summed and ``cond`` the first-order effect of relative
    perturbations eps of the inputs, plus half an ulp of a float32 result; gradients in
    whitened coordinates within ``16 eps G^2``, ``G = 1 + ||r~|| + ||W~||(1 + ||y||)``
    (tests/functional/test_multivariate_edges.py).

    Vanishing diagonal entries: where a whitened factor entry :math:`e^{-\ell_i/2} W_{ij}`
    exceeds ``finfo.max ** 0.25`` (``1e77`` in float64, also for float32 inputs; ``4e9``
    for float32 on MPS), e.g. :math:`\ell_i < -354` under a factor row of size 1, the QR's
    backward would multiply such entries pairwise (``inf - inf``), and the event is
    computed with each coordinate scaled by its own size instead
    (``max(l_i/2, log max_j |W_ij|)``, module ``_lowrank_scaled``,
    ``O(D^3)`` for those events only): finite where the density is. Where the quadratic
    form itself overflows there (``log p = -inf``), the gradients are those of the
    log-determinant alone (the quadratic's are beyond the dtype's range or negligible
    against an infinite loss). With a zero row the
    coordinate is independent (``-inf``, or ``-\ell_i/2`` at its mean). Where more such
    coordinates than the rank ``R`` vanish together, the covariance is singular to the dtype
    and the density depends on those :math:`d_i` beyond its range: the result is the limit
    :math:`d_i \to 0` (``-inf``, ``+inf`` exactly at the mean).

    Args:
        value: points, shape ``(*, D)``.
        loc: means, shape ``(*, D)``.
        cov_factor: :math:`W`, shape ``(*, D, R)``; ``R = 0`` gives the diagonal normal.
        log_diag: :math:`\ell`, the log of the diagonal part of the covariance, shape
            ``(*, D)``.
        validate_args: check that no input is NaN; ``None`` checks CPU tensors only.

    Returns:
        One log density per event, shape ``(*)`` (batch dimensions broadcast); float32 for
        half-precision inputs, else their dtype.

    Raises:
        ValueError: ``cov_factor`` is not ``(*, D, R)``, ``value``, ``loc`` or ``log_diag``
            do not end in ``D``, batch shapes do not broadcast, or (when validating) an
            input is NaN.

    Example:
        A point along the factor, with diagonal noise :math:`e^{-30}`: its quadratic form is
        :math:`\approx 1`, which the subtraction form (as in
        ``torch.distributions.LowRankMultivariateNormal``, 26.3473 here) rounds to 0, and a
        float32 evaluation of the ridge form misses by up to 0.75 depending on the last bit
        of the QR solution (25.0973 on one CPU). Computed in float64 it is 25.847306...
        (mpmath), correctly rounded to float32 here on every CPU.

        >>> W = torch.tensor([[2.0], [1.0], [-1.0]])
        >>> x = torch.tensor([2.0, 1.0, -1.0])
        >>> lowrank_multivariate_normal_log_prob(x, torch.zeros(3), W, torch.full((3,), -30.0))
        tensor(25.8473)

    References:
        Woodbury (1950), "Inverting modified matrices"; Harville (1997), *Matrix Algebra
        From a Statistician's Perspective*, thm. 18.1.1 (matrix determinant lemma);
        Golub & Van Loan (2013), *Matrix Computations*, sec. 5.3 (least squares by QR
        rather than the normal equations).
    """
    value, loc, cov_factor, log_diag = as_loss_tensors(
        value=value, loc=loc, cov_factor=cov_factor, log_diag=log_diag
    )
    if cov_factor.dim() < 2:
        raise matrix_shape_error("cov_factor", cov_factor, "(*, D, R)")
    dim = cov_factor.shape[-2]
    check_event(
        dim, f"cov_factor {tuple(cov_factor.shape)}", value=value, loc=loc, log_diag=log_diag
    )
    broadcast_shapes(
        what="batch shapes",
        value=value.shape[:-1],
        loc=loc.shape[:-1],
        cov_factor=cov_factor.shape[:-2],
        log_diag=log_diag.shape[:-1],
    )
    if should_validate(validate_args, value, loc, cov_factor, log_diag):
        for name, t in (
            ("value", value),
            ("loc", loc),
            ("cov_factor", cov_factor),
            ("log_diag", log_diag),
        ):
            check_not_nan(t, name)
    out_dtype = value.dtype
    work = work_dtype(value)
    value, loc, cov_factor, log_diag = (t.to(work) for t in (value, loc, cov_factor, log_diag))
    return _lowrank_log_prob(value, loc, cov_factor, log_diag).to(out_dtype)


def _lowrank_log_prob(value: Tensor, loc: Tensor, cov_factor: Tensor, log_diag: Tensor) -> Tensor:
    """The low-rank log density in the dtype of its (already checked) inputs.

    Events whose whitened factor ``e^{-l/2} W`` exceeds ``finfo.max ** 0.25``
    (:func:`_needs_scaling`) are computed by :func:`scaled_lowrank_log_prob` (each
    coordinate scaled by its own size); where the values are free to read
    (:func:`~probloss._core.ops.host_readable`) only when some event needs it, else always,
    selected without a host read. Double where: each path sees safe inputs
    (``W = 0``, ``l = 0``) in the other's events.
    """
    rank = cov_factor.shape[-1]
    if rank == 0:
        return _whitened_log_prob(value, loc, cov_factor, log_diag)
    scaled = _needs_scaling(cov_factor, log_diag)
    if host_readable(scaled) and not bool(scaled.any()):
        return _whitened_log_prob(value, loc, cov_factor, log_diag)
    pick = scaled.unsqueeze(-1)
    plain = _whitened_log_prob(
        value,
        loc,
        torch.where(pick.unsqueeze(-1), 0.0, cov_factor),
        torch.where(pick, 0.0, log_diag),
    )
    residual, factor, infinite = event_residual(value, loc)
    far = scaled_lowrank_log_prob(
        residual,
        factor,
        torch.where(pick.unsqueeze(-1), cov_factor, 0.0),
        torch.where(pick, log_diag, 0.0),
    )
    far = torch.where(infinite, -math.inf, far)
    return torch.where(scaled, far, plain)


def _needs_scaling(cov_factor: Tensor, log_diag: Tensor) -> Tensor:
    """Events, shape ``(*)``, that :func:`scaled_lowrank_log_prob` computes: where an entry of
    the whitened factor ``e^{-l/2} W`` or residual ``e^{-l/2}(x - mu)`` exceeds
    ``finfo.max ** 0.25`` (or a nonzero one overflows: the value itself is NaN there).

    Beyond that size the QR's backward forms products of two such entries with a third
    (``C^{-T}`` times outer products), which overflow to ``inf - inf`` = NaN although the
    gradients are finite (e.g. ``W = 708`` over ``l = -858``: whitened ``1e189``); scaled
    by each coordinate's own size every entry of that path is at most 1 or of the order of
    the standardised residual. Computed without gradient; NaN (a NaN input) is not picked.
    """
    with torch.no_grad():
        big = torch.finfo(log_diag.dtype).max ** 0.25
        half_neg = -0.5 * log_diag
        w = mul_exp(cov_factor, half_neg.unsqueeze(-1)).abs().amax(-1)  # (*, D)
        return (w > big).any(-1)


def _whitened_log_prob(value: Tensor, loc: Tensor, cov_factor: Tensor, log_diag: Tensor) -> Tensor:
    """The low-rank log density by whitening with ``e^{-l/2}`` (see the public docstring)."""
    dim, rank = cov_factor.shape[-2:]
    half_neg = -0.5 * log_diag  # log d^{-1/2}; mul_exp keeps a zero entry 0 where it overflows
    residual, factor, infinite = event_residual(value, loc)
    r = mul_exp(residual, half_neg) * factor
    half_log_det = 0.5 * log_diag.sum(-1)  # log det(diag(d)) / 2
    if rank == 0:
        log_p = -half_squared_norm(r) - half_log_det - 0.5 * dim * LOG_2PI
        return torch.where(infinite, -math.inf, log_p)
    w = mul_exp(cov_factor, half_neg.unsqueeze(-1))  # rows of W scaled: d^{-1/2} W
    # an infinite whitened residual in a coordinate outside the factor's span (finite row
    # of W~): the Mahalanobis term is infinite, log p = -inf; the row is fed r~ = 0
    off_span = (torch.isinf(r) & torch.isfinite(w).all(-1)).any(-1)
    infinite = infinite | off_span
    # double where: r~ formed again from a zero residual there, so the backward of e^{-l/2}
    # sees 0 (0 * inf = NaN in d/dlog_diag otherwise); the gradient there is 0 (the exact
    # one is infinite, like that of an infinite input)
    residual = torch.where(off_span.unsqueeze(-1), 0.0, residual)
    r = mul_exp(residual, half_neg) * factor
    eye = torch.eye(rank, dtype=w.dtype, device=w.device).expand((*w.shape[:-2], rank, rank))
    q, c = torch.linalg.qr(torch.cat([w, eye], dim=-2))  # [W~; I] = Q C, C^T C = K
    # log det K / 2 = sum log|C_jj|; |C_jj| >= 1 since K >= I
    half_log_det = half_log_det + c.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    # y = C^{-1} Q_1^T r~ (least squares for [W~; I] y = [r~; 0]); Q_1 = top D rows of Q
    qtr = (r.unsqueeze(-2) @ q[..., :dim, :]).squeeze(-2)
    y = solve_triangular(c, qtr, upper=True)
    residual = r - (y.unsqueeze(-2) @ w.mT).squeeze(-2)
    batch = torch.broadcast_shapes(residual.shape[:-1], y.shape[:-1])
    stacked = torch.cat([residual.expand((*batch, dim)), y.expand((*batch, rank))], dim=-1)
    log_p = -half_squared_norm(stacked) - half_log_det - 0.5 * dim * LOG_2PI
    return torch.where(infinite, -math.inf, log_p)
