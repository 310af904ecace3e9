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


def as_loss_tensors(**tensors: Tensor | float) -> list[Tensor]:
    """Convert named inputs to floating tensors in their common loss dtype."""
    converted = [as_float_tensor(t, name) for name, t in tensors.items()]
    dtype = loss_dtype(*converted)
    return [t.to(dtype) for t in converted]
