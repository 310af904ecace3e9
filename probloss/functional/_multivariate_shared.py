"""Pieces shared by the dense and the low-rank multivariate normal log densities.

Shape checks that name the argument, the event residual ``value - loc`` split so that it
stays finite, the triangular solve of a batch of vectors, and the working dtype (float64
for float32 inputs where the device has it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def solve_triangular(factor: Tensor, rhs: Tensor, *, upper: bool) -> Tensor:
    """``factor^{-1} rhs`` for vectors ``rhs`` of shape ``(*, n)``, ``factor`` ``(*, n, n)``.

    A factor without batch dimensions (shared by the whole batch, as for a fixed
    covariance) is solved once against all right-hand sides as the columns of one matrix
    (one BLAS call); otherwise batch dimensions broadcast.
    """
    n = factor.shape[-1]
    batch = torch.broadcast_shapes(factor.shape[:-2], rhs.shape[:-1])
    # per dimension, not numel(): a dynamic batch size (torch.export) must not be guarded
    if all(size == 1 for size in factor.shape[:-2]):
        columns = rhs.reshape(-1, n).mT
        solved = torch.linalg.solve_triangular(factor.reshape(n, n), columns, upper=upper)
        return solved.mT.reshape((*batch, n))
    solved = torch.linalg.solve_triangular(factor, rhs.unsqueeze(-1), upper=upper)
    return solved.squeeze(-1)


def matrix_shape_error(name: str, tensor: Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def check_event(dim: int, expected: str, **vectors: Tensor) -> None:
    """Every named vector has an event dimension of size ``dim`` (its last)."""
    for name, t in vectors.items():
        if t.dim() == 0 or t.shape[-1] != dim:
            raise ValueError(
                f"{name} must have shape (*, {dim}) to match {expected}, got {tuple(t.shape)}"
            )


def event_residual(value: Tensor, loc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def work_dtype(value: Tensor) -> torch.dtype:
    """float64 for float32 (and half, already float32) inputs where the device has it.

    For the dense factor: ``z = L^{-1} r`` of float32 entries reaches ``3.4e38 / 1e-45`` and
    its square ``1e167`` in two-dimensional problems, far beyond float32 but not float64, so
    the value and the gradients (rounded once to float32, to +-inf where they exceed it)
    are right where a float32 solve gives ``0 * inf``. For the low-rank form:

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
