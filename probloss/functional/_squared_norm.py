"""``||z||^2 / 2`` over the last dimension, overflowing only where the result does."""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.ops import kernel_op


def half_squared_norm(z: Tensor) -> Tensor:
    """``||z||^2 / 2`` over the last dimension of ``z`` (shape ``(*, n)`` -> ``(*)``),
    finite wherever the result is; gradient ``z``. See :class:`_HalfSquaredNorm`."""
    return _HalfSquaredNorm.apply(z)


class _HalfSquaredNorm(torch.autograd.Function):
    """``||z||^2 / 2`` over the last dimension without overflow where the result is finite.

    ``sum(z^2)`` overflows as soon as one ``z_i^2`` does (``|z_i| > 1.8e19`` in float32)
    even when half the sum is representable. Rows whose largest ``|z_i|`` exceeds 1 are
    scaled by a power of two ``p <= max|z_i|`` (exact) and the result is
    ``((sum((z/p)^2) / 2) p) p``, which overflows only if the result does. Rows with
    ``max|z_i| <= 1`` are summed as they are (a squared entry that underflows is below
    ``tiny``, negligible next to the other terms of a log density). The backward is
    ``grad * z`` (differentiable again), cheaper than autograd through the scaling.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return _half_squared_norm_value(z)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * z  # d(||z||^2 / 2)/dz = z


# an operator: inductor's CPU code generation fails on frexp of float64 (torch 2.13)
@kernel_op("half_squared_norm", event_dims=(1,), fake=lambda z: z.new_empty(z.shape[:-1]))
def _half_squared_norm_value(z: Tensor) -> Tensor:
    """The value of :class:`_HalfSquaredNorm`."""
    big = z.abs().amax(dim=-1, keepdim=True)
    # p = 2^floor(log2(max|z|)) for max|z| > 1 (finite), else 1; an exact power of two,
    # from frexp's exponent (big = m 2^e, m in [0.5, 1)): log2 of finfo.max rounds to
    # 1024 in float64 and exp2 of it is inf
    _, exponent = torch.frexp(big)
    p = torch.where(
        (big > 1.0) & torch.isfinite(big), torch.ldexp(torch.ones_like(big), exponent - 1), 1.0
    )
    half_sum = (z / p).square().sum(dim=-1, keepdim=True).mul_(0.5)
    return half_sum.mul_(p).mul_(p).squeeze(-1)
