r"""Multivariate normal log densities from a triangular factor or a low-rank-plus-diagonal
covariance, and an unconstrained parameterisation of the triangular factor.

Nothing here forms a covariance matrix, inverts one, or takes its Cholesky decomposition:

* :func:`multivariate_normal_log_prob` takes the factor :math:`L` of
  :math:`\Sigma = L L^\top` itself and needs only one triangular solve;
* :func:`scale_tril_from_raw` maps :math:`D(D+1)/2` unconstrained numbers (a network
  output) to a valid :math:`L`, so a full covariance can be predicted with no
  "not positive definite" failure;
* :func:`lowrank_multivariate_normal_log_prob` handles
  :math:`\Sigma = W W^\top + \operatorname{diag}(e^{\ell})` through the triangular factor
  of an :math:`R \times R` capacitance matrix obtained by a QR factorisation, never by a
  Cholesky decomposition that rounding can make fail.

Half-precision inputs are computed and returned in float32 (DESIGN.md, half-precision
policy); the low-rank form computes float32 inputs in float64 (see
:func:`lowrank_multivariate_normal_log_prob`: its quadratic form can be ill-conditioned
beyond float32), as does the dense form (whose ``L^{-1} r`` leaves the float32 range), and
both return float32. Shapes: events are the last dimension, ``(*, D)``;
matrices ``(*, D, D)``; batch dimensions broadcast like torch (an empty batch gives an
empty result).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._dtype import as_loss_tensors
from .._validation import check_not_nan, should_validate
from ..special import mul_exp, softplus
from ._lowrank_scaled import scaled_lowrank_log_prob
from ._squared_norm import half_squared_norm

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def _solve_triangular(factor: Tensor, rhs: Tensor, *, upper: bool) -> Tensor:
    """``factor^{-1} rhs`` for vectors ``rhs`` of shape ``(*, n)``, ``factor`` ``(*, n, n)``.

    A factor without batch dimensions (shared by the whole batch, as for a fixed
    covariance) is solved once against all right-hand sides as the columns of one matrix
    (one BLAS call); otherwise batch dimensions broadcast.
    """
    n = factor.shape[-1]
    batch = torch.broadcast_shapes(factor.shape[:-2], rhs.shape[:-1])
    if factor.shape[:-2].numel() == 1:
        columns = rhs.reshape(-1, n).mT
        solved = torch.linalg.solve_triangular(factor.reshape(n, n), columns, upper=upper)
        return solved.mT.reshape((*batch, n))
    solved = torch.linalg.solve_triangular(factor, rhs.unsqueeze(-1), upper=upper)
    return solved.squeeze(-1)


def _matrix_shape_error(name: str, tensor: Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def _check_event(dim: int, expected: str, **vectors: Tensor) -> None:
    """Every named vector has an event dimension of size ``dim`` (its last)."""
    for name, t in vectors.items():
        if t.dim() == 0 or t.shape[-1] != dim:
            raise ValueError(
                f"{name} must have shape (*, {dim}) to match {expected}, got {tuple(t.shape)}"
            )


def _batch_shape(**shapes: tuple[int, ...]) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {tuple(s)}" for name, s in shapes.items())
        raise ValueError(f"batch shapes do not broadcast: {listed}") from None


# --------------------------------------------------------------------------------------
# Dense factor
# --------------------------------------------------------------------------------------


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
        raise _matrix_shape_error("scale_tril", scale_tril, "(*, D, D) (square)")
    dim = scale_tril.shape[-1]
    _check_event(dim, f"scale_tril {tuple(scale_tril.shape)}", value=value, loc=loc)
    _batch_shape(value=value.shape[:-1], loc=loc.shape[:-1], scale_tril=scale_tril.shape[:-2])
    diag = scale_tril.diagonal(dim1=-2, dim2=-1)
    if should_validate(validate_args, value, loc, scale_tril):
        check_not_nan(value, "value")
        check_not_nan(loc, "loc")
        check_not_nan(scale_tril.tril(), "scale_tril")
        _check_positive_diagonal(diag, scale_tril)
        _check_lower_triangular(scale_tril)
    out_dtype = value.dtype
    work = _work_dtype(value)
    value, loc, scale_tril = (t.to(work) for t in (value, loc, scale_tril))
    r, factor, infinite = _event_residual(value, loc)
    z, overflow = _whitened_residual(scale_tril, r, factor)
    infinite = infinite | overflow
    half_log_det = torch.log(scale_tril.diagonal(dim1=-2, dim2=-1)).sum(-1)  # sum log L_ii
    log_p = -half_squared_norm(z) - half_log_det - 0.5 * dim * _LOG_2PI
    return torch.where(infinite, -math.inf, log_p).to(out_dtype)


def _event_residual(value: Tensor, loc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(r, m, infinite)`` with ``value - loc = r m`` per event, ``r`` finite where it can be.

    Where a coordinate's difference of two finite numbers overflows (``3e38 - (-3e38)`` in
    float32), the whole event is halved (``r = value/2 - loc/2``, exact, ``m = 2``, applied
    after the solve: the standardised residual may be finite). ``infinite`` marks events
    with an infinite coordinate (an infinite observation or mean): their density is 0, the
    log density ``-inf``; they are fed ``r = 0`` so that no ``inf - inf`` reaches the solve
    (their gradient is then 0; the exact one is infinite).
    """
    r = value - loc
    finite_inputs = torch.isfinite(value) & torch.isfinite(loc)
    over = (torch.isinf(r) & finite_inputs).any(-1, keepdim=True)
    halves = 0.5 * torch.where(over, value, 0.0) - 0.5 * torch.where(over, loc, 0.0)
    r = torch.where(over, halves, r)
    infinite = torch.isinf(r).any(-1) & ~torch.isnan(r).any(-1)
    r = torch.where(infinite.unsqueeze(-1), 0.0, r)
    factor = torch.where(over, 2.0, 1.0).to(r.dtype)
    return r, factor, infinite


def _whitened_residual(scale_tril: Tensor, r: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, overflow)``: ``z = L^{-1} r * factor``, and the events where it is not finite.

    A non-finite ``z`` of finite inputs means an intermediate of the solve overflowed (e.g.
    a subnormal diagonal entry of ``L``); ``||z||^2 / 2``, at least its square, then
    overflows too and the log density is ``-inf``. Those events are solved again from
    ``r = 0`` (double where): the solve's backward forms ``-(L^{-T} g) z^T``, which is
    ``0 * inf = NaN`` for the overflowed ``z`` even where the incoming gradient ``g`` is 0,
    and would poison a mixture whose other components are finite. Their gradient is then
    0 (the exact one is beyond the dtype's range; in a mixture the component's
    responsibility ``e^{-inf}`` makes 0 exact). On CPU (not compiling) the second solve
    runs only when an event overflowed; elsewhere always, without a host read.
    """
    z = _solve_triangular(scale_tril, r, upper=False) * factor
    overflow = ~torch.isfinite(z.detach()).all(-1)
    eager_cpu = r.device.type == "cpu" and not torch.compiler.is_compiling()
    if eager_cpu and not bool(overflow.any()):
        return z, overflow
    r = torch.where(overflow.unsqueeze(-1), 0.0, r)
    return _solve_triangular(scale_tril, r, upper=False) * factor, overflow


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


# --------------------------------------------------------------------------------------
# Unconstrained parameterisation of the factor
# --------------------------------------------------------------------------------------


def default_min_diag(dtype: torch.dtype) -> float:
    """Default floor of :func:`scale_tril_from_raw`'s diagonal: ``sqrt(eps)`` of the compute dtype.

    ``3.45e-4`` for float32 (and float16 / bfloat16, which are computed in float32),
    ``1.49e-8`` for float64.
    """
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return math.sqrt(torch.finfo(compute).eps)


def scale_tril_from_raw(raw: Tensor, dim: int, *, min_diag: float | None = None) -> Tensor:
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

    The floor :math:`m` (``min_diag``) keeps :math:`\log L_{ii}` and :math:`L^{-1}` finite
    where ``softplus`` underflows (``raw`` below about -88 in float32); it is in the units of
    the data, so set it below the smallest scale you need to represent (0 disables it,
    at the risk of a zero diagonal).

    Initialising for an initial scale :math:`s > m` on the diagonal: set the diagonal
    entries of the bias of the layer producing ``raw`` to
    ``probloss.special.softplus_inverse(s - m)`` and the off-diagonal ones to 0 (with small
    weights); :math:`L` then starts near :math:`s I`.

    Args:
        raw: unconstrained numbers, shape ``(*, D(D+1)/2)``; batch dimensions are kept.
        dim: the event size :math:`D \ge 1`.
        min_diag: floor :math:`m \ge 0` of the diagonal. Default ``sqrt(eps)`` of the compute
            dtype: 3.45e-4 (float32, float16, bfloat16) and 1.49e-8 (float64), see
            :func:`default_min_diag`.

    Returns:
        :math:`L`, shape ``(*, D, D)``, zero above the diagonal; float32 for half-precision
        ``raw`` (it feeds a float32 log density), else the dtype of ``raw``.

    Raises:
        ValueError: ``raw``'s last dimension is not :math:`D(D+1)/2`, ``dim < 1``, or
            ``min_diag`` is negative or not finite.

    Example:
        >>> raw = torch.tensor([0.0, 0.5, -20.0], dtype=torch.float64)  # L00, L10, L11
        >>> scale_tril_from_raw(raw, 2, min_diag=1e-6)
        tensor([[6.9315e-01, 0.0000e+00],
                [5.0000e-01, 1.0021e-06]], dtype=torch.float64)
        >>> from probloss.special import softplus_inverse
        >>> bias = torch.zeros(3, dtype=torch.float64)  # start at L = 0.1 I
        >>> bias[[0, 2]] = softplus_inverse(torch.tensor(0.1 - 1e-6, dtype=torch.float64))
        >>> scale_tril_from_raw(bias, 2, min_diag=1e-6)
        tensor([[0.1000, 0.0000],
                [0.0000, 0.1000]], dtype=torch.float64)

    References:
        The softplus-diagonal Cholesky parameterisation is common practice for predicting
        covariances; see e.g. Pinheiro & Bates (1996), "Unconstrained parametrizations for
        variance-covariance matrices", Statistics and Computing 6, 289-296 (log-Cholesky).
    """
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
    if min_diag is None:
        min_diag = default_min_diag(raw.dtype)
    min_diag = float(min_diag)
    if not (math.isfinite(min_diag) and min_diag >= 0.0):
        raise ValueError(f"min_diag must be finite and >= 0, got {min_diag!r}")
    rows, cols = torch.tril_indices(dim, dim, device=raw.device)
    diag_pos = torch.arange(dim, device=raw.device)
    diag_pos = diag_pos * (diag_pos + 3) // 2  # k = i(i+1)/2 + i
    entries = raw.index_copy(-1, diag_pos, softplus(raw[..., diag_pos]) + min_diag)
    flat = raw.new_zeros((*raw.shape[:-1], dim * dim))
    flat = flat.index_copy(-1, rows * dim + cols, entries)
    return flat.unflatten(-1, (dim, dim))


# --------------------------------------------------------------------------------------
# Low rank plus diagonal
# --------------------------------------------------------------------------------------


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
        raise _matrix_shape_error("cov_factor", cov_factor, "(*, D, R)")
    dim = cov_factor.shape[-2]
    _check_event(
        dim, f"cov_factor {tuple(cov_factor.shape)}", value=value, loc=loc, log_diag=log_diag
    )
    _batch_shape(
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
    work = _work_dtype(value)
    value, loc, cov_factor, log_diag = (t.to(work) for t in (value, loc, cov_factor, log_diag))
    return _lowrank_log_prob(value, loc, cov_factor, log_diag).to(out_dtype)


def _work_dtype(value: Tensor) -> torch.dtype:
    """float64 for float32 (and half, already float32) inputs where the device has it.

    For the dense factor: ``z = L^{-1} r`` of float32 entries reaches ``3.4e38 / 1e-45`` and
    its square ``1e167`` in two-dimensional problems, far beyond float32 but not float64, so
    the value and the gradients (rounded once to float32, to +-inf where they exceed it)
    are right where a float32 solve gives ``0 * inf``. For the low-rank form see below.

    The quadratic form of a point along a long factor direction is ill-conditioned: a
    relative rounding ``u`` of the whitened residual or factor leaves a component ``u
    ||r~||`` outside the factor's range, and changes the Mahalanobis term by ``(u ||r~||)^2``
    in *any* working-precision evaluation, QR or not (0.75 of the log density for the
    example below in float32: ``||r~|| = 8e6``). Computing float32 inputs in float64 makes
    that ``(1.1e-16 ||r~||)^2``, below float32 rounding for ``||r~|| < 1e12``; the result is
    then rounded once to float32. MPS has no float64: there the float32 inputs are computed
    in float32 (backward-stable, within the bound above).
    """
    if value.dtype == torch.float32 and value.device.type != "mps":
        return torch.float64
    return value.dtype


def _lowrank_log_prob(value: Tensor, loc: Tensor, cov_factor: Tensor, log_diag: Tensor) -> Tensor:
    """The low-rank log density in the dtype of its (already checked) inputs.

    Events whose whitened factor ``e^{-l/2} W`` exceeds ``finfo.max ** 0.25``
    (:func:`_needs_scaling`) are computed by :func:`scaled_lowrank_log_prob` (each
    coordinate scaled by its own size); on CPU (not compiling) only when some event needs it, else
    always, selected without a host read. Double where: each path sees safe inputs
    (``W = 0``, ``l = 0``) in the other's events.
    """
    rank = cov_factor.shape[-1]
    if rank == 0:
        return _whitened_log_prob(value, loc, cov_factor, log_diag)
    scaled = _needs_scaling(cov_factor, log_diag)
    if value.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(scaled.any()):
        return _whitened_log_prob(value, loc, cov_factor, log_diag)
    pick = scaled.unsqueeze(-1)
    plain = _whitened_log_prob(
        value,
        loc,
        torch.where(pick.unsqueeze(-1), 0.0, cov_factor),
        torch.where(pick, 0.0, log_diag),
    )
    residual, factor, infinite = _event_residual(value, loc)
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
    residual, factor, infinite = _event_residual(value, loc)
    r = mul_exp(residual, half_neg) * factor
    half_log_det = 0.5 * log_diag.sum(-1)  # log det(diag(d)) / 2
    if rank == 0:
        log_p = -half_squared_norm(r) - half_log_det - 0.5 * dim * _LOG_2PI
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
    y = _solve_triangular(c, qtr, upper=True)
    residual = r - (y.unsqueeze(-2) @ w.mT).squeeze(-2)
    batch = torch.broadcast_shapes(residual.shape[:-1], y.shape[:-1])
    stacked = torch.cat([residual.expand((*batch, dim)), y.expand((*batch, rank))], dim=-1)
    log_p = -half_squared_norm(stacked) - half_log_det - 0.5 * dim * _LOG_2PI
    return torch.where(infinite, -math.inf, log_p)
