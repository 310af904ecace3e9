"""Dtype policy for log densities, divergences and losses (DESIGN.md, half precision).

Like torch autocast for losses: float16 and bfloat16 inputs are computed and returned in
float32 (a KL of 5e12 is a fine float32 and an overflow in float16). float32 and float64
stay as they are; mixed inputs follow torch type promotion first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .special._dtype import as_float_tensor, compute_dtype


def loss_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a log density or loss of these tensors is computed and returned in."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return compute_dtype(dtype)


def loss_tensors(**named: Tensor | float | None) -> dict[str, Tensor]:
    """The given (not None) inputs as tensors of their common loss dtype and device.

    Tensors decide the dtype (:func:`loss_dtype`); Python numbers are then converted
    straight to it, so that a float64 computation sees the float64 value of ``0.1`` rather
    than its float32 rounding. With no tensor at all, the default dtype is used.

    Raises:
        TypeError: if a tensor is not floating point (naming it).
    """
    given = {name: v for name, v in named.items() if v is not None}
    tensors = {name: as_float_tensor(v, name) for name, v in given.items() if isinstance(v, Tensor)}
    if tensors:
        dtype = loss_dtype(*tensors.values())
        device = next(iter(tensors.values())).device
    else:
        dtype, device = compute_dtype(torch.get_default_dtype()), None
    return {
        name: tensors[name].to(dtype)
        if name in tensors
        else torch.as_tensor(v, dtype=dtype, device=device)
        for name, v in given.items()
    }


def as_loss_tensors(**named: Tensor | float) -> list[Tensor]:
    """:func:`loss_tensors` as a list, in argument order (every argument given)."""
    return list(loss_tensors(**named).values())


def promote_float_tensors(**named: Tensor | float) -> list[Tensor]:
    """Named inputs as floating tensors of their promoted dtype, half staying half.

    For functions that return their input dtype (CDFs, samples, distribution parameters),
    unlike :func:`loss_tensors`, which moves half precision to float32.
    """
    converted = [as_float_tensor(t, name) for name, t in named.items()]
    dtype = converted[0].dtype
    for t in converted[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in converted]
